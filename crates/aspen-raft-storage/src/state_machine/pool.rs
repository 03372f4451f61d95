//! A small r2d2 adapter for read-only SQLite connections to the state machine file.

use std::path::PathBuf;

use rusqlite::{Connection, OpenFlags};

use super::schema::configure_reader;

/// Opens read-only connections to one database file, for an r2d2 pool.
#[derive(Debug)]
pub struct ReadOnlyConnections {
    path: PathBuf,
}

impl ReadOnlyConnections {
    /// Connections to the database at `path`.
    pub fn new(path: PathBuf) -> Self {
        ReadOnlyConnections { path }
    }
}

impl r2d2::ManageConnection for ReadOnlyConnections {
    type Connection = Connection;
    type Error = rusqlite::Error;

    fn connect(&self) -> Result<Connection, rusqlite::Error> {
        // Read-only at the file level: no statement on a pooled connection can write,
        // whatever the authorizer lets through.
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(&self.path, flags)?;
        configure_reader(&conn)?;
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut Connection) -> Result<(), rusqlite::Error> {
        conn.execute_batch("SELECT 1")
    }

    fn has_broken(&self, _conn: &mut Connection) -> bool {
        false
    }
}
