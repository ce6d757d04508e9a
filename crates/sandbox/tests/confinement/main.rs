//! Confinement tests: each test re-executes this binary with a scenario in
//! `IMMOUNT_SANDBOX_SCENARIO`; the child applies the sandbox (the same
//! `sandbox::apply` the server calls) and does something, and the parent —
//! itself never confined — watches it from outside: `/proc/PID`, the wait
//! status and the child's log.
//!
//! The harness is our own (`harness = false`): libtest runs each test on a
//! thread of its own, and the sandbox must be applied by a single-threaded
//! process. The child talks to the parent over its standard streams: stdin
//! is a control pipe, stdout carries result lines, stderr is the log the
//! `SIGSYS` handler writes to.
//!
//! The tests need root (namespaces, switching uid, starting a child as
//! `nobody`); without it they are reported as ignored.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};

use sandbox::{apply, explain_exit, SandboxConfig};

mod minifuse;

const SCENARIO_ENV: &str = "IMMOUNT_SANDBOX_SCENARIO";
const DATA_ENV: &str = "IMMOUNT_SANDBOX_DATA";

type TestResult = Result<(), String>;

/// A named test.
type Test = (&'static str, fn() -> TestResult);

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn main() -> ExitCode {
    if let Ok(scenario) = std::env::var(SCENARIO_ENV) {
        return child::run(&scenario);
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: &[Test] = &[
        ("status_of_a_confined_child_started_as_root", status_as_root),
        (
            "status_of_a_confined_child_started_as_nobody",
            status_as_nobody,
        ),
        (
            "root_of_a_root_only_user_namespace_is_still_confined",
            root_only_userns_as_root,
        ),
        (
            "root_only_user_namespace_of_nobody_is_still_confined",
            root_only_userns_as_nobody,
        ),
        ("kept_pipes_and_files_still_work", kept_fds_work),
        ("threaded_workload_runs_under_the_filter", workload),
        ("memory_limit_stops_a_large_allocation", memory_limit),
        ("open_etc_passwd_is_killed", open_passwd),
        ("socket_is_killed", socket),
        ("execve_is_killed", execve),
        ("ptrace_is_killed", ptrace),
        ("mount_is_killed", mount),
        ("writing_a_new_file_is_killed", write_file),
        ("empty_root_and_landlock_stand_behind_seccomp", layers),
        ("without_threads_clone_is_killed", no_threads),
        ("ptrace_from_outside_is_denied", ptrace_from_outside),
        (
            "a_running_fuse_server_is_confined_and_serves",
            fuse_server_serves,
        ),
        ("supervisor_keeps_only_cap_sys_admin", supervisor_prepared),
        (
            "kept_namespaces_are_joined_and_remade_when_stale",
            kept_namespaces,
        ),
        (
            "supervisor_explains_and_unmounts_a_killed_server",
            fuse_server_killed,
        ),
    ];
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    let filtered_out = tests.len() - selected.len();
    let root = rustix::process::geteuid().is_root();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    let mut failures = Vec::new();
    for (name, test) in selected {
        if !root {
            println!("test {name} ... ignored, needs root");
            ignored += 1;
            continue;
        }
        match test() {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(msg) => {
                println!("test {name} ... FAILED");
                failures.push((name, msg));
                failed += 1;
            }
        }
    }
    // The copy of this binary made for `nobody`, if any.
    let _ = std::fs::remove_dir_all(public_exe_dir());
    for (name, msg) in &failures {
        println!("\n---- {name} ----\n{msg}");
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; {filtered_out} filtered out\n"
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn public_exe_dir() -> PathBuf {
    std::env::temp_dir().join(format!("immount-sandbox-test-{}", std::process::id()))
}

/// A copy of this binary that `nobody` can execute even when the build
/// directory is private (a CI clone under /root).
fn public_exe() -> Result<PathBuf, String> {
    let dir = public_exe_dir();
    let exe = dir.join("confinement");
    if !exe.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        std::fs::copy(&me, &exe).map_err(|e| format!("copying the test binary: {e}"))?;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
    }
    Ok(exe)
}

struct Spawned {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

/// Starts the scenario in a child, as `nobody` when `as_nobody`.
fn spawn(scenario: &str, as_nobody: bool) -> Result<Spawned, String> {
    spawn_via(scenario, as_nobody, &[])
}

/// Starts the scenario in a child through `wrapper` (a command that execs
/// its last argument, such as `unshare -Ur`), as `nobody` when `as_nobody`.
fn spawn_via(scenario: &str, as_nobody: bool, wrapper: &[&str]) -> Result<Spawned, String> {
    let exe = if as_nobody {
        public_exe()?
    } else {
        std::env::current_exe().map_err(|e| e.to_string())?
    };
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.env(SCENARIO_ENV, scenario)
        .env(DATA_ENV, &exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if as_nobody {
        // std drops the supplementary groups when switching from root.
        cmd.uid(sandbox::NOBODY).gid(sandbox::NOBODY);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {scenario}: {e}"))?;
    let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    Ok(Spawned { child, stdout })
}

impl Spawned {
    /// Reads result lines until one starts with `marker`, returning all of
    /// them.
    fn read_until(&mut self, marker: &str) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self
                .stdout
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            if n == 0 {
                let stderr = self.finish_stderr();
                return Err(format!(
                    "child ended before {marker:?}; stdout: {lines:?}; stderr: {stderr}"
                ));
            }
            let line = line.trim_end().to_owned();
            let done = line.starts_with(marker);
            lines.push(line);
            if done {
                return Ok(lines);
            }
        }
    }

    fn finish_stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// Closes stdin (the child's cue to end), waits, returns the status,
    /// the remaining stdout and stderr.
    fn finish(mut self) -> Result<(ExitStatus, String, String), String> {
        drop(self.child.stdin.take());
        let mut out = String::new();
        self.stdout
            .read_to_string(&mut out)
            .map_err(|e| e.to_string())?;
        let err = self.finish_stderr();
        let status = self.child.wait().map_err(|e| e.to_string())?;
        Ok((status, out, err))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// What every confined process's /proc/PID/status shows: seccomp in
/// filter mode, no_new_privs, and no capability in any set. `context` is
/// added to the first failure's message.
fn ensure_confined(status: &str, context: &str) -> TestResult {
    let field = |k| status_field(status, k).unwrap_or("<missing>");
    ensure(field("Seccomp") == "2", || {
        format!("Seccomp: {}\n{status}\n{context}", field("Seccomp"))
    })?;
    ensure(field("NoNewPrivs") == "1", || {
        format!("NoNewPrivs: {}", field("NoNewPrivs"))
    })?;
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        ensure(field(cap) == "0000000000000000", || {
            format!("{cap}: {}", field(cap))
        })?;
    }
    Ok(())
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
}

/// The checks on a running confined child from outside.
///
/// `fd3` is what descriptor 3 must point to (default: the test binary,
/// held open as the server holds its image).
fn check_running_child(
    s: &Spawned,
    expect_uid: u32,
    expect_identity_line: bool,
    fd3: Option<&str>,
) -> TestResult {
    let pid = s.pid();
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let field = |k| status_field(&status, k).unwrap_or("<missing>");
    ensure_confined(&status, "")?;
    ensure(field("Seccomp_filters") == "1", || {
        format!("Seccomp_filters: {}", field("Seccomp_filters"))
    })?;
    let uids: Vec<&str> = field("Uid").split_whitespace().collect();
    ensure(uids.iter().all(|u| *u == expect_uid.to_string()), || {
        format!("Uid: {uids:?}, expected {expect_uid}")
    })?;
    ensure(!uids.contains(&"0"), || "the confined child is root".into())?;
    if expect_identity_line {
        ensure(field("Groups").is_empty(), || {
            format!("Groups: {}", field("Groups"))
        })?;
    }

    // Only the kept descriptors: the three pipes and the data file.
    let fds: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!("{}={}", e.file_name().to_string_lossy(), target)
        })
        .collect();
    ensure(fds.len() == 4, || format!("open fds: {fds:?}"))?;
    for fd in 0..3 {
        ensure(
            fds.iter().any(|f| f.starts_with(&format!("{fd}=pipe:"))),
            || format!("fd {fd} is not the kept pipe: {fds:?}"),
        )?;
    }
    let fd3 = match fd3 {
        Some(target) => target.to_owned(),
        None => std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|e| e.to_string())?
            .display()
            .to_string(),
    };
    ensure(fds.contains(&format!("3={fd3}")), || {
        format!("fd 3 is not {fd3}: {fds:?}")
    })?;

    // Namespaces other than ours.
    for ns in ["net", "mnt", "ipc"] {
        let theirs =
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).map_err(|e| e.to_string())?;
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).map_err(|e| e.to_string())?;
        ensure(theirs != ours, || {
            format!("same {ns} namespace as the parent: {}", ours.display())
        })?;
    }
    // Limits.
    let limits =
        std::fs::read_to_string(format!("/proc/{pid}/limits")).map_err(|e| e.to_string())?;
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    ensure(limit("Max core file size").contains("size 0 0"), || {
        limit("Max core file size")
    })?;
    ensure(
        limit("Max data size").contains(&format!(
            "{} {}",
            sandbox::DEFAULT_MEMORY_LIMIT,
            sandbox::DEFAULT_MEMORY_LIMIT
        )),
        || limit("Max data size"),
    )?;
    ensure(
        limit("Max open files").contains(&format!(
            "{} {}",
            sandbox::DEFAULT_MAX_OPEN_FILES,
            sandbox::DEFAULT_MAX_OPEN_FILES
        )),
        || limit("Max open files"),
    )?;
    // The root the child sees is its empty tmpfs, not ours.
    let root = std::fs::read_dir(format!("/proc/{pid}/root"));
    match root {
        Ok(entries) => ensure(entries.count() == 0, || {
            "the child's root is not empty".into()
        })?,
        Err(e) => return Err(format!("/proc/{pid}/root: {e}")),
    }
    Ok(())
}

fn status_as_root() -> TestResult {
    let mut s = spawn("status", false)?;
    let lines = s.read_until("applied")?;
    let checked = check_running_child(&s, sandbox::NOBODY, true, None);
    // What `--sandbox-report` would print about the running server.
    let outside = sandbox::report_process(s.pid());
    let (status, _, err) = s.finish()?;
    checked?;
    ensure(status.success(), || {
        format!("child: {status}; stderr: {err}")
    })?;
    for expected in ["Seccomp:\t2", "NoNewPrivs:\t1", "CapEff:\t0000000000000000"] {
        ensure(outside.contains(expected), || {
            format!("report_process lacks {expected:?}:\n{outside}")
        })?;
    }
    ensure(
        outside
            .lines()
            .any(|l| l.starts_with("ns/net: net:[") && l.ends_with("(own)")),
        || format!("report_process does not show an own net namespace:\n{outside}"),
    )?;
    let report = lines.join("\n");
    for expected in [
        "user namespace:    no (not needed",
        "net namespace:     yes",
        "landlock:          ABI",
        "uid 65534 gid 65534 (switched from root",
    ] {
        ensure(report.contains(expected), || {
            format!("report lacks {expected:?}:\n{report}")
        })?;
    }
    Ok(())
}

fn status_as_nobody() -> TestResult {
    let mut s = spawn("status", true)?;
    let lines = s.read_until("applied")?;
    let checked = check_running_child(&s, sandbox::NOBODY, false, None);
    // The user namespace is the child's own, too.
    let pid = s.pid();
    let userns = std::fs::read_link(format!("/proc/{pid}/ns/user")).map_err(|e| e.to_string());
    let ours = std::fs::read_link("/proc/self/ns/user").map_err(|e| e.to_string())?;
    let (status, _, err) = s.finish()?;
    checked?;
    ensure(userns? != ours, || "no user namespace made".into())?;
    ensure(status.success(), || {
        format!("child: {status}; stderr: {err}")
    })?;
    let report = lines.join("\n");
    for expected in [
        "user namespace:    yes",
        "net namespace:     yes",
        "(unchanged)",
        "no_new_privs:      yes",
    ] {
        ensure(report.contains(expected), || {
            format!("report lacks {expected:?}:\n{report}")
        })?;
    }
    Ok(())
}

/// Inside `unshare -Ur` only uid 0 is mapped, so a server started as that
/// root has no uid 65534 to switch to: the switch alone is skipped (one log
/// line says so) and everything else still applies — seccomp, no_new_privs,
/// no capability in any set, an own network namespace, the limits and only
/// the kept descriptors.
fn root_only_userns(as_nobody: bool) -> TestResult {
    // `unshare` without --fork execs the scenario: the pid is the child's.
    let mut s = spawn_via("status", as_nobody, &["unshare", "-Ur"])?;
    let lines = s.read_until("applied")?;
    let pid = s.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string());
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.filter_map(Result::ok).count())
        .map_err(|e| e.to_string());
    let netns = std::fs::read_link(format!("/proc/{pid}/ns/net")).map_err(|e| e.to_string());
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).map_err(|e| e.to_string());
    let (exit, _, err) = s.finish()?;
    let status = status?;
    let field = |k| status_field(&status, k).unwrap_or("<missing>");
    ensure_confined(&status, &format!("stderr: {err}"))?;
    // The namespace's root is uid 0 or 65534 outside, as the one who ran
    // unshare.
    let outside = if as_nobody { sandbox::NOBODY } else { 0 };
    ensure(
        field("Uid")
            .split_whitespace()
            .all(|u| u == outside.to_string()),
        || format!("Uid: {}", field("Uid")),
    )?;
    ensure(fds? == 4, || "more descriptors than the kept ones".into())?;
    let ours = std::fs::read_link("/proc/self/ns/net").map_err(|e| e.to_string())?;
    ensure(netns? != ours, || "the host's network namespace".into())?;
    let limits = limits?;
    ensure(
        limits.lines().any(|l| {
            l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")
        }),
        || format!("core dumps not off:\n{limits}"),
    )?;
    ensure(exit.success(), || format!("child: {exit}; stderr: {err}"))?;
    ensure(
        err.lines()
            .filter(|l| l.contains("uid/gid switch skipped"))
            .count()
            == 1,
        || format!("no single log line about the skipped switch; stderr: {err}"),
    )?;
    let report = lines.join("\n");
    for expected in [
        "(unchanged: no uid/gid to switch to: this user namespace does not map uid 65534 and gid 65534)",
        "net namespace:     yes",
        "capabilities:      none",
        "no_new_privs:      yes",
        "landlock:          ABI",
        "anything else kills",
    ] {
        ensure(report.contains(expected), || {
            format!("report lacks {expected:?}:\n{report}")
        })?;
    }
    Ok(())
}

fn root_only_userns_as_root() -> TestResult {
    root_only_userns(false)
}

fn root_only_userns_as_nobody() -> TestResult {
    root_only_userns(true)
}

fn kept_fds_work() -> TestResult {
    let mut s = spawn("echo", false)?;
    s.read_until("applied")?;
    let stdin = s.child.stdin.as_mut().ok_or("no stdin")?;
    stdin
        .write_all(b"hello through the pipe\n")
        .map_err(|e| e.to_string())?;
    let lines = s.read_until("elf=")?;
    let (status, _, err) = s.finish()?;
    ensure(status.success(), || {
        format!("child: {status}; stderr: {err}")
    })?;
    ensure(
        lines.iter().any(|l| l == "echo: hello through the pipe"),
        || format!("{lines:?}"),
    )?;
    ensure(lines.iter().any(|l| l == "elf=yes"), || {
        format!("{lines:?}")
    })?;
    ensure(err.contains("log line after apply"), || {
        format!("stderr: {err}")
    })
}

fn workload() -> TestResult {
    let s = spawn("workload", false)?;
    let (status, out, err) = s.finish()?;
    ensure(status.success(), || {
        format!(
            "child: {status} ({:?}); stdout: {out}; stderr: {err}",
            explain_exit(status, err.as_bytes())
        )
    })?;
    ensure(out.contains("workload=ok"), || format!("stdout: {out}"))
}

fn memory_limit() -> TestResult {
    let s = spawn("memory", false)?;
    let (status, out, err) = s.finish()?;
    ensure(status.success(), || {
        format!("child: {status}; stderr: {err}")
    })?;
    ensure(out.contains("reserve_2g=err"), || format!("stdout: {out}"))?;
    ensure(out.contains("reserve_64m=ok"), || format!("stdout: {out}"))
}

/// Runs a scenario that must be killed by the filter at `syscall`.
fn expect_killed(scenario: &str, syscall: &str) -> TestResult {
    let s = spawn(scenario, false)?;
    let (status, out, err) = s.finish()?;
    ensure(out.contains("applied"), || {
        format!("sandbox not applied: {out}; {err}")
    })?;
    ensure(!out.contains("survived"), || {
        format!("the forbidden call returned: {out}")
    })?;
    ensure(status.signal() == Some(libc::SIGSYS), || {
        format!("child: {status}; stderr: {err}")
    })?;
    let why = explain_exit(status, err.as_bytes()).ok_or("no explanation")?;
    ensure(
        why.contains(&format!("forbidden syscall {syscall} (")),
        || format!("explanation: {why}; stderr: {err}"),
    )
}

fn open_passwd() -> TestResult {
    expect_killed("open_passwd", "openat")
}

fn socket() -> TestResult {
    expect_killed("socket", "socket")
}

fn execve() -> TestResult {
    expect_killed("execve", "execve")
}

fn ptrace() -> TestResult {
    expect_killed("ptrace", "ptrace")
}

fn mount() -> TestResult {
    expect_killed("mount", "mount")
}

fn write_file() -> TestResult {
    expect_killed("write_file", "openat")?;
    ensure(
        !Path::new("/tmp/immount-sandbox-should-not-exist").exists(),
        || "the file was created".into(),
    )
}

/// Without threads, `clone` is trapped. glibc blocks every signal around
/// `clone`, so the kernel kills the process with `SIGSYS` without running
/// the reporting handler: the number cannot be logged, and the explanation
/// says so.
fn no_threads() -> TestResult {
    let s = spawn("no_threads", false)?;
    let (status, out, err) = s.finish()?;
    ensure(out.contains("applied"), || {
        format!("sandbox not applied: {out}; {err}")
    })?;
    ensure(!out.contains("survived"), || {
        format!("a thread was made: {out}")
    })?;
    ensure(status.signal() == Some(libc::SIGSYS), || {
        format!("child: {status}; stderr: {err}")
    })?;
    let why = explain_exit(status, err.as_bytes()).ok_or("no explanation")?;
    ensure(why.contains("not logged"), || format!("explanation: {why}"))
}

fn layers() -> TestResult {
    let s = spawn("layers", false)?;
    let (status, out, err) = s.finish()?;
    ensure(status.success(), || {
        format!("child: {status}; stdout {out}; stderr: {err}")
    })?;
    // /etc/passwd does not exist in the empty root; the root directory
    // itself cannot be read (landlock); nothing can be created (read-only
    // root, and landlock behind it).
    ensure(out.contains(&format!("passwd={}", libc::ENOENT)), || {
        format!("stdout: {out}")
    })?;
    ensure(out.contains(&format!("rootdir={}", libc::EACCES)), || {
        format!("stdout: {out}")
    })?;
    ensure(out.contains(&format!("create={}", libc::EROFS)), || {
        format!("stdout: {out}")
    })
}

/// A process of the same uid as a confined child cannot trace it: the child
/// is not dumpable.
fn ptrace_from_outside() -> TestResult {
    let mut target = spawn("status", false)?;
    target.read_until("applied")?;
    let tracer = spawn_tracer(target.pid());
    let (status, _, err) = target.finish()?;
    ensure(status.success(), || format!("target: {status}; {err}"))?;
    let out = tracer?;
    ensure(
        out.contains(&format!("ptrace_errno={}", libc::EPERM)),
        || format!("tracer: {out}"),
    )
}

fn spawn_tracer(pid: u32) -> Result<String, String> {
    let exe = public_exe()?;
    let out = Command::new(exe)
        .env(SCENARIO_ENV, format!("tracer:{pid}"))
        .uid(sandbox::NOBODY)
        .gid(sandbox::NOBODY)
        .output()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `prepare_supervisor` leaves a root supervisor with only the standard
/// streams and `CAP_SYS_ADMIN` (to unmount), and no core dumps.
fn supervisor_prepared() -> TestResult {
    let s = spawn("supervisor", false)?;
    let (status, out, err) = s.finish()?;
    ensure(status.success(), || {
        format!("child: {status}; {out}; {err}")
    })?;
    let cap_sys_admin = format!("{:016x}", rustix::thread::CapabilitySet::SYS_ADMIN.bits());
    ensure(out.contains(&format!("CapEff:\t{cap_sys_admin}")), || {
        format!("stdout: {out}")
    })?;
    ensure(out.contains(&format!("CapPrm:\t{cap_sys_admin}")), || {
        format!("stdout: {out}")
    })?;
    ensure(out.contains("fds=0,1,2,"), || format!("stdout: {out}"))?;
    ensure(out.contains("core=0"), || format!("stdout: {out}"))
}

/// The namespaces the sandbox keeps, in the order of the inode triples.
const KEPT_NS: [&str; 3] = ["net", "ipc", "mnt"];

/// The inodes of a task's namespaces as `TASK/ns/NAME` names them
/// (`net:[N]`), in [`KEPT_NS`] order.
fn ns_inodes(task: &Path) -> Result<[u64; 3], String> {
    let mut out = [0; 3];
    for (slot, name) in out.iter_mut().zip(KEPT_NS) {
        let link = task.join("ns").join(name);
        let target = std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
        let text = target.to_string_lossy();
        *slot = text
            .split_once(":[")
            .and_then(|(_, rest)| rest.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{}: {text}", link.display()))?;
    }
    Ok(out)
}

/// A directory of kept namespaces made by the test, unmounted (every
/// stacked bind mount) and removed however the test ends.
struct KeptDir {
    path: PathBuf,
}

impl Drop for KeptDir {
    fn drop(&mut self) {
        let files = KEPT_NS.map(|n| self.path.join(n));
        for p in files.iter().chain([&self.path]) {
            while is_mounted(p) {
                if rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH).is_err() {
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A thread that prepared ahead with `dir` as its kept namespaces, watched
/// from outside: what it said of them, its namespaces, and how many
/// entries its root has.
struct Ahead {
    spawned: Spawned,
    kept: String,
    ns: [u64; 3],
    root_entries: usize,
}

fn prepare_ahead_with(dir: &Path) -> Result<Ahead, String> {
    let mut s = spawn(&format!("kept_ns:{}", dir.display()), false)?;
    let lines = s.read_until("tid=")?;
    let last = lines.last().ok_or("no output")?;
    let (tid, kept) = last
        .strip_prefix("tid=")
        .and_then(|l| l.split_once(" kept="))
        .ok_or_else(|| format!("child said: {lines:?}"))?;
    let task = PathBuf::from(format!("/proc/{}/task/{tid}", s.pid()));
    let ns = ns_inodes(&task)?;
    let root_entries = std::fs::read_dir(task.join("root"))
        .map_err(|e| format!("the thread's root: {e}"))?
        .count();
    Ok(Ahead {
        kept: kept.to_owned(),
        spawned: s,
        ns,
        root_entries,
    })
}

/// The namespace inodes of the files kept in `dir`.
fn kept_inodes(dir: &Path) -> [u64; 3] {
    use std::os::unix::fs::MetadataExt;
    KEPT_NS.map(|n| std::fs::metadata(dir.join(n)).map_or(0, |m| m.ino()))
}

/// As root, the first server makes its network, IPC and mount namespaces
/// and keeps them (nsfs bind mounts in the directory); the next joins the
/// same ones, with the same empty root; a stale file (no longer a
/// namespace) is not joined but made again and kept anew; a directory that
/// others may write to is neither joined nor kept in.
fn kept_namespaces() -> TestResult {
    let dir = KeptDir {
        path: std::env::temp_dir().join(format!("immount-sandbox-ns-{}", std::process::id())),
    };
    let host = ns_inodes(Path::new("/proc/self"))?;
    let first = prepare_ahead_with(&dir.path)?;
    ensure(first.kept.starts_with("made, and kept in"), || {
        format!("first: {}", first.kept)
    })?;
    ensure(first.ns.iter().zip(&host).all(|(a, h)| a != h), || {
        format!("first {:?} against the host's {host:?}", first.ns)
    })?;
    ensure(kept_inodes(&dir.path) == first.ns, || {
        format!("kept {:?}, first {:?}", kept_inodes(&dir.path), first.ns)
    })?;
    ensure(first.root_entries == 0, || {
        format!("the first's root has {} entries", first.root_entries)
    })?;
    let second = prepare_ahead_with(&dir.path)?;
    ensure(
        second
            .kept
            .starts_with("shared by immount servers, joined from"),
        || format!("second: {}", second.kept),
    )?;
    ensure(second.ns == first.ns, || {
        format!("second {:?}, first {:?}", second.ns, first.ns)
    })?;
    ensure(second.root_entries == 0, || {
        format!("the second's root has {} entries", second.root_entries)
    })?;
    drop((first.spawned.finish()?, second.spawned.finish()?));

    // Stale: the network namespace's file is a plain file again.
    let net = dir.path.join("net");
    rustix::mount::unmount(&net, rustix::mount::UnmountFlags::DETACH)
        .map_err(|e| format!("umount {}: {e}", net.display()))?;
    let third = prepare_ahead_with(&dir.path)?;
    ensure(third.kept.starts_with("made, and kept in"), || {
        format!("after a stale file: {}", third.kept)
    })?;
    ensure(third.ns[0] != first.ns[0] && third.ns[0] != host[0], || {
        format!("third {:?}, first {:?}", third.ns, first.ns)
    })?;
    ensure(kept_inodes(&dir.path) == third.ns, || {
        format!("kept {:?}, third {:?}", kept_inodes(&dir.path), third.ns)
    })?;
    drop(third.spawned.finish()?);

    // Others may write to the directory: neither joined nor kept in.
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| e.to_string())?;
    let fourth = prepare_ahead_with(&dir.path)?;
    ensure(fourth.kept.starts_with("own (not kept in"), || {
        format!("open directory: {}", fourth.kept)
    })?;
    ensure(
        fourth.ns[0] != third.ns[0] && fourth.ns[0] != host[0],
        || format!("fourth {:?}, third {:?}", fourth.ns, third.ns),
    )?;
    drop(fourth.spawned.finish()?);
    Ok(())
}

/// A temporary mountpoint that is unmounted and removed however the test
/// ends.
struct MountDir {
    path: PathBuf,
}

impl MountDir {
    fn new(tag: &str) -> Result<Self, String> {
        let path =
            std::env::temp_dir().join(format!("immount-sandbox-mnt-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let _ = rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH);
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Unmounts `path` after `secs` seconds from a thread of its own, so that a
/// server that should have died or ended but goes on serving makes its test
/// fail instead of hang (unmounting ends a FUSE server).
fn watchdog(path: &Path, secs: u64) {
    let path = path.to_owned();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(secs));
        let _ = rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH);
    });
}

/// Whether `path` is a mountpoint in our mount namespace.
fn is_mounted(path: &Path) -> bool {
    let want = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

/// A real FUSE server confined by `apply`: the kernel's requests are served
/// under the allowlist, and from outside the running server has the
/// expected status, only its pipes and `/dev/fuse` open, its own
/// namespaces. Unmounting ends it cleanly.
fn fuse_server_serves() -> TestResult {
    let mnt = MountDir::new("serve")?;
    let mut s = spawn(&format!("fuse_server:{}", mnt.path.display()), false)?;
    s.read_until("applied")?;
    let checked = check_running_child(&s, sandbox::NOBODY, true, Some("/dev/fuse"));
    let content = std::fs::read(mnt.path.join("hello"));
    let again = std::fs::read_to_string(mnt.path.join("hello"));
    let missing = std::fs::metadata(mnt.path.join("missing"));
    let unmounted = rustix::mount::unmount(&mnt.path, rustix::mount::UnmountFlags::empty());
    watchdog(&mnt.path, 20);
    let status = sandbox::supervise(s.pid(), |_| {}).map_err(|e| e.to_string())?;
    let mut out = String::new();
    let _ = s.stdout.read_to_string(&mut out);
    let err = s.finish_stderr();
    checked?;
    ensure(content.as_deref().ok() == Some(minifuse::HELLO), || {
        format!("read through the mount: {content:?}")
    })?;
    ensure(again.is_ok(), || format!("second read: {again:?}"))?;
    ensure(
        missing.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT),
        || format!("lookup of a missing name: {missing:?}"),
    )?;
    ensure(unmounted.is_ok(), || format!("unmount: {unmounted:?}"))?;
    ensure(status.success(), || {
        format!(
            "server: {status} ({:?}); stdout: {out}; stderr: {err}",
            explain_exit(status, err.as_bytes())
        )
    })?;
    ensure(out.contains("served "), || format!("stdout: {out}"))
}

/// A request drives the confined server into `socket()`: the server dies
/// by `SIGSYS`, the caller gets an error instead of hanging, and the
/// supervisor names the syscall and unmounts the dead mount.
fn fuse_server_killed() -> TestResult {
    let mnt = MountDir::new("crash")?;
    let mut s = spawn(&format!("fuse_server:{}", mnt.path.display()), false)?;
    s.read_until("applied")?;
    let hello = std::fs::read(mnt.path.join("hello"));
    let crash = std::fs::metadata(mnt.path.join("crash"));
    watchdog(&mnt.path, 20);
    let mut mounted_at_exit = false;
    let mut cleanup = Ok(());
    let status = sandbox::supervise(s.pid(), |_| {
        mounted_at_exit = is_mounted(&mnt.path);
        cleanup = sandbox::unmount_lazy(&mnt.path);
    })
    .map_err(|e| e.to_string())?;
    let err = s.finish_stderr();
    ensure(hello.as_deref().ok() == Some(minifuse::HELLO), || {
        format!("read before the crash: {hello:?}")
    })?;
    ensure(crash.is_err(), || format!("lookup of crash: {crash:?}"))?;
    ensure(status.signal() == Some(libc::SIGSYS), || {
        format!("server: {status}; stderr: {err}")
    })?;
    let why = explain_exit(status, err.as_bytes()).ok_or("no explanation")?;
    ensure(why.contains("forbidden syscall socket ("), || {
        format!("explanation: {why}; stderr: {err}")
    })?;
    ensure(!err.contains("socket() returned"), || {
        format!("socket() returned to the server: {err}")
    })?;
    ensure(mounted_at_exit, || {
        "the mount was gone before cleanup".into()
    })?;
    ensure(cleanup.is_ok(), || format!("cleanup: {cleanup:?}"))?;
    ensure(!is_mounted(&mnt.path), || {
        "still mounted after cleanup".into()
    })
}

/// The child side: apply the sandbox, then do what the scenario says.
mod child {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    fn say(line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn errno(e: &std::io::Error) -> i32 {
        e.raw_os_error().unwrap_or(-1)
    }

    pub fn run(scenario: &str) -> ExitCode {
        if let Some(mnt) = scenario.strip_prefix("fuse_server:") {
            return fuse_server(Path::new(mnt));
        }
        if scenario == "supervisor" {
            if let Err(e) = sandbox::prepare_supervisor(&[0, 1, 2]) {
                eprintln!("prepare_supervisor: {e}");
                return ExitCode::from(2);
            }
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            for line in status.lines().filter(|l| l.starts_with("Cap")) {
                say(line);
            }
            // Listing /proc/self/fd opens one more descriptor (the listing).
            let mut fds: Vec<u32> = std::fs::read_dir("/proc/self/fd")
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            fds.sort_unstable();
            let fds: Vec<String> = fds.iter().map(u32::to_string).collect();
            say(&format!("fds={},", fds.join(",")));
            let core = rustix::process::getrlimit(rustix::process::Resource::Core);
            say(&format!("core={}", core.current.unwrap_or(u64::MAX)));
            return ExitCode::SUCCESS;
        }
        if let Some(dir) = scenario.strip_prefix("kept_ns:") {
            // Prepare ahead on a thread, as the server does, and wait
            // (until stdin closes) while the parent looks at the thread.
            let cfg = SandboxConfig {
                kept_namespaces: Some(PathBuf::from(dir)),
                ..SandboxConfig::default()
            };
            let thread = std::thread::spawn(move || match sandbox::prepare_ahead(&cfg) {
                Ok(Some(prepared)) => {
                    say(&format!(
                        "tid={} kept={}",
                        rustix::thread::gettid().as_raw_nonzero(),
                        prepared.namespaces_kept()
                    ));
                    let mut buf = Vec::new();
                    let _ = std::io::stdin().read_to_end(&mut buf);
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    say("tid=0 kept=none: not prepared");
                    ExitCode::from(2)
                }
                Err(e) => {
                    say(&format!("tid=0 kept=error: {e}"));
                    ExitCode::from(2)
                }
            });
            return thread.join().unwrap_or(ExitCode::FAILURE);
        }
        if let Some(pid) = scenario.strip_prefix("tracer:") {
            // Not confined: an ordinary process of uid nobody.
            let pid: u32 = pid.parse().unwrap_or(0);
            match immount_sys::sandbox::ptrace_attach_detach(pid) {
                Ok(()) => say("ptrace_errno=0"),
                Err(e) => say(&format!("ptrace_errno={}", errno(&e))),
            }
            return ExitCode::SUCCESS;
        }
        // A file held open across apply, as the server holds its image.
        let data = match std::env::var_os(DATA_ENV).map(File::open) {
            Some(Ok(f)) => f,
            _ => {
                eprintln!("no data file");
                return ExitCode::from(3);
            }
        };
        let mut cfg = SandboxConfig {
            keep_fds: vec![0, 1, 2, data.as_raw_fd()],
            ..SandboxConfig::default()
        };
        match scenario {
            "no_threads" => cfg.allow_threads = false,
            // std's exec() resets SIGPIPE before execve: allow that much so
            // that the attempt reaches execve itself.
            "execve" => cfg.extra_syscalls.push(libc::SYS_rt_sigaction),
            // Let open through seccomp to show the layers behind it.
            "layers" => cfg.extra_syscalls.push(libc::SYS_openat),
            _ => {}
        }
        // Read now: getppid is not on the list.
        let parent = std::os::unix::process::parent_id();
        let report = match apply(&cfg) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("apply: {e}");
                return ExitCode::from(2);
            }
        };
        for line in report.to_string().lines() {
            say(&format!("report: {line}"));
        }
        say("applied");
        match scenario {
            "status" => {
                // Wait for the parent to look at us, until stdin closes.
                let mut buf = Vec::new();
                let _ = std::io::stdin().read_to_end(&mut buf);
            }
            "echo" => {
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                say(&format!("echo: {}", line.trim_end()));
                eprintln!("log line after apply");
                let mut magic = [0u8; 4];
                let ok = data.read_exact_at(&mut magic, 0).is_ok() && magic == *b"\x7fELF";
                say(if ok { "elf=yes" } else { "elf=no" });
            }
            "workload" => return workload(&data),
            "memory" => {
                let mut v: Vec<u8> = Vec::new();
                say(if v.try_reserve(2 << 30).is_err() {
                    "reserve_2g=err"
                } else {
                    "reserve_2g=ok"
                });
                let mut v: Vec<u8> = Vec::new();
                let ok = v.try_reserve(64 << 20).is_ok();
                if ok {
                    v.resize(64 << 20, 1);
                }
                say(if ok {
                    "reserve_64m=ok"
                } else {
                    "reserve_64m=err"
                });
            }
            "open_passwd" => {
                let r = File::open("/etc/passwd");
                say(&format!("survived: {r:?}"));
            }
            "socket" => {
                let r = std::net::UdpSocket::bind("127.0.0.1:0");
                say(&format!("survived: {r:?}"));
            }
            "execve" => {
                let e = Command::new("/bin/true").exec();
                say(&format!("survived: {e:?}"));
            }
            "ptrace" => {
                let r = immount_sys::sandbox::ptrace_attach_detach(parent);
                say(&format!("survived: {r:?}"));
            }
            "mount" => {
                let r = rustix::mount::mount(
                    "none",
                    "/",
                    "tmpfs",
                    rustix::mount::MountFlags::empty(),
                    None,
                );
                say(&format!("survived: {r:?}"));
            }
            "write_file" => {
                let r = File::create("/tmp/immount-sandbox-should-not-exist");
                say(&format!("survived: {r:?}"));
            }
            "no_threads" => {
                let r = std::thread::Builder::new().spawn(|| 1).map(|h| h.join());
                say(&format!("survived: {r:?}"));
            }
            "layers" => {
                let passwd = File::open("/etc/passwd").map(drop).map_err(|e| errno(&e));
                let rootdir = File::open("/").map(drop).map_err(|e| errno(&e));
                let create = File::create("/new-file").map(drop).map_err(|e| errno(&e));
                let show = |r: Result<(), i32>| r.err().unwrap_or(0);
                say(&format!("passwd={}", show(passwd)));
                say(&format!("rootdir={}", show(rootdir)));
                say(&format!("create={}", show(create)));
            }
            other => {
                eprintln!("unknown scenario {other}");
                return ExitCode::from(4);
            }
        }
        ExitCode::SUCCESS
    }

    /// Mounts a minimal FUSE filesystem at `mnt` (as root, directly),
    /// confines itself keeping only the standard streams and `/dev/fuse`,
    /// and serves until unmounted.
    fn fuse_server(mnt: &Path) -> ExitCode {
        let mut dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            Ok(d) => d,
            Err(e) => {
                eprintln!("/dev/fuse: {e}");
                return ExitCode::from(3);
            }
        };
        let data = format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd());
        let data = match std::ffi::CString::new(data) {
            Ok(d) => d,
            Err(_) => return ExitCode::from(3),
        };
        let flags = rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::RDONLY;
        if let Err(e) = rustix::mount::mount(
            "immount-sandbox-test",
            mnt,
            "fuse.immount-sandbox-test",
            flags,
            data.as_c_str(),
        ) {
            eprintln!("mount: {e}");
            return ExitCode::from(3);
        }
        let cfg = SandboxConfig {
            keep_fds: vec![0, 1, 2, dev.as_raw_fd()],
            ..SandboxConfig::default()
        };
        if let Err(e) = apply(&cfg) {
            eprintln!("apply: {e}");
            return ExitCode::from(2);
        }
        say("applied");
        match minifuse::serve(&mut dev) {
            Ok(n) => {
                say(&format!("served {n} requests"));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("serve: {e}");
                ExitCode::from(7)
            }
        }
    }

    /// What a FUSE server does while serving, on worker threads started
    /// after apply: locks, channels, allocation, positional reads of the
    /// image, metadata of a held file, sleeping, hashing.
    fn workload(data: &File) -> ExitCode {
        use std::collections::HashMap;
        use std::sync::{mpsc, Arc, Condvar, Mutex};
        let data = match data.try_clone() {
            Ok(d) => Arc::new(d),
            Err(e) => {
                say(&format!("try_clone: {e}"));
                return ExitCode::from(5);
            }
        };
        let len = data.metadata().map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let mut workers = Vec::new();
        for i in 0..4u64 {
            let (tx, data, gate) = (tx.clone(), Arc::clone(&data), Arc::clone(&gate));
            let spawned = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    let (lock, cv) = &*gate;
                    let mut open = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while !*open {
                        open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
                    }
                    drop(open);
                    let mut map = HashMap::new();
                    let mut buf = vec![0u8; 1 << 16];
                    let mut sum = 0u64;
                    for block in 0..64u64 {
                        let off = (block * 4096 + i * 512) % len.max(1);
                        let n = data.read_at(&mut buf, off).unwrap_or(0);
                        sum = sum.wrapping_add(buf[..n].iter().map(|&b| u64::from(b)).sum::<u64>());
                        map.insert(block, n);
                    }
                    let big = vec![7u8; 32 << 20];
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    let _ = tx.send((i, sum, map.len(), big.len()));
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    say(&format!("spawn: {e}"));
                    return ExitCode::from(6);
                }
            }
        }
        drop(tx);
        {
            let (lock, cv) = &*gate;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let results: Vec<_> = rx.iter().collect();
        for w in workers {
            let _ = w.join();
        }
        let ok = results.len() == 4 && results.iter().all(|r| r.2 == 64 && r.3 == 32 << 20);
        say(&format!("results={results:?}"));
        say(if ok { "workload=ok" } else { "workload=bad" });
        ExitCode::SUCCESS
    }
}
