//! A real cluster on loopback: `strata serve` and three `strata worker` processes. The
//! greedy tokens through the gRPC API must equal `strata generate --stages 1`; a worker
//! with a wrong token is refused; drain re-plans while the cluster keeps serving. (A worker
//! that dies mid-answer: `resilience.rs`.)

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

mod common;

use std::time::Duration;

use common::cluster::*;
use common::*;

const PROMPTS: [&str; 2] = [
    "The quick brown fox",
    "Once upon a time, in a land far away",
];

fn check_same_tokens(cluster: &TestCluster, model: &std::path::Path) {
    for prompt in PROMPTS {
        let args = ["--prompt", prompt, "--max-tokens", "16", "--ignore-eos"];
        let local = local_generate(model, &args);
        let remote = cluster.generate(&args);
        assert_eq!(tokens(&remote), tokens(&local), "prompt {prompt:?}");
        assert_eq!(tokens(&remote).len(), 16);
    }
}

/// Workers that report equal speeds get equal shares (2 layers each of 6): the stage
/// boundaries never move.
fn equal_speeds() -> ClusterOptions {
    ClusterOptions {
        worker_args: vec!["--speed".into(), "1e9".into()],
        ..Default::default()
    }
}

fn three_distinct_stages(status: &serde_json::Value) {
    let stages = status["plan"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    let workers: std::collections::HashSet<&str> = stages
        .iter()
        .map(|s| s["worker"].as_str().unwrap())
        .collect();
    assert_eq!(workers.len(), 3, "{status:#}");
    assert_eq!(stages[0]["layers"][0], 0);
    assert_eq!(stages[2]["layers"][1], 6);
}

#[test]
fn three_loopback_workers_match_one_process_for_q4_0_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q4_0"],
        "m.gguf",
    );
    let cluster = TestCluster::start(&model, &equal_speeds());
    let status = cluster.wait_serving(3);
    three_distinct_stages(&status);
    for w in status["workers"].as_array().unwrap() {
        assert!(w["peak_resident_bytes"].as_u64().unwrap() > 0, "{w:#}");
        assert_eq!(w["state"], "ready");
    }
    check_same_tokens(&cluster, &model);
    // The decode steps just run were measured: each stage shows its time beside its
    // estimate (what calibrates later plans).
    let status = cluster.wait_status("stages measured", Duration::from_secs(10), |s| {
        s["plan"]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|st| st["measured_ms_per_token"].as_f64() > Some(0.0))
    });
    eprintln!("{:#}", status["plan"]["stages"]);
    assert!(status["plan"]["calibrated_ms_per_token"].as_f64() > Some(0.0));
    // `cluster plan` shows the plan it would make now (with the measured speeds), and the
    // measurement beside each stage a worker already holds as planned.
    let plan: serde_json::Value = serde_json::from_str(&run_ok(&[
        "cluster",
        "plan",
        "--json",
        "--coordinator",
        &cluster.api,
    ]))
    .unwrap();
    let in_force = status["plan"]["stages"].as_array().unwrap();
    for stage in plan["stages"].as_array().unwrap() {
        let held = in_force
            .iter()
            .any(|s| s["worker"] == stage["worker"] && s["layers"] == stage["layers"]);
        assert_eq!(
            stage["measured_ms_per_token"].as_f64() > Some(0.0),
            held,
            "{stage:#}"
        );
    }
    // Every pair of workers had its link measured over the data plane when they joined.
    let links = status["links"].as_array().unwrap();
    eprintln!("{links:#?}");
    assert_eq!(links.len(), 3, "{links:?}");
    for l in links {
        assert!(l["bandwidth_bytes_per_second"].as_f64() > Some(1e6), "{l}");
        assert!(l["latency_ms"].as_f64() > Some(0.0), "{l}");
    }
}

#[test]
fn three_loopback_workers_match_one_process_for_f16_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "safetensors", "--dtype", "f16"],
        "m-f16",
    );
    let cluster = TestCluster::start(&model, &equal_speeds());
    three_distinct_stages(&cluster.wait_serving(3));
    check_same_tokens(&cluster, &model);
}

#[test]
fn drafted_steps_through_three_workers_give_the_tokens_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "m.gguf",
    );
    let options = ClusterOptions {
        serve_args: vec!["--draft".into(), "ngram".into()],
        ..equal_speeds()
    };
    let cluster = TestCluster::start(&model, &options);
    three_distinct_stages(&cluster.wait_serving(3));
    // A prompt in which its last token (7) is followed by every token of the vocabulary
    // somewhere: whatever the first token sampled, prompt lookup finds the pair and
    // drafts what followed it. Each step's drafts are kept or dropped on every stage, and
    // the tokens must be one process's all the same.
    let every_pair: Vec<String> = (0..512)
        .flat_map(|t| [7, t])
        .chain([7])
        .map(|t| t.to_string())
        .collect();
    let every_pair = every_pair.join(",");
    let mut drafted = 0;
    for args in [
        vec![
            "--prompt-ids",
            &every_pair,
            "--max-tokens",
            "32",
            "--ignore-eos",
        ],
        vec!["--prompt", PROMPTS[1], "--max-tokens", "32", "--ignore-eos"],
    ] {
        let local = local_generate(&model, &args);
        let remote = cluster.generate(&args);
        assert_eq!(tokens(&remote), tokens(&local), "{args:?}");
        // One process drafts the same way.
        let drafted_here = local_generate(&model, &[&args[..], &["--draft", "ngram"]].concat());
        assert_eq!(
            tokens(&drafted_here),
            tokens(&local),
            "{args:?}, drafted locally"
        );
        let t = &remote["timings"];
        drafted += t["draft_tokens"].as_u64().unwrap();
        assert!(t["passes"].as_u64().unwrap() <= 32, "{t}");
    }
    assert!(drafted > 0, "prompt lookup drafted nothing");
}

#[test]
fn a_draft_model_drafts_through_three_workers_greedy_and_sampled() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "m.gguf",
    );
    // The model drafts for itself: greedy, every draft is its own likeliest token; sampled,
    // drawn from the distribution the last stage judges it by, which keeps (nearly) all.
    let options = ClusterOptions {
        serve_args: vec!["--draft-model".into(), model.display().to_string()],
        ..equal_speeds()
    };
    let cluster = TestCluster::start(&model, &options);
    three_distinct_stages(&cluster.wait_serving(3));
    let greedy = ["--prompt", PROMPTS[1], "--max-tokens", "24", "--ignore-eos"];
    let remote = cluster.generate(&greedy);
    assert_eq!(tokens(&remote), tokens(&local_generate(&model, &greedy)));
    let t = &remote["timings"];
    assert!(t["draft_tokens"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(t["accepted_draft_tokens"], t["draft_tokens"], "{t}");
    let sampled = [&greedy[..], &["--temperature", "0.9", "--seed", "3"]].concat();
    let remote = cluster.generate(&sampled);
    assert_eq!(tokens(&remote).len(), 24);
    let t = &remote["timings"];
    let (drafted, kept) = (
        t["draft_tokens"].as_u64().unwrap(),
        t["accepted_draft_tokens"].as_u64().unwrap(),
    );
    assert!(drafted > 0 && kept * 10 >= drafted * 9, "{t}");
}

#[test]
fn a_worker_measures_its_own_speed_with_a_real_layer_forward() {
    let (_dir, model) = small_gguf("q8_0");
    let options = ClusterOptions {
        workers: 1,
        measure_speed: true,
        ..Default::default()
    };
    let cluster = TestCluster::start(&model, &options);
    let status = cluster.wait_serving(1);
    let w = &status["workers"][0];
    assert!(w["speed_bytes_per_second"].as_f64().unwrap() > 1e6, "{w:#}");
}

#[test]
fn a_worker_with_a_wrong_token_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "m.gguf",
    );
    let cluster = TestCluster::start(
        &model,
        &ClusterOptions {
            workers: 1,
            ..Default::default()
        },
    );
    cluster.wait_serving(1);
    // Whether the coordinator saw the join (and lists its refusal), or the worker saw
    // first that the coordinator is not of its token's cluster and said nothing.
    let intrude = |token: &str, id: &str, coordinator_refused: bool| {
        let mut intruder = Proc::spawn(id, {
            let mut c = strata();
            c.args([
                "worker",
                "--token",
                token,
                "--coordinator",
                &cluster.api,
                "--id",
                id,
                "--no-mdns",
                "--bind",
                "127.0.0.1",
                "--speed",
                "1e9",
            ]);
            c
        });
        let exit = intruder.wait_exit(Duration::from_secs(30));
        assert!(!exit.success());
        assert!(
            intruder.output().contains("refused"),
            "{}",
            intruder.output()
        );
        let status = cluster.status();
        let row = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .cloned();
        if coordinator_refused {
            let row = row.unwrap_or_else(|| panic!("no row for {id}: {status}"));
            assert_eq!(row["state"], "refused", "{row}");
        } else {
            assert!(row.is_none(), "{row:?}");
            assert!(
                intruder.output().contains("not our coordinator"),
                "{}",
                intruder.output()
            );
        }
        // It never became a stage.
        assert_eq!(status["plan"]["stages"].as_array().unwrap().len(), 1);
    };
    // Same cluster id, another secret: the proof cannot match.
    let (head, secret) = cluster.token.rsplit_once('-').unwrap();
    intrude(&format!("{head}-{}", "ab".repeat(32)), "intruder", true);
    cluster
        .coordinator
        .wait_for("refused a worker", Duration::from_secs(5));
    // The right secret under another cluster's id: the worker's TLS finds the
    // coordinator's CA is not the one that id names and leaves before it proves anything
    // (the proofs cover the whole token besides; the coordinator once admitted such a
    // worker, and planned onto it after it had refused the coordinator and left).
    let (prefix, id) = head.split_once('-').unwrap();
    let other: String = id
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    intrude(&format!("{prefix}-{other}-{secret}"), "intruder2", false);
    assert_eq!(
        tokens(&cluster.generate(&["--prompt", "still here", "--max-tokens", "4"])).len(),
        4,
        "the cluster keeps serving"
    );
    // A token that is not even well-formed is refused before any network traffic.
    let out = strata()
        .args([
            "worker",
            "--token",
            "letmein",
            "--coordinator",
            &cluster.api,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("strata1-"));
}

#[test]
fn drain_replans_without_the_worker_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "m.gguf",
    );
    let cluster = TestCluster::start(&model, &exact_wire());
    let status = cluster.wait_serving(3);
    let first = status["plan"]["stages"][0]["worker"]
        .as_str()
        .unwrap()
        .to_string();
    // Without the cluster's credentials (an empty HOME, no state directory), drain and
    // remove are refused, and the plan does not change.
    let home = tempfile::tempdir().unwrap();
    for change in ["drain", "remove"] {
        let out = strata()
            .args(["cluster", change, &first, "--coordinator", &cluster.api])
            .env("HOME", home.path())
            .env_remove("STRATA_STATE_DIR")
            .env_remove("STRATA_OPERATOR_KEY")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{change} without credentials: {err}");
        assert!(err.contains("operator credential"), "{err}");
    }
    cluster
        .coordinator
        .wait_for("refused a cluster change", Duration::from_secs(5));
    assert_eq!(
        cluster.wait_serving(3)["plan"]["stages"][0]["worker"],
        first.as_str()
    );
    check_same_tokens(&cluster, &model);
    // Another machine drains with the operator credential the coordinator's prints.
    let operator = run_ok(&["token", "operator", "--state-dir", &cluster.state_dir()]);
    let out = strata()
        .args(["cluster", "drain", &first, "--coordinator", &cluster.api])
        .env("HOME", home.path())
        .env_remove("STRATA_STATE_DIR")
        .env("STRATA_OPERATOR_KEY", operator.trim())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("draining"), "{said}");
    let status = cluster.wait_serving(2);
    assert!(status["plan"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["worker"] != first.as_str()));
    let drained = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == first.as_str())
        .unwrap();
    assert!(
        drained["detail"].as_str().unwrap().contains("drained"),
        "{drained:#}"
    );
    check_same_tokens(&cluster, &model);
}

fn concurrent_generate(cluster: &TestCluster, prompts: &[String]) -> Vec<Vec<u64>> {
    let clients: Vec<Proc> = prompts
        .iter()
        .map(|p| {
            let mut c = strata();
            c.args([
                "generate",
                "--coordinator",
                &cluster.api,
                "--json",
                "--prompt",
                p,
                "--max-tokens",
                "24",
                "--ignore-eos",
            ]);
            Proc::spawn("client", c)
        })
        .collect();
    clients
        .into_iter()
        .map(|mut c| {
            assert!(
                c.wait_exit(Duration::from_secs(60)).success(),
                "{}",
                c.output()
            );
            let out = c.output();
            let json: serde_json::Value =
                serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
            let t = tokens(&json);
            assert_eq!(t.len(), 24, "incomplete stream");
            t
        })
        .collect()
}

#[test]
fn eight_concurrent_clients_get_complete_correct_streams() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "m.gguf",
    );
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("client {i} says hello {}", "again ".repeat(i)))
        .collect();
    // With F32 activations on the wire (the default), batching and pipelining change
    // nothing: every stream equals the single-process run.
    let exact = TestCluster::start(&model, &ClusterOptions::default());
    exact.wait_serving(3);
    let local: Vec<Vec<u64>> = prompts
        .iter()
        .map(|p| {
            tokens(&local_generate(
                &model,
                &["--prompt", p, "--max-tokens", "24", "--ignore-eos"],
            ))
        })
        .collect();
    assert_eq!(concurrent_generate(&exact, &prompts), local);
    drop(exact);
    // With the opt-in F16 wire, rounding the activations may move a near-tie, but batching
    // must not: eight at once give exactly what each gives alone on the same cluster.
    let f16 = ClusterOptions {
        serve_args: vec!["--wire-dtype".into(), "f16".into()],
        ..Default::default()
    };
    let cluster = TestCluster::start(&model, &f16);
    cluster.wait_serving(3);
    let alone: Vec<Vec<u64>> = prompts
        .iter()
        .map(|p| tokens(&cluster.generate(&["--prompt", p, "--max-tokens", "24", "--ignore-eos"])))
        .collect();
    assert_eq!(concurrent_generate(&cluster, &prompts), alone);
}

#[test]
fn plan_on_paper_says_what_is_missing() {
    let out = strata()
        .args([
            "cluster",
            "plan",
            "--model-spec",
            "llama-3.1-70b:q4_k_m",
            "--worker",
            "mac-mini:16GiB:120GB/s",
            "--worker",
            "linux-box:24GiB:80GB/s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("missing") && text.contains("mac-mini"),
        "{text}"
    );
    let fits = run_ok(&[
        "cluster",
        "plan",
        "--model-spec",
        "llama-3.1-70b:q4_k_m",
        "--json",
        "--worker",
        "mac-studio:64GiB:400GB/s",
        "--worker",
        "linux-box:24GiB:80GB/s",
    ]);
    let plan: serde_json::Value = serde_json::from_str(&fits).unwrap();
    let stages = plan["stages"].as_array().unwrap();
    // One stream is fastest on the machine that holds it all; the other is named.
    assert_eq!(stages.len(), 1);
    assert_eq!(stages[0]["worker"], "mac-studio");
    assert_eq!(stages[0]["layers"], serde_json::json!([0, 80]));
    let left_out = plan["left_out"].as_array().unwrap();
    assert!(
        left_out[0]
            .as_str()
            .unwrap()
            .starts_with("linux-box left out: it would add"),
        "{plan:#}"
    );
    // Many streams: both machines work, and the faster one takes more.
    let busy = run_ok(&[
        "cluster",
        "plan",
        "--model-spec",
        "llama-3.1-70b:q4_k_m",
        "--objective",
        "throughput",
        "--json",
        "--worker",
        "mac-studio:64GiB:400GB/s",
        "--worker",
        "linux-box:24GiB:80GB/s",
    ]);
    let plan: serde_json::Value = serde_json::from_str(&busy).unwrap();
    let stages = plan["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    let layers =
        |s: &serde_json::Value| s["layers"][1].as_u64().unwrap() - s["layers"][0].as_u64().unwrap();
    let studio = stages.iter().find(|s| s["worker"] == "mac-studio").unwrap();
    assert!(layers(studio) > 40, "{plan:#}");
    for s in stages {
        assert!(s["memory_bytes"].as_u64() <= s["budget_bytes"].as_u64());
    }
    // A draft model on the last stage is counted there, and said.
    let with_draft = |draft: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "cluster",
            "plan",
            "--model-spec",
            "llama-3.1-70b:q4_k_m",
            "--json",
            "--worker",
            "mac-studio:64GiB:400GB/s",
        ];
        args.extend_from_slice(draft);
        serde_json::from_str(&run_ok(&args)).unwrap()
    };
    let (plain, drafted) = (
        with_draft(&[]),
        with_draft(&["--draft-model-spec", "llama-3.2-1b:q8_0"]),
    );
    let memory = |p: &serde_json::Value| p["stages"][0]["memory_bytes"].as_u64().unwrap();
    assert!(memory(&drafted) > memory(&plain) + (1 << 30), "{drafted:#}");
    let note = drafted["notes"][0].as_str().unwrap();
    assert!(
        note.starts_with("mac-studio also holds the draft model"),
        "{drafted:#}"
    );
}

#[test]
fn a_model_bigger_than_any_worker_is_served_within_every_budget() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    // About 150 MB of Q8_0 weights: 8 layers of 16.7 MB, embedding and head of 9 MB.
    synth(
        &[
            "--arch",
            "llama",
            "--layers",
            "8",
            "--hidden",
            "1024",
            "--heads",
            "8",
            "--kv-heads",
            "2",
            "--intermediate",
            "4096",
            "--vocab",
            "8192",
            "--seed",
            "9",
            "--format",
            "gguf",
            "--quant",
            "q8_0",
        ],
        &model,
    );
    // A worker also keeps its runtime (48 MiB) and a batch's activations (about 50 MB
    // for this shape): the model must not fit one.
    let model_bytes = std::fs::metadata(&model).unwrap().len();
    let budget: u64 = 190 << 20;
    assert!(
        model_bytes + (48 << 20) + 50_000_000 > budget,
        "the model must not fit one worker"
    );
    // On paper first: one such worker is short, and the plan says by how much.
    let out = strata()
        .args([
            "cluster",
            "plan",
            "--model",
            model.to_str().unwrap(),
            "--kv-tokens",
            "512",
            "--worker",
            "small:190MiB:20GB/s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing"));
    let options = ClusterOptions {
        workers: 1,
        serve_args: vec![
            "--kv-tokens".into(),
            "512".into(),
            "--wire-dtype".into(),
            "f32".into(),
        ],
        worker_args: vec!["--memory".into(), "190MiB".into()],
        ..Default::default()
    };
    let mut cluster = TestCluster::start(&model, &options);
    // One worker cannot hold it: the coordinator says how much is missing and where.
    let status = cluster.wait_status("a shortfall", Duration::from_secs(30), |s| {
        s["detail"].as_str().unwrap_or("").contains("missing")
    });
    let detail = status["detail"].as_str().unwrap();
    assert!(detail.contains("w1 (190.0 MiB budget"), "{detail}");
    // A request meanwhile is told so at once, not after a long wait.
    let asked = std::time::Instant::now();
    let out = strata()
        .args(["generate", "--coordinator", &cluster.api, "--prompt", "x"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot hold the model"), "{stderr}");
    assert!(asked.elapsed() < Duration::from_secs(10));
    cluster.add_worker("w2", &options, None);
    cluster.add_worker("w3", &options, None);
    let status = cluster.wait_serving(3);
    let local = local_generate(
        &model,
        &["--prompt", "big model", "--max-tokens", "8", "--ignore-eos"],
    );
    let remote = cluster.generate(&["--prompt", "big model", "--max-tokens", "8", "--ignore-eos"]);
    assert_eq!(tokens(&remote), tokens(&local));
    for w in &cluster.workers {
        let hwm = w.vm_hwm();
        eprintln!(
            "{}: VmHWM {:.1} MiB of a {:.0} MiB budget",
            w.name,
            hwm as f64 / (1 << 20) as f64,
            budget as f64 / (1 << 20) as f64
        );
        assert!(
            hwm > 0 && hwm <= budget,
            "{} peaked at {hwm} bytes, over its budget of {budget}",
            w.name
        );
    }
    for s in status["plan"]["stages"].as_array().unwrap() {
        assert!(s["memory_bytes"].as_u64().unwrap() <= budget);
    }
}

#[test]
fn the_coordinators_machine_can_hold_a_stage_with_local_worker() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "m.gguf",
    );
    let options = ClusterOptions {
        workers: 1,
        serve_args: vec![
            "--local-worker".into(),
            "--local-speed".into(),
            "1e9".into(),
            "--wire-dtype".into(),
            "f32".into(),
        ],
        ..Default::default()
    };
    // Wait for two: the local worker and one remote.
    let mut cluster = TestCluster::start(
        &model,
        &ClusterOptions {
            workers: 0,
            min_workers: Some(2),
            ..options.clone()
        },
    );
    cluster.add_worker("remote", &options, None);
    let status = cluster.wait_serving(2);
    let holders: Vec<&str> = status["plan"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["worker"].as_str().unwrap())
        .collect();
    assert!(
        holders.contains(&"local") && holders.contains(&"remote"),
        "{holders:?}"
    );
    check_same_tokens(&cluster, &model);
}

/// Certificates end: with a 4 s lifetime the coordinator renews its own and every
/// worker's at half of it, and after the first ones ended a re-plan (new QUIC connections
/// between the stages, new handshakes everywhere) still serves the same tokens.
#[test]
fn certificates_end_and_are_renewed_while_the_cluster_serves() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "m.gguf",
    );
    let mut options = exact_wire();
    options
        .serve_args
        .extend(["--cert-lifetime".to_string(), "4s".to_string()]);
    let cluster = TestCluster::start(&model, &options);
    cluster.wait_serving(3);
    // Every worker renewed twice: the certificates it joined with have ended.
    let renewed = |out: &str, id: &str| {
        out.lines()
            .filter(|l| {
                l.contains("renewed a worker's certificate") && l.contains(&format!("id={id}"))
            })
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = cluster.coordinator.output();
        if ["w1", "w2", "w3"].iter().all(|id| renewed(&out, id) >= 2)
            && out.matches("renewed the coordinator's certificate").count() >= 2
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no renewals:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for w in &cluster.workers {
        assert!(
            w.output().contains("renewed this worker's certificate"),
            "{}",
            w.output()
        );
    }
    check_same_tokens(&cluster, &model);
    // A re-plan makes new connections: they handshake with the renewed certificates.
    run_ok(&[
        "cluster",
        "drain",
        "w1",
        "--coordinator",
        &cluster.api,
        "--state-dir",
        &cluster.state_dir(),
    ]);
    cluster.wait_serving(2);
    check_same_tokens(&cluster, &model);
}
