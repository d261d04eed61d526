//! Model files on disk: GGUF (llama.cpp's layout and key names) and Hugging Face
//! safetensors (single file or sharded with `model.safetensors.index.json`, beside a
//! `config.json`).
//!
//! Opening a model reads only headers: the tensor directory and metadata. Tensor data is
//! read on demand, one tensor at a time, by offset (`pread`), so a stage that loads layers
//! `[a, b)` touches only those bytes and its resident memory is its slice. We read rather
//! than memory-map so the copy we compute on is the only resident copy (a mapping would
//! keep the file pages resident beside it).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::config::{Arch, Experts, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::model::Slice;

/// Largest safetensors JSON header we accept before allocating it (real ones are < 10 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

/// How a tensor's elements are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// A ggml block-quantized type (Q4_0, Q4_K, ...).
    Quantized(GgmlDType),
}

impl StorageType {
    /// Bytes for `elements` values of this type (saturating: an absurd count from a corrupt
    /// header must fail the bounds check, not wrap around and pass it).
    pub fn bytes_for(self, elements: usize) -> u64 {
        let elements = elements as u64;
        match self {
            StorageType::F32 => elements.saturating_mul(4),
            StorageType::F16 | StorageType::BF16 => elements.saturating_mul(2),
            StorageType::Quantized(q) => {
                (elements / q.block_size() as u64).saturating_mul(q.type_size() as u64)
            }
        }
    }

    /// A short name (`f16`, `q4_0`, ...).
    pub fn name(self) -> String {
        match self {
            StorageType::F32 => "f32".into(),
            StorageType::F16 => "f16".into(),
            StorageType::BF16 => "bf16".into(),
            StorageType::Quantized(q) => ggml_type_name(q).into(),
        }
    }
}

/// llama.cpp's name of a ggml type (`q4_0`, `q4_k`, ...).
pub fn ggml_type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// Elements of a shape, `None` on overflow (a corrupt header).
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A file of a model and the byte ranges of it that one slice needs.
#[derive(Debug, Clone)]
pub struct FileExtent {
    /// Where it is here.
    pub path: PathBuf,
    /// Its path relative to the directory holding the model root.
    pub relative: String,
    /// Its full length.
    pub length: u64,
    /// `(offset, length)` ranges to copy, sorted and merged.
    pub ranges: Vec<(u64, u64)>,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Index into the model's open files.
    file: usize,
    /// Absolute byte offset of the data.
    offset: u64,
    /// Element type.
    pub storage: StorageType,
    /// Shape, rows first (as candle and transformers see it).
    pub shape: Vec<usize>,
}

impl TensorEntry {
    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        self.storage
            .bytes_for(element_count(&self.shape).unwrap_or(usize::MAX))
    }
}

/// A tensor read from a file: dense, or still block-quantized.
#[derive(Debug)]
pub enum Weight {
    /// F32 values (or any float type on a GPU).
    Dense(Tensor),
    /// F16 values (bf16 converted, on CPU) as read: handed to our kernel without a copy.
    F16 {
        /// Row-major values.
        values: Vec<half::f16>,
        /// Rows first.
        shape: Vec<usize>,
    },
    /// Packed ggml blocks, multiplied packed.
    Quantized(QTensor),
}

/// The file layout a model came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One `.gguf` file.
    Gguf,
    /// Hugging Face safetensors + `config.json`.
    Safetensors,
}

/// The parts of a transformer a tensor can be, independent of the file's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Token embedding `[vocab, hidden]`.
    Embed,
    /// Final RMSNorm before the head.
    FinalNorm,
    /// LM head `[vocab, hidden]` (absent when tied).
    LmHead,
    /// Norm before attention, in layer `l`.
    AttnNorm(usize),
    /// Query projection.
    Q(usize),
    /// Key projection.
    K(usize),
    /// Value projection.
    V(usize),
    /// Attention output projection.
    O(usize),
    /// Query bias.
    QBias(usize),
    /// Key bias.
    KBias(usize),
    /// Value bias.
    VBias(usize),
    /// Per-head query RMSNorm (Qwen3).
    QNorm(usize),
    /// Per-head key RMSNorm (Qwen3).
    KNorm(usize),
    /// Norm before the MLP.
    FfnNorm(usize),
    /// MLP gate projection.
    Gate(usize),
    /// MLP up projection.
    Up(usize),
    /// MLP down projection.
    Down(usize),
    /// Mixture of experts: the router, a score per expert `[experts, hidden]`.
    Router(usize),
    /// Expert `e`'s gate projection in layer `l`.
    ExpertGate(usize, usize),
    /// Expert `e`'s up projection.
    ExpertUp(usize, usize),
    /// Expert `e`'s down projection.
    ExpertDown(usize, usize),
}

impl Role {
    /// The name transformers gives this tensor in a model of `arch` (as checkpoints store
    /// it: one tensor per expert).
    pub fn hf_name(self, arch: Arch) -> String {
        let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
        let mixtral = arch == Arch::Mixtral;
        let expert = |l: usize, e: usize, qwen: &str, mixtral_name: &str| {
            if mixtral {
                layer(
                    l,
                    &format!("block_sparse_moe.experts.{e}.{mixtral_name}.weight"),
                )
            } else {
                layer(l, &format!("mlp.experts.{e}.{qwen}.weight"))
            }
        };
        match self {
            Role::Embed => "model.embed_tokens.weight".into(),
            Role::FinalNorm => "model.norm.weight".into(),
            Role::LmHead => "lm_head.weight".into(),
            Role::AttnNorm(l) => layer(l, "input_layernorm.weight"),
            Role::Q(l) => layer(l, "self_attn.q_proj.weight"),
            Role::K(l) => layer(l, "self_attn.k_proj.weight"),
            Role::V(l) => layer(l, "self_attn.v_proj.weight"),
            Role::O(l) => layer(l, "self_attn.o_proj.weight"),
            Role::QBias(l) => layer(l, "self_attn.q_proj.bias"),
            Role::KBias(l) => layer(l, "self_attn.k_proj.bias"),
            Role::VBias(l) => layer(l, "self_attn.v_proj.bias"),
            Role::QNorm(l) => layer(l, "self_attn.q_norm.weight"),
            Role::KNorm(l) => layer(l, "self_attn.k_norm.weight"),
            Role::FfnNorm(l) => layer(l, "post_attention_layernorm.weight"),
            Role::Gate(l) => layer(l, "mlp.gate_proj.weight"),
            Role::Up(l) => layer(l, "mlp.up_proj.weight"),
            Role::Down(l) => layer(l, "mlp.down_proj.weight"),
            Role::Router(l) if mixtral => layer(l, "block_sparse_moe.gate.weight"),
            Role::Router(l) => layer(l, "mlp.gate.weight"),
            Role::ExpertGate(l, e) => expert(l, e, "gate_proj", "w1"),
            Role::ExpertUp(l, e) => expert(l, e, "up_proj", "w3"),
            Role::ExpertDown(l, e) => expert(l, e, "down_proj", "w2"),
        }
    }

    /// The name llama.cpp gives this tensor in GGUF.
    pub fn gguf_name(self) -> String {
        let blk = |l: usize, rest: &str| format!("blk.{l}.{rest}");
        match self {
            Role::Embed => "token_embd.weight".into(),
            Role::FinalNorm => "output_norm.weight".into(),
            Role::LmHead => "output.weight".into(),
            Role::AttnNorm(l) => blk(l, "attn_norm.weight"),
            Role::Q(l) => blk(l, "attn_q.weight"),
            Role::K(l) => blk(l, "attn_k.weight"),
            Role::V(l) => blk(l, "attn_v.weight"),
            Role::O(l) => blk(l, "attn_output.weight"),
            Role::QBias(l) => blk(l, "attn_q.bias"),
            Role::KBias(l) => blk(l, "attn_k.bias"),
            Role::VBias(l) => blk(l, "attn_v.bias"),
            Role::QNorm(l) => blk(l, "attn_q_norm.weight"),
            Role::KNorm(l) => blk(l, "attn_k_norm.weight"),
            Role::FfnNorm(l) => blk(l, "ffn_norm.weight"),
            Role::Gate(l) => blk(l, "ffn_gate.weight"),
            Role::Up(l) => blk(l, "ffn_up.weight"),
            Role::Down(l) => blk(l, "ffn_down.weight"),
            Role::Router(l) => blk(l, "ffn_gate_inp.weight"),
            // One tensor holds every expert's, experts outermost.
            Role::ExpertGate(l, _) => blk(l, "ffn_gate_exps.weight"),
            Role::ExpertUp(l, _) => blk(l, "ffn_up_exps.weight"),
            Role::ExpertDown(l, _) => blk(l, "ffn_down_exps.weight"),
        }
    }

    /// For an expert's tensor, the expert: in GGUF it is that slice of a tensor holding
    /// every expert's.
    fn expert(self) -> Option<usize> {
        match self {
            Role::ExpertGate(_, e) | Role::ExpertUp(_, e) | Role::ExpertDown(_, e) => Some(e),
            _ => None,
        }
    }

    /// The shape the config implies, rows first.
    pub fn expected_shape(self, c: &ModelConfig) -> Vec<usize> {
        let q_out = c.num_heads * c.head_dim;
        let kv_out = c.num_kv_heads * c.head_dim;
        match self {
            Role::Embed | Role::LmHead => vec![c.vocab_size, c.hidden_size],
            Role::FinalNorm | Role::AttnNorm(_) | Role::FfnNorm(_) => vec![c.hidden_size],
            Role::Q(_) => vec![q_out, c.hidden_size],
            Role::K(_) | Role::V(_) => vec![kv_out, c.hidden_size],
            Role::O(_) => vec![c.hidden_size, q_out],
            Role::QBias(_) => vec![q_out],
            Role::KBias(_) | Role::VBias(_) => vec![kv_out],
            Role::QNorm(_) | Role::KNorm(_) => vec![c.head_dim],
            Role::Gate(_) | Role::Up(_) => vec![c.intermediate_size, c.hidden_size],
            Role::Down(_) => vec![c.hidden_size, c.intermediate_size],
            Role::Router(_) => vec![experts(c).count, c.hidden_size],
            Role::ExpertGate(..) | Role::ExpertUp(..) => {
                vec![experts(c).intermediate_size, c.hidden_size]
            }
            Role::ExpertDown(..) => vec![c.hidden_size, experts(c).intermediate_size],
        }
    }

    /// The tensors of layer `l` for a model of this config.
    pub fn layer_roles(l: usize, c: &ModelConfig) -> Vec<Role> {
        let mut roles = vec![
            Role::AttnNorm(l),
            Role::Q(l),
            Role::K(l),
            Role::V(l),
            Role::O(l),
            Role::FfnNorm(l),
        ];
        match c.experts {
            Some(e) => {
                roles.push(Role::Router(l));
                for x in 0..e.count {
                    roles.extend([
                        Role::ExpertGate(l, x),
                        Role::ExpertUp(l, x),
                        Role::ExpertDown(l, x),
                    ]);
                }
            }
            None => roles.extend([Role::Gate(l), Role::Up(l), Role::Down(l)]),
        }
        if c.qkv_bias {
            roles.extend([Role::QBias(l), Role::KBias(l), Role::VBias(l)]);
        }
        if c.qk_norm {
            roles.extend([Role::QNorm(l), Role::KNorm(l)]);
        }
        roles
    }
}

/// The experts of a config whose roles include experts' (none: no expert is asked for).
fn experts(c: &ModelConfig) -> Experts {
    c.experts.unwrap_or(Experts {
        count: 0,
        used: 0,
        intermediate_size: 0,
        normalize: false,
    })
}

/// An opened model: its config, its tensor directory, and (for GGUF) its metadata.
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    format: Format,
    config: ModelConfig,
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, TensorEntry>,
    gguf_metadata: HashMap<String, gguf_file::Value>,
    dequantize: bool,
}

impl ModelFile {
    /// Makes [`ModelFile::load`] expand quantized tensors to F32: the reference a quantized
    /// model's outputs are measured against. Costs 4 bytes per weight; never for serving.
    pub fn set_dequantize(&mut self, dequantize: bool) {
        self.dequantize = dequantize;
    }

    /// Opens a `.gguf` file, a `.safetensors` file (with `config.json` beside it), a
    /// `model.safetensors.index.json`, or a directory holding either.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            if path.join("model.safetensors.index.json").is_file() {
                return Self::open_safetensors(path, &path.join("model.safetensors.index.json"));
            }
            if path.join("model.safetensors").is_file() {
                return Self::open_safetensors(path, &path.join("model.safetensors"));
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Self::open_gguf(one),
                [] => Err(Error::NotAModel {
                    path: path.to_path_buf(),
                    reason: "no model.safetensors, model.safetensors.index.json or .gguf file in this directory".into(),
                }),
                _ => Err(Error::NotAModel {
                    path: path.to_path_buf(),
                    reason: "several .gguf files here: name the one to load".into(),
                }),
            };
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let dir = path.parent().unwrap_or(Path::new("."));
        if name.ends_with(".gguf") {
            Self::open_gguf(path)
        } else if name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
            Self::open_safetensors(dir, path)
        } else if !path.exists() {
            Err(Error::io(
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ))
        } else {
            Err(Error::NotAModel {
                path: path.to_path_buf(),
                reason: "expected a .gguf file, a .safetensors file, or a model directory".into(),
            })
        }
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The path that was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file layout.
    pub fn format(&self) -> Format {
        self.format
    }

    /// GGUF metadata (empty for safetensors).
    pub fn gguf_metadata(&self) -> &HashMap<String, gguf_file::Value> {
        &self.gguf_metadata
    }

    /// The file's name for a role.
    pub fn tensor_name(&self, role: Role) -> String {
        match self.format {
            Format::Gguf => role.gguf_name(),
            Format::Safetensors => role.hf_name(self.config.arch),
        }
    }

    /// Where a role's tensor lives, if the file has it. In GGUF an expert's tensor is its
    /// slice of the layer's tensor of all experts (`[experts, rows, columns]`), present
    /// only when that tensor has the config's shape.
    pub fn entry(&self, role: Role) -> Option<TensorEntry> {
        let entry = self.tensors.get(&self.tensor_name(role))?;
        match (self.format, role.expert()) {
            (Format::Gguf, Some(e)) => {
                let count = experts(&self.config).count;
                let mut expected = vec![count];
                expected.extend(role.expected_shape(&self.config));
                if entry.shape != expected || e >= count {
                    return None;
                }
                let one = TensorEntry {
                    shape: expected[1..].to_vec(),
                    ..entry.clone()
                };
                Some(TensorEntry {
                    offset: entry.offset + e as u64 * one.bytes(),
                    ..one
                })
            }
            _ => Some(entry.clone()),
        }
    }

    /// Every tensor in the file, by its own name.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &TensorEntry)> {
        self.tensors.iter()
    }

    /// Whether the rotary is applied to interleaved pairs (llama.cpp's layout for the
    /// llama architecture, whose q/k rows its converter permutes) rather than halves.
    pub fn rope_interleaved(&self) -> bool {
        self.format == Format::Gguf && self.config.arch.gguf_permutes_qk()
    }

    /// Reads one tensor, checking its shape against the config.
    pub fn load(&self, role: Role, device: &Device) -> Result<Weight> {
        let name = self.tensor_name(role);
        let whole = self
            .tensors
            .get(&name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: name.clone(),
                arch: self.config.arch.name().into(),
            })?;
        let mut expected = role.expected_shape(&self.config);
        let entry = match self.entry(role) {
            Some(entry) if entry.shape == expected => entry,
            _ => {
                if self.format == Format::Gguf && role.expert().is_some() {
                    expected.insert(0, experts(&self.config).count);
                }
                return Err(Error::ShapeMismatch {
                    path: self.path.clone(),
                    tensor: name,
                    found: whole.shape.clone(),
                    expected,
                });
            }
        };
        self.read_entry(&name, &entry, device)
    }

    fn read_entry(&self, name: &str, entry: &TensorEntry, device: &Device) -> Result<Weight> {
        let (file_path, file) = &self.files[entry.file];
        let len = entry.bytes();
        let elements: usize = entry.shape.iter().product();
        let read = |buf: &mut [u8]| -> Result<()> {
            file.read_exact_at(buf, entry.offset)
                .map_err(|e| Error::io(file_path, e))
        };
        let weight = match entry.storage {
            StorageType::F32 => {
                let mut values = vec![0f32; elements];
                read(bytemuck::cast_slice_mut(&mut values))?;
                Weight::Dense(Tensor::from_vec(values, entry.shape.as_slice(), device)?)
            }
            StorageType::F16 => {
                let mut values = vec![half::f16::ZERO; elements];
                read(bytemuck::cast_slice_mut(&mut values))?;
                Weight::F16 {
                    values,
                    shape: entry.shape.clone(),
                }
            }
            StorageType::BF16 if device.is_cpu() => {
                // CPU kernels have no bf16 path: convert to f16 in place, which keeps the
                // footprint and holds bf16's 8-bit mantissa exactly (values below f16's
                // normal range, ~6e-5, lose precision; weights that small do not matter).
                let mut values = vec![half::f16::ZERO; elements];
                read(bytemuck::cast_slice_mut(&mut values))?;
                for v in &mut values {
                    *v = half::f16::from_f32(half::bf16::from_bits(v.to_bits()).to_f32());
                }
                Weight::F16 {
                    values,
                    shape: entry.shape.clone(),
                }
            }
            StorageType::BF16 => {
                let mut values = vec![half::bf16::ZERO; elements];
                read(bytemuck::cast_slice_mut(&mut values))?;
                Weight::Dense(Tensor::from_vec(values, entry.shape.as_slice(), device)?)
            }
            StorageType::Quantized(q) => {
                let mut bytes = vec![0u8; len as usize];
                read(&mut bytes)?;
                let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    q,
                    &bytes,
                    entry.shape.clone(),
                    device,
                )
                .map_err(|e| Error::Malformed {
                    path: file_path.clone(),
                    format: "gguf",
                    reason: format!("tensor `{name}`: {e}"),
                })?;
                if self.dequantize {
                    Weight::Dense(qt.dequantize(device)?)
                } else {
                    Weight::Quantized(qt)
                }
            }
        };
        Ok(weight)
    }

    /// Bytes of a role's tensor, 0 if absent.
    pub fn role_bytes(&self, role: Role) -> u64 {
        self.entry(role).map_or(0, |e| e.bytes())
    }

    /// The bytes of layer `l` one token reads: all of them, but of a mixture of experts
    /// only its share of the experts (`used` of `count`).
    pub fn active_layer_bytes(&self, l: usize) -> u64 {
        let (mut shared, mut experts) = (0u64, 0u64);
        for role in Role::layer_roles(l, &self.config) {
            match role.expert() {
                Some(_) => experts += self.role_bytes(role),
                None => shared += self.role_bytes(role),
            }
        }
        match self.config.experts {
            Some(e) => shared + experts * e.used as u64 / e.count.max(1) as u64,
            None => shared,
        }
    }

    /// Bytes of all tensors of layer `l`.
    pub fn layer_bytes(&self, l: usize) -> u64 {
        Role::layer_roles(l, &self.config)
            .into_iter()
            .map(|r| self.role_bytes(r))
            .sum()
    }

    /// The bytes a worker needs to load `slice`: for each file of the model, its length
    /// and the byte ranges to copy (its header and the slice's tensors), so that the same
    /// files, sparse elsewhere, open with [`ModelFile::open`] and load that slice. Small
    /// side files (`config.json`, a shard index) are copied whole. Paths are relative to
    /// the directory holding the model root, which is named by the first value returned.
    pub fn slice_extents(&self, slice: &Slice) -> (String, Vec<FileExtent>) {
        let c = &self.config;
        let mut needed: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut all: std::collections::HashSet<String> = std::collections::HashSet::new();
        for l in 0..c.num_layers {
            for role in Role::layer_roles(l, c) {
                let name = self.tensor_name(role);
                if slice.layers.contains(&l) {
                    needed.insert(name.clone());
                }
                all.insert(name);
            }
        }
        for role in [Role::Embed, Role::FinalNorm, Role::LmHead] {
            all.insert(self.tensor_name(role));
        }
        let head_is_embed = self.entry(Role::LmHead).is_none();
        if slice.embed || (slice.head && head_is_embed) {
            needed.insert(self.tensor_name(Role::Embed));
        }
        if slice.head {
            needed.insert(self.tensor_name(Role::FinalNorm));
            needed.insert(self.tensor_name(Role::LmHead));
        }
        let mut ranges: Vec<Vec<(u64, u64)>> = vec![Vec::new(); self.files.len()];
        let mut data_start: Vec<u64> = vec![u64::MAX; self.files.len()];
        for (name, e) in &self.tensors {
            data_start[e.file] = data_start[e.file].min(e.offset);
            // Tensors no role names (llama.cpp's rope_freqs, say) are small: always sent.
            if needed.contains(name) || !all.contains(name) {
                ranges[e.file].push((e.offset, e.bytes()));
            }
        }
        let base = match self.format {
            Format::Gguf => self.path.parent().map(Path::to_path_buf),
            Format::Safetensors => {
                let dir = if self.path.is_dir() {
                    self.path.clone()
                } else {
                    self.path
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_default()
                };
                dir.parent().map(Path::to_path_buf)
            }
        }
        .unwrap_or_default();
        let relative = |p: &Path| -> String {
            p.strip_prefix(&base)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        };
        let mut out = Vec::new();
        for (i, (path, file)) in self.files.iter().enumerate() {
            let length = file.metadata().map(|m| m.len()).unwrap_or(0);
            let mut r = std::mem::take(&mut ranges[i]);
            if data_start[i] != u64::MAX {
                r.push((0, data_start[i]));
            }
            r.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (o, l) in r {
                match merged.last_mut() {
                    Some(last) if last.0 + last.1 >= o => {
                        last.1 = last.1.max(o + l - last.0);
                    }
                    _ => merged.push((o, l)),
                }
            }
            out.push(FileExtent {
                path: path.clone(),
                relative: relative(path),
                length,
                ranges: merged,
            });
        }
        let root = match self.format {
            Format::Gguf => relative(&self.path),
            Format::Safetensors => {
                let dir = self
                    .files
                    .first()
                    .and_then(|(p, _)| p.parent())
                    .unwrap_or(Path::new("."));
                for side in ["config.json", "model.safetensors.index.json"] {
                    let p = dir.join(side);
                    if let Ok(m) = std::fs::metadata(&p) {
                        out.push(FileExtent {
                            path: p.clone(),
                            relative: relative(&p),
                            length: m.len(),
                            ranges: vec![(0, m.len())],
                        });
                    }
                }
                relative(dir)
            }
        };
        (root, out)
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let (content, tensors) = gguf_directory(&mut std::io::BufReader::new(&file), &file, path)?;
        let config = config_from_gguf(&content.metadata, &tensors, path, &file)?;
        Ok(ModelFile {
            path: path.to_path_buf(),
            format: Format::Gguf,
            config,
            files: vec![(path.to_path_buf(), file)],
            tensors,
            gguf_metadata: content.metadata,
            dequantize: false,
        })
    }

    fn open_safetensors(dir: &Path, path: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = ModelConfig::from_hf_json(&text, &config_path)?;
        let shard_names: Vec<String> = if path.to_string_lossy().ends_with(".index.json") {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Malformed {
                    path: path.to_path_buf(),
                    format: "safetensors index",
                    reason: e.to_string(),
                })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Malformed {
                    path: path.to_path_buf(),
                    format: "safetensors index",
                    reason: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names
        } else {
            vec![path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()]
        };
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (index, shard) in shard_names.iter().enumerate() {
            // A shard is a file beside the index, never a path elsewhere.
            if Path::new(shard).components().count() != 1 || shard.starts_with('.') {
                return Err(Error::Malformed {
                    path: path.to_path_buf(),
                    format: "safetensors index",
                    reason: format!("shard name `{shard}` is not a plain file name"),
                });
            }
            let shard_path = dir.join(shard);
            let file = File::open(&shard_path).map_err(|e| Error::io(&shard_path, e))?;
            for (name, entry) in read_safetensors_header(&shard_path, &file, index)? {
                tensors.insert(name, entry);
            }
            files.push((shard_path, file));
        }
        Ok(ModelFile {
            path: path.to_path_buf(),
            format: Format::Safetensors,
            config,
            files,
            tensors,
            gguf_metadata: HashMap::new(),
            dequantize: false,
        })
    }
}

/// Parses a safetensors header: an 8-byte little-endian length, then that many bytes of
/// JSON mapping names to `{dtype, shape, data_offsets}`. Every length is checked against the
/// file before anything is allocated from it.
/// A GGUF file's metadata and tensor directory, every count and extent checked against the
/// file's length before anything is sized from it.
fn gguf_directory<R: Read + Seek, S: ByteSource + ?Sized>(
    reader: &mut R,
    source: &S,
    path: &Path,
) -> Result<(gguf_file::Content, HashMap<String, TensorEntry>)> {
    let file_len = source.byte_len().map_err(|e| Error::io(path, e))?;
    let malformed_header = |reason: String| Error::Malformed {
        path: path.to_path_buf(),
        format: "gguf",
        reason,
    };
    // candle's reader trusts the header's counts and alignment: check them first.
    crate::gguf_check::check(reader, file_len).map_err(malformed_header)?;
    reader
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(reader).map_err(|e| Error::Malformed {
        path: path.to_path_buf(),
        format: "gguf",
        reason: e.to_string(),
    })?;
    let mut tensors = HashMap::new();
    for (name, info) in &content.tensor_infos {
        let storage = match info.ggml_dtype {
            GgmlDType::F32 => StorageType::F32,
            GgmlDType::F16 => StorageType::F16,
            GgmlDType::BF16 => StorageType::BF16,
            q => StorageType::Quantized(q),
        };
        let shape = info.shape.dims().to_vec();
        let malformed = |reason: String| Error::Malformed {
            path: path.to_path_buf(),
            format: "gguf",
            reason,
        };
        let elements = element_count(&shape).ok_or_else(|| {
            malformed(format!("tensor `{name}` has an impossible shape {shape:?}"))
        })?;
        if let StorageType::Quantized(q) = storage {
            let row = shape.last().copied().unwrap_or(0);
            if row % q.block_size() != 0 {
                return Err(Error::Malformed {
                    path: path.to_path_buf(),
                    format: "gguf",
                    reason: format!(
                        "tensor `{name}`: rows of {row} values are not a whole number of {q:?} blocks of {}",
                        q.block_size()
                    ),
                });
            }
        }
        let offset = content
            .tensor_data_offset
            .checked_add(info.offset)
            .ok_or_else(|| malformed(format!("tensor `{name}` has an impossible offset")))?;
        let entry = TensorEntry {
            file: 0,
            offset,
            storage,
            shape,
        };
        let end = entry
            .offset
            .saturating_add(entry.storage.bytes_for(elements));
        if end > file_len {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                tensor: name.clone(),
                start: entry.offset,
                end,
                file_len,
            });
        }
        tensors.insert(name.clone(), entry);
    }
    Ok((content, tensors))
}

/// Bytes read by offset: a model file, or (for the fuzz targets) a buffer.
pub trait ByteSource {
    /// Its length in bytes.
    fn byte_len(&self) -> std::io::Result<u64>;
    /// Fills `buf` from `offset`; an error past the end.
    fn fill_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ByteSource for File {
    fn byte_len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn fill_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ByteSource for [u8] {
    fn byte_len(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn fill_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

/// Reads a safetensors file's header from bytes, as the loader does: for the fuzz
/// targets, which feed it anything.
#[doc(hidden)]
pub fn safetensors_header_of(bytes: &[u8]) -> Result<usize> {
    read_safetensors_header(Path::new("fuzz.safetensors"), bytes, 0).map(|e| e.len())
}

/// Reads a GGUF file's header, tensor directory and config from bytes, as the loader
/// does: for the fuzz targets, which feed it anything.
#[doc(hidden)]
pub fn gguf_config_of(bytes: &[u8]) -> Result<ModelConfig> {
    let path = Path::new("fuzz.gguf");
    let (content, tensors) = gguf_directory(&mut std::io::Cursor::new(bytes), bytes, path)?;
    config_from_gguf(&content.metadata, &tensors, path, bytes)
}

fn read_safetensors_header<S: ByteSource + ?Sized>(
    path: &Path,
    file: &S,
    file_index: usize,
) -> Result<Vec<(String, TensorEntry)>> {
    let malformed = |reason: String| Error::Malformed {
        path: path.to_path_buf(),
        format: "safetensors",
        reason,
    };
    let file_len = file.byte_len().map_err(|e| Error::io(path, e))?;
    let mut len_bytes = [0u8; 8];
    file.fill_at(&mut len_bytes, 0).map_err(|_| {
        malformed(format!(
            "file of {file_len} bytes is too short for a header"
        ))
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_SAFETENSORS_HEADER || 8 + header_len > file_len {
        return Err(malformed(format!(
            "header claims {header_len} bytes but the file has {file_len}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.fill_at(&mut header, 8)
        .map_err(|e| Error::io(path, e))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| malformed(format!("header JSON: {e}")))?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let storage = match dtype {
            "F32" => StorageType::F32,
            "F16" => StorageType::F16,
            "BF16" => StorageType::BF16,
            other => {
                return Err(Error::UnsupportedDType {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: other.to_string(),
                    supported: "F32, F16, BF16 in safetensors; quantized models as GGUF",
                })
            }
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|dims| {
                dims.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .ok_or_else(|| malformed(format!("tensor `{name}` has no shape")))?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|o| o.iter().filter_map(|d| d.as_u64()).collect())
            .unwrap_or_default();
        let [begin, end] = offsets[..] else {
            return Err(malformed(format!(
                "tensor `{name}` has no valid data_offsets"
            )));
        };
        let expected = element_count(&shape).map(|n| storage.bytes_for(n));
        if end < begin || expected != Some(end - begin) {
            return Err(malformed(format!(
                "tensor `{name}`: data_offsets {begin}..{end} do not hold a {dtype} tensor of shape {shape:?}"
            )));
        }
        if data_start.saturating_add(end) > file_len {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                tensor: name,
                start: data_start.saturating_add(begin),
                end: data_start.saturating_add(end),
                file_len,
            });
        }
        entries.push((
            name,
            TensorEntry {
                file: file_index,
                offset: data_start + begin,
                storage,
                shape,
            },
        ));
    }
    Ok(entries)
}

/// Builds the config from llama.cpp's metadata keys (`{arch}.block_count`, ...).
fn config_from_gguf<S: ByteSource + ?Sized>(
    md: &HashMap<String, gguf_file::Value>,
    tensors: &HashMap<String, TensorEntry>,
    path: &Path,
    file: &S,
) -> Result<ModelConfig> {
    let invalid = |reason: String| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason,
    };
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| invalid("missing `general.architecture`".into()))?
        .clone();
    let mut arch = Arch::parse(&arch_name)?;
    // llama.cpp stores Mistral as `llama`; keep the name a user would recognise.
    if arch == Arch::Llama
        && md
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .is_some_and(|n| n.to_ascii_lowercase().contains("mistral"))
    {
        arch = Arch::Mistral;
    }
    let key = |suffix: &str| format!("{arch_name}.{suffix}");
    let get_usize = |suffix: &str| -> Option<usize> {
        md.get(&key(suffix))
            .and_then(|v| v.to_u64().ok())
            .map(|v| v as usize)
    };
    let need = |suffix: &str| -> Result<usize> {
        get_usize(suffix).ok_or_else(|| invalid(format!("missing `{}`", key(suffix))))
    };
    let get_f64 = |suffix: &str| -> Option<f64> {
        md.get(&key(suffix))
            .and_then(|v| v.to_f64().ok().or_else(|| v.to_f32().ok().map(f64::from)))
    };
    let hidden_size = need("embedding_length")?;
    let num_heads = need("attention.head_count")?;
    let head_dim = get_usize("attention.key_length")
        .or_else(|| get_usize("rope.dimension_count"))
        .unwrap_or(hidden_size / num_heads.max(1));
    let vocab_size = tensors
        .get("token_embd.weight")
        .and_then(|e| e.shape.first().copied())
        .or_else(|| get_usize("vocab_size"))
        .ok_or_else(|| invalid("no `token_embd.weight` tensor to size the vocabulary".into()))?;
    let rope_scaling = gguf_rope_scaling(md, tensors, &arch_name, path, file)?;
    let u32_key = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    // llama.cpp tells a mixture of experts by its expert count (Mixtral is `llama`), and
    // always renormalises the chosen experts' weights.
    let experts = match get_usize("expert_count").filter(|&n| n > 0) {
        Some(count) => {
            if arch == Arch::Llama || arch == Arch::Mistral {
                arch = Arch::Mixtral;
            }
            let feed_forward = need("feed_forward_length")?;
            Some(Experts {
                count,
                used: need("expert_used_count")?,
                intermediate_size: get_usize("expert_feed_forward_length").unwrap_or(feed_forward),
                normalize: true,
            })
        }
        None => None,
    };
    let config = ModelConfig {
        arch,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_layers: need("block_count")?,
        num_heads,
        num_kv_heads: get_usize("attention.head_count_kv").unwrap_or(num_heads),
        head_dim,
        vocab_size,
        rms_norm_eps: get_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: get_f64("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: get_usize("context_length").unwrap_or(4096),
        tie_word_embeddings: !tensors.contains_key("output.weight"),
        qkv_bias: tensors.contains_key("blk.0.attn_q.bias"),
        qk_norm: tensors.contains_key("blk.0.attn_q_norm.weight"),
        bos_token_id: u32_key("tokenizer.ggml.bos_token_id"),
        eos_token_ids: u32_key("tokenizer.ggml.eos_token_id").into_iter().collect(),
        experts,
    };
    config.validate(path)?;
    // Every layer has tensors: a block count past the tensors is a damaged header.
    if config.num_layers > tensors.len() {
        return Err(invalid(format!(
            "`{}` is {}, but the file has only {} tensors",
            key("block_count"),
            config.num_layers,
            tensors.len()
        )));
    }
    Ok(config)
}

/// The rotary scaling of a GGUF: per-frequency factors in `rope_freqs.weight` (Llama 3.1's,
/// as llama.cpp's converter stores them), or `{arch}.rope.scaling.type` `linear`.
fn gguf_rope_scaling<S: ByteSource + ?Sized>(
    md: &HashMap<String, gguf_file::Value>,
    tensors: &HashMap<String, TensorEntry>,
    arch_name: &str,
    path: &Path,
    file: &S,
) -> Result<Option<RopeScaling>> {
    let invalid = |reason: String| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason,
    };
    let key = |suffix: &str| format!("{arch_name}.{suffix}");
    let get_f64 = |suffix: &str| -> Option<f64> {
        md.get(&key(suffix))
            .and_then(|v| v.to_f64().ok().or_else(|| v.to_f32().ok().map(f64::from)))
    };
    let mut rope_scaling = None;
    if let Some(entry) = tensors.get("rope_freqs.weight") {
        if entry.storage != StorageType::F32 {
            return Err(invalid("`rope_freqs.weight` must be f32".into()));
        }
        let n: usize = entry.shape.iter().product();
        let mut factors = vec![0f32; n];
        file.fill_at(bytemuck::cast_slice_mut(&mut factors), entry.offset)
            .map_err(|e| Error::io(path, e))?;
        rope_scaling = Some(RopeScaling::FreqFactors { factors });
    } else if let Some(kind) = md
        .get(&key("rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
    {
        match kind.as_str() {
            "none" => {}
            "linear" => {
                let factor = get_f64("rope.scaling.factor")
                    .ok_or_else(|| invalid("linear rope scaling without a factor".into()))?;
                rope_scaling = Some(RopeScaling::Linear { factor });
            }
            other => {
                return Err(invalid(format!(
                    "rope scaling type `{other}` is not supported (supported: none, linear, llama3 via rope_freqs)"
                )))
            }
        }
    }
    Ok(rope_scaling)
}
