//! A cluster that heals, with real processes on loopback: a worker killed (`kill -9`) or
//! stopped (`SIGSTOP`) while it carries a streamed answer. The answer pauses, the
//! coordinator re-plans over the workers that remain, replays the answer's history there,
//! and the client gets exactly the tokens of the undisturbed run. (The simulated pipeline
//! in `coordinator/tests` covers every fault kind in seconds; these confirm the shells.)

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::strata;

/// A streamed greedy completion and a seeded sampled one, `n` tokens each.
fn bodies(n: usize) -> [String; 2] {
    [
        format!(
            r#"{{"prompt":"The old lighthouse keeper","max_tokens":{n},"temperature":0,"stream":true,"ignore_eos":true}}"#
        ),
        format!(
            r#"{{"prompt":"Once upon a time","max_tokens":{n},"temperature":0.8,"top_p":0.95,"seed":7,"stream":true,"ignore_eos":true}}"#
        ),
    ]
}

/// Streams every body at once.
fn stream_all(cluster: &TestCluster, n: usize) -> Vec<SseStream> {
    bodies(n)
        .iter()
        .map(|b| SseStream::start(&cluster.http, "/v1/completions", b))
        .collect()
}

/// What each body gives when nothing goes wrong.
fn twins(cluster: &TestCluster, n: usize) -> Vec<Vec<String>> {
    stream_all(cluster, n)
        .into_iter()
        .map(|s| {
            let (pieces, finish) = completion_text(&s.finish(Duration::from_secs(120)));
            assert_eq!(finish, "length");
            assert_eq!(pieces.len(), n);
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
    let twins = twins(cluster, 48);
    let streams = stream_all(cluster, 48);
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

#[test]
fn the_last_stage_killed_while_it_drafts_hands_its_draft_model_to_the_next() {
    let (_dir, model) = small_gguf("q8_0");
    // The model drafts for itself, on the last stage's worker: greedy, every draft is kept.
    let m = model.display().to_string();
    let options = ClusterOptions {
        serve_args: vec![
            "--draft-model".into(),
            m,
            "--draft-on".into(),
            "worker".into(),
            "--draft-max".into(),
            "2".into(),
        ],
        ..Default::default()
    };
    let mut cluster = TestCluster::start(&model, &options);
    let status = cluster.wait_serving(3);
    let last = status["plan"]["stages"][2]["worker"]
        .as_str()
        .unwrap()
        .to_string();
    let n = 400;
    let greedy = &bodies(n)[0];
    let (twin, _) = completion_text(
        &SseStream::start(&cluster.http, "/v1/completions", greedy)
            .finish(Duration::from_secs(120)),
    );
    assert_eq!(twin.len(), n);
    let stream = SseStream::start(&cluster.http, "/v1/completions", greedy);
    stream.wait_received(10, Duration::from_secs(60));
    // The status says where the draft model is: with the last stage only.
    let holders = |status: &serde_json::Value| -> Vec<String> {
        status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["draft_model"] == true)
            .map(|w| w["id"].as_str().unwrap().to_string())
            .collect()
    };
    let status = cluster.wait_status(
        "the last stage to hold the draft model",
        Duration::from_secs(30),
        |s| !holders(s).is_empty(),
    );
    assert_eq!(holders(&status), std::slice::from_ref(&last));
    assert!(
        status["drafts"].as_str().unwrap().contains("last stage"),
        "{status}"
    );
    let victim = cluster.workers.iter_mut().find(|w| w.name == last).unwrap();
    assert!(
        victim.output().contains("draft model loaded"),
        "{}",
        victim.output()
    );
    // Stopped first, so that the answer is surely cut off while the victim drafts for it.
    signal("STOP", victim.child.id());
    let cut = stream.received();
    assert!(cut < n, "the answer ended before the fault");
    victim.kill();
    let (pieces, finish) = completion_text(&stream.finish(Duration::from_secs(90)));
    assert_eq!(finish, "length");
    assert_eq!(pieces, twin, "cut at {cut} of {n}, the answer changed");
    // The new last stage got the draft model and drafts with it.
    let status = cluster.wait_serving(2);
    let new_last = status["plan"]["stages"][1]["worker"].as_str().unwrap();
    let heir = cluster.workers.iter().find(|w| w.name == new_last).unwrap();
    heir.wait_for("draft model loaded", Duration::from_secs(30));
    let heir_id = heir.name.clone();
    cluster.wait_status(
        "the next last stage to hold the draft model",
        Duration::from_secs(30),
        |s| holders(s) == [heir_id.clone()],
    );
    let args = [
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "24",
        "--ignore-eos",
    ];
    let t = &cluster.generate(&args)["timings"];
    assert!(t["draft_tokens"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(t["accepted_draft_tokens"], t["draft_tokens"], "{t}");
}

fn signal(name: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} {pid}");
}

#[test]
fn a_restarted_coordinator_serves_again_with_the_workers_it_had_and_sends_no_weights() {
    let (_dir, model) = small_gguf("q8_0");
    let options = ClusterOptions::default();
    let mut cluster = TestCluster::start(&model, &options);
    cluster.wait_serving(3);
    let args = [
        "--prompt",
        "the same again",
        "--max-tokens",
        "12",
        "--ignore-eos",
    ];
    let before = tokens(&cluster.generate(&args));
    // Each worker's heartbeat reports the bytes it received.
    cluster.wait_status("bytes received reported", Duration::from_secs(10), |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["bytes_received"].as_u64() > Some(0))
    });
    let received = cluster.bytes_received();
    let killed_at = Instant::now();
    cluster.restart_coordinator(&model, &options);
    cluster.wait_serving(3);
    eprintln!(
        "coordinator killed and restarted: serving again after {:.2}s",
        killed_at.elapsed().as_secs_f64()
    );
    // The workers kept their slices: not one byte of weights travelled again (each
    // reports its count with its first heartbeat to the new coordinator).
    cluster.wait_status("bytes received reported", Duration::from_secs(10), |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["bytes_received"].as_u64() > Some(0))
    });
    assert_eq!(cluster.bytes_received(), received);
    assert_eq!(tokens(&cluster.generate(&args)), before);
}

#[test]
fn joining_and_draining_while_answers_stream_fails_none_and_changes_none() {
    let (_dir, model) = small_gguf("q8_0");
    let options = ClusterOptions {
        workers: 2,
        ..Default::default()
    };
    let mut cluster = TestCluster::start(&model, &options);
    cluster.wait_serving(2);
    // Long answers, so the change lands in the middle of them.
    const N: usize = 1200;
    let twins = twins(&cluster, N);
    // A worker joins while the answers stream: the plan grows to three stages.
    let streams = stream_all(&cluster, N);
    streams[0].wait_received(5, Duration::from_secs(60));
    cluster.add_worker("w3", &options, None);
    cluster.wait_serving(3);
    assert!(
        streams[0].received() < N,
        "the join landed after the answers"
    );
    check_twins(streams, &twins);
    // One drains while they stream: the plan shrinks to two, and it is released.
    let streams = stream_all(&cluster, N);
    streams[0].wait_received(5, Duration::from_secs(60));
    let out = strata()
        .args(["cluster", "drain", "w1", "--coordinator", &cluster.api])
        .args(["--state-dir", &cluster.state_dir()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.wait_status("w1 released", Duration::from_secs(60), |s| {
        s["plan"]["stages"]
            .as_array()
            .is_some_and(|st| st.len() == 2 && st.iter().all(|x| x["worker"] != "w1"))
    });
    assert!(
        streams[0].received() < N,
        "the drain landed after the answers"
    );
    // Released means unloaded: its heartbeats say it holds no slice.
    cluster.wait_status("w1 unloaded", Duration::from_secs(30), |s| {
        s["workers"].as_array().unwrap().iter().any(|w| {
            w["id"] == "w1"
                && w["layers"] == serde_json::json!([0, 0])
                && w["detail"].as_str().unwrap_or("").contains("drained")
        })
    });
    check_twins(streams, &twins);
}

/// Checks each streamed answer against its twin and says how it paused; returns when the
/// last token came.
fn check_twins(streams: Vec<SseStream>, twins: &[Vec<String>]) -> Instant {
    let mut last = Instant::now() - Duration::from_secs(3600);
    for (i, (stream, twin)) in streams.into_iter().zip(twins).enumerate() {
        let events = stream.finish(Duration::from_secs(90));
        let (pieces, finish) = completion_text(&events);
        assert_eq!(finish, "length", "answer {i}");
        assert_eq!(
            &pieces, twin,
            "answer {i} differs from its undisturbed twin"
        );
        let gaps: Vec<f64> = events
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).as_secs_f64())
            .collect();
        let longest = gaps.iter().copied().fold(0.0, f64::max);
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        eprintln!(
            "answer {i}: median gap {:.1} ms, longest {:.1} ms",
            sorted[sorted.len() / 2] * 1e3,
            longest * 1e3
        );
        last = last.max(events.last().unwrap().0);
    }
    last
}

#[test]
fn when_the_rest_cannot_hold_the_model_an_answer_waits_for_a_worker_then_says_what_is_missing() {
    let (_dir, model) = small_gguf("q8_0");
    // One worker of 67 MiB cannot hold this model (it needs about 72 MiB, a batch's
    // activations included); two can.
    let options = ClusterOptions {
        workers: 2,
        worker_args: vec![
            "--memory".into(),
            "67MiB".into(),
            "--speed".into(),
            "1e9".into(),
        ],
        serve_args: vec!["--recover-wait".into(), "8s".into()],
        ..Default::default()
    };
    let mut cluster = TestCluster::start(&model, &options);
    cluster.wait_serving(2);
    let [body, _] = bodies(48);
    let twin = completion_text(
        &SseStream::start(&cluster.http, "/v1/completions", &body).finish(Duration::from_secs(60)),
    );
    // w1 dies mid-answer; w3 joins while the answer waits: it finishes as it would have.
    let stream = SseStream::start(&cluster.http, "/v1/completions", &body);
    stream.wait_received(10, Duration::from_secs(60));
    cluster.workers[0].kill();
    cluster.add_worker("w3", &options, None);
    assert_eq!(
        completion_text(&stream.finish(Duration::from_secs(60))),
        twin
    );
    // w2 dies mid-answer and nobody joins: after the wait, the stream says what is missing.
    cluster.wait_serving(2);
    let stream = SseStream::start(&cluster.http, "/v1/completions", &body);
    stream.wait_received(10, Duration::from_secs(60));
    let w2 = cluster.workers.iter_mut().find(|w| w.name == "w2").unwrap();
    w2.kill();
    let events = stream.finish(Duration::from_secs(60));
    let error = events
        .iter()
        .find_map(|(_, e)| e["error"]["message"].as_str().map(str::to_string))
        .expect("the stream ends with an error");
    assert!(
        error.contains("w2") && error.contains("missing"),
        "the error should name the lost worker and what is missing: {error}"
    );
}
