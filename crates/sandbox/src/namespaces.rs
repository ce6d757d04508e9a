//! New namespaces for the server: no network, no IPC of the host, and a mount
//! table whose root is an empty read-only tmpfs.
//!
//! As root, these three are made once and kept (bind mounts of their nsfs
//! files in a directory, [`KEPT_DIR`] by default, as `ip netns` keeps a network namespace), and
//! every later server joins them with `setns`: a few microseconds instead of
//! the 0.8 ms that making a network namespace and an empty root costs on
//! each mount, and no network namespace to tear down at each unmount. What
//! they share is nothing: the network namespace has only a loopback device
//! that is down, the mount namespace only an empty read-only tmpfs, the IPC
//! namespace no objects, and seccomp denies the servers `socket()` and
//! every System V and POSIX IPC call in any case.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use immount_sys::sandbox::{unshare_fs_context, unshare_namespaces, Namespaces};
use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::LinkNameSpaceType;

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
    /// Whether the namespaces are the ones kept under [`KEPT_DIR`], and
    /// how this server came by them.
    pub kept: Kept,
}

/// The server's own namespaces: network, IPC and mount (a user namespace
/// only where root is missing, see [`enter`]).
const SERVER_NAMESPACES: Namespaces = Namespaces {
    user: false,
    net: true,
    mount: true,
    ipc: true,
};

/// Where the namespaces made as root are kept for the servers that follow
/// (the default of `SandboxConfig::kept_namespaces`).
pub const KEPT_DIR: &str = "/run/immount/ns";

/// The kept namespaces: file name and type, the mount namespace last
/// (joining it changes the root).
const KEPT: [(&str, LinkNameSpaceType); 3] = [
    ("net", LinkNameSpaceType::Network),
    ("ipc", LinkNameSpaceType::InterProcessCommunication),
    ("mnt", LinkNameSpaceType::Mount),
];

/// `statfs` type of an nsfs file (`NSFS_MAGIC`).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// How a server came by its network, IPC and mount namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// Made for this server alone.
    Own,
    /// Made by this server and kept in the directory for the next ones.
    MadeAndKept(PathBuf),
    /// Joined: made by an earlier server and kept in the directory.
    Joined(PathBuf),
    /// Made for this server alone: keeping them in the directory failed.
    NotKept(PathBuf, String),
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kept::Own => f.write_str("own"),
            Kept::MadeAndKept(d) => {
                write!(f, "made, and kept in {} for later servers", d.display())
            }
            Kept::Joined(d) => write!(f, "shared by immount servers, joined from {}", d.display()),
            Kept::NotKept(d, why) => write!(f, "own (not kept in {}: {why})", d.display()),
        }
    }
}

/// Makes the namespaces: as root directly, otherwise inside a new user
/// namespace (that maps only our own uid and gid) when the kernel allows it.
/// Unprivileged failure to make a user namespace is not an error — seccomp
/// still denies sockets and landlock still denies the filesystem — and is
/// recorded in the report.
pub(crate) fn enter(euid: u32, egid: u32, laps: &mut Laps) -> Result<Made, SandboxError> {
    let mut made = Made {
        user: Step::Skipped("not needed: started as root".into()),
        net: Step::Done,
        ipc: Step::Done,
        mount: Step::Done,
        privileged: euid == 0,
        kept: Kept::Own,
    };
    let direct = if euid == 0 {
        unshare_namespaces(SERVER_NAMESPACES)
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
            ..SERVER_NAMESPACES
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
/// only (its filesystem context, root and working directory, is made its
/// own first). Joins the ones kept in `kept_dir` when there are; otherwise
/// makes them and keeps them there. `Ok(None)` when the kernel refuses the
/// namespaces: nothing was changed.
pub(crate) fn enter_as_root_thread(
    kept_dir: Option<&Path>,
    laps: &mut Laps,
) -> Result<Option<Made>, SandboxError> {
    let made = |kept| Made {
        user: Step::Skipped("not needed: started as root".into()),
        net: Step::Done,
        ipc: Step::Done,
        mount: Step::Done,
        privileged: true,
        kept,
    };
    // Any failure to join leaves what a fresh unshare below replaces.
    if let Some(dir) = kept_dir {
        if join_kept(dir).is_ok() {
            laps.lap("join kept namespaces (ahead)");
            return Ok(Some(made(Kept::Joined(dir.to_owned()))));
        }
    }
    // To keep what is made: the host's mount namespace, to come back to.
    let host_mounts = kept_dir.map(|_| open_own_namespace("mnt"));
    if unshare_namespaces(SERVER_NAMESPACES).is_err() {
        return Ok(None);
    }
    laps.lap("unshare (ahead)");
    // Their nsfs files, while /proc is still in sight.
    let new = kept_dir.map(|_| {
        KEPT.iter()
            .map(|(n, _)| open_own_namespace(n))
            .collect::<io::Result<Vec<OwnedFd>>>()
    });
    empty_root().map_err(SandboxError::MountNamespace)?;
    laps.lap("empty root (ahead)");
    let (Some(dir), Some(host_mounts), Some(new)) = (kept_dir, host_mounts, new) else {
        return Ok(Some(made(Kept::Own)));
    };
    let kept = match (host_mounts, new) {
        (Ok(host), Ok(new)) => keep(dir, &host, &new)?,
        (Err(e), _) | (_, Err(e)) => Kept::NotKept(dir.to_owned(), e.to_string()),
    };
    laps.lap("keep namespaces (ahead)");
    Ok(Some(made(kept)))
}

/// This thread's namespace of type `name` (`/proc/thread-self/ns/NAME`).
fn open_own_namespace(name: &str) -> io::Result<OwnedFd> {
    let path = format!("/proc/thread-self/ns/{name}");
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory of kept namespaces, which must be root's and
/// writable by root alone.
fn open_kept_dir(path: &Path) -> io::Result<OwnedFd> {
    let dir = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&dir)?;
    if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
        return Err(io::Error::other("not root's alone"));
    }
    Ok(dir)
}

/// Joins the namespaces kept in `path`: all of them, or an error (the
/// thread may then be in some of them). Only what root made counts: the
/// directory must be root's alone, and each file an nsfs file.
fn join_kept(path: &Path) -> io::Result<()> {
    let dir = open_kept_dir(path)?;
    let mut files = Vec::with_capacity(KEPT.len());
    for (name, kind) in KEPT {
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        if rustix::fs::fstatfs(&fd)?.f_type as i64 != NSFS_MAGIC {
            return Err(io::Error::other(format!("{name}: no namespace")));
        }
        files.push((fd, kind));
    }
    // setns into a mount namespace needs a filesystem context of our own.
    unshare_fs_context()?;
    for (fd, kind) in &files {
        rustix::thread::move_into_link_name_space(fd.as_fd(), Some(*kind))?;
    }
    Ok(())
}

/// Keeps the namespaces this thread just made (`new`, in [`KEPT`] order)
/// in `dir`, from the host's mount namespace `host`, and comes back into
/// the new one. Failing to keep them is no error (the server has its own);
/// failing to come back is.
fn keep(dir: &Path, host: &OwnedFd, new: &[OwnedFd]) -> Result<Kept, SandboxError> {
    let not_kept = |e: io::Error| Kept::NotKept(dir.to_owned(), e.to_string());
    if let Err(e) =
        rustix::thread::move_into_link_name_space(host.as_fd(), Some(LinkNameSpaceType::Mount))
    {
        return Ok(not_kept(e.into()));
    }
    let kept = bind_kept(dir, new);
    // Back into the empty root ("mnt", last in KEPT); setns sets the root
    // and working directory to the namespace's root.
    let new_mounts = &new[KEPT.len() - 1];
    rustix::thread::move_into_link_name_space(new_mounts.as_fd(), Some(LinkNameSpaceType::Mount))
        .map_err(|e| SandboxError::MountNamespace(e.into()))?;
    Ok(match kept {
        Ok(()) => Kept::MadeAndKept(dir.to_owned()),
        Err(e) => not_kept(e),
    })
}

/// In the host's mount namespace: makes `dir` (root's, 0700; its parent
/// 0755, as immountd makes /run/immount for its socket) a private mount of
/// its own, so that what is mounted in it does not propagate to other
/// mount namespaces (as `ip netns` does for /run/netns), and binds the
/// nsfs files onto files in it. A racing server may bind onto the same
/// files; the newer mount then hides the older, and either serves.
fn bind_kept(dir: &Path, new: &[OwnedFd]) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    drop(open_kept_dir(dir)?);
    let stx = rustix::fs::statx(
        rustix::fs::CWD,
        dir,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        rustix::fs::StatxFlags::BASIC_STATS,
    )?;
    if !stx
        .stx_attributes
        .contains(rustix::fs::StatxAttributes::MOUNT_ROOT)
    {
        rustix::mount::mount_bind(dir, dir)?;
    }
    rustix::mount::mount_change(dir, MountPropagationFlags::PRIVATE)?;
    for ((name, _), fd) in KEPT.iter().zip(new) {
        let target = dir.join(name);
        // A file to mount on; one already there may be a namespace (which
        // cannot be opened for writing), or a stale plain file.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
        {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let source = format!("/proc/thread-self/fd/{}", fd.as_raw_fd());
        rustix::mount::mount_bind(source.as_str(), &target)?;
    }
    Ok(())
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
