//! The OpenAI-compatible HTTP API as plain HTTP clients (curl, the `openai` libraries) use
//! it: models, chat and text completions whole and streamed (SSE ending in `[DONE]`),
//! OpenAI-shaped errors with their status codes, `/health`, logprobs, `/metrics`, a client
//! that hangs up mid-stream, the dashboard in headless Chromium, and the official `openai`
//! Python client; Ollama's API on the same port, with the official `ollama` client; and
//! (opt-in, STRATA_TEST_OPENWEBUI=1) Open WebUI chatting with `strata demo` in headless Chromium.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::http::*;

#[test]
fn openai_endpoints_answer_like_openai() {
    let (_dir, model) = small_gguf("q8_0");
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
    // Only `/health` and the dashboard page answer without it; `/metrics` needs it too.
    for (path, open) in [
        ("/health", true),
        ("/", true),
        ("/metrics", false),
        ("/v1/cluster", false),
    ] {
        let (status, body) = http(&cluster.http, "GET", path, None, None);
        assert_eq!(status, if open { 200 } else { 401 }, "{path}: {body}");
        let (status, body) = http(&cluster.http, "GET", path, None, Some("k3y-but-wrong"));
        assert_eq!(status, if open { 200 } else { 401 }, "{path}: {body}");
    }
    let (status, body) = http(&cluster.http, "GET", "/metrics", None, key);
    assert_eq!(status, 200, "{body}");

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
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":1e308}"#,
            "got 1e308",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
            "at least 1",
        ),
        (
            "/v1/completions",
            r#"{"prompt":[1,2,3],"max_tokens":1000000000}"#,
            "max_tokens is 1000000000, 1000000003 in all, but the model's context holds",
        ),
        ("/v1/completions", r#"{"prompt":[999999]}"#, "vocabulary"),
        (
            "/v1/completions",
            r#"{"prompt":[-1]}"#,
            "token -1 is not in",
        ),
        (
            "/v1/completions",
            r#"{"prompt":[1],"stop":["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}"#,
            "17 stop strings",
        ),
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
    // A stop string over 256 bytes, and a body over the size limit (413, not 400).
    let long_stop = format!(r#"{{"prompt":[1],"stop":["{}"]}}"#, "x".repeat(300));
    let (status, body) = http(
        &cluster.http,
        "POST",
        "/v1/completions",
        Some(&long_stop),
        key,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("stop string of 300 bytes"), "{body}");
    let huge = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(3 << 20));
    let (status, body) = http(&cluster.http, "POST", "/v1/completions", Some(&huge), key);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("over the limit"), "{body}");

    // Sampling with no seed: a fresh one each time, reported, and it reproduces the answer.
    let sampled = |seed: Option<u64>| {
        let seed = seed.map(|s| format!(r#","seed":{s}"#)).unwrap_or_default();
        let req = format!(r#"{{"prompt":[1,2,3],"max_tokens":12,"temperature":1.5{seed}}}"#);
        let (status, head, body) =
            exchange(&cluster.http, "POST", "/v1/completions", Some(&req), key);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let seed = v["seed"].as_u64().unwrap();
        assert!(head.contains(&format!("x-strata-seed: {seed}")), "{head}");
        (seed, v["choices"][0]["text"].as_str().unwrap().to_string())
    };
    let (seed_a, text_a) = sampled(None);
    let (seed_b, _) = sampled(None);
    assert_ne!(
        seed_a, seed_b,
        "two requests without a seed got the same one"
    );
    assert_eq!(sampled(Some(seed_a)), (seed_a, text_a));
}

#[test]
fn a_burst_is_answered_or_refused_with_retry_after_within_the_kv_budget() {
    let (_dir, model) = small_gguf("q8_0");
    // Room for one request of 8 + 40 positions at a time, and two waiting.
    let options = ClusterOptions {
        workers: 2,
        serve_args: vec![
            "--kv-tokens".into(),
            "64".into(),
            "--max-queue".into(),
            "2".into(),
        ],
        ..Default::default()
    };
    let cluster = TestCluster::start(&model, &options);
    wait_healthy(&cluster.http);
    // Needing more positions than a stage holds: 400 at once, naming both numbers.
    let req = r#"{"prompt":[1,2,3,4,5,6,7,8],"max_tokens":100}"#;
    let (status, body) = http(&cluster.http, "POST", "/v1/completions", Some(req), None);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("needs 108 KV-cache positions") && body.contains("holds 64"),
        "{body}"
    );

    let burst: Vec<_> = (0..10)
        .map(|i| {
            let addr = cluster.http.clone();
            std::thread::spawn(move || {
                let req = format!(
                    r#"{{"prompt":[1,2,3,4,5,6,7,{}],"max_tokens":40,"ignore_eos":true,"temperature":0}}"#,
                    10 + i
                );
                exchange(&addr, "POST", "/v1/completions", Some(&req), None)
            })
        })
        .collect();
    let (mut answered, mut refused) = (0, 0);
    for handle in burst {
        let (status, head, body) = handle.join().unwrap();
        match status {
            200 => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["usage"]["completion_tokens"], 40, "{body}");
                answered += 1;
            }
            429 => {
                assert!(head.contains("retry-after: "), "{head}");
                assert!(body.contains("busy"), "{body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    // One runs and two wait at any moment, so some were refused and at least three answered.
    assert!(
        answered >= 3 && refused >= 1,
        "{answered} answered, {refused} refused"
    );
    // The last reservation goes back once the stages say they dropped its caches.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = metrics(&cluster.http);
        if m["strata_kv_positions{kind=\"reserved\"}"] == 0.0 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "reservations were never given back"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        m["strata_requests_refused_total{reason=\"busy\"}"],
        refused as f64
    );
    assert_eq!(m["strata_queue_depth"], 0.0);
    assert_eq!(m["strata_kv_positions{kind=\"capacity\"}"], 64.0);
    let (status, _) = http(&cluster.http, "GET", "/health", None, None);
    assert_eq!(status, 200);
}

/// A program the test needs, found on PATH or named by an environment variable. Without it
/// the test prints why it skipped; under CI (where .ci/run installs it) it fails instead.
fn required_tool(env: &str, candidates: &[&str], probe: &[&str], what: &str) -> Option<String> {
    let names: Vec<String> = match std::env::var(env) {
        Ok(v) => vec![v],
        Err(_) => candidates.iter().map(|s| s.to_string()).collect(),
    };
    for name in names {
        let ok = std::process::Command::new(&name)
            .args(probe)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(name);
        }
    }
    let why = format!("{what} not found (set {env}, or run .ci/run which installs it)");
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

#[test]
fn logprobs_metrics_dashboard_and_a_client_that_leaves() {
    let (_dir, model) = small_gguf("q8_0");
    let cluster = TestCluster::start(&model, &exact_wire());
    wait_healthy(&cluster.http);
    let before = metrics(&cluster.http);

    // Chat logprobs: one entry per token, the greedy choice is the most likely alternative.
    let req = r#"{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":6,"temperature":0,"logprobs":true,"top_logprobs":3}"#;
    let (status, body) = http(
        &cluster.http,
        "POST",
        "/v1/chat/completions",
        Some(req),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let generated = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(content.len() as u64, generated);
    for step in content {
        let top = step["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{step}");
        let lp: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lp.windows(2).all(|w| w[0] >= w[1]), "sorted: {lp:?}");
        assert!(lp[0] <= 0.0);
        assert_eq!(
            step["logprob"].as_f64().unwrap(),
            lp[0],
            "greedy picks the top"
        );
        assert!(step["bytes"].is_array());
    }
    // Legacy completions: `logprobs: 2` gives tokens, token_logprobs and top_logprobs maps.
    let req = r#"{"prompt":[1,2,3,4],"max_tokens":4,"temperature":0,"logprobs":2}"#;
    let (status, body) = http(&cluster.http, "POST", "/v1/completions", Some(req), None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4, "{lp}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), 4);
    // Without logprobs, the field is null.
    let req = r#"{"prompt":[1,2,3],"max_tokens":2}"#;
    let (_, body) = http(&cluster.http, "POST", "/v1/completions", Some(req), None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["choices"][0]["logprobs"].is_null());
    let (status, _) = http(
        &cluster.http,
        "POST",
        "/v1/chat/completions",
        Some(r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":50}"#),
        None,
    );
    assert_eq!(status, 400);

    // The counters moved by what was served.
    let after = metrics(&cluster.http);
    let grew =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    assert_eq!(
        grew("strata_generated_tokens_total"),
        (generated + 4 + 2) as f64
    );
    assert!(grew("strata_prompt_tokens_total") > 7.0);
    assert!(grew("strata_time_to_first_token_seconds_count") >= 3.0);
    assert!(grew("strata_requests_total{outcome=\"length\"}") >= 2.0);
    assert_eq!(after["strata_workers{state=\"ready\"}"], 3.0);
    for w in ["w1", "w2", "w3"] {
        assert!(after[&format!("strata_worker_budget_bytes{{worker=\"{w}\"}}")] > 0.0);
    }
    // Per-stage compute time arrives with the next heartbeats.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&cluster.http);
        let all = ["w1", "w2", "w3"].iter().all(|w| {
            m.get(&format!(
                "strata_stage_compute_seconds_total{{worker=\"{w}\"}}"
            ))
            .is_some_and(|s| *s > 0.0)
                && m.contains_key(&format!(
                    "strata_stage_network_seconds_total{{worker=\"{w}\"}}"
                ))
        });
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no per-stage compute time: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A streaming client that hangs up after three events: its sequence is cancelled and
    // every stage frees its cache.
    let mut s = TcpStream::connect(&cluster.http).unwrap();
    let body = r#"{"messages":[{"role":"user","content":"Tell me everything"}],"max_tokens":400,"temperature":0.8,"stream":true}"#;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data: ").count() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http(&cluster.http, "GET", "/v1/cluster", None, None);
        let c: serde_json::Value = serde_json::from_str(&body).unwrap();
        let cached: u64 = c["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["sequences"].as_u64().unwrap())
            .sum();
        let cancelled = c["recent_requests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["outcome"] == "cancelled")
            .cloned();
        if c["active_sequences"] == 0 && cached == 0 {
            if let Some(r) = cancelled {
                assert!(r["completion_tokens"].as_u64().unwrap() < 400, "{r}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "the sequence was not freed: {c}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metrics(&cluster.http)["strata_requests_total{outcome=\"cancelled\"}"],
        1.0
    );

    // The dashboard in a real browser: the rendered DOM shows the workers and stages.
    let Some(chromium) = required_tool(
        "STRATA_TEST_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
        &["--version"],
        "Chromium (Debian package `chromium`)",
    ) else {
        return;
    };
    // Virtual time runs ahead of the real stream while the page polls; on a loaded machine
    // the answer can still be streaming when the budget ends, so look again (a bounded loop).
    let finished = "<div class=\"msg assistant\" data-done=\"true\">";
    let mut dom = String::new();
    for budget in [5_000, 20_000, 60_000] {
        let profile = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--dump-dom",
            ])
            .arg(format!("--virtual-time-budget={budget}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!(
                "http://{}/?ask=Hello%20there&max_tokens=4",
                cluster.http
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dom = String::from_utf8_lossy(&out.stdout).into_owned();
        if dom.contains(finished) {
            break;
        }
    }
    // Rows and stage blocks exist only once the page's script fetched and drew the cluster.
    for w in ["w1", "w2", "w3"] {
        assert!(
            dom.contains(&format!("<tr data-worker=\"{w}\">")),
            "no row for {w}:\n{dom}"
        );
        assert!(
            dom.contains(&format!("class=\"stage\" data-worker=\"{w}\"")),
            "no stage for {w}"
        );
    }
    assert!(
        dom.contains("id=\"serving\" class=\"on\">serving<"),
        "{dom}"
    );
    assert!(dom.contains(">cancelled<"), "recent requests are listed");
    // The chat box asked the question the link carried and streamed an answer into the page.
    assert!(
        dom.contains("<div class=\"msg user\">Hello there</div>"),
        "{dom}"
    );
    let answer = dom
        .split(finished)
        .nth(1)
        .unwrap_or_else(|| panic!("no finished answer in the chat box:\n{dom}"));
    assert!(!answer.starts_with("</div>"), "an empty answer");
}

/// Runs `tests/<script>` with Python (which must import `packages`) against a 2-worker
/// cluster started with `serve_args`, giving it the HTTP base URL and then `args`; the
/// script prints "all checks passed" when every check held.
fn python_client_checks(packages: &str, script: &str, serve_args: &[&str], args: &[&str]) {
    let Some(python) = required_tool(
        "STRATA_TEST_PYTHON",
        &["python3"],
        &["-c", &format!("import {packages}")],
        &format!("Python with {packages}"),
    ) else {
        return;
    };
    let (_dir, model) = small_gguf("q8_0");
    let mut options = exact_wire();
    options.workers = 2;
    options
        .serve_args
        .extend(serve_args.iter().map(|a| a.to_string()));
    let cluster = TestCluster::start(&model, &options);
    wait_healthy(&cluster.http);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests")
        .join(script);
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(format!("http://{}", cluster.http))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the {packages} client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[test]
fn the_official_openai_python_client_works() {
    python_client_checks(
        "openai, prometheus_client",
        "openai_client/check.py",
        &["--api-key", "s3cret"],
        &["s3cret", "m.gguf"],
    );
}

/// Ollama's API on the same port, as plain HTTP clients see it: the listing endpoints,
/// chat and generate whole and streamed as NDJSON (greedy, so the pieces add up to the
/// whole), Ollama's "load" reply, and `{"error"}` refusals with their status codes.
#[test]
fn ollama_endpoints_answer_like_ollama() {
    let (_dir, model) = small_gguf("q8_0");
    let mut options = exact_wire();
    options.workers = 2;
    let cluster = TestCluster::start(&model, &options);
    wait_healthy(&cluster.http);
    let addr = cluster.http.as_str();
    let json = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();

    let (status, body) = http(addr, "GET", "/api/version", None, None);
    assert_eq!(status, 200);
    assert!(json(&body)["version"].as_str().unwrap().starts_with("0."));
    let tags = json(&http(addr, "GET", "/api/tags", None, None).1);
    let listed = &tags["models"][0];
    assert_eq!(listed["model"], "m.gguf");
    assert_eq!(listed["details"]["format"], "gguf");
    assert_eq!(listed["details"]["quantization_level"], "Q8_0");
    assert!(listed["size"].as_u64().unwrap() > 0);
    let ps = json(&http(addr, "GET", "/api/ps", None, None).1);
    assert_eq!(ps["models"][0]["name"], "m.gguf");
    let show = json(
        &http(
            addr,
            "POST",
            "/api/show",
            Some(r#"{"model":"m.gguf:latest"}"#),
            None,
        )
        .1,
    );
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    assert_eq!(show["model_info"]["llama.block_count"], 6);
    let (status, body) = http(
        addr,
        "POST",
        "/api/show",
        Some(r#"{"model":"other"}"#),
        None,
    );
    assert_eq!(status, 404);
    assert!(json(&body)["error"].as_str().unwrap().contains("not found"));

    let chat = r#"{"model":"m.gguf","messages":[{"role":"user","content":"What is a stage?"}],"options":{"temperature":0,"num_predict":10}"#;
    let (status, body) = http(
        addr,
        "POST",
        "/api/chat",
        Some(&format!("{chat},\"stream\":false}}")),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let whole = json(&body);
    assert_eq!(whole["done"], true);
    assert_eq!(whole["done_reason"], "length");
    assert_eq!(whole["eval_count"], 10);
    assert_eq!(whole["message"]["role"], "assistant");
    let (status, head, body) =
        exchange(addr, "POST", "/api/chat", Some(&format!("{chat}}}")), None);
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/x-ndjson"),
        "{head}"
    );
    let lines: Vec<serde_json::Value> = body.lines().map(json).collect();
    let (last, pieces) = lines.split_last().unwrap();
    assert!(pieces
        .iter()
        .all(|l| l["done"] == false && l["created_at"].is_string()));
    let text: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        whole["message"]["content"].as_str().unwrap(),
        "streamed = whole"
    );
    assert_eq!(
        (last["done"].clone(), last["eval_count"].clone()),
        (true.into(), 10.into())
    );
    assert!(last["total_duration"].as_u64().unwrap() > 0);

    let generate = r#"{"model":"m.gguf","prompt":"Once upon a time","raw":true,"stream":false,"options":{"temperature":0,"num_predict":6}}"#;
    let g = json(&http(addr, "POST", "/api/generate", Some(generate), None).1);
    assert_eq!(g["eval_count"], 6);
    let context = g["context"].as_array().unwrap();
    assert_eq!(
        context.len(),
        g["prompt_eval_count"].as_u64().unwrap() as usize + 6
    );
    // Going on from `context` continues the same greedy answer.
    let again = format!(
        r#"{{"model":"m.gguf","prompt":" and","raw":true,"stream":false,"context":{},"options":{{"temperature":0,"num_predict":2}}}}"#,
        serde_json::Value::Array(context.clone())
    );
    let g2 = json(&http(addr, "POST", "/api/generate", Some(&again), None).1);
    assert_eq!(
        &g2["context"].as_array().unwrap()[..context.len()],
        &context[..]
    );
    let load = json(
        &http(
            addr,
            "POST",
            "/api/generate",
            Some(r#"{"model":"m.gguf"}"#),
            None,
        )
        .1,
    );
    assert_eq!(
        (load["done"].clone(), load["done_reason"].clone()),
        (true.into(), "load".into())
    );

    for (body, says) in [
        (
            r#"{"model":"m.gguf","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
            "tool",
        ),
        (
            r#"{"model":"m.gguf","messages":[{"role":"user","content":"x"}],"format":"json"}"#,
            "format",
        ),
        (
            r#"{"model":"m.gguf","messages":[{"role":"user","content":"x"}],"options":{"num_predict":0}}"#,
            "num_predict",
        ),
        (
            r#"{"model":"m.gguf","messages":[{"role":"user","content":"x","images":["aGk="]}]}"#,
            "text only",
        ),
        (
            r#"{"model":"m.gguf","messages":[{"role":"user","content":"x"}],"think":true}"#,
            "thinking",
        ),
        (r#"{"model":"m.gguf","messages":"#, "not"),
    ] {
        let (status, answer) = http(addr, "POST", "/api/chat", Some(body), None);
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            json(&answer)["error"].as_str().unwrap().contains(says),
            "{answer}"
        );
    }
}

#[test]
fn the_official_ollama_python_client_works() {
    python_client_checks("ollama", "ollama_client/check.py", &[], &["m.gguf"]);
}

#[test]
fn a_client_that_stops_reading_gives_its_room_to_others_and_resumes_when_it_reads() {
    let (_dir, model) = small_gguf("q8_0");
    // Room for the long answer (8 + 1000 positions) but not beside the short one (3 + 16).
    let options = ClusterOptions {
        workers: 2,
        serve_args: vec![
            "--kv-tokens".into(),
            "1020".into(),
            "--client-timeout".into(),
            "120s".into(),
        ],
        ..Default::default()
    };
    let cluster = TestCluster::start(&model, &options);
    wait_healthy(&cluster.http);
    let long = |stream: bool| {
        format!(
            r#"{{"prompt":[1,2,3,4,5,6,7,8],"max_tokens":1000,"ignore_eos":true,"temperature":0.9,"seed":11,"stream":{stream}}}"#
        )
    };
    let (status, body) = http(
        &cluster.http,
        "POST",
        "/v1/completions",
        Some(&long(false)),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let expected = v["choices"][0]["text"].as_str().unwrap().to_string();

    // The same answer streamed to a client that reads nothing for now: once the buffers
    // are full (the server's small send buffer, this socket's small receive buffer, a few
    // dozen events in the server), the answer stops one token ahead of its reader.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = cluster.http.parse().unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut stalled: TcpStream = sock.into();
    let body = long(true);
    write!(
        stalled,
        "POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Wait until its reservation is in (the short request must queue behind it).
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics(&cluster.http)["strata_kv_positions{kind=\"reserved\"}"] < 1008.0 {
        assert!(Instant::now() < deadline, "the long answer never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A short request waits for room; the stalled answer gives its room up (not after the
    // client timeout of 120 s, which would fail this deadline).
    let started = Instant::now();
    let short = r#"{"prompt":[9,9,9],"max_tokens":16,"ignore_eos":true}"#;
    let (status, body) = http(&cluster.http, "POST", "/v1/completions", Some(short), None);
    let waited = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(waited < Duration::from_secs(60), "waited {waited:?}");
    assert!(metrics(&cluster.http)["strata_preemptions_total"] >= 1.0);

    // The client reads again: the answer resumes by replay and is the one it would have
    // been (same tokens after the same sampler position).
    stalled
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut raw = String::new();
    stalled.read_to_string(&mut raw).unwrap();
    let mut text = String::new();
    let mut finish = None;
    for data in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            break;
        }
        let e: serde_json::Value = serde_json::from_str(data).unwrap();
        assert!(e.get("error").is_none(), "the stream failed: {e}");
        text.push_str(e["choices"][0]["text"].as_str().unwrap_or_default());
        if let Some(f) = e["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(text, expected);
    let reserved = || metrics(&cluster.http)["strata_kv_positions{kind=\"reserved\"}"];
    let deadline = Instant::now() + Duration::from_secs(10);
    while reserved() != 0.0 {
        assert!(
            Instant::now() < deadline,
            "reservations were never given back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A client that stops reading with nobody waiting keeps its room, its next step held;
    // when it hangs up, its caches and room are freed at once (not after the 30 s a step
    // in flight is given to land).
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut stalled: TcpStream = sock.into();
    let body = long(true);
    write!(
        stalled,
        "POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let generated = || metrics(&cluster.http)["strata_generated_tokens_total"];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (generated(), Instant::now());
    loop {
        assert!(Instant::now() < deadline, "the answer never stalled");
        std::thread::sleep(Duration::from_millis(100));
        let now = generated();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    assert_eq!(
        reserved(),
        1008.0,
        "a stalled answer keeps its room while nobody waits"
    );
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reserved() != 0.0 {
        assert!(
            Instant::now() < deadline,
            "a client that hung up kept its room"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Open WebUI (PyPI `open-webui`), the chat front end, against `strata demo`: its API lists
/// the demo model, and in headless Chromium a chat streams its answer into the page, which
/// is saved as target/tmp/openwebui.png (tests/openwebui/check.py, which also says how to
/// install what it needs). Open WebUI is a multi-GB install and takes a minute to start, so
/// this runs only with STRATA_TEST_OPENWEBUI=1, with the Python that has `open-webui` and
/// `playwright` in STRATA_OPENWEBUI_PYTHON (default `python3`).
#[test]
fn open_webui_lists_the_model_and_streams_a_chat() {
    if std::env::var("STRATA_TEST_OPENWEBUI").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: Open WebUI runs only with STRATA_TEST_OPENWEBUI=1 (see tests/openwebui/check.py)"
        );
        return;
    }
    let python = std::env::var("STRATA_OPENWEBUI_PYTHON").unwrap_or_else(|_| "python3".into());
    let screenshot = concat!(env!("CARGO_TARGET_TMPDIR"), "/openwebui.png");
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/openwebui/check.py"
        ))
        .args(["--strata", env!("CARGO_BIN_EXE_strata")])
        .args(["--screenshot", screenshot])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the Open WebUI checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    println!("screenshot: {screenshot}");
}
