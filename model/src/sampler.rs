//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repeat
//! penalty over a window, stop tokens, and optional top-n log-probabilities.
//!
//! Pure logic over `&[f32]`: no tensors, no I/O. Each sequence owns its [`Sampler`], whose
//! random state is seeded once, so a given seed yields the same tokens however the model
//! is partitioned.

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
        if logits.is_empty() {
            return Err(Error::Sampling("empty logits".into()));
        }
        let p = &self.params;
        let mut adjusted = logits.to_vec();
        apply_repeat_penalty(&mut adjusted, history, p.repeat_penalty, p.repeat_window);
        let top = p.top_logprobs;
        let token = if p.temperature == 0.0 {
            argmax(&adjusted)
        } else {
            self.sample_filtered(&adjusted)
        };
        // Log-probabilities under the unmodified distribution: one log-sum-exp, and a
        // sorted list only when asked for.
        let lse = log_sum_exp(logits);
        let top_logprobs = if top > 0 {
            let logprobs: Vec<f32> = logits.iter().map(|l| l - lse).collect();
            top_n(&logprobs, top)
        } else {
            Vec::new()
        };
        Ok(Sampled {
            token,
            logprob: logits[token as usize] - lse,
            top_logprobs,
        })
    }

    /// Verifies drafts: `rows[i]` are the logits after the history's `i`-th draft position
    /// (`rows[0]` after the token before the drafts, which `history` ends with). Samples
    /// at each row in turn and goes on while the token sampled is the draft there: each
    /// such draft is accepted (pushed onto `history`), and the first token that differs,
    /// or the one after the last draft, ends the list. So the tokens, random draws
    /// included, are the ones sampling one position at a time gives, whatever the drafts:
    /// the output distribution is p's. (A draft drawn with a copy of this sampler, as a
    /// model drafter draws them, is kept wherever the draft model's distribution leads the
    /// same random number to the same token.) Each token comes with the random stream's
    /// position after it ([`Sampler::rng_position`]).
    pub fn sample_drafts(
        &mut self,
        rows: &[&[f32]],
        drafts: &[u32],
        history: &mut Vec<u32>,
    ) -> Result<Vec<(Sampled, u64)>> {
        if rows.len() != drafts.len() + 1 {
            return Err(Error::Sampling(format!(
                "{} rows of logits for {} drafts",
                rows.len(),
                drafts.len()
            )));
        }
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let sampled = self.sample(row, history)?;
            let accepted = drafts.get(i) == Some(&sampled.token);
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

    fn sample_filtered(&mut self, logits: &[f32]) -> u32 {
        let kept = self.filtered(logits);
        if kept.is_empty() {
            return argmax(logits);
        }
        let p = &self.params;
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Plain temperature: walk the cumulative sum (no order needed).
            let mut r = self.rng.random::<f32>();
            for &(token, prob) in &kept {
                r -= prob;
                if r < 0.0 {
                    return token;
                }
            }
            return kept[kept.len() - 1].0;
        }
        // The draw is a race: each kept token's clock is -ln(u)/p, with u uniform from one
        // random word of the stream and the token's id, and the first to finish wins. That
        // is exactly p's distribution (of exponential clocks of rates p_i, token i finishes
        // first with probability p_i / Σp). Unlike walking the cumulative sum, a draft
        // model that runs the same race (same word) with its own probabilities finishes
        // first with the same token wherever the two distributions are close, whatever
        // their order: coupled draws, so sampled answers keep drafts too.
        let word = self.rng.random::<u64>();
        race(word, &kept)
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

/// The winner of a race of exponential clocks, one per token of `kept` at rate its
/// probability, each clock's uniform drawn from `word` and the token's id.
fn race(word: u64, kept: &[(u32, f32)]) -> u32 {
    let mut first = (f64::INFINITY, kept[0].0);
    for &(token, prob) in kept {
        if prob > 0.0 {
            let clock = -token_uniform(word, token).ln() / f64::from(prob);
            if clock < first.0 {
                first = (clock, token);
            }
        }
    }
    first.1
}

/// A uniform number in (0, 1] for `token` from one random `word`: SplitMix64's finaliser
/// of the two mixed, as the race in [`Sampler::sample`] needs one per token per draw.
fn token_uniform(word: u64, token: u32) -> f64 {
    let mut z = word ^ u64::from(token).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

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
    fn drafts_keep_the_output_distribution_and_the_random_stream() {
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
            let got = drafted.sample_drafts(&refs, &drafts, &mut history).unwrap();
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
                .sample_drafts(&refs[..2], &[1], &mut vec![9])
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

    #[test]
    fn a_filtered_draw_has_the_filtered_distribution_and_couples_close_ones() {
        // Top 5 of 6 at temperature 0.8; `close` swaps the first two in order.
        let logits = [1.0f32, 2.0, 0.5, -1.0, 0.0, 1.5];
        let close = [1.0f32, 1.45, 0.5, -1.0, 0.0, 1.55];
        let params = |seed| SamplingParams {
            seed,
            temperature: 0.8,
            top_k: 5,
            ..Default::default()
        };
        let filtered = |l: &[f32]| -> Vec<f64> {
            let w: Vec<f64> = l
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    if i == 3 {
                        0.0
                    } else {
                        (f64::from(x) / 0.8).exp()
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            w.iter().map(|x| x / total).collect()
        };
        let n = 20_000;
        let (mut counts, mut same) = ([0usize; 6], 0);
        for seed in 0..n {
            let a = Sampler::new(params(seed))
                .unwrap()
                .sample(&logits, &[])
                .unwrap()
                .token;
            let b = Sampler::new(params(seed))
                .unwrap()
                .sample(&close, &[])
                .unwrap()
                .token;
            counts[a as usize] += 1;
            same += usize::from(a == b);
        }
        assert_eq!(counts[3], 0, "the token top-k dropped");
        // Chi-square against the filtered distribution: 4 degrees of freedom, p = 0.001 at
        // 18.5.
        let p = filtered(&logits);
        let chi2: f64 = (0..6)
            .filter(|&i| i != 3)
            .map(|i| {
                let e = n as f64 * p[i];
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 18.5, "chi-square {chi2:.1} for counts {counts:?}");
        // Two samplers with one seed over close distributions draw the same token at
        // least (1 - TV) / (1 + TV) of the time, as a race of exponential clocks does,
        // though their orders differ (walking each one's cumulative sum would not).
        let q = filtered(&close);
        let tv: f64 = p.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
        let agree = same as f64 / n as f64;
        assert!(
            agree >= (1.0 - tv) / (1.0 + tv) - 0.01,
            "{agree:.3} agree, TV {tv:.3}"
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
