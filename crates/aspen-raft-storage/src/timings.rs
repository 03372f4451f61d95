//! How long the log's disk syncs take, for the node's metrics: the journal's `fdatasync`,
//! which every acknowledged write waits for, and redb's durable commits (checkpoints,
//! truncations, purges, votes), which share the disk with it. These are the signals etcd
//! exports as `disk_wal_fsync_duration_seconds` and `disk_backend_commit_duration_seconds`;
//! a slow disk shows here before it shows as slow writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the duration histogram buckets, in microseconds.
pub const DISK_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

/// A sync slower than this is logged as a warning, as etcd does for its WAL fsync.
pub const SLOW_SYNC: Duration = Duration::from_secs(1);

/// A duration histogram with fixed buckets, updated without locks.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds of the buckets, microseconds, ascending.
    bounds: &'static [u64],
    count: AtomicU64,
    sum_us: AtomicU64,
    /// Per bucket of `bounds` (not cumulative); slower samples only count.
    buckets: Box<[AtomicU64]>,
}

/// What a [`Histogram`] held at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, microseconds.
    pub bounds: &'static [u64],
    /// Samples recorded.
    pub count: u64,
    /// Their sum, microseconds.
    pub sum_us: u64,
    /// Samples per bucket of `bounds` (not cumulative).
    pub buckets: Vec<u64>,
}

impl Histogram {
    /// An empty histogram with buckets up to each of `bounds` (microseconds, ascending).
    pub fn new(bounds: &'static [u64]) -> Self {
        let buckets = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Histogram { bounds, count: AtomicU64::new(0), sum_us: AtomicU64::new(0), buckets }
    }

    /// Records one sample.
    pub fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
        if let Some(bucket) = self.bounds.iter().position(|bound| micros <= *bound) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The current counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            count: self.count.load(Ordering::Relaxed),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            buckets: self.buckets.iter().map(|bucket| bucket.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// The log store's disk timings (see the module docs).
#[derive(Debug)]
pub struct DiskTimings {
    /// The journal's `fdatasync`s: the durability point of appends.
    pub journal_sync: Histogram,
    /// redb's durable commits.
    pub log_commit: Histogram,
}

impl Default for DiskTimings {
    fn default() -> Self {
        DiskTimings { journal_sync: Histogram::new(&DISK_BUCKETS_US), log_commit: Histogram::new(&DISK_BUCKETS_US) }
    }
}

impl DiskTimings {
    /// Records a journal sync that began `elapsed` ago, warning when it was slow.
    pub fn journal_synced(&self, elapsed: Duration) {
        self.journal_sync.record(elapsed);
        if elapsed >= SLOW_SYNC {
            tracing::warn!(took_ms = elapsed.as_millis() as u64, "slow fdatasync of the log journal");
        }
    }

    /// Records a durable redb commit that began `elapsed` ago, warning when it was slow.
    pub fn log_committed(&self, elapsed: Duration) {
        self.log_commit.record(elapsed);
        if elapsed >= SLOW_SYNC {
            tracing::warn!(took_ms = elapsed.as_millis() as u64, "slow durable commit of the log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_first_bucket_that_holds_them() {
        let histogram = Histogram::new(&DISK_BUCKETS_US);
        for micros in [50, 100, 101, 30_000, 2_000_000] {
            histogram.record(Duration::from_micros(micros));
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 5);
        assert_eq!(snapshot.sum_us, 50 + 100 + 101 + 30_000 + 2_000_000);
        let mut expected = [0; DISK_BUCKETS_US.len()];
        expected[0] = 2; // 50 and 100 us: at most 100
        expected[1] = 1; // 101 us
        expected[8] = 1; // 30 ms: at most 50 ms
        assert_eq!(snapshot.buckets, expected, "2 s is above every bucket and only counted");
    }
}
