//! What a client could reach when it gave up on a call, for an error that says whether the
//! cluster lacks a quorum ("no quorum: 1 of 3 nodes reachable") or had one and still could
//! not serve, instead of only the last node's failure.

use aspen_api::{ClusterError, KvError};

use crate::ClientError;

/// What a client could reach when it gave up on a call: the nodes that answered (or hold an
/// open connection) among those it was given, why the others could not be reached, and the
/// error of the last attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Availability {
    /// Configured nodes that answered during the call or are connected.
    pub reachable: usize,
    /// Configured nodes.
    pub total: usize,
    /// Each unreachable node's address (short form) and why it could not be reached.
    pub unreachable: Vec<(String, String)>,
    /// The error of the last attempt.
    pub last_error: String,
}

impl Availability {
    /// Whether too few nodes answered to make a majority of those configured.
    pub fn lacks_quorum(&self) -> bool {
        self.reachable * 2 <= self.total
    }
}

impl std::fmt::Display for Availability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (reachable, total) = (self.reachable, self.total);
        if self.lacks_quorum() {
            write!(f, "no quorum: {reachable} of {total} nodes reachable")?;
        } else {
            write!(f, "cluster unavailable: {reachable} of {total} nodes reachable, none could serve the request")?;
        }
        if !self.unreachable.is_empty() {
            let why: Vec<String> = self.unreachable.iter().map(|(peer, reason)| format!("{peer}: {reason}")).collect();
            write!(f, " (unreachable: {})", why.join("; "))?;
        }
        write!(f, "; last error: {}", self.last_error)
    }
}

/// Whether an error means the cluster could not serve (no node reachable, no leader, no
/// answer in time), as opposed to an answer about the request itself.
pub(crate) fn is_availability_error(error: &ClientError) -> bool {
    match error {
        ClientError::Unreachable(_) => true,
        ClientError::Kv(error) => matches!(
            error,
            KvError::Unavailable(_) | KvError::NotLeader { .. } | KvError::Timeout { .. } | KvError::OutcomeUnknown(_)
        ),
        ClientError::Cluster(error) => matches!(error, ClusterError::NotLeader { .. } | ClusterError::Timeout { .. }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn availability(reachable: usize, total: usize) -> Availability {
        Availability {
            reachable,
            total,
            unreachable: vec![("b80cd8cb70".into(), "connecting timed out after 5000 ms".into())],
            last_error: "not the leader (leader: None)".into(),
        }
    }

    #[test]
    fn the_message_says_whether_a_quorum_was_reachable_and_why_the_others_were_not() {
        let cases = [
            (availability(1, 3), "no quorum: 1 of 3 nodes reachable"),
            (availability(0, 1), "no quorum: 0 of 1 nodes reachable"),
            (availability(2, 4), "no quorum: 2 of 4 nodes reachable"),
            (availability(2, 3), "cluster unavailable: 2 of 3 nodes reachable, none could serve the request"),
        ];
        for (availability, start) in cases {
            let text = availability.to_string();
            assert!(text.starts_with(start), "{text}");
            assert!(text.contains("(unreachable: b80cd8cb70: connecting timed out after 5000 ms)"), "{text}");
            assert!(text.ends_with("; last error: not the leader (leader: None)"), "{text}");
        }
    }

    #[test]
    fn only_failures_to_serve_are_summarized() {
        let unavailable = [
            ClientError::Kv(KvError::Unavailable("electing".into())),
            ClientError::Kv(KvError::NotLeader { leader: None, leader_addr: None }),
            ClientError::Kv(KvError::Timeout { after_ms: 10 }),
            ClientError::Cluster(ClusterError::NotLeader { leader: None, leader_addr: None }),
        ];
        for error in unavailable {
            assert!(is_availability_error(&error), "{error}");
        }
        let answers = [
            ClientError::Unauthorized("token".into()),
            ClientError::Rejected("too large".into()),
            ClientError::Kv(KvError::Validation(aspen_api::ValidationError::EmptyKey)),
        ];
        for error in answers {
            assert!(!is_availability_error(&error), "{error}");
        }
    }
}
