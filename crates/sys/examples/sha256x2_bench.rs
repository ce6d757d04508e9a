//! Micro-benchmark: SHA-256 of 4 KiB blocks with a 32-byte salt in front
//! (dm-verity's data blocks), the `sha2` crate one block at a time against
//! `sha256_2x` two blocks at a time (SHA-NI) and `sha256_16x` sixteen at a
//! time (AVX-512), on one core.
//!
//! `cargo run --release -p immount-sys --example sha256x2_bench [MiB]`

use std::hint::black_box;
use std::time::Instant;

use immount_sys::sha256x16::{sha256_16x, sha256_16x_supported, LANES};
use immount_sys::sha256x2::{sha256_2x, sha256_2x_supported};
use sha2::{Digest, Sha256};

const BLOCK: usize = 4096;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let salt = [0x5au8; 32];
    // 8 MiB of data, hashed over and over: it stays in L2/L3 like the
    // blocks the reader has just read.
    let data: Vec<u8> = (0..8 << 20)
        .map(|i: usize| (i * 31 + i / 4096) as u8)
        .collect();
    let passes = (mib << 20) / data.len();
    let total = (passes * data.len()) as f64;
    println!(
        "{mib} MiB of {BLOCK}-byte blocks, 32-byte salt; sha256_2x supported: {}, sha256_16x supported: {}",
        sha256_2x_supported(),
        sha256_16x_supported()
    );

    for round in 0..3 {
        let start = Instant::now();
        let mut acc = 0u8;
        for _ in 0..passes {
            for block in data.chunks_exact(BLOCK) {
                let mut h = Sha256::new();
                h.update(salt);
                h.update(black_box(block));
                let d: [u8; 32] = h.finalize().into();
                acc ^= d[0];
            }
        }
        let one = start.elapsed().as_secs_f64();
        black_box(acc);

        let start = Instant::now();
        let mut acc = 0u8;
        for _ in 0..passes {
            for pair in data.chunks_exact(2 * BLOCK) {
                let (a, b) = pair.split_at(BLOCK);
                let (x, y) = sha256_2x(&salt, black_box(a), black_box(b)).unwrap_or_default();
                acc ^= x[0] ^ y[0];
            }
        }
        let two = start.elapsed().as_secs_f64();
        black_box(acc);

        let start = Instant::now();
        let mut acc = 0u8;
        for _ in 0..passes {
            for group in data.chunks_exact(LANES * BLOCK) {
                let blocks: [&[u8]; LANES] =
                    core::array::from_fn(|i| black_box(&group[i * BLOCK..(i + 1) * BLOCK]));
                let d = sha256_16x(&salt, &blocks).unwrap_or_default();
                acc ^= d[0][0] ^ d[15][0];
            }
        }
        let sixteen = start.elapsed().as_secs_f64();
        black_box(acc);
        println!(
            "round {round}: sha2 one at a time {:.2} GB/s, sha256_2x {:.2} GB/s ({:.2}x), sha256_16x {:.2} GB/s ({:.2}x)",
            total / one / 1e9,
            total / two / 1e9,
            one / two,
            total / sixteen / 1e9,
            one / sixteen
        );
    }
}
