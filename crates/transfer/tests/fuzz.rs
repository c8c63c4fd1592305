//! Fuzzing of the wire decoders of `dpsync-transfer`, on stable Rust, with proptest:
//! `wire::decode_batch` (and each chunk's `WireChunk::decode`), `wire::decode_ids`,
//! `wire::decompress_manifest`, and the signature check's hex parsing — on arbitrary,
//! structure-aware and mutated input.
//!
//! Each property is bounded to a few seconds in the default test profile. To fuzz longer
//! (failures are saved to `fuzz.proptest-regressions` beside this file and replayed
//! first on every later run):
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release -p dpsync-transfer --test fuzz
//! ```
//!
//! Besides "never panics", every property measures the Rust heap held during the call:
//! it must stay proportional to the input (batches, id lists), to the declared and
//! bounded chunk length (chunk decoding), or to the output actually produced, never to a
//! count or length the input merely claims. (zstd's own C allocations are not seen by
//! the probe; its window is bounded by zstd's default `windowLogMax`.)

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dpsync_hash::ChunkId;
use dpsync_hash::manifest::MAX_CHUNK_LEN;
use dpsync_transfer::trust;
use dpsync_transfer::wire::{
    self, BatchError, Codec, MAX_BATCH_RAW_BYTES, MAX_MANIFEST_DECODED, WireChunk, decode_batch, decode_ids,
    decompress_manifest, encode_batch, encode_ids,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

// ---------------------------------------------------------------------------------------
// Heap probe: live and peak bytes allocated by the current thread.
// ---------------------------------------------------------------------------------------

#[allow(unsafe_code)]
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(delta: isize) {
        let _ = LIVE.try_with(|l| {
            let now = l.get() + delta;
            l.set(now);
            let _ = PEAK.try_with(|p| {
                if now > p.get() {
                    p.set(now);
                }
            });
        });
    }

    #[derive(Debug)]
    pub struct Probe;

    // SAFETY: every call is forwarded unchanged to the system allocator; the probe only
    // updates const-initialised thread-locals that never allocate.
    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            add(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    /// Runs `f`; returns its result and the most heap it held at once above what was live
    /// when it started.
    pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        (out, (PEAK.with(Cell::get) - base).max(0) as usize)
    }
}

#[global_allocator]
static GLOBAL: heap::Probe = heap::Probe;

// ---------------------------------------------------------------------------------------
// Settings and mutations
// ---------------------------------------------------------------------------------------

/// `PROPTEST_CASES` when set, else `default` (chosen so each property takes ~1–3 s).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Splice(usize, usize, usize),
    /// Overwrites 4 bytes with an extreme little-endian u32 (counts and lengths).
    Extreme32(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..6)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<usize>(), 1usize..48).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), any::<usize>(), 1usize..96).prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
        3 => (any::<usize>(), prop::sample::select(vec![0u32, 1, 41, 0xffff, MAX_CHUNK_LEN, MAX_CHUNK_LEN + 1, u32::MAX]))
            .prop_map(|(i, v)| Mutation::Extreme32(i, v)),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let len = b.len();
    match m {
        Mutation::Flip(i, x) if len > 0 => b[i % len] ^= x,
        Mutation::Set(i, v) if len > 0 => b[i % len] = *v,
        Mutation::Insert(i, v) => {
            let at = i % (len + 1);
            b.splice(at..at, v.iter().copied());
        }
        Mutation::Delete(i, n) if len > 0 => {
            let at = i % len;
            b.drain(at..(at + n).min(len));
        }
        Mutation::Truncate(i) => b.truncate(i % (len + 1)),
        Mutation::Splice(from, to, n) if len > 0 => {
            let from = from % len;
            let piece: Vec<u8> = b[from..(from + n).min(len)].to_vec();
            let to = to % (len + 1);
            b.splice(to..to, piece);
        }
        Mutation::Extreme32(i, v) if len >= 4 => {
            let at = i % (len - 3);
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        _ => {}
    }
}

/// Chunk contents: random, compressible, tiny, empty-ish.
fn chunk_data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 1..300),
        2 => (1usize..3000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        1 => (1usize..2000).prop_map(|n| (0..n).map(|i| (i % 7) as u8).collect()),
    ]
}

fn valid_chunks() -> impl Strategy<Value = Vec<WireChunk>> {
    prop::collection::vec(chunk_data(), 0..6)
        .prop_map(|v| v.iter().map(|raw| WireChunk::encode(ChunkId::from(blake3::hash(raw)), raw)).collect())
}

// ---------------------------------------------------------------------------------------
// decode_batch and WireChunk::decode
// ---------------------------------------------------------------------------------------

/// Decodes a batch the way the service does (every chunk decompressed and hashed) and
/// checks everything that must hold either way.
fn check_batch(input: &[u8]) -> Result<(), TestCaseError> {
    let body = Bytes::copy_from_slice(input);
    let started = Instant::now();
    let (result, peak) = heap::peak_during(|| decode_batch(&body));
    // One `WireChunk` (~80 bytes, data shared with the body) per >= 41 input bytes.
    let bound = 2 * input.len() + (16 << 10);
    prop_assert!(peak <= bound, "decode_batch of {} bytes held {} bytes (bound {})", input.len(), peak, bound);
    match result {
        Ok(chunks) => {
            // Canonical: exactly one encoding per batch.
            prop_assert!(encode_batch(&chunks)[..] == *input, "accepted a non-canonical batch");
            prop_assert!(chunks.len() <= input.len() / 41);
            let mut raw_total = 0u64;
            for c in &chunks {
                prop_assert!(c.raw_len >= 1 && c.raw_len <= MAX_CHUNK_LEN);
                raw_total += u64::from(c.raw_len);
                let (decoded, peak) = heap::peak_during(|| c.decode());
                // Decompression sizes its buffer from the declared length (<= 16 MiB).
                let bound = c.raw_len as usize + c.data.len() + (64 << 10);
                prop_assert!(peak <= bound, "chunk decode held {} bytes (raw_len {})", peak, c.raw_len);
                if let Ok(raw) = decoded {
                    prop_assert_eq!(raw.len(), c.raw_len as usize);
                    if c.codec == Codec::Raw {
                        prop_assert!(raw == c.data);
                    }
                }
            }
            prop_assert!(raw_total <= MAX_BATCH_RAW_BYTES);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    prop_assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    Ok(())
}

proptest! {
    #![proptest_config(config(4_000))]

    #[test]
    fn decode_batch_survives_arbitrary_bytes(
        header in prop_oneof![Just(None), any::<u32>().prop_map(Some), (0u32..4).prop_map(Some)],
        tail in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut input = Vec::new();
        if let Some(count) = header {
            input.extend_from_slice(b"DPSB");
            input.extend_from_slice(&2u16.to_le_bytes());
            input.extend_from_slice(&count.to_le_bytes());
        }
        input.extend_from_slice(&tail);
        check_batch(&input)?;
    }

    #[test]
    fn decode_batch_survives_mutated_batches(chunks in valid_chunks(), muts in prop::collection::vec(mutation(), 1..5)) {
        let mut input = encode_batch(&chunks).to_vec();
        // The unmutated batch decodes to what was encoded, and every chunk verifies.
        let back = decode_batch(&Bytes::copy_from_slice(&input)).expect("a valid batch");
        prop_assert_eq!(&back, &chunks);
        for c in &back {
            prop_assert_eq!(ChunkId::from(blake3::hash(&c.decode().expect("valid chunk"))), c.id);
        }
        for m in &muts {
            apply(&mut input, m);
        }
        check_batch(&input)?;
    }

    /// Chunks with arbitrary codec bytes, declared lengths and data: `decode` never
    /// panics and returns exactly the declared length or an error.
    #[test]
    fn wire_chunk_decode_survives_anything(
        codec in prop_oneof![Just(Codec::Raw), Just(Codec::Zstd), Just(Codec::ZstdDelta), Just(Codec::ZstdDeltaRun)],
        base in prop::option::of(chunk_data()),
        raw_len in prop_oneof![1u32..5000, Just(MAX_CHUNK_LEN), 1u32..=MAX_CHUNK_LEN],
        data in prop_oneof![
            2 => prop::collection::vec(any::<u8>(), 0..200),
            2 => (chunk_data(), prop::collection::vec(mutation(), 0..3)).prop_map(|(raw, muts)| {
                let mut z = zstd::bulk::compress(&raw, 1).unwrap();
                for m in &muts { apply(&mut z, m); }
                z
            }),
        ],
    ) {
        let bases = match codec {
            Codec::ZstdDelta => vec![ChunkId::from_bytes([8; 32])],
            Codec::ZstdDeltaRun => vec![ChunkId::from_bytes([8; 32]), ChunkId::from_bytes([9; 32])],
            Codec::Raw | Codec::Zstd => vec![],
        };
        let c = WireChunk { id: ChunkId::from_bytes([7; 32]), codec, raw_len, bases, data: Bytes::from(data) };
        // zstd's own decompression context (about 100 KiB, plus a window for a prefix)
        // is allowed on top of the declared length.
        let (r, peak) = heap::peak_during(|| c.decode_with_base(base.as_deref()));
        prop_assert!(peak <= raw_len as usize + c.data.len() + (256 << 10), "held {}", peak);
        if let Ok(raw) = r {
            prop_assert_eq!(raw.len(), raw_len as usize);
        }
    }
}

/// Batches with chunks encoded against a base: round trip, and a base id cut short.
#[test]
fn delta_chunks_in_batches() {
    let base: Vec<u8> = (0..50_000u32).map(|i| (i.wrapping_mul(2654435761) >> 20) as u8).collect();
    let mut edited = base.clone();
    edited[1000..1010].fill(1);
    let c = WireChunk::encode_against(
        ChunkId::from(blake3::hash(&edited)),
        &edited,
        &[ChunkId::from(blake3::hash(&base))],
        &base,
    );
    assert_eq!(c.codec, Codec::ZstdDelta);
    let body = encode_batch(std::slice::from_ref(&c));
    assert_eq!(decode_batch(&body).unwrap(), vec![c.clone()]);
    // Cut inside the base id: truncated, not misread.
    for cut in [10 + 41, 10 + 41 + 31] {
        assert_eq!(decode_batch(&body.slice(..cut)), Err(BatchError::Truncated));
    }
    // Format 1 is refused.
    let mut v1 = body.to_vec();
    v1[4] = 1;
    assert_eq!(decode_batch(&Bytes::from(v1)), Err(BatchError::UnsupportedFormat(1)));
}

/// A batch that claims 2^32-1 chunks, or chunks longer than the body, allocates nothing
/// from the claim.
#[test]
fn batch_claims_do_not_allocate() {
    let mut claims: Vec<Vec<u8>> = vec![b"DPSB\x02\x00\xff\xff\xff\xff".to_vec()];
    let mut one = b"DPSB\x02\x00\x01\x00\x00\x00".to_vec();
    one.extend_from_slice(&[9; 32]);
    one.push(1);
    one.extend_from_slice(&MAX_CHUNK_LEN.to_le_bytes());
    one.extend_from_slice(&u32::MAX.to_le_bytes());
    claims.push(one);
    for input in claims {
        let body = Bytes::from(input);
        let (r, peak) = heap::peak_during(|| decode_batch(&body));
        assert_eq!(r, Err(BatchError::Truncated));
        assert!(peak < 4096, "{peak}");
    }
}

/// Regression: a 32 MiB body of small compressed chunks each declaring 16 MiB used to be
/// accepted whole, and the service then held every decompressed chunk in memory (a few
/// thousand repeats of one zero chunk: tens of GiB). The decompressed total is bounded.
#[test]
fn batch_decompressed_total_is_bounded() {
    let raw = vec![0u8; MAX_CHUNK_LEN as usize];
    let c = WireChunk::encode(ChunkId::from(blake3::hash(&raw)), &raw);
    assert_eq!(c.codec, Codec::Zstd);
    assert!(c.data.len() < 4096, "16 MiB of zeros compress to {} bytes", c.data.len());
    let limit_chunks = (MAX_BATCH_RAW_BYTES / u64::from(MAX_CHUNK_LEN)) as usize;
    let ok = encode_batch(&vec![c.clone(); limit_chunks]);
    assert_eq!(decode_batch(&ok).map(|v| v.len()), Ok(limit_chunks));
    let bomb = encode_batch(&vec![c; 2000]);
    assert!(bomb.len() < wire::MAX_BATCH_BYTES, "the body itself is small: {}", bomb.len());
    let (r, peak) = heap::peak_during(|| decode_batch(&bomb));
    assert_eq!(r, Err(BatchError::TooMuchData));
    assert!(peak < bomb.len(), "{peak}");
}

// ---------------------------------------------------------------------------------------
// decode_ids
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(4_000))]

    #[test]
    fn decode_ids_survives_anything(input in prop::collection::vec(any::<u8>(), 0..700)) {
        let (r, peak) = heap::peak_during(|| decode_ids(&input));
        prop_assert!(peak <= input.len() + 1024, "held {}", peak);
        match r {
            Some(ids) => {
                prop_assert!(input.len() % 32 == 0);
                prop_assert_eq!(ids.len(), input.len() / 32);
                prop_assert!(encode_ids(&ids)[..] == input[..]);
            }
            None => prop_assert!(input.len() % 32 != 0),
        }
    }
}

// ---------------------------------------------------------------------------------------
// decompress_manifest
// ---------------------------------------------------------------------------------------

fn check_decompress(input: &[u8]) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let (r, peak) = heap::peak_during(|| decompress_manifest(input));
    prop_assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    match r {
        Ok(out) => {
            prop_assert!(out.len() <= MAX_MANIFEST_DECODED);
            // Growth by doubling, plus the read buffer and the zstd reader's input buffer
            // (128 KiB each): never more than what was produced.
            let bound = 2 * out.len() + (512 << 10);
            prop_assert!(peak <= bound, "{} output bytes held {} bytes", out.len(), peak);
        }
        Err(e) => {
            let _ = e.to_string();
            prop_assert!(peak <= 64 << 20, "a refused body held {} bytes", peak);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(6_000))]

    #[test]
    fn decompress_manifest_survives_arbitrary_bytes(
        magic in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut input = if magic { vec![0x28, 0xb5, 0x2f, 0xfd] } else { Vec::new() };
        input.extend_from_slice(&tail);
        check_decompress(&input)?;
    }

    #[test]
    fn decompress_manifest_survives_mutated_frames(
        plain in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2000),
            (0usize..200_000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        ],
        streamed in any::<bool>(),
        muts in prop::collection::vec(mutation(), 0..4),
    ) {
        let mut z = if streamed {
            // No declared content size: the streaming path.
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            enc.write_all(&plain).unwrap();
            enc.finish().unwrap()
        } else {
            wire::compress_manifest(&plain)
        };
        if muts.is_empty() {
            prop_assert_eq!(decompress_manifest(&z).unwrap(), plain);
        }
        for m in &muts {
            apply(&mut z, m);
        }
        check_decompress(&z)?;
    }
}

/// A frame that declares more than the limit is refused before anything is decoded.
#[test]
fn declared_oversize_frame_is_refused_up_front() {
    let plain = vec![0u8; 4096];
    let mut z = wire::compress_manifest(&plain);
    assert_eq!(zstd::zstd_safe::get_frame_content_size(&z).ok(), Some(Some(4096)));
    // Rewrite the frame header's content size: single-segment frames with a 4-byte
    // size field (FCS flag 2) are what level 3 produces for this input.
    let fhd = z[4];
    let fcs_flag = fhd >> 6;
    let single_segment = fhd & 0x20 != 0;
    let dict_id_len = [0, 1, 2, 4][(fhd & 3) as usize];
    let at = 5 + usize::from(!single_segment) + dict_id_len;
    let fcs_len = match (fcs_flag, single_segment) {
        (0, true) => 1,
        (0, false) => 0,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    assert!(fcs_len >= 2, "frame header {fhd:#x}");
    z[at..at + fcs_len].fill(0xff);
    let declared = zstd::zstd_safe::get_frame_content_size(&z).ok().flatten().expect("a declared size");
    if declared > MAX_MANIFEST_DECODED as u64 {
        let (r, peak) = heap::peak_during(|| decompress_manifest(&z));
        assert!(r.unwrap_err().to_string().contains("more than"));
        assert!(peak < 4096, "{peak}");
    } else {
        // A 2-byte field cannot declare more than the limit; a lie is still refused.
        assert!(decompress_manifest(&z).is_err());
    }
}

/// Regression: a stream (no declared size) of one byte more than the limit is refused, and
/// the output buffer never grows past the limit (reading through `take(limit + 1)` used
/// to double a full 1 GiB buffer to 2 GiB before noticing).
#[test]
fn manifest_bomb_is_refused_within_the_limit() {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(MAX_MANIFEST_DECODED >> 20) {
        enc.write_all(&zeros).unwrap();
    }
    enc.write_all(&[0]).unwrap();
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < 256 << 10, "{} bytes", bomb.len());
    let (r, peak) = heap::peak_during(|| decompress_manifest(&bomb));
    let e = r.expect_err("over the limit");
    assert!(e.to_string().contains("more than"), "{e}");
    assert!(peak <= MAX_MANIFEST_DECODED + (1 << 20), "held {peak} bytes for a {}-byte limit", MAX_MANIFEST_DECODED);
}

// ---------------------------------------------------------------------------------------
// Signatures: hex parsing of untrusted keys and signatures
// ---------------------------------------------------------------------------------------

fn site_key() -> &'static trust::SiteKey {
    static KEY: std::sync::OnceLock<trust::SiteKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dpsync-transfer-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = trust::SiteKey::load_or_create(&dir.join("site.key")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        k
    })
}

proptest! {
    #![proptest_config(config(2_000))]

    /// `verify` never panics on arbitrary key and signature text, and accepts a signature
    /// only in its one canonical hex form (either case) for the exact message signed.
    #[test]
    fn verify_survives_arbitrary_hex(
        key in prop_oneof![any::<String>(), "[0-9a-fA-F+ -]{0,70}"],
        sig in prop_oneof![any::<String>(), "[0-9a-fA-F+ -]{0,130}"],
        mutate in any::<Option<(usize, u8)>>(),
    ) {
        prop_assert!(!trust::verify(&key, "PS100001", "PS1", 1, &"0".repeat(64), &sig));
        let k = site_key();
        let root = "ab".repeat(32);
        let good = k.sign("PS100001", "PS1", 3, &root);
        prop_assert!(trust::verify(&k.public_hex(), "PS100001", "PS1", 3, &root, &good));
        prop_assert!(trust::verify(&k.public_hex(), "PS100001", "PS1", 3, &root, &good.to_uppercase()));
        if let Some((i, x)) = mutate {
            let mut b = good.clone().into_bytes();
            let i = i % b.len();
            b[i] = x;
            if let Ok(s) = String::from_utf8(b)
                && s != good
                && s.to_ascii_lowercase() != good
            {
                prop_assert!(!trust::verify(&k.public_hex(), "PS100001", "PS1", 3, &root, &s), "{}", s);
            }
        }
        prop_assert!(!trust::verify(&k.public_hex(), "PS100001", "PS1", 4, &root, &good));
        prop_assert!(!trust::verify(&k.public_hex(), "PS100002", "PS1", 3, &root, &good));
        prop_assert!(!trust::verify(&k.public_hex(), "PS100001", "CH1", 3, &root, &good));
    }
}

/// Regression: hex parsing took a sign ("+f" read as 0x0f), so a signature or key had
/// other accepted spellings.
#[test]
fn signed_hex_is_not_hex() {
    let k = site_key();
    let root = "cd".repeat(32);
    // A version whose signature has a byte below 0x10 ("0x" in hex, spelled "+x" too).
    let (version, good, pos) = (1..100)
        .find_map(|v| {
            let sig = k.sign("PS100001", "PS1", v, &root);
            let pos = sig.as_bytes().chunks(2).position(|p| p[0] == b'0')?;
            Some((v, sig, pos))
        })
        .expect("some signature has a byte below 0x10");
    assert!(trust::verify(&k.public_hex(), "PS100001", "PS1", version, &root, &good));
    let mut alt = good.clone().into_bytes();
    alt[2 * pos] = b'+';
    let alt = String::from_utf8(alt).unwrap();
    assert!(!trust::verify(&k.public_hex(), "PS100001", "PS1", version, &root, &alt), "{alt}");
}
