//! `strata-worker`: everything a machine that holds a slice of the model runs.
//!
//! - [`stage`]: the stage core (sans-IO: frames in, a batched forward, frames out) and the
//!   compute thread around it;
//! - [`control`]: the `WorkerControl` gRPC service the coordinator drives;
//! - `slice_load`: a slice's bytes from the coordinator, raw on TLS on the control port,
//!   into the cache and memory;
//! - [`cache`]: received slices on disk by model digest, so nothing is sent twice;
//! - [`senders`]: who may send this stage frames (the coordinator, the planned
//!   predecessor in its epoch);
//! - `join` and `session`: finding and joining the coordinator, and one joined session
//!   (QUIC endpoint, control server) until the coordinator goes silent;
//! - [`speed`]: what the worker measures about its machine; [`energy`]: its energy
//!   counters (RAPL through powercap, powermetrics, NVML), read around each batch;
//! - [`run`]: join a cluster and serve until cancelled.
//!
//! Identity, the QUIC transport, frames and discovery are `strata-net`'s, shared with the
//! coordinator as a peer.
//!
//! It never plans, never tokenizes, and never talks to clients: that is the coordinator's.
//!
//! Dependencies, and why: `strata-net` (identity, QUIC, frames, mDNS); `tonic` (the
//! control service, mutual TLS); `candle-core` (the device a slice runs on); `plist`
//! (powermetrics' samples on macOS); `nvml-wrapper` with the `nvml` feature (NVIDIA's
//! energy counters, loaded at run time).
//!
//! Choices where the design was silent: a worker's id defaults to its host name (the
//! coordinator adds `-2`, `-3` when taken); it keeps the bytes of its slices on disk in
//! its cache directory (one model at a time) and its slice in memory across rejoins (for
//! `grace` while cut off); the default memory budget is 75% of the memory available at
//! start; a worker that has not heard from its coordinator for 5 s looks for it again and
//! rejoins, telling it which slice it still holds.

pub mod cache;
pub mod control;
pub mod energy;
pub mod error;
mod join;
pub mod senders;
mod session;
mod slice_load;
pub mod speed;
pub mod stage;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

pub use error::{Error, Result};
use strata_net::identity::{self, JoinToken};
use strata_net::memory;

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
    /// Where received slices are kept, by model digest (default:
    /// `$XDG_CACHE_HOME/strata/slices-<id>`).
    pub cache_dir: Option<PathBuf>,
    /// Announce over mDNS (default true).
    pub mdns: bool,
    /// Skip the speed measurement and use this figure (bytes/s), for tests.
    pub speed: Option<f64>,
    /// How long a worker cut off from its coordinator keeps its slice in memory (default
    /// 10 s); back within it, the slice serves again at once. Its bytes stay on disk.
    pub grace: Duration,
    /// Where the RAPL energy counters are (default `/sys/class/powercap`).
    pub powercap_root: PathBuf,
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
            grace: Duration::from_secs(10),
            powercap_root: PathBuf::from("/sys/class/powercap"),
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

/// The GPU index a `cuda` or `cuda:N` device names.
fn cuda_index(name: &str) -> u32 {
    name.strip_prefix("cuda:")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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
/// coordinator goes silent, keeping its slice in memory for `grace` (and its bytes on
/// disk for good); returns an error when the coordinator refuses the token.
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
        let cache_dir = match config.cache_dir.clone() {
            Some(dir) => dir,
            None => default_cache_dir(&requested_id).ok_or_else(|| {
                Error::Cache(cache::CacheError::Invalid(
                    "neither XDG_CACHE_HOME nor HOME is set, so there is no private place \
                     for the slice cache (a shared /tmp is not one): pass --cache-dir"
                        .into(),
                ))
            })?,
        };
        let cuda = match &device {
            Device::Cuda(_) => Some(cuda_index(&config.device)),
            _ => None,
        };
        let meter = energy::EnergyMeter::open(&config.powercap_root, cuda);
        info!(energy = %meter.describe(), "energy per step");
        let meter = std::sync::Arc::new(meter);
        let machine = session::Machine {
            energy: meter.describe().to_string(),
            stage: stage::StageHandle::spawn(requested_id.clone(), meter)?,
            cache: cache::SliceCache::open(&cache_dir)?,
            device,
            budget,
            speed,
            hostname,
            requested_id,
        };
        session::serve(&config, &machine, shutdown).await
    }
    .instrument(span)
    .await
}

/// Where received slices are kept when `--cache-dir` is not given:
/// `$XDG_CACHE_HOME/strata/slices-<id>` (or `~/.cache/...`); never a shared `/tmp` path,
/// where another local user could make the directory first (none without a home).
fn default_cache_dir(id: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".cache"))
        })?;
    Some(base.join("strata").join(format!("slices-{id}")))
}
