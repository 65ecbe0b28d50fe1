//! Heartbeats: small UDP messages inside the tunnel, echoed by the peer, that
//! measure round-trip time and loss for the health model.
//!
//! Wire form (20 bytes): `b"CHB"`, kind (1 = ping, 2 = pong), sequence (u64
//! BE), sender timestamp in nanoseconds since the sender's link started (u64
//! BE). A pong echoes the ping's sequence and timestamp unchanged, so only
//! the sender's clock is ever used.

use std::collections::VecDeque;
use std::time::Duration;

/// In-tunnel UDP port heartbeats use on both sides.
pub const HEARTBEAT_PORT: u16 = 51_871;
const MAGIC: &[u8; 3] = b"CHB";
const KIND_PING: u8 = 1;
const KIND_PONG: u8 = 2;
/// Encoded size.
pub const HEARTBEAT_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    Ping { seq: u64, sent_nanos: u64 },
    Pong { seq: u64, sent_nanos: u64 },
}

impl Heartbeat {
    pub fn encode(&self) -> [u8; HEARTBEAT_LEN] {
        let (kind, seq, ts) = match *self {
            Heartbeat::Ping { seq, sent_nanos } => (KIND_PING, seq, sent_nanos),
            Heartbeat::Pong { seq, sent_nanos } => (KIND_PONG, seq, sent_nanos),
        };
        let mut out = [0u8; HEARTBEAT_LEN];
        out[..3].copy_from_slice(MAGIC);
        out[3] = kind;
        out[4..12].copy_from_slice(&seq.to_be_bytes());
        out[12..20].copy_from_slice(&ts.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Heartbeat> {
        if bytes.len() != HEARTBEAT_LEN || &bytes[..3] != MAGIC {
            return None;
        }
        let seq = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
        let sent_nanos = u64::from_be_bytes(bytes[12..20].try_into().ok()?);
        match bytes[3] {
            KIND_PING => Some(Heartbeat::Ping { seq, sent_nanos }),
            KIND_PONG => Some(Heartbeat::Pong { seq, sent_nanos }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    sent_at: Duration,
    rtt: Option<Duration>,
}

/// Tracks the last `window` heartbeats sent to one peer.
///
/// A heartbeat counts as lost once it is older than `answer_within` and has
/// no answer; younger unanswered ones are "in flight" and count neither way,
/// so loss does not jump at every send.
#[derive(Debug, Clone)]
pub struct HeartbeatTracker {
    next_seq: u64,
    slots: VecDeque<Slot>,
    window: usize,
    answer_within: Duration,
    last_reply_at: Option<Duration>,
    sent_total: u64,
    answered_total: u64,
}

impl HeartbeatTracker {
    pub fn new(window: usize, answer_within: Duration) -> Self {
        Self {
            next_seq: 1,
            slots: VecDeque::with_capacity(window),
            window: window.max(1),
            answer_within,
            last_reply_at: None,
            sent_total: 0,
            answered_total: 0,
        }
    }

    /// Records a heartbeat sent at `now` and returns the ping to send.
    pub fn on_send(&mut self, now: Duration) -> Heartbeat {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.slots.len() == self.window {
            self.slots.pop_front();
        }
        self.slots.push_back(Slot {
            seq,
            sent_at: now,
            rtt: None,
        });
        self.sent_total += 1;
        Heartbeat::Ping {
            seq,
            sent_nanos: now.as_nanos() as u64,
        }
    }

    /// Records a pong; returns the RTT if it answers a heartbeat we sent and
    /// have not seen answered (duplicates and forgeries are ignored).
    pub fn on_pong(&mut self, seq: u64, sent_nanos: u64, now: Duration) -> Option<Duration> {
        let slot = self.slots.iter_mut().find(|s| s.seq == seq)?;
        if slot.rtt.is_some() || slot.sent_at.as_nanos() as u64 != sent_nanos {
            return None;
        }
        let rtt = now.saturating_sub(slot.sent_at);
        slot.rtt = Some(rtt);
        self.last_reply_at = Some(now);
        self.answered_total += 1;
        Some(rtt)
    }

    /// Fraction of settled heartbeats in the window that got no answer.
    pub fn loss_ratio(&self, now: Duration) -> f64 {
        let (mut settled, mut lost) = (0u32, 0u32);
        for s in &self.slots {
            if s.rtt.is_some() {
                settled += 1;
            } else if now.saturating_sub(s.sent_at) >= self.answer_within {
                settled += 1;
                lost += 1;
            }
        }
        if settled == 0 {
            0.0
        } else {
            f64::from(lost) / f64::from(settled)
        }
    }

    /// RTT quantile (0.0..=1.0) over answered heartbeats in the window.
    pub fn rtt_quantile(&self, q: f64) -> Option<Duration> {
        let mut rtts: Vec<Duration> = self.slots.iter().filter_map(|s| s.rtt).collect();
        if rtts.is_empty() {
            return None;
        }
        rtts.sort_unstable();
        let rank = ((q.clamp(0.0, 1.0) * rtts.len() as f64).ceil() as usize).max(1);
        rtts.get(rank - 1).copied()
    }

    /// Time since the last answer, or `None` if never answered.
    pub fn since_last_reply(&self, now: Duration) -> Option<Duration> {
        self.last_reply_at.map(|t| now.saturating_sub(t))
    }

    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }
    pub fn answered_total(&self) -> u64 {
        self.answered_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn wire_form_round_trips_and_rejects_garbage() {
        for hb in [
            Heartbeat::Ping {
                seq: 1,
                sent_nanos: 42,
            },
            Heartbeat::Pong {
                seq: u64::MAX,
                sent_nanos: 0,
            },
        ] {
            assert_eq!(Heartbeat::decode(&hb.encode()), Some(hb));
        }
        let mut bad = Heartbeat::Ping {
            seq: 1,
            sent_nanos: 1,
        }
        .encode();
        bad[3] = 9;
        assert_eq!(Heartbeat::decode(&bad), None);
        assert_eq!(Heartbeat::decode(b"CHB"), None);
    }

    #[test]
    fn rtt_loss_and_silence_follow_the_answers() {
        let mut t = HeartbeatTracker::new(10, 500 * MS);
        // 10 pings 100 ms apart; answer all but seq 3 and 7, each after 10*seq ms.
        let mut pings = Vec::new();
        for i in 0..10u64 {
            pings.push((t.on_send(ms(i * 100)), ms(i * 100)));
        }
        for (hb, sent) in &pings {
            let Heartbeat::Ping { seq, sent_nanos } = *hb else {
                unreachable!()
            };
            if seq == 3 || seq == 7 {
                continue;
            }
            let rtt = t.on_pong(seq, sent_nanos, *sent + ms(seq * 10));
            assert_eq!(rtt, Some(ms(seq * 10)));
            assert_eq!(t.on_pong(seq, sent_nanos, *sent + 999 * MS), None, "dup");
        }
        // At 2 s every ping is settled: 2 of 10 lost.
        let now = 2000 * MS;
        assert!((t.loss_ratio(now) - 0.2).abs() < 1e-9);
        assert_eq!(t.rtt_quantile(0.5), Some(50 * MS));
        assert_eq!(t.rtt_quantile(0.99), Some(100 * MS));
        assert_eq!(t.since_last_reply(now), Some(now - (900 * MS + 100 * MS)));
        assert_eq!(t.on_pong(99, 0, now), None, "never sent");
        assert_eq!(t.on_pong(1, 12345, now), None, "wrong timestamp");
    }

    #[test]
    fn in_flight_heartbeats_are_not_counted_as_lost() {
        let mut t = HeartbeatTracker::new(10, 500 * MS);
        t.on_send(Duration::ZERO);
        assert_eq!(t.loss_ratio(100 * MS), 0.0);
        assert_eq!(t.loss_ratio(600 * MS), 1.0);
        assert_eq!(t.since_last_reply(600 * MS), None);
    }
}
