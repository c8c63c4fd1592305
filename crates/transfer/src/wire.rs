//! Message formats of protocol version 1. JSON for small control messages; binary for
//! manifests (the canonical encoding, zstd-compressed) and chunk batches.
//!
//! Chunk batch (`application/x-dpsync-chunks`), all integers little-endian:
//!
//! ```text
//! "DPSB" u16 format=2 u32 count
//! count × ( [32] chunk BLAKE3, u8 codec (0 raw, 1 zstd, 2 zstd against a base chunk,
//!           3 zstd against a run of base chunks), u32 raw_len, u32 data_len,
//!           codec 2 only: [32] base chunk BLAKE3,
//!           codec 3 only: u8 n (2..=4), n × [32] base chunk BLAKE3,
//!           data )
//! ```
//!
//! Codec 2 is zstd with the bytes of a chunk the receiver already holds (the base chunk)
//! as a raw-content prefix: a chunk that differs from the chunk it replaces by a small
//! edit costs about the size of the edit. Codec 3 takes the bytes of several chunks, in
//! order, as the prefix: a new chunk whose edit moved a chunk boundary covers parts of
//! two old chunks, and against only one of them the rest would travel in full.

use bytes::{BufMut, Bytes, BytesMut};
use dpsync_hash::ChunkId;
use dpsync_hash::manifest::MAX_CHUNK_LEN;
use serde::{Deserialize, Serialize};

/// Protocol version; the URL prefix is `/v1`.
pub const PROTOCOL_VERSION: u32 = 1;
pub const CONTENT_TYPE_MANIFEST: &str = "application/x-dpsync-manifest";
/// A manifest delta (`dpsync_hash::ManifestDelta` encoding, zstd-compressed).
pub const CONTENT_TYPE_MANIFEST_DELTA: &str = "application/x-dpsync-manifest-delta";
/// `WireError::code` of the `409` answering a delta whose base the receiver does not hold:
/// the sender offers the full manifest instead.
pub const ERROR_BASE_UNKNOWN: &str = "base_unknown";
pub const CONTENT_TYPE_CHUNKS: &str = "application/x-dpsync-chunks";
pub const CONTENT_TYPE_CHUNK_IDS: &str = "application/x-dpsync-chunk-ids";
/// Header carrying the content root the sender computed for an offered manifest.
pub const HEADER_CONTENT_ROOT: &str = "x-dpsync-content-root";
/// Largest chunk batch body a receiver accepts.
pub const MAX_BATCH_BYTES: usize = 32 << 20;
/// Largest sum of the chunks' decompressed sizes in one batch a receiver accepts: it holds
/// a batch's chunks in memory to verify them, and without this bound a 32 MiB body of
/// compressed (or repeated) 16 MiB chunks would expand to hundreds of GiB.
pub const MAX_BATCH_RAW_BYTES: u64 = 64 << 20;
/// Decompressed bytes after which a sender closes a batch (one chunk may take it over by
/// at most `MAX_CHUNK_LEN`, which keeps it under [`MAX_BATCH_RAW_BYTES`]).
pub const TARGET_BATCH_RAW_BYTES: u64 = 32 << 20;
/// Largest (compressed) manifest body a receiver accepts.
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;
/// Largest decompressed manifest.
pub const MAX_MANIFEST_DECODED: usize = 1 << 30;
/// A batch the sender fills up to (big writes, few requests).
pub const TARGET_BATCH_BYTES: usize = 8 << 20;

const BATCH_MAGIC: &[u8; 4] = b"DPSB";
const BATCH_FORMAT: u16 = 2;

/// Header carrying a site-issued peer ticket (`trust::Ticket`, wire form) on
/// `POST /v1/packages/{pkg}/peer-chunks`.
pub const HEADER_PEER_TICKET: &str = "x-dpsync-ticket";
/// Largest `POST …/pull` body (its chunk id list) a receiver accepts.
pub const MAX_PULL_REQUEST_BYTES: usize = 64 << 20;

/// A DP another DP may fetch chunks from (`POST …/pull`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerSource {
    /// Its name at the site (for logs).
    pub name: String,
    /// Its receiving URL.
    pub url: String,
    /// SHA-256 of its TLS certificate, pinned instead of CA validation.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// `POST /v1/packages/{pkg}/versions/{version}/pull` (site → pull DP, after the offer):
/// fetch `chunks` from `sources` (rank order) with `ticket`, for at most `budget_secs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullRequest {
    pub ticket: String,
    pub sources: Vec<PeerSource>,
    pub chunks: Vec<ChunkId>,
    pub budget_secs: u64,
}

/// The answer to a pull: what came from peers, and what is still missing (the site
/// sends it, or asks again while peers make progress).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PullAnswer {
    pub fetched: u64,
    pub bytes_from_peers: u64,
    pub missing: Vec<ChunkId>,
    /// Sources given up on during this pull (failed, slow, or sent a bad chunk).
    pub dropped: Vec<String>,
}

/// `GET /v1/hello`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    /// "dp" or "site".
    pub role: String,
    /// The receiving site's code (child sites).
    #[serde(default)]
    pub site_code: Option<String>,
    /// The receiving site's signing key, hex (child sites): what a parent hands a
    /// package over to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_key: Option<String>,
    pub software: String,
}

/// `PUT /v1/packages/{pkg}/owner`: who owns the package now, by the chain the receiver
/// keeps.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerAnswer {
    pub owner: String,
    pub chain: String,
}

/// `GET /v1/packages/{pkg}`: what the target holds for a package.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackageState {
    pub package: String,
    pub installed_version: Option<i64>,
    pub installed_root: Option<String>,
    pub previous_version: Option<i64>,
    /// A version whose manifest was offered but not yet committed.
    pub staged_version: Option<i64>,
    /// Validation found files of the installed version damaged: reinstall it.
    #[serde(default)]
    pub broken: bool,
}

/// `POST …/commit` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitResponse {
    pub installed_version: i64,
    pub content_root: String,
    pub files_built: u64,
    pub files_linked: u64,
}

/// `Prefer` value of a commit request that would rather be answered `202 Accepted` with
/// a [`CommitProgress`] after `wait=N` seconds than wait for the end of a long commit
/// (RFC 7240). Receivers that do not know it ignore it and answer when done.
pub const PREFER_RESPOND_ASYNC: &str = "respond-async";
/// Longest a receiver lets a commit request wait (`Prefer: wait=N` is capped at it).
pub const MAX_COMMIT_WAIT_SECS: u64 = 60;

/// `202 Accepted` answer of `POST …/commit` (with `Prefer: respond-async`) and of
/// `GET …/commit` while the commit still runs: how far it has come. The sender polls
/// `GET …/commit` until it answers the [`CommitResponse`] (or an error).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitProgress {
    pub package: String,
    pub version: i64,
    /// What the receiver is doing, in words (e.g. "building the version tree").
    pub phase: String,
    /// Files (or entries) of the phase done so far, and in all (0: not counted).
    pub files_done: u64,
    pub files_total: u64,
    /// Since the commit started.
    pub elapsed_ms: u64,
}

/// `POST …/chunks` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchResponse {
    pub accepted: u64,
    /// Chunks whose bytes did not match their id (corrupted in transit): send again.
    pub rejected: Vec<ChunkId>,
}

/// `POST /v1/packages/{pkg}/validate` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ValidateResponse {
    pub package: String,
    pub installed_version: Option<i64>,
    pub files_checked: u64,
    /// Paths whose bytes no longer match the manifest; their content was dropped so
    /// that the next install sends exactly what they need.
    pub broken: Vec<String>,
    /// What the receiver put right by itself (e.g. a deleted `current` link pointed back
    /// at the installed tree).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
}

/// Error body of every 4xx/5xx answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireError {
    pub error: String,
    /// Chunks a commit still lacks (409).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<ChunkId>,
    /// A machine-readable reason where the sender acts on it ([`ERROR_BASE_UNKNOWN`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// Codec of one chunk in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
    /// zstd with a base chunk's bytes as prefix ([`WireChunk::bases`], one).
    ZstdDelta = 2,
    /// zstd with the bytes of several base chunks, in order, as prefix.
    ZstdDeltaRun = 3,
}

/// Base chunks a chunk may be encoded against ([`Codec::ZstdDeltaRun`]).
pub const MAX_BASES: usize = 4;

/// Why a batch body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("chunk batch is truncated")]
    Truncated,
    #[error("not a chunk batch (bad magic)")]
    BadMagic,
    #[error("chunk batch format {0} is not supported")]
    UnsupportedFormat(u16),
    #[error("chunk batch has an unknown codec {0}")]
    UnknownCodec(u8),
    #[error("chunk of {0} bytes exceeds the limit")]
    ChunkTooLarge(u32),
    #[error("chunk batch has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("chunk {0} does not decompress to its declared length")]
    BadCompression(ChunkId),
    #[error("chunk batch decompresses to more than {MAX_BATCH_RAW_BYTES} bytes")]
    TooMuchData,
    #[error("chunk {0} is encoded against a base chunk the receiver does not hold")]
    BaseUnavailable(ChunkId),
    #[error("chunk is encoded against {0} base chunks (2 to {MAX_BASES} allowed)")]
    BadBaseCount(u8),
}

/// One chunk as carried in a batch (possibly compressed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireChunk {
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    /// The chunks whose bytes, in order, are the zstd prefix: one for
    /// [`Codec::ZstdDelta`], 2 to [`MAX_BASES`] for [`Codec::ZstdDeltaRun`], else none.
    pub bases: Vec<ChunkId>,
    pub data: Bytes,
}

impl WireChunk {
    /// Wraps raw chunk bytes, compressing them with zstd when that saves at least 1/16.
    pub fn encode(id: ChunkId, raw: &[u8]) -> Self {
        let raw_len = raw.len() as u32;
        thread_local! {
            // One compression context per thread: creating one per chunk was a visible
            // share of a push's CPU time.
            static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        let compressed = (raw.len() >= 512)
            .then(|| {
                COMPRESSOR.with(|c| {
                    let mut c = c.borrow_mut();
                    if c.is_none() {
                        *c = zstd::bulk::Compressor::new(1).ok();
                    }
                    c.as_mut()?.compress(raw).ok()
                })
            })
            .flatten();
        if let Some(z) = compressed
            && z.len() < raw.len() - raw.len() / 16
        {
            return Self { id, codec: Codec::Zstd, raw_len, bases: Vec::new(), data: Bytes::from(z) };
        }
        Self { id, codec: Codec::Raw, raw_len, bases: Vec::new(), data: Bytes::copy_from_slice(raw) }
    }

    /// Wraps raw chunk bytes as they are, without trying to compress them (for data
    /// already known not to compress, such as the rest of a file whose first chunk did not).
    pub fn stored(id: ChunkId, raw: &[u8]) -> Self {
        Self { id, codec: Codec::Raw, raw_len: raw.len() as u32, bases: Vec::new(), data: Bytes::copy_from_slice(raw) }
    }

    /// True when the chunk travels compressed.
    pub fn is_compressed(&self) -> bool {
        self.codec != Codec::Raw
    }

    /// Encodes `raw` as zstd against `base_raw` (the bytes of the chunks `bases`, in
    /// order, which the receiver holds) when that is smaller than [`WireChunk::encode`];
    /// otherwise the plain encoding. `bases` holds 1 to [`MAX_BASES`] chunks.
    pub fn encode_against(id: ChunkId, raw: &[u8], bases: &[ChunkId], base_raw: &[u8]) -> Self {
        assert!((1..=MAX_BASES).contains(&bases.len()), "1 to {MAX_BASES} base chunks");
        let plain = Self::encode(id, raw);
        let delta = (|| {
            let mut cctx = zstd::zstd_safe::CCtx::create();
            cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(3)).ok()?;
            // The window must reach back over the whole base.
            let window = (raw.len() + base_raw.len()).next_power_of_two().trailing_zeros().clamp(10, 27);
            cctx.set_parameter(zstd::zstd_safe::CParameter::WindowLog(window)).ok()?;
            cctx.ref_prefix(base_raw).ok()?;
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
            cctx.compress2(&mut out, raw).ok()?;
            Some(out)
        })();
        let codec = if bases.len() == 1 { Codec::ZstdDelta } else { Codec::ZstdDeltaRun };
        match delta {
            Some(z) if z.len() + base_header_len(codec, bases.len()) < plain.data.len() => {
                Self { id, codec, raw_len: raw.len() as u32, bases: bases.to_vec(), data: Bytes::from(z) }
            }
            _ => plain,
        }
    }

    /// The raw bytes (decompressing, bounded by the declared length). A chunk encoded
    /// against a base needs [`WireChunk::decode_with_base`].
    pub fn decode(&self) -> Result<Bytes, BatchError> {
        self.decode_with_base(None)
    }

    /// The raw bytes; `base_raw` is the base chunks' (verified) bytes, in order, for
    /// [`Codec::ZstdDelta`] and [`Codec::ZstdDeltaRun`]. Output is bounded by the declared
    /// length.
    pub fn decode_with_base(&self, base_raw: Option<&[u8]>) -> Result<Bytes, BatchError> {
        match self.codec {
            Codec::ZstdDelta | Codec::ZstdDeltaRun => {
                let base_raw = base_raw.ok_or(BatchError::BaseUnavailable(self.id))?;
                let bad = || BatchError::BadCompression(self.id);
                let mut dctx = zstd::zstd_safe::DCtx::create();
                dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(27)).map_err(|_| bad())?;
                dctx.ref_prefix(base_raw).map_err(|_| bad())?;
                let mut out = Vec::with_capacity(self.raw_len as usize);
                dctx.decompress(&mut out, &self.data).map_err(|_| bad())?;
                if out.len() != self.raw_len as usize {
                    return Err(bad());
                }
                Ok(Bytes::from(out))
            }
            Codec::Raw if self.data.len() == self.raw_len as usize => Ok(self.data.clone()),
            Codec::Raw => Err(BatchError::BadCompression(self.id)),
            Codec::Zstd => {
                let out = zstd::bulk::decompress(&self.data, self.raw_len as usize)
                    .map_err(|_| BatchError::BadCompression(self.id))?;
                if out.len() != self.raw_len as usize {
                    return Err(BatchError::BadCompression(self.id));
                }
                Ok(Bytes::from(out))
            }
        }
    }

    /// Bytes this chunk takes in a batch.
    pub fn wire_len(&self) -> usize {
        41 + base_header_len(self.codec, self.bases.len()) + self.data.len()
    }
}

/// Bytes naming the base chunks of a chunk with `codec` and `n` bases.
fn base_header_len(codec: Codec, n: usize) -> usize {
    match codec {
        Codec::ZstdDelta => 32,
        Codec::ZstdDeltaRun => 1 + 32 * n,
        Codec::Raw | Codec::Zstd => 0,
    }
}

/// Encodes a batch.
pub fn encode_batch(chunks: &[WireChunk]) -> Bytes {
    let mut b = BatchBuilder::with_capacity(chunks.iter().map(WireChunk::wire_len).sum());
    for c in chunks {
        b.push(c);
    }
    b.finish()
}

/// Builds a batch body in one buffer, chunk by chunk, so a sender holds each batch once.
#[derive(Debug)]
pub struct BatchBuilder {
    out: BytesMut,
    count: u32,
    raw: u64,
}

impl BatchBuilder {
    /// A builder with room for `chunk_bytes` of chunk entries.
    pub fn with_capacity(chunk_bytes: usize) -> Self {
        let mut out = BytesMut::with_capacity(10 + chunk_bytes);
        out.put_slice(BATCH_MAGIC);
        out.put_u16_le(BATCH_FORMAT);
        out.put_u32_le(0);
        Self { out, count: 0, raw: 0 }
    }

    pub fn push(&mut self, c: &WireChunk) {
        self.out.put_slice(c.id.as_bytes());
        self.out.put_u8(c.codec as u8);
        self.out.put_u32_le(c.raw_len);
        self.out.put_u32_le(c.data.len() as u32);
        if c.codec == Codec::ZstdDeltaRun {
            self.out.put_u8(c.bases.len() as u8);
        }
        if matches!(c.codec, Codec::ZstdDelta | Codec::ZstdDeltaRun) {
            for base in &c.bases {
                self.out.put_slice(base.as_bytes());
            }
        }
        self.out.put_slice(&c.data);
        self.count += 1;
        self.raw += u64::from(c.raw_len);
    }

    /// Appends a chunk stored as is, whose `len` raw bytes `fill` writes in place (one
    /// copy from wherever they come from). When `fill` fails, the batch is unchanged.
    pub fn push_stored_with<E>(
        &mut self,
        id: &ChunkId,
        len: u32,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.out.len();
        self.out.resize(start + 41 + len as usize, 0);
        if let Err(e) = fill(&mut self.out[start + 41..]) {
            self.out.truncate(start);
            return Err(e);
        }
        let mut header = &mut self.out[start..start + 41];
        header.put_slice(id.as_bytes());
        header.put_u8(Codec::Raw as u8);
        header.put_u32_le(len);
        header.put_u32_le(len);
        self.count += 1;
        self.raw += u64::from(len);
        Ok(())
    }

    /// Bytes of the body so far.
    pub fn wire_len(&self) -> usize {
        self.out.len()
    }

    /// Raw (decompressed) bytes of the chunks so far.
    pub fn raw_len(&self) -> u64 {
        self.raw
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn finish(mut self) -> Bytes {
        self.out[6..10].copy_from_slice(&self.count.to_le_bytes());
        self.out.freeze()
    }
}

/// Decodes a batch without copying chunk data. Lengths are checked against the body,
/// so a hostile count or length cannot cause a large allocation.
pub fn decode_batch(body: &Bytes) -> Result<Vec<WireChunk>, BatchError> {
    let mut out = Vec::new();
    decode_into(body, &mut out)?;
    Ok(out)
}

/// The whole chunks at the start of a batch whose body was cut short (the connection
/// broke): what a receiver can keep of it. Stops at the first chunk that is incomplete
/// or malformed.
pub fn decode_batch_prefix(body: &Bytes) -> Vec<WireChunk> {
    let mut out = Vec::new();
    let _ = decode_into(body, &mut out);
    out
}

/// Decodes `body` into `out`, chunk by chunk: on an error, `out` holds the chunks
/// before it.
fn decode_into(body: &Bytes, out: &mut Vec<WireChunk>) -> Result<(), BatchError> {
    let b = &body[..];
    if b.len() < 10 {
        return Err(BatchError::Truncated);
    }
    if &b[..4] != BATCH_MAGIC {
        return Err(BatchError::BadMagic);
    }
    let format = u16::from_le_bytes([b[4], b[5]]);
    if format != BATCH_FORMAT {
        return Err(BatchError::UnsupportedFormat(format));
    }
    let count = u32::from_le_bytes(b[6..10].try_into().unwrap()) as usize;
    let mut pos = 10;
    out.reserve(count.min(b.len() / 41));
    let mut raw_total = 0u64;
    for _ in 0..count {
        if b.len() - pos < 41 {
            return Err(BatchError::Truncated);
        }
        let id = ChunkId::from_slice(&b[pos..pos + 32]).expect("32 bytes");
        let codec = match b[pos + 32] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            2 => Codec::ZstdDelta,
            3 => Codec::ZstdDeltaRun,
            c => return Err(BatchError::UnknownCodec(c)),
        };
        let raw_len = u32::from_le_bytes(b[pos + 33..pos + 37].try_into().unwrap());
        let data_len = u32::from_le_bytes(b[pos + 37..pos + 41].try_into().unwrap()) as usize;
        if raw_len == 0 || raw_len > MAX_CHUNK_LEN {
            return Err(BatchError::ChunkTooLarge(raw_len));
        }
        raw_total += u64::from(raw_len);
        if raw_total > MAX_BATCH_RAW_BYTES {
            return Err(BatchError::TooMuchData);
        }
        pos += 41;
        let n = match codec {
            Codec::ZstdDelta => 1,
            Codec::ZstdDeltaRun => {
                let n = *b.get(pos).ok_or(BatchError::Truncated)?;
                if !(2..=MAX_BASES).contains(&(n as usize)) {
                    return Err(BatchError::BadBaseCount(n));
                }
                pos += 1;
                n as usize
            }
            Codec::Raw | Codec::Zstd => 0,
        };
        if b.len() - pos < 32 * n {
            return Err(BatchError::Truncated);
        }
        let bases =
            (0..n).map(|i| ChunkId::from_slice(&b[pos + 32 * i..pos + 32 * (i + 1)]).expect("32 bytes")).collect();
        pos += 32 * n;
        if b.len() - pos < data_len {
            return Err(BatchError::Truncated);
        }
        out.push(WireChunk { id, codec, raw_len, bases, data: body.slice(pos..pos + data_len) });
        pos += data_len;
    }
    if pos != b.len() {
        return Err(BatchError::TrailingBytes(b.len() - pos));
    }
    Ok(())
}

/// Encodes a list of chunk ids (32 bytes each).
pub fn encode_ids(ids: &[ChunkId]) -> Bytes {
    let mut out = BytesMut::with_capacity(ids.len() * 32);
    for id in ids {
        out.put_slice(id.as_bytes());
    }
    out.freeze()
}

/// Decodes a list of chunk ids.
pub fn decode_ids(b: &[u8]) -> Option<Vec<ChunkId>> {
    if !b.len().is_multiple_of(32) {
        return None;
    }
    Some(b.chunks_exact(32).map(|c| ChunkId::from_slice(c).expect("32 bytes")).collect())
}

/// Compresses a manifest encoding for the wire.
pub fn compress_manifest(encoded: &[u8]) -> Vec<u8> {
    let mut out = zstd::bulk::compress(encoded, 3).expect("zstd compression of an in-memory buffer");
    // Sized for the worst case (more than the input): kept in caches, so no slack.
    out.shrink_to_fit();
    out
}

/// Decompresses a manifest body, refusing more than [`MAX_MANIFEST_DECODED`] bytes.
///
/// A frame that declares a larger size is refused before any work; otherwise the output
/// grows in steps checked against the limit, so the buffer never exceeds it (reading to
/// the end through `take(limit + 1)` would double a full 1 GiB buffer to 2 GiB).
pub fn decompress_manifest(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let too_large = || {
        Error::new(ErrorKind::InvalidData, format!("manifest decompresses to more than {MAX_MANIFEST_DECODED} bytes"))
    };
    if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(body)
        && n > MAX_MANIFEST_DECODED as u64
    {
        return Err(too_large());
    }
    let mut decoder = zstd::stream::read::Decoder::new(body)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if out.len() + n > MAX_MANIFEST_DECODED {
            return Err(too_large());
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip_with_both_codecs() {
        let a = vec![7u8; 70_000];
        let b: Vec<u8> = (0..3000u32).map(|i| (i.wrapping_mul(2654435761u32) >> 24) as u8).collect();
        let chunks = vec![
            WireChunk::encode(ChunkId::from(blake3::hash(&a)), &a),
            WireChunk::encode(ChunkId::from(blake3::hash(&b)), &b),
        ];
        assert_eq!(chunks[0].codec, Codec::Zstd);
        let body = encode_batch(&chunks);
        let back = decode_batch(&body).unwrap();
        assert_eq!(back, chunks);
        assert_eq!(&back[0].decode().unwrap()[..], &a[..]);
        assert_eq!(&back[1].decode().unwrap()[..], &b[..]);
    }

    #[test]
    fn builder_writes_stored_chunks_in_place_and_undoes_failed_ones() {
        let a: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761u32) >> 24) as u8).collect();
        let b = vec![3u8; 9000];
        let (ida, idb) = (ChunkId::from(blake3::hash(&a)), ChunkId::from(blake3::hash(&b)));
        let mut builder = BatchBuilder::with_capacity(16);
        builder
            .push_stored_with(&ida, a.len() as u32, |dst| {
                dst.copy_from_slice(&a);
                Ok::<_, ()>(())
            })
            .unwrap();
        let before = builder.wire_len();
        assert_eq!(builder.push_stored_with(&idb, 77, |_| Err("unreadable")), Err("unreadable"));
        assert_eq!(builder.wire_len(), before, "a failed fill leaves nothing behind");
        builder.push(&WireChunk::encode(idb, &b));
        assert_eq!(builder.raw_len(), (a.len() + b.len()) as u64);
        let body = builder.finish();
        let back = decode_batch(&body).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], WireChunk::stored(ida, &a));
        assert_eq!(&back[0].decode().unwrap()[..], &a[..]);
        assert_eq!(&back[1].decode().unwrap()[..], &b[..]);
        assert!(back[1].is_compressed());
    }

    #[test]
    fn a_small_edit_costs_little_against_its_base() {
        let mut base = vec![0u8; 65_536];
        blake3::Hasher::new().update(b"base").finalize_xof().fill(&mut base);
        let mut edited = base.clone();
        edited[30_000..30_100].fill(0xAA);
        edited.extend_from_slice(b"appended");
        let (id, base_id) = (ChunkId::from(blake3::hash(&edited)), ChunkId::from(blake3::hash(&base)));
        let c = WireChunk::encode_against(id, &edited, &[base_id], &base);
        assert_eq!(c.codec, Codec::ZstdDelta);
        assert!(c.data.len() < 400, "{} bytes", c.data.len());
        let back = decode_batch(&encode_batch(std::slice::from_ref(&c))).unwrap();
        assert_eq!(back, vec![c.clone()]);
        assert_eq!(&back[0].decode_with_base(Some(&base)).unwrap()[..], &edited[..]);
        // Without its base, or with another base, it does not decode to its bytes.
        assert_eq!(back[0].decode(), Err(BatchError::BaseUnavailable(id)));
        let wrong = vec![0u8; 65_536];
        assert!(back[0].decode_with_base(Some(&wrong)).map(|b| b[..] != edited[..]).unwrap_or(true));
        // Unrelated content is sent plainly.
        let other: Vec<u8> = (0..65_536u32).map(|i| (i.wrapping_mul(40503) >> 7) as u8).collect();
        let plain = WireChunk::encode_against(ChunkId::from(blake3::hash(&other)), &other, &[base_id], &base);
        assert_ne!(plain.codec, Codec::ZstdDelta);
        // A declared length smaller than the output is refused, not overrun.
        let mut short = c.clone();
        short.raw_len = 1000;
        assert!(short.decode_with_base(Some(&base)).is_err());
    }

    #[test]
    fn a_chunk_across_an_old_boundary_costs_little_against_both_old_chunks() {
        let mut old = vec![0u8; 96 << 10];
        blake3::Hasher::new().update(b"two chunks").finalize_xof().fill(&mut old);
        let (a, b) = old.split_at(40 << 10);
        let ids = [ChunkId::from(blake3::hash(a)), ChunkId::from(blake3::hash(b))];
        // The edit moved the boundary: the new chunk is the end of `a` and all of `b`.
        let mut new = old[20 << 10..].to_vec();
        new[30_000..30_100].fill(0xAA);
        let id = ChunkId::from(blake3::hash(&new));
        let c = WireChunk::encode_against(id, &new, &ids, &old);
        assert_eq!((c.codec, &c.bases[..]), (Codec::ZstdDeltaRun, &ids[..]));
        assert!(c.data.len() < 400, "{} bytes", c.data.len());
        let back = decode_batch(&encode_batch(std::slice::from_ref(&c))).unwrap();
        assert_eq!(back, vec![c.clone()]);
        assert_eq!(&back[0].decode_with_base(Some(&old)).unwrap()[..], &new[..]);
        assert_eq!(back[0].decode(), Err(BatchError::BaseUnavailable(id)));
        // Against the first chunk alone, most of it travels.
        let one = WireChunk::encode_against(id, &new, &ids[..1], a);
        assert!(one.data.len() > 50_000, "{} bytes", one.data.len());
        // A count outside 2..=4 is refused; a run cut short is truncated.
        let body = encode_batch(std::slice::from_ref(&c));
        for n in [0u8, 1, 5, 255] {
            let mut v = body.to_vec();
            v[10 + 41] = n;
            assert_eq!(decode_batch(&Bytes::from(v)), Err(BatchError::BadBaseCount(n)));
        }
        for cut in [10 + 41, 10 + 42, 10 + 42 + 63] {
            assert_eq!(decode_batch(&body.slice(..cut)), Err(BatchError::Truncated));
        }
    }

    #[test]
    fn the_whole_chunks_of_a_cut_batch_are_kept() {
        let chunks: Vec<WireChunk> = (0..4u8)
            .map(|i| {
                let raw = vec![i; 1000 + i as usize];
                WireChunk::stored(ChunkId::from(blake3::hash(&raw)), &raw)
            })
            .collect();
        let body = encode_batch(&chunks);
        assert_eq!(decode_batch_prefix(&body), chunks);
        let mut end = 10;
        for (i, c) in chunks.iter().enumerate() {
            // Cut anywhere inside chunk i: the chunks before it are kept.
            for cut in [end, end + 1, end + 40, end + c.wire_len() - 1] {
                assert_eq!(decode_batch_prefix(&body.slice(..cut)), chunks[..i], "cut at {cut}");
                assert_eq!(decode_batch(&body.slice(..cut)), Err(BatchError::Truncated));
            }
            end += c.wire_len();
        }
        assert!(decode_batch_prefix(&body.slice(..5)).is_empty());
    }

    #[test]
    fn hostile_batches_are_refused() {
        assert_eq!(decode_batch(&Bytes::from_static(b"DPSB")), Err(BatchError::Truncated));
        assert_eq!(decode_batch(&Bytes::from_static(b"XXXX\x01\x00\x00\x00\x00\x00")), Err(BatchError::BadMagic));
        // Claims 2^32-1 chunks with no data.
        assert_eq!(decode_batch(&Bytes::from_static(b"DPSB\x02\x00\xff\xff\xff\xff")), Err(BatchError::Truncated));
        let c = WireChunk {
            id: ChunkId::from_bytes([1; 32]),
            codec: Codec::Zstd,
            raw_len: 100,
            bases: Vec::new(),
            data: Bytes::from_static(b"junk"),
        };
        let body = encode_batch(std::slice::from_ref(&c));
        assert!(matches!(decode_batch(&body).unwrap()[0].decode(), Err(BatchError::BadCompression(_))));
        let mut long = encode_batch(&[]).to_vec();
        long.push(0);
        assert_eq!(decode_batch(&Bytes::from(long)), Err(BatchError::TrailingBytes(1)));
    }
}
