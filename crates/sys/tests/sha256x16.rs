//! `sha256_16x` against the `sha2` crate: every length class around the
//! 64-byte block and the 9 bytes of padding, prefixes that do and do not
//! fill whole blocks, sixteen different messages per call, lanes permuted,
//! and a one-bit change that must move only its own lane.

use immount_sys::sha256x16::{sha256_16x, sha256_16x_supported, LANES};
mod common;

use common::{bytes, edge_cases, random_cases, reference, ABC};

/// Sixteen distinct messages of `len` bytes from `seed`.
fn messages(seed: u64, len: usize) -> Vec<Vec<u8>> {
    (0..LANES as u64)
        .map(|i| bytes(seed * 100 + i + 1, len))
        .collect()
}

fn refs(msgs: &[Vec<u8>]) -> [&[u8]; LANES] {
    core::array::from_fn(|i| msgs[i].as_slice())
}

/// Hash the sixteen messages and compare each lane; then again with the
/// lanes reversed and rotated, so a mix-up of lanes cannot pass.
fn check(prefix: &[u8], msgs: &[Vec<u8>]) {
    let got =
        sha256_16x(prefix, &refs(msgs)).expect("this CPU has AVX-512 (checked by the caller)");
    let expected: Vec<[u8; 32]> = msgs.iter().map(|m| reference(prefix, m)).collect();
    for (lane, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g,
            e,
            "lane {lane}, prefix {} bytes, message {} bytes",
            prefix.len(),
            msgs[0].len()
        );
    }
    for order in [
        (0..LANES).rev().collect::<Vec<_>>(),
        (0..LANES).map(|i| (i + 5) % LANES).collect(),
    ] {
        let permuted: Vec<Vec<u8>> = order.iter().map(|&i| msgs[i].clone()).collect();
        let got = sha256_16x(prefix, &refs(&permuted)).unwrap();
        for (lane, &i) in order.iter().enumerate() {
            assert_eq!(got[lane], expected[i], "lane {lane} holding message {i}");
        }
    }
}

/// Skip (with a note) on CPUs without AVX-512: there the function must say
/// so rather than hash.
fn supported_or_none() -> bool {
    if sha256_16x_supported() {
        return true;
    }
    let msgs = messages(1, 10);
    assert_eq!(sha256_16x(b"salt", &refs(&msgs)), None);
    eprintln!("no AVX-512 on this CPU: sha256_16x returns None, nothing else to test");
    false
}

#[test]
fn matches_sha2_for_edge_lengths() {
    if !supported_or_none() {
        return;
    }
    for (prefix, i, len) in edge_cases() {
        let msgs = messages(i as u64, len);
        if len > 0 {
            assert_ne!(msgs[0], msgs[1]);
        }
        check(&prefix, &msgs);
    }
}

#[test]
fn matches_sha2_for_random_lengths() {
    if !supported_or_none() {
        return;
    }
    for (round, len, plen) in random_cases(120, 256) {
        let prefix = bytes(round + 7, plen);
        check(&prefix, &messages(round + 50, len));
    }
}

/// Equal inputs in every lane give equal digests, and a single flipped bit
/// in one lane changes only that lane's digest.
#[test]
fn lanes_are_independent() {
    if !supported_or_none() {
        return;
    }
    let salt = bytes(5, 32);
    let a = bytes(6, 4096);
    let same: Vec<Vec<u8>> = vec![a.clone(); LANES];
    let base = sha256_16x(&salt, &refs(&same)).unwrap();
    assert!(base.iter().all(|d| *d == reference(&salt, &a)));
    for (lane, bit) in [(0, 0usize), (3, 7), (8, 4096 * 8 - 1), (15, 2049 * 8 + 3)] {
        let mut msgs = same.clone();
        msgs[lane][bit / 8] ^= 1 << (bit % 8);
        let got = sha256_16x(&salt, &refs(&msgs)).unwrap();
        for (other, digest) in got.iter().enumerate() {
            if other == lane {
                assert_ne!(*digest, base[0], "bit {bit}: lane {lane} did not change");
                assert_eq!(*digest, reference(&salt, &msgs[lane]));
            } else {
                assert_eq!(
                    *digest, base[0],
                    "bit {bit} of lane {lane} changed lane {other}"
                );
            }
        }
    }
}

#[test]
fn unequal_lengths_are_refused() {
    let mut msgs = messages(3, 4096);
    msgs[9].pop();
    assert_eq!(sha256_16x(&[0; 32], &refs(&msgs)), None);
    let mut msgs = messages(4, 0);
    msgs[15].push(1);
    assert_eq!(sha256_16x(b"", &refs(&msgs)), None);
}

/// The known answer from FIPS 180-2 appendix B.1 ("abc"), split between
/// prefix and message, so a shared mistake here and in the reference is
/// caught.
#[test]
fn known_answer() {
    if !supported_or_none() {
        return;
    }
    assert_eq!(sha256_16x(b"a", &[b"bc"; LANES]), Some([ABC; LANES]));
    assert_eq!(sha256_16x(b"abc", &[b""; LANES]), Some([ABC; LANES]));
}
