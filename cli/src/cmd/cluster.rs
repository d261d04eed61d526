//! The cluster commands: `strata serve` (the coordinator), `strata worker`, `strata token`,
//! and `strata cluster status|plan|join|drain|remove`, plus the gRPC client helpers that
//! `generate` and `bench` use with `--coordinator`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, ensure, Context};
use clap::{Args, Subcommand};
use strata_coordinator::planner::{self, Candidate, PlanOptions};
use strata_coordinator::registry::state_name;
use strata_coordinator::{profile, CoordinatorConfig};
use strata_net::identity::{ClusterCa, JoinToken};
use strata_net::memory::parse_size;
use strata_net::operator::{self, Call, OperatorKey};
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::inference_client::InferenceClient;
use strata_proto::v1::{DrainRequest, PlanRequest, PlanResponse, RemoveRequest, StatusRequest};
use strata_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::human_bytes;

/// Default address of the coordinator's public gRPC API.
pub const DEFAULT_API: &str = "127.0.0.1:7433";
/// Paper workers stream weights at this fraction of their stated memory bandwidth (our CPU
/// kernels measured 0.33-0.46 of the copy roofline).
const PAPER_EFFICIENCY: f64 = 0.5;

fn default_state_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STRATA_STATE_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".local/share/strata")
}

/// A multi-thread runtime for the network commands.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Cancels on Ctrl-C (and SIGTERM on Unix).
pub fn shutdown_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        c.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    cancel
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model to serve: a .gguf file or a safetensors directory.
    #[arg(long)]
    model: PathBuf,
    /// Address of the public gRPC API.
    #[arg(long, default_value = "0.0.0.0:7433")]
    listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (`/v1/chat/completions`, ...).
    #[arg(long, default_value = "0.0.0.0:7434")]
    http: SocketAddr,
    /// Serve no HTTP API.
    #[arg(long)]
    no_http: bool,
    /// UDP port of the coordinator's QUIC endpoint (0: any).
    #[arg(long, default_value_t = 0)]
    data_port: u16,
    /// Where the cluster's CA and secret live (created on first start).
    #[arg(long, env = "STRATA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Require `authorization: Bearer <key>` on the public API (everything but `/health`
    /// and the dashboard page, `/metrics` included unless --open-metrics).
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The hybrid route: an OpenAI-compatible API elsewhere (its base URL, such as
    /// https://api.openai.com/v1). `/v1/models` lists its models as `upstream/<name>`, and
    /// requests for those are passed to it, streamed as it streams.
    #[arg(long, env = "STRATA_UPSTREAM")]
    upstream: Option<String>,
    /// The upstream's API key: sent to it only, never logged. Prefer the environment
    /// (STRATA_UPSTREAM_KEY) to the command line, which other users can see.
    #[arg(long, env = "STRATA_UPSTREAM_KEY", hide_env_values = true)]
    upstream_key: Option<String>,
    /// What becomes of a request the cluster would refuse (429 when its queue is full, 503
    /// while it does not serve): `refuse` it, or send it to the `upstream`. A private
    /// request is never sent: it waits for the cluster or is refused.
    #[arg(long, default_value = "refuse", value_parser = ["refuse", "upstream"])]
    overflow: String,
    /// The upstream model that overflowing requests ask for (default: one named like the
    /// cluster's model, else the upstream's only model).
    #[arg(long)]
    overflow_model: Option<String>,
    /// Keep every request on the LAN, as if each carried `x-strata-private: 1`: none is
    /// sent upstream, and upstream models are neither listed nor served.
    #[arg(long, env = "STRATA_PRIVATE_ONLY", value_parser = clap::builder::FalseyValueParser::new())]
    private_only: bool,
    /// Serve `/metrics` without the API key, for a scraper that cannot send one.
    #[arg(long)]
    open_metrics: bool,
    /// Workers to wait for before the first plan.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Neither announce nor browse over mDNS (workers then join with --coordinator).
    #[arg(long)]
    no_mdns: bool,
    /// Activations' type on the wire. f32 (the default) is exact: the split never changes
    /// the answer, and an answer resumed on a new split equals its undisturbed twin. f16 or
    /// bf16 halve the bytes for slow links, and may change a token where two are nearly
    /// tied.
    #[arg(long, default_value = "f32")]
    wire_dtype: String,
    /// How long an answer whose worker died, hung or dropped off waits for a plan that
    /// can take it over before it fails (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    recover_wait: std::time::Duration,
    /// KV-cache positions reserved per layer on each stage (context x concurrency). Each
    /// request reserves its prompt plus max_tokens of them before it starts; requests that
    /// do not fit wait (see --max-queue).
    #[arg(long, default_value_t = 4096)]
    kv_tokens: u64,
    /// Requests that may wait for room in the KV cache; past them a request gets 429
    /// (gRPC RESOURCE_EXHAUSTED) with Retry-After, or takes the place of a larger one
    /// waiting, which gets it instead.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Most prompt tokens one forward takes: longer prompts go in pieces, between which
    /// other answers keep decoding.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=2048))]
    prefill_chunk: u32,
    /// A streaming client that leaves a token unread this long is cancelled, and its
    /// caches freed on every stage (e.g. 30s). One that stops reading for a second while
    /// others wait for room gives its caches up sooner, and replays when it reads again.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    client_timeout: std::time::Duration,
    /// How long the certificates the cluster's CA issues are valid (e.g. 24h); members
    /// renew theirs at half of it, so a removed or vanished one is shut out by then.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_lifetime: std::time::Duration,
    /// What plans minimise: `latency` (time per token of one stream: the fastest machines
    /// first, others only where they pay for their hop) or `throughput` (the slowest
    /// stage, when many streams keep every stage busy).
    #[arg(long, default_value = "latency")]
    objective: String,
    /// Also hold a stage in this process.
    #[arg(long)]
    local_worker: bool,
    /// Memory the local worker accepts (default: 75% of available memory).
    #[arg(long)]
    local_memory: Option<String>,
    /// The link between the machines, nominally: 1gbe, 10gbe, wifi, tb4, or a rate such
    /// as 2.5gbit. Links measured slower than this count as measured.
    #[arg(long, default_value = "1gbe")]
    link: String,
    /// Do not measure the links between workers when they join (plan as if every link
    /// were --link).
    #[arg(long)]
    no_link_probe: bool,
    /// Use this speed (bytes/s) for the local worker instead of measuring it.
    #[arg(long, hide = true)]
    local_speed: Option<f64>,
    /// Plan with the workers' stated speeds only, never their measured decode times (for
    /// tests whose plans must not depend on how busy the machine is).
    #[arg(long, hide = true)]
    no_calibrate: bool,
    #[command(flatten)]
    draft: super::generate::DraftArgs,
}

/// The hybrid route from `serve`'s flags.
fn upstream_config(a: &ServeArgs) -> anyhow::Result<Option<strata_coordinator::UpstreamConfig>> {
    let overflow = a.overflow == "upstream";
    // An empty value (STRATA_UPSTREAM= in a unit file) means none, as for the API key.
    let Some(url) = a.upstream.clone().filter(|u| !u.is_empty()) else {
        if overflow {
            bail!("--overflow upstream needs --upstream URL (an OpenAI-compatible API to overflow to)");
        }
        return Ok(None);
    };
    Ok(Some(strata_coordinator::UpstreamConfig {
        url,
        key: a
            .upstream_key
            .clone()
            .filter(|k| !k.is_empty())
            .map(strata_coordinator::Secret::new),
        overflow,
        overflow_model: a.overflow_model.clone(),
    }))
}

/// The planner's knobs from `serve`'s flags.
fn serve_plan_options(a: &ServeArgs, dtype: strata_model::WireType) -> anyhow::Result<PlanOptions> {
    Ok(PlanOptions {
        kv_tokens: a.kv_tokens,
        objective: objective(&a.objective)?,
        link: planner::Link::parse(&a.link).with_context(|| {
            format!(
                "--link {}: use 1gbe, 10gbe, wifi, tb4, loopback, or a rate such as 2.5gbit",
                a.link
            )
        })?,
        wire_bytes: dtype.element_bytes() as u64,
        ..PlanOptions::default()
    })
}

/// The token is the cluster's secret: shown once, to the terminal that created the
/// cluster, and never to a log (a service's stdout is its journal).
fn announce_token(ca: &ClusterCa, created: bool, state_dir: &std::path::Path) {
    use std::io::IsTerminal;
    if created {
        println!("created a new cluster in {}", state_dir.display());
    }
    if created && std::io::stdout().is_terminal() {
        let token = ca.token().to_text();
        println!("join token (keep it secret; it is not shown again): {token}");
        println!("  on each machine: strata worker --token {token}");
    } else {
        println!(
            "workers join with the cluster's token: `strata token create --state-dir {}` prints it",
            state_dir.display()
        );
    }
}

pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let state_dir = a.state_dir.clone().unwrap_or_else(default_state_dir);
    let (ca, created) = ClusterCa::load_or_create(&state_dir)
        .with_context(|| format!("opening the cluster state in {}", state_dir.display()))?;
    announce_token(&ca, created, &state_dir);
    let dtype = strata_model::WireType::parse(&a.wire_dtype)
        .with_context(|| format!("--wire-dtype {}: use f32, f16 or bf16", a.wire_dtype))?;
    let mut config = CoordinatorConfig::new(a.model.clone(), state_dir);
    // An empty key (STRATA_API_KEY= in a config file) means none, not the empty string.
    config.api_key = a.api_key.clone().filter(|k| !k.is_empty());
    config.open_metrics = a.open_metrics;
    config.min_workers = a.min_workers;
    config.mdns = !a.no_mdns;
    config.data_port = a.data_port;
    config.wire_dtype = dtype;
    config.recover_wait = a.recover_wait;
    config.measure_links = !a.no_link_probe;
    config.calibrate = !a.no_calibrate;
    config.max_queue = a.max_queue;
    config.prefill_chunk = a.prefill_chunk as usize;
    config.client_timeout = a.client_timeout;
    config.draft = a.draft.cluster_source()?;
    config.draft_policy = a.draft.policy();
    config.upstream = upstream_config(&a)?;
    config.private_only = a.private_only;
    if a.cert_lifetime < std::time::Duration::from_secs(2)
        || a.cert_lifetime > std::time::Duration::from_secs(3650 * 24 * 3600)
    {
        bail!(
            "--cert-lifetime {}: use between 2s and 3650days (default 24h)",
            humantime::format_duration(a.cert_lifetime)
        );
    }
    config.cert_lifetime = a.cert_lifetime;
    config.plan = serve_plan_options(&a, dtype)?;
    let local_memory = match &a.local_memory {
        Some(m) => Some(
            parse_size(m).with_context(|| format!("--local-memory {m}: use sizes like 12GiB"))?,
        ),
        None => None,
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on {addr} (gRPC: strata.v1.Inference, strata.v1.Cluster)");
        let shutdown = shutdown_on_signal();
        if a.local_worker {
            let mut w = WorkerConfig::new(ca.token().clone());
            let reach = if addr.ip().is_unspecified() {
                "127.0.0.1".parse()?
            } else {
                addr.ip()
            };
            w.coordinator = Some(SocketAddr::new(reach, addr.port()).to_string());
            w.id = Some("local".into());
            w.mdns = false;
            w.bind = reach;
            w.memory_budget = local_memory;
            w.speed = a.local_speed;
            let cancel = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = strata_worker::run(w, cancel).await {
                    tracing::error!(cause = %e, "the local worker stopped");
                }
            });
        }
        let http = if a.no_http {
            None
        } else {
            let l = tokio::net::TcpListener::bind(a.http)
                .await
                .with_context(|| format!("binding {} (or pass --no-http)", a.http))?;
            println!(
                "http on {} (OpenAI-compatible: /v1/chat/completions, /v1/completions, /v1/models; Ollama's: /api/chat, /api/generate, /api/tags)",
                l.local_addr()?
            );
            Some(l)
        };
        strata_coordinator::run(config, listener, http, shutdown).await?;
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The cluster's join token (`strata token create` on the coordinator's machine).
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true)]
    token: String,
    /// Join this coordinator (host:port of its API) directly, where multicast is blocked.
    #[arg(long)]
    coordinator: Option<String>,
    /// This worker's name (default: the host name).
    #[arg(long)]
    id: Option<String>,
    /// Memory it accepts for weights and caches, e.g. 12GiB (default: 75% of available).
    #[arg(long)]
    memory: Option<String>,
    /// Where layers run: auto, cpu, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// TCP port of the control service (0: any).
    #[arg(long, default_value_t = 0)]
    control_port: u16,
    /// UDP port of the data plane (0: any).
    #[arg(long, default_value_t = 0)]
    data_port: u16,
    /// Where received slices are kept on disk, by model digest, so nothing is sent twice
    /// (default: $XDG_CACHE_HOME/strata/slices-<id>, or ~/.cache/...).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// How long a worker cut off from its coordinator keeps its slice in memory (e.g. 10s,
    /// 1m); back within it, the slice serves again at once. Its bytes stay in the cache.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
    /// Do not announce over mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Threads this worker's forwards compute on (llama.cpp's --threads); default one per
    /// core. Fewer where several workers share a machine, or for a small model, whose
    /// matmuls gain less from more threads than waking them costs.
    #[arg(long)]
    threads: Option<usize>,
    /// Use this speed (bytes/s) instead of measuring it.
    #[arg(long, hide = true)]
    speed: Option<f64>,
    /// Where the RAPL energy counters are (for a recorded tree in tests).
    #[arg(
        long,
        hide = true,
        env = "STRATA_POWERCAP_ROOT",
        default_value = "/sys/class/powercap"
    )]
    powercap_root: PathBuf,
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    if let Some(threads) = a.threads {
        ensure!(threads >= 1, "--threads must be at least 1");
        strata_model::set_compute_threads(threads);
    }
    let token = JoinToken::parse(&a.token)?;
    let mut w = WorkerConfig::new(token);
    w.coordinator = a.coordinator;
    w.id = a.id;
    w.memory_budget = match &a.memory {
        Some(m) => Some(
            parse_size(m)
                .with_context(|| format!("--memory {m}: use sizes like 12GiB or 512MiB"))?,
        ),
        None => None,
    };
    w.device = a.device;
    w.bind = a.bind;
    w.control_port = a.control_port;
    w.data_port = a.data_port;
    w.cache_dir = a.cache_dir;
    w.grace = a.grace;
    w.powercap_root = a.powercap_root.clone();
    w.mdns = !a.no_mdns;
    w.speed = a.speed;
    let rt = runtime()?;
    rt.block_on(async move {
        let shutdown = shutdown_on_signal();
        strata_worker::run(w, shutdown).await?;
        Ok(())
    })
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create the cluster's secret (if there is none) and print its join token.
    Create {
        /// Where the cluster's CA and secret live.
        #[arg(long, env = "STRATA_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print the operator credential: it lets `strata cluster drain/remove` change the
    /// cluster from another machine (it cannot join a worker).
    Operator {
        /// Where the cluster's CA and secret live.
        #[arg(long, env = "STRATA_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
}

pub fn token(c: TokenCommand) -> anyhow::Result<()> {
    match c {
        TokenCommand::Create { state_dir } => {
            let dir = state_dir.unwrap_or_else(default_state_dir);
            let (ca, created) = ClusterCa::load_or_create(&dir)?;
            if created {
                eprintln!("created a new cluster in {}", dir.display());
            } else {
                eprintln!("the cluster in {} exists; its token is:", dir.display());
            }
            println!("{}", ca.token().to_text());
            Ok(())
        }
        TokenCommand::Operator { state_dir } => {
            let dir = state_dir.unwrap_or_else(default_state_dir);
            let ca = ClusterCa::load(&dir)?.with_context(|| {
                format!(
                    "there is no cluster in {}: run this on the coordinator's machine, as its user (or pass its --state-dir)",
                    dir.display()
                )
            })?;
            eprintln!(
                "operator credential of cluster {} (keep it secret: it can drain and remove workers):",
                ca.token().cluster_id()
            );
            println!("{}", ca.token().operator_key().to_text());
            Ok(())
        }
    }
}

/// Who may change the cluster: the operator credential, given or read from the
/// coordinator's state directory.
#[derive(Debug, Args)]
pub struct Credentials {
    /// The operator credential (`strata token operator` prints it on the coordinator's
    /// machine). Without it, the credential comes from the state directory.
    #[arg(long, env = "STRATA_OPERATOR_KEY", hide_env_values = true)]
    operator_key: Option<String>,
    /// The coordinator's state directory, when this is its machine.
    #[arg(long, env = "STRATA_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl Credentials {
    /// The operator key, if there is one to be had. None means the call goes unsigned
    /// and the coordinator says what it needs.
    fn key(&self) -> anyhow::Result<Option<OperatorKey>> {
        if let Some(text) = self.operator_key.as_deref().filter(|k| !k.is_empty()) {
            return Ok(Some(OperatorKey::parse(text)?));
        }
        let dir = self.state_dir.clone().unwrap_or_else(default_state_dir);
        let ca = ClusterCa::load(&dir)
            .with_context(|| format!("reading the operator credential from {}", dir.display()))?;
        Ok(ca.map(|ca| ca.token().operator_key()))
    }

    /// `call` signed now, as a request's metadata value.
    fn sign(&self, call: &Call<'_>) -> anyhow::Result<Option<tonic::metadata::AsciiMetadataValue>> {
        let Some(key) = self.key()? else {
            return Ok(None);
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_millis() as u64;
        let header = key.sign(call, now_ms)?.to_header();
        Ok(Some(header.parse().context("a signature is ASCII")?))
    }
}

/// `request` with the operator's signature of `call`, when there is a credential.
fn signed<T>(
    request: T,
    call: &Call<'_>,
    credentials: &Credentials,
) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(request);
    if let Some(sig) = credentials.sign(call)? {
        request.metadata_mut().insert(operator::HEADER, sig);
    }
    Ok(request)
}

/// Adds the bearer key to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    let url = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Channel::from_shared(url.clone())?
        .connect()
        .await
        .with_context(|| {
            format!("connecting to the coordinator at {addr} (is `strata serve` running?)")
        })
}

fn bearer(key: Option<&str>) -> anyhow::Result<Bearer> {
    Ok(Bearer(match key.filter(|k| !k.is_empty()) {
        Some(k) => Some(
            format!("Bearer {k}")
                .parse()
                .context("the API key has characters a header cannot hold")?,
        ),
        None => None,
    }))
}

/// A client of the coordinator's Cluster service.
pub async fn cluster_client(
    addr: &str,
    key: Option<&str>,
) -> anyhow::Result<ClusterClient<InterceptedService<Channel, Bearer>>> {
    Ok(ClusterClient::with_interceptor(
        channel(addr).await?,
        bearer(key)?,
    ))
}

/// A client of the coordinator's Inference service.
pub async fn inference_client(
    addr: &str,
    key: Option<&str>,
) -> anyhow::Result<InferenceClient<InterceptedService<Channel, Bearer>>> {
    Ok(
        InferenceClient::with_interceptor(channel(addr).await?, bearer(key)?)
            .max_decoding_message_size(64 << 20),
    )
}

#[derive(Debug, Args)]
pub struct Remote {
    /// The coordinator's API address.
    #[arg(long, env = "STRATA_COORDINATOR", default_value = DEFAULT_API)]
    coordinator: String,
    /// API key, when the coordinator requires one.
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Workers, stages, layers, memory, load progress and health.
    Status {
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The plan the coordinator would make now, or a plan on paper with --worker.
    Plan(PlanArgs),
    /// Join a coordinator from this machine (a worker that skips mDNS).
    Join(WorkerArgs),
    /// Stop giving a worker new work, re-plan without it, release it when its sequences end.
    /// Needs the operator credential (the state directory, or --operator-key).
    Drain {
        /// The worker's id.
        worker: String,
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        credentials: Credentials,
    },
    /// Drop a worker at once (its sequences fail; the cluster re-plans). Needs the
    /// operator credential (the state directory, or --operator-key).
    Remove {
        /// The worker's id.
        worker: String,
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        credentials: Credentials,
    },
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Workers on paper: `name:MEMORY:BANDWIDTH`, e.g. `mac-studio:64GiB:400GB/s`.
    #[arg(long = "worker")]
    workers: Vec<String>,
    /// A model not on disk: `preset:quant`, e.g. `llama-3.1-70b:q4_k_m`.
    #[arg(long)]
    model_spec: Option<String>,
    /// A model on disk, for a plan on paper.
    #[arg(long)]
    model: Option<PathBuf>,
    /// KV-cache positions reserved per layer on each stage.
    #[arg(long, default_value_t = 4096)]
    kv_tokens: u64,
    /// A draft model on paper that the last stage holds (`strata serve --draft-on
    /// worker`), as a preset and a quantization, e.g. `llama-3.2-1b:q8_0`.
    #[arg(long, conflicts_with = "draft_model")]
    draft_model_spec: Option<String>,
    /// A draft model on disk that the last stage holds, for a plan on paper.
    #[arg(long)]
    draft_model: Option<PathBuf>,
    /// What to minimise: `latency` (time per token of one stream) or `throughput` (the
    /// slowest stage, for many concurrent streams).
    #[arg(long, default_value = "latency")]
    objective: String,
    /// The links, on paper: one for every pair (`1gbe`, `10gbe`, `wifi`, `tb4`,
    /// `loopback`, or a rate such as `100mbit` or `2.5gbit/0.2ms`), and a pair's own as
    /// `A:B=LINK`, e.g. `--link 10gbe --link mac-mini:linux-3090=wifi`. Repeatable.
    #[arg(long = "link", default_value = "1gbe")]
    links: Vec<String>,
    /// Activations' wire type: f32, f16 or bf16 (the bytes a hop carries).
    #[arg(long, default_value = "f32")]
    wire_dtype: String,
    /// Ask this coordinator (used when no --worker is given).
    #[arg(long, env = "STRATA_COORDINATOR", default_value = DEFAULT_API)]
    coordinator: String,
    /// API key, when the coordinator requires one.
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The profile of a model named by a spec (a preset and a quantization) or a path, if
/// either is given.
fn paper_profile(
    spec: Option<&str>,
    path: Option<&std::path::Path>,
) -> anyhow::Result<Option<planner::ModelProfile>> {
    Ok(match (spec, path) {
        (Some(spec), _) => Some(profile::of_spec(spec)?),
        (None, Some(path)) => {
            let file = strata_model::ModelFile::open(path)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Some(profile::of_file(&name, &file))
        }
        (None, None) => None,
    })
}

/// Applies `--link` values: one link for every pair, and pairs' own (`A:B=LINK`).
fn paper_links(
    values: &[String],
    workers: &[planner::Candidate],
    options: &mut PlanOptions,
) -> anyhow::Result<()> {
    let parse = |text: &str| {
        planner::Link::parse(text).with_context(|| {
            format!(
                "--link {text}: use 1gbe, 10gbe, wifi, tb4, loopback, or a rate such as 100mbit or 2.5gbit/0.2ms"
            )
        })
    };
    for value in values {
        match value.split_once('=') {
            Some((pair, link)) => {
                let (a, b) = pair.split_once(':').with_context(|| {
                    format!(
                        "--link {value}: a pair's link is A:B=LINK, e.g. mac-mini:linux-3090=wifi"
                    )
                })?;
                for id in [a, b] {
                    if !workers.iter().any(|w| w.id == id) {
                        bail!("--link {value}: no --worker is named `{id}`");
                    }
                }
                options.set_link(a, b, parse(link)?);
            }
            None => options.link = parse(value)?,
        }
    }
    Ok(())
}

/// Parses `--objective`.
fn objective(name: &str) -> anyhow::Result<planner::Objective> {
    planner::Objective::parse(name)
        .with_context(|| format!("--objective {name}: use latency or throughput"))
}

/// Parses `name:64GiB:400GB/s`.
pub fn paper_worker(spec: &str) -> anyhow::Result<Candidate> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [name, mem, bw] = parts.as_slice() else {
        bail!("--worker {spec}: expected NAME:MEMORY:BANDWIDTH, e.g. mac-studio:64GiB:400GB/s");
    };
    let budget = parse_size(mem)
        .with_context(|| format!("--worker {spec}: memory `{mem}` is not a size like 64GiB"))?;
    let bw_bytes = parse_size(bw.trim_end_matches("/s"))
        .with_context(|| format!("--worker {spec}: bandwidth `{bw}` is not a rate like 400GB/s"))?;
    Ok(Candidate {
        id: name.to_string(),
        budget,
        speed: bw_bytes as f64 * PAPER_EFFICIENCY,
        held: None,
    })
}

fn print_links(links: &[strata_proto::v1::LinkStatus]) {
    if links.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<33} {:>12} {:>14} {:>10}",
        "link (measured over the data plane)", "latency", "bandwidth", "age"
    );
    for l in links {
        println!(
            "{:<33} {:>9.2} ms {:>9.0} Mb/s {:>9.0}s",
            format!("{} – {}", l.a, l.b),
            l.latency_ms,
            l.bandwidth_bytes_per_second * 8.0 / 1e6,
            l.age_seconds
        );
    }
}

fn print_plan(p: &PlanResponse) {
    if p.stages.is_empty() {
        println!("{}", p.shortfall);
        return;
    }
    println!("plan for {}:", p.model);
    // Beside each estimate, once the stage's decode steps were measured.
    let measured = p.stages.iter().any(|s| s.measured_ms_per_token > 0.0);
    println!(
        "{:<6} {:<20} {:<10} {:>24} {:>14}{}",
        "stage",
        "worker",
        "layers",
        "memory used / budget",
        "est ms/token",
        if measured { "   measured ms" } else { "" }
    );
    for (i, s) in p.stages.iter().enumerate() {
        let mut layers = format!("{}..{}", s.layer_start, s.layer_end);
        if s.embed {
            layers.push_str(" +emb");
        }
        if s.head {
            layers.push_str(" +head");
        }
        let measured_ms = match (measured, s.measured_ms_per_token) {
            (false, _) => String::new(),
            (true, ms) if ms > 0.0 => format!(" {ms:>13.1}"),
            (true, _) => format!(" {:>13}", "-"),
        };
        println!(
            "{:<6} {:<20} {:<10} {:>24} {:>14.1}{measured_ms}",
            i,
            s.worker_id,
            layers,
            format!(
                "{} / {}",
                human_bytes(s.memory_bytes),
                human_bytes(s.budget_bytes)
            ),
            s.est_ms_per_token
        );
    }
    println!(
        "estimated {:.1} ms/token for one stream ({:.1} tokens/s); {:.1} ms/token when the pipeline is kept busy",
        p.est_ms_per_token,
        1e3 / p.est_ms_per_token.max(1e-9),
        p.est_ms_per_token_pipelined
    );
    if p.calibrated_ms_per_token > 0.0 {
        println!(
            "calibrated: {:.1} ms/token for one stream with the stages' measured times",
            p.calibrated_ms_per_token
        );
    }
    for note in p.shortfall.split("; ").filter(|n| !n.is_empty()) {
        println!("{note}");
    }
}

fn plan_json(p: &PlanResponse) -> serde_json::Value {
    let notes: Vec<String> = if p.stages.is_empty() {
        Vec::new()
    } else {
        let notes = p.shortfall.split("; ").filter(|n| !n.is_empty());
        notes.map(str::to_string).collect()
    };
    serde_json::json!({
        "model": p.model,
        "epoch": p.epoch,
        "fits": !p.stages.is_empty(),
        "missing_bytes": p.missing_bytes,
        "shortfall": if p.stages.is_empty() { p.shortfall.clone() } else { String::new() },
        "left_out": notes,
        // Every note: who is left out and why, slow links, where the draft model is.
        "notes": notes,
        "est_ms_per_token": p.est_ms_per_token,
        "est_ms_per_token_pipelined": p.est_ms_per_token_pipelined,
        "calibrated_ms_per_token": p.calibrated_ms_per_token,
        "stages": p.stages.iter().map(|s| serde_json::json!({
            "worker": s.worker_id, "layers": [s.layer_start, s.layer_end], "embed": s.embed, "head": s.head,
            "memory_bytes": s.memory_bytes, "budget_bytes": s.budget_bytes, "est_ms_per_token": s.est_ms_per_token,
            "measured_ms_per_token": s.measured_ms_per_token,
        })).collect::<Vec<_>>(),
    })
}

pub fn cluster(c: ClusterCommand) -> anyhow::Result<()> {
    if let ClusterCommand::Join(a) = c {
        if a.coordinator.is_none() {
            bail!("`strata cluster join` needs --coordinator HOST:PORT (or run `strata worker` to find it over mDNS)");
        }
        return worker(a);
    }
    let rt = runtime()?;
    rt.block_on(async move {
        match c {
            ClusterCommand::Status { remote, json } => status(remote, json).await,
            ClusterCommand::Plan(a) => plan(a).await,
            ClusterCommand::Drain {
                worker,
                remote,
                credentials,
            } => {
                let call = Call {
                    action: "drain",
                    target: &worker,
                };
                let request = signed(
                    DrainRequest {
                        worker_id: worker.clone(),
                    },
                    &call,
                    &credentials,
                )?;
                let mut client =
                    cluster_client(&remote.coordinator, remote.api_key.as_deref()).await?;
                let r = client.drain(request).await.map_err(refused)?.into_inner();
                println!("{}", r.detail);
                Ok(())
            }
            ClusterCommand::Remove {
                worker,
                remote,
                credentials,
            } => {
                let call = Call {
                    action: "remove",
                    target: &worker,
                };
                let request = signed(
                    RemoveRequest {
                        worker_id: worker.clone(),
                    },
                    &call,
                    &credentials,
                )?;
                let mut client =
                    cluster_client(&remote.coordinator, remote.api_key.as_deref()).await?;
                let r = client.remove(request).await.map_err(refused)?.into_inner();
                println!("{}", r.detail);
                Ok(())
            }
            ClusterCommand::Join(_) => Ok(()),
        }
    })
}

/// A refused call as the coordinator explained it (not tonic's debug form).
fn refused(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            anyhow::anyhow!("the coordinator refused: {}", status.message())
        }
        _ => status.into(),
    }
}

/// `strata cluster status`: the cluster's model, workers, links and plan.
async fn status(remote: Remote, json: bool) -> anyhow::Result<()> {
    let mut client = cluster_client(&remote.coordinator, remote.api_key.as_deref()).await?;
    let s = client.status(StatusRequest {}).await?.into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
    } else {
        print_status(&s);
    }
    Ok(())
}

/// `cluster status --json`.
fn status_json(s: &strata_proto::v1::StatusResponse) -> serde_json::Value {
    let workers: Vec<_> = s
        .workers
        .iter()
        .map(|w| {
            let info = w.info.clone().unwrap_or_default();
            serde_json::json!({
                "id": info.id, "state": state_name(w.state), "address": w.address, "stage": w.stage,
                "data_port": info.data_port,
                "layers": [w.layer_start, w.layer_end], "memory_budget": info.memory_budget,
                "speed_bytes_per_second": info.speed_bytes_per_second,
                "resident_bytes": w.resident_bytes, "peak_resident_bytes": w.peak_resident_bytes,
                "load_bytes_done": w.load_bytes_done, "load_bytes_total": w.load_bytes_total,
                "last_seen_ms": w.last_seen_ms, "sequences": w.sequences, "detail": w.detail,
                "bytes_received": w.bytes_received, "energy_meter": info.energy_meter,
                "draft_model": w.holds_draft_model,
            })
        })
        .collect();
    serde_json::json!({
        "cluster_id": s.cluster_id,
        "model": s.model.as_ref().map(|m| &m.id),
        "drafts": s.model.as_ref().map(|m| &m.drafts),
        "serving": s.serving,
        "detail": s.detail,
        "active_sequences": s.active_sequences,
        "workers": workers,
        "links": s.links.iter().map(|l| serde_json::json!({
            "a": l.a, "b": l.b, "latency_ms": l.latency_ms,
            "bandwidth_bytes_per_second": l.bandwidth_bytes_per_second,
            "age_seconds": l.age_seconds,
        })).collect::<Vec<_>>(),
        "plan": s.plan.as_ref().map(plan_json),
    })
}

/// `cluster status` for people.
fn print_status(s: &strata_proto::v1::StatusResponse) {
    let m = s.model.clone().unwrap_or_default();
    println!(
        "cluster {}: {} ({}, {} layers, {}) — {}{}",
        s.cluster_id,
        m.id,
        m.architecture,
        m.layers,
        human_bytes(m.weight_bytes),
        if s.serving { "serving" } else { "not serving" },
        if s.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", s.detail)
        }
    );
    if !m.drafts.is_empty() {
        let holders: Vec<String> = s
            .workers
            .iter()
            .filter(|w| w.holds_draft_model)
            .filter_map(|w| w.info.as_ref().map(|i| i.id.clone()))
            .collect();
        let held = match holders.is_empty() {
            true => String::new(),
            false => format!(" (held by {})", holders.join(", ")),
        };
        println!("drafts: {}{held}", m.drafts);
    }
    println!("active sequences: {}", s.active_sequences);
    println!(
        "{:<16} {:<10} {:<22} {:>5} {:>9} {:>22} {:>14} {:>8}  detail",
        "worker", "state", "address", "stage", "layers", "rss / peak / budget", "load", "seen"
    );
    for w in &s.workers {
        let info = w.info.clone().unwrap_or_default();
        let load = if w.load_bytes_total > 0 {
            format!(
                "{:.0}% of {}",
                100.0 * w.load_bytes_done as f64 / w.load_bytes_total as f64,
                human_bytes(w.load_bytes_total)
            )
        } else {
            "-".into()
        };
        println!(
            "{:<16} {:<10} {:<22} {:>5} {:>9} {:>22} {:>14} {:>8}  {}",
            info.id,
            state_name(w.state),
            w.address,
            if w.stage < 0 {
                "-".into()
            } else {
                w.stage.to_string()
            },
            if w.layer_end > 0 {
                format!("{}..{}", w.layer_start, w.layer_end)
            } else {
                "-".into()
            },
            format!(
                "{} / {} / {}",
                human_bytes(w.resident_bytes),
                human_bytes(w.peak_resident_bytes),
                human_bytes(info.memory_budget)
            ),
            load,
            format!("{:.1}s", w.last_seen_ms as f64 / 1e3),
            w.detail
        );
    }
    for w in &s.workers {
        let info = w.info.clone().unwrap_or_default();
        if !info.energy_meter.is_empty() {
            println!("energy on {}: {}", info.id, info.energy_meter);
        }
    }
    print_links(&s.links);
    if let Some(p) = &s.plan {
        println!();
        print_plan(p);
    }
}

async fn plan(a: PlanArgs) -> anyhow::Result<()> {
    if a.workers.is_empty() && (a.draft_model.is_some() || a.draft_model_spec.is_some()) {
        bail!(
            "--draft-model and --draft-model-spec price a draft model on paper, with --worker; \
             a coordinator plans with the draft model it serves"
        );
    }
    let response = if a.workers.is_empty() {
        let mut client = cluster_client(&a.coordinator, a.api_key.as_deref()).await?;
        client
            .plan(PlanRequest {
                workers: Vec::new(),
                model_spec: a.model_spec.clone().unwrap_or_default(),
            })
            .await?
            .into_inner()
    } else {
        // On paper: no coordinator needed.
        let workers = a
            .workers
            .iter()
            .map(|w| paper_worker(w))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let Some(profile) = paper_profile(a.model_spec.as_deref(), a.model.as_deref())? else {
            bail!("a plan on paper needs --model-spec (e.g. llama-3.1-70b:q4_k_m) or --model PATH")
        };
        let mut options = PlanOptions {
            kv_tokens: a.kv_tokens,
            objective: objective(&a.objective)?,
            wire_bytes: strata_model::WireType::parse(&a.wire_dtype)
                .with_context(|| format!("--wire-dtype {}: use f32, f16 or bf16", a.wire_dtype))?
                .element_bytes() as u64,
            ..PlanOptions::default()
        };
        paper_links(&a.links, &workers, &mut options)?;
        let draft = paper_profile(a.draft_model_spec.as_deref(), a.draft_model.as_deref())?;
        if let Some(draft) = draft {
            options.draft = profile::draft_bytes(&draft, options.kv_tokens);
        }
        strata_coordinator::api::plan_response(
            &profile.name,
            planner::plan(&profile, &workers, &options),
            0,
        )
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan_json(&response))?);
    } else {
        print_plan(&response);
    }
    if response.stages.is_empty() {
        std::process::exit(2);
    }
    Ok(())
}
