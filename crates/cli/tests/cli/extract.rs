//! `immount extract`, then manifest.py over the extracted tree, equals the
//! kernel's manifest of the image.

use crate::common::*;
use std::process::Command;

fn manifest_py(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let script = corpus().join("../manifest.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_lines(&out.stdout)
}

fn round_trip(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("tree");
    immount_on_corpus("extract", name, &[dest.as_os_str()]);
    assert_same_manifest(name, &manifest_py(&dest), &kernel_manifest(name));
}

#[test]
fn extract_round_trips() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (owners, devices)"
    );
    for name in ["plain", "chunk", "blobdev"] {
        round_trip(name);
    }
}

#[test]
fn extract_refuses_a_non_empty_destination_and_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep"), b"mine").unwrap();
    let img = corpus().join("plain.erofs");
    let out = immount(&["extract".as_ref(), img.as_os_str(), tmp.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(tmp.path().join("keep")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}
