//! The worker's control service (`WorkerControl`, gRPC over mutual TLS): says what its
//! cache lacks of a slice (the bytes themselves arrive as `slice_load` says), wires its output to the next hop, answers heartbeats,
//! and unloads. Only the coordinator that admitted this worker may call it: every call's
//! client certificate must be exactly the one the join answer named.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use strata_proto::v1::worker_control_server::WorkerControl;
use strata_proto::v1::{
    HealthRequest, HealthResponse, HeldSlice, LinkMeasurement, LoadHeader, MissingResponse,
    ProbeRequest, ProbeResponse, ProbeTarget, RenewRequest, RenewResponse, UnloadRequest,
    UnloadResponse, WireRequest, WireResponse, WorkerInfo,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use strata_model::WireType;
use strata_net::frame::Frame;
use strata_net::identity::{self, Identity};
use strata_net::{memory, transport};

use crate::cache::SliceCache;
use crate::senders::Senders;
use crate::stage::{Command, StageHandle, StageStats, Wiring};

/// A wiring request as the stage takes it: the next hop's address, and the stage's
/// epoch, wire type and KV budget. Pure, so the fuzz target runs it on anything.
pub fn wiring_of(w: &WireRequest) -> Result<(SocketAddr, Wiring), Status> {
    let addr: SocketAddr = w.next_address.parse().map_err(|_| {
        Status::invalid_argument(format!("next address `{}` is not ip:port", w.next_address))
    })?;
    let wire = WireType::parse(&w.wire_dtype).ok_or_else(|| {
        Status::invalid_argument(format!(
            "wire dtype `{}`: use f16, bf16 or f32",
            w.wire_dtype
        ))
    })?;
    Ok((
        addr,
        Wiring {
            epoch: w.epoch,
            wire,
            kv_positions: usize::try_from(w.kv_positions).unwrap_or(usize::MAX),
        },
    ))
}

/// Frames waiting to go to the next hop.
const OUTGOING_QUEUE: usize = 256;
/// How long wiring waits for the next hop to accept a connection.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// The most peers one probe request may name (a cluster's other workers).
const MAX_PROBE_TARGETS: usize = 512;
/// The most pings per link a probe request may ask for.
const MAX_PINGS: u32 = 20;

/// Milliseconds since the worker started: a clock for "last heard from the coordinator".
#[derive(Debug, Clone)]
pub struct Contact {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Contact {
    /// A clock that starts now, as if just contacted.
    pub fn new() -> Self {
        Contact {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
    /// Records a contact.
    pub fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// Time since the last contact.
    pub fn silence(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl Default for Contact {
    fn default() -> Self {
        Self::new()
    }
}

/// The control service of one admitted worker.
pub struct ControlService {
    /// The compute thread.
    pub stage: StageHandle,
    /// The data-plane endpoint (dials the next hop).
    pub endpoint: quinn::Endpoint,
    /// The key of the only caller allowed (the coordinator's, whose certificate renews).
    pub coordinator_key: String,
    /// This worker's certificate, which the coordinator renews.
    pub identity: Identity,
    /// Received slices, on disk.
    pub cache: SliceCache,
    /// What this worker accepts.
    pub memory_budget: u64,
    /// What it says about itself.
    pub info: WorkerInfo,
    /// Where layers run.
    pub device: Device,
    /// Last time the coordinator called.
    pub contact: Contact,
    /// Cancels the current next-hop sender.
    pub sender: Mutex<Option<CancellationToken>>,
    /// Who may send this stage frames (the data plane's gate reads it; wiring sets it).
    pub senders: Arc<Mutex<Senders>>,
    /// The worker's shutdown.
    pub cancel: CancellationToken,
}

impl ControlService {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let certs = req.peer_certs();
        self.authorize_certificate(certs.as_ref().and_then(|c| c.first()))
    }

    /// As [`ControlService::authorize`], for the client certificate `presented`.
    pub(crate) fn authorize_certificate(
        &self,
        presented: Option<&rustls_pki_types::CertificateDer<'_>>,
    ) -> Result<(), Status> {
        let ok = presented
            .and_then(|c| identity::key_fingerprint_of_cert(c))
            .is_some_and(|key| key == self.coordinator_key);
        if !ok {
            warn!("refused a control call: the caller is not the coordinator that admitted this worker");
            return Err(Status::permission_denied(
                "only the coordinator that admitted this worker may control it",
            ));
        }
        self.contact.touch();
        Ok(())
    }
}

pub(crate) fn status(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// The next hop of this stage's output. A send that fails re-dials once (a connection
/// lost while its peer lives, a blip), then gives up and reports the hop unreachable.
struct NextHop {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    name: String,
    conn: quinn::Connection,
}

impl NextHop {
    /// Sends a frame; a failure is reported at once (the coordinator decides whose
    /// failure it is) while the hop is re-dialed once.
    async fn send(&mut self, frame: &Frame, stats: &StageStats) -> strata_net::Result<()> {
        match transport::send_frame(&self.conn, frame).await {
            Ok(()) => Ok(()),
            Err(first) => {
                debug!(cause = %first, "a send to the next hop failed; re-dialing");
                stats.set_unreachable_hop(Some(self.name.clone()));
                let conn = transport::connect(&self.endpoint, self.addr, &self.name).await?;
                self.conn = conn;
                transport::send_frame(&self.conn, frame).await?;
                stats.set_unreachable_hop(None);
                Ok(())
            }
        }
    }
}

/// The slice in memory, as the control plane reports it.
pub fn held_slice(stats: &StageStats) -> Option<HeldSlice> {
    stats.holding().map(|h| HeldSlice {
        model_digest: h.digest,
        layer_start: h.slice.layers.start as u32,
        layer_end: h.slice.layers.end as u32,
        embed: h.slice.embed,
        head: h.slice.head,
    })
}

#[tonic::async_trait]
impl WorkerControl for ControlService {
    async fn missing(&self, req: Request<LoadHeader>) -> Result<Response<MissingResponse>, Status> {
        self.authorize(&req)?;
        let files = self
            .cache
            .missing(req.get_ref())
            .map_err(crate::slice_load::cache_status)?;
        Ok(Response::new(MissingResponse { files }))
    }

    async fn wire(&self, req: Request<WireRequest>) -> Result<Response<WireResponse>, Status> {
        self.authorize(&req)?;
        let w = req.into_inner();
        let (addr, wiring) = wiring_of(&w)?;
        // The stage before is wired after this one: it may send as soon as it is.
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .wired(w.epoch, w.previous_key.clone());
        let deadline = Instant::now() + CONNECT_DEADLINE;
        let conn = loop {
            match transport::connect(&self.endpoint, addr, &w.next_server_name).await {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    // The coordinator decides whose failure it is from the heartbeats.
                    self.stage
                        .stats
                        .set_unreachable_hop(Some(w.next_server_name.clone()));
                    return Err(Status::unavailable(format!(
                        "cannot reach the next hop: {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let cancel = self.cancel.child_token();
        if let Ok(mut g) = self.sender.lock() {
            if let Some(old) = g.replace(cancel.clone()) {
                old.cancel();
            }
        }
        let (tx, mut rx) = mpsc::channel::<Frame>(OUTGOING_QUEUE);
        let stats = self.stage.stats.clone();
        let mut hop = NextHop {
            endpoint: self.endpoint.clone(),
            addr,
            name: w.next_server_name.clone(),
            conn,
        };
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = rx.recv() => match m { Some(m) => m, None => break },
                };
                let started = std::time::Instant::now();
                if let Err(e) = hop.send(&frame, &stats).await {
                    warn!(cause = %e, "lost the next hop");
                    stats.set_error(Some(format!(
                        "next hop {} at {} unreachable: {e}",
                        hop.name, hop.addr
                    )));
                }
                stats
                    .network_nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            hop.conn.close(0u32.into(), b"rewired");
        });
        self.stage.call(|r| Command::Wire(wiring, tx, r)).await;
        info!(stage = w.stage, of = w.stages, next = %w.next_address, epoch = w.epoch, "wired");
        Ok(Response::new(WireResponse {}))
    }

    async fn health(
        &self,
        req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        self.authorize(&req)?;
        let stats = &self.stage.stats;
        Ok(Response::new(HealthResponse {
            state: stats.state().name().into(),
            resident_bytes: memory::resident_bytes(),
            peak_resident_bytes: memory::peak_resident_bytes(),
            sequences: stats.sequences.load(Ordering::Relaxed),
            queued_frames: stats.queued.load(Ordering::Relaxed),
            info: Some(self.info.clone()),
            epoch: stats.epoch.load(Ordering::Relaxed),
            error: stats.error().unwrap_or_default(),
            compute_seconds: stats.compute_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            network_seconds: stats.network_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            forwards: stats.forwards.load(Ordering::Relaxed),
            stalled_ms: stats.stalled(Instant::now()).as_millis() as u64,
            held: held_slice(stats),
            bytes_received: stats.bytes_received.load(Ordering::Relaxed),
            unreachable_next_hop: stats.unreachable_hop().unwrap_or_default(),
            decode_seconds: stats.decode_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            decode_forwards: stats.decode_forwards.load(Ordering::Relaxed),
            draft_model_digest: stats.draft().unwrap_or_default(),
        }))
    }

    async fn unload(
        &self,
        req: Request<UnloadRequest>,
    ) -> Result<Response<UnloadResponse>, Status> {
        self.authorize(&req)?;
        self.stage.call(Command::Unload).await;
        if let Ok(mut g) = self.sender.lock() {
            if let Some(old) = g.take() {
                old.cancel();
            }
        }
        info!("slice unloaded");
        Ok(Response::new(UnloadResponse {}))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        self.authorize(&req)?;
        self.identity
            .renew(req.into_inner().certificate_der)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!("renewed this worker's certificate");
        Ok(Response::new(RenewResponse {}))
    }

    async fn probe(&self, req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        if r.targets.len() > MAX_PROBE_TARGETS {
            return Err(Status::invalid_argument(format!(
                "{} probe targets: at most {MAX_PROBE_TARGETS}",
                r.targets.len()
            )));
        }
        let pings = r.pings.clamp(1, MAX_PINGS);
        let burst = (r.burst_bytes as usize).clamp(1, transport::MAX_PROBE_BYTES);
        let mut links = Vec::with_capacity(r.targets.len());
        // One link at a time: bursts that shared this machine's uplink would each see a
        // fraction of it.
        for target in &r.targets {
            let measured = self.probe_one(target, pings, burst).await;
            links.push(match measured {
                Ok(sample) => LinkMeasurement {
                    worker_id: target.worker_id.clone(),
                    rtt_ms: sample.rtt_ms,
                    bandwidth_bytes_per_second: sample.bandwidth,
                    error: String::new(),
                },
                Err(e) => LinkMeasurement {
                    worker_id: target.worker_id.clone(),
                    error: e,
                    ..Default::default()
                },
            });
        }
        Ok(Response::new(ProbeResponse { links }))
    }
}

impl ControlService {
    /// Measures the link to one peer over a connection of its own.
    async fn probe_one(
        &self,
        target: &ProbeTarget,
        pings: u32,
        burst: usize,
    ) -> Result<transport::LinkSample, String> {
        let addr: SocketAddr = target
            .address
            .parse()
            .map_err(|_| format!("address `{}` is not ip:port", target.address))?;
        let conn = transport::connect(&self.endpoint, addr, &target.server_name)
            .await
            .map_err(|e| e.to_string())?;
        let sample = transport::probe(&conn, pings, burst).await;
        conn.close(0u32.into(), b"probed");
        let sample = sample.map_err(|e| e.to_string())?;
        debug!(peer = %target.worker_id, rtt_ms = sample.rtt_ms, bandwidth = sample.bandwidth, "link measured");
        Ok(sample)
    }
}
