//! `immount build` through the binary: a tar of the corpus tree becomes an
//! image whose manifest is the kernel's view of the same tar, twice the
//! same bytes, with a verity tree that checks out, and bad input leaves
//! nothing behind.

use std::ffi::OsStr;
use std::path::Path;

use crate::common::*;

fn build(args: &[&OsStr]) -> (i32, String, String) {
    let mut all: Vec<&OsStr> = vec!["build".as_ref()];
    all.extend_from_slice(args);
    let out = immount(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn manifest_of(img: &Path) -> Vec<serde_json::Value> {
    let out = immount(&["manifest".as_ref(), img.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_lines(&out.stdout)
}

#[test]
fn tar_builds_are_faithful_and_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let tar = corpus().join("tree.tar");
    for (i, opts) in [
        vec![],
        vec!["-zlz4hc", "-Eztailpacking"],
        vec!["-zzstd", "-C65536"],
        vec![
            "--xattr-prefix",
            "trusted.overlay.",
            "--xattr-prefix=user.k",
            "-Exattr-name-filter",
        ],
    ]
    .iter()
    .enumerate()
    {
        let a = tmp.path().join(format!("a{i}.erofs"));
        let b = tmp.path().join(format!("b{i}.erofs"));
        for img in [&a, &b] {
            let mut args: Vec<&OsStr> = vec!["--tar".as_ref(), tar.as_os_str(), "--quiet".as_ref()];
            args.extend(opts.iter().map(OsStr::new));
            args.push(img.as_os_str());
            let (code, _, err) = build(&args);
            assert_eq!(code, 0, "{opts:?}: {err}");
        }
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{opts:?}: two builds differ"
        );
        if opts.contains(&"-Exattr-name-filter") {
            // Names went through the long prefix: none repeats its infix.
            let bytes = std::fs::read(&a).unwrap();
            assert!(
                !bytes.windows(14).any(|w| w == b"overlay.opaque"),
                "--xattr-prefix was not used"
            );
        }
        assert_same_manifest(
            &format!("build {opts:?}"),
            &manifest_of(&a),
            &kernel_manifest("tar-full"),
        );
    }
}

/// `build --verity` prints the root hash and the tree's offset; immount's
/// commands find the appended tree without being told the offset, and
/// veritysetup agrees with the printed one.
#[test]
fn verity_build_checks_out() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("v.erofs");
    let (code, out, err) = build(&[
        "--tar".as_ref(),
        corpus().join("tree.tar").as_os_str(),
        "-zlz4".as_ref(),
        "--verity".as_ref(),
        img.as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} line printed: {out}"))
            .trim()
            .to_string()
    };
    let root = field("Root hash:");
    assert!(
        root.len() == 64 && root.bytes().all(|b| b.is_ascii_hexdigit()),
        "{root:?}"
    );
    let offset: u64 = field("Hash offset:").parse().unwrap();
    // The tree starts right after the filesystem, on a 4 KiB boundary.
    let reader = erofs::Image::open(std::sync::Arc::new(std::fs::File::open(&img).unwrap()))
        .expect("the image with its tree still opens");
    let sb = reader.superblock();
    assert_eq!(offset, (sb.blocks << sb.blkszbits).next_multiple_of(4096));

    // No --hash-offset: verify and fsck look right after the filesystem.
    let out = immount(&[
        "verity".as_ref(),
        "verify".as_ref(),
        img.as_os_str(),
        "--root-hash".as_ref(),
        root.as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = immount(&[
        "fsck".as_ref(),
        "--root-hash".as_ref(),
        root.as_ref(),
        img.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (wrong, _) = root.split_at(63);
    let wrong = format!("{wrong}{}", if root.ends_with('0') { '1' } else { '0' });
    for args in [
        vec!["fsck", "--root-hash", &wrong],
        vec!["verity", "verify", "--root-hash", &wrong],
    ] {
        let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        all.push(img.as_os_str());
        let out = immount(&all);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // veritysetup (Debian package cryptsetup-bin) with the printed offset.
    let out = std::process::Command::new("veritysetup")
        .arg("verify")
        .arg(&img)
        .arg(&img)
        .arg(&root)
        .arg(format!("--hash-offset={offset}"))
        .output()
        .expect("run veritysetup (apt-get install cryptsetup-bin)");
    assert!(
        out.status.success(),
        "veritysetup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_tar_that_ends_early_leaves_no_image() {
    let tmp = tempfile::tempdir().unwrap();
    let full = std::fs::read(corpus().join("tree.tar")).unwrap();
    let cut = tmp.path().join("cut.tar");
    std::fs::write(&cut, &full[..full.len() / 2 + 100]).unwrap();
    let img = tmp.path().join("out.erofs");
    let (code, _, err) = build(&[
        "--tar".as_ref(),
        cut.as_os_str(),
        "--quiet".as_ref(),
        img.as_os_str(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!img.exists(), "a partial image was left behind");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "temporary files left: {left:?}");
}

#[test]
fn dedupe_stores_duplicate_files_once() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // Text-like data that compresses, in two copies under different names.
    let mut text = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while text.len() < 600_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.extend_from_slice(format!("line {} of {}\n", x % 5000, x % 7).as_bytes());
    }
    for dir in ["a", "b/c"] {
        std::fs::create_dir_all(src.join(dir)).unwrap();
        std::fs::write(src.join(dir).join("data.txt"), &text).unwrap();
    }
    let mut sizes = Vec::new();
    let mut manifests = Vec::new();
    for extra in [None, Some("-Ededupe")] {
        let img = tmp.path().join(format!("{}.erofs", sizes.len()));
        let mut args: Vec<&OsStr> = vec!["-q".as_ref(), "-zlz4hc".as_ref(), "-T0".as_ref()];
        args.extend(extra.map(OsStr::new));
        args.push(src.as_os_str());
        args.push(img.as_os_str());
        let (code, _, err) = build(&args);
        assert_eq!(code, 0, "{extra:?}: {err}");
        sizes.push(std::fs::metadata(&img).unwrap().len());
        manifests.push(manifest_of(&img));
    }
    assert_same_manifest("dedupe", &manifests[1], &manifests[0]);
    // The second copy's pclusters are shared: the image is little more
    // than half the size (two copies of the data without dedupe).
    assert!(
        sizes[1] * 3 < sizes[0] * 2,
        "dedupe: {} bytes, without: {} bytes",
        sizes[1],
        sizes[0]
    );
}
