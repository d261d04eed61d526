//! `strata chat`: an interactive conversation in the terminal, against a running cluster
//! (`--coordinator`, through the gRPC `Chat` call) or a model file run in this process
//! (`--model`). Answers stream as they are generated; the conversation is kept and sent
//! whole each turn, as chat clients do. `/reset` starts over, `/stats` shows the last
//! answer's timings and the session's totals, `/quit` (or end of input) leaves.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use strata_model::{
    ChatTemplate, GenerateRequest, LocalPipeline, Message, ModelFile, StreamDecoder, Tokenizer,
};
use strata_net::progress::Progress;

use super::generate::SamplingArgs;

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Chat with a running cluster: the coordinator's API address.
    #[arg(long, required_unless_present = "model")]
    pub coordinator: Option<String>,
    /// Or run this model (a .gguf file or safetensors directory) here.
    #[arg(long, conflicts_with = "coordinator")]
    pub model: Option<PathBuf>,
    /// API key, when the coordinator requires one.
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A system message that opens the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// One answer's figures.
#[derive(Debug, Clone, Default)]
struct Turn {
    prompt_tokens: u64,
    generated: u64,
    first_token_ms: f64,
    tokens_per_second: f64,
    finish: String,
}

/// Where answers come from.
// One per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Cluster {
        rt: tokio::runtime::Runtime,
        client: strata_proto::v1::inference_client::InferenceClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                super::cluster::Bearer,
            >,
        >,
    },
    Local(LocalChat),
}

/// A model run in this process.
struct LocalChat {
    pipeline: LocalPipeline,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl Backend {
    /// Streams the answer to `messages` into `out`, returning it and its figures.
    fn answer(
        &mut self,
        messages: &[Message],
        a: &ChatArgs,
        out: &mut dyn Write,
    ) -> anyhow::Result<(String, Turn)> {
        match self {
            Backend::Cluster { rt, client } => rt.block_on(async {
                use strata_proto::v1::{ChatMessage, ChatRequest, FinishReason};
                let request = ChatRequest {
                    messages: messages
                        .iter()
                        .map(|m| ChatMessage {
                            role: m.role.clone(),
                            content: m.content.clone(),
                        })
                        .collect(),
                    max_tokens: a.max_tokens as u32,
                    sampling: Some(strata_net::frame::wire_sampling(&a.sampling.params())),
                    ..Default::default()
                };
                let mut stream = client.chat(request).await?.into_inner();
                let mut text = String::new();
                let mut turn = Turn::default();
                while let Some(msg) = stream.message().await? {
                    text.push_str(&msg.text);
                    write!(out, "{}", msg.text)?;
                    out.flush()?;
                    if msg.finish_reason != 0 {
                        let u = msg.usage.unwrap_or_default();
                        turn = Turn {
                            prompt_tokens: u.prompt_tokens.into(),
                            generated: u.completion_tokens.into(),
                            first_token_ms: u.time_to_first_token_ms,
                            tokens_per_second: u.decode_tokens_per_second,
                            finish: match FinishReason::try_from(msg.finish_reason) {
                                Ok(FinishReason::Stop) => "stop",
                                Ok(FinishReason::Length) => "length",
                                Ok(FinishReason::Context) => "context full",
                                _ => "unknown",
                            }
                            .into(),
                        };
                    }
                }
                Ok((text, turn))
            }),
            Backend::Local(local) => {
                let LocalChat {
                    pipeline,
                    tokenizer,
                    template,
                } = local;
                let prompt_ids = template.encode(tokenizer, messages)?;
                let context = pipeline.context_length();
                if prompt_ids.len() >= context {
                    anyhow::bail!(
                        "the conversation is {} tokens, more than the model's context of {context}: /reset to start over",
                        prompt_ids.len()
                    );
                }
                let request = GenerateRequest {
                    prompt_ids: prompt_ids.clone(),
                    max_tokens: a.max_tokens.min(context - prompt_ids.len()),
                    sampling: a.sampling.params(),
                    stop_at_eos: true,
                };
                let mut decoder = StreamDecoder::new();
                let eos = tokenizer.eos().to_vec();
                let started = Instant::now();
                let mut first: Option<f64> = None;
                let mut text = String::new();
                let generation = pipeline.generate(&request, |s| {
                    first.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
                    if eos.contains(&s.token) {
                        return;
                    }
                    if let Ok(piece) = decoder.push(tokenizer, s.token) {
                        text.push_str(&piece);
                        let _ = write!(out, "{piece}");
                        let _ = out.flush();
                    }
                })?;
                let tail = decoder.finish(tokenizer)?;
                write!(out, "{tail}")?;
                text.push_str(&tail);
                let n = generation.tokens.len() as u64;
                let decode = generation.decode.as_secs_f64();
                Ok((
                    text,
                    Turn {
                        prompt_tokens: prompt_ids.len() as u64,
                        generated: n,
                        first_token_ms: first.unwrap_or(0.0),
                        tokens_per_second: if n > 1 && decode > 0.0 {
                            (n - 1) as f64 / decode
                        } else {
                            0.0
                        },
                        finish: format!("{:?}", generation.finish).to_lowercase(),
                    },
                ))
            }
        }
    }
}

fn connect(a: &ChatArgs) -> anyhow::Result<(Backend, String)> {
    if let Some(addr) = &a.coordinator {
        let rt = super::cluster::runtime()?;
        let client = rt.block_on(super::cluster::inference_client(addr, a.api_key.as_deref()))?;
        let backend = Backend::Cluster { rt, client };
        return Ok((backend, format!("the cluster at {addr}")));
    }
    let path = a.model.clone().context("pass --coordinator or --model")?;
    let file = ModelFile::open(&path)?;
    let tokenizer = Tokenizer::for_model(&file).context("loading the tokenizer")?;
    let template =
        ChatTemplate::new(tokenizer.chat_template().context(
            "this model has no chat template, so it cannot chat: use `strata generate`",
        )?)?;
    let loading = Progress::spinner(format!("loading {}", path.display()));
    let mut pipeline = LocalPipeline::load(&file, 1, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))?;
    loading.finish("loaded");
    pipeline.add_eos(tokenizer.eos());
    let backend = Backend::Local(LocalChat {
        pipeline,
        tokenizer,
        template,
    });
    Ok((backend, format!("{} in this process", path.display())))
}

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    let (mut backend, source) = connect(&a)?;
    let interactive = std::io::stdin().is_terminal();
    eprintln!("chatting with {source}. /reset starts over, /stats shows timings, /quit leaves.");
    let opening: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut messages = opening.clone();
    let mut last: Option<Turn> = None;
    let (mut turns, mut generated, mut seconds) = (0u64, 0u64, 0f64);
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                messages = opening.clone();
                println!("(conversation reset)");
                continue;
            }
            "/stats" => {
                match &last {
                    Some(t) => println!(
                        "last answer: {} prompt tokens, {} generated, first token after {:.0} ms, {:.1} tokens/s, finish: {}",
                        t.prompt_tokens, t.generated, t.first_token_ms, t.tokens_per_second, t.finish
                    ),
                    None => println!("no answers yet"),
                }
                println!(
                    "session: {turns} answer{}, {generated} tokens generated in {seconds:.1} s; the conversation holds {} messages",
                    if turns == 1 { "" } else { "s" },
                    messages.len()
                );
                continue;
            }
            s if s.starts_with('/') => {
                println!("unknown command {s}: /reset, /stats or /quit");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", input));
        let started = Instant::now();
        match backend.answer(&messages, &a, &mut stdout) {
            Ok((text, turn)) => {
                println!();
                turns += 1;
                generated += turn.generated;
                seconds += started.elapsed().as_secs_f64();
                last = Some(turn);
                messages.push(Message::new("assistant", text));
            }
            Err(e) => {
                // The question stays unanswered and out of the history; the session goes on.
                messages.pop();
                println!();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}
