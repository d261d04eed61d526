//! Measuring this worker's speed: the weight bytes per second one real transformer layer
//! streams through a single-token forward on the chosen device. The layer is a synthetic
//! Q8_0 layer (hidden 1024, MLP 4096: 17 MB, small enough not to
//! count against a worker's memory budget), written to a temporary GGUF and
//! loaded exactly as a served slice would be, so the figure includes our kernels, not a
//! guess from the CPU's name.

use std::time::Instant;

use candle_core::{Device, Tensor};
use strata_model::synth::{write_model, SynthDType, SynthFormat, SynthOptions, SynthSpec};
use strata_model::{Arch, Chunk, ModelFile, Slice, Stage, StageInput};

use crate::error::Result;

/// Forwards timed (after one warm-up).
const STEPS: usize = 6;

/// Weight bytes per second through one layer's single-token forward.
pub fn measure(device: &Device) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let spec = SynthSpec {
        arch: Arch::Llama,
        layers: 1,
        hidden: 1024,
        heads: 8,
        kv_heads: 2,
        head_dim: None,
        intermediate: 4096,
        vocab: 260,
        context: 256,
        rope_theta: 10000.0,
        rope_llama3: false,
        tie_embeddings: true,
        seed: 7,
        experts: None,
    };
    let opts = SynthOptions {
        format: SynthFormat::Gguf,
        dtype: SynthDType::Quant(candle_core::quantized::GgmlDType::Q8_0),
        shard_bytes: None,
    };
    let report = write_model(&spec, &opts, &dir.path().join("speed.gguf"))?;
    let file = ModelFile::open(&report.path)?;
    let slice = Slice {
        layers: 0..1,
        embed: false,
        head: false,
    };
    let stage = Stage::load(&file, slice, device)?;
    let bytes = file.layer_bytes(0) as f64;
    let mut cache = stage.new_cache();
    cache.create(1);
    let x = Tensor::ones((1, spec.hidden), candle_core::DType::F32, device)?;
    let mut step = |pos: usize| -> Result<()> {
        let chunk = Chunk {
            seq: 1,
            start: pos,
            len: 1,
        };
        stage.forward(&[chunk], StageInput::Hidden(x.clone()), &mut cache)?;
        Ok(())
    };
    step(0)?;
    let t0 = Instant::now();
    for pos in 1..=STEPS {
        step(pos)?;
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    Ok(bytes * STEPS as f64 / secs)
}
