//! Model formats and the runtime, through the real binary and library: GGUF and safetensors
//! of the same seed agree, quantized GGUF agrees with itself dequantized, sharded and bf16
//! safetensors load, broken files give errors that name the file and tensor, and batched
//! decoding equals one sequence at a time.

mod common;

use candle_core::Device;
use common::*;
use strata_model::{GenerateRequest, LocalPipeline, ModelFile};

const PROMPT: [u32; 9] = [1, 45, 200, 77, 300, 12, 9, 480, 33];

fn spec(arch: &str, extra: &[&'static str]) -> Vec<&'static str> {
    let arch: &'static str = Box::leak(arch.to_string().into_boxed_str());
    let mut v = vec![
        "--arch",
        arch,
        "--layers",
        "3",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--intermediate",
        "128",
        "--vocab",
        "512",
        "--seed",
        "11",
    ];
    v.extend_from_slice(extra);
    v
}

/// `strata model synth` of `spec(arch, extra)` as a GGUF of `quant`.
fn synth_gguf(arch: &str, extra: &[&'static str], quant: &str, out: &std::path::Path) {
    synth(
        &[
            spec(arch, extra).as_slice(),
            &["--format", "gguf", "--quant", quant],
        ]
        .concat(),
        out,
    );
}

#[test]
fn gguf_and_safetensors_of_one_seed_agree_for_every_architecture() {
    let cases: [(&str, &[&'static str]); 6] = [
        ("llama", &["--rope-scaling", "llama3", "--context", "16384"]),
        ("mistral", &[]),
        ("qwen2", &[]),
        ("qwen3", &["--tie-embeddings", "--head-dim", "32"]),
        ("mixtral", &["--experts", "4", "--experts-used", "2"]),
        (
            "qwen3_moe",
            &["--head-dim", "32", "--experts", "8", "--experts-used", "3"],
        ),
    ];
    for (arch, extra) in cases {
        let dir = tempfile::tempdir().unwrap();
        for dtype in ["f32", "f16"] {
            let st = dir.path().join(format!("st-{dtype}"));
            let gg = dir.path().join(format!("m-{dtype}.gguf"));
            let mut a = spec(arch, extra);
            a.extend(["--dtype", dtype]);
            synth(&[a.as_slice(), &["--format", "safetensors"]].concat(), &st);
            synth(&[a.as_slice(), &["--format", "gguf"]].concat(), &gg);
            let st = ModelFile::open(&st).unwrap();
            let gg = ModelFile::open(&gg).unwrap();
            assert_eq!(st.config().arch, gg.config().arch, "{arch}");
            let (t1, l1) = greedy(&st, 1, &PROMPT, 10);
            let (t2, l2) = greedy(&gg, 1, &PROMPT, 10);
            // GGUF keeps norms in f32 where f16 safetensors round them: f16 differs slightly.
            let tolerance = if dtype == "f32" { 1e-3 } else { 5e-2 };
            let diff = max_abs_diff(&l1, &l2);
            assert!(
                diff < tolerance,
                "{arch} {dtype}: gguf vs safetensors logits differ by {diff}"
            );
            assert_eq!(t1, t2, "{arch} {dtype}: greedy tokens");
            let (split, _) = greedy(&gg, 3, &PROMPT, 10);
            assert_eq!(split, t2, "{arch} {dtype}: gguf in 3 stages vs 1");
        }
    }
}

#[test]
fn quantized_gguf_stays_close_to_its_dequantized_weights() {
    // Tolerances relative to the logits' standard deviation: the packed matmul also
    // quantizes activations (to 8 bits), which the dequantized reference does not.
    // Measured: 0.05 (q8_0, q4_0) to 0.08 (k-quants) of a std.
    let cases = [
        ("q8_0", 0.15),
        ("q4_0", 0.15),
        ("q4_1", 0.15),
        ("q5_0", 0.15),
        ("q5_1", 0.15),
        ("q4_k", 0.15),
        ("q5_k", 0.15),
        ("q6_k", 0.15),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (quant, tolerance) in cases {
        let path = dir.path().join(format!("{quant}.gguf"));
        // Rows of 256 so k-quant super-blocks fit.
        synth(
            &[
                "--arch",
                "llama",
                "--layers",
                "2",
                "--hidden",
                "256",
                "--heads",
                "4",
                "--kv-heads",
                "2",
                "--intermediate",
                "512",
                "--vocab",
                "512",
                "--seed",
                "5",
                "--format",
                "gguf",
                "--quant",
                quant,
            ],
            &path,
        );
        let packed = ModelFile::open(&path).unwrap();
        let ty = packed
            .entry(strata_model::Role::Q(0))
            .unwrap()
            .storage
            .name();
        assert_eq!(ty, quant, "weights are stored as {quant}");
        let mut reference = ModelFile::open(&path).unwrap();
        reference.set_dequantize(true);
        let (_, lq) = greedy(&packed, 1, &PROMPT, 1);
        let (_, lr) = greedy(&reference, 1, &PROMPT, 1);
        let rel = max_abs_diff(&lq, &lr) / std_dev(&lr);
        eprintln!("{quant}: max logit error {rel:.4} of a std");
        assert!(
            rel < tolerance,
            "{quant}: max logit error {rel:.4} of a std, over {tolerance}"
        );
    }
}

#[test]
fn sharded_and_bf16_safetensors_load() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let sharded = dir.path().join("sharded");
    let bf16 = dir.path().join("bf16");
    let a = spec("llama", &[]);
    synth(&a, &single);
    synth(&[a.as_slice(), &["--shard-mib", "0"]].concat(), &sharded);
    synth(&[a.as_slice(), &["--dtype", "bf16"]].concat(), &bf16);
    assert!(sharded.join("model.safetensors.index.json").exists());
    let shards = std::fs::read_dir(&sharded)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("-of-")
        })
        .count();
    assert!(shards > 3, "expected many shards, got {shards}");
    let (t1, l1) = greedy(&ModelFile::open(&single).unwrap(), 1, &PROMPT, 8);
    let (t2, l2) = greedy(&ModelFile::open(&sharded).unwrap(), 2, &PROMPT, 8);
    assert_eq!(t1, t2);
    assert!(max_abs_diff(&l1, &l2) < 1e-4);
    let (_, l3) = greedy(&ModelFile::open(&bf16).unwrap(), 1, &PROMPT, 1);
    let rel = max_abs_diff(&l1, &l3) / std_dev(&l1);
    assert!(rel < 0.05, "bf16 logits off by {rel} of a std");
}

#[test]
fn truncated_and_inconsistent_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    let gg = dir.path().join("m.gguf");
    synth(&spec("llama", &[]), &st);
    synth_gguf("llama", &[], "q8_0", &gg);
    for path in [st.join("model.safetensors"), gg.clone()] {
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 1000).unwrap();
        let err = ModelFile::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("truncated") && err.contains("tensor `"),
            "{err}"
        );
        assert!(
            err.contains(path.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
    }
    // An empty file: too short even for a header.
    std::fs::write(st.join("model.safetensors"), b"").unwrap();
    let err = ModelFile::open(&st).unwrap_err().to_string();
    assert!(err.contains("too short"), "{err}");
    // Through the CLI: a non-zero exit and the reason, no panic.
    let out = strata()
        .args([
            "generate",
            "--model",
            gg.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("truncated") && !stderr.contains("panicked"),
        "{stderr}"
    );

    // Header values that would size things wrongly: each a clear error through the CLI.
    for (key, value, needle) in [
        ("general.alignment", 0u32, "must be a power of two"),
        ("llama.block_count", (1 << 31) - 1, "past the most"),
        ("llama.block_count", u32::MAX, "past the most"),
    ] {
        synth_gguf("llama", &[], "q8_0", &gg);
        let mut bytes = std::fs::read(&gg).unwrap();
        // The key's string, then its type (u32 = 4), then the value.
        let at = bytes
            .windows(key.len())
            .position(|w| w == key.as_bytes())
            .unwrap()
            + key.len();
        assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes());
        bytes[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&gg, &bytes).unwrap();
        for command in ["inspect", "generate"] {
            let mut args = vec![];
            if command == "inspect" {
                args.extend(["model", "inspect", gg.to_str().unwrap()]);
            } else {
                args.extend([
                    "generate",
                    "--model",
                    gg.to_str().unwrap(),
                    "--prompt",
                    "hi",
                ]);
            }
            let out = strata().args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{key} = {value}: {command} succeeded"
            );
            assert!(
                stderr.contains(needle) && !stderr.contains("panicked"),
                "{key} = {value}, {command}: {stderr}"
            );
        }
    }
}

#[test]
fn wrong_shapes_and_unknown_architectures_name_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    synth(&spec("qwen2", &[]), &st);
    let cfg = st.join("config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        original.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let file = ModelFile::open(&st).unwrap();
    let err = LocalPipeline::load(&file, 1, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mlp.gate_proj.weight")
            && err.contains("[128, 64]")
            && err.contains("[96, 64]"),
        "{err}"
    );
    std::fs::write(
        &cfg,
        original.replace("\"model_type\": \"qwen2\"", "\"model_type\": \"gpt_neox\""),
    )
    .unwrap();
    let err = ModelFile::open(&st).unwrap_err().to_string();
    assert!(err.contains("unsupported architecture `gpt_neox`"), "{err}");
}

#[test]
fn batched_decoding_equals_one_sequence_at_a_time() {
    for (arch, quant) in [("qwen3", "q8_0"), ("llama", "q4_0")] {
        batched_equals_alone(arch, quant);
    }
}

#[allow(clippy::unwrap_used)] // a test helper: a failure is the test's failure
fn batched_equals_alone(arch: &str, quant: &str) {
    let dir = tempfile::tempdir().unwrap();
    let gg = dir.path().join("m.gguf");
    synth_gguf(arch, &[], quant, &gg);
    let file = ModelFile::open(&gg).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        PROMPT.to_vec(),
        vec![5, 6, 7],
        (100..140).collect(),
        vec![42],
    ];
    let requests: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest {
            stop_at_eos: false,
            ..GenerateRequest::greedy(p.clone(), 6 + 3 * i)
        })
        .collect();
    for stages in [1, 3] {
        let mut pipeline = LocalPipeline::load(&file, stages, &Device::Cpu).unwrap();
        let batched = pipeline.generate_batch(&requests, |_, _| {}).unwrap();
        for (r, b) in requests.iter().zip(&batched) {
            let alone = pipeline.generate(r, |_| {}).unwrap();
            assert_eq!(
                b.tokens,
                alone.tokens,
                "{arch} {quant}, {stages} stages, prompt of {}",
                r.prompt_ids.len()
            );
            assert_eq!(b.tokens.len(), r.max_tokens);
        }
    }
}

#[test]
fn chunked_prefill_and_a_growing_cache_change_nothing() {
    // A 200-token prompt crosses the cache's first growth (64 positions) and, in chunks of
    // 7, runs many chunks that start mid-sequence with several new positions each.
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    synth(&spec("qwen2", &["--context", "512"]), &st);
    let file = ModelFile::open(&st).unwrap();
    let prompt: Vec<u32> = (0..200).map(|i| (i * 37 % 500) as u32).collect();
    let request = GenerateRequest {
        stop_at_eos: false,
        ..GenerateRequest::greedy(prompt, 8)
    };
    let mut results = Vec::new();
    for chunk in [512, 7, 1] {
        let mut p = LocalPipeline::load(&file, 2, &Device::Cpu).unwrap();
        p.set_prefill_chunk(chunk);
        results.push(p.generate(&request, |_| {}).unwrap());
    }
    for r in &results[1..] {
        assert_eq!(r.tokens, results[0].tokens);
        assert!(max_abs_diff(&r.prompt_logits, &results[0].prompt_logits) < 1e-3);
    }
    // Past the context length: a clear error, not a panic.
    let long = GenerateRequest::greedy((0..600).map(|i| i as u32 % 500).collect(), 4);
    let mut p = LocalPipeline::load(&file, 1, &Device::Cpu).unwrap();
    let err = p.generate(&long, |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("exceeds the model's context length of 512"),
        "{err}"
    );
}

#[test]
fn a_slice_loads_only_its_own_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let gg = dir.path().join("m.gguf");
    synth_gguf("llama", &["--layers", "6"], "q4_0", &gg);
    let file = ModelFile::open(&gg).unwrap();
    let pipeline = LocalPipeline::load(&file, 3, &Device::Cpu).unwrap();
    let stages: Vec<_> = pipeline.stages().collect();
    use strata_model::Role;
    let layers = |r: std::ops::Range<usize>| -> u64 { r.map(|l| file.layer_bytes(l)).sum() };
    assert_eq!(
        stages[0].weight_bytes(),
        layers(0..2) + file.role_bytes(Role::Embed)
    );
    assert_eq!(stages[1].weight_bytes(), layers(2..4));
    assert_eq!(
        stages[2].weight_bytes(),
        layers(4..6) + file.role_bytes(Role::FinalNorm) + file.role_bytes(Role::LmHead)
    );
}

#[test]
fn cli_generate_and_inspect_work_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let gg = dir.path().join("m.gguf");
    synth_gguf("llama", &["--layers", "4"], "q8_0", &gg);
    let model = gg.to_str().unwrap();
    let run = |stages: &str| -> serde_json::Value {
        let out = run_ok(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "the house by the river",
            "--max-tokens",
            "8",
            "--stages",
            stages,
            "--json",
            "--ignore-eos",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let one = run("1");
    let three = run("3");
    assert_eq!(one["tokens"], three["tokens"]);
    assert_eq!(one["tokens"].as_array().unwrap().len(), 8);
    assert_eq!(three["stages"].as_array().unwrap().len(), 3);
    assert!(one["text"].as_str().is_some());
    let chat = run_ok(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "hello",
        "--chat",
        "--max-tokens",
        "4",
        "--json",
    ]);
    let chat: serde_json::Value = serde_json::from_str(&chat).unwrap();
    // ChatML: <s><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n
    let ids = chat["prompt_ids"].as_array().unwrap();
    assert_eq!(ids[0], 508, "starts with <s>");
    assert_eq!(ids[1], 510, "then <|im_start|>");
    let inspect = run_ok(&["model", "inspect", model]);
    for needle in [
        "architecture   llama",
        "layers         4",
        "type q8_0",
        "chat template  yes",
    ] {
        assert!(
            inspect.contains(needle),
            "missing {needle:?} in:\n{inspect}"
        );
    }
    let sample = |stages: &str| -> serde_json::Value {
        let out = run_ok(&[
            "generate",
            "--model",
            model,
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "6",
            "--temperature",
            "0.9",
            "--top-p",
            "0.9",
            "--seed",
            "4",
            "--json",
            "--ignore-eos",
            "--stages",
            stages,
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let (a, b) = (sample("1"), sample("2"));
    assert_eq!(
        a["tokens"], b["tokens"],
        "same seed, same tokens, whatever the split"
    );
}
