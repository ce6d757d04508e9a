//! End-to-end tests of `immount mount` through the kernel's FUSE driver.
//!
//! They run the `mount`/`umount` commands as a user would, with the real
//! `immount` program: `cargo test --workspace` builds every binary of the
//! workspace before running any test, so it sits beside this crate's own
//! binaries. `$IMMOUNT_BIN` overrides the choice. When `immount` is missing
//! or older than the sources (`cargo test -p immount-fuse` alone), the tests
//! fall back to this crate's `immount-fuse`, which compiles the very same
//! CLI module (crates/cli/src/cmd_mount.rs) and says so on stderr.
//!
//! They need root (to mount, to create a test user, to enter namespaces)
//! and the fuse3, python3 and util-linux packages; without root they say so
//! and pass. Every mount is undone by a guard, also when an assertion fails.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

const CORPUS: &str = "../../../shared/corpus";

fn corpus_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The corpus sits beside the repository (../shared from its root).
    for cand in [here.join(CORPUS), PathBuf::from("/work/shared/corpus")] {
        if cand.join("images").is_dir() {
            return cand;
        }
    }
    panic!("the reference corpus (shared/corpus) is missing");
}

/// The newest modification time of the files under `dir`.
fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if let Ok(t) = m.modified() {
                newest = newest.max(t);
            }
        }
    }
    newest
}

/// The program under test (see the module docs).
fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("IMMOUNT_BIN") {
            eprintln!("testing $IMMOUNT_BIN = {}", Path::new(&p).display());
            return PathBuf::from(p);
        }
        let twin = PathBuf::from(env!("CARGO_BIN_EXE_immount-fuse"));
        let real = twin.with_file_name("immount");
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sources = ["cli", "fuse", "erofs", "sys"]
            .iter()
            .map(|c| newest_mtime(&crates.join(c).join("src")))
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        match std::fs::metadata(&real).and_then(|m| m.modified()) {
            Ok(built) if built >= sources => {
                eprintln!("testing {}", real.display());
                real
            }
            _ => {
                eprintln!(
                    "note: {} is missing or older than the sources; testing the twin {}",
                    real.display(),
                    twin.display()
                );
                twin
            }
        }
    })
    .clone()
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
    };
}

/// A fresh empty directory under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "immount-fuse-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether something is mounted at `path` (a resolved path).
fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(p))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts (lazily, forcefully) on drop, whatever happened.
struct MountGuard {
    mountpoint: PathBuf,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Kills a foreground server on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn extra_devices(corpus: &Path, name: &str) -> Vec<PathBuf> {
    match name {
        "blobdev" => vec![corpus.join("images/blobdev.blob")],
        "tar-index" => vec![corpus.join("images/tree.tar")],
        _ => Vec::new(),
    }
}

/// `immount mount` in the background; the guard unmounts.
fn mount(image: &Path, devices: &[PathBuf], mountpoint: &Path) -> Result<MountGuard, String> {
    mount_with(image, devices, &[], mountpoint)
}

/// [`mount`] with more arguments (options) before the image.
fn mount_with(
    image: &Path,
    devices: &[PathBuf],
    args: &[&str],
    mountpoint: &Path,
) -> Result<MountGuard, String> {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    for d in devices {
        all.extend(["--device".as_ref(), d.as_os_str()]);
    }
    let (out, guard) = run_mount(all, image, mountpoint);
    if !out.status.success() {
        return Err(format!(
            "mount failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    assert!(
        is_mounted(&guard.mountpoint),
        "mount returned 0 but nothing is mounted"
    );
    Ok(guard)
}

/// `immount mount ARGS IMAGE MOUNTPOINT` run to its end, whatever it
/// says, with a guard that undoes any mount it made.
fn run_mount<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
    image: &Path,
    mountpoint: &Path,
) -> (std::process::Output, MountGuard) {
    let out = Command::new(bin())
        .arg("mount")
        .args(args)
        .arg(image)
        .arg(mountpoint)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let guard = MountGuard {
        mountpoint: mountpoint.canonicalize().unwrap(),
    };
    (out, guard)
}

fn umount(mountpoint: &Path) {
    let out = Command::new(bin())
        .arg("umount")
        .arg(mountpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn parse_manifest(text: &str) -> Result<Vec<serde_json::Value>, String> {
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l}")))
        .collect()
}

/// The corpus images whose manifest differs through the mount, with the
/// first difference of each.
fn compare_image(corpus: &Path, name: &str) -> Result<(), String> {
    let images = corpus.join("images");
    let expected = parse_manifest(
        &std::fs::read_to_string(images.join(format!("{name}.manifest.jsonl"))).unwrap(),
    )?;
    let dir = TempDir::new(name);
    let guard = mount(
        &images.join(format!("{name}.erofs")),
        &extra_devices(corpus, name),
        &dir.0,
    )?;
    let out = Command::new("python3")
        .arg(corpus.join("manifest.py"))
        .arg(&guard.mountpoint)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    umount(&guard.mountpoint);
    if !out.status.success() {
        return Err(format!(
            "manifest.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    let got = parse_manifest(&String::from_utf8_lossy(&out.stdout))?;
    for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
        if e != g {
            return Err(format!("line {}: expected {e}\n  got {g}", i + 1));
        }
    }
    if expected.len() != got.len() {
        return Err(format!(
            "{} entries expected, {} seen",
            expected.len(),
            got.len()
        ));
    }
    Ok(())
}

#[test]
fn every_corpus_image_matches_the_kernel_manifest() {
    require_root!();
    let corpus = corpus_dir();
    let mut names: Vec<String> = std::fs::read_dir(corpus.join("images"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".erofs")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 20, "corpus looks incomplete: {names:?}");
    let mut failures = BTreeMap::new();
    for name in &names {
        match compare_image(&corpus, name) {
            Ok(()) => eprintln!("{name}: same as the kernel"),
            Err(e) => {
                eprintln!("{name}: DIFFERS: {e}");
                failures.insert(name.clone(), e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} images differ: {:?}",
        failures.len(),
        names.len(),
        failures.keys()
    );
}

/// A regular file of the plain image and its sha256, from the manifest.
fn sample_file(corpus: &Path) -> (String, String) {
    let text = std::fs::read_to_string(corpus.join("images/plain.manifest.jsonl")).unwrap();
    let entries = parse_manifest(&text).unwrap();
    let e = entries
        .iter()
        .filter(|e| e["type"] == 8 && e["size"].as_u64().unwrap_or(0) > 10_000)
        .find(|e| {
            e["mode"].as_str().is_some_and(|m| {
                m.ends_with('4') || m.ends_with('5') || m.ends_with('6') || m.ends_with('7')
            })
        })
        .expect("a world-readable file of some size");
    (
        e["path"].as_str().unwrap().to_owned(),
        e["sha256"].as_str().unwrap().to_owned(),
    )
}

fn sha256_of(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

const TEST_USER: &str = "immount-fuse-test";

#[test]
fn plain_user_mounts_through_fusermount3() {
    require_root!();
    let corpus = corpus_dir();
    let (file, sum) = sample_file(&corpus);
    ensure_test_user();
    // Distributions make /dev/fuse 0666 (fusermount3 opens it with the
    // user's own rights); some containers leave it 0600. Make it standard.
    let fuse_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata("/dev/fuse").unwrap().permissions(),
    );
    if fuse_mode & 0o006 != 0o006 {
        eprintln!("note: making /dev/fuse 0666 as distributions do");
        std::fs::set_permissions(
            "/dev/fuse",
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
    }
    // The user needs a program, image and mount point it can reach.
    let dir = TempDir::new("user");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let exe = dir.0.join("immount");
    std::fs::copy(bin(), &exe).unwrap();
    let image = dir.0.join("plain.erofs");
    std::fs::copy(corpus.join("images/plain.erofs"), &image).unwrap();
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let chown = Command::new("chown")
        .arg(TEST_USER)
        .arg(&mp)
        .status()
        .unwrap();
    assert!(chown.success());
    let _guard = MountGuard {
        mountpoint: mp.clone(),
    };
    let script = format!(
        "set -e; {exe} mount --sandbox-user 4242 {image} {mp}; sha256sum '{mp}{file}'; \
         {exe} umount {mp}",
        exe = exe.display(),
        image = image.display(),
        mp = mp.display()
    );
    let out = Command::new("runuser")
        .args(["-u", TEST_USER, "--", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "as a plain user: {stderr}");
    assert_eq!(sha256_of(&out.stdout), sum, "content read as a plain user");
    // A uid to switch to means nothing to a plain user's server: said once.
    assert_eq!(
        stderr.matches("--sandbox-user applies only when").count(),
        1,
        "{stderr}"
    );
    wait_until("the user's mount is gone", Duration::from_secs(10), || {
        !is_mounted(&mp)
    });
}

#[test]
fn mounts_directly_inside_an_unprivileged_user_namespace() {
    require_root!();
    let corpus = corpus_dir();
    let (file, sum) = sample_file(&corpus);
    let dir = TempDir::new("userns");
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let script = format!(
        "set -e; {exe} mount {image} {mp}; grep -q 'fuse.immount' /proc/self/mounts; sha256sum '{mp}{file}'; {exe} umount {mp}",
        exe = bin().display(),
        image = corpus.join("images/plain.erofs").display(),
        mp = mp.display()
    );
    // As root, `unshare -Urm` still makes a user namespace; run it as the
    // test user when there is one so that it is really unprivileged.
    let mut cmd = Command::new("unshare");
    cmd.args(["-Urm", "sh", "-c", &script]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "in a user namespace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_of(&out.stdout), sum);
}

/// Walk a mount, reading everything, bounded against cycles. Returns the
/// number of entries seen; panics on ENOTCONN (the server died).
fn hostile_walk(root: &Path) -> usize {
    const ENOTCONN: i32 = 107;
    let check = |e: &std::io::Error, what: &Path| {
        assert_ne!(
            e.raw_os_error(),
            Some(ENOTCONN),
            "server gone while reading {}",
            what.display()
        );
    };
    let mut seen = 0usize;
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                check(&e, &dir);
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    check(&e, &dir);
                    break;
                }
            };
            seen += 1;
            if seen > 50_000 {
                return seen;
            }
            let path = entry.path();
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() && depth < 24 => stack.push((path, depth + 1)),
                Ok(m) if m.is_file() => {
                    if let Err(e) = std::fs::read(&path) {
                        check(&e, &path);
                    }
                }
                Ok(m) if m.file_type().is_symlink() => {
                    if let Err(e) = std::fs::read_link(&path) {
                        check(&e, &path);
                    }
                }
                Ok(_) => {}
                Err(e) => check(&e, &path),
            }
        }
    }
    seen
}

#[test]
fn mutated_images_fail_requests_not_the_server() {
    require_root!();
    let corpus = corpus_dir();
    let original = std::fs::read(corpus.join("images/plain.erofs")).unwrap();
    let dir = TempDir::new("mutants");
    // The metadata (inodes, directories, xattrs) of the plain image sits
    // after the superblock; flip bytes there, deterministically.
    let meta_end = original.len().min(256 * 1024);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut mounted, mut refused) = (0, 0);
    for round in 0..24 {
        let mut bytes = original.clone();
        for _ in 0..(4 + round * 2) {
            let at = 1024 + 128 + (next() as usize % (meta_end - 1024 - 128));
            bytes[at] ^= (next() as u8) | 1;
        }
        let image = dir.0.join(format!("mutant-{round}.erofs"));
        std::fs::write(&image, &bytes).unwrap();
        let mp = dir.0.join(format!("mnt-{round}"));
        std::fs::create_dir(&mp).unwrap();
        let guard = match mount(&image, &[], &mp) {
            Ok(g) => g,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        mounted += 1;
        hostile_walk(&guard.mountpoint);
        // Still serving after all that.
        std::fs::symlink_metadata(&guard.mountpoint).expect("the mount still answers");
        umount(&guard.mountpoint);
    }
    eprintln!("{mounted} mutants mounted and walked, {refused} refused at mount");
    assert!(
        mounted > 0,
        "no mutant could be mounted: the mutation is too coarse to test anything"
    );
}

fn spawn_foreground(image: &Path, mountpoint: &Path) -> ChildGuard {
    let child = Command::new(bin())
        .args(["mount", "-f"])
        .arg(image)
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = ChildGuard(child);
    let mp = mountpoint.canonicalize().unwrap();
    wait_until("mounted", Duration::from_secs(10), || is_mounted(&mp));
    child
}

fn wait_exit(child: &mut ChildGuard, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            return st;
        }
        assert!(start.elapsed() < timeout, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_unmounts_and_exits() {
    require_root!();
    let corpus = corpus_dir();
    let dir = TempDir::new("sigterm");
    let mp = dir.0.canonicalize().unwrap();
    let _guard = MountGuard {
        mountpoint: mp.clone(),
    };
    let mut child = spawn_foreground(&corpus.join("images/plain.erofs"), &mp);
    assert!(std::fs::read_dir(&mp).unwrap().count() > 3);
    let st = Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(
        status.success(),
        "server exit status after SIGTERM: {status}"
    );
    assert!(!is_mounted(&mp), "still mounted after SIGTERM");
}

#[test]
fn umount_makes_the_server_exit() {
    require_root!();
    let corpus = corpus_dir();
    let dir = TempDir::new("umount");
    let mp = dir.0.canonicalize().unwrap();
    let _guard = MountGuard {
        mountpoint: mp.clone(),
    };
    let mut child = spawn_foreground(&corpus.join("images/plain.erofs"), &mp);
    assert!(std::fs::read_dir(&mp).unwrap().count() > 3);
    let st = Command::new("umount").arg(&mp).status().unwrap();
    assert!(st.success());
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(
        status.success(),
        "server exit status after umount: {status}"
    );
}

#[test]
fn bad_image_and_bad_usage_exit_codes() {
    require_root!();
    let dir = TempDir::new("codes");
    let junk = dir.0.join("junk.erofs");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let _guard = MountGuard {
        mountpoint: mp.canonicalize().unwrap(),
    };
    let out = Command::new(bin())
        .arg("mount")
        .arg(&junk)
        .arg(&mp)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    let out = Command::new(bin())
        .arg("mount")
        .arg(dir.0.join("missing"))
        .arg(&mp)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin())
        .args(["mount", "-o", "rw"])
        .arg(corpus_dir().join("images/plain.erofs"))
        .arg(&mp)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!is_mounted(&mp.canonicalize().unwrap()));
}

/// As root the confined server is forked while the mount is being made
/// (see crates/fuse/src/daemon.rs): when `mount(2)` then fails (here: a
/// directory's root over a regular file), the forked server must end
/// without a word and leave nothing behind, and the one error line is the
/// mount's.
#[test]
fn a_mount_failing_after_the_server_was_forked_leaves_nothing() {
    require_root!();
    let dir = TempDir::new("late-fail");
    let target = dir.0.join("a-file");
    std::fs::write(&target, b"not a directory").unwrap();
    let target = target.canonicalize().unwrap();
    let _guard = MountGuard {
        mountpoint: target.clone(),
    };
    for extra in [&[][..], &["--sandbox-report"][..]] {
        let out = Command::new(bin())
            .arg("mount")
            .args(extra)
            .arg(corpus_dir().join("images/plain.erofs"))
            .arg(&target)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "one clear line: {err}");
        assert!(err.contains("cannot mount on"), "{err}");
        assert!(!is_mounted(&target));
        assert_eq!(
            processes_naming(target.to_str().unwrap()),
            Vec::new(),
            "a server or supervisor was left behind"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"not a directory");
    }
}

/// Root of a user namespace that shares the host's mount namespace
/// (`unshare -Ur`, no `-m`): the confining thread prepares, but `mount(2)`
/// is refused (EPERM), the server forked ahead ends without a word, the
/// usual way tries fusermount3, which cannot mount there either; what is
/// left is one clear line, exit code 2, nothing mounted and no process.
#[test]
fn root_of_a_user_namespace_without_its_own_mounts_gets_one_clear_error() {
    require_root!();
    let dir = TempDir::new("userns-no-mnt");
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();
    let _guard = MountGuard {
        mountpoint: mp.clone(),
    };
    let out = Command::new("unshare")
        .arg("-Ur")
        .arg(bin())
        .arg("mount")
        .arg(corpus_dir().join("images/plain.erofs"))
        .arg(&mp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    assert!(err.contains("cannot mount on"), "{err}");
    // The refusal of mount(2) led to the usual way, which tried fusermount3.
    assert!(err.contains("fusermount3"), "{err}");
    assert!(!is_mounted(&mp));
    assert_eq!(
        processes_naming(mp.to_str().unwrap()),
        Vec::new(),
        "a server or supervisor was left behind"
    );
}

/// A kernel EROFS mount of `image` (loop, read-only); the guard unmounts.
/// `None` when the kernel cannot mount EROFS here.
fn kernel_mount(image: &Path, mountpoint: &Path) -> Option<MountGuard> {
    let out = Command::new("mount")
        .args(["-t", "erofs", "-o", "ro,loop"])
        .arg(image)
        .arg(mountpoint)
        .output()
        .unwrap();
    let guard = MountGuard {
        mountpoint: mountpoint.canonicalize().unwrap(),
    };
    if !out.status.success() {
        eprintln!(
            "note: the kernel cannot mount {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(guard)
}

/// `statfs(2)` figures as `stat -f` prints them: block size, fundamental
/// block size, blocks, free, available, files, free files, name length.
fn statfs_of(path: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%s %S %b %f %a %c %d %l"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn statfs_matches_the_kernel() {
    require_root!();
    let corpus = corpus_dir();
    // Both block sizes, compressed and not.
    for name in ["plain", "bs512", "lz4hc-big", "tar-full"] {
        let image = corpus.join(format!("images/{name}.erofs"));
        let (kdir, fdir) = (TempDir::new("statfs-k"), TempDir::new("statfs-f"));
        let Some(kernel) = kernel_mount(&image, &kdir.0) else {
            return;
        };
        let ours = mount(&image, &[], &fdir.0).unwrap();
        let (want, got) = (statfs_of(&kernel.mountpoint), statfs_of(&ours.mountpoint));
        assert_eq!(got, want, "{name}: statfs through immount vs the kernel");
        // The image is full by definition: nothing free, nothing available.
        assert!(want.contains(" 0 0 "), "{name}: {want}");
    }
}

/// Create the unprivileged test user once.
fn ensure_test_user() {
    let exists = Command::new("id")
        .arg("-u")
        .arg(TEST_USER)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let st = Command::new("useradd")
            .args(["--system", "--no-create-home", TEST_USER])
            .status()
            .unwrap();
        // Another test may have created it meanwhile.
        let now = Command::new("id")
            .arg("-u")
            .arg(TEST_USER)
            .output()
            .unwrap();
        assert!(st.success() || now.status.success(), "useradd failed");
    }
}

/// Lists every path's xattr names, and probes the trusted.* values of the
/// plain image, as JSON.
const XATTR_PROBE: &str = r#"
import json, os, sys
root = sys.argv[1]
out = []
for dp, dns, fns in os.walk(root):
    dns.sort()
    for n in sorted(dns + fns):
        p = os.path.join(dp, n)
        try:
            names = sorted(os.listxattr(p, follow_symlinks=False))
        except OSError as e:
            names = "E%d" % e.errno
        probe = {}
        for x in ["trusted.overlay.opaque", "trusted.on-link", "user.mime_type"]:
            try:
                probe[x] = os.getxattr(p, x, follow_symlinks=False).hex()
            except OSError as e:
                probe[x] = "E%d" % e.errno
        out.append([p[len(root):], names, probe])
print(json.dumps(out))
"#;

fn xattr_view(mountpoint: &Path, as_user: Option<&str>) -> String {
    let mut cmd = match as_user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--", "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    let out = cmd
        .arg("-c")
        .arg(XATTR_PROBE)
        .arg(mountpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xattr probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The kernel lists `trusted.*` only to callers with CAP_SYS_ADMIN, and
/// the VFS refuses their values to others: a plain user sees exactly what
/// it sees on the kernel's own mount, and root still sees them all.
#[test]
fn trusted_xattrs_are_hidden_from_plain_users_like_the_kernel() {
    require_root!();
    ensure_test_user();
    let image = corpus_dir().join("images/plain.erofs");
    let (kdir, fdir) = (TempDir::new("xattr-k"), TempDir::new("xattr-f"));
    for d in [&kdir.0, &fdir.0] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let Some(kernel) = kernel_mount(&image, &kdir.0) else {
        return;
    };
    let (out, ours) = run_mount(["-o", "allow_other"], &image, &fdir.0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user_kernel = xattr_view(&kernel.mountpoint, Some(TEST_USER));
    let user_ours = xattr_view(&ours.mountpoint, Some(TEST_USER));
    let names = |view: &str| -> Vec<String> {
        let rows: Vec<serde_json::Value> = serde_json::from_str(view).unwrap();
        rows.iter()
            .filter_map(|r| r[1].as_array())
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect()
    };
    assert!(
        names(&user_kernel).iter().any(|n| n.starts_with("user.")),
        "the probe sees no xattrs at all"
    );
    assert!(
        !names(&user_ours).iter().any(|n| n.starts_with("trusted.")),
        "a plain user is shown trusted.* names"
    );
    assert_eq!(user_ours, user_kernel, "as a plain user");
    let root_kernel = xattr_view(&kernel.mountpoint, None);
    let root_ours = xattr_view(&ours.mountpoint, None);
    assert!(names(&root_ours).contains(&"trusted.overlay.opaque".to_owned()));
    assert_eq!(root_ours, root_kernel, "as root");
}

/// Bytes of `file` in the page cache, from util-linux's fincore.
fn resident_bytes(file: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["-n", "-b", "-o", "RES"])
        .arg(file)
        .output()
        .expect("fincore (util-linux)");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// As root the mount's readahead is raised to what a READ may carry (1 MiB,
/// or `-o readahead_kb`), whichever way the server was started: the
/// confined server forked before the mount answers INIT after the main
/// thread raised it, and the kernel then keeps the lesser of the two
/// (it fell back to 128 KiB, and cold reads slowed by 5%).
#[test]
fn the_readahead_is_raised_however_the_server_starts() {
    require_root!();
    let image = corpus_dir().join("images/plain.erofs");
    let cases: [(&[&str], &str); 3] = [
        (&[], "1024"),
        (&["-o", "readahead_kb=2048"], "2048"),
        (&["--no-sandbox"], "1024"),
    ];
    for (args, want) in cases {
        let dir = TempDir::new("readahead");
        let (out, guard) = run_mount(args, &image, &dir.0);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = mount_device(&guard.mountpoint);
        let ra = std::fs::read_to_string(format!("/sys/class/bdi/{dev}/read_ahead_kb")).unwrap();
        umount(&guard.mountpoint);
        assert_eq!(ra.trim(), want, "{args:?}");
    }
}

/// The `major:minor` of the mount at `mountpoint` (from mountinfo).
fn mount_device(mountpoint: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4).copied() == mountpoint.to_str()).then(|| f[2].to_owned())
        })
        .expect("mounted")
}

/// Reading every file leaves the files' data in the FUSE files' page cache
/// but not the image's copy of it: only metadata (and what was fetched
/// around it) stays cached. Seen: 18% of the plain image and 25% of the lz4
/// one, against 100% with the kernel's loop mount and 80-87% when the
/// server left readahead to the kernel.
#[test]
fn reading_everything_does_not_cache_the_image_twice() {
    require_root!();
    let corpus = corpus_dir();
    for name in ["plain", "lz4"] {
        let dir = TempDir::new("pagecache");
        // A private copy: other tests' mounts of the corpus image share
        // its page cache. Written back, then dropped from the cache.
        let image = dir.0.join("image.erofs");
        std::fs::copy(corpus.join(format!("images/{name}.erofs")), &image).unwrap();
        std::fs::File::open(&image).unwrap().sync_all().unwrap();
        let st = Command::new("dd")
            .arg(format!("if={}", image.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .unwrap();
        assert!(st.success());
        let before = resident_bytes(&image);
        let size = std::fs::metadata(&image).unwrap().len();
        assert!(
            before < size / 4,
            "{name}: could not drop the image's pages"
        );
        let mp = dir.0.join("mnt");
        std::fs::create_dir(&mp).unwrap();
        let guard = mount(&image, &[], &mp).unwrap();
        let mut stack = vec![guard.mountpoint.clone()];
        let mut data = 0u64;
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    stack.push(e.path());
                } else if t.is_file() {
                    data += std::fs::read(e.path()).unwrap().len() as u64;
                }
            }
        }
        let after = resident_bytes(&image);
        umount(&guard.mountpoint);
        eprintln!("{name}: image {size} bytes, {data} bytes of files read, {after} bytes of the image cached after");
        assert!(data > size / 2, "{name}: too little data to tell");
        assert!(
            after < size / 2,
            "{name}: {after} of {size} image bytes stay cached after reading every file"
        );
    }
}

/// Reading a file of a listed directory pushes the files listed after it
/// into the page cache, decoded, before anyone reads them, up to the first
/// window (256 KiB) and no further; `-o nopush` pushes nothing. What was
/// pushed reads back as the kernel's manifest says.
#[test]
fn a_read_pushes_the_next_files_of_its_directory() {
    require_root!();
    let corpus = corpus_dir();
    let page_bytes = |n: u64| n.div_ceil(4096) * 4096;
    for name in ["lz4", "plain"] {
        let manifest =
            std::fs::read_to_string(corpus.join(format!("images/{name}.manifest.jsonl"))).unwrap();
        let sha: BTreeMap<String, String> = parse_manifest(&manifest)
            .unwrap()
            .into_iter()
            .filter_map(|e| {
                Some((
                    e["path"].as_str()?.to_owned(),
                    e["sha256"].as_str()?.to_owned(),
                ))
            })
            .collect();
        for (args, pushing) in [(&[][..], true), (&["-o", "nopush"][..], false)] {
            let dir = TempDir::new("push");
            let image = corpus.join(format!("images/{name}.erofs"));
            let guard = mount_with(&image, &[], args, &dir.0).unwrap();
            let dup = guard.mountpoint.join("dup");
            // Listed, as a walker lists a directory before reading in it.
            let names: Vec<String> = std::fs::read_dir(&dup)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert!(names.contains(&"copy-0".to_owned()) && names.contains(&"tail-3".to_owned()));
            assert_eq!(
                resident_bytes(&dup.join("copy-1")),
                0,
                "{name}: cached before"
            );
            assert_eq!(std::fs::read(dup.join("copy-0")).unwrap().len(), 70000);
            // In listing order: copy-1..3 (70000 bytes each) and tail-0..2
            // (11192, 19384, 27576) fill the window, tail-3 is past it.
            let pushed = ["copy-1", "copy-2", "copy-3", "tail-0", "tail-1", "tail-2"];
            if pushing {
                for f in pushed {
                    let path = dup.join(f);
                    let size = std::fs::metadata(&path).unwrap().len();
                    wait_until(
                        &format!("{name}: {f} pushed"),
                        Duration::from_secs(10),
                        || resident_bytes(&path) == page_bytes(size),
                    );
                }
            } else {
                std::thread::sleep(Duration::from_millis(300));
                for f in pushed {
                    assert_eq!(resident_bytes(&dup.join(f)), 0, "{name}: {f} with nopush");
                }
            }
            assert_eq!(
                resident_bytes(&dup.join("tail-3")),
                0,
                "{name}: past the window"
            );
            for f in pushed {
                let out = Command::new("sha256sum").arg(dup.join(f)).output().unwrap();
                let want = &sha[&format!("/dup/{f}")];
                assert_eq!(&sha256_of(&out.stdout), want, "{name}: {f} as pushed");
            }
            umount(&guard.mountpoint);
        }
    }
}

/// A confined server started as root: nobody, no capabilities,
/// no_new_privs, a seccomp filter.
fn assert_confined_as_nobody(server: u32) {
    assert_eq!(
        status_field(server, "Uid:").split_whitespace().next(),
        Some("65534")
    );
    assert_eq!(status_field(server, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(server, "NoNewPrivs:"), "1");
    assert_eq!(status_field(server, "Seccomp:"), "2");
}

/// The corpus's sample file reads back whole through `mountpoint`.
fn assert_serves_the_sample(mountpoint: &Path) {
    let (file, sum) = sample_file(&corpus_dir());
    let out = Command::new("sha256sum")
        .arg(format!("{}{file}", mountpoint.display()))
        .output()
        .unwrap();
    assert_eq!(sha256_of(&out.stdout), sum);
}

/// Kill the server: its supervisor must unmount `mountpoint` and exit.
fn kill_and_expect_cleanup(server: u32, supervisor: u32, mountpoint: &Path) {
    let st = Command::new("kill")
        .args(["-KILL", &server.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_until("the supervisor unmounted", Duration::from_secs(10), || {
        !is_mounted(mountpoint)
    });
    wait_until_ended("the supervisor exited", supervisor);
}

/// The confined server serving `mountpoint` and its supervisor (its
/// parent, which names the mount point too): (server, supervisor).
fn server_and_supervisor(mountpoint: &str) -> (u32, u32) {
    let procs = processes_naming(mountpoint);
    procs
        .iter()
        .copied()
        .find(|(_, ppid)| procs.iter().any(|(p, _)| p == ppid))
        .expect("a supervisor and its server")
}

/// Wait (10 s at most) until process `pid` is gone or a zombie.
fn wait_until_ended(what: &str, pid: u32) {
    wait_until(what, Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists() || status_field(pid, "State:").starts_with('Z')
    });
}

/// Processes whose command line names `needle`, with their parent pids.
fn processes_naming(needle: &str) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        found.push((pid, ppid));
    }
    found
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// By default the server confines itself behind a supervisor: the process
/// that parses the image runs as nobody with no capabilities, no_new_privs
/// and a seccomp filter, and when it dies (killed here) the supervisor
/// unmounts, so the mount point never stays dead (ENOTCONN).
#[test]
fn the_server_is_confined_and_its_supervisor_cleans_up() {
    require_root!();
    let dir = TempDir::new("sandbox");
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let image = corpus_dir().join("images/plain.erofs");
    let (out, guard) = run_mount(["--sandbox-report"], &image, &mp);
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("seccomp"), "no sandbox report: {report}");
    // As root, the namespaces were made ahead, while the image was mounted,
    // and kept for the servers that follow, or joined: kept by an earlier
    // one.
    assert!(
        report.contains("unshare (ahead)") || report.contains("join kept namespaces (ahead)"),
        "{report}"
    );
    assert!(
        report.contains("namespaces:        made, and kept in /run/immount/ns")
            || report.contains(
                "namespaces:        shared by immount servers, joined from /run/immount/ns"
            ),
        "{report}"
    );
    assert!(std::fs::read_dir(&guard.mountpoint).unwrap().count() > 3);
    let (server, supervisor) = server_and_supervisor(guard.mountpoint.to_str().unwrap());
    assert_confined_as_nobody(server);
    // Named as its program, like its supervisor (not after the thread it
    // was forked from).
    assert_eq!(
        status_field(server, "Name:"),
        status_field(supervisor, "Name:")
    );
    // Only the fds serving needs: stdio (on /dev/null), the image and the
    // /dev/fuse clones.
    for fd in std::fs::read_dir(format!("/proc/{server}/fd")).unwrap() {
        let fd = fd.unwrap();
        let target = std::fs::read_link(fd.path()).unwrap();
        let n: u32 = fd.file_name().to_str().unwrap().parse().unwrap();
        let ok = match n {
            0..=2 => target == Path::new("/dev/null"),
            _ => target == Path::new("/dev/fuse") || target.ends_with("plain.erofs"),
        };
        assert!(ok, "server fd {n} -> {}", target.display());
    }
    // Forked from a thread started on a CPU of its own, the server and
    // every one of its threads may still run on every CPU we may.
    let cpus = |status: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_owned())
            .unwrap()
    };
    let ours = cpus(&std::fs::read_to_string("/proc/self/status").unwrap());
    for task in std::fs::read_dir(format!("/proc/{server}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert_eq!(cpus(&status), ours, "a server thread is held to fewer CPUs");
    }
    // A network namespace of its own.
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(
        ns(&server.to_string()),
        ns("self"),
        "the server shares the host's network namespace"
    );
    // Still serving once confined.
    assert_serves_the_sample(&guard.mountpoint);
    // The server dies: the supervisor unmounts and exits.
    kill_and_expect_cleanup(server, supervisor, &guard.mountpoint);
}

/// `--sandbox-user` and `--sandbox-memory` choose who the server becomes
/// and what it may allocate; a bad value is one clear error and no mount.
#[test]
fn the_servers_identity_and_memory_cap_are_the_users_choice() {
    require_root!();
    let dir = TempDir::new("sandbox-user");
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let image = corpus_dir().join("images/plain.erofs");
    let (out, guard) = run_mount(
        ["--sandbox-user", "4242:4343", "--sandbox-memory", "256M"],
        &image,
        &mp,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (server, _) = server_and_supervisor(guard.mountpoint.to_str().unwrap());
    let ids = |field| {
        status_field(server, field)
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("Uid:"), ["4242"; 4]);
    assert_eq!(ids("Gid:"), ["4343"; 4]);
    assert_eq!(ids("Groups:"), Vec::<String>::new());
    let limits = std::fs::read_to_string(format!("/proc/{server}/limits")).unwrap();
    let data = limits
        .lines()
        .find(|l| l.starts_with("Max data size"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(data, ["268435456", "268435456"], "{limits}");
    // Still serving, as that user.
    assert_serves_the_sample(&guard.mountpoint);
    drop(guard);

    for bad in [
        &["--sandbox-user", "0:4343"][..],
        &["--sandbox-user", "no-such-user"][..],
        &["--sandbox-memory", "1M"][..],
    ] {
        let (out, guard) = run_mount(bad, &image, &mp);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(err.contains(bad[0]), "{bad:?}: {err}");
        assert!(!is_mounted(&guard.mountpoint), "{bad:?} mounted");
    }
}

/// Runs a program with `setns(2)` and `unshare(2)` failing with EPERM (a
/// seccomp filter, as some container runtimes install for root): `python3
/// - PROGRAM ARGS...`. The filter needs no `no_new_privs` from root.
const WITHOUT_NAMESPACES: &str = r#"
import ctypes, os, platform, struct, sys
arch, deny = {"x86_64": (0xC000003E, [272, 308]), "aarch64": (0xC00000B7, [97, 268])}[platform.machine()]
n = len(deny)
ins = [(0x20, 0, 0, 4), (0x15, 0, n + 1, arch), (0x20, 0, 0, 0)]
ins += [(0x15, n - k, 0, nr) for k, nr in enumerate(deny)]
ins += [(0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x00050000 | 1)]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in ins))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(len(ins), ctypes.cast(code, ctypes.c_void_p))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
    sys.exit("prctl: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"#;

/// Root whose namespaces are denied (a container's seccomp profile): the
/// confining thread cannot make them, so the mount is made first and the
/// server is forked the usual way, on the mount already made, and still
/// confined as far as it can be (identity, capabilities, no_new_privs,
/// seccomp; the host's network namespace, which socket() denial covers).
#[test]
fn root_without_namespaces_still_gets_a_confined_server() {
    require_root!();
    if !matches!(std::env::consts::ARCH, "x86_64" | "aarch64") {
        eprintln!("skipped: the filter here knows x86_64 and aarch64");
        return;
    }
    let dir = TempDir::new("no-ns");
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mut child = Command::new("python3")
        .args(["-", bin().to_str().unwrap(), "mount", "--sandbox-report"])
        .arg(corpus_dir().join("images/plain.erofs"))
        .arg(&mp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(WITHOUT_NAMESPACES.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let guard = MountGuard {
        mountpoint: mp.canonicalize().unwrap(),
    };
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("seccomp"), "no sandbox report: {report}");
    // Not the way ahead: nothing was made or joined before the fork; and
    // the report says what could not be made.
    assert!(!report.contains("(ahead)"), "{report}");
    assert!(report.contains("net namespace:     no"), "{report}");
    let (server, supervisor) = server_and_supervisor(guard.mountpoint.to_str().unwrap());
    assert_confined_as_nobody(server);
    assert_serves_the_sample(&guard.mountpoint);
    // Its supervisor still cleans up after it.
    kill_and_expect_cleanup(server, supervisor, &guard.mountpoint);
}

/// When a user unmounts and mounts again at the same path before the old
/// supervisor has noticed its server's end, that supervisor must not take
/// the new mount down with its cleanup (it did: it unmounted by path
/// whenever its server ended). Its supervisor is stopped here across the
/// unmount and the new mount to make the order certain.
#[test]
fn an_old_supervisor_leaves_a_newer_mount_alone() {
    require_root!();
    let dir = TempDir::new("remount");
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();
    let mount = || {
        let out = Command::new(bin())
            .arg("mount")
            .arg(corpus_dir().join("images/plain.erofs"))
            .arg(&mp)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    mount();
    let guard = MountGuard {
        mountpoint: mp.clone(),
    };
    let (old_server, old_supervisor) = server_and_supervisor(mp.to_str().unwrap());
    let signal = |sig: &str, pid: u32| {
        let st = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    signal("-STOP", old_supervisor);
    let st = Command::new("umount").arg(&mp).status().unwrap();
    assert!(st.success());
    wait_until_ended("the old server ended", old_server);
    mount();
    signal("-CONT", old_supervisor);
    wait_until_ended("the old supervisor exited", old_supervisor);
    assert!(
        is_mounted(&mp),
        "the old supervisor unmounted the new mount"
    );
    assert!(std::fs::read_dir(&mp).unwrap().count() > 3);
    drop(guard);
}

/// `--no-sandbox` serves unconfined (and says so).
#[test]
fn no_sandbox_serves_unconfined() {
    require_root!();
    let dir = TempDir::new("nosandbox");
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let image = corpus_dir().join("images/plain.erofs");
    let (out, guard) = run_mount(["--no-sandbox"], &image, &mp);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning"), "no warning: {stderr}");
    let procs = processes_naming(guard.mountpoint.to_str().unwrap());
    assert_eq!(procs.len(), 1, "one unconfined server, no supervisor");
    assert_eq!(status_field(procs[0].0, "Seccomp:"), "0");
    umount(&guard.mountpoint);
}

/// Mount with `--root-hash`: a changed byte fails only the reads that touch it, with EIO, and the
/// server keeps serving; a wrong root hash refuses the mount (exit 1).
#[test]
fn verity_through_the_mount() {
    require_root!();
    let dir = TempDir::new("verity");
    let img = dir.0.join("v.erofs");
    std::fs::copy(corpus_dir().join("images/plain.erofs"), &img).unwrap();
    let tree = dir.0.join("v.tree");
    let out = Command::new(bin().with_file_name("immount"))
        .args(["verity", "format"])
        .arg(&img)
        .arg("--hash-file")
        .arg(&tree)
        .output()
        .unwrap();
    if !out.status.success() {
        // The fuse crate's twin binary has no verity subcommand; the real
        // immount is built by `cargo test --workspace`.
        panic!(
            "immount verity format: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let root = text
        .split_whitespace()
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .expect("root hash")
        .to_string();
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mount_with = |root: &str| {
        Command::new(bin())
            .arg("mount")
            .arg("--root-hash")
            .arg(root)
            .arg("--verity-data")
            .arg(&tree)
            .arg(&img)
            .arg(&mp)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // A wrong root hash: refused, nothing mounted.
    let wrong = format!(
        "{}{}",
        &root[..63],
        if root.ends_with('0') { '1' } else { '0' }
    );
    let out = mount_with(&wrong);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mp.canonicalize().unwrap()));

    // Change one byte inside /big/noise-256k's data (found through the
    // offline reader) and mount with the right root hash.
    let image = erofs::Image::open(std::sync::Arc::new(std::fs::read(&img).unwrap())).unwrap();
    let victim = image.resolve(b"/big/noise-256k").unwrap();
    let first = {
        let mut b = [0u8; 1];
        image.read(&victim, 100_000, &mut b).unwrap();
        b[0]
    };
    let mut data = std::fs::read(&img).unwrap();
    let mut needle = vec![0u8; 64];
    image.read(&victim, 100_000, &mut needle).unwrap();
    let at = data
        .windows(64)
        .position(|w| w == needle.as_slice())
        .expect("the file's bytes in the image");
    assert_eq!(data[at], first);
    data[at] ^= 0xff;
    std::fs::write(&img, &data).unwrap();
    let out = mount_with(&root);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let guard = MountGuard {
        mountpoint: mp.canonicalize().unwrap(),
    };
    let err = std::fs::read(guard.mountpoint.join("big/noise-256k")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The rest still reads, and equals the original.
    let good = std::fs::read(guard.mountpoint.join("links/hard-a")).unwrap();
    assert_eq!(good.len(), 5000);
    assert!(
        std::fs::read_dir(guard.mountpoint.join("bigdir"))
            .unwrap()
            .count()
            == 3000
    );
    drop(guard);
}

/// Root of `unshare -Urm` (a user namespace that maps only uid 0) has no
/// uid 65534 to switch to; the server must still be confined in every other
/// way — seccomp, no_new_privs, no capability, its own network namespace —
/// not served unconfined.
#[test]
fn the_server_inside_a_root_only_user_namespace_is_still_confined() {
    require_root!();
    let corpus = corpus_dir();
    let (file, sum) = sample_file(&corpus);
    let dir = TempDir::new("userns-confined");
    let mp = dir.0.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    // The mount lives in the namespace's own mount table: the script
    // mounts, waits for the test to look at the server from outside, reads
    // a file and unmounts, also when stdin closes early (a failed test).
    let script = format!(
        "{exe} mount {image} {mp} || exit 1; echo mounted; read -r _; sha256sum '{mp}{file}'; {exe} umount {mp}",
        exe = bin().display(),
        image = corpus.join("images/plain.erofs").display(),
        mp = mp.display()
    );
    // On drop (also when an assertion fails) the script is told to go on
    // and is waited for, so that it unmounts: killing it would leave the
    // server serving a mount in a namespace nobody can reach.
    struct Script(Child);
    impl Drop for Script {
        fn drop(&mut self) {
            drop(self.0.stdin.take());
            let _ = self.0.wait();
        }
    }
    let mut child = Script(
        Command::new("unshare")
            .args(["-Urm", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    if line.trim() != "mounted" {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
        panic!("mount inside unshare -Urm failed: {err}");
    }
    let (server, _) = server_and_supervisor(mp.to_str().unwrap());
    let checks = [
        ("Seccomp:", status_field(server, "Seccomp:"), "2"),
        ("NoNewPrivs:", status_field(server, "NoNewPrivs:"), "1"),
        (
            "CapEff:",
            status_field(server, "CapEff:"),
            "0000000000000000",
        ),
        (
            "CapPrm:",
            status_field(server, "CapPrm:"),
            "0000000000000000",
        ),
    ];
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let own_netns = ns(&server.to_string()) != ns("self");
    // Let the script read and unmount, then judge.
    drop(child.0.stdin.take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.0.wait().unwrap();
    for (name, got, want) in checks {
        assert_eq!(got, want, "server {name} inside unshare -Urm");
    }
    assert!(own_netns, "the server shares the host's network namespace");
    assert!(status.success(), "the script failed: {status}");
    assert_eq!(sha256_of(rest.as_bytes()), sum);
}
