//! A cluster that heals, with real processes on loopback: a worker killed (`kill -9`) or
//! stopped (`SIGSTOP`) while it carries a streamed answer. The answer pauses, the
//! coordinator re-plans over the workers that remain, replays the answer's history there,
//! and the client gets exactly the tokens of the undisturbed run. (The simulated pipeline
//! in `coordinator/tests` covers every fault kind in seconds; these confirm the shells.)

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;

/// A streamed greedy completion and a seeded sampled one, 48 tokens each.
fn bodies() -> [String; 2] {
    [
        r#"{"prompt":"The old lighthouse keeper","max_tokens":48,"temperature":0,"stream":true,"ignore_eos":true}"#.into(),
        r#"{"prompt":"Once upon a time","max_tokens":48,"temperature":0.8,"top_p":0.95,"seed":7,"stream":true,"ignore_eos":true}"#.into(),
    ]
}

/// What each body gives when nothing goes wrong.
fn twins(cluster: &TestCluster) -> Vec<Vec<String>> {
    bodies()
        .iter()
        .map(|b| {
            let events = SseStream::start(&cluster.http, "/v1/completions", b)
                .finish(Duration::from_secs(60));
            let (pieces, finish) = completion_text(&events);
            assert_eq!(finish, "length");
            assert_eq!(pieces.len(), 48);
            pieces
        })
        .collect()
}

/// Starts every body, waits for 10 tokens of the first, does `fault` to the middle stage's
/// worker, and checks each answer against its twin. Returns seconds from the fault to the
/// last token.
fn fault_mid_answer(cluster: &mut TestCluster, fault: impl FnOnce(&mut Proc)) -> f64 {
    let status = cluster.wait_serving(3);
    let middle = status["plan"]["stages"][1]["worker"]
        .as_str()
        .unwrap()
        .to_string();
    let twins = twins(cluster);
    let streams: Vec<SseStream> = bodies()
        .iter()
        .map(|b| SseStream::start(&cluster.http, "/v1/completions", b))
        .collect();
    streams[0].wait_received(10, Duration::from_secs(60));
    let victim = cluster
        .workers
        .iter_mut()
        .find(|w| w.name == middle)
        .unwrap();
    let faulted_at = Instant::now();
    fault(victim);
    let mut last = faulted_at;
    for (i, (stream, twin)) in streams.into_iter().zip(&twins).enumerate() {
        let events = stream.finish(Duration::from_secs(90));
        let (pieces, finish) = completion_text(&events);
        assert_eq!(finish, "length", "answer {i}");
        assert_eq!(
            &pieces, twin,
            "answer {i} differs from its undisturbed twin"
        );
        last = last.max(events.last().unwrap().0);
    }
    let seconds = (last - faulted_at).as_secs_f64();
    eprintln!("fault to last token: {seconds:.2}s");
    // The coordinator re-planned without the worker and serves on two stages.
    let status = cluster.status();
    assert!(status["plan"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["worker"] != middle.as_str()));
    seconds
}

#[test]
fn a_worker_killed_mid_answer_does_not_change_the_answer() {
    let (_dir, model) = small_gguf("q8_0");
    let mut cluster = TestCluster::start(&model, &ClusterOptions::default());
    // Each worker measured its own speed with a real layer forward.
    for w in cluster.wait_serving(3)["workers"].as_array().unwrap() {
        assert!(w["speed_bytes_per_second"].as_f64().unwrap() > 1e6, "{w:#}");
    }
    fault_mid_answer(&mut cluster, |w| w.kill());
    let status = cluster.wait_serving(2);
    assert!(status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["state"] == "dead"));
}

#[test]
fn a_stopped_worker_counts_as_failed_and_rejoins_when_continued() {
    let (_dir, model) = small_gguf("q8_0");
    let mut cluster = TestCluster::start(&model, &ClusterOptions::default());
    let mut stopped = 0;
    fault_mid_answer(&mut cluster, |w| {
        stopped = w.child.id();
        signal("STOP", stopped);
    });
    // Continued, it answers again and the cluster plans it back in.
    signal("CONT", stopped);
    cluster.wait_serving(3);
}

fn signal(name: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} {pid}");
}
