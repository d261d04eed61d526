//! Ollama's HTTP API, on the same port as the OpenAI-compatible one, for the tools written
//! against Ollama: `GET /api/version`, `/api/tags` and `/api/ps`, `POST /api/show`,
//! `/api/chat` and `/api/generate`. Chat and generate stream NDJSON (one JSON object per
//! line; the last says `done: true` with the reason, the token counts and the durations in
//! nanoseconds) unless the request says `stream: false`; they take Ollama's `options`
//! (`num_predict`, `temperature`, `top_k`, `top_p`, `min_p`, `seed`, `stop`,
//! `repeat_penalty`, `repeat_last_n`) with Ollama's defaults, and accept the ones that tune
//! Ollama's own runner (`num_ctx`, `num_thread`, ...) and `keep_alive` without effect: the
//! cluster keeps its model loaded while it serves. Errors are Ollama's `{"error": "..."}`,
//! with the status codes the OpenAI API uses. What Strata does not do (tools, images,
//! structured `format`, thinking, a `suffix`) is refused by name, not ignored.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use strata_model::{Message, SamplingParams};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::http::{check_key, ApiError};
use crate::sequence::{Delta, FinishReason, SequenceRequest};
use crate::{session, Shared};

/// The Ollama release whose API these endpoints follow (what `/api/version` says: tools
/// check it before they use an endpoint).
const OLLAMA_API_VERSION: &str = "0.12.0";

/// The routes, for the HTTP server's router.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(running))
        .route("/api/show", post(show))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
}

/// An error as Ollama writes it: `{"error": "..."}`, with the status (and `Retry-After`)
/// the OpenAI API would give.
struct OllamaError(ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        OllamaError(e)
    }
}

impl From<crate::error::Error> for OllamaError {
    fn from(e: crate::error::Error) -> Self {
        OllamaError(e.into())
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let mut response = (self.0.status, Json(json!({"error": self.0.message}))).into_response();
        if let Some(seconds) = self.0.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

type Answer<T> = std::result::Result<T, OllamaError>;

fn bad(message: impl Into<String>) -> OllamaError {
    OllamaError(ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
    ))
}

/// A request body that is not the JSON asked for: 400 saying what was wrong (413 over the
/// size limit).
fn rejected(e: axum::extract::rejection::JsonRejection, what: &str) -> OllamaError {
    OllamaError(crate::http::rejected(e, what))
}

/// `2026-12-03T12:00:00.123456789Z`, as Ollama dates its replies.
fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Ollama's options: the ones the sampler takes; any other (Ollama's runner settings,
/// which a cluster plans for itself) is accepted and has no effect.
#[derive(Debug, Default, Deserialize)]
struct Options {
    num_predict: Option<i64>,
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f64>,
    repeat_last_n: Option<i64>,
    #[serde(flatten)]
    _runner: Map<String, Value>,
}

/// A sampling option as the sampler takes it (checked as the OpenAI API checks it), or
/// Ollama's default.
fn real(name: &str, value: Option<f64>, default: f32) -> Answer<f32> {
    Ok(crate::http::real(name, value)?.unwrap_or(default))
}

impl Options {
    /// The sampler's settings, with Ollama's defaults (temperature 0.8, top-k 40, top-p
    /// 0.9, repeat penalty 1.1 over the last 64 tokens); no seed, a fresh one.
    fn sampling(&self) -> Answer<SamplingParams> {
        let window = match self.repeat_last_n {
            None => 64,
            // Ollama's -1: the whole context.
            Some(n) if n < 0 => usize::MAX,
            Some(n) => n as usize,
        };
        Ok(SamplingParams {
            temperature: real("temperature", self.temperature, 0.8)?,
            top_k: self.top_k.unwrap_or(40).max(0) as usize,
            top_p: real("top_p", self.top_p, 0.9)?,
            min_p: real("min_p", self.min_p, 0.0)?,
            repeat_penalty: real("repeat_penalty", self.repeat_penalty, 1.1)?,
            repeat_window: window,
            seed: match self.seed {
                // Ollama's -1 (and no seed): a fresh one.
                Some(s) if s >= 0 => s as u64,
                _ => session::fresh_seed(),
            },
            ..SamplingParams::default()
        })
    }

    /// Most tokens to generate: `num_predict` when positive; Ollama's -1 ("until the
    /// model stops") and -2 ("fill the context") are the cluster's default, cut to what
    /// the context leaves.
    fn max_tokens(&self) -> Answer<usize> {
        match self.num_predict {
            Some(0) => Err(bad(
                "option `num_predict` must be positive, or -1 to generate until the model stops",
            )),
            Some(n) if n > 0 => Ok(n as usize),
            _ => Ok(0),
        }
    }
}

/// The fields both generating endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: String,
    /// Streamed unless `false` (Ollama's default is to stream).
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
    /// How long Ollama keeps a model loaded after a request: a cluster keeps its model
    /// while it serves; only "unload now" (0) is told apart in the reply.
    keep_alive: Option<Value>,
    format: Option<Value>,
    think: Option<Value>,
}

impl Common {
    /// Refuses what Strata does not do, by name.
    fn check(&self, shared: &Shared) -> Answer<()> {
        check_model(shared, &self.model)?;
        let asked = |v: &Option<Value>| match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        if asked(&self.format) {
            return Err(bad(
                "structured output (`format`) is not supported by Strata: ask for JSON in the prompt instead",
            ));
        }
        if asked(&self.think) {
            return Err(bad(format!(
                "\"{}\" does not support thinking",
                shared.model().name
            )));
        }
        Ok(())
    }

    fn unloads(&self) -> bool {
        matches!(&self.keep_alive, Some(Value::Number(n)) if n.as_f64() == Some(0.0))
            || matches!(&self.keep_alive, Some(Value::String(s)) if s == "0" || s == "0s")
    }

    fn request(&self, prompt: Vec<u32>) -> Answer<SequenceRequest> {
        Ok(SequenceRequest {
            prompt,
            max_tokens: self.options.max_tokens()?,
            sampling: self.options.sampling()?,
            stop: self.options.stop.clone().unwrap_or_default(),
            ignore_eos: false,
            logprobs: false,
        })
    }
}

/// The name a request gives is the served model's: as it is, or with Ollama's default tag
/// `:latest` (clients add it). An empty name means the served model.
fn check_model(shared: &Shared, asked: &str) -> Answer<()> {
    let name = &shared.model().name;
    let bare = asked.strip_suffix(":latest").unwrap_or(asked);
    if asked.is_empty() || bare == name || asked == name {
        return Ok(());
    }
    Err(OllamaError(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!("model \"{asked}\" not found: this cluster serves \"{name}\""),
    )))
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
    images: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(default)]
    messages: Vec<ChatMessage>,
    tools: Option<Vec<Value>>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct GenerateBody {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    system: String,
    #[serde(default)]
    raw: bool,
    /// The token ids a previous reply returned (Ollama's older way to continue).
    context: Option<Vec<i64>>,
    #[serde(default)]
    suffix: String,
    #[serde(default)]
    template: String,
    images: Option<Vec<Value>>,
    #[serde(flatten)]
    common: Common,
}

/// Which endpoint a reply is for: the text goes in `message.content` or in `response`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Generate,
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: std::result::Result<Json<ChatBody>, axum::extract::rejection::JsonRejection>,
) -> Answer<Response> {
    check_key(&shared, &headers)?;
    let Json(body) = body.map_err(|e| rejected(e, "an Ollama chat request"))?;
    body.common.check(&shared)?;
    if body.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(bad("tool calling is not supported by Strata"));
    }
    text_only(&shared, body.messages.iter().map(|m| &m.images))?;
    if body.messages.is_empty() {
        // Ollama's way to load (or, with keep_alive 0, unload) a model.
        return Ok(loaded(&shared, Kind::Chat, &body.common));
    }
    let messages: Vec<Message> = body
        .messages
        .iter()
        .map(|m| Message::new(m.role.clone(), m.content.clone()))
        .collect();
    let prompt = session::chat_prompt(&shared, &messages)?;
    let request = body.common.request(prompt)?;
    answer(
        shared,
        Kind::Chat,
        request,
        body.common.stream != Some(false),
    )
    .await
}

async fn generate(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: std::result::Result<Json<GenerateBody>, axum::extract::rejection::JsonRejection>,
) -> Answer<Response> {
    check_key(&shared, &headers)?;
    let Json(body) = body.map_err(|e| rejected(e, "an Ollama generate request"))?;
    body.common.check(&shared)?;
    if !body.suffix.is_empty() {
        return Err(bad(
            "fill-in-the-middle (`suffix`) is not supported by Strata",
        ));
    }
    if !body.template.is_empty() {
        return Err(bad(
            "a request's own `template` is not supported: Strata uses the model's chat template (or none, with `raw`)",
        ));
    }
    text_only(&shared, [&body.images])?;
    if body.prompt.is_empty() {
        return Ok(loaded(&shared, Kind::Generate, &body.common));
    }
    let model = shared.model();
    let vocab = model.file.config().vocab_size as i64;
    let mut prompt: Vec<u32> = Vec::new();
    for &id in body.context.iter().flatten() {
        if !(0..vocab).contains(&id) {
            return Err(bad(format!(
                "`context` holds {id}, which is not a token id of this model (0 to {})",
                vocab - 1
            )));
        }
        prompt.push(id as u32);
    }
    let continuing = !prompt.is_empty();
    if body.raw || model.chat.is_none() {
        // As it is: special tokens (a beginning-of-sequence one) only at the start.
        let text = model
            .tokenizer
            .encode(&body.prompt, !continuing)
            .map_err(|e| bad(e.to_string()))?;
        prompt.extend(text);
    } else {
        // Ollama applies the model's template: the prompt is the user's turn.
        let mut messages = Vec::new();
        if !body.system.is_empty() {
            messages.push(Message::new("system", body.system.clone()));
        }
        messages.push(Message::new("user", body.prompt.clone()));
        prompt.extend(session::chat_prompt(&shared, &messages)?);
    }
    let request = body.common.request(prompt)?;
    answer(
        shared,
        Kind::Generate,
        request,
        body.common.stream != Some(false),
    )
    .await
}

/// Refuses images: the models Strata serves take text.
fn text_only<'a>(
    shared: &Shared,
    images: impl IntoIterator<Item = &'a Option<Vec<Value>>>,
) -> Answer<()> {
    if images
        .into_iter()
        .any(|i| i.as_ref().is_some_and(|i| !i.is_empty()))
    {
        return Err(bad(format!(
            "\"{}\" takes text only: leave out `images`",
            shared.model().name
        )));
    }
    Ok(())
}

/// The reply to a request with nothing to generate: the model is loaded (it is, while
/// the cluster serves) or, with `keep_alive: 0`, "unloaded".
fn loaded(shared: &Shared, kind: Kind, common: &Common) -> Response {
    let reason = if common.unloads() { "unload" } else { "load" };
    let mut reply = json!({
        "model": shared.model().name,
        "created_at": timestamp(SystemTime::now()),
        "done": true,
        "done_reason": reason,
    });
    match kind {
        Kind::Chat => reply["message"] = json!({"role": "assistant", "content": ""}),
        Kind::Generate => reply["response"] = json!(""),
    }
    Json(reply).into_response()
}

/// What one reply is being written for, and when its parts happened.
struct Reply {
    model: String,
    kind: Kind,
    started: Instant,
    first_token: Option<Instant>,
    /// The prompt's tokens and those generated (generate's `context`).
    tokens: Vec<u32>,
}

impl Reply {
    /// A piece of the answer's text.
    fn piece(&self, text: &str) -> Value {
        let mut v = json!({
            "model": self.model,
            "created_at": timestamp(SystemTime::now()),
            "done": false,
        });
        self.put_text(&mut v, text);
        v
    }

    fn put_text(&self, v: &mut Value, text: &str) {
        match self.kind {
            Kind::Chat => v["message"] = json!({"role": "assistant", "content": text}),
            Kind::Generate => v["response"] = json!(text),
        }
    }

    /// The last object: `text` (the whole answer unless streamed), why it ended, the
    /// counts and the durations.
    fn done(&self, text: &str, last: &Delta) -> Value {
        let (reason, usage) = match last.finish {
            Some((reason, usage)) => (reason, usage),
            None => (FinishReason::Length, Default::default()),
        };
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        let mut v = json!({
            "model": self.model,
            "created_at": timestamp(SystemTime::now()),
            "done": true,
            "done_reason": match reason {
                FinishReason::Stop => "stop",
                FinishReason::Length | FinishReason::ContextFull => "length",
            },
            "total_duration": ns(now - self.started),
            "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": ns(first - self.started),
            "eval_count": usage.completion_tokens,
            "eval_duration": ns(now - first),
        });
        self.put_text(&mut v, text);
        if self.kind == Kind::Generate {
            v["context"] = json!(self.tokens);
        }
        v
    }
}

/// Runs the request and answers it, streamed as NDJSON or whole.
async fn answer(
    shared: Arc<Shared>,
    kind: Kind,
    request: SequenceRequest,
    stream: bool,
) -> Answer<Response> {
    let started = Instant::now();
    let mut reply = Reply {
        model: shared.model().name.clone(),
        kind,
        started,
        first_token: None,
        tokens: request.prompt.clone(),
    };
    // Ollama's API answers from the cluster only.
    shared
        .metrics()
        .route("local", crate::routing::Reason::Model);
    let answer = session::start(&shared, request)?;
    let mut deltas = answer.deltas;
    // The first step tells whether the request runs at all: errors before it are HTTP
    // errors, with their status.
    let first = match deltas.recv().await {
        Some(Ok(d)) => d,
        Some(Err(e)) => return Err(e.into()),
        None => return Err(ended_without_answer()),
    };
    reply.first_token = Some(Instant::now());
    if !stream {
        let mut text = first.text.clone();
        reply.tokens.push(first.token);
        let mut last = first;
        while last.finish.is_none() {
            match deltas.recv().await {
                Some(Ok(d)) => {
                    text.push_str(&d.text);
                    reply.tokens.push(d.token);
                    last = d;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ended_without_answer()),
            }
        }
        return Ok(Json(reply.done(&text, &last)).into_response());
    }
    Ok(streamed(reply, first, deltas))
}

fn ended_without_answer() -> OllamaError {
    OllamaError(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the request ended without an answer",
    ))
}

/// Streams the answer: a line per piece of text, then the `done` line; an error mid-way
/// is a line `{"error": "..."}`. A client that goes away drops the stream, which frees
/// the sequence on every stage.
fn streamed(mut reply: Reply, first: Delta, mut deltas: mpsc::Receiver<Result<Delta>>) -> Response {
    let (tx, lines) = mpsc::channel::<std::result::Result<String, std::convert::Infallible>>(2);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(format!("{v}\n"))).await.is_ok() }
        };
        let mut d = first;
        loop {
            reply.tokens.push(d.token);
            if !d.text.is_empty() && !send(reply.piece(&d.text)).await {
                return;
            }
            if d.finish.is_some() {
                let _ = send(reply.done("", &d)).await;
                return;
            }
            d = match deltas.recv().await {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    let e = ApiError::from(e);
                    let _ = send(json!({"error": e.message})).await;
                    return;
                }
                None => return,
            };
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(lines),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn version() -> Response {
    Json(json!({"version": OLLAMA_API_VERSION})).into_response()
}

/// What Ollama says of a model in its lists: the file's format, the architecture as the
/// family, the parameter count and the quantization most of its bytes are in.
fn details(shared: &Shared) -> Value {
    let model = shared.model();
    let family = model.file.config().arch.name().to_string();
    let mut by_type = std::collections::HashMap::<String, u64>::new();
    for (_, entry) in model.file.entries() {
        *by_type.entry(entry.storage.name()).or_default() += entry.bytes();
    }
    let quantization = by_type
        .into_iter()
        .max_by_key(|(_, bytes)| *bytes)
        .map(|(name, _)| name.to_uppercase())
        .unwrap_or_default();
    json!({
        "parent_model": "",
        "format": match model.file.format() {
            strata_model::Format::Gguf => "gguf",
            strata_model::Format::Safetensors => "safetensors",
        },
        "family": family,
        "families": [family],
        "parameter_size": parameter_size(parameter_count(shared)),
        "quantization_level": quantization,
    })
}

/// The model's parameters: the elements of all its tensors.
fn parameter_count(shared: &Shared) -> u64 {
    shared
        .model()
        .file
        .entries()
        .map(|(_, e)| e.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum()
}

/// `135.0M`, `8.0B`: a parameter count as Ollama shows it.
fn parameter_size(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{:.1}K", n / 1e3)
    }
}

/// The model file's last change (now, where the file system does not say).
fn modified_at(shared: &Shared) -> String {
    let at = std::fs::metadata(shared.model().file.path())
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    timestamp(at)
}

fn listing(shared: &Shared) -> Value {
    let model = shared.model();
    json!({
        "name": model.name,
        "model": model.name,
        "modified_at": modified_at(shared),
        "size": model.profile.weight_bytes(),
        "digest": model.digest,
        "details": details(shared),
    })
}

async fn tags(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Answer<Response> {
    check_key(&shared, &headers)?;
    Ok(Json(json!({"models": [listing(&shared)]})).into_response())
}

/// The loaded models: the served one while the cluster serves (it stays loaded, so it
/// never expires; Ollama dates that far ahead too).
async fn running(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Answer<Response> {
    check_key(&shared, &headers)?;
    if !shared.serving().is_serving() {
        return Ok(Json(json!({"models": []})).into_response());
    }
    let mut entry = listing(&shared);
    let forever = SystemTime::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    entry["expires_at"] = json!(timestamp(forever));
    entry["size_vram"] = json!(0);
    entry["context_length"] = json!(shared.model().file.config().max_position_embeddings);
    Ok(Json(json!({"models": [entry]})).into_response())
}

#[derive(Debug, Deserialize)]
struct ShowBody {
    model: Option<String>,
    /// Older clients' name for `model`.
    name: Option<String>,
}

async fn show(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: std::result::Result<Json<ShowBody>, axum::extract::rejection::JsonRejection>,
) -> Answer<Response> {
    check_key(&shared, &headers)?;
    let Json(body) = body.map_err(|e| rejected(e, "an Ollama show request"))?;
    let asked = body.model.or(body.name).unwrap_or_default();
    if asked.is_empty() {
        return Err(bad("`model` is required: the name /api/tags lists"));
    }
    check_model(&shared, &asked)?;
    let model = shared.model();
    let c = model.file.config();
    let arch = c.arch.name();
    let mut info = Map::new();
    info.insert("general.architecture".into(), json!(arch));
    info.insert(
        "general.parameter_count".into(),
        json!(parameter_count(&shared)),
    );
    for (key, value) in [
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("block_count", c.num_layers),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_heads),
        ("attention.head_count_kv", c.num_kv_heads),
        ("vocab_size", c.vocab_size),
    ] {
        info.insert(format!("{arch}.{key}"), json!(value));
    }
    Ok(Json(json!({
        "license": "",
        "modelfile": format!("# Served by a Strata cluster\nFROM {}\n", model.name),
        "parameters": "",
        "template": model.tokenizer.chat_template().unwrap_or_default(),
        "details": details(&shared),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": modified_at(&shared),
    }))
    .into_response())
}
