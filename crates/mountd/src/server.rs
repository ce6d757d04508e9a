//! The per-mount server: a separate process, one per mount, that parses the
//! image and answers FUSE requests inside the sandbox. The daemon never
//! parses image content; it only starts these.
//!
//! The daemon runs its own program again as `immountd __serve` with one end
//! of a socketpair as standard input, and sends on it one varlink-framed
//! message: a JSON [`ServerConfig`] with the descriptors `/dev/fuse` (already
//! mounted with `fsmount`), the image and, if any, the verity data. The
//! server then:
//! 1. opens the image (through a verified reader when a root hash is given);
//! 2. answers FUSE INIT;
//! 3. confines itself ([`sandbox::apply`], memory capped by the policy);
//! 4. reports on the socket: one `0` byte for ready, or a code byte and a
//!    one-line error;
//! 5. serves until the mount goes away, then exits.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use erofs::{Image, ReadAt};
use fuse::abi::Attr;
use fuse::filesystem::{DirItem, Statfs};
use fuse::image_file::ImageFile;
use fuse::{ErofsFs, Filesystem, FsError, Session, SessionConfig};
use serde::{Deserialize, Serialize};

use crate::varlink::Connection;

/// The hidden argument that makes `immountd` a per-mount server.
pub const SERVE_ARG: &str = "__serve";

/// Exit and status code: the image cannot be served.
pub const CODE_BAD_IMAGE: u8 = 1;
/// Exit and status code: the verity data or root hash do not fit.
pub const CODE_VERITY: u8 = 3;
/// Exit and status code: anything else.
pub const CODE_OTHER: u8 = 2;

/// What the daemon tells a server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerConfig {
    /// Verify every block against this root hash (hex).
    pub root_hash: Option<String>,
    /// Where the verity superblock is in the verity data (or the image).
    pub hash_offset: Option<u64>,
    /// Whether a verity data descriptor follows the image's.
    pub verity_fd: bool,
    /// Show every file as owned by this uid and gid.
    pub map_ids_to: Option<(u32, u32)>,
    /// `RLIMIT_DATA` of the server.
    pub memory_limit: u64,
}

/// A started server, not yet known to be ready.
#[derive(Debug)]
pub struct Started {
    /// The process.
    pub child: Child,
    status: UnixStream,
}

/// Start a server with `exe` (our own program) for `config`.
pub fn start(
    exe: &Path,
    config: &ServerConfig,
    dev: &File,
    image: &OwnedFd,
    verity: Option<&OwnedFd>,
) -> std::io::Result<Started> {
    let (ours, theirs) = UnixStream::pair()?;
    let child = Command::new(exe)
        .arg(SERVE_ARG)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .env_clear()
        .spawn()?;
    let conn = Connection::new(ours);
    let mut fds = vec![dev.as_fd(), image.as_fd()];
    fds.extend(verity.map(AsFd::as_fd));
    let value = serde_json::to_value(config).map_err(std::io::Error::other)?;
    let sent = conn.send(&value, &fds);
    let started = Started {
        child,
        status: conn.into_socket(),
    };
    match sent {
        Ok(()) => Ok(started),
        Err(e) => {
            started.kill();
            Err(e)
        }
    }
}

impl Started {
    /// Wait up to `timeout` for the server's report: `Ok` once it serves,
    /// else its status code and message.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), (u8, String)> {
        let deadline = std::time::Instant::now() + timeout;
        let mut first = [0u8; 1];
        let read = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
            }
            let _ = self.status.set_read_timeout(Some(left));
            match self.status.read(&mut first) {
                // A read with a timeout is never restarted after a signal
                // (SIGCHLD of another mount's server, say): read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match read {
            Ok(1) if first[0] == 0 => Ok(()),
            Ok(1) => {
                let mut rest = String::new();
                let _ = (&self.status).take(4096).read_to_string(&mut rest);
                Err((first[0], rest))
            }
            Ok(_) => Err((CODE_OTHER, "the server exited before it was ready".into())),
            Err(e) => Err((CODE_OTHER, format!("waiting for the server: {e}"))),
        }
    }

    /// Kill the server and reap it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file shown as owned by one uid and gid: how "ids mapped to the
/// caller" is done, so that the caller (and, inside its user namespace,
/// whatever it is mapped to) owns the tree.
struct MappedIds {
    inner: Arc<dyn Filesystem>,
    uid: u32,
    gid: u32,
}

impl MappedIds {
    fn map(&self, mut attr: Attr) -> Attr {
        attr.uid = self.uid;
        attr.gid = self.gid;
        attr
    }
}

impl Filesystem for MappedIds {
    fn root(&self) -> u64 {
        self.inner.root()
    }
    fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        self.inner.getattr(ino).map(|a| self.map(a))
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>, FsError> {
        Ok(self.inner.lookup(parent, name)?.map(|a| self.map(a)))
    }
    fn readdir(
        &self,
        dir: u64,
        offset: u64,
        f: &mut dyn FnMut(&DirItem<'_>) -> bool,
    ) -> Result<(), FsError> {
        self.inner.readdir(dir, offset, f)
    }
    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        self.inner.read(ino, offset, buf)
    }
    fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        self.inner.readlink(ino)
    }
    fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, FsError> {
        self.inner.listxattr(ino)
    }
    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, FsError> {
        self.inner.getxattr(ino, name)
    }
    fn statfs(&self) -> Statfs {
        self.inner.statfs()
    }
}

type Failure = (u8, String);

fn open_reader(
    config: &ServerConfig,
    image: File,
    verity: Option<File>,
) -> Result<Arc<dyn ReadAt>, Failure> {
    let verity_err = |e: verity::Error| (CODE_VERITY, e.to_string());
    let io_err = |what: &str, e: std::io::Error| (CODE_OTHER, format!("{what}: {e}"));
    // The same page-cache handling as `immount mount`: the image's pages
    // are fetched ahead and dropped once decoded.
    let image = ImageFile::from_file(image, false).map_err(|e| io_err("the image", e))?;
    let Some(root) = &config.root_hash else {
        return Ok(Arc::new(image));
    };
    let root: verity::RootHash = root.parse().map_err(verity_err)?;
    let tree = match verity {
        Some(v) => Some(Arc::new(
            ImageFile::from_file(v, false).map_err(|e| io_err("the hash tree", e))?,
        ) as Arc<dyn ReadAt>),
        None => None,
    };
    let hash_offset = match (config.hash_offset, &tree) {
        (Some(offset), _) => offset,
        // A separate tree file starts with its superblock.
        (None, Some(_)) => 0,
        // The tree appended right after the filesystem, if there is one.
        (None, None) => verity::policy::appended_tree_offset(&image).ok_or_else(|| {
            (
                CODE_VERITY,
                "no verity tree: none appended to the image, and no verity data or hash offset given"
                    .to_owned(),
            )
        })?,
    };
    let reader = verity::policy::open_verified(Arc::new(image), tree, hash_offset, root)
        .map_err(verity_err)?;
    Ok(Arc::new(reader))
}

fn setup(status: &OwnedFd, conn: &mut Connection<&OwnedFd>) -> Result<Session, Failure> {
    let other = |m: String| (CODE_OTHER, m);
    let msg = conn
        .read_message()
        .map_err(|e| other(format!("reading the configuration: {e}")))?;
    let config: ServerConfig =
        serde_json::from_slice(&msg.json).map_err(|e| other(format!("configuration: {e}")))?;
    let want = 2 + usize::from(config.verity_fd);
    if msg.fds.len() != want {
        return Err(other(format!(
            "expected {want} descriptors, got {}",
            msg.fds.len()
        )));
    }
    let mut fds = msg.fds.into_iter();
    let (Some(dev), Some(image)) = (fds.next(), fds.next()) else {
        return Err(other("descriptors missing".into()));
    };
    let verity = fds.next().map(File::from);
    let mut keep = vec![status.as_raw_fd(), dev.as_raw_fd(), image.as_raw_fd()];
    keep.extend(verity.as_ref().map(AsRawFd::as_raw_fd));

    let reader = open_reader(&config, File::from(image), verity)?;
    let bad = |e: erofs::Error| (CODE_BAD_IMAGE, format!("cannot serve the image: {e}"));
    let image = Image::open(reader).map_err(bad)?;
    // Check the root now so a broken image fails the mount, not a request.
    image.inode(image.root_nid()).map_err(bad)?;
    let mut fs: Arc<dyn Filesystem> = Arc::new(ErofsFs::new(Arc::new(image)));
    // The rest default: SessionConfig grows fields (stats) as the FUSE
    // server does, and which exist depends on its version.
    #[allow(clippy::needless_update)]
    let session_config = SessionConfig {
        // With mapped ids, ACL entries would name the image's owners.
        posix_acl: config.map_ids_to.is_none(),
        ..SessionConfig::default()
    };
    if let Some((uid, gid)) = config.map_ids_to {
        fs = Arc::new(MappedIds {
            inner: fs,
            uid,
            gid,
        });
    }
    let mut session = Session::new(File::from(dev), fs, session_config);
    session
        .init()
        .map_err(|e| other(format!("FUSE handshake failed: {e}")))?;
    // The worker threads' /dev/fuse clones are opened now: the sandbox
    // forbids opening files once applied.
    session
        .prepare_workers()
        .map_err(|e| other(format!("cloning /dev/fuse: {e}")))?;
    keep.extend(session.fds());
    let sandbox = sandbox::SandboxConfig {
        memory_limit: Some(config.memory_limit),
        keep_fds: keep,
        ..sandbox::SandboxConfig::default()
    };
    sandbox::apply(&sandbox).map_err(|e| other(format!("sandbox: {e}")))?;
    Ok(session)
}

/// The per-mount server's `main`: returns the exit code.
pub fn serve_main() -> i32 {
    // Standard input is the status socket from the daemon.
    let status = match rustix::io::fcntl_dupfd_cloexec(std::io::stdin(), 3) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("immountd server: no status socket: {e}");
            return i32::from(CODE_OTHER);
        }
    };
    let mut conn = Connection::new(&status);
    let result = setup(&status, &mut conn);
    drop(conn);
    let report = |bytes: &[u8]| {
        let _ = rustix::io::write(&status, bytes);
    };
    match result {
        Ok(session) => {
            report(&[0]);
            match session.serve() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("immountd server: {e}");
                    i32::from(CODE_OTHER)
                }
            }
        }
        Err((code, message)) => {
            let mut msg = vec![code];
            msg.extend_from_slice(message.replace('\n', " ").as_bytes());
            report(&msg);
            eprintln!("immountd server: {message}");
            i32::from(code)
        }
    }
}
