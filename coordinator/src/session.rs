//! Sessions: every live sequence's token history and its decode loop. A sequence's
//! prompt goes to stage 0 as token ids; each sampled token comes back from the last
//! stage and goes out again as the next step. Many sequences are in flight at once, on
//! different stages (pipelining), and a stage batches whatever is waiting for it.
//!
//! The history kept here is everything needed to rebuild a sequence's caches on a new
//! pipeline (replay), which later recovery builds on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_model::{SamplingParams, StreamDecoder};
use strata_net::frame::Frame;
use strata_proto::v1::{
    FinishReason, FrameChunk, FrameHeader, FrameKind, GenerateResponse, SampledLogprob,
    SampledToken, TokenLogprob, Usage, WireDType,
};
use strata_proto::PROTOCOL_VERSION;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::metrics::RequestRecord;
use crate::planner::Plan;
use crate::Shared;

/// Token frames waiting for the dispatcher.
pub const TOKEN_QUEUE: usize = 1024;
/// Chunks waiting for the batcher.
pub const OUTBOX_QUEUE: usize = 1024;
/// Events waiting for one session.
const SESSION_QUEUE: usize = 8;
/// How long a request waits for the cluster to be ready.
pub const READY_WAIT: Duration = Duration::from_secs(120);
/// How long a step may take before the request fails (a stuck pipeline, not a slow one).
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// A wired pipeline.
#[derive(Debug)]
pub struct Pipeline {
    /// Plan epoch.
    pub epoch: u64,
    /// The plan.
    pub plan: Plan,
    /// Connection to stage 0.
    pub first: quinn::Connection,
}

impl Pipeline {
    /// Whether `worker` holds a stage of it.
    pub fn uses(&self, worker: &str) -> bool {
        self.plan.stages.iter().any(|s| s.worker == worker)
    }
}

enum Event {
    Token(SampledToken),
    Failed(String),
}

struct Entry {
    tx: mpsc::Sender<Event>,
    pipeline: Arc<Pipeline>,
}

/// Live sequences by id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<u64, Entry>>,
    next: std::sync::atomic::AtomicU64,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sequences being generated.
    pub fn active(&self) -> usize {
        self.lock().len()
    }

    /// Sequences on pipeline `epoch`.
    pub fn active_on(&self, epoch: u64) -> usize {
        self.lock()
            .values()
            .filter(|e| e.pipeline.epoch == epoch)
            .count()
    }
}

/// Fails every sequence whose pipeline uses `worker`, and takes that pipeline out of service.
pub fn fail_worker(shared: &Shared, worker: &str, reason: &str) {
    let failed: Vec<mpsc::Sender<Event>> = shared
        .sessions
        .lock()
        .values()
        .filter(|e| e.pipeline.uses(worker))
        .map(|e| e.tx.clone())
        .collect();
    for tx in &failed {
        let _ = tx.try_send(Event::Failed(reason.to_string()));
    }
    let in_use = shared
        .pipeline
        .borrow()
        .as_ref()
        .is_some_and(|p| p.uses(worker));
    if in_use {
        shared.pipeline.send_replace(None);
        shared.set_detail(format!("re-planning: {reason}"));
    }
    if !failed.is_empty() {
        warn!(
            sequences = failed.len(),
            "{reason}: failed the requests using it"
        );
    }
}

/// Routes sampled tokens and errors from the last stage to their sessions.
pub async fn dispatch(shared: Arc<Shared>, mut frames: mpsc::Receiver<Frame>) {
    loop {
        let frame = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            f = frames.recv() => match f { Some(f) => f, None => return },
        };
        let h = frame.header;
        if FrameKind::try_from(h.kind) != Ok(FrameKind::Tokens) {
            warn!(
                kind = h.kind,
                "the coordinator got a frame that is not tokens; dropped"
            );
            continue;
        }
        let map = shared.sessions.lock();
        for t in h.tokens {
            if let Some(e) = map.get(&t.sequence) {
                let _ = e.tx.try_send(Event::Token(t));
            }
        }
        for err in &h.errors {
            if let Some(e) = map.get(&err.sequence) {
                let _ = e.tx.try_send(Event::Failed(err.message.clone()));
            }
        }
    }
}

/// One sequence's next chunk, waiting to go to stage 0.
pub struct Outbound {
    /// The pipeline the sequence runs on.
    pub pipeline: Arc<Pipeline>,
    /// The chunk.
    pub chunk: FrameChunk,
}

/// Sends the chunks of every sequence that is ready at the same moment as one frame, so
/// stage 0 runs them as one batch. Sequences become ready together when the last stage
/// sampled them in one batch; their sessions wake at once and hand their next step here.
pub async fn batcher(shared: Arc<Shared>, mut outbox: mpsc::Receiver<Outbound>) {
    loop {
        let first = tokio::select! {
            _ = shared.cancel.cancelled() => return,
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
        // One frame per pipeline (a re-plan can leave two in use for a moment).
        while !batch.is_empty() {
            let epoch = batch[0].pipeline.epoch;
            let (group, rest): (Vec<Outbound>, Vec<Outbound>) =
                batch.into_iter().partition(|o| o.pipeline.epoch == epoch);
            batch = rest;
            let pipeline = group[0].pipeline.clone();
            let seqs: Vec<u64> = group.iter().map(|o| o.chunk.sequence).collect();
            let header = FrameHeader {
                protocol_version: PROTOCOL_VERSION,
                kind: FrameKind::Forward as i32,
                epoch,
                chunks: group.into_iter().map(|o| o.chunk).collect(),
                dtype: WireDType::None as i32,
                ..Default::default()
            };
            debug!(sequences = seqs.len(), "to stage 0");
            if let Err(e) = strata_net::transport::send_frame(&pipeline.first, &header, &[]).await {
                let stage0 = pipeline
                    .plan
                    .stages
                    .first()
                    .map(|s| s.worker.clone())
                    .unwrap_or_default();
                let reason = format!("stage 0 (worker {stage0}) is unreachable: {e}");
                let map = shared.sessions.lock();
                for seq in seqs {
                    if let Some(e) = map.get(&seq) {
                        let _ = e.tx.try_send(Event::Failed(reason.clone()));
                    }
                }
            }
        }
    }
}

/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Streamed responses waiting for a slow client.
const STREAM_QUEUE: usize = 16;

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
    let m = &shared.model;
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

/// Starts a generation; its steps arrive on the returned channel (an `Err` ends it).
pub fn start(
    shared: &Arc<Shared>,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
    logprobs: bool,
) -> Result<mpsc::Receiver<Result<GenerateResponse, Status>>, Error> {
    sampling
        .validate()
        .map_err(|e| Error::InvalidRequest(e.to_string()))?;
    let id = request_id();
    let job = Job {
        id: id.clone(),
        prompt,
        max_tokens: if max_tokens == 0 {
            DEFAULT_MAX_TOKENS
        } else {
            max_tokens
        },
        sampling,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        ignore_eos,
        logprobs,
    };
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let span = tracing::info_span!("request", id = %id, prompt_tokens = job.prompt.len());
    tokio::spawn(tracing::Instrument::instrument(
        generate(shared.clone(), job, tx),
        span,
    ));
    Ok(rx)
}

/// Waits until a pipeline is serving.
pub async fn ready_pipeline(shared: &Shared) -> Result<Arc<Pipeline>, Error> {
    let mut rx = shared.pipeline.subscribe();
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        if let Some(p) = rx.borrow_and_update().clone() {
            return Ok(p);
        }
        // Waiting helps while a plan loads, not when the workers cannot hold the model.
        if shared.shortfall.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Unavailable(format!(
                "the cluster cannot hold the model: {}",
                shared.detail()
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Error::Unavailable(format!(
                    "the cluster is not serving after {}s: {}",
                    READY_WAIT.as_secs(),
                    shared.detail()
                )))
            }
            r = rx.changed() => if r.is_err() { return Err(Error::Unavailable("shutting down".into())) },
        }
    }
}

/// What a client asked to generate, tokenized.
#[derive(Debug, Clone)]
pub struct Job {
    /// Request id for logs.
    pub id: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Return each token's log-probability (and `sampling.top_logprobs` alternatives).
    pub logprobs: bool,
}

/// Runs one sequence to the end, streaming each step into `out`.
pub async fn generate(
    shared: Arc<Shared>,
    job: Job,
    out: mpsc::Sender<Result<GenerateResponse, Status>>,
) {
    let started = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut tally = Tally::default();
    let result = run_sequence(&shared, &job, &out, started, &mut tally).await;
    let outcome = match &result {
        Ok(Some(reason)) => match reason {
            FinishReason::Stop => "stop",
            _ => "length",
        },
        Ok(None) => "cancelled",
        Err(_) => "failed",
    };
    shared.metrics.finished(RequestRecord {
        id: job.id.clone(),
        started_unix_ms,
        prompt_tokens: job.prompt.len(),
        completion_tokens: tally.generated,
        time_to_first_token_ms: tally.time_to_first_token_ms(started),
        tokens_per_second: tally.decode_tokens_per_second(),
        outcome: outcome.into(),
    });
    if let Err(e) = result {
        info!(request = %job.id, cause = %e, "request failed");
        let _ = out.send(Err(e.into())).await;
    }
}

/// What a sequence produced, for its metrics even when it fails.
#[derive(Default)]
struct Tally {
    generated: usize,
    first_token_at: Option<Instant>,
}

impl Tally {
    /// From the request's arrival to its first token (0 when there was none).
    fn time_to_first_token_ms(&self, started: Instant) -> f64 {
        self.first_token_at
            .map_or(0.0, |t| (t - started).as_secs_f64() * 1e3)
    }

    /// Tokens per second after the first, until now.
    fn decode_tokens_per_second(&self) -> f64 {
        let secs = self
            .first_token_at
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        if self.generated > 1 && secs > 0.0 {
            (self.generated - 1) as f64 / secs
        } else {
            0.0
        }
    }
}

fn logprob_of(t: &SampledToken) -> SampledLogprob {
    SampledLogprob {
        token: Some(TokenLogprob {
            token_id: t.token_id,
            logprob: t.logprob,
        }),
        top: t.top.clone(),
    }
}

async fn run_sequence(
    shared: &Arc<Shared>,
    job: &Job,
    out: &mpsc::Sender<Result<GenerateResponse, Status>>,
    started: Instant,
    tally: &mut Tally,
) -> Result<Option<FinishReason>, Error> {
    let context = shared.model.file.config().max_position_embeddings;
    if job.prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt has no tokens".into()));
    }
    if job.prompt.len() >= context {
        return Err(Error::InvalidRequest(format!(
            "the prompt has {} tokens but the model's context holds {context}: shorten it",
            job.prompt.len()
        )));
    }
    let pipeline = ready_pipeline(shared).await?;
    shared.metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
    let seq = shared
        .sessions
        .next
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
    shared.sessions.lock().insert(
        seq,
        Entry {
            tx,
            pipeline: pipeline.clone(),
        },
    );
    // Whatever happens below, the session leaves the table.
    struct Remove<'a>(&'a Shared, u64);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            self.0.sessions.lock().remove(&self.1);
        }
    }
    let _remove = Remove(shared, seq);
    let stage0 = pipeline
        .plan
        .stages
        .first()
        .map(|s| s.worker.clone())
        .unwrap_or_default();
    let send = |h: FrameHeader| {
        let conn = pipeline.first.clone();
        let stage0 = stage0.clone();
        async move {
            strata_net::transport::send_frame(&conn, &h, &[])
                .await
                .map_err(|e| {
                    Error::WorkerFailed(format!("stage 0 (worker {stage0}) is unreachable: {e}"))
                })
        }
    };
    let free = |epoch: u64| FrameHeader {
        protocol_version: PROTOCOL_VERSION,
        kind: FrameKind::Free as i32,
        epoch,
        free: vec![seq],
        ..Default::default()
    };
    let step = |chunk: FrameChunk| {
        let outbound = Outbound {
            pipeline: pipeline.clone(),
            chunk,
        };
        async move {
            shared
                .outbox
                .send(outbound)
                .await
                .map_err(|_| Error::Unavailable("shutting down".into()))
        }
    };
    step(FrameChunk {
        sequence: seq,
        start: 0,
        length: job.prompt.len() as u32,
        token_ids: job.prompt.clone(),
        sampling: Some(strata_net::frame::wire_sampling(&job.sampling)),
    })
    .await?;
    let tokenizer = &shared.model.tokenizer;
    let eos = tokenizer.eos();
    let mut history = job.prompt.clone();
    let mut decoder = StreamDecoder::new();
    let mut text = String::new();
    let mut sent_chars = 0usize;
    let hold = job.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    loop {
        let event = tokio::select! {
            e = tokio::time::timeout(STEP_TIMEOUT, rx.recv()) => match e {
                Ok(Some(e)) => e,
                Ok(None) => return Err(Error::WorkerFailed("the session was dropped".into())),
                Err(_) => {
                    let _ = send(free(pipeline.epoch)).await;
                    return Err(Error::WorkerFailed(format!("no token for {}s: the pipeline is stuck", STEP_TIMEOUT.as_secs())));
                }
            },
            _ = out.closed() => {
                // The client left: let the step in flight land, then free the caches.
                let _ = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
                let _ = send(free(pipeline.epoch)).await;
                debug!(request = %job.id, "client left; sequence freed");
                return Ok(None);
            }
        };
        let sampled = match event {
            Event::Token(t) => t,
            Event::Failed(reason) => {
                let _ = send(free(pipeline.epoch)).await;
                return Err(Error::WorkerFailed(reason));
            }
        };
        let token = sampled.token_id;
        if tally.first_token_at.is_none() {
            let now = Instant::now();
            tally.first_token_at = Some(now);
            shared
                .metrics
                .time_to_first_token
                .observe((now - started).as_secs_f64());
        }
        shared.metrics.generated_tokens.inc();
        history.push(token);
        tally.generated += 1;
        let generated = tally.generated;
        let is_eos = (!job.ignore_eos && eos.contains(&token))
            || job.sampling.stop_token_ids.contains(&token);
        let mut finish = if is_eos {
            Some(FinishReason::Stop)
        } else if generated >= job.max_tokens {
            Some(FinishReason::Length)
        } else if history.len() >= context {
            Some(FinishReason::Context)
        } else {
            None
        };
        if !is_eos {
            text.push_str(&decoder.push(tokenizer, token)?);
        }
        if finish.is_some() {
            text.push_str(&decoder.finish(tokenizer)?);
        }
        // Stop strings end the text before them; hold back what could start one.
        let mut visible = text.len();
        if let Some(at) = job.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            visible = at;
            finish = Some(FinishReason::Stop);
        } else if finish.is_none() && hold > 0 {
            visible = text.len().saturating_sub(hold - 1);
            while !text.is_char_boundary(visible) {
                visible -= 1;
            }
        }
        let delta = if visible > sent_chars {
            let d = text[sent_chars..visible].to_string();
            sent_chars = visible;
            d
        } else {
            String::new()
        };
        let mut msg = GenerateResponse {
            text: delta,
            token_ids: vec![token],
            request_id: job.id.clone(),
            logprobs: if job.logprobs {
                vec![logprob_of(&sampled)]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        if let Some(reason) = finish {
            msg.finish_reason = reason as i32;
            msg.usage = Some(Usage {
                prompt_tokens: job.prompt.len() as u32,
                completion_tokens: generated as u32,
                time_to_first_token_ms: tally.time_to_first_token_ms(started),
                decode_tokens_per_second: tally.decode_tokens_per_second(),
            });
            let _ = send(free(pipeline.epoch)).await;
            let _ = out.send(Ok(msg)).await;
            return Ok(Some(reason));
        }
        if out.send(Ok(msg)).await.is_err() {
            // Client gone between steps: nothing in flight, free now.
            let _ = send(free(pipeline.epoch)).await;
            return Ok(None);
        }
        step(FrameChunk {
            sequence: seq,
            start: (history.len() - 1) as u32,
            length: 1,
            token_ids: vec![token],
            sampling: None,
        })
        .await?;
    }
}
