//! How many drafts a step carries: as many as make passes give the most tokens per second,
//! from how often the model keeps drafts and what recent passes took.

use std::time::Duration;

/// How many drafts the next step carries.
///
/// A pass with `k` drafts gives every draft kept up to the first the model does not keep,
/// and one token more. With each draft kept with chance `a` where those before it were,
/// that is `1 + a + … + a^k` tokens on average. The pass takes about `base + k × per_draft`:
/// drafting `k` guesses and verifying a row for each. The length is the `k` in
/// `1..=most` with the most tokens per second: `a` is a running mean over recent drafts,
/// `base` and `per_draft` the line through recent passes' durations (least squares,
/// recent passes weighing more). So where a draft is cheap next to a pass (a large model
/// across machines) steps draft long, and where a draft costs a good part of a pass (a
/// small model on one machine, the demo) they draft a few.
///
/// Until the passes tell what a draft costs (too few yet, or too alike in length), the
/// length grows by two after a step that kept all its drafts and shrinks by one after one
/// that did not, as transformers' assisted generation does; that also varies the lengths
/// the line is fitted through.
#[derive(Debug, Clone)]
pub struct DraftLength {
    length: usize,
    most: usize,
    kept: KeepRate,
    cost: PassCost,
}

impl DraftLength {
    /// Starting at `initial` drafts, never more than `most`.
    pub fn new(initial: usize, most: usize) -> Self {
        let most = most.max(1);
        DraftLength {
            length: initial.clamp(1, most),
            most,
            kept: KeepRate::default(),
            cost: PassCost::default(),
        }
    }

    /// Drafts the next step may carry.
    pub fn get(&self) -> usize {
        self.length
    }

    /// A step carried `drafted` drafts, `accepted` of them were kept, and it `took` this
    /// long from drafting to its last token. A step without drafts says nothing.
    pub fn after(&mut self, drafted: usize, accepted: usize, took: Duration) {
        if drafted == 0 {
            return;
        }
        let accepted = accepted.min(drafted);
        self.kept.observe(accepted, accepted < drafted);
        self.cost.observe(drafted, took.as_secs_f64());
        self.length = match self.cost.line() {
            Some((base, per_draft)) => best_length(self.kept.rate(), base, per_draft, self.most),
            None if accepted == drafted => (self.length + 2).min(self.most),
            None => self.length.saturating_sub(1).max(1),
        };
    }
}

/// The `k` in `1..=most` with the most tokens per second, `(1 + a + … + a^k) / (base + k ×
/// per_draft)`.
fn best_length(keep: f64, base: f64, per_draft: f64, most: usize) -> usize {
    let (mut best, mut best_rate) = (1, 0.0);
    let (mut tokens, mut term) = (1.0, 1.0);
    for k in 1..=most {
        term *= keep;
        tokens += term;
        let rate = tokens / (base + k as f64 * per_draft);
        if rate > best_rate {
            (best, best_rate) = (k, rate);
        }
    }
    best
}

/// How often a draft is kept where every draft before it was: a mean over drafts, each
/// older one weighing [`KeepRate::FADE`] as much as the next.
#[derive(Debug, Clone, Default)]
struct KeepRate {
    kept: f64,
    seen: f64,
}

impl KeepRate {
    const FADE: f64 = 0.98;

    /// `accepted` drafts kept in a row, then (if `refused`) one that was not.
    fn observe(&mut self, accepted: usize, refused: bool) {
        for _ in 0..accepted {
            self.add(1.0);
        }
        if refused {
            self.add(0.0);
        }
    }

    fn add(&mut self, kept: f64) {
        self.kept = self.kept * Self::FADE + kept;
        self.seen = self.seen * Self::FADE + 1.0;
    }

    fn rate(&self) -> f64 {
        if self.seen > 0.0 {
            self.kept / self.seen
        } else {
            0.0
        }
    }
}

/// Pass durations against their drafts: the sums of a least-squares line, each older
/// pass weighing [`PassCost::FADE`] as much as the next.
#[derive(Debug, Clone, Default)]
struct PassCost {
    weight: f64,
    drafts: f64,
    drafts_sq: f64,
    secs: f64,
    drafts_secs: f64,
}

impl PassCost {
    const FADE: f64 = 0.95;
    /// Passes (in weight) before the line is trusted.
    const ENOUGH: f64 = 6.0;
    /// Least variance of the lengths (in drafts squared) the line is fitted through.
    const SPREAD: f64 = 0.5;

    fn observe(&mut self, drafts: usize, secs: f64) {
        let k = drafts as f64;
        let f = Self::FADE;
        self.weight = self.weight * f + 1.0;
        self.drafts = self.drafts * f + k;
        self.drafts_sq = self.drafts_sq * f + k * k;
        self.secs = self.secs * f + secs;
        self.drafts_secs = self.drafts_secs * f + k * secs;
    }

    /// `(base, per_draft)` in seconds, once enough passes of varied lengths were seen and
    /// the line is a cost (a pass with no drafts takes some time, a draft none or more).
    fn line(&self) -> Option<(f64, f64)> {
        if self.weight < Self::ENOUGH {
            return None;
        }
        let mean_k = self.drafts / self.weight;
        let mean_t = self.secs / self.weight;
        let spread = self.drafts_sq / self.weight - mean_k * mean_k;
        if spread < Self::SPREAD {
            return None;
        }
        let slope = (self.drafts_secs / self.weight - mean_k * mean_t) / spread;
        let base = mean_t - slope * mean_k;
        if base.is_nan() || base <= 0.0 {
            return None;
        }
        // A draft never costs nothing: noise that fits a falling line means drafts are
        // cheap next to the pass.
        Some((base, slope.max(base * 1e-3)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: f64) -> Duration {
        Duration::from_secs_f64(ms / 1e3)
    }

    #[test]
    fn until_passes_say_what_drafts_cost_it_grows_by_two_when_all_are_kept_and_shrinks_by_one_otherwise(
    ) {
        let mut length = DraftLength::new(4, 7);
        length.after(4, 4, ms(2.0));
        assert_eq!(length.get(), 6);
        length.after(6, 6, ms(2.0));
        assert_eq!(length.get(), 7, "capped at the most");
        length.after(7, 3, ms(2.0));
        assert_eq!(length.get(), 6);
        length.after(0, 0, ms(2.0));
        assert_eq!(length.get(), 6, "a step without drafts says nothing");
        length.after(6, 0, ms(2.0));
        assert_eq!(length.get(), 5);
        assert_eq!(DraftLength::new(0, 0).get(), 1);
    }

    /// Passes that take `base + k × per_draft` ms and keep each draft with chance `keep`
    /// (a seeded xorshift, so the test is deterministic): the mean length over the last
    /// 200 of 300 passes.
    fn settles(base: f64, per_draft: f64, keep: f64) -> f64 {
        let mut length = DraftLength::new(4, 16);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut sum = 0;
        for pass in 0..300 {
            let k = length.get();
            if pass >= 100 {
                sum += k;
            }
            let accepted = (0..k).take_while(|_| uniform() < keep).count();
            length.after(k, accepted, ms(base + k as f64 * per_draft));
        }
        sum as f64 / 200.0
    }

    #[test]
    fn cheap_drafts_run_long_and_dear_ones_short() {
        let cheap = settles(50.0, 0.5, 0.85);
        let dear = settles(1.1, 0.27, 0.85);
        assert!(cheap >= 10.0, "drafts at 1% of a pass: {cheap}");
        assert!(
            (3.0..=6.0).contains(&dear),
            "drafts at a quarter of a pass: {dear}"
        );
    }

    #[test]
    fn the_length_maximises_tokens_per_second() {
        // keep 0.85, a draft a quarter of a pass: 1 + .85 + … over 1 + k/4 peaks at 4-5.
        let k = best_length(0.85, 1.0, 0.25, 16);
        let rate = |k: usize| {
            (0..=k).map(|i| 0.85f64.powi(i as i32)).sum::<f64>() / (1.0 + 0.25 * k as f64)
        };
        assert!((1..=16).all(|other| rate(other) <= rate(k)), "{k}");
        assert!((4..=5).contains(&k), "{k}");
        assert_eq!(
            best_length(0.0, 1.0, 0.25, 16),
            1,
            "never kept: one to keep probing"
        );
        assert_eq!(
            best_length(1.0, 1.0, 0.001, 16),
            16,
            "always kept, nearly free: the most"
        );
    }

    #[test]
    fn a_line_needs_enough_passes_of_varied_lengths() {
        let mut cost = PassCost::default();
        for _ in 0..20 {
            cost.observe(4, 0.002);
        }
        assert_eq!(cost.line(), None, "all of one length");
        let mut fresh = PassCost::default();
        for k in [2, 6, 3] {
            fresh.observe(k, 0.001 + 0.0002 * k as f64);
        }
        assert_eq!(fresh.line(), None, "too few passes");
        for k in [5, 2, 6, 3, 5, 4, 2] {
            fresh.observe(k, 0.001 + 0.0002 * k as f64);
        }
        let (base, per_draft) = fresh.line().expect("enough passes of varied lengths");
        assert!((base - 0.001).abs() < 1e-12, "{base}");
        assert!((per_draft - 0.0002).abs() < 1e-12, "{per_draft}");
        // A falling line (noise) is read as drafts that cost next to nothing.
        let mut falling = PassCost::default();
        for k in [2, 6, 3, 5, 2, 6, 3, 5] {
            falling.observe(k, 0.002 - 0.0001 * k as f64);
        }
        let (base, per_draft) = falling.line().expect("varied lengths");
        assert!((base - 0.002).abs() < 1e-12 && per_draft > 0.0 && per_draft < base * 0.01);
    }
}
