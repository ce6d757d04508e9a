//! What the server needs from a read-only filesystem, independent of EROFS.
//!
//! The protocol code ([`crate::server`]) talks to this trait only, so it can
//! be tested against a small in-memory tree and serves an EROFS image
//! through [`crate::erofs_fs::ErofsFs`]. Inode numbers here are the
//! filesystem's own (for EROFS, nids); the server maps them to FUSE node ids.

use crate::abi::Attr;

/// An error answered to the kernel as a negative errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsError {
    /// The errno (positive, e.g. `libc::EIO`).
    pub errno: i32,
    /// For image faults: what is wrong, with nid and offset, logged once
    /// per inode by the server. `None` for ordinary answers like ENOENT.
    pub detail: Option<String>,
}

impl FsError {
    /// An ordinary errno answer, not worth logging.
    pub fn errno(errno: i32) -> Self {
        FsError {
            errno,
            detail: None,
        }
    }

    /// An image fault: answered with EIO and logged once.
    pub fn fault(detail: impl Into<String>) -> Self {
        FsError {
            errno: libc::EIO,
            detail: Some(detail.into()),
        }
    }
}

/// One directory entry as listed by [`Filesystem::readdir`].
#[derive(Debug, Clone, Copy)]
pub struct DirItem<'a> {
    /// Name bytes, no NUL.
    pub name: &'a [u8],
    /// The entry's inode number.
    pub ino: u64,
    /// The `DT_*` type (the `S_IFMT` bits of the mode shifted right by 12).
    pub dtype: u32,
    /// Offset to pass back to continue after this entry.
    pub next_offset: u64,
}

/// Figures for `statfs(2)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statfs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks (0: the image is full by definition).
    pub bfree: u64,
    /// Blocks available to unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// A read-only filesystem the server can serve. Implementations are shared
/// between worker threads.
pub trait Filesystem: Send + Sync {
    /// The inode number of the root directory.
    fn root(&self) -> u64;
    /// The attributes of inode `ino`.
    fn getattr(&self, ino: u64) -> Result<Attr, FsError>;
    /// Find `name` in directory `parent`: its attributes, or `None`.
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>, FsError>;
    /// List directory `dir` from `offset` (0 = start), calling `f` for each
    /// entry until it returns false.
    fn readdir(
        &self,
        dir: u64,
        offset: u64,
        f: &mut dyn FnMut(&DirItem<'_>) -> bool,
    ) -> Result<(), FsError>;
    /// Read file data at `offset`; short only at the end of the file.
    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, FsError>;
    /// The target of symlink `ino`.
    fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError>;
    /// The full names of the extended attributes of `ino`.
    fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, FsError>;
    /// The value of one extended attribute, or `None` when absent.
    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, FsError>;
    /// Figures for `statfs(2)`.
    fn statfs(&self) -> Statfs;
}
