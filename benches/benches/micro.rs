//! Micro-benchmarks of dpsync's hot paths. Kept short (10 samples, ~1 s each) so that
//! `cargo bench -p dpsync-bench` finishes in about a minute once built.

use std::hint::black_box;
use std::io;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use dpsync_hash::{
    Chunk, ChunkId, ChunkParams, DecodeLimits, Entry, EntryKind, FileHash, Manifest, RelPath, digest_stream,
};

const MIB: usize = 1024 * 1024;

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn hashing(c: &mut Criterion) {
    let data = pseudo_random(16 * MIB, 7);
    let params = ChunkParams::default();
    let mut g = c.benchmark_group("hash_16MiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("digest_stream (blake3 + fastcdc + chunk blake3, sink)", |b| {
        b.iter(|| digest_stream(black_box(&data[..]), &mut io::sink(), &params).unwrap())
    });
    g.bench_function("digest_stream into a Vec (copy)", |b| {
        let mut out = Vec::with_capacity(data.len());
        b.iter(|| {
            out.clear();
            digest_stream(black_box(&data[..]), &mut out, &params).unwrap()
        })
    });
    g.bench_function("blake3::hash (one thread)", |b| b.iter(|| blake3::hash(black_box(&data))));
    g.bench_function("blake3 update_rayon", |b| {
        b.iter(|| blake3::Hasher::new().update_rayon(black_box(&data)).finalize())
    });
    g.finish();
}

/// 20,000 entries: 200 folders of 99 files (about 3 chunks each) + the folders.
fn manifest_20k() -> Manifest {
    let mut entries = Vec::with_capacity(20_000);
    let mut n = 0u64;
    let id = |n: u64, salt: u8| {
        let mut b = [salt; 32];
        b[..8].copy_from_slice(&n.to_le_bytes());
        b
    };
    for d in 0..200 {
        let dir = RelPath::new(format!("pkg/dir{d:03}")).unwrap();
        entries.push(Entry {
            path: dir.clone(),
            mode: 0o755,
            mtime_ns: 1_700_000_000_000_000_000,
            kind: EntryKind::Dir,
        });
        for f in 0..99 {
            n += 1;
            let chunks: Vec<Chunk> =
                (0..3).map(|k| Chunk { id: ChunkId::from_bytes(id(n * 4 + k, 1)), len: 65_536 }).collect();
            entries.push(Entry {
                path: dir.join(&format!("file{f:03}.dat")).unwrap(),
                mode: 0o644,
                mtime_ns: 1_700_000_000_000_000_000 + n as i64,
                kind: EntryKind::File { size: 3 * 65_536, hash: FileHash::from_bytes(id(n, 2)), chunks },
            });
        }
    }
    entries.push(Entry { path: RelPath::new("pkg").unwrap(), mode: 0o755, mtime_ns: 0, kind: EntryKind::Dir });
    Manifest::new(entries).unwrap()
}

fn manifest(c: &mut Criterion) {
    let m = manifest_20k();
    assert_eq!(m.entries().len(), 20_001);
    let bytes = m.encode();
    let mut g = c.benchmark_group("manifest_20k");
    g.throughput(Throughput::Elements(m.entries().len() as u64));
    g.bench_function("encode", |b| b.iter(|| black_box(&m).encode()));
    g.bench_function("decode", |b| b.iter(|| Manifest::decode(black_box(&bytes), &DecodeLimits::default()).unwrap()));
    g.bench_function("content_root", |b| b.iter(|| black_box(&m).content_root()));
    g.bench_function("new (sort + validate)", |b| {
        b.iter_batched(|| m.entries().to_vec(), |e| Manifest::new(e).unwrap(), BatchSize::LargeInput)
    });
    g.finish();
}

fn relpath(c: &mut Criterion) {
    let paths: Vec<String> = (0..10_000)
        .map(|i| format!("usr/share/pkg{:02}/lib{:03}/module_{i:05}/file-{i}.so.1", i % 50, i % 300))
        .collect();
    let mut g = c.benchmark_group("relpath_10k");
    g.throughput(Throughput::Elements(paths.len() as u64));
    g.bench_function("RelPath::new", |b| {
        b.iter_batched(
            || paths.clone(),
            |ps| ps.into_iter().map(|p| RelPath::new(p).unwrap()).collect::<Vec<_>>(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! { name = benches; config = quick(); targets = hashing, manifest, relpath }
criterion_main!(benches);
