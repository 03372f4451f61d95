//! The report: what was run where, the fsync baseline, and one Aspen/etcd comparison per
//! workload and concurrency, as markdown tables and as JSON.

use std::fmt::Write;

use serde::Serialize;

use crate::failover::Failover;
use crate::fsync::{FsyncProbe, perfect_batcher_ops_per_sec};
use crate::workload::{Measurement, Workload};

/// How the run was configured.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Measured seconds per row and system.
    pub secs_per_row: f64,
    /// Unmeasured warmup before each row, seconds.
    pub warmup_secs: f64,
    /// A/B rounds; rows of all rounds are merged.
    pub rounds: usize,
    /// Bytes per value.
    pub value_bytes: usize,
    /// Keys preloaded and read.
    pub key_space: u64,
    /// Keys returned per scan.
    pub scan_keys: u32,
    /// Keys contended by the CAS workload.
    pub hot_keys: usize,
    /// Client connections per system (clients are spread over them).
    pub connections: usize,
}

/// Where it ran.
#[derive(Clone, Debug, Serialize)]
pub struct Environment {
    /// Logical CPUs.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// etcd's reported server version.
    pub etcd_version: String,
    /// Directory holding both clusters' data and the fsync probe.
    pub data_dir: String,
    /// /proc/loadavg before the clusters started (other work on the machine shows here).
    pub load_average_before: String,
}

/// One workload at one concurrency on both systems.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// What the clients did.
    pub workload: Workload,
    /// How many closed-loop clients.
    pub clients: usize,
    /// Aspen's result.
    pub aspen: Measurement,
    /// etcd's result.
    pub etcd: Measurement,
    /// Aspen ops/s divided by etcd ops/s (`None` when etcd completed nothing).
    pub ops_ratio: Option<f64>,
    /// The same ratio for each A/B round on its own, in round order: their spread shows
    /// how much of a row's ratio is this machine's drift.
    pub round_ratios: Vec<Option<f64>>,
    /// Write-only workloads: the disk's fsync rate probed just before this row.
    pub fsyncs_per_sec: Option<f64>,
    /// Write-only workloads: the perfect batcher's ops/s at this concurrency and fsync rate.
    pub batcher_bound_ops_per_sec: Option<f64>,
}

impl Comparison {
    /// Pairs two measurements of one step; `fsyncs_per_sec` (the disk's rate at the time)
    /// gives write-only workloads their bound.
    pub fn new(
        workload: Workload,
        clients: usize,
        aspen: Measurement,
        etcd: Measurement,
        fsyncs_per_sec: Option<f64>,
    ) -> Self {
        let ops_ratio = ops_ratio(aspen.ops_per_sec, etcd.ops_per_sec);
        let fsyncs_per_sec = fsyncs_per_sec.filter(|_| workload.writes_only());
        let batcher_bound_ops_per_sec = fsyncs_per_sec.map(|rate| perfect_batcher_ops_per_sec(clients, rate));
        Comparison {
            workload,
            clients,
            aspen,
            etcd,
            ops_ratio,
            round_ratios: Vec::new(),
            fsyncs_per_sec,
            batcher_bound_ops_per_sec,
        }
    }

    /// Adds the per-round ratios from each round's ops/s (`aspen[i]` and `etcd[i]` ran in
    /// round `i`; a round only one system has is left out).
    pub fn with_rounds(mut self, aspen: &[f64], etcd: &[f64]) -> Self {
        self.round_ratios = aspen.iter().zip(etcd).map(|(aspen, etcd)| ops_ratio(*aspen, *etcd)).collect();
        self
    }
}

/// Aspen ops/s over etcd ops/s, `None` when etcd completed nothing.
fn ops_ratio(aspen: f64, etcd: f64) -> Option<f64> {
    (etcd > 0.0).then(|| aspen / etcd)
}

fn ratio(ratio: Option<f64>) -> String {
    ratio.map_or("-".into(), |ratio| format!("{ratio:.2}"))
}

/// A workload left out, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// The workload.
    pub workload: String,
    /// Why it was not run.
    pub reason: String,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// How it was configured.
    pub settings: Settings,
    /// Where it ran.
    pub environment: Environment,
    /// The disk's fsync rate before the clusters started.
    pub fsync_before: FsyncProbe,
    /// The disk's fsync rate after the load, clusters idle.
    pub fsync_after: Option<FsyncProbe>,
    /// The faster of the before and after probes, fsyncs/s (each write row's bound uses
    /// its own probe).
    pub fsyncs_per_sec: f64,
    /// The comparisons, in plan order.
    pub rows: Vec<Comparison>,
    /// Workloads not run.
    pub skipped: Vec<Skipped>,
    /// Failover rounds (`--workloads failover`), in order.
    pub failover: Vec<FailoverRound>,
}

/// One failover round: each system's leader SIGKILLed under a closed-loop writer.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRound {
    /// Aspen's measurement.
    pub aspen: Failover,
    /// etcd's measurement.
    pub etcd: Failover,
}

fn optional_ms(ms: Option<f64>) -> String {
    ms.map_or("none".into(), |ms| format!("{ms:.0}"))
}

/// The median of `values` (the upper one of an even count), `None` for none.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// The markdown table of the failover rounds, with a median row when there are several.
pub fn failover_table(rounds: &[FailoverRound]) -> String {
    let mut out = String::from(
        "| round | Aspen: killed | first ack ms | longest gap ms | etcd: killed | first ack ms | longest gap ms | \
         failed writes Aspen / etcd |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (index, round) in rounds.iter().enumerate() {
        let (aspen, etcd) = (&round.aspen, &round.etcd);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} | {:.0} | {} / {} |",
            index + 1,
            aspen.killed,
            optional_ms(aspen.first_ack_ms),
            aspen.longest_gap_ms,
            etcd.killed,
            optional_ms(etcd.first_ack_ms),
            etcd.longest_gap_ms,
            aspen.errors,
            etcd.errors
        );
    }
    if rounds.len() > 1 {
        let first_ack = |pick: fn(&FailoverRound) -> &Failover| {
            let all: Option<Vec<f64>> = rounds.iter().map(|round| pick(round).first_ack_ms).collect();
            all.and_then(median)
        };
        let gap = |pick: fn(&FailoverRound) -> &Failover| {
            median(rounds.iter().map(|round| pick(round).longest_gap_ms).collect())
        };
        let _ = writeln!(
            out,
            "| median | | {} | {} | | {} | {} | |",
            optional_ms(first_ack(|round| &round.aspen)),
            optional_ms(gap(|round| &round.aspen)),
            optional_ms(first_ack(|round| &round.etcd)),
            optional_ms(gap(|round| &round.etcd)),
        );
    }
    out
}

/// The faster of the probes taken: an upper bound on the disk's rate during the run.
pub fn baseline_fsyncs_per_sec(before: &FsyncProbe, after: Option<&FsyncProbe>) -> f64 {
    after.map_or(before.fsyncs_per_sec, |after| before.fsyncs_per_sec.max(after.fsyncs_per_sec))
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn latencies(measurement: &Measurement) -> String {
    let latency = &measurement.latency;
    format!("{} / {} / {}", ms(latency.p50_us), ms(latency.p99_us), ms(latency.p999_us))
}

fn percent(part: f64, whole: f64) -> String {
    if whole > 0.0 { format!("{:.0}%", 100.0 * part / whole) } else { "-".into() }
}

fn cas_won(measurement: &Measurement) -> String {
    match measurement.cas_succeeded {
        Some(won) => percent(won as f64, measurement.ops as f64),
        None => "-".into(),
    }
}

/// The markdown table of one workload's rows.
pub fn workload_table(workload: Workload, rows: &[&Comparison]) -> String {
    let mut header = vec!["clients", "Aspen ops/s", "etcd ops/s", "Aspen/etcd"];
    let per_round = rows.iter().any(|row| row.round_ratios.len() > 1);
    if per_round {
        header.push("Aspen/etcd per round");
    }
    header.extend(["Aspen p50 / p99 / p99.9 ms", "etcd p50 / p99 / p99.9 ms", "errors Aspen / etcd"]);
    if workload.writes_only() {
        header.extend(["disk fsyncs/s", "perfect batcher ops/s", "Aspen of bound", "etcd of bound"]);
    }
    if workload == Workload::Cas {
        header.push("CAS won Aspen / etcd");
    }
    let mut out = format!("| {} |\n|{}\n", header.join(" | "), " --- |".repeat(header.len()));
    for row in rows {
        let mut cells = vec![
            row.clients.to_string(),
            format!("{:.0}", row.aspen.ops_per_sec),
            format!("{:.0}", row.etcd.ops_per_sec),
            ratio(row.ops_ratio),
        ];
        if per_round {
            cells.push(row.round_ratios.iter().map(|round| ratio(*round)).collect::<Vec<_>>().join(" / "));
        }
        cells.extend([
            latencies(&row.aspen),
            latencies(&row.etcd),
            format!("{} / {}", row.aspen.errors, row.etcd.errors),
        ]);
        if workload.writes_only() {
            let bound = row.batcher_bound_ops_per_sec.unwrap_or(0.0);
            cells.extend([
                row.fsyncs_per_sec.map_or("-".into(), |rate| format!("{rate:.0}")),
                format!("{bound:.0}"),
                percent(row.aspen.ops_per_sec, bound),
                percent(row.etcd.ops_per_sec, bound),
            ]);
        }
        if workload == Workload::Cas {
            cells.push(format!("{} / {}", cas_won(&row.aspen), cas_won(&row.etcd)));
        }
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

impl Report {
    /// The whole report as markdown: settings, the fsync baseline and its model, one table
    /// per workload, the skipped workloads, and the first error of any row that had errors.
    pub fn markdown(&self) -> String {
        let settings = &self.settings;
        let environment = &self.environment;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "3-node Aspen vs 3-node etcd {}, same machine ({} CPUs, Linux {}, load average before: {}), loopback, \
             fsync on, data on one disk ({}). Closed-loop clients over {} connections to the leader per system, {} B values over {} keys, \
             {:.0} s measured per row after {:.1} s warmup, {} A/B round(s).\n",
            environment.etcd_version,
            environment.cpus,
            environment.kernel,
            environment.load_average_before,
            environment.data_dir,
            settings.connections,
            settings.value_bytes,
            settings.key_space,
            settings.secs_per_row,
            settings.warmup_secs,
            settings.rounds,
        );
        let probe = |probe: &FsyncProbe| {
            format!(
                "{:.0} fsyncs/s (p50 {} ms, p99 {} ms)",
                probe.fsyncs_per_sec,
                ms(probe.latency.p50_us),
                ms(probe.latency.p99_us)
            )
        };
        let after = self
            .fsync_after
            .as_ref()
            .map_or(String::new(), |after| format!(", {} after the run and a `sync`", probe(after)));
        let _ = writeln!(
            out,
            "Physical limit: write + fdatasync of one {} B block in a loop, in the data dir: {} before the run{after}; \
             this disk's rate drifts within a run, so each write row is bounded by the faster of the short probes \
             taken just before it (column \"disk fsyncs/s\"). A perfect batcher commits every outstanding write in \
             the next fsync, so N closed-loop writers get at most min(N, {}) x fsyncs/s. Raft needs a leader and a \
             follower fsync per commit (on the same disk here) plus CPU and network, so real systems sit below it.\n",
            crate::fsync::PROBE_BLOCK_BYTES,
            probe(&self.fsync_before),
            aspen_api::limits::MAX_BATCH_SIZE,
        );
        for workload in Workload::ALL {
            let rows: Vec<&Comparison> = self.rows.iter().filter(|row| row.workload == workload).collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(out, "### {}\n\n{}", workload.title(), workload_table(workload, &rows));
        }
        for skipped in &self.skipped {
            let _ = writeln!(out, "### {}\n\nSkipped: {}\n", skipped.workload, skipped.reason);
        }
        if !self.failover.is_empty() {
            let _ = writeln!(
                out,
                "### Failover: the leader SIGKILLed under a closed-loop writer\n\n\
                 One writer per system, through a client given all three members (aspen-client; for etcd, the \
                 gRPC client moving to the next member after a failed write, as an application on etcd's client \
                 does), writing for {} s before the leader's process is SIGKILLed. \"first ack\": from the kill \
                 to the acknowledgement of the first write sent after it; \"longest gap\": the longest time \
                 between two acknowledged writes. The killed member is restarted and caught up between rounds.\n\n{}",
                crate::failover::BEFORE_KILL.as_secs(),
                failover_table(&self.failover)
            );
            for (system, first) in [
                ("Aspen", self.failover.iter().find_map(|round| round.aspen.first_error.as_ref())),
                ("etcd", self.failover.iter().find_map(|round| round.etcd.first_error.as_ref())),
            ] {
                if let Some(error) = first {
                    let _ = writeln!(out, "- {system}'s first failed write: {error}");
                }
            }
            let _ = writeln!(out);
        }
        let errors: Vec<String> = self
            .rows
            .iter()
            .flat_map(|row| {
                [("Aspen", &row.aspen), ("etcd", &row.etcd)].into_iter().filter_map(move |(system, measurement)| {
                    measurement.first_error.as_ref().map(|error| {
                        format!(
                            "- {system}, {} x{}: {} errors, first: {error}",
                            row.workload.name(),
                            row.clients,
                            measurement.errors
                        )
                    })
                })
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(out, "Errors:\n{}\n", errors.join("\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::LatencySummary;

    fn measured(ops_per_sec: f64, p50_us: u64, errors: u64, cas: Option<u64>) -> Measurement {
        let latency =
            LatencySummary { count: 100, p50_us, p99_us: p50_us * 2, p999_us: p50_us * 3, ..Default::default() };
        Measurement { ops: 100, seconds: 1.0, ops_per_sec, latency, errors, first_error: None, cas_succeeded: cas }
    }

    #[test]
    fn put_table_has_ratio_and_bound_columns() {
        let row = Comparison::new(
            Workload::Put,
            16,
            measured(4000.0, 2500, 0, None),
            measured(2000.0, 5000, 1, None),
            Some(500.0),
        );
        assert_eq!(row.ops_ratio, Some(2.0));
        assert_eq!(row.batcher_bound_ops_per_sec, Some(8000.0));
        let expected = "\
| clients | Aspen ops/s | etcd ops/s | Aspen/etcd | Aspen p50 / p99 / p99.9 ms | etcd p50 / p99 / p99.9 ms | errors Aspen / etcd | disk fsyncs/s | perfect batcher ops/s | Aspen of bound | etcd of bound |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| 16 | 4000 | 2000 | 2.00 | 2.50 / 5.00 / 7.50 | 5.00 / 10.00 / 15.00 | 0 / 1 | 500 | 8000 | 50% | 25% |
";
        assert_eq!(workload_table(Workload::Put, &[&row]), expected);
    }

    #[test]
    fn read_and_cas_tables_show_only_their_columns() {
        let get = Comparison::new(
            Workload::GetLinearizable,
            1,
            measured(900.0, 1000, 0, None),
            measured(0.0, 0, 5, None),
            Some(500.0),
        );
        assert_eq!(get.ops_ratio, None);
        assert_eq!((get.fsyncs_per_sec, get.batcher_bound_ops_per_sec), (None, None), "no bound for reads");
        let table = workload_table(Workload::GetLinearizable, &[&get]);
        assert!(table.ends_with("| 1 | 900 | 0 | - | 1.00 / 2.00 / 3.00 | 0.00 / 0.00 / 0.00 | 0 / 5 |\n"), "{table}");

        let cas = Comparison::new(
            Workload::Cas,
            64,
            measured(100.0, 1000, 0, Some(25)),
            measured(100.0, 1000, 0, Some(50)),
            Some(10.0),
        );
        let table = workload_table(Workload::Cas, &[&cas]);
        assert!(table.starts_with("| clients |") && table.contains("| CAS won Aspen / etcd |"), "{table}");
        assert!(table.ends_with("| 10 | 640 | 16% | 16% | 25% / 50% |\n"), "{table}");
        let unprobed = Comparison::new(Workload::Put, 1, measured(1.0, 1, 0, None), measured(1.0, 1, 0, None), None);
        assert!(workload_table(Workload::Put, &[&unprobed]).ends_with("| - | 0 | - | - |\n"));
    }

    #[test]
    fn several_rounds_add_a_per_round_ratio_column() {
        let merged = Comparison::new(
            Workload::GetLinearizable,
            16,
            measured(3000.0, 500, 0, None),
            measured(2000.0, 900, 0, None),
            None,
        );
        let two = merged.clone().with_rounds(&[2000.0, 4000.0, 10.0], &[2000.0, 2000.0, 0.0]);
        assert_eq!(two.round_ratios, vec![Some(1.0), Some(2.0), None]);
        let table = workload_table(Workload::GetLinearizable, &[&two]);
        assert!(
            table.starts_with("| clients | Aspen ops/s | etcd ops/s | Aspen/etcd | Aspen/etcd per round | Aspen p50"),
            "{table}"
        );
        assert!(
            table.ends_with(
                "| 16 | 3000 | 2000 | 1.50 | 1.00 / 2.00 / - | 0.50 / 1.00 / 1.50 | 0.90 / 1.80 / 2.70 | 0 / 0 |\n"
            ),
            "{table}"
        );
        let one = merged.with_rounds(&[3000.0], &[2000.0]);
        assert!(!workload_table(Workload::GetLinearizable, &[&one]).contains("per round"), "one round: no column");
    }

    #[test]
    fn failover_table_has_a_row_per_round_and_a_median() {
        let run = |killed: &str, first_ack_ms, longest_gap_ms, errors| Failover {
            killed: killed.into(),
            first_ack_ms,
            longest_gap_ms,
            acked: 100,
            errors,
            first_error: None,
        };
        let rounds = [
            FailoverRound { aspen: run("node 1", Some(1000.4), 1001.0, 0), etcd: run("e2", Some(1600.0), 1602.0, 9) },
            FailoverRound { aspen: run("node 2", Some(1200.0), 1203.0, 0), etcd: run("e3", None, 30000.0, 90) },
        ];
        let table = failover_table(&rounds);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert_eq!(lines[2], "| 1 | node 1 | 1000 | 1001 | e2 | 1600 | 1602 | 0 / 9 |");
        assert_eq!(lines[3], "| 2 | node 2 | 1200 | 1203 | e3 | none | 30000 | 0 / 90 |");
        // A round that never recovered has no first ack, so neither has the median.
        assert_eq!(lines[4], "| median | | 1200 | 1203 | | none | 30000 | |");
        assert_eq!(failover_table(&rounds[..1]).lines().count(), 3, "one round: no median row");
    }

    #[test]
    fn baseline_is_the_faster_probe() {
        let probe = |rate| FsyncProbe { fsyncs_per_sec: rate, latency: LatencySummary::default() };
        assert_eq!(baseline_fsyncs_per_sec(&probe(400.0), Some(&probe(600.0))), 600.0);
        assert_eq!(baseline_fsyncs_per_sec(&probe(600.0), Some(&probe(400.0))), 600.0);
        assert_eq!(baseline_fsyncs_per_sec(&probe(400.0), None), 400.0);
    }
}
