//! The superblock: 128 bytes (plus extension slots) at offset 1024.

use crate::error::{Error, Result};
use crate::le::{le16, le32, le64};
use crate::read::ReadAt;

/// Byte offset of the superblock in the primary device.
pub const SUPER_OFFSET: u64 = 1024;
/// The magic number of an EROFS superblock.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// The size of the base superblock; extension slots of 16 bytes follow.
const SB_BASE_SIZE: usize = 128;
const SB_EXTSLOT_SIZE: usize = 16;
/// The size of one device table slot.
const DEVT_SLOT_SIZE: u64 = 128;
/// The largest number of extra devices we accept (the device id mask must
/// stay meaningful; real images have a handful).
const MAX_EXTRA_DEVICES: u16 = 4096;

/// Compatible feature bits: a reader may ignore them.
pub mod compat {
    /// The superblock carries a crc32c checksum.
    pub const SB_CHKSUM: u32 = 0x0000_0001;
    /// Inodes carry their own mtime.
    pub const MTIME: u32 = 0x0000_0002;
    /// Inline xattr headers carry a name bloom filter.
    pub const XATTR_FILTER: u32 = 0x0000_0004;
    /// Shared xattrs live in the metabox inode.
    pub const SHARED_EA_IN_METABOX: u32 = 0x0000_0008;
    /// Long xattr name prefixes are stored plainly in the primary device.
    pub const PLAIN_XATTR_PFX: u32 = 0x0000_0010;
    /// Xattrs for inode sharing (a prefix id in the superblock).
    pub const ISHARE_XATTRS: u32 = 0x0000_0020;
}

/// Incompatible feature bits: a reader must understand every one set.
pub mod incompat {
    /// LZ4 (and LZMA) pclusters are padded with zeros at the front.
    pub const ZERO_PADDING: u32 = 0x0000_0001;
    /// Per-algorithm configuration records follow the superblock.
    pub const COMPR_CFGS: u32 = 0x0000_0002;
    /// Physical clusters may span several blocks.
    pub const BIG_PCLUSTER: u32 = 0x0000_0002;
    /// Chunk-based files.
    pub const CHUNKED_FILE: u32 = 0x0000_0004;
    /// A table of extra devices.
    pub const DEVICE_TABLE: u32 = 0x0000_0008;
    /// A second algorithm head per inode.
    pub const COMPR_HEAD2: u32 = 0x0000_0008;
    /// Tail pclusters inline after the inode.
    pub const ZTAILPACKING: u32 = 0x0000_0010;
    /// Fragments in the packed inode.
    pub const FRAGMENTS: u32 = 0x0000_0020;
    /// Extents that reference part of another pcluster.
    pub const DEDUPE: u32 = 0x0000_0020;
    /// Long xattr name prefixes.
    pub const XATTR_PREFIXES: u32 = 0x0000_0040;
    /// 48-bit block addresses and 64-bit root nid.
    pub const BIT48: u32 = 0x0000_0080;
    /// Metadata (inodes, directories) stored in a metabox inode.
    pub const METABOX: u32 = 0x0000_0100;
    /// Every incompatible feature this reader implements.
    pub const ALL: u32 = (METABOX << 1) - 1;
}

/// Names of the incompatible feature bits, for messages.
pub fn incompat_names(bits: u32) -> Vec<String> {
    let names: [(u32, &str); 9] = [
        (incompat::ZERO_PADDING, "zero_padding"),
        (incompat::COMPR_CFGS, "compr_cfgs/big_pcluster"),
        (incompat::CHUNKED_FILE, "chunked_file"),
        (incompat::DEVICE_TABLE, "device_table/compr_head2"),
        (incompat::ZTAILPACKING, "ztailpacking"),
        (incompat::FRAGMENTS, "fragments/dedupe"),
        (incompat::XATTR_PREFIXES, "xattr_prefixes"),
        (incompat::BIT48, "48bit"),
        (incompat::METABOX, "metabox"),
    ];
    let mut out: Vec<String> = names
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| (*n).to_string())
        .collect();
    let unknown = bits & !incompat::ALL;
    for bit in 0..32 {
        if unknown & (1u32 << bit) != 0 {
            out.push(format!("unknown-0x{:x}", 1u32 << bit));
        }
    }
    out
}

/// Names of the compatible feature bits, for messages.
pub fn compat_names(bits: u32) -> Vec<String> {
    let names: [(u32, &str); 6] = [
        (compat::SB_CHKSUM, "sb_csum"),
        (compat::MTIME, "mtime"),
        (compat::XATTR_FILTER, "xattr_filter"),
        (compat::SHARED_EA_IN_METABOX, "shared_ea_in_metabox"),
        (compat::PLAIN_XATTR_PFX, "plain_xattr_pfx"),
        (compat::ISHARE_XATTRS, "ishare_xattrs"),
    ];
    let mut out: Vec<String> = names
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| (*n).to_string())
        .collect();
    let known = names.iter().fold(0, |acc, (b, _)| acc | b);
    for bit in 0..32 {
        if bits & !known & (1u32 << bit) != 0 {
            out.push(format!("unknown-0x{:x}", 1u32 << bit));
        }
    }
    out
}

/// One entry of the device table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Free-form tag (mkfs.erofs stores a digest or a path).
    pub tag: [u8; 64],
    /// Blocks in this device.
    pub blocks: u64,
    /// Where the device starts in the unified block address space (0 when
    /// it is only reachable by device id).
    pub uniaddr: u64,
}

/// The decoded superblock, validated.
#[derive(Debug, Clone)]
pub struct Superblock {
    /// Compatible feature bits.
    pub feature_compat: u32,
    /// Incompatible feature bits (all understood).
    pub feature_incompat: u32,
    /// log2 of the block size, 9 to 16.
    pub blkszbits: u8,
    /// Size of the on-disk superblock with extension slots.
    pub sb_size: usize,
    /// The stored checksum.
    pub checksum: u32,
    /// The root directory's nid.
    pub root_nid: u64,
    /// Number of inodes.
    pub inos: u64,
    /// Base seconds for compact inodes.
    pub epoch: i64,
    /// Nanoseconds for compact inodes.
    pub fixed_nsec: u32,
    /// Seconds since epoch of the build.
    pub build_time: u32,
    /// Blocks of the primary device.
    pub blocks: u64,
    /// Start block of the inode area.
    pub meta_blkaddr: u32,
    /// Start block of the shared xattr area.
    pub xattr_blkaddr: u32,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Volume name (NUL padded).
    pub volume_name: [u8; 16],
    /// Available compression algorithms (COMPR_CFGS) or the LZ4 distance.
    pub u1: u16,
    /// Extra devices in the device table.
    pub devices: Vec<DeviceSlot>,
    /// Long xattr prefix count.
    pub xattr_prefix_count: u8,
    /// Long xattr prefix start (in 4-byte units).
    pub xattr_prefix_start: u32,
    /// Nid of the packed inode (fragments), 0 when absent.
    pub packed_nid: u64,
    /// Nid of the metabox inode, when METABOX is set.
    pub metabox_nid: Option<u64>,
    /// Prefix id used by inode-sharing xattrs.
    pub ishare_xattr_prefix_id: u8,
    /// Per-algorithm configuration records (algorithm id, raw payload), in
    /// on-disk order, when COMPR_CFGS is set.
    pub compr_cfgs: Vec<(u8, Vec<u8>)>,
}

/// The crc32c of the Linux kernel (`crc32c(~0, ...)` with no final
/// inversion), which is the bitwise complement of the standard CRC-32C.
fn kernel_crc32c(data: &[u8]) -> u32 {
    !crc32c::crc32c(data)
}

impl Superblock {
    /// The block size in bytes.
    pub fn block_size(&self) -> u32 {
        1u32 << self.blkszbits
    }

    /// True when every bit of `bits` is set in the incompatible features.
    pub fn has_incompat(&self, bits: u32) -> bool {
        self.feature_incompat & bits == bits
    }

    /// True when every bit of `bits` is set in the compatible features.
    pub fn has_compat(&self, bits: u32) -> bool {
        self.feature_compat & bits == bits
    }

    /// Blocks over all devices, as statfs reports them.
    pub fn total_blocks(&self) -> u64 {
        self.devices
            .iter()
            .fold(self.blocks, |acc, d| acc.saturating_add(d.blocks))
    }

    /// The mask that device ids in chunk indexes are reduced by.
    pub fn device_id_mask(&self) -> u16 {
        let n = u32::try_from(self.devices.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        // Devices are capped at MAX_EXTRA_DEVICES, so this fits in u16.
        u16::try_from(n.next_power_of_two().saturating_sub(1)).unwrap_or(u16::MAX)
    }

    /// Read and validate the superblock of `dev`.
    pub fn read(dev: &dyn ReadAt) -> Result<Superblock> {
        let dev_size = dev.size().map_err(|e| Error::Io {
            offset: 0,
            source: e,
        })?;
        if dev_size < SUPER_OFFSET + SB_BASE_SIZE as u64 {
            return Err(Error::corrupt_at(
                None,
                0,
                format!("image of {dev_size} bytes is too small to hold a superblock"),
            ));
        }
        let mut base = [0u8; SB_BASE_SIZE];
        dev.read_exact_at(&mut base, SUPER_OFFSET)
            .map_err(|e| Error::from_io(SUPER_OFFSET, e))?;
        let magic = le32(&base, 0);
        if magic != MAGIC {
            return Err(Error::corrupt_at(
                None,
                SUPER_OFFSET,
                format!("not an EROFS image (magic 0x{magic:08x}, expected 0x{MAGIC:08x})"),
            ));
        }
        let feature_compat = le32(&base, 8);
        let blkszbits = base[12];
        if !(9..=16).contains(&blkszbits) {
            return Err(Error::Incompatible(format!(
                "block size 2^{blkszbits} is outside the 512 B to 64 KiB the format allows"
            )));
        }
        let feature_incompat = le32(&base, 80);
        if feature_incompat & !incompat::ALL != 0 {
            return Err(Error::Incompatible(format!(
                "unknown incompatible features: {}",
                incompat_names(feature_incompat & !incompat::ALL).join(", ")
            )));
        }
        let sb_extslots = usize::from(base[13]);
        let sb_size = SB_BASE_SIZE + sb_extslots * SB_EXTSLOT_SIZE;
        let block_size = 1usize << blkszbits;
        // Like the kernel, the superblock and its extension slots must fit in
        // the first 4 KiB of the image.
        if sb_size > 4096 - SUPER_OFFSET as usize {
            return Err(Error::corrupt_at(
                None,
                SUPER_OFFSET,
                format!("superblock with {sb_extslots} extension slots does not fit in 4 KiB"),
            ));
        }
        let mut raw = vec![0u8; sb_size.max(144)];
        let readable = usize::try_from(dev_size.saturating_sub(SUPER_OFFSET))
            .unwrap_or(usize::MAX)
            .min(raw.len());
        dev.read_exact_at(&mut raw[..readable], SUPER_OFFSET)
            .map_err(|e| Error::from_io(SUPER_OFFSET, e))?;
        if readable < sb_size {
            return Err(Error::corrupt_at(
                None,
                SUPER_OFFSET,
                "superblock is truncated",
            ));
        }
        // Fields past sb_size read as zero, as on disk they do not exist.
        raw[sb_size..].fill(0);

        let checksum = le32(&raw, 4);
        if feature_compat & compat::SB_CHKSUM != 0 {
            let len = if block_size > SUPER_OFFSET as usize {
                block_size - SUPER_OFFSET as usize
            } else {
                block_size
            };
            let mut blk = vec![0u8; len];
            dev.read_exact_at(&mut blk, SUPER_OFFSET).map_err(|e| {
                Error::corrupt_at(None, SUPER_OFFSET, format!("superblock block: {e}"))
            })?;
            blk[4..8].fill(0);
            let computed = kernel_crc32c(&blk);
            if computed != checksum {
                return Err(Error::corrupt_at(
                    None,
                    SUPER_OFFSET + 4,
                    format!(
                        "superblock checksum mismatch (stored 0x{checksum:08x}, computed 0x{computed:08x})"
                    ),
                ));
            }
        }

        let has48 = feature_incompat & incompat::BIT48 != 0;
        let rootnid_2b = le16(&raw, 14);
        let rootnid_8b = le64(&raw, 112);
        let mut blocks = u64::from(le32(&raw, 36));
        let root_nid = if has48 && rootnid_8b != 0 {
            blocks |= u64::from(rootnid_2b) << 32;
            rootnid_8b
        } else {
            u64::from(rootnid_2b)
        };
        let packed_nid = le64(&raw, 96);
        if packed_nid >> 63 != 0 {
            return Err(Error::corrupt_at(
                None,
                SUPER_OFFSET + 96,
                "packed nid is in the metabox",
            ));
        }
        let metabox_nid = if feature_incompat & incompat::METABOX != 0 {
            if sb_size <= 128 {
                return Err(Error::corrupt_at(
                    None,
                    SUPER_OFFSET,
                    "metabox feature set but the superblock has no room for its nid",
                ));
            }
            let nid = le64(&raw, 128);
            if nid >> 63 != 0 {
                return Err(Error::corrupt_at(
                    None,
                    SUPER_OFFSET + 128,
                    "metabox nid points into the metabox itself",
                ));
            }
            Some(nid)
        } else {
            None
        };
        let xattr_prefix_count = raw[91];
        let ishare_xattr_prefix_id = raw[105];
        if feature_compat & compat::ISHARE_XATTRS != 0
            && ishare_xattr_prefix_id >= xattr_prefix_count
        {
            return Err(Error::corrupt_at(
                None,
                SUPER_OFFSET + 105,
                format!("inode-share xattr prefix id {ishare_xattr_prefix_id} out of range"),
            ));
        }

        let mut sb = Superblock {
            feature_compat,
            feature_incompat,
            blkszbits,
            sb_size,
            checksum,
            root_nid,
            inos: le64(&raw, 16),
            epoch: i64::from_le_bytes(le64(&raw, 24).to_le_bytes()),
            fixed_nsec: le32(&raw, 32),
            build_time: le32(&raw, 108),
            blocks,
            meta_blkaddr: le32(&raw, 40),
            xattr_blkaddr: le32(&raw, 44),
            uuid: raw[48..64].try_into().unwrap_or([0; 16]),
            volume_name: raw[64..80].try_into().unwrap_or([0; 16]),
            u1: le16(&raw, 84),
            devices: Vec::new(),
            xattr_prefix_count,
            xattr_prefix_start: le32(&raw, 92),
            packed_nid,
            metabox_nid,
            ishare_xattr_prefix_id,
            compr_cfgs: Vec::new(),
        };
        sb.read_compr_cfgs(dev, dev_size)?;
        sb.read_devices(dev, &raw, dev_size)?;
        Ok(sb)
    }

    fn read_compr_cfgs(&mut self, dev: &dyn ReadAt, dev_size: u64) -> Result<()> {
        if self.feature_incompat & incompat::COMPR_CFGS == 0 {
            return Ok(());
        }
        let algs = self.u1;
        if algs & !0xf != 0 {
            return Err(Error::Incompatible(format!(
                "unknown compression algorithms in bitmap 0x{algs:x}"
            )));
        }
        let mut pos = SUPER_OFFSET + self.sb_size as u64;
        for alg in 0u8..4 {
            if algs & (1 << alg) == 0 {
                continue;
            }
            pos = pos.next_multiple_of(4);
            let mut len = [0u8; 2];
            read_meta_exact(dev, dev_size, &mut len, pos)?;
            let len = u16::from_le_bytes(len);
            if len == 0 || len > 256 {
                return Err(Error::corrupt_at(
                    None,
                    pos,
                    format!("compression config record of {len} bytes for algorithm {alg}"),
                ));
            }
            pos += 2;
            let mut payload = vec![0u8; usize::from(len)];
            read_meta_exact(dev, dev_size, &mut payload, pos)?;
            pos += u64::from(len);
            self.compr_cfgs.push((alg, payload));
        }
        Ok(())
    }

    fn read_devices(&mut self, dev: &dyn ReadAt, raw: &[u8], dev_size: u64) -> Result<()> {
        if self.feature_incompat & incompat::DEVICE_TABLE == 0 {
            return Ok(());
        }
        let extra = le16(raw, 86);
        if extra == 0 {
            return Ok(());
        }
        if extra > MAX_EXTRA_DEVICES {
            return Err(Error::corrupt_at(
                None,
                SUPER_OFFSET + 86,
                format!("{extra} extra devices is more than the {MAX_EXTRA_DEVICES} allowed"),
            ));
        }
        let slotoff = u64::from(le16(raw, 88));
        let has48 = self.has_incompat(incompat::BIT48);
        let mut pos = slotoff * DEVT_SLOT_SIZE;
        for _ in 0..extra {
            let mut slot = [0u8; 128];
            read_meta_exact(dev, dev_size, &mut slot, pos)?;
            let mut tag = [0u8; 64];
            tag.copy_from_slice(&slot[..64]);
            let mut blocks = u64::from(le32(&slot, 64));
            let mut uniaddr = u64::from(le32(&slot, 68));
            if has48 {
                blocks |= u64::from(le16(&slot, 72)) << 32;
                uniaddr |= u64::from(le16(&slot, 74)) << 32;
            }
            self.devices.push(DeviceSlot {
                tag,
                blocks,
                uniaddr,
            });
            pos += DEVT_SLOT_SIZE;
        }
        Ok(())
    }
}

fn read_meta_exact(dev: &dyn ReadAt, dev_size: u64, buf: &mut [u8], pos: u64) -> Result<()> {
    let end = pos.checked_add(buf.len() as u64);
    if end.is_none_or(|e| e > dev_size) {
        return Err(Error::corrupt_at(
            None,
            pos,
            format!(
                "{} bytes of superblock metadata past the end of the image",
                buf.len()
            ),
        ));
    }
    dev.read_exact_at(buf, pos)
        .map_err(|e| Error::from_io(pos, e))
}
