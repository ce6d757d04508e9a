//! On-disk inodes: the 32-byte compact and the 64-byte extended form.

use crate::error::{Error, Result};
use crate::image::Image;
use crate::le::{le16, le32, le64};

/// Bytes of one inode slot; a nid counts slots.
pub const ISLOT_SIZE: u64 = 32;
/// The nid bit that says the inode lives in the metabox.
pub const NID_METABOX_BIT: u32 = 63;
/// The address that marks a hole.
const NULL_ADDR: u64 = u64::MAX;

const I_VERSION_MASK: u16 = 0x01;
const I_DATALAYOUT_BIT: u16 = 1;
const I_DATALAYOUT_MASK: u16 = 0x07;
const I_NLINK_1_BIT: u16 = 4;
const I_ALL: u16 = (1 << (I_NLINK_1_BIT + 1)) - 1;

const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x001f;
/// Chunk-based inode with 8-byte indexes instead of a 4-byte block map.
pub(crate) const CHUNK_FORMAT_INDEXES: u16 = 0x0020;
/// Chunk indexes carry 48-bit block addresses.
pub(crate) const CHUNK_FORMAT_48BIT: u16 = 0x0040;
const CHUNK_FORMAT_ALL: u16 = (CHUNK_FORMAT_48BIT << 1) - 1;

/// How an inode's data is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// Contiguous blocks, no inline tail.
    FlatPlain,
    /// Compressed, full (legacy) lcluster indexes.
    CompressedFull,
    /// Contiguous blocks with the tail packed after the inode.
    FlatInline,
    /// Compressed, compacted lcluster indexes.
    CompressedCompact,
    /// Fixed-size chunks, each with its own address (and device).
    ChunkBased,
}

impl DataLayout {
    fn from_raw(v: u16) -> Option<Self> {
        Some(match v {
            0 => DataLayout::FlatPlain,
            1 => DataLayout::CompressedFull,
            2 => DataLayout::FlatInline,
            3 => DataLayout::CompressedCompact,
            4 => DataLayout::ChunkBased,
            _ => return None,
        })
    }

    /// True for the two compressed layouts.
    pub fn is_compressed(self) -> bool {
        matches!(
            self,
            DataLayout::CompressedFull | DataLayout::CompressedCompact
        )
    }
}

/// The type of a file, from its mode or a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl FileType {
    /// The type encoded in the `S_IFMT` bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & 0o170000 {
            0o100000 => FileType::Regular,
            0o040000 => FileType::Directory,
            0o120000 => FileType::Symlink,
            0o020000 => FileType::CharDevice,
            0o060000 => FileType::BlockDevice,
            0o010000 => FileType::Fifo,
            0o140000 => FileType::Socket,
            _ => return None,
        })
    }

    /// The type of an on-disk directory entry (EROFS_FT_*).
    pub fn from_dirent(ft: u8) -> Option<Self> {
        Some(match ft {
            1 => FileType::Regular,
            2 => FileType::Directory,
            3 => FileType::CharDevice,
            4 => FileType::BlockDevice,
            5 => FileType::Fifo,
            6 => FileType::Socket,
            7 => FileType::Symlink,
            _ => return None,
        })
    }

    /// The `d_type` value of `readdir(3)` for this type.
    pub fn dtype(self) -> u8 {
        match self {
            FileType::Fifo => 1,
            FileType::CharDevice => 2,
            FileType::Directory => 4,
            FileType::BlockDevice => 6,
            FileType::Regular => 8,
            FileType::Symlink => 10,
            FileType::Socket => 12,
        }
    }

    /// The `S_IFMT` bits of this type.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Directory => 0o040000,
            FileType::Symlink => 0o120000,
            FileType::CharDevice => 0o020000,
            FileType::BlockDevice => 0o060000,
            FileType::Fifo => 0o010000,
            FileType::Socket => 0o140000,
        }
    }
}

/// One parsed inode: its attributes as the kernel shows them, and where its
/// data and xattrs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// The node number: the inode's stable identity (hard links share it).
    pub nid: u64,
    /// `st_mode`, type bits included.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Device number (`new_decode_dev` of the on-disk value), for devices.
    pub rdev: u32,
    /// The 32-bit inode number stored for `stat` compatibility.
    pub ino32: u32,
    /// The data layout.
    pub layout: DataLayout,
    /// True for a 64-byte extended inode.
    pub extended: bool,
    pub(crate) file_type: FileType,
    /// Byte position of the inode (in the primary device or the metabox).
    pub(crate) iloc: u64,
    pub(crate) in_mbox: bool,
    pub(crate) xattr_isize: u64,
    /// Start block of flat data, or `u64::MAX` for a sparse flat file.
    pub(crate) startblk: u64,
    /// Chunk format of chunk-based inodes.
    pub(crate) chunk_format: u16,
    /// log2 of the chunk size of chunk-based inodes.
    pub(crate) chunkbits: u8,
    /// Blocks of compressed data (compressed layouts).
    pub(crate) compressed_blocks: u64,
    /// A directory whose "." entry is not stored.
    pub dot_omitted: bool,
}

/// The kernel's `new_decode_dev`, which gives a 32-bit `dev_t` laid out as
/// 12 bits of major and 20 of minor.
fn new_decode_dev(dev: u32) -> (u32, u32) {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    (major, minor)
}

impl Inode {
    /// The file type.
    pub fn file_type(&self) -> FileType {
        self.file_type
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type == FileType::Directory
    }

    /// Major device number.
    pub fn rdev_major(&self) -> u32 {
        new_decode_dev(self.rdev).0
    }

    /// Minor device number.
    pub fn rdev_minor(&self) -> u32 {
        new_decode_dev(self.rdev).1
    }

    /// The permission bits of the mode (no type bits).
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }

    /// Modification time in nanoseconds since the epoch, as `st_mtime_ns`.
    pub fn mtime_ns(&self) -> i128 {
        i128::from(self.mtime) * 1_000_000_000 + i128::from(self.mtime_nsec)
    }

    /// Number of 512-byte units the inode occupies, as `st_blocks` shows.
    pub fn blocks_512(&self, blkszbits: u8) -> u64 {
        if self.layout.is_compressed() {
            self.compressed_blocks
                .saturating_mul(1u64 << (blkszbits - 9))
        } else {
            let bs = 1u64 << blkszbits;
            self.size.div_ceil(bs).saturating_mul(bs) >> 9
        }
    }

    /// Where the on-disk inode is: its byte offset in the primary device, or
    /// in the metabox's data when the first value is true.
    pub fn location(&self) -> (bool, u64) {
        (self.in_mbox, self.iloc)
    }

    /// Bytes of the inline xattr body after the inode.
    pub fn xattr_body_size(&self) -> u64 {
        self.xattr_isize
    }

    /// Size of the on-disk inode (32 or 64 bytes).
    pub(crate) fn inode_isize(&self) -> u64 {
        if self.extended {
            64
        } else {
            32
        }
    }

    /// Where the xattr body and then the inline data or indexes start.
    pub(crate) fn after_inode(&self) -> Result<u64> {
        self.iloc
            .checked_add(self.inode_isize())
            .ok_or_else(|| Error::corrupt_nid(self.nid, "inode position overflows"))
    }

    /// Where the inline data, chunk indexes or compression header start.
    pub(crate) fn after_xattrs(&self) -> Result<u64> {
        self.after_inode()?
            .checked_add(self.xattr_isize)
            .ok_or_else(|| Error::corrupt_nid(self.nid, "xattr body position overflows"))
    }
}

impl Image {
    /// Parse the inode `nid`.
    pub fn inode(&self, nid: u64) -> Result<Inode> {
        self.read_inode(nid).map_err(|e| e.with_nid(nid))
    }

    fn read_inode(&self, nid: u64) -> Result<Inode> {
        let sb = self.superblock();
        let in_mbox = nid >> NID_METABOX_BIT != 0;
        let slot = nid & ((1u64 << NID_METABOX_BIT) - 1);
        let base = if in_mbox {
            0
        } else {
            u64::from(sb.meta_blkaddr) << sb.blkszbits
        };
        let iloc = slot
            .checked_mul(ISLOT_SIZE)
            .and_then(|o| o.checked_add(base))
            .ok_or_else(|| Error::corrupt_nid(nid, "nid is out of range"))?;

        let mut raw = [0u8; 64];
        // A compact inode may be the last thing in the metadata area.
        self.meta_read(in_mbox, iloc, &mut raw[..32])?;
        let ifmt = le16(&raw, 0);
        if ifmt & !I_ALL != 0 {
            return Err(Error::corrupt_at(
                Some(nid),
                iloc,
                format!("unsupported inode format bits 0x{ifmt:x}"),
            ));
        }
        let layout = DataLayout::from_raw((ifmt >> I_DATALAYOUT_BIT) & I_DATALAYOUT_MASK)
            .ok_or_else(|| {
                Error::corrupt_at(
                    Some(nid),
                    iloc,
                    format!("unknown data layout {}", (ifmt >> I_DATALAYOUT_BIT) & 7),
                )
            })?;
        let extended = ifmt & I_VERSION_MASK != 0;
        let xattr_icount = le16(&raw, 2);
        let xattr_isize = if xattr_icount == 0 {
            0
        } else {
            12 + 4 * (u64::from(xattr_icount) - 1)
        };
        let mode = u32::from(le16(&raw, 4));
        let file_type = FileType::from_mode(mode).ok_or_else(|| {
            Error::corrupt_at(Some(nid), iloc, format!("bogus file mode 0o{mode:o}"))
        })?;

        let (uid, gid, nlink, size, mtime, mtime_nsec, ino32, i_u, i_nb, addr48);
        if extended {
            self.meta_read(in_mbox, iloc + 32, &mut raw[32..64])?;
            i_nb = le16(&raw, 6);
            size = le64(&raw, 8);
            i_u = le32(&raw, 16);
            ino32 = le32(&raw, 20);
            uid = le32(&raw, 24);
            gid = le32(&raw, 28);
            mtime = i64::from_le_bytes(le64(&raw, 32).to_le_bytes());
            mtime_nsec = le32(&raw, 40);
            nlink = le32(&raw, 44);
            addr48 = true;
            if size > i64::MAX as u64 {
                return Err(Error::corrupt_at(
                    Some(nid),
                    iloc,
                    format!("negative size {size}"),
                ));
            }
        } else {
            let nb = le16(&raw, 6);
            size = u64::from(le32(&raw, 8));
            let sb_epoch = sb.epoch;
            mtime = sb_epoch.saturating_add(i64::from(le32(&raw, 12)));
            mtime_nsec = sb.fixed_nsec;
            i_u = le32(&raw, 16);
            ino32 = le32(&raw, 20);
            uid = u32::from(le16(&raw, 24));
            gid = u32::from(le16(&raw, 26));
            if file_type != FileType::Directory && (ifmt >> I_NLINK_1_BIT) & 1 != 0 {
                nlink = 1;
                i_nb = nb;
                addr48 = true;
            } else {
                nlink = u32::from(nb);
                i_nb = 0;
                addr48 = false;
            }
        }

        let mut inode = Inode {
            nid,
            mode,
            uid,
            gid,
            nlink,
            size,
            mtime,
            mtime_nsec,
            rdev: 0,
            ino32,
            layout,
            extended,
            file_type,
            iloc,
            in_mbox,
            xattr_isize,
            startblk: NULL_ADDR,
            chunk_format: 0,
            chunkbits: 0,
            compressed_blocks: 0,
            dot_omitted: false,
        };

        match file_type {
            FileType::Directory | FileType::Regular | FileType::Symlink => {
                if file_type == FileType::Directory {
                    inode.dot_omitted = (ifmt >> I_NLINK_1_BIT) & 1 != 0;
                }
                let blk = u64::from(i_u) | (u64::from(i_nb) << 32);
                let mask = if addr48 {
                    (1u64 << 48) - 1
                } else {
                    (1u64 << 32) - 1
                };
                inode.startblk = if layout == DataLayout::FlatPlain && (blk ^ NULL_ADDR) & mask == 0
                {
                    NULL_ADDR
                } else {
                    blk
                };
                inode.compressed_blocks = blk;
            }
            FileType::CharDevice | FileType::BlockDevice => {
                inode.rdev = i_u;
            }
            FileType::Fifo | FileType::Socket => {}
        }

        if layout == DataLayout::ChunkBased {
            let format = (i_u & 0xffff) as u16;
            if format & !CHUNK_FORMAT_ALL != 0 {
                return Err(Error::corrupt_at(
                    Some(nid),
                    iloc,
                    format!("unsupported chunk format 0x{format:x}"),
                ));
            }
            let bits = u16::from(sb.blkszbits) + (format & CHUNK_FORMAT_BLKBITS_MASK);
            if bits > 48 + 16 - 1 {
                return Err(Error::corrupt_at(
                    Some(nid),
                    iloc,
                    format!("chunk size 2^{bits} is too large"),
                ));
            }
            inode.chunk_format = format;
            inode.chunkbits = bits as u8;
        }
        if layout.is_compressed()
            && !matches!(
                file_type,
                FileType::Regular | FileType::Directory | FileType::Symlink
            )
        {
            return Err(Error::corrupt_at(
                Some(nid),
                iloc,
                "a device, fifo or socket with a compressed layout",
            ));
        }
        Ok(inode)
    }
}
