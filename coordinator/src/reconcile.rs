//! The reconciler: keeps the plan in force matching the live membership.
//!
//! - Nothing serving (the first plan, or a stage was lost): plan over the workers there
//!   are, load, wire, serve; the answers that were waiting replay onto the new pipeline.
//!   A lost stage re-plans at once; other changes wait for membership to be quiet.
//! - Serving, and membership changed (a join, a drain, a worker back): make before break.
//!   The new plan's bytes travel into the workers' slice caches while the old plan keeps
//!   serving; then, between steps, the workers swap slices from their caches, the new
//!   pipeline is wired, and the answers in flight move over by the same replay.
//! - Serving, nothing to change: workers that hold a slice outside the plan in force (a
//!   worker back from a blip that the plan no longer needs, a drained one) unload it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::v1::UnloadRequest;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::planner::{self, Candidate, Plan};
use crate::registry::WorkerState;
use crate::serving::{Pipeline, ServingState};
use crate::slices::{self, held_of};
use crate::{links, session, Shared};

/// How long an unload may take.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a plan could not be applied.
const RETRY: Duration = Duration::from_secs(2);

/// A plan made better only by measured speeds replaces the one in force when it is this
/// much faster, every stage of the plan in force having been measured, and no sooner than
/// [`CALIBRATION_HOLD`] after it started: estimates that wobble do not move slices back
/// and forth.
const CALIBRATION_MARGIN: f64 = 0.25;
/// See [`CALIBRATION_MARGIN`].
const CALIBRATION_HOLD: std::time::Duration = std::time::Duration::from_secs(300);

/// The workers a plan may use now: admitted, alive, not draining. A worker's speed is what
/// its decode steps measured with the slice it holds, once measured; before, what it
/// measured of one layer when it started.
///
/// A worker outside the plan in force that still holds a slice (one that came back) asks
/// the planner to keep it there; the workers of the plan in force do not (a change of
/// membership reshapes their slices anyway, and a move for measured speeds has its own
/// margin).
pub fn candidates(shared: &Shared) -> Vec<Candidate> {
    let profile = &shared.model().profile;
    let in_force: Vec<String> = shared
        .serving()
        .pipeline()
        .map(|p| p.plan.stages.iter().map(|s| s.worker.clone()).collect())
        .unwrap_or_default();
    let registry = shared.registry();
    let eligible: Vec<_> = registry.workers.values().filter(|w| w.eligible()).collect();
    let calibrate = shared.config().calibrate;
    let measured: Vec<Option<f64>> = eligible
        .iter()
        .map(|w| match (&w.held, w.measured_ms) {
            (Some(h), Some(ms)) if calibrate && ms > 0.0 => {
                Some(profile.streamed_bytes(&h.layers, h.head) as f64 / (ms / 1e3))
            }
            _ => None,
        })
        .collect();
    let paper: Vec<f64> = eligible.iter().map(|w| w.profile.speed).collect();
    let speeds = speeds_on_one_scale(&paper, &measured);
    eligible
        .iter()
        .zip(speeds)
        .map(|(w, speed)| Candidate {
            id: w.profile.id.clone(),
            budget: w.profile.memory_budget,
            speed,
            held: w
                .held
                .as_ref()
                .filter(|_| !in_force.contains(&w.profile.id))
                .map(|h| h.layers.clone()),
        })
        .collect()
}

/// Each worker's speed for the planner: measured where it has been, else its speed on
/// paper (its start-up measurement of one layer, or `--speed`) times the median ratio of
/// measured to paper among the measured workers. A decode step costs more than its layers'
/// arithmetic, and a worker that just joined (or came back) would otherwise look that
/// much faster or slower than identical peers that have been measured, and be planned in
/// or left out for it.
fn speeds_on_one_scale(paper: &[f64], measured: &[Option<f64>]) -> Vec<f64> {
    let mut ratios: Vec<f64> = paper
        .iter()
        .zip(measured)
        .filter_map(|(&p, m)| m.filter(|_| p > 0.0).map(|m| m / p))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let scale = ratios.get(ratios.len() / 2).copied().unwrap_or(1.0);
    paper
        .iter()
        .zip(measured)
        .map(|(&p, m)| m.unwrap_or(p * scale))
        .collect()
}

/// The plan the coordinator would make now.
pub fn plan_now(shared: &Shared) -> std::result::Result<Plan, planner::Shortfall> {
    planner::plan(
        &shared.model().profile,
        &candidates(shared),
        &links::plan_options(shared),
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
    // The last change of membership (or links) already answered by keeping the layout in
    // force: only a newer one switches plans without the calibration's margin.
    let mut answered_change: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shared.cancel().cancelled() => return,
            _ = shared.membership_change() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let Some(desired) = wanted(&shared, served_once) else {
            continue;
        };
        let state = shared.serving();
        match state.pipeline().cloned() {
            Some(cur) if same_layout(&cur.plan, &desired) => {
                answered_change = shared.registry().changed_at;
                unload_strays(&shared, &cur.plan).await
            }
            Some(cur) if !worth_switching(&shared, &cur, &desired, answered_change) => {}
            Some(cur) => {
                if switch(&shared, &cur, desired).await {
                    served_once = true;
                }
            }
            None => {
                // Answers that lost their stage are waiting: say so while loading.
                let status = match state {
                    ServingState::Recovering(_) => ServingState::Recovering,
                    _ => ServingState::Loading,
                };
                if start(&shared, desired, status).await {
                    served_once = true;
                }
            }
        }
    }
}

/// Whether `desired` should replace the plan in force: always after a change of
/// membership (or of the links) not yet answered; when only measured speeds changed, see
/// [`CALIBRATION_MARGIN`].
fn worth_switching(
    shared: &Shared,
    cur: &Pipeline,
    desired: &Plan,
    answered_change: Option<Instant>,
) -> bool {
    let (changed_at, all_measured) = {
        let registry = shared.registry();
        let measured = cur.plan.stages.iter().all(|s| {
            registry
                .workers
                .get(&s.worker)
                .is_some_and(|w| w.measured_ms.is_some())
        });
        (registry.changed_at, measured)
    };
    let since = answered_change.map_or(cur.planned_at, |t| t.max(cur.planned_at));
    if changed_at.is_some_and(|t| t > since) {
        return true;
    }
    if !all_measured || cur.planned_at.elapsed() < CALIBRATION_HOLD {
        return false;
    }
    let options = &links::plan_options(shared);
    let now = planner::estimate(
        &shared.model().profile,
        &cur.plan,
        &candidates(shared),
        options,
    );
    let better = planner::value(desired, options.objective);
    let worth = measurably_better(now, better);
    if worth {
        info!(
            now_ms = now,
            better_ms = better,
            "measured speeds show a faster plan"
        );
    }
    worth
}

/// Whether a plan valued `better` is worth moving to from one valued `now` (both as the
/// measured speeds make them): by [`CALIBRATION_MARGIN`].
fn measurably_better(now: f64, better: f64) -> bool {
    better < now * (1.0 - CALIBRATION_MARGIN)
}

/// The plan to have now, if it is time to have one: `--min-workers` have joined (before
/// the first plan), membership is quiet (or a stage was lost), and the workers can hold
/// the model (else the shortfall is published, unless a plan serves).
fn wanted(shared: &Shared, served_once: bool) -> Option<Plan> {
    let state = shared.serving();
    let serving = state.is_serving();
    let recovering = matches!(state, ServingState::Recovering(_));
    let eligible = candidates(shared).len();
    let min = shared.config().min_workers;
    if !serving && !served_once && eligible < min {
        shared.set_serving(ServingState::Starting(format!(
            "waiting for workers: {eligible} of the {min} asked for with --min-workers have joined"
        )));
        return None;
    }
    let quiet = {
        let changed_at = shared.registry().changed_at;
        changed_at.is_none_or(|t| t.elapsed() >= shared.config().settle)
    };
    // A plan waits (a while) for the links of new workers: they may decide the order.
    let settled = recovering || (quiet && !links::pending(shared));
    if !settled {
        return None;
    }
    match plan_now(shared) {
        Ok(p) => Some(p),
        Err(shortfall) => {
            let known = matches!(&state, ServingState::Shortfall(d) if *d == shortfall.detail);
            if !serving && !known {
                warn!("{shortfall}");
                shared.set_serving(ServingState::Shortfall(shortfall.detail.clone()));
            }
            None
        }
    }
}

/// Nothing serves: apply `plan` and serve, saying what is happening with `loading`.
/// Returns whether it serves.
async fn start(shared: &Arc<Shared>, plan: Plan, loading: fn(String) -> ServingState) -> bool {
    shared.set_serving(loading(format!(
        "loading a plan of {} stage(s)",
        plan.stages.len()
    )));
    match apply(shared, plan).await {
        Ok(p) => {
            shared.set_serving(ServingState::Serving(Arc::new(p)));
            true
        }
        Err(e) => {
            warn!(cause = %e, "could not apply the plan; retrying");
            shared.set_serving(loading(format!("could not apply the plan: {e}")));
            tokio::time::sleep(RETRY).await;
            false
        }
    }
}

/// Serving on `cur`: make `next` before breaking `cur`. Returns whether `next` serves.
async fn switch(shared: &Arc<Shared>, cur: &Arc<Pipeline>, next: Plan) -> bool {
    info!("membership changed: preparing the new plan while the old one serves");
    // The bytes travel first, into the caches; the slices in memory keep serving.
    let prefetches = next.stages.iter().map(|s| {
        let shared = shared.clone();
        let s = s.clone();
        let last = s.head;
        async move {
            let sent = slices::send(&shared, &s.worker, &held_of(&s), s.memory, 0, true).await?;
            if last {
                // Drafts are optional: the plan loads it again, or serves without.
                let _ = slices::send_draft(&shared, &s.worker, 0, true).await;
            }
            Ok::<u64, Error>(sent)
        }
    });
    for r in futures::future::join_all(prefetches).await {
        if let Err(e) = r {
            warn!(cause = %e, "could not prepare the new plan; the old one keeps serving");
            tokio::time::sleep(RETRY).await;
            return false;
        }
    }
    // Between steps: new requests wait, the answers in flight move by replay.
    shared.set_serving(ServingState::Loading("switching to a new plan".into()));
    session::pipeline_moved(shared, cur.epoch);
    start(shared, next, ServingState::Loading).await
}

/// Loads every stage (from the workers' caches where the bytes are there), releases the
/// workers left out, wires the pipeline, and returns it.
async fn apply(shared: &Arc<Shared>, plan: Plan) -> Result<Pipeline> {
    let planned_at = std::time::Instant::now();
    let epoch = shared.next_epoch();
    let describe: Vec<String> = plan
        .stages
        .iter()
        .map(|s| format!("{}: layers {}..{}", s.worker, s.layers.start, s.layers.end))
        .collect();
    info!(epoch, stages = %describe.join(", "), est_ms_per_token = plan.est_ms_per_token, "applying a plan");
    unload_strays(shared, &plan).await;
    let loads = plan.stages.iter().enumerate().map(|(i, s)| {
        let shared = shared.clone();
        let s = s.clone();
        async move {
            let want = held_of(&s);
            let already = shared
                .registry()
                .workers
                .get(&s.worker)
                .is_some_and(|w| w.held.as_ref() == Some(&want));
            if !already {
                slices::send(&shared, &s.worker, &want, s.memory, epoch, false).await?;
            }
            // The last stage drafts, where the draft model is there: after its slice (a
            // new slice unloads the draft model with the old one).
            if s.head {
                give_draft_model(&shared, &s.worker, epoch).await;
            }
            if let Some(w) = shared.registry().workers.get_mut(&s.worker) {
                w.set_held(Some(want));
                w.stage = Some(i);
                w.state = WorkerState::Ready;
            }
            Ok::<(), Error>(())
        }
    });
    for r in futures::future::join_all(loads).await {
        r?;
    }
    let first = slices::wire(shared, &plan, epoch).await?;
    info!(epoch, "serving");
    Ok(Pipeline {
        epoch,
        plan,
        first,
        planned_at,
    })
}

/// Sends the last stage's `worker` the draft model, where it drafts. Drafts are optional:
/// where it cannot take it, it is said, and the answers go on without drafts.
async fn give_draft_model(shared: &Arc<Shared>, worker: &str, epoch: u64) {
    if let Err(e) = slices::send_draft(shared, worker, epoch, false).await {
        warn!(worker, cause = %e, "the last stage could not take the draft model; answers go on without drafts");
        if let Some(w) = shared.registry().workers.get_mut(worker) {
            w.detail = format!("no draft model: {e}");
        }
    }
}

/// Tells the workers that hold a slice outside `plan` to unload it.
async fn unload_strays(shared: &Shared, plan: &Plan) {
    let strays: Vec<_> = {
        let mut registry = shared.registry();
        let in_plan: Vec<&str> = plan.stages.iter().map(|s| s.worker.as_str()).collect();
        registry
            .workers
            .values_mut()
            .filter(|w| {
                !in_plan.contains(&w.profile.id.as_str()) && w.held.is_some() && !w.state.is_dead()
            })
            .map(|w| {
                w.release();
                (w.profile.id.clone(), w.client.clone())
            })
            .collect()
    };
    for (id, mut c) in strays {
        info!(worker = %id, "releasing a worker the plan does not use");
        if let Err(e) = tokio::time::timeout(UNLOAD_TIMEOUT, c.unload(UnloadRequest {})).await {
            warn!(worker = %id, cause = %e, "could not tell a worker to unload");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_not_yet_measured_is_put_on_its_measured_peers_scale() {
        // Two peers measured at 4x and 5x what they claimed on paper: the newcomer that
        // claimed the same as them counts as fast as the median of them.
        let speeds = speeds_on_one_scale(&[1e9, 1e9, 1e9], &[Some(4e9), Some(5e9), None]);
        assert_eq!(speeds, vec![4e9, 5e9, 5e9]);
        // Half as fast on paper: half as fast on the same scale.
        let speeds = speeds_on_one_scale(&[2e9, 1e9], &[Some(6e9), None]);
        assert_eq!(speeds, vec![6e9, 3e9]);
        // Nobody measured yet: paper it is.
        assert_eq!(
            speeds_on_one_scale(&[1e9, 2e9], &[None, None]),
            vec![1e9, 2e9]
        );
    }

    #[test]
    fn only_a_clearly_faster_plan_is_worth_a_move() {
        assert!(measurably_better(100.0, 70.0));
        assert!(!measurably_better(100.0, 80.0), "20% is within the margin");
        assert!(!measurably_better(100.0, 100.0));
        // A stage that was lost prices the plan in force at infinity.
        assert!(measurably_better(f64::INFINITY, 100.0));
    }
}
