//! Seeded content: incompressible bytes (a BLAKE3 output stream), compressible text,
//! and log-normal file sizes.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::Rng;

/// `len` pseudo-random bytes determined by `seed`: the BLAKE3 output stream of the
/// seed's little-endian bytes (fast and incompressible).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    xof(seed).fill(&mut b);
    b
}

fn xof(seed: u64) -> blake3::OutputReader {
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof()
}

/// Writes (replacing) a file of `size` bytes, the first `size` of
/// [`random_bytes`]`(…, seed)`, creating its parent folders. Panics naming the path.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    }
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut stream = xof(seed);
    let mut buf = vec![0u8; (1 << 20).min(size as usize)];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n as u64;
    }
}

/// The vocabulary of [`text_bytes`].
pub const WORDS: &[&str] = &[
    "install",
    "package",
    "version",
    "server",
    "client",
    "update",
    "config",
    "value",
    "enable",
    "disable",
    "path",
    "registry",
    "service",
    "restart",
    "default",
    "policy",
    "user",
    "machine",
    "setting",
    "feature",
    "component",
    "driver",
    "network",
    "proxy",
    "timeout",
    "retry",
    "log",
    "level",
    "info",
    "warning",
    "error",
    "cache",
    "folder",
    "file",
    "hash",
    "content",
    "distribution",
    "point",
    "site",
    "boundary",
    "group",
    "deployment",
    "required",
    "available",
    "detect",
    "rule",
    "script",
    "exit",
    "code",
    "success",
    "failure",
    "reboot",
    "pending",
    "locale",
    "language",
    "display",
    "name",
    "description",
    "publisher",
    "product",
    "release",
    "notes",
    "build",
    "channel",
];

/// `len` bytes of word salad in lines of 6 to 15 words from [`WORDS`], some with
/// `=NUMBER`: compressible like real configuration files and documentation.
pub fn text_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        let words = 6 + rng.below(10);
        for w in 0..words {
            if w > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(rng.pick(WORDS).as_bytes());
            if rng.below(5) == 0 {
                out.extend_from_slice(format!("={}", rng.below(10_000)).as_bytes());
            }
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

/// `n` log-normal sizes (σ = 2.3: a median far below the mean, a long tail of big
/// files), clamped to `[min, max]` and scaled so that they add up to `total` as nearly
/// as the clamps allow.
pub fn lognormal_sizes(n: usize, total: u64, min: u64, max: u64, rng: &mut Rng) -> Vec<u64> {
    let raw: Vec<f64> = (0..n).map(|_| (2.3 * rng.normal()).exp()).collect();
    let sized = |k: f64| -> Vec<u64> { raw.iter().map(|r| ((r * k) as u64).clamp(min, max)).collect() };
    // The sum is monotonic in the scale: bisect it in log space.
    let (mut lo, mut hi) = (1e-3f64, 1e12f64);
    for _ in 0..200 {
        let mid = (lo * hi).sqrt();
        if sized(mid).iter().sum::<u64>() < total { lo = mid } else { hi = mid }
    }
    sized(hi)
}
