//! Sessions: the shells around each answer's [`SequenceCore`]. A task per sequence feeds
//! its core the news that concerns it (tokens and failures routed here from the last
//! stage, a lost stage, a new pipeline, the client leaving, deadlines) and does what the
//! core says: hand a step to the batcher, stream text to the client, free caches.
//!
//! A client that stops reading gets no more than one token ahead of it: the next step
//! waits until it reads. If it has not read for a second while other requests wait for
//! room in the KV cache, its answer is preempted: it frees its caches and its reservation,
//! keeps its history, and when the client reads again asks for room ahead of the queue and
//! replays (as vLLM preempts by recomputation). A client that reads nothing for
//! `--client-timeout` is cancelled.
//!
//! Steps of sequences that become ready together are sent to stage 0 as one frame by the
//! batcher, so stage 0 runs them as one batch. The dispatcher routes what the last stage
//! sends back to the sessions.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use strata_model::SeqId;
use strata_net::frame::{Frame, NextDrafts, Prefilled, Sampled, SeqFailure, Step};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::admission::{Refusal, Reservation};
use crate::error::Error;
use crate::metrics::RequestRecord;
use crate::sequence::{
    Action, Deadlines, Delta, Event, FinishReason, ModelLimits, Outcome, SequenceCore,
    SequenceError, SequenceRequest,
};
use crate::serving::{Pipeline, ServingState};
use crate::Shared;

/// Token frames waiting for the dispatcher.
pub const TOKEN_QUEUE: usize = 1024;
/// Steps waiting for the batcher.
pub const OUTBOX_QUEUE: usize = 1024;
/// News waiting for one session. A session has one step in flight and hears a few things
/// of each (its tokens, one per draft kept and one more, or a piece done or a failure; the
/// next step's drafts; a free done; a lost stage), so only a peer that sends what nobody
/// asked for fills it.
const SESSION_QUEUE: usize = strata_net::frame::MAX_DRAFTS + 16;
/// Deltas waiting for the client's connection to take them (a few: what a client has not
/// read waits in its socket's buffers, and beyond those the answer waits for it).
const STREAM_QUEUE: usize = 4;
/// How long a client may leave its stream unread, while others wait for room in the KV
/// cache, before its answer pauses and its caches go to them (it replays when the client
/// reads again, as vLLM's preemption by recomputation does).
const PREEMPT_AFTER: Duration = Duration::from_secs(1);
/// How long an ended answer waits for word that every stage dropped its caches before
/// its KV reservation goes to another request anyway.
const FREED_WAIT: Duration = Duration::from_secs(5);
/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// How long a new request waits for the cluster to be ready.
pub const READY_WAIT: Duration = Duration::from_secs(120);

/// News the shell routes to a session.
enum News {
    Token {
        epoch: u64,
        sampled: Sampled,
    },
    /// Drafts for the next step, from a last stage that holds the draft model.
    Drafts {
        epoch: u64,
        drafts: NextDrafts,
    },
    Prefilled {
        epoch: u64,
        done: Prefilled,
    },
    /// Every stage of the pipeline dropped the sequence's caches.
    Freed,
    Failure {
        epoch: u64,
        failure: SeqFailure,
    },
    StageLost {
        epoch: u64,
        reason: String,
    },
}

struct Entry {
    tx: mpsc::Sender<News>,
    /// The pipeline its step in flight runs on.
    pipeline: Option<Arc<Pipeline>>,
    /// What its steps cost so far.
    energy: EnergyTally,
}

/// What a sequence's steps cost, as the last stage reported them: every run's, since a
/// replayed step was spent too.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EnergyTally {
    microjoules: u64,
    steps: u32,
    unmeasured: u32,
}

impl EnergyTally {
    /// Adds one step's cost (None: a stage had no counter).
    pub fn add(&mut self, microjoules: Option<u64>) {
        self.steps += 1;
        match microjoules {
            Some(uj) => self.microjoules = self.microjoules.saturating_add(uj),
            None => self.unmeasured += 1,
        }
    }

    /// Joules in all; None when any step went unmeasured, or none was reported.
    pub fn joules(&self) -> Option<f64> {
        (self.steps > 0 && self.unmeasured == 0).then(|| self.microjoules as f64 / 1e6)
    }
}

/// 64 random bits; from the clock and a counter in the unlikely case the system has no
/// randomness to give (ids must then still differ, if not be secret).
fn random_id() -> SeqId {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    static FALLBACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ FALLBACK
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .rotate_left(32)
}

/// Live sequences by id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<SeqId, Entry>>,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<SeqId, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sequences being generated.
    pub fn active(&self) -> usize {
        self.lock().len()
    }

    /// Sequences with a step on the pipeline of plan `epoch`.
    pub fn active_on(&self, epoch: u64) -> usize {
        self.lock()
            .values()
            .filter(|e| e.pipeline.as_ref().is_some_and(|p| p.epoch == epoch))
            .count()
    }

    /// A new sequence under a random 64-bit id, so that no one can guess another's id
    /// from their own (ids that counted up told every client the next one).
    fn register(&self, tx: mpsc::Sender<News>) -> SeqId {
        let mut map = self.lock();
        loop {
            let id = random_id();
            if id != 0 && !map.contains_key(&id) {
                map.insert(
                    id,
                    Entry {
                        tx,
                        pipeline: None,
                        energy: EnergyTally::default(),
                    },
                );
                return id;
            }
        }
    }

    fn set_pipeline(&self, id: SeqId, pipeline: &Arc<Pipeline>) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.pipeline = Some(pipeline.clone());
        }
    }

    /// A preempted sequence has nothing on any pipeline (a re-plan does not wait for it).
    fn clear_pipeline(&self, id: SeqId) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.pipeline = None;
        }
    }

    /// Adds a step's cost to its sequence's tally.
    fn add_energy(&self, id: SeqId, microjoules: Option<u64>) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.energy.add(microjoules);
        }
    }

    /// What a sequence's steps cost so far.
    fn energy(&self, id: SeqId) -> EnergyTally {
        self.lock().get(&id).map(|e| e.energy).unwrap_or_default()
    }

    fn remove(&self, id: SeqId) {
        self.lock().remove(&id);
    }

    /// Hands news to a session; never blocks the caller.
    fn tell(&self, id: SeqId, news: News) {
        let tx = match self.lock().get(&id) {
            Some(e) => e.tx.clone(),
            None => return,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(news) {
            warn!(
                seq = id,
                "a sequence got more news than it can have asked for; dropped"
            );
        }
    }
}

/// A pipeline lost a stage (`worker` died, hung, dropped off or left): the sequences on
/// it wait for the next plan and replay there; if it is the one serving, new requests wait
/// too, and the reconciler re-plans at once.
pub fn stage_lost(shared: &Shared, worker: &str, reason: &str) {
    broken(shared, |p| p.uses(worker), reason);
}

/// The plan of `epoch` is being replaced while it still works: its answers wait for the
/// next plan and replay there (the same path as a lost stage, without a failure).
pub fn pipeline_moved(shared: &Shared, epoch: u64) {
    broken(shared, |p| p.epoch == epoch, "moved to a new plan");
}

/// The pipeline of plan `epoch` cannot be used any more (its first stage is unreachable).
pub fn pipeline_broken(shared: &Shared, epoch: u64, reason: &str) {
    broken(shared, |p| p.epoch == epoch, reason);
}

fn broken(shared: &Shared, affected: impl Fn(&Pipeline) -> bool, reason: &str) {
    if shared.serving().pipeline().is_some_and(|p| affected(p)) {
        shared.set_serving(ServingState::Recovering(format!("re-planning: {reason}")));
        shared.membership_changed();
    }
    let hit: Vec<(SeqId, u64)> = shared
        .sessions()
        .lock()
        .iter()
        .filter_map(|(id, e)| {
            let p = e.pipeline.as_ref()?;
            affected(p).then_some((*id, p.epoch))
        })
        .collect();
    if !hit.is_empty() {
        warn!(
            sequences = hit.len(),
            "{reason}: the answers in flight will resume on the next plan"
        );
    }
    for (id, epoch) in hit {
        shared.sessions().tell(
            id,
            News::StageLost {
                epoch,
                reason: reason.to_string(),
            },
        );
    }
}

/// Routes sampled tokens and failures from the last stage to their sessions.
pub async fn dispatch(shared: Arc<Shared>, mut frames: mpsc::Receiver<Frame>) {
    loop {
        let frame = tokio::select! {
            _ = shared.cancel().cancelled() => return,
            f = frames.recv() => match f { Some(f) => f, None => return },
        };
        let Frame::Tokens {
            epoch,
            tokens,
            prefilled,
            freed,
            failures,
            energy,
            drafts,
        } = frame
        else {
            warn!("the coordinator got a frame that is not tokens; ignored");
            continue;
        };
        // Before the tokens: a session that finishes on one of them reports what its
        // steps cost, this one's included.
        for step in energy {
            shared.sessions().add_energy(step.seq, step.energy_uj);
        }
        // Before the tokens they follow: the token that ends a pass sends the next step.
        for drafts in drafts {
            shared
                .sessions()
                .tell(drafts.seq, News::Drafts { epoch, drafts });
        }
        for sampled in tokens {
            shared
                .sessions()
                .tell(sampled.seq, News::Token { epoch, sampled });
        }
        for seq in freed {
            shared.sessions().tell(seq, News::Freed);
        }
        for done in prefilled {
            shared
                .sessions()
                .tell(done.seq, News::Prefilled { epoch, done });
        }
        for failure in failures {
            shared
                .sessions()
                .tell(failure.seq, News::Failure { epoch, failure });
        }
    }
}

/// One sequence's next step, waiting to go to stage 0.
pub struct Outbound {
    /// The pipeline it runs on.
    pub pipeline: Arc<Pipeline>,
    /// The step.
    pub step: Step,
}

/// Sends the steps of every sequence that is ready at the same moment as one frame, so
/// stage 0 runs them as one batch. Sequences become ready together when the last stage
/// sampled them in one batch; their sessions wake at once and hand their next step here.
pub async fn batcher(shared: Arc<Shared>, mut outbox: mpsc::Receiver<Outbound>) {
    loop {
        let first = tokio::select! {
            _ = shared.cancel().cancelled() => return,
            o = outbox.recv() => match o { Some(o) => o, None => return },
        };
        let mut batch = vec![first];
        // Let the sessions woken with this one hand theirs in too (a few scheduler
        // rounds, no timer: an idle pipeline adds no latency).
        for _ in 0..4 {
            tokio::task::yield_now().await;
            let before = batch.len();
            while batch.len() < strata_net::frame::MAX_CHUNKS {
                match outbox.try_recv() {
                    Ok(o) => batch.push(o),
                    Err(_) => break,
                }
            }
            if batch.len() == before {
                break;
            }
        }
        // One frame per pipeline (sequences can be on two for a moment), each within the
        // rows a stage runs at once.
        while !batch.is_empty() {
            let epoch = batch[0].pipeline.epoch;
            let (group, rest): (Vec<Outbound>, Vec<Outbound>) =
                batch.into_iter().partition(|o| o.pipeline.epoch == epoch);
            batch = rest;
            let pipeline = group[0].pipeline.clone();
            for steps in frames_of(group.into_iter().map(|o| o.step).collect()) {
                send_to_stage0(&shared, &pipeline, epoch, steps).await;
            }
        }
    }
}

/// Splits steps into frames of at most [`strata_net::frame::BATCH_ROWS`] rows (a single
/// larger step goes alone: prompts come in pieces smaller than that).
fn frames_of(steps: Vec<Step>) -> Vec<Vec<Step>> {
    let mut frames: Vec<Vec<Step>> = Vec::new();
    let mut rows = 0;
    for step in steps {
        let fits = rows + step.len() <= strata_net::frame::BATCH_ROWS
            && frames
                .last()
                .is_some_and(|f| f.len() < strata_net::frame::MAX_CHUNKS);
        if !fits {
            frames.push(Vec::new());
            rows = 0;
        }
        rows += step.len();
        if let Some(f) = frames.last_mut() {
            f.push(step);
        }
    }
    frames
}

/// Sends one frame of steps to stage 0; an unreachable stage 0 breaks the pipeline.
async fn send_to_stage0(
    shared: &Arc<Shared>,
    pipeline: &Arc<Pipeline>,
    epoch: u64,
    steps: Vec<Step>,
) {
    let frame = Frame::Forward {
        epoch,
        steps,
        activations: None,
        failures: Vec::new(),
    };
    debug!(rows = frame.rows(), "to stage 0");
    if let Err(e) = strata_net::transport::send_frame(&pipeline.first, &frame).await {
        let reason = format!(
            "stage 0 (worker {}) is unreachable: {e}",
            pipeline.first_worker()
        );
        pipeline_broken(shared, epoch, &reason);
    }
}

/// A request id for logs: unique enough, not secret.
pub fn request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("req-{:016x}", h.finish())
}

/// Renders a conversation with the model's chat template and tokenizes it.
pub fn chat_prompt(shared: &Shared, messages: &[strata_model::Message]) -> Result<Vec<u32>, Error> {
    let m = shared.model();
    let template = m.chat.as_ref().ok_or_else(|| {
        Error::InvalidRequest("this model has no chat template: send a plain prompt".into())
    })?;
    if messages.is_empty() {
        return Err(Error::InvalidRequest(
            "a chat needs at least one message".into(),
        ));
    }
    template
        .encode(&m.tokenizer, messages)
        .map_err(|e| Error::InvalidRequest(e.to_string()))
}

/// An answer being generated: its id, and its deltas (an error ends them).
pub struct Answer {
    /// The request id, as the logs name it.
    pub id: String,
    /// The sampler's seed: the one asked for, or the fresh one drawn for it (reported back
    /// so that the answer can be reproduced).
    pub seed: u64,
    /// The answer, a token at a time; the last delta carries the finish.
    pub deltas: mpsc::Receiver<Result<Delta, Error>>,
}

/// Most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// A seed for a request that gave none: fresh for every request, as OpenAI's API does, so
/// that asking again gives another answer.
pub fn fresh_seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness (never seen): the clock still differs between requests.
        return unix_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    u64::from_le_bytes(bytes)
}

/// Checks what a request asks for against the model and the limits, and fills in the
/// defaults: `max_tokens` 0 means "not given" (the default, cut to what the context
/// leaves), empty stop strings are dropped.
pub(crate) fn settle(
    request: &mut SequenceRequest,
    context: usize,
    kv: usize,
) -> Result<(), Error> {
    request
        .sampling
        .validate()
        .map_err(|e| Error::InvalidRequest(e.to_string()))?;
    let prompt = request.prompt.len();
    if prompt == 0 {
        return Err(Error::InvalidRequest("the prompt has no tokens".into()));
    }
    if prompt >= context {
        return Err(Error::InvalidRequest(format!(
            "the prompt has {prompt} tokens but the model's context holds {context}: shorten it"
        )));
    }
    if request.max_tokens == 0 {
        // The default fits the KV budget when the prompt leaves room in it.
        let room = kv.saturating_sub(prompt).max(1);
        request.max_tokens = DEFAULT_MAX_TOKENS.min(context - prompt).min(room);
    } else if prompt + request.max_tokens > context {
        return Err(Error::InvalidRequest(format!(
            "the prompt has {prompt} tokens and max_tokens is {}, {} in all, but the model's \
             context holds {context}: ask for at most {} tokens or shorten the prompt",
            request.max_tokens,
            prompt + request.max_tokens,
            context - prompt
        )));
    }
    request.stop.retain(|s| !s.is_empty());
    if request.stop.len() > MAX_STOP_STRINGS {
        return Err(Error::InvalidRequest(format!(
            "{} stop strings: at most {MAX_STOP_STRINGS} are allowed",
            request.stop.len()
        )));
    }
    if let Some(long) = request.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(Error::InvalidRequest(format!(
            "a stop string of {} bytes: each may have at most {MAX_STOP_BYTES}",
            long.len()
        )));
    }
    Ok(())
}

/// Reserves the request's positions in the KV budget, or says why not.
fn reserve(shared: &Arc<Shared>, request: &SequenceRequest) -> Result<Reservation, Error> {
    let need = request.prompt.len() + request.max_tokens;
    shared.gate().ask(need).map_err(|refusal| match refusal {
        Refusal::TooLarge { need, capacity } => Error::InvalidRequest(format!(
            "this request needs {need} KV-cache positions (a prompt of {} tokens and \
             max_tokens {}), but each stage of this cluster holds {capacity} (serve's \
             --kv-tokens): ask for fewer tokens or send a shorter prompt",
            request.prompt.len(),
            request.max_tokens
        )),
        Refusal::Busy {
            queued,
            retry_after,
        } => {
            shared.metrics().refused.with_label_values(&["busy"]).inc();
            Error::Busy {
                message: format!(
                    "the cluster is busy: its KV cache is full and {queued} requests are \
                     waiting; retry in {} s",
                    retry_after.as_secs()
                ),
                retry_after,
            }
        }
    })
}

/// Starts generating; refuses at once what cannot run.
pub fn start(shared: &Arc<Shared>, mut request: SequenceRequest) -> Result<Answer, Error> {
    let context = shared.model().file.config().max_position_embeddings;
    settle(&mut request, context, shared.gate().figures().0)?;
    // Waiting helps while a plan loads, not when the workers cannot hold the model.
    if let ServingState::Shortfall(detail) = shared.serving() {
        return Err(Error::Unavailable(format!(
            "the cluster cannot hold the model: {detail}"
        )));
    }
    let reservation = reserve(shared, &request)?;
    let seed = request.sampling.seed;
    let (news_tx, news) = mpsc::channel(SESSION_QUEUE);
    let seq = shared.sessions().register(news_tx);
    let limits = ModelLimits {
        eos: shared.model().tokenizer.eos().to_vec(),
        context,
        prefill_chunk: shared.config().prefill_chunk,
    };
    let deadlines = Deadlines {
        ready: READY_WAIT,
        recover: shared.config().recover_wait,
        ..Deadlines::default()
    };
    let id = request_id();
    shared
        .metrics()
        .prompt_tokens
        .inc_by(request.prompt.len() as u64);
    let span = tracing::info_span!("request", id = %id, seq, prompt_tokens = request.prompt.len());
    let draft = shared.model().draft.as_ref();
    let drafter = draft.and_then(|d| d.drafter(&request.sampling));
    let mut core = SequenceCore::new(seq, request, limits, deadlines, Instant::now());
    let policy = shared.config().draft_policy;
    core = match (draft, drafter) {
        (_, Some(drafter)) => core.with_drafter(drafter, policy),
        (Some(_), None) => core.with_drafts_from_last_stage(policy),
        (None, None) => core,
    };
    let (out, deltas) = mpsc::channel(STREAM_QUEUE);
    let session = Session {
        shared: shared.clone(),
        core,
        news,
        out,
        id: id.clone(),
        pipeline: None,
        client_gone: false,
        started_unix_ms: unix_ms(),
        last_token_at: None,
        paused_since: None,
        need: reservation.need(),
        reservation: Some(reservation),
        backlog: VecDeque::new(),
        stall: None,
        held: None,
        freeing: None,
    };
    tokio::spawn(session.run().instrument(span));
    Ok(Answer { id, seed, deltas })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The shell of one sequence.
struct Session {
    shared: Arc<Shared>,
    core: SequenceCore,
    news: mpsc::Receiver<News>,
    out: mpsc::Sender<Result<Delta, Error>>,
    id: String,
    /// The pipeline its steps go to.
    pipeline: Option<Arc<Pipeline>>,
    client_gone: bool,
    started_unix_ms: u64,
    /// When it last delivered a token.
    last_token_at: Option<Instant>,
    /// Replayed onto another pipeline and not yet delivered there: since when it paused.
    paused_since: Option<Instant>,
    /// Positions it reserves in the KV budget.
    need: usize,
    /// Its hold on them: none while it is preempted (given back when the session ends).
    reservation: Option<Reservation>,
    /// What the client has not taken yet, in order: a delta, maybe an error after it.
    backlog: VecDeque<Result<Delta, Error>>,
    /// Since when the client has not read what waits for it.
    stall: Option<Stall>,
    /// The next step, held back while the client does not read (so the answer runs no
    /// further ahead of its reader than one token).
    held: Option<(u64, Step)>,
    /// A free sent to the pipeline of an epoch, and until when the session waits for word
    /// that every stage did it.
    freeing: Option<(u64, Instant)>,
}

/// A client that does not read.
#[derive(Debug, Clone, Copy)]
struct Stall {
    since: Instant,
    /// When to look again at whether others wait for its room.
    look_again: Instant,
}

impl Stall {
    fn new(now: Instant) -> Self {
        Stall {
            since: now,
            look_again: now + PREEMPT_AFTER,
        }
    }
}

impl Session {
    async fn run(mut self) {
        let mut serving = self.shared.watch_serving();
        while self.core.outcome().is_none() {
            let actions = self.next_actions(&mut serving).await;
            for action in actions {
                self.perform(action).await;
            }
        }
        self.record();
        self.await_freed().await;
        self.shared.sessions().remove(self.core.id());
        // The KV reservation goes back before the end of the answer waits for its reader.
        self.reservation = None;
        self.drain_backlog().await;
    }

    /// Holds the KV reservation until every stage has dropped the caches (the last stage
    /// says so), so a request admitted into those positions never finds them still taken;
    /// a pipeline that broke, or no word within [`FREED_WAIT`], lets go anyway (a new plan
    /// drops every cache).
    async fn await_freed(&mut self) {
        let Some((epoch, deadline)) = self.freeing else {
            return;
        };
        loop {
            tokio::select! {
                news = self.news.recv() => match news {
                    Some(News::Freed) | None => return,
                    Some(News::StageLost { epoch: e, .. }) if e == epoch => return,
                    Some(_) => {}
                },
                _ = tokio::time::sleep_until(deadline.into()) => {
                    debug!(request = %self.id, "no word that the caches were dropped; letting the reservation go");
                    return;
                }
            }
        }
    }

    /// Gives the client what is left of the answer, within its timeout.
    async fn drain_backlog(&mut self) {
        let since = self.stall.map_or_else(Instant::now, |s| s.since);
        let deadline = since + self.shared.config().client_timeout;
        while let Some(item) = self.backlog.pop_front() {
            let sent = tokio::time::timeout_at(deadline.into(), self.out.send(item)).await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
        }
    }

    /// Waits for what happens next and lets the core decide.
    async fn next_actions(
        &mut self,
        serving: &mut tokio::sync::watch::Receiver<ServingState>,
    ) -> Vec<Action> {
        let shared = self.shared.clone();
        let tokenizer = &shared.model().tokenizer;
        let queued = self.reservation.as_ref().is_some_and(Reservation::queued);
        let admitted = self.reservation.as_ref().is_some_and(|r| !r.queued());
        // A preempted answer restarts only once its old caches are gone.
        if self.core.waiting() && admitted && self.freeing.is_none() {
            let state = serving.borrow_and_update().clone();
            if let Some(p) = state.pipeline() {
                self.pipeline = Some(p.clone());
                shared.sessions().set_pipeline(self.core.id(), p);
                let event = Event::Pipeline { epoch: p.epoch };
                return self.core.handle(event, Instant::now(), tokenizer, "");
            }
        }
        let wake = self.next_wake();
        let waiting = self.core.waiting();
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let out = self.out.clone();
        let unread = !self.backlog.is_empty() && !self.client_gone;
        let reservation = &mut self.reservation;
        tokio::select! {
            news = self.news.recv() => self.on_news(news, tokenizer),
            changed = serving.changed(), if waiting => {
                if changed.is_err() {
                    return self.core.handle(Event::ClientGone, Instant::now(), tokenizer, "");
                }
                Vec::new()
            }
            _ = self.out.closed(), if !self.client_gone => self.client_left(Instant::now()),
            permit = out.reserve(), if unread => match permit {
                Ok(permit) => self.client_read(permit),
                // Hung up: the branch above cancels.
                Err(_) => Vec::new(),
            },
            admitted = async {
                match reservation {
                    Some(r) => r.admitted().await,
                    None => Ok(()),
                }
            }, if queued => match admitted {
                Ok(()) => Vec::new(),
                Err(refusal) => self.refused(refusal),
            },
            _ = sleep => self.on_timers(Instant::now()),
        }
    }

    fn on_news(&mut self, news: Option<News>, tokenizer: &strata_model::Tokenizer) -> Vec<Action> {
        let now = Instant::now();
        match news {
            Some(News::Token { epoch, sampled }) => {
                self.core.crowd(self.shared.sessions().active());
                let event = Event::Token {
                    epoch,
                    sampled: &sampled,
                };
                self.core.handle(event, now, tokenizer, "")
            }
            Some(News::Drafts { epoch, drafts }) => {
                let event = Event::Drafts {
                    epoch,
                    drafts: &drafts,
                };
                self.core.handle(event, now, tokenizer, "")
            }
            Some(News::Prefilled { epoch, done }) => {
                self.core
                    .handle(Event::Prefilled { epoch, done }, now, tokenizer, "")
            }
            Some(News::Freed) => {
                self.freed();
                Vec::new()
            }
            Some(News::Failure { epoch, failure }) => {
                let event = Event::Failure {
                    epoch,
                    failure: &failure,
                };
                self.core.handle(event, now, tokenizer, "")
            }
            Some(News::StageLost { epoch, reason }) => {
                if self.freeing.is_some_and(|(e, _)| e == epoch) {
                    // Its caches went with the pipeline.
                    self.freed();
                }
                if self.core.epoch() == Some(epoch) {
                    info!(request = %self.id, "{reason}: waiting for the next plan to resume");
                }
                self.core
                    .handle(Event::StageLost { epoch, reason }, now, tokenizer, "")
            }
            None => self.core.handle(Event::ClientGone, now, tokenizer, ""),
        }
    }

    /// The earliest of the core's deadline, the stalled client's and the free's.
    fn next_wake(&self) -> Option<Instant> {
        let client_timeout = self.shared.config().client_timeout;
        let stall = self
            .stall
            .map(|s| s.look_again.min(s.since + client_timeout));
        let freeing = self.freeing.map(|(_, deadline)| deadline);
        [self.core.poll_timeout(), stall, freeing]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_timers(&mut self, now: Instant) -> Vec<Action> {
        if self.freeing.is_some_and(|(_, deadline)| now >= deadline) {
            debug!(request = %self.id, "no word that the caches were dropped; letting the reservation go");
            self.freed();
        }
        let mut actions = self.on_stall(now);
        if self.core.poll_timeout().is_some_and(|t| now >= t) {
            let detail = if self.reservation.as_ref().is_some_and(Reservation::queued) {
                let (capacity, reserved, waiting) = self.shared.gate().figures();
                format!(
                    "it waited its turn for room in the KV cache ({reserved} of {capacity} \
                     positions reserved, {waiting} requests waiting)"
                )
            } else {
                self.shared.serving().detail()
            };
            let shared = self.shared.clone();
            let tokenizer = &shared.model().tokenizer;
            actions.extend(self.core.handle(Event::Tick, now, tokenizer, &detail));
        }
        actions
    }

    /// A client that does not read: after [`PREEMPT_AFTER`], while others wait for room in
    /// the KV cache, its answer is paused and its caches freed; after `--client-timeout` it
    /// is cancelled.
    fn on_stall(&mut self, now: Instant) -> Vec<Action> {
        let Some(stall) = self.stall else {
            return Vec::new();
        };
        let shared = self.shared.clone();
        let tokenizer = &shared.model().tokenizer;
        let timeout = shared.config().client_timeout;
        if now >= stall.since + timeout {
            info!(request = %self.id, ?timeout, "the client read nothing within its timeout: cancelled");
            return self.client_left(now);
        }
        if now < stall.look_again {
            return Vec::new();
        }
        self.stall = Some(Stall {
            look_again: now + PREEMPT_AFTER,
            ..stall
        });
        let (_, _, waiting) = shared.gate().figures();
        if waiting == 0 || self.held.take().is_none() {
            return Vec::new();
        }
        info!(
            request = %self.id,
            waiting,
            generated = self.core.generated(),
            "the client stopped reading while others wait for room: the answer pauses and frees its caches"
        );
        shared.metrics().preemptions.inc();
        shared.sessions().clear_pipeline(self.core.id());
        self.core.handle(Event::Preempt, now, tokenizer, "")
    }

    /// The client hung up or timed out: the answer is cancelled. A step held back for it
    /// was never sent, so its caches are freed now rather than after a step that will not
    /// come back.
    fn client_left(&mut self, now: Instant) -> Vec<Action> {
        let shared = self.shared.clone();
        let tokenizer = &shared.model().tokenizer;
        self.client_gone = true;
        self.backlog.clear();
        self.stall = None;
        let mut actions = Vec::new();
        if self.held.take().is_some() {
            actions = self.core.handle(Event::Preempt, now, tokenizer, "");
        }
        actions.extend(self.core.handle(Event::ClientGone, now, tokenizer, ""));
        actions
    }

    /// The client took what waited for it (`permit` has room for the first of it).
    fn client_read(&mut self, permit: mpsc::Permit<'_, Result<Delta, Error>>) -> Vec<Action> {
        if let Some(item) = self.backlog.pop_front() {
            permit.send(item);
        }
        while let Some(item) = self.backlog.pop_front() {
            match self.out.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.backlog.push_front(item);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => self.backlog.clear(),
            }
        }
        let now = Instant::now();
        if !self.backlog.is_empty() {
            self.stall = Some(Stall::new(now));
            return Vec::new();
        }
        self.stall = None;
        if self.core.paused() {
            return self.resume(now);
        }
        match self.held.take() {
            // Unless the run it belongs to was lost meanwhile (the next replays instead).
            Some((epoch, step))
                if step.attempt == self.core.attempt() && self.core.epoch() == Some(epoch) =>
            {
                vec![Action::Send { epoch, step }]
            }
            _ => Vec::new(),
        }
    }

    /// The client of a preempted answer reads again: it asks for its room back, ahead of
    /// the queue, and replays once it has it.
    fn resume(&mut self, now: Instant) -> Vec<Action> {
        let shared = self.shared.clone();
        let tokenizer = &shared.model().tokenizer;
        info!(request = %self.id, "the client reads again: the answer resumes");
        if self.reservation.is_none() {
            match shared.gate().resume(self.need) {
                Ok(r) => self.reservation = Some(r),
                Err(refusal) => {
                    // It fitted before and the budget does not shrink: never seen.
                    warn!(request = %self.id, ?refusal, "no room for a resumed answer; cancelled");
                    return self.core.handle(Event::ClientGone, now, tokenizer, "");
                }
            }
        }
        self.core.handle(Event::Resume, now, tokenizer, "")
    }

    /// It waited for room and gave its place up to a smaller request.
    fn refused(&mut self, refusal: Refusal) -> Vec<Action> {
        let retry_after = match refusal {
            Refusal::Busy { retry_after, .. } => retry_after,
            Refusal::TooLarge { .. } => Duration::from_secs(1),
        };
        let shared = self.shared.clone();
        shared.metrics().refused.with_label_values(&["busy"]).inc();
        self.reservation = None;
        let event = Event::Refused {
            message: format!(
                "the cluster is busy: this request waited for {} KV-cache positions and gave \
                 its place in the full queue to a shorter one; retry in {} s",
                self.need,
                retry_after.as_secs()
            ),
            retry_after,
        };
        self.core
            .handle(event, Instant::now(), &shared.model().tokenizer, "")
    }

    /// Every stage dropped the caches the session freed (or it stopped waiting for word):
    /// a preempted answer gives its room back.
    fn freed(&mut self) {
        self.freeing = None;
        if self.core.paused() {
            self.reservation = None;
        }
    }

    /// Hands an item to the client, or keeps it (and all after it) until the client reads.
    fn give(&mut self, item: Result<Delta, Error>) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(item);
            return;
        }
        match self.out.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.backlog.push_back(item);
                self.stall = Some(Stall::new(Instant::now()));
            }
            // Hung up: the session hears of it and cancels.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Frees the sequence's caches on the pipeline of `epoch`, then awaits word that every
    /// stage did (or, when the frame cannot go, counts them freed now).
    async fn free(&mut self, epoch: u64) {
        let sent = match self.pipeline.clone().filter(|p| p.epoch == epoch) {
            Some(p) => {
                let frame = Frame::Free {
                    epoch,
                    seqs: vec![self.core.id()],
                };
                let sent = strata_net::transport::send_frame(&p.first, &frame).await;
                if let Err(e) = &sent {
                    debug!(cause = %e, "could not free a sequence's caches");
                }
                sent.is_ok()
            }
            None => false,
        };
        if sent {
            self.freeing = Some((epoch, Instant::now() + FREED_WAIT));
        } else {
            self.freed();
        }
    }

    async fn perform(&mut self, action: Action) {
        match action {
            Action::Send { epoch, step } => {
                let Some(pipeline) = self.pipeline.clone().filter(|p| p.epoch == epoch) else {
                    return;
                };
                if !self.backlog.is_empty() {
                    self.held = Some((epoch, step));
                    return;
                }
                if step.start == 0 && self.core.replays() > 0 {
                    info!(request = %self.id, epoch, tokens = step.len(), "replaying the answer's history on the new pipeline");
                    self.shared.metrics().replays.inc();
                    self.paused_since = self.last_token_at.or(self.paused_since);
                }
                let outbound = Outbound { pipeline, step };
                if self.shared.outbox().send(outbound).await.is_err() {
                    self.core.handle(
                        Event::ClientGone,
                        Instant::now(),
                        &self.shared.model().tokenizer,
                        "",
                    );
                }
            }
            Action::Deliver(mut delta) => {
                if let Some((_, usage)) = &mut delta.finish {
                    usage.energy_joules = self.shared.sessions().energy(self.core.id()).joules();
                }
                let m = self.shared.metrics();
                m.generated_tokens.inc();
                let now = Instant::now();
                if let Some(since) = self.paused_since.take() {
                    let pause = now.saturating_duration_since(since);
                    m.resume_pause.observe(pause.as_secs_f64());
                    info!(request = %self.id, pause_ms = pause.as_millis() as u64, "the answer resumed");
                }
                self.last_token_at = Some(now);
                if self.core.generated() == 1 {
                    m.time_to_first_token
                        .observe(self.core.usage(Instant::now()).time_to_first_token_ms / 1e3);
                }
                if !self.client_gone {
                    self.give(Ok(delta));
                }
            }
            Action::Free { epoch } => self.free(epoch).await,
            Action::Fail(e) => {
                info!(request = %self.id, cause = %e, "request failed");
                let e = match e {
                    SequenceError::Busy {
                        message,
                        retry_after,
                    } => Error::Busy {
                        message,
                        retry_after,
                    },
                    e => Error::from(e),
                };
                if !self.client_gone {
                    self.give(Err(e));
                }
            }
        }
    }

    /// Records the outcome.
    fn record(&self) {
        let shared = &self.shared;
        let usage = self.core.usage(Instant::now());
        let joules = self.shared.sessions().energy(self.core.id()).joules();
        let outcome = match self.core.outcome() {
            Some(Outcome::Finished(FinishReason::Stop)) => "stop",
            Some(Outcome::Finished(_)) => "length",
            Some(Outcome::Cancelled) => "cancelled",
            _ => "failed",
        };
        if outcome == "cancelled" {
            debug!(request = %self.id, "client left; sequence freed");
        }
        shared.metrics().finished(RequestRecord {
            id: self.id.clone(),
            started_unix_ms: self.started_unix_ms,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            time_to_first_token_ms: usage.time_to_first_token_ms,
            tokens_per_second: usage.decode_tokens_per_second,
            outcome: outcome.into(),
            draft_tokens: usage.draft_tokens,
            accepted_draft_tokens: usage.accepted_draft_tokens,
            passes: usage.passes,
            route: "local",
            joules,
        });
    }
}
