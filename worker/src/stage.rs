//! The stage runtime: one dedicated compute thread that owns the loaded slice, its KV
//! caches and (on the last stage) each sequence's sampler. It takes frames from a bounded
//! channel, runs every waiting sequence in one batched forward, and hands its output to
//! the next hop. Commands (install, wire, unload) travel in the same channel, so the
//! thread is the only owner of the model state and needs no locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use strata_model::{Chunk, KvCache, Sampler, Stage, StageInput, StageOutput};
use strata_proto::v1::{
    FrameChunk, FrameHeader, FrameKind, SampledToken, SequenceError, TokenLogprob, WireDType,
};
use strata_proto::PROTOCOL_VERSION;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use strata_net::frame::{self, sampling_params, Frame};

/// Most rows one batched forward takes; more waiting frames go into the next batch.
pub const MAX_BATCH_ROWS: usize = 2048;
/// Frames and commands waiting for the compute thread.
pub const QUEUE_DEPTH: usize = 256;

/// A frame ready to go to the next hop.
pub type Outgoing = (FrameHeader, Vec<u8>);

/// Where the stage sends its output, and in which epoch and wire type.
#[derive(Debug, Clone)]
pub struct Wiring {
    /// Plan epoch; frames of other epochs are dropped.
    pub epoch: u64,
    /// Activations' wire type.
    pub dtype: WireDType,
    /// The sender task of the next hop.
    pub next: mpsc::Sender<Outgoing>,
}

/// What the compute thread is asked to do.
pub enum Command {
    /// Run a frame.
    Frame(Frame),
    /// Replace the slice.
    Install(Box<Stage>, oneshot::Sender<()>),
    /// Wire the output.
    Wire(Wiring, oneshot::Sender<()>),
    /// Drop the slice and every cache.
    Unload(oneshot::Sender<()>),
}

/// Figures the control service reports, written by the compute thread.
#[derive(Debug, Default)]
pub struct StageStats {
    /// Sequences with a cache.
    pub sequences: AtomicU32,
    /// Commands waiting.
    pub queued: AtomicU32,
    /// Epoch wired.
    pub epoch: AtomicU64,
    /// The last failure, if any.
    pub error: Mutex<Option<String>>,
    /// "idle", "loading" or "ready".
    pub state: Mutex<String>,
    /// Nanoseconds spent in forwards and sampling.
    pub compute_nanos: AtomicU64,
    /// Nanoseconds spent sending frames to the next hop.
    pub network_nanos: AtomicU64,
    /// Batched forwards run.
    pub forwards: AtomicU64,
}

impl StageStats {
    /// Sets the state word.
    pub fn set_state(&self, s: &str) {
        if let Ok(mut g) = self.state.lock() {
            *g = s.to_string();
        }
    }
    /// The state word.
    pub fn state(&self) -> String {
        self.state.lock().map(|g| g.clone()).unwrap_or_default()
    }
    /// Records a failure.
    pub fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.error.lock() {
            *g = e;
        }
    }
    /// The last failure.
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|g| g.clone())
    }
}

/// Handle to the compute thread.
#[derive(Clone)]
pub struct StageHandle {
    tx: mpsc::Sender<Command>,
    /// Its figures.
    pub stats: Arc<StageStats>,
}

impl StageHandle {
    /// Starts the compute thread.
    pub fn spawn(name: String) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(StageStats::default());
        stats.set_state("idle");
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("strata-stage".into())
            .spawn(move || Runtime::new(name, thread_stats).run(rx))?;
        Ok(StageHandle { tx, stats })
    }

    /// Queues a command; waits while the queue is full (backpressure to the network).
    pub async fn send(&self, cmd: Command) -> bool {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(cmd).await.is_ok()
    }

    /// Queues a command and waits for its reply.
    pub async fn call(&self, make: impl FnOnce(oneshot::Sender<()>) -> Command) -> bool {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await && rx.await.is_ok()
    }
}

struct Loaded {
    stage: Stage,
    cache: KvCache,
    samplers: HashMap<u64, Sampler>,
    history: HashMap<u64, Vec<u32>>,
}

struct Runtime {
    name: String,
    stats: Arc<StageStats>,
    loaded: Option<Loaded>,
    wiring: Option<Wiring>,
}

impl Runtime {
    fn new(name: String, stats: Arc<StageStats>) -> Self {
        Runtime {
            name,
            stats,
            loaded: None,
            wiring: None,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut pending: Option<Command> = None;
        loop {
            let first = match pending.take() {
                Some(c) => c,
                None => match rx.blocking_recv() {
                    Some(c) => c,
                    None => return,
                },
            };
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            match first {
                Command::Frame(f) => {
                    let mut batch = vec![f];
                    let mut rows = frame::rows(&batch[0].header);
                    // Everything already waiting joins this forward.
                    while rows < MAX_BATCH_ROWS {
                        match rx.try_recv() {
                            Ok(Command::Frame(f)) => {
                                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                                rows += frame::rows(&f.header);
                                batch.push(f);
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let started = std::time::Instant::now();
                    self.run_batch(batch);
                    self.stats
                        .compute_nanos
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    self.stats.forwards.fetch_add(1, Ordering::Relaxed);
                }
                Command::Install(stage, reply) => {
                    let cache = stage.new_cache();
                    self.loaded = Some(Loaded {
                        stage: *stage,
                        cache,
                        samplers: HashMap::new(),
                        history: HashMap::new(),
                    });
                    self.stats.sequences.store(0, Ordering::Relaxed);
                    self.stats.set_state("ready");
                    let _ = reply.send(());
                }
                Command::Wire(w, reply) => {
                    self.stats.epoch.store(w.epoch, Ordering::Relaxed);
                    self.wiring = Some(w);
                    self.stats.set_error(None);
                    let _ = reply.send(());
                }
                Command::Unload(reply) => {
                    self.loaded = None;
                    self.wiring = None;
                    self.stats.sequences.store(0, Ordering::Relaxed);
                    self.stats.set_state("idle");
                    let _ = reply.send(());
                }
            }
            if let Some(l) = &self.loaded {
                self.stats
                    .sequences
                    .store(l.cache.num_sequences() as u32, Ordering::Relaxed);
            }
        }
    }

    fn send(&self, header: FrameHeader, payload: Vec<u8>) {
        if let Some(w) = &self.wiring {
            if w.next.blocking_send((header, payload)).is_err() {
                self.stats.set_error(Some(format!(
                    "{}: the next hop's sender has stopped",
                    self.name
                )));
            }
        }
    }

    fn run_batch(&mut self, batch: Vec<Frame>) {
        let Some(wiring) = self.wiring.clone() else {
            warn!(stage = %self.name, "dropping frames: this stage is not wired into a pipeline");
            return;
        };
        let mut errors: Vec<SequenceError> = Vec::new();
        let mut frees: Vec<u64> = Vec::new();
        let mut forwards: Vec<Frame> = Vec::new();
        for f in batch {
            if f.header.epoch != wiring.epoch {
                debug!(
                    got = f.header.epoch,
                    want = wiring.epoch,
                    "dropping a frame of another epoch"
                );
                continue;
            }
            errors.extend(f.header.errors.iter().cloned());
            match FrameKind::try_from(f.header.kind) {
                Ok(FrameKind::Free) => frees.extend(&f.header.free),
                Ok(FrameKind::Forward) => forwards.push(f),
                _ => warn!(
                    kind = f.header.kind,
                    "a stage got a frame it does not handle"
                ),
            }
        }
        let Some(loaded) = self.loaded.as_mut() else {
            for f in &forwards {
                for c in &f.header.chunks {
                    errors.push(SequenceError {
                        sequence: c.sequence,
                        message: format!("{} holds no slice", self.name),
                    });
                }
            }
            self.emit_errors(errors, &wiring);
            return;
        };
        for seq in &frees {
            loaded.cache.free(*seq);
            loaded.samplers.remove(seq);
            loaded.history.remove(seq);
        }
        let is_first = loaded.stage.slice().embed;
        let is_last = loaded.stage.slice().head;
        if !frees.is_empty() && !is_last {
            let header = FrameHeader {
                protocol_version: PROTOCOL_VERSION,
                kind: FrameKind::Free as i32,
                epoch: wiring.epoch,
                free: frees,
                ..Default::default()
            };
            self.send(header, Vec::new());
        }
        let Some(loaded) = self.loaded.as_mut() else {
            return;
        };
        if forwards.is_empty() {
            self.emit_errors(errors, &wiring);
            return;
        }
        // Admit each chunk: a new sequence starts at 0; a continuing one where its cache ends.
        let context = loaded.stage.config().max_position_embeddings;
        let hidden = loaded.stage.config().hidden_size;
        let mut kept: Vec<FrameChunk> = Vec::new();
        let mut token_rows: Vec<u32> = Vec::new();
        let mut hidden_parts: Vec<Tensor> = Vec::new();
        for f in &forwards {
            let mut row = 0usize;
            let act = if is_first {
                None
            } else {
                if f.header.hidden as usize != hidden {
                    for c in &f.header.chunks {
                        errors.push(SequenceError {
                            sequence: c.sequence,
                            message: format!(
                                "{}: activations of width {} for a model of hidden size {hidden}",
                                self.name, f.header.hidden
                            ),
                        });
                    }
                    continue;
                }
                let dtype = WireDType::try_from(f.header.dtype).unwrap_or(WireDType::F32);
                match frame::wire_to_tensor(
                    &f.payload,
                    dtype,
                    frame::rows(&f.header),
                    hidden,
                    &Device::Cpu,
                ) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        for c in &f.header.chunks {
                            errors.push(SequenceError {
                                sequence: c.sequence,
                                message: format!("{}: bad activations: {e}", self.name),
                            });
                        }
                        continue;
                    }
                }
            };
            for c in &f.header.chunks {
                let len = c.length as usize;
                let start = c.start as usize;
                let this_row = row;
                row += len;
                let problem = if start + len > context {
                    Some(format!(
                        "{}: positions {start}..{} exceed the context of {context} tokens",
                        self.name,
                        start + len
                    ))
                } else if start == 0 {
                    loaded.cache.free(c.sequence);
                    loaded.cache.create(c.sequence);
                    if is_last {
                        match Sampler::new(sampling_params(c.sampling.as_ref())) {
                            Ok(s) => {
                                loaded.samplers.insert(c.sequence, s);
                                loaded.history.insert(c.sequence, Vec::new());
                                None
                            }
                            Err(e) => Some(format!("{}: {e}", self.name)),
                        }
                    } else {
                        None
                    }
                } else {
                    match loaded.cache.len(c.sequence) {
                        Ok(cached) if cached == start => None,
                        Ok(cached) => Some(format!(
                            "{}: sequence {} continues at {start} but its cache holds {cached} positions",
                            self.name, c.sequence
                        )),
                        Err(_) => Some(format!(
                            "{}: no cache for sequence {} (it was freed, or this stage restarted)",
                            self.name, c.sequence
                        )),
                    }
                };
                if let Some(message) = problem {
                    errors.push(SequenceError {
                        sequence: c.sequence,
                        message,
                    });
                    continue;
                }
                if let Some(t) = &act {
                    match t.narrow(0, this_row, len) {
                        Ok(part) => hidden_parts.push(part),
                        Err(e) => {
                            errors.push(SequenceError {
                                sequence: c.sequence,
                                message: format!("{}: {e}", self.name),
                            });
                            continue;
                        }
                    }
                } else {
                    token_rows.extend(&c.token_ids);
                }
                kept.push(c.clone());
            }
        }
        if kept.is_empty() {
            self.emit_errors(errors, &wiring);
            return;
        }
        let chunks: Vec<Chunk> = kept
            .iter()
            .map(|c| Chunk {
                seq: c.sequence,
                start: c.start as usize,
                len: c.length as usize,
            })
            .collect();
        let _span = tracing::debug_span!("stage", layers = ?loaded.stage.slice().layers).entered();
        debug!(
            sequences = chunks.len(),
            rows = chunks.iter().map(|c| c.len).sum::<usize>(),
            "batched forward"
        );
        let input = if is_first {
            Ok(StageInput::Tokens(token_rows))
        } else {
            Tensor::cat(&hidden_parts, 0).map(StageInput::Hidden)
        };
        let output = input
            .map_err(strata_model::Error::from)
            .and_then(|input| loaded.stage.forward(&chunks, input, &mut loaded.cache));
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                for c in &kept {
                    loaded.cache.free(c.sequence);
                    errors.push(SequenceError {
                        sequence: c.sequence,
                        message: format!("{}: forward failed: {e}", self.name),
                    });
                }
                self.emit_errors(errors, &wiring);
                return;
            }
        };
        match output {
            StageOutput::Hidden(t) => {
                let payload = match frame::tensor_to_wire(&t, wiring.dtype) {
                    Ok(p) => p,
                    Err(e) => {
                        for c in &kept {
                            errors.push(SequenceError {
                                sequence: c.sequence,
                                message: format!("{}: encoding activations: {e}", self.name),
                            });
                        }
                        self.emit_errors(errors, &wiring);
                        return;
                    }
                };
                let header = FrameHeader {
                    protocol_version: PROTOCOL_VERSION,
                    kind: FrameKind::Forward as i32,
                    epoch: wiring.epoch,
                    chunks: kept,
                    dtype: wiring.dtype as i32,
                    hidden: hidden as u32,
                    payload_bytes: payload.len() as u64,
                    errors,
                    ..Default::default()
                };
                self.send(header, payload);
            }
            StageOutput::Logits(logits) => {
                let rows = match logits.to_vec2::<f32>() {
                    Ok(r) => r,
                    Err(e) => {
                        for c in &kept {
                            errors.push(SequenceError {
                                sequence: c.sequence,
                                message: format!("{}: reading logits: {e}", self.name),
                            });
                        }
                        self.emit_errors(errors, &wiring);
                        return;
                    }
                };
                let mut tokens = Vec::with_capacity(kept.len());
                for (c, row) in kept.iter().zip(&rows) {
                    let history = loaded.history.entry(c.sequence).or_default();
                    history.extend(&c.token_ids);
                    let Some(sampler) = loaded.samplers.get_mut(&c.sequence) else {
                        errors.push(SequenceError {
                            sequence: c.sequence,
                            message: format!(
                                "{}: no sampler for sequence {}",
                                self.name, c.sequence
                            ),
                        });
                        continue;
                    };
                    match sampler.sample(row, history) {
                        Ok(s) => tokens.push(SampledToken {
                            sequence: c.sequence,
                            position: c.start + c.length,
                            token_id: s.token,
                            logprob: s.logprob,
                            top: s
                                .top_logprobs
                                .iter()
                                .map(|&(token_id, logprob)| TokenLogprob { token_id, logprob })
                                .collect(),
                        }),
                        Err(e) => errors.push(SequenceError {
                            sequence: c.sequence,
                            message: format!("{}: sampling: {e}", self.name),
                        }),
                    }
                }
                let header = FrameHeader {
                    protocol_version: PROTOCOL_VERSION,
                    kind: FrameKind::Tokens as i32,
                    epoch: wiring.epoch,
                    tokens,
                    errors,
                    ..Default::default()
                };
                self.send(header, Vec::new());
            }
        }
    }

    fn emit_errors(&self, errors: Vec<SequenceError>, wiring: &Wiring) {
        if errors.is_empty() {
            return;
        }
        let is_last = self.loaded.as_ref().is_none_or(|l| l.stage.slice().head);
        let kind = if is_last {
            FrameKind::Tokens
        } else {
            FrameKind::Forward
        };
        let header = FrameHeader {
            protocol_version: PROTOCOL_VERSION,
            kind: kind as i32,
            epoch: wiring.epoch,
            errors,
            ..Default::default()
        };
        self.send(header, Vec::new());
    }
}
