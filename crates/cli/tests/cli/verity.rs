//! Offline verity: with a root hash, every block is checked before the
//! parser sees it, so any changed byte of data or metadata is an error
//! (exit 1) and never wrong bytes; a wrong root hash refuses the image.

use std::ffi::OsStr;
use std::path::Path;

use crate::common::*;

fn run(args: &[&OsStr]) -> (i32, Vec<u8>, String) {
    let out = immount(args);
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Copy a corpus image, make its tree; return (image, tree, root hash).
fn formatted(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let img = dir.join(format!("{name}.erofs"));
    std::fs::copy(corpus().join(format!("{name}.erofs")), &img).unwrap();
    let tree = dir.join(format!("{name}.tree"));
    let (code, out, err) = run(&[
        "verity".as_ref(),
        "format".as_ref(),
        img.as_os_str(),
        "--hash-file".as_ref(),
        tree.as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8(out).unwrap();
    let root = text
        .split_whitespace()
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no root hash in {text}"))
        .to_string();
    (img, tree, root)
}

fn checked(
    sub: &str,
    img: &Path,
    tree: &Path,
    root: &str,
    extra: &[&str],
) -> (i32, Vec<u8>, String) {
    let mut args: Vec<&OsStr> = vec![sub.as_ref(), img.as_os_str()];
    args.extend(extra.iter().map(|s| OsStr::new(*s)));
    args.extend([
        "--root-hash".as_ref(),
        OsStr::new(root),
        "--verity-data".as_ref(),
        tree.as_os_str(),
    ]);
    run(&args)
}

#[test]
fn every_changed_byte_fails_and_no_wrong_bytes_are_returned() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, tree, root) = formatted(tmp.path(), "plain");
    let (code, _, err) = checked("fsck", &img, &tree, &root, &[]);
    assert_eq!(code, 0, "{err}");
    let original = std::fs::read(&img).unwrap();
    let good = std::fs::read(corpus().join("plain.erofs")).unwrap();
    assert_eq!(original, good);
    // Offsets in the superblock, the inode area, directory and file data.
    let size = original.len();
    let offsets = [
        1024 + 16,
        38 * 32 + 8,
        4096 * 3 + 100,
        size / 3,
        size / 2 + 7,
        size - 4096 * 2,
    ];
    for &at in &offsets {
        let mut data = original.clone();
        data[at] ^= 0x5a;
        std::fs::write(&img, &data).unwrap();
        let (code, _, err) = checked("fsck", &img, &tree, &root, &[]);
        assert_eq!(code, 1, "byte {at}: fsck must fail: {err}");
        assert!(err.contains("does not match its hash"), "byte {at}: {err}");
        // Without verity the same change may go unnoticed or not; with it,
        // cat of any file either gives the true bytes or fails.
        for file in ["/big/noise-256k", "/sizes/text-65537", "/links/hard-a"] {
            let (code, out, _) = checked("cat", &img, &tree, &root, &[file]);
            let (_, truth, _) = run(&[
                "cat".as_ref(),
                corpus().join("plain.erofs").as_os_str(),
                file.as_ref(),
            ]);
            match code {
                0 => assert_eq!(out, truth, "byte {at}: {file} returned wrong bytes"),
                1 => assert!(
                    truth.starts_with(&out),
                    "byte {at}: {file} returned wrong bytes before failing"
                ),
                c => panic!("byte {at}: cat {file} exited {c}"),
            }
        }
    }
    std::fs::write(&img, &original).unwrap();
    let mut t = std::fs::read(&tree).unwrap();
    let last = t.len() - 10;
    t[last] ^= 1;
    std::fs::write(&tree, &t).unwrap();
    let (code, _, err) = checked("fsck", &img, &tree, &root, &[]);
    assert_eq!(code, 1, "a changed hash block must fail: {err}");
}

#[test]
fn wrong_root_hash_refuses_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, tree, root) = formatted(tmp.path(), "lz4");
    let mut wrong: Vec<u8> = root.bytes().collect();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    for sub in ["fsck", "manifest"] {
        let (code, out, err) = checked(sub, &img, &tree, &wrong, &[]);
        assert_eq!(code, 1, "{sub}: {err}");
        assert!(out.is_empty(), "{sub} printed output for a refused image");
        assert!(err.contains("root hash mismatch"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // And the right one gives the kernel's manifest.
    let (code, out, err) = checked("manifest", &img, &tree, &root, &[]);
    assert_eq!(code, 0, "{err}");
    assert_same_manifest("lz4 verified", &parse_lines(&out), &kernel_manifest("lz4"));
}

/// The tree covers the image file only: an image with extra devices (here
/// a blob) is refused with one line while verity is on, offline and
/// through the mount, instead of letting unchecked device bytes reach the
/// parser. Without verity the same image reads fine.
#[test]
fn extra_devices_are_refused_under_verity() {
    let tmp = tempfile::tempdir().unwrap();
    // (tar-index, the other corpus image with a device, is not a whole
    // number of blocks, so it cannot have a tree at all.)
    for name in ["blobdev"] {
        let (img, tree, root) = formatted(tmp.path(), name);
        let devices = devices_of(name);
        assert!(!devices.is_empty(), "{name} has extra devices");
        let mut device_args: Vec<&str> = Vec::new();
        for d in &devices {
            device_args.extend(["--device", d.to_str().unwrap()]);
        }
        for sub in ["fsck", "manifest"] {
            // With and without the devices themselves: the device table
            // alone is enough to refuse.
            for extra in [&device_args[..], &[]] {
                let (code, out, err) = checked(sub, &img, &tree, &root, extra);
                // 2: the request (verity over devices) cannot be honoured;
                // the image itself is not at fault.
                assert_eq!(code, 2, "{name} {sub} {extra:?}: {err}");
                assert!(out.is_empty(), "{name} {sub} printed output: {err}");
                assert!(err.contains("extra device"), "{name} {sub}: {err}");
                assert_eq!(err.lines().count(), 1, "{err}");
            }
        }
        let mut args: Vec<&OsStr> = vec!["fsck".as_ref(), img.as_os_str()];
        args.extend(device_args.iter().map(OsStr::new));
        let (code, _, err) = run(&args);
        assert_eq!(code, 0, "{name} without verity: {err}");

        // Through the mount: refused before anything is mounted.
        let mnt = tmp.path().join(format!("{name}.mnt"));
        std::fs::create_dir(&mnt).unwrap();
        let mut args: Vec<&OsStr> = vec!["mount".as_ref(), "--no-daemon".as_ref()];
        args.extend(device_args.iter().map(OsStr::new));
        args.extend([
            "--root-hash".as_ref(),
            OsStr::new(&root),
            "--verity-data".as_ref(),
            tree.as_os_str(),
            img.as_os_str(),
            mnt.as_os_str(),
        ]);
        let (code, _, err) = run(&args);
        if code == 0 {
            // Never leave a mount behind, even when the test fails.
            let _ = run(&["umount".as_ref(), mnt.as_os_str()]);
        }
        assert_ne!(code, 0, "{name}: mounted with unverified devices");
        assert!(err.contains("extra device"), "{name} mount: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
