//! Micro-benchmarks of dpsync's hot paths. Kept short (10 samples, ~1 s each) so that
//! `cargo bench -p dpsync-bench` finishes in about a minute once built.

use std::hint::black_box;
use std::io;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use dpsync_hash::{
    Chunk, ChunkId, ChunkParams, ContentRoot, DecodeLimits, Entry, EntryKind, FileHash, Manifest, ManifestDelta,
    RelPath, digest_stream,
};
use dpsync_store::{NewTarget, NewVersion, Store, TargetKind, VersionStats};
use dpsync_testkit::random_bytes;

const MIB: usize = 1024 * 1024;

fn hashing(c: &mut Criterion) {
    let data = random_bytes(16 * MIB, 7);
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
                kind: EntryKind::File { size: 3 * 65_536, hash: FileHash::from_bytes(id(n, 2)), chunks: chunks.into() },
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

/// A delta for 1 % of the files changed (one chunk replaced in each) of the 20k manifest.
fn delta(c: &mut Criterion) {
    let base = manifest_20k();
    let mut entries = base.entries().to_vec();
    for (i, e) in entries.iter_mut().enumerate().filter(|(i, _)| i % 100 == 1) {
        if let EntryKind::File { chunks, hash, .. } = &mut e.kind {
            chunks[0].id = ChunkId::from_bytes([(i % 251) as u8; 32]);
            *hash = FileHash::from_bytes([(i % 241) as u8; 32]);
        }
    }
    let new = Manifest::new(entries).unwrap();
    let d = ManifestDelta::between(&base, &new);
    let bytes = d.encode();
    let mut g = c.benchmark_group("manifest_delta_20k_1pct");
    g.throughput(Throughput::Elements(new.entries().len() as u64));
    g.bench_function("between", |b| b.iter(|| ManifestDelta::between(black_box(&base), black_box(&new))));
    g.bench_function("decode + apply", |b| {
        b.iter(|| ManifestDelta::decode(black_box(&bytes), &DecodeLimits::default()).unwrap().apply(&base).unwrap())
    });
    g.finish();
}

/// The store's hot queries on SQLite (a temp file): what the job runner and a refresh do
/// per job and per version. The 20k-entry manifest's encoding stands in for the blob.
fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("site.db").display());
    let db = rt.block_on(Store::connect(&url)).unwrap();
    let blob = manifest_20k().encode();
    let new_version = |n: u64| NewVersion {
        version: None,
        content_root: ContentRoot::from_hex(&format!("{n:064x}")).unwrap(),
        manifest: Some(blob.clone()),
        scan_cache: Some(vec![0; 1 << 20]),
        signature: None,
        stats: VersionStats::default(),
        origin: "refresh".into(),
    };
    let (pkg, targets) = rt.block_on(async {
        let p = db.create_package("PS1", "bench", "/src").await.unwrap();
        let mut ids = Vec::new();
        for i in 0..8 {
            let t = db
                .add_target(NewTarget {
                    name: format!("dp{i}"),
                    kind: TargetKind::Dp,
                    url: format!("https://dp{i}:8443"),
                    token: None,
                    group: None,
                    rate_limit: None,
                    fingerprint: None,
                    windows: None,
                    pull_sources: None,
                })
                .await
                .unwrap();
            db.assign(&p.id, t.id).await.unwrap();
            ids.push(t.id);
        }
        db.commit_version(&p.id, new_version(0)).await.unwrap();
        (p.id, ids)
    });
    let mut n = 1;
    let mut g = c.benchmark_group("store_sqlite");
    g.bench_function("commit_version (3.8 MB manifest + 1 MiB scan cache, 8 targets re-queued)", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(db.commit_version(&pkg, new_version(n))).unwrap()
        })
    });
    let unchanged = NewVersion { manifest: None, scan_cache: None, ..new_version(n) };
    g.bench_function("commit_version (content root unchanged: no manifest written, 8 targets re-queued)", |b| {
        b.iter(|| rt.block_on(db.commit_version(&pkg, unchanged.clone())).unwrap())
    });
    g.bench_function("claim_due (8 jobs)", |b| b.iter(|| rt.block_on(db.claim_due(i64::MAX, 8)).unwrap()));
    g.bench_function("record_progress", |b| {
        b.iter(|| rt.block_on(db.record_progress(&pkg, targets[0], 4 << 20)).unwrap())
    });
    g.bench_function("version_summary", |b| b.iter(|| rt.block_on(db.version_summary(&pkg, 1)).unwrap()));
    g.bench_function("version_manifest (3.8 MB)", |b| b.iter(|| rt.block_on(db.version_manifest(&pkg, 1)).unwrap()));
    g.finish();
    rt.block_on(db.close());
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

criterion_group! { name = benches; config = quick(); targets = hashing, manifest, delta, relpath, store }
criterion_main!(benches);
