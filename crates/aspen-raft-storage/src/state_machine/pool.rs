//! A small bounded pool of read-only SQLite connections to the state machine file.
//!
//! Connections open lazily, at most [`READ_POOL_SIZE`] at once; a reader that finds them all
//! busy waits up to [`READ_POOL_WAIT`] and then gets a typed error. No background threads
//! (unlike r2d2), so the pool runs unchanged inside the deterministic simulator.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::schema::configure_reader;
use crate::error::StateMachineError;

/// Most read connections open at once.
pub const READ_POOL_SIZE: usize = 8;
/// Longest a read waits for a free connection.
pub const READ_POOL_WAIT: Duration = Duration::from_secs(5);

/// Hands out read-only connections to one database file.
pub struct ReadPool {
    path: PathBuf,
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Connection>,
    open: usize,
}

impl ReadPool {
    /// A pool over the database at `path`; opens one connection now to fail early.
    pub fn open(path: PathBuf) -> Result<Self, StateMachineError> {
        let first = connect(&path)?;
        Ok(ReadPool { path, state: Mutex::new(PoolState { idle: vec![first], open: 1 }), returned: Condvar::new() })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state is a list of connections and a count; both stay consistent even if a
        // holder panicked.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A connection if one is idle or can be opened now; `None` instead of waiting.
    pub fn try_get(&self) -> Result<Option<PooledConnection<'_>>, StateMachineError> {
        let mut state = self.lock();
        if let Some(conn) = state.idle.pop() {
            return Ok(Some(PooledConnection { pool: self, conn: Some(conn) }));
        }
        if state.open >= READ_POOL_SIZE {
            return Ok(None);
        }
        state.open += 1;
        drop(state);
        match connect(&self.path) {
            Ok(conn) => Ok(Some(PooledConnection { pool: self, conn: Some(conn) })),
            Err(error) => {
                self.lock().open -= 1;
                Err(error)
            }
        }
    }

    /// A connection, opened if none is idle and the pool is not full.
    pub fn get(&self) -> Result<PooledConnection<'_>, StateMachineError> {
        let deadline = Instant::now() + READ_POOL_WAIT;
        let mut state = self.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(PooledConnection { pool: self, conn: Some(conn) });
            }
            if state.open < READ_POOL_SIZE {
                state.open += 1;
                drop(state);
                return match connect(&self.path) {
                    Ok(conn) => Ok(PooledConnection { pool: self, conn: Some(conn) }),
                    Err(error) => {
                        self.lock().open -= 1;
                        Err(error)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StateMachineError::PoolExhausted { size: READ_POOL_SIZE, waited: READ_POOL_WAIT });
            }
            state = self.returned.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

fn connect(path: &PathBuf) -> Result<Connection, StateMachineError> {
    super::heap::install();
    // Read-only at the file level: no statement on a pooled connection can write,
    // whatever the authorizer lets through.
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)?;
    configure_reader(&conn)?;
    Ok(conn)
}

/// A connection borrowed from the pool; returned when dropped.
pub struct PooledConnection<'a> {
    pool: &'a ReadPool,
    conn: Option<Connection>,
}

impl PooledConnection<'_> {
    /// Closes the connection instead of returning it to the pool.
    pub fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn);
            self.pool.lock().open -= 1;
            self.pool.returned.notify_one();
        }
    }
}

impl Deref for PooledConnection<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        // `conn` is only taken in `drop`.
        self.conn.as_ref().unwrap_or_else(|| unreachable!("pooled connection used after drop"))
    }
}

impl DerefMut for PooledConnection<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().unwrap_or_else(|| unreachable!("pooled connection used after drop"))
    }
}

impl Drop for PooledConnection<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // A connection left inside a transaction (a panic mid-read) is closed, not reused.
            let mut state = self.pool.lock();
            if conn.is_autocommit() {
                state.idle.push(conn);
            } else {
                state.open -= 1;
            }
            drop(state);
            self.pool.returned.notify_one();
        }
    }
}
