//! The reader's API on corpus images: directory offsets that resume
//! exactly, lookups by binary search that find every name and no other,
//! path resolution, and reads at every alignment agreeing with each other.

use std::path::PathBuf;
use std::sync::Arc;

use erofs::{Error, FileType, Image};

fn corpus(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/images")
        .join(name);
    assert!(p.exists(), "corpus image {} missing", p.display());
    p
}

fn open(name: &str) -> Image {
    Image::open(Arc::new(
        std::fs::File::open(corpus(&format!("{name}.erofs"))).unwrap(),
    ))
    .unwrap()
}

#[test]
fn readdir_resumes_from_every_offset() {
    for name in ["plain", "bs512", "dotomit", "zdir", "metabox"] {
        let image = open(name);
        let dir = image.resolve(b"/bigdir").unwrap();
        let mut all = Vec::new();
        image
            .read_dir(&dir, 0, &mut |e| {
                all.push(e.clone());
                true
            })
            .unwrap();
        assert_eq!(all.len(), 3002, "{name}: 3000 files, '.' and '..'");
        assert_eq!(all[0].name, b".", "{name}");
        assert_eq!(all[0].nid, dir.nid, "{name}: '.' is the directory itself");
        let offsets: std::collections::HashSet<u64> = all.iter().map(|e| e.next_offset).collect();
        assert_eq!(offsets.len(), all.len(), "{name}: offsets are unique");
        // Resuming after entry i yields exactly entries i+1.. (checked on a
        // sample of positions, including every block boundary region).
        for i in (0..all.len()).step_by(37).chain([all.len() - 1]) {
            let mut rest = Vec::new();
            image
                .read_dir(&dir, all[i].next_offset, &mut |e| {
                    rest.push(e.name.clone());
                    rest.len() < 5
                })
                .unwrap();
            let want: Vec<Vec<u8>> = all[i + 1..]
                .iter()
                .take(5)
                .map(|e| e.name.clone())
                .collect();
            assert_eq!(rest, want, "{name}: resume after entry {i}");
        }
    }
}

#[test]
fn lookup_finds_every_name_and_nothing_else() {
    for name in ["plain", "bs512", "lz4", "zdir", "dotomit"] {
        let image = open(name);
        let dir = image.resolve(b"/bigdir").unwrap();
        let entries = image.entries(&dir).unwrap();
        for e in &entries {
            let found = image.lookup(&dir, &e.name).unwrap().expect("present");
            assert_eq!(
                found.nid,
                e.nid,
                "{name}: {:?}",
                String::from_utf8_lossy(&e.name)
            );
            // Names just before and after in byte order are absent.
            let mut after = e.name.clone();
            after.push(b'!');
            assert!(image.lookup(&dir, &after).unwrap().is_none());
            let mut before = e.name.clone();
            before.pop();
            if !before.is_empty() && !entries.iter().any(|x| x.name == before) {
                assert!(image.lookup(&dir, &before).unwrap().is_none());
            }
        }
        for absent in [&b"0"[..], b"e", b"zzzz", b"\xff", b"e00000y"] {
            assert!(image.lookup(&dir, absent).unwrap().is_none(), "{name}");
        }
    }
}

#[test]
fn resolve_paths() {
    let image = open("plain");
    assert_eq!(image.resolve(b"/").unwrap().nid, image.root_nid());
    let leaf = image.resolve(b"/deep/d0/d1/../d1/./d2").unwrap();
    assert!(leaf.is_dir());
    assert!(matches!(image.resolve(b"/nope"), Err(Error::NotFound(_))));
    assert!(matches!(
        image.resolve(b"/links/hard-a/x"),
        Err(Error::NotADirectory(_))
    ));
    let link = image.resolve(b"/links/self-dir").unwrap();
    assert_eq!(link.file_type(), FileType::Symlink);
    assert_eq!(image.read_link(&link).unwrap(), b".");
    let a = image.resolve(b"/links/hard-a").unwrap();
    let c = image.resolve(b"/sizes/hard-c").unwrap();
    assert_eq!(a.nid, c.nid, "hard links share a nid");
    assert_eq!(a.nlink, 3);
}

#[test]
fn reads_at_any_offset_and_length_agree() {
    for name in [
        "plain",
        "chunk",
        "lz4hc-big",
        "lzma",
        "ztail",
        "fragments",
        "dedupe",
        "48bit-lz4hc",
    ] {
        let image = open(name);
        for path in [
            &b"/big/mixed-512k"[..],
            b"/sizes/text-131079",
            b"/dup/tail-2",
        ] {
            let inode = image.resolve(path).unwrap();
            let mut whole = vec![0u8; inode.size as usize];
            assert_eq!(image.read(&inode, 0, &mut whole).unwrap(), whole.len());
            for (off, len) in [
                (0u64, 1usize),
                (1, 4095),
                (4095, 2),
                (4096, 4096),
                (65535, 3),
                (12345, 70000),
            ] {
                if off >= inode.size {
                    continue;
                }
                let mut buf = vec![0u8; len];
                let n = image.read(&inode, off, &mut buf).unwrap();
                let end = (off as usize + len).min(whole.len());
                assert_eq!(n, end - off as usize);
                assert_eq!(
                    &buf[..n],
                    &whole[off as usize..end],
                    "{name} {path:?} at {off}+{len}"
                );
            }
            let mut past = [0u8; 8];
            assert_eq!(image.read(&inode, inode.size, &mut past).unwrap(), 0);
        }
    }
}

#[test]
fn xattrs_long_prefixes_and_filter() {
    for name in ["plain", "xprefix", "metabox"] {
        let image = open(name);
        let f = image.resolve(b"/xattr/shared-07").unwrap();
        assert_eq!(
            image.get_xattr(&f, b"user.common").unwrap().as_deref(),
            Some(&b"shared-value"[..])
        );
        assert_eq!(
            image
                .get_xattr(&f, b"trusted.overlay.opaque")
                .unwrap()
                .as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(
            image.get_xattr(&f, b"user.own").unwrap().as_deref(),
            Some(&b"7"[..])
        );
        assert_eq!(image.get_xattr(&f, b"user.missing").unwrap(), None);
        let acl = image.resolve(b"/xattr/acl").unwrap();
        let v = image
            .get_xattr(&acl, b"system.posix_acl_access")
            .unwrap()
            .unwrap();
        assert_eq!(
            &v[..4],
            &2u32.to_le_bytes(),
            "raw ACL xattr value, version 2"
        );
        let many = image.resolve(b"/xattr/many").unwrap();
        assert_eq!(image.list_xattrs(&many).unwrap().len(), 40);
    }
}

/// Decode buffers are reused without zeroing, and extents read to their
/// end leave the cache: two images read the same files in different
/// orders and piece sizes (so every buffer holds other old bytes) and must
/// agree byte for byte, on a second pass too.
#[test]
fn reused_decode_buffers_never_show_old_bytes() {
    for name in [
        "lz4hc-big",
        "lzma",
        "deflate",
        "zstd",
        "ztail",
        "fragments",
        "dedupe",
        "compact",
    ] {
        let whole = open(name);
        let pieces = open(name);
        let mut files = Vec::new();
        whole
            .walk(&mut |_, inode| {
                if inode.file_type() == FileType::Regular {
                    files.push(inode.clone());
                }
                Ok(())
            })
            .unwrap();
        assert!(files.len() > 10, "{name}: a tree to read");
        for pass in 0..2 {
            let mut want = Vec::new();
            for inode in &files {
                let mut data = vec![0u8; inode.size as usize];
                assert_eq!(whole.read(inode, 0, &mut data).unwrap(), data.len());
                want.push(data);
            }
            for (inode, want) in files.iter().zip(&want).rev() {
                let mut got = Vec::with_capacity(want.len());
                let mut buf = vec![0u8; 4096 + 7 * pass];
                let mut off = 0u64;
                while off < inode.size {
                    let n = pieces.read(inode, off, &mut buf).unwrap();
                    assert!(n > 0, "{name}: data ends early");
                    got.extend_from_slice(&buf[..n]);
                    off += n as u64;
                }
                assert!(got == *want, "{name} pass {pass}: nid {}", inode.nid);
            }
        }
    }
}
