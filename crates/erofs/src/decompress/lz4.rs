//! The LZ4 block format: sequences of (token, literals, offset, match).
//!
//! Behaves like the kernel's `LZ4_decompress_safe` (exact mode) and
//! `LZ4_decompress_safe_partial` with target = capacity (partial mode):
//! every read and write is bounds-checked, a match may not reach before
//! the start of the output, and each loop turn consumes input, so the work
//! is bounded by the input length plus the output length.

use super::{copy_match, Algorithm, DecompressError};

fn err(msg: &'static str) -> DecompressError {
    DecompressError::new(Algorithm::Lz4, msg)
}

/// Read the 255-continued tail of a literal or match length.
#[inline]
fn read_length(src: &[u8], ip: &mut usize, mut len: usize) -> Result<usize, DecompressError> {
    loop {
        let b = *src
            .get(*ip)
            .ok_or_else(|| err("length runs past the end of the input"))?;
        *ip += 1;
        // At most 1 MiB of input, so at most 255 MiB: no overflow.
        len = len.saturating_add(usize::from(b));
        if b != 255 {
            return Ok(len);
        }
    }
}

/// Decode the LZ4 block `src` into `dst`; see the module comment.
pub(super) fn decompress(src: &[u8], dst: &mut [u8], partial: bool) -> Result<(), DecompressError> {
    let out_len = dst.len();
    if partial && out_len == 0 {
        return Ok(());
    }
    let mut ip = 0usize;
    let mut op = 0usize;
    loop {
        let token = *src
            .get(ip)
            .ok_or_else(|| err("input ends before the output is full"))?;
        ip += 1;

        let mut lit = usize::from(token >> 4);
        if lit < 15 && ip + 16 <= src.len() && op + 16 <= out_len {
            // Fast path for the common short run: copy a fixed 16 bytes (a
            // few moves, no memcpy call). Bytes past the run are
            // overwritten by what follows. Input remains after the run, so
            // this is not the last sequence.
            dst[op..op + 16].copy_from_slice(&src[ip..ip + 16]);
            ip += lit;
            op += lit;
        } else {
            if lit == 15 {
                lit = read_length(src, &mut ip, lit)?;
            }
            let room = out_len - op;
            if lit > room {
                if !partial {
                    return Err(err("output is longer than expected"));
                }
                lit = room;
            }
            let lit_end = ip.checked_add(lit).filter(|&e| e <= src.len());
            let lit_end = lit_end.ok_or_else(|| err("literals run past the end of the input"))?;
            dst[op..op + lit].copy_from_slice(&src[ip..lit_end]);
            ip = lit_end;
            op += lit;
            if partial && op == out_len {
                return Ok(());
            }
            if ip == src.len() {
                // The last sequence is literals only.
                return if op == out_len {
                    Ok(())
                } else {
                    Err(err("output is shorter than expected"))
                };
            }
        }

        let off = src
            .get(ip..ip + 2)
            .ok_or_else(|| err("match offset runs past the end of the input"))?;
        let offset = usize::from(u16::from_le_bytes([off[0], off[1]]));
        ip += 2;
        if offset == 0 || offset > op {
            return Err(err("match offset points before the start of the output"));
        }
        let mut mlen = usize::from(token & 15);
        if mlen == 15 {
            mlen = read_length(src, &mut ip, mlen)?;
        }
        mlen += 4;
        if mlen <= 16 && offset >= 16 && op + 16 <= out_len {
            // Fast path for short, far matches: a fixed 16-byte copy from
            // before `op` (offset >= 16 keeps the source out of the way).
            let (head, tail) = dst.split_at_mut(op);
            let start = op - offset;
            tail[..16].copy_from_slice(&head[start..start + 16]);
            op += mlen;
            if partial && op == out_len {
                return Ok(());
            }
            continue;
        }
        let room = out_len - op;
        if mlen > room {
            if !partial {
                return Err(err("output is longer than expected"));
            }
            mlen = room;
        }
        copy_match(dst, op, offset, mlen);
        op += mlen;
        if partial && op == out_len {
            return Ok(());
        }
    }
}
