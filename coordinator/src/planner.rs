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
//!   fixed overhead, and the larger of two transients: repacking its largest tensor at
//!   load, and the activations of a full batch while it runs.
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
//! which holds the embedding (memory): the programme runs over a few orders (fastest
//! first, fastest last, and the largest budgets at the ends) and keeps the best. What it can miss is a plan that needs the
//! embedding or head on a middle-speed worker to fit at all. An integer programme would
//! be exact for per-pair links too; the programme is simpler, fast and explainable.
//!
//! Links per pair (measured when workers join, or given on paper): the programme prices
//! each hop by the link from the worker that holds the run before (the last one its best
//! partial plan used), so a worker whose links are all slow costs what it costs; then the
//! order of the chosen stages is picked for the links: every order when there are at most
//! [`EXHAUSTIVE_ORDER_STAGES`] stages, else pairwise swaps until none helps, each order
//! split anew by the programme. That is not provably exact: a unit test compares it with
//! an exhaustive search over every subset, order and split of 120 small clusters with
//! random links, and the worst plan was 2.9% slower than the optimum.
//!
//! Workers that hold a slice the planner should keep (one that came back): the programme
//! runs again with each of them allowed only its slice, over every order of up to
//! [`EXHAUSTIVE_ORDER_STAGES`] workers (else two orders, each holder placed where its
//! layers start), and that plan is taken unless the fastest one is more than
//! [`HELD_PREFERENCE`] faster.
//!
//! Every eligible worker the plan leaves out is named, with why.

use std::collections::BTreeMap;
use std::ops::Range;

/// Workers that hold slices ([`Candidate::held`]) keep them unless a plan that moves them
/// is more than this much faster: moving a slice costs loading it, and the measured speeds
/// of identical machines differ by about this much from one measurement to the next, which
/// alone should not move slices when a worker comes back.
pub const HELD_PREFERENCE: f64 = 0.15;

/// Up to this many stages, every order of them is tried for the links (6! = 720).
const EXHAUSTIVE_ORDER_STAGES: usize = 6;

/// What the planner needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelProfile {
    /// A name for messages.
    pub name: String,
    /// Weight bytes of each transformer layer, as stored (quantized).
    pub layer_bytes: Vec<u64>,
    /// The bytes of each layer that one token reads: all of them, but of a mixture of
    /// experts only the share of the experts a token runs through.
    pub active_layer_bytes: Vec<u64>,
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
    /// Bytes of activations one row of a batch keeps alive while a layer runs (see
    /// [`crate::profile::activation_bytes_per_row`]).
    pub activation_bytes_per_row: u64,
}

impl ModelProfile {
    /// Every weight byte, counting a tied head once per stage that needs it.
    pub fn weight_bytes(&self) -> u64 {
        self.layer_bytes.iter().sum::<u64>() + self.embed_bytes + self.head_bytes
    }

    /// Bytes a stage of `layers` streams per token (and the head's, when it holds it).
    pub fn streamed_bytes(&self, layers: &Range<usize>, head: bool) -> u64 {
        self.active_layer_bytes
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
    /// The layers it holds now, if any: kept unless another plan is clearly faster (see
    /// [`HELD_PREFERENCE`]).
    pub held: Option<Range<usize>>,
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

    /// Parses a named link (see [`Link::named`]) or a measured one:
    /// `100mbit`, `2.5gbit`, optionally with a one-way latency: `100mbit/0.5ms`.
    pub fn parse(text: &str) -> Option<Link> {
        if let Some(named) = Link::named(text) {
            return Some(named);
        }
        let lower = text.trim().to_ascii_lowercase();
        let (rate, latency) = match lower.split_once('/') {
            Some((r, l)) => (r, Some(l)),
            None => (lower.as_str(), None),
        };
        let bits_per_second = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)]
            .iter()
            .find_map(|(unit, scale)| {
                rate.strip_suffix(unit)
                    .and_then(|n| n.trim().parse::<f64>().ok())
                    .map(|n| n * scale)
            })?;
        let latency_ms = match latency {
            Some(l) => l.trim().strip_suffix("ms")?.trim().parse::<f64>().ok()?,
            None => Link::GBE.latency_ms,
        };
        (bits_per_second > 0.0 && latency_ms >= 0.0).then_some(Link {
            latency_ms,
            bandwidth: bits_per_second / 8.0,
        })
    }
}

/// Links of particular pairs of nodes; a link serves both directions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PairLinks {
    /// By the lesser id, then the greater (so a lookup borrows, never allocates).
    by_pair: BTreeMap<String, BTreeMap<String, Link>>,
}

impl PairLinks {
    /// The pair's own link, if it has one.
    pub fn get(&self, a: &str, b: &str) -> Option<Link> {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        self.by_pair.get(lo)?.get(hi).copied()
    }

    /// Gives the pair its own link.
    pub fn set(&mut self, a: &str, b: &str, link: Link) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        self.by_pair
            .entry(lo.to_string())
            .or_default()
            .insert(hi.to_string(), link);
    }

    /// Whether no pair has its own link.
    pub fn is_empty(&self) -> bool {
        self.by_pair.is_empty()
    }

    /// Every pair with its link: (lesser id, greater id, link).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, Link)> {
        self.by_pair
            .iter()
            .flat_map(|(a, m)| m.iter().map(move |(b, l)| (a.as_str(), b.as_str(), *l)))
    }
}

/// Knobs of planning.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Positions of KV cache reserved per layer (context times concurrency budget).
    pub kv_tokens: u64,
    /// Bytes each worker keeps for its runtime and activations.
    pub overhead: u64,
    /// The link between two nodes, unless their pair has its own in `pair_links`.
    pub link: Link,
    /// Links of particular pairs of workers (measured, or given on paper), keyed by the
    /// two ids in order; see [`PlanOptions::set_link`].
    pub pair_links: PairLinks,
    /// Bytes per activation value on the wire (4 for f32, 2 for f16/bf16).
    pub wire_bytes: u64,
    /// What to minimise.
    pub objective: Objective,
    /// A draft model that the last stage's worker holds beside its slice (speculative
    /// decoding with `--draft-on worker`); none by default.
    pub draft: DraftBytes,
}

/// What a draft model held by the last stage costs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftBytes {
    /// Memory it needs: its weights, its KV caches and its transient.
    pub memory: u64,
    /// Weight bytes it reads per token drafted.
    pub weights: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            kv_tokens: 4096,
            overhead: 48 << 20,
            link: Link::GBE,
            pair_links: PairLinks::default(),
            wire_bytes: 4,
            objective: Objective::Latency,
            draft: DraftBytes::default(),
        }
    }
}

impl PlanOptions {
    /// The link between workers `a` and `b`.
    pub fn link_between(&self, a: &str, b: &str) -> Link {
        self.pair_links.get(a, b).unwrap_or(self.link)
    }

    /// Gives the pair `a`, `b` its own link (both directions).
    pub fn set_link(&mut self, a: &str, b: &str, link: Link) {
        self.pair_links.set(a, b, link);
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
    /// `active[i]`: bytes of layers `0..i` that a token reads.
    active: Vec<u64>,
}

/// Prefix sums of `bytes`, from 0.
fn prefix_sums(bytes: &[u64]) -> Vec<u64> {
    std::iter::once(0)
        .chain(bytes.iter().scan(0u64, |sum, b| {
            *sum += b;
            Some(*sum)
        }))
        .collect()
}

impl<'a> Sizes<'a> {
    fn new(p: &'a ModelProfile, o: &'a PlanOptions) -> Self {
        let prefix = prefix_sums(&p.layer_bytes);
        // A profile without active sizes (or of another length) reads every byte.
        let active = if p.active_layer_bytes.len() == p.layer_bytes.len() {
            prefix_sums(&p.active_layer_bytes)
        } else {
            prefix.clone()
        };
        Sizes {
            p,
            o,
            prefix,
            active,
        }
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
        let transient = (2 * largest).max(self.batch_activations());
        // The last stage holds the draft model, if it is there.
        let draft = if head { o.draft.memory } else { 0 };
        (weights, weights + kv + o.overhead + transient + draft)
    }

    /// A full batch's activations, while it runs (loading's transient is over by then).
    fn batch_activations(&self) -> u64 {
        strata_net::frame::BATCH_ROWS as u64 * self.p.activation_bytes_per_row
    }

    /// Bytes a stage streams per token: its layers, and the head (an embedding lookup
    /// reads one row), and the draft model's weights where the last stage drafts (about
    /// one draft per token).
    fn streamed(&self, layers: &Range<usize>, head: bool) -> u64 {
        self.active[layers.end] - self.active[layers.start]
            + if head {
                self.p.head_bytes + self.o.draft.weights
            } else {
                0
            }
    }

    fn stage_ms(&self, w: &Candidate, layers: &Range<usize>, head: bool) -> f64 {
        self.streamed(layers, head) as f64 / w.speed.max(1.0) * 1e3
    }

    /// A token's activations on the wire.
    fn hop_bytes(&self) -> u64 {
        self.p.hidden as u64 * self.o.wire_bytes
    }

    /// A hop from worker `a` to worker `b`: a token's activations.
    fn hop_ms(&self, a: &str, b: &str) -> f64 {
        self.o.link_between(a, b).ms(self.hop_bytes())
    }

    /// What a hop takes of a busy pipeline's time per token: its bytes on the wire
    /// (latency overlaps with the other tokens in flight).
    fn hop_busy_ms(&self, a: &str, b: &str) -> f64 {
        self.hop_bytes() as f64 / self.o.link_between(a, b).bandwidth.max(1.0) * 1e3
    }

    /// The hops into stage 0 and back from the last: token ids only.
    fn ends_ms(&self) -> f64 {
        2.0 * self.o.link.latency_ms
    }
}

/// The programme's value of a partial plan, compared lexicographically: for latency, the
/// summed time; for throughput, the slowest stage or hop (a hop's bytes, not its
/// latency, which overlaps with the other tokens in flight), then how even the stages are
/// (the sum of their squared times), then the time the hops take.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cost {
    primary: f64,
    sum: f64,
    hops: f64,
}

impl Cost {
    const ZERO: Cost = Cost {
        primary: 0.0,
        sum: 0.0,
        hops: 0.0,
    };

    fn better(&self, other: &Cost) -> bool {
        (self.primary, self.sum, self.hops) < (other.primary, other.sum, other.hops)
    }

    /// This partial plan with one more stage of `ms`, reached over a hop of `hop`
    /// milliseconds (`hop_busy` of them its bytes on the wire).
    fn then(&self, objective: Objective, ms: f64, hop: f64, hop_busy: f64) -> Cost {
        match objective {
            Objective::Latency => Cost {
                primary: self.primary + ms + hop,
                sum: self.sum + ms + hop,
                hops: self.hops + hop,
            },
            // Among splits with the same slowest stage, the most even one: it keeps its
            // pace when a measured speed was off.
            Objective::Throughput => Cost {
                primary: self.primary.max(ms).max(hop_busy),
                sum: self.sum + ms * ms,
                hops: self.hops + hop,
            },
        }
    }
}

/// Stages as (index into the order, layers), in pipeline order.
type Assignment = Vec<(usize, Range<usize>)>;

/// Stages as (worker, layers), in pipeline order.
type Stages<'a> = Vec<(&'a Candidate, Range<usize>)>;

/// Whether a programme may give a worker that holds a slice other layers than those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Any run of layers, as for every worker.
    Movable,
    /// Only the layers it holds.
    Kept,
}

/// One programme, over `order`: the best assignment and its cost.
fn programme(sizes: &Sizes, order: &[&Candidate], held: Held) -> Option<(Cost, Assignment)> {
    let total = sizes.layers();
    let w = order.len();
    // best[i][l]: cover layers 0..l with a subset of order[..i]; from: how it got there;
    // last: the worker of its last stage (whose link the next hop takes).
    let mut best: Vec<Vec<Option<Cost>>> = vec![vec![None; total + 1]; w + 1];
    let mut from: Vec<Vec<Option<(usize, bool)>>> = vec![vec![None; total + 1]; w + 1];
    let mut last: Vec<Vec<Option<usize>>> = vec![vec![None; total + 1]; w + 1];
    best[0][0] = Some(Cost::ZERO);
    for i in 0..w {
        for l in 0..=total {
            let Some(cost) = best[i][l] else { continue };
            let kept = order[i].held.as_ref().filter(|_| held == Held::Kept);
            // Leave worker i out (unless it keeps what it holds).
            if kept.is_none() && best[i + 1][l].is_none_or(|b| cost.better(&b)) {
                best[i + 1][l] = Some(cost);
                from[i + 1][l] = Some((l, false));
                last[i + 1][l] = last[i][l];
            }
            let (hop, hop_busy) = match last[i][l] {
                Some(prev) => (
                    sizes.hop_ms(&order[prev].id, &order[i].id),
                    sizes.hop_busy_ms(&order[prev].id, &order[i].id),
                ),
                None => (0.0, 0.0),
            };
            // Or give it the next run of layers, as long as they fit.
            if kept.is_some_and(|h| h.start != l) {
                continue;
            }
            for end in l + 1..=total {
                let layers = l..end;
                if kept.is_some_and(|h| h.end != end) {
                    continue;
                }
                let (embed, head) = (l == 0, end == total);
                let (_, need) = sizes.memory(&layers, embed, head);
                if need > order[i].budget {
                    // A longer run (or the head with the last layer) needs more still.
                    break;
                }
                let ms = sizes.stage_ms(order[i], &layers, head);
                let next = cost.then(sizes.o.objective, ms, hop, hop_busy);
                if best[i + 1][end].is_none_or(|b| next.better(&b)) {
                    best[i + 1][end] = Some(next);
                    from[i + 1][end] = Some((l, true));
                    last[i + 1][end] = Some(i);
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

#[cfg(test)]
/// Stages as (worker, layers) in pipeline order, priced under the objective; `None` when
/// a stage does not fit its worker.
fn price(sizes: &Sizes, stages: &[(&Candidate, Range<usize>)]) -> Option<Cost> {
    let total = sizes.layers();
    let mut cost = Cost::ZERO;
    let mut prev: Option<&Candidate> = None;
    for (w, layers) in stages {
        let (embed, head) = (layers.start == 0, layers.end == total);
        if sizes.memory(layers, embed, head).1 > w.budget {
            return None;
        }
        let (hop, hop_busy) = match prev {
            Some(p) => (sizes.hop_ms(&p.id, &w.id), sizes.hop_busy_ms(&p.id, &w.id)),
            None => (0.0, 0.0),
        };
        let ms = sizes.stage_ms(w, layers, head);
        cost = cost.then(sizes.o.objective, ms, hop, hop_busy);
        prev = Some(w);
    }
    Some(cost)
}

/// The order of the chosen workers that the links favour, each order split anew by the
/// programme: every order up to [`EXHAUSTIVE_ORDER_STAGES`] workers, else swaps of two
/// while one helps.
fn order_for_links<'a>(sizes: &Sizes, chosen: Vec<&'a Candidate>) -> Option<(Cost, Stages<'a>)> {
    let split = |order: &[&'a Candidate]| split(sizes, order, Held::Movable);
    let mut order = chosen;
    let mut best = split(&order);
    let better =
        |c: &Cost, best: &Option<(Cost, _)>| best.as_ref().is_none_or(|(b, _)| c.better(b));
    if order.len() <= EXHAUSTIVE_ORDER_STAGES {
        permutations(&mut order, 0, &mut |candidate| {
            if let Some((c, stages)) = split(candidate) {
                if better(&c, &best) {
                    best = Some((c, stages));
                }
            }
        });
        return best;
    }
    let (_, stages) = best.clone()?;
    let swapped = order_by_swaps(sizes, &stages);
    let resplit: Option<Vec<&Candidate>> = swapped
        .as_ref()
        .map(|(_, s)| s.iter().map(|(w, _)| *w).collect());
    [best, swapped, resplit.and_then(|order| split(&order))]
        .into_iter()
        .flatten()
        .reduce(|a, b| if b.0.better(&a.0) { b } else { a })
}

/// Many stages: swaps two while it helps, each keeping its share of layers. The hops
/// between the chosen workers are looked up once.
fn order_by_swaps<'a>(
    sizes: &Sizes,
    stages: &[(&'a Candidate, Range<usize>)],
) -> Option<(Cost, Stages<'a>)> {
    let k = stages.len();
    let workers: Vec<&Candidate> = stages.iter().map(|(w, _)| *w).collect();
    let counts: Vec<usize> = stages.iter().map(|(_, l)| l.len()).collect();
    let mut hop = vec![(0.0, 0.0); k * k];
    for (i, a) in workers.iter().enumerate() {
        for (j, b) in workers.iter().enumerate() {
            hop[i * k + j] = (sizes.hop_ms(&a.id, &b.id), sizes.hop_busy_ms(&a.id, &b.id));
        }
    }
    // The order as indices into `workers`; each keeps its count.
    let price_order = |order: &[usize]| -> Option<Cost> {
        let (mut cost, mut start) = (Cost::ZERO, 0);
        for (n, &w) in order.iter().enumerate() {
            let layers = start..start + counts[w];
            start = layers.end;
            let (embed, head) = (layers.start == 0, layers.end == sizes.layers());
            if sizes.memory(&layers, embed, head).1 > workers[w].budget {
                return None;
            }
            let (h, busy) = if n == 0 {
                (0.0, 0.0)
            } else {
                hop[order[n - 1] * k + w]
            };
            let ms = sizes.stage_ms(workers[w], &layers, head);
            cost = cost.then(sizes.o.objective, ms, h, busy);
        }
        Some(cost)
    };
    let mut order: Vec<usize> = (0..k).collect();
    let mut cost = price_order(&order)?;
    let mut improved = true;
    while improved {
        improved = false;
        for i in 0..k {
            for j in i + 1..k {
                order.swap(i, j);
                match price_order(&order) {
                    Some(c) if c.better(&cost) => {
                        cost = c;
                        improved = true;
                    }
                    _ => order.swap(i, j),
                }
            }
        }
    }
    let swapped: Vec<(&Candidate, usize)> =
        order.iter().map(|&w| (workers[w], counts[w])).collect();
    Some((cost, lay_out(&swapped)))
}

/// The workers, each with its number of layers, laid out one after another.
fn lay_out<'a>(shares: &[(&'a Candidate, usize)]) -> Vec<(&'a Candidate, Range<usize>)> {
    let mut start = 0;
    shares
        .iter()
        .map(|(w, n)| {
            let layers = start..start + n;
            start += n;
            (*w, layers)
        })
        .collect()
}

/// Calls `visit` with every order of `items[k..]` (swaps, restored after).
fn permutations<T>(items: &mut [T], k: usize, visit: &mut dyn FnMut(&[T])) {
    if k == items.len() {
        visit(items);
        return;
    }
    for i in k..items.len() {
        items.swap(k, i);
        permutations(items, k + 1, visit);
        items.swap(k, i);
    }
}

/// The workers sorted fastest first (the lesser id first among equals).
fn fastest_first(workers: &[Candidate]) -> Vec<&Candidate> {
    let mut order: Vec<&Candidate> = workers.iter().collect();
    order.sort_by(|a, b| b.speed.total_cmp(&a.speed).then(a.id.cmp(&b.id)));
    order
}

/// The fastest plan, whatever the workers hold: the programme over a few orders, then the
/// order the links favour.
fn fastest_split<'a>(
    sizes: &Sizes,
    workers: &'a [Candidate],
) -> Result<(Cost, Stages<'a>), Shortfall> {
    let fastest_first = fastest_first(workers);
    let fastest_last: Vec<&Candidate> = fastest_first.iter().rev().copied().collect();
    // The largest budgets at the ends, where the embedding and the head go: the orders
    // that fit when only that fits.
    let mut roomiest_ends: Vec<&Candidate> = workers.iter().collect();
    roomiest_ends.sort_by(|a, b| b.budget.cmp(&a.budget).then(a.id.cmp(&b.id)));
    if roomiest_ends.len() > 2 {
        let second = roomiest_ends.remove(1);
        roomiest_ends.push(second);
    }
    let best = [&fastest_first, &fastest_last, &roomiest_ends]
        .into_iter()
        .filter_map(|order| split(sizes, order, Held::Movable))
        .reduce(|a, b| if b.0.better(&a.0) { b } else { a });
    let Some((in_speed_order, speed_ordered)) = best else {
        return Err(shortfall(sizes, &fastest_first));
    };
    if sizes.o.pair_links.is_empty() {
        return Ok((in_speed_order, speed_ordered));
    }
    let chosen = speed_ordered.iter().map(|(w, _)| *w).collect();
    Ok(match order_for_links(sizes, chosen) {
        Some((cost, stages)) if cost.better(&in_speed_order) => (cost, stages),
        _ => (in_speed_order, speed_ordered),
    })
}

/// The programme over `order`, as stages.
fn split<'a>(sizes: &Sizes, order: &[&'a Candidate], held: Held) -> Option<(Cost, Stages<'a>)> {
    let (cost, assignment) = programme(sizes, order, held)?;
    let stages = assignment
        .into_iter()
        .map(|(i, layers)| (order[i], layers))
        .collect();
    Some((cost, stages))
}

/// The fastest plan in which every worker that holds a slice keeps exactly it; `None` when
/// none holds one, or no such plan fits (two hold the same layers, say). Up to
/// [`EXHAUSTIVE_ORDER_STAGES`] workers every order is tried; beyond, two: the others
/// fastest first and fastest last, each holder among them where its layers start (in
/// proportion).
fn keeping_held<'a>(sizes: &Sizes, workers: &'a [Candidate]) -> Option<(Cost, Stages<'a>)> {
    if workers.iter().all(|w| w.held.is_none()) {
        return None;
    }
    let better =
        |c: &Cost, best: &Option<(Cost, _)>| best.as_ref().is_none_or(|(b, _)| c.better(b));
    if workers.len() <= EXHAUSTIVE_ORDER_STAGES {
        let mut all: Vec<&Candidate> = workers.iter().collect();
        let mut best = None;
        permutations(&mut all, 0, &mut |candidate| {
            if let Some((c, stages)) = split(sizes, candidate, Held::Kept) {
                if better(&c, &best) {
                    best = Some((c, stages));
                }
            }
        });
        return best;
    }
    let (mut holders, others): (Vec<&Candidate>, Vec<&Candidate>) = fastest_first(workers)
        .into_iter()
        .partition(|w| w.held.is_some());
    holders.sort_by_key(|w| w.held.as_ref().map_or(0, |h| h.start));
    let (count, total) = (workers.len(), sizes.layers().max(1));
    let with_holders = |mut order: Vec<&'a Candidate>| {
        for holder in &holders {
            let start = holder.held.as_ref().map_or(0, |h| h.start);
            order.insert((start * count / total).min(order.len()), holder);
        }
        order
    };
    let fastest_last = others.iter().rev().copied().collect();
    [with_holders(others), with_holders(fastest_last)]
        .iter()
        .filter_map(|order| split(sizes, order, Held::Kept))
        .reduce(|a, b| if b.0.better(&a.0) { b } else { a })
}

/// Plans `profile` over `workers`.
pub fn plan(
    profile: &ModelProfile,
    workers: &[Candidate],
    options: &PlanOptions,
) -> Result<Plan, Shortfall> {
    let sizes = Sizes::new(profile, options);
    let (fastest, moving) = fastest_split(&sizes, workers)?;
    let ordered = match keeping_held(&sizes, workers) {
        Some((kept, keeping)) if kept.primary <= fastest.primary * (1.0 + HELD_PREFERENCE) => {
            keeping
        }
        _ => moving,
    };
    let total = sizes.layers();
    let stages: Vec<StagePlan> = ordered
        .iter()
        .map(|(w, layers)| {
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
    let hops = hops_ms(&sizes, &stages);
    let sum: f64 = stages.iter().map(|s| s.est_ms).sum();
    let mut notes = left_out(&sizes, workers, &stages);
    notes.extend(links_note(&sizes, &stages));
    notes.extend(draft_note(options, workers, &stages));
    Ok(Plan {
        est_ms_per_token: sum + hops + sizes.ends_ms(),
        est_ms_pipelined: stages
            .iter()
            .map(|s| s.est_ms)
            .chain(
                stages
                    .windows(2)
                    .map(|p| sizes.hop_busy_ms(&p[0].worker, &p[1].worker)),
            )
            .fold(0.0, f64::max),
        stages,
        notes,
    })
}

/// With links per pair, the path a token takes and whether it avoids the slowest link
/// among the workers of the plan.
fn links_note(sizes: &Sizes, stages: &[StagePlan]) -> Option<String> {
    if sizes.o.pair_links.is_empty() || stages.len() < 2 {
        return None;
    }
    let ids: Vec<&str> = stages.iter().map(|s| s.worker.as_str()).collect();
    let mut links = ids
        .iter()
        .enumerate()
        .flat_map(|(i, a)| ids[i + 1..].iter().map(|b| sizes.o.link_between(a, b)));
    let first = links.next()?;
    if links.all(|l| l == first) {
        // The same link between every two of them: their order costs nothing more.
        return None;
    }
    let path: Vec<String> = stages
        .windows(2)
        .map(|p| {
            format!(
                "{} → {} {:.2} ms",
                p[0].worker,
                p[1].worker,
                sizes.hop_ms(&p[0].worker, &p[1].worker)
            )
        })
        .collect();
    let mut slowest: Option<(&str, &str, Link)> = None;
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            let link = sizes.o.link_between(a, b);
            if slowest.is_none_or(|(_, _, s)| link.ms(sizes.hop_bytes()) > s.ms(sizes.hop_bytes()))
            {
                slowest = Some((a, b, link));
            }
        }
    }
    // Named as the status names links: the lesser id first.
    let (a, b, link) = match slowest? {
        (a, b, link) if a <= b => (a, b, link),
        (a, b, link) => (b, a, link),
    };
    let crossed = ids
        .windows(2)
        .any(|p| (p[0], p[1]) == (a, b) || (p[0], p[1]) == (b, a));
    let slowest = format!(
        "the slowest link among them, {a}–{b} ({:.0} Mbit/s, {:.2} ms)",
        link.bandwidth * 8.0 / 1e6,
        link.latency_ms
    );
    Some(format!(
        "hops: {} ({})",
        path.join(", "),
        if crossed {
            format!("{slowest} is on the path: every order without it is slower or does not fit")
        } else {
            format!("{slowest} is avoided")
        }
    ))
}

/// The hops between a plan's stages, milliseconds a token.
fn hops_ms(sizes: &Sizes, stages: &[StagePlan]) -> f64 {
    stages
        .windows(2)
        .map(|p| sizes.hop_ms(&p[0].worker, &p[1].worker))
        .sum()
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
            stages.iter().sum::<f64>() + hops_ms(&sizes, &plan.stages) + sizes.ends_ms()
        }
        Objective::Throughput => stages.iter().copied().fold(0.0, f64::max),
    }
}

/// One stream's time per token for `plan` when its stages take `stage_ms` (in order, as
/// measured): the stages, the hops between them, and the token's trip in and back.
pub fn one_stream_ms(
    profile: &ModelProfile,
    plan: &Plan,
    stage_ms: &[f64],
    options: &PlanOptions,
) -> f64 {
    let sizes = Sizes::new(profile, options);
    stage_ms.iter().sum::<f64>() + hops_ms(&sizes, &plan.stages) + sizes.ends_ms()
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
        // Its cheapest hop from a worker of the plan.
        let hop = stages
            .iter()
            .map(|s| sizes.hop_ms(&s.worker, &w.id))
            .fold(f64::INFINITY, f64::min);
        let added = here - there + hop;
        notes.push(match sizes.o.objective {
            Objective::Latency => format!(
                "{} left out: it would add {:.1} ms/token: {} layers take {:.1} ms on it, which {} holds at {:.1} ms, plus a {:.2} ms hop",
                w.id, added, n, here, slowest.worker, there, hop
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
/// Where the draft model is, if the last stage holds one: what it takes of that stage's
/// memory and time.
fn draft_note(
    options: &PlanOptions,
    workers: &[Candidate],
    stages: &[StagePlan],
) -> Option<String> {
    let last = stages.last().filter(|_| options.draft.memory > 0)?;
    let speed = workers
        .iter()
        .find(|w| w.id == last.worker)
        .map_or(1.0, |w| w.speed.max(1.0));
    Some(format!(
        "{} also holds the draft model: {} of its {}, and {:.1} ms per drafted token",
        last.worker,
        human(options.draft.memory),
        human(last.memory),
        options.draft.weights as f64 / speed * 1e3
    ))
}

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
    // Every further stage has its own runtime and a batch's activations.
    let per_worker = o.overhead + sizes.batch_activations();
    let need = whole + per_worker * (k - 1);
    let missing = need.saturating_sub(budget).max(1);
    let mid = total / 2;
    let rooms: Vec<String> = order
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
            "the cluster cannot hold {}: it needs about {} (weights {} + KV cache for {} tokens + {} per worker for its runtime and a batch's activations{}) but the workers offer {}: {} missing. Every worker is full: {}. Add a machine with at least {} free, or raise --memory where the machine has room.",
            p.name,
            human(need),
            human(p.weight_bytes()),
            o.kv_tokens,
            human(per_worker),
            if o.draft.memory > 0 {
                format!(" + {} for the draft model on the last stage", human(o.draft.memory))
            } else {
                String::new()
            },
            human(budget),
            human(missing),
            rooms.join(", "),
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
            active_layer_bytes: vec![100 * MIB; layers],
            embed_bytes: 50 * MIB,
            head_bytes: 50 * MIB,
            kv_bytes_per_token: 1024,
            largest_layer_tensor: 40 * MIB,
            hidden: 4096,
            activation_bytes_per_row: 0,
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
            held: None,
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
    fn a_draft_model_on_the_last_stage_is_counted_in_its_memory_and_time() {
        let workers = [w("a", 1200, 1e9), w("b", 1200, 1e9)];
        let without = plan(&profile(12), &workers, &opts()).unwrap();
        let draft = DraftBytes {
            memory: 300 * MIB,
            weights: 250 * MIB,
        };
        let o = PlanOptions { draft, ..opts() };
        let with = plan(&profile(12), &workers, &o).unwrap();
        check_contiguous(&with, 12);
        let (last, last_without) = (with.stages.last().unwrap(), without.stages.last().unwrap());
        assert!(
            last.layers.len() < last_without.layers.len(),
            "the last stage makes room for the draft: {:?} against {:?}",
            shares(&with),
            shares(&without)
        );
        assert!(last.memory >= last.weight_bytes + draft.memory, "{last:?}");
        // Only the last stage holds it, and its time counts the draft's reads.
        let first = &with.stages[0];
        assert!(
            first.memory < first.weight_bytes + draft.memory,
            "{first:?}"
        );
        let per_layer_ms = 100.0 * MIB as f64 / 1e9 * 1e3;
        let expected = (last.layers.len() as f64 * per_layer_ms)
            + (50 * MIB + draft.weights) as f64 / 1e9 * 1e3;
        assert!((last.est_ms - expected).abs() < 1e-6, "{} ms", last.est_ms);
        // Where it does not fit, the shortfall says what the draft model takes.
        let tight = [w("a", 900, 1e9), w("b", 900, 1e9)];
        let err = plan(&profile(12), &tight, &o).unwrap_err();
        assert!(
            err.detail.contains("300.0 MiB for the draft model"),
            "{}",
            err.detail
        );
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
        ms + (stages - 1) as f64 * sizes.o.link.ms(sizes.hop_bytes()) + sizes.ends_ms()
    }

    fn seventy_b() -> ModelProfile {
        // Llama 3.1 70B at Q4_K_M, about 42 GB, as `profile::of_spec` computes it.
        ModelProfile {
            name: "llama-3.1-70b (q4_k_m)".into(),
            layer_bytes: vec![520_000_000; 80],
            active_layer_bytes: vec![520_000_000; 80],
            embed_bytes: 636_000_000,
            head_bytes: 636_000_000,
            kv_bytes_per_token: 8192,
            largest_layer_tensor: 143_000_000,
            hidden: 8192,
            activation_bytes_per_row: 0,
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
                held: None,
            },
            Candidate {
                id: "mac-mini".into(),
                budget: 24 * GIB,
                speed: 60e9,
                held: None,
            },
            Candidate {
                id: "linux-3090".into(),
                budget: 24 * GIB,
                speed: 450e9,
                held: None,
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
                held: None,
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
            active_layer_bytes: vec![1_900_000_000; 126],
            embed_bytes: 1_270_000_000,
            head_bytes: 1_270_000_000,
            kv_bytes_per_token: 8192,
            largest_layer_tensor: 530_000_000,
            hidden: 16384,
            activation_bytes_per_row: 0,
        };
        let workers: Vec<Candidate> = (0..100)
            .map(|i| Candidate {
                id: format!("w{i:02}"),
                budget: 16 * GIB,
                speed: (50.0 + i as f64) * 1e9,
                held: None,
            })
            .collect();
        for objective in [Objective::Latency, Objective::Throughput] {
            let mut o = PlanOptions {
                objective,
                ..PlanOptions::default()
            };
            let started = std::time::Instant::now();
            let p = plan(&m, &workers, &o).unwrap();
            let uniform = started.elapsed();
            check_contiguous(&p, 126);
            // And with a link of its own for every pair.
            for (i, a) in workers.iter().enumerate() {
                for b in &workers[i + 1..] {
                    let mbit = 100 + (i * 37 + b.id.len() * 11) % 2400;
                    o.set_link(&a.id, &b.id, Link::parse(&format!("{mbit}mbit")).unwrap());
                }
            }
            let started = std::time::Instant::now();
            let p = plan(&m, &workers, &o).unwrap();
            check_contiguous(&p, 126);
            eprintln!(
                "{objective:?}: {} stages in {uniform:?}, with per-pair links in {:?}",
                p.stages.len(),
                started.elapsed()
            );
        }
    }

    #[test]
    fn links_parse_by_name_and_by_rate() {
        assert_eq!(Link::parse("wifi"), Link::named("wifi"));
        let l = Link::parse("100mbit").unwrap();
        assert!((l.bandwidth - 12.5e6).abs() < 1.0 && l.latency_ms == Link::GBE.latency_ms);
        let l = Link::parse("2.5gbit/0.2ms").unwrap();
        assert!((l.bandwidth - 312.5e6).abs() < 1.0 && (l.latency_ms - 0.2).abs() < 1e-9);
        for bad in ["", "fast", "100", "0mbit", "100mbit/slow", "-1gbit"] {
            assert_eq!(Link::parse(bad), None, "{bad}");
        }
    }

    /// Three equal workers that each hold about a third of the model.
    fn three_thirds() -> (ModelProfile, Vec<Candidate>) {
        let m = profile(12);
        let workers = vec![w("a", 700, 1e9), w("b", 700, 1e9), w("c", 700, 1e9)];
        (m, workers)
    }

    #[test]
    fn stages_are_ordered_around_a_slow_link() {
        let (m, workers) = three_thirds();
        for objective in [Objective::Latency, Objective::Throughput] {
            let mut o = PlanOptions {
                objective,
                ..opts()
            };
            let uniform = plan(&m, &workers, &o).unwrap();
            assert_eq!(uniform.stages.len(), 3);
            o.set_link("b", "a", Link::parse("100mbit").unwrap());
            let p = plan(&m, &workers, &o).unwrap();
            check_contiguous(&p, 12);
            let order: Vec<&str> = p.stages.iter().map(|s| s.worker.as_str()).collect();
            assert!(
                order
                    .windows(2)
                    .all(|w| !(w.contains(&"a") && w.contains(&"b"))),
                "{order:?} crosses the slow link"
            );
            assert!(
                p.notes
                    .iter()
                    .any(|n| n.contains("a–b") && n.ends_with("is avoided)")),
                "{:?}",
                p.notes
            );
            // The hops are the uniform plan's: the slow link is not on the path.
            assert!(
                (p.est_ms_per_token - uniform.est_ms_per_token).abs() < 0.01,
                "{} vs {}",
                p.est_ms_per_token,
                uniform.est_ms_per_token
            );
        }
    }

    #[test]
    fn a_worker_behind_slow_links_is_left_out_when_others_hold_the_model() {
        // Four workers, any three hold the model; "d" is the fastest but reaches the
        // others only over Wi-Fi at 1 MB/s.
        let m = profile(12);
        let mut workers = vec![w("a", 700, 1e9), w("b", 700, 1e9), w("c", 700, 1e9)];
        // A layer takes about 105 ms: "d" would save about 2 ms a layer and cost about
        // 19 ms a hop.
        workers.push(w("d", 700, 1.02e9));
        let mut o = opts();
        for other in ["a", "b", "c"] {
            o.set_link("d", other, Link::parse("8mbit/3ms").unwrap());
        }
        let p = plan(&m, &workers, &o).unwrap();
        assert!(p.stages.iter().all(|s| s.worker != "d"), "{:?}", shares(&p));
        let note = p
            .notes
            .iter()
            .find(|n| n.starts_with("d left out"))
            .unwrap();
        assert!(note.contains("hop"), "{note}");
    }

    /// The best plan by brute force: every ordered subset of workers and every split.
    fn exhaustive(m: &ModelProfile, workers: &[Candidate], o: &PlanOptions) -> Option<Cost> {
        let sizes = Sizes::new(m, o);
        let total = sizes.layers();
        let mut best: Option<Cost> = None;
        let n = workers.len();
        for mask in 1u32..(1 << n) {
            let mut chosen: Vec<&Candidate> = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| &workers[i])
                .collect();
            let k = chosen.len();
            if k > total {
                continue;
            }
            permutations(&mut chosen, 0, &mut |order| {
                // Every split of `total` layers into k runs of at least one.
                let mut cuts: Vec<usize> = (1..k).collect();
                loop {
                    let mut bounds = vec![0];
                    bounds.extend(&cuts);
                    bounds.push(total);
                    let stages: Vec<(&Candidate, Range<usize>)> = order
                        .iter()
                        .zip(bounds.windows(2))
                        .map(|(w, b)| (*w, b[0]..b[1]))
                        .collect();
                    if let Some(c) = price(&sizes, &stages) {
                        if best.is_none_or(|b| c.primary < b.primary) {
                            best = Some(c);
                        }
                    }
                    // Next combination of cut points in 1..total.
                    let mut i = cuts.len();
                    loop {
                        if i == 0 {
                            return;
                        }
                        i -= 1;
                        if cuts[i] < total - (cuts.len() - i) {
                            cuts[i] += 1;
                            for j in i + 1..cuts.len() {
                                cuts[j] = cuts[j - 1] + 1;
                            }
                            break;
                        }
                    }
                }
            });
        }
        best
    }

    #[test]
    fn with_random_links_the_plan_is_within_a_few_percent_of_exhaustive_search() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 10_000) as f64 / 10_000.0
        };
        let m = ModelProfile {
            hidden: 65_536,
            ..profile(8)
        };
        let mut worst: f64 = 1.0;
        for round in 0..120 {
            let workers: Vec<Candidate> = (0..4)
                .map(|i| {
                    w(
                        &format!("w{i}"),
                        250 + (next() * 800.0) as u64,
                        0.5e9 + next() * 2e9,
                    )
                })
                .collect();
            let objective = if round % 2 == 0 {
                Objective::Latency
            } else {
                Objective::Throughput
            };
            let mut o = PlanOptions {
                objective,
                ..opts()
            };
            for a in 0..4 {
                for b in a + 1..4 {
                    let link = Link {
                        latency_ms: 0.05 + next() * 5.0,
                        bandwidth: 1e6 + next() * 500e6,
                    };
                    o.set_link(&workers[a].id, &workers[b].id, link);
                }
            }
            let best = exhaustive(&m, &workers, &o);
            let got = plan(&m, &workers, &o);
            match (best, got) {
                (None, Err(_)) => {}
                (Some(best), Ok(p)) => {
                    let ours = match objective {
                        Objective::Latency => p.est_ms_per_token - Sizes::new(&m, &o).ends_ms(),
                        Objective::Throughput => p.est_ms_pipelined,
                    };
                    worst = worst.max(ours / best.primary);
                }
                (best, got) => panic!("round {round}: exhaustive {best:?}, planner {got:?}"),
            }
        }
        eprintln!("worst ratio to the exhaustive optimum: {worst:.4}");
        assert!(worst <= 1.05, "worst ratio {worst:.4}");
    }

    #[test]
    fn held_slices_stay_unless_another_split_is_clearly_faster() {
        // Three like workers whose measured speeds differ by noise: without what they hold,
        // the split follows the noise; holding a split, they keep it.
        let m = profile(12);
        let noisy = [
            w("a", 2000, 1.08e9),
            w("b", 2000, 0.95e9),
            w("c", 2000, 1.0e9),
        ];
        let o = throughput();
        let fresh = plan(&m, &noisy, &o).unwrap();
        let held: Vec<Candidate> = noisy
            .iter()
            .zip([0..4, 4..8, 8..12])
            .map(|(c, layers)| Candidate {
                held: Some(layers),
                ..c.clone()
            })
            .collect();
        let kept = plan(&m, &held, &o).unwrap();
        assert_eq!(
            shares(&kept),
            vec![("a".into(), 4), ("b".into(), 4), ("c".into(), 4)],
            "fresh: {:?}",
            shares(&fresh)
        );
        // The estimate is the true one, not the preference's.
        assert!(kept.stages.iter().all(|s| s.est_ms > 380.0), "{kept:?}");
        // A worker twice as fast is worth the move.
        let mut fast = held.clone();
        fast[0].speed = 2.2e9;
        let moved = plan(&m, &fast, &o).unwrap();
        assert_ne!(shares(&moved), shares(&kept));
    }

    #[test]
    fn a_worker_that_comes_back_keeps_its_slice_wherever_it_lies() {
        // The workers of the plan in force hold nothing the planner keeps; the one that
        // came back holds the last layers. Whatever order their noisy speeds sort them
        // in, it is planned back where its layers are. Three workers (every order tried)
        // and nine (one order, the holder placed by where its layers start).
        let m = profile(18);
        for (count, held) in [(3, 12..18), (3, 6..12), (9, 14..16), (9, 0..2)] {
            for returning_speed in [0.9e9, 1.0e9, 1.1e9] {
                let mut workers: Vec<Candidate> = (0..count)
                    .map(|i| w(&format!("w{i}"), 2000, 1e9 + 0.05e9 * i as f64))
                    .collect();
                let returning = workers.last_mut().unwrap();
                returning.speed = returning_speed;
                returning.held = Some(held.clone());
                let p = plan(&m, &workers, &throughput()).unwrap();
                check_contiguous(&p, 18);
                let back = p
                    .stages
                    .iter()
                    .find(|s| s.worker == format!("w{}", count - 1));
                assert_eq!(back.map(|s| s.layers.clone()), Some(held.clone()), "{p:?}");
            }
        }
        // Twice as fast elsewhere, it is worth the move.
        let mut workers = vec![w("a", 2000, 2.2e9), w("b", 2000, 1e9), w("c", 2000, 1e9)];
        workers[2].held = Some(12..18);
        let p = plan(&m, &workers, &throughput()).unwrap();
        assert!(
            p.stages
                .iter()
                .all(|s| s.worker != "c" || s.layers != (12..18)),
            "{p:?}"
        );
    }
}
