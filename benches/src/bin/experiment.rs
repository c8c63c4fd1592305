// TEMPORARY experiment: attribute the import's time. Deleted after use.
use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dpsync_hash::{ChunkParams, FileDigest, FileHash, digest_stream};
use fastcdc::v2020::{Normalization, cut, select_masks};
use rayon::prelude::*;

thread_local! { static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) }; }

/// digest_stream with a per-thread buffer reused across calls (no 4 MiB calloc per file).
fn digest_reuse<R: Read, W: Write>(mut reader: R, sink: &mut W, params: &ChunkParams) -> io::Result<FileDigest> {
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        let (min, avg, max) = (params.min as usize, params.avg as usize, params.max as usize);
        let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
        let cap = (4 << 20).max(2 * max);
        if buf.len() < cap {
            buf.resize(cap, 0);
        }
        let (mut start, mut end, mut eof) = (0usize, 0usize, false);
        let mut fh = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let mut size = 0u64;
        loop {
            while !eof && end < cap {
                match reader.read(&mut buf[end..cap]) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        let fresh = &buf[end..end + n];
                        fh.update(fresh);
                        sink.write_all(fresh)?;
                        size += n as u64;
                        end += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            while end - start >= max || (eof && start < end) {
                let window = &buf[start..end.min(start + max)];
                let (_, len) = cut(window, min, avg, max, mask_s, mask_l, mask_s << 1, mask_l << 1);
                let len = len.max(1).min(window.len());
                let id = dpsync_hash::ChunkId::from(blake3::hash(&buf[start..start + len]));
                chunks.push(dpsync_hash::Chunk { id, len: len as u32 });
                start += len;
            }
            if eof {
                break;
            }
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        Ok(FileDigest { hash: FileHash::from(fh.finalize()), size, chunks })
    })
}

fn files(root: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in walk(root) {
        v.push(d);
    }
    v
}
fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut rd: Vec<_> = fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
    rd.sort();
    for e in rd {
        if e.is_dir() {
            out.extend(walk(&e));
        } else {
            out.push(e);
        }
    }
    out
}

fn main() {
    let base = PathBuf::from(std::env::args().nth(1).expect("dir"));
    let what = std::env::args().nth(2).expect("what");
    let src = base.join("src");
    let fl = files(&src);
    let total: u64 = fl.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    let params = ChunkParams::default();
    let out = base.join(format!("exp-out-{what}-{}", std::env::args().nth(3).unwrap_or_default()));
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).unwrap();
    let _ = std::process::Command::new("sync").status();
    let dest = |i: usize| out.join(format!("o{i:05}"));
    let t = Instant::now();
    match what.as_str() {
        "sink" => fl.par_iter().for_each(|p| {
            digest_stream(File::open(p).unwrap(), &mut io::sink(), &params).unwrap();
        }),
        "sink-reuse" => fl.par_iter().for_each(|p| {
            digest_reuse(File::open(p).unwrap(), &mut io::sink(), &params).unwrap();
        }),
        "hashonly-4m-calloc" => fl.par_iter().for_each(|p| {
            let mut f = File::open(p).unwrap();
            let mut buf = vec![0u8; 4 << 20];
            let mut h = blake3::Hasher::new();
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            std::hint::black_box(h.finalize());
        }),
        "copy" | "copy-fsync" => fl.par_iter().enumerate().for_each(|(i, p)| {
            let mut f = File::open(p).unwrap();
            let mut o = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest(i)).unwrap();
            BUF.with(|b| {
                let mut buf = b.borrow_mut();
                buf.resize(4 << 20, 0);
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    o.write_all(&buf[..n]).unwrap();
                }
            });
            if what == "copy-fsync" {
                o.sync_all().unwrap();
            }
        }),
        "create-only" => fl.par_iter().enumerate().for_each(|(i, _)| {
            OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest(i)).unwrap();
        }),
        "import-cur-nofsync" | "import-cur-fsync" => fl.par_iter().enumerate().for_each(|(i, p)| {
            let mut o = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest(i)).unwrap();
            digest_stream(File::open(p).unwrap(), &mut o, &params).unwrap();
            if what == "import-cur-fsync" {
                o.sync_all().unwrap();
            }
        }),
        "import-reuse-nofsync" | "import-reuse-fsync" => fl.par_iter().enumerate().for_each(|(i, p)| {
            let mut o = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest(i)).unwrap();
            digest_reuse(File::open(p).unwrap(), &mut o, &params).unwrap();
            if what == "import-reuse-fsync" {
                o.sync_all().unwrap();
            }
        }),
        // Per-file fsync, but done by a separate pool of 8 threads so hashing never waits on the disk.
        "import-reuse-fsync-offload" => {
            let io_pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().unwrap();
            io_pool.scope(|s| {
                fl.par_iter().enumerate().for_each(|(i, p)| {
                    let mut o = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest(i)).unwrap();
                    digest_reuse(File::open(p).unwrap(), &mut o, &params).unwrap();
                    s.spawn(move |_| o.sync_all().unwrap());
                });
            });
        }
        // All writes first, then every fsync from 8 threads.
        "import-reuse-fsync-batched" => {
            let files: Vec<File> = fl
                .par_iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut o = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest(i)).unwrap();
                    digest_reuse(File::open(p).unwrap(), &mut o, &params).unwrap();
                    o
                })
                .collect();
            let io_pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().unwrap();
            io_pool.install(|| files.par_iter().for_each(|f| f.sync_all().unwrap()));
        }
        // All writes first, then one syncfs-equivalent: `sync -f DIR`.
        "import-reuse-syncfs" => {
            fl.par_iter().enumerate().for_each(|(i, p)| {
                let mut o = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest(i)).unwrap();
                digest_reuse(File::open(p).unwrap(), &mut o, &params).unwrap();
            });
            std::process::Command::new("sync").arg("-f").arg(&out).status().unwrap();
        }
        w => panic!("unknown {w}"),
    }
    let el = t.elapsed().as_secs_f64();
    println!("{what:<30} {el:7.3} s {:7.0} MiB/s", total as f64 / 1048576.0 / el);
}
