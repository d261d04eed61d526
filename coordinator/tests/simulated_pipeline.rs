//! The simulated pipeline: the real sequence cores (this crate) and the real stage cores
//! (`strata-worker`) running a real (tiny, synthetic) model, wired in one process with no
//! sockets, threads or clocks. A seeded network between them drops, delays, reorders and
//! duplicates frames, and nodes are killed or hung mid-answer. Detection (heartbeats, the
//! compute watchdog, a broken link) is modelled as a delay of a few ticks, after which the
//! simulated coordinator re-plans over the nodes that remain and the sequences replay.
//!
//! What must hold under every fault: every answer completes, with exactly the tokens of
//! its undisturbed twin; and no stage keeps a cache once the answers are over.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: a failure is a test failure

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strata_coordinator::sequence::{
    Action, Deadlines, DraftPolicy, Event, FinishReason, ModelLimits, Outcome, SequenceCore,
    SequenceRequest,
};
use strata_model::draft::DraftModel;
use strata_model::synth::{write_model, SynthDType, SynthFormat, SynthOptions, SynthSpec};
use strata_model::{
    Arch, Drafter, GenerateRequest, LocalPipeline, ModelFile, SamplingParams, Slice, Stage,
    Tokenizer, WireType,
};
use strata_net::frame::{Frame, Step};
use strata_worker::stage::{StageCore, Wiring};

/// Virtual time per tick.
const TICK: Duration = Duration::from_millis(10);
/// Ticks from a failure to its detection (heartbeats, the watchdog, a send error).
const DETECT: u64 = 30;
/// Stages a plan uses at most (the rest are spares).
const MAX_STAGES: usize = 3;
/// Ticks after which a run is declared stuck.
const TICK_LIMIT: u64 = 20_000;
/// Positions per piece of a prompt: small, so that the prompts (3 to 23 tokens) and every
/// replay go in pieces through the faults.
const PREFILL_CHUNK: usize = 8;
/// Each stage's KV budget: the six answers' reservations (prompt + 20) fit, with little
/// to spare, so a reservation that leaked would refuse a later run.
const KV_POSITIONS: usize = 260;

/// What the network and the nodes do wrong.
#[derive(Debug, Clone, Default)]
struct Faults {
    /// Chance a frame is lost with its link (the pipeline breaks, and is re-planned).
    drop: f64,
    /// Chance a frame arrives twice.
    duplicate: f64,
    /// Most ticks a frame is held back (uniform from 0).
    delay: u64,
    /// Frames that arrive in one tick are handed over in a shuffled order.
    reorder: bool,
    /// Node killed at a tick.
    kill: Option<(usize, u64)>,
    /// Node hung (stops computing, answers nothing) at a tick.
    hang: Option<(usize, u64)>,
    /// Every node dies at a tick; with `rejoin`, a fresh node joins this many ticks later.
    kill_all: Option<(u64, Option<u64>)>,
    /// The client of sequence `.0` hangs up at tick `.1`.
    client_leaves: Option<(usize, u64)>,
    /// Speculative decoding: each answer drafts from this (prompt and undisturbed answer
    /// of each sequence), mostly right and now and then wrong.
    drafts: Option<Arc<Vec<Vec<u32>>>>,
    /// Speculative decoding with this draft model on the last stage of every plan.
    last_stage_drafts: Option<DraftModel>,
}

/// Drafts from a known answer, with a wrong token in every other proposal, so that steps
/// keep some drafts and drop others.
#[derive(Debug)]
struct KnownAnswer {
    truth: Vec<u32>,
    proposals: usize,
}

impl Drafter for KnownAnswer {
    fn propose(&mut self, history: &[u32], max: usize) -> Vec<u32> {
        self.proposals += 1;
        if !self.truth.starts_with(history) {
            return Vec::new();
        }
        let end = (history.len() + max).min(self.truth.len());
        let mut drafts = self.truth[history.len()..end].to_vec();
        if self.proposals.is_multiple_of(2) && !drafts.is_empty() {
            let wrong = self.proposals / 2 % drafts.len();
            drafts[wrong] = (drafts[wrong] + 1) % 500;
        }
        drafts
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dest {
    Node(usize),
    Coordinator,
}

struct InFlight {
    dest: Dest,
    frame: Frame,
    due: u64,
}

struct Node {
    core: StageCore,
    next: Dest,
    alive: bool,
    hung: bool,
    inbox: Vec<Frame>,
}

/// One client's view of its answer.
#[derive(Debug, Clone, Default, PartialEq)]
struct Answer {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    error: Option<String>,
    cancelled: bool,
}

struct Client {
    core: SequenceCore,
    answer: Answer,
    starts_at: u64,
    started: bool,
}

struct Sim {
    file: Rc<ModelFile>,
    tokenizer: Tokenizer,
    nodes: Vec<Node>,
    /// Plan in force: epoch and its nodes, stage by stage.
    plan: Option<(u64, Vec<usize>)>,
    epochs: u64,
    net: Vec<InFlight>,
    clients: Vec<Client>,
    rng: ChaCha8Rng,
    faults: Faults,
    tick: u64,
    t0: Instant,
    /// Failures noticed later: (due tick, reason, node to exclude).
    detections: Vec<(u64, String, Option<usize>)>,
    replans: u32,
    /// Steps the sessions handed to the batcher this tick.
    outbox: Vec<(u64, Step)>,
}

fn model(dir: &Path) -> Rc<ModelFile> {
    let mut spec = SynthSpec::tiny(Arch::Llama);
    spec.layers = 6;
    spec.hidden = 128;
    spec.heads = 4;
    spec.kv_heads = 2;
    spec.intermediate = 256;
    spec.seed = 11;
    let opts = SynthOptions {
        format: SynthFormat::Gguf,
        dtype: SynthDType::Quant(candle_core::quantized::GgmlDType::Q8_0),
        shard_bytes: None,
    };
    let report = write_model(&spec, &opts, &dir.join("sim.gguf")).unwrap();
    Rc::new(ModelFile::open(&report.path).unwrap())
}

/// The answers the simulation serves: greedy and seeded sampling, prompts of several
/// lengths, starting at different times.
fn requests() -> Vec<SequenceRequest> {
    (0..6)
        .map(|i| SequenceRequest {
            prompt: (0..(3 + 4 * i))
                .map(|j| (17 + 31 * i + 7 * j) as u32 % 500)
                .collect(),
            max_tokens: 20,
            sampling: if i % 2 == 0 {
                SamplingParams::default()
            } else {
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    repeat_penalty: 1.1,
                    seed: 100 + i as u64,
                    ..Default::default()
                }
            },
            stop: Vec::new(),
            ignore_eos: true,
            logprobs: false,
        })
        .collect()
}

impl Sim {
    fn new(file: Rc<ModelFile>, nodes: usize, faults: Faults, seed: u64) -> Sim {
        let tokenizer = Tokenizer::for_model(&file).unwrap();
        let t0 = Instant::now();
        let limits = ModelLimits {
            eos: tokenizer.eos().to_vec(),
            context: file.config().max_position_embeddings,
            prefill_chunk: PREFILL_CHUNK,
        };
        let clients = requests()
            .into_iter()
            .enumerate()
            .map(|(i, r)| Client {
                core: {
                    let core = SequenceCore::new(
                        i as u64 + 1,
                        r,
                        limits.clone(),
                        Deadlines::default(),
                        t0,
                    );
                    match (&faults.drafts, &faults.last_stage_drafts) {
                        (Some(truth), _) => core.with_drafter(
                            Box::new(KnownAnswer {
                                truth: truth[i].clone(),
                                proposals: 0,
                            }),
                            DraftPolicy::default(),
                        ),
                        (None, Some(_)) => core.with_drafts_from_last_stage(DraftPolicy::default()),
                        (None, None) => core,
                    }
                },
                answer: Answer::default(),
                starts_at: 3 * i as u64,
                started: false,
            })
            .collect();
        let nodes = (0..nodes)
            .map(|i| Node {
                core: StageCore::new(format!("node{i}")),
                next: Dest::Coordinator,
                alive: true,
                hung: false,
                inbox: Vec::new(),
            })
            .collect();
        let mut sim = Sim {
            file,
            tokenizer,
            nodes,
            plan: None,
            epochs: 0,
            net: Vec::new(),
            clients,
            rng: ChaCha8Rng::seed_from_u64(seed),
            faults,
            tick: 0,
            t0,
            detections: Vec::new(),
            replans: 0,
            outbox: Vec::new(),
        };
        sim.replan();
        sim
    }

    fn now(&self) -> Instant {
        self.t0 + TICK * self.tick as u32
    }

    /// Plans over the nodes that work, loads their slices and wires them back to front.
    fn replan(&mut self) {
        let usable: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive && !self.nodes[i].hung)
            .take(MAX_STAGES)
            .collect();
        if usable.is_empty() {
            self.plan = None;
            return;
        }
        self.epochs += 1;
        let epoch = self.epochs;
        let layers = self.file.config().num_layers;
        let slices = Slice::split_even(layers, usable.len()).unwrap();
        for (k, (&node, slice)) in usable.iter().zip(slices).enumerate() {
            let stage = Stage::load(&self.file, slice, &Device::Cpu).unwrap();
            let last = k + 1 == usable.len();
            let draft_model = self.faults.last_stage_drafts.clone().filter(|_| last);
            let n = &mut self.nodes[node];
            n.core.install(stage);
            n.core.install_draft_model(draft_model);
            n.core.wire(Wiring {
                epoch,
                wire: WireType::F32,
                kv_positions: KV_POSITIONS,
            });
            n.next = usable
                .get(k + 1)
                .map_or(Dest::Coordinator, |&i| Dest::Node(i));
            n.inbox.clear();
        }
        self.plan = Some((epoch, usable));
        self.replans += 1;
    }

    /// Sends a frame into the network, where faults happen to it.
    fn send(&mut self, dest: Dest, frame: Frame) {
        if self.rng.random::<f64>() < self.faults.drop {
            // Lost with its link: the sender notices, the pipeline is re-planned.
            let due = self.tick + DETECT;
            self.detections
                .push((due, format!("a link dropped a frame to {dest:?}"), None));
            return;
        }
        let copies = if self.rng.random::<f64>() < self.faults.duplicate {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faults.delay > 0 {
                self.rng.random_range(0..=self.faults.delay)
            } else {
                0
            };
            self.net.push(InFlight {
                dest,
                frame: frame.clone(),
                due: self.tick + 1 + delay,
            });
        }
    }

    fn inject_faults(&mut self) {
        let t = self.tick;
        if let Some((node, at)) = self.faults.kill {
            if at == t {
                self.nodes[node].alive = false;
                self.detections
                    .push((t + DETECT, format!("node{node} died"), Some(node)));
            }
        }
        if let Some((node, at)) = self.faults.hang {
            if at == t {
                self.nodes[node].hung = true;
                self.detections
                    .push((t + DETECT, format!("node{node} hung"), Some(node)));
            }
        }
        if let Some((at, rejoin)) = self.faults.kill_all {
            if at == t {
                for n in &mut self.nodes {
                    n.alive = false;
                }
                self.detections
                    .push((t + DETECT, "every node died".into(), None));
            }
            if rejoin.is_some_and(|after| at + after == t) {
                self.nodes.push(Node {
                    core: StageCore::new("newcomer"),
                    next: Dest::Coordinator,
                    alive: true,
                    hung: false,
                    inbox: Vec::new(),
                });
                self.replan();
            }
        }
    }

    /// Failures whose detection is due: the pipeline in force is lost, re-plan.
    fn detect(&mut self) {
        let t = self.tick;
        let due: Vec<(u64, String, Option<usize>)> = self
            .detections
            .iter()
            .filter(|d| d.0 <= t)
            .cloned()
            .collect();
        self.detections.retain(|d| d.0 > t);
        for (_, reason, _) in due {
            let Some((epoch, _)) = self.plan.clone() else {
                continue;
            };
            let now = self.now();
            for i in 0..self.clients.len() {
                let lost = Event::StageLost {
                    epoch,
                    reason: reason.clone(),
                };
                let actions = self.clients[i].core.handle(lost, now, &self.tokenizer, "");
                self.perform(i, actions);
            }
            self.replan();
        }
    }

    /// One tick: faults, detection, clients, the network, the nodes.
    fn step(&mut self) {
        self.inject_faults();
        self.detect();
        self.drive_clients();
        self.deliver();
        for i in 0..self.nodes.len() {
            self.run_node(i);
        }
        self.tick += 1;
    }

    fn drive_clients(&mut self) {
        let now = self.now();
        let leaves = self.faults.client_leaves;
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if c.core.outcome().is_some() || self.tick < c.starts_at {
                continue;
            }
            c.started = true;
            let mut actions = Vec::new();
            if leaves == Some((i, self.tick)) {
                c.answer.cancelled = true;
                actions.extend(c.core.handle(Event::ClientGone, now, &self.tokenizer, ""));
            }
            if c.core.waiting() {
                if let Some((epoch, _)) = &self.plan {
                    actions.extend(c.core.handle(
                        Event::Pipeline { epoch: *epoch },
                        now,
                        &self.tokenizer,
                        "",
                    ));
                }
            }
            actions.extend(
                c.core
                    .handle(Event::Tick, now, &self.tokenizer, "no node left"),
            );
            self.perform(i, actions);
        }
        self.flush_outbox();
    }

    /// Steps handed to the batcher this tick, one frame per epoch to stage 0.
    fn flush_outbox(&mut self) {
        let mut by_epoch: HashMap<u64, Vec<Step>> = HashMap::new();
        for (epoch, step) in std::mem::take(&mut self.outbox) {
            by_epoch.entry(epoch).or_default().push(step);
        }
        for (epoch, steps) in by_epoch {
            let Some((current, nodes)) = self.plan.clone() else {
                continue;
            };
            if epoch != current {
                continue;
            }
            let frame = Frame::Forward {
                epoch,
                steps,
                activations: None,
                failures: Vec::new(),
            };
            self.send(Dest::Node(nodes[0]), frame);
        }
    }

    fn perform(&mut self, client: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { epoch, step } => self.outbox.push((epoch, step)),
                Action::Deliver(d) => {
                    let answer = &mut self.clients[client].answer;
                    answer.tokens.push(d.token);
                    answer.text.push_str(&d.text);
                    answer.finish = d.finish.map(|f| f.0);
                }
                Action::Free { epoch } => {
                    if let Some((current, nodes)) = self.plan.clone() {
                        if current == epoch {
                            let seq = self.clients[client].core.id();
                            self.send(
                                Dest::Node(nodes[0]),
                                Frame::Free {
                                    epoch,
                                    seqs: vec![seq],
                                },
                            );
                        }
                    }
                }
                Action::Fail(e) => self.clients[client].answer.error = Some(e.to_string()),
            }
        }
    }

    fn deliver(&mut self) {
        let t = self.tick;
        let mut arrived: Vec<InFlight> = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].due <= t {
                arrived.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        arrived.sort_by_key(|f| f.due);
        if self.faults.reorder {
            for i in (1..arrived.len()).rev() {
                let j = self.rng.random_range(0..=i);
                arrived.swap(i, j);
            }
        }
        for f in arrived {
            match f.dest {
                Dest::Node(n) if self.nodes[n].alive => self.nodes[n].inbox.push(f.frame),
                Dest::Node(_) => {}
                Dest::Coordinator => self.coordinator_receives(f.frame),
            }
        }
    }

    fn coordinator_receives(&mut self, frame: Frame) {
        let Frame::Tokens {
            epoch,
            tokens,
            prefilled,
            failures,
            // The simulated coordinator has no reservations to give back.
            freed: _,
            // Energy is charged by a stage's compute thread, which is not simulated.
            energy: _,
            drafts,
        } = frame
        else {
            panic!("the coordinator got a frame that is not tokens");
        };
        let now = self.now();
        // Before the tokens they follow, as the session shell tells them.
        for drafts in &drafts {
            let i = (drafts.seq - 1) as usize;
            let event = Event::Drafts { epoch, drafts };
            let actions = self.clients[i].core.handle(event, now, &self.tokenizer, "");
            self.perform(i, actions);
        }
        for sampled in &tokens {
            let i = (sampled.seq - 1) as usize;
            let actions = self.clients[i].core.handle(
                Event::Token { epoch, sampled },
                now,
                &self.tokenizer,
                "",
            );
            self.perform(i, actions);
        }
        for done in prefilled {
            let i = (done.seq - 1) as usize;
            let actions = self.clients[i].core.handle(
                Event::Prefilled { epoch, done },
                now,
                &self.tokenizer,
                "",
            );
            self.perform(i, actions);
        }
        for failure in &failures {
            let i = (failure.seq - 1) as usize;
            let actions = self.clients[i].core.handle(
                Event::Failure { epoch, failure },
                now,
                &self.tokenizer,
                "",
            );
            self.perform(i, actions);
        }
        self.flush_outbox();
    }

    fn run_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if !n.alive || n.hung || n.inbox.is_empty() {
            return;
        }
        let frames = std::mem::take(&mut n.inbox);
        let out = n.core.handle(frames);
        let next = n.next;
        for frame in out {
            self.send(next, frame);
        }
    }

    fn done(&self) -> bool {
        self.clients.iter().all(|c| c.core.outcome().is_some())
    }

    /// Runs to the end; returns every client's answer.
    fn run(mut self) -> (Vec<Answer>, Sim) {
        while !self.done() {
            assert!(
                self.tick < TICK_LIMIT,
                "the simulation is stuck at tick {}",
                self.tick
            );
            self.step();
        }
        // Let the last frees travel down the pipeline, and failures still to be noticed be
        // noticed (a free lost with its link is made good by the re-plan that follows).
        while !self.net.is_empty() || !self.detections.is_empty() {
            assert!(self.tick < TICK_LIMIT, "the simulation never settles");
            self.step();
        }
        for _ in 0..3 {
            self.step();
        }
        let answers = self.clients.iter().map(|c| c.answer.clone()).collect();
        (answers, self)
    }

    /// Caches left on the nodes of the plan in force.
    fn leftover_caches(&self) -> usize {
        self.plan.as_ref().map_or(0, |(_, nodes)| {
            nodes.iter().map(|&n| self.nodes[n].core.sequences()).sum()
        })
    }
}

fn undisturbed(file: &Rc<ModelFile>) -> Vec<Answer> {
    let (answers, sim) = Sim::new(file.clone(), 4, Faults::default(), 1).run();
    assert_eq!(sim.replans, 1);
    for a in &answers {
        assert_eq!(a.tokens.len(), 20, "{a:?}");
        assert_eq!(a.finish, Some(FinishReason::Length));
        assert!(a.error.is_none());
    }
    answers
}

fn check_against_twins(
    name: &str,
    faults: Faults,
    seed: u64,
    twins: &[Answer],
    file: &Rc<ModelFile>,
) -> Sim {
    let (answers, sim) = Sim::new(file.clone(), 4, faults, seed).run();
    for (i, (got, want)) in answers.iter().zip(twins).enumerate() {
        assert_eq!(
            got, want,
            "{name} (seed {seed}): sequence {i} differs from its undisturbed twin"
        );
    }
    assert_eq!(sim.leftover_caches(), 0, "{name}: caches left behind");
    sim
}

#[test]
fn the_simulated_pipeline_gives_the_single_process_answers() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    let mut local = LocalPipeline::load(&file, 1, &Device::Cpu).unwrap();
    for (r, twin) in requests().into_iter().zip(&twins) {
        let request = GenerateRequest {
            prompt_ids: r.prompt,
            max_tokens: r.max_tokens,
            sampling: r.sampling,
            stop_at_eos: false,
        };
        let g = local.generate(&request, |_| {}).unwrap();
        assert_eq!(g.tokens, twin.tokens);
    }
}

#[test]
fn a_node_killed_mid_answer_is_replaced_and_every_answer_is_its_twin() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    for (node, at) in [(1, 40), (0, 25), (2, 70)] {
        let faults = Faults {
            kill: Some((node, at)),
            ..Default::default()
        };
        let sim = check_against_twins("kill", faults, 1, &twins, &file);
        assert_eq!(sim.replans, 2, "one re-plan after the kill");
        assert!(sim.clients.iter().any(|c| c.core.replays() > 0));
    }
}

#[test]
fn a_hung_node_is_replaced_and_every_answer_is_its_twin() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    let sim = check_against_twins(
        "hang",
        Faults {
            hang: Some((1, 45)),
            ..Default::default()
        },
        1,
        &twins,
        &file,
    );
    assert!(sim.clients.iter().any(|c| c.core.replays() > 0));
}

#[test]
fn dropped_frames_break_the_link_and_the_answers_resume() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    for seed in 1..=3 {
        let sim = check_against_twins(
            "drop",
            Faults {
                drop: 0.03,
                ..Default::default()
            },
            seed,
            &twins,
            &file,
        );
        assert!(sim.replans > 1, "seed {seed}: no frame was dropped");
    }
}

#[test]
fn delayed_reordered_and_duplicated_frames_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    for seed in 1..=3 {
        let faults = Faults {
            duplicate: 0.3,
            delay: 4,
            reorder: true,
            ..Default::default()
        };
        let sim = check_against_twins("delay+reorder+duplicate", faults, seed, &twins, &file);
        assert_eq!(sim.replans, 1, "no failure, no re-plan");
    }
}

#[test]
fn with_every_node_gone_answers_wait_and_resume_when_one_joins() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    // A node joins 10 s (virtual) after all died: within the recover wait.
    let faults = Faults {
        kill_all: Some((40, Some(1000))),
        ..Default::default()
    };
    check_against_twins("kill all, one joins", faults, 1, &twins, &file);
}

#[test]
fn with_no_node_to_take_them_over_answers_fail_after_the_recover_wait_naming_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let faults = Faults {
        kill_all: Some((40, None)),
        ..Default::default()
    };
    let (answers, sim) = Sim::new(file, 4, faults, 1).run();
    let waited = sim.tick as u32 * TICK;
    assert!(
        waited >= Deadlines::default().recover,
        "failed after {waited:?}"
    );
    for a in answers {
        let e = a.error.expect("an answer with nowhere to run fails");
        assert!(
            e.contains("every node died") && e.contains("no node left"),
            "{e}"
        );
    }
}

#[test]
fn a_client_that_leaves_mid_answer_frees_its_caches_on_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    let faults = Faults {
        client_leaves: Some((2, 30)),
        duplicate: 0.2,
        delay: 2,
        ..Default::default()
    };
    let (answers, sim) = Sim::new(file, 4, faults, 7).run();
    for (i, (got, want)) in answers.iter().zip(&twins).enumerate() {
        if i == 2 {
            assert!(got.cancelled && got.tokens.len() < want.tokens.len());
            assert!(want.tokens.starts_with(&got.tokens));
            assert_eq!(sim.clients[2].core.outcome(), Some(&Outcome::Cancelled));
        } else {
            assert_eq!(got, want, "sequence {i}");
        }
    }
    assert_eq!(sim.leftover_caches(), 0);
}

/// Each answer's prompt and undisturbed tokens: what the drafts are taken from.
fn truths(twins: &[Answer]) -> Arc<Vec<Vec<u32>>> {
    Arc::new(
        requests()
            .into_iter()
            .zip(twins)
            .map(|(r, t)| [r.prompt, t.tokens.clone()].concat())
            .collect(),
    )
}

#[test]
fn drafts_verified_in_one_pass_give_the_same_answers_in_fewer_passes() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    let faults = Faults {
        drafts: Some(truths(&twins)),
        ..Default::default()
    };
    let sim = check_against_twins("drafts", faults, 1, &twins, &file);
    for (i, c) in sim.clients.iter().enumerate() {
        let u = c.core.usage(sim.now());
        assert!(u.draft_tokens > 0, "sequence {i} drafted nothing");
        assert!(
            u.accepted_draft_tokens > 0 && u.accepted_draft_tokens < u.draft_tokens,
            "sequence {i}: {} of {} drafts accepted; some must be kept and some dropped",
            u.accepted_draft_tokens,
            u.draft_tokens
        );
        assert!(
            u.passes < u.completion_tokens,
            "sequence {i}: {} passes for {} tokens",
            u.passes,
            u.completion_tokens
        );
    }
}

#[test]
fn drafts_from_the_last_stage_give_greedy_answers_their_twins_through_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    // The model drafts for itself on whichever node is the last stage: greedy, every
    // draft is the token the model picks; sampled, drawn from the distribution the rule
    // judges by, so nearly all are kept (the tokens are the model's in distribution, not
    // the twin's draw for draw).
    let tokenizer = Tokenizer::for_model(&file).unwrap();
    let draft_model = strata_model::draft::load_draft_model(file.path(), &tokenizer).unwrap();
    for kill in [None, Some((1, 20))] {
        let faults = Faults {
            last_stage_drafts: Some(draft_model.clone()),
            kill,
            ..Default::default()
        };
        let (answers, sim) = Sim::new(file.clone(), 4, faults, 1).run();
        for (i, (got, twin)) in answers.iter().zip(&twins).enumerate() {
            let c = &sim.clients[i];
            let u = c.core.usage(sim.now());
            let what = format!("kill {kill:?}, sequence {i}");
            if requests()[i].sampling.temperature == 0.0 {
                assert_eq!(got, twin, "{what}");
            } else {
                assert_eq!(got.tokens.len(), twin.tokens.len(), "{what}");
                assert_eq!(got.finish, twin.finish, "{what}");
            }
            assert!(u.draft_tokens > 0, "{what}: drafted nothing");
            // Drafts sent in a pass the kill lost are never kept: count only without one.
            assert!(
                kill.is_some() || u.accepted_draft_tokens * 10 >= u.draft_tokens * 9,
                "{what}: {} of {} drafts kept",
                u.accepted_draft_tokens,
                u.draft_tokens
            );
            assert!(u.passes * 2 < u.completion_tokens, "{what}: {u:?}");
        }
        if kill.is_some() {
            assert!(
                sim.clients.iter().any(|c| c.core.replays() > 0),
                "the kill at tick {:?} hit nothing ({} re-plans)",
                kill,
                sim.replans
            );
        }
        assert_eq!(sim.leftover_caches(), 0, "caches left behind");
    }
}

#[test]
fn drafted_answers_survive_kills_drops_delays_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path());
    let twins = undisturbed(&file);
    let truth = truths(&twins);
    let cases = [
        Faults {
            kill: Some((1, 40)),
            ..Default::default()
        },
        Faults {
            drop: 0.03,
            ..Default::default()
        },
        Faults {
            duplicate: 0.3,
            delay: 4,
            reorder: true,
            ..Default::default()
        },
    ];
    for faults in cases {
        for seed in 1..=2 {
            let faults = Faults {
                drafts: Some(truth.clone()),
                ..faults.clone()
            };
            check_against_twins(
                &format!("drafts with {faults:?}"),
                faults,
                seed,
                &twins,
                &file,
            );
        }
    }
}
