//! Latency samples and their percentiles. Samples are kept whole (microseconds, one `u64`
//! each): a 5 s row at 50 K ops/s is 2 MB, and exact tails beat histogram buckets when
//! p99.9 is what separates two systems.

use serde::Serialize;

/// The latency distribution of one measured row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean, microseconds.
    pub mean_us: f64,
    /// Median, microseconds.
    pub p50_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// 99.9th percentile, microseconds.
    pub p999_us: u64,
    /// Slowest sample, microseconds.
    pub max_us: u64,
}

impl LatencySummary {
    /// Summarizes `samples` (microseconds, any order; sorted in place); all zero when there
    /// are none.
    pub fn from_samples(samples: &mut [u64]) -> Self {
        samples.sort_unstable();
        let count = samples.len() as u64;
        let total: u128 = samples.iter().map(|&sample| u128::from(sample)).sum();
        let mean_us = if count == 0 { 0.0 } else { total as f64 / count as f64 };
        let at = |p: f64| percentile(samples, p).unwrap_or(0);
        LatencySummary {
            count,
            mean_us,
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: samples.last().copied().unwrap_or(0),
        }
    }
}

/// The nearest-rank percentile of sorted samples: the smallest sample such that at least
/// `p` of all samples are at or below it. `None` for no samples or `p` outside `(0, 1]`.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 1.0) {
        return None;
    }
    // ceil(p * n) counts from 1; the product is rounded first so that 0.99 * 100 (which is
    // 99.00000000000001 in binary) ranks 99, not 100.
    let rank = ((p * sorted.len() as f64 * 1e9).round() / 1e9).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_thousand() {
        let samples: Vec<u64> = (1..=1000).collect();
        let cases = [(0.5, 500), (0.99, 990), (0.999, 999), (1.0, 1000), (0.0001, 1)];
        for (p, expected) in cases {
            assert_eq!(percentile(&samples, p), Some(expected), "p = {p}");
        }
    }

    #[test]
    fn percentiles_of_small_and_empty_sets() {
        let cases: [(&[u64], f64, Option<u64>); 6] = [
            (&[], 0.5, None),
            (&[7], 0.5, Some(7)),
            (&[7], 0.999, Some(7)),
            (&[1, 2], 0.5, Some(1)),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.99, Some(10)),
            (&[1, 2], 0.0, None),
        ];
        for (samples, p, expected) in cases {
            assert_eq!(percentile(samples, p), expected, "{samples:?} at {p}");
        }
        // Exactly 100 samples: p99 is the 99th, not the last.
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 0.99), Some(99));
    }

    #[test]
    fn summary_sorts_and_reports_every_field() {
        let mut samples: Vec<u64> = (1..=2000).rev().collect();
        samples.push(1_000_000);
        let summary = LatencySummary::from_samples(&mut samples);
        assert_eq!(summary.count, 2001);
        assert_eq!(summary.p50_us, 1001);
        assert_eq!(summary.p99_us, 1981);
        assert_eq!(summary.p999_us, 1999);
        assert_eq!(summary.max_us, 1_000_000);
        assert!((summary.mean_us - (2000.0 * 2001.0 / 2.0 + 1e6) / 2001.0).abs() < 1e-6);
        assert_eq!(LatencySummary::from_samples(&mut []), LatencySummary::default());
    }
}
