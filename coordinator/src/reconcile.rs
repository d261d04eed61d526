//! The reconciler: keeps the plan in force matching the live membership. When a worker
//! joins, dies, drains or is removed it waits for quiet membership (and, for a planned
//! change, for the in-flight sequences of the old pipeline to finish), plans, streams
//! each worker its slice (only the bytes of its layers), wires the chain back to front,
//! and publishes the new pipeline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_model::Slice;
use strata_net::identity::{worker_name, COORDINATOR_NAME};
use strata_proto::v1::load_chunk::Chunk;
use strata_proto::v1::{
    ByteRange, FileData, LoadChunk, LoadHeader, SliceFile, UnloadRequest, WireRequest,
};
use strata_proto::PROTOCOL_VERSION;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::planner::{self, Candidate, Plan};
use crate::registry::{Held, WorkerState};
use crate::serving::{Pipeline, ServingState};
use crate::Shared;

/// Bytes per load message.
const LOAD_CHUNK: usize = 1 << 20;
/// Load messages read ahead of the network.
const LOAD_QUEUE: usize = 4;
/// How long wiring one stage may take.
const WIRE_TIMEOUT: Duration = Duration::from_secs(20);

/// The workers a plan may use now: admitted, alive, not draining.
pub fn candidates(shared: &Shared) -> Vec<Candidate> {
    shared
        .registry()
        .workers
        .values()
        .filter(|w| w.eligible())
        .map(|w| Candidate {
            id: w.profile.id.clone(),
            budget: w.profile.memory_budget,
            speed: w.profile.speed,
        })
        .collect()
}

/// The plan the coordinator would make now.
pub fn plan_now(shared: &Shared) -> std::result::Result<Plan, planner::Shortfall> {
    planner::plan(
        &shared.model().profile,
        &candidates(shared),
        &shared.config().plan,
    )
}

fn same_layout(a: &Plan, b: &Plan) -> bool {
    a.stages.len() == b.stages.len()
        && a.stages.iter().zip(&b.stages).all(|(x, y)| {
            x.worker == y.worker && x.layers == y.layers && x.embed == y.embed && x.head == y.head
        })
}

/// Reconciles forever.
pub async fn run(shared: Arc<Shared>) {
    // --min-workers holds back the first plan only; after that, any plan that fits serves.
    let mut served_once = false;
    loop {
        tokio::select! {
            _ = shared.cancel().cancelled() => return,
            _ = shared.membership_change() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let state = shared.serving();
        let current = state.pipeline().cloned();
        // A lost stage re-plans at once: answers are waiting.
        let recovering = matches!(state, ServingState::Recovering(_));
        let eligible = candidates(&shared);
        if current.is_none() && !served_once && eligible.len() < shared.config().min_workers {
            shared.set_serving(ServingState::Starting(format!(
                "waiting for workers: {} of the {} asked for with --min-workers have joined",
                eligible.len(),
                shared.config().min_workers
            )));
            continue;
        }
        let settled = recovering
            || shared
                .registry()
                .changed_at
                .is_none_or(|t| t.elapsed() >= shared.config().settle);
        if !settled {
            continue;
        }
        let desired = match plan_now(&shared) {
            Ok(p) => p,
            Err(shortfall) => {
                if current.is_none()
                    && !matches!(&state, ServingState::Shortfall(d) if *d == shortfall.detail)
                {
                    warn!("{shortfall}");
                    shared.set_serving(ServingState::Shortfall(shortfall.detail.clone()));
                }
                continue;
            }
        };
        if let Some(cur) = &current {
            if same_layout(&cur.plan, &desired) {
                continue;
            }
            // A planned change: new requests wait; the old pipeline's sequences finish.
            info!("membership changed; re-planning once in-flight sequences finish");
            shared.set_serving(ServingState::Loading(
                "re-planning: waiting for in-flight sequences to finish".into(),
            ));
            while shared.sessions().active_on(cur.epoch) > 0 && !shared.cancel().is_cancelled() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let loading = |detail: String| {
            if recovering {
                ServingState::Recovering(detail)
            } else {
                ServingState::Loading(detail)
            }
        };
        shared.set_serving(loading(format!(
            "loading a plan of {} stage(s)",
            desired.stages.len()
        )));
        match apply(&shared, desired).await {
            Ok(p) => {
                served_once = true;
                shared.set_serving(ServingState::Serving(Arc::new(p)));
            }
            Err(e) => {
                warn!(cause = %e, "could not apply the plan; retrying");
                shared.set_serving(loading(format!("could not apply the plan: {e}")));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn apply(shared: &Arc<Shared>, plan: Plan) -> Result<Pipeline> {
    let epoch = shared.next_epoch();
    let describe: Vec<String> = plan
        .stages
        .iter()
        .map(|s| format!("{}: layers {}..{}", s.worker, s.layers.start, s.layers.end))
        .collect();
    info!(epoch, stages = %describe.join(", "), est_ms_per_token = plan.est_ms_per_token, "applying a plan");
    // Release workers left out of the plan.
    let leaving: Vec<_> = {
        let mut registry = shared.registry();
        let in_plan: Vec<&str> = plan.stages.iter().map(|s| s.worker.as_str()).collect();
        registry
            .workers
            .values_mut()
            .filter(|w| !in_plan.contains(&w.profile.id.as_str()) && w.held.is_some())
            .map(|w| {
                w.release();
                w.client.clone()
            })
            .collect()
    };
    for mut c in leaving {
        let _ = tokio::time::timeout(WIRE_TIMEOUT, c.unload(UnloadRequest {})).await;
    }
    // Load every stage at once.
    let loads = plan.stages.iter().enumerate().map(|(i, s)| {
        let shared = shared.clone();
        let s = s.clone();
        async move {
            let want = Held {
                layers: s.layers.clone(),
                embed: s.embed,
                head: s.head,
            };
            let already = shared
                .registry()
                .workers
                .get(&s.worker)
                .is_some_and(|w| w.held.as_ref() == Some(&want));
            if !already {
                load(&shared, &s.worker, &want, s.memory, epoch).await?;
            }
            if let Some(w) = shared.registry().workers.get_mut(&s.worker) {
                w.held = Some(want);
                w.stage = Some(i);
                w.state = WorkerState::Ready;
            }
            Ok::<(), Error>(())
        }
    });
    for r in futures::future::join_all(loads).await {
        r?;
    }
    // Wire back to front, so each stage's next hop is listening when it dials.
    let k = plan.stages.len();
    for i in (0..k).rev() {
        let (mut client, next_address, next_name) = {
            let registry = shared.registry();
            let w = registry
                .workers
                .get(&plan.stages[i].worker)
                .ok_or_else(|| {
                    Error::Unavailable(format!("worker {} left", plan.stages[i].worker))
                })?;
            let (addr, name) = if i + 1 == k {
                (
                    std::net::SocketAddr::new(w.coordinator_ip, shared.data_port()),
                    COORDINATOR_NAME.to_string(),
                )
            } else {
                let next = registry
                    .workers
                    .get(&plan.stages[i + 1].worker)
                    .ok_or_else(|| {
                        Error::Unavailable(format!("worker {} left", plan.stages[i + 1].worker))
                    })?;
                (next.data_addr, worker_name(&next.profile.id))
            };
            (w.client.clone(), addr, name)
        };
        let wire = WireRequest {
            stage: i as u32,
            stages: k as u32,
            next_address: next_address.to_string(),
            next_server_name: next_name,
            epoch,
            wire_dtype: shared.config().wire_dtype.name().into(),
        };
        tokio::time::timeout(WIRE_TIMEOUT, client.wire(wire))
            .await
            .map_err(|_| Error::Unavailable(format!("wiring {} timed out", plan.stages[i].worker)))?
            .map_err(|s| {
                Error::Unavailable(format!("wiring {}: {}", plan.stages[i].worker, s.message()))
            })?;
    }
    let (first_addr, first_name) = {
        let registry = shared.registry();
        let w = registry
            .workers
            .get(&plan.stages[0].worker)
            .ok_or_else(|| Error::Unavailable("stage 0 left".into()))?;
        (w.data_addr, worker_name(&w.profile.id))
    };
    let first = strata_net::transport::connect(shared.endpoint(), first_addr, &first_name).await?;
    info!(epoch, "serving");
    Ok(Pipeline { epoch, plan, first })
}

/// Streams `worker` the bytes of its slice and waits until it has loaded them.
async fn load(
    shared: &Arc<Shared>,
    worker: &str,
    held: &Held,
    reserved: u64,
    epoch: u64,
) -> Result<()> {
    let slice = Slice {
        layers: held.layers.clone(),
        embed: held.embed,
        head: held.head,
    };
    let (root, extents) = shared.model().file.slice_extents(&slice);
    let total: u64 = extents
        .iter()
        .flat_map(|e| e.ranges.iter().map(|r| r.1))
        .sum();
    let (mut client, progress) = {
        let mut registry = shared.registry();
        let w = registry
            .workers
            .get_mut(worker)
            .ok_or_else(|| Error::Unavailable(format!("worker {worker} left")))?;
        w.state = WorkerState::Loading;
        w.load_total = total;
        w.load_done.store(0, Ordering::Relaxed);
        w.held = None;
        (w.client.clone(), w.load_done.clone())
    };
    let header = LoadHeader {
        protocol_version: PROTOCOL_VERSION,
        model_name: root,
        model_digest: shared.model().digest.clone(),
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
    };
    let (tx, rx) = mpsc::channel::<LoadChunk>(LOAD_QUEUE);
    let mut bar = strata_net::progress::Progress::bytes(
        format!(
            "sending layers {}..{} to {worker}",
            held.layers.start, held.layers.end
        ),
        total,
    );
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if tx
            .blocking_send(LoadChunk {
                chunk: Some(Chunk::Header(header)),
            })
            .is_err()
        {
            return Ok(());
        }
        for (i, e) in extents.iter().enumerate() {
            let file = std::fs::File::open(&e.path)?;
            for &(offset, length) in &e.ranges {
                let mut at = offset;
                while at < offset + length {
                    let n = ((offset + length - at) as usize).min(LOAD_CHUNK);
                    let mut buf = vec![0u8; n];
                    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at)?;
                    let msg = LoadChunk {
                        chunk: Some(Chunk::Data(FileData {
                            file: i as u32,
                            offset: at,
                            data: buf,
                        })),
                    };
                    if tx.blocking_send(msg).is_err() {
                        return Ok(());
                    }
                    progress.fetch_add(n as u64, Ordering::Relaxed);
                    bar.advance(n as u64);
                    at += n as u64;
                }
            }
        }
        bar.finish("sent");
        Ok(())
    });
    let started = Instant::now();
    let reply = client
        .load(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            Error::Unavailable(format!(
                "worker {worker} could not load layers {}..{}: {}",
                held.layers.start,
                held.layers.end,
                s.message()
            ))
        });
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Error::Unavailable(format!(
                "reading the model for {worker}: {e}"
            )))
        }
        Err(e) => {
            return Err(Error::Unavailable(format!(
                "reading the model for {worker}: {e}"
            )))
        }
    }
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(e) => {
            if let Some(w) = shared.registry().workers.get_mut(worker) {
                w.state = WorkerState::Idle;
                w.detail = e.to_string();
            }
            return Err(e);
        }
    };
    info!(
        worker,
        layers = ?held.layers,
        mib = total >> 20,
        ms = started.elapsed().as_millis() as u64,
        resident_mib = reply.resident_bytes >> 20,
        "slice loaded"
    );
    Ok(())
}
