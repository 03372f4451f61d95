//! The physical limit: how many fsyncs per second this disk does, and what a perfect write
//! batcher would make of them.
//!
//! The model: a durable write is acknowledged only after an fsync that covers it. A perfect
//! batcher puts every write outstanding at that moment into the next fsync, so with N
//! closed-loop clients each fsync commits up to N writes (at most the batch limit) and
//! `ops/s <= min(N, batch limit) * fsyncs/s`. It is an upper bound: it counts one fsync on
//! the critical path, while Raft needs the leader's and a follower's (in parallel at best,
//! on the same disk here), and it ignores CPU, network and the state machine.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::latency::LatencySummary;

/// Bytes written before each fsync: one small block, like a small log append.
pub const PROBE_BLOCK_BYTES: usize = 512;
/// Most fsyncs one probe issues, whatever its duration.
const PROBE_FSYNCS_MAX: usize = 1_000_000;

/// What the probe measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct FsyncProbe {
    /// fsyncs (write + fdatasync) completed per second.
    pub fsyncs_per_sec: f64,
    /// Latency of one write + fdatasync.
    pub latency: LatencySummary,
}

/// Writes one small block and fdatasyncs it, in a tight loop, for `duration`, in a file in
/// `dir` (so it measures the disk the clusters use). The file is removed afterwards.
pub fn probe(dir: &Path, duration: Duration) -> std::io::Result<FsyncProbe> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    // Allocate the block first so the loop measures overwrite + data sync, not metadata.
    file.write_all(&[0; PROBE_BLOCK_BYTES])?;
    file.sync_all()?;
    let mut samples = Vec::new();
    let block = [0x5a_u8; PROBE_BLOCK_BYTES];
    let started = Instant::now();
    while started.elapsed() < duration && samples.len() < PROBE_FSYNCS_MAX {
        let one = Instant::now();
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        samples.push(one.elapsed().as_micros() as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    let fsyncs_per_sec = if seconds > 0.0 { samples.len() as f64 / seconds } else { 0.0 };
    Ok(FsyncProbe { fsyncs_per_sec, latency: LatencySummary::from_samples(&mut samples) })
}

/// The perfect batcher's throughput with `clients` closed-loop writers (see the module doc).
pub fn perfect_batcher_ops_per_sec(clients: usize, fsyncs_per_sec: f64) -> f64 {
    clients.min(aspen_api::limits::MAX_BATCH_SIZE) as f64 * fsyncs_per_sec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_batcher_scales_with_clients_up_to_the_batch_limit() {
        assert_eq!(perfect_batcher_ops_per_sec(1, 500.0), 500.0);
        assert_eq!(perfect_batcher_ops_per_sec(64, 500.0), 32_000.0);
        let limit = aspen_api::limits::MAX_BATCH_SIZE;
        assert_eq!(perfect_batcher_ops_per_sec(limit * 4, 10.0), limit as f64 * 10.0);
    }

    #[test]
    fn probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let probe = probe(dir.path(), Duration::from_millis(50)).expect("probe");
        assert!(probe.fsyncs_per_sec > 0.0);
        assert!(probe.latency.count > 0);
        assert!(probe.latency.p50_us <= probe.latency.max_us);
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0, "probe file removed");
    }
}
