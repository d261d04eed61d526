//! The data-plane frame: what stages and the coordinator say to each other, as Strata's
//! own types ([`Frame`], [`Step`], [`Sampled`]), and its one wire form: a length-prefixed
//! prost `FrameHeader` followed by raw little-endian activation bytes.
//!
//! Pure encode, decode and validation, no sockets: every limit is unit-tested, and every
//! length is checked before anything is allocated from it. The cores of the worker and
//! the coordinator see only the types here; `FrameHeader` stays inside this module.

use prost::Message;
use strata_model::{Drafts, Proposal, SamplingParams, SeqId, WireType, PROPOSAL_TOKENS};
use strata_proto::v1::{
    DraftDistribution, FrameChunk, FrameHeader, FrameKind, NextDrafts as WireNextDrafts,
    PrefillDone, SampledToken, Sampling, SequenceError, TokenLogprob, WireDType,
};
use strata_proto::{MAX_FRAME_HEADER_BYTES, MAX_FRAME_PAYLOAD_BYTES, PROTOCOL_VERSION};

/// Most sequence chunks in one frame.
pub const MAX_CHUNKS: usize = 4096;
/// Most rows (token positions) in one frame.
pub const MAX_ROWS: u64 = 1 << 16;
/// Most rows a stage runs in one batched forward, and so the most a sender puts in one
/// frame: well within [`MAX_ROWS`] and the payload limit. As llama.cpp's default micro-batch:
/// large enough that a batch's matrix products run at full speed, small enough that its
/// activations (which the plan counts) stay a fraction of a large model's stage.
pub const BATCH_ROWS: usize = 512;
/// Widest hidden size accepted.
pub const MAX_HIDDEN: u32 = 1 << 16;

/// How the last stage starts a sequence's sampler.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerStart {
    /// The sampling parameters.
    pub params: SamplingParams,
    /// Where its random stream resumes (0 for a new sequence).
    pub rng_position: u64,
}

/// New positions of one sequence: a prompt, a replayed history, or one decode token.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the first token.
    pub start: u32,
    /// The tokens at `start..start + tokens.len()`.
    pub tokens: Vec<u32>,
    /// For the last stage: present when `start` is 0, where the sampler (re)starts.
    pub sampler: Option<SamplerStart>,
    /// Which run of the sequence: 0 first, one more per replay.
    pub attempt: u32,
    /// Positions the sequence may reach in this run (prompt plus `max_tokens`): what a
    /// stage reserves in its KV budget when the run starts; 0 when not said.
    pub reserve: u32,
    /// A piece of a longer prompt: the last stage caches it and reports it done
    /// ([`Prefilled`]) instead of sampling.
    pub partial: bool,
    /// How many of `tokens`, at the end, are a draft to verify (speculative decoding): the
    /// last stage returns the drafts it keeps, in order, and the token after the last of
    /// them (or in place of the first it drops). Never the whole step, and never on a
    /// partial one.
    pub draft: u32,
    /// What each draft was drawn from, when drawn at random (one per draft, each at most
    /// [`PROPOSAL_TOKENS`] tokens); empty for drafts chosen without chance.
    pub drawn_from: Vec<Proposal>,
    /// For a last stage that holds a draft model: how many drafts to make after the tokens
    /// it samples, for the sequence's next step ([`NextDrafts`]); 0 for none.
    pub draft_next: u32,
    /// Microjoules the stages before spent on these positions; None once one of them had
    /// no energy counter. The coordinator starts it at `Some(0)`.
    pub energy_uj: Option<u64>,
}

/// Most drafts a last stage makes for one step ([`Step::draft_next`]).
pub const MAX_DRAFTS: usize = 64;

/// Drafts a last stage that holds a draft model made after a step's tokens, for the
/// sequence's next step.
#[derive(Debug, Clone, PartialEq)]
pub struct NextDrafts {
    /// The sequence.
    pub seq: SeqId,
    /// The run of the sequence.
    pub attempt: u32,
    /// The position of the first draft: the one after the step's last sampled token.
    pub position: u32,
    /// The drafts, and what each was drawn from when drawn at random.
    pub drafts: Drafts,
}

/// What one step of a sequence cost every stage, as the last stage reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepEnergy {
    /// The sequence.
    pub seq: SeqId,
    /// The run of the sequence.
    pub attempt: u32,
    /// Microjoules over every stage; None when a stage had no energy counter.
    pub energy_uj: Option<u64>,
}

/// A piece of a prompt the last stage has cached ([`Step::partial`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefilled {
    /// The sequence.
    pub seq: SeqId,
    /// Positions now cached.
    pub end: u32,
    /// The run of the sequence.
    pub attempt: u32,
}

impl Step {
    /// Positions this step adds.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it adds none (never valid on the wire).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A token the last stage sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The sequence.
    pub seq: SeqId,
    /// The position the token takes.
    pub position: u32,
    /// The token.
    pub token: u32,
    /// Its log-probability under the model.
    pub logprob: f32,
    /// The most likely tokens at this position, when asked for.
    pub top: Vec<(u32, f32)>,
    /// Where the sampler's random stream stands after this token.
    pub rng_position: u64,
    /// The run of the sequence that sampled it.
    pub attempt: u32,
}

/// A sequence that failed on a stage, and why (naming the stage).
#[derive(Debug, Clone, PartialEq)]
pub struct SeqFailure {
    /// The sequence.
    pub seq: SeqId,
    /// The run of the sequence that failed.
    pub attempt: u32,
    /// What went wrong.
    pub message: String,
}

/// Activations of a forward frame: `[rows, hidden]` in `wire` type.
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    /// Element type.
    pub wire: WireType,
    /// Columns.
    pub hidden: u32,
    /// Raw little-endian bytes.
    pub bytes: Vec<u8>,
}

/// One data-plane message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Positions to run: token ids to stage 0 (no activations), activations between stages.
    /// Failures picked up on the way ride along to the coordinator.
    Forward {
        /// Plan epoch.
        epoch: u64,
        /// The sequences' new positions, in row order.
        steps: Vec<Step>,
        /// Their activations (none for token ids).
        activations: Option<Activations>,
        /// Sequences that failed upstream.
        failures: Vec<SeqFailure>,
    },
    /// Sampled tokens, last stage to coordinator.
    Tokens {
        /// Plan epoch.
        epoch: u64,
        /// What was sampled.
        tokens: Vec<Sampled>,
        /// Pieces of prompts cached without sampling.
        prefilled: Vec<Prefilled>,
        /// Sequences whose caches every stage has dropped.
        freed: Vec<SeqId>,
        /// Sequences that failed.
        failures: Vec<SeqFailure>,
        /// What each step of the batch cost.
        energy: Vec<StepEnergy>,
        /// Drafts for sequences' next steps ([`Step::draft_next`]).
        drafts: Vec<NextDrafts>,
    },
    /// Drop these sequences' caches (travels down the whole pipeline).
    Free {
        /// Plan epoch.
        epoch: u64,
        /// The sequences.
        seqs: Vec<SeqId>,
    },
}

impl Frame {
    /// Its plan epoch.
    pub fn epoch(&self) -> u64 {
        match self {
            Frame::Forward { epoch, .. }
            | Frame::Tokens { epoch, .. }
            | Frame::Free { epoch, .. } => *epoch,
        }
    }

    /// Positions it asks a stage to run.
    pub fn rows(&self) -> usize {
        match self {
            Frame::Forward { steps, .. } => steps.iter().map(Step::len).sum(),
            _ => 0,
        }
    }

    /// Its bytes on the wire: the length prefix and header, then the payload.
    pub fn encode(&self) -> (Vec<u8>, &[u8]) {
        let (header, payload) = self.header();
        let body = header.encode_to_vec();
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        (out, payload)
    }

    fn header(&self) -> (FrameHeader, &[u8]) {
        let base = FrameHeader {
            protocol_version: PROTOCOL_VERSION,
            epoch: self.epoch(),
            ..Default::default()
        };
        match self {
            Frame::Forward {
                steps,
                activations,
                failures,
                ..
            } => {
                let (dtype, hidden, payload) = match activations {
                    Some(a) => (wire_dtype(a.wire), a.hidden, a.bytes.as_slice()),
                    None => (WireDType::None, 0, &[][..]),
                };
                let header = FrameHeader {
                    kind: FrameKind::Forward as i32,
                    chunks: steps.iter().map(chunk).collect(),
                    dtype: dtype as i32,
                    hidden,
                    payload_bytes: payload.len() as u64,
                    errors: failures.iter().map(sequence_error).collect(),
                    ..base
                };
                (header, payload)
            }
            Frame::Tokens {
                tokens,
                prefilled,
                freed,
                failures,
                energy,
                drafts,
                ..
            } => (
                FrameHeader {
                    kind: FrameKind::Tokens as i32,
                    drafts: drafts.iter().map(wire_next_drafts).collect(),
                    freed: freed.clone(),
                    tokens: tokens.iter().map(sampled_token).collect(),
                    prefilled: prefilled
                        .iter()
                        .map(|p| PrefillDone {
                            sequence: p.seq,
                            end: p.end,
                            attempt: p.attempt,
                        })
                        .collect(),
                    errors: failures.iter().map(sequence_error).collect(),
                    energy: energy
                        .iter()
                        .map(|e| strata_proto::v1::StepEnergy {
                            sequence: e.seq,
                            attempt: e.attempt,
                            energy_uj: e.energy_uj,
                        })
                        .collect(),
                    ..base
                },
                &[],
            ),
            Frame::Free { seqs, .. } => (
                FrameHeader {
                    kind: FrameKind::Free as i32,
                    free: seqs.clone(),
                    ..base
                },
                &[],
            ),
        }
    }

    /// A frame from a header that passed [`decode_header`] and exactly its payload.
    pub fn from_wire(header: Header, payload: Vec<u8>) -> Result<Frame, String> {
        let h = header.0;
        if payload.len() as u64 != h.payload_bytes {
            return Err(format!(
                "payload of {} bytes where the header said {}",
                payload.len(),
                h.payload_bytes
            ));
        }
        let failures = h.errors.into_iter().map(seq_failure).collect();
        Ok(match FrameKind::try_from(h.kind) {
            Ok(FrameKind::Forward) => Frame::Forward {
                epoch: h.epoch,
                steps: h.chunks.into_iter().map(step).collect(),
                activations: match wire_type(h.dtype) {
                    Some(wire) => Some(Activations {
                        wire,
                        hidden: h.hidden,
                        bytes: payload,
                    }),
                    None => None,
                },
                failures,
            },
            Ok(FrameKind::Tokens) => Frame::Tokens {
                epoch: h.epoch,
                tokens: h.tokens.into_iter().map(sampled).collect(),
                prefilled: h
                    .prefilled
                    .into_iter()
                    .map(|p| Prefilled {
                        seq: p.sequence,
                        end: p.end,
                        attempt: p.attempt,
                    })
                    .collect(),
                freed: h.freed,
                failures,
                energy: h
                    .energy
                    .into_iter()
                    .map(|e| StepEnergy {
                        seq: e.sequence,
                        attempt: e.attempt,
                        energy_uj: e.energy_uj,
                    })
                    .collect(),
                drafts: h.drafts.into_iter().map(next_drafts).collect(),
            },
            Ok(FrameKind::Free) => Frame::Free {
                epoch: h.epoch,
                seqs: h.free,
            },
            _ => return Err(format!("unknown frame kind {}", h.kind)),
        })
    }
}

/// A validated frame header: how many payload bytes follow, and what they are.
#[derive(Debug)]
pub struct Header(FrameHeader);

impl Header {
    /// Bytes of payload that follow the header.
    pub fn payload_bytes(&self) -> u64 {
        self.0.payload_bytes
    }
}

/// Reads the length prefix, refusing headers over the limit.
pub fn header_len(prefix: [u8; 4]) -> Result<usize, String> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 || len > MAX_FRAME_HEADER_BYTES {
        return Err(format!(
            "header of {len} bytes (the limit is {MAX_FRAME_HEADER_BYTES})"
        ));
    }
    Ok(len)
}

/// What a receiver hands on in place of a frame it refused (over a limit, inconsistent,
/// cut short): a failure for every sequence the header names, in the frame's epoch, so the
/// answers hear at once why rather than waiting out a timeout. None when the header does
/// not decode at all, or names no sequence (a refused `Free` leaves caches that the next
/// epoch drops).
pub fn refusal(header_bytes: &[u8], reason: &str) -> Option<Frame> {
    let h = FrameHeader::decode(header_bytes).ok()?;
    let message = format!("a frame was refused by its receiver: {reason}");
    let fail = |seq: SeqId, attempt: u32| SeqFailure {
        seq,
        attempt,
        message: message.clone(),
    };
    let mut failures: Vec<SeqFailure> = h.errors.into_iter().map(seq_failure).collect();
    failures.extend(h.chunks.iter().map(|c| fail(c.sequence, c.attempt)));
    failures.extend(h.tokens.iter().map(|t| fail(t.sequence, t.attempt)));
    failures.extend(h.prefilled.iter().map(|p| fail(p.sequence, p.attempt)));
    failures.truncate(MAX_CHUNKS);
    if failures.is_empty() {
        return None;
    }
    Some(match FrameKind::try_from(h.kind) {
        Ok(FrameKind::Tokens) => Frame::Tokens {
            epoch: h.epoch,
            tokens: Vec::new(),
            prefilled: Vec::new(),
            freed: Vec::new(),
            failures,
            energy: Vec::new(),
            drafts: Vec::new(),
        },
        _ => Frame::Forward {
            epoch: h.epoch,
            steps: Vec::new(),
            activations: None,
            failures,
        },
    })
}

/// Bytes as a receiver takes them, for the fuzz targets: the length prefix, the header,
/// the payload (a frame that decodes must encode back to itself) or the failures handed on
/// in its place. Panics only when that round trip breaks.
#[doc(hidden)]
pub fn receive_bytes(data: &[u8]) {
    let Some((prefix, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(len) = header_len(*prefix) else {
        return;
    };
    let (header_bytes, payload) = rest.split_at(len.min(rest.len()));
    match decode_header(header_bytes) {
        Ok(header) => {
            if let Ok(frame) = Frame::from_wire(header, payload.to_vec()) {
                let (head, body) = frame.encode();
                let again =
                    decode_header(&head[4..]).and_then(|h| Frame::from_wire(h, body.to_vec()));
                assert_eq!(
                    again.as_ref(),
                    Ok(&frame),
                    "an encoded frame decodes to itself"
                );
            }
        }
        Err(reason) => {
            let _ = refusal(header_bytes, &reason);
        }
    }
}

/// Decodes and validates a header.
pub fn decode_header(bytes: &[u8]) -> Result<Header, String> {
    let header = FrameHeader::decode(bytes).map_err(|e| format!("undecodable header: {e}"))?;
    validate(&header)?;
    Ok(Header(header))
}

/// Checks a header's internal consistency: version, kind, counts, and that the payload
/// length is exactly rows x hidden x element size.
fn validate(h: &FrameHeader) -> Result<(), String> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (this node speaks {PROTOCOL_VERSION}); run the same strata version on every machine",
            h.protocol_version
        ));
    }
    if h.payload_bytes > MAX_FRAME_PAYLOAD_BYTES {
        return Err(format!(
            "payload of {} bytes (the limit is {MAX_FRAME_PAYLOAD_BYTES})",
            h.payload_bytes
        ));
    }
    let dtype = WireDType::try_from(h.dtype).map_err(|_| format!("unknown dtype {}", h.dtype))?;
    match FrameKind::try_from(h.kind) {
        Ok(FrameKind::Forward) => validate_forward(h, dtype)?,
        Ok(FrameKind::Tokens) | Ok(FrameKind::Free) => {
            if h.payload_bytes != 0 {
                return Err("control frame with a payload".into());
            }
            if h.tokens.len() > MAX_CHUNKS
                || h.free.len() > MAX_CHUNKS
                || h.prefilled.len() > MAX_CHUNKS
                || h.freed.len() > MAX_CHUNKS
                || h.energy.len() > MAX_CHUNKS
                || h.drafts.len() > MAX_CHUNKS
            {
                return Err("too many entries".into());
            }
            for d in &h.drafts {
                if d.token_ids.len() > MAX_DRAFTS {
                    return Err(format!(
                        "sequence {}: {} drafts for its next step (the limit is {MAX_DRAFTS})",
                        d.sequence,
                        d.token_ids.len()
                    ));
                }
                check_drawn_from(d.sequence, &d.token_ids, &d.drawn_from)?;
            }
            if h.tokens.iter().any(|t| t.top.len() > 20) {
                return Err("more than 20 alternatives for a token".into());
            }
        }
        _ => return Err(format!("unknown frame kind {}", h.kind)),
    }
    if h.errors.len() > MAX_CHUNKS {
        return Err("too many errors".into());
    }
    Ok(())
}

fn validate_forward(h: &FrameHeader, dtype: WireDType) -> Result<(), String> {
    if h.chunks.len() > MAX_CHUNKS {
        return Err(format!(
            "{} chunks (the limit is {MAX_CHUNKS})",
            h.chunks.len()
        ));
    }
    if h.chunks.is_empty() && h.errors.is_empty() {
        return Err("a forward frame with neither chunks nor errors".into());
    }
    let mut rows = 0u64;
    for c in &h.chunks {
        if c.length == 0 {
            return Err(format!("sequence {} has an empty chunk", c.sequence));
        }
        if c.token_ids.len() != c.length as usize {
            return Err(format!(
                "sequence {}: {} token ids for {} positions",
                c.sequence,
                c.token_ids.len(),
                c.length
            ));
        }
        if c.draft >= c.length || (c.draft > 0 && c.partial) {
            return Err(format!(
                "sequence {}: a draft of {} in a step of {} positions{}",
                c.sequence,
                c.draft,
                c.length,
                if c.partial {
                    " that is a prompt piece"
                } else {
                    ""
                }
            ));
        }
        let drafts = &c.token_ids[c.token_ids.len() - c.draft as usize..];
        check_drawn_from(c.sequence, drafts, &c.drawn_from)?;
        if c.draft_next as usize > MAX_DRAFTS {
            return Err(format!(
                "sequence {}: {} drafts asked for its next step (the limit is {MAX_DRAFTS})",
                c.sequence, c.draft_next
            ));
        }
        rows += u64::from(c.length);
    }
    if rows > MAX_ROWS {
        return Err(format!("{rows} rows (the limit is {MAX_ROWS})"));
    }
    match wire_type(dtype as i32) {
        None if h.payload_bytes != 0 => Err("token frame with a payload".into()),
        None => Ok(()),
        Some(wire) => {
            if h.hidden == 0 || h.hidden > MAX_HIDDEN {
                return Err(format!("hidden size {}", h.hidden));
            }
            let expected = rows * u64::from(h.hidden) * wire.element_bytes() as u64;
            if h.payload_bytes != expected {
                return Err(format!(
                    "payload of {} bytes, but {rows} rows x {} x {} bytes is {expected}",
                    h.payload_bytes,
                    h.hidden,
                    wire.element_bytes()
                ));
            }
            Ok(())
        }
    }
}

/// What a chunk's drafts were drawn from, if it says: one distribution per draft, each
/// empty (that draft was chosen without chance) or of at most [`PROPOSAL_TOKENS`] tokens
/// with finite probabilities, none below zero, that name their draft with a probability
/// above zero (else it is a draft it could not have drawn).
fn check_drawn_from(
    seq: SeqId,
    drafts: &[u32],
    drawn_from: &[DraftDistribution],
) -> Result<(), String> {
    if drawn_from.is_empty() {
        return Ok(());
    }
    if drawn_from.len() != drafts.len() {
        return Err(format!(
            "sequence {seq}: {} draft distributions for {} drafts",
            drawn_from.len(),
            drafts.len()
        ));
    }
    for (i, (q, &draft)) in drawn_from.iter().zip(drafts).enumerate() {
        let n = q.token_ids.len();
        if n > PROPOSAL_TOKENS || q.probabilities.len() != n {
            return Err(format!(
                "sequence {seq}: draft {i}'s distribution has {n} tokens and {} \
                 probabilities (at most {PROPOSAL_TOKENS} of each, as many of one as the \
                 other)",
                q.probabilities.len()
            ));
        }
        if n == 0 {
            continue;
        }
        if q.probabilities.iter().any(|p| !p.is_finite() || *p < 0.0) {
            return Err(format!(
                "sequence {seq}: draft {i}'s distribution has a probability that is \
                 negative or not finite"
            ));
        }
        let named = q.token_ids.iter().zip(&q.probabilities);
        if !named.into_iter().any(|(&t, &p)| t == draft && p > 0.0) {
            return Err(format!(
                "sequence {seq}: draft {i} (token {draft}) is not among the tokens it was \
                 drawn from"
            ));
        }
    }
    Ok(())
}

fn wire_dtype(w: WireType) -> WireDType {
    match w {
        WireType::F32 => WireDType::F32,
        WireType::F16 => WireDType::F16,
        WireType::Bf16 => WireDType::Bf16,
    }
}

fn wire_type(dtype: i32) -> Option<WireType> {
    match WireDType::try_from(dtype) {
        Ok(WireDType::F32) => Some(WireType::F32),
        Ok(WireDType::F16) => Some(WireType::F16),
        Ok(WireDType::Bf16) => Some(WireType::Bf16),
        _ => None,
    }
}

fn chunk(s: &Step) -> FrameChunk {
    FrameChunk {
        sequence: s.seq,
        start: s.start,
        length: s.tokens.len() as u32,
        token_ids: s.tokens.clone(),
        sampling: s.sampler.as_ref().map(|st| wire_sampling(&st.params)),
        rng_position: s.sampler.as_ref().map_or(0, |st| st.rng_position),
        attempt: s.attempt,
        reserve: s.reserve,
        partial: s.partial,
        draft: s.draft,
        energy_uj: s.energy_uj,
        drawn_from: s.drawn_from.iter().map(wire_distribution).collect(),
        draft_next: s.draft_next,
    }
}

fn wire_distribution(q: &Proposal) -> DraftDistribution {
    DraftDistribution {
        token_ids: q.iter().map(|c| c.0).collect(),
        probabilities: q.iter().map(|c| c.1).collect(),
    }
}

fn distribution(q: DraftDistribution) -> Proposal {
    q.token_ids.into_iter().zip(q.probabilities).collect()
}

fn wire_next_drafts(d: &NextDrafts) -> WireNextDrafts {
    WireNextDrafts {
        sequence: d.seq,
        attempt: d.attempt,
        position: d.position,
        token_ids: d.drafts.tokens.clone(),
        drawn_from: d.drafts.drawn_from.iter().map(wire_distribution).collect(),
    }
}

fn next_drafts(d: WireNextDrafts) -> NextDrafts {
    NextDrafts {
        seq: d.sequence,
        attempt: d.attempt,
        position: d.position,
        drafts: Drafts {
            tokens: d.token_ids,
            drawn_from: d.drawn_from.into_iter().map(distribution).collect(),
        },
    }
}

fn step(c: FrameChunk) -> Step {
    Step {
        seq: c.sequence,
        start: c.start,
        sampler: c.sampling.as_ref().map(|s| SamplerStart {
            params: sampling_params(Some(s)),
            rng_position: c.rng_position,
        }),
        tokens: c.token_ids,
        attempt: c.attempt,
        reserve: c.reserve,
        partial: c.partial,
        draft: c.draft,
        energy_uj: c.energy_uj,
        drawn_from: c.drawn_from.into_iter().map(distribution).collect(),
        draft_next: c.draft_next,
    }
}

fn sampled_token(t: &Sampled) -> SampledToken {
    SampledToken {
        sequence: t.seq,
        position: t.position,
        token_id: t.token,
        logprob: t.logprob,
        top: t
            .top
            .iter()
            .map(|&(token_id, logprob)| TokenLogprob { token_id, logprob })
            .collect(),
        rng_position: t.rng_position,
        attempt: t.attempt,
    }
}

fn sampled(t: SampledToken) -> Sampled {
    Sampled {
        seq: t.sequence,
        position: t.position,
        token: t.token_id,
        logprob: t.logprob,
        top: t.top.iter().map(|a| (a.token_id, a.logprob)).collect(),
        rng_position: t.rng_position,
        attempt: t.attempt,
    }
}

fn sequence_error(f: &SeqFailure) -> SequenceError {
    SequenceError {
        sequence: f.seq,
        message: f.message.clone(),
        attempt: f.attempt,
    }
}

fn seq_failure(e: SequenceError) -> SeqFailure {
    SeqFailure {
        seq: e.sequence,
        attempt: e.attempt,
        message: e.message,
    }
}

/// Sampling parameters from their wire form; zero fields mean the defaults.
pub fn sampling_params(s: Option<&Sampling>) -> SamplingParams {
    let d = SamplingParams::default();
    let Some(s) = s else { return d };
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: if s.top_p > 0.0 { s.top_p } else { 1.0 },
        min_p: s.min_p,
        repeat_penalty: if s.repeat_penalty > 0.0 {
            s.repeat_penalty
        } else {
            1.0
        },
        repeat_window: if s.repeat_window > 0 {
            s.repeat_window as usize
        } else {
            d.repeat_window
        },
        seed: s.seed.unwrap_or(0),
        top_logprobs: s.top_logprobs as usize,
        ..d
    }
}

/// Sampling parameters in their wire form.
pub fn wire_sampling(p: &SamplingParams) -> Sampling {
    Sampling {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_window: p.repeat_window as u32,
        seed: Some(p.seed),
        logprobs: false,
        top_logprobs: p.top_logprobs as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], payload: &[u8]) -> Result<Frame, String> {
        let len = header_len(bytes[..4].try_into().map_err(|_| "short")?)?;
        let header = decode_header(&bytes[4..4 + len])?;
        Frame::from_wire(header, payload.to_vec())
    }

    fn forward(rows: u32, hidden: u32, wire: WireType) -> Frame {
        Frame::Forward {
            epoch: 3,
            steps: vec![Step {
                seq: 7,
                start: 0,
                tokens: vec![1; rows as usize],
                sampler: Some(SamplerStart {
                    params: SamplingParams {
                        temperature: 0.5,
                        seed: 9,
                        ..Default::default()
                    },
                    rng_position: 12,
                }),
                attempt: 1,
                reserve: 300,
                partial: true,
                draft: 0,
                drawn_from: Vec::new(),
                draft_next: 0,
                energy_uj: Some(1_234),
            }],
            activations: Some(Activations {
                wire,
                hidden,
                bytes: vec![0; (rows * hidden) as usize * wire.element_bytes()],
            }),
            failures: vec![SeqFailure {
                seq: 5,
                attempt: 2,
                message: "stage 1 lost it".into(),
            }],
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let frames = [
            forward(3, 64, WireType::F16),
            forward(2, 8, WireType::F32),
            Frame::Tokens {
                epoch: 4,
                tokens: vec![Sampled {
                    seq: 7,
                    position: 12,
                    token: 99,
                    logprob: -0.25,
                    top: vec![(99, -0.25), (3, -2.0)],
                    rng_position: 40,
                    attempt: 3,
                }],
                prefilled: vec![Prefilled {
                    seq: 8,
                    end: 256,
                    attempt: 0,
                }],
                freed: vec![4, 5],
                failures: Vec::new(),
                energy: vec![
                    StepEnergy {
                        seq: 7,
                        attempt: 3,
                        energy_uj: Some(52_000),
                    },
                    StepEnergy {
                        seq: 8,
                        attempt: 0,
                        energy_uj: None,
                    },
                ],
                drafts: Vec::new(),
            },
            Frame::Free {
                epoch: 4,
                seqs: vec![1, 2, 3],
            },
        ];
        for f in frames {
            let (head, payload) = f.encode();
            assert_eq!(decode(&head, payload).unwrap(), f);
        }
    }

    #[test]
    fn lies_about_sizes_are_refused_before_allocation() {
        let header_of = |f: &Frame| {
            let (h, _) = f.header();
            h
        };
        let mut h = header_of(&forward(3, 64, WireType::F16));
        h.payload_bytes += 1;
        assert!(validate(&h).unwrap_err().contains("payload"));
        let mut h = header_of(&forward(3, 64, WireType::F32));
        h.payload_bytes = MAX_FRAME_PAYLOAD_BYTES + 1;
        assert!(validate(&h).unwrap_err().contains("limit"));
        let mut h = header_of(&forward(3, 64, WireType::F16));
        h.chunks[0].token_ids.pop();
        assert!(validate(&h).is_err());
        let mut h = header_of(&forward(3, 64, WireType::F16));
        h.protocol_version = 9;
        assert!(validate(&h).unwrap_err().contains("protocol version 9"));
        assert!(header_len(u32::MAX.to_le_bytes()).is_err());
        assert!(header_len(0u32.to_le_bytes()).is_err());
        assert!(decode_header(&[0xff, 0xff, 0xff]).is_err());
        let mut h = header_of(&forward(3, 64, WireType::F16));
        h.kind = 42;
        assert!(validate(&h).is_err());
        // A payload that is not what the header promised.
        let f = forward(2, 8, WireType::F32);
        let (head, payload) = f.encode();
        assert!(decode(&head, &payload[1..])
            .unwrap_err()
            .contains("payload"));
    }

    /// Why `frame`'s header, changed by `change`, is refused.
    fn refusal_of(frame: &Frame, change: &dyn Fn(&mut FrameHeader)) -> String {
        let (mut h, _) = frame.header();
        change(&mut h);
        validate(&h).unwrap_err()
    }

    #[test]
    fn drafts_drawn_at_random_travel_with_what_they_were_drawn_from() {
        let mut f = forward(3, 8, WireType::F32);
        if let Frame::Forward { steps, .. } = &mut f {
            let step = &mut steps[0];
            step.partial = false;
            step.tokens = vec![5, 6, 7];
            step.draft = 2;
            step.drawn_from = vec![vec![(6, 0.75), (2, 0.25)], vec![(7, 1.0)]];
        }
        let (head, payload) = f.encode();
        assert_eq!(decode(&head, payload).unwrap(), f);
        // What a lying or broken sender gets told.
        let refused = |change: &dyn Fn(&mut FrameHeader)| refusal_of(&f, change);
        let e = refused(&|h| {
            h.chunks[0].drawn_from.pop();
        });
        assert!(e.contains("1 draft distributions for 2 drafts"), "{e}");
        let e = refused(&|h| h.chunks[0].drawn_from[0].token_ids = vec![1, 2]);
        assert!(e.contains("draft 0 (token 6) is not among"), "{e}");
        let e = refused(&|h| h.chunks[0].drawn_from[1].probabilities = vec![0.0]);
        assert!(e.contains("draft 1 (token 7) is not among"), "{e}");
        let e = refused(&|h| h.chunks[0].drawn_from[0].probabilities[1] = f32::NAN);
        assert!(e.contains("negative or not finite"), "{e}");
        let e = refused(&|h| {
            h.chunks[0].drawn_from[0]
                .probabilities
                .pop()
                .map(drop)
                .unwrap()
        });
        assert!(e.contains("2 tokens and 1 probabilities"), "{e}");
        // A draft chosen without chance says nothing of what it was drawn from.
        let (mut h2, _) = f.header();
        h2.chunks[0].drawn_from[1] = DraftDistribution::default();
        assert_eq!(validate(&h2), Ok(()));
        let e = refused(&|h| {
            let q = &mut h.chunks[0].drawn_from[1];
            q.token_ids = (0..65).collect();
            q.probabilities = vec![0.1; 65];
        });
        assert!(e.contains("65 tokens"), "{e}");
        let e = refused(&|h| h.chunks[0].draft_next = 65);
        assert!(e.contains("65 drafts asked for its next step"), "{e}");
    }

    #[test]
    fn drafts_for_the_next_step_travel_back_with_the_tokens() {
        let f = Frame::Tokens {
            epoch: 5,
            tokens: Vec::new(),
            prefilled: Vec::new(),
            freed: Vec::new(),
            failures: Vec::new(),
            energy: Vec::new(),
            drafts: vec![
                NextDrafts {
                    seq: 7,
                    attempt: 1,
                    position: 13,
                    drafts: Drafts {
                        tokens: vec![4, 9],
                        drawn_from: vec![vec![(4, 0.5), (1, 0.5)], vec![(9, 1.0)]],
                    },
                },
                NextDrafts {
                    seq: 8,
                    attempt: 0,
                    position: 40,
                    drafts: Drafts::chosen(vec![3, 3, 3]),
                },
            ],
        };
        let (head, payload) = f.encode();
        assert_eq!(decode(&head, payload).unwrap(), f);
        let refused = |change: &dyn Fn(&mut FrameHeader)| refusal_of(&f, change);
        let e = refused(&|h| h.drafts[0].token_ids[1] = 2);
        assert!(
            e.contains("sequence 7: draft 1 (token 2) is not among"),
            "{e}"
        );
        let e = refused(&|h| h.drafts[1].token_ids = vec![1; MAX_DRAFTS + 1]);
        assert!(e.contains("sequence 8: 65 drafts for its next step"), "{e}");
        let e = refused(&|h| {
            h.drafts[0].drawn_from.pop();
        });
        assert!(e.contains("1 draft distributions for 2 drafts"), "{e}");
    }

    #[test]
    fn a_refused_frame_fails_every_sequence_it_names_in_its_epoch() {
        let (head, _) = forward(3, 64, WireType::F16).encode();
        let Some(Frame::Forward {
            epoch,
            steps,
            failures,
            ..
        }) = refusal(&head[4..], "payload of 9 GB")
        else {
            panic!("a forward frame's refusal travels on as a forward frame")
        };
        assert_eq!(epoch, 3);
        assert!(steps.is_empty());
        // The failure it carried, and one for its step's sequence, in the step's run.
        let seqs: Vec<(u64, u32)> = failures.iter().map(|f| (f.seq, f.attempt)).collect();
        assert_eq!(seqs, vec![(5, 2), (7, 1)]);
        assert!(failures[1]
            .message
            .contains("refused by its receiver: payload of 9 GB"));
        // Nothing to say for bytes that are no header.
        assert!(refusal(&[0xff, 0xff, 0xff], "garbage").is_none());
    }
}
