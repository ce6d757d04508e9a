//! Zstandard frames, decoded by `ruzstd` (pure Rust).
//!
//! The frame header is checked first: a frame asking for a window larger
//! than the image's cfg record allows (at most 1 MiB) is refused, as the
//! kernel's decoder refuses it, so the decoder's own buffer stays within
//! that window plus one block (128 KiB). Blocks are decoded one at a time
//! and drained into `dst` at once. Each block consumes at least its 3-byte
//! header, so the loop is bounded by the input length.

use std::cell::RefCell;
use std::io::Read;

use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

use super::{Algorithm, DecompressError, ZstdConfig};

/// Magic number of a Zstandard frame.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

fn err(msg: impl Into<std::borrow::Cow<'static, str>>) -> DecompressError {
    DecompressError::new(Algorithm::Zstd, msg)
}

/// The window size a frame header asks for (RFC 8878, 3.1.1.1): the
/// window descriptor, or the content size for single-segment frames.
fn frame_window_size(src: &[u8]) -> Result<u64, DecompressError> {
    let magic = src
        .get(..4)
        .ok_or_else(|| err("input too short for a frame header"))?;
    if u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]) != ZSTD_MAGIC {
        return Err(err("not a zstd frame"));
    }
    let fhd = *src
        .get(4)
        .ok_or_else(|| err("input too short for a frame header"))?;
    let single_segment = fhd & 0x20 != 0;
    if !single_segment {
        let wd = *src
            .get(5)
            .ok_or_else(|| err("input too short for a frame header"))?;
        let log = 10 + u32::from(wd >> 3);
        let base = 1u64 << log;
        return Ok(base + (base / 8) * u64::from(wd & 7));
    }
    let dict_id_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_at = 5 + dict_id_len;
    let fcs_len = [1usize, 2, 4, 8][usize::from(fhd >> 6)];
    let fcs = src
        .get(fcs_at..fcs_at + fcs_len)
        .ok_or_else(|| err("input too short for a frame header"))?;
    let mut le = [0u8; 8];
    le[..fcs_len].copy_from_slice(fcs);
    let size = u64::from_le_bytes(le);
    // The 2-byte form is stored minus 256.
    Ok(if fcs_len == 2 { size + 256 } else { size })
}

/// Move whatever the decoder can give into `dst[*op..]`.
fn drain(dec: &mut FrameDecoder, dst: &mut [u8], op: &mut usize) -> Result<(), DecompressError> {
    while *op < dst.len() {
        let n = dec
            .read(&mut dst[*op..])
            .map_err(|e| err(format!("draining the decoder: {e}")))?;
        if n == 0 {
            break;
        }
        *op += n;
    }
    Ok(())
}

/// Decode the Zstandard frame at the start of `src` into `dst`; see
/// [`super::Decompressor::decompress`]. Bytes after the frame are ignored,
/// as the kernel ignores them.
pub(super) fn decompress(
    cfg: &ZstdConfig,
    src: &[u8],
    dst: &mut [u8],
    partial: bool,
) -> Result<(), DecompressError> {
    if partial && dst.is_empty() {
        return Ok(());
    }
    let window = frame_window_size(src)?;
    if window > u64::from(cfg.max_window_size) {
        return Err(err(format!(
            "frame window of {window} bytes is over the image's limit of {}",
            cfg.max_window_size
        )));
    }
    // The decoder keeps its buffers (window, tables) between frames; one
    // per thread spares an allocation and page faults per pcluster.
    DECODER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut dec) => decode_frame(&mut dec, src, dst, partial),
        // Only reentrancy could get here; a fresh decoder is still correct.
        Err(_) => decode_frame(&mut FrameDecoder::new(), src, dst, partial),
    })
}

thread_local! {
    static DECODER: RefCell<FrameDecoder> = RefCell::new(FrameDecoder::new());
}

fn decode_frame(
    dec: &mut FrameDecoder,
    src: &[u8],
    dst: &mut [u8],
    partial: bool,
) -> Result<(), DecompressError> {
    let mut input = src;
    dec.reset(&mut input)
        .map_err(|e| err(format!("frame header: {e}")))?;
    let mut op = 0usize;
    loop {
        let finished = dec
            .decode_blocks(&mut input, BlockDecodingStrategy::UptoBlocks(1))
            .map_err(|e| err(format!("after {op} bytes: {e}")))?;
        drain(dec, dst, &mut op)?;
        if op == dst.len() {
            if partial {
                return Ok(());
            }
            if dec.can_collect() > 0 {
                return Err(err("output is longer than expected"));
            }
            if finished {
                break;
            }
        } else if finished {
            return Err(err(format!("frame ends after {op} of {} bytes", dst.len())));
        }
    }
    if let (Some(stored), Some(computed)) =
        (dec.get_checksum_from_data(), dec.get_calculated_checksum())
    {
        if stored != computed {
            return Err(err("content checksum mismatch"));
        }
    }
    Ok(())
}
