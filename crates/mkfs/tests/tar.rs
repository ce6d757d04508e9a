//! Images built from tar streams and OCI layers. Run as root.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;

use common::*;

/// The corpus tar (PAX xattrs, hard links, devices, long names): the kernel
/// shows exactly what it showed for mkfs.erofs --tar=f's image.
#[test]
fn corpus_tar_matches_mkfs_erofs_tar_image() {
    if skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tar = Path::new(CORPUS).join("images/tree.tar");
    let want =
        std::fs::read_to_string(Path::new(CORPUS).join("images/tar-full.manifest.jsonl")).unwrap();
    let tree = mkfs::tree_from_tar(&tar, work.path()).unwrap();
    let img = work.path().join("t.erofs");
    mkfs::build_image(&tree, &img, &Default::default()).unwrap();
    check_image(&img, &want, work.path(), true);

    // gzip and zstd streams are detected by magic and give the same image.
    let raw = std::fs::read(&tar).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    let gz_path = work.path().join("t.tar.gz");
    std::fs::write(&gz_path, gz.finish().unwrap()).unwrap();
    let zst_path = work.path().join("t.tar.zst");
    std::fs::write(&zst_path, zstd::encode_all(&raw[..], 3).unwrap()).unwrap();
    for p in [gz_path, zst_path] {
        let tree = mkfs::tree_from_tar(&p, work.path()).unwrap();
        let img2 = work.path().join("t2.erofs");
        mkfs::build_image(&tree, &img2, &Default::default()).unwrap();
        assert!(
            std::fs::read(&img).unwrap() == std::fs::read(&img2).unwrap(),
            "{} gives another image",
            p.display()
        );
    }
}

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    h
}

fn layer(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        match data {
            Some(d) => {
                let h = header(path, tar::EntryType::Regular, d.len() as u64, 0o644);
                b.append(&h, *d).unwrap();
            }
            None => {
                let h = header(path, tar::EntryType::Directory, 0, 0o755);
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn listing(tree: &mkfs::Tree, id: mkfs::NodeId, prefix: &str, out: &mut Vec<String>) {
    if let mkfs::Kind::Dir(entries) = &tree.nodes[id].kind {
        for (name, &child) in entries {
            let p = format!("{prefix}/{}", String::from_utf8_lossy(name));
            out.push(p.clone());
            listing(tree, child, &p, out);
        }
    }
}

/// Whiteouts remove lower files, opaque markers hide a lower directory's
/// contents but keep what the same layer adds; an OCI layout directory
/// (index.json -> manifest -> gzip layers) gives the same tree.
#[test]
fn oci_layers_whiteouts_and_layout_dir() {
    let work = tempfile::tempdir().unwrap();
    let l1 = layer(&[
        ("etc/", None),
        ("etc/a", Some(b"a1")),
        ("etc/b", Some(b"b1")),
        ("opt/", None),
        ("opt/old", Some(b"o")),
        ("opt/sub/", None),
        ("opt/sub/deep", Some(b"d")),
    ]);
    let l2 = layer(&[
        ("etc/.wh.b", Some(b"")),
        ("etc/a", Some(b"a2")),
        ("opt/", None),
        ("opt/new", Some(b"n")),
        ("opt/.wh..wh..opq", Some(b"")),
    ]);
    let p1 = work.path().join("l1.tar");
    let p2 = work.path().join("l2.tar");
    std::fs::write(&p1, &l1).unwrap();
    std::fs::write(&p2, &l2).unwrap();
    let tree = mkfs::tree_from_layers(&[p1, p2], work.path()).unwrap();
    let mut got = Vec::new();
    listing(&tree, tree.root, "", &mut got);
    assert_eq!(got, ["/etc", "/etc/a", "/opt", "/opt/new"]);
    let a = tree.lookup(b"etc/a").unwrap().unwrap();
    let mkfs::Kind::File { size, .. } = tree.nodes[a].kind else {
        panic!("etc/a is not a file");
    };
    assert_eq!(size, 2);

    // The same layers as an OCI image layout, gzip-compressed.
    let oci = work.path().join("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256")).unwrap();
    let mut digests = Vec::new();
    for (i, l) in [&l1, &l2].iter().enumerate() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(l).unwrap();
        let name = format!("{:064x}", i + 1);
        std::fs::write(oci.join("blobs/sha256").join(&name), gz.finish().unwrap()).unwrap();
        digests.push(format!("sha256:{name}"));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "layers": digests.iter().map(|d| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": 1
        })).collect::<Vec<_>>()
    });
    let mname = format!("{:064x}", 99);
    std::fs::write(oci.join("blobs/sha256").join(&mname), manifest.to_string()).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{mname}"), "size": 1}
    ]});
    std::fs::write(oci.join("index.json"), index.to_string()).unwrap();
    let tree2 = mkfs::tree_from_oci(&oci, work.path()).unwrap();
    let mut got2 = Vec::new();
    listing(&tree2, tree2.root, "", &mut got2);
    assert_eq!(got, got2);

    if is_root() {
        let img = work.path().join("oci.erofs");
        mkfs::build_image(&tree2, &img, &Default::default()).unwrap();
        fsck(&img, true);
        let mnt = Mount::new(&img, &work.path().join("mnt"));
        assert_eq!(std::fs::read(mnt.dir.join("etc/a")).unwrap(), b"a2");
        assert!(!mnt.dir.join("etc/b").exists());
        assert!(!mnt.dir.join("opt/old").exists());
        assert_eq!(std::fs::read(mnt.dir.join("opt/new")).unwrap(), b"n");
    }
}

/// Bad inputs are one clear error, and no image is left behind.
#[test]
fn bad_inputs_fail_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("out.erofs");
    let files_left = || {
        std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("erofs") || n.starts_with(".immount"))
            .collect::<Vec<_>>()
    };

    // A tar that ends in the middle of a file.
    let full = layer(&[("f", Some(&[7u8; 5000][..]))]);
    let cut = work.path().join("cut.tar");
    std::fs::write(&cut, &full[..2048]).unwrap();
    let err = mkfs::tree_from_tar(&cut, work.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("ends in the middle"), "{err}");

    // A path escaping the root (written raw: the tar crate refuses "..").
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.resize(512 * 3, 0);
    let esc = work.path().join("esc.tar");
    std::fs::write(&esc, &raw).unwrap();
    let err = mkfs::tree_from_tar(&esc, work.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("escapes the root"), "{err}");

    // An unreadable file in a directory (root can read anything, so make
    // the file vanish between scan and build instead).
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("gone"), b"data").unwrap();
    let tree = mkfs::scan_dir(&src).unwrap();
    std::fs::remove_file(src.join("gone")).unwrap();
    let err = mkfs::build_image(&tree, &img, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("gone"), "{err}");
    assert!(files_left().is_empty(), "left behind: {:?}", files_left());
}
