//! immountd end to end, as root: each test starts the daemon on a
//! temporary socket with a temporary policy and runs clients as an
//! unprivileged user it creates (`immountd-test`, with useradd).
//!
//! Needs root, /dev/fuse, fusermount3 (package fuse3), setpriv and unshare
//! (util-linux), openssl, and python3 with the `varlink` package (PyPI).
//! Without root every test says so and passes vacuously.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mountd::varlink::Connection;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_immountd");
const USER: &str = "immountd-test";

fn sample_image() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sample/sample.erofs")
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// The test user's uid and gid, created once.
fn test_user() -> (u32, u32) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, USER])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<u32>().ok())
    };
    if id("-u").is_none() {
        // Another test binary may be creating it at the same moment.
        let _ = Command::new("useradd")
            .args(["-M", "-s", "/usr/sbin/nologin", USER])
            .status();
    }
    (id("-u").expect("useradd"), id("-g").expect("useradd"))
}

/// Run `args` as the test user.
fn as_user(args: &[&str]) -> Output {
    let (uid, gid) = test_user();
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .args(args)
        .env_remove("IMMOUNT_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}; stdout {}; stderr {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A running daemon in a temporary directory (mode 0755, so the test user
/// can reach it). Dropping it detaches every mount below the directory and
/// kills the daemon.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(policy: &str) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("immountd-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let policy_path = dir.path().join("policy.toml");
        fs::write(&policy_path, policy).unwrap();
        let socket = dir.path().join("run/io.immount.Mount");
        let log = dir.path().join("daemon.log");
        let child = Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(&policy_path)
            .stdin(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            dir,
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&d.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A copy of the sample image readable by everyone.
    fn image(&self) -> PathBuf {
        let p = self.path("sample.erofs");
        if !p.exists() {
            fs::copy(sample_image(), &p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        }
        p
    }

    /// A directory owned by the test user (or root).
    fn dir_owned(&self, name: &str, by_user: bool) -> PathBuf {
        let p = self.path(name);
        fs::create_dir_all(&p).unwrap();
        if by_user {
            let (uid, gid) = test_user();
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        }
        p
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Our daemon's children: its live per-mount servers.
    fn servers(&self) -> Vec<u32> {
        let me = self.pid();
        let mut out = Vec::new();
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command name (which may hold spaces).
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(me) {
                out.push(pid);
            }
        }
        out
    }

    fn wait_no_servers(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.servers().is_empty() {
            assert!(
                Instant::now() < deadline,
                "servers left: {:?}\n{}",
                self.servers(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// The daemon's descriptor count once it has stopped changing (a
    /// connection thread closes its socket a moment after the client).
    fn settled_fd_count(&self) -> usize {
        let mut last = self.fd_count();
        let mut stable = 0;
        while stable < 5 {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.fd_count();
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
        }
        last
    }

    /// Wait until the daemon holds `want` descriptors again.
    fn wait_fd_count(&self, want: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.fd_count() != want {
            assert!(
                Instant::now() < deadline,
                "daemon fds: {want} before, {} after",
                self.fd_count()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Mount points below our directory, from the host's mountinfo.
    fn mounts(&self) -> Vec<String> {
        let base = self.dir.path().to_string_lossy().into_owned();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&base))
            .collect()
    }

    fn mount_options(&self, point: &Path) -> String {
        let p = point.to_string_lossy().into_owned();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .rev()
            .find(|l| l.split(' ').nth(4) == Some(p.as_str()))
            .map(str::to_owned)
            .unwrap_or_default()
    }

    fn connect(&self) -> Connection<UnixStream> {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Connection::new(s)
    }

    fn client(&self, extra: &[&str], image: &Path, dir: &Path) -> Vec<String> {
        let mut args = vec![BIN.to_owned(), "mount".into(), "--socket".into()];
        args.push(self.socket.to_string_lossy().into_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(image.to_string_lossy().into_owned());
        args.push(dir.to_string_lossy().into_owned());
        args
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let mut mounts = self.mounts();
        mounts.reverse();
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Call `method` and return the reply.
fn call(conn: &mut Connection<UnixStream>, method: &str, params: Value) -> Value {
    conn.send(&json!({"method": method, "parameters": params}), &[])
        .unwrap();
    let msg = conn.read_message().unwrap();
    serde_json::from_slice(&msg.json).unwrap()
}

const HELLO: &str = "Hello from an EROFS image served by immount.\n";

#[test]
fn unsigned_image_into_an_owned_directory_and_refused_elsewhere() {
    need_root!();
    let (uid, gid) = test_user();
    let d = Daemon::start("");
    let image = d.image();
    let own = d.dir_owned("own", true);
    let out = as_user(&refs(&d.client(&[], &image, &own)));
    assert!(out.status.success(), "{}", text(&out));
    let decision: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["class"], "unsigned");
    assert_eq!(decision["idsKept"], false);
    assert!(decision["imageIdentity"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));

    // Readable by the user, every file owned by the user, nosuid,nodev.
    let hello = own.join("hello.txt");
    let cat = as_user(&["cat", hello.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        HELLO,
        "{}",
        text(&cat)
    );
    let st = as_user(&["stat", "-c", "%u:%g", hello.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&st.stdout).trim(),
        format!("{uid}:{gid}")
    );
    let line = d.mount_options(&own);
    assert!(line.contains(" ro,nosuid,nodev"), "{line}");
    assert!(line.contains("fuse.immount"), "{line}");
    // Served as `immount mount` serves: several worker threads (their
    // /dev/fuse clones opened before the sandbox closed the door) and
    // readahead raised to the 1 MiB a READ may carry.
    let servers = d.servers();
    assert_eq!(servers.len(), 1, "{servers:?}");
    let threads = fs::read_dir(format!("/proc/{}/task", servers[0]))
        .unwrap()
        .count();
    assert!(threads >= 2, "one server thread only");
    let dev = line.split(' ').nth(2).unwrap();
    let ra = fs::read_to_string(format!("/sys/class/bdi/{dev}/read_ahead_kb")).unwrap();
    assert_eq!(ra.trim(), "1024");
    // Only the caller may use it: root (not allow_other) is refused.
    assert!(fs::read(&hello).is_err());

    // A directory the user does not own is refused, and nothing is mounted.
    let theirs = d.dir_owned("theirs", false);
    let out = as_user(&refs(&d.client(&[], &image, &theirs)));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not own"));
    assert!(!d.mount_options(&theirs).contains("fuse.immount"));

    // The user unmounts with fusermount3; the server then exits.
    let un = as_user(&["fusermount3", "-u", own.to_str().unwrap()]);
    assert!(un.status.success(), "{}", text(&un));
    d.wait_no_servers();
    assert!(d.mounts().is_empty(), "{:?}", d.mounts());
    let log = d.log_text();
    assert!(
        log.lines().any(|l| l.contains(&format!("uid={uid}"))
            && l.contains("class=unsigned")
            && l.contains("image=sha256:")
            && l.contains("options=ro,nosuid,nodev,ids=caller")
            && l.contains("result=ok")),
        "{log}"
    );
    assert!(
        log.contains("result=refused (io.immount.Mount.Denied"),
        "{log}"
    );
}

#[test]
fn mount_fd_into_the_callers_own_namespace() {
    need_root!();
    let d = Daemon::start("");
    let image = d.image();
    let dir = d.dir_owned("ns", true);
    let client = d.client(&["--namespace"], &image, &dir).join(" ");
    let hello = dir.join("hello.txt");
    let script = format!(
        "{client} && stat -c %u:%g {h} && cat {h} && grep ' {m} ' /proc/self/mountinfo",
        h = hello.display(),
        m = dir.display()
    );
    let out = as_user(&["unshare", "-Urm", "sh", "-c", &script]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let decision: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(decision["flow"], "namespace");
    // Owned by the caller, who is root inside its namespace.
    assert_eq!(lines.next(), Some("0:0"));
    assert!(stdout.contains(HELLO));
    assert!(stdout.contains("fuse.immount"));
    // The host never saw the mount; when the namespace died, so did it and
    // its server.
    assert!(!d.mount_options(&dir).contains("fuse.immount"));
    d.wait_no_servers();

    // Someone else's user namespace is refused.
    let out = as_user(&refs(&d.client(&["--namespace"], &image, &dir)));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the caller's"),
        "{}",
        text(&out)
    );
}

/// A certificate and key made with openssl in `dir`.
fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    (cert, key)
}

#[test]
fn signed_images_keep_ids_and_bad_signatures_are_refused() {
    need_root!();
    let keys = tempfile::tempdir().unwrap();
    let trust = keys.path().join("trust");
    fs::create_dir(&trust).unwrap();
    let (cert, key) = make_cert(keys.path(), "trusted");
    fs::copy(&cert, trust.join("trusted.pem")).unwrap();
    let (bad_cert, bad_key) = make_cert(keys.path(), "stranger");
    let policy = format!(
        "trust_dirs = [\"{}\"]\n[unsigned]\nallowed = false\n",
        trust.display()
    );
    let d = Daemon::start(&policy);
    let image = d.image();
    let tree = d.path("sample.verity");
    let report =
        verity::format_image(&image, Some(&tree), None, &verity::FormatOptions::default()).unwrap();
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o644)).unwrap();
    let root = report.root_hash.to_hex();
    let sign = |key: &Path, cert: &Path, name: &str| {
        let sig = verity::sign_root_hash(
            &report.root_hash,
            &fs::read(key).unwrap(),
            &fs::read(cert).unwrap(),
        )
        .unwrap();
        let p = d.path(name);
        fs::write(&p, sig).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        p
    };
    let good = sign(&key, &cert, "good.p7s");
    let bad = sign(&bad_key, &bad_cert, "bad.p7s");
    let args = |sig: &Path| {
        vec![
            "--root-hash".to_owned(),
            root.clone(),
            "--verity-data".into(),
            tree.to_string_lossy().into_owned(),
            "--root-hash-sig".into(),
            sig.to_string_lossy().into_owned(),
        ]
    };

    let dir = d.dir_owned("signed", true);
    let out = as_user(&refs(&d.client(&refs(&args(&good)), &image, &dir)));
    assert!(out.status.success(), "{}\n{}", text(&out), d.log_text());
    let decision: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["class"], "signed");
    assert_eq!(decision["idsKept"], true);
    assert_eq!(decision["imageIdentity"], format!("verity:{root}"));
    // Ids kept: the image's root owns its files; allow_other was not asked.
    let hello = dir.join("hello.txt");
    let st = as_user(&["stat", "-c", "%u:%g", hello.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&st.stdout).trim(),
        "0:0",
        "{}",
        text(&st)
    );
    let cat = as_user(&["cat", hello.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&cat.stdout), HELLO);
    assert!(d.mount_options(&dir).contains(" ro,nosuid,nodev"));
    assert!(
        d.log_text().contains("signer=\"CN=trusted\""),
        "{}",
        d.log_text()
    );

    // Signed by an untrusted key: unsigned, which this policy refuses.
    let dir2 = d.dir_owned("badsig", true);
    let out = as_user(&refs(&d.client(&refs(&args(&bad)), &image, &dir2)));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unsigned images are not allowed"),
        "{}",
        text(&out)
    );
    // A garbled signature, and no signature at all: refused the same way.
    let garbled = d.path("garbled.p7s");
    let mut bytes = fs::read(&good).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&garbled, bytes).unwrap();
    fs::set_permissions(&garbled, fs::Permissions::from_mode(0o644)).unwrap();
    let out = as_user(&refs(&d.client(&refs(&args(&garbled)), &image, &dir2)));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = as_user(&refs(&d.client(&["--no-sidecars"], &image, &dir2)));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!d.mount_options(&dir2).contains("fuse.immount"));
    assert!(d.log_text().contains("class=unsigned"), "{}", d.log_text());

    // A wrong root hash with a valid-looking tree fails in the server.
    let mut wrong = root.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let mut a = args(&good);
    a[1] = wrong;
    let out = as_user(&refs(&d.client(&refs(&a), &image, &dir2)));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));

    let un = as_user(&["fusermount3", "-u", dir.to_str().unwrap()]);
    assert!(un.status.success(), "{}", text(&un));
    d.wait_no_servers();
}

#[test]
fn a_root_hash_alone_finds_the_tree_appended_to_the_image() {
    need_root!();
    let d = Daemon::start("");
    let image = d.image();
    // `immount build --verity` appends the tree right after the image's
    // blocks; so does formatting without a hash file.
    let appended = d.path("appended.erofs");
    fs::copy(&image, &appended).unwrap();
    let report =
        verity::format_image(&appended, None, None, &verity::FormatOptions::default()).unwrap();
    assert_eq!(report.hash_offset, fs::metadata(&image).unwrap().len());
    fs::set_permissions(&appended, fs::Permissions::from_mode(0o644)).unwrap();
    let root = report.root_hash.to_hex();

    let dir = d.dir_owned("appended", true);
    let args = ["--no-sidecars", "--root-hash", root.as_str()];
    let out = as_user(&refs(&d.client(&args, &appended, &dir)));
    assert!(out.status.success(), "{}\n{}", text(&out), d.log_text());
    let decision: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["imageIdentity"], format!("verity:{root}"));
    let cat = as_user(&["cat", dir.join("hello.txt").to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        HELLO,
        "{}",
        text(&cat)
    );
    let un = as_user(&["fusermount3", "-u", dir.to_str().unwrap()]);
    assert!(un.status.success(), "{}", text(&un));

    // The same root hash on the image without its tree: refused, nothing
    // mounted.
    let bare = d.dir_owned("bare", true);
    let out = as_user(&refs(&d.client(&args, &image, &bare)));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no verity tree"),
        "{}",
        text(&out)
    );
    assert!(!d.mount_options(&bare).contains("fuse.immount"));
    d.wait_no_servers();
}

#[test]
fn python_varlink_client() {
    need_root!();
    let d = Daemon::start("");
    let image = d.image();
    let dir = d.dir_owned("py", false);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/varlink_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&d.socket)
        .arg(&image)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python varlink client failed (pip install varlink): {}",
        text(&out)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        seen["interfaces"],
        json!(["org.varlink.service", "io.immount.Mount"])
    );
    assert_eq!(seen["parsed_interface"], "io.immount.Mount");
    assert!(seen["methods"]
        .as_array()
        .unwrap()
        .contains(&json!("MountImage")));
    assert_eq!(seen["no_fd_call"], "io.immount.Mount.BadFileDescriptor");
    assert_eq!(
        seen["mount_reply"]["parameters"]["decision"]["flow"],
        "namespace"
    );
    assert_eq!(seen["hello"], HELLO);
    Command::new("umount").arg(&dir).status().unwrap();
    d.wait_no_servers();
}

#[test]
fn fifty_concurrent_clients_leave_nothing_behind() {
    need_root!();
    let d = Daemon::start("[unsigned]\nmax_mounts_per_user = 64\n");
    let image = d.image();
    let round = |tag: &str| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let dir = d.dir_owned(&format!("{tag}{i}"), true);
                let client = d.client(&[], &image, &dir).join(" ");
                // The unmount is retried: on a loaded machine the kernel
                // may still hold the file just read for a moment (EBUSY).
                let script = format!(
                    "{client} >/dev/null && cat {m}/hello.txt && \
                     for i in 1 2 3 4 5 6 7 8 9; do fusermount3 -u {m} 2>/dev/null && exit 0; sleep 0.2; done; \
                     fusermount3 -u {m}",
                    m = dir.display()
                );
                std::thread::spawn(move || as_user(&["sh", "-c", &script]))
            })
            .collect();
        for h in handles {
            let out = h.join().unwrap();
            assert!(out.status.success(), "{}", text(&out));
            assert_eq!(String::from_utf8_lossy(&out.stdout), HELLO);
        }
        d.wait_no_servers();
        assert!(d.mounts().is_empty(), "leaked mounts: {:?}", d.mounts());
    };
    let fds_before = d.settled_fd_count();
    let started = Instant::now();
    let mut rss = Vec::new();
    for tag in ["a", "b", "c", "d", "e"] {
        round(tag);
        rss.push(d.rss_kib());
    }
    d.wait_fd_count(fds_before);
    // Flat once warm (malloc arenas and cached thread stacks of fifty
    // concurrent connections settle over the first rounds): the last
    // hundred mounts add less than 2 MiB.
    assert!(
        rss[4] < rss[2] + 2048,
        "daemon memory grew from {} to {} KiB over the last two rounds: {rss:?}",
        rss[2],
        rss[4]
    );
    assert!(started.elapsed() < Duration::from_secs(240));
    let ok = d.log_text().matches("result=ok").count();
    assert_eq!(ok, 250, "{}", d.log_text());
}

/// Send raw bytes (and fds) and return what came back: `None` when the
/// daemon dropped the connection, else the reply.
fn raw(d: &Daemon, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> Option<Value> {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = immount_sys::mountd::send_with_fds(s.as_fd(), bytes, fds);
    let mut conn = Connection::new(s);
    let msg = conn.read_message().ok()?;
    serde_json::from_slice(&msg.json).ok()
}

fn error_of(v: &Option<Value>) -> String {
    v.as_ref()
        .and_then(|v| v["error"].as_str())
        .unwrap_or("none")
        .to_owned()
}

#[test]
fn malformed_input_gets_errors_or_is_dropped_and_the_daemon_keeps_serving() {
    need_root!();
    let d = Daemon::start("");
    let image_path = d.image();
    // Warm up (first thread, allocator) before counting descriptors.
    let mut c = d.connect();
    assert!(
        call(&mut c, "org.varlink.service.GetInfo", json!({}))["parameters"]["product"]
            == "immountd"
    );
    drop(c);
    let fds_before = d.settled_fd_count();

    // Truncated JSON: dropped.
    assert!(raw(&d, b"{\"method\": \"org.varlink.service.GetInfo\"\0", &[]).is_none());
    // Not an object: dropped.
    assert!(raw(&d, b"[1,2,3]\0", &[]).is_none());
    // Oversized: more than 64 KiB without a terminator, dropped.
    let mut big = b"{\"method\":\"org.varlink.service.GetInfo\",\"parameters\":{\"x\":\"".to_vec();
    big.resize(200 * 1024, b'a');
    assert!(raw(&d, &big, &[]).is_none());
    // Half a message, then gone.
    {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.write_all(b"{\"method\":\"io.immount.Mo").unwrap();
    }

    // Wrong types: an error naming the parameter, and the connection lives.
    let mut c = d.connect();
    let r = call(
        &mut c,
        "io.immount.Mount.MountImage",
        json!({"imageFileDescriptor": "zero"}),
    );
    assert_eq!(r["error"], "org.varlink.service.InvalidParameter");
    assert_eq!(r["parameters"]["parameter"], "imageFileDescriptor");
    let r = call(
        &mut c,
        "io.immount.Mount.MountImage",
        json!({"imageFileDescriptor": 0, "bogus": 1}),
    );
    assert_eq!(r["parameters"]["parameter"], "bogus");
    let r = call(
        &mut c,
        "io.immount.Mount.MountImage",
        json!({"imageFileDescriptor": 0, "options": "noexec"}),
    );
    assert_eq!(r["parameters"]["parameter"], "options");
    let r = call(
        &mut c,
        "org.varlink.service.GetInterfaceDescription",
        json!({"interface": 7}),
    );
    assert_eq!(r["error"], "org.varlink.service.InvalidParameter");
    let r = call(
        &mut c,
        "org.varlink.service.GetInterfaceDescription",
        json!({"interface": "a.b"}),
    );
    assert_eq!(r["error"], "org.varlink.service.InterfaceNotFound");
    let r = call(&mut c, "io.immount.Mount.Format", json!({}));
    assert_eq!(r["error"], "org.varlink.service.MethodNotFound");
    // Missing descriptors.
    let r = call(
        &mut c,
        "io.immount.Mount.MountImage",
        json!({"imageFileDescriptor": 0}),
    );
    assert_eq!(r["error"], "io.immount.Mount.BadFileDescriptor");
    let r = call(&mut c, "org.varlink.service.GetInfo", json!({}));
    assert_eq!(r["parameters"]["product"], "immountd");
    drop(c);

    let image = fs::File::open(&image_path).unwrap();
    let ns = fs::File::open("/proc/self/ns/user").unwrap();
    let dir = fs::File::open(d.dir_owned("m", false)).unwrap();
    let msg = |p: Value| {
        let mut v =
            serde_json::to_vec(&json!({"method": "io.immount.Mount.MountImage", "parameters": p}))
                .unwrap();
        v.push(0);
        v
    };
    // Extra descriptors, not named by any parameter.
    let r = raw(
        &d,
        &msg(json!({"imageFileDescriptor": 0, "userNamespaceFileDescriptor": 1})),
        &[image.as_fd(), ns.as_fd(), dir.as_fd()],
    );
    assert_eq!(error_of(&r), "io.immount.Mount.BadFileDescriptor", "{r:?}");
    // The wrong kind: a directory as the image, the image as the namespace.
    let r = raw(
        &d,
        &msg(json!({"imageFileDescriptor": 0, "userNamespaceFileDescriptor": 1})),
        &[dir.as_fd(), ns.as_fd()],
    );
    assert_eq!(error_of(&r), "io.immount.Mount.BadFileDescriptor", "{r:?}");
    let r = raw(
        &d,
        &msg(json!({"imageFileDescriptor": 0, "userNamespaceFileDescriptor": 1})),
        &[image.as_fd(), image.as_fd()],
    );
    assert_eq!(error_of(&r), "io.immount.Mount.BadFileDescriptor", "{r:?}");
    // The same descriptor named twice.
    let r = raw(
        &d,
        &msg(json!({"imageFileDescriptor": 0, "userNamespaceFileDescriptor": 0})),
        &[image.as_fd()],
    );
    assert_eq!(error_of(&r), "io.immount.Mount.BadFileDescriptor", "{r:?}");
    // Too many descriptors for one message: dropped.
    let many: Vec<_> = (0..8).map(|_| image.as_fd()).collect();
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = immount_sys::mountd::send_with_fds(s.as_fd(), b"{\"meth", &many);
    let _ = immount_sys::mountd::send_with_fds(s.as_fd(), b"od\":\"x.Y\"}\0", &[image.as_fd()]);
    let mut buf = [0u8; 16];
    assert_eq!((&s).read(&mut buf).unwrap_or(0), 0, "not dropped");
    // Not an EROFS image: refused by the server, which exits.
    let not_erofs = d.path("policy.toml");
    let junk = fs::File::open(&not_erofs).unwrap();
    let r = raw(
        &d,
        &msg(json!({"imageFileDescriptor": 0, "userNamespaceFileDescriptor": 1})),
        &[junk.as_fd(), ns.as_fd()],
    );
    assert_eq!(error_of(&r), "io.immount.Mount.IncompatibleImage", "{r:?}");

    // A client that vanishes mid-call: the mount is made, the reply is lost,
    // the detached mount and its server go away.
    for _ in 0..3 {
        let s = UnixStream::connect(&d.socket).unwrap();
        immount_sys::mountd::send_with_fds(
            s.as_fd(),
            &msg(json!({"imageFileDescriptor": 0, "userNamespaceFileDescriptor": 1})),
            &[image.as_fd(), ns.as_fd()],
        )
        .unwrap();
        drop(s);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.log_text().matches("exited").count() < 3 {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    d.wait_no_servers();

    // Still serving, with no descriptor left behind.
    let mut c = d.connect();
    let r = call(&mut c, "org.varlink.service.GetInfo", json!({}));
    assert_eq!(r["parameters"]["product"], "immountd");
    drop(c);
    d.wait_fd_count(fds_before);
    assert!(d.mounts().is_empty(), "{:?}", d.mounts());
}

#[test]
fn socket_activation_and_the_units() {
    need_root!();
    // LISTEN_FDS with our pid: systemd-socket-activate does exactly this;
    // here a tiny shell stands in, exec'ing the daemon with fd 3 bound.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("act.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = std::os::fd::OwnedFd::from(listener);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 exec {BIN} --socket /nonexistent/never 3<&0"
        ))
        .stdin(Stdio::from(fd))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = Connection::new(s);
    let r = call(&mut c, "org.varlink.service.GetInfo", json!({}));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r["parameters"]["product"], "immountd");
    assert!(!Path::new("/nonexistent/never").exists());

    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd");
    let socket_unit = fs::read_to_string(units.join("immountd.socket")).unwrap();
    assert!(socket_unit.contains("ListenStream=/run/immount/io.immount.Mount"));
    let service = fs::read_to_string(units.join("immountd.service")).unwrap();
    assert!(service.contains("ExecStart="));
}

/// Flow (b) through the ordinary `immount mount` of a plain user: when the
/// daemon's socket exists, the client hands it the image and the directory.
#[test]
fn immount_mount_of_a_plain_user_goes_through_the_daemon() {
    need_root!();
    let immount = Path::new(BIN).with_file_name("immount");
    assert!(
        immount.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        immount.display()
    );
    let immount = immount.to_str().unwrap().to_string();
    let d = Daemon::start("");
    let image = d.image();
    let own = d.dir_owned("via-immount", true);
    let sock = d.socket.to_str().unwrap().to_string();
    let out = as_user(&[
        "env",
        &format!("IMMOUNT_SOCKET={sock}"),
        &immount,
        "mount",
        image.to_str().unwrap(),
        own.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("through immountd"),
        "{}",
        text(&out)
    );
    let cat = as_user(&["cat", own.join("hello.txt").to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        HELLO,
        "{}",
        text(&cat)
    );
    let line = d.mount_options(&own);
    assert!(line.contains(" ro,nosuid,nodev"), "{line}");
    // A directory the user does not own: refused, one line, exit 2.
    let theirs = d.dir_owned("via-immount-theirs", false);
    let out = as_user(&[
        &immount,
        "mount",
        "--socket",
        &sock,
        image.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not own"),
        "{}",
        text(&out)
    );
    let un = as_user(&[&immount, "umount", own.to_str().unwrap()]);
    assert!(un.status.success(), "{}", text(&un));
    d.wait_no_servers();
    assert!(d.mounts().is_empty(), "{:?}", d.mounts());
}
