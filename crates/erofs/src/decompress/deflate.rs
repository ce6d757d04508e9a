//! Raw DEFLATE (RFC 1951, no zlib header), decoded by `miniz_oxide`.
//!
//! The whole `dst` is handed over as a non-wrapping window, so back
//! references reach into what was already decoded and nothing else is
//! allocated but the decoder state (about 11 KiB). Like the kernel, the
//! full 32 KiB window is accepted whatever the cfg record's windowbits say.

use miniz_oxide::inflate::core::inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
use miniz_oxide::inflate::core::{decompress as inflate, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::{Algorithm, DecompressError};

fn err(msg: impl Into<std::borrow::Cow<'static, str>>) -> DecompressError {
    DecompressError::new(Algorithm::Deflate, msg)
}

/// Decode the raw DEFLATE stream `src` into `dst`; see [`super::Decompressor::decompress`].
pub(super) fn decompress(src: &[u8], dst: &mut [u8], partial: bool) -> Result<(), DecompressError> {
    if partial && dst.is_empty() {
        return Ok(());
    }
    // Boxed: the state is too big to want on a FUSE worker's stack.
    let mut state = Box::<DecompressorOxide>::default();
    // Without TINFL_FLAG_HAS_MORE_INPUT a truncated stream fails instead of
    // asking for more.
    let (status, _read, written) = inflate(
        &mut state,
        src,
        dst,
        0,
        TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    match status {
        TINFLStatus::Done if written == dst.len() => Ok(()),
        TINFLStatus::Done => Err(err(format!(
            "stream ends after {written} of {} bytes",
            dst.len()
        ))),
        TINFLStatus::HasMoreOutput if partial && written == dst.len() => Ok(()),
        TINFLStatus::HasMoreOutput => Err(err("output is longer than expected")),
        TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => Err(err(format!(
            "input ends after {written} of {} bytes",
            dst.len()
        ))),
        other => Err(err(format!(
            "malformed stream ({other:?}) after {written} bytes"
        ))),
    }
}
