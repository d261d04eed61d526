//! `strata model synth` and `strata model inspect`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use strata_model::format::Format;
use strata_model::synth::{self, SynthDType, SynthFormat, SynthOptions, SynthSpec};
use strata_model::{Arch, ModelFile, Role, Slice, Stage, Tokenizer};

use std::fmt::Write as _;

use super::{emit, human_bytes, peak_rss_bytes};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a seeded random model in a real format (for tests and benchmarks).
    Synth(Box<SynthArgs>),
    /// Describe a model file: architecture, layers, bytes per layer, types, tokenizer.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct SynthArgs {
    /// Start from the shape of a known model (llama-3-8b, llama-3.2-1b, llama-3.1-70b,
    /// mistral-7b, qwen2.5-0.5b, qwen3-0.6b, mixtral-8x7b, qwen3-30b-a3b, ...); other
    /// flags override it.
    #[arg(long)]
    preset: Option<String>,
    /// Architecture: llama, mistral, qwen2, qwen3, mixtral, qwen3_moe.
    #[arg(long)]
    arch: Option<String>,
    /// Experts per layer (mixtral, qwen3_moe).
    #[arg(long)]
    experts: Option<usize>,
    /// Experts each token runs through.
    #[arg(long)]
    experts_used: Option<usize>,
    /// Width of one expert's inner layer.
    #[arg(long)]
    expert_intermediate: Option<usize>,
    /// Transformer layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden (residual) width.
    #[arg(long)]
    hidden: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value heads (GQA).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Head width (default hidden / heads).
    #[arg(long)]
    head_dim: Option<usize>,
    /// MLP width.
    #[arg(long)]
    intermediate: Option<usize>,
    /// Vocabulary size (>= 260).
    #[arg(long)]
    vocab: Option<usize>,
    /// Context length.
    #[arg(long)]
    context: Option<usize>,
    /// Rotary base frequency.
    #[arg(long)]
    rope_theta: Option<f64>,
    /// Rotary scaling: `llama3` or `none`.
    #[arg(long)]
    rope_scaling: Option<String>,
    /// Tie the LM head to the token embedding.
    #[arg(long)]
    tie_embeddings: bool,
    /// Seed of every weight.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output format: safetensors (a directory) or gguf (a file).
    #[arg(long, default_value = "safetensors")]
    format: String,
    /// Float type of the weights: f32, f16, bf16.
    #[arg(long)]
    dtype: Option<String>,
    /// Quantization (GGUF): q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k.
    #[arg(long)]
    quant: Option<String>,
    /// Split safetensors into shards of at most this many MiB.
    #[arg(long)]
    shard_mib: Option<u64>,
    /// Where to write: a directory for safetensors, a .gguf path for GGUF.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .gguf file, a safetensors model directory, or a .safetensors file.
    path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also load the layers `A..B` (as a stage would) and report the bytes read and this
    /// process's peak resident memory.
    #[arg(long, value_name = "A..B")]
    load_layers: Option<String>,
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Synth(args) => synth_cmd(*args),
        ModelCommand::Inspect(args) => inspect(args),
    }
}

fn synth_cmd(a: SynthArgs) -> anyhow::Result<()> {
    let mut spec = match &a.preset {
        Some(p) => SynthSpec::preset(p)?,
        None => {
            let arch = a.arch.as_deref().unwrap_or("llama");
            SynthSpec::tiny(Arch::parse(arch)?)
        }
    };
    if let Some(arch) = &a.arch {
        spec.arch = Arch::parse(arch)?;
    }
    macro_rules! set {
        ($($field:ident <- $arg:ident),*) => { $( if let Some(v) = a.$arg { spec.$field = v; } )* };
    }
    set!(layers <- layers, hidden <- hidden, heads <- heads, kv_heads <- kv_heads,
         intermediate <- intermediate, vocab <- vocab, context <- context, rope_theta <- rope_theta);
    if a.head_dim.is_some() {
        spec.head_dim = a.head_dim;
    }
    let asked_for_experts =
        a.experts.is_some() || a.experts_used.is_some() || a.expert_intermediate.is_some();
    if spec.arch.has_experts() {
        let mut e = spec
            .experts
            .or(SynthSpec::tiny(spec.arch).experts)
            .context("an architecture with experts has a default mixture")?;
        e.count = a.experts.unwrap_or(e.count);
        e.used = a.experts_used.unwrap_or(e.used);
        e.intermediate_size = a.expert_intermediate.unwrap_or(e.intermediate_size);
        spec.experts = Some(e);
    } else if asked_for_experts {
        bail!(
            "--experts, --experts-used and --expert-intermediate are for architectures with \
             experts (mixtral, qwen3_moe), not {}",
            spec.arch.name()
        );
    }
    if let Some(s) = &a.rope_scaling {
        spec.rope_llama3 = match s.as_str() {
            "llama3" => true,
            "none" => false,
            other => bail!("--rope-scaling {other}: expected `llama3` or `none`"),
        };
    }
    spec.tie_embeddings |= a.tie_embeddings;
    spec.seed = a.seed;
    let format = match a.format.as_str() {
        "safetensors" => SynthFormat::Safetensors,
        "gguf" => SynthFormat::Gguf,
        other => bail!("--format {other}: expected `safetensors` or `gguf`"),
    };
    let dtype = match (&a.quant, &a.dtype) {
        (Some(q), None) => SynthDType::parse(q)?,
        (None, Some(d)) => SynthDType::parse(d)?,
        (None, None) => SynthDType::F32,
        (Some(_), Some(_)) => bail!("give --dtype or --quant, not both"),
    };
    let options = SynthOptions {
        format,
        dtype,
        shard_bytes: a.shard_mib.map(|m| m * 1024 * 1024),
    };
    let started = std::time::Instant::now();
    let report = synth::write_model(&spec, &options, &a.out)
        .with_context(|| format!("writing a synthetic model to {}", a.out.display()))?;
    eprintln!(
        "wrote {} ({} tensors, {}) in {:.1}s",
        report.path.display(),
        report.tensors,
        human_bytes(report.tensor_bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let file = ModelFile::open(&a.path)?;
    if let Some(range) = &a.load_layers {
        return load_slice(&file, range, a.json);
    }
    let c = file.config();
    let mut types: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut total = 0u64;
    for (_, e) in file.entries() {
        let t = types.entry(e.storage.name()).or_default();
        t.0 += 1;
        t.1 += e.bytes();
        total += e.bytes();
    }
    let layer_bytes: Vec<u64> = (0..c.num_layers).map(|l| file.layer_bytes(l)).collect();
    let embed = file.role_bytes(Role::Embed);
    let head = file.role_bytes(Role::LmHead);
    let tokenizer = Tokenizer::for_model(&file);
    let format = match file.format() {
        Format::Gguf => "gguf",
        Format::Safetensors => "safetensors",
    };
    if a.json {
        let (tok_vocab, chat) = match &tokenizer {
            Ok(t) => (Some(t.vocab_size()), t.chat_template().is_some()),
            Err(_) => (None, false),
        };
        let json = serde_json::json!({
            "path": a.path,
            "format": format,
            "config": c,
            "tensor_bytes": total,
            "layer_bytes": layer_bytes,
            "embedding_bytes": embed,
            "head_bytes": head,
            "types": types.iter().map(|(k, (n, b))| (k.clone(), serde_json::json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "tokenizer_vocab": tok_vocab,
            "tokenizer_error": tokenizer.as_ref().err().map(|e| e.to_string()),
            "chat_template": chat,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let mut out = String::new();
    writeln!(out, "model          {}", a.path.display())?;
    writeln!(out, "format         {format}")?;
    writeln!(out, "architecture   {}", c.arch.name())?;
    writeln!(out, "layers         {}", c.num_layers)?;
    writeln!(
        out,
        "hidden         {}  (mlp {})",
        c.hidden_size, c.intermediate_size
    )?;
    writeln!(
        out,
        "attention      {} heads, {} kv heads, head dim {}{}{}",
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        if c.qkv_bias { ", qkv bias" } else { "" },
        if c.qk_norm { ", q/k norm" } else { "" }
    )?;
    writeln!(out, "vocabulary     {}", c.vocab_size)?;
    writeln!(out, "context        {}", c.max_position_embeddings)?;
    writeln!(
        out,
        "rope           theta {}{}",
        c.rope_theta,
        match &c.rope_scaling {
            None => String::new(),
            Some(s) => format!(", scaling {s:?}").chars().take(80).collect(),
        }
    )?;
    writeln!(out, "tied embedding {}", c.tie_word_embeddings)?;
    writeln!(out, "weights        {} in all", human_bytes(total))?;
    let (min, max) = (
        layer_bytes.iter().min().copied().unwrap_or(0),
        layer_bytes.iter().max().copied().unwrap_or(0),
    );
    if min == max {
        writeln!(out, "per layer      {}", human_bytes(min))?;
    } else {
        writeln!(
            out,
            "per layer      {} .. {}",
            human_bytes(min),
            human_bytes(max)
        )?;
    }
    writeln!(out, "embedding      {}", human_bytes(embed))?;
    writeln!(
        out,
        "lm head        {}",
        if head == 0 {
            "tied to the embedding".to_string()
        } else {
            human_bytes(head)
        }
    )?;
    writeln!(
        out,
        "kv cache       {} per token (f32, all layers)",
        human_bytes((c.kv_bytes_per_token_per_layer(4) * c.num_layers) as u64)
    )?;
    for (name, (n, bytes)) in &types {
        writeln!(out, "type {name:<9} {n} tensors, {}", human_bytes(*bytes))?;
    }
    match tokenizer {
        Ok(t) => {
            writeln!(
                out,
                "tokenizer      {} tokens, bos {:?}, eos {:?}",
                t.vocab_size(),
                t.bos(),
                t.eos()
            )?;
            writeln!(
                out,
                "chat template  {}",
                if t.chat_template().is_some() {
                    "yes"
                } else {
                    "no"
                }
            )?;
        }
        Err(e) => writeln!(out, "tokenizer      none usable: {e}")?,
    }
    emit(&out)
}

/// Loads one slice and reports what it cost: the measurement behind "a worker's resident
/// memory is its slice, not the model".
fn load_slice(file: &ModelFile, range: &str, json: bool) -> anyhow::Result<()> {
    let (a, b) = range
        .split_once("..")
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .with_context(|| format!("--load-layers {range}: expected A..B, e.g. 4..8"))?;
    let total = file.config().num_layers;
    let slice = Slice::new(a..b, total)?;
    let before = peak_rss_bytes().unwrap_or(0);
    let started = std::time::Instant::now();
    let stage = Stage::load(file, slice, &candle_core::Device::Cpu)?;
    let secs = started.elapsed().as_secs_f64();
    let peak = peak_rss_bytes().unwrap_or(0);
    let model_bytes: u64 = file.entries().map(|(_, e)| e.bytes()).sum();
    if json {
        let out = serde_json::json!({
            "layers": [a, b],
            "slice_weight_bytes": stage.weight_bytes(),
            "model_weight_bytes": model_bytes,
            "peak_rss_before_load_bytes": before,
            "peak_rss_bytes": peak,
            "load_s": secs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "loaded layers {a}..{b} of {total} in {secs:.2}s: slice {} of a {} model; peak resident memory {} ({} before loading)",
            human_bytes(stage.weight_bytes()),
            human_bytes(model_bytes),
            human_bytes(peak),
            human_bytes(before)
        );
    }
    Ok(())
}
