//! "Are we serving?": one [`ServingState`], published in a `watch` channel. The
//! reconciler and membership write it; requests, sessions and the APIs read it. A serving
//! state carries its [`Pipeline`], so a reader never sees a pipeline and a reason that
//! disagree.

use std::sync::Arc;

use crate::planner::Plan;

/// A wired pipeline: its plan and the connection to its first stage.
#[derive(Debug)]
pub struct Pipeline {
    /// Plan epoch.
    pub epoch: u64,
    /// The plan.
    pub plan: Plan,
    /// Connection to stage 0.
    pub first: quinn::Connection,
    /// When it was planned: membership changes after this call for a new plan.
    pub planned_at: std::time::Instant,
}

impl Pipeline {
    /// Whether `worker` holds a stage of it.
    pub fn uses(&self, worker: &str) -> bool {
        self.plan.stages.iter().any(|s| s.worker == worker)
    }

    /// The worker of stage 0.
    pub fn first_worker(&self) -> &str {
        self.plan.stages.first().map_or("", |s| s.worker.as_str())
    }
}

/// Whether the cluster serves, and if not, why.
#[derive(Debug, Clone)]
pub enum ServingState {
    /// Before the first plan: waiting for workers (`--min-workers`).
    Starting(String),
    /// Loading a plan's slices into the workers.
    Loading(String),
    /// Serving on this pipeline.
    Serving(Arc<Pipeline>),
    /// The pipeline lost a stage; a new plan is on its way, and the answers in flight wait
    /// for it.
    Recovering(String),
    /// The workers cannot hold the model: what is missing.
    Shortfall(String),
}

impl ServingState {
    /// The pipeline, when serving.
    pub fn pipeline(&self) -> Option<&Arc<Pipeline>> {
        match self {
            ServingState::Serving(p) => Some(p),
            _ => None,
        }
    }

    /// Whether requests run now.
    pub fn is_serving(&self) -> bool {
        self.pipeline().is_some()
    }

    /// Why it is not serving (empty when it is).
    pub fn detail(&self) -> String {
        match self {
            ServingState::Serving(_) => String::new(),
            ServingState::Starting(d)
            | ServingState::Loading(d)
            | ServingState::Recovering(d)
            | ServingState::Shortfall(d) => d.clone(),
        }
    }

    /// Its word, for logs and the dashboard.
    pub fn name(&self) -> &'static str {
        match self {
            ServingState::Starting(_) => "starting",
            ServingState::Loading(_) => "loading",
            ServingState::Serving(_) => "serving",
            ServingState::Recovering(_) => "recovering",
            ServingState::Shortfall(_) => "shortfall",
        }
    }
}
