//! The sequence core: one answer's state machine, plain Rust with no sockets, tasks or
//! clocks (`now` is passed in), in the shape of quinn-proto's `Connection`.
//!
//! It owns the sequence's whole history: the prompt, every accepted token, and the
//! sampler's state (the random stream's position; the repeat window is the history
//! itself). Events come in ([`Event`]: a pipeline to run on, a sampled token, a failure,
//! a lost stage, the client leaving, time passing) and actions go out ([`Action`]: a step
//! to send, text for the client, the end, caches to free).
//!
//! Every run of the sequence starts the same way: the whole history from position 0, which
//! (re)builds every stage's cache and restarts the last stage's sampler where the random
//! stream stood. A history longer than [`ModelLimits::prefill_chunk`] goes in pieces, one
//! in flight at a time: the last stage caches each piece and reports it done, and samples
//! after the last one. So no stage runs one forward over a long prompt (which would stall
//! every other answer in its batch, and its memory would grow with the prompt), and other
//! answers' decode steps ride in the same batches as the pieces. The first run is the prompt; after a stage is lost, the
//! same step replays the prompt and the accepted tokens on the new pipeline, and the answer
//! continues with the tokens it would have had: the model's forward is batch-invariant, so
//! the replayed caches are bit-identical to the ones decoding built.
//!
//! Tokens and failures are accepted only from the sequence's current pipeline and run
//! (`attempt`), at the position it expects: late, duplicated and reordered news changes
//! nothing.

use std::time::{Duration, Instant};

use strata_model::{DraftLength, Drafter, Drafts, SamplingParams, SeqId, StreamDecoder, Tokenizer};
use strata_net::frame::{NextDrafts, Prefilled, Sampled, SamplerStart, SeqFailure, Step};

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The model's context is full.
    ContextFull,
}

impl FinishReason {
    /// Its word in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context",
        }
    }
}

/// What a client asked for, tokenized and validated.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least one).
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Stop strings (non-empty ones).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Return each token's log-probability.
    pub logprobs: bool,
}

/// What the model fixes for every sequence.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    /// End-of-sequence tokens.
    pub eos: Vec<u32>,
    /// Context length in tokens.
    pub context: usize,
    /// Most positions one step of a prompt or replay carries.
    pub prefill_chunk: usize,
}

/// Timings and counts of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// From the request's arrival to its first token (0 when there was none).
    pub time_to_first_token_ms: f64,
    /// Tokens per second after the first.
    pub decode_tokens_per_second: f64,
    /// Draft tokens sent to be verified (speculative decoding; 0 without a drafter).
    pub draft_tokens: usize,
    /// Of those, the ones the model accepted.
    pub accepted_draft_tokens: usize,
    /// Passes through the pipeline that gave tokens (the prompt's last, then each step).
    pub passes: usize,
    /// Joules the stages spent on it, from their energy counters; None when a stage has
    /// none (the session fills it in: the core does not see energy).
    pub energy_joules: Option<f64>,
}

impl Usage {
    /// Accepted drafts per draft sent (0 when none was sent).
    pub fn acceptance_rate(&self) -> f64 {
        if self.draft_tokens == 0 {
            0.0
        } else {
            self.accepted_draft_tokens as f64 / self.draft_tokens as f64
        }
    }

    /// Tokens generated per pass through the pipeline (1 without drafts).
    pub fn tokens_per_pass(&self) -> f64 {
        if self.passes == 0 {
            0.0
        } else {
            self.completion_tokens as f64 / self.passes as f64
        }
    }
}

/// One token of the answer, as the client gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// Text that became visible (may be empty: held back for a stop string, or half a
    /// character).
    pub text: String,
    /// The token.
    pub token: u32,
    /// Its log-probability and the alternatives, when asked for.
    pub logprob: Option<TokenLogprob>,
    /// Set on the last delta.
    pub finish: Option<(FinishReason, Usage)>,
}

/// A sampled token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token and its log-probability.
    pub token: (u32, f32),
    /// The most likely tokens at its position, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why an answer failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SequenceError {
    /// A stage could not run it.
    #[error("{0}")]
    Stage(String),
    /// It lost its pipeline and no other could take it in time.
    #[error("{reason}; no pipeline could take the answer over within {waited:?}: {detail}")]
    Unrecovered {
        /// What was lost.
        reason: String,
        /// How long it waited.
        waited: Duration,
        /// Why the cluster is not serving.
        detail: String,
    },
    /// The cluster did not serve in time for a new answer to start.
    #[error("the cluster is not serving after {waited:?}: {detail}")]
    NotServing {
        /// How long it waited.
        waited: Duration,
        /// Why the cluster is not serving.
        detail: String,
    },
    /// No token came for so long that the pipeline must be stuck.
    #[error("no token for {0:?}: the pipeline is stuck")]
    Stuck(Duration),
    /// Detokenizing failed.
    #[error("detokenizing: {0}")]
    Detokenize(String),
    /// It waited for room in the KV cache, and gave its place up to a smaller request.
    #[error("{message}")]
    Busy {
        /// What to tell the client.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
}

/// News for a sequence.
#[derive(Debug)]
pub enum Event<'a> {
    /// A pipeline is serving with plan `epoch`: a waiting sequence (re)starts on it.
    Pipeline {
        /// Its plan epoch.
        epoch: u64,
    },
    /// The last stage sampled a token (in a frame of plan `epoch`).
    Token {
        /// The frame's epoch.
        epoch: u64,
        /// The token.
        sampled: &'a Sampled,
    },
    /// The last stage, which holds the draft model, drafted for the sequence's next step
    /// (in a frame of plan `epoch`, before the tokens they follow).
    Drafts {
        /// The frame's epoch.
        epoch: u64,
        /// The drafts.
        drafts: &'a NextDrafts,
    },
    /// The last stage cached a piece of the history (in a frame of plan `epoch`).
    Prefilled {
        /// The frame's epoch.
        epoch: u64,
        /// What it cached.
        done: Prefilled,
    },
    /// A stage could not run the sequence.
    Failure {
        /// The frame's epoch.
        epoch: u64,
        /// What went wrong.
        failure: &'a SeqFailure,
    },
    /// The pipeline of plan `epoch` lost a stage (a worker died, hung or dropped off).
    StageLost {
        /// The pipeline.
        epoch: u64,
        /// What happened, naming the worker.
        reason: String,
    },
    /// The client hung up.
    ClientGone,
    /// The client stopped reading and others wait for KV-cache room: the step the sequence
    /// last asked for was held back, not sent, so nothing of it is in flight. It gives its
    /// caches up and pauses, keeping its history.
    Preempt,
    /// The client of a paused sequence reads again and its room in the KV cache is back:
    /// it waits for a pipeline, where it replays its history.
    Resume,
    /// It waited for room and is refused after all (see [`SequenceError::Busy`]).
    Refused {
        /// What to tell the client.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// Time passed: deadlines are checked.
    Tick,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this step to stage 0 of the pipeline of plan `epoch`.
    Send {
        /// The pipeline.
        epoch: u64,
        /// The step.
        step: Step,
    },
    /// Give the client this token.
    Deliver(Delta),
    /// Free the sequence's caches on the pipeline of plan `epoch`.
    Free {
        /// The pipeline.
        epoch: u64,
    },
    /// Tell the client it failed.
    Fail(SequenceError),
}

/// How an answer ended, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Finished normally.
    Finished(FinishReason),
    /// The client left.
    Cancelled,
    /// It failed.
    Failed,
}

/// Deadlines of a sequence.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// How long a new sequence waits for the cluster to serve.
    pub ready: Duration,
    /// How long a sequence that lost its pipeline waits for another (`--recover-wait`).
    pub recover: Duration,
    /// How long one step may take before the pipeline counts as stuck (a backstop: hangs
    /// are detected by the workers' watchdogs much sooner).
    pub step: Duration,
    /// How long a cancelled sequence waits for its step in flight before freeing.
    pub cancel: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            ready: Duration::from_secs(120),
            recover: Duration::from_secs(60),
            step: Duration::from_secs(300),
            cancel: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
enum Phase {
    /// Needs a pipeline: new, or its pipeline lost a stage (`lost` says how).
    Waiting {
        since: Instant,
        lost: Option<String>,
    },
    /// A step is in flight on the pipeline of plan `epoch`; it ends at position `upto`,
    /// and `drafts` follow to be verified (each one accepted moves `upto` on by one).
    Running {
        epoch: u64,
        sent_at: Instant,
        upto: usize,
        drafts: Vec<u32>,
    },
    /// The client left while a step was in flight: free once it lands.
    Cancelling { epoch: u64, since: Instant },
    /// Preempted: no caches anywhere, the history kept, until the client reads again.
    Paused,
    /// Over.
    Done(Outcome),
}

/// The text the client has seen, and what is held back for stop strings.
#[derive(Debug, Default)]
struct TextStream {
    decoder: StreamDecoder,
    text: String,
    sent: usize,
}

/// One sequence's state machine.
#[derive(Debug)]
pub struct SequenceCore {
    id: SeqId,
    request: SequenceRequest,
    limits: ModelLimits,
    deadlines: Deadlines,
    /// Prompt and accepted tokens.
    history: Vec<u32>,
    /// The sampler's random-stream position after the last accepted token.
    rng_position: u64,
    /// Which run: 0 first, one more for each replay.
    attempt: u32,
    phase: Phase,
    text: TextStream,
    started: Instant,
    first_token_at: Option<Instant>,
    replays: u32,
    drafting: Option<Drafting>,
    passes: usize,
}

/// How many drafts a step carries: between 1 and `most`, the number that makes passes give
/// the most tokens per second, from how often drafts are kept and what recent passes took
/// ([`DraftLength`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftPolicy {
    /// Drafts on the first decode step.
    pub initial: usize,
    /// Never more than this.
    pub most: usize,
    /// More sequences than this generating at once, and steps carry no drafts (0: always
    /// draft). A pass over a full batch already reads each stage's weights once for many
    /// rows; drafts would add rows that are often thrown away, and the coordinator drafts
    /// for one sequence after another. (vLLM turns speculation off by batch size too.)
    pub crowd: usize,
}

impl Default for DraftPolicy {
    fn default() -> Self {
        DraftPolicy {
            initial: 4,
            most: 16,
            crowd: 4,
        }
    }
}

/// Where a sequence's drafts are made.
#[derive(Debug)]
enum DraftSite {
    /// Here, by this drafter, before each step is sent.
    Here(Box<dyn Drafter>),
    /// On the last stage, which holds the draft model: each step asks it for the drafts of
    /// the next ([`Step::draft_next`]), and they come back with the step's tokens.
    LastStage {
        /// The latest drafts it sent: the attempt they were made in, where they start, and
        /// the drafts.
        arrived: Option<(u32, usize, strata_model::Drafts)>,
    },
}

/// A sequence's drafter and what its drafts came to.
#[derive(Debug)]
struct Drafting {
    site: DraftSite,
    /// Drafts the next step may carry.
    length: DraftLength,
    /// Drafts the step in flight carries.
    in_flight: usize,
    drafted: usize,
    accepted: usize,
    /// [`DraftPolicy::crowd`].
    crowd: usize,
    /// Whether more sequences than `crowd` were generating when last told.
    crowded: bool,
}

impl SequenceCore {
    /// A sequence that waits for a pipeline.
    pub fn new(
        id: SeqId,
        request: SequenceRequest,
        limits: ModelLimits,
        deadlines: Deadlines,
        now: Instant,
    ) -> Self {
        SequenceCore {
            id,
            history: request.prompt.clone(),
            request,
            limits,
            deadlines,
            rng_position: 0,
            attempt: 0,
            phase: Phase::Waiting {
                since: now,
                lost: None,
            },
            text: TextStream::default(),
            started: now,
            first_token_at: None,
            replays: 0,
            drafting: None,
            passes: 0,
        }
    }

    /// Speculative decoding: each decode step carries what `drafter` proposes, up to the
    /// length `policy` adapts, for the last stage to verify in the same pass.
    pub fn with_drafter(self, drafter: Box<dyn Drafter>, policy: DraftPolicy) -> Self {
        self.drafting_at(DraftSite::Here(drafter), policy)
    }

    /// Speculative decoding with the draft model on the last stage: each step asks it for
    /// as many drafts as `policy` adapts, for the next step to carry.
    pub fn with_drafts_from_last_stage(self, policy: DraftPolicy) -> Self {
        self.drafting_at(DraftSite::LastStage { arrived: None }, policy)
    }

    fn drafting_at(mut self, site: DraftSite, policy: DraftPolicy) -> Self {
        self.drafting = Some(Drafting {
            site,
            length: DraftLength::new(policy.initial, policy.most),
            in_flight: 0,
            drafted: 0,
            accepted: 0,
            crowd: policy.crowd,
            crowded: false,
        });
        self
    }

    /// How many sequences are generating now, this one included: above the draft
    /// policy's crowd, its steps carry no drafts until fewer are.
    pub fn crowd(&mut self, generating: usize) {
        if let Some(d) = &mut self.drafting {
            d.crowded = d.crowd > 0 && generating > d.crowd;
        }
    }

    /// Its id.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// Prompt and accepted tokens.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.history.len() - self.request.prompt.len()
    }

    /// Times it was replayed onto another pipeline.
    pub fn replays(&self) -> u32 {
        self.replays
    }

    /// Whether it waits for a pipeline.
    pub fn waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting { .. })
    }

    /// Whether it is preempted, waiting for its client to read again.
    pub fn paused(&self) -> bool {
        matches!(self.phase, Phase::Paused)
    }

    /// Which run its steps belong to (steps of an earlier run are stale).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The plan epoch it runs on, if a step is in flight.
    pub fn epoch(&self) -> Option<u64> {
        match self.phase {
            Phase::Running { epoch, .. } | Phase::Cancelling { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.phase {
            Phase::Done(o) => Some(o),
            _ => None,
        }
    }

    /// When the next deadline falls (a [`Event::Tick`] is due then).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Waiting { since, ref lost } => Some(
                since
                    + if lost.is_some() {
                        self.deadlines.recover
                    } else {
                        self.deadlines.ready
                    },
            ),
            Phase::Running { sent_at, .. } => Some(sent_at + self.deadlines.step),
            Phase::Cancelling { since, .. } => Some(since + self.deadlines.cancel),
            // The shell cancels a client that does not read within its timeout.
            Phase::Paused | Phase::Done(_) => None,
        }
    }

    /// Counts and timings so far, as of `now`.
    pub fn usage(&self, now: Instant) -> Usage {
        let generated = self.generated();
        let decode = self
            .first_token_at
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        Usage {
            prompt_tokens: self.request.prompt.len(),
            completion_tokens: generated,
            time_to_first_token_ms: self.first_token_at.map_or(0.0, |t| {
                t.saturating_duration_since(self.started).as_secs_f64() * 1e3
            }),
            decode_tokens_per_second: if generated > 1 && decode > 0.0 {
                (generated - 1) as f64 / decode
            } else {
                0.0
            },
            draft_tokens: self.drafting.as_ref().map_or(0, |d| d.drafted),
            accepted_draft_tokens: self.drafting.as_ref().map_or(0, |d| d.accepted),
            passes: self.passes,
            energy_joules: None,
        }
    }

    /// Handles one event; `detail` says why the cluster is not serving (for errors).
    pub fn handle(
        &mut self,
        event: Event<'_>,
        now: Instant,
        tokenizer: &Tokenizer,
        detail: &str,
    ) -> Vec<Action> {
        match event {
            Event::Pipeline { epoch } => self.on_pipeline(epoch, now),
            Event::Token { epoch, sampled } => self.on_token(epoch, sampled, now, tokenizer),
            Event::Drafts { epoch, drafts } => {
                self.on_drafts(epoch, drafts);
                Vec::new()
            }
            Event::Prefilled { epoch, done } => self.on_prefilled(epoch, done, now),
            Event::Failure { epoch, failure } => self.on_failure(epoch, failure, now),
            Event::StageLost { epoch, reason } => self.on_stage_lost(epoch, reason, now),
            Event::ClientGone => self.on_client_gone(now),
            Event::Preempt => self.on_preempt(),
            Event::Resume => self.on_resume(now),
            Event::Refused {
                message,
                retry_after,
            } => match self.phase {
                Phase::Waiting { .. } => self.fail(
                    SequenceError::Busy {
                        message,
                        retry_after,
                    },
                    None,
                ),
                _ => Vec::new(),
            },
            Event::Tick => self.on_tick(now, detail),
        }
    }

    /// A waiting sequence (re)starts on the pipeline: the whole history from 0.
    fn on_pipeline(&mut self, epoch: u64, now: Instant) -> Vec<Action> {
        let Phase::Waiting { lost, .. } = &self.phase else {
            return Vec::new();
        };
        if lost.is_some() {
            self.replays += 1;
        }
        self.send_piece(epoch, 0, now)
    }

    /// Positions this sequence may reach: what each stage reserves for it.
    fn reserve(&self) -> u32 {
        let most = self.request.prompt.len() + self.request.max_tokens;
        most.min(self.limits.context) as u32
    }

    /// Sends the piece of the history from `start` (the first carries the sampler).
    fn send_piece(&mut self, epoch: u64, start: usize, now: Instant) -> Vec<Action> {
        let end = (start + self.limits.prefill_chunk.max(1)).min(self.history.len());
        let Drafts {
            tokens: drafts,
            drawn_from,
        } = self.drafts(start, end);
        let draft_next = self.draft_next(end);
        let mut tokens = self.history[start..end].to_vec();
        tokens.extend(&drafts);
        let draft = drafts.len() as u32;
        self.phase = Phase::Running {
            epoch,
            sent_at: now,
            upto: end,
            drafts,
        };
        vec![Action::Send {
            epoch,
            step: Step {
                seq: self.id,
                start: start as u32,
                tokens,
                sampler: (start == 0).then(|| SamplerStart {
                    params: self.request.sampling.clone(),
                    rng_position: self.rng_position,
                }),
                attempt: self.attempt,
                reserve: self.reserve(),
                partial: end < self.history.len(),
                draft,
                drawn_from,
                draft_next,
                // Each stage adds what it spent on these positions.
                energy_uj: Some(0),
            },
        }]
    }

    /// Drafts for a decode step (one token, after the first): as many as the drafter
    /// proposes within the adapted length, the tokens still to generate less one (the
    /// pass gives one more than it accepts) and the context. None for other steps.
    fn drafts(&mut self, start: usize, end: usize) -> Drafts {
        let decode = self.generated() > 0 && start + 1 == end && end == self.history.len();
        let left = self.request.max_tokens.saturating_sub(self.generated());
        let room = self.limits.context.saturating_sub(end);
        match &mut self.drafting {
            Some(d) if decode && !d.crowded => {
                let most = d.length.get().min(left.saturating_sub(1)).min(room);
                let mut drafts = match &mut d.site {
                    DraftSite::Here(drafter) => {
                        // The answer's sampler where it stands: a model drafter draws with
                        // its settings.
                        let sampler = strata_model::Sampler::resume(
                            self.request.sampling.clone(),
                            self.rng_position,
                        );
                        match &sampler {
                            Ok(sampler) => drafter.propose_for(&self.history, most, sampler),
                            Err(_) => Drafts::chosen(drafter.propose(&self.history, most)),
                        }
                    }
                    // What the last stage drafted after the token this step starts with.
                    // (Not those of an attempt a failure ended: they followed a token that
                    // may not be history.)
                    DraftSite::LastStage { arrived } => match arrived.take() {
                        Some((attempt, position, drafts))
                            if attempt == self.attempt && position == end =>
                        {
                            drafts
                        }
                        _ => Drafts::default(),
                    },
                };
                drafts.truncate(most);
                d.drafted += drafts.len();
                d.in_flight = drafts.len();
                drafts
            }
            Some(d) => {
                d.in_flight = 0;
                Drafts::default()
            }
            None => Drafts::default(),
        }
    }

    /// How many drafts a step whose positions end at `end` asks the last stage to make
    /// for the next step, where the last stage drafts: the adapted length, within the
    /// tokens still to generate after the step's first and the context; 0 for a piece of a
    /// prompt, while crowded, or where drafts are made here.
    fn draft_next(&self, end: usize) -> u32 {
        let Some(d) = &self.drafting else {
            return 0;
        };
        let left = self.request.max_tokens.saturating_sub(self.generated() + 1);
        let room = self.limits.context.saturating_sub(end + 1);
        match d.site {
            DraftSite::LastStage { .. } if end == self.history.len() && !d.crowded => {
                let most = d.length.get().min(left.saturating_sub(1)).min(room);
                most.min(strata_net::frame::MAX_DRAFTS) as u32
            }
            _ => 0,
        }
    }

    /// The last stage drafted for the next step: kept until that step is sent, if they
    /// are news of the step in flight.
    fn on_drafts(&mut self, epoch: u64, drafts: &NextDrafts) {
        if !self.current(epoch, drafts.attempt) {
            return;
        }
        if let Some(Drafting {
            site: DraftSite::LastStage { arrived },
            ..
        }) = &mut self.drafting
        {
            *arrived = Some((
                drafts.attempt,
                drafts.position as usize,
                drafts.drafts.clone(),
            ));
        }
    }

    /// A pass ended, `accepted` of its `drafted` drafts kept, `took` after it was
    /// drafted and sent: the next length.
    fn adapt(&mut self, drafted: usize, accepted: usize, took: Duration) {
        if let Some(d) = &mut self.drafting {
            d.length.after(drafted, accepted, took);
        }
    }

    /// The last stage cached a piece: send the next.
    fn on_prefilled(&mut self, epoch: u64, done: Prefilled, now: Instant) -> Vec<Action> {
        let Phase::Running { upto, .. } = self.phase else {
            if let Phase::Cancelling { epoch: e, .. } = self.phase {
                if e == epoch && self.current(epoch, done.attempt) {
                    return self.end(Outcome::Cancelled, Some(epoch));
                }
            }
            return Vec::new();
        };
        if !self.current(epoch, done.attempt)
            || done.end as usize != upto
            || upto >= self.history.len()
        {
            return Vec::new();
        }
        self.send_piece(epoch, upto, now)
    }

    /// Whether news of `epoch` and `attempt` is about the step in flight.
    fn current(&self, epoch: u64, attempt: u32) -> bool {
        attempt == self.attempt && self.epoch() == Some(epoch)
    }

    fn on_token(
        &mut self,
        epoch: u64,
        sampled: &Sampled,
        now: Instant,
        tokenizer: &Tokenizer,
    ) -> Vec<Action> {
        let expected = matches!(self.phase, Phase::Running { upto, .. } if upto == self.history.len())
            || matches!(self.phase, Phase::Cancelling { .. });
        if !self.current(epoch, sampled.attempt)
            || sampled.position as usize != self.history.len()
            || !expected
        {
            return Vec::new();
        }
        if let Phase::Cancelling { .. } = self.phase {
            return self.end(Outcome::Cancelled, Some(epoch));
        }
        if self.first_token_at.is_none() {
            self.first_token_at = Some(now);
        }
        self.history.push(sampled.token);
        self.rng_position = sampled.rng_position;
        // A draft the last stage kept: the pass goes on to the next token.
        let kept = match &mut self.phase {
            Phase::Running { upto, drafts, .. } if drafts.first() == Some(&sampled.token) => {
                drafts.remove(0);
                *upto += 1;
                if let Some(d) = &mut self.drafting {
                    d.accepted += 1;
                }
                true
            }
            _ => false,
        };
        if !kept {
            self.passes += 1;
            if let Phase::Running {
                drafts, sent_at, ..
            } = &self.phase
            {
                let rejected = drafts.len();
                let took = now.saturating_duration_since(*sent_at);
                let sent = self.drafting.as_ref().map_or(0, |d| d.in_flight);
                self.adapt(sent, sent.saturating_sub(rejected), took);
            }
        }
        match self.delta(sampled, now, tokenizer) {
            Ok(delta) => {
                let finish = delta.finish.map(|(reason, _)| reason);
                let mut actions = vec![Action::Deliver(delta)];
                match finish {
                    Some(reason) => {
                        actions.extend(self.end(Outcome::Finished(reason), Some(epoch)))
                    }
                    None if kept => {}
                    None => {
                        let start = self.history.len() - 1;
                        actions.extend(self.send_piece(epoch, start, now));
                    }
                }
                actions
            }
            Err(e) => self.fail(e, Some(epoch)),
        }
    }

    /// The client's view of the accepted token: its text, the end if it is one.
    fn delta(
        &mut self,
        sampled: &Sampled,
        now: Instant,
        tokenizer: &Tokenizer,
    ) -> Result<Delta, SequenceError> {
        let token = sampled.token;
        let r = &self.request;
        let is_eos = (!r.ignore_eos && self.limits.eos.contains(&token))
            || r.sampling.stop_token_ids.contains(&token);
        let mut finish = if is_eos {
            Some(FinishReason::Stop)
        } else if self.generated() >= r.max_tokens {
            Some(FinishReason::Length)
        } else if self.history.len() >= self.limits.context {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        let detok = |e: strata_model::Error| SequenceError::Detokenize(e.to_string());
        if !is_eos {
            let piece = self.text.decoder.push(tokenizer, token).map_err(detok)?;
            self.text.text.push_str(&piece);
        }
        if finish.is_some() {
            let rest = self.text.decoder.finish(tokenizer).map_err(detok)?;
            self.text.text.push_str(&rest);
        }
        if self.stop_string_hit() {
            finish = Some(FinishReason::Stop);
        }
        let text = self.visible_text(finish.is_some());
        Ok(Delta {
            text,
            token,
            logprob: self.request.logprobs.then(|| TokenLogprob {
                token: (token, sampled.logprob),
                top: sampled.top.clone(),
            }),
            finish: finish.map(|reason| (reason, self.usage(now))),
        })
    }

    /// Cuts the text at the first stop string, if one appeared. Only the text not yet sent
    /// can hold one: what was sent was never the start of a stop string.
    fn stop_string_hit(&mut self) -> bool {
        let sent = self.text.sent;
        let unsent = &self.text.text[sent..];
        let at = self
            .request
            .stop
            .iter()
            .filter_map(|s| unsent.find(s.as_str()).map(|at| sent + at))
            .min();
        match at {
            Some(at) => {
                self.text.text.truncate(at);
                true
            }
            None => false,
        }
    }

    /// The text not yet sent, holding back what could be the start of a stop string.
    fn visible_text(&mut self, finished: bool) -> String {
        let t = &mut self.text;
        let hold = self.request.stop.iter().map(String::len).max().unwrap_or(0);
        let mut visible = t.text.len();
        if !finished && hold > 0 {
            visible = visible.saturating_sub(hold - 1);
            while !t.text.is_char_boundary(visible) {
                visible -= 1;
            }
        }
        if visible <= t.sent {
            return String::new();
        }
        let piece = t.text[t.sent..visible].to_string();
        t.sent = visible;
        piece
    }

    fn on_failure(&mut self, epoch: u64, failure: &SeqFailure, now: Instant) -> Vec<Action> {
        if !self.current(epoch, failure.attempt) {
            return Vec::new();
        }
        if let Phase::Cancelling { .. } = self.phase {
            return self.end(Outcome::Cancelled, Some(epoch));
        }
        let _ = now;
        self.fail(SequenceError::Stage(failure.message.clone()), Some(epoch))
    }

    /// The pipeline lost a stage: wait for the next one, as a new run.
    fn on_stage_lost(&mut self, epoch: u64, reason: String, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Running { epoch: e, .. } if e == epoch => {
                self.attempt += 1;
                self.phase = Phase::Waiting {
                    since: now,
                    lost: Some(reason),
                };
                Vec::new()
            }
            // Nothing of it is left to free on a broken pipeline.
            Phase::Cancelling { epoch: e, .. } if e == epoch => self.end(Outcome::Cancelled, None),
            _ => Vec::new(),
        }
    }

    fn on_client_gone(&mut self, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Running { epoch, .. } => {
                // Let the step in flight land before freeing: a free that overtook it
                // would leave a cache behind.
                self.phase = Phase::Cancelling { epoch, since: now };
                Vec::new()
            }
            Phase::Waiting { .. } | Phase::Paused => self.end(Outcome::Cancelled, None),
            _ => Vec::new(),
        }
    }

    /// Gives the caches up: whatever still comes of the run is stale (a new attempt), and
    /// the next run replays the history from position 0, the sampler where it stood.
    fn on_preempt(&mut self) -> Vec<Action> {
        let Phase::Running { epoch, .. } = self.phase else {
            return Vec::new();
        };
        self.attempt += 1;
        self.phase = Phase::Paused;
        vec![Action::Free { epoch }]
    }

    fn on_resume(&mut self, now: Instant) -> Vec<Action> {
        if let Phase::Paused = self.phase {
            self.phase = Phase::Waiting {
                since: now,
                lost: None,
            };
        }
        Vec::new()
    }

    fn on_tick(&mut self, now: Instant, detail: &str) -> Vec<Action> {
        if self.poll_timeout().is_none_or(|t| now < t) {
            return Vec::new();
        }
        match self.phase.clone() {
            Phase::Waiting { since, lost } => {
                let waited = now.saturating_duration_since(since);
                let detail = detail.to_string();
                let error = match lost {
                    Some(reason) => SequenceError::Unrecovered {
                        reason,
                        waited,
                        detail,
                    },
                    None => SequenceError::NotServing { waited, detail },
                };
                self.fail(error, None)
            }
            Phase::Running { epoch, .. } => {
                self.fail(SequenceError::Stuck(self.deadlines.step), Some(epoch))
            }
            Phase::Cancelling { epoch, .. } => self.end(Outcome::Cancelled, Some(epoch)),
            Phase::Paused | Phase::Done(_) => Vec::new(),
        }
    }

    fn fail(&mut self, error: SequenceError, epoch: Option<u64>) -> Vec<Action> {
        let mut actions = vec![Action::Fail(error)];
        actions.extend(self.end(Outcome::Failed, epoch));
        actions
    }

    /// Ends the sequence; frees its caches on `epoch`'s pipeline when it has any there.
    fn end(&mut self, outcome: Outcome, epoch: Option<u64>) -> Vec<Action> {
        self.phase = Phase::Done(outcome);
        epoch
            .map(|epoch| Action::Free { epoch })
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, Mutex};
    use strata_model::Sampler;

    fn tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let json = strata_model::synth::synth_tokenizer_json(512).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        Tokenizer::from_dir(dir.path()).unwrap()
    }

    fn core(max_tokens: usize, stop: &[&str], now: Instant) -> SequenceCore {
        core_in_pieces(max_tokens, stop, 64, now)
    }

    fn core_in_pieces(
        max_tokens: usize,
        stop: &[&str],
        prefill_chunk: usize,
        now: Instant,
    ) -> SequenceCore {
        SequenceCore::new(
            7,
            SequenceRequest {
                prompt: vec![10, 11, 12],
                max_tokens,
                sampling: SamplingParams {
                    temperature: 0.8,
                    seed: 5,
                    ..Default::default()
                },
                stop: stop.iter().map(|s| s.to_string()).collect(),
                ignore_eos: false,
                logprobs: false,
            },
            ModelLimits {
                eos: vec![509],
                context: 64,
                prefill_chunk,
            },
            Deadlines::default(),
            now,
        )
    }

    fn token(position: u32, token: u32, attempt: u32) -> Sampled {
        Sampled {
            seq: 7,
            position,
            token,
            logprob: -0.5,
            top: Vec::new(),
            rng_position: u64::from(position) * 10,
            attempt,
        }
    }

    fn sent(actions: &[Action]) -> Option<(u64, &Step)> {
        actions.iter().find_map(|a| match a {
            Action::Send { epoch, step } => Some((*epoch, step)),
            _ => None,
        })
    }

    #[test]
    fn a_sequence_runs_its_prompt_then_one_token_per_step_until_its_length() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core(3, &[], now);
        let a = c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        let (epoch, step) = sent(&a).unwrap();
        assert_eq!(
            (epoch, step.start, step.tokens.as_slice()),
            (1, 0, &[10, 11, 12][..])
        );
        assert_eq!(step.sampler.as_ref().unwrap().rng_position, 0);
        for (i, tok) in [40u32, 41, 42].into_iter().enumerate() {
            let s = token(3 + i as u32, tok, 0);
            let a = c.handle(
                Event::Token {
                    epoch: 1,
                    sampled: &s,
                },
                now,
                &t,
                "",
            );
            assert!(matches!(&a[0], Action::Deliver(d) if d.token == tok));
            if i < 2 {
                let (_, step) = sent(&a).unwrap();
                assert_eq!(
                    (step.start, step.tokens.as_slice()),
                    (3 + i as u32, &[tok][..])
                );
                assert!(step.sampler.is_none());
            } else {
                assert!(
                    matches!(&a[0], Action::Deliver(d) if d.finish.map(|f| f.0) == Some(FinishReason::Length))
                );
                assert_eq!(a[1], Action::Free { epoch: 1 });
            }
        }
        assert_eq!(c.outcome(), Some(&Outcome::Finished(FinishReason::Length)));
        assert_eq!(c.history(), &[10, 11, 12, 40, 41, 42]);
    }

    /// Proposes the token after the last, twice over.
    #[derive(Debug)]
    struct Echo;

    impl Drafter for Echo {
        fn propose(&mut self, history: &[u32], max: usize) -> Vec<u32> {
            let last = history.last().copied().unwrap_or(0);
            vec![last + 1, last + 2][..max.min(2)].to_vec()
        }
    }

    #[test]
    fn steps_carry_no_drafts_while_more_sequences_than_the_crowd_generate() {
        let (t, now) = (tokenizer(), Instant::now());
        let policy = DraftPolicy {
            crowd: 3,
            ..Default::default()
        };
        let mut c = core(20, &[], now).with_drafter(Box::new(Echo), policy);
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        // Each step's answer: its first token, never the draft (each is two past the last).
        let step_after = |c: &mut SequenceCore, position: u32, generating: usize| {
            c.crowd(generating);
            let s = token(position, 300 + 2 * position, 0);
            let event = Event::Token {
                epoch: 1,
                sampled: &s,
            };
            let a = c.handle(event, now, &t, "");
            let (_, step) = sent(&a).unwrap();
            (step.draft, step.tokens.clone())
        };
        assert_eq!(step_after(&mut c, 3, 1), (2, vec![306, 307, 308]));
        assert_eq!(
            step_after(&mut c, 4, 4),
            (0, vec![308]),
            "four generate: crowded"
        );
        assert_eq!(step_after(&mut c, 5, 3), (2, vec![310, 311, 312]));
        let mut alone = core(20, &[], now).with_drafter(
            Box::new(Echo),
            DraftPolicy {
                crowd: 0,
                ..Default::default()
            },
        );
        alone.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        assert_eq!(step_after(&mut alone, 3, 50).0, 2, "crowd 0 always drafts");
    }

    /// Draws the token after the last at random, and says from what; notes where the
    /// answer's sampler stood each time.
    #[derive(Debug, Default)]
    struct Drawn {
        sampler_at: Arc<Mutex<Vec<u64>>>,
    }

    impl Drafter for Drawn {
        fn propose(&mut self, _: &[u32], _: usize) -> Vec<u32> {
            Vec::new()
        }

        fn propose_for(&mut self, history: &[u32], max: usize, sampler: &Sampler) -> Drafts {
            self.sampler_at.lock().unwrap().push(sampler.rng_position());
            let next = history.last().copied().unwrap_or(0) + 1;
            let mut drafts = Drafts {
                tokens: vec![next, next + 1],
                drawn_from: vec![vec![(next, 0.5), (7, 0.5)], vec![(next + 1, 1.0)]],
            };
            drafts.truncate(max);
            drafts
        }
    }

    #[test]
    fn drafts_drawn_at_random_travel_with_what_they_were_drawn_from() {
        let (t, now) = (tokenizer(), Instant::now());
        let drawn = Drawn::default();
        let sampler_at = drawn.sampler_at.clone();
        let mut c = core(20, &[], now).with_drafter(Box::new(drawn), DraftPolicy::default());
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        let s = token(3, 300, 0);
        let a = c.handle(
            Event::Token {
                epoch: 1,
                sampled: &s,
            },
            now,
            &t,
            "",
        );
        let (_, step) = sent(&a).unwrap();
        assert_eq!(
            (step.draft, step.tokens.as_slice()),
            (2, &[300, 301, 302][..])
        );
        assert_eq!(
            step.drawn_from,
            vec![vec![(301, 0.5), (7, 0.5)], vec![(302, 1.0)]]
        );
        // The drafter saw the answer's sampler where the last token left it.
        assert_eq!(*sampler_at.lock().unwrap(), vec![s.rng_position]);
    }

    #[test]
    fn a_long_history_goes_in_pieces_one_at_a_time_and_only_the_last_samples() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core_in_pieces(4, &[], 2, now);
        let a = c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        let (_, step) = sent(&a).unwrap();
        assert_eq!((step.start, step.tokens.as_slice()), (0, &[10, 11][..]));
        assert!(step.partial && step.sampler.is_some());
        // Every piece reserves what the whole answer may reach: prompt 3 + 4 tokens.
        assert_eq!(step.reserve, 7);
        // A token cannot come before the last piece; a report of another piece, run or
        // epoch changes nothing.
        let early = token(2, 40, 0);
        let early = Event::Token {
            epoch: 1,
            sampled: &early,
        };
        assert!(c.handle(early, now, &t, "").is_empty());
        for (epoch, end, attempt) in [(1, 1, 0), (1, 2, 1), (2, 2, 0)] {
            let done = Prefilled {
                seq: 7,
                end,
                attempt,
            };
            let news = Event::Prefilled { epoch, done };
            assert!(c.handle(news, now, &t, "").is_empty());
        }
        let done = Prefilled {
            seq: 7,
            end: 2,
            attempt: 0,
        };
        let a = c.handle(Event::Prefilled { epoch: 1, done }, now, &t, "");
        let (_, step) = sent(&a).unwrap();
        assert_eq!((step.start, step.tokens.as_slice()), (2, &[12][..]));
        assert!(!step.partial && step.sampler.is_none());
        // The report again (a doubled frame) sends nothing more.
        assert!(c
            .handle(Event::Prefilled { epoch: 1, done }, now, &t, "")
            .is_empty());
        let first = token(3, 40, 0);
        let a = c.handle(
            Event::Token {
                epoch: 1,
                sampled: &first,
            },
            now,
            &t,
            "",
        );
        assert!(matches!(&a[0], Action::Deliver(d) if d.token == 40));
        let (_, step) = sent(&a).unwrap();
        assert_eq!((step.start, step.len(), step.partial), (3, 1, false));
        // A lost stage: the replay of the four positions goes in pieces again.
        c.handle(
            Event::StageLost {
                epoch: 1,
                reason: "gone".into(),
            },
            now,
            &t,
            "",
        );
        let a = c.handle(Event::Pipeline { epoch: 2 }, now, &t, "");
        let (_, step) = sent(&a).unwrap();
        assert_eq!(
            (
                step.start,
                step.tokens.as_slice(),
                step.partial,
                step.attempt
            ),
            (0, &[10, 11][..], true, 1)
        );
    }

    #[test]
    fn late_doubled_and_foreign_news_changes_nothing() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core(8, &[], now);
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        let first = token(3, 40, 0);
        assert!(!c
            .handle(
                Event::Token {
                    epoch: 1,
                    sampled: &first
                },
                now,
                &t,
                ""
            )
            .is_empty());
        // The same token again, one of another epoch, of another run, at another position.
        for (epoch, s) in [
            (1, token(3, 40, 0)),
            (2, token(4, 41, 0)),
            (1, token(4, 41, 1)),
            (1, token(9, 41, 0)),
        ] {
            assert!(c
                .handle(Event::Token { epoch, sampled: &s }, now, &t, "")
                .is_empty());
        }
        let stale = SeqFailure {
            seq: 7,
            attempt: 3,
            message: "old".into(),
        };
        assert!(c
            .handle(
                Event::Failure {
                    epoch: 1,
                    failure: &stale
                },
                now,
                &t,
                ""
            )
            .is_empty());
        assert_eq!(c.history(), &[10, 11, 12, 40]);
    }

    #[test]
    fn a_lost_stage_replays_the_history_with_the_sampler_where_it_stood() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core(8, &[], now);
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        for (i, tok) in [40u32, 41].into_iter().enumerate() {
            let s = token(3 + i as u32, tok, 0);
            c.handle(
                Event::Token {
                    epoch: 1,
                    sampled: &s,
                },
                now,
                &t,
                "",
            );
        }
        assert!(c
            .handle(
                Event::StageLost {
                    epoch: 1,
                    reason: "w1 died".into()
                },
                now,
                &t,
                ""
            )
            .is_empty());
        assert!(c.waiting());
        // The old pipeline's last token arrives late: ignored.
        let late = token(5, 77, 0);
        assert!(c
            .handle(
                Event::Token {
                    epoch: 1,
                    sampled: &late
                },
                now,
                &t,
                ""
            )
            .is_empty());
        let a = c.handle(Event::Pipeline { epoch: 2 }, now, &t, "");
        let (epoch, step) = sent(&a).unwrap();
        assert_eq!(epoch, 2);
        assert_eq!((step.start, step.attempt), (0, 1));
        assert_eq!(step.tokens, vec![10, 11, 12, 40, 41]);
        assert_eq!(step.sampler.as_ref().unwrap().rng_position, 40);
        let next = token(5, 42, 1);
        let a = c.handle(
            Event::Token {
                epoch: 2,
                sampled: &next,
            },
            now,
            &t,
            "",
        );
        assert!(matches!(&a[0], Action::Deliver(d) if d.token == 42));
        assert_eq!(c.replays(), 1);
    }

    #[test]
    fn a_preempted_sequence_frees_pauses_then_replays_its_history_when_resumed() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core(8, &[], now);
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        let s = token(3, 40, 0);
        let a = c.handle(
            Event::Token {
                epoch: 1,
                sampled: &s,
            },
            now,
            &t,
            "",
        );
        // The shell could not deliver the token and held back the next step.
        assert!(sent(&a).is_some());
        assert_eq!(
            c.handle(Event::Preempt, now, &t, ""),
            vec![Action::Free { epoch: 1 }]
        );
        assert!(c.paused() && !c.waiting());
        assert_eq!(c.poll_timeout(), None, "the shell times the client out");
        // A pipeline alone does not restart it: its client does not read.
        assert!(c
            .handle(Event::Pipeline { epoch: 1 }, now, &t, "")
            .is_empty());
        // Whatever of the old run comes late is stale.
        let late = token(4, 41, 0);
        let event = Event::Token {
            epoch: 1,
            sampled: &late,
        };
        assert!(c.handle(event, now, &t, "").is_empty());
        assert!(c.handle(Event::Resume, now, &t, "").is_empty());
        assert!(c.waiting());
        let a = c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        let (_, step) = sent(&a).unwrap();
        assert_eq!((step.start, step.attempt), (0, 1));
        assert_eq!(step.tokens, vec![10, 11, 12, 40]);
        assert_eq!(step.sampler.as_ref().unwrap().rng_position, 30);
        assert_eq!(c.replays(), 0, "a pause is not a lost stage");
    }

    #[test]
    fn a_waiting_sequence_refused_after_all_fails_as_busy_with_nothing_to_free() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core(8, &[], now);
        let event = Event::Refused {
            message: "busy".into(),
            retry_after: Duration::from_secs(3),
        };
        let a = c.handle(event, now, &t, "");
        assert_eq!(
            a,
            vec![Action::Fail(SequenceError::Busy {
                message: "busy".into(),
                retry_after: Duration::from_secs(3)
            })]
        );
        assert_eq!(c.outcome(), Some(&Outcome::Failed));
    }

    #[test]
    fn a_paused_sequence_whose_client_leaves_ends_with_nothing_to_free() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core(8, &[], now);
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        c.handle(Event::Preempt, now, &t, "");
        assert!(c.handle(Event::ClientGone, now, &t, "").is_empty());
        assert_eq!(c.outcome(), Some(&Outcome::Cancelled));
    }

    #[test]
    fn with_no_pipeline_to_take_it_over_it_fails_after_the_recover_wait_naming_why() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core(8, &[], now);
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        c.handle(
            Event::StageLost {
                epoch: 1,
                reason: "worker w1 died".into(),
            },
            now,
            &t,
            "",
        );
        let early = now + Duration::from_secs(59);
        assert!(c.handle(Event::Tick, early, &t, "missing 3 GiB").is_empty());
        let late = now + Duration::from_secs(61);
        let a = c.handle(Event::Tick, late, &t, "missing 3 GiB");
        let Action::Fail(e) = &a[0] else {
            panic!("{a:?}")
        };
        let message = e.to_string();
        assert!(
            message.contains("worker w1 died") && message.contains("missing 3 GiB"),
            "{message}"
        );
        assert_eq!(c.outcome(), Some(&Outcome::Failed));
    }

    #[test]
    fn a_client_that_leaves_frees_once_the_step_in_flight_lands() {
        let (t, now) = (tokenizer(), Instant::now());
        let mut c = core(8, &[], now);
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        assert!(c.handle(Event::ClientGone, now, &t, "").is_empty());
        let s = token(3, 40, 0);
        assert_eq!(
            c.handle(
                Event::Token {
                    epoch: 1,
                    sampled: &s
                },
                now,
                &t,
                ""
            ),
            vec![Action::Free { epoch: 1 }]
        );
        assert_eq!(c.outcome(), Some(&Outcome::Cancelled));
    }

    #[test]
    fn stop_strings_hold_back_their_start_and_cut_the_text() {
        let (t, now) = (tokenizer(), Instant::now());
        let ids = t.encode("hello world", false).unwrap();
        let mut c = core(64, &["wor"], now);
        c.handle(Event::Pipeline { epoch: 1 }, now, &t, "");
        let mut text = String::new();
        let mut finish = None;
        for (i, &id) in ids.iter().enumerate() {
            let s = token(3 + i as u32, id, 0);
            for a in c.handle(
                Event::Token {
                    epoch: 1,
                    sampled: &s,
                },
                now,
                &t,
                "",
            ) {
                if let Action::Deliver(d) = a {
                    text.push_str(&d.text);
                    finish = finish.or(d.finish.map(|f| f.0));
                }
            }
            if c.outcome().is_some() {
                break;
            }
        }
        assert_eq!(text, "hello ");
        assert_eq!(finish, Some(FinishReason::Stop));
    }
}
