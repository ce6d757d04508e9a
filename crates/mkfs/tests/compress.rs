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
