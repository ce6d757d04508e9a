//! Images built from a directory: the kernel's view of each equals the
//! source tree, fsck.erofs accepts them, immount's reader agrees, and two
//! builds are byte-identical. Run as root (the kernel mounts the images).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

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

/// Build the corpus tree with long xattr prefixes (and the name filter when
/// `filter`), check kernel, fsck and reader, and return the image path.
/// Debian's fsck.erofs 1.5 predates long prefixes: only 1.9.3 checks these.
fn build_with_prefixes(
    work: &std::path::Path,
    filter: bool,
    compress: Option<mkfs::CompressOptions>,
) -> std::path::PathBuf {
    let src = corpus_tree();
    let opts = mkfs::Options {
        xattr_prefixes: vec![b"user.k".to_vec(), b"trusted.overlay.".to_vec()],
        xattr_name_filter: filter,
        compress,
        ..Default::default()
    };
    let tree = mkfs::scan_dir(src).unwrap();
    let img = work.join("x.erofs");
    mkfs::build_image(&tree, &img, &opts).unwrap();
    check_image(&img, &manifest(src), work, false);
    let bytes = std::fs::read(&img).unwrap();
    // The entries went through the long prefixes: no stored name repeats
    // the "overlay." of trusted.overlay.opaque.
    assert!(
        !bytes.windows(14).any(|w| w == b"overlay.opaque"),
        "trusted.overlay.opaque was not stored through its long prefix"
    );
    let reader = erofs::Image::open(std::sync::Arc::new(std::fs::File::open(&img).unwrap()))
        .expect("reader opens");
    let sb = reader.superblock();
    assert_eq!(sb.xattr_prefix_count, 2);
    assert!(sb.has_incompat(erofs::superblock::incompat::XATTR_PREFIXES));
    assert_eq!(
        sb.has_compat(erofs::superblock::compat::XATTR_FILTER),
        filter,
        "xattr filter feature bit"
    );
    img
}

#[test]
fn long_xattr_prefixes() {
    if skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    build_with_prefixes(work.path(), false, None);
    // With fragments the image has a packed inode; the prefix table stays
    // on the device and the kernel must still find it there.
    let work = tempfile::tempdir().unwrap();
    build_with_prefixes(
        work.path(),
        false,
        Some(mkfs::CompressOptions {
            algorithm: mkfs::Algorithm::Lz4hc,
            level: None,
            pcluster_size: 16384,
            ztailpacking: false,
            fragments: true,
            dedupe: false,
        }),
    );
}

/// With the name filter, every present xattr is still found (the manifest
/// compares them all), and an absent name answers ENODATA through the kernel
/// and None through our reader, both for a name whose filter bit is set
/// (the kernel stops at the filter) and one whose bit is clear (it scans).
#[test]
fn xattr_name_filter() {
    if skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = build_with_prefixes(work.path(), true, None);
    let reader =
        erofs::Image::open(std::sync::Arc::new(std::fs::File::open(&img).unwrap())).unwrap();
    let mnt = Mount::new(&img, &work.path().join("mnt"));
    for rel in ["xattr/shared-00", "xattr/many", "xattr/small"] {
        let path = mnt.dir.join(rel);
        let names = xattr::list(&path);
        assert!(!names.is_empty(), "{rel} has no xattrs");
        let mut present_bits = 0u32;
        for name in &names {
            let (base, rest) = if let Some(r) = name.strip_prefix(b"user.") {
                (1, r)
            } else if let Some(r) = name.strip_prefix(b"trusted.") {
                (4, r)
            } else {
                panic!("{rel}: unexpected xattr {}", String::from_utf8_lossy(name));
            };
            present_bits |= 1 << mkfs::xattr::filter_bit(rest, base);
        }
        // One absent name whose bit no present name has, one whose bit one has.
        let mut with_bit_clear = None;
        let mut with_bit_shared = None;
        for n in 0..10_000 {
            let suffix = format!("absent{n}");
            let bit = mkfs::xattr::filter_bit(suffix.as_bytes(), 1);
            let slot = if present_bits & (1 << bit) != 0 {
                &mut with_bit_shared
            } else {
                &mut with_bit_clear
            };
            slot.get_or_insert(format!("user.{suffix}"));
            if with_bit_clear.is_some() && with_bit_shared.is_some() {
                break;
            }
        }
        let inode = reader.resolve(format!("/{rel}").as_bytes()).unwrap();
        for name in [with_bit_clear.unwrap(), with_bit_shared.unwrap()] {
            let mut buf = [0u8; 64];
            let got = rustix::fs::lgetxattr(&path, name.as_str(), &mut buf);
            assert_eq!(got, Err(rustix::io::Errno::NODATA), "{rel}: {name}");
            assert_eq!(
                reader.get_xattr(&inode, name.as_bytes()).unwrap(),
                None,
                "{rel}: {name} through the reader"
            );
        }
        for name in &names {
            let want = xattr::get(&path, name);
            assert_eq!(
                reader.get_xattr(&inode, name).unwrap(),
                Some(want),
                "{rel}: {} through the reader",
                String::from_utf8_lossy(name)
            );
        }
    }
}

/// The Debian tree of ../shared/bench/make-rootfs.sh, named by
/// IMMOUNT_BENCH_ROOTFS: uncompressed, with each algorithm, with tail packing
/// and with fragments, the kernel's view equals the tree (nothing in it is
/// beyond what EROFS stores, so there are no exceptions), fsck.erofs accepts
/// and immount's reader agrees; two uncompressed builds are byte-identical.
/// Slow, hence ignored; `scripts/debian-tree-test.sh` makes the tree and
/// runs it.
#[test]
#[ignore = "needs the Debian tree in IMMOUNT_BENCH_ROOTFS and minutes: scripts/debian-tree-test.sh"]
fn debian_tree() {
    use mkfs::{Algorithm, CompressOptions};
    let root = std::env::var_os("IMMOUNT_BENCH_ROOTFS")
        .map(std::path::PathBuf::from)
        .expect("IMMOUNT_BENCH_ROOTFS names the tree of make-rootfs.sh");
    assert!(is_root(), "needs root to mount");
    assert!(
        root.join("etc/debian_version").is_file(),
        "{} is not a Debian tree",
        root.display()
    );
    let want = manifest(&root);
    let tree = mkfs::scan_dir(&root).unwrap();
    let z = |algorithm, pcluster_size, ztailpacking, fragments| {
        Some(CompressOptions {
            algorithm,
            level: None,
            pcluster_size,
            ztailpacking,
            fragments,
            dedupe: fragments,
        })
    };
    let configs = [
        ("plain", None),
        ("lz4", z(Algorithm::Lz4, 4096, false, false)),
        ("lz4hc-ztail", z(Algorithm::Lz4hc, 65536, true, false)),
        ("lz4hc-fragments", z(Algorithm::Lz4hc, 65536, false, true)),
        ("lzma", z(Algorithm::Lzma, 65536, false, false)),
        ("deflate", z(Algorithm::Deflate, 65536, false, false)),
        ("zstd", z(Algorithm::Zstd, 65536, false, false)),
    ];
    for (name, compress) in configs {
        let started = std::time::Instant::now();
        let work = tempfile::tempdir().unwrap();
        // Debian's fsck.erofs 1.5 knows 4 KiB blocks, LZ4 and LZMA without
        // fragments; 1.9.3 checks everything when it is there.
        let debian = compress.as_ref().is_none_or(|c| {
            matches!(
                c.algorithm,
                Algorithm::Lz4 | Algorithm::Lz4hc | Algorithm::Lzma
            ) && !c.fragments
        });
        let opts = mkfs::Options {
            compress,
            ..Default::default()
        };
        let img = work.path().join(format!("{name}.erofs"));
        mkfs::build_image(&tree, &img, &opts).unwrap();
        check_image(&img, &want, work.path(), debian);
        if name == "plain" {
            let again = work.path().join("again.erofs");
            mkfs::build_image(&tree, &again, &opts).unwrap();
            assert!(
                std::fs::read(&img).unwrap() == std::fs::read(&again).unwrap(),
                "two builds of the Debian tree differ"
            );
        }
        eprintln!(
            "debian_tree {name}: {} bytes, checked in {:.1}s",
            std::fs::metadata(&img).unwrap().len(),
            started.elapsed().as_secs_f64()
        );
    }
}
