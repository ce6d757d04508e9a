//! `immount manifest` equals the kernel's manifest for every image.

use crate::common::*;

/// Every uncompressed layout of the corpus.
const UNCOMPRESSED: &[&str] = &[
    "plain",
    "noinline",
    "extended",
    "compact",
    "bs512",
    "chunk",
    "chunkidx",
    "blobdev",
    "48bit",
    "xprefix",
    "dotomit",
    "tar-full",
    "tar-index",
];

fn check(name: &str) {
    let ours = our_manifest(name);
    let kernel = kernel_manifest(name);
    assert!(
        kernel.len() > 3000,
        "{name}: the kernel's manifest looks truncated"
    );
    assert_same_manifest(name, &ours, &kernel);
}

#[test]
fn uncompressed_images_match_the_kernel() {
    for name in UNCOMPRESSED {
        check(name);
    }
}

#[test]
fn manifest_text_is_byte_identical_to_manifest_py() {
    // Beyond parsed equality: the JSON text itself is what manifest.py prints.
    let img = corpus().join("plain.erofs");
    let out = immount(&["manifest".as_ref(), img.as_os_str()]);
    assert!(out.status.success());
    let kernel = std::fs::read(corpus().join("plain.manifest.jsonl")).unwrap();
    assert!(
        out.stdout == kernel,
        "manifest text differs from manifest.py's"
    );
}
