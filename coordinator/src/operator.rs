//! The guard of cluster changes: a sans-IO core that decides whether a drain or remove
//! carries a fresh, unused signature of the cluster's operator key (see
//! [`strata_net::operator`]). The API edge reads the header and the clock and logs the
//! verdict; this module only decides.

use std::collections::HashMap;

use strata_net::operator::{Call, OperatorKey, Signature};

/// How far a signature's time may be from the coordinator's clock, either way. Wide
/// enough for machines whose clocks drift, narrow enough that the nonces to remember stay
/// few.
pub const CLOCK_WINDOW_MS: u64 = 120_000;
/// Most signatures remembered at once. Past it a call is refused until old ones age out:
/// forgetting one early would let it be replayed.
const MAX_REMEMBERED: usize = 4096;

/// Why a cluster change was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// No signature at all.
    #[error("changing the cluster needs its operator credential: run this on the coordinator's machine as the user that runs `strata serve` (its state directory holds the credential), or pass --operator-key with what `strata token operator` prints there")]
    Unsigned,
    /// A header that is not a signature.
    #[error("the operator signature is malformed; use the `strata` CLI of the same version")]
    Malformed,
    /// Signed for another cluster.
    #[error("the operator credential is for cluster {0}, not this one; print this cluster's with `strata token operator` on its coordinator's machine")]
    OtherCluster(String),
    /// The MAC does not match.
    #[error("the operator signature does not match: the credential is not this cluster's, or the call was altered")]
    BadSignature,
    /// Too far from the coordinator's clock.
    #[error("the call was signed {skew_s:.0} s away from the coordinator's clock (at most {} s allowed): set both machines' clocks right (NTP)", CLOCK_WINDOW_MS / 1000)]
    Stale {
        /// Seconds between the signature's time and the coordinator's clock.
        skew_s: f64,
    },
    /// This exact signature was used before.
    #[error("this signed call was already used once: a replay")]
    Replayed,
    /// Too many signed calls within the clock window.
    #[error("too many cluster changes in the last {} s; wait and retry", 2 * CLOCK_WINDOW_MS / 1000)]
    Busy,
}

/// Checks signed cluster changes and remembers the ones it accepted.
#[derive(Debug)]
pub struct Guard {
    key: OperatorKey,
    /// Accepted signatures (nonce and time) until they fall out of the clock window.
    used: HashMap<(u64, u64), u64>,
}

impl Guard {
    /// A guard of the cluster `key` signs for.
    pub fn new(key: OperatorKey) -> Self {
        Guard {
            key,
            used: HashMap::new(),
        }
    }

    /// Decides on `call` with the signature header `header` (if any), at `now_ms`.
    pub fn check(
        &mut self,
        call: &Call<'_>,
        header: Option<&str>,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let header = header.ok_or(Refusal::Unsigned)?;
        let sig = Signature::from_header(header).ok_or(Refusal::Malformed)?;
        if sig.cluster_id != self.key.cluster_id() {
            return Err(Refusal::OtherCluster(sig.cluster_id));
        }
        if !self.key.verify(call, &sig) {
            return Err(Refusal::BadSignature);
        }
        let skew = now_ms.abs_diff(sig.at_ms);
        if skew > CLOCK_WINDOW_MS {
            return Err(Refusal::Stale {
                skew_s: skew as f64 / 1000.0,
            });
        }
        // A signature stays remembered for as long as its time is inside the window.
        self.used
            .retain(|_, at| now_ms.abs_diff(*at) <= CLOCK_WINDOW_MS);
        let seen = (sig.nonce, sig.at_ms);
        if self.used.contains_key(&seen) {
            return Err(Refusal::Replayed);
        }
        if self.used.len() >= MAX_REMEMBERED {
            return Err(Refusal::Busy);
        }
        self.used.insert(seen, sig.at_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_net::identity::ClusterCa;

    const NOW: u64 = 1_800_000_000_000;

    fn remove(target: &str) -> Call<'_> {
        Call {
            action: "remove",
            target,
        }
    }

    #[test]
    fn only_a_fresh_signature_of_this_clusters_key_passes_once() {
        let ca = ClusterCa::create().unwrap();
        let key = ca.token().operator_key();
        let mut guard = Guard::new(key.clone());
        let call = remove("w1");
        assert_eq!(guard.check(&call, None, NOW), Err(Refusal::Unsigned));
        assert_eq!(
            guard.check(&call, Some("Bearer x"), NOW),
            Err(Refusal::Malformed)
        );
        let stranger = ClusterCa::create().unwrap().token().operator_key();
        let forged = stranger.sign(&call, NOW).unwrap().to_header();
        assert!(matches!(
            guard.check(&call, Some(&forged), NOW),
            Err(Refusal::OtherCluster(_))
        ));
        let signed = key.sign(&call, NOW).unwrap().to_header();
        // The signature of one call does not carry another.
        assert_eq!(
            guard.check(&remove("w2"), Some(&signed), NOW),
            Err(Refusal::BadSignature)
        );
        assert_eq!(guard.check(&call, Some(&signed), NOW + 1000), Ok(()));
        assert_eq!(
            guard.check(&call, Some(&signed), NOW + 2000),
            Err(Refusal::Replayed)
        );
        // Old signatures are refused as stale, so forgetting them is safe.
        assert!(matches!(
            guard.check(&call, Some(&signed), NOW + CLOCK_WINDOW_MS + 1),
            Err(Refusal::Stale { .. })
        ));
        let early = key
            .sign(&call, NOW - CLOCK_WINDOW_MS - 5000)
            .unwrap()
            .to_header();
        assert!(matches!(
            guard.check(&call, Some(&early), NOW),
            Err(Refusal::Stale { .. })
        ));
        // A fresh signature of the same call passes.
        let again = key.sign(&call, NOW + 3000).unwrap().to_header();
        assert_eq!(guard.check(&call, Some(&again), NOW + 3000), Ok(()));
    }

    #[test]
    fn a_flood_of_signed_calls_is_bounded_and_never_forgets_a_live_one() {
        let key = ClusterCa::create().unwrap().token().operator_key();
        let mut guard = Guard::new(key.clone());
        let call = remove("w1");
        let mut first = None;
        for i in 0..MAX_REMEMBERED {
            let h = key.sign(&call, NOW).unwrap().to_header();
            assert_eq!(guard.check(&call, Some(&h), NOW + i as u64 % 10), Ok(()));
            first.get_or_insert(h);
        }
        let one_more = key.sign(&call, NOW).unwrap().to_header();
        assert_eq!(guard.check(&call, Some(&one_more), NOW), Err(Refusal::Busy));
        let first = first.unwrap();
        assert_eq!(
            guard.check(&call, Some(&first), NOW),
            Err(Refusal::Replayed)
        );
        // Once they age out of the window there is room again.
        let later = NOW + 2 * CLOCK_WINDOW_MS;
        let fresh = key.sign(&call, later).unwrap().to_header();
        assert_eq!(guard.check(&call, Some(&fresh), later), Ok(()));
    }
}
