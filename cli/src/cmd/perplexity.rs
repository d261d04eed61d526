//! `strata perplexity`: perplexity of a model over a text file, as `llama-perplexity`
//! measures it (chunks of `--ctx` tokens, each scored over its second half, the first
//! token of a chunk replaced by BOS where the tokenizer adds one), and the KL divergence
//! from a base model whose distributions an earlier run saved (`--save-logits`, then
//! `--kl-base`): how far a quantized file strays from its F32 original.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use strata_model::scoring::{log_softmax, Scores};
use strata_model::{LocalPipeline, ModelFile, Tokenizer};

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// The model: a .gguf file or a safetensors directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to score (UTF-8).
    #[arg(long)]
    pub file: PathBuf,
    /// Tokens per chunk; each chunk is scored over its second half.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many chunks (default: as many as the text holds).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Split the model into this many in-process stages.
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// Save this model's distributions at every scored position, as the base that a
    /// later run's `--kl-base` compares with (2 bytes per vocabulary entry per position).
    #[arg(long, conflicts_with = "kl_base")]
    pub save_logits: Option<PathBuf>,
    /// Compare with the base saved by `--save-logits` (same text, --ctx and vocabulary):
    /// KL divergence, and how often both pick the same top token.
    #[arg(long)]
    pub kl_base: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The start of a base file, then its version.
const MAGIC: &[u8; 16] = b"strata-kl-base\0\0";
const VERSION: u32 = 1;

/// A base file's header: what the distributions after it belong to.
#[derive(Debug, PartialEq)]
struct BaseHeader {
    vocab: u32,
    ctx: u32,
    chunks: u32,
    tokens: Vec<u32>,
}

impl BaseHeader {
    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(MAGIC)?;
        for v in [VERSION, self.vocab, self.ctx, self.chunks] {
            out.write_all(&v.to_le_bytes())?;
        }
        for t in &self.tokens {
            out.write_all(&t.to_le_bytes())?;
        }
        Ok(())
    }

    fn read(input: &mut impl Read, path: &Path) -> anyhow::Result<Self> {
        let mut magic = [0u8; 16];
        input
            .read_exact(&mut magic)
            .with_context(|| format!("{}: too short for a base file", path.display()))?;
        if &magic != MAGIC {
            bail!(
                "{} is not a base file of `strata perplexity --save-logits`",
                path.display()
            );
        }
        let mut word = || -> anyhow::Result<u32> {
            let mut b = [0u8; 4];
            input
                .read_exact(&mut b)
                .with_context(|| format!("{}: truncated header", path.display()))?;
            Ok(u32::from_le_bytes(b))
        };
        let version = word()?;
        if version != VERSION {
            bail!(
                "{}: base file version {version}, this strata reads {VERSION}: save it again",
                path.display()
            );
        }
        let (vocab, ctx, chunks) = (word()?, word()?, word()?);
        let count = (ctx as usize)
            .checked_mul(chunks as usize)
            .filter(|&n| n <= 1 << 28)
            .with_context(|| format!("{}: implausible header", path.display()))?;
        let tokens = (0..count).map(|_| word()).collect::<anyhow::Result<_>>()?;
        Ok(BaseHeader {
            vocab,
            ctx,
            chunks,
            tokens,
        })
    }
}

/// The f16 bits of one row of log-probabilities.
fn write_row(out: &mut impl Write, row: &[f32]) -> std::io::Result<()> {
    let bytes: Vec<u8> = row
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    out.write_all(&bytes)
}

fn read_row(input: &mut impl Read, row: &mut [f32], path: &Path) -> anyhow::Result<()> {
    let mut bytes = vec![0u8; row.len() * 2];
    input.read_exact(&mut bytes).with_context(|| {
        format!(
            "{}: ends before this run's last position: was it saved with fewer chunks?",
            path.display()
        )
    })?;
    for (v, b) in row.iter_mut().zip(bytes.chunks_exact(2)) {
        *v = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
    Ok(())
}

pub fn run(a: PerplexityArgs) -> anyhow::Result<()> {
    if a.ctx < 8 {
        bail!(
            "--ctx {} is too short: use at least 8 tokens per chunk",
            a.ctx
        );
    }
    let file =
        ModelFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let tokenizer = Tokenizer::for_model(&file)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {} (it must be UTF-8 text)", a.file.display()))?;
    let mut tokens = tokenizer.encode(&text, false)?;
    let adds_bos = tokenizer.encode("a", true)?.len() > tokenizer.encode("a", false)?.len();
    let mut pipeline = LocalPipeline::load(&file, a.stages, &Device::Cpu)?;
    if a.ctx > pipeline.context_length() {
        bail!(
            "--ctx {} is longer than the model's context of {} tokens",
            a.ctx,
            pipeline.context_length()
        );
    }
    let available = tokens.len() / a.ctx;
    let chunks = a.chunks.map_or(available, |c| c.min(available));
    if chunks == 0 {
        bail!(
            "{} holds {} tokens, fewer than one chunk of --ctx {}: use a longer text or a smaller --ctx",
            a.file.display(),
            tokens.len(),
            a.ctx
        );
    }
    tokens.truncate(chunks * a.ctx);
    if let (true, Some(bos)) = (adds_bos, tokenizer.bos()) {
        for chunk in tokens.chunks_mut(a.ctx) {
            chunk[0] = bos;
        }
    }
    let vocab = file.config().vocab_size;
    let header = BaseHeader {
        vocab: vocab as u32,
        ctx: a.ctx as u32,
        chunks: chunks as u32,
        tokens: tokens.clone(),
    };
    let mut save = match &a.save_logits {
        Some(path) => {
            let mut out = BufWriter::new(
                File::create(path).with_context(|| format!("creating {}", path.display()))?,
            );
            header.write(&mut out)?;
            Some(out)
        }
        None => None,
    };
    let mut base = match &a.kl_base {
        Some(path) => Some((open_base(path, &header)?, path.clone())),
        None => None,
    };
    let first = a.ctx / 2;
    let mut scores = Scores::default();
    let mut base_row = vec![0f32; vocab];
    let started = Instant::now();
    for (i, chunk) in tokens.chunks(a.ctx).enumerate() {
        let seq = pipeline.create_sequence();
        let logits = pipeline.score(seq, 0, chunk);
        pipeline.free_sequence(seq);
        let logits = logits?.to_dtype(candle_core::DType::F32)?;
        for j in first..a.ctx - 1 {
            let mut row = logits.get(j)?.to_vec1::<f32>()?;
            log_softmax(&mut row);
            if let Some(out) = &mut save {
                write_row(out, &row)?;
            }
            let compared = match &mut base {
                Some((input, path)) => {
                    read_row(input, &mut base_row, path)?;
                    Some(base_row.as_slice())
                }
                None => None,
            };
            scores.add(&row, chunk[j + 1], compared);
        }
        if !a.json {
            let (ppl, _) = scores.perplexity();
            eprint!("[{}]{ppl:.4} ", i + 1);
        }
    }
    if let Some(out) = &mut save {
        out.flush()?;
    }
    report(&a, &scores, chunks, started.elapsed().as_secs_f64())
}

/// Opens a base file and checks it belongs to this run: same vocabulary, chunk length
/// and tokens (so the same text and tokenizer), at least as many chunks.
fn open_base(path: &Path, run: &BaseHeader) -> anyhow::Result<BufReader<File>> {
    let mut input =
        BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let saved = BaseHeader::read(&mut input, path)?;
    if saved.vocab != run.vocab {
        bail!(
            "{} was saved for a vocabulary of {} tokens, this model has {}",
            path.display(),
            saved.vocab,
            run.vocab
        );
    }
    if saved.ctx != run.ctx {
        bail!(
            "{} was saved with --ctx {}: pass the same here (not {})",
            path.display(),
            saved.ctx,
            run.ctx
        );
    }
    if saved.chunks < run.chunks || saved.tokens[..run.tokens.len()] != run.tokens[..] {
        bail!(
            "{} was saved for other text (or fewer chunks, or another tokenizer): its tokens differ from this run's",
            path.display()
        );
    }
    Ok(input)
}

fn report(a: &PerplexityArgs, scores: &Scores, chunks: usize, seconds: f64) -> anyhow::Result<()> {
    let (ppl, ppl_err) = scores.perplexity();
    if a.json {
        let json = serde_json::json!({
            "model": a.model,
            "file": a.file,
            "ctx": a.ctx,
            "chunks": chunks,
            "positions": scores.positions(),
            "perplexity": ppl,
            "perplexity_stderr": ppl_err,
            "kl_divergence": scores.kl().map(|k| k.0),
            "kl_divergence_stderr": scores.kl().map(|k| k.1),
            "same_top_token": scores.same_top(),
            "seconds": seconds,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    eprintln!();
    println!(
        "perplexity      {ppl:.4} ± {ppl_err:.4}  ({} positions in {chunks} chunks of {}, {seconds:.1} s)",
        scores.positions(),
        a.ctx
    );
    if let (Some((kl, kl_err)), Some(same)) = (scores.kl(), scores.same_top()) {
        println!("KL divergence   {kl:.6} ± {kl_err:.6}");
        println!("same top token  {:.2} %", same * 100.0);
    }
    Ok(())
}
