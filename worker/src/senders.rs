//! Who may send this stage frames: a sans-IO core the data-plane gate asks.
//!
//! Every cluster member holds a certificate the CA signed, so the certificate alone says
//! only "a member". A stage takes frames from the coordinator and from the stage its plan
//! puts before it, in that plan's epoch; it keeps the plan before too, so frames already
//! on their way when a new plan was wired still reach the stale-epoch path that fails
//! their sequences back. Anyone else (a removed worker, a member that is not the planned
//! predecessor, a predecessor speaking for an epoch it was not planned in) is refused.

use std::collections::VecDeque;

/// Plans remembered: the one in force and the one before.
const REMEMBERED: usize = 2;

/// The senders a stage takes frames from.
#[derive(Debug, Clone)]
pub struct Senders {
    coordinator: String,
    /// `(epoch, the planned predecessor's key fingerprint)`, newest last.
    planned: VecDeque<(u64, String)>,
}

impl Senders {
    /// Only the coordinator (key fingerprint `coordinator`), until a plan is wired.
    pub fn new(coordinator: String) -> Self {
        Senders {
            coordinator,
            planned: VecDeque::new(),
        }
    }

    /// Plan `epoch` puts the holder of key `predecessor` before this stage.
    pub fn wired(&mut self, epoch: u64, predecessor: String) {
        self.planned.retain(|(e, _)| *e != epoch);
        self.planned.push_back((epoch, predecessor));
        while self.planned.len() > REMEMBERED {
            self.planned.pop_front();
        }
    }

    /// Whether a frame of `epoch` from key `from` is taken; `Err` says why not.
    pub fn allows(&self, from: &str, epoch: u64) -> Result<(), String> {
        if from == self.coordinator {
            return Ok(());
        }
        if self.planned.iter().any(|(e, p)| *e == epoch && p == from) {
            return Ok(());
        }
        let wired: Vec<String> = self.planned.iter().map(|(e, _)| e.to_string()).collect();
        Err(format!(
            "the sender is not this stage's planned predecessor in epoch {epoch} (wired for epoch {}), nor the coordinator",
            if wired.is_empty() {
                "none".to_string()
            } else {
                wired.join(" and ")
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_coordinator_and_the_planned_predecessor_in_its_epoch() {
        let mut s = Senders::new("coord".into());
        assert!(s.allows("coord", 9).is_ok());
        assert!(s.allows("w1", 1).is_err(), "nothing is planned yet");
        s.wired(1, "w1".into());
        assert!(s.allows("w1", 1).is_ok());
        assert!(
            s.allows("w2", 1).is_err(),
            "a member that is not the predecessor"
        );
        assert!(s.allows("w1", 2).is_err(), "an epoch it was not planned in");
        // A new plan: the old predecessor's frames of the old epoch still arrive (and
        // fail their sequences back), but it cannot speak in the new one.
        s.wired(2, "w2".into());
        assert!(s.allows("w2", 2).is_ok());
        assert!(s.allows("w1", 1).is_ok());
        assert!(s.allows("w1", 2).is_err());
        // Two plans on, the first is forgotten: its sender is a stranger.
        s.wired(3, "w3".into());
        assert!(s.allows("w1", 1).is_err());
        let why = s.allows("w9", 3).unwrap_err();
        assert!(why.contains("epoch 3") && why.contains("2 and 3"), "{why}");
        // Wiring the same epoch again replaces its predecessor.
        s.wired(3, "w4".into());
        assert!(s.allows("w3", 3).is_err());
        assert!(s.allows("w4", 3).is_ok());
    }
}
