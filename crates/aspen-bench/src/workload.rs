//! The workloads and the closed-loop load generator. N clients each issue their next request
//! when the last returns; the same code, key space and values drive both systems.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::latency::LatencySummary;
use crate::target::{KvTarget, OpError};

/// Bytes in every value written.
pub const VALUE_SIZE: usize = 256;
/// Keys preloaded and read: `bench/00000` .. `bench/09999`.
pub const KEY_SPACE: u64 = 10_000;
/// Keys per scan: a prefix `bench/NNN` covers 100 consecutive keys.
pub const SCAN_KEYS: u32 = 100;
/// Keys contended by the compare-and-swap workload.
pub const HOT_KEYS: usize = 8;
/// Share of writes in the mixed workload, percent.
pub const MIXED_WRITE_PERCENT: u64 = 10;
/// Longest one operation may take before it counts as an error.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most clients one row may run.
pub const MAX_CLIENTS: usize = 1024;

/// What the clients of one row do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Put a 256 B value at a random key.
    Put,
    /// Linearizable read of a random key (etcd default; Aspen ReadIndex).
    GetLinearizable,
    /// Local read of a random key (etcd `serializable`; Aspen `ReadConsistency::Stale`).
    GetSerializable,
    /// 90% linearizable reads, 10% puts.
    Mixed,
    /// Linearizable prefix scan returning 100 keys of 256 B.
    Scan,
    /// Compare-and-swap on the mod revision of one of 8 hot keys (read-your-revision loop).
    Cas,
}

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 6] = [
        Workload::Put,
        Workload::GetLinearizable,
        Workload::GetSerializable,
        Workload::Mixed,
        Workload::Scan,
        Workload::Cas,
    ];

    /// Short name, for `--workloads` and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::GetLinearizable => "get",
            Workload::GetSerializable => "stale-get",
            Workload::Mixed => "mixed",
            Workload::Scan => "scan",
            Workload::Cas => "cas",
        }
    }

    /// Heading of its table.
    pub fn title(self) -> &'static str {
        match self {
            Workload::Put => "Put, 256 B values",
            Workload::GetLinearizable => "Linearizable get",
            Workload::GetSerializable => "Serializable / stale get (etcd serializable=true, Aspen Stale)",
            Workload::Mixed => "Mixed: 90% linearizable get, 10% put",
            Workload::Scan => "Prefix scan, 100 keys of 256 B (linearizable)",
            Workload::Cas => "Txn compare-and-swap on mod revision, 8 hot keys",
        }
    }

    /// Whether every operation is a durable write, so the fsync bound applies.
    pub fn writes_only(self) -> bool {
        matches!(self, Workload::Put | Workload::Cas)
    }

    /// Parses a short name.
    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|workload| workload.name() == name)
    }
}

/// One row of the plan: a workload at a concurrency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// What the clients do.
    pub workload: Workload,
    /// How many closed-loop clients.
    pub clients: usize,
}

/// The full plan: writes and reads across concurrencies, the rest at the concurrencies
/// where a difference would show.
pub fn full_plan() -> Vec<Step> {
    let rows: [(Workload, &[usize]); 6] = [
        (Workload::Put, &[1, 16, 64, 256]),
        (Workload::GetLinearizable, &[1, 16, 64, 256]),
        (Workload::GetSerializable, &[1, 16, 64, 256]),
        (Workload::Mixed, &[16, 64, 256]),
        (Workload::Scan, &[1, 16, 64]),
        (Workload::Cas, &[1, 16, 64]),
    ];
    rows.iter()
        .flat_map(|(workload, counts)| counts.iter().map(|&clients| Step { workload: *workload, clients }))
        .collect()
}

/// A smoke run: every workload once, at 16 clients.
pub fn quick_plan() -> Vec<Step> {
    Workload::ALL.into_iter().map(|workload| Step { workload, clients: 16 }).collect()
}

/// The key with number `index` (taken modulo the key space).
pub fn key(index: u64) -> Vec<u8> {
    format!("bench/{:05}", index % KEY_SPACE).into_bytes()
}

/// The scan prefix with number `index`: `bench/NNN` covers keys `bench/NNN00..=bench/NNN99`.
pub fn scan_prefix(index: u64) -> Vec<u8> {
    format!("bench/{:03}", index % (KEY_SPACE / u64::from(SCAN_KEYS))).into_bytes()
}

/// Hot key `index` of the compare-and-swap workload.
pub fn hot_key(index: usize) -> Vec<u8> {
    format!("hot/{}", index % HOT_KEYS).into_bytes()
}

/// The value written: `VALUE_SIZE` bytes.
pub fn value(seed: u64) -> Vec<u8> {
    let byte = b'a' + (seed % 26) as u8;
    vec![byte; VALUE_SIZE]
}

/// splitmix64: a small, fast, seedable generator, so each client's key sequence is the same
/// on both systems.
#[derive(Clone, Debug)]
pub struct KeyPicker(u64);

impl KeyPicker {
    /// A generator for client `client` of a row.
    pub fn new(client: usize) -> Self {
        KeyPicker(0x9E37_79B9_7F4A_7C15 ^ (client as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// What one row measured on one system.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Measurement {
    /// Operations completed inside the measurement window.
    pub ops: u64,
    /// Length of the measurement window, seconds.
    pub seconds: f64,
    /// Completed operations per second.
    pub ops_per_sec: f64,
    /// Latency of the completed operations.
    pub latency: LatencySummary,
    /// Operations that failed inside the window.
    pub errors: u64,
    /// The first error, for the report.
    pub first_error: Option<String>,
    /// Compare-and-swap only: how many of `ops` found the expected revision.
    pub cas_succeeded: Option<u64>,
}

/// One run of a row on one system: the measurement and its raw latency samples
/// (microseconds), kept so that rounds can be merged.
#[derive(Clone, Debug, Default)]
pub struct RowRun {
    /// What was measured.
    pub measurement: Measurement,
    /// Every latency sample of the window.
    pub samples: Vec<u64>,
    /// (end, latency) of every sample, microseconds, the end counted from the row's start
    /// (`aspen-bench --timeline-dir`).
    pub timeline: Vec<(u64, u64)>,
    /// The row's start, microseconds since the Unix epoch.
    pub epoch_unix_us: u64,
}

impl Measurement {
    /// Combines rounds of the same row: totals, and percentiles over every sample.
    pub fn merge(runs: Vec<RowRun>) -> Measurement {
        let mut merged = Measurement::default();
        let mut samples = Vec::new();
        for RowRun { measurement: part, samples: part_samples, .. } in runs {
            merged.ops += part.ops;
            merged.seconds += part.seconds;
            merged.errors += part.errors;
            merged.first_error = merged.first_error.or(part.first_error);
            merged.cas_succeeded = match (merged.cas_succeeded, part.cas_succeeded) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            };
            samples.extend(part_samples);
        }
        merged.ops_per_sec = if merged.seconds > 0.0 { merged.ops as f64 / merged.seconds } else { 0.0 };
        merged.latency = LatencySummary::from_samples(&mut samples);
        merged
    }
}

/// Concurrent writers of the preload.
const PRELOAD_WRITERS: usize = 64;

/// Writes every key of the key space and every hot key once, so reads, scans and CAS find
/// them: the same data on both systems before any row runs.
pub async fn preload<T: KvTarget>(connections: &[Arc<T>]) -> Result<(), OpError> {
    if connections.is_empty() {
        return Err(OpError::Unexpected("no connection to preload through".into()));
    }
    let total = KEY_SPACE + HOT_KEYS as u64;
    let mut tasks = Vec::with_capacity(PRELOAD_WRITERS);
    for writer in 0..PRELOAD_WRITERS {
        let connection = Arc::clone(&connections[writer % connections.len()]);
        tasks.push(tokio::spawn(async move {
            let mut index = writer as u64;
            while index < total {
                let name = if index < KEY_SPACE { key(index) } else { hot_key((index - KEY_SPACE) as usize) };
                bounded(connection.put(name, value(index))).await?;
                index += PRELOAD_WRITERS as u64;
            }
            Ok::<(), OpError>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|error| OpError::Unexpected(format!("preload task failed: {error}")))??;
    }
    Ok(())
}

/// Phases of a row, shared by its clients.
const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// What one client saw.
#[derive(Default)]
struct ClientTally {
    /// (end since the row started, latency) of each measured request, microseconds.
    timeline: Vec<(u64, u64)>,
    errors: u64,
    first_error: Option<String>,
    cas_succeeded: u64,
}

/// Runs `step` against `connections` (clients spread round-robin over them): `warmup`
/// unmeasured, then `duration` measured.
pub async fn run_step<T: KvTarget>(
    connections: &[Arc<T>],
    step: Step,
    warmup: Duration,
    duration: Duration,
) -> Result<RowRun, OpError> {
    if connections.is_empty() || step.clients == 0 || step.clients > MAX_CLIENTS {
        return Err(OpError::Unexpected(format!("{} clients over {} connections", step.clients, connections.len())));
    }
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let epoch = Instant::now();
    let epoch_unix_us =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let mut tasks = Vec::with_capacity(step.clients);
    for client in 0..step.clients {
        let connection = Arc::clone(&connections[client % connections.len()]);
        let phase = Arc::clone(&phase);
        tasks.push(tokio::spawn(client_loop(connection, step, client, phase, epoch)));
    }
    tokio::time::sleep(warmup).await;
    phase.store(MEASURE, Ordering::SeqCst);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    phase.store(STOP, Ordering::SeqCst);
    let seconds = started.elapsed().as_secs_f64();
    let mut measurement = Measurement { seconds, ..Measurement::default() };
    let mut cas_succeeded = 0;
    let mut timeline = Vec::new();
    for task in tasks {
        let tally = task.await.map_err(|error| OpError::Unexpected(format!("client task failed: {error}")))?;
        measurement.errors += tally.errors;
        measurement.first_error = measurement.first_error.or(tally.first_error);
        cas_succeeded += tally.cas_succeeded;
        timeline.extend(tally.timeline);
    }
    let mut samples: Vec<u64> = timeline.iter().map(|(_, latency)| *latency).collect();
    measurement.ops = samples.len() as u64;
    measurement.ops_per_sec = measurement.ops as f64 / seconds;
    measurement.latency = LatencySummary::from_samples(&mut samples);
    measurement.cas_succeeded = (step.workload == Workload::Cas).then_some(cas_succeeded);
    Ok(RowRun { measurement, samples, timeline, epoch_unix_us })
}

async fn client_loop<T: KvTarget>(
    target: Arc<T>,
    step: Step,
    client: usize,
    phase: Arc<AtomicU8>,
    epoch: Instant,
) -> ClientTally {
    let mut tally = ClientTally::default();
    let mut picker = KeyPicker::new(client);
    let hot = hot_key(client);
    // The CAS loop starts from the key's current revision and then follows its own view.
    let mut expected = match step.workload {
        Workload::Cas => bounded(target.mod_revision(hot.clone())).await.unwrap_or(0),
        _ => 0,
    };
    loop {
        let current = phase.load(Ordering::SeqCst);
        if current == STOP {
            return tally;
        }
        let random = picker.next_u64();
        let started = Instant::now();
        let outcome = match step.workload {
            Workload::Put => bounded(target.put(key(random), value(random))).await.map(|()| false),
            Workload::GetLinearizable => bounded(target.get(key(random), true)).await.map(|()| false),
            Workload::GetSerializable => bounded(target.get(key(random), false)).await.map(|()| false),
            Workload::Mixed if random % 100 < MIXED_WRITE_PERCENT => {
                bounded(target.put(key(random >> 8), value(random))).await.map(|()| false)
            }
            Workload::Mixed => bounded(target.get(key(random >> 8), true)).await.map(|()| false),
            Workload::Scan => match bounded(target.scan_prefix(scan_prefix(random), SCAN_KEYS)).await {
                Ok(found) if found == SCAN_KEYS as usize => Ok(false),
                Ok(found) => Err(OpError::Unexpected(format!("scan returned {found} keys, expected {SCAN_KEYS}"))),
                Err(error) => Err(error),
            },
            Workload::Cas => bounded(target.compare_and_swap(hot.clone(), expected, value(random))).await.map(|cas| {
                expected = cas.mod_revision;
                cas.succeeded
            }),
        };
        let elapsed_us = started.elapsed().as_micros() as u64;
        // Only operations that start and finish inside the window count: warmup is not
        // measured, and the operation in flight when the window closes is dropped.
        if phase.load(Ordering::SeqCst) == STOP {
            return tally;
        }
        let measured = current == MEASURE;
        match outcome {
            Ok(cas_succeeded) if measured => {
                tally.timeline.push((epoch.elapsed().as_micros() as u64, elapsed_us));
                tally.cas_succeeded += u64::from(cas_succeeded);
            }
            Ok(_) => {}
            Err(error) => {
                if measured {
                    tally.errors += 1;
                    tally.first_error.get_or_insert_with(|| error.to_string());
                }
                // A failing system must not spin the load generator.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn bounded<R>(operation: impl Future<Output = Result<R, OpError>>) -> Result<R, OpError> {
    tokio::time::timeout(OP_TIMEOUT, operation).await.unwrap_or(Err(OpError::Timeout(OP_TIMEOUT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_scans_and_values_cover_the_preloaded_space() {
        assert_eq!(key(0), b"bench/00000");
        assert_eq!(key(KEY_SPACE + 42), b"bench/00042");
        assert_eq!(scan_prefix(12), b"bench/012");
        assert_eq!(scan_prefix(100), b"bench/000");
        assert!(key(1299).starts_with(&scan_prefix(12)));
        let under_prefix = (0..KEY_SPACE).filter(|&index| key(index).starts_with(&scan_prefix(12))).count();
        assert_eq!(under_prefix, SCAN_KEYS as usize);
        assert_eq!(value(3).len(), VALUE_SIZE);
        assert_eq!(hot_key(HOT_KEYS + 1), b"hot/1");
    }

    #[test]
    fn key_picker_is_deterministic_per_client_and_spreads_keys() {
        let first: Vec<u64> = (0..5).scan(KeyPicker::new(3), |picker, _| Some(picker.next_u64())).collect();
        let again: Vec<u64> = (0..5).scan(KeyPicker::new(3), |picker, _| Some(picker.next_u64())).collect();
        let other: Vec<u64> = (0..5).scan(KeyPicker::new(4), |picker, _| Some(picker.next_u64())).collect();
        assert_eq!(first, again);
        assert_ne!(first, other);
        let mut picker = KeyPicker::new(0);
        let writes = (0..10_000).filter(|_| picker.next_u64() % 100 < MIXED_WRITE_PERCENT).count();
        assert!((900..1100).contains(&writes), "{writes} writes in 10,000");
    }

    /// A target whose puts take 1 ms, except that the first put started 100 ms into the
    /// row stalls for 80 ms: a layer-above test of the load generator, not of a system.
    struct StallingTarget {
        started: Instant,
        stalled: std::sync::atomic::AtomicBool,
    }

    const UNUSED: &str = "only puts are driven in this test";

    impl KvTarget for StallingTarget {
        async fn put(&self, _key: Vec<u8>, _value: Vec<u8>) -> Result<(), OpError> {
            let stall =
                self.started.elapsed() >= Duration::from_millis(100) && !self.stalled.swap(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(if stall { 80 } else { 1 })).await;
            Ok(())
        }
        async fn get(&self, _key: Vec<u8>, _linearizable: bool) -> Result<(), OpError> {
            Err(OpError::Unexpected(UNUSED.into()))
        }
        async fn scan_prefix(&self, _prefix: Vec<u8>, _limit: u32) -> Result<usize, OpError> {
            Err(OpError::Unexpected(UNUSED.into()))
        }
        async fn mod_revision(&self, _key: Vec<u8>) -> Result<i64, OpError> {
            Err(OpError::Unexpected(UNUSED.into()))
        }
        async fn compare_and_swap(
            &self,
            _key: Vec<u8>,
            _expected: i64,
            _value: Vec<u8>,
        ) -> Result<crate::target::CasOutcome, OpError> {
            Err(OpError::Unexpected(UNUSED.into()))
        }
    }

    #[test]
    fn the_timeline_places_every_request_at_its_end() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let target = Arc::new(StallingTarget { started: Instant::now(), stalled: Default::default() });
        let step = Step { workload: Workload::Put, clients: 4 };
        let warmup = Duration::from_millis(50);
        let run = runtime.block_on(run_step(&[target], step, warmup, Duration::from_millis(300))).expect("run");
        assert_eq!(run.timeline.len(), run.samples.len());
        assert!(run.epoch_unix_us > 0);
        let mut latencies: Vec<u64> = run.timeline.iter().map(|(_, latency)| *latency).collect();
        latencies.sort_unstable();
        assert_eq!(latencies, run.samples, "the timeline holds exactly the measured samples");
        for (end, latency) in &run.timeline {
            assert!(*end >= warmup.as_micros() as u64 + latency, "request ending at {end} us began in the warmup");
        }
        let (end, latency) = run.timeline.iter().max_by_key(|(_, latency)| *latency).expect("samples");
        assert!(*latency >= 80_000, "the stall is the slowest request: {latency} us");
        assert!(*end >= 180_000, "the stall ends at least 180 ms into the row: {end} us");
    }

    #[test]
    fn plans_parse_and_merge() {
        assert_eq!(full_plan().len(), 21);
        assert!(full_plan().iter().all(|step| step.clients <= MAX_CLIENTS));
        for workload in Workload::ALL {
            assert_eq!(Workload::from_name(workload.name()), Some(workload));
        }
        assert_eq!(Workload::from_name("watch"), None);
        let part = |ops, seconds, cas| Measurement { ops, seconds, cas_succeeded: cas, ..Measurement::default() };
        let merged = Measurement::merge(vec![
            RowRun {
                measurement: part(100, 1.0, Some(10)),
                samples: vec![1; 100],
                timeline: Vec::new(),
                epoch_unix_us: 0,
            },
            RowRun {
                measurement: part(300, 1.0, Some(5)),
                samples: vec![3; 300],
                timeline: Vec::new(),
                epoch_unix_us: 0,
            },
        ]);
        assert_eq!(merged.ops, 400);
        assert_eq!(merged.ops_per_sec, 200.0);
        assert_eq!(merged.latency.p50_us, 3);
        assert_eq!(merged.cas_succeeded, Some(15));
    }
}
