//! A worker's resident memory is its slice, not the model: a process that loads layers
//! `[a, b)` peaks (VmHWM) near those layers' bytes, far below the model's size.

mod common;

use common::*;

#[test]
fn loading_a_quarter_of_the_layers_costs_about_a_quarter_of_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    // ~200 MB of F32 weights in 8 layers of ~24 MB, embedding and head ~6 MB each.
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
            "8",
            "--intermediate",
            "1536",
            "--vocab",
            "1536",
            "--format",
            "gguf",
            "--dtype",
            "f32",
        ],
        &model,
    );
    let out = run_ok(&[
        "model",
        "inspect",
        model.to_str().unwrap(),
        "--load-layers",
        "2..4",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let slice = report["slice_weight_bytes"].as_u64().unwrap();
    let whole = report["model_weight_bytes"].as_u64().unwrap();
    let peak = report["peak_rss_bytes"].as_u64().unwrap();
    let before = report["peak_rss_before_load_bytes"].as_u64().unwrap();
    eprintln!("slice {slice} of {whole} bytes; VmHWM {peak} ({before} before loading)");
    assert!(slice * 4 < whole, "the slice is a small part of the model");
    // The slice plus the process's own baseline and at most one tensor in flight.
    let largest_tensor = 1536 * 1024 * 4;
    assert!(
        peak < before + slice + largest_tensor + 16 * 1024 * 1024,
        "peak {peak} is not close to the slice's {slice} bytes"
    );
    assert!(
        peak < whole / 2,
        "peak {peak} approaches the whole model's {whole} bytes"
    );
}
