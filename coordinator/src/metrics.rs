//! What `/metrics` reports, in Prometheus' text format, through the `prometheus` crate (the
//! long-standing Rust client, also used by TiKV): request outcomes, tokens in and out, time
//! to first token, per-stage compute and network time, workers by state, memory. Counters
//! that the coordinator sees happen (requests, tokens) are counted as they happen; what the
//! workers measure arrives with their heartbeats and is added as the difference from the
//! last heartbeat; gauges are read from the registry when scraped.
//!
//! It also keeps the last few requests for the dashboard.

use std::collections::VecDeque;
use std::sync::Mutex;

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Serialize;

/// Requests kept for the dashboard.
const RECENT: usize = 20;

/// One finished request, as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// Request id (as in the logs).
    pub id: String,
    /// When it started, in Unix milliseconds.
    pub started_unix_ms: u64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Time to the first token, milliseconds (0 when there was none).
    pub time_to_first_token_ms: f64,
    /// Decode speed after the first token.
    pub tokens_per_second: f64,
    /// `stop`, `length`, `cancelled` or `failed`.
    pub outcome: String,
    /// Draft tokens sent to be verified (0 without speculative decoding).
    pub draft_tokens: usize,
    /// Of those, the accepted ones.
    pub accepted_draft_tokens: usize,
    /// Passes through the pipeline that gave tokens.
    pub passes: usize,
    /// Who answered: `local` (the cluster) or `upstream` (the hybrid route's API; its
    /// token counts are not known here, and its outcome is its HTTP status).
    pub route: &'static str,
}

/// The coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Finished requests by outcome.
    pub requests: IntCounterVec,
    /// Prompt tokens accepted.
    pub prompt_tokens: IntCounter,
    /// Tokens generated.
    pub generated_tokens: IntCounter,
    /// Draft tokens sent to be verified.
    pub draft_tokens: IntCounter,
    /// Draft tokens the model accepted.
    pub accepted_draft_tokens: IntCounter,
    /// Passes through the pipeline that gave tokens.
    pub passes: IntCounter,
    /// Time to first token.
    pub time_to_first_token: Histogram,
    /// Seconds each worker's stage spent computing.
    pub stage_compute: CounterVec,
    /// Seconds each worker's stage spent sending to the next hop.
    pub stage_network: CounterVec,
    /// Batched forwards per worker.
    pub stage_forwards: IntCounterVec,
    /// Workers by state.
    pub workers: IntGaugeVec,
    /// Each worker's resident memory.
    pub worker_resident: IntGaugeVec,
    /// Each worker's memory budget.
    pub worker_budget: IntGaugeVec,
    /// The coordinator's own resident memory.
    pub coordinator_resident: IntGauge,
    /// Sequences being generated.
    pub active_sequences: IntGauge,
    /// Model layers per stage of the plan in force.
    pub stage_layers: IntGaugeVec,
    /// Bytes of weights sent to workers (what their slice caches lacked).
    pub slice_bytes_sent: IntCounter,
    /// Answers replayed onto another pipeline.
    pub replays: IntCounter,
    /// Answers paused, their caches given to others, because their client stopped reading.
    pub preemptions: IntCounter,
    /// For an answer that moved to another pipeline: its pause, from its last token
    /// before to its first after.
    pub resume_pause: Histogram,
    /// Requests refused before they started, by why.
    pub refused: IntCounterVec,
    /// Requests waiting for room in the KV cache.
    pub queue_depth: IntGauge,
    /// KV positions reserved by running requests, and the positions each stage holds.
    pub kv_positions: IntGaugeVec,
    /// HTTP completion requests by who answered them (local, upstream) and why.
    pub routed: IntCounterVec,
    recent: Mutex<VecDeque<RequestRecord>>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // The names and labels below are constants; a failure here is a programming error
    // caught by the unit test, never input.
    r.expect("metric definitions are valid")
}

/// Registers a new metric and hands it back.
fn add<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    let metric = must(metric);
    must(registry.register(Box::new(metric.clone())));
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = add(&registry, IntCounterVec::new(
            Opts::new(
                "strata_requests_total",
                "Finished generation requests (gRPC and HTTP) by outcome: stop, length, cancelled, failed",
            ),
            &["outcome"],
        ));
        let prompt_tokens = add(
            &registry,
            IntCounter::new(
                "strata_prompt_tokens_total",
                "Prompt tokens of accepted requests",
            ),
        );
        let generated_tokens = add(
            &registry,
            IntCounter::new("strata_generated_tokens_total", "Tokens generated"),
        );
        let time_to_first_token = add(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "strata_time_to_first_token_seconds",
                    "From a request's arrival to its first generated token",
                )
                .buckets(vec![
                    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
            ),
        );
        let stage_compute = add(
            &registry,
            CounterVec::new(
                Opts::new(
                    "strata_stage_compute_seconds_total",
                    "Seconds a worker's stage spent in forwards and sampling",
                ),
                &["worker"],
            ),
        );
        let stage_network = add(
            &registry,
            CounterVec::new(
                Opts::new(
                    "strata_stage_network_seconds_total",
                    "Seconds a worker's stage spent sending frames to the next hop",
                ),
                &["worker"],
            ),
        );
        let stage_forwards = add(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "strata_stage_forwards_total",
                    "Batched forwards a worker's stage ran",
                ),
                &["worker"],
            ),
        );
        let workers = add(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "strata_workers",
                    "Workers known to the coordinator, by state",
                ),
                &["state"],
            ),
        );
        let worker_resident = add(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "strata_worker_resident_bytes",
                    "A worker's resident memory at its last heartbeat",
                ),
                &["worker"],
            ),
        );
        let worker_budget = add(
            &registry,
            IntGaugeVec::new(
                Opts::new("strata_worker_budget_bytes", "A worker's memory budget"),
                &["worker"],
            ),
        );
        let coordinator_resident = add(
            &registry,
            IntGauge::new(
                "strata_coordinator_resident_bytes",
                "The coordinator's resident memory",
            ),
        );
        let active_sequences = add(
            &registry,
            IntGauge::new("strata_active_sequences", "Sequences being generated now"),
        );
        let stage_layers = add(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "strata_stage_layers",
                    "Model layers each stage of the plan in force holds",
                ),
                &["stage", "worker"],
            ),
        );
        let slice_bytes_sent = add(
            &registry,
            IntCounter::new(
                "strata_slice_bytes_sent_total",
                "Bytes of weights sent to workers: what their slice caches lacked",
            ),
        );
        let draft_tokens = add(
            &registry,
            IntCounter::new(
                "strata_draft_tokens_total",
                "Draft tokens sent to be verified (speculative decoding)",
            ),
        );
        let accepted_draft_tokens = add(
            &registry,
            IntCounter::new(
                "strata_draft_tokens_accepted_total",
                "Draft tokens the model accepted: over strata_draft_tokens_total, the \
                 acceptance rate",
            ),
        );
        let passes = add(
            &registry,
            IntCounter::new(
                "strata_decode_passes_total",
                "Passes through the pipeline that gave tokens: strata_generated_tokens_total \
                 over this is the tokens per pass",
            ),
        );
        let replays = add(
            &registry,
            IntCounter::new(
                "strata_replays_total",
                "Answers replayed onto another pipeline, after a lost stage or a re-plan",
            ),
        );
        let preemptions = add(
            &registry,
            IntCounter::new(
                "strata_preemptions_total",
                "Answers whose client stopped reading while others waited for KV-cache room: \
                 their caches were freed, to be replayed when the client reads again",
            ),
        );
        let resume_pause = add(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "strata_resume_pause_seconds",
                    "For an answer that moved to another pipeline: from its last token before to its first after",
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0]),
            ),
        );
        let refused = add(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "strata_requests_refused_total",
                    "Requests refused before they started, by why: busy (the queue was full, 429)",
                ),
                &["reason"],
            ),
        );
        let queue_depth = add(
            &registry,
            IntGauge::new(
                "strata_queue_depth",
                "Requests waiting for room in the KV cache",
            ),
        );
        let kv_positions = add(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "strata_kv_positions",
                    "KV-cache positions: reserved by running requests, and the capacity each stage holds",
                ),
                &["kind"],
            ),
        );
        let routed = add(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "strata_routed_requests_total",
                    "HTTP completion requests by where they were answered: route local (the cluster) or upstream (the hybrid route's API, off the LAN); reason model (the model asked for), overflow (the cluster would have refused it) or private (it would have overflowed, and stayed)",
                ),
                &["route", "reason"],
            ),
        );
        Metrics {
            registry,
            routed,
            refused,
            queue_depth,
            kv_positions,
            slice_bytes_sent,
            replays,
            preemptions,
            resume_pause,
            requests,
            prompt_tokens,
            generated_tokens,
            draft_tokens,
            accepted_draft_tokens,
            passes,
            time_to_first_token,
            stage_compute,
            stage_network,
            stage_forwards,
            workers,
            worker_resident,
            worker_budget,
            coordinator_resident,
            active_sequences,
            stage_layers,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// Records a finished request.
    pub fn finished(&self, record: RequestRecord) {
        self.requests.with_label_values(&[&record.outcome]).inc();
        self.draft_tokens.inc_by(record.draft_tokens as u64);
        self.accepted_draft_tokens
            .inc_by(record.accepted_draft_tokens as u64);
        self.passes.inc_by(record.passes as u64);
        self.remember(record);
    }

    /// Counts a request routed to `route` for `reason`.
    pub fn route(&self, route: &'static str, reason: crate::routing::Reason) {
        self.routed
            .with_label_values(&[route, reason.label()])
            .inc();
    }

    /// Requests answered by each route, for the dashboard: (local, upstream).
    pub fn routed_totals(&self) -> (u64, u64) {
        let sum = |route: &str| {
            [
                crate::routing::Reason::Model,
                crate::routing::Reason::Overflow,
                crate::routing::Reason::Private,
            ]
            .iter()
            .map(|r| self.routed.with_label_values(&[route, r.label()]).get())
            .sum()
        };
        (sum("local"), sum("upstream"))
    }

    /// Lists a request the upstream answered among the recent ones (it is counted in
    /// `routed`, not in the cluster's request outcomes).
    pub fn answered_upstream(&self, record: RequestRecord) {
        self.remember(record);
    }

    fn remember(&self, record: RequestRecord) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// The last requests, newest first.
    pub fn recent(&self) -> Vec<RequestRecord> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().rev().cloned().collect()
    }

    /// The text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(cause = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Adds what a monotonically growing total grew by since `last` (a total that shrank
/// means the worker restarted: all of it is new).
pub fn growth(now: f64, last: f64) -> f64 {
    if now >= last {
        now - last
    } else {
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_every_family() {
        let m = Metrics::new();
        m.prompt_tokens.inc_by(7);
        m.generated_tokens.inc_by(3);
        m.time_to_first_token.observe(0.2);
        m.stage_compute.with_label_values(&["w1"]).inc_by(1.5);
        m.workers.with_label_values(&["ready"]).set(3);
        m.finished(RequestRecord {
            id: "req-1".into(),
            started_unix_ms: 0,
            prompt_tokens: 7,
            completion_tokens: 3,
            time_to_first_token_ms: 200.0,
            tokens_per_second: 10.0,
            outcome: "stop".into(),
            draft_tokens: 4,
            accepted_draft_tokens: 1,
            passes: 2,
            route: "local",
        });
        m.route("upstream", crate::routing::Reason::Overflow);
        let text = m.render();
        for line in [
            "strata_prompt_tokens_total 7",
            "strata_generated_tokens_total 3",
            "strata_requests_total{outcome=\"stop\"} 1",
            "strata_draft_tokens_total 4",
            "strata_draft_tokens_accepted_total 1",
            "strata_decode_passes_total 2",
            "strata_routed_requests_total{reason=\"overflow\",route=\"upstream\"} 1",
            "strata_stage_compute_seconds_total{worker=\"w1\"} 1.5",
            "strata_workers{state=\"ready\"} 3",
            "strata_time_to_first_token_seconds_count 1",
            "# TYPE strata_time_to_first_token_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.recent()[0].id, "req-1");
        assert_eq!(m.routed_totals(), (0, 1));
    }

    #[test]
    fn growth_survives_a_restarted_worker() {
        assert_eq!(growth(5.0, 3.0), 2.0);
        assert_eq!(growth(1.0, 3.0), 1.0);
    }
}
