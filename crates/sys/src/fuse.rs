//! Syscalls that the FUSE server needs (mounting, /dev/fuse clones).
//!
//! Most of these are thin, safe shims over `rustix`, kept here so that the
//! FUSE crate reaches the kernel through one reviewed door. The two that
//! need `unsafe` are the `FUSE_DEV_IOC_CLONE` ioctl and the signal-mask
//! calls (`pthread_sigmask`, `sigwait`), which neither std nor rustix wrap.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::io::FdFlags;
use rustix::mount::{MountFlags, UnmountFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags, SocketType,
};

/// `FUSE_DEV_IOC_CLONE` from `include/uapi/linux/fuse.h`: `_IOR(229, 0, uint32_t)`.
///
/// `_IOR(type, nr, size)` is `(2 << 30) | (size << 16) | (type << 8) | nr`
/// on every architecture Linux runs FUSE on except a few (alpha, mips, ppc,
/// sparc) whose direction bits differ; we build for x86-64 and arm64.
const FUSE_DEV_IOC_CLONE: u32 = (2 << 30) | (4 << 16) | (229 << 8);

fn to_io(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Open `/dev/fuse` for reading and writing, close-on-exec.
pub fn open_dev_fuse() -> io::Result<File> {
    let fd = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(to_io)?;
    Ok(File::from(fd))
}

/// Open a new `/dev/fuse` file attached to the same FUSE connection as
/// `session`, so another thread can read requests from it without sharing
/// a file (and its processing queue) with the first.
pub fn clone_dev_fuse(session: BorrowedFd<'_>) -> io::Result<File> {
    let clone = open_dev_fuse()?;
    attach_dev_fuse(clone.as_fd(), session)?;
    Ok(clone)
}

/// Attach `clone`, a `/dev/fuse` file opened earlier and not yet attached
/// to anything, to the FUSE connection of `session` (`FUSE_DEV_IOC_CLONE`).
/// Opening needs the filesystem and attaching needs the mount: a server
/// that confines itself before the mount is up opens first and attaches
/// afterwards.
pub fn attach_dev_fuse(clone: BorrowedFd<'_>, session: BorrowedFd<'_>) -> io::Result<()> {
    let session_fd: u32 = u32::try_from(session.as_raw_fd())
        .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `clone` is a descriptor borrowed for the duration of the
    // call; FUSE_DEV_IOC_CLONE reads exactly one u32 (the fd of the
    // session to attach to) from the pointer, which points to a live local.
    let rc = unsafe {
        libc::ioctl(
            clone.as_raw_fd(),
            FUSE_DEV_IOC_CLONE as libc::Ioctl,
            std::ptr::addr_of!(session_fd),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Options of a direct FUSE mount.
#[derive(Debug, Clone, Copy, Default)]
pub struct MountFlagsSpec {
    /// Ignore set-user-id and set-group-id bits (`MS_NOSUID`).
    pub nosuid: bool,
    /// Refuse to open device nodes (`MS_NODEV`).
    pub nodev: bool,
}

/// `mount(2)` a FUSE filesystem read-only. `data` is the option string the
/// FUSE driver parses (`fd=N,rootmode=...,user_id=...,group_id=...`).
pub fn mount_fuse(
    source: &str,
    target: &Path,
    fstype: &str,
    spec: MountFlagsSpec,
    data: &str,
) -> io::Result<()> {
    let mut flags = MountFlags::RDONLY;
    if spec.nosuid {
        flags |= MountFlags::NOSUID;
    }
    if spec.nodev {
        flags |= MountFlags::NODEV;
    }
    let data = CString::new(data).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    rustix::mount::mount(source, target, fstype, flags, Some(data.as_c_str())).map_err(to_io)
}

/// `umount2(2)`; `lazy` detaches the mount now and lets it go when unused.
pub fn unmount(target: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    rustix::mount::unmount(target, flags).map_err(to_io)
}

/// A connected pair of Unix stream sockets, close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(to_io)
}

/// A pipe, both ends close-on-exec: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(to_io)
}

/// Set or clear close-on-exec on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec {
        FdFlags::CLOEXEC
    } else {
        FdFlags::empty()
    };
    rustix::io::fcntl_setfd(fd, flags).map_err(to_io)
}

/// Receive one file descriptor sent with `SCM_RIGHTS` (as fusermount3 does).
/// `Ok(None)` when the peer closed the socket or sent no descriptor.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    loop {
        match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(to_io(e)),
        }
    }
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if let Some(fd) = fds.next() {
                return Ok(Some(fd));
            }
        }
    }
    Ok(None)
}

/// Tell the kernel that the bytes `offset..offset+len` of `file` will not
/// be read again soon, so their page-cache pages can be dropped. Only pages
/// wholly inside the range go.
pub fn fadvise_dontneed(file: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let Some(len) = std::num::NonZeroU64::new(len) else {
        return Ok(());
    };
    rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed).map_err(to_io)
}

/// Start reading `offset..offset+len` of `file` into the page cache in the
/// background (`posix_fadvise(WILLNEED)`).
pub fn fadvise_willneed(file: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let Some(len) = std::num::NonZeroU64::new(len) else {
        return Ok(());
    };
    rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::WillNeed).map_err(to_io)
}

/// Read from `offset` only what the page cache already holds
/// (`preadv2(RWF_NOWAIT)`): the count read, possibly short or 0 when the
/// first byte is not cached (`EAGAIN` is reported as 0). Other errors, such
/// as `EOPNOTSUPP` where the filesystem cannot tell, are returned.
pub fn pread_cached(file: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut iov = [io::IoSliceMut::new(buf)];
    match rustix::io::preadv2(file, &mut iov, offset, rustix::io::ReadWriteFlags::NOWAIT) {
        Ok(n) => Ok(n),
        Err(rustix::io::Errno::AGAIN) => Ok(0),
        Err(e) => Err(to_io(e)),
    }
}

/// Tell the kernel that `file` is read at random: no readahead, so only the
/// pages asked for enter the page cache.
pub fn fadvise_random(file: BorrowedFd<'_>) -> io::Result<()> {
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Random).map_err(to_io)
}

/// The real user and group ids of this process.
pub fn real_ids() -> (u32, u32) {
    (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    )
}

/// The signals that ask the server to unmount and exit.
const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn termination_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the whole set it is given; the pointer
    // is to a live local of the right type.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: the set was initialised by sigemptyset just above.
    let mut set = unsafe { set.assume_init() };
    for sig in TERMINATION_SIGNALS {
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid signal.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Block SIGTERM, SIGINT and SIGHUP in the calling thread and in every
/// thread it starts afterwards, so that [`wait_termination_signal`] in one
/// dedicated thread receives them instead of their default action killing
/// the process with the mount still in place. Call before starting threads.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_sigset();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Wait until one of the signals blocked by [`block_termination_signals`]
/// arrives, and return its number.
pub fn wait_termination_signal() -> io::Result<i32> {
    let set = termination_sigset();
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a live local that sigwait
    // writes one int to.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(sig)
}

/// Take ownership of descriptor number `fd`, inherited from the process
/// that started us (which named it, e.g. in an environment variable), and
/// make it close-on-exec so it is not passed on further. Numbers 0-2 and
/// descriptors that are not open are refused.
pub fn take_inherited_fd(fd: i32) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the borrow lives only for this fcntl call, which merely asks
    // whether the number is an open descriptor (EBADF otherwise).
    let open = rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).is_ok();
    if !open {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the descriptor is open (checked above) and, by the contract
    // with our parent, was made for us alone: nothing else in this process
    // owns or closes it, so it is sound to give it one owner.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    set_cloexec(owned.as_fd(), true)?;
    Ok(owned)
}

/// Whether `fd` is a valid descriptor in this process.
pub fn fd_is_open(fd: BorrowedFd<'_>) -> bool {
    rustix::io::fcntl_getfd(fd.as_fd()).is_ok()
}

/// `fork(2)`, only while this process has a single thread: `Ok(None)` in
/// the child, `Ok(Some(pid))` in the parent. Used to split a supervisor
/// (which keeps the right to unmount) from a server about to confine
/// itself. A process with more threads is refused, because the child would
/// inherit locks held by threads that do not exist in it.
pub fn fork_single_threaded() -> io::Result<Option<u32>> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork a process with {threads} threads"
        )));
    }
    // SAFETY: with one thread (checked just above; this process starts no
    // thread concurrently, as it has no other), the child is a complete
    // copy in which no lock is held by a missing thread, so both processes
    // may go on running ordinary Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid.unsigned_abs())),
    }
}

/// `fork(2)` from a thread of a process with one other thread: `Ok(None)`
/// in the child, which is a copy of the calling thread alone,
/// `Ok(Some(pid))` in the parent. The server's pre-confined thread uses it
/// (see `sandbox::prepare_ahead`) while the main thread mounts, and the
/// child runs only the code of the job it was handed, and exits without
/// returning into the thread's caller.
///
/// The caller's promise: the other thread, from the moment it handed the
/// job over until it learns the fork is done, takes no lock of its own
/// (Rust's, such as the standard streams' or the environment's): it only
/// makes system calls and allocates, and makes no thread.
pub fn fork_from_thread() -> io::Result<Option<u32>> {
    // SAFETY: memory is not at stake in fork itself: the child gets a copy
    // of the address space. What a fork from a threaded process risks is a
    // lock held by a thread missing in the child. By the caller's promise
    // the other thread holds no lock of its own across the fork; the locks
    // it may hold inside glibc are the allocator's, which glibc's fork takes
    // before copying and resets in the child, so the child may allocate and
    // run ordinary Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid.unsigned_abs())),
    }
}

/// Start `thread`, a thread of this process that has just been made and
/// has not run yet, on another CPU than the calling thread's, among those
/// the process may use: Linux queues a new thread on the CPU of the thread
/// that made it, behind it, and on a small machine it may not run before
/// that one sleeps. Returns the CPUs the thread may use, for it to take
/// back once it runs ([`use_cpus`]); `None` where there is no other CPU (or
/// the kernel refused), which leaves all as it was.
pub fn start_elsewhere(thread: u32) -> Option<CpuMask> {
    let allowed = rustix::thread::sched_getaffinity(None).ok()?;
    if allowed.count() < 2 {
        return None;
    }
    let here = rustix::thread::sched_getcpu();
    let other = (1..rustix::thread::CpuSet::MAX_CPU)
        .map(|step| (here + step) % rustix::thread::CpuSet::MAX_CPU)
        .find(|&cpu| allowed.is_set(cpu))?;
    let mut there = rustix::thread::CpuSet::new();
    there.set(other);
    let tid = rustix::thread::Pid::from_raw(i32::try_from(thread).ok()?)?;
    rustix::thread::sched_setaffinity(Some(tid), &there).ok()?;
    Some(CpuMask(allowed))
}

/// The CPUs a thread may run on (see [`start_elsewhere`]).
#[derive(Debug, Clone)]
pub struct CpuMask(rustix::thread::CpuSet);

/// Let the calling thread run on the CPUs of `mask`.
pub fn use_cpus(mask: &CpuMask) -> io::Result<()> {
    rustix::thread::sched_setaffinity(None, &mask.0).map_err(to_io)
}

/// The id of a thread of this process other than the calling one, when
/// there is exactly one (from `/proc/self/task`).
pub fn other_thread() -> io::Result<Option<u32>> {
    let me = rustix::thread::gettid()
        .as_raw_nonzero()
        .get()
        .unsigned_abs();
    let mut others = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let name = entry?.file_name();
        if let Some(tid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) {
            if tid != me {
                others.push(tid);
            }
        }
    }
    Ok(if others.len() == 1 {
        others.pop()
    } else {
        None
    })
}

/// Keep glibc's allocator from ever shrinking a thread's arena heap
/// (`mallopt(M_TRIM_THRESHOLD, INT_MAX)`), before any thread starts. The
/// first time glibc shrinks one it reads `/proc/sys/vm/overcommit_memory`:
/// an `openat` that a seccomp sandbox kills the process for, long after
/// start-up (seen serving a Debian image). Whole heaps are still unmapped
/// and large blocks still go back with `munmap`; only the trimming of a
/// heap's top is given up. Limiting glibc to one arena avoids it too, but
/// cost a tenth of the cold-read speed in lock contention. Elsewhere than
/// glibc, nothing to do.
pub fn malloc_never_trim() -> io::Result<()> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets an allocator parameter; called while
        // the process is single-threaded, so no allocation races with it.
        let ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
        if ok != 1 {
            return Err(io::Error::other("mallopt(M_TRIM_THRESHOLD) refused"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn clone_ioctl_number_matches_the_uapi_header() {
        // Value printed by a C program including <linux/fuse.h> on x86-64.
        assert_eq!(FUSE_DEV_IOC_CLONE, 0x8004_e500);
    }

    #[test]
    fn fd_passing_round_trip() {
        let (a, b) = socketpair().unwrap();
        let (r, _w) = pipe().unwrap();
        let fds = [r.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &a,
            &[io::IoSlice::new(b"x")],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        let got = recv_fd(b.as_fd()).unwrap().expect("a descriptor");
        assert!(fd_is_open(got.as_fd()));
        drop(a);
        assert!(recv_fd(b.as_fd()).unwrap().is_none());
    }
}
