//! A multi-process cluster harness: a real `strata serve` and real `strata worker`
//! processes on loopback (or inside network namespaces), torn down on drop. Everything
//! waits on signals with deadlines (a "listening on" line, `cluster status`), never on
//! fixed sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: a failure is a test failure

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::strata;

/// A process whose output is collected in the background.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr collected.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        let mut child = cmd.spawn().expect("spawn strata");
        let log = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            }));
        }
        Proc {
            child,
            name: name.to_string(),
            log,
            readers,
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until its output contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if out.contains(needle) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "{} never printed {needle:?}; it printed:\n{out}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Everything it wrote is read once its pipes close.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit; it printed:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory (VmHWM) of the live process, in bytes.
    pub fn vm_hwm(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator and its workers.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub token: String,
    pub api: String,
    /// The OpenAI-compatible HTTP API's address.
    pub http: String,
    pub coordinator: Proc,
    pub workers: Vec<Proc>,
}

/// Options of a test cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    pub workers: usize,
    /// Extra `serve` flags.
    pub serve_args: Vec<String>,
    /// Extra flags for every worker.
    pub worker_args: Vec<String>,
    /// Wrap commands (e.g. `ip netns exec NAME`): index 0 is the coordinator.
    pub prefix: Vec<Vec<String>>,
    /// Address the API listens on.
    pub listen: String,
    /// Workers join with --coordinator (not mDNS).
    pub direct: bool,
    /// `--min-workers` (default: `workers`).
    pub min_workers: Option<usize>,
    /// Workers measure their speed; otherwise (the default) each reports the same
    /// `--speed`, so plans do not depend on how busy the machine was while measuring.
    pub measure_speed: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            workers: 3,
            serve_args: Vec::new(),
            worker_args: Vec::new(),
            prefix: Vec::new(),
            listen: "127.0.0.1:0".into(),
            direct: true,
            min_workers: None,
            measure_speed: false,
        }
    }
}

fn command(prefix: Option<&Vec<String>>) -> Command {
    match prefix {
        Some(p) if !p.is_empty() => {
            let mut c = Command::new(&p[0]);
            c.args(&p[1..]).arg(env!("CARGO_BIN_EXE_strata"));
            c
        }
        _ => strata(),
    }
}

impl TestCluster {
    /// Starts `strata serve --model model` and the workers; returns once the API listens.
    pub fn start(model: &Path, o: &ClusterOptions) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let out = strata()
            .args(["token", "create", "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success());
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let http = o.listen.replace(":7433", ":7434");
        let (coordinator, api, http) = Self::serve(model, o, &state, (&o.listen, &http));
        let mut cluster = TestCluster {
            dir,
            token,
            api,
            http,
            coordinator,
            workers: Vec::new(),
        };
        for i in 0..o.workers {
            cluster.add_worker(&format!("w{}", i + 1), o, o.prefix.get(i + 1));
        }
        cluster
    }

    /// Starts `strata serve` on `listen` (API, HTTP); returns it and the addresses it
    /// listens on.
    fn serve(
        model: &Path,
        o: &ClusterOptions,
        state: &Path,
        listen: (&str, &str),
    ) -> (Proc, String, String) {
        let mut serve = command(o.prefix.first());
        serve
            .args(["serve", "--model", model.to_str().unwrap()])
            .args(["--listen", listen.0, "--http", listen.1])
            .args(["--state-dir", state.to_str().unwrap()])
            .args([
                "--min-workers",
                &o.min_workers.unwrap_or(o.workers).to_string(),
            ])
            .args(&o.serve_args);
        // Spread the model over every worker: the pipeline is what these tests exercise
        // (for one stream the default objective keeps a small model on one worker).
        if !o.serve_args.iter().any(|a| a == "--objective") {
            serve.args(["--objective", "throughput"]);
        }
        if o.direct {
            serve.arg("--no-mdns");
        }
        // Workers that state one speed are planned by it: measured decode times would
        // make the plan depend on what else the machine was doing (a loaded CI machine
        // once left a worker out that the test expected in).
        if !o.measure_speed {
            serve.arg("--no-calibrate");
        }
        let coordinator = Proc::spawn("coordinator", serve);
        // "http on" comes after "listening on": both addresses are known then.
        let out = coordinator.wait_for("http on ", Duration::from_secs(30));
        let api = out
            .lines()
            .find_map(|l| l.strip_prefix("listening on "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string();
        let http = out
            .lines()
            .find_map(|l| l.strip_prefix("http on "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        (coordinator, api, http)
    }

    /// The coordinator's state directory (what its machine's CLI reads credentials from).
    pub fn state_dir(&self) -> String {
        self.dir.path().join("state").to_str().unwrap().to_string()
    }

    /// Kills the coordinator (`kill -9`) and starts it again on the same addresses with
    /// the same state directory; returns once it listens.
    pub fn restart_coordinator(&mut self, model: &Path, o: &ClusterOptions) {
        self.coordinator.kill();
        let state = self.dir.path().join("state");
        let (api, http) = (self.api.clone(), self.http.clone());
        let (coordinator, _, _) = Self::serve(model, o, &state, (&api, &http));
        self.coordinator = coordinator;
    }

    /// Bytes of weights each worker received over the network, by worker id.
    pub fn bytes_received(&self) -> std::collections::BTreeMap<String, u64> {
        self.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["id"].as_str().unwrap().to_string(),
                    w["bytes_received"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Starts one more worker.
    pub fn add_worker(&mut self, id: &str, o: &ClusterOptions, prefix: Option<&Vec<String>>) {
        let mut w = command(prefix);
        w.args(["worker", "--token", &self.token, "--id", id])
            .args(&o.worker_args);
        if !o.measure_speed && !o.worker_args.iter().any(|a| a == "--speed") {
            w.args(["--speed", "1e9"]);
        }
        w.args([
            "--cache-dir",
            self.dir
                .path()
                .join(format!("cache-{id}"))
                .to_str()
                .unwrap(),
        ]);
        if o.direct {
            w.args([
                "--coordinator",
                &self.api,
                "--no-mdns",
                "--bind",
                "127.0.0.1",
            ]);
        }
        self.workers.push(Proc::spawn(id, w));
    }

    /// `strata cluster status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = strata()
            .args(["cluster", "status", "--json", "--coordinator", &self.api])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Polls the status until `pred` holds.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never reached: {what}\nlast status: {s:#}\ncoordinator log:\n{}\nworker logs:\n{}",
                self.coordinator.output(),
                self.workers.iter().map(|w| format!("--- {}\n{}", w.name, w.output())).collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the cluster serves with `stages` stages.
    pub fn wait_serving(&self, stages: usize) -> serde_json::Value {
        self.wait_status(
            &format!("serving with {stages} stages"),
            Duration::from_secs(60),
            |s| {
                s["serving"] == true
                    && s["plan"]["stages"]
                        .as_array()
                        .is_some_and(|a| a.len() == stages)
            },
        )
    }

    /// `strata generate --coordinator ... --json` with `args`.
    pub fn generate(&self, args: &[&str]) -> serde_json::Value {
        let out = strata()
            .args(["generate", "--coordinator", &self.api, "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remote generate failed: {}\ncoordinator log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.coordinator.output()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// `strata generate --model ... --json` in this process's way (one stage).
pub fn local_generate(model: &Path, args: &[&str]) -> serde_json::Value {
    let out = strata()
        .args(["generate", "--model", model.to_str().unwrap(), "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "local generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Token ids of a generate JSON.
pub fn tokens(v: &serde_json::Value) -> Vec<u64> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// Whether this process runs as root (network namespaces need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A 6-layer Llama of hidden 256 (seed 3), in the format `format` names.
pub fn small_llama(dir: &Path, format: &[&str], name: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "--arch",
        "llama",
        "--layers",
        "6",
        "--hidden",
        "256",
        "--heads",
        "8",
        "--kv-heads",
        "2",
        "--intermediate",
        "512",
        "--vocab",
        "512",
        "--seed",
        "3",
    ];
    args.extend_from_slice(format);
    super::synth(&args, &out);
    out
}

/// A small Llama as a GGUF of `quant` in a fresh temporary directory (kept alive by the
/// returned guard).
pub fn small_gguf(quant: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", quant],
        "m.gguf",
    );
    (dir, model)
}

/// F32 activations on the wire, said explicitly (it is the default): any split gives the
/// local tokens.
pub fn exact_wire() -> ClusterOptions {
    ClusterOptions {
        serve_args: vec!["--wire-dtype".into(), "f32".into()],
        ..Default::default()
    }
}

/// A streamed completion (server-sent events), read on a thread as it arrives, each event
/// with the moment it came. HTTP/1.0, so the body is delimited by the connection's close
/// rather than chunked.
pub struct SseStream {
    events: Arc<Mutex<Vec<(Instant, serde_json::Value)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl SseStream {
    /// POSTs `body` to `path` and starts reading the events.
    pub fn start(addr: &str, path: &str, body: &str) -> SseStream {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    break;
                }
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                sink.lock().unwrap().push((Instant::now(), v));
            }
        });
        SseStream {
            events,
            reader: Some(reader),
        }
    }

    /// Events received so far.
    pub fn received(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// Waits until at least `n` events arrived.
    pub fn wait_received(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.received() < n {
            assert!(
                Instant::now() < deadline,
                "only {} events of {n} within {timeout:?}",
                self.received()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the stream to end; every event with its arrival time.
    pub fn finish(mut self, timeout: Duration) -> Vec<(Instant, serde_json::Value)> {
        let deadline = Instant::now() + timeout;
        if let Some(r) = self.reader.take() {
            while !r.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "the stream did not end within {timeout:?}; {} events so far",
                    self.received()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            r.join().unwrap();
        }
        self.events.lock().unwrap().clone()
    }
}

/// The text pieces and the finish reason of a completion's events (an error event panics).
pub fn completion_text(events: &[(Instant, serde_json::Value)]) -> (Vec<String>, String) {
    let mut pieces = Vec::new();
    let mut finish = String::new();
    for (_, e) in events {
        assert!(e.get("error").is_none(), "the stream failed: {e}");
        if let Some(c) = e["choices"].get(0) {
            pieces.push(c["text"].as_str().unwrap_or_default().to_string());
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (pieces, finish)
}
