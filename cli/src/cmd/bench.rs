//! `strata bench`: prefill and decode speed of a model in this process, peak memory, and
//! decode speed as a fraction of this machine's memory-bandwidth roofline (decoding one
//! token streams every weight once, so bandwidth / weight bytes bounds tokens per second).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use rand::{Rng, SeedableRng};
use strata_model::{GenerateRequest, LocalPipeline, ModelFile, Role};
use strata_net::progress::Progress;

use super::{human_bytes, peak_rss_bytes};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The model: a .gguf file or a safetensors directory.
    #[arg(long, required_unless_present = "coordinator")]
    model: Option<PathBuf>,
    /// Measure a running cluster through its gRPC API instead: aggregate tokens/s of
    /// `--concurrency` simultaneous clients against one client, in the same run.
    #[arg(long, conflicts_with = "model")]
    coordinator: Option<String>,
    /// API key, when the coordinator requires one.
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens each sequence decodes in the decode measurement.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Concurrent sequences to measure decode at.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Split the model into this many in-process stages.
    #[arg(long, default_value_t = 1)]
    stages: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Copy bandwidth of this machine in bytes/s (bytes read plus bytes written), best of a few
/// copies of a buffer far larger than the caches.
pub fn copy_bandwidth() -> f64 {
    const BYTES: usize = 256 * 1024 * 1024;
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * BYTES as f64 / best
}

fn random_prompt(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    // Stay clear of the top of the vocabulary, where special tokens usually live.
    let usable = (vocab.saturating_sub(256)).max(1) as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..usable)).collect()
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(addr) = a.coordinator.clone() {
        return run_remote(&a, &addr);
    }
    let bandwidth = copy_bandwidth();
    let t0 = Instant::now();
    let model = a.model.clone().context("--model is required")?;
    let file = ModelFile::open(&model)?;
    let config = file.config().clone();
    let loading = Progress::spinner(format!("loading {}", model.display()));
    let mut pipeline = LocalPipeline::load(&file, a.stages, &Device::Cpu)
        .with_context(|| format!("loading {}", model.display()))?;
    loading.finish("loaded");
    let load_s = t0.elapsed().as_secs_f64();
    let weight_bytes: u64 = pipeline.stages().map(|s| s.weight_bytes()).sum();
    // Decode reads every layer (of a mixture of experts, the experts' share one token
    // runs through), the final norm and the head once per step (the embedding only one
    // row); a tied head is the embedding.
    let head_bytes = match file.role_bytes(Role::LmHead) {
        0 => file.role_bytes(Role::Embed),
        bytes => bytes,
    };
    let bytes_per_token = (0..config.num_layers)
        .map(|l| file.active_layer_bytes(l))
        .sum::<u64>()
        + file.role_bytes(Role::FinalNorm)
        + head_bytes;
    let roofline_tps = bandwidth / bytes_per_token as f64;

    // Warm up (first-touch allocation, thread pools).
    pipeline.generate(
        &GenerateRequest {
            stop_at_eos: false,
            ..GenerateRequest::greedy(random_prompt(8, config.vocab_size, 1), 2)
        },
        |_| {},
    )?;

    let prompt = random_prompt(a.prompt_tokens, config.vocab_size, 2);
    let prefill = pipeline
        .generate(
            &GenerateRequest {
                stop_at_eos: false,
                ..GenerateRequest::greedy(prompt, 1)
            },
            |_| {},
        )?
        .prefill;
    let prefill_tps = a.prompt_tokens as f64 / prefill.as_secs_f64();

    let mut decode = Vec::new();
    for &c in &a.concurrency {
        let requests: Vec<GenerateRequest> = (0..c)
            .map(|i| GenerateRequest {
                stop_at_eos: false,
                ..GenerateRequest::greedy(
                    random_prompt(16, config.vocab_size, 10 + i as u64),
                    a.decode_tokens,
                )
            })
            .collect();
        let results = pipeline.generate_batch(&requests, |_, _| {})?;
        let wall = results
            .iter()
            .map(|r| r.decode)
            .max()
            .unwrap_or(Duration::ZERO);
        let tokens: usize = results
            .iter()
            .map(|r| r.tokens.len().saturating_sub(1))
            .sum();
        decode.push((c, tokens as f64 / wall.as_secs_f64().max(1e-9)));
    }
    let peak = peak_rss_bytes().unwrap_or(0);
    let single = decode.iter().find(|(c, _)| *c == 1).map(|d| d.1);

    if a.json {
        let json = serde_json::json!({
            "model": a.model,
            "arch": config.arch.name(),
            "layers": config.num_layers,
            "stages": a.stages,
            "threads": cpu_threads(),
            "kernels": kernels_name(),
            "weight_bytes": weight_bytes,
            "weight_bytes_per_token": bytes_per_token,
            "load_s": load_s,
            "prefill_tokens": a.prompt_tokens,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode.iter().map(|(c, t)| serde_json::json!({"concurrency": c, "tokens_per_s": t})).collect::<Vec<_>>(),
            "peak_rss_bytes": peak,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "roofline_tokens_per_s": roofline_tps,
            "roofline_fraction": single.map(|s| s / roofline_tps),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!("model                 {}", model.display());
    println!(
        "shape                 {} x {} layers, hidden {}, vocab {}",
        config.arch.name(),
        config.num_layers,
        config.hidden_size,
        config.vocab_size
    );
    println!(
        "weights               {} ({} read per decoded token)",
        human_bytes(weight_bytes),
        human_bytes(bytes_per_token)
    );
    println!("threads               {}", cpu_threads());
    println!("kernels               {}", kernels_name());
    println!("load                  {load_s:.2} s");
    println!(
        "prefill               {prefill_tps:.1} tokens/s ({} tokens)",
        a.prompt_tokens
    );
    for (c, tps) in &decode {
        println!(
            "decode x{c:<3}           {tps:.1} tokens/s aggregate ({:.1} per sequence)",
            tps / *c as f64
        );
    }
    println!("peak resident memory  {}", human_bytes(peak));
    println!("copy bandwidth        {:.1} GB/s", bandwidth / 1e9);
    println!("roofline (decode x1)  {roofline_tps:.1} tokens/s");
    if let Some(s) = single {
        println!("fraction of roofline  {:.2}", s / roofline_tps);
    }
    Ok(())
}

/// Which of our CPU kernels run quantized matmuls here (`candle` when none do).
fn kernels_name() -> &'static str {
    strata_model::kernels::isa().map_or("candle", |isa| isa.name())
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One client's stream: tokens received, time to the first, and when it ended.
struct ClientRun {
    tokens: usize,
    first: Duration,
    done: Duration,
}

/// `strata bench --coordinator`: for each concurrency, that many clients each stream a
/// generation of `--decode-tokens` (past EOS) from a `--prompt-tokens` prompt at once.
fn run_remote(a: &BenchArgs, addr: &str) -> anyhow::Result<()> {
    use strata_proto::v1::GenerateRequest as Req;
    let rt = super::cluster::runtime()?;
    rt.block_on(async {
        let mut rows = Vec::new();
        for &clients in &a.concurrency {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let mut client = super::cluster::inference_client(addr, a.api_key.as_deref()).await?;
                let req = Req {
                    prompt_ids: random_prompt(a.prompt_tokens, 512, 100 + c as u64),
                    max_tokens: a.decode_tokens as u32,
                    ignore_eos: true,
                    ..Default::default()
                };
                tasks.push(tokio::spawn(async move {
                    let mut stream = client.generate(req).await?.into_inner();
                    let mut run = ClientRun { tokens: 0, first: Duration::ZERO, done: Duration::ZERO };
                    while let Some(m) = stream.message().await? {
                        if run.tokens == 0 {
                            run.first = start.elapsed();
                        }
                        run.tokens += m.token_ids.len();
                    }
                    run.done = start.elapsed();
                    Ok::<_, anyhow::Error>(run)
                }));
            }
            let mut runs = Vec::new();
            for t in tasks {
                runs.push(t.await??);
            }
            let wall = runs.iter().map(|r| r.done).max().unwrap_or_default().as_secs_f64();
            let tokens: usize = runs.iter().map(|r| r.tokens).sum();
            // Decode throughput: tokens after each stream's first, over the span in which
            // streams were decoding (from the earliest first token to the last end).
            let first = runs.iter().map(|r| r.first).min().unwrap_or_default().as_secs_f64();
            let decoded: usize = runs.iter().map(|r| r.tokens.saturating_sub(1)).sum();
            let complete = runs.iter().all(|r| r.tokens == a.decode_tokens);
            rows.push(serde_json::json!({
                "clients": clients,
                "tokens": tokens,
                "complete_streams": complete,
                "wall_s": wall,
                "aggregate_tokens_per_s": tokens as f64 / wall.max(1e-9),
                "decode_tokens_per_s": decoded as f64 / (wall - first).max(1e-9),
                "mean_time_to_first_token_ms": runs.iter().map(|r| r.first.as_secs_f64()).sum::<f64>() * 1e3 / runs.len().max(1) as f64,
            }));
        }
        let base = rows.first().and_then(|r| r["aggregate_tokens_per_s"].as_f64()).unwrap_or(1.0);
        if a.json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"coordinator": addr, "runs": rows}))?);
        } else {
            println!("{:>8} {:>8} {:>10} {:>18} {:>16} {:>10} {:>9}", "clients", "tokens", "wall s", "aggregate tok/s", "decode tok/s", "ttft ms", "vs first");
            for r in &rows {
                let agg = r["aggregate_tokens_per_s"].as_f64().unwrap_or(0.0);
                println!(
                    "{:>8} {:>8} {:>10.2} {:>18.1} {:>16.1} {:>10.0} {:>8.2}x{}",
                    r["clients"], r["tokens"], r["wall_s"].as_f64().unwrap_or(0.0), agg,
                    r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
                    r["mean_time_to_first_token_ms"].as_f64().unwrap_or(0.0),
                    agg / base.max(1e-9),
                    if r["complete_streams"].as_bool() == Some(true) { "" } else { "  (incomplete streams!)" }
                );
            }
        }
        Ok(())
    })
}
