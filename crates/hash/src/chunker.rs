//! One pass over a byte stream: the whole-stream BLAKE3, FastCDC chunk boundaries with a
//! BLAKE3 per chunk, and a copy of every byte to a sink — reading each byte once, in
//! memory bounded by a fixed buffer whatever the stream's length.

use std::io::{self, Read, Write};

use fastcdc::v2020::{Normalization, cut, select_masks};

use crate::ids::{ChunkId, FileHash};
use crate::manifest::Chunk;

/// FastCDC sizes. The defaults (16 KiB / 64 KiB / 256 KiB) keep a chunk list at about
/// 0.06 % of the data while an edit costs about one 64 KiB chunk on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        Self { min: 16 * 1024, avg: 64 * 1024, max: 256 * 1024 }
    }
}

impl ChunkParams {
    /// Validates the sizes against what FastCDC supports.
    pub fn validated(self) -> Result<Self, String> {
        let ok = (64..=1 << 20).contains(&self.min)
            && (256..=4 << 20).contains(&self.avg)
            && (1024..=16 << 20).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max
            && [self.min, self.avg, self.max].iter().all(|v| v % 2 == 0);
        if ok { Ok(self) } else { Err(format!("unsupported chunk sizes {self:?}")) }
    }
}

/// Everything known about a stream after one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub hash: FileHash,
    pub size: u64,
    pub chunks: Vec<Chunk>,
}

/// Reads `reader` to its end once, copying every byte to `sink`, and returns the
/// stream's BLAKE3, size and content-defined chunks.
///
/// Memory use is one buffer of `max(4 MiB, 2 × params.max)` bytes. Chunk boundaries
/// depend only on the bytes (never on how reads are split), so the same content always
/// yields the same chunks.
pub fn digest_stream<R: Read, W: Write>(mut reader: R, sink: &mut W, params: &ChunkParams) -> io::Result<FileDigest> {
    let (min, avg, max) = (params.min as usize, params.avg as usize, params.max as usize);
    let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
    let cap = (4 << 20).max(2 * max);
    // One buffer per thread, reused across files: zeroing 4 MiB per small file was a
    // measurable share of an import.
    let mut buf = BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    buf.resize(cap, 0);
    let result = digest_with(&mut reader, sink, cap, min, avg, max, mask_s, mask_l, &mut buf);
    BUFFER.with(|b| *b.borrow_mut() = buf);
    result
}

thread_local! {
    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
fn digest_with<R: Read, W: Write>(
    reader: &mut R,
    sink: &mut W,
    cap: usize,
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    buf: &mut [u8],
) -> io::Result<FileDigest> {
    let (mut start, mut end, mut eof) = (0usize, 0usize, false);
    let mut file_hasher = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut size = 0u64;

    loop {
        // Fill the buffer as far as it goes: big reads and big writes.
        while !eof && end < cap {
            match reader.read(&mut buf[end..]) {
                Ok(0) => eof = true,
                Ok(n) => {
                    let fresh = &buf[end..end + n];
                    file_hasher.update(fresh);
                    sink.write_all(fresh)?;
                    size += n as u64;
                    end += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // A cut decision looks at most `max` bytes ahead, so with that many buffered
        // (or the end of the stream reached) the next boundary is final.
        while end - start >= max || (eof && start < end) {
            let window = &buf[start..end.min(start + max)];
            let (_, len) = cut(window, min, avg, max, mask_s, mask_l, mask_s << 1, mask_l << 1);
            let len = len.max(1).min(window.len());
            let id = ChunkId::from(blake3::hash(&buf[start..start + len]));
            chunks.push(Chunk { id, len: len as u32 });
            start += len;
        }
        if eof {
            break;
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
    }
    Ok(FileDigest { hash: FileHash::from(file_hasher.finalize()), size, chunks })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn empty_stream_has_no_chunks() {
        let mut out = Vec::new();
        let d = digest_stream(&b""[..], &mut out, &ChunkParams::default()).unwrap();
        assert_eq!(d.size, 0);
        assert!(d.chunks.is_empty());
        assert_eq!(d.hash, FileHash::from(blake3::hash(b"")));
    }

    #[test]
    fn copies_hashes_and_chunks_a_large_stream() {
        let data = pseudo_random(9 << 20, 7);
        let mut out = Vec::new();
        let d = digest_stream(&data[..], &mut out, &ChunkParams::default()).unwrap();
        assert_eq!(out, data);
        assert_eq!(d.hash, FileHash::from(blake3::hash(&data)));
        assert_eq!(d.chunks.iter().map(|c| c.len as u64).sum::<u64>(), data.len() as u64);
        // Average chunk size near 64 KiB: 9 MiB / 64 KiB = 144.
        assert!((70..=300).contains(&d.chunks.len()), "{} chunks", d.chunks.len());
        assert!(d.chunks.iter().all(|c| c.len <= 256 * 1024));
    }
}
