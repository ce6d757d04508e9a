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
//! 2. as root with the sandbox on, start the "confine" thread, which makes
//!    the server's network, IPC and mount namespaces and its empty root for
//!    itself alone, then drops its own capabilities, sets `no_new_privs`
//!    and enters its landlock domain, and builds the seccomp program
//!    (`sandbox::prepare_ahead`), while the main thread goes on: most of
//!    the confinement's work, which so costs the mount no time;
//! 3. open the image and its devices (a bad image fails here, exit code 1);
//! 4. mount (directly, or through fusermount3) and answer INIT; open the
//!    `/dev/fuse` clones of the worker threads;
//! 5. with the sandbox (the default): fork — from the confine thread when
//!    it prepared (the main thread waits for the pid meanwhile; the child
//!    is a copy of that thread alone, born in its namespaces), otherwise
//!    from the main thread, single-threaded again. The parent becomes the
//!    supervisor: it keeps the right to unmount, which the confined server
//!    loses, unmounts on those signals (the server then sees the end and
//!    exits) and when the server fails or dies while still mounted, and
//!    exits with it. The child confines itself (`sandbox::apply_prepared`
//!    or `sandbox::apply`: see crates/sandbox) and serves. Without the
//!    sandbox, one process does both;
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
    let fail = |notifier: Option<ReadyNotifier>, e: MountError| {
        if let Some(n) = notifier {
            n.fail(&e);
        }
        Err(e)
    };
    // As root, the slow part of the confinement (namespaces, the empty
    // root) runs on a thread of its own while this one opens the image and
    // mounts; see `Ahead`.
    // Blocked before any thread starts, so that every thread and process
    // inherits it.
    if let Err(e) = sys::block_termination_signals() {
        return fail(
            notifier,
            MountError::usage(format!("cannot block signals: {e}")),
        );
    }
    let ahead = if req.no_sandbox {
        None
    } else {
        match Ahead::start() {
            Ok(a) => a,
            Err(e) => return fail(notifier, e),
        }
    };
    let (session, mounted, image_fds) = match setup(req) {
        Ok(s) => s,
        Err(e) => {
            drop(ahead);
            return fail(notifier, e);
        }
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
    let mut keep = session.fds();
    keep.extend(image_fds);
    keep.extend(notifier.as_ref().map(ReadyNotifier::raw_fd));
    keep.push(2);
    let config = sandbox::SandboxConfig {
        keep_fds: keep,
        ..sandbox::SandboxConfig::default()
    };
    let job = Job {
        session,
        notifier,
        config,
        report: req.sandbox_report,
    };
    let forked = match ahead {
        Some(ahead) => ahead.fork_server(job),
        None => fork_server_here(job),
    };
    match forked {
        Ok(server) => supervise(server, mounted),
        Err((notifier, e)) => {
            let _ = mounted.unmount();
            fail(notifier, e)
        }
    }
}

/// What the confined server is handed: its session, the ready pipe and
/// the sandbox to apply.
struct Job {
    session: Session,
    notifier: Option<ReadyNotifier>,
    config: sandbox::SandboxConfig,
    report: bool,
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
        Ok(None) => run_server(job, None),
    }
}

/// The confined server, in the child of the fork: confine (the rest of it,
/// when `prepared`), report ready, serve, and exit with the outcome; it
/// never returns into the code that forked it.
fn run_server(job: Job, prepared: Option<sandbox::Prepared>) -> ! {
    let Job {
        session,
        notifier,
        config,
        report,
    } = job;
    let code = |r: Result<(), MountError>| match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("immount: {}", e.message);
            e.code
        }
    };
    // glibc opens a /proc file the first time it trims a thread's arena:
    // never trim.
    if let Err(e) = sys::malloc_never_trim() {
        let e = MountError::usage(format!("allocator: {e}"));
        if let Some(n) = notifier {
            n.fail(&e);
        }
        std::process::exit(code(Err(e)));
    }
    let applied = match prepared {
        Some(p) => sandbox::apply_prepared(&config, p),
        None => sandbox::apply(&config),
    };
    let result = match applied {
        // Partly confined: report and end; the supervisor unmounts.
        Err(e) => {
            let e = MountError::usage(format!("sandbox setup failed: {e}"));
            if let Some(n) = notifier {
                n.fail(&e);
            }
            Err(e)
        }
        Ok(r) => {
            let text = if report { r.to_string() } else { String::new() };
            report_ready_and_serve(session, notifier, &text, report)
        }
    };
    std::process::exit(code(result));
}

/// The pre-confining thread, started as root (see `sandbox::prepare_ahead`):
/// it makes the server's namespaces and empty root and confines itself as
/// far as a thread's own state goes (capabilities, `no_new_privs`,
/// landlock) while the main thread opens the image and mounts, then waits
/// for the server's [`Job`] and forks the server from itself, so that the
/// child is born in them and with them. The main thread, which keeps root
/// and its capabilities for the supervisor, meanwhile only waits for the
/// child's pid.
struct Ahead {
    prepared: std::sync::mpsc::Receiver<Result<bool, String>>,
    jobs: std::sync::mpsc::SyncSender<Job>,
    forked: std::sync::mpsc::Receiver<Result<u32, ForkError>>,
    thread: std::thread::JoinHandle<()>,
}

impl Ahead {
    /// Start the thread; `None` when not root (the caller then forks and
    /// confines as usual).
    fn start() -> Result<Option<Ahead>, MountError> {
        use std::sync::mpsc;
        if !rustix::process::geteuid().is_root() {
            return Ok(None);
        }
        let (prepared_tx, prepared) = mpsc::sync_channel(1);
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(1);
        let (forked_tx, forked) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("confine".into())
            .spawn(move || {
                let (status, prepared) =
                    match sandbox::prepare_ahead(&sandbox::SandboxConfig::default()) {
                        Ok(Some(p)) => (Ok(true), Some(p)),
                        Ok(None) => (Ok(false), None),
                        Err(e) => (Err(e.to_string()), None),
                    };
                let _ = prepared_tx.send(status);
                let Some(prepared) = prepared else { return };
                // An error: no server (the mount failed); what this thread
                // made ends with it.
                let Ok(job) = job_rx.recv() else { return };
                match sys::fork_from_waited_thread() {
                    Ok(Some(pid)) => {
                        // The supervisor first; then our copies of the
                        // server's descriptors close here (the ready pipe's
                        // among them: the child reports only after a while).
                        let _ = forked_tx.send(Ok(pid));
                        drop(job);
                    }
                    Ok(None) => run_server(job, Some(prepared)),
                    Err(e) => {
                        let msg = format!("cannot start the confined server: {e}");
                        let _ = forked_tx.send(Err((job.notifier, MountError::usage(msg))));
                    }
                }
            })
            .map_err(|e| MountError::usage(format!("cannot start a thread: {e}")))?;
        Ok(Some(Ahead {
            prepared,
            jobs,
            forked,
            thread,
        }))
    }

    /// Fork the server: from the thread when it prepared the namespaces,
    /// otherwise (it could not make them directly) from here once it has
    /// ended, the usual way.
    fn fork_server(self, job: Job) -> Result<u32, ForkError> {
        let ended = "the confining thread ended early";
        // The fork copies the confine thread alone: no other thread but
        // this one (waiting below) may exist, or it could hold a lock the
        // child needs. Counted now, while the thread may still be
        // preparing (it is alive until it has the job, or has failed to
        // prepare, which the answer below says), and where /proc is still
        // in sight; no thread starts between here and the fork.
        let threads = thread_count();
        match self.prepared.recv() {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                drop(self.jobs);
                let _ = self.thread.join();
                return fork_server_here(job);
            }
            Ok(Err(e)) => {
                let msg = format!("sandbox setup failed: {e}");
                return Err((job.notifier, MountError::usage(msg)));
            }
            Err(_) => return Err((job.notifier, MountError::usage(ended.to_owned()))),
        }
        match threads {
            Ok(2) => {}
            Ok(n) => {
                let msg = format!("cannot start the confined server: {n} threads, 2 expected");
                return Err((job.notifier, MountError::usage(msg)));
            }
            Err(e) => {
                let msg = format!("cannot start the confined server: /proc/self/task: {e}");
                return Err((job.notifier, MountError::usage(msg)));
            }
        }
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            return Err((job.notifier, MountError::usage(ended.to_owned())));
        }
        let outcome = self
            .forked
            .recv()
            .unwrap_or_else(|_| Err((None, MountError::usage(ended.to_owned()))));
        let _ = self.thread.join();
        outcome
    }
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

fn setup(req: &MountRequest) -> Result<(Session, Arc<mount::Mounted>, Vec<RawFd>), MountError> {
    let mut opts = parse_options(&req.options, &req.image)?;
    if !req.no_sandbox {
        // Confined, the server may not open /proc to look at its callers.
        opts.session.read_proc = false;
    }
    sys::block_termination_signals()
        .map_err(|e| MountError::usage(format!("cannot block signals: {e}")))?;
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
    let image_fds = fs.fds().to_vec();
    let (dev, mounted) = mount::mount(&req.mountpoint, &opts.mount).map_err(|e| {
        MountError::usage(format!("cannot mount on {}: {e}", req.mountpoint.display()))
    })?;
    let mounted = Arc::new(mounted);
    let mut session = Session::new(dev, Arc::new(fs), opts.session);
    if let Err(e) = session.init() {
        let _ = mounted.unmount();
        return Err(MountError::usage(format!("FUSE handshake failed: {e}")));
    }
    mount::raise_readahead(mounted.mountpoint(), opts.readahead_kib);
    if let Err(e) = session.prepare_workers() {
        let _ = mounted.unmount();
        return Err(MountError::usage(format!("cannot clone /dev/fuse: {e}")));
    }
    Ok((session, mounted, image_fds))
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
