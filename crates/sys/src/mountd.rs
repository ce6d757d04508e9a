//! Syscalls of the delegation daemon (`immountd`): peer credentials,
//! descriptor passing with several fds, FUSE mounts made with the new mount
//! API (`fsopen`/`fsconfig`/`fsmount`, detached until `move_mount`), and
//! questions about user namespaces.
//!
//! Most are safe shims over `rustix`; the namespace ioctls, which rustix
//! does not wrap, are the only `unsafe`.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most descriptors one message may carry; more are cut off by the
/// kernel (`MSG_CTRUNC`) and closed.
pub const MAX_FDS_PER_MESSAGE: usize = 8;

fn to_io(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Who is at the other end of a Unix socket, as the kernel saw it when the
/// connection was made (`SO_PEERCRED`), translated into our namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id (0 when the peer's pid is not visible to us).
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// The credentials of the peer of a connected Unix socket.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let cred = rustix::net::sockopt::socket_peercred(sock).map_err(to_io)?;
    Ok(PeerCred {
        pid: cred.pid.as_raw_nonzero().get(),
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
    })
}

/// Send `bytes` with `fds` attached (`SCM_RIGHTS`), without `SIGPIPE`.
/// Returns how many bytes went out; the descriptors go with the first.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    loop {
        match rustix::net::sendmsg(
            sock,
            &[io::IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(to_io(e)),
        }
    }
}

/// What one [`recv_with_fds`] got.
#[derive(Debug, Default)]
pub struct Received {
    /// Bytes read into the buffer (0: the peer closed the connection).
    pub bytes: usize,
    /// Descriptors that came with them, close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The peer sent more descriptors than [`MAX_FDS_PER_MESSAGE`]; the
    /// kernel closed the rest.
    pub fds_truncated: bool,
}

/// Receive bytes and any descriptors sent with them.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = loop {
        match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(msg) => break msg,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(to_io(e)),
        }
    };
    let mut out = Received {
        bytes: msg.bytes,
        fds: Vec::new(),
        fds_truncated: msg.flags.contains(rustix::net::ReturnFlags::CTRUNC),
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            out.fds.extend(fds);
        }
    }
    Ok(out)
}

/// How to make a FUSE superblock with [`fuse_fsmount`].
#[derive(Debug, Clone, Default)]
pub struct FuseMountSpec {
    /// Shown as the mount's source in /proc/self/mountinfo.
    pub source: String,
    /// Owner of the connection: only this uid (and gid) may use the mount
    /// unless `allow_other`.
    pub user_id: u32,
    /// See `user_id`.
    pub group_id: u32,
    /// Let every user use the mount.
    pub allow_other: bool,
    /// `MOUNT_ATTR_NOSUID`.
    pub nosuid: bool,
    /// `MOUNT_ATTR_NODEV`.
    pub nodev: bool,
    /// `MOUNT_ATTR_NOEXEC`.
    pub noexec: bool,
}

/// Make a read-only FUSE filesystem served through `dev` (an open
/// `/dev/fuse`) and return it as a detached mount (`fsmount`), type
/// `fuse.immount`. Nothing is attached anywhere: the caller puts it in place
/// with `move_mount`, and closing the descriptor unattached destroys it.
///
/// The kernel queues the FUSE INIT request at creation without waiting for
/// an answer; every access to the mount waits until the server answers it.
pub fn fuse_fsmount(dev: BorrowedFd<'_>, spec: &FuseMountSpec) -> io::Result<OwnedFd> {
    let fs = rustix::mount::fsopen("fuse", FsOpenFlags::FSOPEN_CLOEXEC).map_err(to_io)?;
    let set = |key: &str, value: &str| {
        rustix::mount::fsconfig_set_string(fs.as_fd(), key, value).map_err(to_io)
    };
    // The FUSE driver looks the number up in the calling process's table.
    set("fd", &dev.as_raw_fd().to_string())?;
    set("rootmode", "40000")?;
    set("user_id", &spec.user_id.to_string())?;
    set("group_id", &spec.group_id.to_string())?;
    set("subtype", "immount")?;
    if !spec.source.is_empty() {
        set("source", &spec.source)?;
    }
    let flag = |key: &str| rustix::mount::fsconfig_set_flag(fs.as_fd(), key).map_err(to_io);
    flag("default_permissions")?;
    flag("ro")?;
    if spec.allow_other {
        flag("allow_other")?;
    }
    rustix::mount::fsconfig_create(fs.as_fd()).map_err(to_io)?;
    let mut attrs = MountAttrFlags::MOUNT_ATTR_RDONLY;
    if spec.nosuid {
        attrs |= MountAttrFlags::MOUNT_ATTR_NOSUID;
    }
    if spec.nodev {
        attrs |= MountAttrFlags::MOUNT_ATTR_NODEV;
    }
    if spec.noexec {
        attrs |= MountAttrFlags::MOUNT_ATTR_NOEXEC;
    }
    rustix::mount::fsmount(fs.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(to_io)
}

/// Attach the detached mount `mount` on the directory open as `dir`.
pub fn attach_mount_on_fd(mount: BorrowedFd<'_>, dir: BorrowedFd<'_>) -> io::Result<()> {
    rustix::mount::move_mount(
        mount,
        "",
        dir,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(to_io)
}

/// Attach the detached mount `mount` at `path` (in the caller's mount
/// namespace, which needs `CAP_SYS_ADMIN` over it).
pub fn attach_mount_at(mount: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    rustix::mount::move_mount(
        mount,
        "",
        rustix::fs::CWD,
        path,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(to_io)
}

/// Detach the mount at `path` (`umount2(MNT_DETACH | UMOUNT_NOFOLLOW)`).
pub fn unmount_detach(path: &Path) -> io::Result<()> {
    rustix::mount::unmount(path, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW).map_err(to_io)
}

/// The uid that created the user namespace open as `ns`; an error when `ns`
/// is not a user namespace.
pub fn user_namespace_owner(ns: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns a number; an
    // fd that is not a namespace gets ENOTTY.
    let kind = unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if kind < 0 {
        return Err(io::Error::last_os_error());
    }
    if kind != libc::CLONE_NEWUSER {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut uid: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t to the pointer, which points
    // to a live local of that type.
    let rc = unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_OWNER_UID, &mut uid) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(uid)
}

/// Descriptors passed by systemd socket activation (`LISTEN_FDS`, starting
/// at 3), when `LISTEN_PID` names this process. The variables are removed
/// so that children do not see them.
pub fn listen_fds() -> io::Result<Vec<OwnedFd>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let count: i32 = count
        .parse()
        .ok()
        .filter(|n| (0..=64).contains(n))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    (3..3 + count).map(crate::fuse::take_inherited_fd).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn several_fds_round_trip() {
        let (a, b) = crate::fuse::socketpair().unwrap();
        let (r1, _w1) = crate::fuse::pipe().unwrap();
        let (r2, _w2) = crate::fuse::pipe().unwrap();
        send_with_fds(a.as_fd(), b"{}\0", &[r1.as_fd(), r2.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(got.bytes, 3);
        assert_eq!(got.fds.len(), 2);
        assert!(!got.fds_truncated);
        let me = peer_credentials(b.as_fd()).unwrap();
        assert_eq!(me.uid, rustix::process::geteuid().as_raw());
    }

    #[test]
    fn own_user_namespace_has_an_owner() {
        let ns = std::fs::File::open("/proc/self/ns/user").unwrap();
        assert!(user_namespace_owner(ns.as_fd()).is_ok());
        let not_ns = std::fs::File::open("/proc/self/ns/mnt").unwrap();
        assert!(user_namespace_owner(not_ns.as_fd()).is_err());
    }
}
