//! MicroLZMA: an LZMA1 stream whose first range-coder byte (always 0 in
//! LZMA1) carries the bitwise-inverted lc/lp/pb properties byte. There is
//! no header and no end marker: the caller knows the compressed size (the
//! pcluster after its zero padding) and the decoded size.
//!
//! This is our own decoder of the LZMA format (the format as described in
//! the LZMA SDK and xz documentation). It decodes straight into `dst`, so
//! the dictionary is `dst` itself and the only other allocation is the
//! probability model (at most about 28 KiB). Checks follow the kernel's
//! `xz_dec_microlzma_run`:
//! - lc + lp <= 4 and a valid properties byte;
//! - no match reaches before the start of the output or further back than
//!   the dictionary size of the cfg record;
//! - reading past the compressed size is corruption, in both modes;
//! - in exact mode, once `dst` is full the stream must be finished: all
//!   input consumed, no match cut short, and the range coder's code at 0.
//!
//! Each loop turn writes at least one byte to `dst`, so the work is bounded
//! by the output length.

use super::{copy_match, Algorithm, DecompressError, LzmaConfig};

fn err(msg: impl Into<std::borrow::Cow<'static, str>>) -> DecompressError {
    DecompressError::new(Algorithm::Lzma, msg)
}

const NUM_STATES: usize = 12;
const POS_STATES_MAX: usize = 1 << 4;
const LEN_LOW_SYMBOLS: usize = 8;
const LEN_MID_SYMBOLS: usize = 8;
const LEN_HIGH_SYMBOLS: usize = 256;
const MATCH_LEN_MIN: usize = 2;
const DIST_STATES: usize = 4;
const DIST_SLOTS: usize = 64;
const DIST_MODEL_START: u32 = 4;
const DIST_MODEL_END: u32 = 14;
const FULL_DISTANCES: usize = 1 << (DIST_MODEL_END / 2);
const ALIGN_BITS: u32 = 4;
const ALIGN_SIZE: usize = 1 << ALIGN_BITS;
const LITERAL_CODER_SIZE: usize = 0x300;
/// Bytes the range decoder reads before the first symbol.
const RC_INIT_BYTES: usize = 5;
const RC_TOP_VALUE: u32 = 1 << 24;
const RC_BIT_MODEL_TOTAL_BITS: u32 = 11;
const RC_BIT_MODEL_TOTAL: u16 = 1 << RC_BIT_MODEL_TOTAL_BITS;
const RC_MOVE_BITS: u32 = 5;
const PROB_INIT: u16 = RC_BIT_MODEL_TOTAL / 2;

/// The range decoder over a byte slice. Reads past the end yield zeros and
/// are counted; the caller turns them into an error (the kernel's
/// `rc_limit_exceeded`), checking once per symbol, so at most a few dozen
/// phantom bytes are ever "read".
struct RangeDecoder<'a> {
    input: &'a [u8],
    pos: usize,
    range: u32,
    code: u32,
}

impl<'a> RangeDecoder<'a> {
    fn new(input: &'a [u8]) -> Result<Self, DecompressError> {
        let init = input
            .get(..RC_INIT_BYTES)
            .ok_or_else(|| err("stream is shorter than the range coder's 5 bytes"))?;
        // The first byte is shifted out of the 32-bit code: in MicroLZMA it
        // held the properties instead of LZMA1's zero.
        let code = u32::from_be_bytes([init[1], init[2], init[3], init[4]]);
        Ok(RangeDecoder {
            input,
            pos: RC_INIT_BYTES,
            range: u32::MAX,
            code,
        })
    }

    #[inline(always)]
    fn normalize(&mut self) {
        if self.range < RC_TOP_VALUE {
            let b = self.input.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
            self.range <<= 8;
            self.code = (self.code << 8) | u32::from(b);
        }
    }

    #[inline(always)]
    fn overrun(&self) -> bool {
        self.pos > self.input.len()
    }

    #[inline(always)]
    fn bit(&mut self, prob: &mut u16) -> u32 {
        self.normalize();
        let bound = (self.range >> RC_BIT_MODEL_TOTAL_BITS) * u32::from(*prob);
        if self.code < bound {
            self.range = bound;
            *prob += (RC_BIT_MODEL_TOTAL - *prob) >> RC_MOVE_BITS;
            0
        } else {
            self.range -= bound;
            self.code -= bound;
            *prob -= *prob >> RC_MOVE_BITS;
            1
        }
    }

    /// Decode a `limit`-leaf bit tree (MSB first); returns the symbol with
    /// its leading 1 still set (in `limit..2 * limit`).
    #[inline(always)]
    fn bittree(&mut self, probs: &mut [u16], limit: usize) -> usize {
        let mut symbol = 1usize;
        while symbol < limit {
            // symbol < limit <= probs.len() by construction.
            symbol = (symbol << 1) | self.bit(&mut probs[symbol]) as usize;
        }
        symbol
    }

    /// Decode `bits` bits LSB first and add them to `dest`.
    #[inline(always)]
    fn bittree_reverse(&mut self, probs: &mut [u16], dest: &mut u32, bits: u32) {
        let mut symbol = 1usize;
        for i in 0..bits {
            let bit = self.bit(&mut probs[symbol]);
            symbol = (symbol << 1) | bit as usize;
            *dest = dest.wrapping_add(bit << i);
        }
    }

    /// Decode `count` bits with fixed probability one half.
    #[inline(always)]
    fn direct(&mut self, dest: &mut u32, count: u32) {
        for _ in 0..count {
            self.normalize();
            self.range >>= 1;
            self.code = self.code.wrapping_sub(self.range);
            // All ones when the subtraction went "negative", i.e. bit 0.
            let mask = 0u32.wrapping_sub(self.code >> 31);
            self.code = self.code.wrapping_add(self.range & mask);
            *dest = (*dest << 1).wrapping_add(mask.wrapping_add(1));
        }
    }
}

/// Probabilities of one length decoder (match lengths or rep lengths).
struct LenDecoder {
    choice: u16,
    choice2: u16,
    low: [[u16; LEN_LOW_SYMBOLS]; POS_STATES_MAX],
    mid: [[u16; LEN_MID_SYMBOLS]; POS_STATES_MAX],
    high: [u16; LEN_HIGH_SYMBOLS],
}

impl LenDecoder {
    fn new() -> Self {
        LenDecoder {
            choice: PROB_INIT,
            choice2: PROB_INIT,
            low: [[PROB_INIT; LEN_LOW_SYMBOLS]; POS_STATES_MAX],
            mid: [[PROB_INIT; LEN_MID_SYMBOLS]; POS_STATES_MAX],
            high: [PROB_INIT; LEN_HIGH_SYMBOLS],
        }
    }

    #[inline(always)]
    fn decode(&mut self, rc: &mut RangeDecoder<'_>, pos_state: usize) -> usize {
        if rc.bit(&mut self.choice) == 0 {
            MATCH_LEN_MIN + rc.bittree(&mut self.low[pos_state], LEN_LOW_SYMBOLS) - LEN_LOW_SYMBOLS
        } else if rc.bit(&mut self.choice2) == 0 {
            MATCH_LEN_MIN + LEN_LOW_SYMBOLS + rc.bittree(&mut self.mid[pos_state], LEN_MID_SYMBOLS)
                - LEN_MID_SYMBOLS
        } else {
            MATCH_LEN_MIN
                + LEN_LOW_SYMBOLS
                + LEN_MID_SYMBOLS
                + rc.bittree(&mut self.high, LEN_HIGH_SYMBOLS)
                - LEN_HIGH_SYMBOLS
        }
    }
}

/// The whole adaptive model.
struct Model {
    is_match: [[u16; POS_STATES_MAX]; NUM_STATES],
    is_rep: [u16; NUM_STATES],
    is_rep0: [u16; NUM_STATES],
    is_rep1: [u16; NUM_STATES],
    is_rep2: [u16; NUM_STATES],
    is_rep0_long: [[u16; POS_STATES_MAX]; NUM_STATES],
    dist_slot: [[u16; DIST_SLOTS]; DIST_STATES],
    /// One unused slot in front, so that every slot's tree (which the
    /// format indexes from `rep0 - slot - 1 + 1`) starts at a valid index.
    dist_special: [u16; FULL_DISTANCES - DIST_MODEL_END as usize + 1],
    dist_align: [u16; ALIGN_SIZE],
    match_len: LenDecoder,
    rep_len: LenDecoder,
    /// `LITERAL_CODER_SIZE << (lc + lp)` probabilities.
    literal: Vec<u16>,
}

impl Model {
    fn new(lc_lp: u32) -> Box<Self> {
        Box::new(Model {
            is_match: [[PROB_INIT; POS_STATES_MAX]; NUM_STATES],
            is_rep: [PROB_INIT; NUM_STATES],
            is_rep0: [PROB_INIT; NUM_STATES],
            is_rep1: [PROB_INIT; NUM_STATES],
            is_rep2: [PROB_INIT; NUM_STATES],
            is_rep0_long: [[PROB_INIT; POS_STATES_MAX]; NUM_STATES],
            dist_slot: [[PROB_INIT; DIST_SLOTS]; DIST_STATES],
            dist_special: [PROB_INIT; FULL_DISTANCES - DIST_MODEL_END as usize + 1],
            dist_align: [PROB_INIT; ALIGN_SIZE],
            match_len: LenDecoder::new(),
            rep_len: LenDecoder::new(),
            literal: vec![PROB_INIT; LITERAL_CODER_SIZE << lc_lp],
        })
    }
}

/// Split the properties byte into (lc, lp, pb), with xz-embedded's limits.
fn parse_props(props: u8) -> Result<(u32, u32, u32), DecompressError> {
    let props = u32::from(props);
    if props >= 9 * 5 * 5 {
        return Err(err(format!("invalid properties byte {props:#x}")));
    }
    let (lc, lp, pb) = (props % 9, (props / 9) % 5, props / 45);
    if lc + lp > 4 {
        return Err(err(format!("unsupported lc {lc} + lp {lp} > 4")));
    }
    Ok((lc, lp, pb))
}

/// Decode the MicroLZMA stream `src` into `dst`; see the module comment.
pub(super) fn decompress(
    cfg: &LzmaConfig,
    src: &[u8],
    dst: &mut [u8],
    partial: bool,
) -> Result<(), DecompressError> {
    let first = *src.first().ok_or_else(|| err("empty stream"))?;
    let (lc, lp, pb) = parse_props(!first)?;
    let mut rc = RangeDecoder::new(src)?;
    let mut m = Model::new(lc + lp);
    let pos_mask = (1usize << pb) - 1;
    let lit_pos_mask = (1usize << lp) - 1;
    // u32 -> usize is lossless on the 32- and 64-bit targets we build for.
    let dict_size = cfg.dict_size as usize;

    let out_len = dst.len();
    let mut pos = 0usize;
    let mut state = 0usize;
    // Distances minus one, as coded.
    let (mut rep0, mut rep1, mut rep2, mut rep3) = (0u32, 0u32, 0u32, 0u32);
    // Bytes of the last match that did not fit in `dst`.
    let mut cut_short = 0usize;

    while pos < out_len {
        if rc.overrun() {
            return Err(err(format!("input ends after {pos} of {out_len} bytes")));
        }
        let pos_state = pos & pos_mask;
        if rc.bit(&mut m.is_match[state][pos_state]) == 0 {
            let prev = if pos > 0 { u32::from(dst[pos - 1]) } else { 0 };
            let base = LITERAL_CODER_SIZE
                * ((((pos & lit_pos_mask) << lc) as u32 + (prev >> (8 - lc))) as usize);
            let probs = &mut m.literal[base..base + LITERAL_CODER_SIZE];
            let symbol = if state < 7 {
                rc.bittree(probs, 0x100)
            } else {
                // A "matched" literal: the byte at rep0 steers the model
                // until the first mismatching bit. rep0 < pos holds after
                // any match that succeeded, which states >= 7 imply.
                let at = pos
                    .checked_sub(rep0 as usize + 1)
                    .ok_or_else(|| err("literal match byte before the output"))?;
                let mut match_byte = u32::from(dst[at]) << 1;
                let mut offset = 0x100u32;
                let mut symbol = 1u32;
                while symbol < 0x100 {
                    let match_bit = match_byte & offset;
                    match_byte <<= 1;
                    let i = (offset + match_bit + symbol) as usize;
                    if rc.bit(&mut probs[i]) == 1 {
                        symbol = (symbol << 1) | 1;
                        offset &= match_bit;
                    } else {
                        symbol <<= 1;
                        offset &= !match_bit;
                    }
                }
                symbol as usize
            };
            dst[pos] = symbol as u8;
            pos += 1;
            state = if state < 4 {
                0
            } else if state < 10 {
                state - 3
            } else {
                state - 6
            };
            continue;
        }

        let len;
        if rc.bit(&mut m.is_rep[state]) == 0 {
            // A new match: length, then distance.
            state = if state < 7 { 7 } else { 10 };
            rep3 = rep2;
            rep2 = rep1;
            rep1 = rep0;
            len = m.match_len.decode(&mut rc, pos_state);
            let dist_state = (len - MATCH_LEN_MIN).min(DIST_STATES - 1);
            let slot = (rc.bittree(&mut m.dist_slot[dist_state], DIST_SLOTS) - DIST_SLOTS) as u32;
            if slot < DIST_MODEL_START {
                rep0 = slot;
            } else {
                let bits = (slot >> 1) - 1;
                rep0 = (2 | (slot & 1)) << bits;
                if slot < DIST_MODEL_END {
                    // This slot's tree sits at rep0 - slot in the padded
                    // array; trees index from 1.
                    let base = (rep0 - slot) as usize;
                    rc.bittree_reverse(&mut m.dist_special[base..], &mut rep0, bits);
                } else {
                    let mut direct = 0u32;
                    rc.direct(&mut direct, bits - ALIGN_BITS);
                    rep0 = rep0.wrapping_add(direct << ALIGN_BITS);
                    rc.bittree_reverse(&mut m.dist_align, &mut rep0, ALIGN_BITS);
                }
            }
        } else if rc.bit(&mut m.is_rep0[state]) == 0 {
            if rc.bit(&mut m.is_rep0_long[state][pos_state]) == 0 {
                // A short rep: one byte from rep0.
                state = if state < 7 { 9 } else { 11 };
                let at = pos
                    .checked_sub(rep0 as usize + 1)
                    .filter(|_| (rep0 as usize) < dict_size);
                let at = at.ok_or_else(|| err("match distance out of range"))?;
                dst[pos] = dst[at];
                pos += 1;
                continue;
            }
            state = if state < 7 { 8 } else { 11 };
            len = m.rep_len.decode(&mut rc, pos_state);
        } else {
            let dist;
            if rc.bit(&mut m.is_rep1[state]) == 0 {
                dist = rep1;
            } else {
                if rc.bit(&mut m.is_rep2[state]) == 0 {
                    dist = rep2;
                } else {
                    dist = rep3;
                    rep3 = rep2;
                }
                rep2 = rep1;
            }
            rep1 = rep0;
            rep0 = dist;
            state = if state < 7 { 8 } else { 11 };
            len = m.rep_len.decode(&mut rc, pos_state);
        }

        // Copy the match. rep0 == u32::MAX (the LZMA end marker) fails here
        // too: MicroLZMA has no end marker.
        let dist = rep0 as usize + 1;
        if rep0 as usize >= dict_size || dist > pos {
            return Err(err(format!("match distance {dist} out of range at {pos}")));
        }
        let n = len.min(out_len - pos);
        cut_short = len - n;
        copy_match(dst, pos, dist, n);
        pos += n;
    }

    // The kernel normalizes once more after the last symbol.
    rc.normalize();
    if rc.overrun() {
        return Err(err("input ends before the output is full"));
    }
    if !partial {
        if rc.pos != src.len() {
            return Err(err(format!(
                "{} bytes of input left after the output is full",
                src.len() - rc.pos
            )));
        }
        if cut_short > 0 {
            return Err(err("last match runs past the expected length"));
        }
        if rc.code != 0 {
            return Err(err("range coder not finished at the expected length"));
        }
    }
    Ok(())
}
