//! Decoding stored column values into their types. A value that does not decode is a
//! [`StoreError::CorruptRow`] naming the table and the row's key, so a caller can never get a
//! shorter answer for a damaged row.

use dpsync_hash::{ChunkId, ContentRoot, FileHash};

use crate::error::{Result, StoreError};

/// The key of a row, for messages: `column x'0a0b…'` for a blob key.
pub(crate) fn blob_key(column: &str, bytes: &[u8]) -> String {
    let mut s = String::with_capacity(column.len() + 4 + 2 * bytes.len());
    s.push_str(column);
    s.push_str(" x'");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s.push('\'');
    s
}

fn corrupt(table: &'static str, key: impl FnOnce() -> String, detail: String) -> StoreError {
    StoreError::CorruptRow { table, key: key(), detail }
}

/// A chunk id stored as 32 raw bytes.
pub(crate) fn chunk_id(table: &'static str, key: impl FnOnce() -> String, bytes: &[u8]) -> Result<ChunkId> {
    ChunkId::from_slice(bytes).ok_or_else(|| corrupt(table, key, format!("chunk_id is {} bytes, not 32", bytes.len())))
}

/// A file hash stored as 32 raw bytes.
pub(crate) fn file_hash(table: &'static str, key: impl FnOnce() -> String, bytes: &[u8]) -> Result<FileHash> {
    FileHash::from_slice(bytes)
        .ok_or_else(|| corrupt(table, key, format!("file_hash is {} bytes, not 32", bytes.len())))
}

/// A content root stored as 64 hex digits.
pub(crate) fn content_root(table: &'static str, key: impl FnOnce() -> String, hex: &str) -> Result<ContentRoot> {
    ContentRoot::from_hex(hex).map_err(|e| corrupt(table, key, format!("content root: {e}")))
}

/// A byte offset (stored as a signed 64-bit integer).
pub(crate) fn offset(table: &'static str, key: impl FnOnce() -> String, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(table, key, format!("offset {v} is negative")))
}

/// A chunk length (stored as a signed 64-bit integer).
pub(crate) fn len(table: &'static str, key: impl FnOnce() -> String, v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| corrupt(table, key, format!("len {v} is not a chunk length")))
}

/// An offset to store: SQLite and PostgreSQL integers are signed.
pub(crate) fn offset_to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::InvalidInput(format!("offset {v} does not fit a signed 64-bit integer")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_table_and_key() {
        let key = || blob_key("chunk_id", &[10, 11, 12]);
        assert_eq!(key(), "chunk_id x'0a0b0c'");
        let e = chunk_id("chunk_index", key, &[10, 11, 12]).unwrap_err().to_string();
        assert!(e.contains("chunk_index") && e.contains("x'0a0b0c'") && e.contains("3 bytes"), "{e}");
        assert!(offset("staged_chunks", || "k".into(), -1).is_err());
        assert!(len("staged_chunks", || "k".into(), 1 << 32).is_err());
        assert_eq!(len("staged_chunks", || "k".into(), 65536).unwrap(), 65536);
        assert!(content_root("versions", || "k".into(), "abc").unwrap_err().to_string().contains("versions"));
    }
}
