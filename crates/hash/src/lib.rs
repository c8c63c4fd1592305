//! Content identity for dpsync: BLAKE3 hashing, FastCDC chunking, the path rules, and
//! the manifest with its canonical, versioned encoding and content root, and manifest
//! deltas (a new manifest as changes to one the receiver holds).
//!
//! **Architecture Invariant:** this crate does no I/O beyond the `Read`/`Write` values
//! its callers hand it. It knows nothing of files on disk, databases or the network.

mod chunker;
pub mod delta;
mod ids;
pub mod manifest;
pub mod path;

pub use chunker::{ChunkParams, FileDigest, digest_stream};
pub use delta::{ChunkOp, DeltaEntry, DeltaError, DeltaKind, ManifestDelta};
pub use ids::{ChunkId, ContentRoot, FileHash, HexError};
pub use manifest::{Chunk, Chunks, DecodeError, DecodeLimits, Entry, EntryKind, Manifest, ManifestDiff};
pub use path::{PathError, RelPath};
