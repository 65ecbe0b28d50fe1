//! The guardrail shared by both branches: more than `max` actions in one pass
//! stops acting until an operator acknowledges (or the process restarts).
//!
//! A "pass" is one `--once` run, or in controller mode one window of
//! `guardrail_window` (the CronJob period the controller replaces).

use std::time::{Duration, Instant};

use jiff::Timestamp;

/// Answer to "may I act once more?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// This request tripped the guardrail (alert now).
    Tripped,
    /// Already tripped earlier: refuse silently.
    Blocked,
}

#[derive(Debug)]
pub struct Guardrail {
    max: usize,
    window: Duration,
    window_start: Option<Instant>,
    count: usize,
    tripped_at: Option<Timestamp>,
}

impl Guardrail {
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            window_start: None,
            count: 0,
            tripped_at: None,
        }
    }

    /// Count one action; the (max+1)-th in a pass trips.
    pub fn admit(&mut self, now: Instant, wall: Timestamp) -> Admission {
        if self.tripped_at.is_some() {
            return Admission::Blocked;
        }
        match self.window_start {
            Some(s) if now.duration_since(s) < self.window => {}
            _ => {
                self.window_start = Some(now);
                self.count = 0;
            }
        }
        if self.count >= self.max {
            self.tripped_at = Some(wall);
            return Admission::Tripped;
        }
        self.count += 1;
        Admission::Allowed
    }

    pub fn tripped_at(&self) -> Option<Timestamp> {
        self.tripped_at
    }

    /// An acknowledgement at or after the trip re-arms the guardrail with a fresh pass.
    pub fn acknowledge(&mut self, ack: Timestamp) -> bool {
        match self.tripped_at {
            Some(t) if ack >= t => {
                self.tripped_at = None;
                self.window_start = None;
                self.count = 0;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_allowed_n_plus_one_trips() {
        let t0 = Instant::now();
        let wall = Timestamp::from_second(1_800_000_000).unwrap();
        for n in [0usize, 1, 10] {
            let mut g = Guardrail::new(n, Duration::from_secs(300));
            for _ in 0..n {
                assert_eq!(g.admit(t0, wall), Admission::Allowed);
            }
            assert_eq!(g.admit(t0, wall), Admission::Tripped);
            assert_eq!(g.admit(t0, wall), Admission::Blocked);
            // Even a new window stays blocked until acknowledged.
            assert_eq!(
                g.admit(t0 + Duration::from_secs(600), wall),
                Admission::Blocked
            );
            assert!(
                !g.acknowledge(Timestamp::from_second(1_799_999_999).unwrap()),
                "ack before the trip is stale"
            );
            assert!(g.acknowledge(wall));
            if n > 0 {
                assert_eq!(g.admit(t0, wall), Admission::Allowed);
            }
        }
    }

    #[test]
    fn window_resets_count() {
        let t0 = Instant::now();
        let wall = Timestamp::from_second(1_800_000_000).unwrap();
        let mut g = Guardrail::new(2, Duration::from_secs(300));
        assert_eq!(g.admit(t0, wall), Admission::Allowed);
        assert_eq!(g.admit(t0, wall), Admission::Allowed);
        assert_eq!(
            g.admit(t0 + Duration::from_secs(301), wall),
            Admission::Allowed
        );
        assert_eq!(
            g.admit(t0 + Duration::from_secs(302), wall),
            Admission::Allowed
        );
        assert_eq!(
            g.admit(t0 + Duration::from_secs(303), wall),
            Admission::Tripped
        );
    }
}
