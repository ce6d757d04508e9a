//! The FUSE session: INIT negotiation and the worker threads that answer
//! requests from `/dev/fuse`.
//!
//! Design, for speed on an immutable image:
//! - Node ids are derived from inode numbers (root is 1, every other inode
//!   is `ino + 2`), so the server keeps no per-node table: LOOKUP needs no
//!   bookkeeping and FORGET is free. Inode numbers are stable, so the
//!   kernel may cache entries and attributes for as long as it allows.
//! - OPEN and OPENDIR answer ENOSYS once; with `NO_OPEN(DIR)_SUPPORT` the
//!   kernel then stops sending them and keeps page cache and cached
//!   directories across opens (`FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR` is its
//!   default for no-open).
//! - Each worker thread reads from its own `/dev/fuse` clone and answers on
//!   the same file, with its own buffers: no locks on the request path.
//! - READ replies go out with one `writev` of header and data.
//! - A READ at the start of a file of a listed directory has the files
//!   listed after it pushed into the page cache by a thread of its own
//!   ([`crate::push`]): a walker then finds them cached.
//!
//! Bad input from the image never ends a worker: a failed request is
//! answered with an errno, and an image fault is logged once per inode.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::abi::{self, init_flags, opcode, Attr, Cursor, InHeader};
use crate::filesystem::{DirItem, Filesystem, FsError};
use crate::push::{self, Listed, PushThread, Pusher};

/// The largest READ we accept: 256 pages of 4 KiB (`max_pages`).
pub const MAX_PAGES: u16 = 256;
const MAX_READ: usize = MAX_PAGES as usize * 4096;
/// The largest WRITE the kernel may send. We refuse writes, but the kernel
/// sizes its read-buffer check on it, so keep it small to keep buffers small.
const MAX_WRITE: u32 = 128 * 1024;
/// Request buffer: a header, a write_in and `MAX_WRITE` bytes fit in it.
const REQUEST_BUFFER: usize = MAX_WRITE as usize + 4096;
/// Entry and attribute timeout, in seconds. The image never changes; the
/// kernel caps the value at what its jiffies arithmetic allows.
pub const TIMEOUT_SECS: u64 = u32::MAX as u64;

/// How many distinct inodes we log faults for before going quiet, so a
/// hostile image cannot fill the log or memory.
const MAX_LOGGED_FAULTS: usize = 10_000;

/// Options of one session.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Worker threads (each on its own cloned `/dev/fuse` file).
    pub threads: usize,
    /// Ask the kernel to enforce POSIX ACLs from our xattrs (needs the
    /// `default_permissions` mount option, which we always pass).
    pub posix_acl: bool,
    /// Count requests per opcode and print the counts to stderr when the
    /// session ends (a debugging aid: which requests the kernel still sends
    /// on a warm cache).
    pub stats: bool,
    /// Whether the server may read `/proc/PID/status` of a caller (to check
    /// its capabilities); off in a sandbox, where opening files is fatal.
    pub read_proc: bool,
    /// Push the files listed after one being read into the page cache
    /// ahead of the reader (see [`crate::push`]).
    pub push: bool,
    /// The readahead, in bytes, that INIT's answer allows at most: the
    /// kernel keeps the lesser of it and the mount's readahead as it is
    /// then, so a readahead raised (by root, in sysfs) before INIT is
    /// answered stays raised only if this is as large.
    pub max_readahead: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            threads: 4,
            posix_acl: true,
            stats: false,
            read_proc: true,
            push: true,
            max_readahead: 1 << 20,
        }
    }
}

/// Opcodes counted by [`SessionConfig::stats`]: every one we know is below.
const COUNTED_OPCODES: usize = 64;

/// A FUSE connection to serve.
pub struct Session {
    dev: File,
    fs: Arc<dyn Filesystem>,
    config: SessionConfig,
    shared: Arc<Shared>,
    /// `/dev/fuse` files for the other workers, made in advance by
    /// [`Session::prepare_workers`].
    worker_devs: Vec<File>,
    /// `/dev/fuse` files opened for workers and not yet attached (see
    /// [`Session::open_workers`]).
    unattached: Vec<File>,
    /// Whether [`Session::open_workers`] ran.
    workers_opened: bool,
    /// The body of the thread that pushes files ahead, when pushing.
    push_thread: Option<PushThread>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// State shared by the workers of one session.
#[derive(Debug)]
struct Shared {
    logged: Mutex<HashSet<u64>>,
    blksize: u32,
    /// The caller uid that may see `trusted.*` names (see [`may_list_trusted`]).
    trusted_uid: Option<u32>,
    read_proc: bool,
    /// Requests per opcode, when counting.
    counts: Option<Vec<AtomicU64>>,
    /// Where listings and reads are reported, when pushing.
    pusher: Option<Pusher>,
}

impl Session {
    /// A session on `dev`, an open `/dev/fuse` file already mounted (or
    /// about to be).
    pub fn new(dev: File, fs: Arc<dyn Filesystem>, config: SessionConfig) -> Session {
        let blksize = fs.statfs().bsize.max(512);
        let counts = config
            .stats
            .then(|| (0..COUNTED_OPCODES).map(|_| AtomicU64::new(0)).collect());
        let (pusher, push_thread) = config.push.then(push::pusher).unzip();
        Session {
            dev,
            fs,
            config,
            shared: Arc::new(Shared {
                logged: Mutex::new(HashSet::new()),
                blksize,
                trusted_uid: trusted_uid(),
                read_proc: config.read_proc,
                counts,
                pusher,
            }),
            worker_devs: Vec::new(),
            unattached: Vec::new(),
            workers_opened: false,
            push_thread,
        }
    }

    /// Open the `/dev/fuse` files of the other workers now, while the
    /// process may still open files (a sandbox forbids it later). Where
    /// `/dev/fuse` cannot be opened (a plain user when it is mode 0600,
    /// behind fusermount3), the workers share one file, which also works.
    /// Call it once mounted; see [`Session::open_workers`] for a session
    /// opened before the mount.
    pub fn prepare_workers(&mut self) -> io::Result<()> {
        self.open_workers()?;
        self.attach_workers();
        Ok(())
    }

    /// Open the `/dev/fuse` files of the other workers, not yet attached to
    /// the connection: the part of [`Session::prepare_workers`] that needs
    /// the filesystem, done before the mount by a server that confines
    /// itself meanwhile ([`Session::attach_workers`] follows, once
    /// mounted). Where `/dev/fuse` cannot be opened, the workers share the
    /// session's file.
    pub fn open_workers(&mut self) -> io::Result<()> {
        self.workers_opened = true;
        let threads = self.config.threads.clamp(1, 64);
        while self.worker_devs.len() + self.unattached.len() + 1 < threads {
            match immount_sys::fuse::open_dev_fuse() {
                Ok(dev) => self.unattached.push(dev),
                Err(_) => self.worker_devs.push(self.dev.try_clone()?),
            }
        }
        Ok(())
    }

    /// Attach the files [`Session::open_workers`] opened to this session's
    /// connection, which needs only an `ioctl` (a confined server may make
    /// it). In place of a file that cannot be attached, the worker shares
    /// the session's file (`F_DUPFD_CLOEXEC`, allowed too), or, failing
    /// that, one worker fewer serves.
    pub fn attach_workers(&mut self) {
        for dev in std::mem::take(&mut self.unattached) {
            match immount_sys::fuse::attach_dev_fuse(dev.as_fd(), self.dev.as_fd()) {
                Ok(()) => self.worker_devs.push(dev),
                Err(_) => self.worker_devs.extend(self.dev.try_clone().ok()),
            }
        }
    }

    /// A second descriptor of the session's `/dev/fuse` file (the same
    /// open file): to mount with, by a process that hands the session
    /// itself to another.
    pub fn dup_dev(&self) -> io::Result<File> {
        self.dev.try_clone()
    }

    /// Every descriptor the session serves on, for a sandbox to keep.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        std::iter::once(&self.dev)
            .chain(&self.worker_devs)
            .chain(&self.unattached)
            .map(AsRawFd::as_raw_fd)
            .collect()
    }

    /// Answer the kernel's INIT request. Call once, after mounting and
    /// before [`Session::serve`].
    pub fn init(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; REQUEST_BUFFER];
        loop {
            let n = match (&self.dev).read(&mut buf) {
                Ok(n) => n,
                Err(e) if retryable(&e) => continue,
                Err(e) => return Err(e),
            };
            let Some(req) = buf.get(..n) else { continue };
            let (h, body) = InHeader::parse(req).map_err(|_| proto_err("short INIT"))?;
            if h.opcode != opcode::INIT {
                // Nothing else can come before INIT; refuse it and go on.
                reply_err(&self.dev, h.unique, libc::EIO);
                continue;
            }
            return self.answer_init(&h, body);
        }
    }

    fn answer_init(&self, h: &InHeader, body: &[u8]) -> io::Result<()> {
        let mut c = Cursor::new(body);
        let (major, minor, max_readahead, kflags) =
            (|| Ok::<_, abi::Truncated>((c.u32()?, c.u32()?, c.u32()?, c.u32()?)))()
                .map_err(|_| proto_err("short INIT body"))?;
        if major != abi::KERNEL_VERSION || minor < 28 {
            reply_err(&self.dev, h.unique, libc::EPROTO);
            return Err(proto_err(&format!(
                "kernel speaks FUSE {major}.{minor}, need 7.28+"
            )));
        }
        let mut want = init_flags::ASYNC_READ
            | init_flags::PARALLEL_DIROPS
            // Always READDIRPLUS (no READDIRPLUS_AUTO): with AUTO the kernel
            // asks for plain READDIR after the first page of a listing and
            // then LOOKUPs every entry of it on the first stat.
            | init_flags::DO_READDIRPLUS
            | init_flags::CACHE_SYMLINKS
            | init_flags::NO_OPEN_SUPPORT
            | init_flags::NO_OPENDIR_SUPPORT
            | init_flags::EXPORT_SUPPORT
            | init_flags::MAX_PAGES;
        if self.config.posix_acl {
            want |= init_flags::POSIX_ACL;
        }
        let mut out = Vec::with_capacity(64);
        abi::put_u32(&mut out, abi::KERNEL_VERSION);
        abi::put_u32(&mut out, minor.min(abi::KERNEL_MINOR_VERSION));
        // More than the kernel proposed (the mount's readahead when it sent
        // INIT) only keeps a readahead raised since; the kernel takes the
        // lesser of this and the mount's readahead now.
        abi::put_u32(&mut out, max_readahead.max(self.config.max_readahead));
        abi::put_u32(&mut out, want & kflags);
        out.extend_from_slice(&64u16.to_ne_bytes()); // max_background
        out.extend_from_slice(&48u16.to_ne_bytes()); // congestion_threshold
        abi::put_u32(&mut out, MAX_WRITE);
        abi::put_u32(&mut out, 1); // time_gran: nanoseconds
        out.extend_from_slice(&MAX_PAGES.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes()); // map_alignment
        out.resize(64, 0); // flags2, max_stack_depth and unused
        reply(&self.dev, h.unique, 0, &[&out]);
        Ok(())
    }

    /// Serve requests until the filesystem is unmounted. Starts
    /// `config.threads - 1` more threads on cloned `/dev/fuse` files (see
    /// [`Session::prepare_workers`]) and serves on this one too; returns
    /// when all have seen the end.
    pub fn serve(mut self) -> io::Result<()> {
        // A clone has its own processing queue, so workers do not contend.
        // Files are opened here only if nobody did before (a confined
        // server may not open any).
        if !self.workers_opened {
            self.open_workers()?;
        }
        self.attach_workers();
        let dev = Arc::new(self.dev);
        let push = match self.push_thread.take() {
            Some(body) => {
                let fs = self.fs.clone();
                let dev = Arc::clone(&dev);
                let root = fs.root();
                let h = std::thread::Builder::new()
                    .name("fuse-push".into())
                    .spawn(move || body.run(&*fs, &dev, |ino| nodeid_of(root, ino)))?;
                Some(h)
            }
            None => None,
        };
        let mut handles = Vec::new();
        for (i, dev) in std::mem::take(&mut self.worker_devs)
            .into_iter()
            .enumerate()
        {
            let i = i + 1;
            let worker = Worker::new(Arc::new(dev), self.fs.clone(), self.shared.clone());
            let h = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || worker.run())?;
            handles.push(h);
        }
        let shared = self.shared.clone();
        let result = Worker::new(dev, self.fs, self.shared).run();
        let mut failed = None;
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => {
                    failed = failed.or(Some(io::Error::other("a FUSE worker thread panicked")))
                }
            }
        }
        if let Some(counts) = &shared.counts {
            let mut seen: Vec<String> = counts
                .iter()
                .enumerate()
                .filter_map(|(op, n)| {
                    let n = n.load(Ordering::Relaxed);
                    (n > 0).then(|| format!("{}={n}", opcode::name(op as u32)))
                })
                .collect();
            if let Some(p) = &shared.pusher {
                let s = &p.stats;
                seen.push(format!(
                    "pushed={} files {} bytes, refused={}",
                    s.files.load(Ordering::Relaxed),
                    s.bytes.load(Ordering::Relaxed),
                    s.refused.load(Ordering::Relaxed)
                ));
            }
            eprintln!("immount: requests: {}", seen.join(" "));
        }
        // The last sender of windows goes with `shared`: the pushing thread
        // then ends.
        drop(shared);
        if let Some(h) = push {
            if h.join().is_err() {
                failed = failed.or(Some(io::Error::other("the FUSE push thread panicked")));
            }
        }
        result?;
        failed.map_or(Ok(()), Err)
    }
}

/// Which caller uid may list `trusted.*` attributes, as the kernel's EROFS
/// lists them only to callers with `CAP_SYS_ADMIN` in the initial user
/// namespace (and the VFS refuses their values to anyone else before a
/// request reaches us). Root of the initial namespace qualifies; when the
/// server itself runs in a user namespace, uid 0 there is no such caller,
/// so nobody does. Decided once, before any sandbox hides `/proc`.
fn trusted_uid() -> Option<u32> {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let identity = map.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f == ["0", "0", "4294967295"]
            });
            identity.then_some(0)
        }
        // No /proc: assume the common case, the initial namespace.
        Err(_) => Some(0),
    }
}

/// Whether the caller of a request may list `trusted.*` names: its uid is
/// the privileged one and, when its status may and can be read,
/// `CAP_SYS_ADMIN` is among its effective capabilities (a root process that
/// dropped it is refused by the kernel too).
fn may_list_trusted(trusted_uid: Option<u32>, read_proc: bool, h: &InHeader) -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    if trusted_uid != Some(h.uid) {
        return false;
    }
    if !read_proc {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", h.pid)) else {
        return true;
    };
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    match caps {
        Some(caps) => caps & (1 << CAP_SYS_ADMIN) != 0,
        None => true,
    }
}

fn proto_err(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("FUSE protocol: {msg}"))
}

/// Errors of a read from `/dev/fuse` that mean "try again": a signal, or a
/// request that the kernel withdrew (interrupted) before we got it.
fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT)
    )
}

/// Send one reply. Errors are ignored on purpose: ENOENT means the request
/// was interrupted and the kernel no longer wants the answer, and ENODEV
/// means the filesystem is gone, which the next read reports.
fn reply(dev: &File, unique: u64, error: i32, parts: &[&[u8]]) {
    let body_len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(abi::OUT_HEADER_LEN + body_len).unwrap_or(u32::MAX);
    let mut header = [0u8; abi::OUT_HEADER_LEN];
    header[0..4].copy_from_slice(&len.to_ne_bytes());
    header[4..8].copy_from_slice(&(-error).to_ne_bytes());
    header[8..16].copy_from_slice(&unique.to_ne_bytes());
    let mut iov = Vec::with_capacity(parts.len() + 1);
    iov.push(IoSlice::new(&header));
    iov.extend(parts.iter().map(|p| IoSlice::new(p)));
    let _ = (&*dev).write_vectored(&iov);
}

fn reply_err(dev: &File, unique: u64, errno: i32) {
    reply(dev, unique, errno, &[]);
}

/// The node id the kernel knows inode `ino` by, `root` being the root
/// directory's inode (see the module docs); `None` past the last one.
fn nodeid_of(root: u64, ino: u64) -> Option<u64> {
    if ino == root {
        return Some(abi::ROOT_ID);
    }
    ino.checked_add(2)
}

/// One worker: a `/dev/fuse` file and its buffers.
struct Worker {
    dev: Arc<File>,
    fs: Arc<dyn Filesystem>,
    shared: Arc<Shared>,
    request: Vec<u8>,
    data: Vec<u8>,
    out: Vec<u8>,
    root: u64,
}

impl Worker {
    fn new(dev: Arc<File>, fs: Arc<dyn Filesystem>, shared: Arc<Shared>) -> Worker {
        let root = fs.root();
        Worker {
            dev,
            fs,
            shared,
            request: vec![0u8; REQUEST_BUFFER],
            data: Vec::new(),
            out: Vec::with_capacity(64 * 1024),
            root,
        }
    }

    fn run(mut self) -> io::Result<()> {
        loop {
            let n = match (&*self.dev).read(&mut self.request) {
                Ok(n) => n,
                Err(e) if retryable(&e) => continue,
                // The filesystem was unmounted (or the connection aborted).
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
                Err(e) => return Err(e),
            };
            let req = std::mem::take(&mut self.request);
            let keep_going = match req.get(..n) {
                Some(bytes) => self.handle(bytes),
                None => true,
            };
            self.request = req;
            if !keep_going {
                return Ok(());
            }
        }
    }

    fn nodeid_of(&self, ino: u64) -> Result<u64, FsError> {
        nodeid_of(self.root, ino)
            .ok_or_else(|| FsError::fault(format!("inode number {ino} too large")))
    }

    fn ino_of(&self, nodeid: u64) -> Result<u64, FsError> {
        match nodeid {
            abi::ROOT_ID => Ok(self.root),
            0 => Err(FsError::errno(libc::EINVAL)),
            n => n.checked_sub(2).ok_or(FsError::errno(libc::EINVAL)),
        }
    }

    fn fix_attr(&self, mut a: Attr) -> Attr {
        a.blksize = self.shared.blksize;
        a
    }

    /// Handle one request; false when the session is over (DESTROY).
    fn handle(&mut self, req: &[u8]) -> bool {
        let Ok((h, body)) = InHeader::parse(req) else {
            // A request we cannot even parse has no unique id to answer.
            return true;
        };
        if let Some(n) = self
            .shared
            .counts
            .as_ref()
            .and_then(|c| c.get(h.opcode as usize))
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
        match h.opcode {
            opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT => return true,
            opcode::DESTROY => {
                reply_err(&self.dev, h.unique, 0);
                return false;
            }
            _ => {}
        }
        match self.dispatch(&h, body) {
            Ok(()) => {}
            Err(e) => {
                if let Some(detail) = &e.detail {
                    self.log_fault(h.nodeid, detail);
                }
                reply_err(&self.dev, h.unique, e.errno);
            }
        }
        true
    }

    fn log_fault(&self, nodeid: u64, detail: &str) {
        let Ok(mut logged) = self.shared.logged.lock() else {
            return;
        };
        if logged.len() < MAX_LOGGED_FAULTS && logged.insert(nodeid) {
            eprintln!("immount: {detail}");
        }
    }

    fn dispatch(&mut self, h: &InHeader, body: &[u8]) -> Result<(), FsError> {
        let bad = |_| FsError::errno(libc::EINVAL);
        let mut c = Cursor::new(body);
        match h.opcode {
            opcode::LOOKUP => {
                let parent = self.ino_of(h.nodeid)?;
                let name = c.cstr().map_err(bad)?;
                self.out.clear();
                match self.fs.lookup(parent, name)? {
                    Some(attr) => {
                        let attr = self.fix_attr(attr);
                        let nodeid = self.nodeid_of(attr.ino)?;
                        abi::encode_entry(&mut self.out, nodeid, &attr, TIMEOUT_SECS);
                    }
                    // A cached negative entry: the name will never appear.
                    None => abi::encode_entry(&mut self.out, 0, &Attr::default(), TIMEOUT_SECS),
                }
                reply(&self.dev, h.unique, 0, &[&self.out]);
            }
            opcode::GETATTR => {
                let attr = self.fix_attr(self.fs.getattr(self.ino_of(h.nodeid)?)?);
                self.out.clear();
                abi::put_u64(&mut self.out, TIMEOUT_SECS);
                abi::put_u32(&mut self.out, 0);
                abi::put_u32(&mut self.out, 0);
                attr.encode(&mut self.out);
                reply(&self.dev, h.unique, 0, &[&self.out]);
            }
            opcode::READLINK => {
                let target = self.fs.readlink(self.ino_of(h.nodeid)?)?;
                reply(&self.dev, h.unique, 0, &[&target]);
            }
            // Let the kernel skip these from now on (NO_OPEN(DIR)_SUPPORT).
            opcode::OPEN | opcode::OPENDIR => return Err(FsError::errno(libc::ENOSYS)),
            opcode::RELEASE | opcode::RELEASEDIR => reply_err(&self.dev, h.unique, 0),
            // ENOSYS makes the kernel stop sending them: a FLUSH on every
            // close() would cost a round trip per file read.
            opcode::FLUSH | opcode::FSYNC | opcode::FSYNCDIR => {
                return Err(FsError::errno(libc::ENOSYS))
            }
            opcode::READ => {
                let ino = self.ino_of(h.nodeid)?;
                let _fh = c.u64().map_err(bad)?;
                let offset = c.u64().map_err(bad)?;
                let size = c.u32().map_err(bad)?;
                let size = usize::try_from(size).unwrap_or(MAX_READ).min(MAX_READ);
                if self.data.len() < size {
                    self.data.resize(size, 0);
                }
                let n = self.fs.read(ino, offset, &mut self.data[..size])?;
                let n = n.min(size);
                reply(&self.dev, h.unique, 0, &[&self.data[..n]]);
                if let Some(p) = &self.shared.pusher {
                    p.read(ino, offset);
                }
            }
            opcode::STATFS => {
                let s = self.fs.statfs();
                self.out.clear();
                for v in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
                    abi::put_u64(&mut self.out, v);
                }
                for v in [s.bsize, s.namelen, s.frsize, 0, 0, 0, 0, 0, 0, 0] {
                    abi::put_u32(&mut self.out, v);
                }
                reply(&self.dev, h.unique, 0, &[&self.out]);
            }
            opcode::GETXATTR => {
                let size = c.u32().map_err(bad)?;
                let _pad = c.u32().map_err(bad)?;
                let name = c.cstr().map_err(bad)?;
                let value = self
                    .fs
                    .getxattr(self.ino_of(h.nodeid)?, name)?
                    .ok_or(FsError::errno(libc::ENODATA))?;
                self.reply_sized(h.unique, size, &value)?;
            }
            opcode::LISTXATTR => {
                let size = c.u32().map_err(bad)?;
                let mut names = self.fs.listxattr(self.ino_of(h.nodeid)?)?;
                if names.iter().any(|n| n.starts_with(b"trusted."))
                    && !may_list_trusted(self.shared.trusted_uid, self.shared.read_proc, h)
                {
                    names.retain(|n| !n.starts_with(b"trusted."));
                }
                let mut list = Vec::new();
                for n in names {
                    list.extend_from_slice(&n);
                    list.push(0);
                }
                self.reply_sized(h.unique, size, &list)?;
            }
            opcode::READDIR | opcode::READDIRPLUS => {
                let ino = self.ino_of(h.nodeid)?;
                let _fh = c.u64().map_err(bad)?;
                let offset = c.u64().map_err(bad)?;
                let size = c.u32().map_err(bad)?;
                self.readdir(h.unique, ino, offset, size, h.opcode == opcode::READDIRPLUS)?;
            }
            opcode::ACCESS => {
                let mask = c.u32().map_err(bad)?;
                // Only reached without default_permissions: nothing is
                // writable, everything else is left to the mode bits the
                // kernel already checked.
                if mask & (libc::W_OK as u32) != 0 {
                    return Err(FsError::errno(libc::EROFS));
                }
                reply_err(&self.dev, h.unique, 0);
            }
            opcode::LSEEK => {
                let _fh = c.u64().map_err(bad)?;
                let offset = c.u64().map_err(bad)?;
                let whence = c.u32().map_err(bad)?;
                let size = self.fs.getattr(self.ino_of(h.nodeid)?)?.size;
                // No holes are reported: data runs from 0 to the end.
                let pos = match whence as i32 {
                    libc::SEEK_DATA if offset < size => offset,
                    libc::SEEK_HOLE if offset < size => size,
                    libc::SEEK_DATA | libc::SEEK_HOLE => return Err(FsError::errno(libc::ENXIO)),
                    _ => return Err(FsError::errno(libc::EINVAL)),
                };
                self.out.clear();
                abi::put_u64(&mut self.out, pos);
                reply(&self.dev, h.unique, 0, &[&self.out]);
            }
            opcode::SETATTR
            | opcode::SYMLINK
            | opcode::MKNOD
            | opcode::MKDIR
            | opcode::UNLINK
            | opcode::RMDIR
            | opcode::RENAME
            | opcode::RENAME2
            | opcode::LINK
            | opcode::WRITE
            | opcode::SETXATTR
            | opcode::REMOVEXATTR
            | opcode::CREATE
            | opcode::FALLOCATE
            | opcode::COPY_FILE_RANGE => return Err(FsError::errno(libc::EROFS)),
            opcode::INIT => return Err(FsError::errno(libc::EIO)),
            _ => return Err(FsError::errno(libc::ENOSYS)),
        }
        Ok(())
    }

    /// The xattr reply convention: size 0 asks for the length only.
    fn reply_sized(&mut self, unique: u64, size: u32, value: &[u8]) -> Result<(), FsError> {
        let len = u32::try_from(value.len()).map_err(|_| FsError::errno(libc::E2BIG))?;
        if size == 0 {
            self.out.clear();
            abi::put_u32(&mut self.out, len);
            abi::put_u32(&mut self.out, 0);
            reply(&self.dev, unique, 0, &[&self.out]);
        } else if len > size {
            return Err(FsError::errno(libc::ERANGE));
        } else {
            reply(&self.dev, unique, 0, &[value]);
        }
        Ok(())
    }

    fn readdir(
        &mut self,
        unique: u64,
        ino: u64,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> Result<(), FsError> {
        let size = usize::try_from(size).unwrap_or(MAX_READ).min(MAX_READ);
        // Collect first, then fetch attributes: the filesystem's listing
        // callback should not re-enter it.
        let mut items: Vec<(Vec<u8>, u64, u32, u64)> = Vec::new();
        let mut used = 0usize;
        self.fs.readdir(ino, offset, &mut |e: &DirItem<'_>| {
            let need = abi::dirent_size(e.name.len(), plus);
            if used + need > size {
                return false;
            }
            used += need;
            items.push((e.name.to_vec(), e.ino, e.dtype, e.next_offset));
            true
        })?;
        self.out.clear();
        let mut listed = Vec::new();
        for (name, child, dtype, next) in &items {
            if plus {
                let is_dot = name.as_slice() == b"." || name.as_slice() == b"..";
                // The kernel ignores the entry part of "." and ".."; a child
                // whose inode is corrupt is still listed, with no entry, so
                // that only a lookup of it fails.
                let attr = if is_dot {
                    None
                } else {
                    self.fs.getattr(*child).ok()
                };
                match attr {
                    Some(a) => {
                        let a = self.fix_attr(a);
                        let nodeid = self.nodeid_of(a.ino)?;
                        abi::encode_entry(&mut self.out, nodeid, &a, TIMEOUT_SECS);
                        if self.shared.pusher.is_some() && a.mode & libc::S_IFMT == libc::S_IFREG {
                            listed.push(Listed {
                                ino: a.ino,
                                size: a.size,
                            });
                        }
                    }
                    None => abi::encode_entry(&mut self.out, 0, &Attr::default(), 0),
                }
            }
            abi::encode_dirent(&mut self.out, *child, *next, *dtype, name);
        }
        reply(&self.dev, unique, 0, &[&self.out]);
        if let (Some(p), Some(last)) = (&self.shared.pusher, items.last()) {
            if plus {
                p.listed(ino, offset, last.3, &listed);
            }
        }
        Ok(())
    }
}
