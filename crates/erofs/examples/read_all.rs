//! Read every regular file of an image through the reader, with N threads,
//! and print how long it took: the "immount reading" side of
//! `bench/read-bench.sh`.
//!
//! `cargo run --release -p erofs --example read_all -- IMAGE|DIR [THREADS] [CHUNK_KIB]`
//!
//! The tree is walked first (not timed separately: the figure printed covers
//! open, walk and reads, like `tar` over a fresh mount does). Each file is
//! read once, hard links included only once, front to back in CHUNK_KIB
//! pieces (default 128, the size of one FUSE read), by THREADS workers
//! (default 1) that share one `Image` and take files from a common queue.
//!
//! When DIR is given instead (a kernel mount of the same image), the same
//! walk-then-read is done through the kernel with `std::fs`, so that the
//! kernel and this reader can be compared by one program with one chunk
//! size and one thread count, without tar and a pipe in the way.
//!
//! Output: one line, `files=N bytes=B seconds=S mbps=X` (MB/s of file data,
//! 10^6 bytes), which the script parses. Exit code 1 on any reader error.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use erofs::{FileType, Image, Inode};

fn usage() -> ExitCode {
    eprintln!("usage: read_all IMAGE|DIR [THREADS] [CHUNK_KIB]");
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

/// How one item is read: bytes read, or a message.
type ReadOne<'a, T> = &'a (dyn Fn(&T, &mut [u8]) -> Result<u64, String> + Sync);

/// Read every item of `items` with `threads` workers taking items from a
/// shared queue; the total of bytes read, or the first error.
fn read_parallel<T: Sync>(
    items: &[T],
    threads: usize,
    chunk: usize,
    read_one: ReadOne<'_, T>,
) -> Result<u64, String> {
    let next = AtomicUsize::new(0);
    let total = AtomicU64::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; chunk];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    match read_one(item, &mut buf) {
                        Ok(n) => {
                            total.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            // Stop every worker: the figure would be meaningless.
                            next.store(items.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                }
            });
        }
    });
    match failure.into_inner().ok().flatten() {
        Some(msg) => Err(msg),
        None => Ok(total.load(Ordering::Relaxed)),
    }
}

/// The regular files under `dir` (not following symlinks), each inode once.
fn list_tree(
    dir: &Path,
    seen: &mut HashSet<(u64, u64)>,
    out: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            list_tree(&path, seen, out)?;
        } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
            out.push(path);
        }
    }
    Ok(())
}

/// Read every file of a mounted tree through the kernel.
fn run_dir(dir: &Path, threads: usize, chunk: usize) -> Result<(usize, u64), String> {
    let mut files = Vec::new();
    list_tree(dir, &mut HashSet::new(), &mut files)?;
    let bytes = read_parallel(&files, threads, chunk, &|path: &PathBuf, buf: &mut [u8]| {
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut n = 0u64;
        loop {
            match f.read(buf) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k as u64,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
    })?;
    Ok((files.len(), bytes))
}

/// Read every file of an image through the reader.
fn run_image(path: &str, threads: usize, chunk: usize) -> Result<(usize, u64), String> {
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

    let bytes = read_parallel(&files, threads, chunk, &|inode: &Inode, buf: &mut [u8]| {
        read_file(&image, inode, buf).map_err(|e| format!("{path}: nid {}: {e}", inode.nid))
    })?;
    Ok((files.len(), bytes))
}

fn run(path: &str, threads: usize, chunk: usize) -> Result<(), String> {
    let start = Instant::now();
    let (files, bytes) = if Path::new(path).is_dir() {
        run_dir(Path::new(path), threads, chunk)?
    } else {
        run_image(path, threads, chunk)?
    };
    let secs = start.elapsed().as_secs_f64();
    println!(
        "files={files} bytes={bytes} seconds={secs:.3} mbps={:.1}",
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
