//! `strata demo`: the README's first command.
//!
//! Until the bundled demo model and the networked cluster exist, it shows the best real
//! thing Strata does today: it writes a seeded synthetic Llama model in GGUF (Q8_0, with its
//! tokenizer inside), splits it into three stages that run one after another in this
//! process — the same slices and hand-offs the cluster will run across machines — and
//! checks that the split model generates exactly the tokens of the unsplit one.

use std::time::Instant;

use anyhow::{ensure, Context};
use candle_core::Device;
use clap::Args;
use strata_model::synth::{self, SynthDType, SynthFormat, SynthOptions, SynthSpec};
use strata_model::{Arch, GenerateRequest, LocalPipeline, ModelFile, Tokenizer};

use super::human_bytes;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stages to split the model into.
    #[arg(long, default_value_t = 3)]
    stages: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("demo-synthetic.gguf");
    let spec = SynthSpec {
        layers: 6,
        hidden: 256,
        heads: 8,
        kv_heads: 2,
        intermediate: 768,
        vocab: 4096,
        seed: 7,
        ..SynthSpec::tiny(Arch::Llama)
    };
    let t0 = Instant::now();
    let report = synth::write_model(
        &spec,
        &SynthOptions {
            format: SynthFormat::Gguf,
            dtype: SynthDType::Quant(candle_core::quantized::GgmlDType::Q8_0),
            shard_bytes: None,
        },
        &path,
    )?;
    println!(
        "Strata demo (preview): the cluster and the bundled demo model are still being built.\n\
         Wrote a synthetic Llama model ({} layers, Q8_0 GGUF, {}) in {:.1}s.",
        spec.layers,
        human_bytes(report.tensor_bytes),
        t0.elapsed().as_secs_f64()
    );
    let file = ModelFile::open(&path)?;
    let tokenizer = Tokenizer::for_model(&file)?;
    let prompt = "the cluster of machines in the house";
    let ids = tokenizer.encode(prompt, true)?;
    let request = GenerateRequest {
        stop_at_eos: false,
        ..GenerateRequest::greedy(ids.clone(), a.max_tokens)
    };
    let mut whole = LocalPipeline::load(&file, 1, &Device::Cpu)?;
    let reference = whole.generate(&request, |_| {})?;
    let mut split = LocalPipeline::load(&file, a.stages, &Device::Cpu)?;
    println!("\nPipeline of {} stages:", a.stages);
    for (i, s) in split.stages().enumerate() {
        let sl = s.slice();
        println!(
            "  stage {i}: layers {:>2}..{:<2} {:>10}{}{}",
            sl.layers.start,
            sl.layers.end,
            human_bytes(s.weight_bytes()),
            if sl.embed { "  + embedding" } else { "" },
            if sl.head {
                "  + norm, head, sampler"
            } else {
                ""
            }
        );
    }
    let generation = split.generate(&request, |_| {})?;
    let text = tokenizer.decode(&generation.tokens, true)?;
    println!("\nprompt: {prompt:?} ({} tokens)", ids.len());
    println!("tokens: {:?}", generation.tokens);
    println!("text:   {text:?}  (random weights: the words are noise, the arithmetic is real)");
    let n = generation.tokens.len();
    println!(
        "speed:  prefill {:.0} tokens/s, decode {:.1} tokens/s",
        ids.len() as f64 / generation.prefill.as_secs_f64(),
        (n.saturating_sub(1)) as f64 / generation.decode.as_secs_f64().max(1e-9)
    );
    ensure!(
        generation.tokens == reference.tokens,
        "the {}-stage pipeline diverged from the single stage: {:?} vs {:?}",
        a.stages,
        generation.tokens,
        reference.tokens
    );
    println!(
        "check:  {} stages generate exactly the tokens of 1 stage",
        a.stages
    );
    Ok(())
}
