//! Client sessions: the state machine's half of exactly-once writes (see
//! [`aspen_api::session`]).
//!
//! Each session is one row of `sessions`: the oldest sequence still remembered (`floor`),
//! the cluster-clock time of its last write, and the answers of its remembered writes. The
//! rows change in the same transaction as the writes they answer, so a crash, a snapshot or
//! a re-apply from the log can never separate a write from the record that it was applied.
//!
//! Within one apply transaction the rows are read once into [`Sessions`] and written back
//! once, before the commit: a client with many writes in one entry pays for one row.
//! Between transactions the decoded rows are kept in a [`SessionCache`], which the writer
//! gets back only after a commit (a failed apply drops it), so a cached row always equals
//! the table's; it saves the row's read and decoding on each write (bounded by
//! [`MAX_CACHED_SESSIONS`] rows of at most [`MAX_CACHED_SESSION_SIZE`] bytes).
//! Everything here depends only on the database and the entries, so every replica reaches
//! the same sessions at the same index; `--features sim-bug-no-dedup` (a deliberate bug for
//! the simulator's self-test) skips the check.

use std::collections::BTreeMap;

use aspen_api::session::{
    MAX_SESSION_REPLY_SIZE, MAX_SESSION_WINDOW, MAX_SESSIONS, SESSION_IDLE_EXPIRY_MS, SESSION_MIN_IDLE_MS,
    SESSION_SWEEP_INTERVAL_MS,
};
use aspen_api::{ApplyError, ClientWrite, Revision, SessionId, WriteResponse};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::apply::{self, Applied};

/// The name of the `raft_meta` row counting live sessions.
const SESSION_COUNT: &str = "session_count";

/// What a session remembers of one write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Remembered {
    /// The answer, as first given.
    Reply(Result<WriteResponse, ApplyError>),
    /// Applied at this revision; the answer was larger than [`MAX_SESSION_REPLY_SIZE`].
    Applied(Revision),
}

/// One session's row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Writes below this sequence are forgotten; a write below it is refused as too old.
    floor: u64,
    /// Cluster-clock time of the session's last write.
    last_used_ms: u64,
    /// Answers of the remembered writes (sequences `floor..floor + MAX_SESSION_WINDOW`).
    replies: BTreeMap<u64, Remembered>,
}

/// Most session rows kept decoded between apply transactions.
pub const MAX_CACHED_SESSIONS: usize = 16 * 1024;
/// Largest encoded row kept decoded between transactions (a closed-loop client's row, with
/// one remembered answer, is a few dozen bytes); larger rows are read again when used.
pub const MAX_CACHED_SESSION_SIZE: usize = 1024;

/// Session rows as committed, kept decoded between apply transactions. Only
/// [`Sessions::into_cache`] makes one, after its transaction committed.
#[derive(Default)]
pub struct SessionCache {
    rows: BTreeMap<SessionId, Session>,
}

/// The sessions one apply transaction touches, written back by [`Sessions::flush`].
#[derive(Default)]
pub struct Sessions {
    /// Rows as this transaction sees them: the cache's plus those read or created here.
    rows: BTreeMap<SessionId, Session>,
    /// Rows changed since the last flush, and whether each is new to the table. Ordered, so
    /// rows are written back in the same order on every replica.
    dirty: BTreeMap<SessionId, bool>,
    /// Live sessions, loaded from `raft_meta` on first need.
    count: Option<u64>,
}

impl Sessions {
    /// Sessions for a new transaction, starting from the rows `cache` holds.
    pub fn with_cache(cache: SessionCache) -> Sessions {
        Sessions { rows: cache.rows, dirty: BTreeMap::new(), count: None }
    }

    /// The rows to keep for the next transaction; call only after this one committed.
    pub fn into_cache(mut self) -> SessionCache {
        debug_assert!(self.dirty.is_empty(), "flush before the commit");
        while self.rows.len() > MAX_CACHED_SESSIONS {
            self.rows.pop_first();
        }
        SessionCache { rows: self.rows }
    }

    /// Applies `write` at `revision` and cluster time `now_ms`: once per write identity.
    pub fn apply(&mut self, conn: &Connection, revision: Revision, now_ms: u64, write: &ClientWrite) -> Applied {
        let Some(id) = write.id else { return apply::apply_command(conn, revision, &write.command) };
        if let Err(error) = id.validate() {
            return Ok(Err(ApplyError::Invalid(error)));
        }
        if cfg!(feature = "sim-bug-no-dedup") {
            return apply::apply_command(conn, revision, &write.command);
        }
        if !self.load(conn, id.session)? {
            // Only a client still waiting for its first write may start a session: any later
            // write to an unknown session means it expired, and starting afresh could apply
            // a retried write twice.
            if id.first_outstanding != 1 {
                return Ok(Err(ApplyError::SessionExpired { session: id.session }));
            }
            if let Err(error) = self.make_room(conn, now_ms)? {
                return Ok(Err(error));
            }
            self.rows.insert(id.session, Session { floor: 1, last_used_ms: now_ms, replies: BTreeMap::new() });
            self.dirty.insert(id.session, true);
        }
        // Worked on in place: a client with many writes in one apply pays for its row once.
        let Some(session) = self.rows.get_mut(&id.session) else {
            return Ok(Err(ApplyError::SessionExpired { session: id.session }));
        };
        if id.seq < session.floor {
            return Ok(Err(ApplyError::WriteTooOld { seq: id.seq, floor: session.floor }));
        }
        if let Some(remembered) = session.replies.get(&id.seq) {
            return Ok(match remembered {
                Remembered::Reply(reply) => reply.clone(),
                Remembered::Applied(revision) => Err(ApplyError::AppliedReplyNotKept { revision: *revision }),
            });
        }
        let floor = session.floor.max(id.first_outstanding);
        if id.seq - floor >= MAX_SESSION_WINDOW {
            // A late duplicate of a write the session has moved far beyond.
            return Ok(Err(ApplyError::WriteTooOld { seq: id.seq, floor }));
        }
        let result = apply::apply_command(conn, revision, &write.command)?;
        self.dirty.entry(id.session).or_insert(false);
        if floor > session.floor {
            session.floor = floor;
            session.replies = session.replies.split_off(&floor);
        }
        session.replies.insert(id.seq, remember(&result, revision));
        session.last_used_ms = session.last_used_ms.max(now_ms);
        Ok(result)
    }

    /// Makes sure `id`'s row is in [`Sessions::rows`]; `false` if the session does not exist.
    fn load(&mut self, conn: &Connection, id: SessionId) -> rusqlite::Result<bool> {
        if self.rows.contains_key(&id) {
            return Ok(true);
        }
        let row: Option<Vec<u8>> = conn
            .prepare_cached("SELECT state FROM sessions WHERE id = ?1")?
            .query_row(params![id.0.to_be_bytes()], |row| row.get(0))
            .optional()?;
        let Some(bytes) = row else { return Ok(false) };
        // A row that does not decode was written by another version or damaged; the
        // error stops the apply (a fault, not a result), like any other SQLite failure.
        let session = postcard::from_bytes(&bytes).map_err(|error| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(error))
        })?;
        self.rows.insert(id, session);
        Ok(true)
    }

    /// Makes room for one more session: below [`MAX_SESSIONS`], or by replacing the least
    /// recently used one if it has been idle for [`SESSION_MIN_IDLE_MS`].
    fn make_room(&mut self, conn: &Connection, now_ms: u64) -> rusqlite::Result<Result<(), ApplyError>> {
        let count = match self.count {
            Some(count) => count,
            None => read_count(conn)?,
        };
        if count < MAX_SESSIONS {
            self.count = Some(count + 1);
            return Ok(Ok(()));
        }
        // Rows changed in this transaction are newer than anything idle: flush them first so
        // the oldest row is found in the table.
        self.flush(conn)?;
        let oldest: Option<(Vec<u8>, u64)> = conn
            .prepare_cached("SELECT id, last_used_ms FROM sessions ORDER BY last_used_ms, id LIMIT 1")?
            .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        match oldest {
            Some((id, last_used_ms)) if now_ms.saturating_sub(last_used_ms) >= SESSION_MIN_IDLE_MS => {
                conn.prepare_cached("DELETE FROM sessions WHERE id = ?1")?.execute(params![id])?;
                if let Ok(bytes) = <[u8; 16]>::try_from(id.as_slice()) {
                    self.rows.remove(&SessionId(u128::from_be_bytes(bytes)));
                }
                self.count = Some(count);
                Ok(Ok(()))
            }
            _ => Ok(Err(ApplyError::TooManySessions { max: MAX_SESSIONS })),
        }
    }

    /// Drops the sessions idle for [`SESSION_IDLE_EXPIRY_MS`] if the cluster clock entered a
    /// new sweep interval between `before_ms` and `now_ms`. Called before each entry, so every
    /// replica sweeps at the same entry.
    pub fn sweep_if_due(&mut self, conn: &Connection, before_ms: u64, now_ms: u64) -> rusqlite::Result<()> {
        if before_ms / SESSION_SWEEP_INTERVAL_MS == now_ms / SESSION_SWEEP_INTERVAL_MS {
            return Ok(());
        }
        self.flush(conn)?;
        let cutoff = now_ms.saturating_sub(SESSION_IDLE_EXPIRY_MS);
        let dropped = conn.prepare_cached("DELETE FROM sessions WHERE last_used_ms < ?1")?.execute(params![cutoff])?;
        // Flushed above, so every row here is as the table had it before the delete.
        self.rows.retain(|_, session| session.last_used_ms >= cutoff);
        if dropped > 0 {
            let count = match self.count {
                Some(count) => count,
                None => read_count(conn)?,
            };
            self.count = Some(count.saturating_sub(dropped as u64));
            tracing::debug!(dropped, "expired idle client sessions");
        }
        Ok(())
    }

    /// Writes every changed row and the session count; call before the transaction commits.
    pub fn flush(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        for (id, new) in std::mem::take(&mut self.dirty) {
            let Some(session) = self.rows.get(&id) else { continue };
            let state = postcard::to_stdvec(session)
                .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
            let sql = if new {
                "INSERT INTO sessions (id, last_used_ms, state) VALUES (?1, ?2, ?3)"
            } else {
                "UPDATE sessions SET last_used_ms = ?2, state = ?3 WHERE id = ?1"
            };
            conn.prepare_cached(sql)?.execute(params![id.0.to_be_bytes(), session.last_used_ms, state])?;
            if state.len() > MAX_CACHED_SESSION_SIZE {
                self.rows.remove(&id);
            }
        }
        if let Some(count) = self.count {
            conn.prepare_cached(
                "INSERT INTO raft_meta (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![SESSION_COUNT, count])?;
        }
        Ok(())
    }
}

fn read_count(conn: &Connection) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT value FROM raft_meta WHERE name = ?1")?
        .query_row(params![SESSION_COUNT], |row| row.get(0))
        .optional()
        .map(|count| count.unwrap_or(0))
}

/// What to keep of `result`: the answer itself when it is small enough.
fn remember(result: &Result<WriteResponse, ApplyError>, revision: Revision) -> Remembered {
    // Only transaction and batch answers can be large; the others are a few bytes, and
    // measuring them would cost an encoding per write.
    if !matches!(result, Ok(WriteResponse::Txn(_) | WriteResponse::Batch(_))) {
        return Remembered::Reply(result.clone());
    }
    match postcard::to_stdvec(result) {
        Ok(bytes) if bytes.len() <= MAX_SESSION_REPLY_SIZE => Remembered::Reply(result.clone()),
        _ => Remembered::Applied(revision),
    }
}
