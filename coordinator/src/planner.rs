//! The planner: which worker holds which contiguous layers. Pure: it takes the model's
//! sizes and the workers' budgets and speeds and returns a plan or a shortfall, so every
//! rule here is unit-tested without sockets or clocks.
//!
//! Rules, where the design left room:
//! - every eligible worker takes part (as exo does), in order of speed, fastest first; a
//!   worker too small for a single layer is left out and named in the plan's notes;
//! - layers are shared in proportion to speed, so each stage takes about the same time
//!   per token: that minimises the time per token when the pipeline is kept busy by
//!   concurrent requests (the slowest stage sets the pace); no worker gets more than its
//!   budget holds, and what it cannot take flows to the others (water filling);
//! - stage 0 also holds the embedding, the last stage the final norm and head (and the
//!   embedding again when the head is tied to it);
//! - each stage reserves a KV cache of `kv_tokens` positions per layer it holds, and a
//!   fixed overhead for the runtime and activations.

use std::ops::Range;

/// What the planner needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelProfile {
    /// A name for messages.
    pub name: String,
    /// Weight bytes of each transformer layer, as stored (quantized).
    pub layer_bytes: Vec<u64>,
    /// Bytes of the token embedding.
    pub embed_bytes: u64,
    /// Bytes of the final norm and LM head (the embedding's size again when tied).
    pub head_bytes: u64,
    /// KV-cache bytes per token per layer.
    pub kv_bytes_per_token: u64,
    /// Bytes of the largest tensor of a layer.
    pub largest_layer_tensor: u64,
}

impl ModelProfile {
    /// Every weight byte, counting a tied head once per stage that needs it.
    pub fn weight_bytes(&self) -> u64 {
        self.layer_bytes.iter().sum::<u64>() + self.embed_bytes + self.head_bytes
    }
}

/// A worker the plan may use.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its id.
    pub id: String,
    /// Bytes it accepts.
    pub budget: u64,
    /// Weight bytes per second it streams.
    pub speed: f64,
}

/// Knobs of planning.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Positions of KV cache reserved per layer (context times concurrency budget).
    pub kv_tokens: u64,
    /// Bytes each worker keeps for its runtime and activations.
    pub overhead: u64,
    /// Milliseconds one network hop adds to a token.
    pub hop_ms: f64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            kv_tokens: 4096,
            overhead: 48 << 20,
            hop_ms: 0.5,
        }
    }
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    /// The worker.
    pub worker: String,
    /// Its layers.
    pub layers: Range<usize>,
    /// Holds the embedding.
    pub embed: bool,
    /// Holds the final norm and head.
    pub head: bool,
    /// Weight bytes it holds.
    pub weight_bytes: u64,
    /// Bytes it needs in all.
    pub memory: u64,
    /// The worker's budget.
    pub budget: u64,
    /// Estimated milliseconds per token on this stage.
    pub est_ms: f64,
}

/// A plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Stages in pipeline order.
    pub stages: Vec<StagePlan>,
    /// One stream: the stages one after the other, plus the hops.
    pub est_ms_per_token: f64,
    /// A busy pipeline: the slowest stage.
    pub est_ms_pipelined: f64,
    /// Workers left out, and why.
    pub notes: Vec<String>,
}

/// Why there is no plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    /// Bytes missing.
    pub missing: u64,
    /// What is missing and where, in words.
    pub detail: String,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// `1.5 GiB`-style sizes for messages.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

fn stage_memory(
    p: &ModelProfile,
    o: &PlanOptions,
    layers: Range<usize>,
    embed: bool,
    head: bool,
) -> (u64, u64) {
    let weights = p.layer_bytes[layers.clone()].iter().sum::<u64>()
        + if embed { p.embed_bytes } else { 0 }
        + if head { p.head_bytes } else { 0 };
    let kv = o.kv_tokens * p.kv_bytes_per_token * layers.len() as u64;
    // Loading repacks each tensor for our kernels: while it does, the tensor exists as read
    // and as repacked (measured: up to two extra copies of the largest one at the peak).
    let largest = [
        if layers.is_empty() {
            0
        } else {
            p.largest_layer_tensor
        },
        if embed { p.embed_bytes } else { 0 },
        if head { p.head_bytes } else { 0 },
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    (weights, weights + kv + o.overhead + 2 * largest)
}

/// How many layers from `start` fit in `budget` at position `embed`/`head`.
fn capacity(
    p: &ModelProfile,
    o: &PlanOptions,
    start: usize,
    budget: u64,
    embed: bool,
    head: bool,
) -> usize {
    let mut n = 0;
    while start + n < p.layer_bytes.len() {
        let (_, need) = stage_memory(p, o, start..start + n + 1, embed, head);
        if need > budget {
            break;
        }
        n += 1;
    }
    n
}

/// `total` layers shared in proportion to speed, at least one each (largest remainders
/// get the rounding), for `workers.len() <= total`.
fn proportional_shares(total: usize, workers: &[&Candidate]) -> Vec<usize> {
    let k = workers.len();
    let sum: f64 = workers.iter().map(|w| w.speed.max(1.0)).sum();
    let exact: Vec<f64> = workers
        .iter()
        .map(|w| total as f64 * w.speed.max(1.0) / sum)
        .collect();
    let mut shares: Vec<usize> = exact.iter().map(|e| (e.floor() as usize).max(1)).collect();
    let mut by_remainder: Vec<usize> = (0..k).collect();
    by_remainder
        .sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let mut i = 0;
    while shares.iter().sum::<usize>() < total {
        shares[by_remainder[i % k]] += 1;
        i += 1;
    }
    // The minimum of one may overshoot: take back from the largest shares.
    while shares.iter().sum::<usize>() > total {
        if let Some(big) = (0..k).filter(|&j| shares[j] > 1).max_by_key(|&j| shares[j]) {
            shares[big] -= 1;
        } else {
            break;
        }
    }
    shares
}

/// Plans `profile` over `workers`.
pub fn plan(
    profile: &ModelProfile,
    workers: &[Candidate],
    options: &PlanOptions,
) -> Result<Plan, Shortfall> {
    let total_layers = profile.layer_bytes.len();
    let mut order: Vec<&Candidate> = workers.iter().collect();
    order.sort_by(|a, b| b.speed.total_cmp(&a.speed).then(a.id.cmp(&b.id)));
    let mut notes = Vec::new();
    if order.is_empty() {
        let (_, need) = stage_memory(profile, options, 0..total_layers, true, true);
        return Err(Shortfall {
            missing: need,
            detail: format!(
                "no workers: {} needs {} in all; start `strata worker` on your machines",
                profile.name,
                human(need)
            ),
        });
    }
    // Leave out workers that cannot hold even one middle layer; retry while some stage
    // ends up empty (its place as first or last changed what it must hold).
    loop {
        let k = order.len();
        if k == 0 {
            break;
        }
        if k > total_layers {
            // More workers than layers: the slowest sit this model out.
            let w = order.remove(k - 1);
            notes.push(format!("{} left out: more workers than layers", w.id));
            continue;
        }
        let shares = proportional_shares(total_layers, &order);
        let mut assigned = vec![0usize; k];
        let mut start = 0usize;
        let mut caps = vec![0usize; k];
        // Water filling: first a proportional share, capped; then leftovers by speed.
        for (i, w) in order.iter().enumerate() {
            let share = shares[i];
            let cap = capacity(profile, options, start, w.budget, i == 0, i == k - 1);
            caps[i] = cap;
            assigned[i] = share.min(cap).min(total_layers - start);
            start += assigned[i];
        }
        let mut left = total_layers - assigned.iter().sum::<usize>();
        // Hand out what is left one layer at a time to the fastest worker with room
        // (recomputing capacity, since layer positions move as counts change).
        while left > 0 {
            let mut best: Option<usize> = None;
            for i in 0..k {
                let begin: usize = assigned[..i].iter().sum();
                let room = capacity(profile, options, begin, order[i].budget, i == 0, i == k - 1);
                if room > assigned[i] {
                    let load = (assigned[i] + 1) as f64 / order[i].speed.max(1.0);
                    if best
                        .is_none_or(|b| load < (assigned[b] + 1) as f64 / order[b].speed.max(1.0))
                    {
                        best = Some(i);
                    }
                }
            }
            match best {
                Some(i) => {
                    assigned[i] += 1;
                    left -= 1;
                }
                None => break,
            }
        }
        // Validate from the final layout (positions moved while filling).
        let mut fits = left == 0;
        let mut begin = 0;
        for i in 0..k {
            let (_, need) = stage_memory(
                profile,
                options,
                begin..begin + assigned[i],
                i == 0,
                i == k - 1,
            );
            if need > order[i].budget {
                fits = false;
            }
            begin += assigned[i];
        }
        if let Some(empty) = assigned.iter().position(|&a| a == 0) {
            if k > 1 {
                let w = order.remove(empty);
                notes.push(format!(
                    "{} left out: its {} holds no layer beside the others' share",
                    w.id,
                    human(w.budget)
                ));
                continue;
            }
        }
        if !fits {
            let budget: u64 = order.iter().map(|w| w.budget).sum();
            let need: u64 = {
                let (_, n) = stage_memory(profile, options, 0..total_layers, true, true);
                n + options.overhead * (k as u64 - 1)
            };
            let missing = need.saturating_sub(budget).max(1);
            let per_worker: Vec<String> = order
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    format!(
                        "{} ({} budget, room for {} layers)",
                        w.id,
                        human(w.budget),
                        caps[i]
                    )
                })
                .collect();
            return Err(Shortfall {
                missing,
                detail: format!(
                    "the cluster cannot hold {}: it needs about {} (weights {} + KV cache for {} tokens + {} per worker) but the workers offer {}: {} missing. Every worker is full: {}. Add a machine with at least {} free, or raise --memory where the machine has room.",
                    profile.name,
                    human(need),
                    human(profile.weight_bytes()),
                    options.kv_tokens,
                    human(options.overhead),
                    human(budget),
                    human(missing),
                    per_worker.join(", "),
                    human(missing),
                ),
            });
        }
        let mut stages = Vec::with_capacity(k);
        let mut begin = 0;
        for i in 0..k {
            let layers = begin..begin + assigned[i];
            let (embed, head) = (i == 0, i == k - 1);
            let (weights, memory) = stage_memory(profile, options, layers.clone(), embed, head);
            stages.push(StagePlan {
                worker: order[i].id.clone(),
                layers,
                embed,
                head,
                weight_bytes: weights,
                memory,
                budget: order[i].budget,
                est_ms: weights as f64 / order[i].speed.max(1.0) * 1e3,
            });
            begin += assigned[i];
        }
        let sum: f64 = stages.iter().map(|s| s.est_ms).sum();
        let max = stages.iter().map(|s| s.est_ms).fold(0.0, f64::max);
        return Ok(Plan {
            est_ms_per_token: sum + (stages.len() + 1) as f64 * options.hop_ms,
            est_ms_pipelined: max + options.hop_ms,
            stages,
            notes,
        });
    }
    Err(Shortfall {
        missing: profile.weight_bytes(),
        detail: format!("no worker can hold a layer of {}", profile.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn profile(layers: usize) -> ModelProfile {
        ModelProfile {
            name: "m".into(),
            layer_bytes: vec![100 * MIB; layers],
            embed_bytes: 50 * MIB,
            head_bytes: 50 * MIB,
            kv_bytes_per_token: 1024,
            largest_layer_tensor: 40 * MIB,
        }
    }

    fn opts() -> PlanOptions {
        PlanOptions {
            kv_tokens: 1024,
            overhead: 10 * MIB,
            hop_ms: 0.5,
        }
    }

    fn w(id: &str, budget_mib: u64, speed: f64) -> Candidate {
        Candidate {
            id: id.into(),
            budget: budget_mib * MIB,
            speed,
        }
    }

    fn check_contiguous(p: &Plan, layers: usize) {
        let mut next = 0;
        for s in &p.stages {
            assert_eq!(s.layers.start, next);
            assert!(!s.layers.is_empty());
            assert!(s.memory <= s.budget, "{s:?}");
            next = s.layers.end;
        }
        assert_eq!(next, layers);
        assert!(p.stages[0].embed && p.stages.last().unwrap().head);
    }

    #[test]
    fn equal_workers_share_equally() {
        let p = plan(
            &profile(12),
            &[
                w("a", 10_000, 1e9),
                w("b", 10_000, 1e9),
                w("c", 10_000, 1e9),
            ],
            &opts(),
        )
        .unwrap();
        check_contiguous(&p, 12);
        assert_eq!(
            p.stages.iter().map(|s| s.layers.len()).collect::<Vec<_>>(),
            vec![4, 4, 4]
        );
    }

    #[test]
    fn faster_workers_take_more_and_go_first() {
        let p = plan(
            &profile(12),
            &[w("slow", 10_000, 1e9), w("fast", 10_000, 3e9)],
            &opts(),
        )
        .unwrap();
        check_contiguous(&p, 12);
        assert_eq!(p.stages[0].worker, "fast");
        assert_eq!(p.stages[0].layers.len(), 9);
        assert_eq!(p.stages[1].layers.len(), 3);
        assert!(p.est_ms_pipelined < p.est_ms_per_token);
    }

    #[test]
    fn a_small_budget_caps_a_fast_worker() {
        // "fast" would take 9 layers by speed but holds only 3 beside the embedding.
        let p = plan(
            &profile(12),
            &[w("fast", 500, 3e9), w("big", 10_000, 1e9)],
            &opts(),
        )
        .unwrap();
        check_contiguous(&p, 12);
        assert_eq!(p.stages[0].worker, "fast");
        assert_eq!(p.stages[0].layers.len(), 3);
    }

    #[test]
    fn a_slow_worker_still_gets_a_layer() {
        // By speed alone the slow one would round to zero of 6 layers.
        let p = plan(
            &profile(6),
            &[
                w("a", 10_000, 7.3e9),
                w("slow", 10_000, 2.5e9),
                w("b", 10_000, 7.6e9),
            ],
            &opts(),
        )
        .unwrap();
        check_contiguous(&p, 6);
        assert_eq!(p.stages.len(), 3);
        assert!(p.stages.iter().all(|s| !s.layers.is_empty()));
        assert_eq!(p.stages[2].worker, "slow");
        let more_workers_than_layers = plan(
            &profile(2),
            &[
                w("a", 10_000, 3e9),
                w("b", 10_000, 2e9),
                w("c", 10_000, 1e9),
            ],
            &opts(),
        )
        .unwrap();
        assert_eq!(more_workers_than_layers.stages.len(), 2);
        assert!(more_workers_than_layers.notes[0].contains("c left out"));
    }

    #[test]
    fn a_worker_too_small_for_a_layer_is_left_out() {
        let p = plan(
            &profile(4),
            &[w("a", 10_000, 1e9), w("tiny", 20, 9e9)],
            &opts(),
        )
        .unwrap();
        assert_eq!(p.stages.len(), 1);
        assert!(p.notes[0].contains("tiny"));
    }

    #[test]
    fn shortfall_says_how_much_and_where() {
        let err = plan(&profile(12), &[w("a", 500, 1e9), w("b", 500, 1e9)], &opts()).unwrap_err();
        // 12 x 100 MiB + 100 MiB embed/head + KV + overheads + load transient against 1000 MiB.
        assert!(
            err.missing > 400 * MIB && err.missing < 500 * MIB,
            "{}",
            human(err.missing)
        );
        assert!(err.detail.contains("a (500.0 MiB budget"), "{}", err.detail);
        assert!(err.detail.contains("missing"));
        let none = plan(&profile(2), &[], &opts()).unwrap_err();
        assert!(none.detail.contains("no workers"));
    }
}
