//! Replaying a sequence's history in one prefill rebuilds exactly the caches that decoding
//! it step by step built: the logits that follow are bit-identical. The cluster resumes an
//! answer after losing a stage this way, so the resumed answer equals its undisturbed twin.
//! Batching beside other sequences changes nothing either.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use strata_model::synth::{write_model, SynthDType, SynthFormat, SynthOptions, SynthSpec};
use strata_model::{Arch, Chunk, KvCache, ModelFile, Slice, Stage, StageInput, StageOutput};

fn logits(out: StageOutput) -> Vec<Vec<f32>> {
    match out {
        StageOutput::Logits(t) => t.to_vec2::<f32>().unwrap(),
        StageOutput::Hidden(_) => panic!("expected logits"),
    }
}

fn run(stage: &Stage, cache: &mut KvCache, seq: u64, start: usize, ids: &[u32]) -> Vec<f32> {
    let chunk = Chunk {
        seq,
        start,
        len: ids.len(),
    };
    logits(
        stage
            .forward(&[chunk], StageInput::Tokens(ids.to_vec()), cache)
            .unwrap(),
    )
    .remove(0)
}

#[test]
fn a_replayed_history_gives_the_logits_of_step_by_step_decoding() {
    for (dtype, arch) in [
        (SynthDType::F32, Arch::Llama),
        (SynthDType::F16, Arch::Qwen2),
        (SynthDType::Quant(GgmlDType::Q8_0), Arch::Llama),
        (SynthDType::Quant(GgmlDType::Q4_0), Arch::Qwen3),
        (SynthDType::Quant(GgmlDType::Q4K), Arch::Llama),
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
        let prompt: Vec<u32> = (0..11).map(|i| 17 + 5 * i).collect();
        let generated: Vec<u32> = (0..40).map(|i| (300 + 7 * i) % 500).collect();
        // Undisturbed: the prompt in one chunk, then one token per step.
        let mut cache = stage.new_cache();
        cache.create(1);
        run(&stage, &mut cache, 1, 0, &prompt);
        let mut stepped = Vec::new();
        for (i, &t) in generated.iter().enumerate() {
            stepped.push(run(&stage, &mut cache, 1, prompt.len() + i, &[t]));
        }
        // Replayed after k tokens: the whole history in one chunk, then steps again.
        for k in [1usize, 7, 23] {
            let mut cache = stage.new_cache();
            cache.create(2);
            let mut history = prompt.clone();
            history.extend(&generated[..k]);
            let mut replayed = vec![run(&stage, &mut cache, 2, 0, &history)];
            for (i, &t) in generated.iter().enumerate().skip(k) {
                replayed.push(run(&stage, &mut cache, 2, prompt.len() + i, &[t]));
            }
            for (j, (a, b)) in stepped[k - 1..].iter().zip(&replayed).enumerate() {
                let diff = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    a == b,
                    "{dtype:?} {arch:?}: after replaying {k} tokens, step {j} differs by {diff}"
                );
            }
        }
    }
}
