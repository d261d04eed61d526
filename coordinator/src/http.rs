//! The OpenAI-compatible HTTP API (axum), beside the gRPC one (and Ollama's, in
//! [`crate::ollama`], on the same port): `GET /v1/models`,
//! `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events
//! ending in `data: [DONE]`, or whole), and `GET /health`. Errors use OpenAI's JSON shape
//! (`{"error": {"message", "type", "param", "code"}}`) with 400, 401, 404, 413, 429 (the
//! queue for KV room is full) or 503, the last two with `Retry-After`. A client that goes
//! away mid-stream drops the stream, which frees its sequence on every stage.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use strata_model::{Message, SamplingParams};
use strata_net::listen::{Bounded, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::metrics::RequestRecord;
use crate::registry::state_name;
use crate::routing::{self, Route, UpstreamModel};
use crate::sequence::{Delta, FinishReason, SequenceRequest, TokenLogprob};
use crate::{session, Shared};

/// An OpenAI-shaped error.
pub struct ApiError {
    pub(crate) status: StatusCode,
    kind: &'static str,
    pub(crate) message: String,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub(crate) retry_after: Option<u64>,
    /// The cluster refused the request before its first token (only such a request may
    /// overflow: one that failed later has been answered in part).
    refused_at_start: bool,
}

/// What a 503 tells a client to wait before retrying: the cluster re-plans in seconds.
const UNAVAILABLE_RETRY_SECONDS: u64 = 5;

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
            refused_at_start: false,
        }
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(UNAVAILABLE_RETRY_SECONDS),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": null}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidRequest(m) | Error::UnknownSpec(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m)
            }
            Error::Unavailable(m) => ApiError::unavailable(m),
            Error::Busy {
                message,
                retry_after,
            } => ApiError {
                retry_after: Some(retry_after.as_secs().max(1)),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    message,
                )
            },
            Error::Sequence(e) => ApiError::unavailable(e.to_string()),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                other.to_string(),
            ),
        }
    }
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or OpenAI's list of typed parts (text parts are used).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both completion endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    // Read as f64 so that an out-of-range number is reported as sent, not as `inf`.
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    min_p: Option<f64>,
    repeat_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Chat: `true`/`false`; completions: how many alternatives per token (0..=5 in OpenAI's).
    logprobs: Option<Value>,
    /// Chat: alternatives per token (0..=20), with `logprobs: true`.
    top_logprobs: Option<u32>,
    /// Keep generating past end-of-sequence tokens (as vLLM's server has it).
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(flatten)]
    common: Common,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

/// A sampling number as the sampler takes it; one that no f32 holds is refused by name.
pub(crate) fn real(name: &str, value: Option<f64>) -> std::result::Result<Option<f32>, ApiError> {
    match value {
        Some(v) if !v.is_finite() || v.abs() > f64::from(f32::MAX) => Err(bad(format!(
            // `{:e}` writes 1e308 as sent, where `{}` would spell out 309 digits.
            "`{name}` must be a finite number of ordinary size, got {v:e}"
        ))),
        Some(v) => Ok(Some(v as f32)),
        None => Ok(None),
    }
}

impl Common {
    /// The sampler's settings; with no seed, a fresh one (see [`session::fresh_seed`]).
    fn sampling(&self) -> std::result::Result<SamplingParams, ApiError> {
        let d = SamplingParams::default();
        // OpenAI's frequency_penalty (0..2, additive) maps onto a multiplicative repeat
        // penalty of 1 + penalty/2 when no explicit repeat_penalty is given.
        let repeat = real("repeat_penalty", self.repeat_penalty)?
            .or(real("frequency_penalty", self.frequency_penalty)?
                .filter(|p| *p > 0.0)
                .map(|p| 1.0 + p / 2.0))
            .unwrap_or(1.0);
        Ok(SamplingParams {
            // OpenAI's default temperature is 1; a request that omits it samples.
            temperature: real("temperature", self.temperature)?.unwrap_or(1.0),
            top_p: real("top_p", self.top_p)?.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            min_p: real("min_p", self.min_p)?.unwrap_or(0.0),
            repeat_penalty: repeat,
            seed: self.seed.unwrap_or_else(session::fresh_seed),
            ..d
        })
    }

    /// Most tokens to generate: 0 when not given (the session's default); an explicit 0
    /// is refused, as OpenAI's API does.
    fn max_tokens(&self) -> std::result::Result<usize, ApiError> {
        match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => Err(bad(
                "`max_tokens` must be at least 1 (leave it out for the default)",
            )),
            Some(n) => Ok(n as usize),
            None => Ok(0),
        }
    }

    /// Whether to return log-probabilities, and how many alternatives per token.
    fn logprobs(&self) -> std::result::Result<(bool, usize), ApiError> {
        let (on, top) = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => (false, 0),
            Some(Value::Bool(true)) => (true, self.top_logprobs.unwrap_or(0)),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(n) => (true, n as u32),
                None => return Err(bad("`logprobs` must be true/false or a count of 0 to 20")),
            },
            Some(_) => return Err(bad("`logprobs` must be true/false or a count of 0 to 20")),
        };
        if top > 20 {
            return Err(bad(format!(
                "at most 20 log-probability alternatives per token, not {top}"
            )));
        }
        if !on && self.top_logprobs.is_some_and(|t| t > 0) {
            return Err(bad("`top_logprobs` needs `logprobs: true`"));
        }
        Ok((on, top as usize))
    }

    fn stops(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    fn check(&self, shared: &Shared) -> std::result::Result<(), ApiError> {
        if let Some(m) = &self.model {
            if !m.is_empty() && m != &shared.model().name {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("this cluster serves `{}`, not `{m}`", shared.model().name),
                ));
            }
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad("only n = 1 is supported"));
        }
        Ok(())
    }
}

pub(crate) fn check_key(shared: &Shared, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    if !shared.authorized(header) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "this cluster needs an API key: send `Authorization: Bearer <key>`",
        ));
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_name(d: &Delta) -> Option<&'static str> {
    d.finish.map(|(reason, _)| match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    })
}

fn usage_json(d: &Delta) -> Value {
    let u = d.finish.map(|(_, u)| u).unwrap_or_default();
    let mut usage = json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens});
    // Strata's own fields, beside OpenAI's, only where every stage measured its energy.
    if let Some(joules) = u.energy_joules {
        usage["energy_joules"] = json!(joules);
        if u.completion_tokens > 0 {
            usage["joules_per_token"] = json!(joules / u.completion_tokens as f64);
        }
    }
    usage
}

/// Writes log-probabilities in the shape each endpoint uses: chat's
/// `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, or the legacy
/// completions' `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`.
struct LogprobText {
    shared: Arc<Shared>,
    kind: Kind,
    on: bool,
}

impl LogprobText {
    fn text(&self, id: u32) -> String {
        self.shared
            .model()
            .tokenizer
            .decode(&[id], false)
            .unwrap_or_default()
    }

    fn json(&self, steps: &[TokenLogprob]) -> Value {
        if !self.on {
            return Value::Null;
        }
        let entry = |&(id, logprob): &(u32, f32)| {
            let text = self.text(id);
            json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
        };
        match self.kind {
            Kind::Chat => json!({"content": steps
                .iter()
                .map(|s| {
                    let mut e = entry(&s.token);
                    e["top_logprobs"] = s.top.iter().map(entry).collect();
                    e
                })
                .collect::<Vec<_>>()}),
            Kind::Text => {
                let chosen: Vec<(u32, f32)> = steps.iter().map(|s| s.token).collect();
                let texts: Vec<String> = chosen.iter().map(|t| self.text(t.0)).collect();
                let offsets: Vec<usize> = texts
                    .iter()
                    .scan(0usize, |at, t| {
                        let here = *at;
                        *at += t.len();
                        Some(here)
                    })
                    .collect();
                json!({
                    "text_offset": offsets,
                    "tokens": texts,
                    "token_logprobs": chosen.iter().map(|t| t.1).collect::<Vec<_>>(),
                    "top_logprobs": steps.iter().map(|s| s
                        .top
                        .iter()
                        .map(|t| (self.text(t.0), json!(t.1)))
                        .collect::<serde_json::Map<_, _>>())
                        .collect::<Vec<_>>(),
                })
            }
        }
    }
}

/// Which endpoint is answering: their JSON differs in names only.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// What every message of one answer repeats: its id, creation time, model and shape.
struct Reply {
    id: String,
    /// The sampler's seed (reported so that the answer can be reproduced).
    seed: u64,
    created: u64,
    model: String,
    kind: Kind,
    tokens: LogprobText,
}

impl Reply {
    /// The object name of a streamed chunk.
    fn chunk_object(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        }
    }

    /// One streamed delta as its endpoint writes it.
    fn chunk(&self, m: &Delta, first: bool) -> Value {
        let finish = finish_name(m);
        let lp = self
            .tokens
            .json(&m.logprob.iter().cloned().collect::<Vec<_>>());
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({"content": m.text});
                if first {
                    delta["role"] = json!("assistant");
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp})
            }
            Kind::Text => {
                json!({"index": 0, "text": m.text, "finish_reason": finish, "logprobs": lp})
            }
        };
        json!({"id": self.id, "object": self.chunk_object(), "created": self.created,
               "model": self.model, "seed": self.seed, "choices": [choice]})
    }

    /// The whole answer as its endpoint writes it.
    fn whole(&self, text: String, logprobs: &[TokenLogprob], last: &Delta) -> Value {
        let (finish, lp) = (finish_name(last), self.tokens.json(logprobs));
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": lp}),
            ),
            Kind::Text => (
                "text_completion",
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": lp}),
            ),
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "seed": self.seed, "choices": [choice], "usage": usage_json(last)})
    }
}

/// What the request asks for, as the session takes it.
fn sequence_request(
    common: &Common,
    prompt: Vec<u32>,
) -> std::result::Result<SequenceRequest, ApiError> {
    let max_tokens = common.max_tokens()?;
    let (logprobs, top_logprobs) = common.logprobs()?;
    let mut sampling = common.sampling()?;
    sampling.top_logprobs = top_logprobs;
    Ok(SequenceRequest {
        prompt,
        max_tokens,
        sampling,
        stop: common.stops(),
        ignore_eos: common.ignore_eos,
        logprobs,
    })
}

/// The response header that carries the sampler's seed.
const SEED_HEADER: &str = "x-strata-seed";

async fn respond(
    shared: Arc<Shared>,
    kind: Kind,
    prompt: Vec<u32>,
    common: Common,
) -> std::result::Result<Response, ApiError> {
    let request = sequence_request(&common, prompt)?;
    let logprobs = request.logprobs;
    let at_start = |e: Error| ApiError {
        refused_at_start: true,
        ..ApiError::from(e)
    };
    let answer = session::start(&shared, request).map_err(at_start)?;
    let mut deltas = answer.deltas;
    // The first step tells whether the request runs at all: errors before it are HTTP errors.
    let first = match deltas.recv().await {
        Some(Ok(m)) => m,
        Some(Err(e)) => return Err(at_start(e)),
        None => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the request ended without an answer",
            ))
        }
    };
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Text => "cmpl",
    };
    let reply = Reply {
        id: format!("{prefix}-{}", answer.id),
        seed: answer.seed,
        created: now(),
        model: shared.model().name.clone(),
        kind,
        tokens: LogprobText {
            shared: shared.clone(),
            kind,
            on: logprobs,
        },
    };
    let seed_header = (SEED_HEADER, answer.seed.to_string());
    let route_header = (ROUTE_HEADER, "local".to_string());
    if !common.stream {
        let whole = whole(reply, first, deltas).await?;
        return Ok(([seed_header, route_header], whole).into_response());
    }
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    Ok((
        [seed_header, route_header],
        streamed(reply, first, deltas, include_usage),
    )
        .into_response())
}

/// Collects the answer and answers once.
async fn whole(
    reply: Reply,
    first: Delta,
    mut deltas: mpsc::Receiver<Result<Delta>>,
) -> std::result::Result<Response, ApiError> {
    let mut text = first.text.clone();
    let mut logprobs: Vec<TokenLogprob> = first.logprob.iter().cloned().collect();
    let mut last = first;
    while last.finish.is_none() {
        match deltas.recv().await {
            Some(Ok(m)) => {
                text.push_str(&m.text);
                logprobs.extend(m.logprob.iter().cloned());
                last = m;
            }
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    Ok(Json(reply.whole(text, &logprobs, &last)).into_response())
}

/// Streams the answer as server-sent events ending in `[DONE]`; an error mid-stream is an
/// event of OpenAI's error shape.
fn streamed(
    reply: Reply,
    first: Delta,
    mut deltas: mpsc::Receiver<Result<Delta>>,
    include_usage: bool,
) -> Response {
    // Events wait in the connection's buffers, not here: a client that stops reading is
    // noticed soon (see `listen`).
    let (tx, out) = mpsc::channel::<std::result::Result<Event, Infallible>>(2);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        let mut m = first;
        let mut is_first = true;
        loop {
            if !send(reply.chunk(&m, is_first)).await {
                // The client left: dropping `deltas` frees the sequence on every stage.
                return;
            }
            is_first = false;
            if m.finish.is_some() {
                if include_usage {
                    let usage = json!({"id": reply.id, "object": reply.chunk_object(), "created": reply.created,
                                       "model": reply.model, "choices": [], "usage": usage_json(&m)});
                    let _ = send(usage).await;
                }
                break;
            }
            m = match deltas.recv().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    let e = ApiError::from(e);
                    let _ = send(json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": null}})).await;
                    break;
                }
                None => break,
            };
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response()
}

/// Most bytes a request body may have (axum's default, said here so that the error can
/// name it).
const MAX_BODY_BYTES: usize = 2 << 20;

/// A body that could not be read as JSON: 413 when it is over the size limit, else 400
/// saying what was wrong.
pub(crate) fn rejected(e: axum::extract::rejection::JsonRejection, what: &str) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is over the limit of {MAX_BODY_BYTES} bytes"),
        );
    }
    bad(format!("the request body is not {what}: {}", e.body_text()))
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: std::result::Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> std::result::Result<Response, ApiError> {
    check_key(&shared, &headers)?;
    let Json(raw) = body.map_err(|e| rejected(e, "a chat completion request"))?;
    routed(shared, &headers, Kind::Chat, raw).await
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: std::result::Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> std::result::Result<Response, ApiError> {
    check_key(&shared, &headers)?;
    let Json(raw) = body.map_err(|e| rejected(e, "a completion request"))?;
    routed(shared, &headers, Kind::Text, raw).await
}

/// The response header that says who answered: `local` or `upstream`.
const ROUTE_HEADER: &str = "x-strata-route";

/// Answers a completion request where [`routing`] sends it: `upstream/<name>` to the
/// upstream as it came; anything else is checked here first (a bad request is ours to
/// refuse), then runs on the cluster, or overflows when the cluster would refuse it.
async fn routed(
    shared: Arc<Shared>,
    headers: &HeaderMap,
    kind: Kind,
    raw: Value,
) -> std::result::Result<Response, ApiError> {
    let policy = shared.routing().clone();
    // Every value of the header counts, and one that is not text is taken as private:
    // a request leaves the LAN only when nothing says it may not.
    let private = policy.private_only
        || headers.get_all(routing::PRIVATE_HEADER).iter().any(|v| {
            v.to_str()
                .map_or(true, |v| routing::is_private_header(Some(v)))
        });
    let model = raw.get("model").and_then(Value::as_str);
    if model.is_some_and(|m| m.starts_with(routing::UPSTREAM_PREFIX)) {
        return match policy.route(model, private, true) {
            Ok(Route::Upstream(model, reason)) => {
                answer_upstream(&shared, kind, raw, model, reason).await
            }
            Ok(Route::Local(_)) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "an upstream model was routed to the cluster",
            )),
            Err(refusal) => Err(refused_route(refusal)),
        };
    }
    let (prompt, common) = local_request(&shared, kind, &raw)?;
    let route = policy
        .route(model, private, shared.serving().is_serving())
        .map_err(refused_route)?;
    let reason = match route {
        Route::Upstream(model, reason) => {
            return answer_upstream(&shared, kind, raw, model, reason).await
        }
        Route::Local(reason) => reason,
    };
    match respond(shared.clone(), kind, prompt, common).await {
        Err(e)
            if e.refused_at_start
                && matches!(
                    e.status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                ) =>
        {
            match policy.when_refused(private) {
                Route::Upstream(model, reason) => {
                    answer_upstream(&shared, kind, raw, model, reason).await
                }
                Route::Local(reason) => {
                    shared.metrics().route("local", reason);
                    Err(kept_private(e, reason))
                }
            }
        }
        answer => {
            shared.metrics().route("local", reason);
            answer
        }
    }
}

/// A refusal that a private request got where another would have overflowed says so.
fn kept_private(mut e: ApiError, reason: routing::Reason) -> ApiError {
    if reason == routing::Reason::Private {
        e.message
            .push_str(" (this request is private, so it was not sent to the upstream API)");
    }
    e
}

/// A request that no route takes: 404 without an upstream, 403 when it is private.
fn refused_route(refusal: routing::Refusal) -> ApiError {
    let status = match refusal {
        routing::Refusal::NoUpstream(_) => StatusCode::NOT_FOUND,
        routing::Refusal::Private(_) => StatusCode::FORBIDDEN,
    };
    ApiError::new(status, "invalid_request_error", refusal.to_string())
}

/// The request as the cluster runs it: its prompt's tokens and its settings, checked.
fn local_request(
    shared: &Arc<Shared>,
    kind: Kind,
    raw: &Value,
) -> std::result::Result<(Vec<u32>, Common), ApiError> {
    match kind {
        Kind::Chat => {
            let body: ChatBody = serde_json::from_value(raw.clone()).map_err(|e| {
                bad(format!(
                    "the request body is not a chat completion request: {e}"
                ))
            })?;
            body.common.check(shared)?;
            let messages: Vec<Message> = body
                .messages
                .iter()
                .map(|m| {
                    let content = match &m.content {
                        None => String::new(),
                        Some(Content::Text(t)) => t.clone(),
                        Some(Content::Parts(parts)) => parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join(""),
                    };
                    Message::new(m.role.clone(), content)
                })
                .collect();
            Ok((session::chat_prompt(shared, &messages)?, body.common))
        }
        Kind::Text => {
            let body: CompletionBody = serde_json::from_value(raw.clone())
                .map_err(|e| bad(format!("the request body is not a completion request: {e}")))?;
            body.common.check(shared)?;
            let vocab = shared.model().file.config().vocab_size as u64;
            let prompt = match token_prompt(&body.prompt, vocab)? {
                Some(ids) => ids,
                None => shared
                    .model()
                    .tokenizer
                    .encode(body.prompt.as_str().unwrap_or_default(), true)
                    .map_err(|e| bad(e.to_string()))?,
            };
            Ok((prompt, body.common))
        }
    }
}

/// Has the upstream answer: counted, logged (never with the key) and listed on the
/// dashboard.
async fn answer_upstream(
    shared: &Arc<Shared>,
    kind: Kind,
    raw: Value,
    model: UpstreamModel,
    reason: routing::Reason,
) -> std::result::Result<Response, ApiError> {
    let Some(upstream) = shared.upstream() else {
        return Err(ApiError::unavailable("no upstream API is configured"));
    };
    let (model, raw) = match model {
        UpstreamModel::Named(name) => (name, raw),
        UpstreamModel::Overflow => (
            upstream.overflow_model(&shared.model().name).await?,
            crate::upstream::openai_fields_only(raw),
        ),
    };
    shared.metrics().route("upstream", reason);
    let started = Instant::now();
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let id = session::request_id();
    let path = match kind {
        Kind::Chat => "chat/completions",
        Kind::Text => "completions",
    };
    tracing::info!(id = %id, route = "upstream", reason = reason.label(), upstream = %upstream.host(), model = %model, "routed");
    let answer = upstream.forward(path, raw, &model).await;
    let outcome = match &answer {
        Ok(r) => format!("upstream {}", r.status().as_u16()),
        Err(e) => format!("upstream {}", e.status.as_u16()),
    };
    shared.metrics().answered_upstream(RequestRecord {
        id,
        started_unix_ms,
        prompt_tokens: 0,
        completion_tokens: 0,
        time_to_first_token_ms: started.elapsed().as_secs_f64() * 1000.0,
        tokens_per_second: 0.0,
        outcome,
        draft_tokens: 0,
        accepted_draft_tokens: 0,
        passes: 0,
        route: "upstream",
        joules: None,
    });
    let mut response = answer?;
    response
        .headers_mut()
        .insert(ROUTE_HEADER, HeaderValue::from_static("upstream"));
    Ok(response)
}

/// A completion's prompt given as token ids, each checked against the vocabulary; None
/// for a text prompt (which the tokenizer encodes).
fn token_prompt(prompt: &Value, vocab: u64) -> std::result::Result<Option<Vec<u32>>, ApiError> {
    match prompt {
        Value::String(_) => Ok(None),
        Value::Array(ids) if ids.iter().all(Value::is_number) => ids
            .iter()
            .map(|t| match t.as_u64() {
                Some(t) if t < vocab => Ok(t as u32),
                _ => Err(bad(format!(
                    "token {t} is not in the vocabulary: token ids are whole numbers from 0 to {}",
                    vocab.saturating_sub(1)
                ))),
            })
            .collect::<std::result::Result<_, _>>()
            .map(Some),
        _ => Err(bad("`prompt` must be a string or an array of token ids")),
    }
}

/// A request body through parsing and every check that needs no cluster, as the server
/// runs them: for the fuzz target, which feeds it anything. The model is taken to have a
/// context of 4,096, a vocabulary of 32,000 and a KV budget of 8,192 positions; prompts
/// stand in for their tokens byte by byte.
#[doc(hidden)]
pub fn check_request_body(bytes: &[u8]) -> std::result::Result<SequenceRequest, String> {
    let (prompt, common) = if let Ok(chat) = serde_json::from_slice::<ChatBody>(bytes) {
        let text: Vec<u32> = chat
            .messages
            .iter()
            .flat_map(|m| match &m.content {
                Some(Content::Text(t)) => t.bytes().map(u32::from).collect(),
                _ => Vec::new(),
            })
            .collect();
        (text, chat.common)
    } else {
        let body: CompletionBody = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let prompt = match token_prompt(&body.prompt, 32_000).map_err(|e| e.message)? {
            Some(ids) => ids,
            None => body
                .prompt
                .as_str()
                .unwrap_or_default()
                .bytes()
                .map(u32::from)
                .collect(),
        };
        (prompt, body.common)
    };
    let mut request = sequence_request(&common, prompt).map_err(|e| e.message)?;
    session::settle(&mut request, 4096, 8192).map_err(|e| e.to_string())?;
    Ok(request)
}

async fn models(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> std::result::Result<Response, ApiError> {
    check_key(&shared, &headers)?;
    let mut data = vec![
        json!({"id": shared.model().name, "object": "model", "created": 0, "owned_by": "strata"}),
    ];
    // Under --private-only nothing goes upstream, so its models are not offered.
    if let Some(upstream) = shared.upstream().filter(|_| !shared.routing().private_only) {
        match upstream.models().await {
            Ok(models) => data.extend(models.into_iter().map(|m| {
                json!({"id": format!("{}{m}", routing::UPSTREAM_PREFIX), "object": "model",
                       "created": 0, "owned_by": "upstream"})
            })),
            // The cluster's own model is still served: list it, and say why the rest is missing.
            Err(e) => tracing::warn!(cause = %e, "listing the upstream's models"),
        }
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let serving = shared.serving();
    if serving.is_serving() {
        (StatusCode::OK, Json(json!({"status": "serving"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not serving", "state": serving.name(), "detail": serving.detail()})),
        )
            .into_response()
    }
}

/// Prometheus text: counters as they stand, gauges read now.
async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !shared.metrics_open() {
        if let Err(e) = check_key(&shared, &headers) {
            return e.into_response();
        }
    }
    let m = shared.metrics();
    {
        let registry = shared.registry();
        m.workers.reset();
        m.worker_resident.reset();
        m.worker_budget.reset();
        for status in crate::api::worker_rows(&registry) {
            m.workers
                .with_label_values(&[state_name(status.state)])
                .inc();
        }
        for (id, w) in &registry.workers {
            m.worker_resident
                .with_label_values(&[id])
                .set(w.health.resident as i64);
            m.worker_budget
                .with_label_values(&[id])
                .set(w.profile.memory_budget as i64);
        }
    }
    m.stage_layers.reset();
    if let Some(p) = shared.serving().pipeline() {
        for (i, stage) in p.plan.stages.iter().enumerate() {
            m.stage_layers
                .with_label_values(&[&i.to_string(), &stage.worker])
                .set(stage.layers.len() as i64);
        }
    }
    m.active_sequences.set(shared.sessions().active() as i64);
    let (capacity, reserved, queued) = shared.gate().figures();
    m.queue_depth.set(queued as i64);
    m.kv_positions
        .with_label_values(&["capacity"])
        .set(capacity as i64);
    m.kv_positions
        .with_label_values(&["reserved"])
        .set(reserved as i64);
    m.coordinator_resident
        .set(strata_net::memory::resident_bytes() as i64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// The cluster as the dashboard draws it: model, workers, stages, counters, recent requests.
async fn cluster(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> std::result::Result<Response, ApiError> {
    check_key(&shared, &headers)?;
    let status = crate::api::status(&shared);
    let workers: Vec<Value> = status
        .workers
        .iter()
        .map(|w| {
            let info = w.info.clone().unwrap_or_default();
            let state = state_name(w.state);
            json!({
                "id": info.id, "hostname": info.hostname, "device": info.device,
                "address": w.address, "state": state, "stage": w.stage,
                "layers": [w.layer_start, w.layer_end],
                "budget_bytes": info.memory_budget, "resident_bytes": w.resident_bytes,
                "peak_resident_bytes": w.peak_resident_bytes,
                "load_bytes_done": w.load_bytes_done, "load_bytes_total": w.load_bytes_total,
                "speed_bytes_per_second": info.speed_bytes_per_second,
                "sequences": w.sequences, "last_seen_ms": w.last_seen_ms,
                "compute_seconds": w.compute_seconds, "network_seconds": w.network_seconds,
                "forwards": w.forwards, "detail": w.detail, "energy_meter": info.energy_meter,
                "draft_model": w.holds_draft_model,
            })
        })
        .collect();
    let stages: Vec<Value> = status
        .plan
        .as_ref()
        .map(|p| {
            p.stages
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let draft_model = status
                        .workers
                        .iter()
                        .any(|w| w.stage == i as i32 && w.holds_draft_model);
                    json!({"stage": i, "worker": s.worker_id, "layers": [s.layer_start, s.layer_end],
                           "embed": s.embed, "head": s.head, "memory_bytes": s.memory_bytes,
                           "budget_bytes": s.budget_bytes, "est_ms_per_token": s.est_ms_per_token,
                           "draft_model": draft_model})
                })
                .collect()
        })
        .unwrap_or_default();
    let model = status.model.clone().unwrap_or_default();
    let m = shared.metrics();
    Ok(Json(json!({
        "model": {"id": model.id, "architecture": model.architecture, "layers": model.layers,
                  "context_length": model.context_length, "weight_bytes": model.weight_bytes,
                  "drafts": model.drafts},
        "serving": status.serving,
        "detail": status.detail,
        "cluster_id": status.cluster_id,
        "active_sequences": status.active_sequences,
        "epoch": status.plan.as_ref().map_or(0, |p| p.epoch),
        "est_ms_per_token": status.plan.as_ref().map_or(0.0, |p| p.est_ms_per_token),
        "workers": workers,
        "stages": stages,
        "generated_tokens_total": m.generated_tokens.get(),
        "routed": {"local": m.routed_totals().0, "upstream": m.routed_totals().1},
        "energy_joules_total": m.energy_joules.get(),
        "energy_tokens_total": m.energy_tokens.get(),
        "upstream": shared.upstream().map(|u| u.describe()),
        "prompt_tokens_total": m.prompt_tokens.get(),
        "recent_requests": m.recent(),
        "now_unix_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    }))
    .into_response())
}

/// The dashboard: one page, its script and style inline, compiled into the binary.
async fn dashboard() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DASHBOARD_HTML,
    )
        .into_response()
}

const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// The HTTP routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/v1/cluster", get(cluster))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .merge(crate::ollama::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// Most connections each client API (HTTP, gRPC) holds open at once.
const MAX_CLIENT_CONNECTIONS: usize = 512;
/// A client connection's kernel send buffer: a second or more of a fast token stream (an
/// event is about 200 bytes), a long answer's JSON in a few round trips of a LAN, and a
/// client that stops reading a stream is noticed after about a hundred tokens rather than
/// the megabytes the kernel would buffer for it (its answer then waits one token ahead of
/// it, and gives its cache up while others wait: see `session`).
const CLIENT_SEND_BUFFER: usize = 16 * 1024;

/// The connections of a client API, bounded in number and set up for token streams.
pub(crate) fn client_connections(listener: tokio::net::TcpListener) -> Bounded {
    Bounded::new(listener, MAX_CLIENT_CONNECTIONS).with_send_buffer(CLIENT_SEND_BUFFER)
}

/// What an HTTP connection past the most is told before it is closed: 503, OpenAI's error
/// shape, retry in a second.
fn too_many_connections() -> Vec<u8> {
    let body = json!({"error": {
        "message": format!("this server holds {MAX_CLIENT_CONNECTIONS} connections open at once and all are taken; retry shortly, or reuse a connection"),
        "type": "server_error", "param": null, "code": null}})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The HTTP API's connections, as axum takes them.
struct HttpListener(Bounded);

impl axum::serve::Listener for HttpListener {
    type Io = Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Connection, std::net::SocketAddr) {
        self.0.next().await
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}

/// Serves the HTTP API on `listener` until `shutdown`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let connections = client_connections(listener).with_refusal(too_many_connections());
    axum::serve(HttpListener(connections), router(shared))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(Error::Io)
}
