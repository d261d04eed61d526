//! The Llama-family transformer, loaded by slice and run over a batch of sequences.
//!
//! A [`Stage`] holds the layers `[a, b)` of a model, plus the token embedding when it is the
//! first stage and the final norm and LM head when it is the last. One [`Stage::forward`]
//! takes several sequences at once, each a chunk of new positions (a prefill chunk or one
//! decode token): the projections and the MLP run as one matmul over all their rows;
//! only attention, whose context differs per sequence, runs per sequence. On the CPU every
//! kernel is batch-invariant: a row's result does not depend on what shares its batch.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};

use crate::attention::{self, Heads, KvBuffer};
use crate::config::{Experts, ModelConfig};
use crate::error::{Error, Result};
use crate::format::{ModelFile, Role, Weight};
use crate::kernels::{DenseMatrix, F16Matrix, QuantTiles, QuantizedRows, TileFormat};
use crate::kv::{KvCache, SeqId};

/// Which part of the model a stage holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Slice {
    /// Transformer layers `[start, end)`.
    pub layers: Range<usize>,
    /// Holds the token embedding (the first stage).
    pub embed: bool,
    /// Holds the final norm and LM head, and samples (the last stage).
    pub head: bool,
}

impl Slice {
    /// The slice of layers `layers` of a model of `total` layers: first and last flags follow
    /// from the range.
    pub fn new(layers: Range<usize>, total: usize) -> Result<Self> {
        if layers.start > layers.end || layers.end > total {
            return Err(Error::SliceOutOfRange {
                slice: layers,
                layers: total,
            });
        }
        Ok(Slice {
            embed: layers.start == 0,
            head: layers.end == total,
            layers,
        })
    }

    /// The whole model in one stage.
    pub fn full(total: usize) -> Self {
        Slice {
            layers: 0..total,
            embed: true,
            head: true,
        }
    }

    /// `k` contiguous slices with layer counts as equal as possible (earlier stages take
    /// the remainder).
    pub fn split_even(total: usize, k: usize) -> Result<Vec<Slice>> {
        if k == 0 || k > total.max(1) {
            return Err(Error::SliceOutOfRange {
                slice: 0..k,
                layers: total,
            });
        }
        let mut slices = Vec::with_capacity(k);
        let mut start = 0;
        for i in 0..k {
            let n = total / k + usize::from(i < total % k);
            slices.push(Slice::new(start..start + n, total)?);
            start += n;
        }
        Ok(slices)
    }
}

/// A run of new positions of one sequence within a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the first new token (equals the positions already cached).
    pub start: usize,
    /// Number of new positions.
    pub len: usize,
}

/// What flows into a stage.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// Token ids, one per row (first stage).
    Tokens(Vec<u32>),
    /// Residual-stream activations `[rows, hidden]` from the previous stage.
    Hidden(Tensor),
}

/// Which rows the last stage computes logits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitRows {
    /// The last position of each chunk: what sampling needs.
    LastOfEachChunk,
    /// Every position, in row order: what scoring a text needs.
    Every,
    /// The last `n` positions of each chunk, `n` given per chunk (each at least 1 and at
    /// most the chunk's length), in row order: what verifying drafts needs.
    LastOf(Vec<usize>),
}

/// What comes out of a stage.
#[derive(Debug, Clone)]
pub enum StageOutput {
    /// Activations `[rows, hidden]` for the next stage.
    Hidden(Tensor),
    /// Logits `[rows, vocab]` of the rows [`LogitRows`] asked for (last stage).
    Logits(Tensor),
}

/// A weight matrix as a matmul operand: candle's (dense, or packed in any ggml type), or
/// our own kernels (tiled Q4_0, F16 weights) where the CPU runs them.
#[derive(Debug, Clone)]
enum Matrix {
    Candle(QMatMul),
    Quant(Arc<QuantTiles>),
    F16(Arc<F16Matrix>),
    Dense(Arc<DenseMatrix>),
}

impl Matrix {
    /// `x [rows, k]` times the transposed matrix: `[rows, n]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (self, self.shape()) {
            (Matrix::Candle(m), _) => Ok(m.forward(x)?),
            (_, Some((n, k))) => own_kernel(x, n, k, |xs, m, out| {
                self.matmul_into(xs, m, out);
            }),
            (_, None) => unreachable!("only candle's matrices have no shape of ours"),
        }
    }

    /// As [`Matrix::forward`], with each activation row quantized in two terms on our
    /// quantized kernels ([`QuantizedRows::two_term`]): for the LM head, whose input's
    /// rounding goes straight into the logits. Float kernels take the input as it is.
    fn forward_two_term(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Matrix::Quant(t) => own_kernel(x, t.rows(), t.cols(), |xs, m, out| {
                t.matmul_two_term(xs, m, out)
            }),
            _ => self.forward(x),
        }
    }

    /// `(n, k)` where one of our kernels runs the matrix (`None` on candle's).
    fn shape(&self) -> Option<(usize, usize)> {
        match self {
            Matrix::Candle(_) => None,
            Matrix::Quant(t) => Some((t.rows(), t.cols())),
            Matrix::F16(t) => Some((t.rows(), t.cols())),
            Matrix::Dense(t) => Some((t.rows(), t.cols())),
        }
    }

    /// `out [m, n] = x [m, k]` times the transposed matrix, on our kernels; false (and
    /// nothing written) where the matrix runs on candle's.
    fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> bool {
        match self {
            Matrix::Candle(_) => return false,
            Matrix::Quant(t) => t.matmul(x, m, out),
            Matrix::F16(t) => t.matmul(x, m, out),
            Matrix::Dense(t) => t.matmul(x, m, out),
        }
        true
    }

    /// Rows `ids` of the matrix, dequantized: an embedding lookup.
    fn embedding(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Matrix::Candle(m) => Ok(m
                .embedding(&Tensor::new(ids, device)?)?
                .to_dtype(DType::F32)?),
            Matrix::Quant(t) => {
                gather_rows(ids, t.cols(), device, |id, row| t.dequantize_row(id, row))
            }
            Matrix::F16(t) => gather_rows(ids, t.cols(), device, |id, row| t.row(id, row)),
            Matrix::Dense(t) => gather_rows(ids, t.cols(), device, |id, row| t.row(id, row)),
        }
    }
}

/// Runs one of our kernels on `x [m, k]`, giving `[m, n]`.
fn own_kernel(
    x: &Tensor,
    n: usize,
    k: usize,
    kernel: impl Fn(&[f32], usize, &mut [f32]),
) -> Result<Tensor> {
    let (m, width) = x.dims2()?;
    if width != k {
        return Err(Error::InvalidBatch(format!(
            "activations of width {width} for a matrix of {k} columns"
        )));
    }
    let mut out = vec![0f32; m * n];
    with_rows(x, |xs| kernel(xs, m, &mut out))?;
    Ok(Tensor::from_vec(out, (m, n), x.device())?)
}

/// candle-nn's rotary embedding, with the same arithmetic, in turn on this thread: candle's
/// spreads several positions' heads over rayon's pool, which a forward that runs
/// [`crate::kernels::alone`] must not wait on. `x` is `[batch, heads, positions, dim]`,
/// `cos` and `sin` `[positions, dim / 2]`; `interleaved` rotates pairs of neighbours
/// (GPT-J style) instead of the halves' matching entries (GPT-NeoX style).
fn rope_in_turn(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let cos = cos.flatten_all()?.to_vec1::<f32>()?;
    let sin = sin.flatten_all()?.to_vec1::<f32>()?;
    let half = d / 2;
    if cos.len() != t * half || sin.len() != t * half {
        return Err(Error::InvalidBatch(format!(
            "rotary tables of {} and {} values for {t} positions of {d}",
            cos.len(),
            sin.len()
        )));
    }
    let out = with_rows(x, |src| {
        let mut dst = vec![0f32; src.len()];
        for (src, dst) in src.chunks_exact(t * d).zip(dst.chunks_exact_mut(t * d)) {
            for p in 0..t {
                for j in 0..half {
                    let (c, s) = (cos[p * half + j], sin[p * half + j]);
                    let (i1, i2) = if interleaved {
                        (p * d + 2 * j, p * d + 2 * j + 1)
                    } else {
                        (p * d + j, p * d + j + half)
                    };
                    dst[i1] = src[i1] * c - src[i2] * s;
                    dst[i2] = src[i1] * s + src[i2] * c;
                }
            }
        }
        dst
    })?;
    Ok(Tensor::from_vec(out, (b, h, t, d), x.device())?)
}

/// Runs `f` on `x`'s values as one row-major F32 slice: in place where `x` is a
/// contiguous F32 tensor on the CPU (a prefill's activations are megabytes), copied
/// otherwise.
fn with_rows<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if x.dtype() == DType::F32 {
        let (storage, layout) = x.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
        }
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&xs))
}

/// The largest feed-forward scratch (in values) a compute thread keeps between forwards;
/// a larger batch's is freed after it.
const MLP_SCRATCH_KEPT: usize = 2 << 20;

thread_local! {
    /// A compute thread's feed-forward products, reused across layers and forwards.
    static MLP_SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Rows `ids` of a `[_, k]` matrix, each written by `row(id, out)`.
fn gather_rows(
    ids: &[u32],
    k: usize,
    device: &Device,
    row: impl Fn(usize, &mut [f32]),
) -> Result<Tensor> {
    let mut out = vec![0f32; ids.len() * k];
    for (dst, &id) in out.chunks_mut(k).zip(ids) {
        row(id as usize, dst);
    }
    Ok(Tensor::from_vec(out, (ids.len(), k), device)?)
}

/// A projection `x W^T (+ b)`, with `W` dense or block-quantized.
#[derive(Debug, Clone)]
struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.add_bias(self.weight.forward(x)?)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Several projections of the same `x` (q, k and v): where all run on our tiles, the
    /// activations are quantized once for all of them.
    fn forward_shared<const N: usize>(linears: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let tiles: Vec<&Arc<QuantTiles>> = linears
            .iter()
            .filter_map(|l| match &l.weight {
                Matrix::Quant(t) => Some(t),
                _ => None,
            })
            .collect();
        let (m, k) = x.dims2()?;
        if tiles.len() != N || tiles.iter().any(|t| t.cols() != k) {
            let mut out = Vec::with_capacity(N);
            for l in linears {
                out.push(l.forward(x)?);
            }
            return Ok(out.try_into().unwrap_or_else(|_| unreachable!("N outputs")));
        }
        let outputs = with_rows(x, |xs| {
            let acts = QuantizedRows::new(xs, m, k);
            tiles
                .iter()
                .map(|t| {
                    let mut out = vec![0f32; m * t.rows()];
                    t.matmul_quantized(&acts, &mut out);
                    (out, t.rows())
                })
                .collect::<Vec<_>>()
        })?;
        let mut out = Vec::with_capacity(N);
        for (l, (values, n)) in linears.iter().zip(outputs) {
            out.push(l.add_bias(Tensor::from_vec(values, (m, n), x.device())?)?);
        }
        Ok(out.try_into().unwrap_or_else(|_| unreachable!("N outputs")))
    }
}

/// Our tile format for a ggml block type, where we have one.
fn tile_format(dtype: GgmlDType) -> Option<TileFormat> {
    Some(match dtype {
        GgmlDType::Q4_0 => TileFormat::Q4_0,
        GgmlDType::Q4_1 => TileFormat::Q4_1,
        GgmlDType::Q5_0 => TileFormat::Q5_0,
        GgmlDType::Q5_1 => TileFormat::Q5_1,
        GgmlDType::Q8_0 => TileFormat::Q8_0,
        GgmlDType::Q4K => TileFormat::Q4K,
        GgmlDType::Q5K => TileFormat::Q5K,
        GgmlDType::Q6K => TileFormat::Q6K,
        _ => return None,
    })
}

/// A weight as a matmul operand: quantized weights stay packed (in our tiles where the
/// CPU and the block type allow), F16 stays F16.
fn matrix(weight: Weight, device: &Device) -> Result<Matrix> {
    Ok(match weight {
        Weight::Quantized(q) if q.device().is_cpu() && tile_format(q.dtype()).is_some() => {
            let (n, k) = q.shape().dims2()?;
            let tiles = tile_format(q.dtype())
                .and_then(|format| QuantTiles::from_ggml(format, &q.data().ok()?, n, k));
            match tiles {
                Some(tiles) => Matrix::Quant(Arc::new(tiles)),
                None => Matrix::Candle(QMatMul::QTensor(Arc::new(q))),
            }
        }
        Weight::Quantized(q) => Matrix::Candle(QMatMul::QTensor(Arc::new(q))),
        Weight::Dense(t) if t.dtype() == DType::F32 && device.is_cpu() => match t.dims() {
            &[n, k] => match DenseMatrix::new(t.flatten_all()?.to_vec1::<f32>()?, n, k) {
                Ok(m) => Matrix::Dense(Arc::new(m)),
                Err(_) => Matrix::Candle(QMatMul::Tensor(t)),
            },
            _ => Matrix::Candle(QMatMul::Tensor(t)),
        },
        Weight::Dense(t) if t.dtype() == DType::F32 => Matrix::Candle(QMatMul::Tensor(t)),
        Weight::F16 { values, shape } => {
            let fallback = |values: Vec<half::f16>| -> Result<Matrix> {
                Ok(Matrix::Candle(QMatMul::TensorF16(Tensor::from_vec(
                    values,
                    shape.as_slice(),
                    device,
                )?)))
            };
            match shape[..] {
                [n, k] if device.is_cpu() => match F16Matrix::new(values, n, k) {
                    Ok(m) => Matrix::F16(Arc::new(m)),
                    Err(values) => fallback(values)?,
                },
                _ => fallback(values)?,
            }
        }
        Weight::Dense(t) => Matrix::Candle(QMatMul::TensorF16(t.to_dtype(DType::F16)?)),
    })
}

/// A weight as an F32 vector (norms, biases).
fn dense_f32(weight: Weight, device: &Device) -> Result<Tensor> {
    Ok(match weight {
        Weight::Dense(t) => t.to_dtype(DType::F32)?,
        Weight::F16 { values, shape } => {
            Tensor::from_vec(values, shape, device)?.to_dtype(DType::F32)?
        }
        Weight::Quantized(q) => q.dequantize(device)?,
    })
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

#[derive(Debug)]
struct Block {
    layer: usize,
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    ffn: FeedForward,
}

/// A layer's feed-forward network.
#[derive(Debug)]
enum FeedForward {
    /// `down(silu(gate(h)) * up(h))`.
    Dense {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// A mixture of experts, each a dense feed-forward of its own.
    Experts(MixtureOfExperts),
}

/// A router and its experts: each token runs through the `used` experts its router
/// scores highest ([`crate::moe::route`]), and their outputs are summed, weighted.
#[derive(Debug)]
struct MixtureOfExperts {
    router: Matrix,
    experts: Vec<[Matrix; 3]>,
    used: usize,
    normalize: bool,
}

impl FeedForward {
    /// Layer `l`'s feed-forward, each matrix from `matrix`: dense, or `experts`.
    fn load(
        l: usize,
        experts: Option<Experts>,
        matrix: &mut dyn FnMut(Role) -> Result<Matrix>,
    ) -> Result<FeedForward> {
        let linear = |weight| Linear { weight, bias: None };
        Ok(match experts {
            None => FeedForward::Dense {
                gate: linear(matrix(Role::Gate(l))?),
                up: linear(matrix(Role::Up(l))?),
                down: linear(matrix(Role::Down(l))?),
            },
            Some(e) => FeedForward::Experts(MixtureOfExperts {
                router: matrix(Role::Router(l))?,
                experts: (0..e.count)
                    .map(|x| {
                        Ok([
                            matrix(Role::ExpertGate(l, x))?,
                            matrix(Role::ExpertUp(l, x))?,
                            matrix(Role::ExpertDown(l, x))?,
                        ])
                    })
                    .collect::<Result<_>>()?,
                used: e.used,
                normalize: e.normalize,
            }),
        })
    }
}

impl MixtureOfExperts {
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let (m, hidden) = h.dims2()?;
        let count = self.experts.len();
        let scores = self.router.forward(h)?.to_dtype(DType::F32)?;
        let scores = scores.flatten_all()?.to_vec1::<f32>()?;
        if scores.len() != m * count {
            return Err(Error::InvalidBatch(format!(
                "router scores of {} values for {m} rows of {count} experts",
                scores.len()
            )));
        }
        // Each expert's rows, with their weights.
        let mut rows: Vec<Vec<(usize, f32)>> = vec![Vec::new(); count];
        for (row, scores) in scores.chunks(count).enumerate() {
            for (e, weight) in crate::moe::route(scores, self.used, self.normalize) {
                rows[e].push((row, weight));
            }
        }
        let mut out = vec![0f32; m * hidden];
        with_rows(h, |xs| -> Result<()> {
            let (mut picked, mut ys) = (Vec::new(), Vec::new());
            for (expert, rows) in self.experts.iter().zip(&rows) {
                if rows.is_empty() {
                    continue;
                }
                picked.clear();
                for &(row, _) in rows {
                    picked.extend_from_slice(&xs[row * hidden..(row + 1) * hidden]);
                }
                if !swiglu_rows(expert.each_ref(), &picked, rows.len(), &mut ys)? {
                    ys = swiglu_on_candle(expert, &picked, rows.len(), h.device())?;
                }
                for (&(row, weight), y) in rows.iter().zip(ys.chunks(hidden)) {
                    let into = &mut out[row * hidden..(row + 1) * hidden];
                    for (o, y) in into.iter_mut().zip(y) {
                        *o += weight * y;
                    }
                }
            }
            Ok(())
        })??;
        Ok(Tensor::from_vec(out, (m, hidden), h.device())?)
    }
}

/// [`swiglu_rows`] where the matrices run on candle's.
fn swiglu_on_candle(
    [gate, up, down]: &[Matrix; 3],
    xs: &[f32],
    m: usize,
    device: &Device,
) -> Result<Vec<f32>> {
    let x = Tensor::from_slice(xs, (m, xs.len() / m.max(1)), device)?;
    let products = (candle_nn::ops::silu(&gate.forward(&x)?)? * up.forward(&x)?)?;
    let ys = down.forward(&products)?.to_dtype(DType::F32)?;
    Ok(ys.flatten_all()?.to_vec1::<f32>()?)
}

/// Per-batch rotary tables and attention layout shared by every layer of one forward.
struct BatchContext<'a> {
    chunks: &'a [Chunk],
    /// First row of each chunk.
    offsets: Vec<usize>,
    cos: Tensor,
    sin: Tensor,
    /// Causal mask of each chunk of more than one position (built once, used by every
    /// layer), for candle's attention.
    masks: Vec<Option<Tensor>>,
    /// Attention runs in our portable CPU kernel (which needs no masks).
    portable: bool,
}

/// A loaded slice of a model, ready to run forwards.
#[derive(Debug)]
pub struct Stage {
    config: ModelConfig,
    slice: Slice,
    device: Device,
    embed: Option<Matrix>,
    blocks: Vec<Block>,
    final_norm: Option<RmsNorm>,
    lm_head: Option<Matrix>,
    inv_freq: Vec<f32>,
    rope_interleaved: bool,
    weight_bytes: u64,
    /// Counts layers run, for a watchdog that tells a slow forward from a stuck one.
    progress: Option<Arc<AtomicU64>>,
}

impl Stage {
    /// Loads the tensors of `slice` (and only those) from `file`.
    pub fn load(file: &ModelFile, slice: Slice, device: &Device) -> Result<Stage> {
        let config = file.config().clone();
        let checked = Slice::new(slice.layers.clone(), config.num_layers)?;
        if slice.embed && !checked.embed || slice.head && !checked.head {
            return Err(Error::SliceOutOfRange {
                slice: slice.layers,
                layers: config.num_layers,
            });
        }
        let _span = tracing::info_span!("load_stage", layers = ?slice.layers).entered();
        let mut weight_bytes = 0u64;
        let mut load = |role: Role| -> Result<Weight> {
            weight_bytes += file.role_bytes(role);
            file.load(role, device)
        };
        let eps = config.rms_norm_eps as f32;
        let embed = if slice.embed {
            Some(matrix(load(Role::Embed)?, device)?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(slice.layers.len());
        for l in slice.layers.clone() {
            let mut norm = |role: Role| -> Result<RmsNorm> {
                Ok(RmsNorm {
                    weight: dense_f32(load(role)?, device)?,
                    eps,
                })
            };
            let attn_norm = norm(Role::AttnNorm(l))?;
            let ffn_norm = norm(Role::FfnNorm(l))?;
            let (q_norm, k_norm) = if config.qk_norm {
                (Some(norm(Role::QNorm(l))?), Some(norm(Role::KNorm(l))?))
            } else {
                (None, None)
            };
            let mut linear = |w: Role, b: Option<Role>| -> Result<Linear> {
                let weight = matrix(load(w)?, device)?;
                let bias = match b {
                    Some(b) => Some(dense_f32(load(b)?, device)?),
                    None => None,
                };
                Ok(Linear { weight, bias })
            };
            let bias = |role: Role| config.qkv_bias.then_some(role);
            let ffn =
                FeedForward::load(
                    l,
                    config.experts,
                    &mut |role| Ok(linear(role, None)?.weight),
                )?;
            blocks.push(Block {
                layer: l,
                attn_norm,
                q: linear(Role::Q(l), bias(Role::QBias(l)))?,
                k: linear(Role::K(l), bias(Role::KBias(l)))?,
                v: linear(Role::V(l), bias(Role::VBias(l)))?,
                o: linear(Role::O(l), None)?,
                q_norm,
                k_norm,
                ffn_norm,
                ffn,
            });
        }
        let (final_norm, lm_head) = if slice.head {
            let final_norm = RmsNorm {
                weight: dense_f32(load(Role::FinalNorm)?, device)?,
                eps,
            };
            let head = if file.entry(Role::LmHead).is_some() {
                matrix(load(Role::LmHead)?, device)?
            } else if !config.tie_word_embeddings {
                // Untied, yet no head: fail loudly rather than silently reuse the embedding.
                return Err(Error::MissingTensor {
                    path: file.path().to_path_buf(),
                    tensor: file.tensor_name(Role::LmHead),
                    arch: config.arch.name().into(),
                });
            } else if let Some(embed) = &embed {
                // Tied: share the embedding's storage.
                embed.clone()
            } else {
                matrix(load(Role::Embed)?, device)?
            };
            (Some(final_norm), Some(head))
        } else {
            (None, None)
        };
        Ok(Stage {
            inv_freq: config.rope_inv_freq().iter().map(|&f| f as f32).collect(),
            rope_interleaved: file.rope_interleaved(),
            config,
            slice,
            device: device.clone(),
            embed,
            blocks,
            final_norm,
            lm_head,
            weight_bytes,
            progress: None,
        })
    }

    /// Counts every layer this stage runs into `counter`: whoever watches it can tell a
    /// forward that is progressing (however slowly) from one that is stuck.
    pub fn count_progress(&mut self, counter: Arc<AtomicU64>) {
        self.progress = Some(counter);
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The slice this stage holds.
    pub fn slice(&self) -> &Slice {
        &self.slice
    }

    /// Bytes of weights this stage loaded, as stored in the file.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The device the stage computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty KV cache for this stage's layers.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.slice.layers.start, self.slice.layers.len())
    }

    /// Runs the stage over a batch. `chunks` lists the sequences in row order; `input` holds
    /// their rows concatenated. Each chunk must start where its sequence's cache ends.
    pub fn forward(
        &self,
        chunks: &[Chunk],
        input: StageInput,
        cache: &mut KvCache,
    ) -> Result<StageOutput> {
        self.forward_scoring(chunks, input, cache, LogitRows::LastOfEachChunk)
    }

    /// As [`Stage::forward`], with the last stage's logits for the rows `rows` names:
    /// every position scores a text (perplexity), the last of each chunk samples.
    pub fn forward_scoring(
        &self,
        chunks: &[Chunk],
        input: StageInput,
        cache: &mut KvCache,
        rows: LogitRows,
    ) -> Result<StageOutput> {
        // The whole forward runs on a worker of the compute pool. Called from outside it,
        // each of a layer's parallel matmuls would wake a worker and park this thread
        // until it finished: two context switches per matmul, a tenth of a decode step.
        match compute_pool() {
            Some(pool)
                if rayon::current_thread_index().is_none() && !crate::kernels::is_alone() =>
            {
                pool.install(|| self.forward_on_pool(chunks, input, cache, rows))
            }
            _ => self.forward_on_pool(chunks, input, cache, rows),
        }
    }

    fn forward_on_pool(
        &self,
        chunks: &[Chunk],
        input: StageInput,
        cache: &mut KvCache,
        rows_out: LogitRows,
    ) -> Result<StageOutput> {
        let rows: usize = chunks.iter().map(|c| c.len).sum();
        if chunks.is_empty() || rows == 0 {
            return Err(Error::InvalidBatch(
                "a batch needs at least one new position".into(),
            ));
        }
        for c in chunks {
            let cached = cache.len(c.seq)?;
            if cached != c.start {
                return Err(Error::PositionMismatch {
                    seq: c.seq,
                    start: c.start,
                    cached,
                });
            }
            if c.len == 0 {
                return Err(Error::InvalidBatch(format!(
                    "sequence {} has an empty chunk",
                    c.seq
                )));
            }
            if c.start + c.len > self.config.max_position_embeddings {
                return Err(Error::ContextOverflow {
                    requested: c.start + c.len,
                    context: self.config.max_position_embeddings,
                });
            }
        }
        if chunks
            .iter()
            .enumerate()
            .any(|(i, c)| chunks[..i].iter().any(|d| d.seq == c.seq))
        {
            return Err(Error::InvalidBatch(
                "a sequence appears twice in one batch".into(),
            ));
        }
        let mut x = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(embed)) => {
                if ids.len() != rows {
                    return Err(Error::InvalidBatch(format!(
                        "{} token ids for {rows} positions",
                        ids.len()
                    )));
                }
                if let Some(&id) = ids
                    .iter()
                    .find(|&&id| id as usize >= self.config.vocab_size)
                {
                    return Err(Error::TokenOutOfRange {
                        id,
                        vocab: self.config.vocab_size,
                    });
                }
                embed.embedding(&ids, &self.device)?
            }
            (StageInput::Hidden(h), None) => {
                let dims = h.dims();
                if dims != [rows, self.config.hidden_size] {
                    return Err(Error::InvalidBatch(format!(
                        "activations of shape {dims:?}, expected [{rows}, {}]",
                        self.config.hidden_size
                    )));
                }
                h.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            (StageInput::Tokens(_), None) => {
                return Err(Error::InvalidBatch(
                    "token ids sent to a stage without the embedding".into(),
                ))
            }
            (StageInput::Hidden(_), Some(_)) => {
                return Err(Error::InvalidBatch(
                    "activations sent to the first stage, which expects token ids".into(),
                ))
            }
        };
        let ctx = self.batch_context(chunks)?;
        // Checked before any layer runs, so a bad request leaves the caches as they were.
        let logit_rows = match rows_out {
            LogitRows::Every => None,
            LogitRows::LastOfEachChunk => {
                Some(tail_rows(&ctx.offsets, chunks, &vec![1; chunks.len()])?)
            }
            LogitRows::LastOf(tails) => Some(tail_rows(&ctx.offsets, chunks, &tails)?),
        };
        for block in &self.blocks {
            x = self.block_forward(block, &x, &ctx, cache)?;
            if let Some(p) = &self.progress {
                p.fetch_add(1, Ordering::Relaxed);
            }
        }
        for c in chunks {
            cache.advance(c.seq, c.len)?;
        }
        match (&self.final_norm, &self.lm_head) {
            (Some(norm), Some(head)) => {
                let scored = match logit_rows {
                    None => x,
                    Some(rows) => {
                        let idx = Tensor::new(rows.as_slice(), &self.device)?;
                        x.index_select(&idx, 0)?
                    }
                };
                let logits = head.forward_two_term(&norm.forward(&scored)?)?;
                Ok(StageOutput::Logits(logits.to_dtype(DType::F32)?))
            }
            _ => Ok(StageOutput::Hidden(x)),
        }
    }

    fn batch_context<'a>(&self, chunks: &'a [Chunk]) -> Result<BatchContext<'a>> {
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut positions = Vec::new();
        let mut row = 0;
        for c in chunks {
            offsets.push(row);
            row += c.len;
            positions.extend((c.start..c.start + c.len).map(|p| p as f32));
        }
        let half = self.inv_freq.len();
        let rows = positions.len();
        let pos = Tensor::from_vec(positions, (rows, 1), &self.device)?;
        let inv = Tensor::from_slice(&self.inv_freq, (1, half), &self.device)?;
        let angles = pos.broadcast_mul(&inv)?;
        let portable = self.device.is_cpu() && crate::kernels::portable_enabled();
        let masks = chunks
            .iter()
            .map(|c| {
                (c.len > 1 && !portable)
                    .then(|| causal_mask(c.start, c.len, &self.device))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BatchContext {
            chunks,
            offsets,
            cos: angles.cos()?,
            sin: angles.sin()?,
            masks,
            portable,
        })
    }

    fn rope(&self, x: &Tensor, ctx: &BatchContext) -> Result<Tensor> {
        if crate::kernels::is_alone() && x.device().is_cpu() && x.dtype() == DType::F32 {
            return rope_in_turn(x, &ctx.cos, &ctx.sin, self.rope_interleaved);
        }
        Ok(if self.rope_interleaved {
            candle_nn::rotary_emb::rope_i(x, &ctx.cos, &ctx.sin)?
        } else {
            candle_nn::rotary_emb::rope(x, &ctx.cos, &ctx.sin)?
        })
    }

    fn block_forward(
        &self,
        b: &Block,
        x: &Tensor,
        ctx: &BatchContext,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let rows = x.dim(0)?;
        let (heads, kv_heads, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let h = b.attn_norm.forward(x)?;
        let [q, k, v] = Linear::forward_shared([&b.q, &b.k, &b.v], &h)?;
        let q = q.reshape((rows, heads, hd))?;
        let k = k.reshape((rows, kv_heads, hd))?;
        let v = v.reshape((rows, kv_heads, hd))?;
        let (q, k) = match (&b.q_norm, &b.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        // [1, heads, rows, hd]: the rotary kernels want (batch, heads, seq, dim).
        let q = self
            .rope(&q.transpose(0, 1)?.contiguous()?.unsqueeze(0)?, ctx)?
            .squeeze(0)?;
        let k = self
            .rope(&k.transpose(0, 1)?.contiguous()?.unsqueeze(0)?, ctx)?
            .squeeze(0)?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let groups = heads / kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outputs = Vec::with_capacity(ctx.chunks.len());
        // On the CPU, our row-by-row attention (batch-invariant, no [n, n] scores); elsewhere
        // candle's matmuls.
        let q_rows = if ctx.portable {
            Some(q.flatten_all()?.to_vec1::<f32>()?)
        } else {
            None
        };
        for ((chunk, &offset), mask) in ctx.chunks.iter().zip(&ctx.offsets).zip(&ctx.masks) {
            let n = chunk.len;
            let k_new = k.narrow(1, offset, n)?;
            let v_new = v.narrow(1, offset, n)?;
            let (k_all, v_all) = cache.append(chunk.seq, b.layer, chunk.start, &k_new, &v_new)?;
            if let Some(q_rows) = &q_rows {
                let q_chunk: Vec<f32> = (0..heads)
                    .flat_map(|h| &q_rows[(h * rows + offset) * hd..(h * rows + offset + n) * hd])
                    .copied()
                    .collect();
                let shape = Heads {
                    heads,
                    kv_heads,
                    head_dim: hd,
                };
                let out = with_kv(&k_all, &v_all, |keys, values| {
                    attention::causal(&q_chunk, n, chunk.start, shape, keys, values, scale as f32)
                })?;
                outputs.push(Tensor::from_vec(out, (n, heads * hd), &self.device)?);
                continue;
            }
            let total = chunk.start + n;
            // Query heads that share a kv head sit next to each other, so grouping them
            // as rows of one matmul per kv head avoids copying the cache `groups` times.
            let q_c = q
                .narrow(1, offset, n)?
                .contiguous()?
                .reshape((kv_heads, groups * n, hd))?;
            let scores = (q_c.matmul(&k_all.t()?)? * scale)?;
            let scores = match mask {
                Some(mask) => scores
                    .reshape((kv_heads, groups, n, total))?
                    .broadcast_add(mask)?
                    .reshape((kv_heads, groups * n, total))?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.matmul(&v_all)?; // [kv_heads, groups * n, hd]
            let out = out
                .reshape((heads, n, hd))?
                .transpose(0, 1)?
                .reshape((n, heads * hd))?;
            outputs.push(out);
        }
        let attn = Tensor::cat(&outputs, 0)?;
        let x = (x + b.o.forward(&attn)?)?;
        let h = b.ffn_norm.forward(&x)?;
        Ok((x + b.mlp(&h)?)?)
    }
}

impl Block {
    /// The feed-forward network.
    fn mlp(&self, h: &Tensor) -> Result<Tensor> {
        match &self.ffn {
            FeedForward::Dense { gate, up, down } => dense_mlp(gate, up, down, h),
            FeedForward::Experts(moe) => moe.forward(h),
        }
    }
}

/// `down(silu(gate(h)) * up(h))`.
fn dense_mlp(gate: &Linear, up: &Linear, down: &Linear, h: &Tensor) -> Result<Tensor> {
    let biased = gate.bias.is_some() || up.bias.is_some() || down.bias.is_some();
    let m = h.dim(0)?;
    if !biased {
        let mut out = Vec::new();
        if with_rows(h, |xs| {
            swiglu_rows([&gate.weight, &up.weight, &down.weight], xs, m, &mut out)
        })?? {
            let n = out.len() / m.max(1);
            return Ok(Tensor::from_vec(out, (m, n), h.device())?);
        }
    }
    let products = (candle_nn::ops::silu(&gate.forward(h)?)? * up.forward(h)?)?;
    down.forward(&products)
}

/// `out [m, n] = down(silu(gate(xs)) * up(xs))` for `m` rows `xs`, on our kernels; false
/// (and nothing written) where a matrix runs on candle's.
fn swiglu_rows(
    [gate, up, down]: [&Matrix; 3],
    xs: &[f32],
    m: usize,
    out: &mut Vec<f32>,
) -> Result<bool> {
    let (Some((inter, k)), Some(up_shape), Some((n, down_k))) =
        (gate.shape(), up.shape(), down.shape())
    else {
        return Ok(false);
    };
    if up_shape != (inter, k) || down_k != inter || xs.len() != m * k {
        return Err(Error::InvalidBatch(format!(
            "feed-forward of mismatched shapes: gate {inter}x{k}, up {up_shape:?}, down {n}x{down_k}, {m} input rows of {} values",
            xs.len()
        )));
    }
    // The two [m, inter] products (megabytes in a prefill) go into this thread's scratch,
    // not into fresh tensors that the allocator maps and faults in page by page, four of
    // them per layer.
    // Taken out, not borrowed: while it waits on its parallel loops this thread may run
    // another forward's work, which then finds the slot empty.
    let mut scratch = MLP_SCRATCH.take();
    scratch.resize(2 * m * inter, 0.0);
    let (gated, ups) = scratch.split_at_mut(m * inter);
    match (gate, up) {
        // One input: quantized once for both.
        (Matrix::Quant(g), Matrix::Quant(u)) => {
            let acts = QuantizedRows::new(xs, m, k);
            g.matmul_quantized(&acts, gated);
            u.matmul_quantized(&acts, ups);
        }
        _ => {
            gate.matmul_into(xs, m, gated);
            up.matmul_into(xs, m, ups);
        }
    }
    silu_times(gated, ups);
    out.clear();
    out.resize(m * n, 0.0);
    down.matmul_into(gated, m, out);
    if scratch.len() <= MLP_SCRATCH_KEPT {
        MLP_SCRATCH.set(scratch);
    }
    Ok(true)
}

/// The rows of a batch whose logits are wanted: the last `tails[i]` of chunk `i`, in order.
fn tail_rows(offsets: &[usize], chunks: &[Chunk], tails: &[usize]) -> Result<Vec<u32>> {
    if tails.len() != chunks.len() {
        return Err(Error::InvalidBatch(format!(
            "logits asked for {} chunks of a batch of {}",
            tails.len(),
            chunks.len()
        )));
    }
    let mut rows = Vec::with_capacity(tails.iter().sum());
    for ((&offset, c), &tail) in offsets.iter().zip(chunks).zip(tails) {
        if tail == 0 || tail > c.len {
            return Err(Error::InvalidBatch(format!(
                "logits of the last {tail} positions of a chunk of {}",
                c.len
            )));
        }
        rows.extend((offset + c.len - tail..offset + c.len).map(|r| r as u32));
    }
    Ok(rows)
}

/// `gated[i] = silu(gated[i]) * up[i]`, in parallel.
fn silu_times(gated: &mut [f32], up: &[f32]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let piece = |(g, u): (&mut [f32], &[f32])| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    };
    if crate::kernels::is_alone() {
        piece((gated, up));
    } else {
        gated
            .par_chunks_mut(CHUNK)
            .zip(up.par_chunks(CHUNK))
            .for_each(piece);
    }
}

/// Threads [`compute_pool`] starts with; 0 for one per core.
static COMPUTE_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets how many threads every forward of this process computes on (llama.cpp's
/// `--threads`), before the first forward; without it, one per core (or
/// `RAYON_NUM_THREADS`). Fewer suit a small model, whose matmuls take microseconds: waking
/// another core for each costs more than it saves, and leaves no core free for drafting
/// or the network. False when forwards have already started their threads.
pub fn set_compute_threads(threads: usize) -> bool {
    COMPUTE_THREADS.store(threads.max(1), std::sync::atomic::Ordering::SeqCst);
    COMPUTE_POOL.get().is_none()
}

static COMPUTE_POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();

/// The threads every forward computes on ([`set_compute_threads`]), as rayon's global
/// pool, which a forward cannot be moved onto from outside. `None` when the threads could
/// not be started (a process limit): the forward then runs here, and its parallel loops on
/// the global pool.
fn compute_pool() -> Option<&'static rayon::ThreadPool> {
    COMPUTE_POOL.get_or_init(|| {
        let threads = match COMPUTE_THREADS.load(std::sync::atomic::Ordering::SeqCst) {
            0 => rayon::current_num_threads(),
            n => n,
        };
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("strata-compute-{i}"))
            .build()
            .inspect_err(|e| tracing::warn!(error = %e, "no compute pool: forwards run on the caller's thread"))
            .ok()
    })
    .as_ref()
}

/// Runs `f` over the F32 storage of a sequence's key and value views (narrowed from
/// `[kv_heads, capacity, head_dim]` buffers, so contiguous within each head).
fn with_kv<R>(
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(KvBuffer<'_>, KvBuffer<'_>) -> R,
) -> Result<R> {
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    fn buffer<'a>(
        storage: &'a candle_core::Storage,
        layout: &candle_core::Layout,
    ) -> Option<KvBuffer<'a>> {
        match storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) => {
                let stride = layout.stride();
                (stride.len() == 3 && stride[2] == 1).then(|| KvBuffer {
                    data: data.as_slice(),
                    offset: layout.start_offset(),
                    head_stride: stride[0],
                })
            }
            _ => None,
        }
    }
    match (buffer(&k_storage, k_layout), buffer(&v_storage, v_layout)) {
        (Some(keys), Some(values)) => Ok(f(keys, values)),
        _ => Err(Error::InvalidBatch(
            "the KV cache is not F32 on the CPU".into(),
        )),
    }
}

/// `[n, start + n]` additive mask: new position `i` (at `start + i`) sees positions
/// `<= start + i`.
fn causal_mask(start: usize, n: usize, device: &Device) -> Result<Tensor> {
    let total = start + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (n, total), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_covers_every_layer_once() {
        let slices = Slice::split_even(10, 3).unwrap();
        let ranges: Vec<_> = slices.iter().map(|s| s.layers.clone()).collect();
        assert_eq!(ranges, vec![0..4, 4..7, 7..10]);
        assert!(slices[0].embed && !slices[0].head);
        assert!(!slices[1].embed && !slices[1].head);
        assert!(!slices[2].embed && slices[2].head);
        assert!(Slice::split_even(2, 3).is_err());
        assert!(Slice::new(3..12, 10).is_err());
    }

    #[test]
    fn causal_mask_hides_the_future_only() {
        let m = causal_mask(2, 2, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][..3], [0.0, 0.0, 0.0]);
        assert!(m[0][3].is_infinite());
        assert_eq!(m[1], vec![0.0; 4]);
    }
}
