//! The client retry policy, shared by aspen-client (over iroh) and the simulator's clients
//! (over the in-memory network), so the simulator checks the retry logic users run.
//!
//! The rule: retry only what cannot be applied twice. Reads, and writes with an identity
//! (which the state machine applies at most once, see [`crate::session`]), retry on any
//! transport failure or unknown outcome; writes without one retry only when the request
//! certainly did not reach a node, or a node said it did nothing (not the leader,
//! unavailable). A caller that gives up after an attempt that may have applied reports
//! the outcome as unknown ([`KvError::OutcomeUnknown`]), never as unavailable.

use std::time::Duration;

use crate::error::{ApplyError, ClusterError, KvError};

/// How long a call keeps retrying through leader elections and unreachable nodes.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(15);
/// Pause before trying the next node (not after a redirect to a known leader).
pub const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// How one attempt failed, as far as retrying is concerned.
#[derive(Clone, Copy, Debug)]
pub enum AttemptFailure<'a> {
    /// No answer. `before_send` is true when the request certainly never left the client.
    Unreachable {
        /// The request never reached the node.
        before_send: bool,
    },
    /// A key-value error from a node.
    Kv(&'a KvError),
    /// A cluster error from a node.
    Cluster(&'a ClusterError),
    /// Anything else (refused token, malformed request): retrying cannot help.
    Other,
}

/// What to do after a failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryAction {
    /// Return the error to the caller.
    Stop,
    /// Try the node at this address next, without pausing (a redirect to the leader).
    Redirect(String),
    /// Pause, then try the next node.
    NextNode,
}

/// The retry decision for a failed attempt of a request that is (or is not) `idempotent`.
pub fn after_failure(failure: AttemptFailure<'_>, idempotent: bool) -> RetryAction {
    let retry = match failure {
        AttemptFailure::Unreachable { before_send } => idempotent || before_send,
        // Not applied anywhere: safe to retry for any request, at the leader if known.
        AttemptFailure::Kv(KvError::NotLeader { leader_addr, .. })
        | AttemptFailure::Cluster(ClusterError::NotLeader { leader_addr, .. }) => {
            return match leader_addr {
                Some(addr) => RetryAction::Redirect(addr.clone()),
                None => RetryAction::NextNode,
            };
        }
        AttemptFailure::Kv(KvError::Unavailable(_)) => true,
        // The outcome is unknown: only a request that may run twice (a read, or a write
        // with an identity, which the state machine applies at most once) can be retried.
        AttemptFailure::Kv(KvError::Timeout { .. } | KvError::OutcomeUnknown(_)) => idempotent,
        AttemptFailure::Kv(_) | AttemptFailure::Cluster(_) | AttemptFailure::Other => false,
    };
    if retry { RetryAction::NextNode } else { RetryAction::Stop }
}

/// Whether a failed attempt may have taken effect: it reached a node and no answer says
/// otherwise. A caller that gives up after such an attempt reports the outcome as unknown.
pub fn may_have_applied(failure: AttemptFailure<'_>) -> bool {
    matches!(
        failure,
        AttemptFailure::Unreachable { before_send: false }
            | AttemptFailure::Kv(KvError::Timeout { .. } | KvError::OutcomeUnknown(_))
    )
}

/// Whether an error is the cluster's verdict on a write (the state machine's answer,
/// remembered per write identity, or a refusal before consensus): it stands even after
/// attempts whose outcome was unknown. A session that expired or moved past the write says
/// nothing about earlier attempts, so it is no verdict.
pub fn is_verdict(error: &KvError) -> bool {
    match error {
        KvError::Apply(ApplyError::SessionExpired { .. } | ApplyError::WriteTooOld { .. }) => false,
        KvError::Apply(_) | KvError::Validation(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_retry_only_when_certainly_not_applied() {
        let timeout = KvError::Timeout { after_ms: 10 };
        assert_eq!(after_failure(AttemptFailure::Kv(&timeout), false), RetryAction::Stop);
        assert_eq!(after_failure(AttemptFailure::Kv(&timeout), true), RetryAction::NextNode);
        assert_eq!(after_failure(AttemptFailure::Unreachable { before_send: false }, false), RetryAction::Stop);
        assert_eq!(after_failure(AttemptFailure::Unreachable { before_send: true }, false), RetryAction::NextNode);
        assert_eq!(after_failure(AttemptFailure::Unreachable { before_send: false }, true), RetryAction::NextNode);
        let unknown = KvError::OutcomeUnknown("stream broke".into());
        assert_eq!(after_failure(AttemptFailure::Kv(&unknown), false), RetryAction::Stop);
        assert_eq!(after_failure(AttemptFailure::Kv(&unknown), true), RetryAction::NextNode);
        let unavailable = KvError::Unavailable("electing".into());
        assert_eq!(after_failure(AttemptFailure::Kv(&unavailable), false), RetryAction::NextNode);
        assert_eq!(after_failure(AttemptFailure::Other, true), RetryAction::Stop);
    }

    #[test]
    fn not_leader_redirects_when_the_leader_is_known() {
        let known = KvError::NotLeader { leader: Some(2), leader_addr: Some("n2".into()) };
        assert_eq!(after_failure(AttemptFailure::Kv(&known), false), RetryAction::Redirect("n2".into()));
        let unknown = ClusterError::NotLeader { leader: None, leader_addr: None };
        assert_eq!(after_failure(AttemptFailure::Cluster(&unknown), false), RetryAction::NextNode);
    }
}
