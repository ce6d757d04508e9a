//! SHA-256 of two equal-length messages at once, with the x86 SHA extensions.
//!
//! Why two: `sha256rnds2` (two rounds) has a latency of several cycles and
//! every round of one message depends on the round before, so hashing one
//! message leaves the SHA unit idle between rounds. The rounds of two
//! independent messages, interleaved instruction by instruction, fill those
//! gaps. How much that gains depends on the core: at most the ratio of the
//! instruction's latency to its throughput. On the development machine's
//! Xeon (a VM) that ratio is only about 1.35 (1.37 ns latency, 1.02 ns per
//! instruction with independent chains), and `examples/sha256x2_bench.rs`
//! measured 1.25x the `sha2` crate (1.73 against 1.39 GB/s for 4 KiB blocks
//! with a 32-byte salt); cores with a longer latency gain more. dm-verity
//! hashes every data block with the same salt in front, and a reader
//! checking a multi-block read always has pairs of blocks of the same size,
//! so it can use this (Linux does the same for dm-verity and fs-verity since
//! 6.16).
//!
//! [`sha256_2x`] is safe: it returns `None` when the CPU lacks the
//! extensions (or on other architectures), and the caller hashes one message
//! at a time with a portable implementation instead.

/// Size of a SHA-256 digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// `sha256(prefix || a)` and `sha256(prefix || b)`, computed together.
///
/// `a` and `b` must have the same length (any length, like `prefix`).
/// Returns `None` when they do not, or when this CPU cannot run the
/// two-message code (no SHA, SSSE3 or SSE4.1 extensions, or not x86-64):
/// the caller then hashes each message on its own.
pub fn sha256_2x(
    prefix: &[u8],
    a: &[u8],
    b: &[u8],
) -> Option<([u8; DIGEST_LEN], [u8; DIGEST_LEN])> {
    if a.len() != b.len() {
        return None;
    }
    imp::sha256_2x(prefix, a, b)
}

/// Whether [`sha256_2x`] runs on this CPU (for callers that want to pick a
/// path once, and for benchmarks).
pub fn sha256_2x_supported() -> bool {
    imp::supported()
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    pub(super) fn supported() -> bool {
        false
    }

    pub(super) fn sha256_2x(
        _prefix: &[u8],
        _a: &[u8],
        _b: &[u8],
    ) -> Option<([u8; super::DIGEST_LEN], [u8; super::DIGEST_LEN])> {
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use core::arch::x86_64::{
        __m128i, _mm_add_epi32, _mm_alignr_epi8, _mm_extract_epi32, _mm_loadu_si128, _mm_set_epi32,
        _mm_set_epi64x, _mm_sha256msg1_epu32, _mm_sha256msg2_epu32, _mm_sha256rnds2_epu32,
        _mm_shuffle_epi32, _mm_shuffle_epi8,
    };

    use super::DIGEST_LEN;
    use crate::sha256_consts::{BLOCK, H0, K};

    /// Proof that the CPU has the extensions [`compress`] is compiled for:
    /// only [`Cpu::detect`] makes one.
    #[derive(Clone, Copy)]
    struct Cpu(());

    impl Cpu {
        fn detect() -> Option<Cpu> {
            // std caches the CPUID results: each check is a load and a test.
            let ok = is_x86_feature_detected!("sha")
                && is_x86_feature_detected!("sse2")
                && is_x86_feature_detected!("ssse3")
                && is_x86_feature_detected!("sse4.1");
            ok.then_some(Cpu(()))
        }
    }

    pub(super) fn supported() -> bool {
        Cpu::detect().is_some()
    }

    /// The two lanes' chaining values, `[a, b, c, d, e, f, g, h]` each.
    struct Lanes {
        a: [u32; 8],
        b: [u32; 8],
        cpu: Cpu,
    }

    impl Lanes {
        /// Run the compression function over every whole 64-byte block of
        /// `a` (lane a) and `b` (lane b), which have the same length.
        fn compress(&mut self, a: &[u8], b: &[u8]) {
            debug_assert_eq!(a.len(), b.len());
            if a.len() < BLOCK {
                return;
            }
            let _proof: Cpu = self.cpu;
            // SAFETY: `compress` is compiled for sha, sse2, ssse3 and
            // sse4.1; the Cpu proof exists only if Cpu::detect found all
            // four on this CPU.
            unsafe { compress(&mut self.a, &mut self.b, a, b) }
        }
    }

    pub(super) fn sha256_2x(
        prefix: &[u8],
        a: &[u8],
        b: &[u8],
    ) -> Option<([u8; DIGEST_LEN], [u8; DIGEST_LEN])> {
        let cpu = Cpu::detect()?;
        let mut lanes = Lanes { a: H0, b: H0, cpu };
        // The length in bits that ends the padding (SHA-256 counts mod 2^64).
        let bits = (prefix.len() as u64)
            .wrapping_add(a.len() as u64)
            .wrapping_mul(8);
        // Pending bytes of the current block, one buffer per lane; `fill`
        // of them are used in both (the lanes move in lockstep).
        let mut buf_a = [0u8; BLOCK];
        let mut buf_b = [0u8; BLOCK];

        // The prefix is the same in both lanes: its whole blocks straight
        // from the slice, the rest into the buffers.
        let whole = prefix.len() - prefix.len() % BLOCK;
        let (blocks, rest) = prefix.split_at(whole);
        lanes.compress(blocks, blocks);
        let mut fill = rest.len();
        buf_a[..fill].copy_from_slice(rest);
        buf_b[..fill].copy_from_slice(rest);

        // Top the buffers up from the messages; after this, either the
        // buffers are empty or the messages are used up.
        let (mut a, mut b) = (a, b);
        if fill > 0 {
            let take = (BLOCK - fill).min(a.len());
            buf_a[fill..fill + take].copy_from_slice(&a[..take]);
            buf_b[fill..fill + take].copy_from_slice(&b[..take]);
            fill += take;
            a = &a[take..];
            b = &b[take..];
            if fill == BLOCK {
                lanes.compress(&buf_a, &buf_b);
                fill = 0;
            }
        }
        if !a.is_empty() {
            // fill == 0 here: the messages' whole blocks straight from the
            // slices, the tail into the buffers.
            let whole = a.len() - a.len() % BLOCK;
            lanes.compress(&a[..whole], &b[..whole]);
            fill = a.len() - whole;
            buf_a[..fill].copy_from_slice(&a[whole..]);
            buf_b[..fill].copy_from_slice(&b[whole..]);
        }

        // Padding (FIPS 180-4, 5.1.1): 0x80, zeros, the length in bits as a
        // big-endian u64, in one more block when fewer than 9 bytes are left.
        buf_a[fill] = 0x80;
        buf_b[fill] = 0x80;
        buf_a[fill + 1..].fill(0);
        buf_b[fill + 1..].fill(0);
        if fill + 1 > BLOCK - 8 {
            lanes.compress(&buf_a, &buf_b);
            buf_a.fill(0);
            buf_b.fill(0);
        }
        buf_a[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
        buf_b[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
        lanes.compress(&buf_a, &buf_b);
        Some((to_bytes(&lanes.a), to_bytes(&lanes.b)))
    }

    fn to_bytes(state: &[u32; 8]) -> [u8; DIGEST_LEN] {
        let mut out = [0u8; DIGEST_LEN];
        for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// Load 16 message bytes as four big-endian words (lane 0 first).
    macro_rules! load_be {
        ($block:expr, $at:expr, $swap:expr) => {{
            let bytes: &[u8] = &$block[$at..$at + 16];
            // SAFETY: `bytes` is 16 bytes long (the range index checked
            // it), exactly what loadu reads; loadu needs no alignment.
            let raw = unsafe { _mm_loadu_si128(bytes.as_ptr().cast::<__m128i>()) };
            _mm_shuffle_epi8(raw, $swap)
        }};
    }

    /// Four rounds (group `$g` of 16) in both lanes, interleaved so that
    /// each lane's `sha256rnds2` runs while the other's is in flight.
    macro_rules! rounds4 {
        ($g:expr, $wa:expr, $wb:expr, $abef_a:ident, $cdgh_a:ident, $abef_b:ident, $cdgh_b:ident) => {{
            let k = _mm_set_epi32(
                K[4 * $g + 3] as i32,
                K[4 * $g + 2] as i32,
                K[4 * $g + 1] as i32,
                K[4 * $g] as i32,
            );
            let ma = _mm_add_epi32($wa, k);
            let mb = _mm_add_epi32($wb, k);
            // rnds2 takes (C,D,G,H) and (A,B,E,F) and returns the new
            // (A,B,E,F); the old (A,B,E,F) is then the new (C,D,G,H).
            $cdgh_a = _mm_sha256rnds2_epu32($cdgh_a, $abef_a, ma);
            $cdgh_b = _mm_sha256rnds2_epu32($cdgh_b, $abef_b, mb);
            let ma = _mm_shuffle_epi32::<0x0E>(ma);
            let mb = _mm_shuffle_epi32::<0x0E>(mb);
            $abef_a = _mm_sha256rnds2_epu32($abef_a, $cdgh_a, ma);
            $abef_b = _mm_sha256rnds2_epu32($abef_b, $cdgh_b, mb);
        }};
    }

    /// The next four schedule words from the last sixteen (`$w0` oldest).
    macro_rules! schedule {
        ($w0:expr, $w1:expr, $w2:expr, $w3:expr) => {
            _mm_sha256msg2_epu32(
                _mm_add_epi32(
                    _mm_sha256msg1_epu32($w0, $w1),
                    _mm_alignr_epi8::<4>($w3, $w2),
                ),
                $w3,
            )
        };
    }

    /// `(A,B,E,F)` and `(C,D,G,H)` registers from `[a..h]`, lane 3 first in
    /// each name as the instructions expect.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn unpack(s: &[u32; 8]) -> (__m128i, __m128i) {
        let w = |i: usize| s[i] as i32;
        (
            _mm_set_epi32(w(0), w(1), w(4), w(5)),
            _mm_set_epi32(w(2), w(3), w(6), w(7)),
        )
    }

    /// The inverse of [`unpack`].
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn pack(abef: __m128i, cdgh: __m128i, s: &mut [u32; 8]) {
        *s = [
            _mm_extract_epi32::<3>(abef) as u32,
            _mm_extract_epi32::<2>(abef) as u32,
            _mm_extract_epi32::<3>(cdgh) as u32,
            _mm_extract_epi32::<2>(cdgh) as u32,
            _mm_extract_epi32::<1>(abef) as u32,
            _mm_extract_epi32::<0>(abef) as u32,
            _mm_extract_epi32::<1>(cdgh) as u32,
            _mm_extract_epi32::<0>(cdgh) as u32,
        ];
    }

    /// The compression function over every whole block of `a` and `b`
    /// (same length), lane a updating `sa` and lane b `sb`.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn compress(sa: &mut [u32; 8], sb: &mut [u32; 8], a: &[u8], b: &[u8]) {
        // Reverses the bytes of each 32-bit lane: the message is big-endian.
        let swap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
        let (mut abef_a, mut cdgh_a) = unpack(sa);
        let (mut abef_b, mut cdgh_b) = unpack(sb);
        for (ba, bb) in a.chunks_exact(BLOCK).zip(b.chunks_exact(BLOCK)) {
            let (save_abef_a, save_cdgh_a) = (abef_a, cdgh_a);
            let (save_abef_b, save_cdgh_b) = (abef_b, cdgh_b);
            let mut wa0 = load_be!(ba, 0, swap);
            let mut wb0 = load_be!(bb, 0, swap);
            let mut wa1 = load_be!(ba, 16, swap);
            let mut wb1 = load_be!(bb, 16, swap);
            let mut wa2 = load_be!(ba, 32, swap);
            let mut wb2 = load_be!(bb, 32, swap);
            let mut wa3 = load_be!(ba, 48, swap);
            let mut wb3 = load_be!(bb, 48, swap);
            rounds4!(0, wa0, wb0, abef_a, cdgh_a, abef_b, cdgh_b);
            rounds4!(1, wa1, wb1, abef_a, cdgh_a, abef_b, cdgh_b);
            rounds4!(2, wa2, wb2, abef_a, cdgh_a, abef_b, cdgh_b);
            rounds4!(3, wa3, wb3, abef_a, cdgh_a, abef_b, cdgh_b);
            // Groups 4..16: each new schedule vector replaces the oldest.
            for g in [4, 8, 12] {
                wa0 = schedule!(wa0, wa1, wa2, wa3);
                wb0 = schedule!(wb0, wb1, wb2, wb3);
                rounds4!(g, wa0, wb0, abef_a, cdgh_a, abef_b, cdgh_b);
                wa1 = schedule!(wa1, wa2, wa3, wa0);
                wb1 = schedule!(wb1, wb2, wb3, wb0);
                rounds4!(g + 1, wa1, wb1, abef_a, cdgh_a, abef_b, cdgh_b);
                wa2 = schedule!(wa2, wa3, wa0, wa1);
                wb2 = schedule!(wb2, wb3, wb0, wb1);
                rounds4!(g + 2, wa2, wb2, abef_a, cdgh_a, abef_b, cdgh_b);
                wa3 = schedule!(wa3, wa0, wa1, wa2);
                wb3 = schedule!(wb3, wb0, wb1, wb2);
                rounds4!(g + 3, wa3, wb3, abef_a, cdgh_a, abef_b, cdgh_b);
            }
            abef_a = _mm_add_epi32(abef_a, save_abef_a);
            cdgh_a = _mm_add_epi32(cdgh_a, save_cdgh_a);
            abef_b = _mm_add_epi32(abef_b, save_abef_b);
            cdgh_b = _mm_add_epi32(cdgh_b, save_cdgh_b);
        }
        pack(abef_a, cdgh_a, sa);
        pack(abef_b, cdgh_b, sb);
    }
}
