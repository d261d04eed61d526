//! The upstream OpenAI-compatible API of the hybrid route (`serve --upstream URL`): its
//! model list, and requests proxied to it with their answers streamed back as they come.
//! Where requests go is decided in [`crate::routing`]; this is the client.
//!
//! The upstream's key (`--upstream-key`) is sent as a bearer token marked sensitive, and
//! never written anywhere else: not to logs, not to errors, not to `Debug`. The client's
//! own `Authorization` (this cluster's key) and headers are not forwarded.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::http::ApiError;

/// A secret that never prints: `Debug` and `Display` show that it is there, not what it is.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// Where the upstream is, as `serve` was told.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Its base URL, OpenAI's way: `https://api.openai.com/v1`. A URL with no path gets
    /// `/v1`.
    pub url: String,
    /// Its API key, if it needs one.
    pub key: Option<Secret>,
    /// Requests the cluster would refuse go upstream (`--overflow upstream`).
    pub overflow: bool,
    /// The upstream model that overflowing requests ask for (default: see
    /// [`crate::routing::overflow_model`]).
    pub overflow_model: Option<String>,
}

/// Why the upstream could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URL is not one.
    #[error("--upstream {url}: {why}; give the API's base URL, such as https://api.openai.com/v1")]
    BadUrl {
        /// As given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The HTTP client could not be built.
    #[error("the upstream's HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The upstream did not answer, or not with HTTP.
    #[error("the upstream API at {host} did not answer: {}", causes(error))]
    Unreachable {
        /// Its host, for the message.
        host: String,
        /// What the client saw (its causes are in the message).
        error: reqwest::Error,
    },
    /// It answered with an error status.
    #[error("the upstream API at {host} answered {status} to {what}: {body}")]
    Status {
        /// Its host.
        host: String,
        /// The status.
        status: StatusCode,
        /// What was asked.
        what: &'static str,
        /// The start of its body.
        body: String,
    },
    /// Its model list was not OpenAI's shape.
    #[error("the upstream API at {host} sent a model list that is not OpenAI's shape ({{\"data\": [{{\"id\": ...}}]}})")]
    BadList {
        /// Its host.
        host: String,
    },
}

/// How long a connection to the upstream may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the upstream may keep a request waiting for the head of its answer (a whole,
/// unstreamed answer comes only when it is complete).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a streamed answer may go without a byte.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the model list may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fetched model list is used before it is fetched again.
const LIST_FRESH: Duration = Duration::from_secs(30);
/// How long a failed fetch is reported before the upstream is asked again.
const LIST_RETRY: Duration = Duration::from_secs(5);

/// The upstream's model ids, or why they could not be had.
type Listing = Result<Vec<String>, String>;

/// The upstream API.
pub struct Upstream {
    client: reqwest::Client,
    /// The base URL, ending in `/`, so that `join("chat/completions")` appends.
    base: reqwest::Url,
    key: Option<Secret>,
    config: UpstreamConfig,
    listed: Mutex<Option<(Instant, Listing)>>,
}

impl Upstream {
    /// A client for the upstream `config` names.
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        let base = base_url(&config.url)?;
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(UpstreamError::Client)?;
        Ok(Upstream {
            client,
            base,
            key: config.key.clone(),
            config,
            listed: Mutex::new(None),
        })
    }

    /// Its host and port, for messages (never the URL's credentials, if it had any).
    pub fn host(&self) -> String {
        let host = self.base.host_str().unwrap_or("?");
        match self.base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }

    /// Its base URL without credentials, for the startup line.
    pub fn describe(&self) -> String {
        format!(
            "{}://{}{}",
            self.base.scheme(),
            self.host(),
            self.base.path().trim_end_matches('/')
        )
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        // `base` ends in '/' and `path` is relative, so `join` cannot fail; should it,
        // the base itself is asked and answers its own error.
        let url = self.base.join(path).unwrap_or_else(|_| self.base.clone());
        let builder = self.client.request(method, url);
        match &self.key {
            // reqwest marks a bearer header sensitive: its Debug hides the value.
            Some(key) => builder.bearer_auth(key.expose()),
            None => builder,
        }
    }

    /// The upstream's model ids (fetched at most every 30 s; a failure is kept for 5 s,
    /// so that a client polling the list does not wait on a dead upstream each time).
    pub async fn models(&self) -> Listing {
        if let Some((at, listed)) = self.listed.lock().await.as_ref() {
            let fresh = if listed.is_ok() {
                LIST_FRESH
            } else {
                LIST_RETRY
            };
            if at.elapsed() < fresh {
                return listed.clone();
            }
        }
        // Fetched without the lock: two callers may both ask, neither waits on the other.
        let listed = self.fetch_models().await.map_err(|e| e.to_string());
        *self.listed.lock().await = Some((Instant::now(), listed.clone()));
        listed
    }

    async fn fetch_models(&self) -> Result<Vec<String>, UpstreamError> {
        let unreachable = |error: reqwest::Error| UpstreamError::Unreachable {
            host: self.host(),
            error: error.without_url(),
        };
        let response = self
            .request(reqwest::Method::GET, "models")
            .timeout(LIST_TIMEOUT)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        if !status.is_success() {
            // A refused key's body may quote part of the key: say only the status then.
            let body = match status.as_u16() {
                401 | 403 => "check --upstream-key (STRATA_UPSTREAM_KEY)".to_string(),
                _ => response.text().await.unwrap_or_default(),
            };
            return Err(UpstreamError::Status {
                host: self.host(),
                status: StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
                what: "GET models",
                body: body.chars().take(300).collect(),
            });
        }
        let body = tokio::time::timeout(LIST_TIMEOUT, response.bytes())
            .await
            .map_err(|_| UpstreamError::BadList { host: self.host() })?
            .map_err(unreachable)?;
        serde_json::from_slice(&body)
            .ok()
            .and_then(|list: Value| model_ids(&list))
            .ok_or_else(|| UpstreamError::BadList { host: self.host() })
    }

    /// The model an overflowing request asks the upstream for.
    pub async fn overflow_model(&self, local: &str) -> Result<String, ApiError> {
        if let Some(m) = &self.config.overflow_model {
            return Ok(m.clone());
        }
        let listed = self.models().await.map_err(bad_gateway)?;
        crate::routing::overflow_model(None, local, &listed).map_err(|why| {
            bad_gateway(format!(
                "the cluster cannot take this request, and the upstream at {}: {why}",
                self.host()
            ))
        })
    }

    /// Sends `body` (with `model` in place of the client's) to the upstream's `path`
    /// (`chat/completions`, `completions`) and answers with what it answers: its status,
    /// its content type, its `Retry-After`, and its body as it streams. A refused key is a
    /// 502 that says so (not the upstream's 401, which the client would take for its own).
    pub async fn forward(
        &self,
        path: &str,
        mut body: Value,
        model: &str,
    ) -> Result<Response, ApiError> {
        if let Some(object) = body.as_object_mut() {
            object.insert("model".into(), Value::String(model.to_string()));
        }
        let unreachable = |why: String| {
            bad_gateway(format!(
                "the upstream API at {} did not answer: {why}",
                self.host()
            ))
        };
        // A whole answer comes when it is complete: it may take that long. A streamed one
        // must start within it, then never stall for longer than IDLE_TIMEOUT.
        let sent = self
            .request(reqwest::Method::POST, path)
            .header(header::CONTENT_TYPE.as_str(), "application/json")
            .body(body.to_string())
            .send();
        let response = tokio::time::timeout(ANSWER_TIMEOUT, sent)
            .await
            .map_err(|_| unreachable(format!("no answer within {ANSWER_TIMEOUT:?}")))?
            .map_err(|e| unreachable(causes(&e.without_url())))?;
        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(bad_gateway(format!(
                "the upstream API at {} refused this cluster's key ({status}): check --upstream-key (STRATA_UPSTREAM_KEY)",
                self.host()
            )));
        }
        let mut out = Response::builder().status(status);
        for name in [
            header::CONTENT_TYPE,
            header::RETRY_AFTER,
            header::CACHE_CONTROL,
        ] {
            if let Some(value) = response
                .headers()
                .get(name.as_str())
                .and_then(|v| header::HeaderValue::from_bytes(v.as_bytes()).ok())
            {
                out = out.header(name, value);
            }
        }
        Ok(out
            .body(Body::from_stream(idle_limited(
                response.bytes_stream(),
                IDLE_TIMEOUT,
            )))
            .unwrap_or_else(|e| bad_gateway(e.to_string()).into_response()))
    }
}

/// A body stream that ends with an error when no bytes come for `idle`.
fn idle_limited<S>(
    stream: S,
    idle: Duration,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send
where
    S: futures::Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    futures::stream::unfold(Some(stream), move |stream| async move {
        let mut stream = stream?;
        match tokio::time::timeout(idle, futures::StreamExt::next(&mut stream)).await {
            Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(stream))),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e.without_url())), None)),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the upstream sent nothing for {idle:?}"),
                )),
                None,
            )),
        }
    })
}

/// What the upstream gets of an overflowing request: OpenAI's fields only. The client
/// asked this cluster, so it may have used Strata's own (`top_k`, `min_p`,
/// `repeat_penalty`, `ignore_eos`), which OpenAI's API refuses.
pub fn openai_fields_only(mut body: Value) -> Value {
    if let Some(object) = body.as_object_mut() {
        for strata_only in ["top_k", "min_p", "repeat_penalty", "ignore_eos"] {
            object.remove(strata_only);
        }
    }
    body
}

/// An error and its causes, as one line: reqwest's own message ("error sending request")
/// says little without them.
fn causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// A 502 in OpenAI's error shape.
fn bad_gateway(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
}

/// The base URL as `join` needs it: with a path (`/v1` when none was given) that ends in
/// `/`.
fn base_url(given: &str) -> Result<reqwest::Url, UpstreamError> {
    let bad = |why: String| UpstreamError::BadUrl {
        url: given.to_string(),
        why,
    };
    let mut url = reqwest::Url::parse(given).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "the scheme is {}, not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none() {
        return Err(bad("it names no host".into()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it has a query or fragment".into()));
    }
    let path = match url.path().trim_end_matches('/') {
        "" => "/v1/".to_string(),
        p => format!("{p}/"),
    };
    url.set_path(&path);
    Ok(url)
}

/// The ids of an OpenAI model list (`{"data": [{"id": ...}, ...]}`).
fn model_ids(list: &Value) -> Option<Vec<String>> {
    list.get("data")?
        .as_array()?
        .iter()
        .map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_gets_v1_when_it_has_no_path_and_always_a_trailing_slash() {
        let joined = |u: &str| base_url(u).unwrap().join("chat/completions").unwrap();
        assert_eq!(
            joined("http://127.0.0.1:7434").as_str(),
            "http://127.0.0.1:7434/v1/chat/completions"
        );
        assert_eq!(
            joined("https://api.example.com/v1").as_str(),
            "https://api.example.com/v1/chat/completions"
        );
        assert_eq!(
            joined("https://example.com/openai/v1/").as_str(),
            "https://example.com/openai/v1/chat/completions"
        );
        for bad in ["api.example.com/v1", "ftp://x/v1", "http://x/v1?k=1", ""] {
            let e = base_url(bad).unwrap_err().to_string();
            assert!(e.contains("base URL"), "{bad}: {e}");
        }
    }

    #[test]
    fn an_overflowing_request_keeps_openai_fields_only() {
        let body = serde_json::json!({"model": "m", "messages": [], "temperature": 0.5, "seed": 3,
            "top_k": 40, "min_p": 0.1, "repeat_penalty": 1.1, "ignore_eos": true, "stream": true});
        let kept = openai_fields_only(body);
        assert_eq!(
            kept,
            serde_json::json!({"model": "m", "messages": [], "temperature": 0.5, "seed": 3, "stream": true})
        );
    }

    #[test]
    fn a_secret_never_prints() {
        let config = UpstreamConfig {
            url: "http://x/v1".into(),
            key: Some(Secret::new("sk-very-secret")),
            overflow: false,
            overflow_model: None,
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("sk-very-secret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn a_model_list_is_read_from_openai_shape_only() {
        let list = serde_json::json!({"object": "list", "data": [{"id": "a"}, {"id": "b"}]});
        assert_eq!(model_ids(&list), Some(vec!["a".into(), "b".into()]));
        assert_eq!(model_ids(&serde_json::json!({"models": []})), None);
        assert_eq!(
            model_ids(&serde_json::json!({"data": [{"name": "a"}]})),
            None
        );
    }
}
