//! The compute thread: the shell around the [`StageCore`]. One dedicated thread owns the
//! core; it takes frames and commands from one bounded channel, gives the core everything
//! that is waiting as one batch, and hands what comes back to the next hop's sender.
//! Commands (install, wire, unload) travel in the same channel, so the thread is the only
//! owner of the model state and needs no locks.
//!
//! It also keeps the figures the control service reports, and the progress counter that
//! tells a slow forward from a stuck one: every layer run, batch finished and command
//! handled moves it, and [`StageStats::stalled`] says how long work has waited without it
//! moving. Health comes from here, not from the async runtime that answers the RPC.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_model::draft::DraftModel;
use strata_model::{Slice, Stage};
use strata_net::frame::{Frame, Step};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::core::{StageCore, Wiring};
use crate::energy::{self, EnergyMeter};

/// Most rows one batched forward takes; more waiting frames go into the next batch.
pub const MAX_BATCH_ROWS: usize = strata_net::frame::BATCH_ROWS;
/// Frames and commands waiting for the compute thread.
pub const QUEUE_DEPTH: usize = 256;

/// What the compute thread is asked to do.
pub enum Command {
    /// Run a frame.
    Frame(Frame),
    /// Replace the slice (loaded from the model of this content digest).
    Install(Box<Stage>, String, oneshot::Sender<()>),
    /// Wire the output for an epoch, to this sender.
    Wire(Wiring, mpsc::Sender<Frame>, oneshot::Sender<()>),
    /// Drop the slice, every cache and the draft model.
    Unload(oneshot::Sender<()>),
    /// Hold a draft model (of this content digest) to draft with as the last stage, beside
    /// the slice; it goes with the slice.
    InstallDraft(DraftModel, String, oneshot::Sender<()>),
}

/// What the stage is doing, as the control service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StageState {
    /// No slice.
    Idle = 0,
    /// Receiving or loading a slice.
    Loading = 1,
    /// A slice is loaded.
    Ready = 2,
}

impl StageState {
    /// Its word on the wire.
    pub fn name(self) -> &'static str {
        match self {
            StageState::Idle => "idle",
            StageState::Loading => "loading",
            StageState::Ready => "ready",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => StageState::Loading,
            2 => StageState::Ready,
            _ => StageState::Idle,
        }
    }
}

/// The slice in memory, and the content digest of the model it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The model's content digest.
    pub digest: String,
    /// The slice.
    pub slice: Slice,
}

/// When the progress counter last moved, as the watchdog saw it.
#[derive(Debug)]
struct Watch {
    value: u64,
    since: Instant,
}

/// Figures the control service reports, written by the compute thread.
#[derive(Debug)]
pub struct StageStats {
    /// Sequences with a cache.
    pub sequences: AtomicU32,
    /// Commands waiting.
    pub queued: AtomicU32,
    /// Epoch wired.
    pub epoch: AtomicU64,
    /// Nanoseconds spent in forwards and sampling.
    pub compute_nanos: AtomicU64,
    /// Nanoseconds spent sending frames to the next hop.
    pub network_nanos: AtomicU64,
    /// Batched forwards run.
    pub forwards: AtomicU64,
    /// Nanoseconds spent in decode batches (every step one token).
    pub decode_nanos: AtomicU64,
    /// Decode batches run.
    pub decode_forwards: AtomicU64,
    /// Moves with every layer run, batch finished and command handled.
    pub progress: Arc<AtomicU64>,
    /// Bytes of weights received over the network since the worker started.
    pub bytes_received: AtomicU64,
    holding: Mutex<Option<Holding>>,
    /// The content digest of the draft model held.
    draft: Mutex<Option<String>>,
    unreachable_hop: Mutex<Option<String>>,
    /// The thread is inside a batch or a command.
    busy: AtomicBool,
    state: AtomicU8,
    error: Mutex<Option<String>>,
    watch: Mutex<Watch>,
}

impl StageStats {
    fn new() -> Self {
        StageStats {
            sequences: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            epoch: AtomicU64::new(0),
            compute_nanos: AtomicU64::new(0),
            network_nanos: AtomicU64::new(0),
            forwards: AtomicU64::new(0),
            decode_nanos: AtomicU64::new(0),
            decode_forwards: AtomicU64::new(0),
            progress: Arc::new(AtomicU64::new(0)),
            bytes_received: AtomicU64::new(0),
            holding: Mutex::new(None),
            draft: Mutex::new(None),
            unreachable_hop: Mutex::new(None),
            busy: AtomicBool::new(false),
            state: AtomicU8::new(StageState::Idle as u8),
            error: Mutex::new(None),
            watch: Mutex::new(Watch {
                value: 0,
                since: Instant::now(),
            }),
        }
    }

    /// Sets the state.
    pub fn set_state(&self, s: StageState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// The state.
    pub fn state(&self) -> StageState {
        StageState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// The slice in memory, if any.
    pub fn holding(&self) -> Option<Holding> {
        self.holding.lock().ok().and_then(|g| g.clone())
    }

    fn set_holding(&self, h: Option<Holding>) {
        if let Ok(mut g) = self.holding.lock() {
            *g = h;
        }
    }

    /// The content digest of the draft model in memory, if any.
    pub fn draft(&self) -> Option<String> {
        self.draft.lock().ok().and_then(|g| g.clone())
    }

    fn set_draft(&self, digest: Option<String>) {
        if let Ok(mut g) = self.draft.lock() {
            *g = digest;
        }
    }

    /// Records that the next hop (by TLS server name) could not be reached, or (None) that
    /// it was reached again.
    pub fn set_unreachable_hop(&self, hop: Option<String>) {
        if let Ok(mut g) = self.unreachable_hop.lock() {
            *g = hop;
        }
    }

    /// The next hop this stage could not reach, if any.
    pub fn unreachable_hop(&self) -> Option<String> {
        self.unreachable_hop.lock().ok().and_then(|g| g.clone())
    }

    /// Records a failure (or clears it).
    pub fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.error.lock() {
            *g = e;
        }
    }

    /// The last failure.
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|g| g.clone())
    }

    /// How long work has been waiting (queued, or a batch running) while the progress
    /// counter stood still, as of `now`; zero when there is no work or it moves.
    pub fn stalled(&self, now: Instant) -> Duration {
        let value = self.progress.load(Ordering::Relaxed);
        let pending = self.busy.load(Ordering::Relaxed) || self.queued.load(Ordering::Relaxed) > 0;
        let Ok(mut w) = self.watch.lock() else {
            return Duration::ZERO;
        };
        if value != w.value || !pending {
            w.value = value;
            w.since = now;
            return Duration::ZERO;
        }
        now.saturating_duration_since(w.since)
    }

    fn tick(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
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
    /// Starts the compute thread, which reads `meter` around each batch.
    pub fn spawn(name: String, meter: Arc<EnergyMeter>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(StageStats::new());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("strata-stage".into())
            .spawn(move || Runtime::new(name, thread_stats, meter).run(rx))?;
        Ok(StageHandle { tx, stats })
    }

    /// Queues a command; waits while the queue is full (backpressure to the network).
    pub async fn send(&self, cmd: Command) -> bool {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self.tx.send(cmd).await.is_ok();
        if !sent {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
        sent
    }

    /// Queues a command and waits for its reply.
    pub async fn call(&self, make: impl FnOnce(oneshot::Sender<()>) -> Command) -> bool {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await && rx.await.is_ok()
    }
}

struct Runtime {
    name: String,
    stats: Arc<StageStats>,
    core: StageCore,
    next: Option<mpsc::Sender<Frame>>,
    meter: Arc<EnergyMeter>,
}

impl Runtime {
    fn new(name: String, stats: Arc<StageStats>, meter: Arc<EnergyMeter>) -> Self {
        Runtime {
            core: StageCore::new(name.clone()),
            name,
            stats,
            next: None,
            meter,
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
            self.stats.busy.store(true, Ordering::Relaxed);
            match first {
                Command::Frame(f) => {
                    let mut batch = vec![f];
                    let mut rows = batch[0].rows();
                    // Everything already waiting joins this forward.
                    while rows < MAX_BATCH_ROWS {
                        match rx.try_recv() {
                            Ok(Command::Frame(f)) => {
                                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                                rows += f.rows();
                                batch.push(f);
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.run_batch(batch);
                }
                Command::Install(mut stage, digest, reply) => {
                    stage.count_progress(self.stats.progress.clone());
                    // Decode steps are timed per slice (the coordinator's calibration):
                    // zero before the new slice shows in the heartbeat.
                    self.stats.decode_nanos.store(0, Ordering::Relaxed);
                    self.stats.decode_forwards.store(0, Ordering::Relaxed);
                    self.stats.set_holding(Some(Holding {
                        digest,
                        slice: stage.slice().clone(),
                    }));
                    self.core.install(*stage);
                    self.stats.set_state(StageState::Ready);
                    let _ = reply.send(());
                }
                Command::Wire(wiring, next, reply) => {
                    self.core.wire(wiring);
                    self.next = Some(next);
                    self.stats.epoch.store(wiring.epoch, Ordering::Relaxed);
                    self.stats.set_error(None);
                    self.stats.set_unreachable_hop(None);
                    let _ = reply.send(());
                }
                Command::InstallDraft(model, digest, reply) => {
                    self.core.install_draft_model(Some(model));
                    self.stats.set_draft(Some(digest));
                    let _ = reply.send(());
                }
                Command::Unload(reply) => {
                    self.core.unload();
                    self.stats.set_holding(None);
                    self.stats.set_draft(None);
                    self.next = None;
                    self.stats.set_state(StageState::Idle);
                    let _ = reply.send(());
                }
            }
            self.stats
                .sequences
                .store(self.core.sequences() as u32, Ordering::Relaxed);
            self.stats.busy.store(false, Ordering::Relaxed);
            self.stats.tick();
        }
    }

    fn run_batch(&mut self, batch: Vec<Frame>) {
        let Some(next) = self.next.clone() else {
            warn!(stage = %self.name, frames = batch.len(), "this stage is not wired into a pipeline: its frames have nowhere to go");
            return;
        };
        // A batch of single-token steps reads the slice's weights once: its time is what
        // calibrates the planner's speed for this worker.
        let decode = batch.iter().all(|f| match f {
            Frame::Forward { steps, .. } => !steps.is_empty() && steps.iter().all(|s| s.len() == 1),
            _ => false,
        });
        let steps = StepsIn::of(&batch);
        let started = Instant::now();
        let energy_before = self.meter.read();
        let mut out = {
            let _span = tracing::debug_span!("stage", layers = ?self.core.slice().map(|s| s.layers.clone())).entered();
            self.core.handle(batch)
        };
        let spent = energy_before
            .zip(self.meter.read())
            .map(|(a, b)| b.saturating_sub(a));
        steps.charge(spent, &mut out);
        let nanos = started.elapsed().as_nanos() as u64;
        self.stats.compute_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.stats.forwards.fetch_add(1, Ordering::Relaxed);
        if decode {
            self.stats.decode_nanos.fetch_add(nanos, Ordering::Relaxed);
            self.stats.decode_forwards.fetch_add(1, Ordering::Relaxed);
        }
        for frame in out {
            debug!(rows = frame.rows(), "to the next hop");
            // Blocks while the next hop's sender is full: backpressure, and a stall the
            // watchdog sees when the next hop cannot be reached.
            if next.blocking_send(frame).is_err() {
                self.stats.set_error(Some(format!(
                    "{}: the next hop's sender has stopped",
                    self.name
                )));
            }
        }
    }
}

/// The rows of a batch's steps, as they came in, by sequence and run: what a step the
/// last stage reports (which names no rows) is charged by.
struct StepsIn {
    rows: Vec<(u64, u32, usize)>,
}

impl StepsIn {
    fn of(batch: &[Frame]) -> Self {
        let rows = batch
            .iter()
            .filter_map(|f| match f {
                Frame::Forward { steps, .. } => Some(steps),
                _ => None,
            })
            .flatten()
            .map(|s| (s.seq, s.attempt, s.len()))
            .collect();
        StepsIn { rows }
    }

    fn rows_of(&self, seq: u64, attempt: u32) -> usize {
        // A sequence has one step in flight per run: (seq, attempt) names it (a doubled
        // frame's copy was dropped by the core, and is not in the output).
        self.rows
            .iter()
            .find(|&&(s, a, _)| (s, a) == (seq, attempt))
            .map_or(0, |r| r.2)
    }

    /// Charges the steps that ran (the core passes only those on: the steps of the next
    /// stage's frame, or the last stage's [`StepEnergy`] entries) their share of `spent`
    /// by rows, on top of what they cost before. None (no counter here, or a cost already
    /// unknown) stays None.
    fn charge(&self, spent: Option<u64>, out: &mut [Frame]) {
        let total: usize = out
            .iter()
            .map(|f| match f {
                Frame::Forward { steps, .. } => steps.iter().map(Step::len).sum(),
                Frame::Tokens { energy, .. } => {
                    energy.iter().map(|e| self.rows_of(e.seq, e.attempt)).sum()
                }
                Frame::Free { .. } => 0,
            })
            .sum();
        let cost =
            |before: Option<u64>, rows: usize| Some(before? + energy::share(spent?, rows, total));
        for frame in out {
            match frame {
                Frame::Forward { steps, .. } => {
                    for step in steps {
                        step.energy_uj = cost(step.energy_uj, step.len());
                    }
                }
                Frame::Tokens { energy, .. } => {
                    for e in energy {
                        e.energy_uj = cost(e.energy_uj, self.rows_of(e.seq, e.attempt));
                    }
                }
                Frame::Free { .. } => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_net::frame::StepEnergy;

    fn step(seq: u64, start: u32, rows: usize, energy_uj: Option<u64>) -> Step {
        Step {
            seq,
            start,
            tokens: vec![1; rows],
            sampler: None,
            attempt: 0,
            reserve: 0,
            partial: false,
            draft: 0,
            drawn_from: Vec::new(),
            draft_next: 0,
            energy_uj,
        }
    }

    fn forward(steps: Vec<Step>) -> Frame {
        Frame::Forward {
            epoch: 1,
            steps,
            activations: None,
            failures: Vec::new(),
        }
    }

    fn tokens(energy: Vec<StepEnergy>) -> Frame {
        Frame::Tokens {
            epoch: 1,
            tokens: Vec::new(),
            prefilled: Vec::new(),
            freed: Vec::new(),
            failures: Vec::new(),
            energy,
            drafts: Vec::new(),
        }
    }

    fn reported(seq: u64, energy_uj: Option<u64>) -> StepEnergy {
        StepEnergy {
            seq,
            attempt: 0,
            energy_uj,
        }
    }

    #[test]
    fn each_step_that_ran_is_charged_its_rows_share_on_top_of_what_it_cost_before() {
        // A prompt of 3 rows and a decode step of 1 share 4 mJ spent here.
        let batch = vec![forward(vec![
            step(1, 0, 3, Some(100)),
            step(2, 9, 1, Some(50)),
        ])];
        let steps = StepsIn::of(&batch);
        let mut out = batch.clone();
        steps.charge(Some(4_000), &mut out);
        let Frame::Forward { steps: s, .. } = &out[0] else {
            unreachable!()
        };
        assert_eq!((s[0].energy_uj, s[1].energy_uj), (Some(3_100), Some(1_050)));
        // On the last stage the core reports the steps it ran, in the frame of their
        // tokens, whatever other frame (a free's) comes before it.
        let mut out = vec![
            tokens(Vec::new()),
            tokens(vec![reported(1, Some(100)), reported(2, Some(50))]),
        ];
        steps.charge(Some(4_000), &mut out);
        let Frame::Tokens { energy, .. } = &out[1] else {
            unreachable!()
        };
        assert_eq!(
            energy,
            &vec![reported(1, Some(3_100)), reported(2, Some(1_050))]
        );
    }

    #[test]
    fn a_step_that_did_not_run_takes_no_share() {
        // Sequence 2's step was a doubled frame's copy, or refused: the core passed on
        // only sequence 1's, which is charged all of it.
        let batch = vec![forward(vec![
            step(1, 0, 2, Some(0)),
            step(2, 4, 2, Some(0)),
        ])];
        let steps = StepsIn::of(&batch);
        let mut out = vec![tokens(vec![reported(1, Some(0))])];
        steps.charge(Some(1_000), &mut out);
        let Frame::Tokens { energy, .. } = &out[0] else {
            unreachable!()
        };
        assert_eq!(energy, &vec![reported(1, Some(1_000))]);
    }

    #[test]
    fn a_stage_or_a_stage_before_without_a_counter_makes_the_cost_unknown() {
        let batch = vec![forward(vec![step(1, 0, 2, None), step(2, 4, 2, Some(7))])];
        let steps = StepsIn::of(&batch);
        let mut out = vec![tokens(vec![reported(1, None), reported(2, Some(7))])];
        steps.charge(Some(1_000), &mut out);
        let Frame::Tokens { energy, .. } = &out[0] else {
            unreachable!()
        };
        assert_eq!(energy, &vec![reported(1, None), reported(2, Some(507))]);
        let mut out = vec![tokens(vec![reported(2, Some(7))])];
        steps.charge(None, &mut out);
        let Frame::Tokens { energy, .. } = &out[0] else {
            unreachable!()
        };
        assert_eq!(energy, &vec![reported(2, None)]);
    }
}
