//! The operator credential: what changing a cluster (drain, remove) takes.
//!
//! It is a key derived from the cluster secret (an HMAC under the secret with its own
//! label), so it can sign cluster changes but not join a worker or forge the
//! coordinator's proofs. On the coordinator's machine the CLI derives it from the state
//! directory, the way kubectl reads its kubeconfig; elsewhere it is given the text that
//! `strata token operator` prints there.
//!
//! The key itself never crosses the network. Each call carries a signature over what it
//! does (the action and its target), when (milliseconds since the epoch) and a random
//! nonce; the coordinator accepts a signature once, and only near its own clock, so a
//! call sniffed off the LAN cannot be replayed or turned into another one.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Prefix of an operator credential's text; names its format version.
const PREFIX: &str = "strata-op1";
/// Label of a signed call; names the signature's format version.
const CALL_LABEL: &[u8] = b"strata-admin-v1";
/// The metadata key that carries a call's signature.
pub const HEADER: &str = "x-strata-operator";

type HmacSha256 = Hmac<Sha256>;

/// A key that signs cluster changes.
#[derive(Clone)]
pub struct OperatorKey {
    cluster_id: String,
    key: [u8; 32],
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        write!(f, "OperatorKey({})", self.cluster_id)
    }
}

/// One cluster change, as it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call<'a> {
    /// What it does (`drain`, `remove`).
    pub action: &'a str,
    /// What it does it to (a worker id).
    pub target: &'a str,
}

/// A call's signature as it travels: who signed (cluster), when, a nonce and the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The cluster whose key signed.
    pub cluster_id: String,
    /// When it was signed, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Random, so that two equal calls in the same millisecond differ.
    pub nonce: u64,
    mac: [u8; 32],
}

impl OperatorKey {
    pub(crate) fn new(cluster_id: String, key: [u8; 32]) -> Self {
        OperatorKey { cluster_id, key }
    }

    /// Parses `strata-op1-<cluster id>-<key>`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::BadToken(format!("operator credential: {why}"));
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('-'));
        let Some(rest) = rest else {
            return Err(bad(
                "it starts with `strata-op1-`; print one with `strata token operator` on the coordinator's machine",
            ));
        };
        let (cluster_id, key_hex) = rest
            .split_once('-')
            .ok_or_else(|| bad("expected `strata-op1-`, 16 hex digits, `-`, 64 hex digits"))?;
        if cluster_id.len() != 16 || hex::decode(cluster_id).is_err() {
            return Err(bad("the cluster id must be 16 hex digits"));
        }
        let key: [u8; 32] = hex::decode(key_hex)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("the key must be 64 hex digits"))?;
        Ok(OperatorKey {
            cluster_id: cluster_id.to_string(),
            key,
        })
    }

    /// The credential's text.
    pub fn to_text(&self) -> String {
        format!("{PREFIX}-{}-{}", self.cluster_id, hex::encode(self.key))
    }

    /// The cluster it changes.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    fn mac(&self, call: &Call<'_>, at_ms: u64, nonce: u64) -> HmacSha256 {
        #[allow(clippy::expect_used)] // HMAC takes keys of any length
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("hmac accepts any key");
        mac.update(CALL_LABEL);
        for field in [
            self.cluster_id.as_bytes(),
            call.action.as_bytes(),
            call.target.as_bytes(),
        ] {
            mac.update(&(field.len() as u32).to_be_bytes());
            mac.update(field);
        }
        mac.update(&at_ms.to_be_bytes());
        mac.update(&nonce.to_be_bytes());
        mac
    }

    /// Signs `call` at `at_ms` with a fresh nonce.
    pub fn sign(&self, call: &Call<'_>, at_ms: u64) -> Result<Signature> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| Error::State(format!("no randomness: {e}")))?;
        let nonce = u64::from_be_bytes(nonce);
        Ok(Signature {
            cluster_id: self.cluster_id.clone(),
            at_ms,
            nonce,
            mac: self.mac(call, at_ms, nonce).finalize().into_bytes().into(),
        })
    }

    /// Whether `sig` is this key's signature of `call` (in constant time). Freshness and
    /// replays are the verifier's to judge: this checks only the MAC.
    pub fn verify(&self, call: &Call<'_>, sig: &Signature) -> bool {
        sig.cluster_id == self.cluster_id
            && self
                .mac(call, sig.at_ms, sig.nonce)
                .verify_slice(&sig.mac)
                .is_ok()
    }
}

impl Signature {
    /// The header value: `v1 <cluster> <at ms> <nonce hex> <mac hex>`.
    pub fn to_header(&self) -> String {
        format!(
            "v1 {} {} {:016x} {}",
            self.cluster_id,
            self.at_ms,
            self.nonce,
            hex::encode(self.mac)
        )
    }

    /// Parses a header value; `None` when it is not one.
    pub fn from_header(value: &str) -> Option<Self> {
        let mut parts = value.split(' ');
        if parts.next() != Some("v1") {
            return None;
        }
        let cluster_id = parts.next()?.to_string();
        let at_ms = parts.next()?.parse().ok()?;
        let nonce = u64::from_str_radix(parts.next()?, 16).ok()?;
        let mac: [u8; 32] = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        if parts.next().is_some() || cluster_id.len() > 64 {
            return None;
        }
        Some(Signature {
            cluster_id,
            at_ms,
            nonce,
            mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ClusterCa;

    #[test]
    fn a_signature_covers_the_call_the_time_and_the_cluster() {
        let ca = ClusterCa::create().unwrap();
        let key = ca.token().operator_key();
        let remove = Call {
            action: "remove",
            target: "w1",
        };
        let sig = key.sign(&remove, 1000).unwrap();
        let sent = Signature::from_header(&sig.to_header()).unwrap();
        assert_eq!(sent, sig);
        assert!(key.verify(&remove, &sent));
        // Another target, action or time: not this signature.
        let other = Call {
            action: "remove",
            target: "w2",
        };
        assert!(!key.verify(&other, &sent));
        let drain = Call {
            action: "drain",
            target: "w1",
        };
        assert!(!key.verify(&drain, &sent));
        let later = Signature {
            at_ms: 2000,
            ..sent.clone()
        };
        assert!(!key.verify(&remove, &later));
        // Another cluster's operator key signs nothing here.
        let stranger = ClusterCa::create().unwrap().token().operator_key();
        assert!(!key.verify(&remove, &stranger.sign(&remove, 1000).unwrap()));
        // The credential's text round-trips and is not the join token.
        let text = key.to_text();
        assert!(text.starts_with("strata-op1-"));
        assert!(!text.contains(&ca.token().to_text()[25..]));
        let parsed = OperatorKey::parse(&text).unwrap();
        assert!(parsed.verify(&remove, &sent));
        assert!(OperatorKey::parse(&ca.token().to_text()).is_err());
        assert!(Signature::from_header("Bearer abc").is_none());
        assert!(Signature::from_header("v1 x 1 zz 00").is_none());
    }
}
