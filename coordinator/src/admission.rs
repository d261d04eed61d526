//! Admission: whether a request may start, given the KV cache the plan reserved. Every
//! stage holds `kv_tokens` positions per layer (the plan's `--kv-tokens`, the same on
//! every stage), so one count of positions serves them all: a request reserves its prompt
//! plus `max_tokens` (what its cache can grow to) before it starts, and gives them back
//! when it ends. The stages enforce the same reservations on their side
//! ([`strata_net::frame::Step::reserve`]), so memory stays what the plan said.
//!
//! A request that does not fit now waits in a bounded queue, first come first served (a
//! large request is not overtaken for ever by small ones); past the queue it is refused
//! with a time to retry after. One that could never fit is refused at once.
//!
//! [`Admission`] is the sans-IO core; [`Gate`] is its shell, which wakes queued requests
//! and hands out [`Reservation`]s that give their positions back when dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A request's place in the gate.
pub type Ticket = u64;

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It needs more positions than a stage holds at all.
    TooLarge {
        /// Positions it needs.
        need: usize,
        /// Positions each stage holds.
        capacity: usize,
    },
    /// The queue is full: retry after about this long.
    Busy {
        /// Requests waiting.
        queued: usize,
        /// A fair guess at when a place frees up.
        retry_after: Duration,
    },
}

/// What happens to a request that asks to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It may start now.
    Admitted(Ticket),
    /// It waits its turn.
    Queued(Ticket),
    /// It may not start.
    Refused(Refusal),
}

/// The admission state machine: positions reserved, requests queued.
#[derive(Debug)]
pub struct Admission {
    capacity: usize,
    max_queue: usize,
    reserved: HashMap<Ticket, usize>,
    queue: VecDeque<(Ticket, usize)>,
    next: Ticket,
    /// How long requests held their reservation, smoothed (for `retry_after`).
    typical_hold: Duration,
}

impl Admission {
    /// A gate for `capacity` positions and at most `max_queue` waiting requests.
    pub fn new(capacity: usize, max_queue: usize) -> Self {
        Admission {
            capacity,
            max_queue,
            reserved: HashMap::new(),
            queue: VecDeque::new(),
            next: 0,
            typical_hold: Duration::from_secs(2),
        }
    }

    /// Positions each stage holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions reserved by running requests.
    pub fn reserved(&self) -> usize {
        self.reserved.values().sum()
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// A request that needs `need` positions asks to start.
    pub fn ask(&mut self, need: usize) -> Decision {
        if need > self.capacity {
            return Decision::Refused(Refusal::TooLarge {
                need,
                capacity: self.capacity,
            });
        }
        self.next += 1;
        let ticket = self.next;
        // Nobody waits ahead of it and it fits: in.
        if self.queue.is_empty() && self.reserved() + need <= self.capacity {
            self.reserved.insert(ticket, need);
            return Decision::Admitted(ticket);
        }
        if self.queue.len() >= self.max_queue {
            return Decision::Refused(Refusal::Busy {
                queued: self.queue.len(),
                retry_after: self.retry_after(),
            });
        }
        self.queue.push_back((ticket, need));
        Decision::Queued(ticket)
    }

    /// A guess at when a queued place frees: the queue drains about as many requests per
    /// typical answer as run at once.
    fn retry_after(&self) -> Duration {
        let running = self.reserved.len().max(1) as u32;
        let waves = (self.queue.len() as u32).div_ceil(running).max(1);
        (self.typical_hold * waves).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// A request ends (or a queued one gives up): its positions come back. `held` is how
    /// long it ran (none for one that never started). Returns the queued tickets that
    /// start now.
    pub fn release(&mut self, ticket: Ticket, held: Option<Duration>) -> Vec<Ticket> {
        self.queue.retain(|(t, _)| *t != ticket);
        if self.reserved.remove(&ticket).is_some() {
            if let Some(held) = held {
                self.typical_hold = (self.typical_hold * 3 + held) / 4;
            }
        }
        let mut admitted = Vec::new();
        while let Some(&(ticket, need)) = self.queue.front() {
            if self.reserved() + need > self.capacity {
                break;
            }
            self.queue.pop_front();
            self.reserved.insert(ticket, need);
            admitted.push(ticket);
        }
        admitted
    }
}

/// The shell: the core behind a lock, and the queued requests' wake-ups.
pub struct Gate {
    inner: Mutex<GateInner>,
}

struct GateInner {
    core: Admission,
    waiting: HashMap<Ticket, oneshot::Sender<()>>,
}

/// A request's hold on its positions; dropping it gives them back (and starts whoever
/// waited for them).
pub struct Reservation {
    gate: Arc<Gate>,
    ticket: Ticket,
    /// When it was admitted (None while queued).
    since: Option<Instant>,
    /// Positions held.
    need: usize,
    /// Fires when a queued request is admitted.
    admitted: Option<oneshot::Receiver<()>>,
}

impl Gate {
    /// A gate for `capacity` positions and `max_queue` waiting requests.
    pub fn new(capacity: usize, max_queue: usize) -> Arc<Self> {
        Arc::new(Gate {
            inner: Mutex::new(GateInner {
                core: Admission::new(capacity, max_queue),
                waiting: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Positions each stage holds; positions reserved; requests queued.
    pub fn figures(&self) -> (usize, usize, usize) {
        let g = self.lock();
        (g.core.capacity(), g.core.reserved(), g.core.queued())
    }

    /// Asks for `need` positions: a reservation (maybe still queued), or why not.
    pub fn ask(self: &Arc<Self>, need: usize) -> Result<Reservation, Refusal> {
        let mut g = self.lock();
        let (ticket, admitted) = match g.core.ask(need) {
            Decision::Refused(r) => return Err(r),
            Decision::Admitted(t) => (t, None),
            Decision::Queued(t) => {
                let (tx, rx) = oneshot::channel();
                g.waiting.insert(t, tx);
                (t, Some(rx))
            }
        };
        Ok(Reservation {
            gate: self.clone(),
            ticket,
            since: admitted.is_none().then(Instant::now),
            need,
            admitted,
        })
    }

    fn release(&self, ticket: Ticket, held: Option<Duration>) {
        let mut g = self.lock();
        g.waiting.remove(&ticket);
        for t in g.core.release(ticket, held) {
            if let Some(tx) = g.waiting.remove(&t) {
                let _ = tx.send(());
            }
        }
    }
}

impl Reservation {
    /// Positions it holds (or will).
    pub fn need(&self) -> usize {
        self.need
    }

    /// Whether it waits in the queue.
    pub fn queued(&self) -> bool {
        self.since.is_none()
    }

    /// Waits until admitted (at once when it already is).
    pub async fn admitted(&mut self) {
        if let Some(rx) = self.admitted.take() {
            // The gate lives as long as this reservation, so the sender is never dropped
            // without sending; if it were, carrying on is the safe reading.
            let _ = rx.await;
            self.since = Some(Instant::now());
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let held = self.since.map(|s| s.elapsed());
        self.gate.release(self.ticket, held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_start_while_they_fit_then_queue_in_order_then_are_refused() {
        let mut a = Admission::new(1000, 2);
        let Decision::Admitted(first) = a.ask(600) else {
            panic!("the first fits")
        };
        let Decision::Queued(big) = a.ask(500) else {
            panic!("500 more do not fit beside 600")
        };
        // A small one fits in what is left, but does not overtake the one waiting.
        let Decision::Queued(small) = a.ask(100) else {
            panic!("no overtaking")
        };
        assert!(matches!(
            a.ask(10),
            Decision::Refused(Refusal::Busy { queued: 2, .. })
        ));
        assert_eq!((a.reserved(), a.queued()), (600, 2));
        // The first ends: both waiting ones fit, and start in order.
        assert_eq!(
            a.release(first, Some(Duration::from_secs(1))),
            vec![big, small]
        );
        assert_eq!((a.reserved(), a.queued()), (600, 0));
    }

    #[test]
    fn a_request_larger_than_a_stage_is_refused_at_once_naming_both() {
        let mut a = Admission::new(1024, 8);
        assert_eq!(
            a.ask(1300),
            Decision::Refused(Refusal::TooLarge {
                need: 1300,
                capacity: 1024
            })
        );
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn a_queued_request_that_gives_up_lets_the_next_one_in() {
        let mut a = Admission::new(100, 4);
        let Decision::Admitted(running) = a.ask(60) else {
            panic!()
        };
        let Decision::Queued(big) = a.ask(90) else {
            panic!()
        };
        let Decision::Queued(small) = a.ask(30) else {
            panic!()
        };
        // The big one leaves the queue: the small one fits beside the running one.
        assert_eq!(a.release(big, None), vec![small]);
        assert_eq!(a.reserved(), 90);
        assert!(a.release(running, None).is_empty());
    }

    #[test]
    fn retry_after_grows_with_the_queue_and_stays_within_a_minute() {
        let mut a = Admission::new(10, 50);
        let Decision::Admitted(t) = a.ask(10) else {
            panic!()
        };
        for _ in 0..50 {
            a.ask(10);
        }
        let Decision::Refused(Refusal::Busy { retry_after, .. }) = a.ask(10) else {
            panic!()
        };
        assert!(retry_after > Duration::from_secs(2), "{retry_after:?}");
        assert!(retry_after <= Duration::from_secs(60));
        assert_eq!(a.release(t, Some(Duration::from_millis(10))).len(), 1);
    }

    #[tokio::test]
    async fn a_dropped_reservation_wakes_the_one_waiting() {
        let gate = Gate::new(100, 4);
        let first = gate.ask(80).unwrap_or_else(|_| panic!("fits"));
        assert!(!first.queued());
        let mut second = gate.ask(50).unwrap_or_else(|_| panic!("queues"));
        assert!(second.queued());
        assert_eq!(gate.figures(), (100, 80, 1));
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second.admitted())
            .await
            .unwrap_or_else(|_| panic!("admitted once the first ended"));
        assert_eq!(gate.figures(), (100, 50, 0));
        drop(second);
        assert_eq!(gate.figures(), (100, 0, 0));
    }
}
