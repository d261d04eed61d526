//! The OpenAI-compatible HTTP API as plain HTTP clients (curl, the `openai` libraries) use
//! it: models, chat and text completions whole and streamed (SSE ending in `[DONE]`),
//! OpenAI-shaped errors with their status codes, and `/health`.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::cluster::*;

/// One HTTP/1.1 exchange: status code and body (chunked bodies de-chunked).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, tail) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (status, body)
}

#[test]
fn openai_endpoints_answer_like_openai() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "m.gguf",
    );
    let options = ClusterOptions {
        workers: 2,
        serve_args: vec![
            "--wire-dtype".into(),
            "f32".into(),
            "--api-key".into(),
            "k3y".into(),
        ],
        ..Default::default()
    };
    let cluster = TestCluster::start(&model, &options);
    let key = Some("k3y");
    // Health says 503 until the plan is loaded, then 200.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, _) = http(&cluster.http, "GET", "/health", None, None);
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(std::time::Instant::now() < deadline, "never healthy");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (status, body) = http(&cluster.http, "GET", "/v1/models", None, key);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["id"], "m.gguf");

    // Without the key: 401 in OpenAI's error shape.
    let (status, body) = http(&cluster.http, "GET", "/v1/models", None, None);
    assert_eq!(status, 401);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("API key"));

    // A whole chat completion: greedy, the same tokens as the local chat run.
    let local = local_generate(
        &model,
        &["--prompt", "Hello there", "--chat", "--max-tokens", "8"],
    );
    let req = r#"{"model":"m.gguf","messages":[{"role":"user","content":"Hello there"}],"max_tokens":8,"temperature":0}"#;
    let (status, body) = http(
        &cluster.http,
        "POST",
        "/v1/chat/completions",
        Some(req),
        key,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], local["text"]);
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        tokens(&local).len() as u64
    );
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));

    // Streamed: chunks whose deltas add up to the same text, usage on request, then [DONE].
    let req = r#"{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":8,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}"#;
    let (status, body) = http(
        &cluster.http,
        "POST",
        "/v1/chat/completions",
        Some(req),
        key,
    );
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let mut text = String::new();
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(text, local["text"].as_str().unwrap());
    assert!(usage.unwrap()["total_tokens"].as_u64().unwrap() > 0);

    // A text completion from token ids.
    let req = r#"{"prompt":[1,2,3,4],"max_tokens":5,"temperature":0}"#;
    let (status, body) = http(&cluster.http, "POST", "/v1/completions", Some(req), key);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    // Bad requests: 400 with a message that says what was wrong.
    for (path, req, needle) in [
        (
            "/v1/chat/completions",
            r#"{"messages":"hi"}"#,
            "chat completion request",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[],"max_tokens":3}"#,
            "at least one message",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
            "n = 1",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":-1}"#,
            "temperature",
        ),
        ("/v1/completions", r#"{"prompt":[999999]}"#, "vocabulary"),
    ] {
        let (status, body) = http(&cluster.http, "POST", path, Some(req), key);
        assert_eq!(status, 400, "{req}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{req}: {body}"
        );
    }
    let (status, _) = http(
        &cluster.http,
        "POST",
        "/v1/chat/completions",
        Some(r#"{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}"#),
        key,
    );
    assert_eq!(status, 404);
}
