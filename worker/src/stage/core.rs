//! The stage core: frames in, one batched forward through the slice, frames out. It owns
//! the loaded slice, every sequence's KV cache and (on the last stage) each sequence's
//! sampler and token history. Plain Rust with no sockets, threads or clocks: the compute
//! thread ([`super::thread`]) feeds it what is waiting and sends what it returns, and the
//! simulated pipeline drives it directly.
//!
//! Rules it keeps:
//! - a frame of another epoch is refused with a failure for each of its sequences, sent
//!   on in that frame's own epoch (so it reaches a coordinator that ignores stale news);
//! - a step that starts at 0 (a prompt, or a replayed history) resets the sequence's cache
//!   and, on the last stage, its sampler at the random-stream position it carries;
//! - each step names the run (attempt) of its sequence: steps of a run the stage has moved
//!   past fail quietly in their own attempt, and a step that repeats one already run (a
//!   duplicated frame) is skipped, so late and doubled frames change nothing;
//! - wiring a new epoch drops every cache: sequences come back by replay;
//! - a run reserves the positions its step says it may reach (`Step::reserve`) when it
//!   starts, and the reservations may not exceed the positions the plan gave the stage
//!   (`Wiring::kv_positions`): a run that does not fit, or a step past its reservation,
//!   fails, so the cache never grows past what the plan counted;
//! - a piece of a longer prompt (`Step::partial`) is cached and reported done by the last
//!   stage, which samples only after the last piece;
//! - a last stage that holds a draft model drafts after a step's tokens as many as the step
//!   asks (`Step::draft_next`), with a drafter of each sequence's own, and sends them with
//!   the tokens for the sequence's next step: no hop to the coordinator and back;
//! - nothing is dropped silently: whatever cannot run becomes a failure that travels on.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use strata_model::draft::DraftModel;
use strata_model::{
    Chunk, Drafter, KvCache, LogitRows, ModelDrafter, Sampler, SeqId, Slice, Stage, StageInput,
    StageOutput, WireType,
};
use strata_net::frame::{
    Activations, Frame, NextDrafts, Prefilled, Sampled, SamplerStart, SeqFailure, Step, StepEnergy,
};

/// Most positions of history a sequence's drafter catches up on in one step (after a long
/// prompt, or a replay): drafting runs in the last stage's batch, and a whole history at
/// once would hold up every other answer's tokens, which prompts' pieces exist to prevent.
const DRAFT_CATCH_UP: usize = 256;

/// Where the stage's output goes: its epoch and the activations' wire type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wiring {
    /// Plan epoch.
    pub epoch: u64,
    /// Activations' wire type.
    pub wire: WireType,
    /// KV positions per layer the plan gave this stage (0: no limit).
    pub kv_positions: usize,
}

/// A last-stage sequence's sampler and the tokens it has seen (for the repeat penalty).
struct SequenceSampler {
    sampler: Sampler,
    history: Vec<u32>,
    /// Its drafter, once a step asked for drafts ([`Step::draft_next`]).
    drafter: Option<ModelDrafter>,
}

struct Loaded {
    stage: Stage,
    cache: KvCache,
    samplers: HashMap<SeqId, SequenceSampler>,
    /// The run (attempt) each cached sequence is on.
    attempts: HashMap<SeqId, u32>,
    /// Positions each cached sequence may reach.
    reserved: HashMap<SeqId, Reserved>,
    /// Where each sequence's verified positions end: after them come drafts (positions a
    /// later step may drop), if its last step carried any.
    verified: HashMap<SeqId, usize>,
}

/// A run's hold on the stage's KV budget.
#[derive(Debug, Clone, Copy)]
struct Reserved {
    positions: usize,
    /// Said by the coordinator (`Step::reserve`); otherwise it grows with the cache.
    fixed: bool,
}

impl Loaded {
    fn forget(&mut self, seq: SeqId) {
        self.cache.free(seq);
        self.samplers.remove(&seq);
        self.attempts.remove(&seq);
        self.reserved.remove(&seq);
        self.verified.remove(&seq);
    }

    fn clear(&mut self) {
        self.cache = self.stage.new_cache();
        self.samplers.clear();
        self.attempts.clear();
        self.reserved.clear();
        self.verified.clear();
    }

    /// A step of the run the sequence is on: it runs where its cache ends (within its
    /// reservation), and what it already ran is a duplicate.
    ///
    /// Positions past the sequence's last verified one hold drafts: a step may start among
    /// them, which drops the positions from its start on (the drafts that were rejected).
    /// One that starts before the verified positions end repeats a step already run.
    fn continuation(&mut self, step: &Step, cached: usize, budget: usize) -> Admission {
        let (start, end) = (step.start as usize, step.start as usize + step.len());
        let verified = self.verified.get(&step.seq).copied().unwrap_or(cached);
        let repeat = start < verified.min(cached);
        if repeat && end <= cached {
            return Admission::Duplicate;
        }
        if repeat || start > cached {
            return Admission::Refuse(format!(
                "sequence {} continues at {start} but its cache holds {cached} positions",
                step.seq
            ));
        }
        if start < cached {
            if let Err(e) = self.cache.truncate(step.seq, start) {
                return Admission::Refuse(format!("dropping rejected drafts: {e}"));
            }
        }
        match self.reserved.get(&step.seq).copied() {
            Some(r) if r.fixed && end > r.positions => Admission::Refuse(format!(
                "sequence {} goes to position {end} past the {} it reserved",
                step.seq, r.positions
            )),
            Some(r) if r.fixed => Admission::Run,
            _ => match self.reserve(step.seq, end, false, budget) {
                Ok(()) => Admission::Run,
                Err(e) => Admission::Refuse(e),
            },
        }
    }

    /// Where a step that runs leaves its sequence's verified positions: before its drafts.
    fn note_verified(&mut self, step: &Step, admission: &Admission) {
        if let Admission::Run = admission {
            let end = step.start as usize + step.len() - step.draft as usize;
            self.verified.insert(step.seq, end);
        }
    }

    /// A new run of a sequence (a step from position 0): its reservation, its cache
    /// (allocated once at the reserved size: it never doubles past what the plan counted)
    /// and, on the last stage, its sampler where the step says the random stream stands.
    fn start_run(&mut self, step: &Step, budget: usize) -> Admission {
        self.forget(step.seq);
        let fixed = step.reserve > 0;
        let end = (step.reserve as usize).max(step.len());
        if let Err(e) = self.reserve(step.seq, end, fixed, budget) {
            return Admission::Refuse(e);
        }
        self.cache
            .create_with_capacity(step.seq, if fixed { end } else { 0 });
        self.attempts.insert(step.seq, step.attempt);
        if self.stage.slice().head {
            let start = step.sampler.clone().unwrap_or(SamplerStart {
                params: Default::default(),
                rng_position: 0,
            });
            match Sampler::resume(start.params, start.rng_position) {
                Ok(sampler) => {
                    self.samplers.insert(
                        step.seq,
                        SequenceSampler {
                            sampler,
                            history: Vec::new(),
                            drafter: None,
                        },
                    );
                }
                Err(e) => {
                    self.forget(step.seq);
                    return Admission::Refuse(e.to_string());
                }
            }
        }
        Admission::Run
    }

    /// Positions reserved by every sequence but `seq`.
    fn reserved_by_others(&self, seq: SeqId) -> usize {
        self.reserved
            .iter()
            .filter(|(s, _)| **s != seq)
            .map(|(_, r)| r.positions)
            .sum()
    }

    /// Reserves positions up to `end` for `seq` (a new run's whole reservation, or a
    /// sequence whose reservation grows as it goes), within `budget` (0: no limit).
    fn reserve(
        &mut self,
        seq: SeqId,
        end: usize,
        fixed: bool,
        budget: usize,
    ) -> Result<(), String> {
        let others = self.reserved_by_others(seq);
        if budget > 0 && others + end > budget {
            return Err(format!(
                "its KV budget is full: {others} of {budget} positions are reserved by {} other \
                 sequence(s), and this one needs {end}; the coordinator admits requests within \
                 the budget, so this is a bug or a coordinator of another plan",
                self.reserved.len() - usize::from(self.reserved.contains_key(&seq))
            ));
        }
        self.reserved.insert(
            seq,
            Reserved {
                positions: end,
                fixed,
            },
        );
        Ok(())
    }
}

/// What to do with one step.
enum Admission {
    /// Run it.
    Run,
    /// It repeats a step already run: skip it.
    Duplicate,
    /// It cannot run: this failure goes to its sequence.
    Refuse(String),
}

/// One stage's state machine.
pub struct StageCore {
    name: String,
    loaded: Option<Loaded>,
    wiring: Option<Wiring>,
    /// A draft model to draft with on the last stage ([`Step::draft_next`]).
    draft_model: Option<DraftModel>,
}

/// The steps of one batch, admitted, with their inputs.
struct Admitted {
    steps: Vec<Step>,
    tokens: Vec<u32>,
    hidden: Vec<Tensor>,
}

impl StageCore {
    /// An empty stage named `name` (for messages).
    pub fn new(name: impl Into<String>) -> Self {
        StageCore {
            name: name.into(),
            loaded: None,
            wiring: None,
            draft_model: None,
        }
    }

    /// Holds `model` to draft with as the last stage (None: drafts nothing). Sequences'
    /// drafters start over with it.
    pub fn install_draft_model(&mut self, model: Option<DraftModel>) {
        self.draft_model = model;
        if let Some(l) = &mut self.loaded {
            for s in l.samplers.values_mut() {
                s.drafter = None;
            }
        }
    }

    /// Replaces the slice; every cache, and the draft model sent for it, go with the old one.
    pub fn install(&mut self, stage: Stage) {
        self.draft_model = None;
        let cache = stage.new_cache();
        self.loaded = Some(Loaded {
            stage,
            cache,
            samplers: HashMap::new(),
            attempts: HashMap::new(),
            reserved: HashMap::new(),
            verified: HashMap::new(),
        });
    }

    /// Drops the slice, the draft model, the caches and the wiring.
    pub fn unload(&mut self) {
        self.loaded = None;
        self.wiring = None;
        self.draft_model = None;
    }

    /// Wires the output for `wiring.epoch`. A new epoch drops every cache: the sequences
    /// that live on come back by replay.
    pub fn wire(&mut self, wiring: Wiring) {
        if self.wiring.map(|w| w.epoch) != Some(wiring.epoch) {
            if let Some(l) = &mut self.loaded {
                l.clear();
            }
        }
        self.wiring = Some(wiring);
    }

    /// The slice held, if any.
    pub fn slice(&self) -> Option<&Slice> {
        self.loaded.as_ref().map(|l| l.stage.slice())
    }

    /// The epoch wired, if any.
    pub fn epoch(&self) -> Option<u64> {
        self.wiring.map(|w| w.epoch)
    }

    /// Sequences with a cache here.
    pub fn sequences(&self) -> usize {
        self.loaded.as_ref().map_or(0, |l| l.cache.num_sequences())
    }

    /// Runs everything that is waiting as one batch; returns the frames for the next hop
    /// (empty when the stage is not wired: there is nowhere to send).
    pub fn handle(&mut self, frames: Vec<Frame>) -> Vec<Frame> {
        let Some(wiring) = self.wiring else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut failures = Vec::new();
        let mut frees = Vec::new();
        let mut steps = Vec::new();
        let mut inputs = Vec::new();
        for frame in frames {
            if frame.epoch() != wiring.epoch {
                out.extend(self.refuse_stale(frame, wiring.epoch));
                continue;
            }
            match frame {
                Frame::Free { seqs, .. } => frees.extend(seqs),
                Frame::Forward {
                    steps: s,
                    activations,
                    failures: f,
                    ..
                } => {
                    failures.extend(f);
                    inputs.push((s.len(), activations));
                    steps.extend(s);
                }
                Frame::Tokens { failures: f, .. } => {
                    // Tokens flow to the coordinator only; pass their failures on.
                    failures.extend(f);
                }
            }
        }
        if !frees.is_empty() {
            if let Some(free) = self.free(frees, wiring.epoch) {
                out.push(free);
            }
        }
        if let Some(frame) = self.forward(steps, inputs, failures, wiring) {
            out.push(frame);
        }
        out
    }

    fn fail(&self, step: &Step, what: impl std::fmt::Display) -> SeqFailure {
        SeqFailure {
            seq: step.seq,
            attempt: step.attempt,
            message: format!("{}: {what}", self.name),
        }
    }

    fn is_last(&self) -> bool {
        self.loaded.as_ref().is_none_or(|l| l.stage.slice().head)
    }

    /// A frame of another epoch: its sequences fail, in that epoch.
    fn refuse_stale(&self, frame: Frame, wired: u64) -> Option<Frame> {
        let epoch = frame.epoch();
        let mut failures = match frame {
            Frame::Forward {
                steps, failures, ..
            } => {
                let mut f = failures;
                f.extend(steps.iter().map(|s| {
                    self.fail(
                        s,
                        format!(
                            "refused a step of plan epoch {epoch}: this stage runs epoch {wired}"
                        ),
                    )
                }));
                f
            }
            Frame::Tokens { failures, .. } => failures,
            // Caches of another epoch are gone already.
            Frame::Free { .. } => Vec::new(),
        };
        if failures.is_empty() {
            return None;
        }
        failures.truncate(strata_net::frame::MAX_CHUNKS);
        Some(self.failures_frame(epoch, failures))
    }

    /// Failures alone, in the frame kind the next hop expects.
    fn failures_frame(&self, epoch: u64, failures: Vec<SeqFailure>) -> Frame {
        if self.is_last() {
            Frame::Tokens {
                epoch,
                tokens: Vec::new(),
                prefilled: Vec::new(),
                freed: Vec::new(),
                failures,
                energy: Vec::new(),
                drafts: Vec::new(),
            }
        } else {
            Frame::Forward {
                epoch,
                steps: Vec::new(),
                activations: None,
                failures,
            }
        }
    }

    /// Drops the sequences' caches here, and passes the news down the pipeline; the last
    /// stage tells the coordinator that every stage has dropped them (only then may their
    /// KV reservations go to other requests: a new run that overtook the free would find
    /// the budget still taken).
    fn free(&mut self, seqs: Vec<SeqId>, epoch: u64) -> Option<Frame> {
        if let Some(l) = &mut self.loaded {
            for seq in &seqs {
                l.forget(*seq);
            }
        }
        Some(if self.is_last() {
            Frame::Tokens {
                epoch,
                tokens: Vec::new(),
                prefilled: Vec::new(),
                freed: seqs,
                failures: Vec::new(),
                energy: Vec::new(),
                drafts: Vec::new(),
            }
        } else {
            Frame::Free { epoch, seqs }
        })
    }

    /// Admits the steps, runs them as one forward and builds the frame for the next hop.
    fn forward(
        &mut self,
        steps: Vec<Step>,
        inputs: Vec<(usize, Option<Activations>)>,
        mut failures: Vec<SeqFailure>,
        wiring: Wiring,
    ) -> Option<Frame> {
        if steps.is_empty() {
            return (!failures.is_empty()).then(|| self.failures_frame(wiring.epoch, failures));
        }
        let admitted = match self.loaded.is_some() {
            true => self.admit(steps, inputs, &mut failures),
            false => {
                failures.extend(steps.iter().map(|s| self.fail(s, "holds no slice")));
                None
            }
        };
        let Some(admitted) = admitted else {
            return Some(self.failures_frame(wiring.epoch, failures));
        };
        let output = self.run(&admitted);
        let frame = match output {
            Ok(StageOutput::Hidden(t)) => {
                self.activations_frame(admitted.steps, &t, failures, wiring)
            }
            Ok(StageOutput::Logits(logits)) => {
                self.tokens_frame(admitted.steps, &logits, failures, wiring)
            }
            Err(e) => {
                if let Some(l) = &mut self.loaded {
                    for s in &admitted.steps {
                        l.forget(s.seq);
                    }
                }
                failures.extend(
                    admitted
                        .steps
                        .iter()
                        .map(|s| self.fail(s, format!("forward failed: {e}"))),
                );
                self.failures_frame(wiring.epoch, failures)
            }
        };
        Some(frame)
    }

    fn run(&mut self, a: &Admitted) -> strata_model::Result<StageOutput> {
        let Some(l) = &mut self.loaded else {
            return Err(strata_model::Error::InvalidBatch("no slice".into()));
        };
        let chunks: Vec<Chunk> = a
            .steps
            .iter()
            .map(|s| Chunk {
                seq: s.seq,
                start: s.start as usize,
                len: s.len(),
            })
            .collect();
        let input = if l.stage.slice().embed {
            StageInput::Tokens(a.tokens.clone())
        } else {
            StageInput::Hidden(Tensor::cat(&a.hidden, 0)?)
        };
        // A step with drafts needs the logits after each of its drafts' positions too.
        let tails = a.steps.iter().map(|s| 1 + s.draft as usize).collect();
        l.stage
            .forward_scoring(&chunks, input, &mut l.cache, LogitRows::LastOf(tails))
    }

    /// Checks each step against its sequence's cache, resets sequences that start over,
    /// and gathers the batch's input. Steps that cannot run become failures.
    fn admit(
        &mut self,
        steps: Vec<Step>,
        inputs: Vec<(usize, Option<Activations>)>,
        failures: &mut Vec<SeqFailure>,
    ) -> Option<Admitted> {
        let mut admitted = Admitted {
            steps: Vec::new(),
            tokens: Vec::new(),
            hidden: Vec::new(),
        };
        let mut in_batch = std::collections::HashSet::new();
        let mut steps = steps.into_iter();
        for (count, activations) in inputs {
            let group: Vec<Step> = steps.by_ref().take(count).collect();
            let rows = match self.frame_rows(&group, activations.as_ref()) {
                Ok(rows) => rows,
                Err(message) => {
                    failures.extend(group.iter().map(|s| self.fail(s, &message)));
                    continue;
                }
            };
            let mut row = 0;
            for step in group {
                let this_row = row;
                row += step.len();
                if in_batch.contains(&step.seq) {
                    // A second step of one sequence in a batch: a duplicated frame.
                    continue;
                }
                match self.admission(&step) {
                    Admission::Run => {}
                    Admission::Duplicate => continue,
                    Admission::Refuse(message) => {
                        failures.push(self.fail(&step, message));
                        continue;
                    }
                }
                match &rows {
                    Some(t) => match t.narrow(0, this_row, step.len()) {
                        Ok(part) => admitted.hidden.push(part),
                        Err(e) => {
                            failures.push(self.fail(&step, e));
                            continue;
                        }
                    },
                    None => admitted.tokens.extend(&step.tokens),
                }
                in_batch.insert(step.seq);
                admitted.steps.push(step);
            }
        }
        (!admitted.steps.is_empty()).then_some(admitted)
    }

    /// A frame's activations as an F32 tensor `[rows, hidden]` (None for token ids).
    fn frame_rows(
        &self,
        steps: &[Step],
        activations: Option<&Activations>,
    ) -> Result<Option<Tensor>, String> {
        let l = self.loaded.as_ref().ok_or("holds no slice")?;
        let hidden = l.stage.config().hidden_size;
        let first = l.stage.slice().embed;
        match (first, activations) {
            (true, None) => Ok(None),
            (true, Some(_)) => Err("the first stage got activations instead of token ids".into()),
            (false, None) => Err("got token ids, but this stage needs activations".into()),
            (false, Some(a)) if a.hidden as usize != hidden => Err(format!(
                "activations of width {} for a model of hidden size {hidden}",
                a.hidden
            )),
            (false, Some(a)) => {
                let rows: usize = steps.iter().map(Step::len).sum();
                a.wire
                    .decode(&a.bytes, rows, hidden, &Device::Cpu)
                    .map(Some)
                    .map_err(|e| format!("bad activations: {e}"))
            }
        }
    }

    /// Whether a step runs: a new run of its sequence must start at 0 (which resets the
    /// cache, and the sampler on the last stage); the current run must continue exactly
    /// where its cache ends, and what it already ran is a duplicate.
    fn admission(&mut self, step: &Step) -> Admission {
        let budget = self.wiring.map_or(0, |w| w.kv_positions);
        let Some(l) = &mut self.loaded else {
            return Admission::Refuse("holds no slice".into());
        };
        let context = l.stage.config().max_position_embeddings;
        let (start, len) = (step.start as usize, step.len());
        if step.draft as usize >= len || (step.draft > 0 && step.partial) {
            return Admission::Refuse(format!(
                "a draft of {} in a step of {len} positions{}",
                step.draft,
                if step.partial {
                    " that is a prompt piece"
                } else {
                    ""
                }
            ));
        }
        if start + len > context {
            return Admission::Refuse(format!(
                "positions {start}..{} exceed the context of {context} tokens",
                start + len
            ));
        }
        let cached = l.cache.len(step.seq).ok();
        match l.attempts.get(&step.seq).copied() {
            Some(current) if step.attempt < current => {
                return Admission::Refuse(format!(
                    "a step of run {} of sequence {}, which is on run {current}",
                    step.attempt, step.seq
                ))
            }
            Some(current) if step.attempt == current => {
                let admission = l.continuation(step, cached.unwrap_or(0), budget);
                l.note_verified(step, &admission);
                return admission;
            }
            _ => {}
        }
        if start != 0 {
            return Admission::Refuse(format!(
                "no cache for run {} of sequence {} (it was freed, or this stage restarted)",
                step.attempt, step.seq
            ));
        }
        let admission = l.start_run(step, budget);
        l.note_verified(step, &admission);
        admission
    }

    fn activations_frame(
        &self,
        steps: Vec<Step>,
        t: &Tensor,
        mut failures: Vec<SeqFailure>,
        wiring: Wiring,
    ) -> Frame {
        let hidden = t.dim(1).unwrap_or(0) as u32;
        match wiring.wire.encode(t) {
            Ok(bytes) => Frame::Forward {
                epoch: wiring.epoch,
                // Later stages need no sampler: the last one gets it from the step.
                steps,
                activations: Some(Activations {
                    wire: wiring.wire,
                    hidden,
                    bytes,
                }),
                failures,
            },
            Err(e) => {
                failures.extend(
                    steps
                        .iter()
                        .map(|s| self.fail(s, format!("encoding activations: {e}"))),
                );
                self.failures_frame(wiring.epoch, failures)
            }
        }
    }

    fn tokens_frame(
        &mut self,
        steps: Vec<Step>,
        logits: &Tensor,
        mut failures: Vec<SeqFailure>,
        wiring: Wiring,
    ) -> Frame {
        let rows = match logits.to_vec2::<f32>() {
            Ok(r) => r,
            Err(e) => {
                failures.extend(
                    steps
                        .iter()
                        .map(|s| self.fail(s, format!("reading logits: {e}"))),
                );
                return self.failures_frame(wiring.epoch, failures);
            }
        };
        // What the steps that ran cost the stages before; the compute thread adds this
        // stage's share.
        let energy = steps
            .iter()
            .map(|s| StepEnergy {
                seq: s.seq,
                attempt: s.attempt,
                energy_uj: s.energy_uj,
            })
            .collect();
        let mut tokens = Vec::with_capacity(steps.len());
        let mut prefilled = Vec::new();
        let mut drafts = Vec::new();
        let mut rows = rows.iter();
        for step in &steps {
            // One row of logits per step, and one more per draft (`Stage::forward_scoring`
            // was asked for them).
            let step_rows: Vec<&Vec<f32>> = rows.by_ref().take(1 + step.draft as usize).collect();
            if step.partial {
                match self.absorb(step) {
                    Ok(()) => prefilled.push(Prefilled {
                        seq: step.seq,
                        end: step.start + step.len() as u32,
                        attempt: step.attempt,
                    }),
                    Err(message) => failures.push(self.fail(step, message)),
                }
                continue;
            }
            match self.sample(step, &step_rows) {
                Ok(sampled) => {
                    if let Some(last) = sampled.last() {
                        drafts.extend(self.draft_after(step, last));
                    }
                    tokens.extend(sampled);
                }
                Err(message) => failures.push(self.fail(step, message)),
            }
        }
        Frame::Tokens {
            epoch: wiring.epoch,
            tokens,
            prefilled,
            freed: Vec::new(),
            failures,
            energy,
            drafts,
        }
    }

    /// Drafts for the sequence's next step after `last`, the step's last token, as many as
    /// the step asks, with the draft model the stage holds: what its own drafter proposes
    /// after the history and `last`, drawn with the sampler where `last` left it. None
    /// when the step asks none, the stage holds no draft model, or the drafter has no guess.
    fn draft_after(&mut self, step: &Step, last: &Sampled) -> Option<NextDrafts> {
        let model = self.draft_model.as_ref().filter(|_| step.draft_next > 0)?;
        let l = self.loaded.as_mut()?;
        let reserved = l.reserved.get(&step.seq).map_or(0, |r| r.positions);
        let s = l.samplers.get_mut(&step.seq)?;
        let params = s.sampler.params();
        if params.stop_token_ids.contains(&last.token) {
            return None; // the answer ends here
        }
        let (penalty, window) = (params.repeat_penalty, params.repeat_window);
        let drafter = s.drafter.get_or_insert_with(|| {
            model
                .drafter()
                .with_repeat_penalty(penalty, window)
                .catching_up_by(DRAFT_CATCH_UP)
                .reserving(reserved)
        });
        s.history.push(last.token);
        let drafts = drafter.propose_for(&s.history, step.draft_next as usize, &s.sampler);
        s.history.pop();
        (!drafts.is_empty()).then(|| NextDrafts {
            seq: step.seq,
            attempt: step.attempt,
            position: last.position + 1,
            drafts,
        })
    }

    /// A piece of a prompt reached the last stage: its tokens join the sampler's history
    /// (for the repeat penalty), and nothing is sampled.
    fn absorb(&mut self, step: &Step) -> Result<(), String> {
        let l = self.loaded.as_mut().ok_or("holds no slice")?;
        let s = l
            .samplers
            .get_mut(&step.seq)
            .ok_or_else(|| format!("no sampler for sequence {}", step.seq))?;
        s.history.extend(&step.tokens);
        Ok(())
    }

    /// Samples after the step's first token and after each of its drafts (`logits` holds
    /// one row for each): the drafts it keeps, then the token after them, or in place of
    /// the first it drops ([`Sampler::sample_drafts`], judging drafts drawn at random by
    /// what they were drawn from). The history keeps only the accepted tokens.
    fn sample(&mut self, step: &Step, logits: &[&Vec<f32>]) -> Result<Vec<Sampled>, String> {
        let l = self.loaded.as_mut().ok_or("holds no slice")?;
        let s = l
            .samplers
            .get_mut(&step.seq)
            .ok_or_else(|| format!("no sampler for sequence {}", step.seq))?;
        let first = step.len() - step.draft as usize;
        // Drafts a previous step left beyond this one's start were rejected.
        s.history.truncate(step.start as usize);
        s.history.extend(&step.tokens[..first]);
        let rows: Vec<&[f32]> = logits.iter().map(|r| r.as_slice()).collect();
        let sampled = s
            .sampler
            .sample_drafts(
                &rows,
                &step.tokens[first..],
                &step.drawn_from,
                &mut s.history,
            )
            .map_err(|e| format!("sampling: {e}"))?;
        Ok(sampled
            .into_iter()
            .enumerate()
            .map(|(i, (t, rng_position))| Sampled {
                seq: step.seq,
                position: step.start + (first + i) as u32,
                token: t.token,
                logprob: t.logprob,
                top: t.top_logprobs,
                rng_position,
                attempt: step.attempt,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use strata_model::synth::{write_model, SynthDType, SynthFormat, SynthOptions, SynthSpec};
    use strata_model::{Arch, ModelFile, SamplingParams};

    fn last_stage(dir: &std::path::Path) -> StageCore {
        let spec = SynthSpec::tiny(Arch::Llama);
        let opts = SynthOptions {
            format: SynthFormat::Gguf,
            dtype: SynthDType::F32,
            shard_bytes: None,
        };
        let report = write_model(&spec, &opts, &dir.join("m.gguf")).unwrap();
        let file = ModelFile::open(&report.path).unwrap();
        let stage = Stage::load(&file, Slice::full(spec.layers), &Device::Cpu).unwrap();
        let mut core = StageCore::new("w1");
        core.install(stage);
        core.wire(Wiring {
            epoch: 1,
            wire: WireType::F32,
            kv_positions: 16,
        });
        core
    }

    fn forward(epoch: u64, seq: SeqId, start: u32, tokens: Vec<u32>, attempt: u32) -> Frame {
        reserving(epoch, seq, start, tokens, attempt, 0, false)
    }

    fn reserving(
        epoch: u64,
        seq: SeqId,
        start: u32,
        tokens: Vec<u32>,
        attempt: u32,
        reserve: u32,
        partial: bool,
    ) -> Frame {
        Frame::Forward {
            epoch,
            steps: vec![Step {
                seq,
                start,
                tokens,
                sampler: (start == 0).then(|| SamplerStart {
                    params: SamplingParams::default(),
                    rng_position: 0,
                }),
                attempt,
                reserve,
                partial,
                draft: 0,
                drawn_from: Vec::new(),
                draft_next: 0,
                energy_uj: Some(0),
            }],
            activations: None,
            failures: Vec::new(),
        }
    }

    fn prefilled(out: &[Frame]) -> Vec<Prefilled> {
        out.iter()
            .flat_map(|f| match f {
                Frame::Tokens { prefilled, .. } => prefilled.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn runs_reserve_within_the_budget_and_pieces_are_cached_without_sampling() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = last_stage(dir.path());
        // A piece of a prompt: cached and reported, nothing sampled.
        let out = core.handle(vec![reserving(1, 1, 0, vec![1, 2, 3], 0, 10, true)]);
        assert!(sampled(&out).is_empty());
        assert_eq!(
            prefilled(&out),
            vec![Prefilled {
                seq: 1,
                end: 3,
                attempt: 0
            }]
        );
        // 10 of 16 positions are reserved: a run that needs 8 more does not fit.
        let out = core.handle(vec![reserving(1, 2, 0, vec![4], 0, 8, false)]);
        let f = failures(&out);
        assert!(f[0].1.message.contains("KV budget is full"), "{f:?}");
        // The last piece samples.
        let out = core.handle(vec![reserving(1, 1, 3, vec![5], 0, 10, false)]);
        assert_eq!(sampled(&out)[0].position, 4);
        // Past its reservation, a step fails rather than growing the cache.
        let out = core.handle(vec![forward(1, 1, 4, vec![6; 7], 0)]);
        let f = failures(&out);
        assert!(f[0].1.message.contains("past the 10 it reserved"), "{f:?}");
        // Freed, its positions are there for the next run; the last stage says so.
        let out = core.handle(vec![Frame::Free {
            epoch: 1,
            seqs: vec![1],
        }]);
        assert!(matches!(&out[..], [Frame::Tokens { freed, .. }] if freed == &vec![1]));
        let out = core.handle(vec![reserving(1, 2, 0, vec![4], 0, 8, false)]);
        assert_eq!(sampled(&out).len(), 1);
    }

    fn sampled(out: &[Frame]) -> Vec<Sampled> {
        out.iter()
            .flat_map(|f| match f {
                Frame::Tokens { tokens, .. } => tokens.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn failures(out: &[Frame]) -> Vec<(u64, SeqFailure)> {
        out.iter()
            .flat_map(|f| match f {
                Frame::Tokens {
                    epoch, failures, ..
                } => failures.iter().map(|x| (*epoch, x.clone())).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// A step of `tokens` from `start` with `params`, whose last `draft` tokens are drafts,
    /// asking the last stage for `draft_next` drafts for the next.
    fn drafting_step(
        start: u32,
        tokens: Vec<u32>,
        params: &SamplingParams,
        draft: u32,
        draft_next: u32,
    ) -> Frame {
        let mut frame = forward(1, 7, start, tokens, 0);
        if let Frame::Forward { steps, .. } = &mut frame {
            let step = &mut steps[0];
            if let Some(sampler) = &mut step.sampler {
                sampler.params = params.clone();
            }
            step.draft = draft;
            step.draft_next = draft_next;
        }
        frame
    }

    fn next_drafts(out: &[Frame]) -> Vec<NextDrafts> {
        out.iter()
            .flat_map(|f| match f {
                Frame::Tokens { drafts, .. } => drafts.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_last_stage_with_a_draft_model_drafts_what_the_coordinator_would_after_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = last_stage(dir.path());
        let asked = |params: &SamplingParams| drafting_step(0, vec![1, 2, 3], params, 0, 3);
        let greedy = SamplingParams::default();
        // Without a draft model, a step that asks for drafts gets none.
        assert!(next_drafts(&core.handle(vec![asked(&greedy)])).is_empty());
        core.handle(vec![Frame::Free {
            epoch: 1,
            seqs: vec![7],
        }]);
        // The model drafts for itself.
        let file = ModelFile::open(dir.path().join("m.gguf")).unwrap();
        let layers = file.config().num_layers;
        let whole = Stage::load(&file, Slice::full(layers), &Device::Cpu).unwrap();
        let model = DraftModel::new(whole, file.config().vocab_size);
        core.install_draft_model(Some(model.clone()));
        let sampled_params = SamplingParams {
            temperature: 0.9,
            repeat_penalty: 1.2,
            seed: 5,
            ..Default::default()
        };
        for params in [&greedy, &sampled_params] {
            let out = core.handle(vec![asked(params)]);
            let token = sampled(&out)[0].clone();
            let drafts = next_drafts(&out);
            assert_eq!(drafts.len(), 1);
            let d = &drafts[0];
            assert_eq!((d.seq, d.attempt, d.position), (7, 0, 4));
            // What a drafter on the coordinator makes after the same history, with the
            // sampler where the token left it.
            let sampler = Sampler::resume(params.clone(), token.rng_position).unwrap();
            let expected = model
                .drafter()
                .with_repeat_penalty(params.repeat_penalty, params.repeat_window)
                .propose_for(&[1, 2, 3, token.token], 3, &sampler);
            assert_eq!(d.drafts, expected, "{params:?}");
            assert_eq!(d.drafts.drawn_from.is_empty(), params.temperature == 0.0);
            // Greedy, the next step keeps every draft: they are the model's own picks.
            if params.temperature == 0.0 {
                let mut tokens = vec![token.token];
                tokens.extend(&d.drafts.tokens);
                let out = core.handle(vec![drafting_step(3, tokens, params, 3, 2)]);
                assert_eq!(sampled(&out).len(), 4, "every draft kept, and one more");
                assert_eq!(next_drafts(&out)[0].position, 8);
            }
            core.handle(vec![Frame::Free {
                epoch: 1,
                seqs: vec![7],
            }]);
        }
        // An answer whose token is one of its stop tokens ends there: no drafts after it.
        let out = core.handle(vec![asked(&greedy)]);
        let stop = sampled(&out)[0].token;
        core.handle(vec![Frame::Free {
            epoch: 1,
            seqs: vec![7],
        }]);
        let stopping = SamplingParams {
            stop_token_ids: vec![stop],
            ..Default::default()
        };
        assert!(next_drafts(&core.handle(vec![asked(&stopping)])).is_empty());
    }

    #[test]
    fn stale_epochs_fail_in_their_own_epoch_and_doubles_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = last_stage(dir.path());
        let first = core.handle(vec![forward(1, 7, 0, vec![1, 2, 3], 0)]);
        let token = sampled(&first)[0].clone();
        assert_eq!((token.position, token.attempt), (3, 0));
        // The same prompt again (a duplicated frame): skipped, nothing sampled or failed.
        let again = core.handle(vec![forward(1, 7, 0, vec![1, 2, 3], 0)]);
        assert!(sampled(&again).is_empty() && failures(&again).is_empty());
        // A frame of epoch 0 is refused in epoch 0.
        let stale = core.handle(vec![forward(0, 8, 0, vec![1], 0)]);
        let f = failures(&stale);
        assert_eq!(f[0].0, 0);
        assert!(f[0].1.message.contains("epoch 0"), "{f:?}");
        // The next step, twice in one batch: runs once.
        let step = forward(1, 7, 3, vec![token.token], 0);
        let out = core.handle(vec![step.clone(), step]);
        assert_eq!(sampled(&out).len(), 1);
        assert_eq!(core.sequences(), 1);
    }

    #[test]
    fn a_new_run_replaces_the_old_and_late_steps_of_the_old_fail_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = last_stage(dir.path());
        let t = sampled(&core.handle(vec![forward(1, 7, 0, vec![1, 2, 3], 0)]))[0].token;
        // A replay (run 1) of the history, then a late step of run 0.
        let replay = core.handle(vec![forward(1, 7, 0, vec![1, 2, 3, t], 1)]);
        assert_eq!(sampled(&replay)[0].attempt, 1);
        let late = core.handle(vec![forward(1, 7, 3, vec![t], 0)]);
        let f = failures(&late);
        assert_eq!((f.len(), f[0].1.attempt), (1, 0));
        // A gap in the current run is a failure of that run.
        let gap = core.handle(vec![forward(1, 7, 9, vec![t], 1)]);
        assert_eq!(failures(&gap)[0].1.attempt, 1);
        // Wiring a new epoch drops every cache.
        core.wire(Wiring {
            epoch: 2,
            wire: WireType::F32,
            kv_positions: 16,
        });
        assert_eq!(core.sequences(), 0);
    }
}
