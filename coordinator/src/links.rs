//! Measures the links between workers. When workers join, each new pair is probed over
//! the data plane by the worker with the lesser id (pings, then a short burst: the path
//! activations take, QUIC and TLS included), and the planner counts what was measured.
//!
//! A link measured at least as fast as the cluster's nominal one (`--link`, 1 GbE unless
//! told) counts as nominal: a fast link's figures wobble from one probe to the next, and
//! a plan should not be reordered by noise. A link clearly slower (under half the
//! nominal bandwidth, or 2 ms more latency) counts as measured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_net::identity::worker_name;
use strata_proto::v1::{ProbeRequest, ProbeTarget};
use tracing::{info, warn};

use crate::planner::{Link, PlanOptions};
use crate::Shared;

/// Pings per link.
const PINGS: u32 = 5;
/// Bytes of the burst that times a link's bandwidth (about 34 ms on gigabit Ethernet).
const BURST_BYTES: u64 = 4 << 20;
/// Time allowed per link probed by one request.
const PER_LINK: Duration = Duration::from_secs(12);
/// Peers one probe request names (workers accept up to 512).
const MAX_TARGETS: usize = 256;
/// How long a new plan waits for the links of new workers to be measured.
pub const LINK_WAIT: Duration = Duration::from_secs(20);

/// Probes new pairs until cancelled.
pub async fn run(shared: Arc<Shared>) {
    if !shared.config().measure_links {
        return;
    }
    loop {
        tokio::select! {
            _ = shared.cancel().cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for (prober, targets) in batches(&shared) {
            probe(&shared, &prober, targets).await;
        }
    }
}

/// The eligible workers' ids.
fn eligible_ids(shared: &Shared) -> Vec<String> {
    shared
        .registry()
        .workers
        .values()
        .filter(|w| w.eligible())
        .map(|w| w.profile.id.clone())
        .collect()
}

/// Whether a plan should wait for links still to be measured: new pairs of eligible
/// workers, for up to [`LINK_WAIT`] after membership changed.
pub fn pending(shared: &Shared) -> bool {
    if !shared.config().measure_links {
        return false;
    }
    let ids = eligible_ids(shared);
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let registry = shared.registry();
    let waited_enough = registry
        .changed_at
        .is_some_and(|t| t.elapsed() >= shared.config().settle + LINK_WAIT);
    !waited_enough && !registry.links.to_probe(&ids, Instant::now()).is_empty()
}

/// The pairs to probe now, grouped by the worker that probes them.
fn batches(shared: &Shared) -> Vec<(String, Vec<ProbeTarget>)> {
    let ids = eligible_ids(shared);
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let registry = shared.registry();
    let mut out: Vec<(String, Vec<ProbeTarget>)> = Vec::new();
    for (a, b) in registry.links.to_probe(&refs, Instant::now()) {
        let Some(peer) = registry.workers.get(&b) else {
            continue;
        };
        let target = ProbeTarget {
            worker_id: b.clone(),
            address: peer.data_addr.to_string(),
            server_name: worker_name(&b),
        };
        // A request names at most MAX_TARGETS peers (what a worker accepts).
        match out
            .iter_mut()
            .find(|(p, t)| *p == a && t.len() < MAX_TARGETS)
        {
            Some((_, targets)) => targets.push(target),
            None => out.push((a, vec![target])),
        }
    }
    out
}

/// Asks `prober` to measure its links to `targets`, and records what it says. A link that
/// counts as other than nominal changes the topology: the reconciler plans again.
async fn probe(shared: &Shared, prober: &str, targets: Vec<ProbeTarget>) {
    let Some(mut client) = shared
        .registry()
        .workers
        .get(prober)
        .map(|w| w.client.clone())
    else {
        return;
    };
    let asked: Vec<String> = targets.iter().map(|t| t.worker_id.clone()).collect();
    let deadline = PER_LINK * targets.len() as u32;
    let request = ProbeRequest {
        targets,
        pings: PINGS,
        burst_bytes: BURST_BYTES,
    };
    let answer = tokio::time::timeout(deadline, client.probe(request)).await;
    let links = match answer {
        Ok(Ok(r)) => r.into_inner().links,
        Ok(Err(status)) => {
            warn!(worker = prober, cause = %status.message(), "could not measure its links");
            Vec::new()
        }
        Err(_) => {
            warn!(worker = prober, "measuring its links timed out");
            Vec::new()
        }
    };
    let now = Instant::now();
    let nominal = shared.config().plan.link;
    let mut registry = shared.registry();
    let mut topology_changed = false;
    for id in &asked {
        // Only what was asked, once; a peer the answer leaves out failed.
        let Some(m) = links.iter().find(|m| &m.worker_id == id) else {
            registry.links.record_failure(prober, id, now);
            continue;
        };
        let bandwidth = m.bandwidth_bytes_per_second;
        if !m.error.is_empty() || !bandwidth.is_finite() || bandwidth <= 0.0 {
            warn!(from = prober, to = %id, cause = %m.error, "could not measure a link");
            registry.links.record_failure(prober, id, now);
            continue;
        }
        let link = Link {
            latency_ms: m.rtt_ms.max(0.0) / 2.0,
            bandwidth: m.bandwidth_bytes_per_second,
        };
        info!(
            from = prober,
            to = %id,
            rtt_ms = format!("{:.2}", m.rtt_ms),
            mbit_s = format!("{:.0}", link.bandwidth * 8.0 / 1e6),
            "link measured"
        );
        topology_changed |= counted(link, nominal) != nominal;
        registry.links.record(prober, id, link, now);
    }
    if topology_changed {
        registry.changed_at = Some(now);
        drop(registry);
        shared.membership_changed();
    }
}

/// How the planner counts a measured link: as `nominal` unless clearly slower.
pub fn counted(measured: Link, nominal: Link) -> Link {
    let slower = measured.bandwidth < nominal.bandwidth / 2.0
        || measured.latency_ms > nominal.latency_ms + 2.0;
    if slower {
        Link {
            latency_ms: measured.latency_ms.max(nominal.latency_ms),
            bandwidth: measured.bandwidth.min(nominal.bandwidth),
        }
    } else {
        nominal
    }
}

/// The planner's options with the links measured so far.
pub fn plan_options(shared: &Shared) -> PlanOptions {
    let mut options = shared.config().plan.clone();
    let nominal = options.link;
    for (a, b, m) in shared.registry().links.iter() {
        let link = counted(m.link, nominal);
        if link != nominal {
            options.set_link(a, b, link);
        }
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_links_count_as_nominal_and_slow_ones_as_measured() {
        let gbe = Link::GBE;
        let loopback = Link {
            latency_ms: 0.05,
            bandwidth: 900e6,
        };
        assert_eq!(counted(loopback, gbe), gbe);
        // Noise around the nominal figures changes nothing.
        let wobbly = Link {
            latency_ms: 0.9,
            bandwidth: 80e6,
        };
        assert_eq!(counted(wobbly, gbe), gbe);
        let capped = Link {
            latency_ms: 0.2,
            bandwidth: 12.5e6,
        };
        assert_eq!(
            counted(capped, gbe),
            Link {
                latency_ms: gbe.latency_ms,
                bandwidth: 12.5e6
            }
        );
        let far = Link {
            latency_ms: 4.0,
            bandwidth: 100e6,
        };
        assert_eq!(
            counted(far, gbe),
            Link {
                latency_ms: 4.0,
                bandwidth: 100e6
            }
        );
    }
}
