//! `strata-model`: everything about a model that is not networking.
//!
//! It owns the model formats (GGUF and safetensors, read by slice), the Llama-family
//! architectures, the batched stage forward with its per-sequence KV cache, the sampler,
//! the tokenizer and chat template, the single-process pipeline that runs the stages one
//! after another, and the generator of synthetic models for tests and benchmarks.
//!
//! It must not touch the network: the worker and coordinator crates move activations and
//! tokens between machines; this crate only computes them.
//!
//! # Layout
//! - [`config`]: hyper-parameters from `config.json` or GGUF metadata.
//! - [`format`]: the files, their tensor directories, reading one tensor by offset;
//!   `gguf_check`: every count, length and the alignment of a GGUF header checked against
//!   the file before anything is sized from it.
//! - [`model`]: [`Stage`] — a slice of layers, loaded and run over a batch of sequences;
//!   `moe`: which experts a token runs through, for mixture-of-experts layers.
//! - [`kv`]: the KV cache, per sequence, per layer.
//! - [`kernels`]: our packed matmuls for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
//!   (AVX-512 VNNI or AVX2, chosen at run time) and F16, and portable dense F32, where
//!   candle's CPU kernels fall short; `attention`: causal attention on the CPU. Both are
//!   batch-invariant, so a replayed history rebuilds its caches bit for bit.
//! - [`draft`]: drafts for speculative decoding (prompt lookup, or a small model).
//! - [`sampler`]: logits to tokens, and verifying drafts; [`scoring`]: perplexity and KL divergence of a text.
//! - [`tokenizer`], [`chat`]: text to ids and back; chat templates; `pretokenizers`:
//!   llama.cpp's named byte-level pre-tokenizers (generated).
//! - [`pipeline`]: K stages in one process, and the generation loop.
//! - [`synth`]: seeded synthetic models in the real formats.
//! - [`wire`]: the element type activations take between stages, and its bytes.
//!
//! # Dependencies
//! `candle-core` holds tensors and quantized (ggml) blocks and multiplies them packed;
//! `candle-nn` gives fused RMSNorm, softmax and rotary kernels. `tokenizers` runs
//! `tokenizer.json` exactly as transformers does; `minijinja` (+ `minijinja-contrib` for
//! Python string methods) renders chat templates; `rand_chacha` gives a seeded random
//! stream that is the same on every platform.

mod attention;
pub mod chat;
pub mod config;
pub mod draft;
pub mod error;
pub mod format;
mod gguf_check;
pub mod kernels;
pub mod kv;
pub mod model;
mod moe;
pub mod pipeline;
mod pretokenizers;
pub mod sampler;
pub mod scoring;
pub mod synth;
pub mod tokenizer;
pub mod wire;

pub use chat::{ChatTemplate, Message};
pub use config::{Arch, Experts, ModelConfig, RopeScaling};
pub use draft::{check_vocabularies, DraftLength, Drafter, Drafts, ModelDrafter, NgramDrafter};
pub use error::{Error, Result};
pub use format::{FileExtent, Format, ModelFile, Role, Weight};
pub use kv::{KvCache, SeqId};
pub use model::{set_compute_threads, Chunk, LogitRows, Slice, Stage, StageInput, StageOutput};

pub use pipeline::{DraftCounts, FinishReason, GenerateRequest, Generation, LocalPipeline};
pub use sampler::{Proposal, Sampled, Sampler, SamplingParams, PROPOSAL_TOKENS};
pub use tokenizer::{StreamDecoder, Tokenizer};
pub use wire::WireType;
