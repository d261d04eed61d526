//! Mixture-of-experts routing: which experts a token runs through, and with what weights.
//! Pure, so the rule is tested on its own; the forward that runs the chosen experts lives
//! with the other layers in `model`.
//!
//! The rule is transformers' (Mixtral, Qwen3-MoE) and llama.cpp's: a softmax over every
//! expert's router score, the `used` most probable, and, where the model renormalises,
//! their probabilities divided by their sum.

/// The experts for one token, from its router scores (`logits`, one per expert): the
/// `used` most probable (ties to the lower index), in expert order, each with its weight.
pub fn route(logits: &[f32], used: usize, normalize: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable: equal probabilities keep the lower index first.
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]));
    let mut chosen: Vec<(usize, f32)> = order
        .into_iter()
        .take(used)
        .map(|e| (e, exps[e] / total))
        .collect();
    if normalize {
        // llama.cpp's floor on the sum, so weights that all underflowed stay finite.
        let sum = chosen
            .iter()
            .map(|(_, w)| w)
            .sum::<f32>()
            .max(6.103_515_6e-5);
        for (_, w) in &mut chosen {
            *w /= sum;
        }
    }
    chosen.sort_by_key(|&(e, _)| e);
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_probable_experts_are_chosen_and_their_weights_renormalised() {
        let logits = [0.0, 2.0, -1.0, 1.0];
        let chosen = route(&logits, 2, true);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 3]);
        // Renormalised: a softmax over the two chosen scores.
        let e = 1f32.exp();
        assert!((chosen[0].1 - e / (e + 1.0)).abs() < 1e-6, "{chosen:?}");
        assert!((chosen[0].1 + chosen[1].1 - 1.0).abs() < 1e-6);
        // Not renormalised: the probabilities over all four.
        let all: f32 = logits.iter().map(|l| l.exp()).sum();
        let raw = route(&logits, 2, false);
        assert!((raw[0].1 - 2f32.exp() / all).abs() < 1e-6, "{raw:?}");
    }

    #[test]
    fn ties_go_to_the_lower_expert_and_extreme_scores_stay_finite() {
        assert_eq!(route(&[1.0, 1.0, 1.0], 2, true), vec![(0, 0.5), (1, 0.5)]);
        let chosen = route(&[1e30, -1e30, f32::MAX], 2, true);
        assert!(chosen.iter().all(|(_, w)| w.is_finite()), "{chosen:?}");
        assert_eq!(route(&[0.5], 1, true), vec![(0, 1.0)]);
    }
}
