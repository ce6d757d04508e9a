//! What the multi-message SHA-256 tests share: the reference, their
//! deterministic inputs and the known answer.

use sha2::{Digest, Sha256};

/// SHA-256 of `prefix || msg`, by the `sha2` crate.
pub fn reference(prefix: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prefix);
    h.update(msg);
    h.finalize().into()
}

/// Deterministic pseudo-random bytes (xorshift64), different per seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Prefix lengths around the 64-byte block and the 9 bytes of padding.
pub const EDGE_PREFIXES: [usize; 11] = [0, 1, 32, 55, 56, 63, 64, 65, 100, 128, 256];

/// Message lengths around the block, the padding and a 4 KiB data block.
pub const EDGE_LENGTHS: [usize; 19] = [
    0, 1, 2, 31, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 4095, 4096, 4097, 4127,
];

/// Every edge prefix with every edge length: (prefix, index of the length,
/// length), the prefix's bytes the same for a given length of it.
pub fn edge_cases() -> impl Iterator<Item = (Vec<u8>, usize, usize)> {
    EDGE_PREFIXES.iter().enumerate().flat_map(|(p, &plen)| {
        EDGE_LENGTHS
            .iter()
            .enumerate()
            .map(move |(i, &len)| (bytes(1000 + p as u64, plen), i, len))
    })
}

/// `rounds` pseudo-random cases (xorshift64): (round, message length up to
/// 10 KiB, prefix length up to `max_prefix`).
pub fn random_cases(rounds: u64, max_prefix: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut x = 0x0123_4567_89ab_cdefu64;
    (0..rounds).map(move |round| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % (10 * 1024 + 1)) as usize;
        let plen = ((x >> 32) % (max_prefix + 1)) as usize;
        (round, len, plen)
    })
}

/// SHA-256("abc"), FIPS 180-2 appendix B.1.
pub const ABC: [u8; 32] = [
    0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
    0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
];
