//! The model's hyper-parameters, read from a Hugging Face `config.json` (classic
//! `rope_theta`/`rope_scaling` keys and transformers 5's `rope_parameters`) or from GGUF
//! metadata (llama.cpp's key names), into one architecture-neutral struct.

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{Error, Result};

/// The transformer families Strata runs. All share the Llama block; they differ in
/// biases, norms, rotary layout, and whether the feed-forward is a mixture of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Llama 2 / 3.x.
    Llama,
    /// Mistral (Llama block; sliding window unused at the contexts we run).
    Mistral,
    /// Qwen2 / 2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: RMSNorm on each head of q and k, no biases.
    Qwen3,
    /// Mixtral: Mistral's attention, a mixture of experts for the feed-forward (llama.cpp
    /// stores it as `llama` with `llama.expert_count`).
    Mixtral,
    /// Qwen3-MoE: Qwen3's attention, a mixture of experts for the feed-forward.
    Qwen3Moe,
}

impl Arch {
    /// Parses the names used by `config.json`'s `model_type` and GGUF's
    /// `general.architecture`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" => Ok(Arch::Llama),
            "mistral" => Ok(Arch::Mistral),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            "mixtral" => Ok(Arch::Mixtral),
            "qwen3_moe" | "qwen3moe" => Ok(Arch::Qwen3Moe),
            _ => Err(Error::UnsupportedArchitecture {
                arch: name.to_string(),
            }),
        }
    }

    /// The lowercase name, as in `config.json`'s `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Mixtral => "mixtral",
            Arch::Qwen3Moe => "qwen3_moe",
        }
    }

    /// The transformers class name written to `config.json`'s `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// The architecture name llama.cpp writes to GGUF (`mistral` and `mixtral` are stored
    /// as `llama`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Mistral | Arch::Mixtral => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3moe",
        }
    }

    /// Whether each layer's feed-forward is a mixture of experts.
    pub fn has_experts(self) -> bool {
        matches!(self, Arch::Mixtral | Arch::Qwen3Moe)
    }

    /// Whether q and k get an RMSNorm per head before the rotary.
    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Qwen3Moe)
    }

    /// Whether the architecture has biases on the q, k and v projections by default.
    pub fn default_qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
    }

    /// Whether llama.cpp's converter permutes the q/k rows of this architecture so that its
    /// interleaved ("normal") rotary matches transformers' rotate-half layout.
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral | Arch::Mixtral)
    }
}

/// How rotary frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1's piecewise scaling.
    Llama3 {
        /// Overall stretch factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are not scaled.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Per-frequency divisors as stored by llama.cpp in the `rope_freqs.weight` tensor.
    FreqFactors {
        /// One divisor per rotary frequency (head_dim / 2 of them).
        factors: Vec<f32>,
    },
}

/// A mixture of experts in place of each layer's feed-forward: a router scores every expert
/// for each token, the `used` best run (each a SwiGLU feed-forward of width
/// `intermediate_size`), and their outputs are summed, weighted by the router's softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Experts {
    /// Experts per layer.
    pub count: usize,
    /// Experts each token runs through.
    pub used: usize,
    /// Width of one expert's inner layer.
    pub intermediate_size: usize,
    /// The chosen experts' weights are renormalised to sum to one (Mixtral always;
    /// Qwen3-MoE's `norm_topk_prob`; llama.cpp always).
    pub normalize: bool,
}

/// The mixture of experts of a `config.json` of `arch`: transformers' key names (Qwen3-MoE
/// with `num_experts` or, as transformers 5 saves it, `num_local_experts`). Qwen3-MoE
/// layers without experts (`decoder_sparse_step`, `mlp_only_layers`) are refused: every
/// released model has experts in every layer, and so does llama.cpp's loader.
fn hf_experts(json: &Json, arch: Arch) -> std::result::Result<Experts, String> {
    let get = |key: &str| json.get(key).and_then(Json::as_u64).map(|v| v as usize);
    let count = get("num_local_experts")
        .or_else(|| get("num_experts"))
        .ok_or("missing `num_local_experts` (or `num_experts`)")?;
    let used = get("num_experts_per_tok").ok_or("missing `num_experts_per_tok`")?;
    let (intermediate_size, normalize) = if arch == Arch::Qwen3Moe {
        if get("decoder_sparse_step").is_some_and(|s| s != 1)
            || json
                .get("mlp_only_layers")
                .and_then(Json::as_array)
                .is_some_and(|l| !l.is_empty())
        {
            return Err(
                "layers without experts (`decoder_sparse_step` other than 1, or \
                 `mlp_only_layers`) are not supported"
                    .into(),
            );
        }
        let normalize = json
            .get("norm_topk_prob")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        (
            get("moe_intermediate_size").ok_or("missing `moe_intermediate_size`")?,
            normalize,
        )
    } else {
        (
            get("intermediate_size").ok_or("missing `intermediate_size`")?,
            true,
        )
    };
    Ok(Experts {
        count,
        used,
        intermediate_size,
        normalize,
    })
}

/// Everything the runtime needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Architecture family.
    pub arch: Arch,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Attention (query) heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base frequency.
    pub rope_theta: f64,
    /// Optional rotary scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// The model's context length; rotary tables are built this long.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v projections.
    pub qkv_bias: bool,
    /// RMSNorm on each q and k head (Qwen3).
    pub qk_norm: bool,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops on any of them).
    pub eos_token_ids: Vec<u32>,
    /// The mixture of experts that replaces each layer's feed-forward, if any.
    #[serde(default)]
    pub experts: Option<Experts>,
}

impl ModelConfig {
    /// Checks the internal consistency a forward pass relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |reason: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(invalid(format!("{name} must be positive")));
            }
        }
        // Far past any real model, and small enough that nothing sized from them overflows
        // (a header that says 2^31 layers is refused here, not by allocating them).
        let most = [
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_layers, 4096),
            ("num_attention_heads", self.num_heads, 4096),
            ("head_dim", self.head_dim, 1 << 14),
            ("vocab_size", self.vocab_size, 1 << 24),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ];
        for (name, value, limit) in most {
            if value > limit {
                return Err(invalid(format!(
                    "{name} is {value}, past the most this loader takes ({limit}): the file's \
                     header is damaged or not a language model"
                )));
            }
        }
        if let Some(e) = self.experts {
            if e.count == 0 || e.count > 1024 || e.used == 0 || e.used > e.count {
                return Err(invalid(format!(
                    "{} experts, {} used per token: need 1 to 1024 experts and between 1 and \
                     all of them used",
                    e.count, e.used
                )));
            }
            if e.intermediate_size == 0 || e.intermediate_size > 1 << 20 {
                return Err(invalid(format!(
                    "expert intermediate size {} must be between 1 and {}",
                    e.intermediate_size,
                    1 << 20
                )));
            }
        }
        if self.arch.has_experts() != self.experts.is_some() {
            return Err(invalid(format!(
                "{} {} experts, but no expert count was given",
                self.arch.name(),
                if self.arch.has_experts() {
                    "needs"
                } else {
                    "has no"
                }
            )));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(format!(
                "head_dim ({}) must be even",
                self.head_dim
            )));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(invalid(format!(
                "rope_theta ({}) must be positive",
                self.rope_theta
            )));
        }
        if let Some(RopeScaling::FreqFactors { factors }) = &self.rope_scaling {
            if factors.len() != self.head_dim / 2 {
                return Err(invalid(format!(
                    "rope_freqs has {} factors, expected head_dim/2 = {}",
                    factors.len(),
                    self.head_dim / 2
                )));
            }
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let json: Json = serde_json::from_str(text).map_err(|e| Error::Malformed {
            path: path.to_path_buf(),
            format: "config.json",
            reason: e.to_string(),
        })?;
        // Multimodal wrappers keep the language model's config under `text_config`.
        let json = json.get("text_config").cloned().unwrap_or(json);
        let invalid = |reason: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let usize_key = |key: &str| -> Result<usize> {
            json.get(key)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| invalid(format!("missing or non-integer `{key}`")))
        };
        let opt_usize = |key: &str| json.get(key).and_then(Json::as_u64).map(|v| v as usize);
        let model_type = json
            .get("model_type")
            .and_then(Json::as_str)
            .ok_or_else(|| invalid("missing `model_type`".into()))?;
        let arch = Arch::parse(model_type)?;
        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_heads.max(1));

        // transformers 5 folds theta and scaling into `rope_parameters`; older files use
        // `rope_theta` and `rope_scaling`.
        let (rope_theta, rope_scaling) = match json.get("rope_parameters") {
            Some(params) if params.is_object() => {
                let theta = params
                    .get("rope_theta")
                    .and_then(Json::as_f64)
                    .or_else(|| json.get("rope_theta").and_then(Json::as_f64))
                    .unwrap_or(10_000.0);
                (theta, parse_rope_scaling(params, path)?)
            }
            _ => {
                let theta = json
                    .get("rope_theta")
                    .and_then(Json::as_f64)
                    .unwrap_or(10_000.0);
                let scaling = match json.get("rope_scaling") {
                    Some(s) if s.is_object() => parse_rope_scaling(s, path)?,
                    _ => None,
                };
                (theta, scaling)
            }
        };

        let eos_token_ids = match json.get("eos_token_id") {
            Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Json::Array(items)) => items
                .iter()
                .filter_map(Json::as_u64)
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        };
        let qkv_bias = json
            .get("attention_bias")
            .and_then(Json::as_bool)
            .unwrap_or(arch.default_qkv_bias())
            || arch.default_qkv_bias();
        if json.get("mlp_bias").and_then(Json::as_bool) == Some(true) {
            return Err(invalid("`mlp_bias: true` is not supported".into()));
        }
        let experts = if arch.has_experts() {
            Some(hf_experts(&json, arch).map_err(invalid)?)
        } else {
            None
        };
        let config = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_layers: usize_key("num_hidden_layers")?,
            num_heads,
            num_kv_heads: opt_usize("num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            vocab_size: usize_key("vocab_size")?,
            rms_norm_eps: json
                .get("rms_norm_eps")
                .and_then(Json::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            qkv_bias,
            qk_norm: arch.qk_norm(),
            bos_token_id: json
                .get("bos_token_id")
                .and_then(Json::as_u64)
                .map(|v| v as u32),
            eos_token_ids,
            experts,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Writes the config as a Hugging Face `config.json` object (classic keys, which
    /// transformers 4 and 5 both read).
    pub fn to_hf_json(&self, torch_dtype: &str) -> Json {
        let mut json = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.name(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "torch_dtype": torch_dtype,
            "use_cache": true,
        });
        let obj = json
            .as_object_mut()
            .expect("json! of an object literal is an object");
        if let Some(bos) = self.bos_token_id {
            obj.insert("bos_token_id".into(), bos.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                obj.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        match self.arch {
            Arch::Llama | Arch::Qwen3 => {
                obj.insert("attention_bias".into(), self.qkv_bias.into());
                obj.insert("mlp_bias".into(), false.into());
            }
            Arch::Mistral => {
                obj.insert("sliding_window".into(), Json::Null);
            }
            Arch::Qwen2 => {
                obj.insert("use_sliding_window".into(), false.into());
            }
            Arch::Mixtral => {
                obj.insert("sliding_window".into(), Json::Null);
                if let Some(e) = self.experts {
                    obj.insert("num_local_experts".into(), e.count.into());
                    obj.insert("num_experts_per_tok".into(), e.used.into());
                    obj.insert("intermediate_size".into(), e.intermediate_size.into());
                }
            }
            Arch::Qwen3Moe => {
                obj.insert("attention_bias".into(), false.into());
                obj.insert("use_sliding_window".into(), false.into());
                obj.insert("decoder_sparse_step".into(), 1.into());
                obj.insert("mlp_only_layers".into(), Json::Array(Vec::new()));
                if let Some(e) = self.experts {
                    obj.insert("num_experts".into(), e.count.into());
                    obj.insert("num_experts_per_tok".into(), e.used.into());
                    obj.insert("moe_intermediate_size".into(), e.intermediate_size.into());
                    obj.insert("norm_topk_prob".into(), e.normalize.into());
                }
            }
        }
        let scaling = match &self.rope_scaling {
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::FreqFactors { .. }) | None => Json::Null,
        };
        obj.insert("rope_scaling".into(), scaling);
        json
    }

    /// Bytes of KV cache one token occupies in one layer, at `bytes_per_value`.
    pub fn kv_bytes_per_token_per_layer(&self, bytes_per_value: usize) -> usize {
        2 * self.num_kv_heads * self.head_dim * bytes_per_value
    }

    /// The rotary inverse frequencies (head_dim / 2 of them), scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::FreqFactors { factors }) => base
                .iter()
                .zip(factors)
                .map(|(f, d)| f / f64::from(*d))
                .collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => base
                .iter()
                .map(|&f| {
                    llama3_scale(
                        f,
                        *factor,
                        *low_freq_factor,
                        *high_freq_factor,
                        *original_max_position_embeddings,
                    )
                })
                .collect(),
        }
    }
}

/// Llama 3.1's rotary frequency scaling for one inverse frequency.
fn llama3_scale(inv_freq: f64, factor: f64, low: f64, high: f64, original: usize) -> f64 {
    let original = original as f64;
    let low_freq_wavelen = original / low;
    let high_freq_wavelen = original / high;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / factor
    } else {
        let smooth = (original / wavelen - low) / (high - low);
        (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    }
}

/// The llama.cpp `rope_freqs` divisors equivalent to a Llama 3 scaling (what its converter
/// stores), so a GGUF written by us carries the same rotary as the `config.json`.
pub fn llama3_freq_factors(config: &ModelConfig) -> Option<Vec<f32>> {
    match &config.rope_scaling {
        Some(RopeScaling::Llama3 { .. }) => {
            let unscaled = ModelConfig {
                rope_scaling: None,
                ..config.clone()
            }
            .rope_inv_freq();
            let scaled = config.rope_inv_freq();
            Some(
                unscaled
                    .iter()
                    .zip(&scaled)
                    .map(|(u, s)| (u / s) as f32)
                    .collect(),
            )
        }
        _ => None,
    }
}

fn parse_rope_scaling(params: &Json, path: &Path) -> Result<Option<RopeScaling>> {
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("default");
    let f = |key: &str| params.get(key).and_then(Json::as_f64);
    let invalid = |reason: String| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason,
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: f("factor")
                .ok_or_else(|| invalid("linear rope scaling without `factor`".into()))?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: f("factor")
                .ok_or_else(|| invalid("llama3 rope scaling without `factor`".into()))?,
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: params
                .get("original_max_position_embeddings")
                .and_then(Json::as_u64)
                .unwrap_or(8192) as usize,
        })),
        other => Err(invalid(format!(
            "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(text, Path::new("config.json"))
    }

    const LLAMA3: &str = r#"{
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "bos_token_id": 1, "eos_token_id": [2, 3],
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    }"#;

    #[test]
    fn classic_and_transformers5_rope_keys_agree() {
        let classic = parse(LLAMA3).unwrap();
        let v5 = parse(
            r#"{
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
            "bos_token_id": 1, "eos_token_id": [2, 3],
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        }"#,
        )
        .unwrap();
        assert_eq!(classic, v5);
        assert_eq!(classic.eos_token_ids, vec![2, 3]);
        assert_eq!(classic.head_dim, 16);
    }

    #[test]
    fn llama3_scaling_leaves_high_frequencies_and_divides_low_ones() {
        let config = parse(LLAMA3).unwrap();
        let unscaled = ModelConfig {
            rope_scaling: None,
            ..config.clone()
        }
        .rope_inv_freq();
        let scaled = config.rope_inv_freq();
        assert_eq!(scaled[0], unscaled[0]);
        let last = scaled.len() - 1;
        assert!((scaled[last] * 8.0 - unscaled[last]).abs() < 1e-12);
        let factors = llama3_freq_factors(&config).unwrap();
        assert_eq!(factors[0], 1.0);
        assert!((factors[last] - 8.0).abs() < 1e-5);
    }

    #[test]
    fn qwen2_always_has_qkv_bias_and_qwen3_has_qk_norm() {
        let qwen2 = parse(
            r#"{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300}"#,
        )
        .unwrap();
        assert!(qwen2.qkv_bias && !qwen2.qk_norm);
        let qwen3 = parse(
            r#"{"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "vocab_size": 300}"#,
        )
        .unwrap();
        assert!(!qwen3.qkv_bias && qwen3.qk_norm);
        assert_eq!(qwen3.head_dim, 32);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = parse(r#"{"model_type": "gpt2"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unsupported architecture `gpt2`"),
            "{err}"
        );
        let err = parse(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3,
            "vocab_size": 300}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("multiple of num_key_value_heads"),
            "{err}"
        );
        let err = parse(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`yarn` is not supported"), "{err}");
        let err = parse(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2147483647, "num_attention_heads": 4, "vocab_size": 300}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("num_hidden_layers is 2147483647, past the most"),
            "{err}"
        );
    }
}
