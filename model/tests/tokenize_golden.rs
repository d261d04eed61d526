//! Tokenization of real GGUF vocabularies is identical to llama.cpp's: the vocabulary's
//! metadata and llama-tokenize's ids for a mixed corpus (code, CJK, digits, whitespace
//! runs, emoji, CRLF) are recorded by `tests/golden/tokenize/make_golden.py`.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::Value;
use strata_model::Tokenizer;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/tokenize")
}

/// The recorded `tokenizer.ggml.*` metadata as GGUF values.
fn metadata(name: &str) -> HashMap<String, Value> {
    let path = golden_dir().join(format!("{name}.vocab.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    fn value(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::I64(n.as_i64().expect("integer metadata")),
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(items) => Value::Array(items.iter().map(value).collect()),
            other => panic!("unexpected metadata {other}"),
        }
    }
    doc.iter().map(|(k, v)| (k.clone(), value(v))).collect()
}

#[test]
fn smollm2_tokenizes_as_llama_cpp_does() {
    let tokenizer = Tokenizer::from_gguf(&metadata("smollm2")).unwrap();
    let path = golden_dir().join("smollm2.json");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut wrong = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer.encode(text, false).unwrap();
        if got != want {
            wrong.push(format!(
                "{text:?}\n  llama.cpp {want:?}\n  strata    {got:?}"
            ));
        }
        assert_eq!(tokenizer.decode(&got, false).unwrap(), text, "round trip");
    }
    assert!(
        wrong.is_empty(),
        "{} of {} differ:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}
