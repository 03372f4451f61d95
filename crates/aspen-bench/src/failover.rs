//! The failover measurement: one closed-loop writer per system, through a client given all
//! three members (aspen-client; for etcd, the gRPC client moving to the next member after an
//! error, as an application on etcd's client does), and the leader's process SIGKILLed while
//! it writes. Measured: the time from the kill to the first acknowledged write sent after
//! it, and the longest gap between two acknowledged writes, the kill inside it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::etcd::{EtcdClient, PutRequest};
use crate::target::OpError;
use crate::workload::OP_TIMEOUT;

/// Writes before the kill: the writer is up to speed.
pub const BEFORE_KILL: Duration = Duration::from_secs(1);
/// Writes after the first acknowledged write sent after the kill: the writer is up to speed
/// again and later stalls would show.
pub const AFTER_RECOVERY: Duration = Duration::from_secs(2);
/// Longest wait for the first acknowledged write after the kill.
pub const RECOVERY_MAX: Duration = Duration::from_secs(30);
/// Pause after a failed write before the next, so a failing system does not spin the writer.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How often the measurement checks whether the writer got through.
const POLL: Duration = Duration::from_millis(20);

/// What one failover measured on one system.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Failover {
    /// Which member was killed (`node 1`, `e2`).
    pub killed: String,
    /// From the kill to the acknowledgement of the first write sent after it, ms (`None`
    /// if none came within [`RECOVERY_MAX`]).
    pub first_ack_ms: Option<f64>,
    /// The longest time between two acknowledged writes, ms (to the end of the measurement
    /// when the writer never got through again).
    pub longest_gap_ms: f64,
    /// Writes acknowledged in the whole measurement.
    pub acked: u64,
    /// Writes that failed (each retried as the next write).
    pub errors: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

/// One write of the writer: when it was sent, when it ended, whether it was acknowledged.
#[derive(Clone, Copy, Debug)]
struct Write {
    sent: Instant,
    ended: Instant,
    acked: bool,
}

/// The numbers of one measurement from its writes (in order) and the kill's instant;
/// `end` closes the last gap.
fn summarize(writes: &[Write], killed_at: Instant, end: Instant) -> (Option<Duration>, Duration) {
    let first_ack = writes
        .iter()
        .find(|write| write.acked && write.sent >= killed_at)
        .map(|write| write.ended.saturating_duration_since(killed_at));
    let mut acks: Vec<Instant> = writes.iter().filter(|write| write.acked).map(|write| write.ended).collect();
    acks.push(end);
    let start = writes.first().map_or(killed_at, |write| write.sent);
    let longest_gap = acks
        .iter()
        .scan(start, |previous, ack| {
            let gap = ack.saturating_duration_since(*previous);
            *previous = *ack;
            Some(gap)
        })
        .max()
        .unwrap_or_default();
    (first_ack, longest_gap)
}

/// Runs the writer (`write(n)` writes the n-th key), SIGKILLs the leader with `kill` after
/// [`BEFORE_KILL`], and measures until [`AFTER_RECOVERY`] past the first acknowledged write
/// sent after the kill (or [`RECOVERY_MAX`]). `kill` returns right after the SIGKILL,
/// naming the member it killed and whatever else its caller needs (which to restart).
pub async fn measure<W, Fut, K, KFut, T, E>(write: W, kill: K) -> Result<(Failover, T), E>
where
    W: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), OpError>> + Send,
    K: FnOnce() -> KFut,
    KFut: Future<Output = Result<(String, T), E>>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let writer = tokio::spawn({
        let (stop, writes) = (Arc::clone(&stop), Arc::clone(&writes));
        async move {
            let (mut errors, mut first_error) = (0u64, None);
            let mut next = 0;
            while !stop.load(Ordering::SeqCst) {
                let sent = Instant::now();
                let outcome = tokio::time::timeout(OP_TIMEOUT, write(next)).await;
                let outcome = outcome.unwrap_or(Err(OpError::Timeout(OP_TIMEOUT)));
                lock(&writes).push(Write { sent, ended: Instant::now(), acked: outcome.is_ok() });
                next += 1;
                if let Err(error) = outcome {
                    errors += 1;
                    first_error.get_or_insert_with(|| error.to_string());
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
            (errors, first_error)
        }
    });
    tokio::time::sleep(BEFORE_KILL).await;
    // `kill` finds the leader first (a round trip or two) and returns right after the
    // SIGKILL: the clock starts then.
    let killed = kill().await;
    let killed_at = Instant::now();
    let mut stop_at = killed_at + RECOVERY_MAX;
    if killed.is_ok() {
        while Instant::now() < stop_at {
            tokio::time::sleep(POLL).await;
            let recovered =
                lock(&writes).iter().find(|write| write.acked && write.sent >= killed_at).map(|write| write.ended);
            if let Some(recovered) = recovered {
                stop_at = stop_at.min(recovered + AFTER_RECOVERY);
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (errors, first_error) = writer.await.unwrap_or_default();
    let (killed, killed_too) = killed?;
    let writes = lock(&writes).clone();
    let end = writes.last().map_or_else(Instant::now, |write| write.ended);
    let (first_ack, longest_gap) = summarize(&writes, killed_at, end);
    let failover = Failover {
        killed,
        first_ack_ms: first_ack.map(|gap| gap.as_secs_f64() * 1000.0),
        longest_gap_ms: longest_gap.as_secs_f64() * 1000.0,
        acked: writes.iter().filter(|write| write.acked).count() as u64,
        errors,
        first_error,
    };
    Ok((failover, killed_too))
}

fn lock(writes: &Mutex<Vec<Write>>) -> std::sync::MutexGuard<'_, Vec<Write>> {
    writes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long the etcd writer waits for one put before it gives up on it and tries the next
/// member. etcd answers a put sent to a follower that still follows the killed leader only
/// at its request timeout (7 s by default: the proposal was forwarded to a dead process);
/// an application on etcd's client bounds its calls with a deadline and retries. This one
/// is generous to etcd: the patience aspen-client has before it looks for a new leader.
pub const ETCD_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);

/// A client of every etcd member that sends each request to one of them and moves on to the
/// next after a failure or after [`ETCD_ATTEMPT_TIMEOUT`]: what etcd's own client does for
/// an application that retries with a deadline.
pub struct EtcdMembers {
    clients: Vec<EtcdClient>,
    current: AtomicUsize,
}

impl EtcdMembers {
    /// Connects to every member, starting with `first`.
    pub async fn connect(urls: &[String], first: &str) -> Result<Self, crate::etcd::EtcdError> {
        let mut clients = Vec::with_capacity(urls.len());
        for url in urls {
            clients.push(EtcdClient::connect(url).await?);
        }
        let current = urls.iter().position(|url| url == first).unwrap_or(0);
        Ok(EtcdMembers { clients, current: AtomicUsize::new(current) })
    }

    /// Puts `key` through the current member; after a failure the next request goes to the
    /// next member.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        let members = self.clients.len();
        let Some(index) = self.current.load(Ordering::Relaxed).checked_rem(members) else {
            return Err(OpError::Unexpected("no etcd member to write to".into()));
        };
        let request = PutRequest { key, value, lease: 0, prev_kv: false };
        let attempt = match tokio::time::timeout(ETCD_ATTEMPT_TIMEOUT, self.clients[index].put(request)).await {
            Ok(result) => result.map(|_| ()).map_err(OpError::from),
            Err(_) => Err(OpError::Timeout(ETCD_ATTEMPT_TIMEOUT)),
        };
        match attempt {
            Ok(()) => Ok(()),
            Err(error) => {
                let _ =
                    self.current.compare_exchange(index, (index + 1) % members, Ordering::Relaxed, Ordering::Relaxed);
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(base: Instant, sent_ms: u64, ended_ms: u64, acked: bool) -> Write {
        let at = |ms| base + Duration::from_millis(ms);
        Write { sent: at(sent_ms), ended: at(ended_ms), acked }
    }

    #[test]
    fn the_first_ack_counts_only_writes_sent_after_the_kill_and_the_gap_spans_it() {
        let base = Instant::now();
        let at = |ms| base + Duration::from_millis(ms);
        let writes = [
            write(base, 0, 10, true),
            write(base, 10, 20, true),
            // In flight at the kill (25 ms), acknowledged after the election.
            write(base, 20, 900, true),
            write(base, 900, 1200, false),
            write(base, 1210, 1300, true),
            write(base, 1300, 1310, true),
        ];
        let (first_ack, longest_gap) = summarize(&writes, at(25), at(1310));
        assert_eq!(first_ack, Some(Duration::from_millis(1275)), "the write sent at 1210 ms, after the failed one");
        assert_eq!(longest_gap, Duration::from_millis(880), "from the ack at 20 ms to the one at 900 ms");
    }

    #[test]
    fn a_writer_that_never_gets_through_has_no_first_ack_and_a_gap_to_the_end() {
        let base = Instant::now();
        let at = |ms| base + Duration::from_millis(ms);
        let writes = [write(base, 0, 10, true), write(base, 10, 5000, false)];
        let (first_ack, longest_gap) = summarize(&writes, at(15), at(6000));
        assert_eq!(first_ack, None);
        assert_eq!(longest_gap, Duration::from_millis(5990));
    }

    #[tokio::test]
    async fn measure_reports_the_stall_a_kill_causes() {
        // A stand-in system that stops acknowledging for 300 ms once killed.
        let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let stalled = Arc::clone(&killed_at);
        let write = move |_| {
            let stalled = Arc::clone(&stalled);
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let killed = *stalled.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                match killed {
                    Some(at) if at.elapsed() < Duration::from_millis(300) => {
                        Err(OpError::Unexpected("no leader".into()))
                    }
                    _ => Ok(()),
                }
            }
        };
        let kill = || async {
            *killed_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
            Ok::<_, OpError>(("node 1".to_string(), 0))
        };
        let (measured, index) = measure(write, kill).await.expect("measured");
        assert_eq!(index, 0);
        assert_eq!(measured.killed, "node 1");
        let first_ack = measured.first_ack_ms.expect("recovered");
        assert!((300.0..1000.0).contains(&first_ack), "{first_ack} ms");
        assert!(measured.longest_gap_ms >= 300.0, "{} ms", measured.longest_gap_ms);
        assert!(measured.errors > 0 && measured.acked > 0);
        assert_eq!(measured.first_error.as_deref(), Some("unexpected answer: no leader"));
    }
}
