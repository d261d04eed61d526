//! Seeded synthetic models in the real formats, any shape, for tests and benchmarks.
//!
//! Every tensor's values come from its own random stream, seeded by the model seed and the
//! tensor's (transformers) name, so the same seed gives the same weights in safetensors and
//! in GGUF, in any dtype, and writing is streamed one tensor at a time (a 70B-shaped file
//! never sits in memory). Scales follow the network's fan-in so activations stay in a
//! realistic range over many layers and logits are confident enough that greedy decoding
//! is not a coin toss between near-ties.
//!
//! The tokenizer is a real byte-level BPE (Llama 3's pre-tokenizer split) whose first
//! merges are learned from a short English text and the rest enumerated, with ChatML
//! special tokens; it is written as `tokenizer.json` and embedded in GGUF metadata.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::json;

use crate::chat::CHATML_TEMPLATE;
use crate::config::{llama3_freq_factors, Arch, Experts, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::format::Role;
use crate::tokenizer::{byte_level_bpe_json, ByteLevelStyle};

/// Special tokens of synthetic vocabularies, in order at the end of the vocabulary.
pub const SPECIAL_TOKENS: [&str; 4] = ["<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Values per random stream: each chunk of a tensor has its own generator, so tensors are
/// generated in parallel and identically whatever the thread count.
const CHUNK: usize = 1 << 16;

/// GGUF data alignment.
const GGUF_ALIGNMENT: u64 = 32;

/// The shape of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// Architecture.
    pub arch: Arch,
    /// Transformer layers.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width (default hidden / heads).
    pub head_dim: Option<usize>,
    /// MLP width.
    pub intermediate: usize,
    /// Vocabulary size (at least 260: 256 bytes and 4 special tokens).
    pub vocab: usize,
    /// Context length.
    pub context: usize,
    /// Rotary base.
    pub rope_theta: f64,
    /// Llama 3.1 rotary scaling.
    pub rope_llama3: bool,
    /// Tie the LM head to the embedding.
    pub tie_embeddings: bool,
    /// Seed of every weight.
    pub seed: u64,
    /// The mixture of experts of every layer, for the architectures that have one
    /// (`intermediate` is then the dense width transformers' config also records, which
    /// Mixtral's experts share).
    pub experts: Option<Experts>,
}

/// A mixture of `count` experts, `used` per token, each of width `intermediate_size`,
/// renormalised.
fn moe(count: usize, used: usize, intermediate_size: usize) -> Option<Experts> {
    Some(Experts {
        count,
        used,
        intermediate_size,
        normalize: true,
    })
}

impl SynthSpec {
    /// A small model of the given architecture, for tests.
    pub fn tiny(arch: Arch) -> Self {
        SynthSpec {
            arch,
            layers: 4,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            intermediate: 128,
            vocab: 512,
            context: 2048,
            rope_theta: 10_000.0,
            rope_llama3: false,
            tie_embeddings: false,
            seed: 0,
            // Expert width a multiple of 32, so quantized files keep whole blocks.
            experts: if arch.has_experts() {
                moe(4, 2, 64)
            } else {
                None
            },
        }
    }

    /// Shapes of well-known models, for benchmarks and plans.
    pub fn preset(name: &str) -> Result<Self> {
        let base = |arch, layers, hidden, heads, kv_heads, intermediate, vocab| SynthSpec {
            arch,
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim: None,
            intermediate,
            vocab,
            context: 8192,
            rope_theta: 500_000.0,
            rope_llama3: false,
            tie_embeddings: false,
            seed: 0,
            experts: None,
        };
        let spec = match name {
            "llama-3-8b" => base(Arch::Llama, 32, 4096, 32, 8, 14336, 128_256),
            "llama-3.1-8b" => SynthSpec {
                rope_llama3: true,
                context: 131_072,
                ..base(Arch::Llama, 32, 4096, 32, 8, 14336, 128_256)
            },
            "llama-3.2-1b" => SynthSpec {
                rope_llama3: true,
                context: 131_072,
                tie_embeddings: true,
                ..base(Arch::Llama, 16, 2048, 32, 8, 8192, 128_256)
            },
            "llama-3.2-3b" => SynthSpec {
                rope_llama3: true,
                context: 131_072,
                tie_embeddings: true,
                ..base(Arch::Llama, 28, 3072, 24, 8, 8192, 128_256)
            },
            "llama-3.1-70b" => SynthSpec {
                rope_llama3: true,
                context: 131_072,
                ..base(Arch::Llama, 80, 8192, 64, 8, 28672, 128_256)
            },
            "llama-3.1-405b" => SynthSpec {
                rope_llama3: true,
                context: 131_072,
                ..base(Arch::Llama, 126, 16384, 128, 8, 53248, 128_256)
            },
            // DeepSeek-R1's distillation into Llama 3.3 70B: the same shape.
            "llama-3.3-70b" | "deepseek-r1-distill-llama-70b" => SynthSpec {
                rope_llama3: true,
                context: 131_072,
                ..base(Arch::Llama, 80, 8192, 64, 8, 28672, 128_256)
            },
            "qwen2.5-72b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 32_768,
                ..base(Arch::Qwen2, 80, 8192, 64, 8, 29568, 152_064)
            },
            "qwen3-32b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 40_960,
                head_dim: Some(128),
                ..base(Arch::Qwen3, 64, 5120, 64, 8, 25600, 151_936)
            },
            "mistral-7b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 32_768,
                ..base(Arch::Mistral, 32, 4096, 32, 8, 14336, 32_768)
            },
            "qwen2.5-0.5b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 32_768,
                tie_embeddings: true,
                ..base(Arch::Qwen2, 24, 896, 14, 2, 4864, 151_936)
            },
            "qwen2.5-7b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 32_768,
                ..base(Arch::Qwen2, 28, 3584, 28, 4, 18944, 152_064)
            },
            "qwen3-0.6b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 40_960,
                tie_embeddings: true,
                head_dim: Some(128),
                ..base(Arch::Qwen3, 28, 1024, 16, 8, 3072, 151_936)
            },
            "mixtral-8x7b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 32_768,
                experts: moe(8, 2, 14336),
                ..base(Arch::Mixtral, 32, 4096, 32, 8, 14336, 32_000)
            },
            "qwen3-30b-a3b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 40_960,
                head_dim: Some(128),
                experts: moe(128, 8, 768),
                ..base(Arch::Qwen3Moe, 48, 2048, 32, 4, 6144, 151_936)
            },
            "qwen3-235b-a22b" => SynthSpec {
                rope_theta: 1_000_000.0,
                context: 40_960,
                head_dim: Some(128),
                experts: moe(128, 8, 1536),
                ..base(Arch::Qwen3Moe, 94, 4096, 64, 4, 12288, 151_936)
            },
            "tiny" => SynthSpec::tiny(Arch::Llama),
            other => {
                return Err(Error::InvalidConfig {
                    path: PathBuf::from("--preset"),
                    reason: format!("unknown preset `{other}` (known: {})", PRESETS.join(", ")),
                })
            }
        };
        Ok(spec)
    }

    /// The model config this spec describes.
    pub fn config(&self) -> ModelConfig {
        let head_dim = self.head_dim.unwrap_or(self.hidden / self.heads.max(1));
        let specials = special_ids(self.vocab);
        ModelConfig {
            arch: self.arch,
            hidden_size: self.hidden,
            // Mixtral's experts are its feed-forward: transformers and llama.cpp give them
            // the one width.
            intermediate_size: match self.experts {
                Some(e) if self.arch == Arch::Mixtral => e.intermediate_size,
                _ => self.intermediate,
            },
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim,
            vocab_size: self.vocab,
            rms_norm_eps: 1e-5,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_llama3.then_some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.min(self.context),
            }),
            max_position_embeddings: self.context,
            tie_word_embeddings: self.tie_embeddings,
            qkv_bias: self.arch.default_qkv_bias(),
            qk_norm: self.arch.qk_norm(),
            bos_token_id: Some(specials.bos),
            eos_token_ids: vec![specials.im_end, specials.eos],
            experts: self.experts.filter(|_| self.arch.has_experts()),
        }
    }
}

/// Names accepted by [`SynthSpec::preset`].
pub const PRESETS: [&str; 18] = [
    "llama-3-8b",
    "llama-3.1-8b",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.1-70b",
    "llama-3.3-70b",
    "llama-3.1-405b",
    "deepseek-r1-distill-llama-70b",
    "mistral-7b",
    "qwen2.5-0.5b",
    "qwen2.5-7b",
    "qwen2.5-72b",
    "qwen3-0.6b",
    "qwen3-32b",
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b",
    "tiny",
];

/// The file layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    /// A directory with `config.json`, `model.safetensors` (or shards), tokenizer files.
    Safetensors,
    /// One `.gguf` file with the tokenizer inside.
    Gguf,
}

/// Element type of the weights written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDType {
    /// 32-bit float.
    F32,
    /// Half.
    F16,
    /// bfloat16 (safetensors only).
    BF16,
    /// A ggml quantization (GGUF only): 2-D weights use it, norms and biases stay F32.
    Quant(GgmlDType),
}

impl SynthDType {
    /// Parses `f32`, `f16`, `bf16`, `q4_0`, `q4_k`, ...
    pub fn parse(name: &str) -> Result<Self> {
        let q = match name.to_ascii_lowercase().as_str() {
            "f32" => return Ok(SynthDType::F32),
            "f16" => return Ok(SynthDType::F16),
            "bf16" => return Ok(SynthDType::BF16),
            "q4_0" => GgmlDType::Q4_0,
            "q4_1" => GgmlDType::Q4_1,
            "q5_0" => GgmlDType::Q5_0,
            "q5_1" => GgmlDType::Q5_1,
            "q8_0" => GgmlDType::Q8_0,
            "q2_k" => GgmlDType::Q2K,
            "q3_k" => GgmlDType::Q3K,
            "q4_k" | "q4_k_m" | "q4_k_s" => GgmlDType::Q4K,
            "q5_k" | "q5_k_m" | "q5_k_s" => GgmlDType::Q5K,
            "q6_k" => GgmlDType::Q6K,
            other => {
                return Err(Error::InvalidConfig {
                    path: PathBuf::from("--dtype/--quant"),
                    reason: format!("unknown type `{other}` (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)"),
                })
            }
        };
        Ok(SynthDType::Quant(q))
    }
}

/// How to write a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// File layout.
    pub format: SynthFormat,
    /// Weight type.
    pub dtype: SynthDType,
    /// Split safetensors into shards of at most this many bytes (with an index file).
    pub shard_bytes: Option<u64>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// The model path to pass to `--model`.
    pub path: PathBuf,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
    /// Tensors written.
    pub tensors: usize,
}

/// Ids of the special tokens in a synthetic vocabulary of `vocab` tokens.
#[derive(Debug, Clone, Copy)]
pub struct SpecialIds {
    /// `<s>`.
    pub bos: u32,
    /// `<|endoftext|>`.
    pub eos: u32,
    /// `<|im_start|>`.
    pub im_start: u32,
    /// `<|im_end|>`.
    pub im_end: u32,
}

/// Where the special tokens sit: the last four ids.
pub fn special_ids(vocab: usize) -> SpecialIds {
    let first = vocab.saturating_sub(SPECIAL_TOKENS.len()) as u32;
    SpecialIds {
        bos: first,
        eos: first + 1,
        im_start: first + 2,
        im_end: first + 3,
    }
}

/// One tensor to write: its role, names, shape and how to fill it.
struct TensorPlan {
    hf_name: String,
    gguf_name: String,
    shape: Vec<usize>,
    fill: Fill,
    /// Row permutation llama.cpp applies to q/k (number of heads), GGUF only.
    permute_heads: Option<usize>,
    /// In GGUF, the tensors (by transformers name) stacked into this one, outermost: each
    /// expert's, for the layer's tensor of all experts. Empty: the tensor is its own.
    stacked: Vec<String>,
}

#[derive(Clone, Copy)]
enum Fill {
    /// Uniform noise with this standard deviation.
    Noise(f32),
    /// `1 + noise`: norm weights.
    AroundOne(f32),
    /// Given values (rope factors).
    Values,
}

fn plan(spec: &SynthSpec, config: &ModelConfig) -> Vec<TensorPlan> {
    let h = config.hidden_size as f32;
    let inter = config.intermediate_size as f32;
    let q_width = (config.num_heads * config.head_dim) as f32;
    let mut plans = Vec::new();
    let mut add = |role: Role, fill: Fill, permute_heads: Option<usize>| {
        plans.push(TensorPlan {
            hf_name: role.hf_name(config.arch),
            gguf_name: role.gguf_name(),
            shape: role.expected_shape(config),
            fill,
            permute_heads,
            stacked: Vec::new(),
        });
    };
    // Logit standard deviation of about 4: confident, not degenerate.
    let head_std = 4.0 / h.sqrt();
    // A tied embedding doubles as the head, so it takes the head's scale.
    let embed_std = if config.tie_word_embeddings {
        head_std
    } else {
        1.0
    };
    add(Role::Embed, Fill::Noise(embed_std), None);
    let permute = spec.arch.gguf_permutes_qk();
    for l in 0..config.num_layers {
        add(Role::AttnNorm(l), Fill::AroundOne(0.1), None);
        // Queries a little sharper than unit scale so attention depends on position.
        add(
            Role::Q(l),
            Fill::Noise(2.0 / h.sqrt()),
            permute.then_some(config.num_heads),
        );
        add(
            Role::K(l),
            Fill::Noise(1.0 / h.sqrt()),
            permute.then_some(config.num_kv_heads),
        );
        add(Role::V(l), Fill::Noise(1.0 / h.sqrt()), None);
        add(Role::O(l), Fill::Noise(2.0 / q_width.sqrt()), None);
        if config.qkv_bias {
            add(
                Role::QBias(l),
                Fill::Noise(0.1),
                permute.then_some(config.num_heads),
            );
            add(
                Role::KBias(l),
                Fill::Noise(0.1),
                permute.then_some(config.num_kv_heads),
            );
            add(Role::VBias(l), Fill::Noise(0.1), None);
        }
        if config.qk_norm {
            add(Role::QNorm(l), Fill::AroundOne(0.1), None);
            add(Role::KNorm(l), Fill::AroundOne(0.1), None);
        }
        add(Role::FfnNorm(l), Fill::AroundOne(0.1), None);
        let Some(experts) = config.experts else {
            add(Role::Gate(l), Fill::Noise(1.0 / h.sqrt()), None);
            add(Role::Up(l), Fill::Noise(1.0 / h.sqrt()), None);
            add(Role::Down(l), Fill::Noise(2.0 / inter.sqrt()), None);
            continue;
        };
        // Router scores that differ by about one between experts: routing depends on the
        // token, with few near-ties.
        add(Role::Router(l), Fill::Noise(2.0 / h.sqrt()), None);
        // Each projection's experts one after another, as GGUF stacks them.
        let width = experts.intermediate_size as f32;
        for e in 0..experts.count {
            add(Role::ExpertGate(l, e), Fill::Noise(1.0 / h.sqrt()), None);
        }
        for e in 0..experts.count {
            add(Role::ExpertUp(l, e), Fill::Noise(1.0 / h.sqrt()), None);
        }
        for e in 0..experts.count {
            add(
                Role::ExpertDown(l, e),
                Fill::Noise(2.0 / width.sqrt()),
                None,
            );
        }
    }
    add(Role::FinalNorm, Fill::AroundOne(0.1), None);
    if !config.tie_word_embeddings {
        add(Role::LmHead, Fill::Noise(head_std), None);
    }
    plans
}

/// A stable 64-bit hash (FNV-1a) of a tensor name, so streams do not depend on std's
/// randomised hasher.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn generate(seed: u64, name: &str, elements: usize, fill: Fill) -> Vec<f32> {
    let (center, std) = match fill {
        Fill::Noise(s) => (0.0, s),
        Fill::AroundOne(s) => (1.0, s),
        Fill::Values => (0.0, 0.0),
    };
    // Uniform noise with the requested standard deviation: cheap, bounded, and for weights
    // of a synthetic model its shape does not matter.
    let half_width = std * 3f32.sqrt();
    let stream = seed ^ name_hash(name);
    let mut values = vec![0f32; elements];
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                stream.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            );
            for v in chunk {
                *v = center + half_width * (2.0 * rng.random::<f32>() - 1.0);
            }
        });
    values
}

/// llama.cpp's q/k row permutation: within each head, rows `[first half; second half]`
/// become interleaved pairs, so its interleaved rotary equals transformers' rotate-half.
fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let per_head = rows / heads;
    let half = per_head / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * per_head + i * 2 + j;
                let src = h * per_head + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Builds the synthetic vocabulary: byte symbols, learned and enumerated merges, specials.
pub fn synth_vocab(vocab: usize) -> Result<(Vec<String>, Vec<String>)> {
    let base = 256 + SPECIAL_TOKENS.len();
    if vocab < base {
        return Err(Error::InvalidConfig {
            path: PathBuf::from("--vocab"),
            reason: format!(
                "a synthetic vocabulary needs at least {base} tokens (256 bytes + {} specials)",
                SPECIAL_TOKENS.len()
            ),
        });
    }
    let byte_char = bytes_to_unicode();
    let mut tokens: Vec<String> = (0..=255u8)
        .map(|b| byte_char[b as usize].to_string())
        .collect();
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();
    let target = vocab - SPECIAL_TOKENS.len();
    // Learn merges from a short text: words as sequences of byte symbols, the most frequent
    // adjacent pair merged first.
    let mut words: Vec<Vec<String>> = TRAINING_TEXT
        .split_inclusive(' ')
        .map(|w| {
            let w = format!(" {}", w.trim_end());
            w.bytes()
                .map(|b| byte_char[b as usize].to_string())
                .collect()
        })
        .collect();
    while tokens.len() < target {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for w in &words {
            for pair in w.windows(2) {
                *counts
                    .entry((pair[0].clone(), pair[1].clone()))
                    .or_default() += 1;
            }
        }
        let best = counts
            .into_iter()
            .filter(|(_, c)| *c >= 2)
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
        let Some(((a, b), _)) = best else { break };
        let merged = format!("{a}{b}");
        for w in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = merged.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        if known.insert(merged.clone()) {
            tokens.push(merged);
            merges.push(format!("{a} {b}"));
        }
    }
    // Fill the rest by joining tokens pairwise: learned pieces and printable ASCII only, so
    // the enumerated tokens read as text fragments rather than control bytes.
    let mut pool: Vec<String> = tokens
        .iter()
        .enumerate()
        .filter(|(i, t)| {
            *i >= 256 || (*i as u8).is_ascii_alphanumeric() || *i as u8 == b' ' || t.as_str() == "Ġ"
        })
        .map(|(_, t)| t.clone())
        .collect();
    let mut i = 0;
    while tokens.len() < target {
        let limit = pool.len();
        for j in 0..=i.min(limit - 1) {
            if tokens.len() >= target {
                break;
            }
            let (a, b) = (pool[i % limit].clone(), pool[j].clone());
            let merged = format!("{a}{b}");
            if known.insert(merged.clone()) {
                tokens.push(merged.clone());
                merges.push(format!("{a} {b}"));
                pool.push(merged);
            }
        }
        i += 1;
    }
    tokens.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
    Ok((tokens, merges))
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> Vec<char> {
    let mut map = vec!['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            let c = char::from_u32(next).unwrap_or('?');
            next += 1;
            c
        };
    }
    map
}

/// The `tokenizer.json` document of a synthetic vocabulary.
pub fn synth_tokenizer_json(vocab: usize) -> Result<serde_json::Value> {
    let (tokens, merges) = synth_vocab(vocab)?;
    let ids = special_ids(vocab);
    let specials: Vec<(u32, String, bool)> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, s)| (ids.bos + i as u32, s.to_string(), true))
        .collect();
    Ok(byte_level_bpe_json(
        &tokens,
        &merges,
        &specials,
        ByteLevelStyle::named("llama3")
            .ok_or_else(|| Error::Tokenizer("no llama3 pre-tokenizer".into()))?,
        Some("<s>"),
    ))
}

/// Writes a synthetic model and returns where it is.
pub fn write_model(spec: &SynthSpec, opts: &SynthOptions, out: &Path) -> Result<SynthReport> {
    let config = spec.config();
    config.validate(Path::new("synthetic spec"))?;
    let quantized = matches!(opts.dtype, SynthDType::Quant(_));
    match opts.format {
        SynthFormat::Safetensors if quantized => Err(Error::InvalidConfig {
            path: out.to_path_buf(),
            reason: "safetensors holds f32, f16 or bf16; write quantized models with --format gguf"
                .into(),
        }),
        SynthFormat::Gguf if opts.dtype == SynthDType::BF16 => Err(Error::InvalidConfig {
            path: out.to_path_buf(),
            reason: "write GGUF as f32, f16 or a quantized type".into(),
        }),
        SynthFormat::Safetensors => write_safetensors(spec, &config, opts, out),
        SynthFormat::Gguf => write_gguf(spec, &config, opts, out),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn float_bytes(values: &[f32], dtype: SynthDType) -> Vec<u8> {
    match dtype {
        SynthDType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        SynthDType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn write_safetensors(
    spec: &SynthSpec,
    config: &ModelConfig,
    opts: &SynthOptions,
    dir: &Path,
) -> Result<SynthReport> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (dtype_name, width) = match opts.dtype {
        SynthDType::F16 => ("F16", 2u64),
        SynthDType::BF16 => ("BF16", 2),
        _ => ("F32", 4),
    };
    let plans = plan(spec, config);
    // Group tensors into shards by size.
    let limit = opts.shard_bytes.unwrap_or(u64::MAX);
    let mut shards: Vec<Vec<&TensorPlan>> = vec![Vec::new()];
    let mut shard_size = 0u64;
    for p in &plans {
        let bytes = p.shape.iter().product::<usize>() as u64 * width;
        if shard_size > 0 && shard_size + bytes > limit {
            shards.push(Vec::new());
            shard_size = 0;
        }
        shard_size += bytes;
        if let Some(shard) = shards.last_mut() {
            shard.push(p);
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = dir.join(&name);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for p in shard {
            let bytes = p.shape.iter().product::<usize>() as u64 * width;
            header.insert(
                p.hf_name.clone(),
                json!({"dtype": dtype_name, "shape": p.shape, "data_offsets": [offset, offset + bytes]}),
            );
            weight_map.insert(p.hf_name.clone(), json!(name));
            offset += bytes;
        }
        let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| {
            Error::InvalidConfig {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        // The data start is 8-byte aligned, as the reference writer does.
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let mut w = BufWriter::new(File::create(&path).map_err(io(&path))?);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io(&path))?;
        w.write_all(&header).map_err(io(&path))?;
        for p in shard {
            let values = generate(spec.seed, &p.hf_name, p.shape.iter().product(), p.fill);
            w.write_all(&float_bytes(&values, opts.dtype))
                .map_err(io(&path))?;
        }
        w.flush().map_err(io(&path))?;
        total += offset;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    let torch_dtype = match opts.dtype {
        SynthDType::F16 => "float16",
        SynthDType::BF16 => "bfloat16",
        _ => "float32",
    };
    write_json(&dir.join("config.json"), &config.to_hf_json(torch_dtype))?;
    write_json(
        &dir.join("tokenizer.json"),
        &synth_tokenizer_json(spec.vocab)?,
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "bos_token": "<s>",
            "eos_token": "<|im_end|>",
            "add_bos_token": true,
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": spec.context,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids}),
    )?;
    Ok(SynthReport {
        path: dir.to_path_buf(),
        tensor_bytes: total,
        tensors: plans.len(),
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(io(path))
}

/// A GGUF metadata value, as much of the format as we write.
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_meta(w: &mut impl Write, key: &str, value: &Meta) -> std::io::Result<()> {
    put_str(w, key)?;
    // GGUF value type ids: u32 = 4, i32 = 5, f32 = 6, bool = 7, string = 8, array = 9.
    match value {
        Meta::U32(v) => {
            w.write_all(&4u32.to_le_bytes())?;
            w.write_all(&v.to_le_bytes())
        }
        Meta::F32(v) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&v.to_le_bytes())
        }
        Meta::Bool(v) => {
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&[u8::from(*v)])
        }
        Meta::Str(s) => {
            w.write_all(&8u32.to_le_bytes())?;
            put_str(w, s)
        }
        Meta::StrArray(items) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&8u32.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|s| put_str(w, s))
        }
        Meta::I32Array(items) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|v| w.write_all(&v.to_le_bytes()))
        }
    }
}

/// The storage type of one tensor in a GGUF of `dtype`: vectors stay F32 (as llama.cpp's
/// converter does); matrices whose rows are not whole blocks fall back to Q8_0, then F16.
fn gguf_tensor_type(shape: &[usize], dtype: SynthDType) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = shape[shape.len() - 1];
    match dtype {
        SynthDType::F32 => GgmlDType::F32,
        SynthDType::F16 | SynthDType::BF16 => GgmlDType::F16,
        SynthDType::Quant(q) if cols.is_multiple_of(q.block_size()) => q,
        SynthDType::Quant(_) if cols.is_multiple_of(GgmlDType::Q8_0.block_size()) => {
            GgmlDType::Q8_0
        }
        SynthDType::Quant(_) => GgmlDType::F16,
    }
}

/// Consecutive tensors that GGUF names alike (each expert's of one projection) become one,
/// stacked outermost.
fn stack_experts(plans: Vec<TensorPlan>) -> Vec<TensorPlan> {
    let mut out: Vec<TensorPlan> = Vec::with_capacity(plans.len());
    for mut p in plans {
        match out.last_mut() {
            Some(last) if last.gguf_name == p.gguf_name => {
                last.stacked.push(p.hf_name);
                last.shape[0] += 1;
            }
            _ => {
                // (Even a single expert's is a stack of one.)
                if p.gguf_name.ends_with("_exps.weight") {
                    p.stacked.push(p.hf_name.clone());
                    p.shape.insert(0, 1);
                }
                out.push(p);
            }
        }
    }
    out
}

/// The metadata of a synthetic GGUF: llama.cpp's keys for the config, and the tokenizer.
fn gguf_metadata(spec: &SynthSpec, config: &ModelConfig) -> Result<Vec<(String, Meta)>> {
    let arch = spec.arch.gguf_name();
    let (tokens, merges) = synth_vocab(spec.vocab)?;
    let ids = special_ids(spec.vocab);
    let token_types: Vec<i32> = (0..tokens.len())
        .map(|i| if i as u32 >= ids.bos { 3 } else { 1 })
        .collect();
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        (
            "general.name".into(),
            Meta::Str(format!("strata synthetic {}", spec.arch.name())),
        ),
        ("general.alignment".into(), Meta::U32(GGUF_ALIGNMENT as u32)),
        (k("block_count"), Meta::U32(config.num_layers as u32)),
        (
            k("context_length"),
            Meta::U32(config.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Meta::U32(config.hidden_size as u32)),
        (
            k("feed_forward_length"),
            Meta::U32(config.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            Meta::U32(config.num_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            Meta::U32(config.num_kv_heads as u32),
        ),
        (k("attention.key_length"), Meta::U32(config.head_dim as u32)),
        (
            k("attention.value_length"),
            Meta::U32(config.head_dim as u32),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            Meta::F32(config.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Meta::F32(config.rope_theta as f32)),
        (k("rope.dimension_count"), Meta::U32(config.head_dim as u32)),
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("llama-bpe".into())),
        ("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Meta::I32Array(token_types),
        ),
        ("tokenizer.ggml.merges".into(), Meta::StrArray(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(ids.bos)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(ids.im_end)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            Meta::Str(CHATML_TEMPLATE.into()),
        ),
    ];
    if spec.arch == Arch::Mistral {
        meta.push((k("vocab_size"), Meta::U32(spec.vocab as u32)));
    }
    if let Some(e) = config.experts {
        meta.push((k("expert_count"), Meta::U32(e.count as u32)));
        meta.push((k("expert_used_count"), Meta::U32(e.used as u32)));
        if spec.arch != Arch::Mixtral {
            meta.push((
                k("expert_feed_forward_length"),
                Meta::U32(e.intermediate_size as u32),
            ));
        }
    }
    Ok(meta)
}

fn write_gguf(
    spec: &SynthSpec,
    config: &ModelConfig,
    opts: &SynthOptions,
    path: &Path,
) -> Result<SynthReport> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let meta = gguf_metadata(spec, config)?;
    let mut plans = stack_experts(plan(spec, config));
    let rope_factors = llama3_freq_factors(config);
    if rope_factors.is_some() {
        plans.push(TensorPlan {
            hf_name: "rope_freqs".into(),
            gguf_name: "rope_freqs.weight".into(),
            shape: vec![config.head_dim / 2],
            fill: Fill::Values,
            permute_heads: None,
            stacked: Vec::new(),
        });
    }
    let types: Vec<GgmlDType> = plans
        .iter()
        .map(|p| gguf_tensor_type(&p.shape, opts.dtype))
        .collect();
    let sizes: Vec<u64> = plans
        .iter()
        .zip(&types)
        .map(|(p, t)| (p.shape.iter().product::<usize>() / t.block_size() * t.type_size()) as u64)
        .collect();

    let mut w = BufWriter::new(File::create(path).map_err(io(path))?);
    let header = |w: &mut BufWriter<File>| -> std::io::Result<()> {
        w.write_all(b"GGUF")?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(plans.len() as u64).to_le_bytes())?;
        w.write_all(&(meta.len() as u64).to_le_bytes())?;
        for (key, value) in &meta {
            put_meta(w, key, value)?;
        }
        let mut offset = 0u64;
        for ((p, t), size) in plans.iter().zip(&types).zip(&sizes) {
            put_str(w, &p.gguf_name)?;
            w.write_all(&(p.shape.len() as u32).to_le_bytes())?;
            // ggml lists dimensions innermost first.
            for d in p.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&ggml_type_id(*t).to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset += size.div_ceil(GGUF_ALIGNMENT) * GGUF_ALIGNMENT;
        }
        let pos = w.stream_position()?;
        let pad = pos.div_ceil(GGUF_ALIGNMENT) * GGUF_ALIGNMENT - pos;
        w.write_all(&vec![0u8; pad as usize])
    };
    header(&mut w).map_err(io(path))?;
    let mut total = 0u64;
    for ((p, t), size) in plans.iter().zip(&types).zip(&sizes) {
        let elements: usize = p.shape.iter().product();
        let mut values = match p.fill {
            Fill::Values => rope_factors.clone().unwrap_or_default(),
            fill if p.stacked.is_empty() => generate(spec.seed, &p.hf_name, elements, fill),
            fill => p
                .stacked
                .iter()
                .flat_map(|name| generate(spec.seed, name, elements / p.stacked.len(), fill))
                .collect(),
        };
        if let Some(heads) = p.permute_heads {
            let cols = if p.shape.len() == 2 { p.shape[1] } else { 1 };
            values = permute_rows(&values, p.shape[0], cols, heads);
        }
        let bytes = match t {
            GgmlDType::F32 => float_bytes(&values, SynthDType::F32),
            GgmlDType::F16 => float_bytes(&values, SynthDType::F16),
            q => {
                let tensor = Tensor::from_vec(values, p.shape.as_slice(), &Device::Cpu)?;
                QTensor::quantize(&tensor, *q)?.data()?.into_owned()
            }
        };
        debug_assert_eq!(bytes.len() as u64, *size, "{}", p.gguf_name);
        w.write_all(&bytes).map_err(io(path))?;
        let pad = size.div_ceil(GGUF_ALIGNMENT) * GGUF_ALIGNMENT - size;
        w.write_all(&vec![0u8; pad as usize]).map_err(io(path))?;
        total += size;
    }
    w.flush().map_err(io(path))?;
    Ok(SynthReport {
        path: path.to_path_buf(),
        tensor_bytes: total,
        tensors: plans.len(),
    })
}

/// A few paragraphs of plain English from which the first merges are learned.
const TRAINING_TEXT: &str = "the cluster of machines in the house runs the model together. \
each machine holds a part of the layers and passes the state to the next one. \
when a machine leaves the network the others take over its layers and the answer goes on. \
the people who run it keep their data at home and do not send it to anyone else. \
there is a small garden behind the house where the light falls on the grass in the morning. \
the river runs past the old mill and the children walk along the bank to the village school. \
in the evening the lamps are lit and the family sits at the table to eat and talk about the day. \
she said that the weather would change before the end of the week and that they should be ready. \
he wrote a letter to his brother in the city and told him about the harvest and the new horse. \
one two three four five six seven eight nine ten. the quick brown fox jumps over the lazy dog. \
what is the name of the model and how many layers does it have on each of the machines";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GenerateRequest, LocalPipeline, ModelFile, Tokenizer};

    #[test]
    fn vocabulary_has_the_requested_size_and_valid_merges() {
        for vocab in [260, 512, 5000] {
            let (tokens, merges) = synth_vocab(vocab).unwrap();
            assert_eq!(tokens.len(), vocab);
            let set: HashSet<&String> = tokens.iter().collect();
            assert_eq!(set.len(), vocab, "tokens are unique");
            for m in &merges {
                let (a, b) = m.split_once(' ').unwrap();
                assert!(
                    set.contains(&a.to_string()) && set.contains(&b.to_string()),
                    "{m}"
                );
                assert!(set.contains(&format!("{a}{b}")), "{m}");
            }
        }
        assert!(synth_vocab(259).is_err());
    }

    #[test]
    fn deep_models_stay_finite_and_greedy_output_varies() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            layers: 32,
            seed: 3,
            tie_embeddings: true,
            ..SynthSpec::tiny(Arch::Llama)
        };
        let options = SynthOptions {
            format: SynthFormat::Safetensors,
            dtype: SynthDType::F32,
            shard_bytes: None,
        };
        write_model(&spec, &options, dir.path()).unwrap();
        let file = ModelFile::open(dir.path()).unwrap();
        let tokenizer = Tokenizer::for_model(&file).unwrap();
        let prompt = tokenizer
            .encode("the river runs past the old mill", true)
            .unwrap();
        let mut pipeline = LocalPipeline::load(&file, 1, &Device::Cpu).unwrap();
        let request = GenerateRequest {
            stop_at_eos: false,
            ..GenerateRequest::greedy(prompt, 24)
        };
        let g = pipeline.generate(&request, |_| {}).unwrap();
        assert!(g.prompt_logits.iter().all(|l| l.is_finite()));
        let spread = {
            let mean = g.prompt_logits.iter().sum::<f32>() / g.prompt_logits.len() as f32;
            (g.prompt_logits
                .iter()
                .map(|l| (l - mean).powi(2))
                .sum::<f32>()
                / g.prompt_logits.len() as f32)
                .sqrt()
        };
        assert!((1.0..10.0).contains(&spread), "logit std {spread}");
        let distinct: HashSet<u32> = g.tokens.iter().copied().collect();
        assert!(
            distinct.len() >= 6,
            "greedy output barely varies: {:?}",
            g.tokens
        );
    }

    #[test]
    fn presets_describe_valid_models() {
        for name in PRESETS {
            let spec = SynthSpec::preset(name).unwrap();
            spec.config().validate(Path::new(name)).unwrap();
        }
        assert!(SynthSpec::preset("gpt-5")
            .unwrap_err()
            .to_string()
            .contains("unknown preset"));
    }
}
