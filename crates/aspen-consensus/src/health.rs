//! The failure detector and clock-drift detector.
//!
//! A single failed RPC makes a peer *suspect*; only failures that continue for
//! [`DOWN_AFTER_FAILURES`] consecutive RPCs over at least [`DOWN_AFTER`] make it *down*, so
//! a dropped packet or a slow fsync is told apart from a crashed node. Clock offsets come
//! from RPC round trips (peer clock vs. the midpoint of the local send and receive times)
//! and only ever raise warnings: consensus does not use clocks for safety.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aspen_api::{ClockDrift, Liveness, NodeId, PeerHealth};

/// Consecutive failures before a peer can be called down.
pub const DOWN_AFTER_FAILURES: u32 = 3;
/// How long failures must persist (from the start of the first failed attempt) before a
/// peer can be called down. Attempts to a dead peer can each take a whole connect timeout,
/// so the window counts from when the first failing attempt began.
pub const DOWN_AFTER: Duration = Duration::from_secs(3);
/// Clock offset that raises a warning.
pub const CLOCK_WARN_MS: i64 = 100;
/// Clock offset that raises an alert.
pub const CLOCK_ALERT_MS: i64 = 500;
/// Round trips slower than this give too loose an offset bound to record.
pub const MAX_CLOCK_SAMPLE_RTT: Duration = Duration::from_millis(500);
/// Most peers tracked (the membership limit).
const MAX_TRACKED: usize = aspen_api::limits::MAX_PEERS * 2;

#[derive(Debug, Default)]
struct Record {
    consecutive_failures: u32,
    failing_since: Option<Instant>,
    last_error: Option<String>,
    clock_offset_ms: Option<i64>,
    reported: Option<(Liveness, ClockDrift)>,
}

impl Record {
    fn liveness(&self, now: Instant) -> Liveness {
        match self.failing_since {
            None => Liveness::Healthy,
            Some(since) if self.consecutive_failures >= DOWN_AFTER_FAILURES && now - since >= DOWN_AFTER => {
                Liveness::Down
            }
            Some(_) => Liveness::Suspect,
        }
    }

    fn clock(&self) -> ClockDrift {
        match self.clock_offset_ms.map(i64::abs) {
            None => ClockDrift::Unknown,
            Some(offset) if offset >= CLOCK_ALERT_MS => ClockDrift::Alert,
            Some(offset) if offset >= CLOCK_WARN_MS => ClockDrift::Warn,
            Some(_) => ClockDrift::Ok,
        }
    }
}

/// Per-peer liveness and clock offsets, fed by every RPC this node makes.
#[derive(Debug, Default)]
pub struct HealthTracker {
    peers: Mutex<BTreeMap<NodeId, Record>>,
}

impl HealthTracker {
    fn update(&self, node: NodeId, change: impl FnOnce(&mut Record)) {
        let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !peers.contains_key(&node) && peers.len() >= MAX_TRACKED {
            return;
        }
        let record = peers.entry(node).or_default();
        change(record);
        let now_state = (record.liveness(Instant::now()), record.clock());
        if record.reported != Some(now_state) {
            match now_state {
                (Liveness::Down, _) => tracing::warn!(node, error = ?record.last_error, "peer is down"),
                (_, ClockDrift::Alert) => {
                    tracing::error!(node, offset_ms = ?record.clock_offset_ms, "peer clock drift alert")
                }
                (_, ClockDrift::Warn) => tracing::warn!(node, offset_ms = ?record.clock_offset_ms, "peer clock drift"),
                (Liveness::Healthy, _) if record.reported.is_some_and(|(old, _)| old != Liveness::Healthy) => {
                    tracing::info!(node, "peer recovered")
                }
                _ => {}
            }
            record.reported = Some(now_state);
        }
    }

    /// Records a successful RPC to `node`.
    pub fn record_success(&self, node: NodeId) {
        self.update(node, |record| {
            record.consecutive_failures = 0;
            record.failing_since = None;
            record.last_error = None;
        });
    }

    /// Records a failed RPC to `node` that was started at `started`.
    pub fn record_failure(&self, node: NodeId, started: Instant, error: &str) {
        self.update(node, |record| {
            record.consecutive_failures = record.consecutive_failures.saturating_add(1);
            record.failing_since.get_or_insert(started);
            record.last_error = Some(error.to_string());
        });
    }

    /// Records a clock sample: the peer's clock read at `peer_ms` during a round trip that
    /// left at `sent_ms` and returned at `received_ms` (all Unix milliseconds).
    pub fn record_clock(&self, node: NodeId, sent_ms: i64, peer_ms: i64, received_ms: i64) {
        let rtt = received_ms.saturating_sub(sent_ms);
        if rtt < 0 || rtt as u128 > MAX_CLOCK_SAMPLE_RTT.as_millis() {
            return;
        }
        let midpoint = sent_ms + rtt / 2;
        self.update(node, |record| record.clock_offset_ms = Some(peer_ms - midpoint));
    }

    /// Every tracked peer's state.
    pub fn snapshot(&self) -> Vec<PeerHealth> {
        let now = Instant::now();
        let peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        peers
            .iter()
            .map(|(node_id, record)| PeerHealth {
                node_id: *node_id,
                liveness: record.liveness(now),
                consecutive_failures: record.consecutive_failures,
                last_error: record.last_error.clone(),
                clock_offset_ms: record.clock_offset_ms,
                clock: record.clock(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failure_is_suspect_not_down_and_success_heals() {
        let tracker = HealthTracker::default();
        tracker.record_failure(2, Instant::now(), "timeout");
        assert_eq!(tracker.snapshot()[0].liveness, Liveness::Suspect);
        for _ in 0..10 {
            tracker.record_failure(2, Instant::now(), "refused");
        }
        // Many failures in a burst shorter than the window: still only suspect.
        assert_eq!(tracker.snapshot()[0].liveness, Liveness::Suspect);
        tracker.record_success(2);
        let healed = &tracker.snapshot()[0];
        assert_eq!((healed.liveness, healed.consecutive_failures), (Liveness::Healthy, 0));
    }

    #[test]
    fn failures_over_the_window_mean_down() {
        let tracker = HealthTracker::default();
        tracker.update(3, |record| {
            record.consecutive_failures = DOWN_AFTER_FAILURES;
            record.failing_since = Instant::now().checked_sub(DOWN_AFTER + Duration::from_millis(1));
        });
        assert_eq!(tracker.snapshot()[0].liveness, Liveness::Down);
    }

    #[test]
    fn clock_offsets_are_classified_and_slow_samples_ignored() {
        let tracker = HealthTracker::default();
        let cases = [
            (1_000, 1_010, 1_020, ClockDrift::Ok),
            (1_000, 1_160, 1_020, ClockDrift::Warn),
            (1_000, 410, 1_020, ClockDrift::Alert),
        ];
        for (sent, peer, received, expected) in cases {
            tracker.record_clock(4, sent, peer, received);
            assert_eq!(tracker.snapshot()[0].clock, expected, "peer clock {peer}");
        }
        tracker.record_clock(4, 0, 0, 10_000);
        assert_eq!(tracker.snapshot()[0].clock_offset_ms, Some(410 - 1_010), "a 10 s round trip is not a sample");
    }
}
