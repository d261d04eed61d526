//! `strata perplexity`: perplexity of a text, and KL divergence from a base saved by an
//! earlier run, on small synthetic models (F32 and Q8_0 of one seed, so one tokenizer).
//! Its figures on a real model beside llama.cpp's come from tests/campaigns/fidelity.py.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

mod common;

use common::{cluster::small_llama, strata};

/// English prose of a few thousand tokens for these small vocabularies.
fn text(dir: &std::path::Path) -> std::path::PathBuf {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let path = dir.join("text.txt");
    std::fs::write(&path, &readme[..readme.len().min(12_000)]).unwrap();
    path
}

fn perplexity(args: &[&str]) -> serde_json::Value {
    let out = strata()
        .arg("perplexity")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata perplexity {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Perplexity of the first `ctx` tokens of `text` over their second half, from the
/// logits of single-token forwards.
fn step_by_step_perplexity(model: &std::path::Path, text: &str, ctx: usize) -> f64 {
    use strata_model::{Chunk, LocalPipeline, ModelFile, Tokenizer};
    let file = ModelFile::open(model).unwrap();
    let tokenizer = Tokenizer::for_model(&file).unwrap();
    let mut tokens = tokenizer.encode(text, false).unwrap();
    tokens.truncate(ctx);
    if tokenizer.encode("a", true).unwrap().len() > tokenizer.encode("a", false).unwrap().len() {
        tokens[0] = tokenizer.bos().unwrap();
    }
    let mut pipeline = LocalPipeline::load(&file, 1, &candle_core::Device::Cpu).unwrap();
    let seq = pipeline.create_sequence();
    let mut nll = 0.0;
    let mut count = 0;
    for (i, &token) in tokens[..ctx - 1].iter().enumerate() {
        let chunk = Chunk {
            seq,
            start: i,
            len: 1,
        };
        let logits: Vec<f32> = pipeline
            .forward(&[chunk], vec![token])
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        if i >= ctx / 2 {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_sum = logits
                .iter()
                .map(|&l| f64::from(l - max).exp())
                .sum::<f64>()
                .ln()
                + f64::from(max);
            nll += log_sum - f64::from(logits[tokens[i + 1] as usize]);
            count += 1;
        }
    }
    (nll / count as f64).exp()
}

fn fails_with(args: &[&str], message: &str) {
    let out = strata().arg("perplexity").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(message), "{args:?}: {stderr}");
}

#[test]
fn perplexity_and_kl_divergence_from_a_saved_base() {
    let dir = tempfile::tempdir().unwrap();
    let f32 = small_llama(
        dir.path(),
        &["--format", "gguf", "--dtype", "f32"],
        "f32.gguf",
    );
    let q8 = small_llama(
        dir.path(),
        &["--format", "gguf", "--quant", "q8_0"],
        "q8.gguf",
    );
    let text = text(dir.path());
    let base = dir.path().join("base.bin");
    let (m, t, b) = (
        f32.to_str().unwrap(),
        text.to_str().unwrap(),
        base.to_str().unwrap(),
    );
    let common = ["--file", t, "--ctx", "64", "--chunks", "6"];

    let saved = perplexity(&[&["--model", m, "--save-logits", b][..], &common].concat());
    // Each chunk of 64 scores its second half: positions 32..63 predict 33..64.
    assert_eq!(saved["positions"], 6 * 31);
    let ppl = saved["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "perplexity {ppl}");
    assert!(saved["kl_divergence"].is_null());

    // The first chunk's perplexity again, one decode step at a time through the
    // sampling path: the same figure.
    let one = perplexity(&["--model", m, "--file", t, "--ctx", "64", "--chunks", "1"]);
    let by_steps = step_by_step_perplexity(&f32, &std::fs::read_to_string(&text).unwrap(), 64);
    let scored = one["perplexity"].as_f64().unwrap();
    assert!(
        (scored - by_steps).abs() < 1e-3 * by_steps,
        "scored {scored}, step by step {by_steps}"
    );

    // The same model against itself: no divergence beyond the base's f16 rounding.
    let same = perplexity(&[&["--model", m, "--kl-base", b][..], &common].concat());
    assert_eq!(same["perplexity"], saved["perplexity"]);
    assert!(same["kl_divergence"].as_f64().unwrap() < 1e-4, "{same}");
    assert_eq!(same["same_top_token"], 1.0);

    // Its Q8_0 quantization strays a little, and mostly picks the same tokens.
    let q8_path = q8.to_str().unwrap();
    let quantized = perplexity(&[&["--model", q8_path, "--kl-base", b][..], &common].concat());
    let kl = quantized["kl_divergence"].as_f64().unwrap();
    assert!(kl > 1e-6 && kl < 0.05, "Q8_0 KL {kl}");
    assert!(
        quantized["same_top_token"].as_f64().unwrap() > 0.8,
        "{quantized}"
    );

    // Runs that do not match the base, and texts too short, say what is wrong.
    fails_with(
        &[
            "--model",
            m,
            "--file",
            t,
            "--ctx",
            "32",
            "--chunks",
            "6",
            "--kl-base",
            b,
        ],
        "saved with --ctx 64",
    );
    let other = dir.path().join("other.txt");
    std::fs::write(&other, "Another text entirely. ".repeat(200)).unwrap();
    fails_with(
        &[
            "--model",
            m,
            "--file",
            other.to_str().unwrap(),
            "--ctx",
            "64",
            "--chunks",
            "2",
            "--kl-base",
            b,
        ],
        "saved for other text",
    );
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    fails_with(
        &[
            "--model",
            m,
            "--file",
            short.to_str().unwrap(),
            "--ctx",
            "64",
        ],
        "fewer than one chunk",
    );
    fails_with(
        &["--model", m, "--file", t, "--kl-base", t],
        "is not a base file",
    );
}
