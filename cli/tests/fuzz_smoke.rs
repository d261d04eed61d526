//! CI's short run of the fuzzing: every fuzz target's entry point (`fuzz/fuzz_targets`)
//! on its kept corpus (`fuzz/corpus/<target>`, grown by `cargo +nightly fuzz run`), and on
//! seeded mutations of it (bytes flipped, cut, doubled, and lengths set to extremes). None
//! may panic; the long runs' figures are in the overload issue's closing note.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::path::PathBuf;

use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mutations tried per corpus entry.
const MUTATIONS: usize = 40;
/// Most corpus entries taken per target (the kept corpus is minimised, but bounded here
/// so CI stays short).
const MOST_ENTRIES: usize = 400;

/// The kept corpus of a target, after `seeds` (inputs of the right shape made here, so
/// that mutations start from something a parser gets far into).
fn corpus(target: &str, seeds: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    paths.sort();
    let mut inputs = seeds;
    inputs.extend(
        paths
            .iter()
            .take(MOST_ENTRIES)
            .map(|p| std::fs::read(p).unwrap()),
    );
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    inputs
}

/// A small model in `format` ("gguf" or "safetensors"), its bytes.
fn small_model(format: &str) -> Vec<u8> {
    use strata_model::synth::{write_model, SynthDType, SynthFormat, SynthOptions, SynthSpec};
    let dir = tempfile::tempdir().unwrap();
    let mut spec = SynthSpec::tiny(strata_model::Arch::Llama);
    (
        spec.layers,
        spec.hidden,
        spec.intermediate,
        spec.vocab,
        spec.context,
    ) = (1, 16, 32, 260, 64);
    spec.heads = 2;
    spec.kv_heads = 1;
    let gguf = format == "gguf";
    let opts = SynthOptions {
        format: if gguf {
            SynthFormat::Gguf
        } else {
            SynthFormat::Safetensors
        },
        dtype: SynthDType::F32,
        shard_bytes: None,
    };
    let out = if gguf {
        dir.path().join("m.gguf")
    } else {
        dir.path().join("st")
    };
    write_model(&spec, &opts, &out).unwrap();
    std::fs::read(if gguf {
        out
    } else {
        out.join("model.safetensors")
    })
    .unwrap()
}

/// One seeded change of the kind that breaks parsers.
fn mutate(rng: &mut ChaCha8Rng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    if b.is_empty() {
        return vec![rng.random()];
    }
    match rng.random_range(0..5) {
        0 => {
            let i = rng.random_range(0..b.len());
            b[i] ^= 1 << rng.random_range(0..8);
        }
        1 => b.truncate(rng.random_range(0..b.len())),
        2 => {
            let i = rng.random_range(0..b.len());
            let tail = b[i..].to_vec();
            b.extend(tail);
        }
        3 => {
            // A length or count set to an extreme.
            let extremes: [u64; 5] = [0, 1 << 31, u32::MAX as u64, 1 << 62, u64::MAX];
            let v = extremes[rng.random_range(0..extremes.len())].to_le_bytes();
            let i = rng.random_range(0..b.len());
            let n = rng.random_range(1..=8).min(b.len() - i);
            b[i..i + n].copy_from_slice(&v[..n]);
        }
        _ => {
            let i = rng.random_range(0..b.len());
            b.insert(i, rng.random());
        }
    }
    b
}

fn run(target: &str, seeds: Vec<Vec<u8>>, f: impl Fn(&[u8])) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let entries = corpus(target, seeds);
    for input in &entries {
        f(input);
        for _ in 0..MUTATIONS {
            f(&mutate(&mut rng, input));
        }
    }
    println!(
        "{target}: {} entries, {} inputs",
        entries.len(),
        entries.len() * (MUTATIONS + 1)
    );
}

#[test]
fn gguf() {
    let model = small_model("gguf");
    assert!(strata_model::format::gguf_config_of(&model).is_ok());
    run("gguf", vec![model], |b| {
        let _ = strata_model::format::gguf_config_of(b);
    });
}

#[test]
fn safetensors_header() {
    let model = small_model("safetensors");
    assert!(strata_model::format::safetensors_header_of(&model).is_ok());
    run("safetensors_header", vec![model], |b| {
        let _ = strata_model::format::safetensors_header_of(b);
    });
}

#[test]
fn frame() {
    use strata_net::frame::{Frame, SeqFailure, Step};
    let forward = Frame::Forward {
        epoch: 2,
        steps: vec![Step {
            seq: 1,
            start: 0,
            tokens: vec![5, 6],
            sampler: None,
            attempt: 0,
            reserve: 40,
            partial: true,
            draft: 0,
            drawn_from: Vec::new(),
            draft_next: 0,
            energy_uj: Some(10),
        }],
        activations: Some(strata_net::frame::Activations {
            wire: strata_model::WireType::F32,
            hidden: 4,
            bytes: vec![0; 2 * 4 * 4],
        }),
        failures: vec![SeqFailure {
            seq: 3,
            attempt: 1,
            message: "gone".into(),
        }],
    };
    let free = Frame::Free {
        epoch: 2,
        seqs: vec![1, 2],
    };
    let seeds = [forward, free]
        .iter()
        .map(|f| {
            let (mut head, body) = f.encode();
            head.extend_from_slice(body);
            head
        })
        .collect();
    run("frame", seeds, strata_net::frame::receive_bytes);
}

#[test]
fn control() {
    use strata_proto::v1::{LoadHeader, WireRequest};
    let dir = tempfile::tempdir().unwrap();
    let cache = strata_worker::cache::SliceCache::open(dir.path()).unwrap();
    let load = LoadHeader {
        model_digest: "ab".repeat(32),
        model_name: "m.gguf".into(),
        files: vec![strata_proto::v1::SliceFile {
            path: "m.gguf".into(),
            length: 1 << 20,
            ranges: vec![strata_proto::v1::ByteRange {
                offset: 4096,
                length: 8192,
            }],
        }],
        ..Default::default()
    };
    let wire = WireRequest {
        next_address: "127.0.0.1:9000".into(),
        wire_dtype: "f16".into(),
        kv_positions: 4096,
        ..Default::default()
    };
    let seeds = vec![load.encode_to_vec(), wire.encode_to_vec()];
    run("control", seeds, |b| {
        if let Ok(header) = LoadHeader::decode(b) {
            let _ = cache.missing(&header);
            let _ = cache.model_root(&header);
        }
        if let Ok(wire) = WireRequest::decode(b) {
            let _ = strata_worker::control::wiring_of(&wire);
        }
    });
}

#[test]
fn http_request() {
    let seeds = [
        r#"{"prompt":[1,2,3],"max_tokens":4,"temperature":0.5,"stop":["x"],"seed":3}"#,
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":8,"logprobs":true,"top_logprobs":2}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    assert!(strata_coordinator::check_request_body(br#"{"prompt":[1,2,3]}"#).is_ok());
    run("http_request", seeds, |b| {
        let _ = strata_coordinator::check_request_body(b);
    });
}
