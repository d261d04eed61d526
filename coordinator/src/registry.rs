//! The coordinator's view of its workers: admission (the join token check and the
//! certificate it issues), what each worker said about itself, its state and load
//! progress, heartbeats, and the nodes seen over mDNS that never joined.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_net::discovery::Seen;
use strata_proto::v1::worker_control_client::WorkerControlClient;
use strata_proto::v1::{WorkerInfo, WorkerState, WorkerStatus};
use tonic::transport::Channel;

/// How often the coordinator asks each worker how it is.
pub const HEARTBEAT: Duration = Duration::from_millis(700);
/// A worker silent this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(3000);
/// How long one heartbeat may take.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);

/// A worker state's word, as the CLI, the dashboard and `/metrics` show it.
pub fn state_name(s: i32) -> &'static str {
    match WorkerState::try_from(s) {
        Ok(WorkerState::Discovered) => "discovered",
        Ok(WorkerState::Idle) => "idle",
        Ok(WorkerState::Loading) => "loading",
        Ok(WorkerState::Ready) => "ready",
        Ok(WorkerState::Draining) => "draining",
        Ok(WorkerState::Dead) => "dead",
        Ok(WorkerState::Refused) => "refused",
        _ => "unknown",
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

/// An admitted worker.
#[derive(Debug)]
pub struct Worker {
    /// What it said about itself at join.
    pub info: WorkerInfo,
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
    /// Finishing its sequences before release.
    pub draining: bool,
    /// Last heartbeat answered.
    pub last_seen: Instant,
    /// Bytes of its slice sent.
    pub load_done: Arc<AtomicU64>,
    /// Bytes of its slice in all.
    pub load_total: u64,
    /// Resident memory now.
    pub resident: u64,
    /// Peak resident memory.
    pub peak: u64,
    /// Sequences cached.
    pub sequences: u32,
    /// Seconds its stage has computed (its own running total).
    pub compute_seconds: f64,
    /// Seconds its stage has spent sending (its own running total).
    pub network_seconds: f64,
    /// Forwards its stage has run (its own running total).
    pub forwards: u64,
    /// Why it is not well.
    pub detail: String,
    /// The slice it holds now.
    pub held: Option<Held>,
    /// Its stage in the plan in force.
    pub stage: Option<usize>,
}

impl Worker {
    /// Whether the planner may use it.
    pub fn eligible(&self) -> bool {
        !self.draining
            && matches!(
                self.state,
                WorkerState::Idle | WorkerState::Ready | WorkerState::Loading
            )
    }

    /// Its row in the status.
    pub fn status(&self) -> WorkerStatus {
        let held = self.held.clone();
        WorkerStatus {
            info: Some(self.info.clone()),
            state: if self.draining && self.held.is_some() && self.state != WorkerState::Dead {
                WorkerState::Draining as i32
            } else {
                self.state as i32
            },
            address: self.control_addr.to_string(),
            stage: self.stage.map_or(-1, |s| s as i32),
            layer_start: held.as_ref().map_or(0, |h| h.layers.start as u32),
            layer_end: held.as_ref().map_or(0, |h| h.layers.end as u32),
            load_bytes_done: self.load_done.load(std::sync::atomic::Ordering::Relaxed),
            load_bytes_total: self.load_total,
            resident_bytes: self.resident,
            peak_resident_bytes: self.peak,
            last_seen_ms: self.last_seen.elapsed().as_millis() as u64,
            detail: if self.draining && self.held.is_none() && self.detail.is_empty() {
                "drained: released from the plan (`strata cluster remove` forgets it)".into()
            } else {
                self.detail.clone()
            },
            sequences: self.sequences,
            compute_seconds: self.compute_seconds,
            network_seconds: self.network_seconds,
            forwards: self.forwards,
        }
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
    /// When membership last changed.
    pub changed_at: Option<Instant>,
}

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
            self.workers.get(id).is_some_and(|w| {
                w.state != WorkerState::Dead && w.info.key_fingerprint != fingerprint
            })
        };
        if !taken(asked) {
            return asked.to_string();
        }
        (2..)
            .map(|n| format!("{asked}-{n}"))
            .find(|id| !taken(id))
            .unwrap_or_else(|| asked.to_string())
    }

    /// Rows for the status: admitted workers, then mDNS-only nodes, then refusals.
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        let mut out: Vec<WorkerStatus> = self.workers.values().map(Worker::status).collect();
        let known: HashSet<&str> = self
            .workers
            .values()
            .map(|w| w.info.key_fingerprint.as_str())
            .collect();
        for s in self.seen.values() {
            if s.get("role") != Some("worker") || s.get("fpr").is_some_and(|f| known.contains(f)) {
                continue;
            }
            let parse = |k: &str| s.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            out.push(WorkerStatus {
                info: Some(WorkerInfo {
                    id: s.get("id").unwrap_or(&s.instance).to_string(),
                    device: s.get("device").unwrap_or("").to_string(),
                    memory_budget: parse("mem"),
                    speed_bytes_per_second: parse("speed") as f64,
                    data_port: parse("data") as u32,
                    control_port: parse("control") as u32,
                    version: s.get("v").unwrap_or("").to_string(),
                    key_fingerprint: s.get("fpr").unwrap_or("").to_string(),
                    addresses: s.addresses.iter().map(|a| a.to_string()).collect(),
                    ..Default::default()
                }),
                state: WorkerState::Discovered as i32,
                address: s
                    .addresses
                    .first()
                    .map(|a| format!("{a}:{}", parse("control")))
                    .unwrap_or_default(),
                stage: -1,
                detail: "seen over mDNS, not joined (does it have this cluster's token?)".into(),
                ..Default::default()
            });
        }
        for r in &self.refusals {
            if self.workers.contains_key(&r.id) {
                continue;
            }
            out.push(WorkerStatus {
                info: Some(WorkerInfo {
                    id: r.id.clone(),
                    ..Default::default()
                }),
                state: WorkerState::Refused as i32,
                address: r.from.clone(),
                stage: -1,
                detail: r.reason.clone(),
                ..Default::default()
            });
        }
        out
    }
}
