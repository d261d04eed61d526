//! A worker's life in the cluster: join, serve one session (a QUIC endpoint and a control
//! server under the certificate that join gave), and when the coordinator goes silent,
//! join again. What belongs to the machine outlives sessions: the compute thread with its
//! slice, and the slice cache. A worker cut off for longer than its grace period frees
//! its slice from memory; its bytes stay on disk, so nothing is sent twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use strata_net::discovery;
use strata_net::identity::{self, PendingKey};
use strata_net::transport;
use strata_proto::v1::worker_control_server::WorkerControlServer;
use strata_proto::v1::WorkerInfo;
use strata_proto::PROTOCOL_VERSION;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cache::SliceCache;
use crate::control::{Contact, ControlService};
use crate::error::{Error, Result};
use crate::join::{self, Admission};
use crate::senders::Senders;
use crate::stage::{Command, StageHandle};
use crate::WorkerConfig;

/// A worker that has not heard from its coordinator for this long rejoins (the
/// coordinator asks every 0.7 s).
pub const COORDINATOR_SILENCE: Duration = Duration::from_secs(5);
/// Frames received and waiting to be queued on the compute thread.
const RECEIVED_QUEUE: usize = 256;
/// Pause between failed joins.
const RETRY: Duration = Duration::from_secs(1);
/// How long a coordinator found over mDNS that refused this worker, or could not prove it
/// holds the token, is passed over.
const SKIP_REFUSING: Duration = Duration::from_secs(30);
/// How long an mDNS-found coordinator that could not be reached is passed over.
const SKIP_UNREACHABLE: Duration = Duration::from_secs(5);
/// Connections the control service holds open at once (the coordinator needs a few).
const CONTROL_CONNECTIONS: usize = 32;
/// Calls one control connection may have open at once.
const CONTROL_STREAMS: u32 = 64;
/// The HTTP/2 flow-control window of a control stream (a slice's push): bytes in flight.
const LOAD_WINDOW: u32 = 8 << 20;

/// What belongs to the machine, across sessions.
pub struct Machine {
    /// The compute thread and its slice.
    pub stage: StageHandle,
    /// Received slices on disk.
    pub cache: SliceCache,
    /// Where layers run.
    pub device: Device,
    /// Bytes it accepts.
    pub budget: u64,
    /// Measured speed, bytes/s.
    pub speed: f64,
    /// Its host name.
    pub hostname: String,
    /// The id it asks for.
    pub requested_id: String,
    /// Its energy counter, or "not available: <why>".
    pub energy: String,
}

/// Sockets bound once, reused by every session.
struct Sockets {
    control: Option<tokio::net::TcpListener>,
    data: Option<std::net::UdpSocket>,
    control_port: u16,
    data_port: u16,
}

impl Sockets {
    async fn bind(config: &WorkerConfig) -> Result<Sockets> {
        let control =
            tokio::net::TcpListener::bind(SocketAddr::new(config.bind, config.control_port))
                .await?;
        let data = std::net::UdpSocket::bind(SocketAddr::new(config.bind, config.data_port))?;
        Ok(Sockets {
            control_port: control.local_addr()?.port(),
            data_port: data.local_addr()?.port(),
            control: Some(control),
            data: Some(data),
        })
    }

    async fn control(&mut self, config: &WorkerConfig) -> Result<tokio::net::TcpListener> {
        Ok(match self.control.take() {
            Some(l) => l,
            None => {
                tokio::net::TcpListener::bind(SocketAddr::new(config.bind, self.control_port))
                    .await?
            }
        })
    }

    fn data(&mut self, config: &WorkerConfig) -> Result<std::net::UdpSocket> {
        Ok(match self.data.take() {
            Some(s) => s,
            None => std::net::UdpSocket::bind(SocketAddr::new(config.bind, self.data_port))?,
        })
    }
}

/// Joins and serves, session after session, until `shutdown`.
pub async fn serve(config: &WorkerConfig, m: &Machine, shutdown: CancellationToken) -> Result<()> {
    let mut sockets = Sockets::bind(config).await?;
    let mut cut_off_since: Option<Instant> = None;
    loop {
        let key = PendingKey::generate()?;
        let info = WorkerInfo {
            id: m.requested_id.clone(),
            hostname: m.hostname.clone(),
            device: config.device.clone(),
            memory_budget: m.budget,
            speed_bytes_per_second: m.speed,
            data_port: u32::from(sockets.data_port),
            control_port: u32::from(sockets.control_port),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            key_fingerprint: key.fingerprint(),
            addresses: Vec::new(),
            energy_meter: m.energy.clone(),
        };
        let _announcement = config.mdns.then(|| announce(config, &info)).flatten();
        let joined = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            j = admitted(config, m, &key, &info, cut_off_since) => j?,
        };
        let rejoin = session(config, m, joined, &mut sockets, &info, &shutdown).await?;
        if !rejoin {
            return Ok(());
        }
        cut_off_since = Some(Instant::now());
    }
}

fn announce(config: &WorkerConfig, info: &WorkerInfo) -> Option<discovery::Announcement> {
    let txt: HashMap<String, String> = [
        ("role", "worker".to_string()),
        ("id", info.id.clone()),
        ("v", info.version.clone()),
        ("proto", PROTOCOL_VERSION.to_string()),
        ("device", info.device.clone()),
        ("mem", info.memory_budget.to_string()),
        ("speed", format!("{:.0}", info.speed_bytes_per_second)),
        ("data", info.data_port.to_string()),
        ("control", info.control_port.to_string()),
        ("fpr", info.key_fingerprint.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let ip = (!config.bind.is_unspecified()).then_some(config.bind);
    let instance = format!("strata-worker-{}-{}", info.id, info.data_port);
    match discovery::announce(&instance, info.data_port as u16, txt, ip) {
        Ok(a) => Some(a),
        Err(e) => {
            warn!(cause = %e, "could not announce over mDNS; join with --coordinator");
            None
        }
    }
}

/// Finds the coordinator and joins, retrying; frees the slice once cut off for longer
/// than the grace period. Only a refusal ends it with an error.
async fn admitted(
    config: &WorkerConfig,
    m: &Machine,
    key: &PendingKey,
    info: &WorkerInfo,
    cut_off_since: Option<Instant>,
) -> Result<Admission> {
    let grace_ends = cut_off_since.map(|t| t + config.grace);
    let mut freed = false;
    // Records found over mDNS whose coordinator refused or could not prove the token, and
    // until when they are passed over: anyone on the LAN can announce one.
    let mut skipped: Vec<(String, Instant)> = Vec::new();
    loop {
        let now = Instant::now();
        skipped.retain(|(_, until)| *until > now);
        let skip = skipped.iter().cloned().collect();
        let attempt = async {
            let coordinator = join::find_coordinator(config, &skip)
                .await
                .map_err(|e| (None, e))?;
            let held = crate::control::held_slice(&m.stage.stats);
            join::join(&coordinator, &config.token, key, info.clone(), held)
                .await
                .map(|a| (coordinator.clone(), a))
                .map_err(|e| (Some(coordinator), e))
        };
        let grace = async {
            match grace_ends {
                Some(t) if !freed => tokio::time::sleep_until(t.into()).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            r = attempt => match r {
                Ok((coordinator, a)) => {
                    info!(id = %a.id, coordinator = %coordinator, "joined the cluster");
                    return Ok(a);
                }
                Err((Some(address), e)) if config.coordinator.is_none() => {
                    // Found over mDNS: maybe not our coordinator at all (anyone can announce
                    // a record). Pass it over a while and keep looking, so that a record that
                    // refuses, or leads nowhere, cannot keep the worker from the real one
                    // (which, if it was that, is tried again).
                    let skip = match e {
                        Error::Refused { .. } => SKIP_REFUSING,
                        _ => SKIP_UNREACHABLE,
                    };
                    warn!(cause = %e, %address, "not admitted by the coordinator an mDNS record named; passing it over for {}s and still looking", skip.as_secs());
                    skipped.push((address, Instant::now() + skip));
                    tokio::time::sleep(RETRY).await;
                }
                Err((_, e @ Error::Refused { .. })) => {
                    error!(cause = %e, "not admitted");
                    return Err(e);
                }
                Err((_, e)) => {
                    warn!(cause = %e, "join failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            },
            _ = grace => {
                freed = true;
                if m.stage.stats.holding().is_some() {
                    warn!(grace_s = config.grace.as_secs_f64(), "cut off from the coordinator past the grace period: freeing the slice from memory (its bytes stay in the cache)");
                    m.stage.call(Command::Unload).await;
                }
            }
        }
    }
}

/// Who may send this stage frames (wiring updates it), and the data plane's gate that
/// asks it.
fn data_gate(coordinator_key: String) -> (Arc<Mutex<Senders>>, transport::Gate) {
    let senders = Arc::new(Mutex::new(Senders::new(coordinator_key)));
    let asked = senders.clone();
    let gate: transport::Gate = Arc::new(move |from, frame| {
        asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allows(from, frame.epoch())
    });
    (senders, gate)
}

/// Serves one session until the coordinator goes silent (true: rejoin) or `shutdown`
/// (false).
async fn session(
    config: &WorkerConfig,
    m: &Machine,
    joined: Admission,
    sockets: &mut Sockets,
    info: &WorkerInfo,
    shutdown: &CancellationToken,
) -> Result<bool> {
    let cancel = shutdown.child_token();
    let endpoint = transport::endpoint(sockets.data(config)?, &joined.identity)?;
    let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel(RECEIVED_QUEUE);
    let coordinator_key =
        identity::key_fingerprint_of_cert(&joined.coordinator_cert).ok_or_else(|| {
            Error::Refused {
                address: "the coordinator".into(),
                reason: "its certificate does not parse".into(),
            }
        })?;
    let (senders, gate) = data_gate(coordinator_key.clone());
    transport::spawn_acceptor(endpoint.clone(), frames_tx, cancel.clone(), "worker", gate);
    let to_stage = m.stage.clone();
    tokio::spawn(async move {
        while let Some(f) = frames_rx.recv().await {
            if !to_stage.send(Command::Frame(f)).await {
                break;
            }
        }
    });
    let contact = Contact::new();
    let service = ControlService {
        stage: m.stage.clone(),
        cache: m.cache.clone(),
        endpoint: endpoint.clone(),
        coordinator_key,
        identity: joined.identity.clone(),
        memory_budget: m.budget,
        info: WorkerInfo {
            id: joined.id.clone(),
            ..info.clone()
        },
        device: m.device.clone(),
        contact: contact.clone(),
        sender: Mutex::new(None),
        senders,
        cancel: cancel.clone(),
    };
    let listener = sockets.control(config).await?;
    let server_cancel = cancel.clone();
    // Only the coordinator passes the mutual TLS; others' connections are bounded all the
    // same, as are the calls on one.
    // (The TLS is ours, not tonic's, so a renewed certificate reaches new connections.)
    let tls = joined.identity.control_server_config()?;
    let service = Arc::new(service);
    let connections = split_slice_loads(
        strata_net::api_tls::tls_only(
            strata_net::listen::Bounded::new(listener, CONTROL_CONNECTIONS),
            tls,
        ),
        service.clone(),
    );
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(CONTROL_STREAMS))
        // HTTP/2's default 64 KiB windows hold a slice's push to a few hundred MB/s even
        // on loopback: the window is what the coordinator may send before we ack.
        .initial_stream_window_size(Some(LOAD_WINDOW))
        .initial_connection_window_size(Some(2 * LOAD_WINDOW))
        .add_service(WorkerControlServer::from_arc(service))
        .serve_with_incoming_shutdown(connections, async move { server_cancel.cancelled().await });
    let server = tokio::spawn(server);
    info!(
        id = %joined.id,
        control_port = sockets.control_port,
        data_port = sockets.data_port,
        holds = ?m.stage.stats.holding().map(|h| h.slice.layers),
        "ready for a slice"
    );
    let rejoin = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break false,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if contact.silence() > COORDINATOR_SILENCE {
                    warn!("the coordinator has been silent for {}s; rejoining (the slice stays loaded)", COORDINATOR_SILENCE.as_secs());
                    break true;
                }
            }
        }
    };
    cancel.cancel();
    let _ = server.await;
    endpoint.close(0u32.into(), b"worker leaving");
    endpoint.wait_idle().await;
    Ok(rejoin)
}

/// The control port's connections for gRPC; those that negotiated a slice load
/// ([`strata_proto::SLICE_ALPN`]) are served here instead, each on a task of its own.
fn split_slice_loads(
    connections: impl futures::Stream<Item = std::io::Result<crate::slice_load::SliceConnection>>,
    service: Arc<ControlService>,
) -> impl futures::Stream<Item = std::io::Result<crate::slice_load::SliceConnection>> {
    use futures::StreamExt;
    connections.filter_map(move |connection| {
        let service = service.clone();
        async move {
            match connection {
                Ok(c) if c.get_ref().1.alpn_protocol() == Some(strata_proto::SLICE_ALPN) => {
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = service.cancel.cancelled() => {}
                            _ = service.serve_slice_load(c) => {}
                        }
                    });
                    None
                }
                other => Some(other),
            }
        }
    })
}
