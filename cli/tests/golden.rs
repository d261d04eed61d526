//! Strata against outside references: Hugging Face transformers (golden files written by
//! `tests/golden/make_golden.py`) and GGUF files written by llama.cpp's own converter.
//!
//! Tolerances: F32 logits within 1e-3 absolute (logits spread with a standard deviation of
//! about 4, so that is ~2.5e-4 relative); greedy tokens identical. llama.cpp's F16 files:
//! logits within 5e-2 (weights rounded to f16, activations multiplied in f16), greedy tokens
//! identical wherever the golden top-2 margin exceeds 0.1.

mod common;

use common::*;
use serde_json::Value;
use strata_model::{ModelFile, Tokenizer};

struct Golden {
    name: String,
    synth: Vec<String>,
    /// A model transformers made itself (its own class, initialised at random and saved),
    /// committed under tests/golden; otherwise `synth` makes the model.
    model: Option<std::path::PathBuf>,
    cases: Vec<Case>,
}

struct Case {
    prompt: String,
    prompt_ids: Vec<u32>,
    last_logits: Vec<f32>,
    greedy_ids: Vec<u32>,
    greedy_margins: Vec<f32>,
}

fn goldens() -> Vec<Golden> {
    let models: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("models.json")).expect("models.json"),
    )
    .expect("models.json parses");
    let mut out = Vec::new();
    for m in models.as_array().expect("a list") {
        let name = m["name"].as_str().expect("name").to_string();
        let path = golden_dir().join(format!("{name}.json"));
        let g: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate with tests/golden/make_golden.py)",
                path.display()
            )
        }))
        .expect("golden parses");
        let ids = |v: &Value| -> Vec<u32> {
            v.as_array()
                .expect("array")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        };
        let floats = |v: &Value| -> Vec<f32> {
            v.as_array()
                .expect("array")
                .iter()
                .map(|x| x.as_f64().expect("float") as f32)
                .collect()
        };
        out.push(Golden {
            name,
            synth: g["synth"]
                .as_array()
                .expect("synth args")
                .iter()
                .map(|s| s.as_str().expect("string").to_string())
                .collect(),
            model: g["model"].as_str().map(|m| golden_dir().join(m)),
            cases: g["cases"]
                .as_array()
                .expect("cases")
                .iter()
                .map(|c| Case {
                    prompt: c["prompt"].as_str().expect("prompt").to_string(),
                    prompt_ids: ids(&c["prompt_ids"]),
                    last_logits: floats(&c["last_logits"]),
                    greedy_ids: ids(&c["greedy_ids"]),
                    greedy_margins: floats(&c["greedy_margins"]),
                })
                .collect(),
        });
    }
    assert!(
        out.len() >= 4,
        "expected goldens for llama, mistral, qwen2, qwen3"
    );
    out
}

fn synth_args(g: &Golden, extra: &[&str]) -> Vec<String> {
    let mut args = g.synth.clone();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The golden's model as transformers saw it: the committed one transformers made, or
/// the synthetic one written (in F32 safetensors) into `dir`.
fn model_of(g: &Golden, dir: &std::path::Path) -> std::path::PathBuf {
    if let Some(model) = &g.model {
        return model.clone();
    }
    let model = dir.join(&g.name);
    let args = synth_args(g, &["--format", "safetensors", "--dtype", "f32"]);
    synth(&args.iter().map(String::as_str).collect::<Vec<_>>(), &model);
    model
}

#[test]
fn safetensors_matches_transformers_for_every_architecture_and_stage_count() {
    for g in goldens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = model_of(&g, dir.path());
        let file = ModelFile::open(&model).expect("open");
        let tokenizer = Tokenizer::for_model(&file).expect("tokenizer");
        for case in &g.cases {
            let ids = tokenizer.encode(&case.prompt, true).expect("encode");
            assert_eq!(
                ids, case.prompt_ids,
                "{}: tokenization of {:?}",
                g.name, case.prompt
            );
            let n = case.greedy_ids.len();
            let (tokens, logits) = greedy(&file, 1, &case.prompt_ids, n);
            let diff = max_abs_diff(&logits, &case.last_logits);
            eprintln!(
                "{}: max |logit - transformers| = {diff:.2e} on {:?}",
                g.name, case.prompt
            );
            assert!(
                diff < 1e-3,
                "{}: last logits differ from transformers by {diff} (std {})",
                g.name,
                std_dev(&case.last_logits)
            );
            assert_eq!(
                tokens, case.greedy_ids,
                "{}: greedy tokens vs transformers for {:?}",
                g.name, case.prompt
            );
            for stages in [2, 3] {
                let (split, _) = greedy(&file, stages, &case.prompt_ids, n);
                assert_eq!(split, tokens, "{}: {stages} stages vs 1", g.name);
            }
        }
    }
}

#[test]
fn gguf_written_by_llama_cpp_loads_and_matches_transformers() {
    let mut checked = 0;
    for g in goldens() {
        let path = golden_dir().join(format!("llamacpp/{}-f16.gguf", g.name));
        if !path.exists() {
            continue;
        }
        let file = ModelFile::open(&path).expect("open llama.cpp gguf");
        // The tokenizer embedded in the GGUF must tokenize as tokenizer.json did.
        let tokenizer = Tokenizer::for_model(&file).expect("embedded tokenizer");
        for case in &g.cases {
            let ids = tokenizer.encode(&case.prompt, true).expect("encode");
            assert_eq!(
                ids, case.prompt_ids,
                "{}: GGUF tokenizer on {:?}",
                g.name, case.prompt
            );
            let n = case.greedy_ids.len();
            let (tokens, logits) = greedy(&file, 1, &case.prompt_ids, n);
            let diff = max_abs_diff(&logits, &case.last_logits);
            eprintln!(
                "{}: llama.cpp f16 GGUF max |logit - transformers| = {diff:.2e}",
                g.name
            );
            let (split, _) = greedy(&file, 3, &case.prompt_ids, n);
            assert_eq!(split, tokens, "{}: f16 GGUF in 3 stages vs 1", g.name);
            assert!(
                diff < 5e-2,
                "{}: f16 GGUF logits differ from transformers by {diff}",
                g.name
            );
            for (i, (t, want)) in tokens.iter().zip(&case.greedy_ids).enumerate() {
                if case.greedy_margins[i] <= 0.1 {
                    break; // a near-tie: f16 rounding may legitimately flip it.
                }
                assert_eq!(
                    t, want,
                    "{}: f16 GGUF greedy token {i} for {:?}",
                    g.name, case.prompt
                );
            }
        }
        // Q8_0 from llama.cpp: loads, and its logits stay within 0.15 of a standard deviation
        // of the reference (8-bit weights and, in the packed kernels, 8-bit activations).
        let q8 = golden_dir().join(format!("llamacpp/{}-q8_0.gguf", g.name));
        if q8.exists() {
            let file = ModelFile::open(&q8).expect("open q8_0");
            let case = &g.cases[0];
            let (_, logits) = greedy(&file, 1, &case.prompt_ids, 1);
            let rel = max_abs_diff(&logits, &case.last_logits) / std_dev(&case.last_logits);
            eprintln!(
                "{}: llama.cpp q8_0 GGUF max logit error {rel:.3} of a std",
                g.name
            );
            assert!(
                rel < 0.15,
                "{}: q8_0 logits differ by {rel} of a std",
                g.name
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 3,
        "expected llama.cpp files for at least three models"
    );
}

/// The opt-in F16 wire (activations rounded between stages, for slow links) against
/// transformers' greedy tokens on every golden prompt, through a real three-worker
/// cluster: only near-ties may change.
#[test]
fn golden_prompts_through_a_three_worker_cluster_on_the_f16_wire() {
    use common::cluster::{tokens, ClusterOptions, TestCluster};
    let (mut same, mut total) = (0usize, 0usize);
    for g in goldens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = model_of(&g, dir.path());
        let options = ClusterOptions {
            worker_args: vec!["--speed".into(), "1e9".into()],
            serve_args: vec!["--wire-dtype".into(), "f16".into()],
            ..Default::default()
        };
        let cluster = TestCluster::start(&model, &options);
        cluster.wait_serving(3);
        for case in &g.cases {
            let ids: Vec<String> = case.prompt_ids.iter().map(u32::to_string).collect();
            let n = case.greedy_ids.len().to_string();
            let out = cluster.generate(&[
                "--prompt-ids",
                &ids.join(","),
                "--max-tokens",
                &n,
                "--ignore-eos",
            ]);
            let got = tokens(&out);
            for (i, (&want, &margin)) in
                case.greedy_ids.iter().zip(&case.greedy_margins).enumerate()
            {
                total += 1;
                if got.get(i) == Some(&u64::from(want)) {
                    same += 1;
                } else {
                    // Past a divergence the histories differ; only a near-tie may diverge.
                    assert!(
                        margin < 0.05,
                        "{}: token {i} of {:?} changed on the F16 wire although transformers' top-2 margin is {margin}",
                        g.name,
                        case.prompt
                    );
                    break;
                }
            }
        }
    }
    eprintln!("F16 wire: {same} of {total} golden greedy tokens identical to transformers");
    assert!(same > 0);
}
