//! Joining a cluster: finding the coordinator (by `--coordinator`, or over mDNS for this
//! cluster's id) and proving the join token to it, over TLS pinned to the token's CA and
//! bound to a fresh challenge, which answers with this worker's certificate. Each join is
//! bounded by a deadline: a coordinator that does not answer is retried, never waited on
//! forever.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use strata_net::api_tls::{self, ClusterConnector};
use strata_net::discovery;
use strata_net::identity::{self, Identity, JoinToken, PendingKey};
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::{HeldSlice, JoinChallengeRequest, JoinRequest, WorkerInfo};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::WorkerConfig;

/// How long one join may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What an admitted worker got from the coordinator.
pub struct Admission {
    /// Its certificate and key.
    pub identity: Identity,
    /// The only certificate allowed to control it.
    pub coordinator_cert: rustls_pki_types::CertificateDer<'static>,
    /// The id the coordinator gave it.
    pub id: String,
}

/// The coordinator's address: `--coordinator`, or the first this cluster's mDNS records
/// name that is not passed over in `skip` (addresses that failed lately, and until when).
/// An address seen while passed over is taken once its time is up: a browser tells of a
/// record once, so waiting for it to be told again could be forever.
pub async fn find_coordinator(
    config: &WorkerConfig,
    skip: &HashMap<String, Instant>,
) -> Result<String> {
    if let Some(c) = &config.coordinator {
        return Ok(c.clone());
    }
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let mut seen = discovery::browse(cancel)?;
    info!(cluster = %config.token.cluster_id(), "looking for the coordinator over mDNS");
    // The passed-over address seen whose time is up first.
    let mut later: Option<(String, Instant)> = None;
    loop {
        let wait_for_later = async {
            match &later {
                Some((_, until)) => tokio::time::sleep_until((*until).into()).await,
                None => std::future::pending().await,
            }
        };
        let s = tokio::select! {
            s = seen.recv() => match s {
                Some(s) => s,
                None => break,
            },
            () = wait_for_later => {
                let addr = later.take().map(|(addr, _)| addr).unwrap_or_default();
                info!(%addr, "trying the coordinator an mDNS record named again");
                return Ok(addr);
            }
        };
        for addr in coordinator_addresses(config, &s) {
            match skip.get(&addr) {
                None => {
                    info!(%addr, "found the coordinator over mDNS");
                    return Ok(addr);
                }
                Some(until) => {
                    if later.as_ref().is_none_or(|(_, first)| until < first) {
                        later = Some((addr, *until));
                    }
                }
            }
        }
    }
    Err(strata_net::Error::Mdns("the mDNS browser stopped".into()).into())
}

/// The addresses a record names for this cluster's coordinator, best first: a
/// coordinator also answers on its loopback, so that comes last. A record may carry
/// several addresses (or two hosts' under one name): each is tried in turn.
fn coordinator_addresses(config: &WorkerConfig, s: &discovery::Seen) -> Vec<String> {
    if s.get("role") != Some("coordinator") {
        return Vec::new();
    }
    let cluster = s.get("cluster").unwrap_or("");
    if cluster != config.token.cluster_id() {
        warn!(
            found = %cluster,
            mine = %config.token.cluster_id(),
            instance = %s.instance,
            "found a coordinator of another cluster; ignoring it"
        );
        return Vec::new();
    }
    let (lan, local): (Vec<&std::net::Ipv4Addr>, Vec<_>) = s
        .addresses
        .iter()
        .partition(|a| !a.is_loopback() && !a.is_link_local());
    lan.into_iter()
        .chain(local)
        .map(|ip| SocketAddr::new(IpAddr::V4(*ip), s.port).to_string())
        .collect()
}

/// Asks the coordinator at `address` to admit this worker, within [`JOIN_TIMEOUT`].
pub async fn join(
    address: &str,
    token: &JoinToken,
    key: &PendingKey,
    info: WorkerInfo,
    held: Option<HeldSlice>,
) -> Result<Admission> {
    match tokio::time::timeout(JOIN_TIMEOUT, join_once(address, token, key, info, held)).await {
        Ok(r) => r,
        Err(_) => Err(strata_net::Error::Timeout {
            what: format!("joining the coordinator at {address}"),
            seconds: JOIN_TIMEOUT.as_secs_f64(),
        }
        .into()),
    }
}

async fn join_once(
    address: &str,
    token: &JoinToken,
    key: &PendingKey,
    info: WorkerInfo,
    held: Option<HeldSlice>,
) -> Result<Admission> {
    let refused = |reason: String| Error::Refused {
        address: address.to_string(),
        reason,
    };
    // Over TLS, trusting only a coordinator whose CA the token's cluster id names.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| refused(format!("not an address: {e}")))?
        .connect_with_connector(ClusterConnector::pinned(token.cluster_id())?)
        .await
        .map_err(|e| match api_tls::tls_failure(&e) {
            Some(why) => refused(format!("its TLS certificate is not of the cluster the token names ({why}): not our coordinator")),
            None => e.into(),
        })?;
    let mut client = ClusterClient::new(channel);
    let refusal = |s: tonic::Status| match s.code() {
        tonic::Code::PermissionDenied
        | tonic::Code::FailedPrecondition
        | tonic::Code::InvalidArgument
        | tonic::Code::Unimplemented => refused(s.message().to_string()),
        _ => s.into(),
    };
    let challenge = client
        .join_challenge(JoinChallengeRequest {})
        .await
        .map_err(refusal)?
        .into_inner()
        .challenge;
    let csr = key.signing_request(&identity::worker_name(&info.id))?;
    let reply = client
        .join(JoinRequest {
            worker: Some(info),
            token_proof: token.join_proof(&challenge, &csr),
            csr_der: csr,
            held,
            challenge: challenge.clone(),
        })
        .await
        .map_err(refusal)?
        .into_inner();
    if !token.verify_admit(&challenge, &reply.certificate_der, &reply.admit_proof) {
        return Err(refused(
            "its answer does not prove it holds this cluster's secret: not our coordinator".into(),
        ));
    }
    if identity::cluster_id_of(&reply.ca_certificate_der) != token.cluster_id() {
        return Err(refused("its CA is not the one the token names".into()));
    }
    let coordinator_cert =
        rustls_pki_types::CertificateDer::from(reply.coordinator_certificate_der);
    let id = reply.assigned_id;
    let identity = key.into_identity(
        &identity::worker_name(&id),
        reply.certificate_der,
        reply.ca_certificate_der,
    )?;
    Ok(Admission {
        identity,
        coordinator_cert,
        id,
    })
}
