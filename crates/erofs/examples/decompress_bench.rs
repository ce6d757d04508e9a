//! Decode throughput of the pcluster decompressors, with a peer decoder of
//! the same format timed in the same run for each (a ratio, not a verdict:
//! the machine is shared).
//!
//! `cargo run --release -p erofs --example decompress_bench [FILE] [PCLUSTER_KIB]`
//!
//! FILE defaults to the corpus's tree.tar (text, zeros, noise, duplicates:
//! what images hold); it is cut into pieces of PCLUSTER_KIB (default 64)
//! decoded bytes, each compressed on its own like a pcluster, and all are
//! decoded repeatedly. MB/s counts decoded bytes.

use std::hint::black_box;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use erofs::decompress::{Algorithm, Config, Decompressor};

const DEFAULT_INPUT: &str = "../shared/corpus/images/tree.tar";

/// Run `f` over all pieces until at least a second has passed; MB/s.
fn measure(total: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let start = Instant::now();
    let mut rounds = 0u32;
    while start.elapsed() < Duration::from_secs(1) {
        f();
        rounds += 1;
    }
    (total as f64 * f64::from(rounds)) / start.elapsed().as_secs_f64() / 1e6
}

fn microlzma(data: &[u8]) -> (Vec<u8>, u8) {
    let mut opts = lzma_rust2::LzmaOptions::with_preset(6);
    opts.dict_size = 1 << 20;
    let mut w = lzma_rust2::LzmaWriter::new_no_header(Vec::new(), &opts, false).expect("lzma");
    w.write_all(data).expect("lzma write");
    let props = w.props();
    let mut out = w.finish().expect("lzma finish");
    out[0] = !props;
    (out, props)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| {
        // Relative to the workspace root or to this crate.
        for p in [
            DEFAULT_INPUT,
            "../../../shared/corpus/images/tree.tar",
            "/work/shared/corpus/images/tree.tar",
        ] {
            if std::path::Path::new(p).exists() {
                return p.to_string();
            }
        }
        DEFAULT_INPUT.to_string()
    });
    let piece: usize = args.next().map_or(64, |s| s.parse().expect("PCLUSTER_KIB")) * 1024;
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let pieces: Vec<&[u8]> = data.chunks(piece).collect();
    let total = data.len();
    println!(
        "input {path}: {} bytes in {} pieces of {} KiB",
        total,
        pieces.len(),
        piece / 1024
    );

    let d = Decompressor::new(Config::default(), 4096).expect("config");
    let mut dst = vec![0u8; piece];

    // Each algorithm: encode every piece, check one decode, then time ours
    // and a peer.
    for alg in Algorithm::ALL {
        let mut lzma_props = Vec::new();
        let streams: Vec<Vec<u8>> = pieces
            .iter()
            .map(|p| match alg {
                Algorithm::Lz4 => lz4_flex::block::compress(p),
                Algorithm::Lzma => {
                    let (s, props) = microlzma(p);
                    lzma_props.push(props);
                    s
                }
                Algorithm::Deflate => miniz_oxide::deflate::compress_to_vec(p, 6),
                Algorithm::Zstd => zstd::bulk::compress(p, 3).expect("zstd"),
            })
            .collect();
        let packed: usize = streams.iter().map(Vec::len).sum();
        for (s, p) in streams.iter().zip(&pieces) {
            let out = &mut dst[..p.len()];
            // Streams starting with 0 cannot be stored zero-padded (see the
            // tests); skip verifying them, they are timed the same.
            if s[0] != 0 {
                d.decompress(alg, s, out, false, true).expect("decode");
                assert!(out == *p, "{alg}: round trip differs");
            }
        }
        let ours = measure(total, || {
            for (s, p) in streams.iter().zip(&pieces) {
                let _ = black_box(d.decompress(alg, s, &mut dst[..p.len()], false, true));
            }
        });
        let (peer_name, peer) = match alg {
            Algorithm::Lz4 => (
                "lz4_flex",
                measure(total, || {
                    for (s, p) in streams.iter().zip(&pieces) {
                        let _ = black_box(lz4_flex::block::decompress_into(s, &mut dst[..p.len()]));
                    }
                }),
            ),
            Algorithm::Lzma => (
                "lzma-rust2",
                measure(total, || {
                    for ((s, p), &props) in streams.iter().zip(&pieces).zip(&lzma_props) {
                        // Back to plain LZMA1: the first byte is 0.
                        let head = [0u8];
                        let reader = head.as_slice().chain(&s[1..]);
                        let mut r = lzma_rust2::LzmaReader::new_with_props(
                            reader,
                            p.len() as u64,
                            props,
                            1 << 20,
                            None,
                        )
                        .expect("lzma-rust2");
                        let _ = black_box(r.read_exact(&mut dst[..p.len()]));
                    }
                }),
            ),
            Algorithm::Deflate => (
                "miniz_oxide direct",
                measure(total, || {
                    for (s, p) in streams.iter().zip(&pieces) {
                        let _ = black_box(miniz_oxide::inflate::decompress_slice_iter_to_slice(
                            &mut dst[..p.len()],
                            std::iter::once(s.as_slice()),
                            false,
                            true,
                        ));
                    }
                }),
            ),
            Algorithm::Zstd => (
                "zstd (C, libzstd)",
                measure(total, || {
                    let mut z = zstd::bulk::Decompressor::new().expect("zstd");
                    for (s, p) in streams.iter().zip(&pieces) {
                        let _ = black_box(z.decompress_to_buffer(s, &mut dst[..p.len()]));
                    }
                }),
            ),
        };
        println!(
            "{:8} ratio {:5.2}  ours {:8.1} MB/s   {:20} {:8.1} MB/s   ours/peer {:.2}",
            alg.name(),
            total as f64 / packed as f64,
            ours,
            peer_name,
            peer,
            ours / peer
        );
    }
}
