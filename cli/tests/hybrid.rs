//! The hybrid route, as a user runs it: two clusters on loopback, A started with
//! `--upstream` pointing at B's OpenAI endpoint (B needs a key, which A holds). A lists
//! B's model as `upstream/<name>` and has B answer it, whole and streamed; with A's
//! worker gone, a plain request overflows to B and a private one does not; A's `/metrics`
//! counts both routes by label; the key appears in no log.

#![allow(clippy::unwrap_used)] // a failure is a test failure

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::http::*;

const B_KEY: &str = "sk-upstream-b-7f3a9c";

fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": 6, "ignore_eos": true, "temperature": 0, "stream": stream,
    })
    .to_string()
}

/// A whole chat answer of `model` from `addr` with `headers`: status, head, body.
fn ask(addr: &str, model: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let body = chat(model, false);
    exchange_with(addr, "POST", "/v1/chat/completions", Some(&body), headers)
}

fn generated(addr: &str) -> f64 {
    metrics(addr)["strata_generated_tokens_total"]
}

#[test]
fn a_cluster_routes_upstream_models_and_overflow_to_another_and_keeps_private_ones() {
    let (_dir, model) = small_gguf("q8_0");
    let b = TestCluster::start(
        &model,
        &ClusterOptions {
            workers: 1,
            serve_args: vec!["--api-key".into(), B_KEY.into(), "--open-metrics".into()],
            ..Default::default()
        },
    );
    wait_healthy(&b.http);
    let a_options = ClusterOptions {
        workers: 1,
        serve_args: vec![
            "--upstream".into(),
            format!("http://{}/v1", b.http),
            "--upstream-key".into(),
            B_KEY.into(),
            "--overflow".into(),
            "upstream".into(),
        ],
        // The most a log could say, so that a key written anywhere would show.
        prefix: vec![vec!["env".into(), "RUST_LOG=debug,reqwest=trace".into()]],
        ..Default::default()
    };
    let mut a = TestCluster::start(&model, &a_options);
    wait_healthy(&a.http);

    // A lists its own model and B's, the latter as upstream/<name>.
    let (status, body) = http(&a.http, "GET", "/v1/models", None, None);
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let local = ids[0].to_string();
    let remote = format!("upstream/{local}");
    assert_eq!(ids, [local.as_str(), remote.as_str()], "{body}");

    // upstream/<name> is answered by B, whole and streamed.
    let before = generated(&b.http);
    let (status, head, body) = ask(&a.http, &remote, &[]);
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("x-strata-route: upstream"), "{head}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer["model"],
        local.as_str(),
        "B names its own model: {body}"
    );
    assert_eq!(answer["usage"]["completion_tokens"], 6, "{body}");
    assert_eq!(generated(&b.http), before + 6.0);
    let stream = SseStream::start(&a.http, "/v1/chat/completions", &chat(&remote, true));
    let events = stream.finish(Duration::from_secs(60));
    let (pieces, finish) = completion_text(&events);
    assert!(pieces.len() >= 2, "a stream of pieces, got {events:?}");
    assert_eq!(finish, "length", "{events:?}");
    assert_eq!(generated(&b.http), before + 12.0);

    // A private request never leaves: asking for an upstream model is refused.
    let private = [("x-strata-private", "1")];
    let (status, _, body) = ask(&a.http, &remote, &private);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("private"), "{body}");

    // The cluster's own model is answered by A.
    let (status, head, body) = ask(&a.http, &local, &[]);
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("x-strata-route: local"), "{head}");
    assert_eq!(generated(&b.http), before + 12.0);

    // A's worker goes: A cannot serve.
    a.workers[0].kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&a.http, "GET", "/health", None, None).0 != 503 {
        assert!(
            Instant::now() < deadline,
            "A kept serving without its worker"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A plain request overflows to B ...
    let (status, head, body) = ask(&a.http, &local, &[]);
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("x-strata-route: upstream"), "{head}");
    assert_eq!(generated(&b.http), before + 18.0);
    // ... a private one is refused, says why, and B never sees it.
    let (status, head, body) = ask(&a.http, &local, &private);
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(body.contains("private, so it was not sent"), "{body}");
    assert_eq!(generated(&b.http), before + 18.0);

    // A's /metrics says what left the LAN, by label; so does its dashboard's data.
    let m = metrics(&a.http);
    let routed = |route: &str, reason: &str| {
        m[&format!("strata_routed_requests_total{{reason=\"{reason}\",route=\"{route}\"}}")]
    };
    assert_eq!(routed("upstream", "model"), 2.0);
    assert_eq!(routed("upstream", "overflow"), 1.0);
    assert_eq!(routed("local", "model"), 1.0);
    assert_eq!(routed("local", "private"), 1.0);
    let (status, body) = http(&a.http, "GET", "/v1/cluster", None, None);
    assert_eq!(status, 200);
    let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cluster["routed"]["upstream"], 3, "{body}");
    assert_eq!(cluster["routed"]["local"], 2, "{body}");
    let upstream_rows = cluster["recent_requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["route"] == "upstream")
        .count();
    assert_eq!(upstream_rows, 3, "{body}");

    // The key went to B and nowhere else.
    let log = a.coordinator.output();
    assert!(log.contains("hybrid route"), "{log}");
    assert!(
        !log.contains(B_KEY),
        "A's log shows the upstream key:\n{log}"
    );
    assert!(!b.coordinator.output().contains(B_KEY));
}

#[test]
fn under_private_only_nothing_upstream_is_listed_or_served() {
    let (_dir, model) = small_gguf("q8_0");
    let b = TestCluster::start(
        &model,
        &ClusterOptions {
            workers: 1,
            ..Default::default()
        },
    );
    wait_healthy(&b.http);
    let a = TestCluster::start(
        &model,
        &ClusterOptions {
            workers: 0,
            serve_args: vec![
                "--upstream".into(),
                format!("http://{}/v1", b.http),
                "--overflow".into(),
                "upstream".into(),
                "--private-only".into(),
            ],
            ..Default::default()
        },
    );
    let (status, body) = http(&a.http, "GET", "/v1/models", None, None);
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{body}");
    let local = list["data"][0]["id"].as_str().unwrap().to_string();
    // Even a header that says it may leave does not let it.
    let (status, _, body) = ask(
        &a.http,
        &format!("upstream/{local}"),
        &[("x-strata-private", "0")],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--private-only"), "{body}");
    assert_eq!(generated(&b.http), 0.0);
}

#[test]
fn bad_upstream_settings_are_refused_at_start_with_what_to_do() {
    let (_dir, model) = small_gguf("q8_0");
    for (args, needle) in [
        (
            vec!["--overflow", "upstream"],
            "--overflow upstream needs --upstream",
        ),
        (vec!["--upstream", "api.example.com/v1"], "base URL"),
        (
            vec!["--upstream", "ftp://example.com/v1"],
            "not http or https",
        ),
    ] {
        let out = common::strata()
            .args(["serve", "--model", model.to_str().unwrap(), "--no-mdns"])
            .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(["--state-dir", _dir.path().join("state").to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn no_help_text_shows_a_secret_from_the_environment() {
    let secrets = [
        ("STRATA_API_KEY", "sk-api-0d1e"),
        ("STRATA_UPSTREAM_KEY", "sk-up-5a7c"),
        ("STRATA_TOKEN", "strata1-tok-9b2f"),
        ("STRATA_OPERATOR_KEY", "op-key-3c8d"),
    ];
    for command in [
        &["serve"][..],
        &["worker"],
        &["generate"],
        &["chat"],
        &["bench"],
        &["cluster", "status"],
        &["cluster", "drain"],
    ] {
        let mut cmd = common::strata();
        cmd.args(command).arg("--help");
        for (name, value) in secrets {
            cmd.env(name, value);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{command:?} --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        for (name, value) in secrets {
            assert!(
                !help.contains(value),
                "`strata {command:?} --help` shows {name}:\n{help}"
            );
        }
    }
}
