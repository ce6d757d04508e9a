//! On-disk encoders: inodes, directory blocks, xattr entries, the superblock.
//!
//! The constants repeat the ones of `crates/erofs` (which keeps most of them
//! private to its parser); they are the EROFS on-disk format and never change.

/// Byte offset of the superblock.
pub const SUPER_OFFSET: usize = 1024;
/// Size of the base superblock (no extension slots).
pub const SB_SIZE: usize = 128;
/// The magic number.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Bytes of an inode slot; a nid counts slots.
pub const ISLOT: u64 = 32;

/// Compatible feature: superblock checksum.
pub const COMPAT_SB_CHKSUM: u32 = 0x1;
/// Incompatible features.
pub const INCOMPAT_ZERO_PADDING: u32 = 0x1;
/// Per-algorithm configuration records and big pclusters.
pub const INCOMPAT_COMPR_CFGS: u32 = 0x2;
/// Chunk-based files.
pub const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// Tail pclusters inline.
pub const INCOMPAT_ZTAILPACKING: u32 = 0x10;
/// Fragments (and dedupe).
pub const INCOMPAT_FRAGMENTS: u32 = 0x20;

/// Data layouts.
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
/// Compressed with compact indexes.
pub const LAYOUT_COMPRESSED_COMPACT: u16 = 3;
/// Flat with an inline tail.
pub const LAYOUT_FLAT_INLINE: u16 = 2;
/// Chunk-based.
pub const LAYOUT_CHUNK_BASED: u16 = 4;

/// The 32-bit "no block" address of a hole in a chunk block map.
pub const NULL_ADDR32: u32 = u32::MAX;

/// Directory entry size.
pub const DIRENT_SIZE: usize = 12;

/// The kernel's `new_encode_dev`.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// EROFS_FT_* of a mode's type bits.
pub fn dirent_type(type_bits: u32) -> u8 {
    match type_bits {
        0o100000 => 1,
        0o040000 => 2,
        0o020000 => 3,
        0o060000 => 4,
        0o010000 => 5,
        0o140000 => 6,
        0o120000 => 7,
        _ => 0,
    }
}

/// The fields of one on-disk inode.
#[derive(Debug, Clone, Default)]
pub struct InodeFields {
    /// 64-byte form.
    pub extended: bool,
    /// Data layout.
    pub layout: u16,
    /// i_xattr_icount.
    pub xattr_icount: u16,
    /// Full mode.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Size.
    pub size: u64,
    /// i_u: start block, rdev, chunk format or compressed block count.
    pub i_u: u32,
    /// i_ino for 32-bit stat.
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Seconds (extended only; compact inodes take the superblock epoch).
    pub mtime: i64,
    /// Nanoseconds (extended only).
    pub mtime_nsec: u32,
}

impl InodeFields {
    /// The on-disk bytes (32 or 64).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        let format = u16::from(self.extended) | (self.layout << 1);
        b.extend_from_slice(&format.to_le_bytes());
        b.extend_from_slice(&self.xattr_icount.to_le_bytes());
        // i_mode is 16 bits on disk: type and permission bits fit.
        b.extend_from_slice(&(self.mode as u16).to_le_bytes());
        if self.extended {
            b.extend_from_slice(&0u16.to_le_bytes()); // i_nb: no 48-bit address
            b.extend_from_slice(&self.size.to_le_bytes());
            b.extend_from_slice(&self.i_u.to_le_bytes());
            b.extend_from_slice(&self.ino.to_le_bytes());
            b.extend_from_slice(&self.uid.to_le_bytes());
            b.extend_from_slice(&self.gid.to_le_bytes());
            b.extend_from_slice(&self.mtime.to_le_bytes());
            b.extend_from_slice(&self.mtime_nsec.to_le_bytes());
            b.extend_from_slice(&self.nlink.to_le_bytes());
            b.extend_from_slice(&[0u8; 16]);
        } else {
            // The caller checked that these fit their compact widths.
            b.extend_from_slice(&(self.nlink as u16).to_le_bytes());
            b.extend_from_slice(&(self.size as u32).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes()); // mtime = epoch + 0
            b.extend_from_slice(&self.i_u.to_le_bytes());
            b.extend_from_slice(&self.ino.to_le_bytes());
            b.extend_from_slice(&(self.uid as u16).to_le_bytes());
            b.extend_from_slice(&(self.gid as u16).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        b
    }
}

/// Split a full xattr name into a short prefix index and its suffix, or
/// `None` when EROFS has no prefix for it.
pub fn xattr_split(name: &[u8]) -> Option<(u8, &[u8])> {
    const PREFIXES: [(u8, &[u8]); 5] = [
        (2, b"system.posix_acl_access"),
        (3, b"system.posix_acl_default"),
        (1, b"user."),
        (4, b"trusted."),
        (6, b"security."),
    ];
    for (index, prefix) in PREFIXES {
        if let Some(rest) = name.strip_prefix(prefix) {
            if (index == 2 || index == 3) && !rest.is_empty() {
                continue;
            }
            if (index == 1 || index == 4 || index == 6) && rest.is_empty() {
                return None;
            }
            return Some((index, rest));
        }
    }
    None
}

/// One xattr entry, padded to 4 bytes. `index`/`suffix` from
/// [`xattr_split`] (or a long-prefix index).
pub fn xattr_entry(index: u8, suffix: &[u8], value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + suffix.len() + value.len() + 3);
    b.push(suffix.len() as u8);
    b.push(index);
    b.extend_from_slice(&(value.len() as u16).to_le_bytes());
    b.extend_from_slice(suffix);
    b.extend_from_slice(value);
    b.resize(b.len().div_ceil(4) * 4, 0);
    b
}

/// Sizes of the blocks a directory with these sorted names needs: a list of
/// (entry count, used bytes) per block.
pub fn dir_block_plan(names: &[&[u8]], block_size: usize) -> Vec<(usize, usize)> {
    let mut blocks = Vec::new();
    let (mut count, mut used) = (0usize, 0usize);
    for name in names {
        let need = DIRENT_SIZE + name.len();
        if used + need > block_size {
            blocks.push((count, used));
            count = 0;
            used = 0;
        }
        count += 1;
        used += need;
    }
    if count > 0 {
        blocks.push((count, used));
    }
    blocks
}

/// Encode one directory block: dirents then names, unpadded.
pub fn dir_block(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let mut b = Vec::new();
    let mut nameoff = entries.len() * DIRENT_SIZE;
    for (name, nid, ft) in entries {
        b.extend_from_slice(&nid.to_le_bytes());
        b.extend_from_slice(&(nameoff as u16).to_le_bytes());
        b.push(*ft);
        b.push(0);
        nameoff += name.len();
    }
    for (name, _, _) in entries {
        b.extend_from_slice(name);
    }
    b
}

/// The crc32c the kernel computes (`crc32c(~0, ..)`, no final inversion).
pub fn kernel_crc32c(data: &[u8]) -> u32 {
    !crc32c::crc32c(data)
}
