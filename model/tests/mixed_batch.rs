//! A batch that mixes several prefills and decodes of different sequences gives each
//! sequence exactly what it gets alone, bit for bit: the cluster's stages batch whatever is
//! waiting, and an answer must not depend on which other answers shared its steps.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use strata_model::synth::{write_model, SynthDType, SynthFormat, SynthOptions, SynthSpec};
use strata_model::{Arch, Chunk, ModelFile, Slice, Stage, StageInput, StageOutput};

fn logits(out: StageOutput) -> Vec<Vec<f32>> {
    match out {
        StageOutput::Logits(t) => t.to_vec2::<f32>().unwrap(),
        StageOutput::Hidden(_) => panic!("expected logits"),
    }
}

#[test]
fn mixed_prefill_and_decode_batches_match_single_runs() {
    // A mixture of experts too: its rows are regrouped by expert, batch by batch.
    for (dtype, arch) in [
        (SynthDType::F32, Arch::Llama),
        (SynthDType::Quant(GgmlDType::Q8_0), Arch::Llama),
        (SynthDType::Quant(GgmlDType::Q4_0), Arch::Llama),
        (SynthDType::Quant(GgmlDType::Q8_0), Arch::Qwen3Moe),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = SynthSpec::tiny(arch);
        spec.hidden = 256;
        spec.heads = 8;
        spec.intermediate = 512;
        let opts = SynthOptions {
            format: SynthFormat::Gguf,
            dtype,
            shard_bytes: None,
        };
        let report = write_model(&spec, &opts, &dir.path().join("m.gguf")).unwrap();
        let file = ModelFile::open(&report.path).unwrap();
        let stage = Stage::load(&file, Slice::full(spec.layers), &Device::Cpu).unwrap();
        let prompts: Vec<Vec<u32>> = vec![
            (0..9).map(|i| 10 + i).collect(),
            (0..4).map(|i| 100 + 7 * i).collect(),
            (0..13).map(|i| 200 + 3 * i).collect(),
        ];
        // Alone.
        let mut alone = Vec::new();
        for (s, p) in prompts.iter().enumerate() {
            let mut cache = stage.new_cache();
            cache.create(s as u64);
            let chunk = Chunk {
                seq: s as u64,
                start: 0,
                len: p.len(),
            };
            alone.push(
                logits(
                    stage
                        .forward(&[chunk], StageInput::Tokens(p.clone()), &mut cache)
                        .unwrap(),
                )
                .remove(0),
            );
        }
        // Together.
        let mut cache = stage.new_cache();
        let mut chunks = Vec::new();
        let mut ids = Vec::new();
        for (s, p) in prompts.iter().enumerate() {
            cache.create(s as u64);
            chunks.push(Chunk {
                seq: s as u64,
                start: 0,
                len: p.len(),
            });
            ids.extend(p);
        }
        let together = logits(
            stage
                .forward(&chunks, StageInput::Tokens(ids), &mut cache)
                .unwrap(),
        );
        for (s, (a, b)) in alone.iter().zip(&together).enumerate() {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                a == b,
                "{dtype:?} sequence {s}: batched logits differ by {diff}"
            );
        }
    }
}
