//! The NEON kernels, checked on an x86-64 machine: this cross-compiles strata-model's
//! tests for aarch64 (Apple Silicon's and ARM Linux's architecture) and runs them under
//! qemu-user, so the kernel tests (each format against candle's, both tile heights) and
//! the batch-invariance, replay and tokenizer tests run on the NEON code path.
//!
//! Needs the `aarch64-unknown-linux-gnu` Rust target, `aarch64-linux-gnu-gcc` and
//! `qemu-aarch64` (Debian: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user);
//! `.ci/run` installs them. Without them it says so and passes, except under CI, where it
//! fails. Builds into `target/aarch64-qemu`.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "aarch64-unknown-linux-gnu";

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What is missing to cross-test, if anything.
fn missing() -> Option<String> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if !sysroot.is_some_and(|s| s.join("lib/rustlib").join(TARGET).exists()) {
        return Some(format!(
            "the Rust target {TARGET} (rustup target add {TARGET})"
        ));
    }
    if !runs("aarch64-linux-gnu-gcc", "--version") {
        return Some("aarch64-linux-gnu-gcc (Debian: gcc-aarch64-linux-gnu)".into());
    }
    if !runs("qemu-aarch64", "--version") {
        return Some("qemu-aarch64 (Debian: qemu-user)".into());
    }
    None
}

#[test]
fn model_tests_pass_on_aarch64_under_qemu() {
    if cfg!(target_arch = "aarch64") {
        eprintln!("on aarch64 the model tests run natively: nothing to emulate");
        return;
    }
    if let Some(what) = missing() {
        let why = format!("cross-testing NEON needs {what}; run .ci/run, which installs it");
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["test", "--target", TARGET, "-p", "strata-model"])
        .env("CARGO_TARGET_DIR", root.join("target/aarch64-qemu"))
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            "qemu-aarch64 -L /usr/aarch64-linux-gnu",
        )
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "strata-model's tests failed on aarch64 under qemu:\n{stdout}\n{stderr}"
    );
    // Say what ran: each test binary and its count.
    let ran: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("Running") || l.starts_with("test result"))
        .collect();
    eprintln!("aarch64 under qemu:\n{}", ran.join("\n"));
    let passed: usize = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum();
    // The kernel tests alone are three; the crate has dozens.
    assert!(
        passed >= 30,
        "only {passed} tests ran on aarch64:\n{stdout}"
    );
    assert!(
        stdout.contains("kernels::tests::matches_candle_and_the_dequantized_weights ... ok"),
        "the kernel test did not run on aarch64:\n{stdout}"
    );
}
