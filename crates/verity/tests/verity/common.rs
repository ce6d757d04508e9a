//! Helpers: corpus images, scratch copies, and running veritysetup/openssl.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The reference image directory: `$IMMOUNT_CORPUS`, else `shared/` beside
/// the repository (as CI lays it out), else the shared work folder.
pub fn corpus_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMMOUNT_CORPUS") {
        return PathBuf::from(dir);
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/images");
    if beside.is_dir() {
        return beside;
    }
    PathBuf::from("/work/shared/corpus/images")
}

/// Bytes of a corpus image.
pub fn corpus_bytes(name: &str) -> Vec<u8> {
    let path = corpus_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A writable copy of a corpus image in `dir`.
pub fn copy_image(name: &str, dir: &Path) -> PathBuf {
    let dest = dir.join(name);
    std::fs::write(&dest, corpus_bytes(name)).unwrap();
    dest
}

/// Run a tool and insist it succeeds, with its output in the panic.
pub fn run_ok(program: &str, args: &[&str]) -> Output {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a tool; a missing tool is a test failure naming the package.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); install cryptsetup-bin and openssl")
        })
}

/// The value of a `Key:  value` line of veritysetup's output.
pub fn field(out: &Output, key: &str) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim_start_matches(':').trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {key:?} in veritysetup output:\n{text}"))
}

/// Decode hex (test input only).
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
