//! Throughput of tree computation and of verified reads, with peers in the
//! same run: plain sha256, `veritysetup format` (when installed) and
//! unverified reads of the same bytes.
//!
//! `cargo run --release -p immount-verity --example bench [MIB]`
//! (default 256 MiB of pseudo-random data).

use std::fs::File;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use erofs::ReadAt;
use sha2::{Digest, Sha256};
use verity::{
    compute_tree_with_threads, format_image, geometry_from_superblock, FormatOptions, Geometry,
    VerifiedReader, VerityParams,
};

fn mbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64()
}

/// Best of three runs of `f`.
fn best<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut out = None;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let value = f();
        best = best.min(start.elapsed());
        out = Some(value);
    }
    (best, out.expect("three runs"))
}

/// Read everything in `chunk`-byte pieces; returns a checksum so the reads
/// are not optimised away.
fn read_all(r: &dyn ReadAt, chunk: usize) -> u64 {
    let size = r.size().expect("size") as usize;
    let mut buf = vec![0u8; chunk];
    let mut sum = 0u64;
    let mut at = 0;
    while at < size {
        let n = chunk.min(size - at);
        r.read_exact_at(&mut buf[..n], at as u64).expect("read");
        sum = sum.wrapping_add(u64::from(buf[0]));
        at += n;
    }
    sum
}

/// `count` reads of `len` bytes at pseudo-random offsets, aligned to
/// 4096 bytes when `len` is 4096, within a 1 MiB window otherwise (like
/// metadata reads clustered in a few blocks).
fn read_random(r: &dyn ReadAt, count: usize, len: usize) -> u64 {
    let blocks = if len == 4096 {
        r.size().expect("size") / 4096
    } else {
        256
    };
    let mut buf = vec![0u8; len];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut sum = 0u64;
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.read_exact_at(&mut buf, (x % blocks) * 4096)
            .expect("read");
        sum = sum.wrapping_add(u64::from(buf[7]));
    }
    sum
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args().nth(1).map_or(Ok(256), |a| a.parse())?;
    let size = mib << 20;
    let mut data = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for word in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{mib} MiB of data, {cores} cores");

    let (t, _) = best(|| Sha256::digest(&data));
    let sha = mbps(size, t);
    println!("sha256, one thread             {sha:8.0} MB/s");

    let params = VerityParams {
        data_block_size: 4096,
        hash_block_size: 4096,
        data_blocks: (size / 4096) as u64,
        salt: vec![7; 32],
    };
    let geometry = Geometry::new(params, 0, true)?;
    let mut tree_speed = Vec::new();
    for threads in [1, cores] {
        let (t, _) = best(|| compute_tree_with_threads(&data, geometry.clone(), [0; 16], threads));
        tree_speed.push(mbps(size, t));
        println!(
            "tree, {threads} thread(s)               {:8.0} MB/s",
            tree_speed[tree_speed.len() - 1]
        );
    }
    println!(
        "tree speedup on {cores} cores: {:.2}x; 1-thread tree vs plain sha256: {:.2}",
        tree_speed[1] / tree_speed[0],
        tree_speed[0] / sha
    );

    let dir = tempfile::tempdir()?;
    let img = dir.path().join("data.img");
    File::create(&img)?.write_all(&data)?;
    let hash = dir.path().join("data.verity");
    let (t, _) = best(|| format_image(&img, Some(&hash), None, &FormatOptions::default()));
    let ours = mbps(size, t);
    println!("format_image (file, page cache){ours:8.0} MB/s");
    let vs_hash = dir.path().join("vs.verity");
    let (t, ok) = best(|| {
        Command::new("veritysetup")
            .arg("format")
            .arg(&img)
            .arg(&vs_hash)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if ok {
        let peer = mbps(size, t);
        println!(
            "veritysetup format (peer)      {peer:8.0} MB/s   ours/peer {:.2}",
            ours / peer
        );
    } else {
        println!("veritysetup not installed: no peer figure");
    }

    // Reads: verified against unverified, same bytes, same chunk sizes.
    let file = File::open(&img)?;
    let tree = File::open(&hash)?;
    let geometry = geometry_from_superblock(&tree, 0)?;
    let root = format_image(
        &img,
        Some(&hash),
        None,
        &FormatOptions {
            salt: Some(geometry.params().salt.clone()),
            ..FormatOptions::default()
        },
    )?
    .root_hash;
    let verified = VerifiedReader::new(&file, &tree, geometry, root)?;
    for chunk in [4096, 128 << 10] {
        let (tp, _) = best(|| read_all(&file, chunk));
        let (tv, _) = best(|| read_all(&verified, chunk));
        let (p, v) = (mbps(size, tp), mbps(size, tv));
        println!(
            "sequential {:>4} KiB reads: plain {p:6.0} MB/s, verified {v:6.0} MB/s, verified/plain time {:.2}",
            chunk >> 10,
            tp.as_secs_f64().recip() * tv.as_secs_f64()
        );
    }
    let count = 50_000;
    for len in [4096, 64] {
        let (tp, _) = best(|| read_random(&file, count, len));
        let (tv, _) = best(|| read_random(&verified, count, len));
        println!(
            "random {len:>4}-byte reads: plain {:.2} us, verified {:.2} us each",
            tp.as_secs_f64() * 1e6 / count as f64,
            tv.as_secs_f64() * 1e6 / count as f64,
        );
    }
    println!("cached hash blocks: {}", verified.cached_hash_blocks());
    Ok(())
}
