//! The parent side: wait for a confined server, say why it died, clean up.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use immount_sys::sandbox::SIGSYS_REPORT_PREFIX;

/// Waits for the confined child `pid` to end (retrying on `EINTR`), then calls
/// `on_exit` with its status — typically to unmount the FUSE mountpoint,
/// which a server that has dropped root cannot do itself — and returns the
/// status.
///
/// The supervisor is meant to be a minimal parent: it holds only what
/// cleanup needs (the mountpoint path and the privilege to unmount, or
/// `fusermount3`), forks the server before the server confines itself, and
/// does nothing else. Use [`prepare_supervisor`] to shed the rest.
pub fn supervise(pid: u32, on_exit: impl FnOnce(ExitStatus)) -> io::Result<ExitStatus> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    let status = loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
            Ok(Some((_, status))) => break status,
            Ok(None) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let status = ExitStatus::from_raw(status.as_raw() as i32);
    on_exit(status);
    Ok(status)
}

/// Sheds what a supervisor does not need: every descriptor outside `keep`,
/// core dumps, and every capability but `CAP_SYS_ADMIN` (kept only when the
/// supervisor has it, so that it can `umount2` the mountpoint itself).
///
/// `no_new_privs` is deliberately not set: an unprivileged supervisor
/// unmounts through the setuid `fusermount3`, which it would break.
pub fn prepare_supervisor(keep: &[std::os::fd::RawFd]) -> io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    immount_sys::sandbox::close_fds_except(keep)?;
    rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    let now = rustix::thread::capabilities(None)?;
    let keep_caps = now.permitted & CapabilitySet::SYS_ADMIN;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep_caps,
            permitted: keep_caps,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

/// Unmounts `mountpoint` lazily (`MNT_DETACH`), falling back to
/// `fusermount3 -u -z` when the process may not unmount itself.
pub fn unmount_lazy(mountpoint: &std::path::Path) -> io::Result<()> {
    match rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) => {
            let status = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(mountpoint)
                .status()?;
            if status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "fusermount3 -u -z failed: {status}"
                )))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Explains the death of a confined server in one line, if the sandbox had a
/// part in it; `None` for an ordinary exit.
///
/// `log` is what the server wrote to its log descriptor (or its tail): a
/// `SIGSYS` handler installed by [`crate::apply`] writes the number of a
/// forbidden syscall there just before the process dies by `SIGSYS`. The
/// wait status alone cannot carry the number.
pub fn explain_exit(status: ExitStatus, log: &[u8]) -> Option<String> {
    let signal = status.signal()?;
    match signal {
        libc::SIGSYS => {
            let nr = last_denied_syscall(log);
            Some(match nr {
                Some(nr) => format!(
                    "the sandbox killed the server: forbidden syscall {} ({nr}) on {}",
                    syscall_name(nr).unwrap_or("unknown"),
                    std::env::consts::ARCH
                ),
                None => "the sandbox killed the server: forbidden syscall (number not logged)"
                    .to_owned(),
            })
        }
        // What Rust does when an allocation fails, as it does under the
        // memory cap (`RLIMIT_DATA`) once the server needs more.
        libc::SIGABRT => Some(
            "the server aborted (SIGABRT), as it does when an allocation fails under its \
             memory cap; its log says more"
                .to_owned(),
        ),
        libc::SIGXCPU | libc::SIGXFSZ => Some(format!(
            "the server exceeded a resource limit (signal {signal})"
        )),
        _ => None,
    }
}

/// Finds the last syscall number the `SIGSYS` handler logged.
fn last_denied_syscall(log: &[u8]) -> Option<i64> {
    let text = String::from_utf8_lossy(log);
    text.lines()
        .rev()
        .find_map(|line| line.split_once(SIGSYS_REPORT_PREFIX))
        .and_then(|(_, rest)| rest.trim().parse().ok())
}

/// Names of syscalls a compromised or buggy server is likely to try, for
/// [`explain_exit`]. Numbers not listed are reported as "unknown".
fn syscall_name(nr: i64) -> Option<&'static str> {
    macro_rules! names {
        ($($name:ident),* $(,)?) => {
            [$((libc::$name, &stringify!($name)[4..])),*]
        };
    }
    let common = names![
        SYS_openat,
        SYS_openat2,
        SYS_socket,
        SYS_socketpair,
        SYS_connect,
        SYS_bind,
        SYS_listen,
        SYS_accept4,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_execve,
        SYS_execveat,
        SYS_ptrace,
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_chroot,
        SYS_unshare,
        SYS_setns,
        SYS_clone,
        SYS_clone3,
        SYS_kill,
        SYS_tkill,
        SYS_tgkill,
        SYS_ioctl,
        SYS_fcntl,
        SYS_prctl,
        SYS_mmap,
        SYS_mprotect,
        SYS_statx,
        SYS_newfstatat,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_mkdirat,
        SYS_unlinkat,
        SYS_renameat2,
        SYS_linkat,
        SYS_symlinkat,
        SYS_readlinkat,
        SYS_getdents64,
        SYS_ftruncate,
        SYS_truncate,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchown,
        SYS_fchownat,
        SYS_setuid,
        SYS_setgid,
        SYS_setresuid,
        SYS_setresgid,
        SYS_setgroups,
        SYS_capset,
        SYS_capget,
        SYS_rt_sigaction,
        SYS_seccomp,
        SYS_bpf,
        SYS_perf_event_open,
        SYS_userfaultfd,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_memfd_create,
        SYS_pipe2,
        SYS_dup,
        SYS_dup3,
        SYS_eventfd2,
        SYS_timerfd_create,
        SYS_signalfd4,
        SYS_wait4,
        SYS_waitid,
        SYS_uname,
        SYS_getcwd,
        SYS_chdir,
        SYS_fchdir,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_getppid,
        SYS_sysinfo,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_init_module,
        SYS_finit_module,
        SYS_reboot,
        SYS_sync,
        SYS_fsync,
        SYS_fdatasync,
        SYS_splice,
        SYS_tee,
        SYS_vmsplice,
        SYS_sendfile,
        SYS_copy_file_range,
        SYS_fsopen,
        SYS_fsmount,
        SYS_move_mount,
        SYS_open_tree,
        SYS_landlock_create_ruleset,
        SYS_landlock_restrict_self,
        SYS_pidfd_open,
        SYS_pidfd_getfd,
        SYS_pidfd_send_signal,
        SYS_close_range,
        SYS_mlock,
        SYS_munlock,
        SYS_mincore,
        SYS_msync,
        SYS_prlimit64,
        SYS_sched_setaffinity,
        SYS_sched_setscheduler,
        SYS_getpriority,
        SYS_setpriority,
        SYS_personality,
        SYS_fstatfs,
        SYS_statfs,
        SYS_flock,
        SYS_fallocate,
        SYS_membarrier,
    ];
    #[cfg(target_arch = "x86_64")]
    let arch_only: &[(i64, &str)] = &names![
        SYS_open,
        SYS_creat,
        SYS_stat,
        SYS_lstat,
        SYS_access,
        SYS_fork,
        SYS_vfork,
        SYS_pipe,
        SYS_dup2,
        SYS_unlink,
        SYS_rename,
        SYS_mkdir,
        SYS_rmdir,
        SYS_link,
        SYS_symlink,
        SYS_readlink,
        SYS_chmod,
        SYS_chown,
        SYS_select,
        SYS_accept,
        SYS_getdents,
        SYS_renameat,
        SYS_getrlimit,
        SYS_setrlimit,
        SYS_arch_prctl,
        SYS_iopl,
        SYS_ioperm,
        SYS_modify_ldt,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let arch_only: &[(i64, &str)] = &[];
    common
        .iter()
        .chain(arch_only)
        .find(|(n, _)| *n == nr)
        .map(|&(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_a_logged_sigsys() {
        let status = ExitStatus::from_raw(libc::SIGSYS);
        let log = format!("starting\n{SIGSYS_REPORT_PREFIX}{}\n", libc::SYS_socket);
        let text = explain_exit(status, log.as_bytes()).expect("a SIGSYS is explained");
        assert!(text.contains("forbidden syscall socket"), "{text}");
        let text = explain_exit(status, b"").expect("a SIGSYS is explained");
        assert!(text.contains("not logged"), "{text}");
    }

    #[test]
    fn an_abort_points_at_the_memory_cap() {
        let text =
            explain_exit(ExitStatus::from_raw(libc::SIGABRT), b"").expect("a SIGABRT is explained");
        assert!(text.contains("memory cap"), "{text}");
    }

    #[test]
    fn ordinary_exits_are_not_explained() {
        assert_eq!(explain_exit(ExitStatus::from_raw(0), b""), None);
        assert_eq!(explain_exit(ExitStatus::from_raw(1 << 8), b""), None);
        assert_eq!(explain_exit(ExitStatus::from_raw(libc::SIGTERM), b""), None);
    }

    #[test]
    fn names_known_syscalls() {
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
        assert_eq!(syscall_name(-1), None);
    }
}
