//! Fuzz the pcluster decompressors with arbitrary streams.
//!
//! Invariant: errors are fine; panics, hangs and unbounded memory are bugs.
//! Output must stay inside `dst` (the decoders cannot write elsewhere in
//! safe Rust, but a length bug would show up as a panic here).
//!
//! Input layout: byte 0 picks the algorithm (low 2 bits), partial mode
//! (bit 2) and ZERO_PADDING (bit 3); bytes 1..4 give the decoded length
//! (little-endian, capped at 1 MiB to keep runs fast; the decoders' own cap
//! is 12 MiB); byte 4 picks a small config (LZMA dictionary from the low
//! nibble, Zstandard window from the high one); the rest is the pcluster.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "decompress_common.rs"]
mod common;

fuzz_target!(|data: &[u8]| common::run(data, None));
