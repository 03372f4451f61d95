//! The simulator's model of what an OS crash does to the log journal (built only with
//! `--cfg madsim`): bytes written since the file's last `fdatasync` may be lost.
//!
//! Every journal write records the bytes it replaced; a sync forgets them for that file.
//! [`lose_unsynced`] then undoes a random suffix of the unsynced writes, newest first, and
//! tears the write at the boundary (part of it reaches the disk, part does not), as a
//! crash of the machine (not only of the process) can. redb needs no such model: each of
//! its commits is durable (fsync) before it returns, and under the simulator storage work
//! runs inline, so no commit is in flight when a node is killed.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// One write not yet covered by a sync: where, and the bytes it replaced.
struct Undo {
    offset: u64,
    old: Vec<u8>,
    new_len: usize,
}

static UNSYNCED: Mutex<Option<HashMap<PathBuf, Vec<Undo>>>> = Mutex::new(None);

fn unsynced() -> MutexGuard<'static, Option<HashMap<PathBuf, Vec<Undo>>>> {
    UNSYNCED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records that `len` bytes at `offset` of `path` are about to be overwritten in `file`.
pub(crate) fn before_write(path: &Path, file: &std::fs::File, offset: u64, len: usize) {
    let mut old = vec![0u8; len];
    // Bytes past the end read as nothing; the model restores them as zeros.
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut old[filled..], offset + filled as u64) {
            Ok(0) | Err(_) => break,
            Ok(read) => filled += read,
        }
    }
    unsynced().get_or_insert_with(HashMap::new).entry(path.to_path_buf()).or_default().push(Undo {
        offset,
        old,
        new_len: len,
    });
}

/// Every write to `path` so far is durable.
pub(crate) fn synced(path: &Path) {
    if let Some(map) = unsynced().as_mut() {
        map.remove(path);
    }
}

/// Applies an OS crash to the journal file at `path` (its process is already gone): of its
/// unsynced writes, the newest `lost` are undone, and the newest one kept is torn after
/// `torn_keep` of its bytes when `torn_keep` is shorter than it. Returns a description for
/// the simulator's trace.
pub fn lose_unsynced(path: &Path, lost: usize, torn_keep: usize) -> String {
    // The file name only: the directory holds the process id, and traces must replay exactly.
    let name = path.file_name().map_or_else(|| path.display().to_string(), |name| name.to_string_lossy().into_owned());
    let Some(mut undos) = unsynced().as_mut().and_then(|map| map.remove(path)) else {
        return format!("{name}: nothing unsynced");
    };
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
        return format!("{name}: cannot open");
    };
    let total = undos.len();
    let lost = lost.min(total);
    let mut result = Vec::new();
    for undo in undos.drain(total - lost..).rev() {
        result.push(file.write_all_at(&undo.old, undo.offset).map_err(|error| error.to_string()));
    }
    let mut torn = String::new();
    if let Some(last) = undos.last()
        && torn_keep < last.new_len
    {
        let keep = torn_keep;
        result.push(file.write_all_at(&last.old[keep..], last.offset + keep as u64).map_err(|error| error.to_string()));
        torn = format!(", the write before them torn after {keep} of {} bytes", last.new_len);
    }
    let failed = result.iter().filter(|outcome| outcome.is_err()).count();
    format!("{name}: {lost} of {total} unsynced writes lost{torn} ({failed} restores failed)")
}
