//! Syscalls that the sandbox needs (identity, namespaces, limits).
//!
//! Everything here is a thin wrapper around one libc or raw syscall whose
//! safe equivalent does not exist (process-wide `setresuid`, `close_range`,
//! `unshare`) or cannot exist (a `SIGSYS` handler). The policy — what to call,
//! in which order — lives in the `immount-sandbox` crate.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};

/// Closes every file descriptor of the process that is not in `keep`.
///
/// The standard streams 0, 1 and 2 are never left closed: those not in
/// `keep` are pointed at `/dev/null` instead, so that a stray `println!`
/// neither panics nor writes into an unrelated descriptor that later reuses
/// the number.
///
/// This is meant for the moment a process confines itself: every other
/// owner of a closed descriptor (a `File` somewhere) is left with a stale
/// number, so the caller must own the whole descriptor table, as the sandbox
/// does (it runs single-threaded, before serving, with all the descriptors it
/// will use listed in `keep`).
pub fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    // The standard streams first, while /dev/null can still be opened.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    close_fds_except_using(keep, null)
}

/// [`close_fds_except`] with `/dev/null` opened beforehand, for a process
/// that can no longer open it (the sandbox prepared ahead: its root is
/// already empty). `null` is closed too.
pub fn close_fds_except_using(keep: &[RawFd], null: std::fs::File) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    keep.dedup();

    let null_fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    for stdio in 0..3u32 {
        if keep.binary_search(&stdio).is_err() {
            // SAFETY: dup2 takes two integers and has no memory effects; both
            // numbers are valid (null_fd is open, the target is a standard
            // stream number). Replacing a standard stream is what we want.
            let rc = unsafe { libc::dup2(null_fd, stdio as libc::c_int) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    drop(null);

    // Close the gaps between kept descriptors, from 3 up to u32::MAX.
    let mut first = 3u32;
    for &fd in keep.iter().filter(|&&fd| fd >= 3) {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd.saturating_add(1);
    }
    if keep.last() != Some(&u32::MAX) {
        close_range(first, u32::MAX)?;
    }
    Ok(())
}

fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; the caller of
    // close_fds_except owns the descriptor table (see its documentation).
    // The raw syscall avoids depending on the glibc wrapper (glibc >= 2.34).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            libc::c_uint::from(first),
            libc::c_uint::from(last),
            0 as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `line` and a newline to descriptor `fd` with one `write(2)`,
/// without taking ownership of `fd` (a log descriptor someone else owns).
pub fn write_line(fd: RawFd, line: &str) -> io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    // SAFETY: write(2) reads `buf.len()` bytes from a live buffer and
    // touches no other memory; a bad descriptor is an error, not UB.
    let rc = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switches the whole process (every thread) to `uid`/`gid`: with
/// `drop_groups`, `setgroups([])` first (no supplementary groups), then
/// `setresgid(gid, gid, gid)` and `setresuid(uid, uid, uid)`, in that order
/// (the group calls need the privilege the uid change gives up).
/// `drop_groups` is false only in a user namespace that denies `setgroups`,
/// where the inherited groups are unmapped ones.
///
/// The kernel calls are per thread; glibc's wrappers broadcast them to every
/// thread of the process, which is why this goes through libc and not a raw
/// syscall.
pub fn set_process_ids(uid: u32, gid: u32, drop_groups: bool) -> io::Result<()> {
    // SAFETY: setgroups with a zero count never reads the (null) list.
    if drop_groups && unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain integer arguments, no memory is touched.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain integer arguments, no memory is touched.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Namespaces that [`unshare_namespaces`] can create.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Namespaces {
    /// `CLONE_NEWUSER`: a user namespace (lets an unprivileged process make
    /// the others).
    pub user: bool,
    /// `CLONE_NEWNET`: a network namespace with only a down loopback.
    pub net: bool,
    /// `CLONE_NEWNS`: a private copy of the mount table.
    pub mount: bool,
    /// `CLONE_NEWIPC`: no System V IPC or POSIX message queues of the host.
    pub ipc: bool,
}

/// `unshare(2)` restricted to namespace flags.
///
/// `CLONE_NEWUSER` fails with `EINVAL` in a multi-threaded process; the
/// sandbox checks that it runs single-threaded before calling this.
pub fn unshare_namespaces(ns: Namespaces) -> io::Result<()> {
    use rustix::thread::UnshareFlags;
    let mut flags = UnshareFlags::empty();
    if ns.user {
        flags |= UnshareFlags::NEWUSER;
    }
    if ns.net {
        flags |= UnshareFlags::NEWNET;
    }
    if ns.mount {
        flags |= UnshareFlags::NEWNS;
    }
    if ns.ipc {
        flags |= UnshareFlags::NEWIPC;
    }
    // SAFETY: rustix marks unshare unsafe because CLONE_FILES would
    // invalidate descriptors other threads hold; only namespace flags are
    // passed here, none of which touch the descriptor table or memory.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(io::Error::from)
}

/// `unshare(CLONE_FS)`: gives the calling thread a root, working directory
/// and umask of its own, which `setns` into a mount namespace requires (it
/// refuses a filesystem context that other threads share).
pub fn unshare_fs_context() -> io::Result<()> {
    // SAFETY: as in `unshare_namespaces`: CLONE_FS copies the thread's
    // filesystem context (root, cwd, umask); it touches neither the
    // descriptor table nor memory.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }
        .map_err(io::Error::from)
}

/// Installs a classic BPF seccomp filter on every thread of the process
/// (`SECCOMP_FILTER_FLAG_TSYNC`), returning whether
/// `SECCOMP_FILTER_FLAG_SPEC_ALLOW` was in force.
///
/// With `spec_allow` the filter does not make the kernel force the
/// Speculative Store Bypass mitigation on the process, which a kernel booted
/// with `spec_store_bypass_disable=seccomp` would otherwise do at a cost on
/// every load; a kernel older than 4.17 refuses the flag, and the filter is
/// then installed without it. `no_new_privs` (or `CAP_SYS_ADMIN`) must be set
/// first, as for any filter.
pub fn install_seccomp_filter(filter: &[libc::sock_filter], spec_allow: bool) -> io::Result<bool> {
    let len = libc::c_ushort::try_from(filter.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let prog = libc::sock_fprog {
        len,
        // The kernel only reads the program (the field is *mut in C).
        filter: filter.as_ptr().cast_mut(),
    };
    let attempts: &[libc::c_ulong] = if spec_allow {
        &[
            libc::SECCOMP_FILTER_FLAG_TSYNC | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
        ]
    } else {
        &[libc::SECCOMP_FILTER_FLAG_TSYNC]
    };
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    for &flags in attempts {
        // SAFETY: `prog` points at `len` instructions that outlive the call;
        // the kernel copies the program and reads no other memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                std::ptr::addr_of!(prog),
            )
        };
        match rc {
            0 => return Ok(flags & libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW != 0),
            // TSYNC: a thread could not be synchronised; its id is returned.
            tid if tid > 0 => {
                return Err(io::Error::other(format!(
                    "thread {tid} could not take the seccomp filter"
                )))
            }
            _ => {
                last = io::Error::last_os_error();
                // Only an unknown flag is worth a retry without it.
                if last.raw_os_error() != Some(libc::EINVAL) {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

/// Where the `SIGSYS` handler writes its report (-1: nowhere).
static SIGSYS_LOG_FD: AtomicI32 = AtomicI32::new(-1);
/// A syscall that the seccomp filter always traps, made by the handler to
/// get the process killed by the kernel with `SIGSYS`.
static SIGSYS_DIE_SYSCALL: AtomicI64 = AtomicI64::new(-1);

/// The line the `SIGSYS` handler writes starts with this marker, followed by
/// the decimal syscall number and a newline: `immount-sandbox: seccomp denied
/// syscall 41\n`. The supervisor looks for it in the server's log.
pub const SIGSYS_REPORT_PREFIX: &str = "immount-sandbox: seccomp denied syscall ";

/// Installs the `SIGSYS` handler used with `SECCOMP_RET_TRAP`.
///
/// When the filter traps a syscall the handler writes one line
/// ([`SIGSYS_REPORT_PREFIX`] and the syscall number) to `log_fd` with a
/// single `write(2)` — async-signal-safe, and allowed by the filter — and then
/// makes `die_syscall`, which the filter traps again. The kernel delivers a
/// seccomp trap that hits a blocked `SIGSYS` (it is blocked while its own
/// handler runs) with the default action, so the whole process dies with
/// `SIGSYS`, which its parent sees in the wait status.
///
/// Call before installing the filter (`rt_sigaction` is not on the list).
pub fn install_sigsys_reporter(log_fd: RawFd, die_syscall: i64) -> io::Result<()> {
    SIGSYS_LOG_FD.store(log_fd, Ordering::SeqCst);
    SIGSYS_DIE_SYSCALL.store(die_syscall, Ordering::SeqCst);
    // SAFETY: sigaction is zero-initialisable plain data.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = sigsys_handler as *const () as usize;
    // SA_SIGINFO: the handler reads the syscall number from siginfo.
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and the handler only does
    // async-signal-safe work (atomic loads, write(2), a raw syscall).
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Offset of `si_syscall` in `siginfo_t` for `SIGSYS` on 64-bit Linux:
/// three ints (signo, errno, code) padded to 16 bytes, then the union whose
/// `_sigsys` member is `{ void *_call_addr; int _syscall; unsigned _arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn sigsys_handler(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler;
    // for SIGSYS from seccomp its union holds `_sigsys`, whose `_syscall`
    // int sits at SI_SYSCALL_OFFSET (the struct is 128 bytes long).
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let mut line = [0u8; 96];
    let prefix = SIGSYS_REPORT_PREFIX.as_bytes();
    let mut len = prefix.len();
    line[..len].copy_from_slice(prefix);
    len += format_decimal(i64::from(nr), &mut line[len..]);
    line[len] = b'\n';
    len += 1;
    let fd = SIGSYS_LOG_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the buffer is a local array
        // and `len` is within it. A failed write changes nothing.
        unsafe { libc::write(fd, line.as_ptr().cast(), len) };
    }
    let die = SIGSYS_DIE_SYSCALL.load(Ordering::SeqCst);
    // SAFETY: the sandbox guarantees that the filter traps `die`
    // unconditionally, so the kernel never runs it: it kills the process
    // with SIGSYS instead (SIGSYS is blocked inside this handler).
    unsafe { libc::syscall(die as libc::c_long, 0, 0, 0) };
    // Not reached with a correct filter; never return into the code that
    // made a forbidden call.
    // SAFETY: _exit is async-signal-safe and ends the process.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// Writes `value` in decimal into `out`, returning the number of bytes used.
/// No allocation: it runs inside a signal handler.
fn format_decimal(value: i64, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 || count == digits.len() {
            break;
        }
    }
    let mut len = 0;
    if value < 0 && !out.is_empty() {
        out[0] = b'-';
        len = 1;
    }
    for &d in digits[..count].iter().rev() {
        if len < out.len() {
            out[len] = d;
            len += 1;
        }
    }
    len
}

/// The landlock ABI version of the running kernel
/// (`landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`),
/// `None` when landlock is not built in or not enabled.
pub fn landlock_abi_version() -> Option<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with this flag the kernel reads neither the (null) attribute
    // pointer nor a size, and returns a number instead of a descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(rc).ok().filter(|&v| v > 0)
}

/// `ptrace(PTRACE_ATTACH, pid)`, detaching again at once if it succeeds.
///
/// For the sandbox tests, which show that a confined process cannot trace
/// another one. Attaching only changes the state of the traced process; it
/// reads or writes no memory of the caller.
pub fn ptrace_attach_detach(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: PTRACE_ATTACH takes no pointer (addr and data are ignored).
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; PTRACE_DETACH with a null data means no signal.
    unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::format_decimal;

    #[test]
    fn decimal_formatting() {
        let mut buf = [0u8; 24];
        let n = format_decimal(41, &mut buf);
        assert_eq!(&buf[..n], b"41");
        let n = format_decimal(0, &mut buf);
        assert_eq!(&buf[..n], b"0");
        let n = format_decimal(-7, &mut buf);
        assert_eq!(&buf[..n], b"-7");
        let n = format_decimal(i64::MIN, &mut buf);
        assert_eq!(&buf[..n], b"-9223372036854775808");
    }
}
