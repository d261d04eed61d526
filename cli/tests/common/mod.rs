//! Shared helpers of the `strata` integration tests: run the real binary, make synthetic
//! models in a temporary directory, read golden files.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod attacker;
pub mod cluster;
pub mod http;

use candle_core::Device;
use strata_model::{GenerateRequest, LocalPipeline, ModelFile};

/// The `strata` binary built for these tests.
pub fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

/// Runs `strata` with `args`, failing the test with its stderr if it fails.
pub fn run_ok(args: &[&str]) -> String {
    let out = strata().args(args).output().expect("run strata");
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `strata model synth <args> --out <out>`.
pub fn synth(args: &[&str], out: &Path) {
    let mut all: Vec<&str> = vec!["model", "synth"];
    all.extend_from_slice(args);
    let out_s = out.to_str().expect("utf-8 temp path");
    all.extend_from_slice(&["--out", out_s]);
    run_ok(&all);
}

/// The repository's `tests/golden` directory.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

/// Greedy tokens and last-prompt logits of `prompt` through `stages` in-process stages.
pub fn greedy(file: &ModelFile, stages: usize, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut p = LocalPipeline::load(file, stages, &Device::Cpu).expect("load pipeline");
    let request = GenerateRequest {
        stop_at_eos: false,
        ..GenerateRequest::greedy(prompt.to_vec(), n)
    };
    let g = p.generate(&request, |_| {}).expect("generate");
    (g.tokens, g.prompt_logits)
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Standard deviation of a vector (to state tolerances relative to the logits' spread).
pub fn std_dev(a: &[f32]) -> f32 {
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    (a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32).sqrt()
}
