//! The seccomp allowlist: exactly the syscalls that serving FUSE requests
//! needs, one a line, per architecture.
//!
//! Anything else is trapped (`SECCOMP_RET_TRAP`): the `SIGSYS` handler of
//! `immount_sys::sandbox` writes the syscall number to the log and the
//! process then dies by `SIGSYS`, so that [`crate::explain_exit`] can name the
//! syscall. A trapped syscall never runs, whatever the handler does.
//!
//! Two filters are stacked, because one seccompiler filter has a single
//! "match" action:
//! 1. `clone3` answers `ENOSYS`, so that glibc falls back to `clone`, whose
//!    flags (unlike `clone3`'s, behind a pointer) the filter can inspect;
//! 2. the allowlist, everything else trapped.
//!
//! The kernel runs every filter and keeps the strictest answer.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::SandboxError;

/// `_IOR(229, 0, uint32_t)`: clone a `/dev/fuse` session onto another fd.
pub(crate) const FUSE_DEV_IOC_CLONE: u64 = 0x8004_e500;

/// The syscall the `SIGSYS` handler makes to get itself killed: it must be
/// trapped unconditionally, which `socket` is ("socket creation denied in any
/// case"), even when a caller asks for extra syscalls.
pub(crate) const DIE_SYSCALL: i64 = libc::SYS_socket;

/// Syscalls allowed with any arguments.
#[cfg(target_arch = "x86_64")]
const ALLOWED: &[i64] = &[
    // Moving bytes on descriptors the server already holds (/dev/fuse, the
    // image, the log pipe).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    // Read-ahead hints on the image (posix_fadvise).
    libc::SYS_fadvise64,
    // Waiting for requests.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    // Locks and condition variables.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // The allocator (mmap and mprotect are below, without PROT_EXEC).
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // Signals: return from the SIGSYS handler's frame, masks, and the
    // alternate stack Rust sets up for its stack-overflow handler per thread.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    // sigwait: the server's signal thread waits for SIGTERM/SIGINT/SIGHUP.
    libc::SYS_rt_sigtimedwait,
    // Resumes a sleep interrupted by a signal.
    libc::SYS_restart_syscall,
    // Time (normally the vDSO; the syscalls are its fallback).
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // HashMap seeds.
    libc::SYS_getrandom,
    // std::thread::available_parallelism.
    libc::SYS_sched_getaffinity,
    // Thread start-up and exit (glibc).
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Syscalls allowed with any arguments.
#[cfg(target_arch = "aarch64")]
const ALLOWED: &[i64] = &[
    // Moving bytes on descriptors the server already holds (/dev/fuse, the
    // image, the log pipe).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    // Read-ahead hints on the image (posix_fadvise).
    libc::SYS_fadvise64,
    // Waiting for requests (aarch64 has no poll or epoll_wait).
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    // Locks and condition variables.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // The allocator (mmap and mprotect are below, without PROT_EXEC).
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // Signals: return from the SIGSYS handler's frame, masks, and the
    // alternate stack Rust sets up for its stack-overflow handler per thread.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    // sigwait: the server's signal thread waits for SIGTERM/SIGINT/SIGHUP.
    libc::SYS_rt_sigtimedwait,
    // Resumes a sleep interrupted by a signal.
    libc::SYS_restart_syscall,
    // Time (normally the vDSO; the syscalls are its fallback).
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // HashMap seeds.
    libc::SYS_getrandom,
    // std::thread::available_parallelism.
    libc::SYS_sched_getaffinity,
    // Thread start-up and exit (glibc).
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn target_arch() -> Result<TargetArch, SandboxError> {
    #[cfg(target_arch = "x86_64")]
    return Ok(TargetArch::x86_64);
    #[cfg(target_arch = "aarch64")]
    return Ok(TargetArch::aarch64);
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ALLOWED: &[i64] = &[];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn target_arch() -> Result<TargetArch, SandboxError> {
    Err(SandboxError::UnsupportedArch(std::env::consts::ARCH))
}

/// Name of the architecture the filter is built for.
pub(crate) const ARCH: &str = std::env::consts::ARCH;

/// What the built filters hold, for the report.
#[derive(Debug)]
pub(crate) struct Filters {
    /// The `clone3` → `ENOSYS` filter (installed first).
    pub clone3: BpfProgram,
    /// The allowlist (installed last).
    pub allowlist: BpfProgram,
    /// Syscalls in the allowlist.
    pub syscalls: usize,
    /// Syscalls allowed only with some argument values.
    pub conditional: usize,
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompRule, SandboxError> {
    cond_all(vec![(arg, len, op, value)])
}

fn cond_all(
    conds: Vec<(u8, SeccompCmpArgLen, SeccompCmpOp, u64)>,
) -> Result<SeccompRule, SandboxError> {
    let conds = conds
        .into_iter()
        .map(|(arg, len, op, value)| SeccompCondition::new(arg, len, op, value))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    SeccompRule::new(conds).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

fn u64_of(v: libc::c_int) -> u64 {
    // Flags and command numbers are small non-negative constants.
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The syscalls allowed only with some arguments: `(syscall, rules)`, where
/// the syscall is allowed if any rule matches and a rule matches if all its
/// conditions do.
fn conditional_rules(
    allow_threads: bool,
    own_pid: u32,
) -> Result<Vec<(i64, Vec<SeccompRule>)>, SandboxError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    let prot_exec = u64_of(libc::PROT_EXEC);
    let at_empty_path = u64_of(libc::AT_EMPTY_PATH);
    let mut rules = vec![
        // ioctl only to clone a FUSE session (the request is an int: compare
        // the low 32 bits so that a sign-extended value matches too).
        (
            libc::SYS_ioctl,
            vec![cond(1, Dword, Eq, FUSE_DEV_IOC_CLONE)?],
        ),
        // fcntl for descriptor flags (O_NONBLOCK, FD_CLOEXEC) and
        // F_DUPFD_CLOEXEC; no locks, no leases, no owner/signal changes.
        (
            libc::SYS_fcntl,
            [
                libc::F_GETFD,
                libc::F_SETFD,
                libc::F_GETFL,
                libc::F_SETFL,
                libc::F_DUPFD_CLOEXEC,
            ]
            .into_iter()
            .map(|cmd| cond(1, Dword, Eq, u64_of(cmd)))
            .collect::<Result<_, _>>()?,
        ),
        // prctl only to name threads.
        (
            libc::SYS_prctl,
            [libc::PR_SET_NAME, libc::PR_GET_NAME]
                .into_iter()
                .map(|op| cond(0, Dword, Eq, u64_of(op)))
                .collect::<Result<_, _>>()?,
        ),
        // Memory, never executable: no new code can be mapped.
        (
            libc::SYS_mmap,
            vec![cond(2, Dword, MaskedEq(prot_exec), 0)?],
        ),
        (
            libc::SYS_mprotect,
            vec![cond(2, Dword, MaskedEq(prot_exec), 0)?],
        ),
        // stat only of a descriptor: AT_EMPTY_PATH (Rust's File::metadata
        // uses statx(fd, "", AT_EMPTY_PATH)). A path would only reach the
        // empty root anyway.
        (
            libc::SYS_statx,
            vec![cond(2, Dword, MaskedEq(at_empty_path), at_empty_path)?],
        ),
        (
            libc::SYS_newfstatat,
            vec![cond(3, Dword, MaskedEq(at_empty_path), at_empty_path)?],
        ),
        // Reading a signal disposition (Rust's runtime looks at the SIGSEGV
        // and SIGBUS handlers when a thread starts), and setting glibc's two
        // internal signals, which its first pthread_create installs:
        // SIGCANCEL (32) and SIGSETXID (33), the kernel's SIGRTMIN and +1.
        // No other handler can change, the SIGSYS reporter included.
        (
            libc::SYS_rt_sigaction,
            vec![
                cond(1, Qword, Eq, 0)?,
                cond(0, Dword, Eq, 32)?,
                cond(0, Dword, Eq, 33)?,
            ],
        ),
        // Signals only to our own threads (abort() raises SIGABRT this way).
        (
            libc::SYS_tgkill,
            vec![cond(0, Dword, Eq, u64::from(own_pid))?],
        ),
    ];
    if allow_threads {
        // clone only for threads: CLONE_THREAD, CLONE_VM and CLONE_SIGHAND
        // set and no namespace flag. A new process needs CLONE_THREAD clear.
        let thread = u64_of(libc::CLONE_THREAD | libc::CLONE_VM | libc::CLONE_SIGHAND);
        let namespaces = u64_of(
            libc::CLONE_NEWNS
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUSER
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWNET
                | libc::CLONE_NEWCGROUP,
        );
        rules.push((
            libc::SYS_clone,
            vec![cond(0, Qword, MaskedEq(thread | namespaces), thread)?],
        ));
    }
    Ok(rules)
}

/// Builds both filters.
pub(crate) fn build(
    allow_threads: bool,
    extra: &[i64],
    own_pid: u32,
) -> Result<Filters, SandboxError> {
    let arch = target_arch()?;
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in ALLOWED.iter().chain(extra) {
        if nr == DIE_SYSCALL {
            return Err(SandboxError::Config(
                "socket() cannot be allowed: the sandbox denies it in any case".into(),
            ));
        }
        map.insert(nr, Vec::new());
    }
    // clone3 passes this filter so that the first one's ENOSYS answers it
    // (a trap here would win over the errno: the strictest action wins).
    map.insert(libc::SYS_clone3, Vec::new());
    let mut conditional = 0;
    for (nr, rules) in conditional_rules(allow_threads, own_pid)? {
        // An extra that names a conditional syscall widens it to any
        // arguments, as asked.
        if let std::collections::btree_map::Entry::Vacant(slot) = map.entry(nr) {
            slot.insert(rules);
            conditional += 1;
        }
    }
    let syscalls = map.len();
    let allowlist: BpfProgram =
        SeccompFilter::new(map, SeccompAction::Trap, SeccompAction::Allow, arch)
            .and_then(TryInto::try_into)
            .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, Vec::new());
    let errno = u32::try_from(libc::ENOSYS).unwrap_or(38);
    let clone3: BpfProgram = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        arch,
    )
    .and_then(TryInto::try_into)
    .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;

    Ok(Filters {
        clone3,
        allowlist,
        syscalls,
        conditional,
    })
}

fn to_libc(program: &BpfProgram) -> Vec<libc::sock_filter> {
    program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// Installs both filters on every thread of the process (TSYNC), with
/// `SECCOMP_FILTER_FLAG_SPEC_ALLOW`: Speculative Store Bypass only leaks
/// memory of the process itself, which holds nothing a compromised server
/// does not already read, so seccomp must not force its costly mitigation
/// (as a kernel booted with `spec_store_bypass_disable=seccomp` does).
/// Returns whether the kernel took the flag.
pub(crate) fn install(filters: &Filters) -> Result<bool, SandboxError> {
    let mut spec_allowed = true;
    for program in [&filters.clone3, &filters.allowlist] {
        spec_allowed &= immount_sys::sandbox::install_seccomp_filter(&to_libc(program), true)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(spec_allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_never_allowed() {
        assert!(!ALLOWED.contains(&DIE_SYSCALL));
        assert!(build(true, &[libc::SYS_socket], 1).is_err());
    }

    #[test]
    fn dangerous_syscalls_are_absent() {
        for nr in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_kill,
            libc::SYS_rt_sigaction,
            libc::SYS_setns,
            libc::SYS_unshare,
        ] {
            assert!(!ALLOWED.contains(&nr), "syscall {nr} must not be allowed");
        }
    }

    #[test]
    fn filters_build() {
        let f = build(true, &[], 1).expect("filters build");
        assert!(!f.allowlist.is_empty());
        assert!(!f.clone3.is_empty());
        // The allowlist, clone3 (answered ENOSYS by the other filter) and
        // the conditional ones.
        assert_eq!(f.syscalls, ALLOWED.len() + 1 + f.conditional);
        let without_threads = build(false, &[], 1).expect("filters build");
        assert_eq!(without_threads.conditional + 1, f.conditional);
    }
}
