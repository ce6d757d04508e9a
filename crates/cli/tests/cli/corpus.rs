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

/// Every compressed layout and algorithm of the corpus.
const COMPRESSED: &[&str] = &[
    "lz4",
    "lz4hc-big",
    "lzma",
    "deflate",
    "zstd",
    "ztail",
    "fragments",
    "allfrag",
    "dedupe",
    "legacy",
    "multialg",
    "48bit-lz4hc",
    "metabox",
    "zdir",
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
fn compressed_images_match_the_kernel() {
    for name in COMPRESSED {
        check(name);
    }
}

#[test]
fn every_corpus_image_is_covered() {
    // A new image in the corpus must be added to one of the lists above.
    let mut names: Vec<String> = std::fs::read_dir(corpus())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix(".erofs").map(str::to_owned)
        })
        .collect();
    names.sort();
    let mut ours: Vec<String> = UNCOMPRESSED
        .iter()
        .chain(COMPRESSED)
        .map(|s| s.to_string())
        .collect();
    ours.sort();
    assert_eq!(names, ours);
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
