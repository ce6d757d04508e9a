//! LZMA pclusters as mkfs.erofs makes them: liblzma's MicroLZMA encoder
//! fills each pcluster in one pass (through `immount_sys::microlzma`), with
//! the same preset levels and dictionary size.

use immount_sys::microlzma;

use crate::error::{Error, Result};

/// mkfs.erofs's default level (xz's default preset).
pub(crate) const DEFAULT_LEVEL: i32 = 6;

/// The dictionary for pclusters of at most `pcluster_size` bytes, as
/// mkfs.erofs chooses it: four pclusters' worth, at least 32 KiB and at
/// most the kernel's 8 MiB. A pcluster's input rarely reaches further
/// back, and the kernel allocates a dictionary of this size per stream.
pub(crate) fn dict_size(pcluster_size: u32) -> u32 {
    pcluster_size
        .saturating_mul(4)
        .clamp(32 << 10, microlzma::MAX_DICT_SIZE)
}

/// The xz preset for a `-zlzma,level=N`: N in 0..=9 is that preset, N in
/// 100..=109 the "extreme" variant of preset N-100, a negative N the
/// default (mkfs.erofs's meanings). `None` for anything else.
pub(crate) fn preset(level: i32) -> Option<(u32, bool)> {
    match level {
        ..0 => Some((DEFAULT_LEVEL as u32, false)),
        0..=9 => Some((level as u32, false)),
        100..=109 => Some(((level - 100) as u32, true)),
        _ => None,
    }
}

/// The error for a level [`preset`] refuses.
pub(crate) fn bad_level(level: i32) -> Error {
    Error::Option(format!(
        "lzma level {level} is not 0..=9 (or 100..=109 for the extreme variant)"
    ))
}

/// A per-thread MicroLZMA encoder for one level and pcluster size.
#[derive(Debug)]
pub(crate) struct LzmaEncoder(microlzma::Encoder);

impl LzmaEncoder {
    pub(crate) fn new(level: i32, pcluster_size: u32) -> Result<LzmaEncoder> {
        let (preset, extreme) = preset(level).ok_or_else(|| bad_level(level))?;
        let enc = microlzma::Encoder::new(microlzma::Options {
            preset,
            extreme,
            dict_size: dict_size(pcluster_size),
        })
        .map_err(|e| Error::Option(e.to_string()))?;
        Ok(LzmaEncoder(enc))
    }

    /// The longest prefix of `src` whose stream fits in `cap` bytes:
    /// (consumed, stream); `None` when not even one byte of input fits.
    pub(crate) fn fill(&mut self, src: &[u8], cap: usize) -> Result<Option<(usize, Vec<u8>)>> {
        if src.is_empty() || cap < microlzma::MIN_DST {
            return Ok(None);
        }
        let (n, out) = self
            .0
            .fill(src, cap)
            .map_err(|e| Error::input(format!("compressing a pcluster: {e}")))?;
        Ok((n > 0).then_some((n, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use erofs::decompress::{Algorithm, Config, Decompressor, LzmaConfig};

    /// Decode a stream the way the reader does for a pcluster of `pcluster`
    /// bytes at most (dictionary from the config record), expecting
    /// exactly `len` bytes.
    fn decode(stream: &[u8], len: usize, pcluster: u32) -> Vec<u8> {
        let config = Config {
            lzma: LzmaConfig {
                dict_size: dict_size(pcluster),
            },
            ..Config::default()
        };
        let d = Decompressor::new(config, 4096).unwrap();
        let mut out = vec![0u8; len];
        d.decompress(Algorithm::Lzma, stream, &mut out, false, true)
            .unwrap();
        out
    }

    fn xorshift(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Text-like data: words from a small vocabulary in a random order,
    /// compressible about 3-4x like a root filesystem.
    fn words(n: usize, seed: u64) -> Vec<u8> {
        const VOCAB: [&str; 16] = [
            "pcluster ",
            "lcluster ",
            "inode ",
            "erofs ",
            "the ",
            "kernel ",
            "of ",
            "and\n",
            "dictionary ",
            "map ",
            "0x1f ",
            "block ",
            "zero ",
            "tail ",
            "#include ",
            "{ }\n",
        ];
        let r = xorshift(n, seed);
        let mut out = Vec::with_capacity(n + 16);
        let mut i = 0;
        while out.len() < n {
            out.extend_from_slice(VOCAB[usize::from(r[i % n] & 15)].as_bytes());
            out.push(r[(i * 7 + 3) % n]);
            i += 1;
        }
        out.truncate(n);
        out
    }

    #[test]
    fn fills_cap_and_decodes_to_the_consumed_prefix() {
        let inputs: [(&str, Vec<u8>); 4] = [
            ("random", xorshift(1 << 20, 0x9e37_79b9_7f4a_7c15)),
            ("words", words(1 << 20, 7)),
            ("zeros", vec![0u8; 1 << 20]),
            ("short words", words(10_000, 3)),
        ];
        for pcluster in [4096u32, 16384, 65536, 1 << 20] {
            let mut enc = LzmaEncoder::new(DEFAULT_LEVEL, pcluster).unwrap();
            for (name, src) in &inputs {
                let cap = pcluster as usize;
                let (n, c) = enc.fill(src, cap).unwrap().unwrap();
                assert!(n > 0 && n <= src.len(), "{name} at {cap}: consumed {n}");
                assert!(c.len() <= cap, "{name} at {cap}: {} bytes", c.len());
                assert_ne!(c[0], 0, "{name}: a leading 0 reads as padding");
                assert_eq!(
                    decode(&c, n, pcluster),
                    src[..n],
                    "{name} at {cap}: not the consumed prefix"
                );
                if n < src.len() {
                    // One pass fills the pcluster: what is left is less
                    // than the longest LZMA symbol plus the range coder's
                    // flush, so no more input would have fitted.
                    assert!(
                        c.len() + 64 >= cap,
                        "{name} at {cap}: only {} of {cap} bytes used for {n} bytes",
                        c.len()
                    );
                }
                if *name == "random" {
                    assert!(n < cap, "{name}: {n} incompressible bytes in {cap}");
                }
                if *name == "zeros" {
                    assert_eq!(n, src.len(), "1 MiB of zeros fits in {cap}");
                }
            }
        }
    }

    #[test]
    fn reproducible_whatever_came_before() {
        let a = words(300_000, 11);
        let b = xorshift(300_000, 5);
        let fresh = LzmaEncoder::new(DEFAULT_LEVEL, 65536)
            .unwrap()
            .fill(&a, 65536)
            .unwrap();
        let mut used = LzmaEncoder::new(DEFAULT_LEVEL, 65536).unwrap();
        used.fill(&b, 65536).unwrap();
        used.fill(&a[1000..], 4096).unwrap();
        assert_eq!(used.fill(&a, 65536).unwrap(), fresh);
    }

    #[test]
    fn levels_as_mkfs_erofs() {
        assert_eq!(preset(-1), Some((6, false)));
        assert_eq!(preset(0), Some((0, false)));
        assert_eq!(preset(9), Some((9, false)));
        assert_eq!(preset(100), Some((0, true)));
        assert_eq!(preset(109), Some((9, true)));
        for bad in [10, 50, 99, 110, i32::MAX] {
            assert_eq!(preset(bad), None);
            assert!(LzmaEncoder::new(bad, 65536).is_err());
        }
        // Each level encodes and decodes; the extreme variant and a higher
        // preset do not come out larger than preset 0 on text.
        let src = words(200_000, 1);
        let mut sizes = Vec::new();
        for level in [0, 6, 109] {
            let mut enc = LzmaEncoder::new(level, 1 << 20).unwrap();
            let (n, c) = enc.fill(&src, 1 << 20).unwrap().unwrap();
            assert_eq!(n, src.len());
            assert_eq!(decode(&c, n, 1 << 20), src);
            sizes.push(c.len());
        }
        assert!(sizes[1] <= sizes[0] && sizes[2] <= sizes[0], "{sizes:?}");
    }

    #[test]
    fn dictionary_as_mkfs_erofs() {
        assert_eq!(dict_size(4096), 32 << 10);
        assert_eq!(dict_size(65536), 256 << 10);
        assert_eq!(dict_size(1 << 20), 4 << 20);
        assert_eq!(dict_size(u32::MAX), 8 << 20);
    }
}
