//! `strata-worker`: everything a machine that holds a slice of the model runs.
//!
//! - [`stage`]: the compute thread that batches frames through the slice;
//! - [`control`]: the `WorkerControl` gRPC service the coordinator drives;
//! - [`speed`]: what the worker measures about its machine;
//! - [`run`]: join a cluster and serve until cancelled.
//!
//! Identity, the QUIC transport, frames and discovery are `strata-net`'s, shared with the
//! coordinator as a peer.
//!
//! It never plans, never tokenizes, and never talks to clients: that is the coordinator's.
//!
//! Dependencies, and why: `strata-net` (identity, QUIC, frames, mDNS); `tonic` (the
//! control service, mutual TLS); `candle-core` (the device a slice runs on).
//!
//! Choices where the design was silent: a worker's id defaults to its host name (the
//! coordinator adds `-2`, `-3` when taken); it keeps no copy of its slice on disk once
//! loaded; the default memory budget is 75% of the memory available at start; a worker
//! that has not heard from its coordinator for 15 s looks for it again and rejoins.

pub mod control;
pub mod error;
pub mod speed;
pub mod stage;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use candle_core::Device;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::worker_control_server::WorkerControlServer;
use strata_proto::v1::{JoinRequest, WorkerInfo};
use strata_proto::PROTOCOL_VERSION;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

pub use error::{Error, Result};
use strata_net::identity::{self, JoinToken, PendingKey};
use strata_net::{discovery, memory, transport};

/// A worker that has not heard from its coordinator for this long rejoins.
pub const COORDINATOR_SILENCE: Duration = Duration::from_secs(15);
/// Frames received and waiting to be queued on the compute thread.
const RECEIVED_QUEUE: usize = 256;

/// How a worker runs. Built by the CLI; `validate` is called by [`run`].
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Requested id (default: the host name). The coordinator may add a suffix.
    pub id: Option<String>,
    /// The join token (required).
    pub token: JoinToken,
    /// Join this coordinator directly (host:port of its API) instead of finding it by mDNS.
    pub coordinator: Option<String>,
    /// Bytes this worker accepts for weights and caches (default: 75% of available memory).
    pub memory_budget: Option<u64>,
    /// "auto", "cpu", "cuda:N" or "metal" (default "auto": the best this build supports).
    pub device: String,
    /// Address to bind listeners on (default 0.0.0.0).
    pub bind: IpAddr,
    /// TCP port of the control service (default 0: any).
    pub control_port: u16,
    /// UDP port of the data plane (default 0: any).
    pub data_port: u16,
    /// Where received slices are written before loading (default: a temporary directory).
    pub cache_dir: Option<PathBuf>,
    /// Announce over mDNS (default true).
    pub mdns: bool,
    /// Skip the speed measurement and use this figure (bytes/s), for tests.
    pub speed: Option<f64>,
}

impl WorkerConfig {
    /// A config with defaults and the given token.
    pub fn new(token: JoinToken) -> Self {
        WorkerConfig {
            id: None,
            token,
            coordinator: None,
            memory_budget: None,
            device: "auto".into(),
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            control_port: 0,
            data_port: 0,
            cache_dir: None,
            mdns: true,
            speed: None,
        }
    }
}

/// Picks the device a `--device` value names.
pub fn pick_device(name: &str) -> Result<Device> {
    let unavailable = |reason: String| Error::Device {
        device: name.to_string(),
        reason,
    };
    match name {
        "auto" | "cpu" => Ok(Device::Cpu),
        other if other.starts_with("cuda") => {
            let n: usize = match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| unavailable("expected cuda:N with N a GPU index".into()))?,
                None => 0,
            };
            Device::new_cuda(n).map_err(|e| {
                unavailable(format!(
                    "{e} (build with `--features cuda` on a machine with CUDA)"
                ))
            })
        }
        "metal" => Device::new_metal(0)
            .map_err(|e| unavailable(format!("{e} (build with `--features metal` on a Mac)"))),
        _ => Err(unavailable("use auto, cpu, cuda:N or metal".into())),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// Joins a cluster and serves a slice until `shutdown` is cancelled. Rejoins when the
/// coordinator goes silent; returns an error when the coordinator refuses the token.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<()> {
    let device = pick_device(&config.device)?;
    let hostname = host_name();
    let requested_id = identity::sanitize_id(config.id.as_deref().unwrap_or(&hostname));
    let span = tracing::info_span!("worker", id = %requested_id);
    async move {
        let budget = config.memory_budget.unwrap_or_else(memory::default_budget);
        if budget == 0 {
            return Err(Error::Budget(
                "cannot read this machine's memory (no /proc/meminfo); pass --memory, e.g. --memory 12GiB".into(),
            ));
        }
        let speed = match config.speed {
            Some(s) => s,
            None => {
                let d = device.clone();
                tokio::task::spawn_blocking(move || speed::measure(&d))
                    .await
                    .map_err(|e| Error::Rpc(e.to_string()))??
            }
        };
        info!(speed_gb_s = speed / 1e9, budget_mib = budget >> 20, "measured");
        let control_listener =
            tokio::net::TcpListener::bind(SocketAddr::new(config.bind, config.control_port)).await?;
        let control_port = control_listener.local_addr()?.port();
        let data_socket = std::net::UdpSocket::bind(SocketAddr::new(config.bind, config.data_port))?;
        let data_port = data_socket.local_addr()?.port();
        let cache_dir = match &config.cache_dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("strata-worker-{}", std::process::id())),
        };
        let mut control_listener = Some(control_listener);
        let mut data_socket = Some(data_socket);
        loop {
            let key = PendingKey::generate()?;
            let info = WorkerInfo {
                id: requested_id.clone(),
                hostname: hostname.clone(),
                device: config.device.clone(),
                memory_budget: budget,
                speed_bytes_per_second: speed,
                data_port: u32::from(data_port),
                control_port: u32::from(control_port),
                version: env!("CARGO_PKG_VERSION").into(),
                protocol_version: PROTOCOL_VERSION,
                key_fingerprint: key.fingerprint(),
                addresses: Vec::new(),
            };
            let _announcement = if config.mdns {
                let txt: HashMap<String, String> = [
                    ("role", "worker".to_string()),
                    ("id", info.id.clone()),
                    ("v", info.version.clone()),
                    ("proto", PROTOCOL_VERSION.to_string()),
                    ("device", info.device.clone()),
                    ("mem", budget.to_string()),
                    ("speed", format!("{speed:.0}")),
                    ("data", data_port.to_string()),
                    ("control", control_port.to_string()),
                    ("fpr", info.key_fingerprint.clone()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                let ip = (!config.bind.is_unspecified()).then_some(config.bind);
                match discovery::announce(&format!("strata-worker-{}-{data_port}", info.id), data_port, txt, ip) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        warn!(cause = %e, "could not announce over mDNS; join with --coordinator");
                        None
                    }
                }
            } else {
                None
            };
            let coordinator = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                c = find_coordinator(&config) => c?,
            };
            let joined = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                j = join(&coordinator, &config.token, &key, info.clone()) => j,
            };
            let (identity, coordinator_cert, assigned_id) = match joined {
                Ok(j) => j,
                Err(e @ Error::Refused { .. }) => {
                    error!(cause = %e, "not admitted");
                    return Err(e);
                }
                Err(e) => {
                    warn!(cause = %e, "join failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            let session = shutdown.child_token();
            let stage = stage::StageHandle::spawn(assigned_id.clone())?;
            let socket = match data_socket.take() {
                Some(s) => s,
                None => std::net::UdpSocket::bind(SocketAddr::new(config.bind, data_port))?,
            };
            let endpoint = transport::endpoint(socket, &identity)?;
            let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel(RECEIVED_QUEUE);
            transport::spawn_acceptor(endpoint.clone(), frames_tx, session.clone(), "worker");
            let to_stage = stage.clone();
            tokio::spawn(async move {
                while let Some(f) = frames_rx.recv().await {
                    if !to_stage.send(stage::Command::Frame(f)).await {
                        break;
                    }
                }
            });
            let contact = control::Contact::new();
            contact.touch();
            let service = control::ControlService {
                stage: stage.clone(),
                endpoint: endpoint.clone(),
                coordinator_cert,
                cache_dir: cache_dir.clone(),
                memory_budget: budget,
                info: WorkerInfo {
                    id: assigned_id.clone(),
                    ..info.clone()
                },
                device: device.clone(),
                contact: contact.clone(),
                sender: Mutex::new(None),
                cancel: session.clone(),
            };
            let listener = match control_listener.take() {
                Some(l) => l,
                None => tokio::net::TcpListener::bind(SocketAddr::new(config.bind, control_port)).await?,
            };
            let server_cancel = session.clone();
            let server = tonic::transport::Server::builder()
                .tls_config(identity.grpc_server_tls())?
                .add_service(WorkerControlServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move { server_cancel.cancelled().await },
                );
            let server = tokio::spawn(server);
            info!(
                id = %assigned_id,
                coordinator = %coordinator,
                control_port,
                data_port,
                "joined the cluster; ready for a slice"
            );
            // Serve until shutdown, or until the coordinator has been silent too long.
            let rejoin = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break false,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if contact.silence() > COORDINATOR_SILENCE {
                            warn!(coordinator = %coordinator, "the coordinator has been silent for {}s; rejoining", COORDINATOR_SILENCE.as_secs());
                            break true;
                        }
                    }
                }
            };
            session.cancel();
            let _ = server.await;
            endpoint.close(0u32.into(), b"worker leaving");
            endpoint.wait_idle().await;
            if !rejoin {
                return Ok(());
            }
        }
    }
    .instrument(span)
    .await
}

async fn find_coordinator(config: &WorkerConfig) -> Result<String> {
    if let Some(c) = &config.coordinator {
        return Ok(c.clone());
    }
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let mut seen = discovery::browse(cancel)?;
    info!(cluster = %config.token.cluster_id(), "looking for the coordinator over mDNS");
    while let Some(s) = seen.recv().await {
        if s.get("role") != Some("coordinator") {
            continue;
        }
        let cluster = s.get("cluster").unwrap_or("");
        if cluster != config.token.cluster_id() {
            warn!(
                found = %cluster,
                mine = %config.token.cluster_id(),
                instance = %s.instance,
                "found a coordinator of another cluster; ignoring it"
            );
            continue;
        }
        // A coordinator also answers on its loopback: only use that when it is all there is.
        let ip = s
            .addresses
            .iter()
            .find(|a| !a.is_loopback() && !a.is_link_local())
            .or(s.addresses.first());
        if let Some(ip) = ip {
            let addr = SocketAddr::new(IpAddr::V4(*ip), s.port).to_string();
            info!(%addr, "found the coordinator over mDNS");
            return Ok(addr);
        }
    }
    Err(strata_net::Error::Mdns("the mDNS browser stopped".into()).into())
}

/// Asks the coordinator at `address` to admit this worker.
async fn join(
    address: &str,
    token: &JoinToken,
    key: &PendingKey,
    info: WorkerInfo,
) -> Result<(
    identity::Identity,
    rustls_pki_types::CertificateDer<'static>,
    String,
)> {
    let endpoint = format!("http://{address}");
    let mut client = ClusterClient::connect(endpoint).await?;
    let csr = key.signing_request(&identity::worker_name(&info.id))?;
    let proof = token.join_proof(&csr);
    let reply = client
        .join(JoinRequest {
            worker: Some(info),
            csr_der: csr,
            token_proof: proof,
        })
        .await;
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::PermissionDenied
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
            ) =>
        {
            return Err(Error::Refused {
                address: address.to_string(),
                reason: s.message().to_string(),
            })
        }
        Err(s) => return Err(s.into()),
    };
    if !token.verify_admit(&reply.certificate_der, &reply.admit_proof) {
        return Err(Error::Refused {
            address: address.to_string(),
            reason: "its answer does not prove it holds this cluster's secret: not our coordinator"
                .into(),
        });
    }
    if identity::cluster_id_of(&reply.ca_certificate_der) != token.cluster_id() {
        return Err(Error::Refused {
            address: address.to_string(),
            reason: "its CA is not the one the token names".into(),
        });
    }
    let coordinator_cert =
        rustls_pki_types::CertificateDer::from(reply.coordinator_certificate_der);
    let id = reply.assigned_id;
    let identity = key.into_identity(
        &identity::worker_name(&id),
        reply.certificate_der,
        reply.ca_certificate_der,
    );
    Ok((identity, coordinator_cert, id))
}
