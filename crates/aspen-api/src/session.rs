//! Exactly-once writes: every client write carries an identity (a client session and a
//! sequence number, Raft dissertation section 6.3), and the state machine remembers each
//! session's answers, so a write retried through timeouts, leader changes, forwarding and
//! snapshots takes effect at most once and its retry gets the first answer.
//!
//! A client may have many writes in flight on one session. Each carries the lowest sequence
//! the client still waits for (`first_outstanding`, as in LogCabin): answers below it are
//! no longer needed and are dropped, so a session keeps at most [`MAX_SESSION_WINDOW`]
//! answers. A session is created by the first write that arrives for it, but only while the
//! client still waits for its first write (`first_outstanding == 1`); a later write to a
//! session the cluster does not know means the session expired, which is an error, never
//! a silent fresh start (that would apply a retried write twice).
//!
//! Expiry is replicated: each entry carries its leader's wall-clock time, the state machine
//! keeps the largest such time as the cluster's clock, and every replica drops the same idle
//! sessions at the same entry ([`SESSION_IDLE_EXPIRY_MS`], swept when the cluster clock
//! enters a new [`SESSION_SWEEP_INTERVAL_MS`]); when [`MAX_SESSIONS`] are live, a new
//! session replaces the least recently used one if that has been idle for at least
//! [`SESSION_MIN_IDLE_MS`], and is refused otherwise.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::kv::WriteCommand;

/// Most live sessions a cluster keeps.
pub const MAX_SESSIONS: u64 = 100_000;
/// Most sequence numbers a session's writes in flight may span (`seq - first_outstanding`),
/// and so the most answers a session keeps. A client whose oldest write is stuck opens a
/// new session rather than exceed it.
pub const MAX_SESSION_WINDOW: u64 = 1024;
/// Largest encoded answer a session keeps; a larger one (a transaction that read big
/// values) is remembered only as applied at its revision.
pub const MAX_SESSION_REPLY_SIZE: usize = 16 * 1024;
/// A session unused for this long (by the cluster clock) is dropped: one hour.
pub const SESSION_IDLE_EXPIRY_MS: u64 = 3_600_000;
/// A live session is never replaced to make room before it has been idle this long: far
/// beyond any client's retry deadline, so no retry can find its session replaced.
pub const SESSION_MIN_IDLE_MS: u64 = 120_000;
/// Idle sessions are swept when the cluster clock enters a new interval of this length.
pub const SESSION_SWEEP_INTERVAL_MS: u64 = 60_000;

/// A client session: 128 random bits chosen by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u128);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The identity of one client write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteId {
    /// The client's session.
    pub session: SessionId,
    /// This write's number in the session, from 1.
    pub seq: u64,
    /// The lowest sequence the client still waits for (at most `seq`); answers below it
    /// can be forgotten.
    pub first_outstanding: u64,
}

impl WriteId {
    /// Checks `1 <= first_outstanding <= seq < first_outstanding + MAX_SESSION_WINDOW`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let WriteId { seq, first_outstanding, .. } = *self;
        if first_outstanding == 0 || first_outstanding > seq || seq - first_outstanding >= MAX_SESSION_WINDOW {
            return Err(ValidationError::InvalidWriteId { seq, first_outstanding, window: MAX_SESSION_WINDOW });
        }
        Ok(())
    }
}

/// A write as a client sends it: the command and, for exactly-once, its identity.
/// A write without an identity is applied each time it arrives (internal and test use).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientWrite {
    /// The write's identity.
    pub id: Option<WriteId>,
    /// What to do.
    pub command: WriteCommand,
}

impl ClientWrite {
    /// Checks the command and the identity.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(id) = &self.id {
            id.validate()?;
        }
        self.command.validate()
    }
}

impl From<WriteCommand> for ClientWrite {
    fn from(command: WriteCommand) -> Self {
        ClientWrite { id: None, command }
    }
}

/// What one Raft entry carries: client writes proposed together (one append, one fsync,
/// one apply transaction), each with its own answer, and the proposing leader's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The leader's wall-clock time when it proposed, in ms since the Unix epoch. Replicated
    /// with the entry, so every replica's session expiry sees the same time.
    pub time_ms: u64,
    /// The writes, applied in order.
    pub writes: Vec<ClientWrite>,
}

impl From<WriteCommand> for Proposal {
    /// One write without an identity, at time 0 (tests and tools).
    fn from(command: WriteCommand) -> Self {
        Proposal { time_ms: 0, writes: vec![ClientWrite::from(command)] }
    }
}

impl std::fmt::Display for Proposal {
    /// A one-line summary for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.writes.as_slice() {
            [one] => write!(f, "{}", one.command),
            writes => write!(f, "{} writes", writes.len()),
        }
    }
}

/// A client's side of a session: hands out write identities and tracks which writes are
/// still in flight. Shared by aspen-client and the simulator's clients, so the simulator
/// runs the numbering users run.
#[derive(Debug)]
pub struct ClientSession {
    id: SessionId,
    next_seq: u64,
    outstanding: BTreeSet<u64>,
}

impl ClientSession {
    /// A new session with the given random id.
    pub fn new(id: SessionId) -> Self {
        ClientSession { id, next_seq: 1, outstanding: BTreeSet::new() }
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The identity of a new write, or `None` when it would span more than
    /// [`MAX_SESSION_WINDOW`] sequences from the oldest write in flight (the caller then
    /// starts a new session with [`ClientSession::new`]).
    pub fn begin(&mut self) -> Option<WriteId> {
        let seq = self.next_seq;
        let first_outstanding = self.outstanding.first().copied().unwrap_or(seq);
        if seq - first_outstanding >= MAX_SESSION_WINDOW {
            return None;
        }
        self.next_seq += 1;
        self.outstanding.insert(seq);
        Some(WriteId { session: self.id, seq, first_outstanding })
    }

    /// The identity to resend `id` with: the same sequence, the current oldest write in flight.
    pub fn refresh(&self, id: WriteId) -> WriteId {
        if id.session != self.id {
            return id;
        }
        let first_outstanding = self.outstanding.first().copied().unwrap_or(id.seq).min(id.seq);
        WriteId { first_outstanding, ..id }
    }

    /// The client no longer waits for `id` (answered, or given up on).
    pub fn finish(&mut self, id: WriteId) {
        if id.session == self.id {
            self.outstanding.remove(&id.seq);
        }
    }

    /// Writes in flight.
    pub fn in_flight(&self) -> usize {
        self.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_carry_the_oldest_write_in_flight() {
        let mut session = ClientSession::new(SessionId(7));
        let first = session.begin().expect("room");
        let second = session.begin().expect("room");
        assert_eq!((first.seq, first.first_outstanding), (1, 1));
        assert_eq!((second.seq, second.first_outstanding), (2, 1));
        session.finish(first);
        let third = session.begin().expect("room");
        assert_eq!((third.seq, third.first_outstanding), (3, 2));
        assert_eq!(session.refresh(third).first_outstanding, 2);
        session.finish(second);
        assert_eq!(session.refresh(third).first_outstanding, 3, "a resend carries the advanced floor");
        for id in [first, second, third] {
            assert_eq!(id.validate(), Ok(()));
        }
    }

    #[test]
    fn a_stuck_write_bounds_the_window() {
        let mut session = ClientSession::new(SessionId(1));
        let stuck = session.begin().expect("room");
        for _ in 1..MAX_SESSION_WINDOW {
            let id = session.begin().expect("room");
            session.finish(id);
        }
        assert_eq!(session.begin(), None, "the next write would leave the window");
        session.finish(stuck);
        assert!(session.begin().is_some());
    }

    #[test]
    fn malformed_identities_are_refused() {
        let session = SessionId(1);
        for (seq, first_outstanding) in [(0, 0), (1, 0), (1, 2), (MAX_SESSION_WINDOW + 1, 1)] {
            let id = WriteId { session, seq, first_outstanding };
            assert!(id.validate().is_err(), "{seq} / {first_outstanding}");
        }
    }
}
