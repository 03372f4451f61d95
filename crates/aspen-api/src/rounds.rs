//! Shared rounds: concurrent linearizable reads share one confirmation round.
//!
//! A read may use a quorum confirmation only if the confirmation started after the read
//! arrived. So while one round runs, newcomers wait; when it ends, one of them drives the
//! next round for everyone waiting at that moment. With one reader at a time there is no
//! hand-off at all: the reader runs its own round on its own task. Under load, N waiting
//! reads cost one round instead of N. Nodes share their ReadIndex rounds and leader checks
//! this way, clients their term confirmations (ADR 0004). Runtime-free: the channels are
//! `futures-channel`'s.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use futures_channel::oneshot;

use crate::error::KvError;

/// Most reads waiting for the next round of one `SharedRounds`; more are refused with a typed error rather than
/// queued without bound.
pub const MAX_WAITING_READS: usize = 4096;

/// What a waiting read is told.
enum Turn<T> {
    /// The round that covered this read ended with this read index (or error).
    Done(Result<T, KvError>),
    /// This read drives the next round, for itself and everyone waiting then.
    Drive,
}

struct State<T> {
    /// A round is running (or a waiter was told to drive the next one).
    driving: bool,
    /// Reads that arrived while a round ran, oldest first.
    waiting: VecDeque<oneshot::Sender<Turn<T>>>,
}

/// Shares confirmation rounds between concurrent reads; a round yields a `T` (a read
/// index, a leader's stamp, a set of term replies).
pub struct SharedRounds<T> {
    state: Mutex<State<T>>,
}

impl<T> Default for SharedRounds<T> {
    fn default() -> Self {
        SharedRounds { state: Mutex::new(State { driving: false, waiting: VecDeque::new() }) }
    }
}

impl<T: Clone> SharedRounds<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The result of a round started after this call, run by `round` (here or on another
    /// reader's task): what a read arriving now may rely on.
    pub async fn run<F, Fut>(&self, round: F) -> Result<T, KvError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, KvError>>,
    {
        let waiting = {
            let mut state = self.lock();
            if state.driving {
                if state.waiting.len() >= MAX_WAITING_READS {
                    return Err(KvError::Unavailable(format!(
                        "more than {MAX_WAITING_READS} linearizable reads are waiting for a read index"
                    )));
                }
                let (sender, receiver) = oneshot::channel();
                state.waiting.push_back(sender);
                Some(receiver)
            } else {
                state.driving = true;
                None
            }
        };
        if let Some(receiver) = waiting {
            let mut waiter = Waiter { batcher: self, receiver };
            match (&mut waiter.receiver).await {
                Ok(Turn::Done(result)) => return result,
                Ok(Turn::Drive) => {}
                Err(_) => return Err(KvError::Unavailable("the read-index round was abandoned".into())),
            }
        }
        // Everyone waiting now arrived before the round below starts, so it covers them.
        let mut round_guard = Round { batcher: self, batch: std::mem::take(&mut self.lock().waiting).into() };
        let result = round().await;
        for waiter in round_guard.batch.drain(..) {
            let _ = waiter.send(Turn::Done(result.clone()));
        }
        drop(round_guard);
        result
    }

    /// Ends a round: hands the next one to the oldest live waiter, or stops driving.
    fn hand_off(&self, unfinished: Vec<oneshot::Sender<Turn<T>>>) {
        let mut state = self.lock();
        // Reads of an abandoned round go first: they have waited longest.
        for waiter in unfinished.into_iter().rev() {
            state.waiting.push_front(waiter);
        }
        while let Some(next) = state.waiting.pop_front() {
            if next.send(Turn::Drive).is_ok() {
                return;
            }
        }
        state.driving = false;
    }
}

/// A read waiting for its turn. If it is dropped after being told to drive but before it
/// could act on it, it passes the turn on; otherwise every later read would wait forever.
struct Waiter<'a, T: Clone> {
    batcher: &'a SharedRounds<T>,
    receiver: oneshot::Receiver<Turn<T>>,
}

impl<T: Clone> Drop for Waiter<'_, T> {
    fn drop(&mut self) {
        // After `close`, no turn can arrive any more; one that arrived before is still there.
        self.receiver.close();
        if let Ok(Some(Turn::Drive)) = self.receiver.try_recv() {
            self.batcher.hand_off(Vec::new());
        }
    }
}

/// The running round; dropping it (normally, or because the driver's future was dropped
/// mid-round) always passes the turn on, so waiters never hang.
struct Round<'a, T: Clone> {
    batcher: &'a SharedRounds<T>,
    batch: Vec<oneshot::Sender<Turn<T>>>,
}

impl<T: Clone> Drop for Round<'_, T> {
    fn drop(&mut self) {
        self.batcher.hand_off(std::mem::take(&mut self.batch));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// A round that counts itself and returns the count as the read index.
    async fn counted_round(rounds: &AtomicU64) -> Result<u64, KvError> {
        let number = rounds.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(number)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_rounds_that_started_after_they_arrived() {
        let batcher = Arc::new(SharedRounds::<u64>::default());
        let rounds = Arc::new(AtomicU64::new(0));
        // One reader alone runs its own round.
        assert_eq!(batcher.run(|| counted_round(&rounds)).await.expect("alone"), 1);
        let mut reads = Vec::new();
        for _ in 0..64 {
            let batcher = Arc::clone(&batcher);
            let rounds = Arc::clone(&rounds);
            reads.push(tokio::spawn(async move {
                let started_before = rounds.load(Ordering::SeqCst);
                let index = batcher.run(|| counted_round(&rounds)).await.expect("read");
                (started_before, index)
            }));
        }
        for read in reads {
            let (started_before, index) = read.await.expect("join");
            // The round that answered began after the read arrived.
            assert!(index > started_before, "read arrived after {started_before} rounds, answered by round {index}");
        }
        let total = rounds.load(Ordering::SeqCst);
        assert!(total < 20, "64 concurrent reads took {total} rounds");
        assert!(!batcher.lock().driving && batcher.lock().waiting.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_reach_the_whole_batch_and_an_abandoned_round_hands_off() {
        let batcher = Arc::new(SharedRounds::<u64>::default());
        // A driver whose future is dropped mid-round.
        let stuck = {
            let batcher = Arc::clone(&batcher);
            tokio::spawn(async move {
                batcher
                    .run(|| async {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok(0)
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiter = {
            let batcher = Arc::clone(&batcher);
            tokio::spawn(async move { batcher.run(|| async { Ok(7) }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        stuck.abort();
        let answered = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("not hung").expect("join");
        assert_eq!(answered.expect("read index"), 7);

        // A waiter told to drive, but dropped before it could, passes the turn on.
        let release = Arc::new(tokio::sync::Notify::new());
        let driver = {
            let batcher = Arc::clone(&batcher);
            let release = Arc::clone(&release);
            tokio::spawn(async move {
                batcher
                    .run(|| async move {
                        release.notified().await;
                        Ok(1)
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut first = Box::pin(batcher.run(|| async { Ok(2) }));
        // Polled once (it queues), then never again until it is dropped.
        assert!(tokio::time::timeout(Duration::from_millis(1), &mut first).await.is_err());
        let second = {
            let batcher = Arc::clone(&batcher);
            tokio::spawn(async move { batcher.run(|| async { Ok(3) }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.notify_one();
        assert_eq!(driver.await.expect("join").expect("driver"), 1);
        // The turn went to `first`, which nobody polls.
        drop(first);
        let answered = tokio::time::timeout(Duration::from_secs(5), second).await.expect("not hung").expect("join");
        assert_eq!(answered.expect("read index"), 3);

        // A failing round fails every read it covered, with the round's error.
        let failing = || async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(KvError::NotLeader { leader: Some(2), leader_addr: None })
        };
        let mut reads = Vec::new();
        for _ in 0..8 {
            let batcher = Arc::clone(&batcher);
            reads.push(tokio::spawn(async move { batcher.run(failing).await }));
        }
        for read in reads {
            assert!(matches!(read.await.expect("join"), Err(KvError::NotLeader { leader: Some(2), .. })));
        }
        assert!(!batcher.lock().driving);
    }
}
