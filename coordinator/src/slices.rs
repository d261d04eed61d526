//! Getting a plan onto its workers: a slice's load header (only the bytes of its
//! tensors), what a worker's cache already has of it, streaming only the rest (read from
//! the coordinator's copy of the model), loading, and wiring the stages back to front.
//! A draft model the last stage holds (`--draft-on worker`) travels the same way, whole.
//! Every call has a deadline.

use std::io::{Read, Seek};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_model::{ModelFile, Slice};
use strata_net::identity::{worker_name, COORDINATOR_NAME};
use strata_net::slice_stream::{read_message, write_message, PieceHead};
use strata_proto::v1::load_outcome::Outcome;
use strata_proto::v1::worker_control_client::WorkerControlClient;
use strata_proto::v1::{ByteRange, LoadHeader, LoadOutcome, LoadResponse, SliceFile, WireRequest};
use strata_proto::PROTOCOL_VERSION;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::info;

use crate::error::{Error, Result};
use crate::planner::{Plan, StagePlan};
use crate::registry::{Held, WorkerState};
use crate::Shared;

/// Bytes per piece of a load: under glibc's 1 MiB mapping threshold (set in the binary),
/// so each piece's buffer comes from the heap, reused, rather than mapped and faulted in.
const LOAD_CHUNK: usize = 1 << 19;
/// Pieces read ahead of the network.
const LOAD_QUEUE: usize = 8;
/// How long wiring one stage, or asking what a cache lacks, may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// A load may take this long, plus the time its bytes need at [`SLOWEST_LINK`].
const LOAD_BASE: Duration = Duration::from_secs(60);
/// How long a worker's answer may take once sending to it failed (it refused, and closed).
const REFUSAL_WAIT: Duration = Duration::from_secs(5);
/// The slowest link (bytes/s) a load's deadline allows for: 10 MB/s.
const SLOWEST_LINK: f64 = 10e6;

/// The slice a stage of a plan holds.
pub fn held_of(s: &StagePlan) -> Held {
    Held {
        layers: s.layers.clone(),
        embed: s.embed,
        head: s.head,
    }
}

/// The bytes a load sends: a slice of a model on the coordinator's disk.
struct Source<'a> {
    file: &'a ModelFile,
    /// The model's content digest.
    digest: &'a str,
    slice: Slice,
    /// Of a draft model: how many of its token ids the served model shares.
    draft_vocabulary: Option<u32>,
}

impl<'a> Source<'a> {
    /// Slice `held` of the served model.
    fn served(shared: &'a Shared, held: &Held) -> Self {
        Source {
            file: &shared.model().file,
            digest: &shared.model().digest,
            slice: Slice {
                layers: held.layers.clone(),
                embed: held.embed,
                head: held.head,
            },
            draft_vocabulary: None,
        }
    }

    /// Where the bytes of the slice's tensors lie, file by file.
    fn extents(&self) -> (String, Vec<strata_model::FileExtent>) {
        self.file.slice_extents(&self.slice)
    }

    /// What a load of it is called in logs and errors.
    fn describe(&self) -> String {
        match self.draft_vocabulary {
            Some(_) => "the draft model".into(),
            None => format!(
                "layers {}..{}",
                self.slice.layers.start, self.slice.layers.end
            ),
        }
    }
}

/// The load header of `source`: every byte range of its tensors, file by file.
fn header(source: &Source, reserved: u64, epoch: u64, prefetch: bool) -> LoadHeader {
    let held = &source.slice;
    let (root, extents) = source.extents();
    let total: u64 = extents
        .iter()
        .flat_map(|e| e.ranges.iter().map(|r| r.1))
        .sum();
    LoadHeader {
        protocol_version: PROTOCOL_VERSION,
        model_name: root,
        model_digest: source.digest.to_string(),
        files: extents
            .iter()
            .map(|e| SliceFile {
                path: e.relative.clone(),
                length: e.length,
                ranges: e
                    .ranges
                    .iter()
                    .map(|&(offset, length)| ByteRange { offset, length })
                    .collect(),
            })
            .collect(),
        layer_start: held.layers.start as u32,
        layer_end: held.layers.end as u32,
        embed: held.embed,
        head: held.head,
        weight_bytes: total,
        reserved_bytes: reserved,
        epoch,
        prefetch,
        draft: source.draft_vocabulary.is_some(),
        draft_vocabulary: source.draft_vocabulary.unwrap_or(0),
    }
}

/// The worker's control client, its control address, and its load progress counter.
fn client_of(
    shared: &Shared,
    worker: &str,
) -> Result<(WorkerControlClient<Channel>, SocketAddr, Arc<AtomicU64>)> {
    let registry = shared.registry();
    let w = registry
        .workers
        .get(worker)
        .ok_or_else(|| Error::Unavailable(format!("worker {worker} left")))?;
    Ok((w.client.clone(), w.control_addr, w.load_done.clone()))
}

/// Sends `worker` what its cache lacks of slice `held`: only into the cache when
/// `prefetch` (the slice in memory keeps serving), or loading it. Returns the bytes sent.
pub async fn send(
    shared: &Arc<Shared>,
    worker: &str,
    held: &Held,
    reserved: u64,
    epoch: u64,
    prefetch: bool,
) -> Result<u64> {
    let source = Source::served(shared, held);
    load(shared, worker, &source, reserved, epoch, prefetch).await
}

/// Sends `worker`, the last stage, the draft model it drafts with (`--draft-on worker`),
/// whole: what its cache lacks, then it loads it beside its slice unless it holds it
/// already, or only into the cache when `prefetch`. Returns the bytes sent; none where
/// drafts are not made on the last stage.
pub async fn send_draft(
    shared: &Arc<Shared>,
    worker: &str,
    epoch: u64,
    prefetch: bool,
) -> Result<u64> {
    let Some(crate::DraftSource::OnLastStage(draft)) = &shared.model().draft else {
        return Ok(0);
    };
    let source = Source {
        file: &draft.file,
        digest: &draft.digest,
        slice: Slice::full(draft.file.config().num_layers),
        draft_vocabulary: Some(draft.shared_vocabulary as u32),
    };
    load(shared, worker, &source, draft.bytes.memory, epoch, prefetch).await
}

/// Sends `worker` what its cache lacks of `source`, and has it load it unless `prefetch`.
async fn load(
    shared: &Arc<Shared>,
    worker: &str,
    source: &Source<'_>,
    reserved: u64,
    epoch: u64,
    prefetch: bool,
) -> Result<u64> {
    let header = header(source, reserved, epoch, prefetch);
    // A draft model is loaded beside the slice, which keeps serving.
    let replaces_slice = !prefetch && !header.draft;
    let (mut client, control_addr, progress) = client_of(shared, worker)?;
    let missing = tokio::time::timeout(CALL_TIMEOUT, client.missing(header.clone()))
        .await
        .map_err(|_| Error::Unavailable(format!("asking {worker} for its cache timed out")))?
        .map_err(|s| Error::Unavailable(format!("asking {worker} for its cache: {}", s.message())))?
        .into_inner()
        .files;
    let to_send: u64 = missing
        .iter()
        .flat_map(|f| f.ranges.iter().map(|r| r.length))
        .sum();
    if replaces_slice {
        if let Some(w) = shared.registry().workers.get_mut(worker) {
            w.state = WorkerState::Loading;
            w.load_total = to_send;
            w.load_done.store(0, Ordering::Relaxed);
            w.set_held(None);
        }
    }
    let what = format!(
        "{} {} to {worker}",
        if prefetch { "prefetching" } else { "sending" },
        source.describe(),
    );
    let started = Instant::now();
    let deadline = LOAD_BASE + Duration::from_secs_f64(to_send as f64 / SLOWEST_LINK);
    let to = Destination {
        worker,
        address: control_addr,
    };
    let (_, extents) = source.extents();
    let streamed = stream(shared, header, (extents, missing), to, progress, &what);
    let reply = tokio::time::timeout(deadline, streamed)
        .await
        .map_err(|_| Error::Unavailable(format!("{what} took longer than {deadline:?}")))
        .and_then(|r| r);
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            if let Some(w) = shared.registry().workers.get_mut(worker) {
                if replaces_slice {
                    w.state = WorkerState::Idle;
                }
                w.detail = e.to_string();
            }
            return Err(e);
        }
    };
    info!(
        worker,
        what = %source.describe(),
        sent_mib = reply.bytes_received >> 20,
        cached_mib = reply.bytes_cached >> 20,
        ms = started.elapsed().as_millis() as u64,
        resident_mib = reply.resident_bytes >> 20,
        "{}",
        if prefetch { "prefetched" } else { "loaded" }
    );
    shared
        .metrics()
        .slice_bytes_sent
        .inc_by(reply.bytes_received);
    Ok(reply.bytes_received)
}

/// Where a slice load goes: a worker, at its control address.
struct Destination<'a> {
    worker: &'a str,
    address: SocketAddr,
}

/// Streams the header and the `missing` ranges of the files' `extents` on a slice-load
/// connection (raw bytes on mutual TLS, as `strata_net::slice_stream` frames them);
/// returns the worker's answer.
async fn stream(
    shared: &Arc<Shared>,
    header: LoadHeader,
    (extents, missing): (Vec<strata_model::FileExtent>, Vec<SliceFile>),
    to: Destination<'_>,
    progress: Arc<AtomicU64>,
    what: &str,
) -> Result<LoadResponse> {
    let failed = |e: &dyn std::fmt::Display| Error::Unavailable(format!("{what}: {e}"));
    let tls = shared
        .identity()
        .slice_client_config()
        .map_err(|e| failed(&e))?;
    let name =
        rustls_pki_types::ServerName::try_from(worker_name(to.worker)).map_err(|e| failed(&e))?;
    let socket = tokio::time::timeout(CALL_TIMEOUT, tokio::net::TcpStream::connect(to.address))
        .await
        .map_err(|_| failed(&"connecting timed out"))?
        .map_err(|e| failed(&e))?;
    socket.set_nodelay(true).map_err(|e| failed(&e))?;
    let mut connection = tokio::time::timeout(
        CALL_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(name, socket),
    )
    .await
    .map_err(|_| failed(&"the TLS handshake timed out"))?
    .map_err(|e| failed(&e))?;
    write_message(&mut connection, &header)
        .await
        .map_err(|e| failed(&e))?;

    let total: u64 = missing
        .iter()
        .flat_map(|f| f.ranges.iter().map(|r| r.length))
        .sum();
    let (tx, rx) = mpsc::channel::<(PieceHead, Vec<u8>)>(LOAD_QUEUE);
    let bar = strata_net::progress::Progress::bytes(what.to_string(), total);
    let reader = tokio::task::spawn_blocking(move || read_pieces(&extents, &missing, &tx, bar));
    let (mut from_worker, mut to_worker) = tokio::io::split(connection);
    // The worker answers once the slice is loaded (the caller's deadline bounds that), or
    // as soon as it refuses (a slice over its budget): then the rest is not sent.
    let answer = read_message::<LoadOutcome, _>(&mut from_worker);
    tokio::pin!(answer);
    let outcome = tokio::select! {
        early = &mut answer => early,
        sent = send_pieces(&mut to_worker, rx, &progress) => match sent {
            Ok(()) => {
                match reader.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(failed(&format!("reading the model: {e}"))),
                    Err(e) => return Err(failed(&format!("reading the model: {e}"))),
                }
                answer.await
            }
            // A worker that refused and closed: its reason is the better error.
            Err(e) => match tokio::time::timeout(REFUSAL_WAIT, answer).await {
                Ok(Ok(outcome)) => Ok(outcome),
                _ => return Err(failed(&e)),
            },
        },
    };
    let outcome = outcome.map_err(|e| failed(&format!("no answer from the worker: {e}")))?;
    match outcome.outcome {
        Some(Outcome::Loaded(loaded)) => Ok(loaded),
        Some(Outcome::Refused(refused)) => {
            Err(Error::Unavailable(format!("{what}: {}", refused.message)))
        }
        None => Err(failed(&"the worker answered nothing")),
    }
}

/// Writes each piece after its head, then the end, counting the bytes into `progress`.
async fn send_pieces(
    to_worker: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut pieces: mpsc::Receiver<(PieceHead, Vec<u8>)>,
    progress: &AtomicU64,
) -> std::io::Result<()> {
    while let Some((head, piece)) = pieces.recv().await {
        to_worker.write_all(&head.encode()).await?;
        to_worker.write_all(&piece).await?;
        progress.fetch_add(piece.len() as u64, Ordering::Relaxed);
    }
    to_worker.write_all(&PieceHead::end()).await?;
    to_worker.flush().await
}

/// Reads the `missing` ranges of the slice's files (`extents`) in pieces, in order, into
/// `pieces`; stops early, and quietly, when the sender has given up.
fn read_pieces(
    extents: &[strata_model::FileExtent],
    missing: &[SliceFile],
    pieces: &mpsc::Sender<(PieceHead, Vec<u8>)>,
    mut bar: strata_net::progress::Progress,
) -> std::io::Result<()> {
    for (i, (e, need)) in extents.iter().zip(missing).enumerate() {
        let mut file = std::fs::File::open(&e.path)?;
        for r in &need.ranges {
            let (offset, length) = (r.offset, r.length);
            let mut at = offset;
            file.seek(std::io::SeekFrom::Start(offset))?;
            while at < offset + length {
                let n = ((offset + length - at) as usize).min(LOAD_CHUNK);
                // Read into spare capacity: a zeroed buffer would be written twice.
                let mut piece = Vec::with_capacity(n);
                (&mut file).take(n as u64).read_to_end(&mut piece)?;
                if piece.len() != n {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} ends inside the slice", e.path.display()),
                    ));
                }
                let head = PieceHead {
                    file: i as u32,
                    offset: at,
                    length: n as u32,
                };
                if pieces.blocking_send((head, piece)).is_err() {
                    return Ok(());
                }
                bar.advance(n as u64);
                at += n as u64;
            }
        }
    }
    bar.finish("sent");
    Ok(())
}

/// Wires the plan's stages back to front (so each next hop listens when its sender
/// dials) for `epoch`; returns the connection to stage 0.
pub async fn wire(shared: &Shared, plan: &Plan, epoch: u64) -> Result<quinn::Connection> {
    let k = plan.stages.len();
    // The last stage may send tokens as soon as it is wired (it is wired first).
    let last = plan
        .stages
        .last()
        .map(|s| s.worker.clone())
        .unwrap_or_default();
    let last_key = shared
        .registry()
        .workers
        .get(&last)
        .map(|w| w.profile.key_fingerprint.clone())
        .ok_or_else(|| Error::Unavailable(format!("worker {last} left")))?;
    shared.expect_tokens_from(epoch, last_key);
    for i in (0..k).rev() {
        let (mut client, request) = wire_request(shared, plan, i, epoch)?;
        let worker = &plan.stages[i].worker;
        tokio::time::timeout(CALL_TIMEOUT, client.wire(request))
            .await
            .map_err(|_| Error::Unavailable(format!("wiring {worker} timed out")))?
            .map_err(|s| Error::Unavailable(format!("wiring {worker}: {}", s.message())))?;
    }
    let (first_addr, first_name) = {
        let registry = shared.registry();
        let w = registry
            .workers
            .get(&plan.stages[0].worker)
            .ok_or_else(|| Error::Unavailable("stage 0 left".into()))?;
        (w.data_addr, worker_name(&w.profile.id))
    };
    Ok(strata_net::transport::connect(shared.endpoint(), first_addr, &first_name).await?)
}

/// Stage `i`'s control client and its wiring: the next stage, or the coordinator.
fn wire_request(
    shared: &Shared,
    plan: &Plan,
    i: usize,
    epoch: u64,
) -> Result<(WorkerControlClient<Channel>, WireRequest)> {
    let k = plan.stages.len();
    let registry = shared.registry();
    let get = |id: &str| {
        registry
            .workers
            .get(id)
            .ok_or_else(|| Error::Unavailable(format!("worker {id} left")))
    };
    let w = get(&plan.stages[i].worker)?;
    let previous_key = match i {
        0 => shared.identity().key_fingerprint().to_string(),
        _ => get(&plan.stages[i - 1].worker)?
            .profile
            .key_fingerprint
            .clone(),
    };
    let (addr, name) = if i + 1 == k {
        (
            std::net::SocketAddr::new(w.coordinator_ip, shared.data_port()),
            COORDINATOR_NAME.to_string(),
        )
    } else {
        let next = get(&plan.stages[i + 1].worker)?;
        (next.data_addr, worker_name(&next.profile.id))
    };
    let request = WireRequest {
        stage: i as u32,
        stages: k as u32,
        next_address: addr.to_string(),
        next_server_name: name,
        epoch,
        wire_dtype: shared.config().wire_dtype.name().into(),
        kv_positions: shared.config().plan.kv_tokens,
        previous_key,
    };
    Ok((w.client.clone(), request))
}
