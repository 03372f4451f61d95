//! The blake3 hash chain over the Raft log.
//!
//! `entry_hash(i) = blake3(prev_hash || index_le || term_le || entry_bytes)`, where
//! `prev_hash` is the hash of entry `i - 1`, or the anchor of the log's start: [`GENESIS`]
//! for a log that was never purged, the hash of the last purged entry otherwise.

use openraft::entry::RaftEntry;

use crate::error::LogStoreError;
use crate::type_config::Entry;

/// A chain hash.
pub type ChainHash = [u8; 32];

/// The hash before the first entry of a log that has never been purged.
pub const GENESIS: ChainHash = [0; 32];

/// Bytes of a stored row before the entry bytes: hash (32) then term (8, little endian).
pub const ROW_HEADER_LEN: usize = 40;

/// Computes the hash of an entry from its predecessor's hash.
pub fn entry_hash(prev: &ChainHash, index: u64, term: u64, entry_bytes: &[u8]) -> ChainHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(prev);
    hasher.update(&index.to_le_bytes());
    hasher.update(&term.to_le_bytes());
    hasher.update(entry_bytes);
    *hasher.finalize().as_bytes()
}

/// The bytes of an entry its hash covers (and its row stores).
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>, LogStoreError> {
    postcard::to_stdvec(entry).map_err(|error| LogStoreError::Encode(error.to_string()))
}

/// The hash the last of `entries` gets when they are appended, in order, after an entry
/// whose hash is `prev`: what a log computes, for checking another node's entries against
/// it. `None` for no entries; an error for entries that are not consecutive.
pub fn hash_entries(prev: &ChainHash, entries: &[Entry]) -> Result<Option<ChainHash>, LogStoreError> {
    let mut hash = None;
    for (position, entry) in entries.iter().enumerate() {
        if let Some(previous) = position.checked_sub(1).map(|before| entries[before].index())
            && previous.checked_add(1) != Some(entry.index())
        {
            return Err(LogStoreError::NonContiguousAppend { last: previous, found: entry.index() });
        }
        let bytes = encode_entry(entry)?;
        hash = Some(entry_hash(hash.as_ref().unwrap_or(prev), entry.index(), entry.log_id.leader_id.term, &bytes));
    }
    Ok(hash)
}

/// The anchor used when the log is purged past its last entry (after a snapshot install
/// made every local entry obsolete): derived only from the purge point, so every node
/// that purges to the same log id starts the same chain.
pub fn anchor_hash(index: u64, term: u64) -> ChainHash {
    entry_hash(&GENESIS, index, term, b"aspen-log-anchor")
}

/// Encodes a stored row: `hash || term || entry_bytes`.
pub fn encode_row(hash: &ChainHash, term: u64, entry_bytes: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(ROW_HEADER_LEN + entry_bytes.len());
    row.extend_from_slice(hash);
    row.extend_from_slice(&term.to_le_bytes());
    row.extend_from_slice(entry_bytes);
    row
}

/// A stored row split into its parts; `None` when the row is shorter than its header.
pub struct Row<'a> {
    /// The stored chain hash.
    pub hash: ChainHash,
    /// The stored term.
    pub term: u64,
    /// The serialized entry.
    pub entry_bytes: &'a [u8],
}

/// Splits a stored row; `None` when it is too short to hold a header.
pub fn decode_row(row: &[u8]) -> Option<Row<'_>> {
    let (hash, rest) = row.split_first_chunk::<32>()?;
    let (term, entry_bytes) = rest.split_first_chunk::<8>()?;
    Some(Row { hash: *hash, term: u64::from_le_bytes(*term), entry_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_field_changes_the_hash() {
        let base = entry_hash(&GENESIS, 5, 2, b"entry");
        let mut prev = GENESIS;
        prev[31] = 1;
        for other in [
            entry_hash(&prev, 5, 2, b"entry"),
            entry_hash(&GENESIS, 6, 2, b"entry"),
            entry_hash(&GENESIS, 5, 3, b"entry"),
            entry_hash(&GENESIS, 5, 2, b"entrz"),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn rows_round_trip() {
        bolero::check!().with_type::<([u8; 32], u64, Vec<u8>)>().for_each(|(hash, term, bytes)| {
            let row = encode_row(hash, *term, bytes);
            let decoded = decode_row(&row).expect("a whole row decodes");
            assert_eq!((&decoded.hash, decoded.term, decoded.entry_bytes), (hash, *term, bytes.as_slice()));
            assert!(decode_row(&row[..ROW_HEADER_LEN - 1]).is_none());
        });
    }
}
