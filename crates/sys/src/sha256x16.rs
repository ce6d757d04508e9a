//! SHA-256 of sixteen equal-length messages at once, with AVX-512.
//!
//! Why sixteen: a 512-bit register holds one 32-bit word of each of sixteen
//! messages, so the plain (non-SHA-NI) rounds, written with vector adds,
//! rotates and three-input logic (`vpternlogd`), advance sixteen messages
//! for the price of about one. That beats even SHA-NI, which does two
//! rounds of one message per instruction: on the development machine's
//! Xeon `examples/sha256x2_bench.rs` measures about 2x the `sha2` crate for
//! 4 KiB blocks with a 32-byte salt (dm-verity's data blocks), against
//! 1.25x for the two-message SHA-NI code of [`crate::sha256x2`].
//!
//! The sixteen messages share a prefix (dm-verity's salt) and have the same
//! length, so their padded streams have the same number of 64-byte blocks
//! and are hashed in lockstep. A block lying wholly inside each message is
//! loaded straight from the message (one unaligned 64-byte load per
//! message) and the 16x16 matrix of words is transposed in registers, which
//! measured faster than gathering each word across the messages; the few
//! blocks that hold prefix bytes, the `0x80` or the length are built in a
//! small buffer first.
//!
//! [`sha256_16x`] is safe: it returns `None` when the CPU lacks AVX-512
//! (F and BW) or off x86-64, and the caller hashes another way.

use crate::sha256x2::DIGEST_LEN;

/// Number of messages [`sha256_16x`] hashes at once.
pub const LANES: usize = 16;

/// `sha256(prefix || messages[i])` for each of the sixteen messages.
///
/// The messages must all have the same length (any length, like the
/// prefix). Returns `None` when they do not, or when this CPU cannot run the
/// sixteen-message code (no AVX-512 F and BW, or not x86-64).
pub fn sha256_16x(prefix: &[u8], messages: &[&[u8]; LANES]) -> Option<[[u8; DIGEST_LEN]; LANES]> {
    let len = messages[0].len();
    if messages.iter().any(|m| m.len() != len) {
        return None;
    }
    imp::sha256_16x(prefix, messages)
}

/// Whether [`sha256_16x`] runs on this CPU (for callers that pick a path
/// once, and for benchmarks).
pub fn sha256_16x_supported() -> bool {
    imp::supported()
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use super::{DIGEST_LEN, LANES};

    pub(super) fn supported() -> bool {
        false
    }

    pub(super) fn sha256_16x(
        _prefix: &[u8],
        _messages: &[&[u8]; LANES],
    ) -> Option<[[u8; DIGEST_LEN]; LANES]> {
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use core::arch::x86_64::{
        __m512i, _mm512_add_epi32, _mm512_loadu_si512, _mm512_ror_epi32, _mm512_set1_epi32,
        _mm512_set_epi64, _mm512_setzero_si512, _mm512_shuffle_epi8, _mm512_shuffle_i32x4,
        _mm512_srli_epi32, _mm512_storeu_si512, _mm512_ternarylogic_epi32, _mm512_unpackhi_epi32,
        _mm512_unpackhi_epi64, _mm512_unpacklo_epi32, _mm512_unpacklo_epi64,
    };

    use super::{DIGEST_LEN, LANES};
    use crate::sha256_consts::{BLOCK, H0, K};

    /// Proof that the CPU has the extensions the `target_feature` functions
    /// below are compiled for: only [`Cpu::detect`] makes one.
    #[derive(Clone, Copy)]
    struct Cpu(());

    impl Cpu {
        fn detect() -> Option<Cpu> {
            // std caches the CPUID results: each check is a load and a test.
            let ok = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
            ok.then_some(Cpu(()))
        }
    }

    pub(super) fn supported() -> bool {
        Cpu::detect().is_some()
    }

    /// Where one message's padded stream (`prefix || message || 0x80 ||
    /// zeros || length`) comes from, block by block.
    struct Stream<'a> {
        prefix: &'a [u8],
        message: &'a [u8],
    }

    impl Stream<'_> {
        /// Build block `at` (a byte offset of the stream, a multiple of 64)
        /// in `buf`. `total` is the unpadded length, `padded` the padded
        /// one.
        fn block<'b>(
            &self,
            at: usize,
            total: usize,
            padded: usize,
            buf: &'b mut [u8; BLOCK],
        ) -> &'b [u8; BLOCK] {
            let p = self.prefix.len();
            buf.fill(0);
            let end = at + BLOCK;
            if at < p {
                let n = (p - at).min(BLOCK);
                buf[..n].copy_from_slice(&self.prefix[at..at + n]);
            }
            let (lo, hi) = (at.max(p), end.min(total));
            if lo < hi {
                buf[lo - at..hi - at].copy_from_slice(&self.message[lo - p..hi - p]);
            }
            if (at..end).contains(&total) {
                buf[total - at] = 0x80;
            }
            if end == padded {
                // SHA-256 counts the length in bits mod 2^64.
                let bits = (total as u64).wrapping_mul(8);
                buf[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
            }
            buf
        }
    }

    pub(super) fn sha256_16x(
        prefix: &[u8],
        messages: &[&[u8]; LANES],
    ) -> Option<[[u8; DIGEST_LEN]; LANES]> {
        let cpu = Cpu::detect()?;
        let state = hash(cpu, prefix, messages)?;
        let mut out = [[0u8; DIGEST_LEN]; LANES];
        for (lane, digest) in out.iter_mut().enumerate() {
            for (bytes, word) in digest.chunks_exact_mut(4).zip(&state) {
                bytes.copy_from_slice(&word[lane].to_be_bytes());
            }
        }
        Some(out)
    }

    /// The final state words of the sixteen hashes (lane `i` of each word
    /// belonging to `messages[i]`), or `None` if the length overflows.
    fn hash(_cpu: Cpu, prefix: &[u8], messages: &[&[u8]; LANES]) -> Option<[[u32; LANES]; 8]> {
        let total = prefix.len().checked_add(messages[0].len())?;
        // 0x80 and the 8-byte length follow the message, then round up.
        let padded = total.checked_add(1 + 8)?.div_ceil(BLOCK) * BLOCK;
        // SAFETY: `hash16` is compiled for avx512f and avx512bw; a Cpu
        // exists only if Cpu::detect found both on this CPU.
        Some(unsafe { hash16(prefix, messages, total, padded) })
    }

    /// The loop over the sixteen padded streams, kept in one function
    /// compiled for AVX-512 so the state stays in registers and the
    /// compression function is inlined.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn hash16(
        prefix: &[u8],
        messages: &[&[u8]; LANES],
        total: usize,
        padded: usize,
    ) -> [[u32; LANES]; 8] {
        let p = prefix.len();
        let streams = messages.map(|message| Stream { prefix, message });
        let mut bufs = [[0u8; BLOCK]; LANES];
        // Blocks from `direct` on lie wholly inside every message until
        // fewer than 64 message bytes are left.
        let direct = p.next_multiple_of(BLOCK);
        // Loops, not `map` or `from_fn`: closures do not inherit this
        // function's target features, so they would be called, not
        // inlined, with every register passed through memory.
        let mut v = [_mm512_setzero_si512(); 8];
        for (word, h) in v.iter_mut().zip(H0) {
            *word = _mm512_set1_epi32(h as i32);
        }
        let mut rows = [_mm512_setzero_si512(); LANES];
        for at in (0..padded).step_by(BLOCK) {
            let inside = at >= direct && at + BLOCK <= total;
            for (((row, message), stream), buf) in
                rows.iter_mut().zip(messages).zip(&streams).zip(&mut bufs)
            {
                // Within the message when `inside` (all lengths are
                // equal); built like the others if not.
                let direct_block = if inside {
                    message
                        .get(at - p..at - p + BLOCK)
                        .and_then(|s| <&[u8; BLOCK]>::try_from(s).ok())
                } else {
                    None
                };
                *row = match direct_block {
                    Some(block) => load(block),
                    None => load(stream.block(at, total, padded, buf)),
                };
            }
            v = compress16(v, rows);
        }
        let mut out = [[0u32; LANES]; 8];
        for (lanes, word) in out.iter_mut().zip(v) {
            store_words(lanes, word);
        }
        out
    }

    /// Load a 64-byte block into a register.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load(block: &[u8; BLOCK]) -> __m512i {
        // SAFETY: `block` is 64 readable bytes, exactly what loadu reads;
        // loadu needs no alignment.
        unsafe { _mm512_loadu_si512(block.as_ptr().cast()) }
    }

    /// Store a register as sixteen lanes of a state word.
    #[target_feature(enable = "avx512f")]
    fn store_words(words: &mut [u32; LANES], v: __m512i) {
        // SAFETY: `words` is 64 writable bytes, exactly what storeu writes;
        // storeu needs no alignment.
        unsafe { _mm512_storeu_si512(words.as_mut_ptr().cast(), v) }
    }

    /// Rows to columns: `rows[i]` holds the sixteen big-endian words of
    /// block `i`; the result's register `t` holds word `t` of every block,
    /// block `i` in lane `i`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        // Within each 128-bit quarter: interleave words of row pairs, then
        // doublewords of pairs of those, which transposes the 4x4 word
        // blocks; afterwards u[4q + c], quarter k, holds column 4k + c of
        // rows 4q..4q+4.
        let mut t = r;
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        let mut u = t;
        for i in 0..4 {
            let b = 4 * i;
            u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        // Then transpose the 4x4 matrix of quarters u[c], u[4 + c],
        // u[8 + c], u[12 + c] for each c, in two steps of quarter shuffles.
        let mut w = u;
        for c in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
            let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
            let v3 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
            w[c] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
            w[4 + c] = _mm512_shuffle_i32x4::<0xDD>(v0, v2);
            w[8 + c] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
            w[12 + c] = _mm512_shuffle_i32x4::<0xDD>(v1, v3);
        }
        w
    }

    /// Three terms XOR-ed with one three-input logic instruction.
    macro_rules! xor3 {
        ($a:expr, $b:expr, $c:expr) => {
            _mm512_ternarylogic_epi32::<0x96>($a, $b, $c)
        };
    }

    /// One round (FIPS 180-4, 6.2.2 step 3) with the eight working
    /// variables renamed instead of moved: it updates `$d` and `$h`, and
    /// the next round is called with the names rotated by one.
    macro_rules! round {
        ($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident, $wk:expr) => {{
            let big_s1 = xor3!(
                _mm512_ror_epi32::<6>($e),
                _mm512_ror_epi32::<11>($e),
                _mm512_ror_epi32::<25>($e)
            );
            // Ch(e, f, g) = (e & f) ^ (!e & g): truth table 0xCA.
            let ch = _mm512_ternarylogic_epi32::<0xCA>($e, $f, $g);
            let t1 = _mm512_add_epi32(_mm512_add_epi32($h, big_s1), _mm512_add_epi32(ch, $wk));
            let big_s0 = xor3!(
                _mm512_ror_epi32::<2>($a),
                _mm512_ror_epi32::<13>($a),
                _mm512_ror_epi32::<22>($a)
            );
            // Maj(a, b, c): truth table 0xE8.
            let maj = _mm512_ternarylogic_epi32::<0xE8>($a, $b, $c);
            $d = _mm512_add_epi32($d, t1);
            $h = _mm512_add_epi32(t1, _mm512_add_epi32(big_s0, maj));
        }};
    }

    /// Eight rounds, `$w` the schedule ring, `$i` its first index there
    /// and `$k` the index of the first round constant.
    macro_rules! rounds8 {
        ($v:ident, $w:ident, $i:literal, $k:expr) => {{
            let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = $v;
            // A macro, not a closure: closures do not inherit the
            // function's target features and would not be inlined.
            macro_rules! wk {
                ($j:literal) => {
                    _mm512_add_epi32($w[$i + $j], _mm512_set1_epi32(K[$k + $j] as i32))
                };
            }
            round!(a, b, c, d, e, f, g, h, wk!(0));
            round!(h, a, b, c, d, e, f, g, wk!(1));
            round!(g, h, a, b, c, d, e, f, wk!(2));
            round!(f, g, h, a, b, c, d, e, wk!(3));
            round!(e, f, g, h, a, b, c, d, wk!(4));
            round!(d, e, f, g, h, a, b, c, wk!(5));
            round!(c, d, e, f, g, h, a, b, wk!(6));
            round!(b, c, d, e, f, g, h, a, wk!(7));
            // Eight renamings make a full turn: the names are home again.
            $v = [a, b, c, d, e, f, g, h];
        }};
    }

    /// The next schedule word in place of `$w[$i]` (which held w[t-16]):
    /// w[t] = s1(w[t-2]) + w[t-7] + s0(w[t-15]) + w[t-16].
    macro_rules! schedule {
        ($w:ident, $i:literal) => {{
            let w15 = $w[($i + 1) & 15];
            let w2 = $w[($i + 14) & 15];
            let s0 = xor3!(
                _mm512_ror_epi32::<7>(w15),
                _mm512_ror_epi32::<18>(w15),
                _mm512_srli_epi32::<3>(w15)
            );
            let s1 = xor3!(
                _mm512_ror_epi32::<17>(w2),
                _mm512_ror_epi32::<19>(w2),
                _mm512_srli_epi32::<10>(w2)
            );
            $w[$i] = _mm512_add_epi32(
                _mm512_add_epi32($w[$i], s0),
                _mm512_add_epi32($w[($i + 9) & 15], s1),
            );
        }};
    }

    /// The compression function (FIPS 180-4, 6.2.2): the state `v` after
    /// sixteen blocks, `rows[i]` holding block `i` as loaded.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn compress16(old: [__m512i; 8], rows: [__m512i; LANES]) -> [__m512i; 8] {
        // Reverses the bytes of each 32-bit word: the message is big-endian.
        let swap = _mm512_set_epi64(
            0x0c0d_0e0f_0809_0a0b,
            0x0405_0607_0001_0203,
            0x0c0d_0e0f_0809_0a0b,
            0x0405_0607_0001_0203,
            0x0c0d_0e0f_0809_0a0b,
            0x0405_0607_0001_0203,
            0x0c0d_0e0f_0809_0a0b,
            0x0405_0607_0001_0203,
        );
        let mut rows = rows;
        for row in &mut rows {
            *row = _mm512_shuffle_epi8(*row, swap);
        }
        let mut w = transpose(rows);
        let mut v = old;
        // Four groups of sixteen rounds; each group after the first first
        // extends the schedule by sixteen words, in the ring `w`.
        for group in 0..4 {
            if group > 0 {
                schedule!(w, 0);
                schedule!(w, 1);
                schedule!(w, 2);
                schedule!(w, 3);
                schedule!(w, 4);
                schedule!(w, 5);
                schedule!(w, 6);
                schedule!(w, 7);
                schedule!(w, 8);
                schedule!(w, 9);
                schedule!(w, 10);
                schedule!(w, 11);
                schedule!(w, 12);
                schedule!(w, 13);
                schedule!(w, 14);
                schedule!(w, 15);
            }
            rounds8!(v, w, 0, 16 * group);
            rounds8!(v, w, 8, 16 * group + 8);
        }
        for (new, old) in v.iter_mut().zip(old) {
            *new = _mm512_add_epi32(*new, old);
        }
        v
    }
}
