//! Compressed images of the corpus tree, one per algorithm (with the
//! pcluster sizes of the corpus images): the kernel's view equals the
//! source, fsck.erofs accepts them (decompressing every pcluster), and
//! immount's reader agrees. Run as root.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use mkfs::{Algorithm, CompressOptions};

fn check(alg: Algorithm, level: Option<i32>, pcluster: u32) -> Vec<u8> {
    check_with(alg, level, pcluster, false)
}

fn check_with(alg: Algorithm, level: Option<i32>, pcluster: u32, ztail: bool) -> Vec<u8> {
    check_full(alg, level, pcluster, ztail, false)
}

fn check_full(
    alg: Algorithm,
    level: Option<i32>,
    pcluster: u32,
    ztail: bool,
    fragments: bool,
) -> Vec<u8> {
    let src = corpus_tree();
    let work = tempfile::tempdir().unwrap();
    let opts = mkfs::Options {
        compress: Some(CompressOptions {
            algorithm: alg,
            level,
            pcluster_size: pcluster,
            ztailpacking: ztail,
            fragments,
            dedupe: fragments,
        }),
        ..Default::default()
    };
    build_and_check(src, &opts, work.path())
}

#[test]
fn lz4() {
    if is_root() {
        let a = check(Algorithm::Lz4, None, 4096);
        let b = check(Algorithm::Lz4, None, 4096);
        assert!(a == b, "two compressed builds differ");
    }
}

#[test]
fn lz4hc_big_pclusters() {
    if is_root() {
        check(Algorithm::Lz4hc, Some(12), 65536);
    }
}

#[test]
fn lzma() {
    if is_root() {
        check(Algorithm::Lzma, None, 65536);
    }
}

#[test]
fn deflate() {
    if is_root() {
        check(Algorithm::Deflate, None, 32768);
    }
}

#[test]
fn zstd() {
    if is_root() {
        check(Algorithm::Zstd, None, 131072);
    }
}

#[test]
fn ztailpacking() {
    if is_root() {
        let plain = check(Algorithm::Lz4hc, None, 4096);
        let packed = check_with(Algorithm::Lz4hc, None, 4096, true);
        assert!(
            packed.len() < plain.len(),
            "tail packing saved nothing ({} vs {} bytes)",
            packed.len(),
            plain.len()
        );
        check_with(Algorithm::Lzma, None, 65536, true);
        check_with(Algorithm::Zstd, None, 16384, true);
    }
}

#[test]
fn fragments_and_dedupe() {
    if is_root() {
        let plain = check(Algorithm::Lz4hc, None, 32768);
        let frag = check_full(Algorithm::Lz4hc, None, 32768, false, true);
        assert!(
            frag.len() < plain.len(),
            "fragments saved nothing ({} vs {} bytes)",
            frag.len(),
            plain.len()
        );
        check_full(Algorithm::Lzma, None, 65536, false, true);
        check_full(Algorithm::Lz4, None, 4096, true, true);
    }
}

/// The Debian tree of ../shared/bench/make-rootfs.sh (path in
/// IMMOUNT_ROOTFS, default /work/bench/rootfs), with tail packing and with
/// fragments: the kernel's view equals the source. Slow, hence ignored:
/// `cargo test -p immount-mkfs --test compress -- --ignored`.
#[test]
#[ignore = "needs the Debian rootfs and a minute"]
fn debian_rootfs() {
    let root = std::env::var_os("IMMOUNT_ROOTFS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/work/bench/rootfs".into());
    assert!(is_root(), "needs root");
    assert!(root.is_dir(), "no rootfs at {}", root.display());
    for (ztail, fragments) in [(true, false), (false, true)] {
        let work = tempfile::tempdir().unwrap();
        let opts = mkfs::Options {
            compress: Some(CompressOptions {
                algorithm: Algorithm::Lz4hc,
                level: None,
                pcluster_size: 65536,
                ztailpacking: ztail,
                fragments,
                dedupe: fragments,
            }),
            ..Default::default()
        };
        build_and_check(&root, &opts, work.path());
    }
}

/// Deterministic test data: text-like (compressible) or noise.
fn test_bytes(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: [&[u8]; 8] = [
        b"erofs ",
        b"pcluster ",
        b"dedupe ",
        b"kernel ",
        b"block ",
        b"the ",
        b"of ",
        b"image\n",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        if text {
            out.extend_from_slice(words[(next() % 8) as usize]);
            out.extend_from_slice(format!("{} ", next() % 1000).as_bytes());
        } else {
            out.extend_from_slice(&next().to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A tree holding each file once, or `copies` times (whole copies in other
/// directories, plus a file sharing only the first 256 KiB of the big one).
fn dup_tree(root: &std::path::Path, copies: usize) {
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("big.txt", test_bytes(1, 700_000, true)),
        // Noise then text: raw blocks and compressed pclusters.
        ("mixed.bin", {
            let mut v = test_bytes(2, 40_000, false);
            v.extend_from_slice(&test_bytes(5, 60_000, true));
            v
        }),
        ("small.txt", test_bytes(3, 9_000, true)),
    ];
    for c in 0..copies {
        let dir = root.join(format!("copy{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in &files {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
    if copies > 1 {
        let mut head = files[0].1[..256 << 10].to_vec();
        head.extend_from_slice(&test_bytes(4, 100_000, true));
        std::fs::write(root.join("shared-head.txt"), head).unwrap();
    }
}

fn dedupe_build(src: &std::path::Path, alg: Algorithm, pcluster: u32, dedupe: bool) -> Vec<u8> {
    dedupe_build_with(src, alg, pcluster, dedupe, false, false)
}

fn dedupe_build_with(
    src: &std::path::Path,
    alg: Algorithm,
    pcluster: u32,
    dedupe: bool,
    ztailpacking: bool,
    fragments: bool,
) -> Vec<u8> {
    let work = tempfile::tempdir().unwrap();
    let opts = mkfs::Options {
        compress: Some(CompressOptions {
            algorithm: alg,
            level: None,
            pcluster_size: pcluster,
            ztailpacking,
            fragments,
            dedupe,
        }),
        ..Default::default()
    };
    build_and_check(src, &opts, work.path())
}

/// `-E dedupe` alone: identical pclusters are stored once. Three copies of
/// the files take barely more room than one (the extra inodes and
/// indexes), while without dedupe they take about three times the data;
/// every image is checked against the kernel, fsck.erofs and the reader.
#[test]
fn pcluster_dedupe() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (one, three) = (dir.path().join("one"), dir.path().join("three"));
    dup_tree(&one, 1);
    dup_tree(&three, 3);
    for (alg, pcluster) in [
        (Algorithm::Lz4hc, 4096),
        (Algorithm::Lz4hc, 65536),
        (Algorithm::Lzma, 65536),
        (Algorithm::Zstd, 16384),
    ] {
        let single = dedupe_build(&one, alg, pcluster, false).len();
        let plain = dedupe_build(&three, alg, pcluster, false).len();
        let deduped = dedupe_build(&three, alg, pcluster, true).len();
        // What the copies and the shared head would add without dedupe.
        let copies = plain - single;
        assert!(
            deduped < single + copies / 3,
            "{alg:?} -C{pcluster}: dedupe saved too little: {deduped} bytes, \
             one copy {single}, three copies {plain}"
        );
        // Deduplicated builds are reproducible too.
        assert!(dedupe_build(&three, alg, pcluster, true).len() == deduped);
    }
    // With tail packing and with fragments as well.
    let plain = dedupe_build_with(&three, Algorithm::Lz4hc, 65536, false, true, false).len();
    let deduped = dedupe_build_with(&three, Algorithm::Lz4hc, 65536, true, true, false).len();
    assert!(
        deduped < plain,
        "dedupe with tail packing: {deduped} vs {plain}"
    );
    let plain = dedupe_build_with(&three, Algorithm::Lz4hc, 65536, false, false, true).len();
    let deduped = dedupe_build_with(&three, Algorithm::Lz4hc, 65536, true, false, true).len();
    assert!(
        deduped < plain,
        "dedupe with fragments: {deduped} vs {plain}"
    );
}
