//! Speculative decoding in one process: greedy, and with drafts chosen without chance
//! (prompt lookup) for a sampled answer, it gives the tokens plain decoding gives, whatever
//! the drafts: prompt lookup, the model drafting for itself (every draft kept), and another
//! model of the same vocabulary (most drafts dropped), on 1 and 3 stages. A model drafting
//! at random for a sampled answer gives a whole answer of the model's distribution (the
//! sampler's tests hold that distribution), keeping what the rejection rule keeps.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use strata_model::synth::{write_model, SynthDType, SynthFormat, SynthOptions, SynthSpec};
use strata_model::{
    Arch, Drafter, GenerateRequest, LocalPipeline, ModelDrafter, ModelFile, NgramDrafter,
    SamplingParams, Slice, Stage,
};

fn synth(dir: &std::path::Path, name: &str, seed: u64, layers: usize) -> ModelFile {
    let mut spec = SynthSpec::tiny(Arch::Llama);
    spec.layers = layers;
    spec.hidden = 128;
    spec.heads = 4;
    spec.kv_heads = 2;
    spec.intermediate = 256;
    spec.seed = seed;
    let opts = SynthOptions {
        format: SynthFormat::Gguf,
        dtype: SynthDType::Quant(GgmlDType::Q8_0),
        shard_bytes: None,
    };
    let report = write_model(&spec, &opts, &dir.join(name)).unwrap();
    ModelFile::open(&report.path).unwrap()
}

fn whole(file: &ModelFile) -> Arc<Stage> {
    let slice = Slice::full(file.config().num_layers);
    Arc::new(Stage::load(file, slice, &Device::Cpu).unwrap())
}

#[test]
fn drafted_generation_gives_the_tokens_of_plain_generation() {
    let dir = tempfile::tempdir().unwrap();
    let main = synth(dir.path(), "main.gguf", 5, 6);
    let other = synth(dir.path(), "other.gguf", 6, 2);
    // A prompt that repeats, so prompt lookup finds matches from the start.
    let prompt: Vec<u32> = [3, 14, 15, 92, 65, 35, 89, 79]
        .iter()
        .cycle()
        .take(30)
        .copied()
        .collect();
    let samplings = [
        SamplingParams::default(),
        SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            repeat_penalty: 1.1,
            seed: 42,
            ..Default::default()
        },
    ];
    for stages in [1, 3] {
        let mut pipeline = LocalPipeline::load(&main, stages, &Device::Cpu).unwrap();
        for sampling in &samplings {
            let request = GenerateRequest {
                prompt_ids: prompt.clone(),
                max_tokens: 40,
                sampling: sampling.clone(),
                stop_at_eos: false,
            };
            let plain = pipeline.generate(&request, |_| {}).unwrap();
            let drafters: Vec<(&str, Box<dyn Drafter>)> = vec![
                ("ngram", Box::new(NgramDrafter::new())),
                ("itself", Box::new(ModelDrafter::new(whole(&main)))),
                ("another model", Box::new(ModelDrafter::new(whole(&other)))),
            ];
            for (name, mut drafter) in drafters {
                let mut streamed = Vec::new();
                let (drafted, counts) = pipeline
                    .generate_drafted(&request, drafter.as_mut(), 8, |s| streamed.push(s.token))
                    .unwrap();
                let what = format!("{name}, {stages} stage(s), {sampling:?}");
                let drawn_at_random = name != "ngram" && sampling.temperature > 0.0;
                if drawn_at_random {
                    assert_eq!(drafted.tokens.len(), plain.tokens.len(), "{what}");
                } else {
                    assert_eq!(drafted.tokens, plain.tokens, "{what}");
                }
                assert_eq!(streamed, drafted.tokens, "{what}");
                // Prompt lookup needs the answer to repeat the prompt, which a sampled
                // answer of a random model may never do; the models always draft.
                if name != "ngram" || sampling.temperature == 0.0 {
                    assert!(counts.drafted > 0, "{what}: nothing drafted");
                }
                assert!(counts.passes <= plain.tokens.len(), "{what}: {counts:?}");
                // A model drafting for itself guesses every token greedily, and drawing
                // at random, draws from the distribution the answer is drawn from, which
                // the rejection rule keeps whatever is drawn (but for rounding).
                if name == "itself" {
                    if drawn_at_random {
                        assert!(
                            counts.accepted * 10 >= counts.drafted * 9,
                            "{what}: {counts:?}"
                        );
                    } else {
                        assert_eq!(counts.accepted, counts.drafted, "{what}: {counts:?}");
                    }
                    assert!(counts.passes < plain.tokens.len() / 2, "{what}: {counts:?}");
                }
            }
        }
    }
}
