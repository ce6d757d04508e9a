//! `immount mount` end to end: open, mount, confine, serve in the
//! background, and tell the waiting parent when the mount is ready or why it
//! failed.
//!
//! Backgrounding re-executes the program with the same arguments instead of
//! forking a process that may already hold threads: the parent starts the
//! child with [`READY_FD_ENV`] naming the write end of a pipe, the child
//! does all the work and writes one status message into the pipe, and the
//! parent exits with it. Status messages: a `0` byte for "ready" followed
//! by what the sandbox report says (empty unless asked for), or an
//! exit-code byte followed by a one-line error.
//!
//! The server sets itself up in a fixed order:
//! 1. block SIGTERM/SIGINT/SIGHUP (inherited by every thread and process
//!    started later);
//! 2. as root with the sandbox on, start the "confine" thread (on another
//!    CPU than the main thread's, where there is one), which joins
//!    (or makes and keeps) the server's network, IPC and mount namespaces
//!    with their empty root, drops its own capabilities, sets
//!    `no_new_privs`, enters its landlock domain and builds the seccomp
//!    program (`sandbox::prepare_ahead`), while the main thread goes on;
//! 3. open the image and its devices (a bad image fails here, exit code 1);
//! 4. as root: open the session's `/dev/fuse` file and the workers' ones
//!    and hand them, with the image, to the thread, which, once prepared,
//!    forks the server from itself (the child is a copy of
//!    that thread alone, born in its namespaces) while the main thread
//!    mounts on a second descriptor of the same `/dev/fuse` file (without
//!    ever waiting for the thread before it has mounted). The
//!    child finishes confining itself (`sandbox::apply_prepared`)
//!    meanwhile, and waits for one byte on a pipe that says the mount is
//!    up; then it answers the kernel's INIT, attaches its workers' files to
//!    the connection (an `ioctl`) and serves. So the fork and the
//!    confinement cost the mount little: they run beside it. The main
//!    thread becomes the supervisor: it keeps the right to unmount, which
//!    the confined server loses, unmounts on those signals (the server then
//!    sees the end and exits) and when the server fails or dies while
//!    still mounted, and exits with it;
//! 5. otherwise (not root, `--no-sandbox`, a thread that could not make
//!    the namespaces, or where `mount(2)` is refused and fusermount3
//!    mounts): mount, answer INIT, open the workers'
//!    `/dev/fuse` clones; with the sandbox, fork from the main thread,
//!    single-threaded again: the parent supervises as above and the child
//!    confines itself (`sandbox::apply`: see crates/sandbox) and serves.
//!    Without the sandbox, one process does both;
//! 6. report ready, and serve until unmounted. "Ready" always comes from a
//!    server already confined: no request is read before.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use immount_sys::fuse as sys;

use crate::erofs_fs::{ErofsFs, OpenError};
use crate::mount::{self, MountOptions};
use crate::server::{Session, SessionConfig};

/// Environment variable naming the ready pipe's descriptor in the child.
pub const READY_FD_ENV: &str = "IMMOUNT_READY_FD";
/// Exit code for an image that cannot be served (corrupt, unsupported).
pub const EXIT_BAD_IMAGE: i32 = 1;
/// Exit code for usage errors and I/O or mount failures.
pub const EXIT_USAGE: i32 = 2;

/// What to mount where.
#[derive(Debug, Clone, Default)]
pub struct MountRequest {
    /// The EROFS image.
    pub image: PathBuf,
    /// Where to mount it.
    pub mountpoint: PathBuf,
    /// Extra devices, in the image's device-table order.
    pub devices: Vec<PathBuf>,
    /// `-o` options, already split at commas.
    pub options: Vec<String>,
    /// Serve unconfined (`--no-sandbox`; for debugging only).
    pub no_sandbox: bool,
    /// dm-verity: the root hash, tree, signature and trust policy (empty:
    /// only systemd sidecars next to the image, when present).
    pub verity: verity::VerityOptions,
    /// Say what confinement is in place: to the waiting parent, which
    /// prints it, or on stderr in the foreground (`--sandbox-report`).
    pub sandbox_report: bool,
    /// Who the confined server becomes, and the memory it may take.
    pub confinement: Confinement,
}

/// The settings of the server's sandbox that a user chooses
/// (`--sandbox-user`, `--sandbox-memory`); the rest is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confinement {
    /// The uid the server switches to when started as root (not 0).
    pub uid: u32,
    /// The gid the server switches to when started as root (not 0).
    pub gid: u32,
    /// `RLIMIT_DATA` in bytes; `None` leaves it as it was.
    pub memory_limit: Option<u64>,
}

impl Default for Confinement {
    /// nobody (65534) and 1 GiB.
    fn default() -> Self {
        let d = sandbox::SandboxConfig::default();
        Confinement {
            uid: d.uid,
            gid: d.gid,
            memory_limit: d.memory_limit,
        }
    }
}

impl Confinement {
    /// The sandbox's configuration with these settings.
    fn config(&self) -> sandbox::SandboxConfig {
        sandbox::SandboxConfig {
            uid: self.uid,
            gid: self.gid,
            memory_limit: self.memory_limit,
            ..sandbox::SandboxConfig::default()
        }
    }
}

/// A failure with the exit code it deserves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountError {
    /// [`EXIT_BAD_IMAGE`] or [`EXIT_USAGE`].
    pub code: i32,
    /// One line saying what went wrong.
    pub message: String,
}

impl MountError {
    fn usage(message: impl Into<String>) -> Self {
        MountError {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for MountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MountError {}

/// `-o` options, parsed.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How to mount.
    pub mount: MountOptions,
    /// How to serve.
    pub session: SessionConfig,
    /// Readahead in KiB to ask for (root only).
    pub readahead_kib: u32,
    /// No readahead on the image file (less page cache, slower cold reads).
    pub low_memory: bool,
}

/// Parse `-o` options. Unknown options are refused rather than ignored.
pub fn parse_options(options: &[String], image: &Path) -> Result<ServeOptions, MountError> {
    let mut out = ServeOptions {
        mount: MountOptions {
            fsname: image.display().to_string(),
            ..MountOptions::default()
        },
        session: SessionConfig::default(),
        readahead_kib: 1024,
        low_memory: false,
    };
    for opt in options.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (key, value) {
            ("ro" | "default_permissions" | "nosuid" | "nodev", None) => {}
            ("allow_other", None) => out.mount.allow_other = true,
            ("suid", None) => out.mount.suid = true,
            ("dev", None) => out.mount.dev = true,
            ("noacl", None) => out.session.posix_acl = false,
            ("lowmem", None) => {
                out.low_memory = true;
                out.session.push = false;
            }
            ("nopush", None) => out.session.push = false,
            ("stats", None) => out.session.stats = true,
            ("fsname", Some(v)) => out.mount.fsname = v.to_owned(),
            ("threads", Some(v)) => {
                out.session.threads = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| MountError::usage(format!("threads={v}: expected 1 to 64")))?;
            }
            ("readahead_kb", Some(v)) => {
                out.readahead_kib = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (4..=65536).contains(n))
                    .ok_or_else(|| {
                        MountError::usage(format!("readahead_kb={v}: expected 4 to 65536"))
                    })?;
            }
            ("rw", None) => return Err(MountError::usage("rw: EROFS images are read-only")),
            _ => return Err(MountError::usage(format!("unknown mount option {opt:?}"))),
        }
    }
    // A readahead raised before INIT is answered (as the server forked
    // before the mount does) survives only if INIT's answer allows it.
    out.session.max_readahead = out.readahead_kib.saturating_mul(1024);
    Ok(out)
}

/// The write end of the ready pipe, in the background child.
#[derive(Debug)]
pub struct ReadyNotifier(File);

impl ReadyNotifier {
    /// The notifier our parent asked for in [`READY_FD_ENV`], if any. The
    /// variable is removed so that nothing we start inherits it.
    pub fn from_env() -> Option<ReadyNotifier> {
        let value = std::env::var(READY_FD_ENV).ok()?;
        std::env::remove_var(READY_FD_ENV);
        let fd = value.parse::<i32>().ok()?;
        sys::take_inherited_fd(fd)
            .ok()
            .map(|fd| ReadyNotifier(File::from(fd)))
    }

    /// Tell the parent the mount is ready, with a text for it to print
    /// (empty for none).
    pub fn ready(mut self, text: &str) {
        let mut msg = vec![0];
        msg.extend_from_slice(text.as_bytes());
        let _ = self.0.write_all(&msg);
    }

    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// A second descriptor of the same pipe, for a child to report through.
    fn try_clone(&self) -> std::io::Result<ReadyNotifier> {
        self.0.try_clone().map(ReadyNotifier)
    }

    /// Tell the parent why we failed.
    pub fn fail(mut self, e: &MountError) {
        let mut msg = vec![u8::try_from(e.code).unwrap_or(2).max(1)];
        msg.extend_from_slice(e.message.replace('\n', " ").as_bytes());
        let _ = self.0.write_all(&msg);
    }
}

/// Mount and serve until unmounted (or signalled); see the module docs.
/// `notifier` hears "ready" or the error.
pub fn serve(req: &MountRequest, notifier: Option<ReadyNotifier>) -> Result<(), MountError> {
    // Blocked before any thread starts, so that every thread and process
    // inherits it.
    if let Err(e) = sys::block_termination_signals() {
        return fail(
            notifier,
            MountError::usage(format!("cannot block signals: {e}")),
        );
    }
    // As root, most of the confinement runs on a thread of its own while
    // this one opens the image, and the server is forked from that thread
    // while this one mounts; see `Ahead`.
    let ahead = if req.no_sandbox {
        None
    } else {
        match Ahead::start(&req.confinement) {
            Ok(a) => a,
            Err(e) => return fail(notifier, e),
        }
    };
    let (opts, fs) = match open_image(req) {
        Ok(o) => o,
        Err(e) => {
            drop(ahead);
            return fail(notifier, e);
        }
    };
    let (mut notifier, mut fs) = (notifier, fs);
    if let Some(ahead) = ahead {
        match serve_forked_ahead(req, &opts, fs, ahead, notifier) {
            Early::Served(outcome) => return outcome,
            Early::Mounted(n, session, mounted, image_fds) => {
                return serve_confined(req, session, mounted, image_fds, n);
            }
            Early::Fallback(n, f) => (notifier, fs) = (n, f),
        }
    }
    let image_fds = fs.fds().to_vec();
    let (session, mounted) = match mount_and_start(req, &opts, fs) {
        Ok(s) => s,
        Err(e) => return fail(notifier, e),
    };
    if req.no_sandbox {
        if let Err(e) = start_signal_thread(mounted.clone()) {
            let _ = mounted.unmount();
            return fail(notifier, e);
        }
        // The command line warned already; the report says it on demand.
        let text = if req.sandbox_report {
            "sandbox DISABLED (--no-sandbox): the server is not confined".to_owned()
        } else {
            String::new()
        };
        return report_ready_and_serve(session, notifier, &text, req.sandbox_report);
    }
    serve_confined(req, session, mounted, image_fds, notifier)
}

/// The usual way with the sandbox, once mounted and started: fork from
/// this (single) thread; the child confines itself and serves, and this
/// process supervises.
fn serve_confined(
    req: &MountRequest,
    session: Session,
    mounted: Arc<mount::Mounted>,
    image_fds: Vec<RawFd>,
    notifier: Option<ReadyNotifier>,
) -> Result<(), MountError> {
    let job = Job::new(req, session, &image_fds, notifier, &[]);
    match fork_server_here(job) {
        Ok(server) => supervise(server, mounted),
        Err((notifier, e)) => {
            let _ = mounted.unmount();
            fail(notifier, e)
        }
    }
}

/// Report `e` through `notifier`, if any, and return it.
fn fail(notifier: Option<ReadyNotifier>, e: MountError) -> Result<(), MountError> {
    if let Some(n) = notifier {
        n.fail(&e);
    }
    Err(e)
}

/// What the confined server is handed: its session, the ready pipe and
/// the sandbox to apply.
struct Job {
    session: Session,
    notifier: Option<ReadyNotifier>,
    config: sandbox::SandboxConfig,
    report: bool,
}

impl Job {
    /// The job of a server serving `session` on the image's descriptors,
    /// reporting through `notifier`: the sandbox keeps exactly those
    /// descriptors, `extra` ones and stderr.
    fn new(
        req: &MountRequest,
        session: Session,
        image_fds: &[RawFd],
        notifier: Option<ReadyNotifier>,
        extra: &[RawFd],
    ) -> Job {
        let mut keep = session.fds();
        keep.extend(image_fds);
        keep.extend(notifier.as_ref().map(ReadyNotifier::raw_fd));
        keep.extend(extra);
        keep.push(2);
        Job {
            session,
            notifier,
            config: sandbox::SandboxConfig {
                keep_fds: keep,
                ..req.confinement.config()
            },
            report: req.sandbox_report,
        }
    }
}

/// The failure to start the server, with the ready pipe to tell it through.
type ForkError = (Option<ReadyNotifier>, MountError);

/// Fork from this (single) thread; the child confines itself with
/// `sandbox::apply` and serves.
fn fork_server_here(job: Job) -> Result<u32, ForkError> {
    match sys::fork_single_threaded() {
        Err(e) => Err((
            job.notifier,
            MountError::usage(format!("cannot start the confined server: {e}")),
        )),
        // The supervisor: nothing of the server's, only the mount.
        Ok(Some(server)) => Ok(server),
        Ok(None) => run_server(job),
    }
}

/// Exit code for an outcome, saying the error on stderr.
fn exit_code(r: Result<(), MountError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("immount: {}", e.message);
            e.code
        }
    }
}

/// The confined server, in the child of a fork from the single main thread
/// (after the mount): confine, report ready, serve, and exit with the
/// outcome; it never returns into the code that forked it.
fn run_server(job: Job) -> ! {
    let Job {
        session,
        notifier,
        config,
        report,
    } = job;
    let notifier = never_trim_or_exit(notifier);
    let result = match sandbox::apply(&config) {
        // Partly confined: report and end; the supervisor unmounts.
        Err(e) => fail(
            notifier,
            MountError::usage(format!("sandbox setup failed: {e}")),
        ),
        Ok(r) => {
            let text = if report { r.to_string() } else { String::new() };
            report_ready_and_serve(session, notifier, &text, report)
        }
    };
    std::process::exit(exit_code(result));
}

/// In a server about to confine itself: glibc opens a /proc file the
/// first time it trims a thread's arena, so never trim; if that cannot be
/// set, say so and end here.
fn never_trim_or_exit(notifier: Option<ReadyNotifier>) -> Option<ReadyNotifier> {
    if let Err(e) = sys::malloc_never_trim() {
        let e = MountError::usage(format!("allocator: {e}"));
        std::process::exit(exit_code(fail(notifier, e)));
    }
    notifier
}

/// What the server forked from the pre-confining thread is handed, before
/// the mount exists: a [`Job`] whose session is on a `/dev/fuse` file the
/// mount will be made on, with its workers' files (attached once
/// mounted) and its own descriptor of the ready pipe, and the read end of
/// the "go" pipe.
struct EarlyJob {
    job: Job,
    go: std::os::fd::OwnedFd,
}

/// The byte on the "go" pipe that says the mount is up. Anything else, or
/// nothing (end of file), means it failed and was reported already.
const GO: u8 = b'M';

/// The server forked from the pre-confining thread, while the main thread
/// mounts: confine (the rest of it), wait for the mount, answer INIT,
/// attach the workers, report ready, serve, and exit with the outcome; it
/// never returns into the code that forked it.
fn run_forked_server(job: EarlyJob, prepared: sandbox::Prepared) -> ! {
    let EarlyJob {
        job:
            Job {
                mut session,
                notifier,
                config,
                report,
            },
        go,
    } = job;
    let notifier = never_trim_or_exit(notifier);
    let text = match sandbox::apply_prepared(&config, prepared) {
        Ok(r) if report => r.to_string(),
        Ok(_) => String::new(),
        // Partly confined: report and end; the main thread, seeing the
        // end, takes the mount down.
        Err(e) => {
            let e = MountError::usage(format!("sandbox setup failed: {e}"));
            std::process::exit(exit_code(fail(notifier, e)));
        }
    };
    let mut go = File::from(go);
    let mut byte = [0u8; 1];
    let mounted = loop {
        match go.read(&mut byte) {
            Ok(1) => break byte[0] == GO,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => break false,
        }
    };
    drop(go);
    if !mounted {
        // The mount failed; the main thread says why. Exit code 0 tells
        // it that this process has said nothing.
        std::process::exit(0);
    }
    let result = match session.init() {
        Ok(()) => {
            session.attach_workers();
            report_ready_and_serve(session, notifier, &text, report)
        }
        Err(e) => fail(
            notifier,
            MountError::usage(format!("FUSE handshake failed: {e}")),
        ),
    };
    std::process::exit(exit_code(result));
}

/// How [`serve_forked_ahead`] ended: served (or failed, and said so);
/// mounted, but the thread could not prepare, so the server is to be
/// forked the usual way (with the ready pipe, which heard nothing, the
/// session, started, and the image's descriptors); or fell back to the
/// usual way from the start (with the ready pipe and the image).
enum Early {
    Served(Result<(), MountError>),
    Mounted(
        Option<ReadyNotifier>,
        Session,
        Arc<mount::Mounted>,
        Vec<RawFd>,
    ),
    Fallback(Option<ReadyNotifier>, Arc<ErofsFs>),
}

/// As root, with the pre-confining thread started: everything the server
/// will serve on is opened here and handed to the thread, which forks the
/// server from itself as soon as it has prepared; the server finishes
/// confining itself while this thread mounts, then hears "go" and answers
/// the kernel itself. This thread becomes the supervisor. What a server
/// costs the mount is then mostly hidden behind the mount itself.
///
/// This thread never waits for the other before it has mounted: the job
/// is handed over at once, and the thread takes it when it is ready,
/// without sleeping if it is there (a thread woken up on this 2-CPU
/// machine took up to 0.4 ms to run again).
fn serve_forked_ahead(
    req: &MountRequest,
    opts: &ServeOptions,
    fs: Arc<ErofsFs>,
    ahead: Ahead,
    notifier: Option<ReadyNotifier>,
) -> Early {
    let served = |notifier, e| Early::Served(fail(notifier, e));
    // The fork copies the thread alone: no other thread but this one may
    // exist. Counted now, while /proc is still in sight of this thread;
    // none starts between here and the fork.
    match thread_count() {
        Ok(2) => {}
        // The thread has ended already: it could not make the namespaces
        // (then the usual way follows), or failed.
        Ok(1) => return ended_early(ahead, notifier, fs),
        Ok(n) => {
            let msg = format!("cannot start the confined server: {n} threads, 2 expected");
            return served(notifier, MountError::usage(msg));
        }
        Err(e) => {
            let msg = format!("cannot start the confined server: /proc/self/task: {e}");
            return served(notifier, MountError::usage(msg));
        }
    }
    let opened = (|| {
        let fs: Arc<dyn crate::filesystem::Filesystem> = fs.clone();
        let mut session = Session::new(sys::open_dev_fuse()?, fs, opts.session);
        session.open_workers()?;
        let mount_dev = session.dup_dev()?;
        let (go_rx, go_tx) = sys::pipe()?;
        let child_notifier = notifier
            .as_ref()
            .map(ReadyNotifier::try_clone)
            .transpose()?;
        Ok::<_, std::io::Error>((session, mount_dev, go_rx, go_tx, child_notifier))
    })();
    let Ok((session, mount_dev, go_rx, go_tx, child_notifier)) = opened else {
        ahead.abandon();
        return Early::Fallback(notifier, fs);
    };
    let job = EarlyJob {
        job: Job::new(req, session, fs.fds(), child_notifier, &[go_rx.as_raw_fd()]),
        go: go_rx,
    };
    // A channel of one: the send never waits.
    if let Err(std::sync::mpsc::SendError(job)) = ahead.jobs.send(job) {
        // Ended since it was counted. Its copies of the descriptors,
        // never handed over, close here.
        drop(job);
        return ended_early(ahead, notifier, fs);
    }
    // Until `outcome` returns, the fork may be under way: this thread
    // takes no lock of its own meanwhile (see `sys::fork_from_thread`); it
    // only makes system calls and allocates.
    let mounted = mount::mount_direct(&mount_dev, &req.mountpoint, &opts.mount);
    if let Ok(m) = &mounted {
        mount::raise_readahead(m.mountpoint(), opts.readahead_kib);
    }
    let outcome = ahead.outcome();
    let mounted = match mounted {
        Ok(m) => Arc::new(m),
        Err(e) => {
            // The server hears no "go" and ends without a word, unless it
            // failed and said so itself (exit code not 0).
            drop(go_tx);
            let quiet = match outcome {
                Outcome::Forked(pid) => sandbox::supervise(pid, |_| {}).is_ok_and(|s| s.success()),
                Outcome::NotPrepared | Outcome::Failed(_) => true,
            };
            if e.raw_os_error() == Some(libc::EPERM) && quiet {
                return Early::Fallback(notifier, fs);
            }
            let e = MountError::usage(format!("cannot mount on {}: {e}", req.mountpoint.display()));
            if quiet {
                return served(notifier, e);
            }
            return Early::Served(Err(e));
        }
    };
    let server = match outcome {
        Outcome::Forked(pid) => pid,
        // The namespaces could not be made directly: a session on the
        // mount's file, started here, for the usual fork.
        Outcome::NotPrepared => {
            let image_fds = fs.fds().to_vec();
            let fs: Arc<dyn crate::filesystem::Filesystem> = fs;
            let session = Session::new(mount_dev, fs, opts.session);
            return match start_session(session, mounted) {
                Ok((session, mounted)) => Early::Mounted(notifier, session, mounted, image_fds),
                Err(e) => served(notifier, e),
            };
        }
        Outcome::Failed(e) => {
            let _ = mounted.unmount();
            return served(notifier, e);
        }
    };
    // Go. A server that has died already makes this fail; the supervisor
    // then learns why from its exit.
    let _ = (&File::from(go_tx)).write_all(&[GO]);
    // The server speaks from here on: the supervisor keeps none of its
    // descriptors (and closes them before `prepare_supervisor` does).
    drop((mount_dev, notifier, fs));
    Early::Served(supervise(server, mounted))
}

/// The ended thread's error.
const AHEAD_ENDED: &str = "the confining thread ended early";

/// The pre-confining thread ended before it took the server's job: when it
/// could not make the namespaces (root without `CAP_SYS_ADMIN` or with
/// `unshare` denied, as in some containers), the usual way follows;
/// otherwise its error ends the mount.
fn ended_early(ahead: Ahead, notifier: Option<ReadyNotifier>, fs: Arc<ErofsFs>) -> Early {
    match ahead.outcome() {
        Outcome::NotPrepared => Early::Fallback(notifier, fs),
        Outcome::Failed(e) => Early::Served(fail(notifier, e)),
        // Not without a job; said as the end it would be.
        Outcome::Forked(_) => Early::Served(fail(notifier, MountError::usage(AHEAD_ENDED))),
    }
}

/// How long the pre-confining thread, once prepared, looks for its job
/// without sleeping (see [`serve_forked_ahead`]): longer than opening an
/// image takes with the page cache warm (0.2-0.3 ms here); with it cold
/// (3 ms and more) the thread sleeps rather than hold a CPU.
const SPIN_FOR_JOB: std::time::Duration = std::time::Duration::from_millis(1);

/// What became of the pre-confining thread.
enum Outcome {
    /// It forked the server, whose pid this is.
    Forked(u32),
    /// It could not make the namespaces directly (root without
    /// `CAP_SYS_ADMIN`, as in some containers): the server is to be forked
    /// the usual way.
    NotPrepared,
    /// Its preparation or its fork failed.
    Failed(MountError),
}

/// The pre-confining thread, started as root (see `sandbox::prepare_ahead`):
/// it makes or joins the server's namespaces and confines itself as far as
/// a thread's own state goes (capabilities, `no_new_privs`, landlock) while
/// the main thread opens the image, then takes the server's [`EarlyJob`]
/// and forks the server from itself, so that the child is born in them and
/// with them, while the main thread mounts. The main thread keeps root and
/// its capabilities for the supervisor.
struct Ahead {
    jobs: std::sync::mpsc::SyncSender<EarlyJob>,
    outcome: std::sync::mpsc::Receiver<Result<u32, Option<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Ahead {
    /// Start the thread; `None` when not root (the caller then forks and
    /// confines as usual).
    fn start(confinement: &Confinement) -> Result<Option<Ahead>, MountError> {
        use std::sync::mpsc;
        if !rustix::process::geteuid().is_root() {
            return Ok(None);
        }
        let (jobs, job_rx) = mpsc::sync_channel::<EarlyJob>(1);
        // The CPUs the thread may use again before it forks (see below).
        let (cpus_tx, cpus_rx) = mpsc::sync_channel::<sys::CpuMask>(1);
        // Ok(pid); Err(None): not prepared; Err(Some(why)): failed.
        let (outcome_tx, outcome) = mpsc::sync_channel(1);
        let config = confinement.config();
        // The server, a copy of the thread, would carry the thread's name
        // ("confine") where ps and top show it; it takes this one's back.
        let comm = rustix::thread::name().ok();
        let thread = std::thread::Builder::new()
            .name("confine".into())
            .spawn(move || {
                let prepared = match sandbox::prepare_ahead(&config) {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        let _ = outcome_tx.send(Err(None));
                        return;
                    }
                    Err(e) => {
                        let _ = outcome_tx.send(Err(Some(format!("sandbox setup failed: {e}"))));
                        return;
                    }
                };
                // None: no server (the main thread failed, or went the
                // usual way); what this thread made ends with it.
                let Some(job) = take_job(&job_rx) else { return };
                // Started on a CPU of its own: the server may use them all.
                if let Ok(cpus) = cpus_rx.try_recv() {
                    let _ = sys::use_cpus(&cpus);
                }
                match sys::fork_from_thread() {
                    Ok(Some(pid)) => {
                        // This thread's copies of the server's descriptors
                        // close before the main thread hears, which then
                        // goes on without waiting for this thread to end
                        // (see `Ahead::outcome`): nothing of it is left
                        // to close once the supervisor closes what it
                        // does not keep.
                        drop((job, prepared));
                        let _ = outcome_tx.send(Ok(pid));
                    }
                    Ok(None) => {
                        if let Some(comm) = &comm {
                            let _ = rustix::thread::set_name(comm);
                        }
                        run_forked_server(job, prepared)
                    }
                    Err(e) => {
                        let why = format!("cannot start the confined server: {e}");
                        let _ = outcome_tx.send(Err(Some(why)));
                    }
                }
            })
            .map_err(|e| MountError::usage(format!("cannot start a thread: {e}")))?;
        // Linux queues the new thread behind this one, on this CPU, and
        // while this one opens the image and mounts without sleeping (the
        // page cache warm) the other CPU stayed idle: the thread began to
        // run only once the mount was made, and the server came 0.5 ms
        // after the mount instead of beside it. So it starts elsewhere.
        if let Some(cpus) = sys::other_thread()
            .ok()
            .flatten()
            .and_then(sys::start_elsewhere)
        {
            let _ = cpus_tx.send(cpus);
        }
        Ok(Some(Ahead {
            jobs,
            outcome,
            thread,
        }))
    }

    /// Let the thread end without a server, and wait until it has.
    fn abandon(self) {
        drop(self.jobs);
        let _ = self.thread.join();
    }

    /// Wait until the thread has forked the server (or failed, or found it
    /// could not prepare). Unless it forked, also until it has ended: the
    /// usual way forks from this thread, alone. After a fork, the thread
    /// has nothing left to do but end, and closed what it held before it
    /// said so; waiting for its end cost the mount 0.15-0.2 ms (it shares
    /// its CPU with the new server).
    fn outcome(self) -> Outcome {
        let outcome = match self.outcome.recv() {
            Ok(Ok(pid)) => Outcome::Forked(pid),
            Ok(Err(None)) => Outcome::NotPrepared,
            Ok(Err(Some(e))) => Outcome::Failed(MountError::usage(e)),
            Err(_) => Outcome::Failed(MountError::usage(AHEAD_ENDED)),
        };
        if !matches!(outcome, Outcome::Forked(_)) {
            let _ = self.thread.join();
        }
        outcome
    }
}

/// The job, looked for without sleeping for [`SPIN_FOR_JOB`] at most, then
/// waited for; `None` when the main thread dropped its end.
fn take_job(jobs: &std::sync::mpsc::Receiver<EarlyJob>) -> Option<EarlyJob> {
    use std::sync::mpsc::TryRecvError;
    let start = std::time::Instant::now();
    while start.elapsed() < SPIN_FOR_JOB {
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(TryRecvError::Empty) => std::hint::spin_loop(),
            Err(TryRecvError::Disconnected) => return None,
        }
    }
    jobs.recv().ok()
}

/// The threads of this process. One `stat`: the link count of
/// `/proc/self/task` is 2 plus the threads (the kernel adds them in
/// `proc_task_getattr`); when it does not say 2 threads, the entries are
/// counted one by one, which decides.
fn thread_count() -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self/task")?.nlink() == 4 {
        return Ok(2);
    }
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Report ready and serve until unmounted (the mount itself is held by
/// the caller, or by the supervisor).
fn report_ready_and_serve(
    session: Session,
    notifier: Option<ReadyNotifier>,
    text: &str,
    print: bool,
) -> Result<(), MountError> {
    match notifier {
        Some(n) => n.ready(text),
        None if print => eprintln!("immount: {}", text.trim_end()),
        None => {}
    }
    session
        .serve()
        .map_err(|e| MountError::usage(format!("serving failed: {e}")))
}

/// Unmount on SIGTERM/SIGINT/SIGHUP, then exit.
fn start_signal_thread(mounted: Arc<mount::Mounted>) -> Result<(), MountError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if sys::wait_termination_signal().is_ok() {
                let _ = mounted.unmount();
                std::process::exit(0);
            }
        })
        .map(drop)
        .map_err(|e| MountError::usage(format!("cannot start a thread: {e}")))
}

/// The supervisor's part: unmount on a termination signal (the server then
/// sees the end and exits), wait for the server, unmount whatever it left,
/// and say why it ended if it did not end well.
fn supervise(server: u32, mounted: Arc<mount::Mounted>) -> Result<(), MountError> {
    // Keep only the standard streams (and the fusermount3 socket, owned by
    // `mounted`); drop every capability but the one to unmount.
    let _ = sandbox::prepare_supervisor(&supervisor_fds(&mounted));
    let on_signal = mounted.clone();
    let signals = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if sys::wait_termination_signal().is_ok() {
                let _ = on_signal.unmount();
            }
        });
    if let Err(e) = signals {
        eprintln!("immount: cannot start a thread: {e}");
    }
    let status = sandbox::supervise(server, |status| {
        // A server ends cleanly only when its mount is gone (unmounted by a
        // user, or by a signal above), and by then the same path may hold a
        // newer mount, which is not ours to remove. Otherwise (it failed,
        // crashed or was killed) the mount is dead and would answer
        // ENOTCONN: unmount it.
        if !status.success() {
            let _ = mounted.unmount();
        }
    })
    .map_err(|e| MountError::usage(format!("waiting for the server: {e}")))?;
    if status.success() {
        return Ok(());
    }
    let why = sandbox::explain_exit(status, b"").unwrap_or_else(|| status.to_string());
    Err(MountError::usage(format!("the server ended: {why}")))
}

/// The descriptors a supervisor keeps: the standard streams and what
/// `mounted` owns.
fn supervisor_fds(mounted: &mount::Mounted) -> Vec<RawFd> {
    let mut keep = vec![0, 1, 2];
    keep.extend(mounted.fds());
    keep
}

/// Parse the options and open the image (a bad image fails here, with
/// [`EXIT_BAD_IMAGE`]).
fn open_image(req: &MountRequest) -> Result<(ServeOptions, Arc<ErofsFs>), MountError> {
    let mut opts = parse_options(&req.options, &req.image)?;
    if !req.no_sandbox {
        // Confined, the server may not open /proc to look at its callers.
        opts.session.read_proc = false;
    }
    let devices: Vec<&Path> = req.devices.iter().map(PathBuf::as_path).collect();
    let fs =
        ErofsFs::open(&req.image, &devices, opts.low_memory, &req.verity).map_err(|e| match e {
            OpenError::Io(..) => MountError::usage(e.to_string()),
            OpenError::Verity(ref inner) => MountError {
                code: if inner.is_mismatch() || matches!(inner, verity::Error::Untrusted(_)) {
                    EXIT_BAD_IMAGE
                } else {
                    EXIT_USAGE
                },
                message: format!("{}: {e}", req.image.display()),
            },
            OpenError::Image(ref inner) => {
                let code = if matches!(inner, erofs::Error::Io { .. }) {
                    EXIT_USAGE
                } else {
                    EXIT_BAD_IMAGE
                };
                MountError {
                    code,
                    message: format!("{}: {e}", req.image.display()),
                }
            }
        })?;
    Ok((opts, Arc::new(fs)))
}

/// Mount (directly, or through fusermount3), raise the readahead, answer
/// INIT and open the workers' `/dev/fuse` clones: the usual way, in
/// one thread, before any fork.
fn mount_and_start(
    req: &MountRequest,
    opts: &ServeOptions,
    fs: Arc<ErofsFs>,
) -> Result<(Session, Arc<mount::Mounted>), MountError> {
    let (dev, mounted) = mount::mount(&req.mountpoint, &opts.mount).map_err(|e| {
        MountError::usage(format!("cannot mount on {}: {e}", req.mountpoint.display()))
    })?;
    // Before INIT or after: its answer allows this readahead (see
    // `SessionConfig::max_readahead`).
    mount::raise_readahead(mounted.mountpoint(), opts.readahead_kib);
    start_session(Session::new(dev, fs, opts.session), Arc::new(mounted))
}

/// Once mounted (and the readahead raised): answer INIT and open the
/// workers' `/dev/fuse` clones; on failure, unmount.
fn start_session(
    mut session: Session,
    mounted: Arc<mount::Mounted>,
) -> Result<(Session, Arc<mount::Mounted>), MountError> {
    if let Err(e) = session.init() {
        let _ = mounted.unmount();
        return Err(MountError::usage(format!("FUSE handshake failed: {e}")));
    }
    if let Err(e) = session.prepare_workers() {
        let _ = mounted.unmount();
        return Err(MountError::usage(format!("cannot clone /dev/fuse: {e}")));
    }
    Ok((session, mounted))
}

/// Start this program again in the background with the same arguments and
/// wait until it reports the mount ready (`Ok` with the text it sent, such
/// as a sandbox report) or fails (`Err` with its message and exit code). The child's output goes to `log`, or nowhere.
pub fn spawn_background(log: Option<&Path>) -> Result<String, MountError> {
    let io_err = |what: &str, e: std::io::Error| MountError::usage(format!("{what}: {e}"));
    let (read_end, write_end) = sys::pipe().map_err(|e| io_err("pipe", e))?;
    sys::set_cloexec(write_end.as_fd(), false).map_err(|e| io_err("fcntl", e))?;
    let exe = std::env::current_exe().map_err(|e| io_err("cannot find our own program", e))?;
    let stderr = match log {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| io_err(&p.display().to_string(), e))?,
        ),
        None => Stdio::null(),
    };
    let spawned = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, write_end.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // Its own process group: a Ctrl-C meant for the shell that ran
        // `immount mount` does not reach the server.
        .process_group(0)
        .spawn();
    drop(write_end);
    let mut child = spawned.map_err(|e| io_err("cannot start the server", e))?;
    let mut reader = File::from(read_end);
    let mut first = [0u8; 1];
    let got = loop {
        match reader.read(&mut first) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("waiting for the server", e)),
        }
    };
    if got == 1 && first[0] == 0 {
        let mut text = String::new();
        let _ = reader.take(64 * 1024).read_to_string(&mut text);
        return Ok(text);
    }
    if got == 1 {
        let mut rest = String::new();
        let _ = reader.take(64 * 1024).read_to_string(&mut rest);
        let _ = child.wait();
        return Err(MountError {
            code: i32::from(first[0]),
            message: rest,
        });
    }
    let status = child
        .wait()
        .map_err(|e| io_err("waiting for the server", e))?;
    Err(MountError::usage(format!(
        "the server exited before the mount was ready ({status})"
    )))
}
