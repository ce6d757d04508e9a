//! Confinement of the immount FUSE server: once its mount is up, the process
//! that parses hostile images gives up everything that serving does not
//! need, so that a parser bug gains an attacker nothing.
//!
//! [`apply`] is the entry point. (As root, [`prepare_ahead`] and
//! [`apply_prepared`] split it in two, so that its slow part, the
//! namespaces, runs on a thread of its own while the mount is made.) The
//! server calls it after the mount is up and every descriptor it will use
//! is open (`/dev/fuse` and its clones —
//! cloning needs to open `/dev/fuse`, impossible afterwards — the image and
//! device fds, the log pipe), and before it serves.
//!
//! `/dev/fuse` clones: `FUSE_DEV_IOC_CLONE` works on a freshly opened
//! `/dev/fuse`, and opening anything is forbidden once confined. Open (and
//! if convenient clone) one `/dev/fuse` per worker before `apply` and keep
//! them all; the ioctl itself stays allowed, so a descriptor opened before
//! `apply` can still be attached to the session afterwards.
//!
//! After `apply` the server cannot unmount its own mount (no privilege, no
//! `umount2`): if it must clean up, a parent does it — see [`supervise`].
//!
//! # Threads
//!
//! `apply` must run while the process is single-threaded, and refuses
//! otherwise ([`SandboxError::Threaded`]): capabilities, `setresuid` as the
//! kernel sees it, landlock domains and user namespaces are per thread or
//! need a lone thread. Worker threads are started *after* `apply` returns;
//! they inherit everything. The seccomp filter lets `clone` make threads
//! (never processes) when [`SandboxConfig::allow_threads`] is set, and is
//! installed with `SECCOMP_FILTER_FLAG_TSYNC` all the same (and
//! `SECCOMP_FILTER_FLAG_SPEC_ALLOW`: see `seccomp.rs`).
//!
//! # Order
//!
//! The steps run in a fixed order, each after what it depends on (as
//! virtiofsd does):
//! 1. close every descriptor not kept (`close_range`);
//! 2. limits: `RLIMIT_NOFILE`, `RLIMIT_CORE` = 0, `RLIMIT_DATA`;
//! 3. namespaces: network, IPC and mount (as root directly, otherwise in a
//!    user namespace), the root replaced by an empty read-only tmpfs; with
//!    [`prepare_ahead`], the ones kept in [`KEPT_DIR`] are joined instead,
//!    or made and kept there;
//! 4. capability bounding and ambient sets emptied (needs `CAP_SETPCAP`,
//!    so before the capabilities go);
//! 5. every capability dropped but `CAP_SETUID`, `CAP_SETGID` (for the
//!    identity switch) and `CAP_SYS_RESOURCE` (for the limits, when they run
//!    later: see below);
//! 6. `no_new_privs`;
//! 7. landlock: every filesystem and network right handled, every scope,
//!    no rule (best ABI the kernel offers); it does not stop the calls of
//!    the steps left;
//! 8. identity, as root: `setgroups([])`, `setresgid`, `setresuid`,
//!    process-wide; skipped, with one log line, when a user namespace maps
//!    no such uid or gid (`unshare -Ur`), and every other step still runs;
//! 9. `RLIMIT_NPROC` = 0 when no threads are wanted (after the uid change:
//!    the limit counts the tasks of the real uid);
//! 10. the remaining capabilities dropped;
//! 11. `PR_SET_DUMPABLE` 0 (after the identity change, which resets it);
//! 12. seccomp last, because it forbids the calls above; its BPF program
//!     is built with step 4, its pid filled in here.
//!
//! With [`prepare_ahead`], steps 3 to 7 (and the reading of `/proc` the
//! later steps need) run first, on the preparing thread: each of them
//! changes only that thread's state (namespaces as root, capability sets,
//! `no_new_privs`, the landlock domain), which a fork passes on, and the
//! rest of the process (as root, the future supervisor) keeps its own. The
//! forked child then runs steps 1, 2 and 8 to 12, the per-process ones and
//! those that need its pid: what is left on the mount's path is short.
//! The identity switch stays in the child on purpose: a thread of the
//! mounting root process running as "nobody" could be signalled (stopped,
//! killed) by any other process of that uid for as long as the mount takes.
//!
//! # When seccomp stops a syscall
//!
//! Forbidden syscalls are trapped (`SECCOMP_RET_TRAP`). A `SIGSYS` handler
//! writes the syscall number to [`SandboxConfig::log_fd`] with one
//! `write(2)` and the process then dies by `SIGSYS` (see
//! `immount_sys::sandbox::install_sigsys_reporter`). The parent passes the
//! wait status and the log to [`explain_exit`]. The forbidden call itself
//! never runs.
#![forbid(unsafe_code)]

mod namespaces;
mod seccomp;
mod supervise;

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use landlock::{
    Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr, RulesetStatus, Scope, ABI,
};
use rustix::process::{Resource, Rlimit};

pub use namespaces::{Kept, KEPT_DIR};
pub use supervise::{explain_exit, prepare_supervisor, supervise, unmount_lazy};

/// The uid and gid "nobody", the default identity of a server started as
/// root.
pub const NOBODY: u32 = 65534;

/// Default `RLIMIT_DATA`: 1 GiB.
pub const DEFAULT_MEMORY_LIMIT: u64 = 1 << 30;

/// Default `RLIMIT_NOFILE`.
pub const DEFAULT_MAX_OPEN_FILES: u64 = 256;

/// What [`apply`] does. `Default` is the configuration to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Off only for debugging (`--no-sandbox`); [`apply`] then changes
    /// nothing and says so in its report.
    pub enabled: bool,
    /// The uid to switch to when started as root (default 65534).
    pub uid: u32,
    /// The gid to switch to when started as root (default 65534).
    pub gid: u32,
    /// `RLIMIT_DATA` in bytes (default 1 GiB); `None` leaves it as it is.
    ///
    /// `RLIMIT_DATA` rather than `RLIMIT_AS`: it counts what the parser can
    /// actually make the process allocate (heap, private writable mappings)
    /// and not address space reserved but unused — thread stacks' guard
    /// regions, malloc's per-thread arenas (64 MiB reservations each), a
    /// read-only mapping of the image — that would make an address-space
    /// cap either useless or a cause of spurious failures with many threads.
    pub memory_limit: Option<u64>,
    /// `RLIMIT_NOFILE` (default 256): descriptors the server may still make
    /// (epoll instances, `F_DUPFD_CLOEXEC`); the kept ones stay valid
    /// whatever their numbers.
    pub max_open_files: u64,
    /// Descriptors to keep open; every other one is closed. The standard
    /// streams not listed point at `/dev/null` afterwards.
    pub keep_fds: Vec<RawFd>,
    /// Where a seccomp violation is reported (default: 2, stderr). Kept open
    /// even if not in `keep_fds`; `None`: no report, the process still dies.
    pub log_fd: Option<RawFd>,
    /// Whether the server starts worker threads after [`apply`] (default
    /// true): `clone` is then allowed for threads only. Without threads,
    /// `RLIMIT_NPROC` is set to 0 and `clone` is forbidden too.
    ///
    /// `RLIMIT_NPROC` counts threads as well as processes, so with threads
    /// it stays as it was; seccomp alone stops new processes.
    pub allow_threads: bool,
    /// Syscall numbers allowed with any arguments on top of the built-in
    /// list (`socket` is refused: it is denied in any case).
    pub extra_syscalls: Vec<i64>,
    /// As root, where the network, IPC and mount namespaces are kept for
    /// the servers that follow, and joined from (default [`KEPT_DIR`]);
    /// `None`: each server makes its own.
    pub kept_namespaces: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uid: NOBODY,
            gid: NOBODY,
            memory_limit: Some(DEFAULT_MEMORY_LIMIT),
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            keep_fds: Vec::new(),
            log_fd: Some(2),
            allow_threads: true,
            extra_syscalls: Vec::new(),
            kept_namespaces: Some(PathBuf::from(KEPT_DIR)),
        }
    }
}

/// A step of [`apply`] that failed. Each step has its own variant, so that
/// the message says which one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The configuration is unusable.
    #[error("sandbox configuration: {0}")]
    Config(String),
    /// `apply` was called with more than one thread running.
    #[error("the sandbox must be applied before threads start ({threads} threads running)")]
    Threaded {
        /// Threads found in `/proc/self/task`.
        threads: usize,
    },
    /// Counting threads failed.
    #[error("counting threads: {0}")]
    Threads(#[source] io::Error),
    /// Closing the descriptors not kept failed.
    #[error("closing descriptors: {0}")]
    CloseFds(#[source] io::Error),
    /// Setting a resource limit failed.
    #[error("setting {resource}: {source}")]
    Rlimit {
        /// The limit, e.g. `RLIMIT_NOFILE`.
        resource: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Mapping our ids in a new user namespace failed.
    #[error("mapping ids in the user namespace: {0}")]
    UserNamespace(#[source] io::Error),
    /// Replacing the root with an empty tmpfs failed.
    #[error("making an empty root in the mount namespace: {0}")]
    MountNamespace(#[source] io::Error),
    /// Emptying the capability bounding or ambient set failed.
    #[error("dropping the capability bounding/ambient sets: {0}")]
    BoundingSet(#[source] io::Error),
    /// `setgroups`/`setresgid`/`setresuid` failed.
    #[error("switching to uid {uid} gid {gid}: {source}")]
    Identity {
        /// Target uid.
        uid: u32,
        /// Target gid.
        gid: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Emptying the effective, permitted and inheritable sets failed.
    #[error("dropping capabilities: {0}")]
    Capabilities(#[source] io::Error),
    /// `PR_SET_DUMPABLE` failed.
    #[error("PR_SET_DUMPABLE 0: {0}")]
    Dumpable(#[source] io::Error),
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("PR_SET_NO_NEW_PRIVS: {0}")]
    NoNewPrivs(#[source] io::Error),
    /// Landlock failed (not "unsupported", which is reported, but an error).
    #[error("landlock: {0}")]
    Landlock(#[source] landlock::RulesetError),
    /// Installing the `SIGSYS` reporter failed.
    #[error("installing the SIGSYS handler: {0}")]
    SigsysHandler(#[source] io::Error),
    /// Building or installing the seccomp filters failed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// No seccomp allowlist exists for this architecture.
    #[error("no seccomp allowlist for architecture {0}")]
    UnsupportedArch(&'static str),
}

/// Whether a best-effort step was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Done.
    Done,
    /// Not done, and why.
    Skipped(String),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Done => f.write_str("yes"),
            Step::Skipped(why) => write!(f, "no ({why})"),
        }
    }
}

/// What the landlock step applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandlockReport {
    /// The ABI used (the best both the kernel and the `landlock` crate
    /// know), `None` when the kernel has no landlock.
    pub abi: Option<u32>,
    /// The kernel's own ABI version (may be newer than the crate knows).
    pub kernel_abi: Option<u32>,
    /// The `landlock` crate's verdict: `fully enforced` when the kernel
    /// knows every right the crate does, `partially enforced` when it knows
    /// fewer (every right of its ABI is still handled), `not enforced`.
    pub status: String,
}

/// What the seccomp step installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompReport {
    /// The architecture of the allowlist.
    pub arch: &'static str,
    /// Syscalls allowed (some only with given arguments).
    pub syscalls: usize,
    /// Of those, allowed only with given arguments.
    pub conditional: usize,
    /// Instructions of the BPF program (a binary search on the syscall
    /// number).
    pub instructions: usize,
    /// Installed with `SECCOMP_FILTER_FLAG_SPEC_ALLOW` (seccomp does not
    /// force the Speculative Store Bypass mitigation on the server).
    pub spec_allow: bool,
}

/// What [`apply`] did; `Display` prints it for a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxReport {
    /// False when the sandbox was turned off; nothing else was done then.
    pub enabled: bool,
    /// Descriptors left open (sorted).
    pub kept_fds: Vec<RawFd>,
    /// Limits set: name and value (`None`: left as it was, with the reason
    /// in `Display`).
    pub rlimits: Vec<(&'static str, Option<u64>)>,
    /// A user namespace was made (unprivileged start).
    pub user_namespace: Step,
    /// A network namespace was made.
    pub net_namespace: Step,
    /// An IPC namespace was made.
    pub ipc_namespace: Step,
    /// A mount namespace with an empty root was made.
    pub mount_namespace: Step,
    /// Whether the network, IPC and mount namespaces are the server's own
    /// or shared by the servers that root started (kept in [`KEPT_DIR`]).
    pub namespaces_kept: Kept,
    /// The uid after `apply` (real, effective and saved).
    pub uid: u32,
    /// The gid after `apply`.
    pub gid: u32,
    /// Whether `apply` changed the identity (started as root).
    pub identity_changed: bool,
    /// The identity step: done, not needed (not root), or skipped because
    /// the user namespace maps no uid/gid to switch to (`unshare -Ur`).
    pub identity: Step,
    /// Whether the bounding and ambient sets were emptied.
    pub bounding_set: Step,
    /// The effective, permitted and inheritable sets are empty.
    pub capabilities_dropped: bool,
    /// `PR_SET_DUMPABLE` is 0.
    pub not_dumpable: bool,
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// The landlock step.
    pub landlock: LandlockReport,
    /// The seccomp step.
    pub seccomp: Option<SeccompReport>,
    /// How long each step of [`apply`] took, in order (the sandbox's share
    /// of the mount time).
    pub timings: Vec<(&'static str, Duration)>,
}

impl SandboxReport {
    fn disabled() -> Self {
        let off = || Step::Skipped("sandbox disabled".into());
        Self {
            enabled: false,
            kept_fds: Vec::new(),
            rlimits: Vec::new(),
            user_namespace: off(),
            net_namespace: off(),
            ipc_namespace: off(),
            mount_namespace: off(),
            namespaces_kept: Kept::Own,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            identity_changed: false,
            identity: off(),
            bounding_set: off(),
            capabilities_dropped: false,
            not_dumpable: false,
            no_new_privs: false,
            landlock: LandlockReport {
                abi: None,
                kernel_abi: None,
                status: "not applied".into(),
            },
            seccomp: None,
            timings: Vec::new(),
        }
    }
}

impl SandboxReport {
    /// One line for the server's log: what confinement is in force.
    pub fn one_line(&self) -> String {
        if !self.enabled {
            return "sandbox DISABLED: the server is not confined".to_owned();
        }
        let yes = |s: &Step| matches!(s, Step::Done);
        format!(
            "sandbox: uid {} gid {}, fds {:?}, netns {}, empty root {}, caps none, no_new_privs, landlock {}, seccomp {} syscalls",
            self.uid,
            self.gid,
            self.kept_fds,
            if yes(&self.net_namespace) { "yes" } else { "no" },
            if yes(&self.mount_namespace) { "yes" } else { "no" },
            self.landlock
                .abi
                .map_or_else(|| "unsupported".to_owned(), |abi| format!("ABI {abi}")),
            self.seccomp.as_ref().map_or(0, |s| s.syscalls),
        )
    }
}

impl fmt::Display for SandboxReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.enabled {
            return writeln!(
                f,
                "sandbox: DISABLED (--no-sandbox): the server is not confined"
            );
        }
        writeln!(f, "sandbox: enabled")?;
        writeln!(f, "  kept fds:          {:?}", self.kept_fds)?;
        for (name, value) in &self.rlimits {
            match value {
                Some(v) => writeln!(f, "  {name:<18} {v}")?,
                None => writeln!(f, "  {name:<18} unchanged")?,
            }
        }
        writeln!(f, "  user namespace:    {}", self.user_namespace)?;
        writeln!(f, "  net namespace:     {}", self.net_namespace)?;
        writeln!(f, "  ipc namespace:     {}", self.ipc_namespace)?;
        writeln!(f, "  empty mount root:  {}", self.mount_namespace)?;
        if self.namespaces_kept != Kept::Own {
            writeln!(f, "  namespaces:        {}", self.namespaces_kept)?;
        }
        writeln!(
            f,
            "  identity:          uid {} gid {}{}",
            self.uid,
            self.gid,
            match (&self.identity, self.identity_changed) {
                (Step::Done, true) => " (switched from root, no supplementary groups)".to_owned(),
                (Step::Skipped(why), _) if why.starts_with(IDENTITY_IMPOSSIBLE) =>
                    format!(" (unchanged: {why})"),
                _ => " (unchanged)".to_owned(),
            }
        )?;
        writeln!(f, "  bounding/ambient:  {}", self.bounding_set)?;
        writeln!(
            f,
            "  capabilities:      {}",
            if self.capabilities_dropped {
                "none"
            } else {
                "kept"
            }
        )?;
        writeln!(
            f,
            "  dumpable:          {}",
            if self.not_dumpable { "no" } else { "yes" }
        )?;
        writeln!(
            f,
            "  no_new_privs:      {}",
            if self.no_new_privs { "yes" } else { "no" }
        )?;
        match self.landlock.abi {
            Some(abi) => writeln!(
                f,
                "  landlock:          ABI {abi} (kernel {}): every filesystem and network right and scope of it handled, no rule ({})",
                self.landlock.kernel_abi.map_or("?".to_owned(), |v| v.to_string()),
                self.landlock.status
            )?,
            None => writeln!(f, "  landlock:          {}", self.landlock.status)?,
        }
        match &self.seccomp {
            Some(s) => writeln!(
                f,
                "  seccomp:           {} syscalls allowed on {} ({} with restricted arguments, {} BPF instructions), anything else kills{}",
                s.syscalls,
                s.arch,
                s.conditional,
                s.instructions,
                if s.spec_allow { "; SPEC_ALLOW" } else { "" }
            )?,
            None => writeln!(f, "  seccomp:           none")?,
        }
        if !self.timings.is_empty() {
            let total: Duration = self.timings.iter().map(|(_, d)| *d).sum();
            let steps: Vec<String> = self
                .timings
                .iter()
                .map(|(name, d)| format!("{name} {}", micros(*d)))
                .collect();
            writeln!(
                f,
                "  setup time:        {} ({})",
                micros(total),
                steps.join(", ")
            )?;
        }
        Ok(())
    }
}

/// A duration in microseconds, for the report.
fn micros(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

/// Records how long each step takes.
#[derive(Debug)]
struct Laps {
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Ends the step called `name`.
    fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, now.duration_since(self.last)));
        self.last = now;
    }
}

/// Counts the threads of this process.
fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

fn set_rlimit(name: &'static str, resource: Resource, value: u64) -> Result<(), SandboxError> {
    rustix::process::setrlimit(
        resource,
        Rlimit {
            current: Some(value),
            maximum: Some(value),
        },
    )
    .map_err(|e| SandboxError::Rlimit {
        resource: name,
        source: e.into(),
    })
}

/// Highest capability number the kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
        .min(63)
}

/// Empties the bounding and ambient sets; needs `CAP_SETPCAP`.
fn drop_bounding_and_ambient(last_cap: u32) -> io::Result<()> {
    use rustix::thread::CapabilitySet;
    rustix::thread::clear_ambient_capability_set()?;
    for cap in 0..=last_cap {
        let set = CapabilitySet::from_bits_retain(1u64 << cap);
        match rustix::thread::capability_is_in_bounding_set(set) {
            Ok(false) => continue,
            // Unknown to the kernel: nothing to drop.
            Err(rustix::io::Errno::INVAL) => continue,
            Ok(true) => rustix::thread::remove_capability_from_bounding_set(set)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn landlock_step() -> Result<LandlockReport, SandboxError> {
    // The newest ABI the crate knows: BestEffort lowers it to the kernel's.
    let abi = ABI::V10;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(SandboxError::Landlock)?;
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => Some(effective_abi as u32),
        _ => None,
    };
    let status = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced",
        RulesetStatus::NotEnforced => "not enforced (kernel without landlock)",
    };
    Ok(LandlockReport {
        abi,
        kernel_abi: immount_sys::sandbox::landlock_abi_version(),
        status: status.to_owned(),
    })
}

/// Start of the reason recorded when the identity switch cannot happen.
const IDENTITY_IMPOSSIBLE: &str = "no uid/gid to switch to";

/// What the identity step can do, decided while `/proc` is still visible.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IdentityPlan {
    /// Not root: nothing to switch.
    NotRoot,
    /// Root with the target ids mapped; `drop_groups` is false when the user
    /// namespace denies `setgroups` (its groups are then unmapped and grant
    /// nothing).
    Switch { drop_groups: bool },
    /// Root of a user namespace that does not map the target uid or gid.
    Impossible(String),
}

/// Whether `id` falls in one of the ranges of a `uid_map`/`gid_map` text
/// (`inside outside count` per line); `None` when the text is unreadable.
fn id_mapped(map: &str, id: u32) -> Option<bool> {
    let mut any_line = false;
    for line in map.lines() {
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [inside, _, count] = fields[..] else {
            return None;
        };
        any_line = true;
        if inside <= u64::from(id) && u64::from(id) < inside.saturating_add(count) {
            return Some(true);
        }
    }
    any_line.then_some(false)
}

fn plan_identity(uid: u32, gid: u32) -> IdentityPlan {
    let mapped = |file: &str, id: u32| {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|text| id_mapped(&text, id))
    };
    // Unreadable maps: try the switch and let it report its own error.
    let uid_ok = mapped("/proc/self/uid_map", uid).unwrap_or(true);
    let gid_ok = mapped("/proc/self/gid_map", gid).unwrap_or(true);
    if !uid_ok || !gid_ok {
        let what = match (uid_ok, gid_ok) {
            (false, false) => format!("uid {uid} and gid {gid}"),
            (false, true) => format!("uid {uid}"),
            _ => format!("gid {gid}"),
        };
        return IdentityPlan::Impossible(format!("this user namespace does not map {what}"));
    }
    let setgroups_denied = std::fs::read_to_string("/proc/self/setgroups")
        .map(|s| s.trim() == "deny")
        .unwrap_or(false);
    IdentityPlan::Switch {
        drop_groups: !setgroups_denied,
    }
}

/// Writes one line to the log descriptor, if any (best effort: the log is
/// not worth failing the confinement for).
fn log_line(log_fd: Option<RawFd>, line: &str) {
    if let Some(fd) = log_fd {
        let _ = immount_sys::sandbox::write_line(fd, line);
    }
}

/// Confines the calling process; see the crate documentation for the order
/// of the steps. On error the process is partly confined and should exit.
pub fn apply(cfg: &SandboxConfig) -> Result<SandboxReport, SandboxError> {
    if !cfg.enabled {
        return Ok(SandboxReport::disabled());
    }
    check_config(cfg)?;
    let mut laps = Laps::new();
    let threads = thread_count().map_err(SandboxError::Threads)?;
    if threads != 1 {
        return Err(SandboxError::Threaded { threads });
    }
    let facts = Facts::read(cfg)?;
    laps.lap("checks");

    // 1. Descriptors, and 2. limits.
    close_and_limit(cfg, None, &mut laps)?;

    // 3. Namespaces and the empty root.
    let made = namespaces::enter(facts.euid, facts.egid, &mut laps)?;
    let locked = lock_down_thread(cfg, &made, facts.last_cap, false, &mut laps)?;
    finish(cfg, &facts.identity_plan, made, locked, laps)
}

/// What [`prepare_ahead`] did on its thread, for [`apply_prepared`] in the
/// process forked from that thread.
#[derive(Debug)]
pub struct Prepared {
    identity_plan: IdentityPlan,
    /// `/dev/null`, opened while it still could be, for the standard
    /// streams not kept.
    null: std::fs::File,
    made: namespaces::Made,
    locked: LockedDown,
    laps: Laps,
}

impl Prepared {
    /// Whether the namespaces were joined, made and kept, or are the
    /// thread's own.
    pub fn namespaces_kept(&self) -> &Kept {
        &self.made.kept
    }
}

/// The slow first part of [`apply`] for a server started as root, run ahead
/// on a thread of its own while the process still mounts, so that it costs
/// the mount no time: `/proc` read, then new network, IPC and mount
/// namespaces and the empty root, which are per thread as root (no user
/// namespace is needed, and only a user namespace requires a lone thread),
/// then the per-thread steps 4 to 7 (capabilities, `no_new_privs`,
/// landlock) and the seccomp program built (see the crate docs).
///
/// The thread must then fork (the child, a copy of this thread alone, lives
/// in these namespaces) and the child call [`apply_prepared`] for the rest;
/// or the thread ends, and what it made goes with it. The rest of the
/// process is untouched: its namespaces, root, capabilities and landlock
/// domain are not the thread's. The thread keeps root's uid until the fork
/// (the child switches).
/// Made before the FUSE mount, the mount namespace never holds a copy of it.
///
/// `Ok(None)`: nothing done, because not root or the namespaces cannot be
/// made directly (root without `CAP_SYS_ADMIN`, as in a container); use
/// [`apply`] in the forked process instead, which finds the other ways.
pub fn prepare_ahead(cfg: &SandboxConfig) -> Result<Option<Prepared>, SandboxError> {
    if !cfg.enabled || rustix::process::geteuid().as_raw() != 0 {
        return Ok(None);
    }
    check_config(cfg)?;
    let mut laps = Laps::new();
    let facts = Facts::read(cfg)?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(SandboxError::CloseFds)?;
    laps.lap("checks (ahead)");
    let Some(made) = namespaces::enter_as_root_thread(cfg.kept_namespaces.as_deref(), &mut laps)?
    else {
        return Ok(None);
    };
    let locked = lock_down_thread(cfg, &made, facts.last_cap, true, &mut laps)?;
    Ok(Some(Prepared {
        identity_plan: facts.identity_plan,
        null,
        made,
        locked,
        laps,
    }))
}

/// The rest of [`apply`] after [`prepare_ahead`], in the process forked from
/// the thread that prepared: it has a single thread by construction (a
/// fork copies only the calling thread), which cannot be checked here any
/// more, `/proc` being out of sight.
pub fn apply_prepared(
    cfg: &SandboxConfig,
    prepared: Prepared,
) -> Result<SandboxReport, SandboxError> {
    let Prepared {
        identity_plan,
        null,
        made,
        locked,
        mut laps,
    } = prepared;
    laps.last = Instant::now();
    close_and_limit(cfg, Some(null), &mut laps)?;
    finish(cfg, &identity_plan, made, locked, laps)
}

fn check_config(cfg: &SandboxConfig) -> Result<(), SandboxError> {
    if cfg.extra_syscalls.contains(&seccomp::DIE_SYSCALL) {
        return Err(SandboxError::Config(
            "socket() cannot be allowed: the sandbox denies it in any case".into(),
        ));
    }
    Ok(())
}

/// What the steps need to know from before the namespaces hide `/proc`.
#[derive(Debug)]
struct Facts {
    euid: u32,
    egid: u32,
    last_cap: u32,
    identity_plan: IdentityPlan,
}

impl Facts {
    fn read(cfg: &SandboxConfig) -> Result<Facts, SandboxError> {
        let euid = rustix::process::geteuid().as_raw();
        let egid = rustix::process::getegid().as_raw();
        if euid == 0 && (cfg.uid == 0 || cfg.gid == 0) {
            return Err(SandboxError::Config(
                "started as root, the server must switch to a uid and gid other than 0".into(),
            ));
        }
        let identity_plan = if euid == 0 {
            plan_identity(cfg.uid, cfg.gid)
        } else {
            IdentityPlan::NotRoot
        };
        Ok(Facts {
            euid,
            egid,
            last_cap: last_capability(),
            identity_plan,
        })
    }
}

/// The descriptors that stay open: those asked for and the log, sorted.
fn kept_fds(cfg: &SandboxConfig) -> Vec<RawFd> {
    let mut keep = cfg.keep_fds.clone();
    keep.extend(cfg.log_fd);
    keep.sort_unstable();
    keep.dedup();
    keep
}

/// Steps 1 and 2: every descriptor not kept closed, and the limits that do
/// not depend on the uid.
fn close_and_limit(
    cfg: &SandboxConfig,
    null: Option<std::fs::File>,
    laps: &mut Laps,
) -> Result<(), SandboxError> {
    let keep = kept_fds(cfg);
    match null {
        Some(null) => immount_sys::sandbox::close_fds_except_using(&keep, null),
        None => immount_sys::sandbox::close_fds_except(&keep),
    }
    .map_err(SandboxError::CloseFds)?;
    laps.lap("close fds");
    set_rlimit("RLIMIT_NOFILE", Resource::Nofile, cfg.max_open_files)?;
    set_rlimit("RLIMIT_CORE", Resource::Core, 0)?;
    if let Some(limit) = cfg.memory_limit {
        set_rlimit("RLIMIT_DATA", Resource::Data, limit)?;
    }
    laps.lap("limits");
    Ok(())
}

/// Capabilities that the steps after [`lock_down_thread`] still need, in
/// the process that runs them: to switch identity, and to set the limits
/// whatever they were before (as root: they may be raised too). Step 10
/// drops them.
fn capabilities_for_late_steps() -> rustix::thread::CapabilitySet {
    use rustix::thread::CapabilitySet;
    CapabilitySet::SETUID | CapabilitySet::SETGID | CapabilitySet::SYS_RESOURCE
}

/// What [`lock_down_thread`] did, for [`finish`].
#[derive(Debug)]
struct LockedDown {
    /// The seccomp program, the pid still to fill in.
    filters: seccomp::Filters,
    bounding_set: Step,
    landlock: LandlockReport,
}

/// The steps whose state is the calling thread's and is inherited by a
/// fork: the BPF program built, steps 4 to 7 of the crate docs. As
/// root they run ahead on the preparing thread, off the mount's path;
/// otherwise in the process that confines itself, before [`finish`].
/// (`ahead`: on the preparing thread, which the report's laps say.)
fn lock_down_thread(
    cfg: &SandboxConfig,
    made: &namespaces::Made,
    last_cap: u32,
    ahead: bool,
    laps: &mut Laps,
) -> Result<LockedDown, SandboxError> {
    let name = |here: &'static str, there: &'static str| if ahead { there } else { here };
    // The pid is filled in by the process that installs it (see finish).
    let filters = seccomp::build_for_any_pid(cfg.allow_threads, &cfg.extra_syscalls)?;
    laps.lap(name("BPF build", "BPF build (ahead)"));

    // 4. Bounding and ambient sets, while CAP_SETPCAP is still held (as
    //    root, or by anyone in the new user namespace).
    let bounding_set = match drop_bounding_and_ambient(last_cap) {
        Ok(()) => Step::Done,
        Err(e) if made.privileged || made.user == Step::Done => {
            return Err(SandboxError::BoundingSet(e))
        }
        // Unprivileged without a user namespace: the bounding set only
        // matters across execve of a privileged binary, which no_new_privs
        // and seccomp already rule out.
        Err(e) => Step::Skipped(format!("no CAP_SETPCAP: {e}")),
    };

    // 5. Every capability but those the identity switch and the limits
    //    need (the per-thread call; the rest of the process, as
    // root the future supervisor, keeps its own).
    let held =
        rustix::thread::capabilities(None).map_err(|e| SandboxError::Capabilities(e.into()))?;
    let keep = held.permitted & capabilities_for_late_steps();
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: rustix::thread::CapabilitySet::empty(),
        },
    )
    .map_err(|e| SandboxError::Capabilities(e.into()))?;

    // 6. no_new_privs (landlock and seccomp need it unprivileged anyway).
    rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError::NoNewPrivs(e.into()))?;
    laps.lap(name(
        "bounding set, capabilities, no_new_privs",
        "bounding set, capabilities, no_new_privs (ahead)",
    ));

    // 7. Landlock (it does not stop the calls of the steps left).
    let landlock = landlock_step()?;
    laps.lap(name("landlock", "landlock (ahead)"));
    Ok(LockedDown {
        filters,
        bounding_set,
        landlock,
    })
}

/// The steps left after [`lock_down_thread`], which need the process that
/// will serve (its pid, its limits, its memory): steps 8 to 12.
fn finish(
    cfg: &SandboxConfig,
    identity_plan: &IdentityPlan,
    made: namespaces::Made,
    locked: LockedDown,
    mut laps: Laps,
) -> Result<SandboxReport, SandboxError> {
    let LockedDown {
        mut filters,
        bounding_set,
        landlock,
    } = locked;
    let keep = kept_fds(cfg);
    let mut rlimits = vec![
        ("RLIMIT_NOFILE", Some(cfg.max_open_files)),
        ("RLIMIT_CORE", Some(0)),
        ("RLIMIT_DATA", cfg.memory_limit),
    ];
    // A rule names the pid of the process that installs the program.
    filters.set_pid(rustix::process::getpid().as_raw_pid().unsigned_abs());

    // 8. Identity, process-wide. Root of a user namespace that maps only
    //    itself (`unshare -Ur`) has no other uid to become: that one step
    //    is skipped, said in one log line, and every other step still runs
    //    (outside the namespace this "root" is an ordinary user anyway, and
    //    it keeps no capability). The same for root that made a user
    //    namespace of its own (it maps only itself). Root that could make
    //    no namespace at all (a container's seccomp profile denies
    //    unshare) is still root where it started, and switches.
    let still_root_where_started = made.user != Step::Done;
    let identity = match (identity_plan, still_root_where_started) {
        (_, false) => Step::Skipped("not started as root".into()),
        (IdentityPlan::Impossible(why), true) => {
            let why = format!("{IDENTITY_IMPOSSIBLE}: {why}");
            log_line(cfg.log_fd, &format!("immount-sandbox: uid/gid switch skipped ({why}); every other confinement step applies"));
            Step::Skipped(why)
        }
        (IdentityPlan::Switch { drop_groups }, true) => {
            immount_sys::sandbox::set_process_ids(cfg.uid, cfg.gid, *drop_groups).map_err(
                |source| SandboxError::Identity {
                    uid: cfg.uid,
                    gid: cfg.gid,
                    source,
                },
            )?;
            Step::Done
        }
        (IdentityPlan::NotRoot, true) => Step::Skipped("not started as root".into()),
    };
    let identity_changed = identity == Step::Done;

    // 9. No new processes (threads count as well, hence only without them).
    if cfg.allow_threads {
        rlimits.push(("RLIMIT_NPROC", None));
    } else {
        set_rlimit("RLIMIT_NPROC", Resource::Nproc, 0)?;
        rlimits.push(("RLIMIT_NPROC", Some(0)));
    }

    // 10. Every remaining capability (a switch away from root cleared the
    //    effective and permitted sets already; not so when it was skipped).
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: rustix::thread::CapabilitySet::empty(),
            permitted: rustix::thread::CapabilitySet::empty(),
            inheritable: rustix::thread::CapabilitySet::empty(),
        },
    )
    .map_err(|e| SandboxError::Capabilities(e.into()))?;

    // 11. Not dumpable: no core, and other processes of the same uid cannot
    //    ptrace us or read /proc/PID/mem.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| SandboxError::Dumpable(e.into()))?;
    laps.lap("identity and capabilities");

    // Read for the report while getuid is still allowed.
    let (uid, gid) = (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );

    // 12. Seccomp, last.
    immount_sys::sandbox::install_sigsys_reporter(cfg.log_fd.unwrap_or(-1), seccomp::DIE_SYSCALL)
        .map_err(SandboxError::SigsysHandler)?;
    let spec_allow = seccomp::install(&filters)?;
    laps.lap("seccomp");

    Ok(SandboxReport {
        enabled: true,
        kept_fds: keep,
        rlimits,
        user_namespace: made.user,
        net_namespace: made.net,
        ipc_namespace: made.ipc,
        mount_namespace: made.mount,
        namespaces_kept: made.kept,
        uid,
        gid,
        identity_changed,
        identity,
        bounding_set,
        capabilities_dropped: true,
        not_dumpable: true,
        no_new_privs: true,
        landlock,
        seccomp: Some(SeccompReport {
            arch: seccomp::ARCH,
            syscalls: filters.syscalls,
            conditional: filters.conditional,
            instructions: filters.program.len(),
            spec_allow,
        }),
        timings: laps.laps,
    })
}

/// What confinement the calling process is under, read from `/proc/self`
/// (for `--sandbox-report`). Call it outside the sandbox: inside, opening
/// `/proc` is itself forbidden; there use the [`SandboxReport`] of
/// [`apply`], or [`report_process`] from the supervisor.
pub fn report_current() -> String {
    report_process_at("/proc/self")
}

/// What confinement process `pid` is under, read from `/proc/PID` (the
/// supervisor reports on its confined server this way).
pub fn report_process(pid: u32) -> String {
    report_process_at(&format!("/proc/{pid}"))
}

fn report_process_at(dir: &str) -> String {
    let mut out = String::new();
    match std::fs::read_to_string(format!("{dir}/status")) {
        Ok(status) => {
            for line in status.lines() {
                let key = line.split(':').next().unwrap_or("");
                if matches!(
                    key,
                    "Uid"
                        | "Gid"
                        | "Groups"
                        | "CapInh"
                        | "CapPrm"
                        | "CapEff"
                        | "CapBnd"
                        | "CapAmb"
                        | "NoNewPrivs"
                        | "Seccomp"
                        | "Seccomp_filters"
                        | "Threads"
                ) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        Err(e) => out.push_str(&format!("{dir}/status: {e}\n")),
    }
    // Namespaces are compared with a reference process: pid 1 for our own
    // report, ourselves (the supervisor) for another process's.
    let (reference, label) = if dir == "/proc/self" {
        ("/proc/1", "pid 1")
    } else {
        ("/proc/self", "the caller")
    };
    for ns in ["user", "net", "mnt", "ipc"] {
        let theirs = std::fs::read_link(format!("{reference}/ns/{ns}")).ok();
        match std::fs::read_link(format!("{dir}/ns/{ns}")) {
            Ok(link) => {
                let own = match theirs {
                    Some(t) if t == link => format!(" (same as {label})"),
                    Some(_) => " (own)".to_owned(),
                    None => String::new(),
                };
                out.push_str(&format!("ns/{ns}: {}{own}\n", link.display()));
            }
            Err(e) => out.push_str(&format!("ns/{ns}: {e}\n")),
        }
    }
    match std::fs::read_dir(format!("{dir}/fd")) {
        Ok(entries) => {
            let mut fds: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| {
                    let target = std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "?".into());
                    format!("{} -> {target}", e.file_name().to_string_lossy())
                })
                .collect();
            fds.sort();
            out.push_str(&format!("fds: {}\n", fds.join(", ")));
        }
        Err(e) => out.push_str(&format!("{dir}/fd: {e}\n")),
    }
    for (name, resource) in [
        ("RLIMIT_NOFILE", Resource::Nofile),
        ("RLIMIT_CORE", Resource::Core),
        ("RLIMIT_NPROC", Resource::Nproc),
        ("RLIMIT_DATA", Resource::Data),
        ("RLIMIT_AS", Resource::As),
    ] {
        if dir == "/proc/self" {
            let limit = rustix::process::getrlimit(resource);
            let show = |v: Option<u64>| v.map_or("unlimited".to_owned(), |v| v.to_string());
            out.push_str(&format!(
                "{name}: {} (max {})\n",
                show(limit.current),
                show(limit.maximum)
            ));
        }
    }
    if dir != "/proc/self" {
        if let Ok(limits) = std::fs::read_to_string(format!("{dir}/limits")) {
            out.push_str(&limits);
        }
    }
    out.push_str(&format!(
        "landlock: kernel ABI {} (a process's own landlock domain is not visible in /proc)\n",
        immount_sys::sandbox::landlock_abi_version()
            .map_or("unsupported".to_owned(), |v| v.to_string())
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_current_describes_this_process() {
        let report = report_current();
        for key in [
            "Seccomp:",
            "NoNewPrivs:",
            "CapEff:",
            "ns/net: net:[",
            "fds: ",
            "RLIMIT_CORE: ",
            "landlock: kernel ABI",
        ] {
            assert!(report.contains(key), "missing {key:?} in\n{report}");
        }
    }

    #[test]
    fn id_maps_are_read_range_by_range() {
        let root_only = "         0          0          1\n";
        assert_eq!(id_mapped(root_only, 0), Some(true));
        assert_eq!(id_mapped(root_only, NOBODY), Some(false));
        let initial = "         0          0 4294967295\n";
        assert_eq!(id_mapped(initial, NOBODY), Some(true));
        assert_eq!(id_mapped(initial, u32::MAX - 1), Some(true));
        let two = "0 1000 1\n1 100000 65536\n";
        assert_eq!(id_mapped(two, NOBODY), Some(true));
        assert_eq!(id_mapped(two, 65537), Some(false));
        assert_eq!(id_mapped("", 0), None);
        assert_eq!(id_mapped("0 0\n", 0), None);
        assert_eq!(id_mapped("x y z\n", 0), None);
    }

    #[test]
    fn disabled_config_changes_nothing() {
        let before = report_current();
        let report = apply(&SandboxConfig {
            enabled: false,
            ..SandboxConfig::default()
        })
        .expect("a disabled sandbox cannot fail");
        assert!(!report.enabled);
        assert!(report.to_string().contains("DISABLED"));
        let after = report_current();
        let seccomp = |r: &str| {
            r.lines()
                .find(|l| l.starts_with("Seccomp:"))
                .map(str::to_owned)
        };
        assert_eq!(seccomp(&before), seccomp(&after));
    }

    #[test]
    fn refuses_a_threaded_process_and_socket() {
        // The unit-test harness runs tests on threads of their own.
        let err = apply(&SandboxConfig::default()).expect_err("threads are running");
        assert!(matches!(err, SandboxError::Threaded { .. }), "{err}");
        let err = apply(&SandboxConfig {
            extra_syscalls: vec![libc::SYS_socket],
            ..SandboxConfig::default()
        })
        .expect_err("socket cannot be allowed");
        assert!(matches!(err, SandboxError::Config(_)), "{err}");
    }
}
