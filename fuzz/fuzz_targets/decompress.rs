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

use erofs::decompress::{AlgConfig, Algorithm, Config, Decompressor, LzmaConfig, ZstdConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let Some((len_bytes, rest)) = rest.split_at_checked(3) else {
        return;
    };
    let Some((&cfg_byte, src)) = rest.split_first() else {
        return;
    };

    let alg = Algorithm::ALL[usize::from(head & 3)];
    let partial = head & 4 != 0;
    let zero_padding = head & 8 != 0;
    let len = usize::from(len_bytes[0])
        | usize::from(len_bytes[1]) << 8
        | usize::from(len_bytes[2] & 0x0f) << 16;

    let mut config = Config::default();
    // 4 KiB .. 8 MiB dictionaries, 1 KiB .. 1 MiB windows.
    config.set(AlgConfig::Lzma(LzmaConfig {
        dict_size: 4096 << (cfg_byte & 15).min(11),
    }));
    config.set(AlgConfig::Zstd(ZstdConfig {
        max_window_size: 1024 << ((cfg_byte >> 4) % 11),
    }));
    let Ok(d) = Decompressor::new(config, 4096) else {
        return;
    };

    let mut dst = vec![0u8; len];
    let _ = d.decompress(alg, src, &mut dst, partial, zero_padding);
});
