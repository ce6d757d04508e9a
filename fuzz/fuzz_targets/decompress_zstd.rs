//! Fuzz the Zstd decoder alone (the input layout of decompress.rs, with
//! the algorithm fixed), so each decoder path gets the fuzzer's full time.
//!
//! Invariant: errors are fine; panics, hangs and unbounded memory are bugs.
#![no_main]

use erofs::decompress::Algorithm;
use libfuzzer_sys::fuzz_target;

#[path = "decompress_common.rs"]
mod common;

fuzz_target!(|data: &[u8]| common::run(data, Some(Algorithm::Zstd)));
