//! Trees made by `veritysetup format` are accepted, and trees made here pass
//! `veritysetup verify` and are byte-identical to veritysetup's.

use std::fs::File;
use std::sync::Arc;

use erofs::ReadAt;
use verity::{
    format_image, geometry_from_superblock, verify_image, FormatOptions, Geometry, RootHash,
    VerifiedReader, VerityParams,
};

use crate::common::{copy_image, corpus_bytes, field, path_str, run, run_ok, unhex};

/// Read the whole data area through `reader` and compare with the image.
fn assert_reads_back(reader: &dyn ReadAt, expected: &[u8]) {
    assert_eq!(reader.size().unwrap(), expected.len() as u64);
    let mut all = vec![0u8; expected.len()];
    reader.read_exact_at(&mut all, 0).unwrap();
    assert!(all == expected, "verified bytes differ from the image");
    // Unaligned reads across block boundaries too.
    let mut piece = vec![0u8; 10_000];
    reader.read_exact_at(&mut piece, 4000).unwrap();
    assert_eq!(piece, expected[4000..14_000]);
}

#[test]
fn veritysetup_tree_in_separate_file_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("plain.erofs", dir.path());
    let hash = dir.path().join("plain.hash");
    let out = run_ok("veritysetup", &["format", path_str(&img), path_str(&hash)]);
    let root: RootHash = field(&out, "Root hash").parse().unwrap();
    let (data, tree) = (File::open(&img).unwrap(), File::open(&hash).unwrap());
    let geometry = geometry_from_superblock(&tree, 0).unwrap();
    assert_eq!(geometry.params().salt, unhex(&field(&out, "Salt")));
    verify_image(&data, &tree, &geometry, &root).unwrap();
    let reader = VerifiedReader::new(&data, &tree, geometry, root).unwrap();
    assert_reads_back(&reader, &corpus_bytes("plain.erofs"));
}

#[test]
fn veritysetup_tree_at_hash_offset_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("lz4.erofs", dir.path());
    let size = std::fs::metadata(&img).unwrap().len();
    let blocks = (size / 4096).to_string();
    let offset = size.to_string();
    let out = run_ok(
        "veritysetup",
        &[
            "format",
            "--hash-offset",
            &offset,
            "--data-blocks",
            &blocks,
            path_str(&img),
            path_str(&img),
        ],
    );
    let root: RootHash = field(&out, "Root hash").parse().unwrap();
    let file = Arc::new(File::open(&img).unwrap());
    let geometry = geometry_from_superblock(&*file, size).unwrap();
    verify_image(&*file, &*file, &geometry, &root).unwrap();
    let reader = VerifiedReader::new(Arc::clone(&file), file, geometry, root).unwrap();
    assert_reads_back(&reader, &corpus_bytes("lz4.erofs"));
}

#[test]
fn veritysetup_trees_without_superblock_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("zstd.erofs", dir.path());
    let size = std::fs::metadata(&img).unwrap().len();
    let blocks = size / 4096;
    let expected = corpus_bytes("zstd.erofs");

    // Separate hash file.
    let hash = dir.path().join("zstd.hash");
    let out = run_ok(
        "veritysetup",
        &["format", "--no-superblock", path_str(&img), path_str(&hash)],
    );
    let root: RootHash = field(&out, "Root hash").parse().unwrap();
    let params = VerityParams {
        data_block_size: 4096,
        hash_block_size: 4096,
        data_blocks: blocks,
        salt: unhex(&field(&out, "Salt")),
    };
    let (data, tree) = (File::open(&img).unwrap(), File::open(&hash).unwrap());
    let geometry = Geometry::new(params.clone(), 0, false).unwrap();
    verify_image(&data, &tree, &geometry, &root).unwrap();
    let reader = VerifiedReader::new(&data, &tree, geometry, root).unwrap();
    assert_reads_back(&reader, &expected);

    // Appended to the image at a hash offset.
    let offset = size + 8192;
    let out = run_ok(
        "veritysetup",
        &[
            "format",
            "--no-superblock",
            "--hash-offset",
            &offset.to_string(),
            "--data-blocks",
            &blocks.to_string(),
            path_str(&img),
            path_str(&img),
        ],
    );
    let root: RootHash = field(&out, "Root hash").parse().unwrap();
    let params = VerityParams {
        salt: unhex(&field(&out, "Salt")),
        ..params
    };
    let file = File::open(&img).unwrap();
    let geometry = Geometry::new(params, offset, false).unwrap();
    verify_image(&file, &file, &geometry, &root).unwrap();
    let reader = VerifiedReader::new(&file, &file, geometry, root).unwrap();
    assert_reads_back(&reader, &expected);
}

#[test]
fn our_trees_pass_veritysetup_verify() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("plain.erofs", dir.path());
    let hash = dir.path().join("plain.verity");
    let report = format_image(&img, Some(&hash), None, &FormatOptions::default()).unwrap();
    let root = report.root_hash.to_hex();
    run_ok(
        "veritysetup",
        &["verify", path_str(&img), path_str(&hash), &root],
    );
    // veritysetup does check: a wrong root hash is refused.
    let wrong = format!("{:064x}", 7);
    assert!(!run(
        "veritysetup",
        &["verify", path_str(&img), path_str(&hash), &wrong]
    )
    .status
    .success());

    // Without a superblock: veritysetup is told the parameters.
    let hash2 = dir.path().join("plain.nosb");
    let opts = FormatOptions {
        superblock: false,
        salt: Some(vec![0x5a; 32]),
        ..FormatOptions::default()
    };
    let report = format_image(&img, Some(&hash2), None, &opts).unwrap();
    let blocks = report.superblock.params.data_blocks.to_string();
    run_ok(
        "veritysetup",
        &[
            "verify",
            "--no-superblock",
            "--salt",
            &"5a".repeat(32),
            "--data-blocks",
            &blocks,
            path_str(&img),
            path_str(&hash2),
            &report.root_hash.to_hex(),
        ],
    );
}

#[test]
fn our_appended_tree_passes_veritysetup_verify() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("lzma.erofs", dir.path());
    // Make the image end off a 4 KiB boundary's multiple of the data block
    // size: 512-byte blocks, so the tree lands at the next 4096 offset.
    let mut bytes = corpus_bytes("lzma.erofs");
    bytes.extend_from_slice(&[0xcc; 1536]);
    std::fs::write(&img, &bytes).unwrap();
    let opts = FormatOptions {
        data_block_size: 512,
        ..FormatOptions::default()
    };
    let report = format_image(&img, None, None, &opts).unwrap();
    assert_eq!(
        report.hash_offset,
        (bytes.len() as u64).next_multiple_of(4096)
    );
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        after[..bytes.len()],
        bytes[..],
        "the data area was modified"
    );
    run_ok(
        "veritysetup",
        &[
            "verify",
            "--hash-offset",
            &report.hash_offset.to_string(),
            path_str(&img),
            path_str(&img),
            &report.root_hash.to_hex(),
        ],
    );
}

/// With the same salt and uuid, our hash file equals veritysetup's byte for
/// byte, for several block sizes and tree depths.
#[test]
fn our_trees_are_byte_identical_to_veritysetup() {
    let dir = tempfile::tempdir().unwrap();
    let salt = "0123456789abcdef00112233445566778899aabbccddeeff0f1e2d3c4b5a6978";
    let uuid = "12345678-9abc-4def-8123-456789abcdef";
    // (image, data block size, hash block size, salt)
    let cases: &[(&str, u32, u32, &str)] = &[
        ("plain.erofs", 4096, 4096, salt),
        ("bs512.erofs", 512, 512, salt), // 11625 blocks, 16 per hash block: 4 levels
        ("bs512.erofs", 512, 4096, "-"), // no salt
        ("deflate.erofs", 4096, 1024, "ab"),
    ];
    for (i, &(name, dbs, hbs, salt)) in cases.iter().enumerate() {
        let img = copy_image(name, dir.path());
        // Fresh names: veritysetup does not truncate an existing hash file.
        let theirs = dir.path().join(format!("theirs{i}"));
        let ours = dir.path().join(format!("ours{i}"));
        let out = run_ok(
            "veritysetup",
            &[
                "format",
                "--data-block-size",
                &dbs.to_string(),
                "--hash-block-size",
                &hbs.to_string(),
                "--salt",
                salt,
                "--uuid",
                uuid,
                path_str(&img),
                path_str(&theirs),
            ],
        );
        let opts = FormatOptions {
            data_block_size: dbs,
            hash_block_size: hbs,
            salt: Some(if salt == "-" { vec![] } else { unhex(salt) }),
            uuid: Some(unhex(&uuid.replace('-', "")).try_into().unwrap()),
            ..FormatOptions::default()
        };
        let report = format_image(&img, Some(&ours), None, &opts).unwrap();
        assert_eq!(
            report.root_hash.to_hex(),
            field(&out, "Root hash"),
            "{name} {dbs}/{hbs}"
        );
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{name} {dbs}/{hbs}: hash files differ"
        );
        assert_eq!(report.superblock.uuid_string(), uuid);
    }
}

#[test]
fn one_block_image_matches_veritysetup() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("one");
    std::fs::write(&img, &corpus_bytes("plain.erofs")[..4096]).unwrap();
    let hash = dir.path().join("one.hash");
    let out = run_ok("veritysetup", &["format", path_str(&img), path_str(&hash)]);
    let root: RootHash = field(&out, "Root hash").parse().unwrap();
    let (data, tree) = (File::open(&img).unwrap(), File::open(&hash).unwrap());
    let geometry = geometry_from_superblock(&tree, 0).unwrap();
    assert!(geometry.levels().is_empty());
    verify_image(&data, &tree, &geometry, &root).unwrap();
    let reader = VerifiedReader::new(&data, &tree, geometry, root).unwrap();
    let mut block = vec![0u8; 4096];
    reader.read_exact_at(&mut block, 0).unwrap();
    assert_eq!(block, corpus_bytes("plain.erofs")[..4096]);
}

#[test]
fn hash_file_with_offset_keeps_what_precedes_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("plain.erofs", dir.path());
    let hash = dir.path().join("shared.bin");
    std::fs::write(&hash, [0xab; 8192]).unwrap();
    let report = format_image(&img, Some(&hash), Some(8192), &FormatOptions::default()).unwrap();
    assert_eq!(std::fs::read(&hash).unwrap()[..8192], [0xab; 8192]);
    run_ok(
        "veritysetup",
        &[
            "verify",
            "--hash-offset",
            "8192",
            path_str(&img),
            path_str(&hash),
            &report.root_hash.to_hex(),
        ],
    );
    // The image as its own hash file: only with an offset past the data.
    let err = format_image(&img, Some(&img), None, &FormatOptions::default()).unwrap_err();
    assert!(err.to_string().contains("image itself"), "{err}");
    let err = format_image(&img, Some(&img), Some(4096), &FormatOptions::default()).unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
    assert!(
        std::fs::read(&img).unwrap() == corpus_bytes("plain.erofs"),
        "image modified"
    );
}
