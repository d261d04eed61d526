//! Join challenges: a sans-IO core that hands out fresh challenges and accepts each one
//! for a single join, so a captured join (its proof is bound to the challenge) cannot be
//! replayed.
//!
//! A challenge is stateless until it is used: its time, 16 random bytes and a MAC under
//! a key that lives only in this process. Anyone may ask for challenges, so asking costs
//! the coordinator no memory; only a join whose token proof holds marks its challenge
//! used, and that mark lasts only while the challenge is fresh.

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a challenge may be answered after it was handed out.
pub const CHALLENGE_LIFETIME_MS: u64 = 30_000;
/// Most used challenges remembered at once (each is fresh, so only token holders' joins
/// of the last [`CHALLENGE_LIFETIME_MS`] fill it).
const MAX_USED: usize = 4096;
const NONCE_BYTES: usize = 16;
const MAC_BYTES: usize = 16;
const CHALLENGE_BYTES: usize = 8 + NONCE_BYTES + MAC_BYTES;

/// Why a challenge was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeRefusal {
    /// Not one this coordinator handed out (or from before it restarted).
    #[error("its join challenge is not one this coordinator handed out (did the coordinator restart?); the worker retries with a fresh one")]
    Unknown,
    /// Too old.
    #[error("its join challenge expired; the worker retries with a fresh one")]
    Expired,
    /// Answered before.
    #[error("its join challenge was used by an earlier join: a replayed join")]
    Replayed,
    /// Too many joins at once.
    #[error("too many joins at once; the worker retries")]
    Busy,
}

/// Hands out challenges and accepts each once.
pub struct Challenges {
    key: [u8; 32],
    used: HashMap<[u8; NONCE_BYTES], u64>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Challenges({} used)", self.used.len())
    }
}

impl Challenges {
    /// Challenges under a fresh key (`seed`, 32 random bytes).
    pub fn new(seed: [u8; 32]) -> Self {
        Challenges {
            key: seed,
            used: HashMap::new(),
        }
    }

    fn mac(&self, issued_ms: u64, nonce: &[u8]) -> Hmac<Sha256> {
        #[allow(clippy::expect_used)] // HMAC takes keys of any length
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac accepts any key");
        mac.update(b"strata-challenge-v1");
        mac.update(&issued_ms.to_be_bytes());
        mac.update(nonce);
        mac
    }

    /// A fresh challenge at `now_ms`, from 16 random bytes `nonce`.
    pub fn issue(&self, now_ms: u64, nonce: [u8; NONCE_BYTES]) -> Vec<u8> {
        let tag = self.mac(now_ms, &nonce).finalize().into_bytes();
        let mut c = Vec::with_capacity(CHALLENGE_BYTES);
        c.extend_from_slice(&now_ms.to_be_bytes());
        c.extend_from_slice(&nonce);
        c.extend_from_slice(&tag[..MAC_BYTES]);
        c
    }

    /// Whether `challenge` is one of ours and fresh at `now_ms` (it is not used up:
    /// [`Challenges::spend`] does that, once the join's proof holds).
    pub fn check(&self, challenge: &[u8], now_ms: u64) -> Result<(), ChallengeRefusal> {
        let (issued_ms, nonce, tag) = split(challenge).ok_or(ChallengeRefusal::Unknown)?;
        self.mac(issued_ms, nonce)
            .verify_truncated_left(tag)
            .map_err(|_| ChallengeRefusal::Unknown)?;
        // A challenge from the future is not ours either (the clock is this process's).
        if issued_ms > now_ms || now_ms - issued_ms > CHALLENGE_LIFETIME_MS {
            return Err(ChallengeRefusal::Expired);
        }
        Ok(())
    }

    /// Uses `challenge` up (after [`Challenges::check`] and the join's proof held).
    pub fn spend(&mut self, challenge: &[u8], now_ms: u64) -> Result<(), ChallengeRefusal> {
        self.check(challenge, now_ms)?;
        let (issued_ms, nonce, _) = split(challenge).ok_or(ChallengeRefusal::Unknown)?;
        self.used
            .retain(|_, issued| now_ms.saturating_sub(*issued) <= CHALLENGE_LIFETIME_MS);
        let mut key = [0u8; NONCE_BYTES];
        key.copy_from_slice(nonce);
        if self.used.contains_key(&key) {
            return Err(ChallengeRefusal::Replayed);
        }
        if self.used.len() >= MAX_USED {
            return Err(ChallengeRefusal::Busy);
        }
        self.used.insert(key, issued_ms);
        Ok(())
    }
}

/// A challenge's time, nonce and tag.
fn split(challenge: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    if challenge.len() != CHALLENGE_BYTES {
        return None;
    }
    let (time, rest) = challenge.split_at(8);
    let (nonce, tag) = rest.split_at(NONCE_BYTES);
    Some((u64::from_be_bytes(time.try_into().ok()?), nonce, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn a_challenge_is_ours_fresh_and_good_for_one_join() {
        let mut challenges = Challenges::new([7; 32]);
        let c = challenges.issue(NOW, [1; 16]);
        assert_eq!(challenges.check(&c, NOW + 10), Ok(()));
        assert_eq!(challenges.spend(&c, NOW + 10), Ok(()));
        assert_eq!(
            challenges.spend(&c, NOW + 20),
            Err(ChallengeRefusal::Replayed)
        );
        // Too late, from the future, altered, or another process's: refused.
        let late = challenges.issue(NOW, [2; 16]);
        assert_eq!(
            challenges.check(&late, NOW + CHALLENGE_LIFETIME_MS + 1),
            Err(ChallengeRefusal::Expired)
        );
        let ahead = challenges.issue(NOW + 5000, [3; 16]);
        assert_eq!(
            challenges.check(&ahead, NOW),
            Err(ChallengeRefusal::Expired)
        );
        let mut altered = challenges.issue(NOW, [4; 16]);
        altered[10] ^= 1;
        assert_eq!(
            challenges.check(&altered, NOW),
            Err(ChallengeRefusal::Unknown)
        );
        let other = Challenges::new([8; 32]).issue(NOW, [5; 16]);
        assert_eq!(
            challenges.check(&other, NOW),
            Err(ChallengeRefusal::Unknown)
        );
        assert_eq!(
            challenges.check(b"short", NOW),
            Err(ChallengeRefusal::Unknown)
        );
        // Used ones are forgotten once they could no longer be answered anyway.
        let later = NOW + 2 * CHALLENGE_LIFETIME_MS;
        let fresh = challenges.issue(later, [6; 16]);
        assert_eq!(challenges.spend(&fresh, later), Ok(()));
        assert_eq!(challenges.used.len(), 1);
    }
}
