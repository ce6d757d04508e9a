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

/// --all-root with id offsets, a fixed time (-T), a given UUID and volume
/// name: the kernel shows exactly those, and only those, changes.
#[test]
fn ownership_time_and_uuid_options() {
    if skip() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let src = corpus_tree();
    let work = tempfile::tempdir().unwrap();
    let uuid = *b"0123456789abcdef";
    let opts = mkfs::Options {
        all_root: true,
        uid_offset: 100_000,
        gid_offset: 7,
        fixed_time: Some(1_234_567_890),
        uuid: Some(uuid),
        volume_name: b"vol".to_vec(),
        ..Default::default()
    };
    let tree = mkfs::scan_dir(src).unwrap();
    let img = work.path().join("o.erofs");
    mkfs::build_image(&tree, &img, &opts).unwrap();
    fsck(&img, true);
    let reader =
        erofs::Image::open(std::sync::Arc::new(std::fs::File::open(&img).unwrap())).unwrap();
    assert_eq!(reader.superblock().uuid, uuid);
    assert_eq!(&reader.superblock().volume_name[..4], b"vol\0");
    let mnt = Mount::new(&img, &work.path().join("mnt"));
    let mut seen = 0;
    let mut stack = vec![mnt.dir.clone()];
    while let Some(p) = stack.pop() {
        let st = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!((st.uid(), st.gid()), (100_000, 7), "{}", p.display());
        assert_eq!(
            (st.mtime(), st.mtime_nsec()),
            (1_234_567_890, 0),
            "{}",
            p.display()
        );
        seen += 1;
        if st.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    assert!(seen > 3000, "walked only {seen} entries");
    drop(mnt);

    // SOURCE_DATE_EPOCH clamps: newer times become the epoch, older stay.
    let clamp = 1_650_000_000;
    let opts = mkfs::Options {
        clamp_time: Some(clamp),
        ..Default::default()
    };
    mkfs::build_image(&tree, &img, &opts).unwrap();
    let mnt = Mount::new(&img, &work.path().join("mnt"));
    let new = std::fs::symlink_metadata(mnt.dir.join("meta/mtime-2200")).unwrap();
    assert_eq!(new.mtime(), clamp);
    let old = std::fs::symlink_metadata(mnt.dir.join("meta/mtime-1970")).unwrap();
    assert_eq!(old.mtime(), 0);
}
