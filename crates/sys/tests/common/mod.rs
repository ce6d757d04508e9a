//! What the multi-message SHA-256 tests share: the reference and their
//! deterministic inputs.

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
