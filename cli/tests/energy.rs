//! Energy per answer, end to end: workers read RAPL counters through powercap (here a
//! recorded tree whose package counters a thread moves at a known power, since the
//! machines these tests run on may have none), each stage charges its steps, and the
//! coordinator reports joules and J/token in `generate --json`, the OpenAI usage,
//! `/metrics` and the dashboard's data. A worker without a counter says "not available",
//! and so does every answer it takes part in.

#![allow(clippy::unwrap_used)] // a failure is a test failure

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::http::*;

/// The recorded tree (worker/tests/fixtures/powercap-xeon), copied to `to`.
fn recorded_tree(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/powercap-xeon");
    for zone in std::fs::read_dir(from).unwrap() {
        let zone = zone.unwrap();
        if !zone.file_type().unwrap().is_dir() {
            continue;
        }
        let dir = to.join(zone.file_name());
        std::fs::create_dir_all(&dir).unwrap();
        for file in std::fs::read_dir(zone.path()).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), dir.join(file.file_name())).unwrap();
        }
    }
}

/// Moves each tree's package-0 counter as a package drawing `watts` would, until dropped.
/// Each value is written whole (a new file renamed over the old), as sysfs reads are.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(trees: Vec<PathBuf>, watts: u64) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let base: Vec<u64> = trees
                .iter()
                .map(|t| {
                    let text = std::fs::read_to_string(t.join("intel-rapl:0/energy_uj")).unwrap();
                    text.trim().parse().unwrap()
                })
                .collect();
            while !flag.load(Ordering::Relaxed) {
                let microjoules = started.elapsed().as_micros() as u64 * watts;
                for (tree, base) in trees.iter().zip(&base) {
                    let zone = tree.join("intel-rapl:0");
                    std::fs::write(
                        zone.join("energy_uj.new"),
                        format!("{}\n", base + microjoules),
                    )
                    .unwrap();
                    std::fs::rename(zone.join("energy_uj.new"), zone.join("energy_uj")).unwrap();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Ticker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn env_prefix(root: &Path) -> Vec<String> {
    vec![
        "env".into(),
        format!("STRATA_POWERCAP_ROOT={}", root.display()),
    ]
}

#[test]
fn answers_report_joules_per_token_from_the_workers_counters() {
    let (dir, model) = small_gguf("q8_0");
    let trees: Vec<PathBuf> = (1..=2)
        .map(|i| dir.path().join(format!("powercap-{i}")))
        .collect();
    for t in &trees {
        recorded_tree(t);
    }
    const WATTS: u64 = 50;
    let _ticker = Ticker::start(trees.clone(), WATTS);
    let options = ClusterOptions {
        workers: 2,
        prefix: vec![Vec::new(), env_prefix(&trees[0]), env_prefix(&trees[1])],
        ..Default::default()
    };
    let cluster = TestCluster::start(&model, &options);
    cluster.wait_serving(2);

    let t0 = Instant::now();
    let out = cluster.generate(&["--prompt", "Once upon", "--max-tokens", "8", "--ignore-eos"]);
    let wall = t0.elapsed().as_secs_f64();
    let timings = &out["timings"];
    let joules = timings["energy_joules"]
        .as_f64()
        .unwrap_or_else(|| panic!("{out:#}"));
    // Each stage charges what its package counter moved while it ran its steps: more than
    // nothing, and no more than both packages drew over the whole request.
    assert!(joules > 0.0, "{out:#}");
    assert!(
        joules <= 2.0 * WATTS as f64 * wall,
        "{joules} J in {wall} s: {out:#}"
    );
    let per_token = timings["joules_per_token"].as_f64().unwrap();
    assert!((per_token - joules / 8.0).abs() < 1e-9, "{out:#}");
    assert!(
        timings["energy"].as_str().unwrap().contains("J/token"),
        "{out:#}"
    );

    // The OpenAI usage carries it too, and /metrics and the dashboard add it up.
    wait_healthy(&cluster.http);
    let body = r#"{"prompt":[1,2,3],"max_tokens":5,"ignore_eos":true}"#;
    let (status, answer) = http(&cluster.http, "POST", "/v1/completions", Some(body), None);
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let http_joules = answer["usage"]["energy_joules"].as_f64().unwrap();
    assert!(http_joules > 0.0, "{answer}");
    let m = metrics(&cluster.http);
    assert_eq!(m["strata_energy_tokens_total"], 13.0);
    assert!(
        (m["strata_energy_joules_total"] - (joules + http_joules)).abs() < 1e-6,
        "{m:?}"
    );
    let (_, body) = http(&cluster.http, "GET", "/v1/cluster", None, None);
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    for w in c["workers"].as_array().unwrap() {
        assert_eq!(
            w["energy_meter"], "powercap: package-0 + dram + package-1 + dram",
            "{w}"
        );
    }
    let recent = &c["recent_requests"][0];
    assert!(
        (recent["joules"].as_f64().unwrap() - http_joules).abs() < 1e-9,
        "{recent}"
    );
}

#[test]
fn a_worker_without_a_counter_says_not_available_and_so_do_its_answers() {
    let (dir, model) = small_gguf("q8_0");
    let nowhere = dir.path().join("no-powercap-here");
    let options = ClusterOptions {
        workers: 1,
        prefix: vec![Vec::new(), env_prefix(&nowhere)],
        ..Default::default()
    };
    let cluster = TestCluster::start(&model, &options);
    cluster.wait_serving(1);
    let out = cluster.generate(&["--prompt", "Once upon", "--max-tokens", "4"]);
    let timings = &out["timings"];
    assert!(timings["energy_joules"].is_null(), "{out:#}");
    assert!(timings["joules_per_token"].is_null(), "{out:#}");
    let said = timings["energy"].as_str().unwrap();
    assert!(
        said.starts_with("not available on w1: powercap: no RAPL zones under")
            && said.contains("no-powercap-here"),
        "{said}"
    );
    let status = cluster.status();
    let meter = status["workers"][0]["energy_meter"].as_str().unwrap();
    assert!(
        meter.starts_with("not available: powercap: no RAPL zones"),
        "{meter}"
    );
    let log = cluster.workers[0].output();
    assert!(log.contains("not available"), "{log}");
    wait_healthy(&cluster.http);
    let m = metrics(&cluster.http);
    assert_eq!(m["strata_energy_tokens_total"], 0.0);
}
