//! New namespaces for the server: no network, no IPC of the host, and a mount
//! table whose root is an empty read-only tmpfs.

use std::io;

use immount_sys::sandbox::{unshare_namespaces, Namespaces};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use crate::{Laps, SandboxError, Step};

/// What [`enter`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Made {
    pub user: Step,
    pub net: Step,
    pub ipc: Step,
    pub mount: Step,
    /// Whether the process was privileged (root) in the initial namespace and
    /// made the namespaces without a user namespace.
    pub privileged: bool,
}

/// Makes the namespaces: as root directly, otherwise inside a new user
/// namespace (that maps only our own uid and gid) when the kernel allows it.
/// Unprivileged failure to make a user namespace is not an error — seccomp
/// still denies sockets and landlock still denies the filesystem — and is
/// recorded in the report.
pub(crate) fn enter(euid: u32, egid: u32, laps: &mut Laps) -> Result<Made, SandboxError> {
    let others = Namespaces {
        user: false,
        net: true,
        mount: true,
        ipc: true,
    };
    let mut made = Made {
        user: Step::Skipped("not needed: started as root".into()),
        net: Step::Done,
        ipc: Step::Done,
        mount: Step::Done,
        privileged: euid == 0,
    };
    let direct = if euid == 0 {
        unshare_namespaces(others)
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    };
    if let Err(direct_err) = direct {
        if euid == 0 {
            // Root without CAP_SYS_ADMIN (a container): try a user namespace.
            made.privileged = false;
        }
        match unshare_namespaces(Namespaces {
            user: true,
            ..others
        }) {
            Ok(()) => {
                made.user = Step::Done;
                map_own_ids(euid, egid).map_err(SandboxError::UserNamespace)?;
            }
            Err(e) => {
                let why = format!("no user namespace ({e}); root attempt: {direct_err}");
                made.user = Step::Skipped(why.clone());
                made.net = Step::Skipped(why.clone());
                made.ipc = Step::Skipped(why.clone());
                made.mount = Step::Skipped(why);
                laps.lap("unshare (failed)");
                return Ok(made);
            }
        }
    }
    laps.lap("unshare");
    empty_root().map_err(SandboxError::MountNamespace)?;
    laps.lap("empty root");
    Ok(made)
}

/// As root, on a thread of its own (see `crate::prepare_ahead`): the
/// network, IPC and mount namespaces and the empty root, for this thread
/// only (unsharing the mount namespace unshares the thread's filesystem
/// context too, so its root and working directory are its own). `Ok(None)`
/// when the kernel refuses the namespaces: nothing was changed.
pub(crate) fn enter_as_root_thread(laps: &mut Laps) -> Result<Option<Made>, SandboxError> {
    let others = Namespaces {
        user: false,
        net: true,
        mount: true,
        ipc: true,
    };
    if unshare_namespaces(others).is_err() {
        return Ok(None);
    }
    laps.lap("unshare (ahead)");
    empty_root().map_err(SandboxError::MountNamespace)?;
    laps.lap("empty root (ahead)");
    Ok(Some(Made {
        user: Step::Skipped("not needed: started as root".into()),
        net: Step::Done,
        ipc: Step::Done,
        mount: Step::Done,
        privileged: true,
    }))
}

/// In a fresh user namespace, maps our uid and gid onto themselves (so the
/// process is not root inside either) and denies setgroups, as the kernel
/// requires before an unprivileged gid_map.
fn map_own_ids(uid: u32, gid: u32) -> io::Result<()> {
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))?;
    Ok(())
}

/// Directories one of which the empty tmpfs is mounted on before becoming
/// the root; in our private mount namespace any existing directory does.
const STAGING_DIRS: &[&str] = &["/tmp", "/mnt", "/proc", "/"];

/// Makes every mount private (nothing propagates back to the host), mounts
/// an empty tmpfs, makes it the root with `pivot_root(".", ".")`, detaches
/// the old root stacked under it, and remounts the new root read-only.
///
/// Detaching the old root also drops this namespace's copy of the FUSE
/// mount, so that unmounting it on the host ends the session.
fn empty_root() -> io::Result<()> {
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )?;
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let mut last_err = io::Error::from_raw_os_error(libc::ENOENT);
    let mut staged = None;
    for dir in STAGING_DIRS {
        match rustix::mount::mount(
            "tmpfs",
            *dir,
            "tmpfs",
            flags,
            c"mode=0555,size=4k,nr_inodes=2",
        ) {
            Ok(()) => {
                staged = Some(*dir);
                break;
            }
            Err(e) => last_err = e.into(),
        }
    }
    let dir = staged.ok_or(last_err)?;
    rustix::process::chdir(dir)?;
    rustix::process::pivot_root(".", ".")?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)?;
    rustix::process::chdir("/")?;
    rustix::mount::mount_remount("/", flags | MountFlags::RDONLY | MountFlags::BIND, "")?;
    Ok(())
}
