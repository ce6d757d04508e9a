//! Images built from a directory: the kernel's view of each equals the
//! source tree, fsck.erofs accepts them, immount's reader agrees, and two
//! builds are byte-identical. Run as root (the kernel mounts the images).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root to mount");
        return true;
    }
    false
}

#[test]
fn plain_tree_matches_kernel_and_is_reproducible() {
    if skip() {
        return;
    }
    let src = corpus_tree();
    let work = tempfile::tempdir().unwrap();
    let opts = mkfs::Options::default();
    let a = build_and_check(src, &opts, work.path());
    let tree = mkfs::scan_dir(src).unwrap();
    let again = work.path().join("again.erofs");
    mkfs::build_image(&tree, &again, &opts).unwrap();
    assert!(a == std::fs::read(&again).unwrap(), "two builds differ");
}

#[test]
fn block_size_512_and_no_inline() {
    if skip() {
        return;
    }
    let src = corpus_tree();
    let work = tempfile::tempdir().unwrap();
    let opts = mkfs::Options {
        block_size: 512,
        ..Default::default()
    };
    build_and_check(src, &opts, work.path());
    let work = tempfile::tempdir().unwrap();
    let opts = mkfs::Options {
        inline_data: false,
        ..Default::default()
    };
    build_and_check(src, &opts, work.path());
}

#[test]
fn chunked_files() {
    if skip() {
        return;
    }
    let src = corpus_tree();
    for chunk in [4096u32, 65536] {
        let work = tempfile::tempdir().unwrap();
        let opts = mkfs::Options {
            chunk_size: Some(chunk),
            ..Default::default()
        };
        build_and_check(src, &opts, work.path());
    }
}
