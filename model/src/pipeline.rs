//! K stages of one model in one process, run one after another exactly as the cluster runs
//! them across machines, and the generation loop over them (prefill in chunks, then batched
//! decode of every live sequence in one forward per step).

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::draft::{DraftLength, Drafter, Drafts};
use crate::error::{Error, Result};
use crate::format::ModelFile;
use crate::kv::{KvCache, SeqId};
use crate::model::{Chunk, LogitRows, Slice, Stage, StageInput, StageOutput};
use crate::sampler::{Sampled, Sampler, SamplingParams};
use crate::wire::WireType;

/// Default longest run of prompt tokens sent through the stages in one forward; longer
/// prompts are prefilled in several chunks, which bounds the activations' memory (the
/// attention scores still grow with the context: `[heads, chunk, context]`).
pub const PREFILL_CHUNK: usize = 512;

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt, already tokenized.
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Stop at the model's end-of-sequence tokens (default true; benchmarks turn it off).
    pub stop_at_eos: bool,
}

impl GenerateRequest {
    /// A greedy request.
    pub fn greedy(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        GenerateRequest {
            prompt_ids,
            max_tokens,
            sampling: SamplingParams::default(),
            stop_at_eos: true,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence or stop token was sampled.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (the stop token included when one ended generation).
    pub tokens: Vec<u32>,
    /// Per generated token, what the sampler reported.
    pub sampled: Vec<Sampled>,
    /// Logits of the prompt's last position.
    pub prompt_logits: Vec<f32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Time to process the prompt (to the first token).
    pub prefill: Duration,
    /// Time spent generating after the first token.
    pub decode: Duration,
}

/// What speculative decoding's drafts came to in one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftCounts {
    /// Drafts verified.
    pub drafted: usize,
    /// Of those, the ones kept.
    pub accepted: usize,
    /// Forwards that gave tokens (the prompt's last, then each step).
    pub passes: usize,
}

/// Stages of one model, each with its KV cache, run in order.
#[derive(Debug)]
pub struct LocalPipeline {
    stages: Vec<(Stage, KvCache)>,
    next_seq: SeqId,
    eos: Vec<u32>,
    prefill_chunk: usize,
    wire: WireType,
}

impl LocalPipeline {
    /// Splits the model into `stages` even slices and loads each.
    pub fn load(file: &ModelFile, stages: usize, device: &Device) -> Result<Self> {
        let slices = Slice::split_even(file.config().num_layers, stages)?;
        Self::from_slices(file, slices, device)
    }

    /// Loads the given slices, which must cover the model contiguously.
    pub fn from_slices(file: &ModelFile, slices: Vec<Slice>, device: &Device) -> Result<Self> {
        let mut stages = Vec::with_capacity(slices.len());
        let mut expected_start = 0;
        for slice in slices {
            if slice.layers.start != expected_start {
                return Err(Error::InvalidBatch(format!(
                    "slices are not contiguous: expected one starting at layer {expected_start}, got {:?}",
                    slice.layers
                )));
            }
            expected_start = slice.layers.end;
            let stage = Stage::load(file, slice, device)?;
            let cache = stage.new_cache();
            stages.push((stage, cache));
        }
        if expected_start != file.config().num_layers {
            return Err(Error::InvalidBatch(format!(
                "slices end at layer {expected_start} of {}",
                file.config().num_layers
            )));
        }
        Ok(LocalPipeline {
            stages,
            next_seq: 1,
            eos: file.config().eos_token_ids.clone(),
            prefill_chunk: PREFILL_CHUNK,
            wire: WireType::F32,
        })
    }

    /// The loaded stages.
    pub fn stages(&self) -> impl Iterator<Item = &Stage> {
        self.stages.iter().map(|(s, _)| s)
    }

    /// Rounds the activations between stages to `wire`, as a cluster with that wire type
    /// does (default F32: exact).
    pub fn set_wire(&mut self, wire: WireType) {
        self.wire = wire;
    }

    /// Sets the longest prompt chunk per forward (at least 1).
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens.max(1);
    }

    /// Adds end-of-sequence ids (e.g. the tokenizer's) to those of the config.
    pub fn add_eos(&mut self, ids: &[u32]) {
        for &id in ids {
            if !self.eos.contains(&id) {
                self.eos.push(id);
            }
        }
    }

    /// Positions the model can hold.
    pub fn context_length(&self) -> usize {
        self.stages[0].0.config().max_position_embeddings
    }

    /// Starts a sequence on every stage.
    pub fn create_sequence(&mut self) -> SeqId {
        let seq = self.next_seq;
        self.next_seq += 1;
        for (_, cache) in &mut self.stages {
            cache.create(seq);
        }
        seq
    }

    /// Frees a sequence on every stage.
    pub fn free_sequence(&mut self, seq: SeqId) {
        for (_, cache) in &mut self.stages {
            cache.free(seq);
        }
    }

    /// Runs one batch through every stage and returns the last stage's logits, one row per
    /// chunk. If a stage fails, the stages before it forget the batch's positions.
    pub fn forward(&mut self, chunks: &[Chunk], tokens: Vec<u32>) -> Result<Tensor> {
        self.forward_scoring(chunks, tokens, LogitRows::LastOfEachChunk)
    }

    /// Runs `tokens` as the next chunk of `seq` and returns the logits after each of them
    /// (`[tokens, vocab]`): how a text is scored.
    pub fn score(&mut self, seq: SeqId, start: usize, tokens: &[u32]) -> Result<Tensor> {
        let chunk = Chunk {
            seq,
            start,
            len: tokens.len(),
        };
        self.forward_scoring(&[chunk], tokens.to_vec(), LogitRows::Every)
    }

    fn forward_scoring(
        &mut self,
        chunks: &[Chunk],
        tokens: Vec<u32>,
        rows: LogitRows,
    ) -> Result<Tensor> {
        let mut input = StageInput::Tokens(tokens);
        for i in 0..self.stages.len() {
            let (stage, cache) = &mut self.stages[i];
            match stage.forward_scoring(chunks, input, cache, rows.clone()) {
                Ok(StageOutput::Hidden(h)) => input = StageInput::Hidden(self.wire.round_trip(&h)?),
                Ok(StageOutput::Logits(l)) => return Ok(l),
                Err(e) => {
                    // Earlier stages already cached these positions: forget them so the
                    // sequences stay consistent across stages and can be retried.
                    for (_, cache) in &mut self.stages[..i] {
                        for c in chunks {
                            cache.truncate(c.seq, c.start)?;
                        }
                    }
                    return Err(e);
                }
            }
        }
        Err(Error::InvalidBatch(
            "the last stage produced no logits".into(),
        ))
    }

    /// Feeds a whole prompt (in chunks of at most `prefill_chunk`) and returns the last
    /// logits.
    fn prefill(&mut self, seq: SeqId, prompt: &[u32]) -> Result<Vec<f32>> {
        let mut logits = None;
        let size = self.prefill_chunk;
        for (i, piece) in prompt.chunks(size).enumerate() {
            let chunk = Chunk {
                seq,
                start: i * size,
                len: piece.len(),
            };
            logits = Some(self.forward(&[chunk], piece.to_vec())?);
        }
        let logits = logits.ok_or_else(|| Error::InvalidBatch("empty prompt".into()))?;
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    }

    /// Generates for one request, calling `on_token` as each token is sampled.
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        mut on_token: impl FnMut(&Sampled),
    ) -> Result<Generation> {
        let mut results = self.generate_batch(std::slice::from_ref(request), |_, s| on_token(s))?;
        results
            .pop()
            .ok_or_else(|| Error::InvalidBatch("no result".into()))
    }

    /// Generates for several requests at once: prompts are prefilled one by one, then every
    /// live sequence advances by one token per batched forward.
    pub fn generate_batch(
        &mut self,
        requests: &[GenerateRequest],
        mut on_token: impl FnMut(usize, &Sampled),
    ) -> Result<Vec<Generation>> {
        struct Live {
            seq: SeqId,
            sampler: Sampler,
            history: Vec<u32>,
            result: Generation,
            done: bool,
            started: Instant,
        }
        let context = self.context_length();
        let mut live = Vec::with_capacity(requests.len());
        for r in requests {
            if r.prompt_ids.is_empty() {
                return Err(Error::InvalidBatch("the prompt has no tokens".into()));
            }
            if r.prompt_ids.len() >= context {
                return Err(Error::ContextOverflow {
                    requested: r.prompt_ids.len() + 1,
                    context,
                });
            }
            live.push(Live {
                seq: 0,
                sampler: Sampler::new(r.sampling.clone())?,
                history: r.prompt_ids.clone(),
                result: Generation {
                    tokens: Vec::new(),
                    sampled: Vec::new(),
                    prompt_logits: Vec::new(),
                    finish: FinishReason::Length,
                    prefill: Duration::ZERO,
                    decode: Duration::ZERO,
                },
                done: r.max_tokens == 0,
                started: Instant::now(),
            });
        }
        let outcome = (|| -> Result<()> {
            for (i, (l, r)) in live.iter_mut().zip(requests).enumerate() {
                l.seq = self.create_sequence();
                let t0 = Instant::now();
                let logits = self.prefill(l.seq, &r.prompt_ids)?;
                l.result.prefill = t0.elapsed();
                l.started = Instant::now();
                l.result.prompt_logits = logits;
                if !l.done {
                    let s = l.sampler.sample(&l.result.prompt_logits, &l.history)?;
                    self.accept(
                        &mut l.history,
                        &mut l.result,
                        &mut l.done,
                        s,
                        r,
                        i,
                        &mut on_token,
                    );
                }
            }
            let decode_start = Instant::now();
            for l in &mut live {
                l.started = decode_start;
            }
            loop {
                let active: Vec<usize> = (0..live.len()).filter(|&i| !live[i].done).collect();
                if active.is_empty() {
                    return Ok(());
                }
                let chunks: Vec<Chunk> = active
                    .iter()
                    .map(|&i| Chunk {
                        seq: live[i].seq,
                        start: live[i].history.len() - 1,
                        len: 1,
                    })
                    .collect();
                let tokens: Vec<u32> = active
                    .iter()
                    .map(|&i| *live[i].history.last().unwrap_or(&0))
                    .collect();
                let logits = self.forward(&chunks, tokens)?.to_vec2::<f32>()?;
                for (row, &i) in logits.iter().zip(&active) {
                    let l = &mut live[i];
                    let s = l.sampler.sample(row, &l.history)?;
                    self.accept(
                        &mut l.history,
                        &mut l.result,
                        &mut l.done,
                        s,
                        &requests[i],
                        i,
                        &mut on_token,
                    );
                    if l.done {
                        l.result.decode = l.started.elapsed();
                    }
                }
            }
        })();
        for l in &live {
            self.free_sequence(l.seq);
        }
        outcome?;
        Ok(live.into_iter().map(|l| l.result).collect())
    }

    /// Generates for one request with speculative decoding: each forward runs the last
    /// token and what `drafter` proposes after it (at most `most`, adapting as the
    /// cluster's sequences do), and keeps the drafts the sampler judges it would have
    /// given ([`Sampler::sample_drafts`]): the tokens are [`LocalPipeline::generate`]'s,
    /// greedy or with drafts chosen without chance, and have their distribution when a
    /// draft model draws drafts at random for a sampled answer.
    pub fn generate_drafted(
        &mut self,
        request: &GenerateRequest,
        drafter: &mut dyn Drafter,
        most: usize,
        mut on_token: impl FnMut(&Sampled),
    ) -> Result<(Generation, DraftCounts)> {
        let context = self.context_length();
        if request.prompt_ids.is_empty() {
            return Err(Error::InvalidBatch("the prompt has no tokens".into()));
        }
        if request.prompt_ids.len() >= context {
            return Err(Error::ContextOverflow {
                requested: request.prompt_ids.len() + 1,
                context,
            });
        }
        let mut sampler = Sampler::new(request.sampling.clone())?;
        let mut result = Generation {
            tokens: Vec::new(),
            sampled: Vec::new(),
            prompt_logits: Vec::new(),
            finish: FinishReason::Length,
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
        };
        let mut counts = DraftCounts::default();
        let seq = self.create_sequence();
        let mut on_token = |_: usize, s: &Sampled| on_token(s);
        let outcome = (|| -> Result<()> {
            let t0 = Instant::now();
            result.prompt_logits = self.prefill(seq, &request.prompt_ids)?;
            result.prefill = t0.elapsed();
            let mut history = request.prompt_ids.clone();
            let mut done = request.max_tokens == 0;
            if !done {
                let s = sampler.sample(&result.prompt_logits, &history)?;
                counts.passes += 1;
                self.accept(
                    &mut history,
                    &mut result,
                    &mut done,
                    s,
                    request,
                    0,
                    &mut on_token,
                );
            }
            let decode_start = Instant::now();
            let mut length = DraftLength::new(4, most);
            while !done {
                let left = request.max_tokens - result.tokens.len();
                let most_now = length.get().min(left - 1).min(context - history.len());
                let pass_start = Instant::now();
                let mut drafts = drafter.propose_for(&history, most_now, &sampler);
                drafts.truncate(most_now);
                let sampled = self.verify(seq, &history, &drafts, &mut sampler)?;
                let accepted = sampled.len() - 1;
                counts.passes += 1;
                counts.drafted += drafts.len();
                counts.accepted += accepted;
                length.after(drafts.len(), accepted, pass_start.elapsed());
                for (s, _) in sampled {
                    self.accept(
                        &mut history,
                        &mut result,
                        &mut done,
                        s,
                        request,
                        0,
                        &mut on_token,
                    );
                    if done {
                        break;
                    }
                }
                // The caches hold the drafts the sampler did not keep: drop them (the
                // last accepted token goes in with the next forward).
                for (_, cache) in &mut self.stages {
                    cache.truncate(seq, history.len() - 1)?;
                }
            }
            result.decode = decode_start.elapsed();
            Ok(())
        })();
        self.free_sequence(seq);
        outcome?;
        Ok((result, counts))
    }

    /// One pass of drafted decoding: the history's last token and `drafts` through every
    /// stage, then the tokens the sampler keeps ([`Sampler::sample_drafts`]).
    fn verify(
        &mut self,
        seq: SeqId,
        history: &[u32],
        drafts: &Drafts,
        sampler: &mut Sampler,
    ) -> Result<Vec<(Sampled, u64)>> {
        let start = history.len() - 1;
        let mut tokens = vec![history[start]];
        tokens.extend(&drafts.tokens);
        let chunk = Chunk {
            seq,
            start,
            len: tokens.len(),
        };
        let rows = LogitRows::LastOf(vec![tokens.len()]);
        let logits = self
            .forward_scoring(&[chunk], tokens, rows)?
            .to_vec2::<f32>()?;
        let rows: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
        sampler.sample_drafts(
            &rows,
            &drafts.tokens,
            &drafts.drawn_from,
            &mut history.to_vec(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn accept(
        &self,
        history: &mut Vec<u32>,
        result: &mut Generation,
        done: &mut bool,
        sampled: Sampled,
        request: &GenerateRequest,
        index: usize,
        on_token: &mut impl FnMut(usize, &Sampled),
    ) {
        let token = sampled.token;
        on_token(index, &sampled);
        history.push(token);
        result.tokens.push(token);
        result.sampled.push(sampled);
        let stop = (request.stop_at_eos && self.eos.contains(&token))
            || request.sampling.stop_token_ids.contains(&token);
        if stop {
            result.finish = FinishReason::Stop;
            *done = true;
        } else if result.tokens.len() >= request.max_tokens
            || history.len() >= self.context_length()
        {
            result.finish = FinishReason::Length;
            *done = true;
        }
    }
}
