//! [`Filesystem`] for an EROFS image.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use erofs::{Error, FileType, Image, Inode, ReadAt};

use crate::abi::Attr;
use crate::filesystem::{DirItem, Filesystem, FsError, Statfs};
use crate::image_file::{serving_data, ImageFile};

/// EROFS_NAME_LEN: the longest name a directory entry can hold.
const NAME_LEN: u32 = 255;

thread_local! {
    /// The inode this thread read data from last, keyed by filesystem id:
    /// consecutive READs of one file skip re-parsing its inode.
    static LAST_INODE: RefCell<Option<(usize, Inode)>> = const { RefCell::new(None) };
}

static NEXT_FS_ID: AtomicUsize = AtomicUsize::new(1);

/// An EROFS image served read-only.
#[derive(Debug)]
pub struct ErofsFs {
    image: Arc<Image>,
    id: usize,
    blkszbits: u8,
    fds: Vec<RawFd>,
}

impl ErofsFs {
    /// Serve `image`.
    pub fn new(image: Arc<Image>) -> ErofsFs {
        let blkszbits = image.superblock().blkszbits;
        ErofsFs {
            image,
            id: NEXT_FS_ID.fetch_add(1, Ordering::Relaxed),
            blkszbits,
            fds: Vec::new(),
        }
    }

    /// The descriptors the image is read from (for a sandbox to keep open).
    pub fn fds(&self) -> &[RawFd] {
        &self.fds
    }

    /// Open the image at `path` with its extra devices (`low_memory`: see
    /// [`ImageFile::open`]). With `verity` options (or systemd sidecars next
    /// to the image), every block is checked against the dm-verity tree
    /// before the parser sees it.
    pub fn open(
        path: &Path,
        devices: &[&Path],
        low_memory: bool,
        verity: &verity::VerityOptions,
    ) -> Result<ErofsFs, OpenError> {
        let primary = ImageFile::open(path, low_memory)
            .map_err(|e| OpenError::Io(path.display().to_string(), e))?;
        let mut fds = vec![primary.fd()];
        // The policy (root hash, sidecars, signature, where the tree is)
        // is settled by the verity crate; the reads themselves go through
        // our own files, whose descriptors the sandbox keeps. After a READ
        // of data, the verity crate's hash-ahead thread (started on first
        // use, so inside the confined server) reads and verifies the window
        // after it into a bounded store of verified copies, taking hashing
        // off the READ's path; its reads count as data reads here
        // (`serving_data`), fetched ahead and dropped from the page cache
        // like the READ's own. An image whose device table names extra
        // devices is refused under verity (the tree covers this file only).
        let opened = verity::open_image_ahead(
            path,
            Arc::new(primary),
            verity,
            Some(|f| serving_data(f)),
            &mut |p| {
                let tree = ImageFile::open(p, low_memory)?;
                fds.push(tree.fd());
                Ok(Arc::new(tree))
            },
        )
        .map_err(OpenError::Verity)?;
        if opened.verity.is_some() && !devices.is_empty() {
            return Err(OpenError::Verity(verity::Error::Unsupported(format!(
                "{}: extra devices (--device) are not covered by dm-verity: \
                 refused while verity is on",
                path.display()
            ))));
        }
        let primary = opened.reader;
        let mut extra: Vec<Arc<dyn ReadAt>> = Vec::new();
        for d in devices {
            let f = ImageFile::open(d, low_memory)
                .map_err(|e| OpenError::Io(d.display().to_string(), e))?;
            fds.push(f.fd());
            extra.push(Arc::new(f));
        }
        let image = Image::open_with_devices(primary, extra).map_err(OpenError::Image)?;
        // Check the root now so a broken image fails the mount, not the
        // first request.
        image.inode(image.root_nid()).map_err(OpenError::Image)?;
        let mut fs = ErofsFs::new(Arc::new(image));
        fs.fds = fds;
        Ok(fs)
    }

    fn inode(&self, nid: u64) -> Result<Inode, FsError> {
        self.image.inode(nid).map_err(fs_error)
    }

    fn data_inode(&self, nid: u64) -> Result<Inode, FsError> {
        let cached = LAST_INODE.with(|c| match &*c.borrow() {
            Some((id, ino)) if *id == self.id && ino.nid == nid => Some(ino.clone()),
            _ => None,
        });
        if let Some(ino) = cached {
            return Ok(ino);
        }
        let ino = self.inode(nid)?;
        LAST_INODE.with(|c| *c.borrow_mut() = Some((self.id, ino.clone())));
        Ok(ino)
    }

    fn attr(&self, inode: &Inode) -> Attr {
        let rdev = match inode.file_type() {
            FileType::CharDevice | FileType::BlockDevice => {
                new_encode_dev(inode.rdev_major(), inode.rdev_minor())
            }
            _ => 0,
        };
        Attr {
            ino: inode.nid,
            size: inode.size,
            blocks: inode.blocks_512(self.blkszbits),
            mtime: inode.mtime,
            mtime_nsec: inode.mtime_nsec,
            mode: inode.mode,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev,
            blksize: 1u32 << self.blkszbits.min(31),
        }
    }
}

/// The kernel's `new_encode_dev`, which FUSE's `fuse_attr.rdev` carries.
fn new_encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Why an image could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// A file could not be opened or read.
    Io(String, io::Error),
    /// The image is bad (or uses what the reader does not support).
    Image(Error),
    /// dm-verity refused the image (wrong root hash, untrusted signature)
    /// or its options.
    Verity(verity::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Io(path, e) => write!(f, "{path}: {e}"),
            OpenError::Image(e) => write!(f, "{e}"),
            OpenError::Verity(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for OpenError {}

fn fs_error(e: Error) -> FsError {
    match e {
        Error::NotFound(_) => FsError::errno(libc::ENOENT),
        Error::NotADirectory(_) => FsError::errno(libc::ENOTDIR),
        Error::Invalid(_) => FsError::errno(libc::EINVAL),
        other => FsError::fault(other.to_string()),
    }
}

impl Filesystem for ErofsFs {
    fn root(&self) -> u64 {
        self.image.root_nid()
    }

    fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        Ok(self.attr(&self.inode(ino)?))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>, FsError> {
        let dir = self.inode(parent)?;
        if !dir.is_dir() {
            return Err(FsError::errno(libc::ENOTDIR));
        }
        match self.image.lookup(&dir, name).map_err(fs_error)? {
            Some(entry) => Ok(Some(self.getattr(entry.nid)?)),
            None => Ok(None),
        }
    }

    fn readdir(
        &self,
        dir: u64,
        offset: u64,
        f: &mut dyn FnMut(&DirItem<'_>) -> bool,
    ) -> Result<(), FsError> {
        let dir = self.inode(dir)?;
        if !dir.is_dir() {
            return Err(FsError::errno(libc::ENOTDIR));
        }
        self.image
            .read_dir(&dir, offset, &mut |e| {
                f(&DirItem {
                    name: &e.name,
                    ino: e.nid,
                    dtype: u32::from(e.file_type.dtype()),
                    next_offset: e.next_offset,
                })
            })
            .map_err(fs_error)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        let inode = self.data_inode(ino)?;
        if offset >= inode.size {
            return Ok(0);
        }
        serving_data(|| self.image.read(&inode, offset, buf)).map_err(fs_error)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let inode = self.inode(ino)?;
        if inode.file_type() != FileType::Symlink {
            return Err(FsError::errno(libc::EINVAL));
        }
        self.image.read_link(&inode).map_err(fs_error)
    }

    fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, FsError> {
        let inode = self.inode(ino)?;
        let list = self.image.list_xattrs(&inode).map_err(fs_error)?;
        Ok(list.into_iter().map(|x| x.name).collect())
    }

    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, FsError> {
        let inode = self.inode(ino)?;
        self.image.get_xattr(&inode, name).map_err(fs_error)
    }

    fn statfs(&self) -> Statfs {
        // What the kernel's erofs_statfs reports.
        let sb = self.image.superblock();
        let bsize = sb.block_size();
        Statfs {
            blocks: sb.total_blocks(),
            bfree: 0,
            bavail: 0,
            files: u64::MAX,
            ffree: u64::MAX - sb.inos,
            bsize,
            namelen: NAME_LEN,
            frsize: bsize,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dev_encoding_matches_the_kernel() {
        assert_eq!(new_encode_dev(1, 3), 0x103);
        assert_eq!(new_encode_dev(8, 0x12345), 0x12300845);
    }
}
