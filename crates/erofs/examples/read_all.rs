//! Read every regular file of an image through the reader, with N threads,
//! and print how long it took: the "immount reading" side of
//! `bench/read-bench.sh`.
//!
//! `cargo run --release -p erofs --example read_all -- IMAGE [THREADS] [CHUNK_KIB]`
//!
//! The tree is walked first (not timed separately: the figure printed covers
//! open, walk and reads, like `tar` over a fresh mount does). Each file is
//! read once, hard links included only once, front to back in CHUNK_KIB
//! pieces (default 128, the size of one FUSE read), by THREADS workers
//! (default 1) that share one `Image` and take files from a common queue.
//!
//! Output: one line, `files=N bytes=B seconds=S mbps=X` (MB/s of file data,
//! 10^6 bytes), which the script parses. Exit code 1 on any reader error.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use erofs::{FileType, Image, Inode};

fn usage() -> ExitCode {
    eprintln!("usage: read_all IMAGE [THREADS] [CHUNK_KIB]");
    ExitCode::from(2)
}

/// Read one file to its end; the number of bytes read.
fn read_file(image: &Image, inode: &Inode, buf: &mut [u8]) -> erofs::Result<u64> {
    let mut off = 0u64;
    while off < inode.size {
        let n = image.read(inode, off, buf)?;
        if n == 0 {
            return Err(erofs::Error::corrupt_nid(inode.nid, "file data ends early"));
        }
        off += n as u64;
    }
    Ok(off)
}

fn run(path: &str, threads: usize, chunk: usize) -> Result<(), String> {
    let start = Instant::now();
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let image = Image::open(Arc::new(file)).map_err(|e| format!("{path}: {e}"))?;

    // Collect the files first so the workers can share the list; a hard
    // link's second name is skipped, as tar reads its data only once.
    let mut files: Vec<Inode> = Vec::new();
    let mut seen = HashSet::new();
    image
        .walk(&mut |_path, inode| {
            if inode.file_type() == FileType::Regular && seen.insert(inode.nid) {
                files.push(inode.clone());
            }
            Ok(())
        })
        .map_err(|e| format!("{path}: walk: {e}"))?;

    let next = AtomicUsize::new(0);
    let total = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; chunk];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(inode) = files.get(i) else { break };
                    match read_file(&image, inode, &mut buf) {
                        Ok(n) => {
                            total.fetch_add(
                                usize::try_from(n).unwrap_or(usize::MAX),
                                Ordering::Relaxed,
                            );
                        }
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert_with(|| format!("{path}: nid {}: {e}", inode.nid));
                            }
                            // Stop every worker: the figure would be meaningless.
                            next.store(files.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(msg) = failure.into_inner().ok().flatten() {
        return Err(msg);
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = total.load(Ordering::Relaxed);
    println!(
        "files={} bytes={bytes} seconds={secs:.3} mbps={:.1}",
        files.len(),
        bytes as f64 / secs / 1e6
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        return usage();
    };
    let threads = match args.get(1).map(|s| s.parse::<usize>()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        _ => return usage(),
    };
    let chunk_kib = match args.get(2).map(|s| s.parse::<usize>()) {
        None => 128,
        Some(Ok(n)) if n > 0 && n <= 1 << 20 => n,
        _ => return usage(),
    };
    match run(path, threads, chunk_kib * 1024) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("read_all: {msg}");
            ExitCode::from(1)
        }
    }
}
