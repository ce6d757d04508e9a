//! `sha256_2x` against the `sha2` crate: every length class around the
//! 64-byte block and the 9 bytes of padding, prefixes that do and do not
//! fill whole blocks, and two different messages per call.

use immount_sys::sha256x2::{sha256_2x, sha256_2x_supported};
mod common;

use common::{bytes, edge_cases, random_cases, reference, ABC};

/// Hash (a, b) both ways and compare; also with the lanes swapped, so a
/// mix-up of lanes cannot pass.
fn check(prefix: &[u8], a: &[u8], b: &[u8]) {
    let (da, db) = sha256_2x(prefix, a, b).expect("this CPU has SHA-NI (checked by the caller)");
    let (ra, rb) = (reference(prefix, a), reference(prefix, b));
    assert_eq!(
        da,
        ra,
        "lane a, prefix {} bytes, message {} bytes",
        prefix.len(),
        a.len()
    );
    assert_eq!(
        db,
        rb,
        "lane b, prefix {} bytes, message {} bytes",
        prefix.len(),
        b.len()
    );
    let (sb, sa) = sha256_2x(prefix, b, a).unwrap();
    assert_eq!((sa, sb), (ra, rb));
}

/// Skip (with a note) on CPUs without the extensions: there the function
/// must say so rather than hash.
fn supported_or_none() -> bool {
    if sha256_2x_supported() {
        return true;
    }
    assert_eq!(sha256_2x(b"salt", b"a", b"b"), None);
    eprintln!("no SHA-NI on this CPU: sha256_2x returns None, nothing else to test");
    false
}

#[test]
fn matches_sha2_for_edge_lengths() {
    if !supported_or_none() {
        return;
    }
    for (prefix, i, len) in edge_cases() {
        let a = bytes(2 * i as u64 + 1, len);
        let b = bytes(2 * i as u64 + 2, len);
        if len > 0 {
            assert_ne!(a, b);
        }
        check(&prefix, &a, &b);
    }
}

#[test]
fn matches_sha2_for_random_lengths() {
    if !supported_or_none() {
        return;
    }
    for (round, len, plen) in random_cases(300, 299) {
        let prefix = bytes(round + 7, plen);
        let a = bytes(3 * round + 11, len);
        let b = bytes(3 * round + 12, len);
        check(&prefix, &a, &b);
    }
}

/// Equal inputs in both lanes give equal digests, and a single flipped bit
/// in one lane changes only that lane's digest.
#[test]
fn lanes_are_independent() {
    if !supported_or_none() {
        return;
    }
    let salt = bytes(5, 32);
    let a = bytes(6, 4096);
    let (x, y) = sha256_2x(&salt, &a, &a).unwrap();
    assert_eq!(x, y);
    for bit in [0usize, 7, 4096 * 8 - 1, 2049 * 8 + 3] {
        let mut b = a.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        let (x2, y2) = sha256_2x(&salt, &a, &b).unwrap();
        assert_eq!(x2, x, "bit {bit}: lane a changed");
        assert_ne!(y2, x, "bit {bit}: lane b did not change");
        assert_eq!(y2, reference(&salt, &b));
    }
}

#[test]
fn unequal_lengths_are_refused() {
    assert_eq!(sha256_2x(b"", b"abc", b"ab"), None);
    assert_eq!(sha256_2x(&[0; 32], &[0; 4096], &[0; 4095]), None);
}

/// The known answer from FIPS 180-2 appendix B.1, split between prefix and
/// message, so a shared mistake in this code and the reference is caught.
#[test]
fn known_answer() {
    if !supported_or_none() {
        return;
    }
    assert_eq!(sha256_2x(b"a", b"bc", b"bc"), Some((ABC, ABC)));
    assert_eq!(sha256_2x(b"abc", b"", b""), Some((ABC, ABC)));
}
