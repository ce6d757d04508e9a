//! An LZ4 block encoder that fills a fixed destination size: it consumes as
//! much input as fits in `cap` output bytes (what EROFS's fixed-size
//! pclusters need, and what no safe Rust LZ4 crate offers).
//!
//! Greedy parsing over a hash chain: depth 1 is plain LZ4, deeper chains
//! give the better ratios of LZ4HC. The output obeys the block format's end
//! rules relative to the consumed length (the last 5 bytes are literals, the
//! last match starts at least 12 bytes before the end), which the kernel's
//! strict decoder checks.

const MIN_MATCH: usize = 4;
const LAST_LITERALS: usize = 5;
const MF_LIMIT: usize = 12;
const MAX_DISTANCE: usize = 65535;
const HASH_BITS: u32 = 16;

fn read32(s: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]])
}

fn read64(s: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[i..i + 8]);
    u64::from_le_bytes(b)
}

/// Length of the common run of `src[a..]` and `src[b..]` (a < b), not
/// going past `end`, eight bytes at a time.
fn common_len(src: &[u8], a: usize, b: usize, start: usize, end: usize) -> usize {
    let mut len = start;
    while b + len + 8 <= end {
        let x = read64(src, a + len) ^ read64(src, b + len);
        if x != 0 {
            return len + (x.trailing_zeros() / 8) as usize;
        }
        len += 8;
    }
    while b + len < end && src[a + len] == src[b + len] {
        len += 1;
    }
    len
}

fn hash(v: u32) -> usize {
    (v.wrapping_mul(2_654_435_761) >> (32 - HASH_BITS)) as usize
}

/// Bytes of a length's extension (after the 4-bit nibble saturates at 15).
fn len_extra(len: usize) -> usize {
    if len < 15 {
        0
    } else {
        (len - 15) / 255 + 1
    }
}

fn push_len(out: &mut Vec<u8>, mut len: usize) {
    if len < 15 {
        return;
    }
    len -= 15;
    while len >= 255 {
        out.push(255);
        len -= 255;
    }
    out.push(len as u8);
}

/// Encoder state, reusable across calls (the tables are large).
///
/// Positions are stored as `base + pos + 1` so that a call never has to
/// clear the tables: entries below the current `base` are stale.
#[derive(Debug)]
pub struct Lz4Encoder {
    head: Vec<u32>,
    chain: Vec<u16>,
    depth: u32,
    base: u32,
    next_base: u32,
}

/// Stop searching once a match is this long.
const NICE_LEN: usize = 256;

impl Lz4Encoder {
    /// `depth` candidates are tried per position (1 = fast LZ4).
    pub fn new(depth: u32) -> Lz4Encoder {
        Lz4Encoder {
            head: vec![0; 1 << HASH_BITS],
            chain: vec![0; MAX_DISTANCE + 1],
            depth: depth.max(1),
            base: 0,
            next_base: 0,
        }
    }

    fn insert(&mut self, src: &[u8], pos: usize) {
        let h = hash(read32(src, pos));
        if self.depth == 1 {
            // Plain LZ4 looks at one candidate: no chain to keep.
            self.head[h] = self.base + pos as u32 + 1;
            return;
        }
        let stored = self.head[h];
        // A later position may be there already (after a lazy step and a
        // backward extension): then this one starts a fresh chain.
        let delta = match self.local(stored).and_then(|prev| pos.checked_sub(prev)) {
            Some(d) => d.min(MAX_DISTANCE),
            None => 0,
        };
        self.chain[pos & MAX_DISTANCE] = delta as u16;
        self.head[h] = self.base + pos as u32 + 1;
    }

    /// A stored position of this call, if it is one.
    fn local(&self, stored: u32) -> Option<usize> {
        (stored > self.base).then(|| (stored - self.base - 1) as usize)
    }

    /// Plain LZ4: the one candidate of `pos`'s hash, which `pos` replaces.
    fn find_fast(&mut self, src: &[u8], pos: usize, end: usize) -> Option<(usize, usize)> {
        let v = read32(src, pos);
        let h = hash(v);
        let cand = self.local(self.head[h]);
        self.head[h] = self.base + pos as u32 + 1;
        let c = cand?;
        if c >= pos || pos - c > MAX_DISTANCE || read32(src, c) != v {
            return None;
        }
        Some((common_len(src, c, pos, MIN_MATCH, end), pos - c))
    }

    /// The longest match at `pos` ending at most at `end`: (length, offset).
    fn find(&self, src: &[u8], pos: usize, end: usize) -> Option<(usize, usize)> {
        let h = hash(read32(src, pos));
        let mut cand = self.local(self.head[h]);
        let mut best: Option<(usize, usize)> = None;
        let mut tries = self.depth;
        let want = read32(src, pos);
        while let Some(c) = cand {
            if tries == 0 || c >= pos || pos - c > MAX_DISTANCE {
                break;
            }
            let bl = best.map(|b| b.0).unwrap_or(MIN_MATCH - 1);
            // Cheap reject: a longer match must agree at its new last byte.
            if pos + bl < end && src[c + bl] == src[pos + bl] && read32(src, c) == want {
                let len = common_len(src, c, pos, MIN_MATCH, end);
                if len > bl {
                    best = Some((len, pos - c));
                    if pos + len == end || len >= NICE_LEN {
                        break;
                    }
                }
            }
            let d = self.chain[c & MAX_DISTANCE] as usize;
            if d == 0 || d > c {
                break;
            }
            cand = Some(c - d);
            tries -= 1;
        }
        best
    }

    /// Compress a prefix of `src` into at most `cap` bytes. Returns the
    /// number of input bytes consumed and the block.
    pub fn compress_dest(&mut self, src: &[u8], cap: usize) -> (usize, Vec<u8>) {
        let span = u32::try_from(src.len() + MAX_DISTANCE + 2).unwrap_or(u32::MAX);
        if self.next_base.checked_add(span).is_none_or(|e| e > 1 << 31) {
            self.head.fill(0);
            self.next_base = 0;
        }
        self.base = self.next_base;
        self.next_base += span;
        let mut out = Vec::with_capacity(cap);
        let n = src.len();
        let mut anchor = 0usize;
        let mut ip = 0usize;
        // Room kept after every sequence for a final token and 12 literals,
        // so that a block cut short still ends by the format's rules.
        const RESERVE: usize = 1 + MF_LIMIT;
        if n > MF_LIMIT {
            let match_limit = n - MF_LIMIT;
            let match_end = n - LAST_LITERALS;
            let lazy = self.depth > 1;
            let mut misses = 0usize;
            while ip < match_limit {
                let found = if lazy {
                    let f = self.find(src, ip, match_end);
                    self.insert(src, ip);
                    f
                } else {
                    self.find_fast(src, ip, match_end)
                };
                let Some((mut mlen, mut off)) = found else {
                    // Skip faster through data that does not compress.
                    misses += 1;
                    ip += if lazy { 1 } else { 1 + (misses >> 6) };
                    continue;
                };
                misses = 0;
                // Lazy step (HC): a longer match one byte later wins.
                if lazy && ip + 1 < match_limit {
                    if let Some((l2, o2)) = self.find(src, ip + 1, match_end) {
                        if l2 > mlen + 1 {
                            self.insert(src, ip + 1);
                            ip += 1;
                            (mlen, off) = (l2, o2);
                        }
                    }
                }
                // Extend the match backwards over pending literals.
                while ip > anchor && ip - off > 0 && src[ip - 1] == src[ip - 1 - off] {
                    ip -= 1;
                    mlen += 1;
                }
                let lits = ip - anchor;
                let cost = 1 + len_extra(lits) + lits + 2 + len_extra(mlen - MIN_MATCH);
                if out.len() + cost + RESERVE > cap {
                    break;
                }
                let token_lit = lits.min(15) as u8;
                let token_m = (mlen - MIN_MATCH).min(15) as u8;
                out.push((token_lit << 4) | token_m);
                push_len(&mut out, lits);
                out.extend_from_slice(&src[anchor..ip]);
                out.extend_from_slice(&(off as u16).to_le_bytes());
                push_len(&mut out, mlen - MIN_MATCH);
                // Index the positions the match covers (cheap for short
                // matches, bounded for long ones).
                let stop = (ip + mlen).min(match_limit);
                if lazy {
                    let mut p = ip + 1;
                    while p < stop {
                        self.insert(src, p);
                        p += if mlen > 64 { 4 } else { 1 };
                    }
                } else if ip + mlen >= 2 && ip + mlen - 2 < stop {
                    // As LZ4 does: one position near the match end.
                    self.insert(src, ip + mlen - 2);
                }
                ip += mlen;
                anchor = ip;
            }
        }
        // Final literals: as many as fit.
        let room = cap.saturating_sub(out.len());
        let mut lits = (n - anchor).min(room.saturating_sub(1));
        while lits > 0 && 1 + len_extra(lits) + lits > room {
            lits -= 1;
        }
        if lits == 0 && anchor == 0 {
            return (0, Vec::new());
        }
        out.push((lits.min(15) as u8) << 4);
        push_len(&mut out, lits);
        out.extend_from_slice(&src[anchor..anchor + lits]);
        (anchor + lits, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8], out_len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(out_len);
        let mut i = 0;
        loop {
            let token = block[i];
            i += 1;
            let mut lits = (token >> 4) as usize;
            if lits == 15 {
                loop {
                    let b = block[i];
                    i += 1;
                    lits += b as usize;
                    if b != 255 {
                        break;
                    }
                }
            }
            out.extend_from_slice(&block[i..i + lits]);
            i += lits;
            if i == block.len() {
                break;
            }
            let off = u16::from_le_bytes([block[i], block[i + 1]]) as usize;
            i += 2;
            let mut mlen = (token & 15) as usize;
            if mlen == 15 {
                loop {
                    let b = block[i];
                    i += 1;
                    mlen += b as usize;
                    if b != 255 {
                        break;
                    }
                }
            }
            mlen += 4;
            let start = out.len() - off;
            for k in 0..mlen {
                out.push(out[start + k]);
            }
        }
        out
    }

    #[test]
    fn round_trips_and_respects_the_cap() {
        let mut data = Vec::new();
        for i in 0..200_000u32 {
            data.extend_from_slice(format!("line {} of {}\n", i % 977, i % 13).as_bytes());
        }
        for depth in [1, 16] {
            let mut enc = Lz4Encoder::new(depth);
            for cap in [4096usize, 16384, 65536] {
                let (used, block) = enc.compress_dest(&data, cap);
                assert!(block.len() <= cap);
                assert!(used > cap, "compressible input must expand");
                assert_eq!(decode(&block, used), &data[..used]);
                // lz4_flex, an independent decoder, agrees.
                assert_eq!(
                    lz4_flex::block::decompress(&block, used).unwrap(),
                    &data[..used]
                );
            }
        }
        // Incompressible input still fills (nearly) the whole cap.
        let noise: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (used, block) = Lz4Encoder::new(1).compress_dest(&noise, 4096);
        assert!(block.len() <= 4096 && used > 4000);
        assert_eq!(decode(&block, used), &noise[..used]);
    }

    /// Mixed data (repeats with small edits between noise) drives the lazy
    /// step, backward extension and chain upkeep into each other; every cap
    /// and depth must round-trip (and, in debug builds, not overflow).
    #[test]
    fn mixed_data_round_trips() {
        let mut data = Vec::new();
        let mut x = 12345u32;
        for i in 0..4000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            match x >> 30 {
                0 => data.extend_from_slice(&x.to_le_bytes()),
                1 => data.extend_from_slice(b"abcabcabd"),
                2 => {
                    let n = data.len();
                    let back = ((x >> 8) as usize % n.max(1)).min(n);
                    let piece: Vec<u8> = data[n - back..n.min(n - back + 40)].to_vec();
                    data.extend_from_slice(&piece);
                }
                _ => data.extend_from_slice(format!("{i:x} ").as_bytes()),
            }
        }
        for depth in [1, 4, 256] {
            let mut enc = Lz4Encoder::new(depth);
            for cap in [512usize, 4096, 65536] {
                let mut pos = 0;
                while pos < data.len() {
                    let (used, block) = enc.compress_dest(&data[pos..], cap);
                    assert!(used > 0 && block.len() <= cap);
                    assert_eq!(
                        lz4_flex::block::decompress(&block, used).unwrap(),
                        &data[pos..pos + used]
                    );
                    pos += used;
                }
            }
        }
    }
}
