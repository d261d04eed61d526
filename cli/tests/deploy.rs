//! deploy/ as an operator would use it: every file parses in its own format, names flags the
//! `strata` binary accepts, and the systemd units pass `systemd-analyze verify` where it is
//! installed (CI, as root on Debian).

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::strata;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The long flags `strata <command> --help` lists.
fn flags(command: &str) -> Vec<String> {
    let out = strata().args([command, "--help"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect()
}

/// Every `--flag` in `args` is one `strata <command>` accepts.
fn check_flags(command: &str, args: &[&str], whence: &str) {
    let known = flags(command);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            known.iter().any(|k| k == a),
            "{whence}: `strata {command}` has no flag {a}"
        );
    }
}

/// A systemd unit as sections of key -> values (keys may repeat).
fn unit(text: &str) -> HashMap<String, HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, HashMap<String, Vec<String>>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line:?}"));
        assert!(!section.is_empty(), "{line:?} outside a section");
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

/// KEY=value lines of an environment file.
fn env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=value: {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn systemd_units_are_complete_and_verify() {
    for (name, command, env) in [
        ("strata-coordinator.service", "serve", "coordinator.env"),
        ("strata-worker.service", "worker", "worker.env"),
    ] {
        let path = deploy().join("systemd").join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let u = unit(&text);
        let service = &u["Service"];
        let one = |k: &str| service[k][0].as_str();
        assert_eq!(one("User"), "strata", "{name}: a dedicated user");
        assert_eq!(one("Restart"), "on-failure", "{name}");
        assert_eq!(
            one("StateDirectory"),
            "strata",
            "{name}: state in /var/lib/strata"
        );
        assert_eq!(u["Install"]["WantedBy"][0], "multi-user.target");
        assert!(u["Unit"]["After"][0].contains("network-online.target"));
        // The config file it reads sets every variable ExecStart uses.
        assert_eq!(one("EnvironmentFile"), format!("/etc/strata/{env}"));
        let vars = env_file(&std::fs::read_to_string(deploy().join("systemd").join(env)).unwrap());
        let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
        assert_eq!(&exec[..2], &["/usr/local/bin/strata", command], "{name}");
        for word in &exec[2..] {
            if let Some(var) = word.strip_prefix('$') {
                let var = var.trim_start_matches('{').trim_end_matches('}');
                assert!(vars.contains_key(var), "{name}: {env} does not set {var}");
            }
        }
        check_flags(command, &exec, name);
        // The extra-arguments variable holds flags of the same command.
        for (k, v) in &vars {
            if k.ends_with("_ARGS") {
                check_flags(command, &v.split_whitespace().collect::<Vec<_>>(), env);
            }
        }
    }
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    };
    assert!(out.status.success());
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in ["strata-coordinator.service", "strata-worker.service"] {
        let text = std::fs::read_to_string(deploy().join("systemd").join(name))
            .unwrap()
            .replace("/usr/local/bin/strata", env!("CARGO_BIN_EXE_strata"));
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn the_launchd_plist_runs_a_worker() {
    let path = deploy().join("launchd/org.strata.worker.plist");
    let v = plist::Value::from_file(&path).unwrap();
    let d = v.as_dictionary().unwrap();
    assert_eq!(d["Label"].as_string(), Some("org.strata.worker"));
    let args: Vec<&str> = d["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_string().unwrap())
        .collect();
    assert_eq!(&args[..2], &["/usr/local/bin/strata", "worker"]);
    check_flags("worker", &args, "org.strata.worker.plist");
    assert_eq!(d["RunAtLoad"].as_boolean(), Some(true));
    // Restarted when it fails, not when it was asked to stop.
    let keep = d["KeepAlive"].as_dictionary().unwrap();
    assert_eq!(keep["SuccessfulExit"].as_boolean(), Some(false));
    let env = d["EnvironmentVariables"].as_dictionary().unwrap();
    assert!(env.contains_key("STRATA_TOKEN"));
}

#[test]
fn the_dockerfile_builds_from_source_in_stages_and_compose_uses_host_networking() {
    let text = std::fs::read_to_string(deploy().join("docker/Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let known = [
        "ARG",
        "FROM",
        "WORKDIR",
        "COPY",
        "RUN",
        "USER",
        "ENV",
        "VOLUME",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
    ];
    let mut continued = false;
    for l in &lines {
        if !continued {
            let instr = l.split_whitespace().next().unwrap();
            assert!(known.contains(&instr), "unknown instruction in {l:?}");
        }
        continued = l.ends_with('\\');
    }
    let stages: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    assert!(stages[0].ends_with(" AS build"));
    assert!(text.contains("cargo build --release -p strata"));
    assert!(lines.iter().any(|l| l.starts_with("COPY --from=build ")));
    assert!(lines.contains(&"USER strata"), "runs as a dedicated user");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("ENTRYPOINT [\"/usr/local/bin/strata\"]")));

    let text = std::fs::read_to_string(deploy().join("docker/compose.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let services = &docs[0]["services"];
    for (name, command) in [("coordinator", "serve"), ("worker", "worker")] {
        let s = &services[name];
        assert_eq!(
            s["network_mode"].as_str(),
            Some("host"),
            "{name}: mDNS needs the host's network"
        );
        let args: Vec<&str> = s["command"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], command);
        check_flags(command, &args, "compose.yaml");
        assert_eq!(s["restart"].as_str(), Some("on-failure"));
    }
    let build = &services["coordinator"]["build"];
    let context = deploy()
        .join("docker")
        .join(build["context"].as_str().unwrap());
    assert!(context
        .join(build["dockerfile"].as_str().unwrap())
        .is_file());
    assert!(
        context.join("Cargo.toml").is_file(),
        "the build context is the repository"
    );
}

#[test]
fn the_kubernetes_manifest_wires_workers_to_the_coordinator_by_its_service_name() {
    use yaml_rust2::Yaml;
    let text = std::fs::read_to_string(deploy().join("kubernetes/strata.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let of_kind = |kind: &str| -> &Yaml {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} in strata.yaml"))
    };
    let service = of_kind("Service");
    let port = |name: &str| -> &Yaml {
        service["spec"]["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("the Service has no {name} port"))
    };
    let container =
        |kind: &str| -> &Yaml { &of_kind(kind)["spec"]["template"]["spec"]["containers"][0] };
    let args = |kind: &str| -> Vec<String> {
        container(kind)["args"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let value_of = |args: &[String], flag: &str| -> String {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag}"));
        args[i + 1].clone()
    };
    // The coordinator: serve, on the ports its Service names.
    let serve = args("Deployment");
    assert_eq!(serve[0], "serve");
    check_flags(
        "serve",
        &serve.iter().map(String::as_str).collect::<Vec<_>>(),
        "strata.yaml",
    );
    assert_eq!(of_kind("Deployment")["spec"]["replicas"].as_i64(), Some(1));
    assert_eq!(
        value_of(&serve, "--data-port"),
        port("data")["port"].as_i64().unwrap().to_string()
    );
    assert_eq!(port("data")["protocol"].as_str(), Some("UDP"));
    assert!(value_of(&serve, "--listen")
        .ends_with(&format!(":{}", port("grpc")["port"].as_i64().unwrap())));
    // Workers: one per labelled node, joining by the Service's DNS name.
    let worker = args("DaemonSet");
    assert_eq!(worker[0], "worker");
    check_flags(
        "worker",
        &worker.iter().map(String::as_str).collect::<Vec<_>>(),
        "strata.yaml",
    );
    let name = service["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        value_of(&worker, "--coordinator"),
        format!("{name}:{}", port("grpc")["port"].as_i64().unwrap())
    );
    assert!(worker.iter().any(|a| a == "--no-mdns"));
    let declared: Vec<i64> = container("DaemonSet")["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    for flag in ["--data-port", "--control-port"] {
        let p: i64 = value_of(&worker, flag).parse().unwrap();
        assert!(
            declared.contains(&p),
            "{flag} {p} is not a declared container port"
        );
    }
    let token = container("DaemonSet")["env"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("STRATA_TOKEN"))
        .expect("workers get the join token");
    assert!(token["valueFrom"]["secretKeyRef"]["name"]
        .as_str()
        .is_some());
}
