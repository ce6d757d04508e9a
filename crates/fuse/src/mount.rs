//! Putting a FUSE filesystem in place and taking it away.
//!
//! Two ways, tried in order, and no setuid binary of our own:
//! 1. `mount(2)` directly with type `fuse.immount`. This works as root and
//!    inside an unprivileged user namespace with its own mount namespace
//!    (`unshare -Urm`), where FUSE mounts are allowed.
//! 2. As a plain user, when that fails with EPERM: run `fusermount3` (the
//!    setuid helper of the fuse3 package), which mounts and sends the
//!    `/dev/fuse` file back over a Unix socket (`_FUSE_COMMFD`,
//!    `SCM_RIGHTS`). We pass `auto_unmount`, so fusermount3 stays behind and
//!    unmounts when our end of the socket closes, even if we are killed.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use immount_sys::fuse as sys;

/// The helper of the fuse3 package.
const FUSERMOUNT: &str = "fusermount3";

/// Mount options beyond those always set (`ro`, `default_permissions`).
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    /// Let other users see the mount (`allow_other`).
    pub allow_other: bool,
    /// Honour set-user-id bits (default: `nosuid`).
    pub suid: bool,
    /// Allow device nodes to be opened (default: `nodev`).
    pub dev: bool,
    /// The source shown in /proc/mounts (the image path).
    pub fsname: String,
}

/// How the filesystem was mounted, which decides how to unmount it.
#[derive(Debug)]
pub enum Mounted {
    /// By `mount(2)`.
    Direct {
        /// Where.
        mountpoint: PathBuf,
    },
    /// By fusermount3; holding the socket keeps its auto-unmount waiting.
    Fusermount {
        /// Where.
        mountpoint: PathBuf,
        /// Our end of the socket fusermount3 watches.
        _socket: OwnedFd,
        /// fusermount3 itself, which lives on watching the socket. Not
        /// waited for by a thread: the server must stay single-threaded
        /// until it is confined; the process reaps it when it ends.
        _helper: std::process::Child,
    },
}

impl Mounted {
    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        match self {
            Mounted::Direct { mountpoint } | Mounted::Fusermount { mountpoint, .. } => mountpoint,
        }
    }

    /// The descriptors this owns (the fusermount3 socket, if any).
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        match self {
            Mounted::Direct { .. } => Vec::new(),
            Mounted::Fusermount { _socket, .. } => vec![_socket.as_raw_fd()],
        }
    }

    /// Detach the mount now (lazily: open files keep it until closed).
    pub fn unmount(&self) -> io::Result<()> {
        match self {
            Mounted::Direct { mountpoint } => sys::unmount(mountpoint, true),
            Mounted::Fusermount { mountpoint, .. } => fusermount_unmount(mountpoint, true),
        }
    }
}

fn fsname_for_options(name: &str) -> String {
    // fusermount3 splits options on ',' and honours '\' escapes.
    name.chars()
        .map(|c| {
            if c == ',' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Mount a FUSE filesystem at `mountpoint`; returns the `/dev/fuse` file
/// to serve and how to unmount it.
pub fn mount(mountpoint: &Path, opts: &MountOptions) -> io::Result<(File, Mounted)> {
    // Resolved now: once mounted, looking at the path waits for the server.
    let mountpoint = &std::fs::canonicalize(mountpoint)?;
    let dev = match sys::open_dev_fuse() {
        Ok(dev) => dev,
        // Some systems keep /dev/fuse to root (mode 0600): fusermount3,
        // being setuid, can still open it.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => {
            return mount_with_fusermount(mountpoint, opts);
        }
        Err(e) => return Err(e),
    };
    match mount_resolved(&dev, mountpoint.clone(), opts) {
        Ok(mounted) => Ok((dev, mounted)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            drop(dev);
            mount_with_fusermount(mountpoint, opts)
        }
        Err(e) => Err(e),
    }
}

/// Mount with `mount(2)` on `dev`, a `/dev/fuse` file opened by the
/// caller (so that a server may hold it before the mount is made). Fails
/// with `EPERM` where this process may not mount, where [`mount`] turns to
/// fusermount3.
pub fn mount_direct(dev: &File, mountpoint: &Path, opts: &MountOptions) -> io::Result<Mounted> {
    // Resolved now: once mounted, looking at the path waits for the server.
    mount_resolved(dev, std::fs::canonicalize(mountpoint)?, opts)
}

/// [`mount_direct`] on a mount point already resolved.
fn mount_resolved(dev: &File, mountpoint: PathBuf, opts: &MountOptions) -> io::Result<Mounted> {
    let (uid, gid) = sys::real_ids();
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let flags = sys::MountFlagsSpec {
        nosuid: !opts.suid,
        nodev: !opts.dev,
    };
    sys::mount_fuse(&opts.fsname, &mountpoint, "fuse.immount", flags, &data)?;
    Ok(Mounted::Direct { mountpoint })
}

fn mount_with_fusermount(mountpoint: &Path, opts: &MountOptions) -> io::Result<(File, Mounted)> {
    let (ours, theirs) = sys::socketpair()?;
    sys::set_cloexec(theirs.as_fd(), false)?;
    let mut options = format!(
        "ro,nosuid,nodev,default_permissions,auto_unmount,subtype=immount,fsname={}",
        fsname_for_options(&opts.fsname)
    );
    if opts.allow_other {
        options.push_str(",allow_other");
    }
    let spawned = Command::new(FUSERMOUNT)
        .arg("-o")
        .arg(&options)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn();
    // Close our copy of their end at once, so that a failing fusermount3
    // shows up as end-of-file on ours instead of a hang.
    drop(theirs);
    let mut child = spawned.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run {FUSERMOUNT} (package fuse3): {e}"),
        )
    })?;
    match sys::recv_fd(ours.as_fd())? {
        Some(fd) => Ok((
            File::from(fd),
            Mounted::Fusermount {
                mountpoint: mountpoint.to_owned(),
                _socket: ours,
                _helper: child,
            },
        )),
        None => {
            let status = child.wait()?;
            Err(io::Error::other(format!(
                "{FUSERMOUNT} could not mount ({status})"
            )))
        }
    }
}

fn fusermount_unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let mut cmd = Command::new(FUSERMOUNT);
    cmd.arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(mountpoint)
        .stdin(Stdio::null());
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    Err(io::Error::other(format!("{FUSERMOUNT} -u: {}", msg.trim())))
}

/// Unmount whatever FUSE filesystem is at `mountpoint`: directly when we
/// may, through fusermount3 when we may not.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    match sys::unmount(mountpoint, false) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) => {
            fusermount_unmount(mountpoint, false)
        }
        Err(e) => Err(e),
    }
}

/// Raise the kernel's readahead for the mount at `mountpoint` (a resolved
/// path, see [`Mounted::mountpoint`]) to `kib`, as root can: FUSE
/// starts at 128 KiB, while requests up to 1 MiB serve big files faster.
/// Best effort: a failure leaves the default.
pub fn raise_readahead(mountpoint: &Path, kib: u32) {
    let Some(dev) = mount_device(mountpoint) else {
        return;
    };
    let _ = std::fs::write(
        format!("/sys/class/bdi/{dev}/read_ahead_kb"),
        kib.to_string(),
    );
}

/// The `major:minor` of the mount at `mountpoint`, from /proc/self/mountinfo
/// (a `stat` would block: the server does not answer yet).
fn mount_device(mountpoint: &Path) -> Option<String> {
    let target = mountpoint.to_str()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last match is the topmost mount there: ours.
    info.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let _root = f.next()?;
        let mp = f.next()?;
        (mp == target).then(|| dev.to_owned())
    })
}
