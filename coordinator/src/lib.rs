//! `strata-coordinator`: the node clients talk to. It owns:
//!
//! - `membership`: admission by join token (over TLS, each join answering a fresh
//!   `challenge`), certificates, heartbeats (a worker that
//!   stops answering, or whose compute thread stalls, has failed), mDNS browsing;
//! - [`planner`] (pure) and [`profile`]: which worker holds which layers;
//! - `reconcile`: when to re-plan, and how (make before break); `slices`: getting a plan
//!   onto its workers (only the bytes their caches lack) and wiring it; `links`: measuring
//!   the links between workers when they join;
//! - [`sequence`]: the sequence core, a sans-IO state machine that owns an answer's
//!   history and turns events into actions; `session` is its shell (a task per answer,
//!   the batcher to stage 0, the dispatcher from the last stage);
//! - `serving`: the one [`ServingState`](serving::ServingState) that says whether the
//!   cluster serves; `shared`: what every task shares, behind methods;
//! - `digest`: the served model's content digest, which workers key their slice caches by;
//! - [`api`]: the public gRPC services (`Inference`, `Cluster`, health, reflection);
//! - `http`: the OpenAI-compatible HTTP API, `/metrics` and the dashboard at `/`;
//!   `ollama`: Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`, ...) on the same
//!   port, for the tools written against Ollama;
//! - `routing` (pure) and `upstream`: the hybrid route, which sends `upstream/<name>`
//!   requests, and with `--overflow upstream` those the cluster would refuse, to an
//!   OpenAI-compatible API elsewhere, and keeps private requests on the LAN;
//! - `metrics`: the Prometheus metrics and the recent-requests list;
//! - `operator`: the guard that lets only signed cluster changes (drain, remove) through.
//!
//! Model math never enters here: it tokenizes and renders chat templates, and the
//! workers do the rest.
//!
//! Dependencies, and why: `tonic` (+ `tonic-health`, `tonic-reflection`: the standard
//! services generic gRPC clients expect), `mdns-sd` (browsing and announcing), `quinn`
//! via `strata-net`'s transport, `axum` (the HTTP API), `prometheus` (see `metrics`), `sha2` (the
//! model's content digest), `subtle` (comparing API keys in constant time), `humantime`
//! (the RFC 3339 dates of Ollama's replies), `reqwest` (the upstream's client: HTTPS with
//! the system's roots and streamed bodies, on the hyper and rustls already in the tree).
//!
//! Choices where the design was silent:
//! - workers join the coordinator (found by mDNS or named with `--coordinator`); the
//!   coordinator also browses mDNS and lists workers it saw but that never joined;
//! - `--min-workers` holds back only the first plan; after that every change of
//!   membership (join, drain, remove) re-plans once membership has been quiet for 1.5 s,
//!   and a lost stage re-plans at once. A planned change (join, drain) is made before the
//!   old plan breaks: its bytes go into the workers' caches while the old plan serves,
//!   then the answers in flight move over by replay. When a stage is lost, the answers in
//!   flight wait (`--recover-wait`, default 60 s) for the next plan and replay their
//!   history there: the client sees a pause and the tokens it would have had;
//! - a worker's slice is streamed from the coordinator's copy of the model (only the
//!   bytes of its tensors), so weights live on one machine;
//! - default wire type F32, so the split never changes the answer and a resumed answer
//!   equals its undisturbed twin; `--wire-dtype f16|bf16` halves the bytes for slow links
//!   and may change a token where two are nearly tied.

mod admission;
pub mod api;
mod challenge;
mod digest;
pub mod error;
mod http;
mod links;
mod membership;
mod metrics;
mod ollama;
mod operator;
pub mod planner;
pub mod profile;
mod reconcile;
pub mod registry;
mod routing;
pub mod sequence;
mod serving;
mod session;
mod shared;
mod slices;
mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strata_model::{ChatTemplate, Drafter, ModelFile, NgramDrafter, Tokenizer, WireType};
use strata_net::identity::{ClusterCa, COORDINATOR_NAME};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

pub use error::{Error, Result};
#[doc(hidden)]
pub use http::check_request_body;
use planner::{DraftBytes, ModelProfile, PlanOptions};
pub use sequence::DraftPolicy;
use shared::{Parts, Shared};
pub use upstream::{Secret, UpstreamConfig};

/// How the coordinator runs. Built by the CLI.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The model to serve (GGUF file or safetensors directory).
    pub model: PathBuf,
    /// Where the cluster CA and secret live (created on first start).
    pub state_dir: PathBuf,
    /// UDP port of the coordinator's QUIC endpoint (default 0: any).
    pub data_port: u16,
    /// Address to bind the data endpoint on (default 0.0.0.0).
    pub bind: IpAddr,
    /// Require `authorization: Bearer <key>` on the public API (default: none).
    pub api_key: Option<String>,
    /// Serve `/metrics` without the API key (default false: with a key, it needs it).
    pub open_metrics: bool,
    /// Workers to wait for before the first plan (default 1).
    pub min_workers: usize,
    /// Announce over mDNS and browse for workers (default true).
    pub mdns: bool,
    /// Activations' wire type (default F32: exact, so the split never changes the answer).
    pub wire_dtype: WireType,
    /// Planner knobs.
    pub plan: PlanOptions,
    /// Membership must be quiet this long before a re-plan (default 1.5 s).
    pub settle: Duration,
    /// How long an answer whose pipeline lost a stage waits for a plan that can take it
    /// over before it fails (default 60 s).
    pub recover_wait: Duration,
    /// Measure the links between workers when they join, and plan with them (default
    /// true).
    pub measure_links: bool,
    /// Plan with the workers' measured decode times once they have them (default true);
    /// off, plans use their stated speeds only, whatever else the machine is doing.
    pub calibrate: bool,
    /// Most positions one step of a prompt carries: longer prompts go in pieces, between
    /// which other answers' steps run (default 256).
    pub prefill_chunk: usize,
    /// Requests that may wait for room in the KV cache; past them a request is refused
    /// with 429 and a time to retry (default 64).
    pub max_queue: usize,
    /// How long a streaming client may leave a token unread before its answer is cancelled
    /// and its caches freed (default 30 s).
    pub client_timeout: Duration,
    /// How long the certificates the CA issues (the workers', the coordinator's own) are
    /// valid; members' are renewed at half of it (default 24 h).
    pub cert_lifetime: Duration,
    /// Speculative decoding: where drafts come from (default none).
    pub draft: Draft,
    /// How many drafts a step carries.
    pub draft_policy: DraftPolicy,
    /// The hybrid route's upstream OpenAI-compatible API (default none).
    pub upstream: Option<UpstreamConfig>,
    /// Every request is private: none is sent upstream (default false).
    pub private_only: bool,
}

/// Where speculative decoding's drafts come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Draft {
    /// No drafts: one token per pass.
    None,
    /// Prompt lookup: what followed the history's last tokens earlier in it.
    Ngram,
    /// A small model with the main model's tokenizer, run on the coordinator.
    Model(PathBuf),
    /// A small model with the main model's tokenizer, run by the last stage's worker: the
    /// planner counts it there, it travels to that worker as a load, and each step asks it
    /// for the next step's drafts, which come back with the step's tokens.
    ModelOnLastStage(PathBuf),
}

/// A served model's drafts: ready to hand each answer a drafter of its own, or a draft
/// model to send the last stage.
#[derive(Debug)]
pub enum DraftSource {
    /// Prompt lookup.
    Ngram,
    /// A loaded draft model (shared, read-only; each drafter keeps its own cache).
    Model {
        /// Its file name.
        name: String,
        /// The whole model, as one stage.
        model: strata_model::draft::DraftModel,
    },
    /// A draft model the last stage's worker holds and drafts with.
    OnLastStage(Box<ShippedDraft>),
}

/// A draft model that the coordinator sends the last stage's worker, rather than loads.
#[derive(Debug)]
pub struct ShippedDraft {
    /// Its file name.
    name: String,
    /// SHA-256 of its bytes: what the worker's cache keys it by.
    pub(crate) digest: String,
    /// The open file (no weights loaded), to read its bytes from.
    pub(crate) file: ModelFile,
    /// How many of its token ids the served model shares.
    pub(crate) shared_vocabulary: usize,
    /// What it costs the last stage.
    pub(crate) bytes: DraftBytes,
}

impl ShippedDraft {
    /// Opens the draft model at `path` for the last stage (its digest remembered in
    /// `state_dir`), after checking that its tokenizer is the served model's; counts
    /// what it will cost there with caches for `kv_tokens` positions.
    fn open(
        path: &std::path::Path,
        tokenizer: &Tokenizer,
        state_dir: &std::path::Path,
        kv_tokens: u64,
    ) -> Result<Self> {
        let file = ModelFile::open(path)?;
        let draft_tokenizer = Tokenizer::for_model(&file)?;
        strata_model::draft::check_vocabularies(tokenizer, &draft_tokenizer)?;
        let name = path
            .file_name()
            .map_or_else(|| "draft".into(), |n| n.to_string_lossy().into_owned());
        let bytes = profile::draft_bytes(&profile::of_file(&name, &file), kv_tokens);
        Ok(ShippedDraft {
            digest: digest::of_model(path, state_dir)?,
            shared_vocabulary: tokenizer.vocab_size().min(draft_tokenizer.vocab_size()),
            name,
            file,
            bytes,
        })
    }
}

impl DraftSource {
    /// Loads what `draft` names, checking a draft model's tokenizer against `tokenizer`
    /// (one for the last stage is opened, not loaded, and priced with `config`'s caches).
    pub fn open(
        draft: &Draft,
        tokenizer: &Tokenizer,
        config: &CoordinatorConfig,
    ) -> Result<Option<Self>> {
        Ok(match draft {
            Draft::None => None,
            Draft::Ngram => Some(DraftSource::Ngram),
            Draft::Model(path) => {
                let model = strata_model::draft::load_draft_model(path, tokenizer)?;
                let name = path
                    .file_name()
                    .map_or_else(|| "draft".into(), |n| n.to_string_lossy().into_owned());
                Some(DraftSource::Model { name, model })
            }
            Draft::ModelOnLastStage(path) => {
                let draft =
                    ShippedDraft::open(path, tokenizer, &config.state_dir, config.plan.kv_tokens)?;
                Some(DraftSource::OnLastStage(Box::new(draft)))
            }
        })
    }

    /// A drafter for one answer, which samples with `sampling`; None where the last stage
    /// drafts.
    pub fn drafter(&self, sampling: &strata_model::SamplingParams) -> Option<Box<dyn Drafter>> {
        match self {
            DraftSource::Ngram => Some(Box::new(NgramDrafter::new())),
            DraftSource::Model { model, .. } => Some(Box::new(
                model
                    .drafter()
                    .with_repeat_penalty(sampling.repeat_penalty, sampling.repeat_window),
            )),
            DraftSource::OnLastStage(_) => None,
        }
    }

    /// What it is, for logs and the dashboard.
    pub fn describe(&self) -> String {
        match self {
            DraftSource::Ngram => "ngram (prompt lookup)".into(),
            DraftSource::Model { name, .. } => format!("draft model {name}"),
            DraftSource::OnLastStage(d) => {
                format!("draft model {}, on the last stage's worker", d.name)
            }
        }
    }
}

impl CoordinatorConfig {
    /// Defaults for serving `model`.
    pub fn new(model: PathBuf, state_dir: PathBuf) -> Self {
        CoordinatorConfig {
            model,
            state_dir,
            data_port: 0,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            api_key: None,
            open_metrics: false,
            min_workers: 1,
            mdns: true,
            wire_dtype: WireType::F32,
            plan: PlanOptions::default(),
            settle: Duration::from_millis(1500),
            recover_wait: Duration::from_secs(60),
            measure_links: true,
            calibrate: true,
            prefill_chunk: 256,
            max_queue: 64,
            client_timeout: Duration::from_secs(30),
            cert_lifetime: strata_net::identity::CERT_LIFETIME,
            draft: Draft::None,
            draft_policy: DraftPolicy::default(),
            upstream: None,
            private_only: false,
        }
    }
}

/// The served model.
pub struct ServedModel {
    /// Its name (file or directory name).
    pub name: String,
    /// SHA-256 of its bytes: what workers key their slice caches by.
    pub digest: String,
    /// The open model (the coordinator reads slices from it; it loads no weights).
    pub file: ModelFile,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, when it has one.
    pub chat: Option<ChatTemplate>,
    /// Sizes for the planner.
    pub profile: ModelProfile,
    /// Drafts for speculative decoding, when configured.
    pub draft: Option<DraftSource>,
}

impl ServedModel {
    /// Opens the model's directory, tokenizer and template (no weights); its content
    /// digest is remembered in `state_dir`.
    pub fn open(path: &std::path::Path, state_dir: &std::path::Path) -> Result<Self> {
        let file = ModelFile::open(path)?;
        let tokenizer = Tokenizer::for_model(&file)?;
        let chat = match tokenizer.chat_template() {
            Some(src) => Some(ChatTemplate::new(src)?),
            None => None,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let digest = digest::of_model(path, state_dir)?;
        let profile = profile::of_file(&name, &file);
        Ok(ServedModel {
            name,
            digest,
            file,
            tokenizer,
            chat,
            profile,
            draft: None,
        })
    }
}

/// Announces the coordinator over mDNS (its API port and this cluster's id); `None`,
/// with a warning, where it cannot.
fn announce(shared: &Shared, api_addr: SocketAddr) -> Option<strata_net::discovery::Announcement> {
    let txt: HashMap<String, String> = [
        ("role", "coordinator".to_string()),
        ("cluster", shared.ca().token().cluster_id().to_string()),
        ("proto", strata_proto::PROTOCOL_VERSION.to_string()),
        ("v", env!("CARGO_PKG_VERSION").to_string()),
        ("model", shared.model().name.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let ip = (!api_addr.ip().is_unspecified()).then_some(api_addr.ip());
    let instance = format!("strata-coordinator-{}", shared.ca().token().cluster_id());
    match strata_net::discovery::announce(&instance, api_addr.port(), txt, ip) {
        Ok(a) => Some(a),
        Err(e) => {
            warn!(cause = %e, "could not announce over mDNS; workers must join with --coordinator");
            None
        }
    }
}

/// Opens the drafts `config` names for `model`; a draft model for the last stage is priced
/// into the plans.
fn open_drafts(
    mut config: CoordinatorConfig,
    model: &mut ServedModel,
) -> Result<CoordinatorConfig> {
    model.draft = DraftSource::open(&config.draft, &model.tokenizer, &config)?;
    if let Some(draft) = &model.draft {
        info!(drafts = %draft.describe(), "speculative decoding");
    }
    if let Some(DraftSource::OnLastStage(d)) = &model.draft {
        config.plan.draft = d.bytes;
    }
    Ok(config)
}

/// 32 random bytes from the operating system.
fn random_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| Error::Unavailable(format!("the system has no randomness to give: {e}")))?;
    Ok(seed)
}

/// The hybrid route's upstream API, when `config` names one.
fn open_upstream(config: &CoordinatorConfig) -> Result<Option<upstream::Upstream>> {
    let Some(u) = &config.upstream else {
        return Ok(None);
    };
    let upstream = upstream::Upstream::new(u.clone())?;
    info!(
        upstream = %upstream.describe(),
        overflow = u.overflow,
        private_only = config.private_only,
        "hybrid route: `upstream/<model>` requests{} go to the upstream",
        if u.overflow { ", and those the cluster would refuse," } else { "" }
    );
    Ok(Some(upstream))
}

/// Runs a coordinator on `listener` (the public gRPC API), and on `http` (the
/// OpenAI-compatible API) when given, until `shutdown`.
pub async fn run(
    config: CoordinatorConfig,
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<()> {
    let (ca, created) = ClusterCa::load_or_create(&config.state_dir)?;
    let mut model = ServedModel::open(&config.model, &config.state_dir)?;
    let config = open_drafts(config, &mut model)?;
    if created {
        // The token is never logged: `strata token create` prints it to a terminal.
        info!(
            dir = %config.state_dir.display(),
            "created a new cluster; `strata token create --state-dir` prints its join token"
        );
    }
    let identity = ca.issue_identity(COORDINATOR_NAME, config.cert_lifetime)?;
    let socket = std::net::UdpSocket::bind(SocketAddr::new(config.bind, config.data_port))?;
    let data_port = socket.local_addr()?.port();
    let endpoint = strata_net::transport::endpoint(socket, &identity)?;
    let api_addr = listener.local_addr()?;
    let upstream = open_upstream(&config)?;
    let (outbox, outbox_rx) = tokio::sync::mpsc::channel(session::OUTBOX_QUEUE);
    let shared = Arc::new(Shared::new(Parts {
        config,
        model,
        ca,
        identity,
        endpoint: endpoint.clone(),
        data_port,
        outbox,
        cancel: shutdown.clone(),
        challenge_seed: random_seed()?,
        upstream,
    }));
    let tracker = TaskTracker::new();
    let (frames_tx, frames_rx) = tokio::sync::mpsc::channel(session::TOKEN_QUEUE);
    let gate: strata_net::transport::Gate = {
        let shared = shared.clone();
        Arc::new(move |from, frame| shared.takes_frame(from, frame))
    };
    strata_net::transport::spawn_acceptor(
        endpoint.clone(),
        frames_tx,
        shutdown.clone(),
        "coordinator",
        gate,
    );
    tracker.spawn(
        session::dispatch(shared.clone(), frames_rx).instrument(tracing::info_span!("dispatch")),
    );
    tracker.spawn(
        session::batcher(shared.clone(), outbox_rx).instrument(tracing::info_span!("batcher")),
    );
    tracker.spawn(
        membership::heartbeats(shared.clone()).instrument(tracing::info_span!("heartbeats")),
    );
    tracker.spawn(reconcile::run(shared.clone()).instrument(tracing::info_span!("reconcile")));
    tracker.spawn(membership::renewals(shared.clone()).instrument(tracing::info_span!("renewals")));
    tracker.spawn(links::run(shared.clone()).instrument(tracing::info_span!("links")));
    let _announcement = if shared.config().mdns {
        tracker.spawn(membership::browse(shared.clone()).instrument(tracing::info_span!("mdns")));
        announce(&shared, api_addr)
    } else {
        None
    };
    info!(
        api = %api_addr,
        data_port,
        cluster = %shared.ca().token().cluster_id(),
        model = %shared.model().name,
        "coordinator listening"
    );
    if let Some(http_listener) = http {
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = http::serve(shared, http_listener, shutdown).await {
                warn!(cause = %e, "the HTTP API stopped");
            }
        });
    }
    let served = api::serve(shared.clone(), listener, shutdown.clone()).await;
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    endpoint.wait_idle().await;
    served
}
