//! Exit codes and error lines: 0 success, 1 corrupt image, 2 usage or I/O.

use crate::common::*;
use std::io::Write;

fn code(args: &[&str]) -> (i32, String) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let out = immount(&args);
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fsck_is_clean_on_a_good_image() {
    let img = corpus().join("plain.erofs");
    let (c, err) = code(&["fsck", img.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
}

#[test]
fn missing_image_is_a_usage_error() {
    let (c, err) = code(&["fsck", "/nonexistent/image.erofs"]);
    assert_eq!(c, 2);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("/nonexistent/image.erofs"), "{err}");
}

#[test]
fn not_an_erofs_image_is_corrupt() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0x5a; 8192]).unwrap();
    let (c, err) = code(&["inspect", f.path().to_str().unwrap()]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("not an EROFS image"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn unknown_incompat_feature_is_named() {
    let mut data = std::fs::read(corpus().join("plain.erofs")).unwrap();
    // feature_incompat sits at superblock offset 80; set an unknown bit and
    // drop the checksum feature so the checksum does not fail first.
    data[1024 + 80 + 3] |= 0x40;
    data[1024 + 8] &= !1;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&data).unwrap();
    let (c, err) = code(&["fsck", f.path().to_str().unwrap()]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("unknown-0x40000000"), "{err}");
}

#[test]
fn corrupt_superblock_checksum_is_reported_with_its_offset() {
    let mut data = std::fs::read(corpus().join("plain.erofs")).unwrap();
    data[1024 + 16] ^= 1; // inos: covered by the checksum
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&data).unwrap();
    let (c, err) = code(&["fsck", f.path().to_str().unwrap()]);
    assert_eq!(c, 1, "{err}");
    assert!(
        err.contains("checksum") && err.contains("offset 1028"),
        "{err}"
    );
}

#[test]
fn corrupt_inode_fails_fsck_with_nid() {
    let img = corpus().join("plain.erofs");
    let mut data = std::fs::read(&img).unwrap();
    // The root inode (nid 38, meta_blkaddr 0): give it an unknown layout.
    let root = 38 * 32;
    data[root] = (data[root] & !0x0e) | (7 << 1);
    data[1024 + 8] &= !1;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&data).unwrap();
    let (c, err) = code(&["fsck", f.path().to_str().unwrap()]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("nid 38"), "{err}");
}

#[test]
fn cat_ls_stat_getfattr_work() {
    let img = corpus().join("plain.erofs");
    let img = img.to_str().unwrap();
    let out = immount(&["cat".as_ref(), img.as_ref(), "/links/hard-a".as_ref()]);
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 5000);
    let out = immount(&["ls".as_ref(), img.as_ref(), "/special".as_ref()]);
    let names = String::from_utf8(out.stdout).unwrap();
    assert_eq!(names, "bigdev\nfifo\nloop0\nnull\nsock\n");
    let out = immount(&[
        "ls".as_ref(),
        "-l".as_ref(),
        img.as_ref(),
        "/special".as_ref(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("4095, 1048575"), "{text}");
    let out = immount(&["stat".as_ref(), img.as_ref(), "/meta/setuid".as_ref()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("(4755/-rwsr-xr-x)"), "{text}");
    let out = immount(&["getfattr".as_ref(), img.as_ref(), "/xattr/small".as_ref()]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "# file: /xattr/small\nuser.a=\"1\"\n"
    );
    let (c, err) = code(&["cat", img, "/no/such/file"]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("no such file"), "{err}");
    let (c, _) = code(&["cat", img, "relative"]);
    assert_eq!(c, 2);
}

#[test]
fn broken_pipe_is_not_an_error() {
    use std::process::{Command, Stdio};
    let img = corpus().join("plain.erofs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_immount"))
        .args(["cat".as_ref(), img.as_os_str(), "/big/zeros-1m".as_ref()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
