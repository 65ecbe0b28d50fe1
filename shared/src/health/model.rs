//! The per-peer health state machine: observations in, state out.
//!
//! Pure: no clock, no I/O. The monitor feeds it one observation per
//! heartbeat interval.

use std::time::Duration;

use serde::Serialize;

/// Health of one peer as this endpoint sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    Healthy,
    Degraded,
    Unreachable,
}

impl PeerState {
    pub const ALL: [PeerState; 3] = [
        PeerState::Healthy,
        PeerState::Degraded,
        PeerState::Unreachable,
    ];
    pub fn label(&self) -> &'static str {
        match self {
            PeerState::Healthy => "healthy",
            PeerState::Degraded => "degraded",
            PeerState::Unreachable => "unreachable",
        }
    }
}

/// What the link measured for one peer at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observation {
    /// Time since a heartbeat was last answered (`None`: never).
    pub since_last_reply: Option<Duration>,
    /// Age of the current WireGuard session (`None`: no session).
    pub handshake_age: Option<Duration>,
    pub loss_ratio: f64,
    pub rtt_p99: Option<Duration>,
}

/// Thresholds and hysteresis. Defaults: heartbeat every 200 ms,
/// Unreachable after 1.5 s without an answer (about 7 missed heartbeats),
/// so a dead peer is Unreachable within 2 s; one lost heartbeat (400 ms of
/// silence, 2 % loss over the 50-heartbeat window) changes nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Silence after which the peer is Unreachable at once.
    pub unreachable_after: Duration,
    /// Loss ratio at or above which the peer is Degraded.
    pub degraded_loss: f64,
    /// RTT p99 at or above which the peer is Degraded.
    pub degraded_rtt_p99: Duration,
    /// A session older than this means rekeying fails (WireGuard rekeys at
    /// 120 s and rejects sessions at 180 s).
    pub stale_handshake: Duration,
    /// Consecutive worse observations before Healthy -> Degraded.
    pub degrade_after: u32,
    /// Consecutive better observations before moving to a better state.
    pub recover_after: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            unreachable_after: Duration::from_millis(1500),
            degraded_loss: 0.10,
            degraded_rtt_p99: Duration::from_millis(500),
            stale_handshake: Duration::from_secs(180),
            degrade_after: 3,
            recover_after: 5,
        }
    }
}

impl Thresholds {
    /// The state one observation alone points to.
    pub fn classify(&self, o: &Observation) -> PeerState {
        match o.since_last_reply {
            None => return PeerState::Unreachable,
            Some(s) if s >= self.unreachable_after => return PeerState::Unreachable,
            Some(_) => {}
        }
        let stale = o.handshake_age.is_none_or(|a| a >= self.stale_handshake);
        let slow = o.rtt_p99.is_some_and(|r| r >= self.degraded_rtt_p99);
        if stale || slow || o.loss_ratio >= self.degraded_loss {
            PeerState::Degraded
        } else {
            PeerState::Healthy
        }
    }
}

/// A state change, for logs, events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: PeerState,
    pub to: PeerState,
}

/// One peer's state with hysteresis.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerHealth {
    state: PeerState,
    /// A candidate state and how many observations in a row pointed to it.
    pending: Option<(PeerState, u32)>,
}

impl Default for PeerHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerHealth {
    /// Peers start Unreachable until heartbeats prove otherwise.
    pub fn new() -> Self {
        PeerHealth {
            state: PeerState::Unreachable,
            pending: None,
        }
    }

    pub fn state(&self) -> PeerState {
        self.state
    }

    /// Feeds one observation; returns the transition if the state changed.
    pub fn observe(&mut self, t: &Thresholds, o: &Observation) -> Option<Transition> {
        let target = t.classify(o);
        if target == self.state {
            self.pending = None;
            return None;
        }
        // Silence past the threshold is already the hysteresis: act at once.
        let needed = if target == PeerState::Unreachable {
            1
        } else if target > self.state {
            t.degrade_after
        } else {
            t.recover_after
        };
        let count = match self.pending {
            Some((p, n)) if p == target => n + 1,
            _ => 1,
        };
        if count >= needed.max(1) {
            let from = self.state;
            self.state = target;
            self.pending = None;
            Some(Transition { from, to: target })
        } else {
            self.pending = Some((target, count));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PeerState::*;

    const MS: Duration = Duration::from_millis(1);

    fn good() -> Observation {
        Observation {
            since_last_reply: Some(150 * MS),
            handshake_age: Some(Duration::from_secs(30)),
            loss_ratio: 0.0,
            rtt_p99: Some(2 * MS),
        }
    }

    #[test]
    fn classify_table() {
        let t = Thresholds::default();
        let cases: Vec<(&str, Observation, PeerState)> = vec![
            ("all good", good(), Healthy),
            (
                "never answered",
                Observation {
                    since_last_reply: None,
                    ..good()
                },
                Unreachable,
            ),
            (
                "silent 1.5 s",
                Observation {
                    since_last_reply: Some(1500 * MS),
                    ..good()
                },
                Unreachable,
            ),
            (
                "one heartbeat lost (400 ms silence, 2 % loss)",
                Observation {
                    since_last_reply: Some(400 * MS),
                    loss_ratio: 0.02,
                    ..good()
                },
                Healthy,
            ),
            (
                "10 % loss",
                Observation {
                    loss_ratio: 0.10,
                    ..good()
                },
                Degraded,
            ),
            (
                "slow p99",
                Observation {
                    rtt_p99: Some(600 * MS),
                    ..good()
                },
                Degraded,
            ),
            (
                "no session but answers",
                Observation {
                    handshake_age: None,
                    ..good()
                },
                Degraded,
            ),
            (
                "stale session",
                Observation {
                    handshake_age: Some(Duration::from_secs(200)),
                    ..good()
                },
                Degraded,
            ),
        ];
        for (name, o, want) in cases {
            assert_eq!(t.classify(&o), want, "{name}");
        }
    }

    /// Runs a sequence of observations and returns the state after each.
    fn run(start: PeerState, seq: &[Observation]) -> Vec<PeerState> {
        let t = Thresholds::default();
        let mut h = PeerHealth {
            state: start,
            pending: None,
        };
        seq.iter()
            .map(|o| {
                h.observe(&t, o);
                h.state()
            })
            .collect()
    }

    #[test]
    fn hysteresis_table() {
        let lossy = Observation {
            loss_ratio: 0.2,
            ..good()
        };
        let dead = Observation {
            since_last_reply: Some(1600 * MS),
            ..good()
        };
        let cases: Vec<(&str, PeerState, Vec<Observation>, Vec<PeerState>)> = vec![
            (
                "starts unreachable, recovers after 5 good",
                Unreachable,
                vec![good(); 5],
                vec![Unreachable, Unreachable, Unreachable, Unreachable, Healthy],
            ),
            (
                "single lossy sample does not flap",
                Healthy,
                vec![lossy, good(), lossy, good()],
                vec![Healthy; 4],
            ),
            (
                "three lossy in a row degrade",
                Healthy,
                vec![lossy, lossy, lossy],
                vec![Healthy, Healthy, Degraded],
            ),
            (
                "dead is unreachable at once",
                Healthy,
                vec![dead],
                vec![Unreachable],
            ),
            (
                "a good sample interrupts recovery",
                Degraded,
                vec![
                    good(),
                    good(),
                    lossy,
                    good(),
                    good(),
                    good(),
                    good(),
                    good(),
                ],
                vec![
                    Degraded, Degraded, Degraded, Degraded, Degraded, Degraded, Degraded, Healthy,
                ],
            ),
            (
                "unreachable to degraded needs 5 lossy-but-alive samples",
                Unreachable,
                vec![lossy; 5],
                vec![Unreachable, Unreachable, Unreachable, Unreachable, Degraded],
            ),
        ];
        for (name, start, seq, want) in cases {
            assert_eq!(run(start, &seq), want, "{name}");
        }
    }

    #[test]
    fn dead_peer_is_unreachable_within_two_seconds_at_defaults() {
        // Heartbeats every 200 ms; the peer dies right after answering one.
        let t = Thresholds::default();
        let mut h = PeerHealth {
            state: Healthy,
            pending: None,
        };
        let mut unreachable_at = None;
        for tick in 1..=20u64 {
            let o = Observation {
                since_last_reply: Some(Duration::from_millis(tick * 200)),
                ..good()
            };
            h.observe(&t, &o);
            if h.state() == Unreachable {
                unreachable_at = Some(Duration::from_millis(tick * 200));
                break;
            }
        }
        let at = unreachable_at.expect("becomes unreachable");
        assert!(at <= Duration::from_secs(2), "took {at:?}");
    }
}
