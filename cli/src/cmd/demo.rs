//! `strata demo`: the README's first command. It serves the bundled demo model (a small
//! Llama trained on the King James Bible, compiled into the binary; see
//! `models/demo/README.md`) on a real cluster on this machine:
//!
//! - a coordinator with its own certificate authority, serving gRPC and the OpenAI-compatible
//!   HTTP API (with the dashboard at `/`);
//! - three workers (tasks of this process, each a full worker: its own certificate, control
//!   service and QUIC endpoint) that find the coordinator over mDNS on loopback, or by
//!   address when multicast does not answer here;
//! - the plan it made, the addresses, a curl line, and one answer streamed through the
//!   pipeline; then it serves until Ctrl-C (`--once` exits after the answer).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use strata_coordinator::CoordinatorConfig;
use strata_model::SamplingParams;
use strata_net::identity::ClusterCa;
use strata_proto::v1::{ChatMessage, ChatRequest, StatusRequest, WorkerState};
use strata_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

use super::human_bytes;

/// The demo model, compiled in so that `strata demo` needs nothing else.
const DEMO_MODEL: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/demo/strata-demo-q8_0.gguf"
));
/// The demo model's draft for speculative decoding: a 2-layer model with the same
/// tokenizer, trained on the same text by the same script (`tests/demo_model/train.py
/// --draft`), compiled in as well.
const DEMO_DRAFT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/demo/strata-demo-draft-q8_0.gguf"
));
/// How long workers look for the coordinator over mDNS before the demo joins them by address.
const MDNS_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Workers to start (each holds one stage).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// What to ask the model.
    #[arg(
        long,
        default_value = "In the beginning God created the heaven and the earth."
    )]
    prompt: String,
    /// Most tokens in the answer.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0 is greedy; a model this small loops when greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The gRPC API's address (another free port is used if this one is taken).
    #[arg(long, default_value = "127.0.0.1:7433")]
    listen: SocketAddr,
    /// The HTTP API's address (another free port is used if this one is taken).
    #[arg(long, default_value = "127.0.0.1:7434")]
    http: SocketAddr,
    /// Join workers by address instead of mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Serve another model instead of the bundled one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Exit after the answer instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Serve the bundled model without its draft model (one token per pass).
    #[arg(long)]
    no_draft: bool,
    /// Threads the workers' forwards compute on (one pool, shared by the demo's workers).
    /// Default: one for the bundled model, one per core for --model. The bundled model is
    /// 256 wide: its matmuls take microseconds, and a second thread for each costs more
    /// to wake than it saves (on a 2-core VM its drafted decode ran 9% faster on one),
    /// where a free core drafts and carries the network.
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    draft: super::generate::DraftArgs,
}

/// Binds `want`, or any free port on its address when it is taken.
async fn bind(want: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(want).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let l = tokio::net::TcpListener::bind(SocketAddr::new(want.ip(), 0)).await?;
            println!(
                "({what} port {} is taken, probably by another Strata; using {})",
                want.port(),
                l.local_addr()?.port()
            );
            Ok(l)
        }
        Err(e) => Err(e).with_context(|| format!("listening on {want}")),
    }
}

/// The workers' compute threads: `--threads`, or one for the bundled model.
fn set_compute_threads(a: &DemoArgs) -> anyhow::Result<()> {
    let threads = match (a.threads, &a.model) {
        (Some(threads), _) => threads,
        (None, None) => 1,
        (None, Some(_)) => return Ok(()),
    };
    ensure!(threads >= 1, "--threads must be at least 1");
    strata_model::set_compute_threads(threads);
    Ok(())
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = match &a.model {
        Some(p) => p.clone(),
        None => {
            let p = dir.path().join("strata-demo.gguf");
            std::fs::write(&p, DEMO_MODEL).context("writing the demo model")?;
            p
        }
    };
    set_compute_threads(&a)?;
    let file = strata_model::ModelFile::open(&path)?;
    let c = file.config();
    println!(
        "Strata demo: a real {}-worker cluster on this machine.",
        a.workers
    );
    if a.model.is_none() {
        println!(
            "Model: strata-demo, a {}-layer Llama trained on the King James Bible ({} Q8_0 GGUF, built in; models/demo/README.md).",
            c.num_layers,
            human_bytes(DEMO_MODEL.len() as u64)
        );
    } else {
        println!("Model: {} ({} layers).", path.display(), c.num_layers);
    }
    drop(file);
    // Drafts: what the flags name; else, for the bundled model, its bundled draft.
    let mut draft = a.draft.source();
    if draft == strata_coordinator::Draft::None && a.model.is_none() && !a.no_draft {
        let p = dir.path().join("strata-demo-draft.gguf");
        std::fs::write(&p, DEMO_DRAFT).context("writing the demo's draft model")?;
        println!(
            "Draft: strata-demo-draft, a 2-layer model with the same tokenizer ({}, built in): \
             each step verifies its guesses (--no-draft to compare).",
            human_bytes(DEMO_DRAFT.len() as u64)
        );
        draft = a.draft.model_at(p);
    }
    let state = dir.path().join("state");
    let (ca, _) = ClusterCa::load_or_create(&state)?;
    let token = ca.token().clone();
    let rt = super::cluster::runtime()?;
    rt.block_on(async move {
        let shutdown = super::cluster::shutdown_on_signal();
        let listener = bind(a.listen, "gRPC").await?;
        let http = bind(a.http, "HTTP").await?;
        let api = listener.local_addr()?;
        let http_addr = http.local_addr()?;
        let mut config = CoordinatorConfig::new(path.clone(), state);
        config.mdns = !a.no_mdns;
        config.bind = api.ip();
        config.min_workers = a.workers;
        config.plan.kv_tokens = 512;
        config.draft = draft;
        config.draft_policy = a.draft.policy();
        // The demo shows a pipeline: every worker takes a share. (For one stream the
        // default objective would rightly keep this small model on one worker.)
        config.plan.objective = strata_coordinator::planner::Objective::Throughput;
        let coordinator = tokio::spawn(strata_coordinator::run(
            config,
            listener,
            Some(http),
            shutdown.clone(),
        ));
        let mut cluster = super::cluster::cluster_client(&api.to_string(), None).await?;
        let joined = |cluster: &mut strata_proto::v1::cluster_client::ClusterClient<_>| {
            let mut cluster = cluster.clone();
            async move {
                anyhow::Ok(
                    cluster
                        .status(StatusRequest {})
                        .await?
                        .into_inner()
                        .workers
                        .iter()
                        .filter(|w| {
                            w.state != WorkerState::Discovered as i32
                                && w.state != WorkerState::Refused as i32
                        })
                        .count(),
                )
            }
        };
        // The workers share this machine: one measurement of its speed stands for all
        // three (measured one by one, they would differ only by the noise between runs,
        // which could leave one without a share of the plan).
        let speed = tokio::task::spawn_blocking(|| {
            strata_worker::speed::measure(&candle_core::Device::Cpu)
        })
        .await
        .context("measuring this machine's speed")?
        .context("measuring this machine's speed")?;
        let start_worker = |i: usize, by_mdns: bool, cancel: CancellationToken| {
            let mut w = WorkerConfig::new(token.clone());
            w.speed = Some(speed);
            w.id = Some(format!("worker-{}", i + 1));
            w.mdns = by_mdns;
            if !by_mdns {
                w.coordinator = Some(api.to_string());
            }
            w.bind = api.ip();
            tokio::spawn(strata_worker::run(w, cancel))
        };
        // The first worker tells whether multicast works here.
        let mut by_mdns = !a.no_mdns;
        let mut workers = Vec::new();
        let started = Instant::now();
        if by_mdns {
            let first = shutdown.child_token();
            let handle = start_worker(0, true, first.clone());
            while joined(&mut cluster).await? == 0 && started.elapsed() < MDNS_WAIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if joined(&mut cluster).await? == 0 {
                first.cancel();
                let _ = handle.await;
                by_mdns = false;
                println!(
                    "Workers did not find the coordinator over mDNS within {}s (no multicast here?); joining them by address.",
                    MDNS_WAIT.as_secs()
                );
            } else {
                workers.push(handle);
            }
        }
        // One at a time, so each has joined before the next starts.
        for i in workers.len()..a.workers {
            workers.push(start_worker(i, by_mdns, shutdown.clone()));
            let deadline = Instant::now() + Duration::from_secs(60);
            while joined(&mut cluster).await? <= i {
                ensure!(Instant::now() < deadline, "worker-{} did not join", i + 1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            let s = cluster.status(StatusRequest {}).await?.into_inner();
            if s.serving {
                break s;
            }
            ensure!(Instant::now() < deadline, "the demo cluster did not start: {}", s.detail);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!(
            "{} workers {}, joined with the cluster's token and got certificates from its CA ({:.1}s).\n",
            a.workers,
            if by_mdns { "found the coordinator over mDNS on loopback" } else { "were given the coordinator's address" },
            started.elapsed().as_secs_f64()
        );
        if let Some(plan) = &status.plan {
            println!("Plan (each worker received only its slice's bytes, over mutual TLS):");
            for (i, s) in plan.stages.iter().enumerate() {
                println!(
                    "  stage {i}: {:<9} layers {}..{} {:>10}{}{}",
                    s.worker_id,
                    s.layer_start,
                    s.layer_end,
                    human_bytes(s.memory_bytes),
                    if s.embed { "  + embedding" } else { "" },
                    if s.head { "  + norm, head, sampler" } else { "" }
                );
            }
        }
        let model_id = status.model.as_ref().map(|m| m.id.clone()).unwrap_or_default();
        println!("\nServing:");
        println!("  gRPC       {api}   (strata chat --coordinator {api})");
        println!("  HTTP       http://{http_addr}/v1   (OpenAI-compatible)");
        println!("  Ollama     http://{http_addr}/api   (Ollama's API: chat, generate, tags, show, ps)");
        println!("  dashboard  http://{http_addr}/");
        println!("  metrics    http://{http_addr}/metrics");
        println!("\nTry:");
        println!(
            "  curl http://{http_addr}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"The LORD is my shepherd; I shall not want.\"}}], \"max_tokens\": 48}}'"
        );

        println!("\n> {}", a.prompt);
        let sampling = SamplingParams {
            temperature: a.temperature,
            top_p: 0.9,
            repeat_penalty: 1.1,
            seed: a.seed,
            ..SamplingParams::default()
        };
        let mut client = super::cluster::inference_client(&api.to_string(), None).await?;
        let mut stream = client
            .chat(ChatRequest {
                messages: vec![ChatMessage { role: "user".into(), content: a.prompt.clone() }],
                max_tokens: a.max_tokens as u32,
                sampling: Some(strata_net::frame::wire_sampling(&sampling)),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut usage = None;
        let mut stdout = std::io::stdout();
        while let Some(m) = stream.message().await? {
            write!(stdout, "{}", m.text)?;
            stdout.flush()?;
            if m.usage.is_some() {
                usage = m.usage;
            }
        }
        let usage = usage.unwrap_or_default();
        let drafts = if usage.draft_tokens > 0 {
            format!(
                "; {:.0}% of drafts accepted, {:.1} tokens per pass",
                100.0 * f64::from(usage.accepted_draft_tokens) / f64::from(usage.draft_tokens),
                f64::from(usage.completion_tokens) / f64::from(usage.passes.max(1))
            )
        } else {
            String::new()
        };
        println!(
            "\n\n[{} prompt tokens; first token after {:.0} ms, then {:.1} tokens/s through {} workers over QUIC{drafts}]",
            usage.prompt_tokens,
            usage.time_to_first_token_ms,
            usage.decode_tokens_per_second,
            a.workers
        );
        if a.once {
            shutdown.cancel();
        } else {
            println!("\nServing until Ctrl-C. Open http://{http_addr}/ for the dashboard and a chat box.");
        }
        let served = coordinator.await;
        shutdown.cancel();
        for w in workers {
            let _ = w.await;
        }
        match served {
            Ok(r) => r.context("the coordinator stopped")?,
            Err(e) => bail!("the coordinator task failed: {e}"),
        }
        println!("Stopped.");
        Ok(())
    })
}
