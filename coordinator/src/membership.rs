//! Membership: admitting workers that prove the join token, heartbeats that notice a
//! worker that died, dropped off the network or hung (the registry decides; this module
//! asks and acts), mDNS browsing, drain and remove.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_net::api_tls::{ApiConnectInfo, ClusterConnector};
use strata_net::identity::{sanitize_id, worker_name, ClusterCa, COORDINATOR_NAME};
use strata_proto::v1::worker_control_client::WorkerControlClient;
use strata_proto::v1::{
    HealthRequest, HealthResponse, HeldSlice, JoinRequest, JoinResponse, RenewRequest,
    UnloadRequest,
};
use strata_proto::PROTOCOL_VERSION;
use tonic::transport::Channel;
use tonic::Status;
use tracing::{info, warn};

use crate::error::Error;
use crate::metrics::{growth, Metrics};
use crate::registry::{
    Addresses, Health, Held, Refusal, Verdict, Worker, WorkerProfile, COORDINATOR_HOP, HEARTBEAT,
    HEARTBEAT_TIMEOUT,
};
use crate::Shared;

/// A join that was refused: the status the worker gets, and the reason that is logged.
struct Refused {
    status: Status,
}

impl Refused {
    fn new(code: tonic::Code, reason: String) -> Self {
        Refused {
            status: Status::new(code, reason),
        }
    }
}

/// Handles a join request that arrived on an API connection (`conn`): vets it, then
/// admits the worker. Every refusal is logged with where it came from.
pub fn admit(
    shared: &Shared,
    req: JoinRequest,
    conn: Option<ApiConnectInfo>,
) -> Result<JoinResponse, Status> {
    let from = conn
        .and_then(|c| c.remote)
        .map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
    let asked = sanitize_id(req.worker.as_ref().map_or("", |w| w.id.as_str()));
    let admitted =
        vet(shared, &req, conn, &asked).and_then(|key| register(shared, req, conn, &asked, key));
    admitted.map_err(|refused| {
        let reason = refused.status.message().to_string();
        warn!(from = %from, id = %asked, "refused a worker: {reason}");
        shared.registry().refuse(Refusal {
            from,
            id: asked,
            reason,
        });
        refused.status
    })
}

/// Whether a join may be admitted: over TLS, the same protocol, a fresh challenge of ours
/// answered with the token (and used up here, so a replay is refused), not removed;
/// the fingerprint of the key its signing request proves.
fn vet(
    shared: &Shared,
    req: &JoinRequest,
    conn: Option<ApiConnectInfo>,
    asked: &str,
) -> Result<String, Refused> {
    use tonic::Code;
    if !conn.is_some_and(|c| c.tls) {
        return Err(Refused::new(
            Code::FailedPrecondition,
            "a join must come over TLS: run the same strata version on the worker".into(),
        ));
    }
    let info = req.worker.as_ref().ok_or_else(|| {
        Refused::new(
            Code::InvalidArgument,
            "a join request must describe the worker".into(),
        )
    })?;
    if info.protocol_version != PROTOCOL_VERSION {
        return Err(Refused::new(
            Code::FailedPrecondition,
            format!(
                "worker speaks protocol {} and the coordinator {PROTOCOL_VERSION}: run the same strata version on both",
                info.protocol_version
            ),
        ));
    }
    shared
        .check_challenge(&req.challenge)
        .map_err(|e| Refused::new(Code::FailedPrecondition, e.to_string()))?;
    let token = shared.ca().token();
    if !token.verify_join(&req.challenge, &req.csr_der, &req.token_proof) {
        return Err(Refused::new(
            Code::PermissionDenied,
            format!(
                "its join token is not this cluster's (cluster {}); print the right one with `strata token create --state-dir` on the coordinator's machine",
                token.cluster_id()
            ),
        ));
    }
    shared
        .spend_challenge(&req.challenge)
        .map_err(|e| Refused::new(Code::PermissionDenied, e.to_string()))?;
    let key = ClusterCa::request_key_fingerprint(&req.csr_der).map_err(|e| {
        Refused::new(
            Code::InvalidArgument,
            format!("bad certificate signing request: {e}"),
        )
    })?;
    if shared.registry().revoked.contains(&key) {
        return Err(Refused::new(
            Code::PermissionDenied,
            "its key was revoked when it was removed with `strata cluster remove`; a restarted worker has a new key".into(),
        ));
    }
    if shared.registry().removed.contains(asked) {
        return Err(Refused::new(
            Code::PermissionDenied,
            format!("worker `{asked}` was removed with `strata cluster remove`; restart the coordinator or join with another --id"),
        ));
    }
    Ok(key)
}

/// Certifies a vetted worker and puts it in the registry (a rejoin replaces its entry).
fn register(
    shared: &Shared,
    req: JoinRequest,
    conn: Option<ApiConnectInfo>,
    asked: &str,
    fingerprint: String,
) -> Result<JoinResponse, Refused> {
    use tonic::Code;
    let bad_request = |e: strata_net::Error| {
        Refused::new(
            Code::InvalidArgument,
            format!("bad certificate signing request: {e}"),
        )
    };
    let (Some(remote), Some(local)) = (conn.and_then(|c| c.remote), conn.and_then(|c| c.local))
    else {
        return Err(Refused::new(
            Code::FailedPrecondition,
            "cannot tell where the worker is".into(),
        ));
    };
    let info = req.worker.unwrap_or_default();
    // Who the worker is across joins: the key it proved it holds (`fingerprint`), not
    // what it says.
    let mut registry = shared.registry();
    let id = registry.free_id(asked, &fingerprint);
    let cert = shared
        .ca()
        .sign_request(
            &req.csr_der,
            &worker_name(&id),
            shared.config().cert_lifetime,
        )
        .map_err(bad_request)?;
    let control_addr = SocketAddr::new(remote.ip(), info.control_port as u16);
    let channel =
        control_channel(shared, &id, control_addr).map_err(|e| Refused::new(Code::Internal, e))?;
    let profile = WorkerProfile {
        id: id.clone(),
        hostname: info.hostname,
        device: info.device,
        memory_budget: info.memory_budget,
        speed: info.speed_bytes_per_second,
        version: info.version,
        key_fingerprint: fingerprint,
        addresses: info.addresses,
        energy_meter: info.energy_meter,
    };
    info!(
        id = %id,
        from = %remote,
        budget_mib = profile.memory_budget >> 20,
        speed_gb_s = profile.speed / 1e9,
        "admitted a worker"
    );
    let held = req
        .held
        .as_ref()
        .and_then(|h| held(h, &shared.model().digest));
    // Where it joins from now may not be where it was: its links are measured anew.
    registry.links.forget(&id);
    registry.workers.insert(
        id.clone(),
        Worker::admitted(
            profile,
            asked,
            WorkerControlClient::new(channel),
            Addresses {
                control: control_addr,
                data: SocketAddr::new(remote.ip(), info.data_port as u16),
                coordinator_ip: local.ip(),
            },
            held,
            req.csr_der.clone(),
        ),
    );
    registry.changed_at = Some(Instant::now());
    drop(registry);
    shared.membership_changed();
    let token = shared.ca().token();
    Ok(JoinResponse {
        assigned_id: id,
        admit_proof: token.admit_proof(&req.challenge, &cert),
        certificate_der: cert.to_vec(),
        ca_certificate_der: shared.ca().cert_der().to_vec(),
        cluster_id: token.cluster_id().to_string(),
        coordinator_certificate_der: shared.identity().cert_der().to_vec(),
    })
}

/// A lazy channel to worker `id`'s control service at `addr`: mutual TLS of our own
/// making, so the coordinator's renewed certificate reaches every new connection.
fn control_channel(shared: &Shared, id: &str, addr: SocketAddr) -> Result<Channel, String> {
    let connector =
        ClusterConnector::mutual(shared.identity(), &worker_name(id)).map_err(|e| e.to_string())?;
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(HEARTBEAT_TIMEOUT)
            .connect_with_connector_lazy(connector),
    )
}

/// Asks every worker how it is, forever. A worker that failed (silent, or hung) takes its
/// pipeline down: the answers on it wait for the next plan and resume there.
pub async fn heartbeats(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.cancel().cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        let clients: Vec<(String, WorkerControlClient<Channel>)> = shared
            .registry()
            .workers
            .iter()
            // Dead workers are still asked: one that was only unreachable for a while
            // (a pulled cable put back, a machine too busy to answer) comes back.
            .map(|(id, w)| (id.clone(), w.client.clone()))
            .collect();
        let calls = clients.into_iter().map(|(id, mut client)| async move {
            let r = tokio::time::timeout(HEARTBEAT_TIMEOUT, client.health(HealthRequest {})).await;
            (id, r)
        });
        let results = futures::future::join_all(calls).await;
        let mut died = Vec::new();
        let mut revived = false;
        {
            let mut registry = shared.registry();
            let now = Instant::now();
            for (id, result) in results {
                let Some(w) = registry.workers.get_mut(&id) else {
                    continue;
                };
                let answer = match result {
                    Ok(Ok(h)) => Ok(health(h.into_inner(), &shared.model().digest)),
                    Ok(Err(s)) => Err(format!("heartbeat failed: {}", s.message())),
                    Err(_) => Err("heartbeat timed out".into()),
                };
                if let Ok(h) = &answer {
                    count_work(shared.metrics(), &id, &w.health, h);
                }
                match w.heartbeat(answer, now) {
                    Verdict::Unchanged => {}
                    Verdict::Revived => {
                        info!(id = %id, "a dead worker answers again; it can be planned anew");
                        revived = true;
                    }
                    Verdict::Failed(reason) => {
                        warn!("{reason}");
                        died.push((id.clone(), reason));
                    }
                }
            }
            for (id, reason) in registry.broken_links() {
                if let Some(w) = registry.workers.get_mut(&id) {
                    if let Verdict::Failed(reason) = w.fail_link(reason, now) {
                        warn!("{reason}");
                        died.push((id, reason));
                    }
                }
            }
            if !died.is_empty() || revived {
                registry.changed_at = Some(now);
            }
        }
        if revived {
            shared.membership_changed();
        }
        for (id, reason) in died {
            crate::session::stage_lost(&shared, &id, &reason);
            shared.membership_changed();
        }
    }
}

/// Renews certificates before half their lifetime is gone: the coordinator's own, and
/// every worker's that answers (one that does not is retried; if it never does, its
/// certificate ends and no new connection takes it).
pub async fn renewals(shared: Arc<Shared>) {
    let lifetime = shared.config().cert_lifetime;
    let every = (lifetime / 20).clamp(Duration::from_millis(200), Duration::from_secs(60));
    let mut own_issued = Instant::now();
    loop {
        tokio::select! {
            _ = shared.cancel().cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = Instant::now();
        if now.duration_since(own_issued) >= lifetime / 2 {
            let renewed = shared
                .ca()
                .reissue(shared.identity(), lifetime)
                .and_then(|cert| shared.identity().renew(cert.to_vec()));
            match renewed {
                Ok(()) => {
                    own_issued = now;
                    info!("renewed the coordinator's certificate");
                }
                Err(e) => warn!(cause = %e, "could not renew the coordinator's certificate"),
            }
        }
        let due: Vec<(String, WorkerControlClient<Channel>, Vec<u8>)> = shared
            .registry()
            .workers
            .iter()
            .filter(|(_, w)| {
                !w.state.is_dead() && now.duration_since(w.certificate.1) >= lifetime / 2
            })
            .map(|(id, w)| (id.clone(), w.client.clone(), w.certificate.0.clone()))
            .collect();
        for (id, mut client, csr) in due {
            let cert = match shared.ca().sign_request(&csr, &worker_name(&id), lifetime) {
                Ok(c) => c,
                Err(e) => {
                    warn!(id = %id, cause = %e, "could not renew a worker's certificate");
                    continue;
                }
            };
            let call = client.renew(RenewRequest {
                certificate_der: cert.to_vec(),
            });
            match tokio::time::timeout(HEARTBEAT_TIMEOUT, call).await {
                Ok(Ok(_)) => {
                    if let Some(w) = shared.registry().workers.get_mut(&id) {
                        w.certificate.1 = now;
                    }
                    info!(id = %id, "renewed a worker's certificate");
                }
                Ok(Err(s)) => {
                    warn!(id = %id, cause = %s.message(), "a worker did not take its renewed certificate")
                }
                Err(_) => warn!(id = %id, "renewing a worker's certificate timed out"),
            }
        }
    }
}

/// A slice a worker reports, if it is of the served model.
fn held(h: &HeldSlice, digest: &str) -> Option<Held> {
    (h.model_digest == digest && h.layer_end > h.layer_start).then_some(Held {
        layers: h.layer_start as usize..h.layer_end as usize,
        embed: h.embed,
        head: h.head,
    })
}

/// A heartbeat's answer in the registry's terms (the control plane's edge).
fn health(h: HealthResponse, digest: &str) -> Health {
    Health {
        held: h.held.as_ref().and_then(|s| held(s, digest)),
        bytes_received: h.bytes_received,
        decode_seconds: h.decode_seconds,
        decode_forwards: h.decode_forwards,
        holds_draft: !h.draft_model_digest.is_empty(),
        unreachable_hop: match h.unreachable_next_hop.as_str() {
            "" => None,
            COORDINATOR_NAME => Some(COORDINATOR_HOP.to_string()),
            name => Some(
                name.strip_suffix(".worker.strata")
                    .unwrap_or(name)
                    .to_string(),
            ),
        },
        resident: h.resident_bytes,
        peak: h.peak_resident_bytes,
        sequences: h.sequences,
        error: h.error,
        stalled: Duration::from_millis(h.stalled_ms),
        compute_seconds: h.compute_seconds,
        network_seconds: h.network_seconds,
        forwards: h.forwards,
    }
}

/// Adds what a worker measured since its last heartbeat to the metrics.
fn count_work(m: &Metrics, id: &str, before: &Health, now: &Health) {
    m.stage_compute
        .with_label_values(&[id])
        .inc_by(growth(now.compute_seconds, before.compute_seconds));
    m.stage_network
        .with_label_values(&[id])
        .inc_by(growth(now.network_seconds, before.network_seconds));
    m.stage_forwards
        .with_label_values(&[id])
        .inc_by(growth(now.forwards as f64, before.forwards as f64) as u64);
}

/// Records every Strata node mDNS shows, for the status.
pub async fn browse(shared: Arc<Shared>) {
    let mut seen = match strata_net::discovery::browse(shared.cancel().child_token()) {
        Ok(s) => s,
        Err(e) => {
            warn!(cause = %e, "cannot browse mDNS; workers must join with --coordinator");
            return;
        }
    };
    while let Some(s) = seen.recv().await {
        if s.get("role") == Some("worker") {
            info!(instance = %s.instance, addresses = ?s.addresses, "saw a worker over mDNS");
        }
        let mut registry = shared.registry();
        // A LAN host can announce any number of names: keep the status's list bounded
        // (a name already listed is updated; past the bound, new ones are not listed).
        if registry.seen.len() < MAX_SEEN || registry.seen.contains_key(&s.instance) {
            registry.seen.insert(s.instance.clone(), s);
        }
    }
}

/// Most mDNS instances the status lists.
const MAX_SEEN: usize = 1024;

/// Stops giving `id` new work; the reconciler re-plans without it once its sequences end.
pub fn drain(shared: &Shared, id: &str) -> Result<String, Error> {
    let mut registry = shared.registry();
    let w = registry
        .workers
        .get_mut(id)
        .ok_or_else(|| Error::NoSuchWorker(id.to_string()))?;
    w.drain();
    registry.changed_at = Some(Instant::now());
    drop(registry);
    shared.membership_changed();
    info!(id, "draining");
    Ok(format!(
        "draining {id}: new requests wait for a plan without it, which starts as soon as its in-flight sequences finish; it is then released"
    ))
}

/// Drops `id` at once: fails its sequences, unloads it, forgets it.
pub async fn remove(shared: &Shared, id: &str) -> Result<String, Error> {
    let w = shared
        .registry()
        .workers
        .remove(id)
        .ok_or_else(|| Error::NoSuchWorker(id.to_string()))?;
    // Its key is revoked: its certificate is refused on the data plane at once, and a
    // join with that key (under any id) is refused.
    shared.revoke_sender(&w.profile.key_fingerprint);
    {
        let mut registry = shared.registry();
        registry.removed.insert(w.requested_id.clone());
        registry.revoked.insert(w.profile.key_fingerprint.clone());
        registry.links.forget(id);
        registry.changed_at = Some(Instant::now());
    }
    crate::session::stage_lost(
        shared,
        id,
        &format!("worker {id} was removed by an operator"),
    );
    let mut client = w.client.clone();
    let _ = tokio::time::timeout(HEARTBEAT_TIMEOUT, client.unload(UnloadRequest {})).await;
    shared.membership_changed();
    info!(id, "removed");
    Ok(format!(
        "removed {id}; its slice is unloaded and the cluster re-plans without it"
    ))
}
