//! Admission: whether a request may start, given the KV cache the plan reserved. Every
//! stage holds `kv_tokens` positions per layer (the plan's `--kv-tokens`, the same on
//! every stage), so one count of positions serves them all: a request reserves its prompt
//! plus `max_tokens` (what its cache can grow to) before it starts, and gives them back
//! when it ends. The stages enforce the same reservations on their side
//! ([`strata_net::frame::Step::reserve`]), so memory stays what the plan said.
//!
//! A request that does not fit now waits in a bounded queue, first come first served, but
//! for one thing: while the first in line waits for more room than is free, requests that
//! fit in the room it cannot use go ahead of it (backfilling, so that one long answer
//! waiting does not hold up every short one behind it), for at most [`PATIENCE`] of its
//! wait; after that the queue is strict until it is in, so no request waits for ever. Past
//! the queue a request is refused with a time to retry after, unless a larger one waits:
//! then that one is refused instead and the smaller takes its place (under overload, long
//! answers are asked to come back later rather than short ones). One that could never fit
//! is refused at once. An answer
//! that was preempted (its client stopped reading while others waited, so it gave its
//! positions up) asks again when its client is back, ahead of the queue: it came first.
//!
//! [`Admission`] is the sans-IO core; [`Gate`] is its shell, which wakes queued requests
//! and hands out [`Reservation`]s that give their positions back when dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A request's place in the gate.
pub type Ticket = u64;

/// How long the first request in line may be overtaken by ones that fit where it does not.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A request in the queue.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    ticket: Ticket,
    need: usize,
    since: Instant,
    /// A preempted answer asking for its room back: never refused.
    resumed: bool,
}

impl Waiting {
    /// Whether others may still go ahead of it.
    fn patient(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < PATIENCE
    }
}

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
    /// It waits its turn in the place of a larger request, which is refused as busy.
    QueuedInstead {
        /// Its place.
        ticket: Ticket,
        /// The request refused.
        refused: Ticket,
    },
    /// It may not start.
    Refused(Refusal),
}

/// The admission state machine: positions reserved, requests queued.
#[derive(Debug)]
pub struct Admission {
    capacity: usize,
    max_queue: usize,
    reserved: HashMap<Ticket, usize>,
    queue: VecDeque<Waiting>,
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

    fn fits(&self, need: usize) -> bool {
        self.reserved() + need <= self.capacity
    }

    /// Whether a request may go ahead of those waiting: none of them has waited
    /// [`PATIENCE`] yet.
    fn may_overtake(&self, now: Instant) -> bool {
        self.queue.iter().all(|w| w.patient(now))
    }

    /// A request that needs `need` positions asks to start.
    pub fn ask(&mut self, need: usize, now: Instant) -> Decision {
        if need > self.capacity {
            return Decision::Refused(Refusal::TooLarge {
                need,
                capacity: self.capacity,
            });
        }
        self.next += 1;
        let ticket = self.next;
        if self.fits(need) && self.may_overtake(now) {
            self.reserved.insert(ticket, need);
            return Decision::Admitted(ticket);
        }
        let waiting = Waiting {
            ticket,
            need,
            since: now,
            resumed: false,
        };
        if self.queue.len() < self.max_queue {
            self.queue.push_back(waiting);
            return Decision::Queued(ticket);
        }
        // Full: the largest waiting request that is larger than this one (the latest of
        // equals) gives its place up.
        let largest = self
            .queue
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.resumed && w.need > need)
            .max_by_key(|(i, w)| (w.need, *i))
            .map(|(i, _)| i);
        match largest.and_then(|i| self.queue.remove(i)) {
            Some(refused) => {
                self.queue.push_back(waiting);
                Decision::QueuedInstead {
                    ticket,
                    refused: refused.ticket,
                }
            }
            None => Decision::Refused(self.busy()),
        }
    }

    /// The refusal of a full queue.
    pub fn busy(&self) -> Refusal {
        Refusal::Busy {
            queued: self.queue.len(),
            retry_after: self.retry_after(),
        }
    }

    /// A preempted answer asks for its positions again: in at once when they fit, else
    /// first in the queue (never refused as busy: it was admitted before).
    pub fn resume(&mut self, need: usize, now: Instant) -> Decision {
        if need > self.capacity {
            return Decision::Refused(Refusal::TooLarge {
                need,
                capacity: self.capacity,
            });
        }
        self.next += 1;
        let ticket = self.next;
        if self.fits(need) {
            self.reserved.insert(ticket, need);
            return Decision::Admitted(ticket);
        }
        self.queue.push_front(Waiting {
            ticket,
            need,
            since: now,
            resumed: true,
        });
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
    /// start now: in order while they fit, then, while the first in line is patient, those
    /// behind it that fit.
    pub fn release(&mut self, ticket: Ticket, held: Option<Duration>, now: Instant) -> Vec<Ticket> {
        self.queue.retain(|w| w.ticket != ticket);
        if self.reserved.remove(&ticket).is_some() {
            if let Some(held) = held {
                self.typical_hold = (self.typical_hold * 3 + held) / 4;
            }
        }
        self.fill(now)
    }

    /// Starts the queued requests that fit: in order, each past those ahead of it that do
    /// not fit but are still patient; one that has waited its patience stops the rest.
    /// Returns their tickets.
    pub fn fill(&mut self, now: Instant) -> Vec<Ticket> {
        let mut admitted = Vec::new();
        let mut i = 0;
        while let Some(&w) = self.queue.get(i) {
            if self.fits(w.need) {
                self.queue.remove(i);
                self.reserved.insert(w.ticket, w.need);
                admitted.push(w.ticket);
            } else if !w.patient(now) {
                break;
            } else {
                i += 1;
            }
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
    /// Where a queued request hears that it is in, or refused after all.
    waiting: HashMap<Ticket, oneshot::Sender<Result<(), Refusal>>>,
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
    /// Fires when a queued request is admitted, or refused to make room for a smaller one.
    admitted: Option<oneshot::Receiver<Result<(), Refusal>>>,
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
        self.decide(need, |core| core.ask(need, Instant::now()))
    }

    /// A preempted answer asks for its `need` positions again, ahead of the queue.
    pub fn resume(self: &Arc<Self>, need: usize) -> Result<Reservation, Refusal> {
        self.decide(need, |core| core.resume(need, Instant::now()))
    }

    fn decide(
        self: &Arc<Self>,
        need: usize,
        decide: impl FnOnce(&mut Admission) -> Decision,
    ) -> Result<Reservation, Refusal> {
        let mut g = self.lock();
        let (ticket, refused) = match decide(&mut g.core) {
            Decision::Refused(r) => return Err(r),
            Decision::Admitted(t) => {
                return Ok(Reservation {
                    gate: self.clone(),
                    ticket: t,
                    since: Some(Instant::now()),
                    need,
                    admitted: None,
                })
            }
            Decision::Queued(t) => (t, None),
            Decision::QueuedInstead { ticket, refused } => (ticket, Some(refused)),
        };
        if let Some(tx) = refused.and_then(|r| g.waiting.remove(&r)) {
            let _ = tx.send(Err(g.core.busy()));
        }
        let (tx, rx) = oneshot::channel();
        g.waiting.insert(ticket, tx);
        // The queue changed (one gave its place up, or a resumed answer went first): who
        // fits now may differ.
        g.wake(Instant::now());
        let admitted = Some(rx);
        Ok(Reservation {
            gate: self.clone(),
            ticket,
            since: None,
            need,
            admitted,
        })
    }

    fn release(&self, ticket: Ticket, held: Option<Duration>) {
        let mut g = self.lock();
        g.waiting.remove(&ticket);
        let started = g.core.release(ticket, held, Instant::now());
        g.tell_started(started);
    }
}

impl GateInner {
    /// Starts the queued requests that fit and tells them.
    fn wake(&mut self, now: Instant) {
        let started = self.core.fill(now);
        self.tell_started(started);
    }

    fn tell_started(&mut self, started: Vec<Ticket>) {
        for t in started {
            if let Some(tx) = self.waiting.remove(&t) {
                let _ = tx.send(Ok(()));
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

    /// Waits until admitted (at once when it already is), or refused after all: a
    /// smaller request took its place in a full queue.
    /// Cancel-safe: a wait cut short loses nothing.
    pub async fn admitted(&mut self) -> Result<(), Refusal> {
        if let Some(rx) = self.admitted.as_mut() {
            // The gate lives as long as this reservation, so the sender is never dropped
            // without sending; if it were, carrying on is the safe reading.
            let heard = rx.await.unwrap_or(Ok(()));
            self.admitted = None;
            heard?;
            self.since = Some(Instant::now());
        }
        Ok(())
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
    fn small_requests_go_past_a_large_one_waiting_until_it_has_waited_its_patience() {
        let t0 = Instant::now();
        let mut a = Admission::new(1000, 2);
        let Decision::Admitted(first) = a.ask(600, t0) else {
            panic!("the first fits")
        };
        let Decision::Queued(big) = a.ask(500, t0) else {
            panic!("500 more do not fit beside 600")
        };
        // A small one fits in the room the big one cannot use: it goes ahead.
        assert!(matches!(a.ask(100, t0), Decision::Admitted(_)));
        // Once the big one has waited its patience, nobody overtakes it any more.
        let late = t0 + PATIENCE;
        let Decision::Queued(small) = a.ask(100, late) else {
            panic!("no overtaking past the patience")
        };
        // The queue is full and nothing in it is larger: refused.
        assert!(matches!(
            a.ask(600, late),
            Decision::Refused(Refusal::Busy { queued: 2, .. })
        ));
        assert_eq!((a.reserved(), a.queued()), (700, 2));
        // The first ends: both waiting ones fit, and start in order.
        assert_eq!(
            a.release(first, Some(Duration::from_secs(1)), late),
            vec![big, small]
        );
        assert_eq!((a.reserved(), a.queued()), (700, 0));
    }

    #[test]
    fn room_that_frees_goes_first_to_the_first_in_line_then_to_those_that_fit_behind_it() {
        let t0 = Instant::now();
        let mut a = Admission::new(100, 8);
        let Decision::Admitted(r1) = a.ask(50, t0) else {
            panic!()
        };
        let Decision::Admitted(r2) = a.ask(45, t0) else {
            panic!()
        };
        let Decision::Queued(big) = a.ask(60, t0) else {
            panic!()
        };
        let Decision::Queued(small) = a.ask(20, t0) else {
            panic!()
        };
        // 50 free: not enough for the first in line; the small one behind it fits.
        assert_eq!(a.release(r1, None, t0), vec![small]);
        // Past its patience, room waits for it: 55 free is not enough, nobody goes ahead.
        let late = t0 + PATIENCE;
        let Decision::Queued(other) = a.ask(10, late) else {
            panic!()
        };
        assert!(a.release(small, None, late).is_empty());
        assert_eq!(a.release(r2, None, late), vec![big, other]);
    }

    #[test]
    fn a_request_larger_than_a_stage_is_refused_at_once_naming_both() {
        let mut a = Admission::new(1024, 8);
        assert_eq!(
            a.ask(1300, Instant::now()),
            Decision::Refused(Refusal::TooLarge {
                need: 1300,
                capacity: 1024
            })
        );
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn a_queued_request_that_gives_up_lets_the_next_one_in() {
        let t0 = Instant::now() - PATIENCE;
        let mut a = Admission::new(100, 4);
        let Decision::Admitted(running) = a.ask(60, t0) else {
            panic!()
        };
        let Decision::Queued(big) = a.ask(90, t0) else {
            panic!()
        };
        let now = Instant::now();
        let Decision::Queued(small) = a.ask(30, now) else {
            panic!("the big one has waited its patience")
        };
        // The big one leaves the queue: the small one fits beside the running one.
        assert_eq!(a.release(big, None, now), vec![small]);
        assert_eq!(a.reserved(), 90);
        assert!(a.release(running, None, now).is_empty());
    }

    #[test]
    fn retry_after_grows_with_the_queue_and_stays_within_a_minute() {
        let now = Instant::now();
        let mut a = Admission::new(10, 50);
        let Decision::Admitted(t) = a.ask(10, now) else {
            panic!()
        };
        for _ in 0..50 {
            a.ask(10, now);
        }
        let Decision::Refused(Refusal::Busy { retry_after, .. }) = a.ask(10, now) else {
            panic!()
        };
        assert!(retry_after > Duration::from_secs(2), "{retry_after:?}");
        assert!(retry_after <= Duration::from_secs(60));
        assert_eq!(a.release(t, Some(Duration::from_millis(10)), now).len(), 1);
    }

    #[test]
    fn in_a_full_queue_a_smaller_request_takes_the_place_of_the_largest() {
        let now = Instant::now();
        let mut a = Admission::new(100, 2);
        let Decision::Admitted(_) = a.ask(100, now) else {
            panic!()
        };
        let Decision::Queued(big) = a.ask(90, now) else {
            panic!()
        };
        let Decision::Queued(_) = a.ask(50, now) else {
            panic!()
        };
        assert_eq!(
            a.ask(60, now),
            Decision::QueuedInstead {
                ticket: 4,
                refused: big
            }
        );
        // Nothing waiting is larger than 60 now: refused itself.
        assert!(matches!(
            a.ask(70, now),
            Decision::Refused(Refusal::Busy { queued: 2, .. })
        ));
        // A resumed answer is never the one refused, though it is the largest.
        let mut a = Admission::new(100, 2);
        let Decision::Admitted(_) = a.ask(100, now) else {
            panic!()
        };
        let Decision::Queued(_) = a.resume(90, now) else {
            panic!()
        };
        assert!(matches!(a.ask(10, now), Decision::Queued(_)));
        assert!(matches!(a.ask(5, now), Decision::QueuedInstead { .. }));
    }

    #[tokio::test]
    async fn a_request_that_gives_its_place_up_hears_it_is_refused() {
        let gate = Gate::new(100, 1);
        let _running = gate.ask(100).unwrap_or_else(|_| panic!("fits"));
        let mut big = gate.ask(90).unwrap_or_else(|_| panic!("queues"));
        let _small = gate.ask(10).unwrap_or_else(|_| panic!("queues instead"));
        let refused = tokio::time::timeout(Duration::from_secs(5), big.admitted())
            .await
            .unwrap_or_else(|_| panic!("told at once"));
        assert!(matches!(refused, Err(Refusal::Busy { .. })), "{refused:?}");
        assert_eq!(gate.figures(), (100, 100, 1));
    }

    #[test]
    fn a_resumed_answer_goes_ahead_of_the_queue_and_is_never_busy() {
        let now = Instant::now();
        let mut a = Admission::new(100, 1);
        let Decision::Admitted(running) = a.ask(70, now) else {
            panic!()
        };
        let Decision::Queued(waiting) = a.ask(50, now) else {
            panic!()
        };
        assert!(matches!(
            a.ask(60, now),
            Decision::Refused(Refusal::Busy { .. })
        ));
        // Fits beside the running one: in at once, though someone waits.
        assert!(matches!(a.resume(30, now), Decision::Admitted(_)));
        // Does not fit: first in line, past the queue's bound.
        let Decision::Queued(resumed) = a.resume(40, now) else {
            panic!()
        };
        assert_eq!(a.queued(), 2);
        // 30 + 40 fit once the first ends; the 50 waiting still does not.
        assert_eq!(a.release(running, None, now), vec![resumed]);
        assert_eq!(a.queued(), 1);
        assert_eq!(a.release(resumed, None, now), vec![waiting]);
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
        let admitted = tokio::time::timeout(Duration::from_secs(5), second.admitted())
            .await
            .unwrap_or_else(|_| panic!("admitted once the first ended"));
        assert_eq!(admitted, Ok(()));
        assert_eq!(gate.figures(), (100, 50, 0));
        drop(second);
        assert_eq!(gate.figures(), (100, 0, 0));
    }
}
