//! Shared helpers: where the corpus is, running the binary, comparing
//! manifests as parsed JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The corpus directory (../shared/corpus/images from the repository root).
pub fn corpus() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let p = root.join("../shared/corpus/images");
    assert!(p.is_dir(), "corpus not found at {}", p.display());
    p
}

/// The extra devices an image needs, in device-table order.
pub fn devices_of(name: &str) -> Vec<PathBuf> {
    match name {
        "blobdev" => vec![corpus().join("blobdev.blob")],
        "tar-index" => vec![corpus().join("tree.tar")],
        _ => Vec::new(),
    }
}

/// Run `immount ARGS`.
pub fn immount(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_immount"))
        .args(args)
        .output()
        .expect("run immount")
}

/// Parse JSON lines.
pub fn parse_lines(text: &[u8]) -> Vec<serde_json::Value> {
    std::str::from_utf8(text)
        .expect("manifest is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// The kernel's manifest of corpus image `name`.
pub fn kernel_manifest(name: &str) -> Vec<serde_json::Value> {
    let p = corpus().join(format!("{name}.manifest.jsonl"));
    parse_lines(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// Compare two manifests entry by entry, with a readable first difference.
pub fn assert_same_manifest(what: &str, ours: &[serde_json::Value], kernel: &[serde_json::Value]) {
    for (a, b) in ours.iter().zip(kernel) {
        assert_eq!(
            a, b,
            "{what}: first differing entry (ours, then the kernel's)"
        );
    }
    assert_eq!(
        ours.len(),
        kernel.len(),
        "{what}: number of entries differs"
    );
}

/// Run `immount SUB IMAGE [REST...] --device ...` on corpus image `name`
/// with its extra devices; panics unless it succeeds.
pub fn immount_on_corpus(sub: &str, name: &str, rest: &[&std::ffi::OsStr]) -> Output {
    let img = corpus().join(format!("{name}.erofs"));
    let mut args: Vec<std::ffi::OsString> = vec![sub.into(), img.into()];
    args.extend(rest.iter().map(|r| r.to_os_string()));
    for d in devices_of(name) {
        args.push("--device".into());
        args.push(d.into());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let out = immount(&refs);
    assert!(
        out.status.success(),
        "immount {sub} {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `immount manifest` of a corpus image, with its devices.
pub fn our_manifest(name: &str) -> Vec<serde_json::Value> {
    parse_lines(&immount_on_corpus("manifest", name, &[]).stdout)
}
