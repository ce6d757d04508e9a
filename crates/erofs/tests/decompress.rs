//! The pcluster decompressors against real encoders: round trips, zero
//! padding, partial decoding, config records, and hostile input (which must
//! give errors, never panics).

use erofs::decompress::{
    parse_cfg, AlgConfig, Algorithm, Config, DecompressError, Decompressor, Lz4Config, LzmaConfig,
    ZstdConfig,
};
use erofs::Error;

const BLOCK: u32 = 4096;

/// Deterministic, compressible but not trivial data: words from a small
/// vocabulary with numbers, like logs or source text, plus a run of zeros
/// and a stretch of noise so every coding path is used.
fn sample(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "erofs", "pcluster", "inode", "block", "the", "of", "lz4", "read", "mount", "fn", "let",
        "0x", "{", "}", "\n", "    ", "return", "error", "=", ";",
    ];
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = next();
        match r % 50 {
            0 => out.extend(std::iter::repeat_n(0u8, (r >> 8) as usize % 300)),
            1 => out.extend((0..(r >> 8) % 64).map(|_| next() as u8)),
            _ => {
                out.extend_from_slice(WORDS[(r >> 8) as usize % WORDS.len()].as_bytes());
                if r & 0x100000 != 0 {
                    out.extend_from_slice(format!("{}", (r >> 24) % 1000).as_bytes());
                }
                out.push(b' ');
            }
        }
    }
    out.truncate(len);
    out
}

fn lz4(data: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress(data)
}

/// A real MicroLZMA stream: a raw LZMA1 stream with no end marker from
/// lzma-rust2's encoder (a port of XZ for Java), whose first byte (always
/// 0 in LZMA1) is replaced by the inverted properties byte, which is what
/// liblzma's `lzma_microlzma_encoder` does for mkfs.erofs.
fn microlzma_with(data: &[u8], lc: u32, lp: u32, pb: u32, dict_size: u32) -> Vec<u8> {
    use std::io::Write;
    let mut opts = lzma_rust2::LzmaOptions::with_preset(6);
    opts.dict_size = dict_size;
    opts.lc = lc;
    opts.lp = lp;
    opts.pb = pb;
    let mut w =
        lzma_rust2::LzmaWriter::new_no_header(Vec::new(), &opts, false).expect("lzma writer");
    w.write_all(data).expect("lzma write");
    let props = w.props();
    let mut out = w.finish().expect("lzma finish");
    assert_eq!(out[0], 0, "LZMA1 streams start with a zero byte");
    out[0] = !props;
    out
}

fn microlzma(data: &[u8]) -> Vec<u8> {
    microlzma_with(data, 3, 0, 2, 1 << 20)
}

fn deflate(data: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(data, 6)
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("zstd compress")
}

fn encode(alg: Algorithm, data: &[u8]) -> Vec<u8> {
    match alg {
        Algorithm::Lz4 => lz4(data),
        Algorithm::Lzma => microlzma(data),
        Algorithm::Deflate => deflate(data),
        Algorithm::Zstd => zstd(data),
    }
}

fn decompressor() -> Decompressor {
    Decompressor::new(Config::default(), BLOCK).expect("default config")
}

fn decode(
    d: &Decompressor,
    alg: Algorithm,
    src: &[u8],
    len: usize,
    partial: bool,
) -> Result<Vec<u8>, DecompressError> {
    let mut dst = vec![0xa5u8; len];
    d.decompress(alg, src, &mut dst, partial, true)?;
    Ok(dst)
}

/// Pad a stream to whole blocks with leading zeros, as mkfs.erofs lays out
/// pclusters under ZERO_PADDING.
fn zero_pad(stream: &[u8]) -> Vec<u8> {
    let total = stream.len().div_ceil(BLOCK as usize) * BLOCK as usize;
    let mut out = vec![0u8; total - stream.len()];
    out.extend_from_slice(stream);
    out
}

#[test]
fn algorithm_ids() {
    for alg in Algorithm::ALL {
        assert_eq!(Algorithm::try_from(alg.id()).expect("known id"), alg);
    }
    assert!(matches!(
        Algorithm::try_from(4),
        Err(Error::Incompatible(_))
    ));
    assert!(Algorithm::try_from(255).is_err());
}

#[test]
fn decompressor_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Decompressor>();
}

#[test]
fn round_trip_every_algorithm_and_size() {
    let d = decompressor();
    for alg in Algorithm::ALL {
        for (i, len) in [1usize, 5, 13, 100, 4096, 65536, 200_000]
            .into_iter()
            .enumerate()
        {
            let data = sample(len, i as u64 + 7);
            let stream = encode(alg, &data);
            let out = decode(&d, alg, &stream, len, false)
                .unwrap_or_else(|e| panic!("{alg} len {len}: {e}"));
            assert!(out == data, "{alg} len {len}: output differs");
            // The same with the zero padding of a stored pcluster.
            let out = decode(&d, alg, &zero_pad(&stream), len, false)
                .unwrap_or_else(|e| panic!("{alg} len {len} padded: {e}"));
            assert!(out == data, "{alg} len {len} padded: output differs");
        }
    }
}

#[test]
fn round_trip_zeros_and_noise() {
    let d = decompressor();
    let zeros = vec![0u8; 300_000];
    let mut x = 0x1234_5678_u32;
    let noise: Vec<u8> = (0..70_000)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect();
    for alg in Algorithm::ALL {
        for data in [&zeros, &noise] {
            let stream = encode(alg, data);
            if stream[0] == 0 {
                // A DEFLATE stream that opens with a stored block starts
                // with a zero byte, which the kernel (and so we) take for
                // zero padding: such pclusters cannot exist in an image.
                assert_eq!(alg, Algorithm::Deflate);
                assert!(decode(&d, alg, &stream, data.len(), false).is_err());
                continue;
            }
            let out = decode(&d, alg, &stream, data.len(), false)
                .unwrap_or_else(|e| panic!("{alg}: {e}"));
            assert!(&out == data, "{alg}: output differs");
        }
    }
}

#[test]
fn microlzma_all_property_combinations() {
    let d = decompressor();
    let data = sample(30_000, 99);
    for (lc, lp, pb) in [
        (0, 0, 0),
        (3, 0, 2),
        (0, 4, 4),
        (4, 0, 0),
        (1, 3, 1),
        (2, 2, 3),
    ] {
        let stream = microlzma_with(&data, lc, lp, pb, 1 << 16);
        let out = decode(&d, Algorithm::Lzma, &stream, data.len(), false)
            .unwrap_or_else(|e| panic!("lc {lc} lp {lp} pb {pb}: {e}"));
        assert!(out == data, "lc {lc} lp {lp} pb {pb}: output differs");
    }
    // lc + lp > 4 is refused, as the kernel's xz decoder refuses it.
    let stream = microlzma_with(&data, 4, 1, 2, 1 << 16);
    assert!(decode(&d, Algorithm::Lzma, &stream, data.len(), false).is_err());
}

#[test]
fn microlzma_distance_beyond_dictionary_is_refused() {
    // Two copies of the same noise 40 KiB apart: the encoder (64 KiB
    // dictionary) uses 40 KiB matches, which a 32 KiB cfg must refuse.
    let mut x = 7u32;
    let noise: Vec<u8> = (0..40_000)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect();
    let data = [noise.clone(), noise].concat();
    let stream = microlzma_with(&data, 3, 0, 2, 1 << 16);
    let mut cfg = Config::default();
    cfg.set(AlgConfig::Lzma(LzmaConfig { dict_size: 1 << 16 }));
    let wide = Decompressor::new(cfg, BLOCK).expect("config");
    assert!(
        decode(&wide, Algorithm::Lzma, &stream, data.len(), false).expect("64 KiB dict") == data
    );
    cfg.set(AlgConfig::Lzma(LzmaConfig { dict_size: 1 << 15 }));
    let narrow = Decompressor::new(cfg, BLOCK).expect("config");
    let e = decode(&narrow, Algorithm::Lzma, &stream, data.len(), false).expect_err("32 KiB dict");
    assert!(e.message().contains("distance"), "{e}");
}

#[test]
fn partial_decoding_gives_a_prefix() {
    let d = decompressor();
    let data = sample(100_000, 3);
    for alg in Algorithm::ALL {
        let stream = zero_pad(&encode(alg, &data));
        for len in [0usize, 1, 17, 4096, 65_537, 99_999, 100_000] {
            let out = decode(&d, alg, &stream, len, true)
                .unwrap_or_else(|e| panic!("{alg} prefix {len}: {e}"));
            assert!(out == data[..len], "{alg} prefix {len}: output differs");
        }
        // Partial still fails when the stream is shorter than dst.
        assert!(
            decode(&d, alg, &stream, 100_001, true).is_err(),
            "{alg}: longer than the stream"
        );
    }
}

#[test]
fn exact_mode_refuses_wrong_lengths() {
    let d = decompressor();
    let data = sample(50_000, 5);
    for alg in Algorithm::ALL {
        let stream = encode(alg, &data);
        for len in [0usize, 1, 49_999, 50_001, 60_000] {
            assert!(
                decode(&d, alg, &stream, len, false).is_err(),
                "{alg}: claimed {len} of 50000 accepted"
            );
        }
    }
}

#[test]
fn lz4_without_zero_padding_decodes_the_head_of_the_pcluster() {
    // Legacy LZ4 images keep the stream at the start of the block, with
    // whatever follows; the kernel decodes them partially.
    let d = decompressor();
    let data = sample(3000, 11);
    let mut src = lz4(&data);
    src.resize(BLOCK as usize, 0x5a);
    let mut dst = vec![0u8; data.len()];
    d.decompress(Algorithm::Lz4, &src, &mut dst, false, false)
        .expect("legacy lz4");
    assert_eq!(dst, data);
    // With ZERO_PADDING the same bytes are refused: the stream must end the pcluster.
    assert!(d
        .decompress(Algorithm::Lz4, &src, &mut dst, false, true)
        .is_err());
}

#[test]
fn zero_padding_must_end_in_the_first_block() {
    let d = decompressor();
    let data = sample(1000, 13);
    for alg in Algorithm::ALL {
        let stream = encode(alg, &data);
        // A whole block of zeros before the stream: the kernel refuses it.
        let mut src = vec![0u8; BLOCK as usize];
        src.extend_from_slice(&stream);
        assert!(
            decode(&d, alg, &src, data.len(), false).is_err(),
            "{alg}: zero block accepted"
        );
        // All zeros.
        assert!(
            decode(&d, alg, &[0u8; 8192], data.len(), false).is_err(),
            "{alg}: zeros accepted"
        );
        assert!(
            decode(&d, alg, &[], data.len(), true).is_err(),
            "{alg}: empty input accepted"
        );
    }
}

#[test]
fn truncated_streams_are_errors() {
    let d = decompressor();
    let data = sample(20_000, 17);
    for alg in Algorithm::ALL {
        let stream = encode(alg, &data);
        for cut in [1usize, 2, 5, 10, stream.len() / 2, stream.len() - 1] {
            let short = &stream[..stream.len() - cut];
            assert!(
                decode(&d, alg, short, data.len(), false).is_err(),
                "{alg}: cut {cut} accepted"
            );
            assert!(
                decode(&d, alg, short, data.len(), true).is_err(),
                "{alg}: cut {cut} accepted (partial)"
            );
        }
    }
}

#[test]
fn trailing_bytes_after_lz4_and_lzma_streams_are_errors() {
    let d = decompressor();
    let data = sample(20_000, 19);
    for alg in [Algorithm::Lz4, Algorithm::Lzma] {
        let mut stream = encode(alg, &data);
        stream.push(0x42);
        assert!(
            decode(&d, alg, &stream, data.len(), false).is_err(),
            "{alg}: trailing byte accepted"
        );
        // Partial decoding does not look at the rest.
        assert!(decode(&d, alg, &stream, data.len(), true).expect("partial") == data);
    }
}

#[test]
fn zstd_window_is_capped_by_the_config() {
    let data = sample(8192, 23);
    let stream = zstd(&data);
    let mut cfg = Config::default();
    cfg.set(AlgConfig::Zstd(ZstdConfig {
        max_window_size: 4096,
    }));
    let small = Decompressor::new(cfg, BLOCK).expect("config");
    let e = decode(&small, Algorithm::Zstd, &stream, data.len(), false)
        .expect_err("8 KiB window over 4 KiB");
    assert!(e.message().contains("window"), "{e}");
    assert!(
        decode(&decompressor(), Algorithm::Zstd, &stream, data.len(), false).expect("1 MiB")
            == data
    );

    // A frame with a 2 MiB window descriptor is over the kernel's 1 MiB cap.
    let mut c = zstd::bulk::Compressor::new(3).expect("compressor");
    c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(21))
        .expect("window log");
    c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
        .expect("no content size");
    let big = c.compress(&sample(3 << 20, 29)).expect("compress");
    assert!(decode(&decompressor(), Algorithm::Zstd, &big, 3 << 20, true).is_err());
}

#[test]
fn oversized_requests_are_refused() {
    let d = decompressor();
    let mut dst = vec![0u8; 12 * 1024 * 1024 + 1];
    assert!(d
        .decompress(Algorithm::Lz4, &[0x10, b'a'], &mut dst, true, true)
        .is_err());
    let src = vec![1u8; 1024 * 1024 + 1];
    assert!(d
        .decompress(Algorithm::Lz4, &src, &mut dst[..10], true, true)
        .is_err());
}

#[test]
fn lz4_offsets_before_the_output_are_errors() {
    let d = decompressor();
    // One literal 'a', then a match at offset 2 (only 1 byte exists).
    let bad = [0x10, b'a', 0x02, 0x00, 0x00];
    assert!(decode(&d, Algorithm::Lz4, &bad, 6, false).is_err());
    // Offset 0 is invalid too.
    let bad = [0x10, b'a', 0x00, 0x00, 0x00];
    assert!(decode(&d, Algorithm::Lz4, &bad, 6, false).is_err());
    // Offset 1 is fine: 'a' then 4 more 'a', then an empty last literal run.
    let good = [0x10, b'a', 0x01, 0x00, 0x00];
    assert_eq!(
        decode(&d, Algorithm::Lz4, &good, 5, false).expect("rle"),
        b"aaaaa"
    );
}

/// Flip, insert and delete bytes of valid streams: decoding must return,
/// never panic, and whatever it returns in exact mode must have the right
/// length (dst is fixed) — the fuzz target does this at scale.
#[test]
fn mutated_streams_never_panic() {
    let d = decompressor();
    let data = sample(6000, 31);
    let mut x = 0x9e37_79b9_u32;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for alg in Algorithm::ALL {
        let stream = zero_pad(&encode(alg, &data));
        for _ in 0..600 {
            let mut s = stream.clone();
            for _ in 0..1 + rnd() % 4 {
                let i = rnd() as usize % s.len();
                match rnd() % 3 {
                    0 => s[i] ^= 1 << (rnd() % 8),
                    1 => s[i] = rnd() as u8,
                    _ => {
                        s.remove(i);
                    }
                }
            }
            for partial in [false, true] {
                let _ = decode(&d, alg, &s, data.len(), partial);
                let _ = decode(&d, alg, &s, data.len() / 3, partial);
            }
        }
        // Pure garbage.
        for _ in 0..200 {
            let g: Vec<u8> = (0..1 + rnd() % 2000).map(|_| rnd() as u8).collect();
            let _ = decode(&d, alg, &g, 1 + rnd() as usize % 70_000, rnd() % 2 == 0);
        }
    }
}

#[test]
fn parse_cfg_validates_like_the_kernel() {
    // LZ4: max_distance, max_pclusterblks (0 reads as 1).
    let mut r = [0u8; 14];
    r[..4].copy_from_slice(&[0xff, 0xff, 0x00, 0x00]);
    assert_eq!(
        parse_cfg(Algorithm::Lz4, &r).expect("lz4"),
        AlgConfig::Lz4(Lz4Config {
            max_distance: 0xffff,
            max_pclusterblks: 1
        })
    );
    assert!(matches!(
        parse_cfg(Algorithm::Lz4, &r[..13]),
        Err(Error::Corrupt { .. })
    ));
    // LZ4 pclusters over 1 MiB are refused when the block size is known.
    let mut cfg = Config::default();
    cfg.set(AlgConfig::Lz4(Lz4Config {
        max_distance: 0,
        max_pclusterblks: 257,
    }));
    assert!(Decompressor::new(cfg, 4096).is_err());
    assert!(Decompressor::new(cfg, 512).is_ok());

    // LZMA: dict_size (4 KiB..=8 MiB), format 0.
    let lzma = |dict: u32, format: u16| {
        let mut r = [0u8; 14];
        r[..4].copy_from_slice(&dict.to_le_bytes());
        r[4..6].copy_from_slice(&format.to_le_bytes());
        parse_cfg(Algorithm::Lzma, &r)
    };
    assert_eq!(
        lzma(1 << 16, 0).expect("lzma"),
        AlgConfig::Lzma(LzmaConfig { dict_size: 1 << 16 })
    );
    assert!(lzma(8 << 20, 0).is_ok());
    assert!(matches!(
        lzma((8 << 20) + 1, 0),
        Err(Error::Incompatible(_))
    ));
    assert!(lzma(4095, 0).is_err());
    assert!(lzma(1 << 16, 1).is_err());
    assert!(parse_cfg(Algorithm::Lzma, &[0u8; 6]).is_err());

    // DEFLATE: windowbits <= 15.
    assert!(parse_cfg(Algorithm::Deflate, &[15, 0, 0, 0, 0, 0]).is_ok());
    assert!(parse_cfg(Algorithm::Deflate, &[16, 0, 0, 0, 0, 0]).is_err());
    assert!(parse_cfg(Algorithm::Deflate, &[15, 0, 0]).is_err());

    // Zstandard: format 0, windowlog + 10 <= 20.
    assert_eq!(
        parse_cfg(Algorithm::Zstd, &[0, 7, 0, 0, 0, 0]).expect("zstd"),
        AlgConfig::Zstd(ZstdConfig {
            max_window_size: 1 << 17
        })
    );
    assert!(parse_cfg(Algorithm::Zstd, &[0, 10, 0, 0, 0, 0]).is_ok());
    assert!(parse_cfg(Algorithm::Zstd, &[0, 11, 0, 0, 0, 0]).is_err());
    assert!(parse_cfg(Algorithm::Zstd, &[1, 7, 0, 0, 0, 0]).is_err());
}

#[test]
fn errors_convert_to_corrupt() {
    let d = decompressor();
    let e = decode(&d, Algorithm::Deflate, &[0xff; 16], 100, false).expect_err("garbage");
    assert_eq!(e.algorithm(), Algorithm::Deflate);
    let e: Error = e.into();
    assert!(matches!(e, Error::Corrupt { .. }));
    assert!(e.to_string().contains("deflate"), "{e}");
}

/// Pclusters written by mkfs.erofs 1.9.3 (liblzma's MicroLZMA encoder) in
/// the corpus's `lzma.erofs` (4 KiB blocks, `-zlzma -C65536`): first block,
/// blocks, decoded length, and where those decoded bytes sit in `tree.tar`
/// (the same tree). Found by decoding candidate pclusters and matching the
/// output against the tar; each decodes exactly, input and output.
const LZMA_EROFS_PCLUSTERS: &[(usize, usize, usize, usize)] = &[
    (66, 16, 95_812, 8_686_815),
    (82, 7, 44_253, 8_782_627),
    (265, 4, 38_665, 8_261_896),
    (352, 6, 70_000, 6_339_072),
    (386, 1, 5_000, 6_316_544),
    (543, 13, 171_280, 11_427_571),
    (558, 10, 131_079, 11_786_240),
    (589, 1, 8_191, 10_220_032),
];

fn corpus_file(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/images")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the shared corpus must sit beside the repo)",
            path.display()
        )
    })
}

#[test]
fn real_microlzma_pclusters_from_mkfs_erofs() {
    let img = corpus_file("lzma.erofs");
    let tar = corpus_file("tree.tar");
    // mkfs.erofs's default dictionary for -C65536 fits well within 8 MiB.
    let d = decompressor();
    for &(block, blocks, len, at) in LZMA_EROFS_PCLUSTERS {
        let src = &img[block * 4096..(block + blocks) * 4096];
        let want = &tar[at..at + len];
        let out = decode(&d, Algorithm::Lzma, src, len, false)
            .unwrap_or_else(|e| panic!("block {block}: {e}"));
        assert!(out == want, "block {block}: output differs from tree.tar");
        let out = decode(&d, Algorithm::Lzma, src, len / 2, true).expect("partial");
        assert!(
            out == want[..len / 2],
            "block {block}: partial output differs"
        );
        assert!(
            decode(&d, Algorithm::Lzma, src, len - 1, false).is_err(),
            "block {block}: short claim"
        );
        assert!(
            decode(&d, Algorithm::Lzma, src, len + 1, false).is_err(),
            "block {block}: long claim"
        );
    }
}
