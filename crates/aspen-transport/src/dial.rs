//! Dialing peers, one dial per (peer, ALPN) at a time: the dial runs as a task of its own,
//! shared by every caller that needs the connection meanwhile, so a caller that stops
//! waiting cancels nothing and many callers cost one handshake. And a memory of peers that
//! are down (their last dial failed, or their connection went silent): calls to such a peer
//! fail at once, while it is redialed in the background at most once per backoff period,
//! instead of each call waiting out a connect timeout. QUIC over UDP gets no refusal from a
//! crashed peer (no RST as TCP has), so a dial to it only ends at the timeout.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iroh::EndpointId;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::error::TransportError;

/// Pool key: the peer and the ALPN.
pub(crate) type PoolKey = (EndpointId, &'static [u8]);

/// Pause after a failed dial before the next one to the same peer, doubled after each
/// further failure up to [`REDIAL_BACKOFF_MAX`]. A dial to a crashed peer already takes the
/// whole connect timeout to fail; the backoff bounds dials that fail at once.
pub const REDIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between two dials to a peer that is down.
pub const REDIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What the pool knows about reaching one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// A pooled connection is open.
    Connected,
    /// A first dial is under way: nothing is known yet.
    Dialing,
    /// Its last dial failed or its connection went silent: calls fail at once until a dial
    /// in the background succeeds.
    Down {
        /// How long it has been down, in milliseconds.
        for_ms: u64,
        /// Why it was taken for down.
        reason: String,
    },
    /// Never dialed, or its connection ended cleanly.
    Unknown,
}

/// A peer taken for down.
struct PeerDown {
    since: Instant,
    /// Failed dials since it went down.
    failures: u32,
    reason: String,
    /// No new dial before this.
    retry_after: Instant,
}

impl PeerDown {
    fn error(&self, peer: &str) -> TransportError {
        TransportError::PeerDown {
            peer: peer.to_string(),
            for_ms: self.since.elapsed().as_millis() as u64,
            reason: self.reason.clone(),
        }
    }
}

/// A dial under way; its outcome is published once.
struct PendingDial {
    outcome: watch::Receiver<Option<Result<(), TransportError>>>,
    task: AbortHandle,
}

#[derive(Default)]
struct DialState {
    pending: Option<PendingDial>,
    down: Option<PeerDown>,
}

/// The dials of one RPC client and the peers it knows to be down.
#[derive(Clone, Default)]
pub(crate) struct Dials {
    states: Arc<Mutex<HashMap<PoolKey, DialState>>>,
}

/// The dial states, also after a panic left the lock poisoned (nothing under it can panic
/// half-way through an update).
fn lock(states: &Mutex<HashMap<PoolKey, DialState>>) -> MutexGuard<'_, HashMap<PoolKey, DialState>> {
    states.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pause after `failures` failed dials in a row.
fn backoff(failures: u32) -> Duration {
    REDIAL_BACKOFF_MIN.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(REDIAL_BACKOFF_MAX)
}

impl Dials {
    /// Makes sure a connection to `key` is being dialed and waits for it: joins the dial
    /// under way, or starts `dial` (which connects and pools the connection) as a task of
    /// its own. A peer that is down is not waited for: the call fails at once with
    /// [`TransportError::PeerDown`], and a background dial starts once its backoff passed.
    pub(crate) async fn dial<F>(&self, key: PoolKey, peer: &str, dial: impl FnOnce() -> F) -> Result<(), TransportError>
    where
        F: Future<Output = Result<(), TransportError>> + Send + 'static,
    {
        let mut outcome = {
            let mut states = lock(&self.states);
            let state = states.entry(key).or_default();
            // A dial task that ended without publishing (it panicked) is no dial under way.
            if state.pending.as_ref().is_some_and(|pending| pending.task.is_finished()) {
                state.pending = None;
            }
            match (&state.pending, &state.down) {
                (Some(_), Some(down)) => return Err(down.error(peer)),
                (Some(pending), None) => pending.outcome.clone(),
                (None, Some(down)) if Instant::now() < down.retry_after => return Err(down.error(peer)),
                (None, _) => {
                    let (publish, outcome) = watch::channel(None);
                    let task = tokio::spawn(self.clone().run(key, dial(), publish)).abort_handle();
                    state.pending = Some(PendingDial { outcome: outcome.clone(), task });
                    if let Some(down) = &state.down {
                        return Err(down.error(peer));
                    }
                    outcome
                }
            }
        };
        let published = outcome.wait_for(Option::is_some).await.map(|outcome| outcome.clone());
        match published {
            Ok(Some(result)) => result,
            _ => Err(TransportError::Connect { peer: peer.to_string(), reason: "the dial was cancelled".into() }),
        }
    }

    /// Runs one dial and records what came of it before publishing it.
    async fn run(
        self,
        key: PoolKey,
        dial: impl Future<Output = Result<(), TransportError>>,
        publish: watch::Sender<Option<Result<(), TransportError>>>,
    ) {
        let result = dial.await;
        {
            let mut states = lock(&self.states);
            let state = states.entry(key).or_default();
            state.pending = None;
            match &result {
                Ok(()) => state.down = None,
                Err(error) => {
                    let now = Instant::now();
                    let (since, failures) =
                        state.down.as_ref().map_or((now, 1), |down| (down.since, down.failures + 1));
                    let retry_after = now + backoff(failures);
                    state.down = Some(PeerDown { since, failures, reason: error.reason(), retry_after });
                }
            }
        }
        publish.send_replace(Some(result));
    }

    /// Takes `key`'s peer for down (its connection went silent); the next call redials it in
    /// the background.
    pub(crate) fn mark_down(&self, key: PoolKey, reason: String) {
        let mut states = lock(&self.states);
        let state = states.entry(key).or_default();
        let now = Instant::now();
        let since = state.down.as_ref().map_or(now, |down| down.since);
        state.down = Some(PeerDown { since, failures: 0, reason, retry_after: now });
    }

    /// Whether `key` is being dialed for the first time or is down; `None` when neither.
    pub(crate) fn reachability(&self, key: &PoolKey) -> Option<Reachability> {
        let states = lock(&self.states);
        let state = states.get(key)?;
        match (&state.down, &state.pending) {
            (Some(down), _) => Some(Reachability::Down {
                for_ms: down.since.elapsed().as_millis() as u64,
                reason: down.reason.clone(),
            }),
            (None, Some(_)) => Some(Reachability::Dialing),
            (None, None) => None,
        }
    }

    /// Cancels every dial under way and forgets every peer's state.
    pub(crate) fn abort_all(&self) {
        for (_, state) in lock(&self.states).drain() {
            if let Some(pending) = state.pending {
                pending.task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn key() -> PoolKey {
        (iroh::SecretKey::from_bytes(&[3; 32]).public(), b"test")
    }

    #[test]
    fn backoff_doubles_from_the_minimum_to_the_maximum() {
        assert_eq!(backoff(1), REDIAL_BACKOFF_MIN);
        assert_eq!(backoff(2), REDIAL_BACKOFF_MIN * 2);
        assert_eq!(backoff(50), REDIAL_BACKOFF_MAX);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_dial_and_a_failed_peer_then_fails_at_once() {
        let dials = Dials::default();
        let started = Arc::new(AtomicUsize::new(0));
        let slow_failure = || {
            let started = Arc::clone(&started);
            move || async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(TransportError::ConnectTimeout { peer: "p".into(), after_ms: 100 })
            }
        };
        let (first, second) =
            tokio::join!(dials.dial(key(), "p", slow_failure()), dials.dial(key(), "p", slow_failure()));
        assert_eq!(started.load(Ordering::SeqCst), 1, "one dial for both callers");
        assert!(matches!(first, Err(TransportError::ConnectTimeout { .. })), "{first:?}");
        assert_eq!(first, second);
        assert!(matches!(dials.reachability(&key()), Some(Reachability::Down { .. })));

        // Down: no waiting, and no new dial inside the backoff.
        let begun = Instant::now();
        let error = dials.dial(key(), "p", slow_failure()).await.expect_err("down");
        assert!(matches!(error, TransportError::PeerDown { .. }), "{error}");
        assert!(begun.elapsed() < Duration::from_millis(50), "a down peer is not waited for");
        assert_eq!(started.load(Ordering::SeqCst), 1, "no dial inside the backoff");

        // After the backoff, a call starts a redial in the background and still fails at once.
        tokio::time::sleep(REDIAL_BACKOFF_MIN).await;
        let begun = Instant::now();
        let error = dials.dial(key(), "p", slow_failure()).await.expect_err("still down");
        assert!(matches!(error, TransportError::PeerDown { .. }), "{error}");
        assert!(begun.elapsed() < Duration::from_millis(50));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(started.load(Ordering::SeqCst), 2, "one redial started");
    }

    #[tokio::test]
    async fn a_redial_that_succeeds_clears_the_down_mark() {
        let dials = Dials::default();
        dials.mark_down(key(), "silent".into());
        let error = dials.dial(key(), "p", || async { Ok(()) }).await.expect_err("down until the redial ends");
        assert!(matches!(error, TransportError::PeerDown { ref reason, .. } if reason == "silent"), "{error}");
        for _ in 0..100 {
            if dials.reachability(&key()).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(dials.reachability(&key()), None);
        dials.dial(key(), "p", || async { Ok(()) }).await.expect("up again");
    }
}
