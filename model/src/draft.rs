//! Drafts for speculative decoding: tokens likely to follow a history, proposed cheaply so
//! the model can verify several in one forward ([`Sampler::sample_drafts`]).
//!
//! Two drafters: [`NgramDrafter`] looks the history's last few tokens up earlier in the
//! history and proposes what followed them there (prompt lookup: no model, and strong
//! where an answer quotes, repeats or edits its prompt); [`ModelDrafter`] runs a small
//! model that shares the main model's vocabulary ([`check_vocabularies`]).
//!
//! Whatever the drafts, the answer's tokens have the distribution plain decoding gives them
//! ([`Sampler::sample_drafts`]): greedy answers and prompt lookup's drafts keep only
//! drafts that are the token the model samples there itself, so the tokens are plain
//! decoding's, draw for draw. For a sampled answer a model drafter draws its guesses at
//! random, with the answer's settings, from the draft model's distribution
//! ([`Drafter::propose_for`]), and each step carries what each guess was drawn from, for
//! the last stage to judge by the standard rejection rule: the most drafts any rule can
//! keep, at the price of tokens that are the model's in distribution but not the ones a
//! seed gives without drafts.
//!
//! [`Sampler::sample_drafts`]: crate::Sampler::sample_drafts

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;

use crate::error::{Error, Result};
use crate::format::ModelFile;
use crate::kv::{KvCache, SeqId};
use crate::model::{Chunk, Slice, Stage, StageInput, StageOutput};
use crate::sampler::{apply_repeat_penalty, argmax, Proposal, Sampler};
use crate::tokenizer::Tokenizer;

mod length;
pub use length::DraftLength;

/// Proposes tokens to verify.
pub trait Drafter: Send + std::fmt::Debug {
    /// Up to `max` tokens that may follow `history` (fewer, or none, when it has no good
    /// guess).
    fn propose(&mut self, history: &[u32], max: usize) -> Vec<u32>;

    /// As [`Drafter::propose`], for an answer that `sampler` (the model's sampler, where
    /// it stands after `history`) samples. A drafter that scores tokens draws each guess
    /// at random with its settings ([`Sampler::for_drafts`]) and says what it drew from.
    /// One that does not (prompt lookup) proposes as for greedy answers.
    fn propose_for(&mut self, history: &[u32], max: usize, sampler: &Sampler) -> Drafts {
        let _ = sampler;
        Drafts::chosen(self.propose(history, max))
    }
}

/// One step's drafts, and what each was drawn from when drawn at random.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Drafts {
    /// The tokens, in order.
    pub tokens: Vec<u32>,
    /// One [`Proposal`] per token, or none for drafts chosen without chance.
    pub drawn_from: Vec<Proposal>,
}

impl Drafts {
    /// Drafts chosen without chance (greedy, or prompt lookup).
    pub fn chosen(tokens: Vec<u32>) -> Self {
        Drafts {
            tokens,
            drawn_from: Vec::new(),
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Keeps the first `n`.
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.drawn_from.truncate(n);
    }
}

/// Prompt-lookup drafting: the continuation of the most recent earlier occurrence of the
/// history's last `n` tokens, trying the longest `n` first.
#[derive(Debug, Clone)]
pub struct NgramDrafter {
    longest: usize,
    shortest: usize,
}

impl NgramDrafter {
    /// Matches of 4 down to 2 tokens: one token matches too often by chance to be worth
    /// a verification row.
    pub fn new() -> Self {
        NgramDrafter {
            longest: 4,
            shortest: 2,
        }
    }
}

impl Default for NgramDrafter {
    fn default() -> Self {
        Self::new()
    }
}

impl Drafter for NgramDrafter {
    fn propose(&mut self, history: &[u32], max: usize) -> Vec<u32> {
        if max == 0 {
            return Vec::new();
        }
        for n in (self.shortest..=self.longest).rev() {
            if history.len() <= n {
                continue;
            }
            let tail = &history[history.len() - n..];
            // The most recent earlier occurrence: what followed it is the freshest guess.
            let found = (0..history.len() - n)
                .rev()
                .find(|&at| &history[at..at + n] == tail);
            if let Some(at) = found {
                let from = at + n;
                let to = (from + max).min(history.len());
                return history[from..to].to_vec();
            }
        }
        Vec::new()
    }
}

/// A small model that shares the main model's vocabulary, run on this machine (greedily
/// for greedy answers, drawing at random with a sampled answer's settings),
/// with a KV cache of its own per sequence that follows the history (drafts it proposed
/// that were not accepted are dropped from it before the next proposal).
#[derive(Debug)]
pub struct ModelDrafter {
    stage: Arc<Stage>,
    cache: KvCache,
    /// The tokens its cache holds, in order.
    cached: Vec<u32>,
    /// Most positions one forward takes when catching up with a long history.
    chunk: usize,
    /// Most positions of history one proposal feeds before it drafts: further behind, it
    /// feeds that many and drafts nothing this time.
    catch_up: usize,
    /// The answer's repeat penalty and its window: drafts that the penalty would demote
    /// are drafts the model would not keep.
    penalty: (f32, usize),
    /// Token ids below this are the main model's too: drafts are drawn among them only.
    vocabulary: usize,
}

/// The one sequence a drafter's cache holds.
const DRAFT_SEQ: SeqId = 0;

/// Rows a draft model's forward runs on its own thread, not the compute pool: a few rows'
/// matmuls are over sooner than the pool's threads wake.
const FEW_ROWS: usize = 8;

impl ModelDrafter {
    /// A drafter over a whole small model: one stage from the embedding to the head
    /// (a slice of one would give no logits, and so no drafts).
    pub fn new(stage: Arc<Stage>) -> Self {
        let mut cache = stage.new_cache();
        cache.create(DRAFT_SEQ);
        ModelDrafter {
            stage,
            cache,
            cached: Vec::new(),
            chunk: crate::pipeline::PREFILL_CHUNK,
            catch_up: usize::MAX,
            penalty: (1.0, 0),
            vocabulary: usize::MAX,
        }
    }

    /// Catches up at most `positions` of history per proposal, drafting nothing until it
    /// has: where drafting shares a thread with other answers' steps (the last stage's), a
    /// long prompt or a replay is caught up a piece per step rather than holding every
    /// other answer up at once.
    pub fn catching_up_by(mut self, positions: usize) -> Self {
        self.catch_up = positions.max(1);
        self
    }

    /// Allocates its cache for `positions` (the answer's reservation) at once: it never
    /// doubles past what was counted for it.
    pub fn reserving(mut self, positions: usize) -> Self {
        self.cache.create_with_capacity(DRAFT_SEQ, positions);
        self.cached.clear();
        self
    }

    /// Drafts only tokens below `vocabulary`: those the main model shares
    /// ([`DraftModel::drafter`]). A draft model with padding tokens past the main model's
    /// vocabulary would otherwise propose ids that model has no embedding for.
    pub fn within_vocabulary(mut self, vocabulary: usize) -> Self {
        self.vocabulary = vocabulary;
        self
    }

    /// Drafts with the answer's repeat penalty (`repeat_penalty` over the last `window`
    /// tokens, as [`crate::SamplingParams`] says), so they are the tokens the penalised
    /// model is likelier to pick.
    pub fn with_repeat_penalty(mut self, repeat_penalty: f32, window: usize) -> Self {
        self.penalty = (repeat_penalty, window);
        self
    }

    /// The most likely token after `seen`, with the repeat penalty.
    fn pick(&self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let (penalty, window) = self.penalty;
        apply_repeat_penalty(logits, seen, penalty, window);
        argmax(logits)
    }

    /// Feeds `tokens` after what the cache holds; the logits after the last of them.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut last = None;
        for piece in tokens.chunks(self.chunk) {
            let chunk = Chunk {
                seq: DRAFT_SEQ,
                start: self.cached.len(),
                len: piece.len(),
            };
            let out = self.stage.forward(
                &[chunk],
                StageInput::Tokens(piece.to_vec()),
                &mut self.cache,
            )?;
            self.cached.extend(piece);
            last = Some(out);
        }
        match last {
            Some(StageOutput::Logits(l)) => Ok(l.squeeze(0)?.to_vec1::<f32>()?),
            _ => Err(Error::Draft(
                "it gave no logits: is it loaded whole?".into(),
            )),
        }
    }

    /// Up to `max` drafts after `history`: each the most likely token (with the repeat
    /// penalty), or, given the answer's sampler, one drawn at random with its settings.
    fn try_propose(
        &mut self,
        history: &[u32],
        max: usize,
        sampler: Option<&Sampler>,
    ) -> Result<Drafts> {
        let context = self.stage.config().max_position_embeddings;
        let room = context.saturating_sub(history.len());
        let max = max.min(room);
        if max == 0 || history.is_empty() {
            return Ok(Drafts::default());
        }
        // Keep what the cache shares with the history, less one position: the last shared
        // token is fed again so there are logits to start from.
        let shared = self
            .cached
            .iter()
            .zip(history)
            .take_while(|(a, b)| a == b)
            .count()
            .min(history.len() - 1);
        self.cache.truncate(DRAFT_SEQ, shared)?;
        self.cached.truncate(shared);
        let behind = &history[shared..];
        if behind.len() > self.catch_up {
            self.feed_on_pool(&behind[..self.catch_up])?;
            return Ok(Drafts::default());
        }
        let logits = self.feed_on_pool(behind)?;
        crate::kernels::alone(|| self.draft_after(logits, history, max, sampler))
    }

    /// Feeds `tokens`: a long run of them on the compute pool, a few on this thread alone
    /// (a draft model's forward of a few rows is over before the pool's threads wake).
    fn feed_on_pool(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.len() > FEW_ROWS {
            self.feed(tokens)
        } else {
            crate::kernels::alone(|| self.feed(tokens))
        }
    }

    /// Up to `max` drafts, the first from `logits`, the logits after `history`.
    fn draft_after(
        &mut self,
        mut logits: Vec<f32>,
        history: &[u32],
        max: usize,
        sampler: Option<&Sampler>,
    ) -> Result<Drafts> {
        let mut drafts = Drafts::default();
        let mut draw = sampler.map(Sampler::for_drafts);
        let mut seen = history.to_vec();
        loop {
            logits.truncate(self.vocabulary);
            let token = match &mut draw {
                Some(draw) => {
                    let (token, drawn_from) = draw.propose(&logits, &seen)?;
                    drafts.drawn_from.push(drawn_from);
                    token
                }
                None => self.pick(&mut logits, &seen),
            };
            seen.push(token);
            drafts.tokens.push(token);
            if drafts.len() == max {
                break;
            }
            logits = self.feed(&[token])?;
        }
        // Greedy settings draw nothing at random: the drafts were chosen without chance.
        if drafts.drawn_from.iter().all(Vec::is_empty) {
            drafts.drawn_from.clear();
        }
        Ok(drafts)
    }
}

impl ModelDrafter {
    fn propose_or_nothing(
        &mut self,
        history: &[u32],
        max: usize,
        sampler: Option<&Sampler>,
    ) -> Drafts {
        match self.try_propose(history, max, sampler) {
            Ok(drafts) => drafts,
            Err(e) => {
                // A draft is only a guess: without one the step verifies nothing, and the
                // answer goes on at plain speed. Start the cache over next time.
                tracing::warn!("the draft model failed, drafting nothing this step: {e}");
                self.cache.free(DRAFT_SEQ);
                self.cache.create(DRAFT_SEQ);
                self.cached.clear();
                Drafts::default()
            }
        }
    }
}

impl Drafter for ModelDrafter {
    fn propose(&mut self, history: &[u32], max: usize) -> Vec<u32> {
        self.propose_or_nothing(history, max, None).tokens
    }

    fn propose_for(&mut self, history: &[u32], max: usize, sampler: &Sampler) -> Drafts {
        self.propose_or_nothing(history, max, Some(sampler))
    }
}

/// A whole draft model, loaded on the CPU, and how much of its vocabulary is the main
/// model's.
#[derive(Debug, Clone)]
pub struct DraftModel {
    stage: Arc<Stage>,
    shared_vocabulary: usize,
}

impl DraftModel {
    /// A whole draft model loaded as one `stage`, of whose token ids the main model shares
    /// the first `shared_vocabulary` (a worker that receives one: the coordinator checked
    /// the tokenizers).
    pub fn new(stage: Stage, shared_vocabulary: usize) -> Self {
        DraftModel {
            stage: Arc::new(stage),
            shared_vocabulary,
        }
    }

    /// Bytes of its weights in memory.
    pub fn weight_bytes(&self) -> u64 {
        self.stage.weight_bytes()
    }

    /// A drafter for one answer, drafting only tokens the main model shares.
    pub fn drafter(&self) -> ModelDrafter {
        ModelDrafter::new(self.stage.clone()).within_vocabulary(self.shared_vocabulary)
    }
}

/// Loads a whole draft model on the CPU, after checking that its tokenizer is the main
/// model's (`tokenizer`).
pub fn load_draft_model(path: &Path, tokenizer: &Tokenizer) -> Result<DraftModel> {
    let file = ModelFile::open(path)?;
    let draft_tokenizer = Tokenizer::for_model(&file)?;
    check_vocabularies(tokenizer, &draft_tokenizer)?;
    let slice = Slice::full(file.config().num_layers);
    Ok(DraftModel {
        stage: Arc::new(Stage::load(&file, slice, &Device::Cpu)?),
        shared_vocabulary: tokenizer.vocab_size().min(draft_tokenizer.vocab_size()),
    })
}

/// Checks that a draft model's tokenizer speaks the main model's vocabulary: the same
/// text for every token id below the smaller vocabulary's size, and the same
/// end-of-sequence tokens. (llama.cpp allows a size difference for padding tokens at the
/// end, as this does.)
pub fn check_vocabularies(main: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let shared = main.vocab_size().min(draft.vocab_size());
    let larger = main.vocab_size().max(draft.vocab_size());
    if larger - shared > 128 {
        return Err(Error::Draft(format!(
            "its vocabulary has {} tokens and the main model's {}: a draft \
             model must share the main model's tokenizer",
            draft.vocab_size(),
            main.vocab_size()
        )));
    }
    if let Some(id) = (0..shared as u32).find(|&id| main.id_to_token(id) != draft.id_to_token(id)) {
        return Err(Error::Draft(format!(
            "token {id} is {:?} to the main model and {:?} to the draft model: a draft model \
             must share the main model's tokenizer",
            main.id_to_token(id).unwrap_or_default(),
            draft.id_to_token(id).unwrap_or_default()
        )));
    }
    if main.eos() != draft.eos() {
        return Err(Error::Draft(format!(
            "it ends sequences with {:?} and the main model with {:?}",
            draft.eos(),
            main.eos()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The logits of a forward of `ids` after `prompt`, through a fresh cache.
    fn logits_after(stage: &Stage, prompt: &[u32], ids: &[u32]) -> Vec<f32> {
        let mut cache = stage.new_cache();
        cache.create(DRAFT_SEQ);
        for (start, piece) in [(0, prompt), (prompt.len(), ids)] {
            let chunk = Chunk {
                seq: DRAFT_SEQ,
                start,
                len: piece.len(),
            };
            let out = stage
                .forward(&[chunk], StageInput::Tokens(piece.to_vec()), &mut cache)
                .unwrap();
            if start > 0 {
                let StageOutput::Logits(l) = out else {
                    panic!("a whole model gives logits")
                };
                return l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            }
        }
        unreachable!()
    }

    /// A random 2-layer model of `arch`, Q8_0, written under `dir`.
    fn tiny_model(dir: &Path, arch: crate::Arch) -> ModelFile {
        use crate::synth::{write_model, SynthDType, SynthFormat, SynthOptions, SynthSpec};
        let mut spec = SynthSpec::tiny(arch);
        spec.layers = 2;
        let opts = SynthOptions {
            format: SynthFormat::Gguf,
            dtype: SynthDType::Quant(candle_core::quantized::GgmlDType::Q8_0),
            shard_bytes: None,
        };
        let name = format!("{arch:?}.gguf");
        let report = write_model(&spec, &opts, &dir.join(name)).unwrap();
        ModelFile::open(&report.path).unwrap()
    }

    #[test]
    fn a_model_drafter_says_what_it_drew_from_only_when_it_drew_at_random() {
        let dir = tempfile::tempdir().unwrap();
        let file = tiny_model(dir.path(), crate::Arch::Llama);
        let stage = Arc::new(Stage::load(&file, Slice::full(2), &Device::Cpu).unwrap());
        let mut drafter = ModelDrafter::new(stage);
        let history = [5, 9, 2, 7, 11];
        let greedy = Sampler::new(crate::SamplingParams::default()).unwrap();
        let chosen = drafter.propose_for(&history, 4, &greedy);
        assert_eq!(chosen, Drafts::chosen(drafter.propose(&history, 4)));
        assert_eq!(chosen.len(), 4);
        let sampled = Sampler::new(crate::SamplingParams {
            temperature: 1.5,
            seed: 1,
            ..Default::default()
        })
        .unwrap();
        let drawn = drafter.propose_for(&history, 4, &sampled);
        assert_eq!((drawn.len(), drawn.drawn_from.len()), (4, 4));
        for (token, q) in drawn.tokens.iter().zip(&drawn.drawn_from) {
            assert!(q.len() <= crate::PROPOSAL_TOKENS && q.len() > 1, "{q:?}");
            assert!(
                q.iter().any(|c| c.0 == *token && c.1 > 0.0),
                "{token}: {q:?}"
            );
        }
        // Within the vocabulary it shares with a main model of 8 tokens, it drafts and
        // draws among those only, greedy or sampled.
        let mut drafter = drafter.within_vocabulary(8);
        let chosen = drafter.propose_for(&history, 4, &greedy);
        let drawn = drafter.propose_for(&history, 4, &sampled);
        assert_eq!((chosen.len(), drawn.len()), (4, 4));
        let named = drawn.drawn_from.iter().flatten().map(|c| c.0);
        let every: Vec<u32> = chosen
            .tokens
            .iter()
            .chain(&drawn.tokens)
            .copied()
            .chain(named)
            .collect();
        assert!(every.iter().all(|&t| t < 8), "{every:?}");
    }

    #[test]
    fn a_drafter_far_behind_catches_up_a_piece_per_proposal_then_drafts_as_one_that_was_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = tiny_model(dir.path(), crate::Arch::Llama);
        let stage = Arc::new(Stage::load(&file, Slice::full(2), &Device::Cpu).unwrap());
        let history: Vec<u32> = (0..23).map(|i| (i * 7 + 3) % 50).collect();
        let mut at_once = ModelDrafter::new(stage.clone());
        let mut by_pieces = ModelDrafter::new(stage).catching_up_by(10).reserving(64);
        // 23 behind: 10, then 10, then the last 3 and the drafts.
        assert_eq!(by_pieces.propose(&history, 4), Vec::<u32>::new());
        assert_eq!(by_pieces.cached.len(), 10);
        assert_eq!(by_pieces.propose(&history, 4), Vec::<u32>::new());
        assert_eq!(by_pieces.cached.len(), 20);
        let drafts = by_pieces.propose(&history, 4);
        assert_eq!(drafts.len(), 4);
        assert_eq!(drafts, at_once.propose(&history, 4));
        // A few tokens behind, it drafts at once.
        let mut longer = history.clone();
        longer.extend(&drafts[..2]);
        assert_eq!(by_pieces.propose(&longer, 3), at_once.propose(&longer, 3));
    }

    #[test]
    fn a_forward_alone_on_its_thread_gives_the_compute_pools_logits_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        // Llama's GGUF rotates neighbouring pairs, Qwen2's the halves' entries.
        for arch in [crate::Arch::Llama, crate::Arch::Qwen2] {
            let file = tiny_model(dir.path(), arch);
            let stage = Stage::load(&file, Slice::full(2), &Device::Cpu).unwrap();
            let prompt = [5, 9, 2, 7, 11];
            // One position and several: the rotary and the matmuls take other paths.
            for ids in [&[3u32][..], &[3, 8, 1, 4]] {
                let pooled = logits_after(&stage, &prompt, ids);
                let alone = crate::kernels::alone(|| logits_after(&stage, &prompt, ids));
                assert_eq!(
                    pooled.len(),
                    file.config().vocab_size,
                    "the last position's"
                );
                assert!(
                    pooled
                        .iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{arch:?}, {} positions",
                    ids.len()
                );
            }
        }
    }

    #[test]
    fn ngram_proposes_what_followed_the_latest_earlier_match_longest_first() {
        let mut d = NgramDrafter::new();
        // "1 2 3" appeared twice before; the later one was followed by 7 8.
        let history = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 2, 3];
        assert_eq!(d.propose(&history, 2), vec![7, 8]);
        assert_eq!(d.propose(&history, 10), vec![7, 8, 9, 2, 3]);
        // A single token never matches alone, and no budget gives nothing.
        assert_eq!(d.propose(&[5, 6, 7, 5], 4), Vec::<u32>::new());
        assert_eq!(d.propose(&history, 0), Vec::<u32>::new());
        // The longest match wins over a more recent shorter one: the tail 9 1 2 3 matches
        // at the start, 2 3 also after 8.
        let history = [9, 1, 2, 3, 4, 8, 2, 3, 5, 9, 1, 2, 3];
        assert_eq!(d.propose(&history, 1), vec![4]);
    }
}
