//! Scoring a text as `llama-perplexity` does: the negative log-likelihood of each token
//! given the ones before, and, against a base model's distributions saved earlier, the KL
//! divergence and how often both pick the same top token. Pure arithmetic: the CLI feeds
//! it logits and reads and writes the base file.

/// `logits` turned into log-probabilities in place (a numerically stable log-softmax).
pub fn log_softmax(logits: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln() as f32 + max;
    for l in logits.iter_mut() {
        *l -= log_sum;
    }
}

/// `KL(base || ours) = Σ p_base (log p_base - log p_ours)` of two log-probability rows.
pub fn kl_divergence(base: &[f32], ours: &[f32]) -> f64 {
    base.iter()
        .zip(ours)
        .map(|(&b, &o)| {
            let p = f64::from(b).exp();
            if p > 0.0 {
                p * (f64::from(b) - f64::from(o))
            } else {
                0.0
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// The index of the largest value (the first of equals).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// A running mean with its standard error.
#[derive(Debug, Default, Clone, Copy)]
struct Mean {
    n: u64,
    sum: f64,
    sum_sq: f64,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }

    /// Standard error of the mean (0 below two samples).
    fn stderr(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let n = self.n as f64;
        let variance = (self.sum_sq / n - self.mean().powi(2)).max(0.0) * n / (n - 1.0);
        (variance / n).sqrt()
    }
}

/// Everything measured over the scored positions of a text.
#[derive(Debug, Default, Clone)]
pub struct Scores {
    nll: Mean,
    kl: Mean,
    same_top: u64,
    compared: u64,
}

impl Scores {
    /// Scores one position: `log_probs` of the next token (already log-softmaxed),
    /// `next` the token that came, and the base model's log-probabilities if compared.
    pub fn add(&mut self, log_probs: &[f32], next: u32, base: Option<&[f32]>) {
        let nll = log_probs
            .get(next as usize)
            .map_or(f64::INFINITY, |&l| -f64::from(l));
        self.nll.add(nll);
        if let Some(base) = base {
            self.kl.add(kl_divergence(base, log_probs));
            self.compared += 1;
            if argmax(base) == argmax(log_probs) {
                self.same_top += 1;
            }
        }
    }

    /// Positions scored.
    pub fn positions(&self) -> u64 {
        self.nll.n
    }

    /// Perplexity, `exp(mean NLL)`, and its standard error (propagated from the NLL's).
    pub fn perplexity(&self) -> (f64, f64) {
        let ppl = self.nll.mean().exp();
        (ppl, ppl * self.nll.stderr())
    }

    /// Mean KL divergence from the base and its standard error, when compared.
    pub fn kl(&self) -> Option<(f64, f64)> {
        (self.compared > 0).then(|| (self.kl.mean(), self.kl.stderr()))
    }

    /// The fraction of positions where this model's top token is the base's.
    pub fn same_top(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.same_top as f64 / self.compared as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_gives_probabilities_that_sum_to_one() {
        let mut row = vec![1.0, 2.0, 3.0, 1000.0];
        log_softmax(&mut row);
        let total: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(row[3] > -1e-6 && row[3] <= 0.0);
    }

    #[test]
    fn kl_is_zero_for_one_distribution_and_positive_otherwise() {
        let mut a = vec![0.5, 1.5, -2.0];
        log_softmax(&mut a);
        assert_eq!(kl_divergence(&a, &a), 0.0);
        let mut b = vec![1.5, 0.5, -2.0];
        log_softmax(&mut b);
        // p = softmax(a), q = softmax(b): Σ p (log p - log q) by hand.
        let by_hand: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| f64::from(x).exp() * f64::from(x - y))
            .sum();
        assert!((kl_divergence(&a, &b) - by_hand).abs() < 1e-9);
        assert!(kl_divergence(&a, &b) > 0.1);
    }

    #[test]
    fn perplexity_of_a_uniform_model_is_its_vocabulary() {
        let mut scores = Scores::default();
        let mut row = vec![0.0f32; 50];
        log_softmax(&mut row);
        for next in 0..10 {
            scores.add(&row, next, Some(&row));
        }
        let (ppl, err) = scores.perplexity();
        assert!((ppl - 50.0).abs() < 1e-3, "{ppl}");
        assert!(err < 1e-6);
        assert_eq!(scores.kl().unwrap().0, 0.0);
        assert_eq!(scores.same_top(), Some(1.0));
        assert_eq!(scores.positions(), 10);
    }
}
