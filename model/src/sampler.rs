//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repeat
//! penalty over a window, stop tokens, and optional top-n log-probabilities.
//!
//! Pure logic over `&[f32]`: no tensors, no I/O. Each sequence owns its [`Sampler`], whose
//! random state is seeded once, so a given seed yields the same tokens however the model
//! is partitioned. Drafts drawn at random by a draft model ([`Sampler::propose`]) are
//! judged by the rejection rule ([`Sampler::sample_drafts`]): the same distribution, not
//! the same tokens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::kernels::{exp_weights, finite_max};

/// How to pick tokens. Defaults are greedy decoding with no penalty.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (default 0).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `0` disables (default 0).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p`; `1` disables (default 1).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; `0` disables (default 0).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this;
    /// `1` disables (default 1).
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalty looks at (default 64).
    pub repeat_window: usize,
    /// Seed of the random state (default 0).
    pub seed: u64,
    /// Tokens that end generation (in addition to the model's end-of-sequence tokens).
    pub stop_token_ids: Vec<u32>,
    /// Return the log-probabilities of this many most likely tokens at each step (default 0).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_window: 64,
            seed: 0,
            stop_token_ids: Vec::new(),
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values that have no meaning.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Sampling(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if self.top_p.is_nan() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad(format!(
                "repeat_penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        if self.top_logprobs > 20 {
            return bad(format!(
                "top_logprobs must be at most 20, got {}",
                self.top_logprobs
            ));
        }
        Ok(())
    }
}

/// A chosen token, with what was asked about its alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token.
    pub token: u32,
    /// Its log-probability under the unmodified distribution.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, if requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-sequence sampling state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        Self::resume(params, 0)
    }

    /// A sampler seeded from `params.seed` whose random stream continues at
    /// `rng_position` (what [`Sampler::rng_position`] said after the last accepted token):
    /// a sequence moved to another stage picks up exactly where it was.
    pub fn resume(params: SamplingParams, rng_position: u64) -> Result<Self> {
        params.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        rng.set_word_pos(u128::from(rng_position));
        Ok(Sampler { rng, params })
    }

    /// How far the random stream has advanced (in 32-bit words).
    pub fn rng_position(&self) -> u64 {
        u64::try_from(self.rng.get_word_pos()).unwrap_or(u64::MAX)
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, given the tokens so far (`history`, prompt and
    /// generated) for the repeat penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<Sampled> {
        let adjusted = self.penalised(logits, history)?;
        let token = if self.params.temperature == 0.0 {
            argmax(&adjusted)
        } else {
            self.sample_filtered(&adjusted)
        };
        Ok(self.describe(logits, token))
    }

    /// Draws a draft from a draft model's `logits` after `history` as [`Sampler::sample`]
    /// would (the same penalty and filters), but only among the likeliest
    /// [`PROPOSAL_TOKENS`] of what the filters keep, and says what it drew from: what
    /// [`Sampler::sample_drafts`] needs to judge it. Greedy settings pick the likeliest
    /// token, with an empty proposal. Use it on a stream of its own
    /// ([`Sampler::for_drafts`]).
    pub fn propose(&mut self, logits: &[f32], history: &[u32]) -> Result<(u32, Proposal)> {
        let adjusted = self.penalised(logits, history)?;
        if self.params.temperature == 0.0 {
            return Ok((argmax(&adjusted), Vec::new()));
        }
        let mut kept = self.filtered(&adjusted);
        if kept.is_empty() {
            return Ok((argmax(&adjusted), Vec::new()));
        }
        if kept.len() > PROPOSAL_TOKENS {
            kept.select_nth_unstable_by(PROPOSAL_TOKENS - 1, by_weight);
            kept.truncate(PROPOSAL_TOKENS);
        }
        let total: f32 = kept.iter().map(|c| c.1).sum();
        for c in &mut kept {
            c.1 /= total;
        }
        let token = self.draw(&kept);
        Ok((token, kept))
    }

    /// A sampler with these settings for drafting the step that follows where this one
    /// stands: its random stream is its own, independent of this one's (the rejection
    /// rule in [`Sampler::sample_drafts`] needs the draws that make drafts and the draws
    /// that judge them independent), and another for every step, as this one's position
    /// moves on with every token sampled.
    pub fn for_drafts(&self) -> Sampler {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.params.seed.to_le_bytes());
        key[8..16].copy_from_slice(&self.rng_position().to_le_bytes());
        key[16..].copy_from_slice(DRAFT_STREAM);
        Sampler {
            params: self.params.clone(),
            rng: ChaCha8Rng::from_seed(key),
        }
    }

    /// `logits` with the repeat penalty over `history` applied.
    fn penalised(&self, logits: &[f32], history: &[u32]) -> Result<Vec<f32>> {
        if logits.is_empty() {
            return Err(Error::Sampling("empty logits".into()));
        }
        let p = &self.params;
        let mut adjusted = logits.to_vec();
        apply_repeat_penalty(&mut adjusted, history, p.repeat_penalty, p.repeat_window);
        Ok(adjusted)
    }

    /// `token` with its log-probability under the unmodified `logits` and, when asked
    /// for, the most likely tokens': one log-sum-exp, and a sorted list only when asked.
    fn describe(&self, logits: &[f32], token: u32) -> Sampled {
        let lse = log_sum_exp(logits);
        let top = self.params.top_logprobs;
        let top_logprobs = if top > 0 {
            let logprobs: Vec<f32> = logits.iter().map(|l| l - lse).collect();
            top_n(&logprobs, top)
        } else {
            Vec::new()
        };
        Sampled {
            token,
            logprob: logits[token as usize] - lse,
            top_logprobs,
        }
    }

    /// Verifies drafts: `rows[i]` are the logits after the history's `i`-th draft position
    /// (`rows[0]` after the token before the drafts, which `history` ends with), and
    /// `drawn_from` says what each draft was drawn from (one [`Proposal`] per draft, or
    /// none at all for drafts chosen without chance). Decides each position in turn and
    /// goes on while the token there is the draft: each such draft is accepted (pushed
    /// onto `history`), and the first token that differs, or the one after the last
    /// draft, ends the list. Either way each token has the distribution sampling one
    /// position at a time gives it:
    ///
    /// - a draft chosen without chance (greedy drafting, prompt lookup) is kept where the
    ///   token sampled there is the draft, so the tokens, random draws included, are the
    ///   ones sampling one position at a time gives;
    /// - a draft drawn at random from q is judged by the standard rejection rule (Leviathan
    ///   et al. and Chen et al., 2023): kept with probability min(1, p/q) at it, and
    ///   otherwise replaced by a draw from max(0, p - q), renormalised. Drafts are kept as
    ///   often as any rule can keep them (1 - the distributions' total variation
    ///   distance); the tokens are p's in distribution, not draw for draw.
    ///
    /// Greedy settings keep exactly the drafts that are the likeliest token. Each token
    /// comes with the random stream's position after it ([`Sampler::rng_position`]).
    pub fn sample_drafts(
        &mut self,
        rows: &[&[f32]],
        drafts: &[u32],
        drawn_from: &[Proposal],
        history: &mut Vec<u32>,
    ) -> Result<Vec<(Sampled, u64)>> {
        if rows.len() != drafts.len() + 1 {
            return Err(Error::Sampling(format!(
                "{} rows of logits for {} drafts",
                rows.len(),
                drafts.len()
            )));
        }
        if !drawn_from.is_empty() && drawn_from.len() != drafts.len() {
            return Err(Error::Sampling(format!(
                "{} distributions for {} drafts",
                drawn_from.len(),
                drafts.len()
            )));
        }
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let draft = drafts.get(i).copied();
            let drawn = drawn_from
                .get(i)
                .filter(|q| !q.is_empty() && self.params.temperature > 0.0);
            let sampled = match (draft, drawn) {
                (Some(draft), Some(q)) => self.judge(row, history, draft, q)?,
                _ => self.sample(row, history)?,
            };
            // A token that is the draft, however it came, continues the pass: the next
            // row's logits are the ones after it.
            let accepted = draft == Some(sampled.token);
            if accepted {
                history.push(sampled.token);
            }
            out.push((sampled, self.rng_position()));
            if !accepted {
                break;
            }
        }
        Ok(out)
    }

    /// The token at a position whose `draft` was drawn from `q`, by the rejection rule
    /// ([`Sampler::sample_drafts`]), against p: what [`Sampler::sample`] would draw from.
    fn judge(
        &mut self,
        logits: &[f32],
        history: &[u32],
        draft: u32,
        q: &[(u32, f32)],
    ) -> Result<Sampled> {
        let adjusted = self.penalised(logits, history)?;
        let p = self.filtered(&adjusted);
        if p.is_empty() {
            return Ok(self.describe(logits, argmax(&adjusted)));
        }
        let p_total: f64 = p.iter().map(|c| f64::from(c.1)).sum();
        let q_total: f64 = q.iter().map(|c| f64::from(c.1)).sum();
        let named = q.iter().filter(|c| c.0 == draft);
        let q_draft = named.map(|c| f64::from(c.1)).sum::<f64>() / q_total;
        if !(q_draft > 0.0 && q_draft.is_finite()) {
            return Err(Error::Sampling(format!(
                "draft {draft} is not among the tokens it was drawn from"
            )));
        }
        let p_draft = p
            .iter()
            .find(|c| c.0 == draft)
            .map_or(0.0, |c| f64::from(c.1) / p_total);
        let keep: f64 = self.rng.random();
        let token = if keep * q_draft < p_draft {
            draft
        } else {
            // q by token id, so the residual costs one pass over p, however large.
            let mut q_dense = vec![0f64; logits.len()];
            for &(token, prob) in q {
                if let Some(at) = q_dense.get_mut(token as usize) {
                    *at += f64::from(prob) / q_total;
                }
            }
            let residual: Vec<(u32, f32)> = p
                .iter()
                .map(|&(t, w)| (t, (f64::from(w) / p_total - q_dense[t as usize]) as f32))
                .filter(|c| c.1 > 0.0)
                .collect();
            // Rounding may leave nothing where p and q all but agree: then p itself.
            self.draw(if residual.is_empty() { &p } else { &residual })
        };
        Ok(self.describe(logits, token))
    }

    fn sample_filtered(&mut self, logits: &[f32]) -> u32 {
        let kept = self.filtered(logits);
        if kept.is_empty() {
            return argmax(logits);
        }
        self.draw(&kept)
    }

    /// A token of `weighted` (token, weight) pairs, drawn in proportion to the weights
    /// (which need not sum to 1): one random number, walked along their cumulative sum.
    fn draw(&mut self, weighted: &[(u32, f32)]) -> u32 {
        let total: f64 = weighted.iter().map(|c| f64::from(c.1)).sum();
        let mut r = self.rng.random::<f64>() * total;
        for &(token, weight) in weighted {
            r -= f64::from(weight);
            if r < 0.0 {
                return token;
            }
        }
        // Rounding: the last token with any weight.
        weighted
            .iter()
            .rev()
            .find(|c| c.1 > 0.0)
            .map_or(weighted[weighted.len() - 1].0, |c| c.0)
    }

    /// The tokens that temperature, top-k, top-p and min-p leave of `logits` (after any
    /// penalty), with their probabilities: normalised before the filters cut, so they may
    /// sum to less than 1 (a draw over them is as if renormalised). Plain temperature
    /// keeps every finite logit, in id order; otherwise the most likely come first. Empty
    /// when no logit is finite.
    fn filtered(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        let max = finite_max(logits);
        if max == f32::NEG_INFINITY {
            return Vec::new();
        }
        // Each finite logit's weight exp((l - max) / t) (the likeliest's is 1), in one
        // vectorised pass: a sampled token costs microseconds, not a libm call per entry.
        let mut weights = vec![0f32; logits.len()];
        let total = exp_weights(logits, max, 1.0 / p.temperature, &mut weights);
        // Every finite logit's token with its weight divided by `by`.
        let every = |by: f32| -> Vec<(u32, f32)> {
            logits
                .iter()
                .zip(&weights)
                .enumerate()
                .filter(|(_, (l, _))| l.is_finite())
                .map(|(i, (_, &w))| (i as u32, w / by))
                .collect()
        };
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Plain temperature: no order needed, no sort of a 100k+ vocabulary per token.
            return every(total);
        }
        let (cand, sum) = if p.top_k > 0 {
            let mut cand = every(1.0);
            if cand.len() > p.top_k {
                cand.select_nth_unstable_by(p.top_k - 1, by_weight);
                cand.truncate(p.top_k);
            }
            let sum: f32 = cand.iter().map(|c| c.1).sum();
            (cand, sum)
        } else {
            // The tokens within a factor of LIKELY_FLOOR of the likeliest come first in
            // the order; where they hold the top-p mass, or min-p keeps no others, the
            // filters need no more of the vocabulary than them.
            let likely: Vec<(u32, f32)> = weights
                .iter()
                .enumerate()
                .filter(|(_, &w)| w >= LIKELY_FLOOR)
                .map(|(i, &w)| (i as u32, w))
                .collect();
            let mass: f32 = likely.iter().map(|c| c.1).sum();
            let enough = (p.top_p < 1.0 && mass >= p.top_p * total) || p.min_p >= LIKELY_FLOOR;
            (if enough { likely } else { every(1.0) }, total)
        };
        self.cut(cand, sum)
    }

    /// Of `cand` (token, weight) pairs whose weights sum to `sum` before any cut, the most
    /// likely first, what min-p and top-p keep, with their probabilities.
    fn cut(&self, mut cand: Vec<(u32, f32)>, sum: f32) -> Vec<(u32, f32)> {
        let p = &self.params;
        let prob = |c: &(u32, f32)| c.1 / sum;
        // Sort only as much of the head as the filters can keep: the top 256 usually hold
        // the top-p mass or fall below the min-p floor; otherwise sort everything.
        let mut head = cand.len().min(SORTED_HEAD);
        loop {
            if head < cand.len() {
                cand.select_nth_unstable_by(head - 1, by_weight);
            }
            cand[..head].sort_by(by_weight);
            let mass: f32 = cand[..head].iter().map(prob).sum();
            let floor = prob(&cand[0]) * p.min_p;
            let enough = head == cand.len()
                || (p.top_p < 1.0 && mass >= p.top_p)
                || (p.min_p > 0.0 && prob(&cand[head - 1]) < floor);
            if enough {
                break;
            }
            head = cand.len();
        }
        let mut kept: Vec<(u32, f32)> = cand[..head].iter().map(|c| (c.0, prob(c))).collect();
        if p.min_p > 0.0 {
            let floor = kept[0].1 * p.min_p;
            let keep = kept.iter().take_while(|c| c.1 >= floor).count().max(1);
            kept.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = kept.len();
            for (i, c) in kept.iter().enumerate() {
                acc += c.1;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            kept.truncate(keep);
        }
        kept
    }
}

/// Most likely first; ties broken by id so the order is deterministic.
fn by_weight(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// What a draft was drawn from ([`Sampler::propose`]): tokens and their probabilities, at
/// most [`PROPOSAL_TOKENS`] of them. Empty for a draft chosen without chance (greedy, or
/// prompt lookup).
pub type Proposal = Vec<(u32, f32)>;

/// Most tokens a [`Proposal`] names: a drafter draws among the likeliest this many of its
/// filtered distribution (which top-p or min-p usually leave far fewer of), so that a
/// step's drafts stay a few hundred bytes each on the wire. Drawing from fewer than the
/// filters keep costs acceptance, never correctness: the rule judges a draft by the
/// distribution it was actually drawn from.
pub const PROPOSAL_TOKENS: usize = 64;

/// The last 16 bytes of a draft stream's key ([`Sampler::for_drafts`]): what sets those
/// streams apart from the answer's own.
const DRAFT_STREAM: &[u8; 16] = b"strata-draft-v1\0";

/// Candidates sorted before checking whether top-p / min-p need more.
const SORTED_HEAD: usize = 256;

/// Weight (relative to the likeliest token's) below which a token is first left out when
/// looking for the top-p or min-p set.
const LIKELY_FLOOR: f32 = 1e-3;

/// Divides the positive logits (multiplies the negative ones) of the tokens among the last
/// `window` of `history` by `penalty`, once per token; `1` changes nothing.
pub(crate) fn apply_repeat_penalty(
    logits: &mut [f32],
    history: &[u32],
    penalty: f32,
    window: usize,
) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = history[history.len().saturating_sub(window)..].to_vec();
    seen.sort_unstable();
    seen.dedup();
    for &t in &seen {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Index of the largest value (the first of equals).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// `ln(Σ exp(l))` over the finite logits (their softmax's normaliser in log space).
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = finite_max(logits);
    if max == f32::NEG_INFINITY {
        return f32::NAN;
    }
    let mut scratch = vec![0f32; logits.len()];
    exp_weights(logits, max, 1.0, &mut scratch).ln() + max
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx.truncate(n);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::draft::Drafts;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(params()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]).unwrap().token, 1);
    }

    #[test]
    fn repeat_penalty_demotes_recent_tokens_within_the_window() {
        let p = SamplingParams {
            repeat_penalty: 2.0,
            repeat_window: 1,
            ..params()
        };
        let mut s = Sampler::new(p).unwrap();
        // Token 1 (logit 3) halves to 1.5 < 2.0: token 2 wins.
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1]).unwrap().token, 2);
        // Token 1 outside the window of one: not penalised.
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1, 0]).unwrap().token, 1);
    }

    #[test]
    fn a_resumed_sampler_continues_the_same_random_stream() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: 42,
            ..params()
        };
        let mut whole = Sampler::new(p.clone()).unwrap();
        let all: Vec<u32> = (0..40)
            .map(|_| whole.sample(&logits, &[]).unwrap().token)
            .collect();
        let mut first = Sampler::new(p.clone()).unwrap();
        let mut resumed_tokens: Vec<u32> = (0..17)
            .map(|_| first.sample(&logits, &[]).unwrap().token)
            .collect();
        let mut second = Sampler::resume(p, first.rng_position()).unwrap();
        resumed_tokens.extend((17..40).map(|_| second.sample(&logits, &[]).unwrap().token));
        assert_eq!(resumed_tokens, all);
        assert!(whole.rng_position() > 0);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed,
                ..params()
            })
            .unwrap();
            (0..32)
                .map(|_| s.sample(&logits, &[]).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 1.0, 4.0, 3.9];
        for p in [
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                ..params()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.01,
                ..params()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.99,
                ..params()
            },
        ] {
            let mut s = Sampler::new(p).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]).unwrap().token, 2);
            }
        }
    }

    #[test]
    fn top_k_two_never_picks_a_third_token() {
        let logits = [0.0, 1.0, 1.1, 0.9];
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 2,
            seed: 3,
            ..params()
        })
        .unwrap();
        let picks: Vec<u32> = (0..200)
            .map(|_| s.sample(&logits, &[]).unwrap().token)
            .collect();
        assert!(picks.iter().all(|t| *t == 1 || *t == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }

    #[test]
    fn nucleus_over_a_large_flat_vocabulary_keeps_exactly_the_smallest_set() {
        // Nearly flat logits over 5000 tokens: a top-p of 0.9 needs far more than the
        // first 256 candidates, so the full-sort path runs; top-p 0.05 stays in the head.
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 5000) as f32 / 5000.0)
            .collect();
        for top_p in [0.9f32, 0.05] {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let max = logits[order[0]];
            let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            let mut acc = 0.0;
            let nucleus: Vec<usize> = order
                .iter()
                .copied()
                .take_while(|&i| {
                    let before = acc;
                    acc += (logits[i] - max).exp() / sum;
                    before < top_p
                })
                .collect();
            let allowed: std::collections::HashSet<u32> =
                nucleus.iter().map(|&i| i as u32).collect();
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p,
                seed: 9,
                ..params()
            })
            .unwrap();
            for _ in 0..300 {
                let t = s.sample(&logits, &[]).unwrap().token;
                assert!(
                    allowed.contains(&t),
                    "top_p {top_p}: token {t} outside the nucleus of {}",
                    allowed.len()
                );
            }
        }
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let mut s = Sampler::new(SamplingParams {
            top_logprobs: 2,
            ..params()
        })
        .unwrap();
        let out = s.sample(&[0.0, 2.0, 1.0], &[]).unwrap();
        let total: f32 = [0.0f32, 2.0, 1.0].iter().map(|l| (l - 2.0f32).exp()).sum();
        assert!((out.logprob - (-(total.ln()))).abs() < 1e-6);
        assert_eq!(
            out.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn drafts_chosen_without_chance_give_the_tokens_of_sampling_one_at_a_time() {
        // Three positions over a vocabulary of 6; drafts that are sometimes right.
        let rows: Vec<Vec<f32>> = vec![
            vec![1.0, 2.0, 0.5, -1.0, 0.0, 1.5],
            vec![0.2, 0.1, 2.5, 2.0, -0.5, 0.0],
            vec![1.0, 1.0, 1.0, 3.0, 0.0, 0.5],
        ];
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 5,
            ..Default::default()
        };
        // Seeded: the same tokens and the same stream position as one at a time.
        for seed in 0..50 {
            let p = SamplingParams {
                seed,
                ..params.clone()
            };
            let mut alone = Sampler::new(p.clone()).unwrap();
            let mut history = vec![9];
            let (mut expected, mut positions) = (Vec::new(), Vec::new());
            for row in &refs {
                let t = alone.sample(row, &history).unwrap().token;
                expected.push(t);
                positions.push(alone.rng_position());
                history.push(t);
            }
            let mut drafted = Sampler::new(p).unwrap();
            let mut history = vec![9];
            let drafts = [expected[0], 1];
            let got = drafted
                .sample_drafts(&refs, &drafts, &[], &mut history)
                .unwrap();
            let tokens: Vec<u32> = got.iter().map(|(s, _)| s.token).collect();
            let stream: Vec<u64> = got.iter().map(|(_, at)| *at).collect();
            let upto = if expected[1] == 1 { 3 } else { 2 };
            assert_eq!(tokens, expected[..upto], "seed {seed}");
            assert_eq!(stream, positions[..upto], "seed {seed}");
            assert_eq!(history, [&[9][..], &expected[..upto - 1]].concat());
        }
        // Over many seeds, the token at a drafted position (the draft kept, or another in
        // its place) is distributed as the model's p there: chi-square against p, 5
        // degrees of freedom, p = 0.001 at 20.5.
        let n = 20_000;
        let mut counts = [0usize; 6];
        for seed in 0..n {
            let mut with_draft = Sampler::new(SamplingParams {
                seed: seed as u64,
                temperature: 1.0,
                ..Default::default()
            })
            .unwrap();
            // Draft 1 (the most likely token) at the first position: whatever it gives
            // first is the position's token.
            let drafted = with_draft
                .sample_drafts(&refs[..2], &[1], &[], &mut vec![9])
                .unwrap();
            counts[drafted[0].0.token as usize] += 1;
        }
        let logits = &rows[0];
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let chi2: f64 = counts
            .iter()
            .zip(&weights)
            .map(|(&c, &w)| {
                let e = n as f64 * w / total;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 20.5, "chi-square {chi2:.1} for counts {counts:?}");
    }

    /// `logits` at temperature 0.8 with the top 5 of 6 kept, as probabilities.
    fn top_five(logits: &[f32]) -> Vec<f64> {
        let cut = logits.iter().cloned().fold(f32::INFINITY, f32::min);
        let w: Vec<f64> = logits
            .iter()
            .map(|&x| {
                if x == cut {
                    0.0
                } else {
                    (f64::from(x) / 0.8).exp()
                }
            })
            .collect();
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    }

    fn top_five_params(seed: u64) -> SamplingParams {
        SamplingParams {
            seed,
            temperature: 0.8,
            top_k: 5,
            ..Default::default()
        }
    }

    #[test]
    fn a_filtered_draw_has_the_filtered_distribution() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 0.0, 1.5];
        let n = 20_000;
        let mut counts = [0usize; 6];
        for seed in 0..n {
            let mut sampler = Sampler::new(top_five_params(seed)).unwrap();
            counts[sampler.sample(&logits, &[]).unwrap().token as usize] += 1;
        }
        assert_eq!(counts[3], 0, "the token top-k dropped");
        // Chi-square against the filtered distribution: 4 degrees of freedom, p = 0.001 at
        // 18.5.
        let p = top_five(&logits);
        let chi2: f64 = (0..6)
            .filter(|&i| i != 3)
            .map(|i| {
                let e = n as f64 * p[i];
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 18.5, "chi-square {chi2:.1} for counts {counts:?}");
    }

    #[test]
    fn drafts_drawn_at_random_keep_the_output_distribution_by_the_rejection_rule() {
        // The model's logits at two positions, and a draft model's that differ (another
        // token is likeliest at each, another is cut by top-k).
        let model = [
            [1.0f32, 2.0, 0.5, -1.0, 0.0, 1.5],
            [0.2, 2.2, 2.5, 2.0, -0.5, 1.8],
        ];
        let draft_model = [
            [1.0f32, 1.45, 0.5, -1.0, 0.0, 1.55],
            [0.3, 1.6, 1.8, 2.2, 0.0, 2.4],
        ];
        let rows: Vec<&[f32]> = vec![&model[0], &model[1], &model[1]];
        // A repeat penalty, so each position's p and q depend on the tokens before it:
        // the prompt's (token 2) and the answer's.
        let params = |seed| SamplingParams {
            repeat_penalty: 1.5,
            ..top_five_params(seed)
        };
        let prompt = [2u32];
        let n = 20_000;
        let (mut pairs, mut kept_first) = ([[0usize; 6]; 6], 0);
        for seed in 0..n {
            // One pass with two drafts; where it drops one, the next pass drafts again
            // from where it stopped, as a coordinator does.
            let mut sampler = Sampler::new(params(seed)).unwrap();
            let mut answer = prompt.to_vec();
            while answer.len() < 3 {
                let mut draw = sampler.for_drafts();
                let at = answer.len() - 1;
                let mut drafts = Drafts::default();
                let mut seen = answer.clone();
                for logits in &draft_model[at..] {
                    let (token, q) = draw.propose(logits, &seen).unwrap();
                    seen.push(token);
                    drafts.tokens.push(token);
                    drafts.drawn_from.push(q);
                }
                let mut history = answer.clone();
                let out = sampler
                    .sample_drafts(
                        &rows[at..at + drafts.len() + 1],
                        &drafts.tokens,
                        &drafts.drawn_from,
                        &mut history,
                    )
                    .unwrap();
                if at == 0 && out[0].0.token == drafts.tokens[0] {
                    kept_first += 1;
                }
                answer.extend(out.iter().map(|(s, _)| s.token));
            }
            pairs[answer[1] as usize][answer[2] as usize] += 1;
        }
        // The pair is distributed as the model's two positions, each penalised by what
        // came before it: chi-square over the 25 pairs top-k leaves, 24 degrees of
        // freedom, p = 0.001 at 51.2.
        let p = |logits: &[f32], seen: &[u32]| {
            let mut penalised = logits.to_vec();
            apply_repeat_penalty(&mut penalised, seen, 1.5, 64);
            top_five(&penalised)
        };
        let p0 = p(&model[0], &prompt);
        let mut chi2 = 0.0;
        for (a, row) in pairs.iter().enumerate() {
            let p1 = p(&model[1], &[prompt[0], a as u32]);
            for (b, &count) in row.iter().enumerate() {
                let e = n as f64 * p0[a] * p1[b];
                if e == 0.0 {
                    assert_eq!(count, 0, "pair ({a}, {b}) that top-k excludes");
                } else {
                    chi2 += (count as f64 - e).powi(2) / e;
                }
            }
        }
        assert!(chi2 < 51.2, "chi-square {chi2:.1} for {pairs:?}");
        // And the first draft is kept as often as any rule could keep it: the mass the
        // two distributions share, 1 - their total variation distance.
        let q0 = p(&draft_model[0], &prompt);
        let shared: f64 = p0.iter().zip(&q0).map(|(a, b)| a.min(*b)).sum();
        let kept = kept_first as f64 / n as f64;
        assert!(
            (kept - shared).abs() < 0.015,
            "kept {kept:.3}, shared {shared:.3}"
        );
    }

    #[test]
    fn a_proposal_names_the_likeliest_tokens_and_the_draft_among_them() {
        // Plain temperature over a vocabulary larger than a proposal holds.
        let logits: Vec<f32> = (0..1000).map(|i| (i % 97) as f32 * 0.05).collect();
        let mut draw = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        })
        .unwrap()
        .for_drafts();
        for _ in 0..20 {
            let (token, q) = draw.propose(&logits, &[]).unwrap();
            assert_eq!(q.len(), PROPOSAL_TOKENS);
            assert!(q.iter().any(|c| c.0 == token && c.1 > 0.0));
            let total: f32 = q.iter().map(|c| c.1).sum();
            assert!((total - 1.0).abs() < 1e-4, "sums to {total}");
            // The likeliest logits are those of ids 96 mod 97 and just below.
            let floor = q
                .iter()
                .map(|c| logits[c.0 as usize])
                .fold(f32::MAX, f32::min);
            let above = logits.iter().filter(|&&l| l > floor).count();
            assert!(
                above < PROPOSAL_TOKENS,
                "{above} tokens likelier than one named"
            );
        }
        // Greedy settings propose the likeliest, chosen without chance.
        let mut greedy = Sampler::new(params()).unwrap().for_drafts();
        assert_eq!(
            greedy.propose(&[0.1, 0.9, 0.3], &[]).unwrap(),
            (1, Vec::new())
        );
    }

    #[test]
    fn drafts_streams_are_their_own_and_new_for_every_step() {
        let mut answer = Sampler::new(top_five_params(5)).unwrap();
        let first = answer.for_drafts().rng.random::<u64>();
        assert_eq!(
            first,
            answer.for_drafts().rng.random::<u64>(),
            "not repeatable"
        );
        let own = answer.clone().rng.random::<u64>();
        answer
            .sample(&[1.0, 2.0, 0.5, -1.0, 0.0, 1.5], &[])
            .unwrap();
        let next = answer.for_drafts().rng.random::<u64>();
        assert!(first != own && first != next && next != own);
    }

    #[test]
    fn a_draft_judged_by_a_distribution_that_does_not_name_it_is_refused() {
        let rows: Vec<&[f32]> = vec![&[1.0, 2.0, 0.5], &[0.5, 0.5, 0.5]];
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 1.0,
            ..Default::default()
        })
        .unwrap();
        let err = sampler
            .sample_drafts(&rows, &[2], &[vec![(0, 0.5), (1, 0.5)]], &mut vec![0])
            .unwrap_err();
        assert!(err.to_string().contains("not among the tokens"), "{err}");
        let err = sampler
            .sample_drafts(&rows, &[2], &[vec![(2, 1.0)], vec![(2, 1.0)]], &mut vec![0])
            .unwrap_err();
        assert!(
            err.to_string().contains("2 distributions for 1 drafts"),
            "{err}"
        );
    }

    #[test]
    fn nonsense_parameters_are_refused() {
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..params()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..params()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            repeat_penalty: 0.0,
            ..params()
        })
        .is_err());
    }
}
