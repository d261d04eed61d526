//! What every task of the coordinator shares. Its fields are private: read-only parts are
//! reached through accessors, and the few things that change (the serving state, the
//! members, the plan epoch) change through methods that say what happened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use strata_net::identity::{ClusterCa, Identity};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::admission::Gate;
use crate::challenge::{ChallengeRefusal, Challenges};
use crate::metrics::Metrics;
use crate::operator::{Guard, Refusal};
use crate::registry::Registry;
use crate::routing::RoutingPolicy;
use crate::serving::ServingState;
use crate::session::{Outbound, Sessions};
use crate::upstream::Upstream;
use crate::{CoordinatorConfig, ServedModel};

/// State shared by every task of the coordinator.
pub struct Shared {
    config: CoordinatorConfig,
    model: ServedModel,
    ca: ClusterCa,
    identity: Identity,
    endpoint: quinn::Endpoint,
    data_port: u16,
    registry: Mutex<Registry>,
    changed: Notify,
    serving: watch::Sender<ServingState>,
    epoch: AtomicU64,
    sessions: Sessions,
    outbox: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
    metrics: Metrics,
    gate: Arc<Gate>,
    operator: Mutex<Guard>,
    challenges: Mutex<Challenges>,
    token_senders: Mutex<TokenSenders>,
    upstream: Option<Upstream>,
    routing: RoutingPolicy,
}

/// The parts [`Shared::new`] is built from.
pub struct Parts {
    /// The config.
    pub config: CoordinatorConfig,
    /// The served model.
    pub model: ServedModel,
    /// The cluster CA.
    pub ca: ClusterCa,
    /// The coordinator's own certificate.
    pub identity: Identity,
    /// The QUIC endpoint (to stage 0, from the last stage).
    pub endpoint: quinn::Endpoint,
    /// Its UDP port.
    pub data_port: u16,
    /// Sequences' next steps, batched into frames to stage 0.
    pub outbox: mpsc::Sender<Outbound>,
    /// Shutdown.
    pub cancel: CancellationToken,
    /// 32 random bytes: the key of this process's join challenges.
    pub challenge_seed: [u8; 32],
    /// The hybrid route's upstream API, when configured.
    pub upstream: Option<Upstream>,
}

impl Shared {
    /// Shared state that is not serving yet.
    pub fn new(p: Parts) -> Self {
        let waiting = format!("waiting for {} worker(s) to join", p.config.min_workers);
        let (serving, _) = watch::channel(ServingState::Starting(waiting));
        let gate = Gate::new(
            usize::try_from(p.config.plan.kv_tokens).unwrap_or(usize::MAX),
            p.config.max_queue,
        );
        let operator = Mutex::new(Guard::new(p.ca.token().operator_key()));
        let routing = RoutingPolicy {
            upstream: p.upstream.is_some(),
            overflow: p.config.upstream.as_ref().is_some_and(|u| u.overflow),
            private_only: p.config.private_only,
        };
        Shared {
            upstream: p.upstream,
            routing,
            operator,
            challenges: Mutex::new(Challenges::new(p.challenge_seed)),
            token_senders: Mutex::new(TokenSenders::default()),
            config: p.config,
            model: p.model,
            ca: p.ca,
            identity: p.identity,
            endpoint: p.endpoint,
            data_port: p.data_port,
            registry: Mutex::new(Registry::default()),
            changed: Notify::new(),
            serving,
            epoch: AtomicU64::new(0),
            sessions: Sessions::default(),
            outbox: p.outbox,
            gate,
            cancel: p.cancel,
            metrics: Metrics::new(),
        }
    }

    /// The hybrid route's upstream API, when configured.
    pub fn upstream(&self) -> Option<&Upstream> {
        self.upstream.as_ref()
    }

    /// Where requests may go.
    pub fn routing(&self) -> &RoutingPolicy {
        &self.routing
    }

    /// The config.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The served model.
    pub fn model(&self) -> &ServedModel {
        &self.model
    }

    /// The cluster CA.
    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// The coordinator's own certificate.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The QUIC endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The QUIC endpoint's UDP port.
    pub fn data_port(&self) -> u16 {
        self.data_port
    }

    /// Live sequences.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Where sequences hand their steps to the batcher.
    pub fn outbox(&self) -> &mpsc::Sender<Outbound> {
        &self.outbox
    }

    /// Shutdown.
    pub fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Admission: the KV budget's reservations and the queue.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Prometheus metrics and recent requests.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Locks the registry. A poisoned lock means a task panicked while holding it; the
    /// data is plain bookkeeping, so carry on with it.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Membership changed: the reconciler looks again.
    pub fn membership_changed(&self) {
        self.changed.notify_one();
    }

    /// Waits until membership changes (or a nudge).
    pub async fn membership_change(&self) {
        self.changed.notified().await
    }

    /// The serving state now.
    pub fn serving(&self) -> ServingState {
        self.serving.borrow().clone()
    }

    /// Follows the serving state.
    pub fn watch_serving(&self) -> watch::Receiver<ServingState> {
        self.serving.subscribe()
    }

    /// Publishes a new serving state.
    pub fn set_serving(&self, state: ServingState) {
        self.serving.send_replace(state);
    }

    /// Publishes a new serving state unless serving now: a reason not to serve never
    /// replaces a pipeline that serves.
    pub fn set_not_serving_reason(&self, state: ServingState) {
        self.serving.send_if_modified(|s| {
            if s.is_serving() {
                return false;
            }
            *s = state;
            true
        });
    }

    /// The epoch of the next plan.
    pub fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether an `authorization` header value passes the optional API key.
    pub fn authorized(&self, header: Option<&str>) -> bool {
        match &self.config.api_key {
            None => true,
            Some(key) => header
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| same_key(given, key)),
        }
    }

    /// Whether a cluster change carries a fresh, unused operator signature (`header`).
    pub fn check_change(
        &self,
        call: &strata_net::operator::Call<'_>,
        header: Option<&str>,
    ) -> Result<(), Refusal> {
        self.operator
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .check(call, header, unix_ms())
    }

    /// A fresh join challenge (from 16 random bytes `nonce`).
    pub fn issue_challenge(&self, nonce: [u8; 16]) -> Vec<u8> {
        self.challenges().issue(unix_ms(), nonce)
    }

    /// Whether `challenge` is this process's and fresh.
    pub fn check_challenge(&self, challenge: &[u8]) -> Result<(), ChallengeRefusal> {
        self.challenges().check(challenge, unix_ms())
    }

    /// Uses `challenge` up: a second join that answers it is a replay.
    pub fn spend_challenge(&self, challenge: &[u8]) -> Result<(), ChallengeRefusal> {
        self.challenges().spend(challenge, unix_ms())
    }

    /// Plan `epoch`'s last stage holds key `key`: tokens of that epoch come from it alone.
    pub fn expect_tokens_from(&self, epoch: u64, key: String) {
        self.token_senders().planned(epoch, key);
    }

    /// Whether the data plane takes `frame` from the holder of key `from`.
    pub fn takes_frame(&self, from: &str, frame: &strata_net::frame::Frame) -> Result<(), String> {
        match frame {
            strata_net::frame::Frame::Tokens { epoch, .. } => {
                self.token_senders().allows(from, *epoch)
            }
            _ => Err("only tokens come to the coordinator".into()),
        }
    }

    /// A removed worker's key sends nothing more.
    pub fn revoke_sender(&self, key: &str) {
        self.token_senders().revoke(key);
    }

    fn token_senders(&self) -> MutexGuard<'_, TokenSenders> {
        self.token_senders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn challenges(&self) -> MutexGuard<'_, Challenges> {
        self.challenges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `/metrics` answers without the API key (`--open-metrics`).
    pub fn metrics_open(&self) -> bool {
        self.config.open_metrics
    }
}

/// Who may send the coordinator tokens: the last stage of each recent plan, in that
/// plan's epoch. A few plans are kept, so tokens already on their way when a plan was
/// replaced still arrive (their sessions judge them stale).
#[derive(Debug, Default)]
struct TokenSenders {
    /// `(epoch, key fingerprint)`, newest last.
    planned: std::collections::VecDeque<(u64, String)>,
}

/// Plans whose last stage may still send tokens.
const TOKEN_SENDER_PLANS: usize = 4;

impl TokenSenders {
    fn planned(&mut self, epoch: u64, key: String) {
        self.planned.retain(|(e, _)| *e != epoch);
        self.planned.push_back((epoch, key));
        while self.planned.len() > TOKEN_SENDER_PLANS {
            self.planned.pop_front();
        }
    }

    fn allows(&self, from: &str, epoch: u64) -> Result<(), String> {
        if self.planned.iter().any(|(e, k)| *e == epoch && k == from) {
            Ok(())
        } else {
            Err(format!(
                "the sender is not the last stage of plan epoch {epoch}: only that stage sends tokens"
            ))
        }
    }

    fn revoke(&mut self, key: &str) {
        self.planned.retain(|(_, k)| k != key);
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Compares a key a client gave with the configured one in constant time: their SHA-256
/// digests, so neither the bytes nor the length that match leak through timing.
fn same_key(given: &str, key: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(key.as_bytes()))
        .into()
}
