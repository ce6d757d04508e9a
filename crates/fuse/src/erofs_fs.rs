//! [`Filesystem`] for an EROFS image, and the image file source that keeps
//! the page cache from holding the image beside the files decoded from it.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use erofs::{Error, FileType, Image, Inode, ReadAt};

use crate::abi::Attr;
use crate::filesystem::{DirItem, Filesystem, FsError, Statfs};

/// EROFS_NAME_LEN: the longest name a directory entry can hold.
const NAME_LEN: u32 = 255;

thread_local! {
    /// Set while this thread serves a READ: the image bytes read then are
    /// file data about to live in the FUSE file's page cache, so their
    /// copy in the image file's page cache is dropped right away.
    static SERVING_DATA: Cell<bool> = const { Cell::new(false) };
    /// The inode this thread read data from last, keyed by filesystem id:
    /// consecutive READs of one file skip re-parsing its inode.
    static LAST_INODE: RefCell<Option<(usize, Inode)>> = const { RefCell::new(None) };
}

/// An image (or extra device) file read with `pread`.
///
/// While a READ is served, each range read is then dropped from the page
/// cache with `posix_fadvise(DONTNEED)`: the decoded data is cached by the
/// kernel in the FUSE file's pages, and keeping the image pages too would
/// double the memory used (the kernel's own loop mount does exactly that).
/// Only pages wholly inside the range go, so metadata that shares a page
/// with the data stays cached. Metadata reads (lookups, attributes,
/// listings) keep their pages.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    size: u64,
}

impl ImageFile {
    /// Open `path` read-only. With `low_memory`, the kernel does no
    /// readahead on it: readahead pulls file data next to the metadata we
    /// read into the page cache where nothing drops it (measured: about
    /// 70% of an uncompressed image stays cached after reading every file),
    /// but without it cold reads of many small files take about twice as
    /// long. Speed is the default.
    pub fn open(path: &Path, low_memory: bool) -> io::Result<ImageFile> {
        let file = File::open(path)?;
        let size = ReadAt::size(&file)?;
        if low_memory {
            let _ = immount_sys::fuse::fadvise_random(file.as_fd());
        }
        Ok(ImageFile { file, size })
    }
}

impl ReadAt for ImageFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)?;
        if SERVING_DATA.with(Cell::get) {
            // Advice only: a failure changes nothing but memory use.
            let _ =
                immount_sys::fuse::fadvise_dontneed(self.file.as_fd(), offset, buf.len() as u64);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

static NEXT_FS_ID: AtomicUsize = AtomicUsize::new(1);

/// An EROFS image served read-only.
#[derive(Debug)]
pub struct ErofsFs {
    image: Arc<Image>,
    id: usize,
    blkszbits: u8,
}

impl ErofsFs {
    /// Serve `image`.
    pub fn new(image: Arc<Image>) -> ErofsFs {
        let blkszbits = image.superblock().blkszbits;
        ErofsFs {
            image,
            id: NEXT_FS_ID.fetch_add(1, Ordering::Relaxed),
            blkszbits,
        }
    }

    /// Open the image at `path` with its extra devices (`low_memory`: see
    /// [`ImageFile::open`]).
    pub fn open(path: &Path, devices: &[&Path], low_memory: bool) -> Result<ErofsFs, OpenError> {
        let primary = ImageFile::open(path, low_memory)
            .map_err(|e| OpenError::Io(path.display().to_string(), e))?;
        let mut extra: Vec<Arc<dyn ReadAt>> = Vec::new();
        for d in devices {
            let f = ImageFile::open(d, low_memory)
                .map_err(|e| OpenError::Io(d.display().to_string(), e))?;
            extra.push(Arc::new(f));
        }
        let image = Image::open_with_devices(Arc::new(primary), extra).map_err(OpenError::Image)?;
        // Check the root now so a broken image fails the mount, not the
        // first request.
        image.inode(image.root_nid()).map_err(OpenError::Image)?;
        Ok(ErofsFs::new(Arc::new(image)))
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
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Io(path, e) => write!(f, "{path}: {e}"),
            OpenError::Image(e) => write!(f, "{e}"),
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
        SERVING_DATA.with(|s| s.set(true));
        let r = self.image.read(&inode, offset, buf);
        SERVING_DATA.with(|s| s.set(false));
        r.map_err(fs_error)
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
