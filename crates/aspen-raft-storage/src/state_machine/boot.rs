//! Whether the state machine's SQLite file can be trusted when it is opened (ADR 0003).
//!
//! The state machine is derived data: the current snapshot plus the Raft log after it
//! rebuild it exactly, and both are fsynced. So SQLite need not fsync at all
//! (`synchronous=OFF`): a process crash loses nothing it wrote (the OS page cache survives
//! the process), and only an OS crash or power loss can leave the file torn. The file is
//! therefore trusted only under the OS boot that wrote it, or after a clean close made it
//! durable; otherwise it is deleted and rebuilt from the snapshot and the log.
//!
//! A marker file next to the database records which: `clean`, or `boot <id>` for "written
//! without fsync under this boot". It is written durably (temp file, fsync, rename, fsync
//! of the directory) before the first unsynced write, so an unsynced file never exists
//! without a marker saying so.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::DB_FILE;
use crate::error::StateMachineError;

/// The marker file in the state machine's directory.
pub const BOOT_MARKER_FILE: &str = "state.boot";
/// Where Linux names the running boot; it changes on every boot.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// Longest marker read; anything longer is not a marker this code wrote.
const MAX_MARKER_LEN: u64 = 256;

/// How the state machine's SQLite file survives crashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=NORMAL`: WAL checkpoints fsync, so the file survives an OS crash (it may
    /// lose its last commits, which the log re-applies). Used where the boot cannot be told.
    Synced,
    /// `synchronous=OFF`: SQLite never fsyncs; the file is trusted only under `boot` (or
    /// after a clean close) and rebuilt from the snapshot and the log otherwise.
    Unsynced {
        /// Names the running OS boot; another value means the OS restarted in between.
        boot: String,
    },
}

impl Durability {
    /// `Unsynced` under the running boot where the OS names it (Linux), else `Synced`.
    pub fn for_this_boot() -> Self {
        match fs::read_to_string(BOOT_ID_PATH) {
            Ok(id) if !id.trim().is_empty() && id.len() < MAX_MARKER_LEN as usize => {
                Durability::Unsynced { boot: id.trim().to_string() }
            }
            _ => Durability::Synced,
        }
    }

    /// WAL pages after which the state machine checkpoints: larger without fsync, where a
    /// checkpoint only copies pages (see [`super::CHECKPOINT_WAL_PAGES`]).
    pub(crate) fn checkpoint_wal_pages(&self) -> u64 {
        match self {
            Durability::Synced => super::SYNCED_CHECKPOINT_WAL_PAGES,
            Durability::Unsynced { .. } => super::CHECKPOINT_WAL_PAGES,
        }
    }

    /// The `PRAGMA synchronous` value for connections that write or checkpoint.
    pub(crate) fn synchronous(&self) -> &'static str {
        match self {
            Durability::Synced => "NORMAL",
            Durability::Unsynced { .. } => "OFF",
        }
    }

    fn marker(&self) -> String {
        match self {
            Durability::Synced => CLEAN.to_string(),
            Durability::Unsynced { boot } => format!("{BOOT_PREFIX}{boot}"),
        }
    }
}

const CLEAN: &str = "clean";
const BOOT_PREFIX: &str = "boot ";

/// What happened to the existing database when it was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// No database yet, or one that can be trusted.
    Kept,
    /// A database written without fsync under another boot (or under one that cannot be
    /// told now) was deleted; the caller rebuilds from the snapshot and the log.
    Discarded,
}

/// Run before the database is opened: deletes a file that cannot be trusted, then records
/// `durability` in the marker (durably) so the writes that follow are covered by it.
pub(crate) fn prepare(dir: &Path, durability: &Durability) -> Result<Opened, StateMachineError> {
    let marker = read_marker(dir)?;
    let trusted = match marker.as_deref() {
        // No marker: nothing was ever written unsynced (new, or from a build that always synced).
        None | Some(CLEAN) => true,
        Some(written) => match durability {
            Durability::Unsynced { .. } => written == durability.marker(),
            Durability::Synced => false,
        },
    };
    let db = dir.join(DB_FILE);
    let opened = if !trusted && db.exists() {
        tracing::warn!(
            dir = %dir.display(),
            written = marker.as_deref().unwrap_or(""),
            "the state machine was written without fsync and the OS has restarted since; \
             rebuilding it from the snapshot and the log"
        );
        for suffix in ["", "-wal", "-shm"] {
            remove_if_exists(&dir.join(format!("{DB_FILE}{suffix}")))?;
        }
        Opened::Discarded
    } else {
        Opened::Kept
    };
    let wanted = durability.marker();
    if marker.as_deref() != Some(wanted.as_str()) {
        write_marker(dir, &wanted)?;
    }
    Ok(opened)
}

/// Records that the database is durable as it stands (after a checkpoint and an fsync):
/// it is trusted under any later boot until the next unsynced write is announced.
pub(crate) fn mark_clean(dir: &Path) -> io::Result<()> {
    write_marker(dir, CLEAN)
}

/// Records `durability` as the marker, as a node does while it runs. For tests and the
/// simulator, which stage an OS crash by writing what the marker held before it.
#[doc(hidden)]
pub fn record_running(dir: &Path, durability: &Durability) -> io::Result<()> {
    write_marker(dir, &durability.marker())
}

fn read_marker(dir: &Path) -> Result<Option<String>, StateMachineError> {
    let path = dir.join(BOOT_MARKER_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let mut text = String::new();
    // An unreadable or oversized marker is not one this code wrote: distrust the database.
    if io::Read::read_to_string(&mut io::Read::take(file, MAX_MARKER_LEN), &mut text).is_err() {
        return Ok(Some(String::from("unreadable")));
    }
    Ok(Some(text.trim().to_string()))
}

fn write_marker(dir: &Path, text: &str) -> io::Result<()> {
    let temp = dir.join(format!("{BOOT_MARKER_FILE}.tmp"));
    {
        let mut file = File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    fs::rename(&temp, dir.join(BOOT_MARKER_FILE))?;
    File::open(dir)?.sync_all()
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsynced(boot: &str) -> Durability {
        Durability::Unsynced { boot: boot.into() }
    }

    fn with_db(dir: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            fs::write(dir.join(format!("{DB_FILE}{suffix}")), b"data").expect("write");
        }
    }

    #[test]
    fn a_file_from_another_boot_is_discarded_and_one_from_this_boot_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(prepare(dir.path(), &unsynced("a")).expect("prepare"), Opened::Kept, "nothing there yet");
        with_db(dir.path());
        assert_eq!(prepare(dir.path(), &unsynced("a")).expect("prepare"), Opened::Kept, "same boot");
        assert_eq!(prepare(dir.path(), &unsynced("b")).expect("prepare"), Opened::Discarded, "the OS restarted");
        for suffix in ["", "-wal", "-shm"] {
            assert!(!dir.path().join(format!("{DB_FILE}{suffix}")).exists(), "{suffix} left behind");
        }
        assert_eq!(read_marker(dir.path()).expect("read"), Some("boot b".into()));
    }

    #[test]
    fn a_clean_close_or_no_marker_is_trusted_under_any_boot() {
        let dir = tempfile::tempdir().expect("tempdir");
        with_db(dir.path());
        assert_eq!(prepare(dir.path(), &unsynced("a")).expect("prepare"), Opened::Kept, "no marker: always synced");
        mark_clean(dir.path()).expect("clean");
        assert_eq!(prepare(dir.path(), &unsynced("b")).expect("prepare"), Opened::Kept);
        assert!(dir.path().join(DB_FILE).exists());
    }

    #[test]
    fn an_unsynced_file_is_not_trusted_where_the_boot_cannot_be_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        with_db(dir.path());
        record_running(dir.path(), &unsynced("a")).expect("record");
        assert_eq!(prepare(dir.path(), &Durability::Synced).expect("prepare"), Opened::Discarded);
        assert_eq!(read_marker(dir.path()).expect("read"), Some(CLEAN.into()), "synced writes need no boot");
        fs::write(dir.path().join(BOOT_MARKER_FILE), vec![b'x'; 1000]).expect("garbage marker");
        with_db(dir.path());
        assert_eq!(prepare(dir.path(), &unsynced("a")).expect("prepare"), Opened::Discarded, "a garbled marker");
    }
}
