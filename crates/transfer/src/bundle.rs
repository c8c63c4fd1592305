//! Prestaged bundles: one self-contained file carrying a signed version of a package
//! (its manifest, the owning site's signature and key, and chunks), for a DP that is
//! reached by carrying a disk rather than over a link (`dpsync export`, `dpsync agent
//! import`).
//!
//! Layout, format 1 (integers little-endian):
//!
//! ```text
//! "dpsync-bundle\n" u16 format
//! u32 header length, header (JSON, `BundleHeader`)
//! u64 manifest length, manifest (the canonical encoding; its content root is the header's)
//! per chunk (header.chunks of them): 32-byte BLAKE3 id, u32 length, bytes
//! "end\n", 32-byte BLAKE3 of every byte before "end\n"
//! ```
//!
//! The reader accepts exactly that: a wrong magic or format, a header or manifest that
//! does not decode, a manifest whose root is not the header's, a chunk whose bytes do not
//! hash to its id or that the manifest does not name, fewer or more chunks than the
//! header says, a missing or wrong trailer, or bytes after it are each an error. The
//! signature is the receiver's to check (it knows the pinned keys).
//! **Architecture Invariant:** a chunk comes out of [`BundleReader::next_chunk`] only
//! once its BLAKE3 matched its id and the id is one of the (root-checked) manifest's.

use std::collections::HashSet;
use std::io::{self, Read, Write};

use bytes::Bytes;
use dpsync_hash::{ChunkId, ContentRoot, DecodeLimits, Manifest};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 14] = b"dpsync-bundle\n";
/// This build writes and reads format 1.
pub const FORMAT: u16 = 1;
const TRAILER: &[u8; 4] = b"end\n";
/// Bounds on what a reader allocates before it has checked anything.
const MAX_HEADER: u32 = 1 << 20;
const MAX_MANIFEST: u64 = 4 << 30;
const MAX_CHUNK: u32 = 64 << 20;

/// What a bundle says about itself. Add fields freely (readers ignore unknown ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleHeader {
    pub package: String,
    /// The package's name at its source site.
    pub name: String,
    /// The site that owns (signed) the version.
    pub source_site: String,
    pub version: i64,
    /// Hex content root of the manifest.
    pub content_root: String,
    /// The owner's signature over (package, source site, version, content root), hex.
    pub signature: Option<String>,
    /// The owner's public key, hex (pinned by a receiver that has none for the site).
    pub site_key: Option<String>,
    /// With `--base-version`: the chunks of this version are left out.
    pub base_version: Option<i64>,
    /// How many chunks follow the manifest, and their bytes.
    pub chunks: u64,
    pub chunk_bytes: u64,
}

/// Why a bundle was refused. Each message says what is wrong with the file.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a dpsync bundle (bad magic)")]
    BadMagic,
    #[error("bundle format {0} is not supported (this build reads format {FORMAT})")]
    UnsupportedFormat(u16),
    #[error("the bundle is truncated (it ends {0}); copy it again")]
    Truncated(&'static str),
    #[error("the bundle's header is invalid: {0}")]
    BadHeader(String),
    #[error("the bundle's manifest is invalid: {0}")]
    BadManifest(String),
    #[error("the bundle's manifest has content root {found}, not the {expected} its header names")]
    RootMismatch { expected: String, found: String },
    #[error("chunk {index} of the bundle ({id}) does not match its hash: the bundle is damaged or was altered")]
    BadChunk { index: u64, id: ChunkId },
    #[error("chunk {index} of the bundle ({id}) is not part of its version: the bundle was altered")]
    ForeignChunk { index: u64, id: ChunkId },
    #[error("the bundle's checksum does not match: it is damaged or was altered")]
    BadChecksum,
    #[error("the bundle has {0} unexpected bytes after its end")]
    TrailingBytes(u64),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Feeds every byte written or read to a BLAKE3 hasher (for the trailer).
struct Hashing<T> {
    inner: T,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a bundle: [`BundleWriter::new`] (header and manifest), a
/// [`BundleWriter::chunk`] per chunk, then [`BundleWriter::finish`].
pub struct BundleWriter<W: Write> {
    out: Hashing<W>,
    left: u64,
}

impl<W: Write> std::fmt::Debug for BundleWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleWriter").field("chunks_left", &self.left).finish()
    }
}

impl<W: Write> BundleWriter<W> {
    pub fn new(out: W, header: &BundleHeader, manifest: &[u8]) -> io::Result<Self> {
        let mut out = Hashing { inner: out, hasher: blake3::Hasher::new() };
        let head = serde_json::to_vec(header).map_err(io::Error::other)?;
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT.to_le_bytes())?;
        out.write_all(&(head.len() as u32).to_le_bytes())?;
        out.write_all(&head)?;
        out.write_all(&(manifest.len() as u64).to_le_bytes())?;
        out.write_all(manifest)?;
        Ok(Self { out, left: header.chunks })
    }

    pub fn chunk(&mut self, id: &ChunkId, data: &[u8]) -> io::Result<()> {
        if self.left == 0 {
            return Err(io::Error::other("more chunks than the bundle's header announced"));
        }
        self.left -= 1;
        self.out.write_all(id.as_bytes())?;
        self.out.write_all(&(data.len() as u32).to_le_bytes())?;
        self.out.write_all(data)
    }

    /// Writes the trailer; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        if self.left != 0 {
            return Err(io::Error::other(format!("{} chunks the header announced were not written", self.left)));
        }
        let sum = self.out.hasher.finalize();
        self.out.inner.write_all(TRAILER)?;
        self.out.inner.write_all(sum.as_bytes())?;
        self.out.inner.flush()?;
        Ok(self.out.inner)
    }
}

/// Reads and checks a bundle (see the module docs), chunk by chunk: memory holds the
/// manifest and one chunk, whatever the bundle's size.
pub struct BundleReader<R: Read> {
    input: R,
    hasher: blake3::Hasher,
    header: BundleHeader,
    manifest: Manifest,
    encoded: Vec<u8>,
    known: HashSet<ChunkId>,
    read: u64,
}

impl<R: Read> std::fmt::Debug for BundleReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleReader").field("header", &self.header).field("chunks_read", &self.read).finish()
    }
}

impl<R: Read> BundleReader<R> {
    /// Reads the header and the manifest and checks the manifest against the header's
    /// content root.
    pub fn open(input: R) -> Result<Self, BundleError> {
        let mut r = Self {
            input,
            hasher: blake3::Hasher::new(),
            header: placeholder_header(),
            manifest: Manifest::default(),
            encoded: Vec::new(),
            known: HashSet::new(),
            read: 0,
        };
        let mut magic = [0u8; 14];
        r.exact(&mut magic, "in its first bytes")?;
        if &magic != MAGIC {
            return Err(BundleError::BadMagic);
        }
        let format = u16::from_le_bytes(r.array("in its first bytes")?);
        if format != FORMAT {
            return Err(BundleError::UnsupportedFormat(format));
        }
        let len = u32::from_le_bytes(r.array("in its header")?);
        if len > MAX_HEADER {
            return Err(BundleError::BadHeader(format!("{len} bytes long")));
        }
        let mut head = vec![0u8; len as usize];
        r.exact(&mut head, "in its header")?;
        r.header = serde_json::from_slice(&head).map_err(|e| BundleError::BadHeader(e.to_string()))?;
        let len = u64::from_le_bytes(r.array("in its manifest")?);
        if len > MAX_MANIFEST {
            return Err(BundleError::BadManifest(format!("{len} bytes long")));
        }
        let mut encoded = Vec::new();
        (&mut r.input).take(len).read_to_end(&mut encoded)?;
        if encoded.len() as u64 != len {
            return Err(BundleError::Truncated("in its manifest"));
        }
        r.hasher.update(&encoded);
        r.manifest = Manifest::decode(&encoded, &DecodeLimits::default())
            .map_err(|e| BundleError::BadManifest(e.to_string()))?;
        let root = r.manifest.content_root().to_hex();
        if root != r.header.content_root {
            return Err(BundleError::RootMismatch { expected: r.header.content_root.clone(), found: root });
        }
        r.known = r.manifest.files().flat_map(|e| e.chunks().iter().map(|c| c.id)).collect();
        r.encoded = encoded;
        Ok(r)
    }

    pub fn header(&self) -> &BundleHeader {
        &self.header
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest as the bundle holds it (its canonical encoding).
    pub fn encoded_manifest(&self) -> &[u8] {
        &self.encoded
    }

    /// The content root the manifest was checked against.
    pub fn content_root(&self) -> ContentRoot {
        self.manifest.content_root()
    }

    /// The next verified chunk; `None` after the last one, once the trailer matched and
    /// nothing follows it.
    pub fn next_chunk(&mut self) -> Result<Option<(ChunkId, Bytes)>, BundleError> {
        if self.read == self.header.chunks {
            self.check_end()?;
            return Ok(None);
        }
        let index = self.read;
        let id = ChunkId::from_bytes(self.array::<32>("in the middle of a chunk")?);
        let len = u32::from_le_bytes(self.array("in the middle of a chunk")?);
        if len > MAX_CHUNK {
            return Err(BundleError::BadChunk { index, id });
        }
        let mut data = vec![0u8; len as usize];
        self.exact(&mut data, "in the middle of a chunk")?;
        if ChunkId::from(blake3::hash(&data)) != id {
            return Err(BundleError::BadChunk { index, id });
        }
        if !self.known.contains(&id) {
            return Err(BundleError::ForeignChunk { index, id });
        }
        self.read += 1;
        Ok(Some((id, Bytes::from(data))))
    }

    fn check_end(&mut self) -> Result<(), BundleError> {
        let sum = self.hasher.finalize();
        let mut trailer = [0u8; 36];
        read_all(&mut self.input, &mut trailer).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => BundleError::Truncated("before its end marker"),
            _ => BundleError::Io(e),
        })?;
        if &trailer[..4] != TRAILER || trailer[4..] != *sum.as_bytes() {
            return Err(BundleError::BadChecksum);
        }
        let extra = io::copy(&mut (&mut self.input).take(1 << 20), &mut io::sink())?;
        if extra > 0 {
            return Err(BundleError::TrailingBytes(extra));
        }
        Ok(())
    }

    fn exact(&mut self, buf: &mut [u8], at: &'static str) -> Result<(), BundleError> {
        read_all(&mut self.input, buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => BundleError::Truncated(at),
            _ => BundleError::Io(e),
        })?;
        self.hasher.update(buf);
        Ok(())
    }

    fn array<const N: usize>(&mut self, at: &'static str) -> Result<[u8; N], BundleError> {
        let mut a = [0u8; N];
        self.exact(&mut a, at)?;
        Ok(a)
    }
}

fn read_all(input: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    input.read_exact(buf)
}

fn placeholder_header() -> BundleHeader {
    BundleHeader {
        package: String::new(),
        name: String::new(),
        source_site: String::new(),
        version: 0,
        content_root: String::new(),
        signature: None,
        site_key: None,
        base_version: None,
        chunks: 0,
        chunk_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpsync_hash::{Chunk, Entry, EntryKind, FileHash, RelPath};

    type Chunks = Vec<(ChunkId, Vec<u8>)>;

    fn sample() -> (BundleHeader, Vec<u8>, Chunks) {
        let a = b"first chunk".to_vec();
        let b = b"second chunk".to_vec();
        let chunks: Vec<(ChunkId, Vec<u8>)> =
            [a.clone(), b.clone()].into_iter().map(|d| (ChunkId::from(blake3::hash(&d)), d)).collect();
        let mut whole = a.clone();
        whole.extend_from_slice(&b);
        let entry = Entry {
            path: RelPath::new("f").unwrap(),
            mode: 0o644,
            mtime_ns: 0,
            kind: EntryKind::File {
                size: whole.len() as u64,
                hash: FileHash::from(blake3::hash(&whole)),
                chunks: chunks.iter().map(|(id, d)| Chunk { id: *id, len: d.len() as u32 }).collect(),
            },
        };
        let manifest = Manifest::new(vec![entry]).unwrap();
        let (encoded, root) = manifest.encode_with_root();
        let header = BundleHeader {
            package: "PS100001".into(),
            name: "app".into(),
            source_site: "PS1".into(),
            version: 3,
            content_root: root.to_hex(),
            signature: Some("00".into()),
            site_key: None,
            base_version: None,
            chunks: 2,
            chunk_bytes: whole.len() as u64,
        };
        (header, encoded, chunks)
    }

    fn write(header: &BundleHeader, manifest: &[u8], chunks: &[(ChunkId, Vec<u8>)]) -> Vec<u8> {
        let mut w = BundleWriter::new(Vec::new(), header, manifest).unwrap();
        for (id, d) in chunks {
            w.chunk(id, d).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all_chunks(bytes: &[u8]) -> Result<Vec<ChunkId>, BundleError> {
        let mut r = BundleReader::open(bytes)?;
        let mut out = Vec::new();
        while let Some((id, _)) = r.next_chunk()? {
            out.push(id);
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let (h, m, c) = sample();
        let bytes = write(&h, &m, &c);
        let r = BundleReader::open(&bytes[..]).unwrap();
        assert_eq!(r.header(), &h);
        assert_eq!(read_all_chunks(&bytes).unwrap(), c.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    }

    #[test]
    fn every_truncation_is_refused() {
        let (h, m, c) = sample();
        let bytes = write(&h, &m, &c);
        for cut in 0..bytes.len() {
            let e = read_all_chunks(&bytes[..cut]).expect_err("a truncated bundle is refused");
            assert!(
                matches!(e, BundleError::Truncated(_) | BundleError::BadHeader(_) | BundleError::BadManifest(_)),
                "cut at {cut}: {e}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(read_all_chunks(&longer), Err(BundleError::TrailingBytes(1))));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let (h, m, c) = sample();
        let bytes = write(&h, &m, &c);
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            assert!(read_all_chunks(&bad).is_err(), "a flipped bit at byte {at} went unnoticed");
        }
    }

    #[test]
    fn a_chunk_of_another_version_is_refused() {
        let (mut h, m, mut c) = sample();
        let other = b"not in this version".to_vec();
        c.push((ChunkId::from(blake3::hash(&other)), other));
        h.chunks = 3;
        let bytes = write(&h, &m, &c);
        assert!(matches!(read_all_chunks(&bytes), Err(BundleError::ForeignChunk { index: 2, .. })));
    }
}
