//! `strata demo`: the README's first command.
//!
//! Until the bundled demo model that talks exists, it shows the best real thing Strata
//! does: it writes a seeded synthetic Llama model in GGUF (Q8_0, tokenizer inside), starts
//! a real cluster on loopback in this process — a coordinator with its own certificate
//! authority and `--workers` workers that join with the token, receive only their slices,
//! and pass activations to each other over mutual-TLS QUIC — generates through the public
//! gRPC API, and checks the tokens against the unsplit model run in one piece.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use candle_core::Device;
use clap::Args;
use strata_coordinator::CoordinatorConfig;
use strata_model::synth::{self, SynthDType, SynthFormat, SynthOptions, SynthSpec};
use strata_model::{Arch, GenerateRequest, LocalPipeline, ModelFile, Tokenizer};
use strata_proto::v1::{GenerateRequest as ApiRequest, StatusRequest, WireDType};
use strata_worker::identity::ClusterCa;
use strata_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

use super::human_bytes;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Workers to start (each holds one stage).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("demo-synthetic.gguf");
    let spec = SynthSpec {
        layers: 6,
        hidden: 256,
        heads: 8,
        kv_heads: 2,
        intermediate: 768,
        vocab: 4096,
        seed: 7,
        ..SynthSpec::tiny(Arch::Llama)
    };
    let t0 = Instant::now();
    let report = synth::write_model(
        &spec,
        &SynthOptions {
            format: SynthFormat::Gguf,
            dtype: SynthDType::Quant(candle_core::quantized::GgmlDType::Q8_0),
            shard_bytes: None,
        },
        &path,
    )?;
    println!(
        "Strata demo: a real cluster on this machine (the talking demo model comes later).\n\
         Wrote a synthetic Llama model ({} layers, Q8_0 GGUF, {}) in {:.1}s.",
        spec.layers,
        human_bytes(report.tensor_bytes),
        t0.elapsed().as_secs_f64()
    );
    let file = ModelFile::open(&path)?;
    let tokenizer = Tokenizer::for_model(&file)?;
    let prompt = "the cluster of machines in the house";
    let ids = tokenizer.encode(prompt, true)?;
    let request = GenerateRequest {
        stop_at_eos: false,
        ..GenerateRequest::greedy(ids.clone(), a.max_tokens)
    };
    let reference = LocalPipeline::load(&file, 1, &Device::Cpu)?.generate(&request, |_| {})?;

    let state = dir.path().join("state");
    let (ca, _) = ClusterCa::load_or_create(&state)?;
    let token = ca.token().clone();
    let rt = super::cluster::runtime()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api: SocketAddr = listener.local_addr()?;
        let mut config = CoordinatorConfig::new(path.clone(), state);
        config.mdns = false;
        config.min_workers = a.workers;
        // Exact activations on the wire, so the check below is token for token.
        config.wire_dtype = WireDType::F32;
        config.plan.kv_tokens = 1024;
        let coordinator = tokio::spawn(strata_coordinator::run(config, listener, None, shutdown.clone()));
        println!("\nCoordinator on {api}; cluster {}.", token.cluster_id());
        let mut cluster = super::cluster::cluster_client(&api.to_string(), None).await?;
        // One at a time: each measures its speed with the machine to itself.
        let mut workers = Vec::new();
        for i in 0..a.workers {
            let mut w = WorkerConfig::new(token.clone());
            w.id = Some(format!("worker-{}", i + 1));
            w.coordinator = Some(api.to_string());
            w.mdns = false;
            w.bind = "127.0.0.1".parse()?;
            workers.push(tokio::spawn(strata_worker::run(w, shutdown.clone())));
            let deadline = Instant::now() + Duration::from_secs(60);
            while cluster.status(StatusRequest {}).await?.into_inner().workers.len() <= i {
                ensure!(Instant::now() < deadline, "worker-{} did not join", i + 1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            let s = cluster.status(StatusRequest {}).await?.into_inner();
            if s.serving {
                break s;
            }
            ensure!(Instant::now() < deadline, "the demo cluster did not start: {}", s.detail);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!(
            "{} workers joined with the token, got certificates from the cluster CA, and measured their speed.\n",
            a.workers
        );
        if let Some(plan) = &status.plan {
            println!("Plan (each worker received only its slice's bytes):");
            for (i, s) in plan.stages.iter().enumerate() {
                println!(
                    "  stage {i}: {:<9} layers {:>2}..{:<2} {:>10}{}{}",
                    s.worker_id,
                    s.layer_start,
                    s.layer_end,
                    human_bytes(s.memory_bytes),
                    if s.embed { "  + embedding" } else { "" },
                    if s.head { "  + norm, head, sampler" } else { "" }
                );
            }
        }
        let mut client = super::cluster::inference_client(&api.to_string(), None).await?;
        let started = Instant::now();
        let mut stream = client
            .generate(ApiRequest {
                prompt_ids: ids.clone(),
                max_tokens: a.max_tokens as u32,
                ignore_eos: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut tokens = Vec::new();
        let mut usage = None;
        while let Some(m) = stream.message().await? {
            tokens.extend(m.token_ids);
            if m.usage.is_some() {
                usage = m.usage;
            }
        }
        let usage = usage.unwrap_or_default();
        let text = tokenizer.decode(&tokens, true)?;
        println!("\nprompt: {prompt:?} ({} tokens)", ids.len());
        println!("tokens: {tokens:?}");
        println!("text:   {text:?}  (random weights: the words are noise, the arithmetic is real)");
        println!(
            "speed:  first token after {:.0} ms, then {:.1} tokens/s through {} workers over QUIC ({:.2}s in all)",
            usage.time_to_first_token_ms,
            usage.decode_tokens_per_second,
            a.workers,
            started.elapsed().as_secs_f64()
        );
        shutdown.cancel();
        let _ = coordinator.await;
        for w in workers {
            let _ = w.await;
        }
        ensure!(
            tokens == reference.tokens,
            "the cluster diverged from the unsplit model: {tokens:?} vs {:?}",
            reference.tokens
        );
        println!("check:  the cluster generates exactly the tokens of the model run in one piece");
        Ok(())
    })
}
