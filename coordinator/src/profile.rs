//! Model profiles for the planner: measured from a model file, or computed on paper from
//! a preset name and a quantization (`llama-3.1-70b:q4_k_m`) for models not on disk.

use strata_model::synth::SynthSpec;
use strata_model::{ModelConfig, ModelFile, Role};

use crate::error::{Error, Result};
use crate::planner::{DraftBytes, ModelProfile};

/// KV-cache bytes per token per layer: keys and values in F32, as the CPU runtime keeps them.
pub fn kv_bytes_per_token(c: &ModelConfig) -> u64 {
    (2 * c.num_kv_heads * c.head_dim * 4) as u64
}

/// Bytes of activations one row of a batch keeps alive while a layer runs, in f32: the
/// residual, its norm, the attention's queries, keys, values and output (about eight
/// hidden-size rows), and the MLP's gate, up, their product and its input to `down`
/// (four intermediate-size rows). The planner counts a full batch of them.
pub fn activation_bytes_per_row(c: &ModelConfig) -> u64 {
    (4 * (8 * c.hidden_size + 4 * c.intermediate_size)) as u64
}

/// The profile of a model on disk, from its tensor directory (quantized sizes as stored).
pub fn of_file(name: &str, file: &ModelFile) -> ModelProfile {
    let c = file.config();
    let embed = file.role_bytes(Role::Embed);
    let head = file.role_bytes(Role::FinalNorm)
        + if file.entry(Role::LmHead).is_some() {
            file.role_bytes(Role::LmHead)
        } else {
            embed
        };
    ModelProfile {
        name: name.to_string(),
        layer_bytes: (0..c.num_layers).map(|l| file.layer_bytes(l)).collect(),
        active_layer_bytes: (0..c.num_layers)
            .map(|l| file.active_layer_bytes(l))
            .collect(),
        embed_bytes: embed,
        head_bytes: head,
        kv_bytes_per_token: kv_bytes_per_token(c),
        largest_layer_tensor: (0..c.num_layers)
            .flat_map(|l| Role::layer_roles(l, c))
            .map(|r| file.role_bytes(r))
            .max()
            .unwrap_or(0),
        hidden: c.hidden_size,
        activation_bytes_per_row: activation_bytes_per_row(c),
    }
}

/// What a draft model of profile `p` costs the last stage that holds it (`--draft-on
/// worker`): its weights once (a tied head counted twice, as the planner counts heads),
/// its caches for `kv_tokens` positions, and the transient of loading its largest tensor;
/// and the bytes it reads per token drafted.
pub fn draft_bytes(p: &ModelProfile, kv_tokens: u64) -> DraftBytes {
    let layers = p.layer_bytes.len() as u64;
    let largest = p.largest_layer_tensor.max(p.embed_bytes).max(p.head_bytes);
    DraftBytes {
        memory: p.weight_bytes() + kv_tokens * p.kv_bytes_per_token * layers + 2 * largest,
        weights: p.active_layer_bytes.iter().sum::<u64>() + p.head_bytes,
    }
}

/// Bits per weight of a quantization as llama.cpp stores it (block scales included;
/// the `_m`/`_s` mixes averaged over a Llama model's tensors).
pub fn bits_per_weight(quant: &str) -> Option<f64> {
    Some(match quant.to_ascii_lowercase().as_str() {
        "f32" => 32.0,
        "f16" | "bf16" => 16.0,
        "q8_0" => 8.5,
        "q6_k" => 6.5625,
        "q5_k_m" => 5.69,
        "q5_k" | "q5_k_s" => 5.5,
        "q5_0" => 5.5,
        "q4_k_m" => 4.85,
        "q4_k" | "q4_k_s" => 4.5,
        "q4_0" => 4.5,
        "q3_k_m" => 3.91,
        "q2_k" => 2.96,
        _ => return None,
    })
}

/// A profile on paper: `preset:quant`, e.g. `llama-3.1-70b:q4_k_m`.
pub fn of_spec(spec: &str) -> Result<ModelProfile> {
    let (name, quant) = spec.split_once(':').unwrap_or((spec, "q4_k_m"));
    let preset = SynthSpec::preset(name)
        .map_err(|e| Error::UnknownSpec(format!("--model-spec {spec}: {e}")))?;
    let bits = bits_per_weight(quant).ok_or_else(|| {
        Error::UnknownSpec(format!(
            "--model-spec {spec}: unknown quantization `{quant}`; use f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q3_k_m or q2_k"
        ))
    })?;
    let c = preset.config();
    let bytes = |params: usize| (params as f64 * bits / 8.0).ceil() as u64;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let attn = h * c.num_heads * hd * 2 + h * c.num_kv_heads * hd * 2;
    let norms = 2 * h * 4;
    // A mixture of experts: the router (kept in F32, as llama.cpp does) and every
    // expert, of which a token reads `used`.
    let (mlp, active_mlp, router, largest) = match c.experts {
        Some(e) => {
            let expert = 3 * h * e.intermediate_size;
            (
                e.count * expert,
                e.used * expert,
                (e.count * h * 4) as u64,
                bytes(e.count * h * e.intermediate_size),
            )
        }
        None => {
            let mlp = 3 * h * c.intermediate_size;
            (mlp, mlp, 0, bytes(h * c.intermediate_size))
        }
    };
    let layer = bytes(attn + mlp) + norms as u64 + router;
    let active = bytes(attn + active_mlp) + norms as u64 + router;
    let embed = bytes(c.vocab_size * h);
    let head = (h * 4) as u64 + embed;
    Ok(ModelProfile {
        name: format!("{name} ({quant})"),
        layer_bytes: vec![layer; c.num_layers],
        active_layer_bytes: vec![active; c.num_layers],
        embed_bytes: embed,
        head_bytes: head,
        kv_bytes_per_token: kv_bytes_per_token(&c),
        largest_layer_tensor: largest,
        hidden: h,
        activation_bytes_per_row: activation_bytes_per_row(&c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_presets_people_ask_about_have_their_sizes() {
        // llama.cpp's Q4_K_M files: 405B is 243 GB, Qwen2.5-72B 47.4 GB, Qwen3-32B 19.8 GB.
        for (spec, low, high) in [
            ("llama-3.1-405b:q4_k_m", 220.0, 260.0),
            ("qwen2.5-72b:q4_k_m", 42.0, 52.0),
            ("qwen3-32b:q4_k_m", 17.0, 22.0),
            ("deepseek-r1-distill-llama-70b:q4_k_m", 38.0, 46.0),
            // Mixtral 8x7B is 26.4 GB, Qwen3-30B-A3B 18.6 GB, Qwen3-235B-A22B 142 GB.
            ("mixtral-8x7b:q4_k_m", 24.0, 29.0),
            ("qwen3-30b-a3b:q4_k_m", 16.5, 20.5),
            ("qwen3-235b-a22b:q4_k_m", 128.0, 152.0),
        ] {
            let gb = of_spec(spec).unwrap().weight_bytes() as f64 / 1e9;
            assert!((low..high).contains(&gb), "{spec}: {gb} GB");
        }
    }

    #[test]
    fn llama_70b_q4_k_m_is_about_40_gb() {
        let p = of_spec("llama-3.1-70b:q4_k_m").unwrap();
        let gb = p.weight_bytes() as f64 / 1e9;
        // llama.cpp's Q4_K_M file of Llama 3.1 70B is 42.5 GB.
        assert!((38.0..46.0).contains(&gb), "{gb}");
        assert_eq!(p.layer_bytes.len(), 80);
        assert!(of_spec("llama-3.1-70b:q9").is_err());
        assert!(of_spec("gpt-5:q4_0").is_err());
    }
}
