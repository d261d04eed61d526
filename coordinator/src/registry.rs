//! The coordinator's view of its workers, in its own types: what each worker said about
//! itself, its [`WorkerState`], load progress, what its heartbeats report, and the nodes
//! seen over mDNS that never joined. Whether a worker lives is decided here, without I/O
//! ([`Worker::heartbeat`] takes the answer and `now`); `membership` does the asking.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_net::discovery::Seen;
use strata_proto::v1::worker_control_client::WorkerControlClient;
use strata_proto::v1::WorkerState as ProtoState;
use tonic::transport::Channel;

/// How often the coordinator asks each worker how it is.
pub const HEARTBEAT: Duration = Duration::from_millis(700);
/// A worker silent this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(3000);
/// How long one heartbeat may take.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);
/// A worker whose compute thread has had work without progress this long has failed
/// (hung), even though it answers heartbeats.
pub const HANG_AFTER: Duration = Duration::from_millis(2500);
/// A worker that failed because it could not reach its next hop stays out of plans this
/// long, so a broken link does not make the cluster re-plan onto it again and again.
pub const LINK_COOLDOWN: Duration = Duration::from_secs(30);

/// Decode steps measured before a worker's measured step time replaces its estimate.
pub const CALIBRATION_STEPS: u64 = 16;

/// What a stage names as its next hop when that is the coordinator.
pub const COORDINATOR_HOP: &str = "the coordinator";

/// A worker state's word for a state number of the API (the CLI, the dashboard and
/// `/metrics` show these).
pub fn state_name(s: i32) -> &'static str {
    match ProtoState::try_from(s) {
        Ok(ProtoState::Discovered) => "discovered",
        Ok(ProtoState::Idle) => "idle",
        Ok(ProtoState::Loading) => "loading",
        Ok(ProtoState::Ready) => "ready",
        Ok(ProtoState::Draining) => "draining",
        Ok(ProtoState::Dead) => "dead",
        Ok(ProtoState::Refused) => "refused",
        _ => "unknown",
    }
}

/// What a worker said about itself when it joined.
#[derive(Debug, Clone, Default)]
pub struct WorkerProfile {
    /// Its id in the cluster.
    pub id: String,
    /// Its machine's host name.
    pub hostname: String,
    /// Where its layers run.
    pub device: String,
    /// Bytes it accepts for weights and caches.
    pub memory_budget: u64,
    /// Measured weight bytes streamed per second through a layer forward.
    pub speed: f64,
    /// Its strata version.
    pub version: String,
    /// SHA-256 of its public key.
    pub key_fingerprint: String,
    /// Addresses it said it can be reached at.
    pub addresses: Vec<String>,
    /// Its energy counter, or "not available: <why>".
    pub energy_meter: String,
}

/// Where a worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Admitted, holds no slice of the plan in force.
    Idle,
    /// Receiving and loading a slice.
    Loading,
    /// Holds a stage of the plan in force.
    Ready,
    /// Asked to leave: serves its stage until a plan without it is in force.
    Draining,
    /// Left the plan after draining; never planned again (`remove` forgets it).
    Drained,
    /// Stopped answering, or hung; `drained` remembers a drain.
    Dead {
        /// It had been drained.
        drained: bool,
    },
}

impl WorkerState {
    /// Whether the planner may use it.
    pub fn eligible(self) -> bool {
        matches!(
            self,
            WorkerState::Idle | WorkerState::Loading | WorkerState::Ready
        )
    }

    /// Whether it is dead.
    pub fn is_dead(self) -> bool {
        matches!(self, WorkerState::Dead { .. })
    }

    /// Its state number in the API.
    pub fn to_proto(self) -> ProtoState {
        match self {
            WorkerState::Idle | WorkerState::Drained => ProtoState::Idle,
            WorkerState::Loading => ProtoState::Loading,
            WorkerState::Ready => ProtoState::Ready,
            WorkerState::Draining => ProtoState::Draining,
            WorkerState::Dead { .. } => ProtoState::Dead,
        }
    }
}

/// The slice a worker holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Layers.
    pub layers: Range<usize>,
    /// Embedding.
    pub embed: bool,
    /// Head.
    pub head: bool,
}

/// What a heartbeat reported.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Resident memory now.
    pub resident: u64,
    /// Peak resident memory.
    pub peak: u64,
    /// Sequences cached.
    pub sequences: u32,
    /// Its last failure, if any.
    pub error: String,
    /// How long work has waited on its compute thread without progress.
    pub stalled: Duration,
    /// Seconds its stage has computed (its own running total).
    pub compute_seconds: f64,
    /// Seconds its stage has spent sending (its own running total).
    pub network_seconds: f64,
    /// Forwards its stage has run (its own running total).
    pub forwards: u64,
    /// The slice it holds in memory (of the served model).
    pub held: Option<Held>,
    /// Bytes of weights it received over the network since it started.
    pub bytes_received: u64,
    /// The next hop (a worker id, or [`COORDINATOR_HOP`]) its stage could not reach.
    pub unreachable_hop: Option<String>,
    /// Seconds its stage spent in decode batches (its own running total).
    pub decode_seconds: f64,
    /// Decode batches its stage ran (its own running total).
    pub decode_forwards: u64,
    /// It holds a draft model beside its slice.
    pub holds_draft: bool,
}

/// What a heartbeat changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing about its life.
    Unchanged,
    /// A dead worker answers again and can be planned anew.
    Revived,
    /// It has failed: why.
    Failed(String),
}

/// An admitted worker.
#[derive(Debug)]
pub struct Worker {
    /// What it said about itself at join.
    pub profile: WorkerProfile,
    /// The id it asked for (the key a removal is remembered by).
    pub requested_id: String,
    /// Its control service.
    pub control_addr: SocketAddr,
    /// Its QUIC endpoint.
    pub data_addr: SocketAddr,
    /// The coordinator's address as this worker reached it (where its last stage sends tokens).
    pub coordinator_ip: std::net::IpAddr,
    /// Control client (mutual TLS).
    pub client: WorkerControlClient<Channel>,
    /// Its state.
    pub state: WorkerState,
    /// Last heartbeat answered.
    pub last_seen: Instant,
    /// Bytes of its slice sent.
    pub load_done: Arc<AtomicU64>,
    /// Bytes of its slice in all.
    pub load_total: u64,
    /// Its last heartbeat's figures.
    pub health: Health,
    /// Why it is not well.
    pub detail: String,
    /// The slice it holds now.
    pub held: Option<Held>,
    /// Its stage in the plan in force.
    pub stage: Option<usize>,
    /// The next hop it says it cannot reach, and since when the coordinator knows.
    pub unreachable: Option<(String, Instant)>,
    /// Not planned again before this (after a broken link).
    pub cooldown_until: Option<Instant>,
    /// Measured milliseconds per decode step with the slice it holds (smoothed).
    pub measured_ms: Option<f64>,
    /// The decode totals the next measurement counts from.
    pub decode_mark: (f64, u64),
    /// Its signing request (what a renewal certifies again) and when its certificate was
    /// last issued.
    pub certificate: (Vec<u8>, Instant),
}

/// Where a worker is reached, and where it reached the coordinator.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// Its control service.
    pub control: SocketAddr,
    /// Its QUIC endpoint.
    pub data: SocketAddr,
    /// The coordinator's address as it reached it.
    pub coordinator_ip: std::net::IpAddr,
}

impl Worker {
    /// A worker just admitted: idle, seen now, holding `held` (what it said it still holds).
    pub fn admitted(
        profile: WorkerProfile,
        requested_id: &str,
        client: WorkerControlClient<Channel>,
        at: Addresses,
        held: Option<Held>,
        csr_der: Vec<u8>,
    ) -> Self {
        Worker {
            profile,
            requested_id: requested_id.to_string(),
            control_addr: at.control,
            data_addr: at.data,
            coordinator_ip: at.coordinator_ip,
            client,
            state: WorkerState::Idle,
            last_seen: Instant::now(),
            load_done: Arc::new(AtomicU64::new(0)),
            load_total: 0,
            health: Health::default(),
            detail: String::new(),
            held,
            stage: None,
            unreachable: None,
            cooldown_until: None,
            measured_ms: None,
            decode_mark: (0.0, 0),
            certificate: (csr_der, Instant::now()),
        }
    }

    /// Whether the planner may use it.
    pub fn eligible(&self) -> bool {
        self.state.eligible()
    }

    /// Takes a heartbeat's answer (or why there was none) at `now`: records the figures
    /// and decides whether the worker lives. Silent for [`DEAD_AFTER`], or answering with
    /// a compute thread stalled for [`HANG_AFTER`], it has failed.
    pub fn heartbeat(&mut self, answer: Result<Health, String>, now: Instant) -> Verdict {
        let id = self.profile.id.clone();
        match answer {
            Ok(health) => {
                self.last_seen = now;
                self.detail = health.error.clone();
                let stalled = health.stalled;
                self.unreachable = match (health.unreachable_hop.clone(), self.unreachable.take()) {
                    (Some(hop), Some((was, since))) if hop == was => Some((hop, since)),
                    (Some(hop), _) => Some((hop, now)),
                    (None, _) => None,
                };
                // What the worker says it holds is the truth, except while a load to it is
                // on its way (the load itself records the outcome).
                if self.state != WorkerState::Loading {
                    self.set_held(health.held.clone());
                }
                self.calibrate(&health);
                self.health = health;
                if stalled > HANG_AFTER {
                    if self.state.is_dead() {
                        return Verdict::Unchanged;
                    }
                    let reason = format!(
                        "worker {id} at {} is hung: its compute thread has made no progress for {:.1}s with work waiting",
                        self.control_addr,
                        stalled.as_secs_f64()
                    );
                    return self.fail(reason);
                }
                let cooling = self.cooldown_until.is_some_and(|t| now < t);
                match self.state {
                    WorkerState::Dead { .. } if cooling || self.unreachable.is_some() => {
                        Verdict::Unchanged
                    }
                    WorkerState::Dead { drained } => {
                        self.state = if drained {
                            WorkerState::Drained
                        } else {
                            WorkerState::Idle
                        };
                        self.stage = None;
                        Verdict::Revived
                    }
                    _ => Verdict::Unchanged,
                }
            }
            Err(why) => {
                self.detail = why;
                let silent = now.saturating_duration_since(self.last_seen);
                if self.state.is_dead() || silent <= DEAD_AFTER {
                    return Verdict::Unchanged;
                }
                let reason = format!(
                    "worker {id} at {} missed its heartbeats for {:.1}s ({})",
                    self.control_addr,
                    silent.as_secs_f64(),
                    self.detail
                );
                self.fail(reason)
            }
        }
    }

    /// Folds the decode steps run since the last measurement into the measured step time,
    /// once there are [`CALIBRATION_STEPS`] of them.
    /// Records the slice it holds. Another slice's step time is another story: the
    /// worker counts its decode steps from zero with each slice it installs, and so does
    /// the measurement here.
    pub fn set_held(&mut self, held: Option<Held>) {
        if self.held != held {
            self.measured_ms = None;
            if self.decode_mark != REMARK {
                self.decode_mark = (0.0, 0);
            }
        }
        self.held = held;
    }

    fn calibrate(&mut self, h: &Health) {
        let (seconds, forwards) = self.decode_mark;
        if h.decode_forwards < forwards {
            // The worker restarted: count afresh.
            self.decode_mark = (h.decode_seconds, h.decode_forwards);
            return;
        }
        let steps = h.decode_forwards - forwards;
        if steps < CALIBRATION_STEPS || self.held.is_none() {
            return;
        }
        let ms = (h.decode_seconds - seconds).max(0.0) / steps as f64 * 1e3;
        self.measured_ms = Some(match self.measured_ms {
            Some(old) => 0.5 * old + 0.5 * ms,
            None => ms,
        });
        self.decode_mark = (h.decode_seconds, h.decode_forwards);
    }

    /// It cannot reach its next hop, which lives: it has failed, and stays out of plans
    /// for [`LINK_COOLDOWN`].
    pub fn fail_link(&mut self, reason: String, now: Instant) -> Verdict {
        self.cooldown_until = Some(now + LINK_COOLDOWN);
        self.fail(reason)
    }

    fn fail(&mut self, reason: String) -> Verdict {
        let drained = matches!(self.state, WorkerState::Draining | WorkerState::Drained);
        self.state = WorkerState::Dead { drained };
        self.detail = reason.clone();
        self.held = None;
        self.stage = None;
        // A forward that spanned the failure (a stopped process) would count its whole
        // pause: measure afresh from the first heartbeat after it answers again.
        self.measured_ms = None;
        self.decode_mark = REMARK;
        Verdict::Failed(reason)
    }

    /// Asked to leave: it stays in the plan in force until one without it is applied.
    pub fn drain(&mut self) {
        self.state = match self.state {
            WorkerState::Ready => WorkerState::Draining,
            WorkerState::Dead { .. } => WorkerState::Dead { drained: true },
            _ => WorkerState::Drained,
        };
    }

    /// Left out of the plan in force: no slice, no stage.
    pub fn release(&mut self) {
        self.held = None;
        self.stage = None;
        self.state = match self.state {
            WorkerState::Draining | WorkerState::Drained => WorkerState::Drained,
            WorkerState::Dead { drained } => WorkerState::Dead { drained },
            _ => WorkerState::Idle,
        };
    }
}

/// A join that was refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Who asked.
    pub from: String,
    /// The id it asked for.
    pub id: String,
    /// Why it was refused.
    pub reason: String,
}

/// Everything the coordinator knows about its members.
#[derive(Debug, Default)]
pub struct Registry {
    /// Admitted workers by id.
    pub workers: BTreeMap<String, Worker>,
    /// Nodes seen over mDNS, by instance.
    pub seen: BTreeMap<String, Seen>,
    /// Recent refusals (newest last, bounded).
    pub refusals: Vec<Refusal>,
    /// Requested ids removed by an operator: refused until the coordinator restarts.
    pub removed: HashSet<String>,
    /// Key fingerprints of removed workers: refused on every join until the coordinator
    /// restarts.
    pub revoked: HashSet<String>,
    /// When membership last changed.
    pub changed_at: Option<Instant>,
    /// The links between workers, as measured (see [`Links`]).
    pub links: Links,
}

/// A link between two workers as measured over the data plane.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeasuredLink {
    /// What was measured.
    pub link: crate::planner::Link,
    /// When.
    pub at: Instant,
}

/// What is known of the links between workers: measured ones, and pairs whose last
/// probe failed (tried again after a pause), keyed by the two ids in order.
#[derive(Debug, Default)]
pub struct Links {
    measured: BTreeMap<(String, String), MeasuredLink>,
    failed: BTreeMap<(String, String), Instant>,
}

/// A pair whose probe failed is probed again after this.
const LINK_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

fn pair_key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl Links {
    /// Records a measurement of the pair.
    pub fn record(&mut self, a: &str, b: &str, link: crate::planner::Link, at: Instant) {
        let key = pair_key(a, b);
        self.failed.remove(&key);
        self.measured.insert(key, MeasuredLink { link, at });
    }

    /// Records that the pair could not be measured.
    pub fn record_failure(&mut self, a: &str, b: &str, at: Instant) {
        self.failed.insert(pair_key(a, b), at);
    }

    /// Forgets every link of `id` (it joined anew: its place in the network may differ).
    pub fn forget(&mut self, id: &str) {
        self.measured.retain(|(a, b), _| a != id && b != id);
        self.failed.retain(|(a, b), _| a != id && b != id);
    }

    /// The pair's measurement.
    pub fn get(&self, a: &str, b: &str) -> Option<MeasuredLink> {
        self.measured.get(&pair_key(a, b)).copied()
    }

    /// Every measured pair.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, MeasuredLink)> {
        self.measured
            .iter()
            .map(|((a, b), m)| (a.as_str(), b.as_str(), *m))
    }

    /// The pairs of `ids` to probe now: never measured, and not failed recently.
    pub fn to_probe(&self, ids: &[&str], now: Instant) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                let key = pair_key(a, b);
                let failed_lately = self
                    .failed
                    .get(&key)
                    .is_some_and(|t| now.saturating_duration_since(*t) < LINK_RETRY);
                if !self.measured.contains_key(&key) && !failed_lately {
                    pairs.push(key);
                }
            }
        }
        pairs
    }
}

/// A decode mark that the next heartbeat replaces with its totals (see `calibrate`).
const REMARK: (f64, u64) = (f64::MAX, u64::MAX);

/// Refusals kept for the status.
const MAX_REFUSALS: usize = 16;

impl Registry {
    /// Records a refusal.
    pub fn refuse(&mut self, r: Refusal) {
        self.refusals.push(r);
        if self.refusals.len() > MAX_REFUSALS {
            self.refusals.remove(0);
        }
    }

    /// A free id: the asked one, or with `-2`, `-3`... when a live worker holds it.
    pub fn free_id(&self, asked: &str, fingerprint: &str) -> String {
        let taken = |id: &str| {
            self.workers
                .get(id)
                .is_some_and(|w| !w.state.is_dead() && w.profile.key_fingerprint != fingerprint)
        };
        if !taken(asked) {
            return asked.to_string();
        }
        (2..)
            .map(|n| format!("{asked}-{n}"))
            .find(|id| !taken(id))
            .unwrap_or_else(|| asked.to_string())
    }

    /// Live workers whose stage cannot reach a next hop that itself lives (it answered the
    /// coordinator after the complaint): their link is broken, and they have failed. A
    /// next hop that died is its own failure, not theirs.
    pub fn broken_links(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (id, w) in &self.workers {
            let Some((hop, since)) = &w.unreachable else {
                continue;
            };
            if w.state.is_dead() {
                continue;
            }
            let hop_lives = if hop == COORDINATOR_HOP {
                // It reaches us for heartbeats but not our data port: its link is broken
                // once the complaint outlasts a heartbeat.
                w.last_seen > *since + HEARTBEAT
            } else {
                self.workers
                    .get(hop)
                    .is_some_and(|h| !h.state.is_dead() && h.last_seen > *since)
            };
            if hop_lives {
                out.push((
                    id.clone(),
                    format!(
                        "worker {id} cannot reach its next hop, {hop}, which answers the coordinator: the link between them is broken"
                    ),
                ));
            }
        }
        out
    }

    /// Nodes seen over mDNS as workers that are not members (by key fingerprint).
    pub fn strangers(&self) -> impl Iterator<Item = &Seen> {
        let known: HashSet<&str> = self
            .workers
            .values()
            .map(|w| w.profile.key_fingerprint.as_str())
            .collect();
        self.seen.values().filter(move |s| {
            s.get("role") == Some("worker") && !s.get("fpr").is_some_and(|f| known.contains(f))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(now: Instant) -> Worker {
        let channel = Channel::from_static("https://127.0.0.1:1").connect_lazy();
        let profile = WorkerProfile {
            id: "w1".into(),
            ..Default::default()
        };
        let at = Addresses {
            control: SocketAddr::from(([127, 0, 0, 1], 1)),
            data: SocketAddr::from(([127, 0, 0, 1], 2)),
            coordinator_ip: std::net::IpAddr::from([127, 0, 0, 1]),
        };
        let held = Some(Held {
            layers: 0..2,
            embed: true,
            head: false,
        });
        let client = WorkerControlClient::new(channel);
        let mut w = Worker::admitted(profile, "w1", client, at, held, Vec::new());
        w.state = WorkerState::Ready;
        w.last_seen = now;
        w.stage = Some(0);
        w
    }

    #[tokio::test]
    async fn silence_then_a_stall_then_health() {
        let t0 = Instant::now();
        let mut w = worker(t0);
        let ms = Duration::from_millis;
        assert_eq!(
            w.heartbeat(Err("timed out".into()), t0 + ms(2000)),
            Verdict::Unchanged
        );
        let Verdict::Failed(why) = w.heartbeat(Err("timed out".into()), t0 + ms(3100)) else {
            panic!("3.1 s of silence is a death");
        };
        assert!(
            why.contains("missed its heartbeats") && why.contains("timed out"),
            "{why}"
        );
        assert!(w.held.is_none() && w.state.is_dead());
        // Back, with work stalled: still dead, not revived.
        let stalled = Health {
            stalled: ms(4000),
            ..Default::default()
        };
        assert_eq!(
            w.heartbeat(Ok(stalled.clone()), t0 + ms(4000)),
            Verdict::Unchanged
        );
        assert_eq!(
            w.heartbeat(Ok(Health::default()), t0 + ms(4700)),
            Verdict::Revived
        );
        assert_eq!(w.state, WorkerState::Idle);
        // A live worker whose compute thread stalls has failed, though it answers.
        w.state = WorkerState::Ready;
        let Verdict::Failed(why) = w.heartbeat(Ok(stalled), t0 + ms(5400)) else {
            panic!("a stall is a failure");
        };
        assert!(why.contains("hung"), "{why}");
    }

    #[tokio::test]
    async fn a_stage_that_cannot_reach_a_live_next_hop_has_failed_and_cools_down() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = Registry::default();
        let mut a = worker(t0);
        a.profile.id = "a".into();
        let mut b = worker(t0);
        b.profile.id = "b".into();
        r.workers.insert("a".into(), a);
        r.workers.insert("b".into(), b);
        let complaint = Health {
            unreachable_hop: Some("b".into()),
            ..Default::default()
        };
        let a = r.workers.get_mut("a").unwrap();
        a.heartbeat(Ok(complaint.clone()), t0 + ms(700));
        // b has not answered since the complaint: it may be the one that died.
        assert!(r.broken_links().is_empty());
        r.workers
            .get_mut("b")
            .unwrap()
            .heartbeat(Ok(Health::default()), t0 + ms(1400));
        let broken = r.broken_links();
        assert_eq!(broken.len(), 1);
        assert_eq!(broken[0].0, "a");
        assert!(broken[0].1.contains("link"), "{}", broken[0].1);
        let a = r.workers.get_mut("a").unwrap();
        a.fail_link(broken[0].1.clone(), t0 + ms(1400));
        // It answers, healthy, but is not planned again until the cool-down ends.
        assert_eq!(
            a.heartbeat(Ok(Health::default()), t0 + ms(2100)),
            Verdict::Unchanged
        );
        let later = t0 + ms(1400) + LINK_COOLDOWN + ms(1);
        assert_eq!(a.heartbeat(Ok(Health::default()), later), Verdict::Revived);
        // A next hop that died is its own failure.
        let b = r.workers.get_mut("b").unwrap();
        b.heartbeat(Err("gone".into()), later + ms(4000));
        let a = r.workers.get_mut("a").unwrap();
        a.state = WorkerState::Ready;
        a.heartbeat(Ok(complaint), later + ms(4100));
        assert!(r.broken_links().is_empty());
    }

    #[tokio::test]
    async fn decode_steps_measure_a_workers_step_time_for_its_slice() {
        let t0 = Instant::now();
        let mut w = worker(t0);
        let held = w.held.clone();
        let report = |secs: f64, steps: u64| Health {
            held: held.clone(),
            decode_seconds: secs,
            decode_forwards: steps,
            ..Default::default()
        };
        w.heartbeat(Ok(report(0.0, 0)), t0);
        w.heartbeat(Ok(report(0.05, 10)), t0);
        assert_eq!(w.measured_ms, None, "too few steps yet");
        w.heartbeat(Ok(report(0.2, 40)), t0);
        assert!((w.measured_ms.unwrap() - 5.0).abs() < 1e-9);
        // Slower steps pull the (smoothed) figure up.
        w.heartbeat(Ok(report(0.68, 80)), t0);
        assert!((w.measured_ms.unwrap() - 8.5).abs() < 1e-9);
        // Another slice: measured afresh.
        w.heartbeat(
            Ok(Health {
                held: None,
                ..report(0.7, 81)
            }),
            t0,
        );
        assert_eq!(w.measured_ms, None);
        // The coordinator loads another slice; a heartbeat sent before the load still
        // names the old one; then the worker, counting from zero for the new slice, reports
        // 20 steps it ran before any heartbeat showed the slice: they count.
        let new = Some(Held {
            layers: 0..1,
            embed: true,
            head: false,
        });
        w.set_held(new.clone());
        w.heartbeat(Ok(report(0.9, 90)), t0);
        w.heartbeat(
            Ok(Health {
                held: new,
                ..report(0.06, 20)
            }),
            t0,
        );
        assert!((w.measured_ms.unwrap() - 3.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn a_drained_worker_stays_out_of_plans_even_after_dying() {
        let t0 = Instant::now();
        let mut w = worker(t0);
        w.drain();
        assert_eq!(w.state, WorkerState::Draining);
        assert!(!w.eligible());
        w.heartbeat(Err("gone".into()), t0 + Duration::from_secs(4));
        assert_eq!(w.state, WorkerState::Dead { drained: true });
        w.heartbeat(Ok(Health::default()), t0 + Duration::from_secs(5));
        assert_eq!(w.state, WorkerState::Drained);
        assert!(!w.eligible());
    }
}
