//! The one body of every decompressor fuzz target (see decompress.rs for
//! the input layout); each per-algorithm target fixes the algorithm.

use erofs::decompress::{AlgConfig, Algorithm, Config, Decompressor, LzmaConfig, ZstdConfig};

/// Decode `data` as described in decompress.rs; `fixed` overrides the
/// algorithm that byte 0 would pick.
pub fn run(data: &[u8], fixed: Option<Algorithm>) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let Some((len_bytes, rest)) = rest.split_at_checked(3) else {
        return;
    };
    let Some((&cfg_byte, src)) = rest.split_first() else {
        return;
    };

    let alg = fixed.unwrap_or(Algorithm::ALL[usize::from(head & 3)]);
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
}
