//! The planner: which workers hold which contiguous layers, in which order. Pure: it
//! takes the model's sizes, the workers' budgets and speeds and the link between them, and
//! returns the plan that minimises its stated objective, or a shortfall, so every rule is
//! unit-tested without sockets or clocks.
//!
//! The cost model:
//! - a stage's time per token is the weight bytes it streams (its layers, and the head on
//!   the last stage; an embedding lookup reads one row) over the worker's measured speed;
//! - each hop costs the link's latency, and a hop between stages also the activation bytes
//!   of a token (hidden size x the wire type's bytes) over the link's bandwidth; a token
//!   crosses one hop into stage 0, one between each pair of stages, and one back;
//! - memory: a stage holds its weights, a KV cache of `kv_tokens` positions per layer, a
//!   fixed overhead, and the transient of repacking its largest tensor at load.
//!
//! The objective: by default the time per token of one stream (the stages one after
//! another, plus the hops): the fastest machines are filled first and a worker joins only
//! when what it takes off the others outweighs the hop it adds. `Objective::Throughput`
//! minimises the slowest stage instead (many concurrent streams keep every stage busy),
//! then evens out the others.
//!
//! How it is optimised: a dynamic programme over (workers considered, layers covered),
//! with workers in a fixed order, each either left out or given the next run of layers.
//! It is exact for that order, in O(workers x layers^2) (100 workers and 126 layers: a few
//! million steps). With one link model for every pair, a plan's time does not depend on
//! the order of its middle stages, only on which worker holds the head (its time) and
//! which holds the embedding (memory): the programme runs twice, fastest first and
//! fastest last, and keeps the better. What it can miss is a plan that needs the
//! embedding or head on a middle-speed worker to fit at all. An integer programme would
//! be exact for per-pair links too; the programme is simpler, fast and explainable.
//!
//! Every eligible worker the plan leaves out is named, with why.

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
    /// Hidden size: the activations of a token between two stages.
    pub hidden: usize,
}

impl ModelProfile {
    /// Every weight byte, counting a tied head once per stage that needs it.
    pub fn weight_bytes(&self) -> u64 {
        self.layer_bytes.iter().sum::<u64>() + self.embed_bytes + self.head_bytes
    }

    /// Bytes a stage of `layers` streams per token (and the head's, when it holds it).
    pub fn streamed_bytes(&self, layers: &Range<usize>, head: bool) -> u64 {
        self.layer_bytes
            .get(layers.clone())
            .map_or(0, |l| l.iter().sum::<u64>())
            + if head { self.head_bytes } else { 0 }
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

/// What a plan minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Objective {
    /// Time per token of one stream (default).
    #[default]
    Latency,
    /// The slowest stage: tokens per second of many concurrent streams.
    Throughput,
}

impl Objective {
    /// Parses `latency` or `throughput`.
    pub fn parse(s: &str) -> Option<Objective> {
        match s {
            "latency" | "single-stream" => Some(Objective::Latency),
            "throughput" => Some(Objective::Throughput),
            _ => None,
        }
    }
}

/// A network link between two nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// One-way latency of a frame, milliseconds.
    pub latency_ms: f64,
    /// Bytes per second.
    pub bandwidth: f64,
}

impl Link {
    /// Gigabit Ethernet.
    pub const GBE: Link = Link {
        latency_ms: 0.3,
        bandwidth: 117e6,
    };

    /// A named kind of link: `1gbe`, `10gbe`, `wifi`, `tb4` (Thunderbolt 4), `loopback`.
    pub fn named(name: &str) -> Option<Link> {
        let (latency_ms, bandwidth) = match name.to_ascii_lowercase().as_str() {
            "1gbe" | "gbe" => (0.3, 117e6),
            "10gbe" => (0.1, 1.17e9),
            "wifi" => (3.0, 40e6),
            "tb4" | "thunderbolt" => (0.05, 3e9),
            "loopback" => (0.03, 5e9),
            _ => return None,
        };
        Some(Link {
            latency_ms,
            bandwidth,
        })
    }

    /// Milliseconds for a frame of `bytes`.
    pub fn ms(&self, bytes: u64) -> f64 {
        self.latency_ms + bytes as f64 / self.bandwidth.max(1.0) * 1e3
    }
}

/// Knobs of planning.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Positions of KV cache reserved per layer (context times concurrency budget).
    pub kv_tokens: u64,
    /// Bytes each worker keeps for its runtime and activations.
    pub overhead: u64,
    /// The link between any two nodes.
    pub link: Link,
    /// Bytes per activation value on the wire (4 for f32, 2 for f16/bf16).
    pub wire_bytes: u64,
    /// What to minimise.
    pub objective: Objective,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            kv_tokens: 4096,
            overhead: 48 << 20,
            link: Link::GBE,
            wire_bytes: 4,
            objective: Objective::Latency,
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
    /// A busy pipeline: the slowest stage (or hop).
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

/// The model's sizes with prefix sums, so any run of layers is priced in O(1).
struct Sizes<'a> {
    p: &'a ModelProfile,
    o: &'a PlanOptions,
    /// `prefix[i]`: bytes of layers `0..i`.
    prefix: Vec<u64>,
}

impl<'a> Sizes<'a> {
    fn new(p: &'a ModelProfile, o: &'a PlanOptions) -> Self {
        let mut prefix = vec![0u64];
        for b in &p.layer_bytes {
            prefix.push(prefix.last().copied().unwrap_or(0) + b);
        }
        Sizes { p, o, prefix }
    }

    fn layers(&self) -> usize {
        self.p.layer_bytes.len()
    }

    /// Weight bytes held, and bytes needed in all, by a stage of `layers`.
    fn memory(&self, layers: &Range<usize>, embed: bool, head: bool) -> (u64, u64) {
        let (p, o) = (self.p, self.o);
        let weights = self.prefix[layers.end] - self.prefix[layers.start]
            + if embed { p.embed_bytes } else { 0 }
            + if head { p.head_bytes } else { 0 };
        let kv = o.kv_tokens * p.kv_bytes_per_token * layers.len() as u64;
        // Loading repacks each tensor for our kernels: while it does, the tensor exists as
        // read and as repacked (measured: up to two extra copies of the largest one).
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

    /// Bytes a stage streams per token: its layers, and the head (an embedding lookup
    /// reads one row).
    fn streamed(&self, layers: &Range<usize>, head: bool) -> u64 {
        self.prefix[layers.end] - self.prefix[layers.start]
            + if head { self.p.head_bytes } else { 0 }
    }

    fn stage_ms(&self, w: &Candidate, layers: &Range<usize>, head: bool) -> f64 {
        self.streamed(layers, head) as f64 / w.speed.max(1.0) * 1e3
    }

    /// A hop between two stages: a token's activations.
    fn hop_ms(&self) -> f64 {
        self.o.link.ms(self.p.hidden as u64 * self.o.wire_bytes)
    }

    /// What a hop takes of a busy pipeline's time per token: its bytes on the wire
    /// (latency overlaps with the other tokens in flight).
    fn hop_busy_ms(&self) -> f64 {
        (self.p.hidden as u64 * self.o.wire_bytes) as f64 / self.o.link.bandwidth.max(1.0) * 1e3
    }

    /// The hops into stage 0 and back from the last: token ids only.
    fn ends_ms(&self) -> f64 {
        2.0 * self.o.link.latency_ms
    }
}

/// The programme's value of a partial plan, compared lexicographically: for latency, the
/// summed time; for throughput, the slowest stage or hop (a hop's bytes, not its
/// latency, which overlaps with the other tokens in flight), then how even the stages are
/// (the sum of their squared times).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cost {
    primary: f64,
    sum: f64,
}

impl Cost {
    const ZERO: Cost = Cost {
        primary: 0.0,
        sum: 0.0,
    };

    fn better(&self, other: &Cost) -> bool {
        (self.primary, self.sum) < (other.primary, other.sum)
    }
}

/// Stages as (index into the order, layers), in pipeline order.
type Assignment = Vec<(usize, Range<usize>)>;

/// One programme, over `order`: the best assignment and its cost.
fn programme(sizes: &Sizes, order: &[&Candidate]) -> Option<(Cost, Assignment)> {
    let total = sizes.layers();
    let w = order.len();
    // best[i][l]: cover layers 0..l with a subset of order[..i]; from: how it got there.
    let mut best: Vec<Vec<Option<Cost>>> = vec![vec![None; total + 1]; w + 1];
    let mut from: Vec<Vec<Option<(usize, bool)>>> = vec![vec![None; total + 1]; w + 1];
    best[0][0] = Some(Cost::ZERO);
    for i in 0..w {
        for l in 0..=total {
            let Some(cost) = best[i][l] else { continue };
            // Leave worker i out.
            if best[i + 1][l].is_none_or(|b| cost.better(&b)) {
                best[i + 1][l] = Some(cost);
                from[i + 1][l] = Some((l, false));
            }
            // Or give it the next run of layers, as long as they fit.
            for end in l + 1..=total {
                let layers = l..end;
                let (embed, head) = (l == 0, end == total);
                let (_, need) = sizes.memory(&layers, embed, head);
                if need > order[i].budget {
                    // A longer run (or the head with the last layer) needs more still.
                    break;
                }
                let ms = sizes.stage_ms(order[i], &layers, head);
                let hop = if l > 0 { sizes.hop_ms() } else { 0.0 };
                let next = match sizes.o.objective {
                    Objective::Latency => Cost {
                        primary: cost.sum + ms + hop,
                        sum: cost.sum + ms + hop,
                    },
                    // Among splits with the same slowest stage, the most even one: it keeps
                    // its pace when a measured speed was off.
                    Objective::Throughput => Cost {
                        primary: cost.primary.max(ms).max(sizes.hop_busy_ms()),
                        sum: cost.sum + ms * ms,
                    },
                };
                if best[i + 1][end].is_none_or(|b| next.better(&b)) {
                    best[i + 1][end] = Some(next);
                    from[i + 1][end] = Some((l, true));
                }
            }
        }
    }
    let cost = best[w][total]?;
    let mut stages = Vec::new();
    let (mut i, mut l) = (w, total);
    while i > 0 {
        let (prev, used) = from[i][l]?;
        if used {
            stages.push((i - 1, prev..l));
        }
        l = prev;
        i -= 1;
    }
    stages.reverse();
    Some((cost, stages))
}

/// Plans `profile` over `workers`.
pub fn plan(
    profile: &ModelProfile,
    workers: &[Candidate],
    options: &PlanOptions,
) -> Result<Plan, Shortfall> {
    let sizes = Sizes::new(profile, options);
    let mut fastest_first: Vec<&Candidate> = workers.iter().collect();
    fastest_first.sort_by(|a, b| b.speed.total_cmp(&a.speed).then(a.id.cmp(&b.id)));
    let fastest_last: Vec<&Candidate> = fastest_first.iter().rev().copied().collect();
    let best = [&fastest_first, &fastest_last]
        .into_iter()
        .filter_map(|order| programme(&sizes, order).map(|(c, s)| (c, order, s)))
        .reduce(|a, b| if b.0.better(&a.0) { b } else { a });
    let Some((_, order, assignment)) = best else {
        return Err(shortfall(&sizes, &fastest_first));
    };
    let total = sizes.layers();
    let stages: Vec<StagePlan> = assignment
        .iter()
        .map(|(i, layers)| {
            let w = order[*i];
            let (embed, head) = (layers.start == 0, layers.end == total);
            let (weight_bytes, memory) = sizes.memory(layers, embed, head);
            StagePlan {
                worker: w.id.clone(),
                layers: layers.clone(),
                embed,
                head,
                weight_bytes,
                memory,
                budget: w.budget,
                est_ms: sizes.stage_ms(w, layers, head),
            }
        })
        .collect();
    let hops = stages.len().saturating_sub(1) as f64 * sizes.hop_ms();
    let sum: f64 = stages.iter().map(|s| s.est_ms).sum();
    let slowest = stages.iter().map(|s| s.est_ms).fold(0.0, f64::max);
    let notes = left_out(&sizes, workers, &stages);
    Ok(Plan {
        est_ms_per_token: sum + hops + sizes.ends_ms(),
        est_ms_pipelined: slowest.max(if stages.len() > 1 {
            sizes.hop_busy_ms()
        } else {
            0.0
        }),
        stages,
        notes,
    })
}

/// `plan`'s value under its objective with `workers`' speeds now: the single-stream time
/// per token, or the slowest stage (a worker the plan uses but `workers` lacks counts as
/// infinitely slow).
pub fn estimate(
    profile: &ModelProfile,
    plan: &Plan,
    workers: &[Candidate],
    options: &PlanOptions,
) -> f64 {
    let sizes = Sizes::new(profile, options);
    let stages: Vec<f64> = plan
        .stages
        .iter()
        .map(|s| match workers.iter().find(|w| w.id == s.worker) {
            Some(w) => sizes.stage_ms(w, &s.layers, s.head),
            None => f64::INFINITY,
        })
        .collect();
    match options.objective {
        Objective::Latency => {
            stages.iter().sum::<f64>()
                + plan.stages.len().saturating_sub(1) as f64 * sizes.hop_ms()
                + sizes.ends_ms()
        }
        Objective::Throughput => stages.iter().copied().fold(0.0, f64::max),
    }
}

/// A plan's own value under `objective` (what [`estimate`] gives for it as planned).
pub fn value(plan: &Plan, objective: Objective) -> f64 {
    match objective {
        Objective::Latency => plan.est_ms_per_token,
        Objective::Throughput => plan.stages.iter().map(|s| s.est_ms).fold(0.0, f64::max),
    }
}

/// Why each worker the plan does not use is left out.
fn left_out(sizes: &Sizes, workers: &[Candidate], stages: &[StagePlan]) -> Vec<String> {
    let Some(slowest) = stages.iter().max_by(|a, b| {
        (a.est_ms / a.layers.len().max(1) as f64)
            .total_cmp(&(b.est_ms / b.layers.len().max(1) as f64))
    }) else {
        return Vec::new();
    };
    let per_layer = slowest.est_ms / slowest.layers.len().max(1) as f64;
    let mut notes = Vec::new();
    for w in workers {
        if stages.iter().any(|s| s.worker == w.id) {
            continue;
        }
        // The layers it could hold as a middle stage.
        let mid = sizes.layers() / 2;
        let mut n = 0;
        while mid + n < sizes.layers()
            && sizes.memory(&(mid..mid + n + 1), false, false).1 <= w.budget
        {
            n += 1;
        }
        if n == 0 {
            notes.push(format!(
                "{} left out: its {} budget holds no layer of {} (a layer needs about {})",
                w.id,
                human(w.budget),
                sizes.p.name,
                human(sizes.memory(&(mid..mid + 1), false, false).1)
            ));
            continue;
        }
        let n = n.min(slowest.layers.len());
        let here = sizes.stage_ms(w, &(mid..mid + n), false);
        let there = per_layer * n as f64;
        let added = here - there + sizes.hop_ms();
        notes.push(match sizes.o.objective {
            Objective::Latency => format!(
                "{} left out: it would add {:.1} ms/token: {} layers take {:.1} ms on it, which {} holds at {:.1} ms, plus a {:.2} ms hop",
                w.id, added, n, here, slowest.worker, there, sizes.hop_ms()
            ),
            Objective::Throughput => format!(
                "{} left out: no split with it has a faster slowest stage ({} layers take {:.1} ms on it)",
                w.id, n, here
            ),
        });
    }
    notes
}

/// What is missing when no plan fits.
fn shortfall(sizes: &Sizes, order: &[&Candidate]) -> Shortfall {
    let p = sizes.p;
    let o = sizes.o;
    let total = sizes.layers();
    let (_, whole) = sizes.memory(&(0..total), true, true);
    if order.is_empty() {
        return Shortfall {
            missing: whole,
            detail: format!(
                "no workers: {} needs {} in all; start `strata worker` on your machines",
                p.name,
                human(whole)
            ),
        };
    }
    let k = order.len() as u64;
    let budget: u64 = order.iter().map(|w| w.budget).sum();
    let need = whole + o.overhead * (k - 1);
    let missing = need.saturating_sub(budget).max(1);
    let mid = total / 2;
    let per_worker: Vec<String> = order
        .iter()
        .map(|w| {
            let mut n = 0;
            while mid + n < total && sizes.memory(&(mid..mid + n + 1), false, false).1 <= w.budget {
                n += 1;
            }
            format!(
                "{} ({} budget, room for {} layers)",
                w.id,
                human(w.budget),
                n
            )
        })
        .collect();
    Shortfall {
        missing,
        detail: format!(
            "the cluster cannot hold {}: it needs about {} (weights {} + KV cache for {} tokens + {} per worker) but the workers offer {}: {} missing. Every worker is full: {}. Add a machine with at least {} free, or raise --memory where the machine has room.",
            p.name,
            human(need),
            human(p.weight_bytes()),
            o.kv_tokens,
            human(o.overhead),
            human(budget),
            human(missing),
            per_worker.join(", "),
            human(missing),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn profile(layers: usize) -> ModelProfile {
        ModelProfile {
            name: "m".into(),
            layer_bytes: vec![100 * MIB; layers],
            embed_bytes: 50 * MIB,
            head_bytes: 50 * MIB,
            kv_bytes_per_token: 1024,
            largest_layer_tensor: 40 * MIB,
            hidden: 4096,
        }
    }

    fn opts() -> PlanOptions {
        PlanOptions {
            kv_tokens: 1024,
            overhead: 10 * MIB,
            ..PlanOptions::default()
        }
    }

    fn throughput() -> PlanOptions {
        PlanOptions {
            objective: Objective::Throughput,
            ..opts()
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

    fn shares(p: &Plan) -> Vec<(String, usize)> {
        p.stages
            .iter()
            .map(|s| (s.worker.clone(), s.layers.len()))
            .collect()
    }

    #[test]
    fn one_stream_is_fastest_on_one_machine_that_holds_it_all() {
        let workers = [
            w("a", 10_000, 1e9),
            w("b", 10_000, 1e9),
            w("c", 10_000, 1e9),
        ];
        let p = plan(&profile(12), &workers, &opts()).unwrap();
        check_contiguous(&p, 12);
        assert_eq!(p.stages.len(), 1, "every extra stage only adds a hop");
        assert_eq!(p.notes.len(), 2);
        assert!(
            p.notes.iter().all(|n| n.contains("would add")),
            "{:?}",
            p.notes
        );
        // Many streams: every machine works, equal shares.
        let p = plan(&profile(12), &workers, &throughput()).unwrap();
        check_contiguous(&p, 12);
        assert_eq!(
            p.stages.iter().map(|s| s.layers.len()).collect::<Vec<_>>(),
            [4, 4, 4]
        );
    }

    #[test]
    fn for_throughput_faster_workers_take_more() {
        let workers = [w("slow", 10_000, 1e9), w("fast", 10_000, 3e9)];
        let p = plan(&profile(12), &workers, &throughput()).unwrap();
        check_contiguous(&p, 12);
        let fast = p.stages.iter().find(|s| s.worker == "fast").unwrap();
        assert_eq!(fast.layers.len(), 9, "{:?}", shares(&p));
        assert!(p.est_ms_pipelined < p.est_ms_per_token);
        let one = plan(&profile(12), &workers, &opts()).unwrap();
        assert_eq!(shares(&one), [("fast".to_string(), 12)]);
    }

    #[test]
    fn a_small_fast_worker_is_filled_and_the_rest_goes_to_the_next_fastest() {
        // "fast" holds 3 layers beside the embedding; each layer there saves 70 ms.
        let p = plan(
            &profile(12),
            &[w("fast", 500, 3e9), w("big", 10_000, 1e9)],
            &opts(),
        )
        .unwrap();
        check_contiguous(&p, 12);
        let fast = p.stages.iter().find(|s| s.worker == "fast").unwrap();
        assert!(fast.layers.len() >= 3, "{:?}", shares(&p));
        assert_eq!(p.stages.len(), 2);
    }

    #[test]
    fn a_slow_worker_that_would_slow_a_stream_is_left_out_with_the_reason() {
        let workers = [
            w("a", 10_000, 7.3e9),
            w("slow", 10_000, 2.5e9),
            w("b", 10_000, 7.6e9),
        ];
        let p = plan(&profile(6), &workers, &opts()).unwrap();
        check_contiguous(&p, 6);
        assert!(p.stages.iter().all(|s| s.worker != "slow"));
        let note = p.notes.iter().find(|n| n.starts_with("slow")).unwrap();
        assert!(
            note.contains("would add") && note.contains("ms/token"),
            "{note}"
        );
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
        assert!(p.notes[0].contains("tiny") && p.notes[0].contains("holds no layer"));
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

    /// The fastest split the cost model allows when machines are filled fastest first:
    /// each takes as many layers as it holds, then the hops.
    fn fastest_first_reference(p: &ModelProfile, workers: &[Candidate], o: &PlanOptions) -> f64 {
        let sizes = Sizes::new(p, o);
        let mut order: Vec<&Candidate> = workers.iter().collect();
        order.sort_by(|a, b| b.speed.total_cmp(&a.speed));
        let (mut start, mut ms, mut stages) = (0, 0.0, 0);
        for w in order {
            let mut end = start;
            while end < sizes.layers()
                && sizes
                    .memory(&(start..end + 1), start == 0, end + 1 == sizes.layers())
                    .1
                    <= w.budget
            {
                end += 1;
            }
            if end > start {
                ms += sizes.stage_ms(w, &(start..end), end == sizes.layers());
                stages += 1;
                start = end;
            }
            if start == sizes.layers() {
                break;
            }
        }
        ms + (stages - 1) as f64 * sizes.hop_ms() + sizes.ends_ms()
    }

    fn seventy_b() -> ModelProfile {
        // Llama 3.1 70B at Q4_K_M, about 42 GB, as `profile::of_spec` computes it.
        ModelProfile {
            name: "llama-3.1-70b (q4_k_m)".into(),
            layer_bytes: vec![520_000_000; 80],
            embed_bytes: 636_000_000,
            head_bytes: 636_000_000,
            kv_bytes_per_token: 8192,
            largest_layer_tensor: 143_000_000,
            hidden: 8192,
        }
    }

    #[test]
    fn the_mixed_home_lab_gets_the_split_its_fastest_machines_allow() {
        // The lab (speeds at half the memory bandwidth, as on paper).
        let lab = [
            Candidate {
                id: "mac-studio".into(),
                budget: 64 * GIB,
                speed: 200e9,
            },
            Candidate {
                id: "mac-mini".into(),
                budget: 24 * GIB,
                speed: 60e9,
            },
            Candidate {
                id: "linux-3090".into(),
                budget: 24 * GIB,
                speed: 450e9,
            },
        ];
        let m = seventy_b();
        let o = PlanOptions::default();
        let p = plan(&m, &lab, &o).unwrap();
        check_contiguous(&p, 80);
        let reference = fastest_first_reference(&m, &lab, &o);
        assert!(
            p.est_ms_per_token <= reference * 1.10,
            "{:.1} ms against {:.1} ms filling the fastest first: {:?}",
            p.est_ms_per_token,
            reference,
            shares(&p)
        );
        assert!(
            p.stages.iter().all(|s| s.worker != "mac-mini"),
            "{:?}",
            shares(&p)
        );
        assert!(
            p.notes.iter().any(|n| n.starts_with("mac-mini left out")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn a_hundred_workers_use_the_fastest_few_and_name_the_rest() {
        let workers: Vec<Candidate> = (0..100)
            .map(|i| Candidate {
                id: format!("w{i:02}"),
                budget: 16 * GIB,
                speed: (57.0 + (750.0 - 57.0) * (i as f64 * 7.0 % 100.0) / 99.0) * 1e9 / 2.0,
            })
            .collect();
        let m = seventy_b();
        let o = PlanOptions::default();
        let p = plan(&m, &workers, &o).unwrap();
        check_contiguous(&p, 80);
        let reference = fastest_first_reference(&m, &workers, &o);
        assert!(
            p.est_ms_per_token <= reference * 1.10,
            "{} vs {reference}",
            p.est_ms_per_token
        );
        assert!(p.stages.len() <= 4, "{:?}", shares(&p));
        assert_eq!(p.notes.len(), 100 - p.stages.len());
    }

    #[test]
    fn a_405b_plan_over_a_hundred_workers() {
        let m = ModelProfile {
            name: "llama-3.1-405b (q4_k_m)".into(),
            layer_bytes: vec![1_900_000_000; 126],
            embed_bytes: 1_270_000_000,
            head_bytes: 1_270_000_000,
            kv_bytes_per_token: 8192,
            largest_layer_tensor: 530_000_000,
            hidden: 16384,
        };
        let workers: Vec<Candidate> = (0..100)
            .map(|i| Candidate {
                id: format!("w{i:02}"),
                budget: 16 * GIB,
                speed: (50.0 + i as f64) * 1e9,
            })
            .collect();
        for objective in [Objective::Latency, Objective::Throughput] {
            let o = PlanOptions {
                objective,
                ..PlanOptions::default()
            };
            let p = plan(&m, &workers, &o).unwrap();
            check_contiguous(&p, 126);
        }
    }
}
