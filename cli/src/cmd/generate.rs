//! `strata generate`: run a model in this process, optionally split into `--stages K`
//! slices that hand activations to each other exactly as the cluster's stages do.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use strata_model::{
    ChatTemplate, GenerateRequest, LocalPipeline, Message, ModelFile, SamplingParams,
    StreamDecoder, Tokenizer,
};
use strata_net::progress::Progress;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model: a .gguf file or a safetensors directory.
    #[arg(long, required_unless_present = "coordinator")]
    pub model: Option<PathBuf>,
    /// Generate on a running cluster instead: the coordinator's API address.
    #[arg(long, conflicts_with = "model")]
    pub coordinator: Option<String>,
    /// API key, when the coordinator requires one.
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (no tokenizer involved).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Split the model into this many stages run one after another.
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// With --stages: the activations' type between stages, as a cluster's
    /// `--wire-dtype` (f32, f16 or bf16), so this shows what that cluster computes.
    #[arg(long, default_value = "f32")]
    pub wire_dtype: String,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print token ids, text and timings as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub draft: DraftArgs,
}

/// Sampling flags shared by the commands that generate.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-k (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Top-p (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Min-p (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repeat penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens the repeat penalty looks back over.
    #[arg(long, default_value_t = 64)]
    pub repeat_window: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra token ids that end generation.
    #[arg(long, value_delimiter = ',')]
    pub stop_ids: Vec<u32>,
    /// Report this many top log-probabilities per token (JSON output).
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
}

/// Speculative decoding flags (`serve`, `demo`, and `generate --model`).
#[derive(Debug, Args, Clone)]
pub struct DraftArgs {
    /// Speculative decoding with a small draft model that shares the model's tokenizer
    /// (a .gguf file or safetensors directory), run where `--draft-on` says: each step carries
    /// its drafts, and the last stage keeps those the model would have chosen itself
    /// (greedy) or that the rejection rule accepts (sampled), so the answer is the same
    /// (greedy) or has the same distribution (sampled), sooner.
    #[arg(long, conflicts_with = "draft")]
    pub draft_model: Option<PathBuf>,
    /// Where a cluster runs the draft model: on the coordinator (it drafts before each
    /// step), or on the last stage's worker, which the planner counts it on (it drafts
    /// after each step's tokens and sends the drafts with them, which spares the
    /// coordinator's CPU). A model in this process drafts in it.
    #[arg(long, value_enum, default_value_t = DraftOn::Coordinator)]
    pub draft_on: DraftOn,
    /// Speculative decoding without a draft model: `ngram` drafts what followed the
    /// answer's last few tokens earlier in the prompt or answer (prompt lookup), which
    /// pays off where answers quote, repeat or edit their prompt.
    #[arg(long, value_parser = ["ngram"])]
    pub draft: Option<String>,
    /// Most drafts one step carries; below it, the number that gives the most tokens per
    /// second, from how often drafts are kept and what passes take.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub draft_max: u32,
    /// With more answers than this being generated at once, steps carry no drafts (a
    /// full batch gains little from them); 0 drafts whatever the load.
    #[arg(long, default_value_t = 4)]
    pub draft_crowd: usize,
}

/// Where a cluster runs its draft model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DraftOn {
    /// The coordinator.
    Coordinator,
    /// The last stage's worker.
    Worker,
}

impl DraftArgs {
    /// Where drafts come from.
    pub fn source(&self) -> strata_coordinator::Draft {
        match (&self.draft_model, self.draft.as_deref()) {
            (Some(path), _) => self.model_at(path.clone()),
            (None, Some(_)) => strata_coordinator::Draft::Ngram,
            (None, None) => strata_coordinator::Draft::None,
        }
    }

    /// Where a cluster's drafts come from: as [`DraftArgs::source`], refusing a placement
    /// with no draft model to place.
    pub fn cluster_source(&self) -> anyhow::Result<strata_coordinator::Draft> {
        if self.draft_on == DraftOn::Worker && self.draft_model.is_none() {
            bail!(
                "--draft-on worker says where a draft model runs: give one with --draft-model \
                 (prompt lookup, --draft ngram, runs on the coordinator)"
            );
        }
        Ok(self.source())
    }

    /// A draft model at `path`, where `--draft-on` runs it.
    pub fn model_at(&self, path: PathBuf) -> strata_coordinator::Draft {
        match self.draft_on {
            DraftOn::Worker => strata_coordinator::Draft::ModelOnLastStage(path),
            DraftOn::Coordinator => strata_coordinator::Draft::Model(path),
        }
    }

    /// How many drafts a step carries.
    pub fn policy(&self) -> strata_coordinator::DraftPolicy {
        strata_coordinator::DraftPolicy {
            most: self.draft_max as usize,
            crowd: self.draft_crowd,
            ..Default::default()
        }
    }
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_window: self.repeat_window,
            seed: self.seed,
            stop_token_ids: self.stop_ids.clone(),
            top_logprobs: self.top_logprobs,
        }
    }
}

/// The prompt's token ids: given directly, or tokenized (through the chat template with
/// `--chat`).
pub fn prompt_ids(
    tokenizer: Option<&Tokenizer>,
    prompt: Option<&str>,
    ids: Option<&[u32]>,
    chat: bool,
    system: Option<&str>,
) -> anyhow::Result<Vec<u32>> {
    if let Some(ids) = ids {
        return Ok(ids.to_vec());
    }
    let text = prompt.unwrap_or_default();
    let tokenizer = tokenizer.context("this model has no usable tokenizer: pass --prompt-ids")?;
    if !chat {
        return Ok(tokenizer.encode(text, true)?);
    }
    let source = tokenizer
        .chat_template()
        .context("this model has no chat template: drop --chat")?;
    let template = ChatTemplate::new(source)?;
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", text));
    Ok(template.encode(tokenizer, &messages)?)
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    if let Some(addr) = a.coordinator.clone() {
        if a.draft.source() != strata_coordinator::Draft::None {
            bail!("with --coordinator the cluster drafts: give --draft or --draft-model to `strata serve`");
        }
        return run_remote(&a, &addr);
    }
    let t0 = Instant::now();
    let model = a.model.clone().context("--model is required")?;
    let file = ModelFile::open(&model)?;
    let tokenizer = match Tokenizer::for_model(&file) {
        Ok(t) => Some(t),
        Err(e) if a.prompt_ids.is_some() => {
            tracing::warn!(cause = %e, "no tokenizer; printing ids only");
            None
        }
        Err(e) => return Err(e).context("loading the tokenizer"),
    };
    let ids = prompt_ids(
        tokenizer.as_ref(),
        a.prompt.as_deref(),
        a.prompt_ids.as_deref(),
        a.chat,
        a.system.as_deref(),
    )?;
    if a.stages == 0 {
        bail!("--stages must be at least 1");
    }
    let loading = Progress::spinner(format!("loading {}", model.display()));
    let mut pipeline = LocalPipeline::load(&file, a.stages, &Device::Cpu)
        .with_context(|| format!("loading {} in {} stages", model.display(), a.stages))?;
    loading.finish("loaded");
    let wire = strata_model::WireType::parse(&a.wire_dtype)
        .with_context(|| format!("--wire-dtype {}: use f32, f16 or bf16", a.wire_dtype))?;
    pipeline.set_wire(wire);
    if let Some(t) = &tokenizer {
        pipeline.add_eos(t.eos());
    }
    let load_secs = t0.elapsed().as_secs_f64();
    let request = GenerateRequest {
        prompt_ids: ids.clone(),
        max_tokens: a.max_tokens,
        sampling: a.sampling.params(),
        stop_at_eos: !a.ignore_eos,
    };
    let mut decoder = StreamDecoder::new();
    let stream = !a.json;
    let mut stdout = std::io::stdout();
    let mut drafter = drafter(&a.draft, tokenizer.as_ref(), &request.sampling)?;
    let on_token = |s: &strata_model::Sampled| {
        if stream {
            match &tokenizer {
                Some(t) => {
                    if let Ok(piece) = decoder.push(t, s.token) {
                        let _ = write!(stdout, "{piece}");
                    }
                }
                None => {
                    let _ = write!(stdout, "{} ", s.token);
                }
            }
            let _ = stdout.flush();
        }
    };
    let (generation, drafts) = match &mut drafter {
        Some(d) => {
            pipeline.generate_drafted(&request, d.as_mut(), a.draft.policy().most, on_token)?
        }
        None => (
            pipeline.generate(&request, on_token)?,
            strata_model::DraftCounts::default(),
        ),
    };
    if stream {
        if let Some(t) = &tokenizer {
            print!("{}", decoder.finish(t)?);
        }
    }
    let text = match &tokenizer {
        Some(t) => Some(t.decode(&generation.tokens, true)?),
        None => None,
    };
    let n = generation.tokens.len();
    let prefill_s = generation.prefill.as_secs_f64();
    let decode_s = generation.decode.as_secs_f64();
    let decode_tps = if n > 1 && decode_s > 0.0 {
        (n - 1) as f64 / decode_s
    } else {
        0.0
    };
    if a.json {
        let stages: Vec<_> = pipeline
            .stages()
            .map(|s| serde_json::json!({"layers": [s.slice().layers.start, s.slice().layers.end], "weight_bytes": s.weight_bytes()}))
            .collect();
        let json = serde_json::json!({
            "prompt_ids": ids,
            "tokens": generation.tokens,
            "text": text,
            "finish_reason": generation.finish,
            "logprobs": generation.sampled.iter().map(|s| serde_json::json!({
                "token": s.token, "logprob": s.logprob,
                "top": s.top_logprobs.iter().map(|(t, l)| serde_json::json!([t, l])).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "stages": stages,
            "timings": {
                "load_s": load_secs,
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "prompt_tokens": ids.len(),
                "generated_tokens": n,
                "prefill_tokens_per_s": ids.len() as f64 / prefill_s.max(1e-9),
                "decode_tokens_per_s": decode_tps,
                "draft_tokens": drafts.drafted,
                "accepted_draft_tokens": drafts.accepted,
                "acceptance_rate": if drafts.drafted > 0 { drafts.accepted as f64 / drafts.drafted as f64 } else { 0.0 },
                "passes": drafts.passes,
                "tokens_per_pass": if drafts.passes > 0 { n as f64 / drafts.passes as f64 } else { 0.0 },
            }
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens in {:.2}s, {n} generated at {decode_tps:.1} tokens/s, {} stage(s), finish: {:?}]",
            ids.len(),
            prefill_s,
            a.stages,
            generation.finish
        );
    }
    Ok(())
}

/// The drafter the flags ask for, for a model in this process.
fn drafter(
    a: &DraftArgs,
    tokenizer: Option<&Tokenizer>,
    sampling: &SamplingParams,
) -> anyhow::Result<Option<Box<dyn strata_model::Drafter>>> {
    Ok(match a.source() {
        strata_coordinator::Draft::None => None,
        strata_coordinator::Draft::Ngram => Some(Box::new(strata_model::NgramDrafter::new())),
        strata_coordinator::Draft::Model(path)
        | strata_coordinator::Draft::ModelOnLastStage(path) => {
            let tokenizer = tokenizer
                .context("--draft-model needs the model's tokenizer, to check the draft's")?;
            let model = strata_model::draft::load_draft_model(&path, tokenizer)
                .with_context(|| format!("loading the draft model {}", path.display()))?;
            Some(Box::new(model.drafter().with_repeat_penalty(
                sampling.repeat_penalty,
                sampling.repeat_window,
            )))
        }
    })
}

/// `strata generate --coordinator`: the same request through the cluster's gRPC API.
fn run_remote(a: &GenerateArgs, addr: &str) -> anyhow::Result<()> {
    use strata_proto::v1::{ChatMessage, ChatRequest, FinishReason, GenerateRequest as Req};
    let sampling = Some(strata_net::frame::wire_sampling(&a.sampling.params()));
    let rt = super::cluster::runtime()?;
    rt.block_on(async {
        let t0 = Instant::now();
        let mut client = super::cluster::inference_client(addr, a.api_key.as_deref()).await?;
        let mut stream = if a.chat {
            let mut messages = Vec::new();
            if let Some(sys) = &a.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: sys.clone(),
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: a.prompt.clone().unwrap_or_default(),
            });
            client
                .chat(ChatRequest {
                    messages,
                    max_tokens: a.max_tokens as u32,
                    sampling,
                    ignore_eos: a.ignore_eos,
                    ..Default::default()
                })
                .await?
                .into_inner()
        } else {
            client
                .generate(Req {
                    prompt: a.prompt.clone().unwrap_or_default(),
                    prompt_ids: a.prompt_ids.clone().unwrap_or_default(),
                    max_tokens: a.max_tokens as u32,
                    sampling,
                    ignore_eos: a.ignore_eos,
                    ..Default::default()
                })
                .await?
                .into_inner()
        };
        let mut tokens: Vec<u32> = Vec::new();
        let mut text = String::new();
        let mut finish = String::new();
        let mut usage = None;
        let mut stdout = std::io::stdout();
        while let Some(msg) = stream.message().await? {
            tokens.extend(&msg.token_ids);
            text.push_str(&msg.text);
            if !a.json {
                let _ = write!(stdout, "{}", msg.text);
                let _ = stdout.flush();
            }
            if msg.finish_reason != 0 {
                finish = match FinishReason::try_from(msg.finish_reason) {
                    Ok(FinishReason::Stop) => "stop",
                    Ok(FinishReason::Length) => "length",
                    Ok(FinishReason::Context) => "context",
                    _ => "unknown",
                }
                .into();
                usage = msg.usage;
            }
        }
        let usage = usage.unwrap_or_default();
        report_remote(
            a.json,
            &tokens,
            &text,
            &finish,
            &usage,
            t0.elapsed().as_secs_f64(),
        )?;
        Ok(())
    })
}

/// Joules per generated token (the prompt's cost included), when every stage measured it.
fn joules_per_token(usage: &strata_proto::v1::Usage) -> Option<f64> {
    usage
        .energy_joules
        .filter(|_| usage.completion_tokens > 0)
        .map(|j| j / f64::from(usage.completion_tokens))
}

/// `3.2 J, 0.025 J/token`, or why it is not known.
fn energy_text(usage: &strata_proto::v1::Usage) -> String {
    match (usage.energy_joules, joules_per_token(usage)) {
        (Some(j), Some(per)) => format!("{j:.3} J, {per:.4} J/token"),
        (Some(j), None) => format!("{j:.3} J"),
        _ if usage.energy_note.is_empty() => "not available".into(),
        _ => usage.energy_note.clone(),
    }
}

/// What a remote generation says at its end: the JSON document, or a line for people.
fn report_remote(
    json_out: bool,
    tokens: &[u32],
    text: &str,
    finish: &str,
    usage: &strata_proto::v1::Usage,
    total_s: f64,
) -> anyhow::Result<()> {
    if json_out {
        let json = serde_json::json!({
            "tokens": tokens,
            "text": text,
            "finish_reason": finish,
            "timings": {
                "total_s": total_s,
                "prompt_tokens": usage.prompt_tokens,
                "generated_tokens": usage.completion_tokens,
                "time_to_first_token_ms": usage.time_to_first_token_ms,
                "decode_tokens_per_s": usage.decode_tokens_per_second,
                "draft_tokens": usage.draft_tokens,
                "accepted_draft_tokens": usage.accepted_draft_tokens,
                "acceptance_rate": if usage.draft_tokens > 0 {
                    f64::from(usage.accepted_draft_tokens) / f64::from(usage.draft_tokens)
                } else { 0.0 },
                "passes": usage.passes,
                "tokens_per_pass": if usage.passes > 0 {
                    f64::from(usage.completion_tokens) / f64::from(usage.passes)
                } else { 0.0 },
                "energy_joules": usage.energy_joules,
                "joules_per_token": joules_per_token(usage),
                "energy": energy_text(usage),
            }
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!();
        let drafts = if usage.draft_tokens > 0 {
            format!(
                ", {} of {} drafts accepted, {:.2} tokens per pass",
                usage.accepted_draft_tokens,
                usage.draft_tokens,
                f64::from(usage.completion_tokens) / f64::from(usage.passes.max(1))
            )
        } else {
            String::new()
        };
        eprintln!(
            "[{} prompt tokens, first token after {:.0} ms, {} generated at {:.1} tokens/s through the cluster{drafts}, energy: {}, finish: {finish}]",
            usage.prompt_tokens, usage.time_to_first_token_ms, usage.completion_tokens, usage.decode_tokens_per_second,
            energy_text(usage)
        );
    }
    Ok(())
}
