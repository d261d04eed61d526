//! The OpenAI-compatible HTTP API (axum), beside the gRPC one: `GET /v1/models`,
//! `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events
//! ending in `data: [DONE]`, or whole), and `GET /health`. Errors use OpenAI's JSON shape
//! (`{"error": {"message", "type", "param", "code"}}`) with 400, 401, 404 or 503. A client
//! that goes away mid-stream drops the stream, which frees its sequence on every stage.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use strata_model::{Message, SamplingParams};
use strata_proto::v1::{FinishReason, GenerateResponse};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::{session, Shared};

/// An OpenAI-shaped error.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": null}});
        (self.status, Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidRequest(m) | Error::UnknownSpec(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m)
            }
            Error::Unavailable(m) | Error::WorkerFailed(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", m)
            }
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                other.to_string(),
            ),
        }
    }
}

fn from_status(s: &tonic::Status) -> ApiError {
    let status = match s.code() {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let kind = if status == StatusCode::BAD_REQUEST {
        "invalid_request_error"
    } else {
        "server_error"
    };
    ApiError::new(status, kind, s.message())
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
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
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

impl Common {
    fn sampling(&self) -> SamplingParams {
        let d = SamplingParams::default();
        // OpenAI's frequency_penalty (0..2, additive) maps onto a multiplicative repeat
        // penalty of 1 + penalty/2 when no explicit repeat_penalty is given.
        let repeat = self
            .repeat_penalty
            .or(self
                .frequency_penalty
                .filter(|p| *p > 0.0)
                .map(|p| 1.0 + p / 2.0))
            .unwrap_or(1.0);
        SamplingParams {
            // OpenAI's default temperature is 1; a request that omits it samples.
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            min_p: self.min_p.unwrap_or(0.0),
            repeat_penalty: repeat,
            seed: self.seed.unwrap_or(0),
            ..d
        }
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
            if !m.is_empty() && m != &shared.model.name {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("this cluster serves `{}`, not `{m}`", shared.model.name),
                ));
            }
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad("only n = 1 is supported"));
        }
        Ok(())
    }
}

fn check_key(shared: &Shared, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
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

fn finish_name(code: i32) -> Option<&'static str> {
    match FinishReason::try_from(code) {
        Ok(FinishReason::Stop) => Some("stop"),
        Ok(FinishReason::Length) | Ok(FinishReason::Context) => Some("length"),
        _ => None,
    }
}

fn usage_json(m: &GenerateResponse) -> Value {
    let u = m.usage.unwrap_or_default();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens})
}

/// Which endpoint is answering: their JSON differs in names only.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn respond(
    shared: Arc<Shared>,
    kind: Kind,
    prompt: Vec<u32>,
    common: Common,
) -> std::result::Result<Response, ApiError> {
    let max = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(0) as usize;
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let model = shared.model.name.clone();
    let mut rx = session::start(
        &shared,
        prompt,
        max,
        common.sampling(),
        common.stops(),
        false,
    )?;
    // The first step tells whether the request runs at all: errors before it are HTTP errors.
    let first = match rx.recv().await {
        Some(Ok(m)) => m,
        Some(Err(s)) => return Err(from_status(&s)),
        None => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the request ended without an answer",
            ))
        }
    };
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        first.request_id
    );
    let created = now();
    if !common.stream {
        let mut text = first.text.clone();
        let mut last = first;
        while last.finish_reason == 0 {
            match rx.recv().await {
                Some(Ok(m)) => {
                    text.push_str(&m.text);
                    last = m;
                }
                Some(Err(s)) => return Err(from_status(&s)),
                None => break,
            }
        }
        let finish = finish_name(last.finish_reason);
        let body = match kind {
            Kind::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": null}],
                "usage": usage_json(&last),
            }),
            Kind::Text => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
                "usage": usage_json(&last),
            }),
        };
        return Ok(Json(body).into_response());
    }
    let (tx, out) = mpsc::channel::<std::result::Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let chunk = |m: &GenerateResponse, first: bool| -> Value {
            let finish = finish_name(m.finish_reason);
            match kind {
                Kind::Chat => {
                    let mut delta = json!({"content": m.text});
                    if first {
                        delta["role"] = json!("assistant");
                    }
                    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
                }
                Kind::Text => {
                    json!({"id": id, "object": "text_completion", "created": created, "model": model,
                                     "choices": [{"index": 0, "text": m.text, "finish_reason": finish, "logprobs": null}]})
                }
            }
        };
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
            if !send(chunk(&m, is_first)).await {
                // The client left: dropping `rx` frees the sequence on every stage.
                return;
            }
            is_first = false;
            if m.finish_reason != 0 {
                if include_usage {
                    let object = if kind == Kind::Chat {
                        "chat.completion.chunk"
                    } else {
                        "text_completion"
                    };
                    let _ = send(
                        json!({"id": id, "object": object, "created": created, "model": model,
                                        "choices": [], "usage": usage_json(&m)}),
                    )
                    .await;
                }
                break;
            }
            m = match rx.recv().await {
                Some(Ok(m)) => m,
                Some(Err(s)) => {
                    let e = from_status(&s);
                    let _ = send(json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": null}})).await;
                    break;
                }
                None => break,
            };
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response())
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: std::result::Result<Json<ChatBody>, axum::extract::rejection::JsonRejection>,
) -> std::result::Result<Response, ApiError> {
    check_key(&shared, &headers)?;
    let Json(body) = body.map_err(|e| {
        bad(format!(
            "the request body is not a chat completion request: {}",
            e.body_text()
        ))
    })?;
    body.common.check(&shared)?;
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
    let prompt = session::chat_prompt(&shared, &messages)?;
    respond(shared, Kind::Chat, prompt, body.common).await
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: std::result::Result<Json<CompletionBody>, axum::extract::rejection::JsonRejection>,
) -> std::result::Result<Response, ApiError> {
    check_key(&shared, &headers)?;
    let Json(body) = body.map_err(|e| {
        bad(format!(
            "the request body is not a completion request: {}",
            e.body_text()
        ))
    })?;
    body.common.check(&shared)?;
    let vocab = shared.model.file.config().vocab_size as u64;
    let prompt: Vec<u32> = match &body.prompt {
        Value::String(text) => shared
            .model
            .tokenizer
            .encode(text, true)
            .map_err(|e| bad(e.to_string()))?,
        Value::Array(ids) if ids.iter().all(Value::is_u64) => ids
            .iter()
            .filter_map(Value::as_u64)
            .map(|t| {
                if t < vocab {
                    Ok(t as u32)
                } else {
                    Err(bad(format!(
                        "token {t} is outside the vocabulary of {vocab}"
                    )))
                }
            })
            .collect::<std::result::Result<_, _>>()?,
        _ => return Err(bad("`prompt` must be a string or an array of token ids")),
    };
    respond(shared, Kind::Text, prompt, body.common).await
}

async fn models(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> std::result::Result<Response, ApiError> {
    check_key(&shared, &headers)?;
    Ok(Json(json!({"object": "list", "data": [
        {"id": shared.model.name, "object": "model", "created": 0, "owned_by": "strata"}
    ]}))
    .into_response())
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    if shared.pipeline.borrow().is_some() {
        (StatusCode::OK, Json(json!({"status": "serving"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not serving", "detail": shared.detail()})),
        )
            .into_response()
    }
}

/// The HTTP routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .with_state(shared)
}

/// Serves the HTTP API on `listener` until `shutdown`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(Error::Net)
}
