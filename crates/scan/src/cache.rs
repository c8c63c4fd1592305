//! The scan cache: the (size, mtime, ctime, inode, device) each file had when its hash
//! was taken, stored with the manifest those hashes are in (once per content root) so the
//! next refresh can skip unchanged files.
//!
//! A file modified within [`RACY_WINDOW_NS`] of the moment the scan began is stored as
//! never-reusable: file timestamps come from a coarse clock (one kernel tick, at most
//! 10 ms), so a second write in the same tick as the first would otherwise go unseen.

use std::collections::HashMap;

use crate::FileStat;

/// Files whose mtime is this close to the recording time are always read again.
pub const RACY_WINDOW_NS: i64 = 50_000_000;
const MAGIC: &[u8; 4] = b"DPSC";
const FORMAT: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scan cache is corrupt: {0}")]
pub struct CacheDecodeError(&'static str);

/// Path → stat at hashing time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanCache {
    stats: HashMap<String, FileStat>,
}

impl ScanCache {
    pub fn get(&self, path: &str) -> Option<FileStat> {
        self.stats.get(path).copied()
    }

    /// Records `stat` for `path`, unless the file is too recent to trust (see module doc).
    pub fn record(&mut self, path: &str, stat: FileStat, scan_started_ns: i64) {
        if stat.mtime_ns >= scan_started_ns - RACY_WINDOW_NS {
            return;
        }
        self.stats.insert(path.to_owned(), stat);
    }

    pub fn len(&self) -> usize {
        self.stats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stats.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut keys: Vec<&String> = self.stats.keys().collect();
        keys.sort();
        let mut out = Vec::with_capacity(14 + keys.len() * 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
        for k in keys {
            let s = &self.stats[k];
            out.extend_from_slice(&(k.len() as u16).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            for v in [s.size, s.mtime_ns as u64, s.ctime_ns as u64, s.ino, s.dev] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Decodes; an empty input is an empty cache.
    pub fn decode(b: &[u8]) -> Result<Self, CacheDecodeError> {
        if b.is_empty() {
            return Ok(Self::default());
        }
        let mut r = b;
        let mut take = |n: usize| -> Result<&[u8], CacheDecodeError> {
            if r.len() < n {
                return Err(CacheDecodeError("truncated"));
            }
            let (h, t) = r.split_at(n);
            r = t;
            Ok(h)
        };
        if take(4)? != MAGIC {
            return Err(CacheDecodeError("bad magic"));
        }
        if u16::from_le_bytes(take(2)?.try_into().unwrap()) != FORMAT {
            return Err(CacheDecodeError("unknown format"));
        }
        let n = u64::from_le_bytes(take(8)?.try_into().unwrap());
        let mut stats = HashMap::with_capacity((n as usize).min(b.len() / 42));
        for _ in 0..n {
            let plen = u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize;
            let path = std::str::from_utf8(take(plen)?).map_err(|_| CacheDecodeError("path not UTF-8"))?.to_owned();
            let mut v = [0u64; 5];
            for x in &mut v {
                *x = u64::from_le_bytes(take(8)?.try_into().unwrap());
            }
            let stat = FileStat { size: v[0], mtime_ns: v[1] as i64, ctime_ns: v[2] as i64, ino: v[3], dev: v[4] };
            stats.insert(path, stat);
        }
        Ok(Self { stats })
    }
}
