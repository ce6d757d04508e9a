//! An opened image: the superblock, the devices and the shared state that
//! every lookup and read goes through.

use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};
use crate::inode::Inode;
use crate::read::ReadAt;
use crate::superblock::Superblock;
use crate::xattr::LongPrefix;

/// One device of the image with its size, read once at open.
pub(crate) struct Device {
    pub(crate) source: Arc<dyn ReadAt>,
    pub(crate) size: u64,
}

/// An opened EROFS image. `Send + Sync`: share it as `Arc<Image>`.
pub struct Image {
    sb: Superblock,
    /// Device 0 is the primary; extra devices follow in device-table order.
    pub(crate) devices: Vec<Device>,
    /// The metabox inode, when the image keeps metadata in one.
    metabox: Option<Inode>,
    /// The packed inode (fragments), parsed on first use.
    packed: OnceLock<Result<Inode, String>>,
    /// Long xattr name prefixes, read at open.
    pub(crate) xattr_prefixes: Vec<LongPrefix>,
    /// Per-image compressed-data state (decoders, caches).
    pub(crate) z: crate::zdata::ZState,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("superblock", &self.sb)
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

fn device(source: Arc<dyn ReadAt>, index: usize) -> Result<Device> {
    let size = source.size().map_err(|e| Error::Io {
        offset: 0,
        source: e,
    })?;
    let _ = index;
    Ok(Device { source, size })
}

impl Image {
    /// Open an image that keeps all its data in one device.
    pub fn open(primary: Arc<dyn ReadAt>) -> Result<Image> {
        Self::open_with_devices(primary, Vec::new())
    }

    /// Open an image with its extra devices, in device-table order.
    pub fn open_with_devices(
        primary: Arc<dyn ReadAt>,
        extra: Vec<Arc<dyn ReadAt>>,
    ) -> Result<Image> {
        let sb = Superblock::read(&*primary)?;
        if !extra.is_empty() && extra.len() != sb.devices.len() {
            return Err(Error::Invalid(format!(
                "the image has {} extra device(s) but {} were given",
                sb.devices.len(),
                extra.len()
            )));
        }
        let mut devices = Vec::with_capacity(1 + extra.len());
        devices.push(device(primary, 0)?);
        for (i, d) in extra.into_iter().enumerate() {
            devices.push(device(d, i + 1)?);
        }
        let mut image = Image {
            sb,
            devices,
            metabox: None,
            packed: OnceLock::new(),
            xattr_prefixes: Vec::new(),
            z: crate::zdata::ZState::default(),
        };
        image.z = crate::zdata::ZState::new(&image.sb)?;
        if let Some(nid) = image.sb.metabox_nid {
            let mbox = image.inode(nid)?;
            if !mbox.file_type().eq(&crate::FileType::Regular) {
                return Err(Error::corrupt_nid(
                    nid,
                    "the metabox inode is not a regular file",
                ));
            }
            image.metabox = Some(mbox);
        }
        image.xattr_prefixes = image.read_xattr_prefixes()?;
        Ok(image)
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The root directory's nid.
    pub fn root_nid(&self) -> u64 {
        self.sb.root_nid
    }

    /// The root directory.
    pub fn root(&self) -> Result<Inode> {
        let root = self.inode(self.sb.root_nid)?;
        if !root.is_dir() {
            return Err(Error::corrupt_nid(
                root.nid,
                "the root inode is not a directory",
            ));
        }
        Ok(root)
    }

    /// The number of extra devices the image expects.
    pub fn extra_devices_expected(&self) -> usize {
        self.sb.devices.len()
    }

    /// The number of extra devices that were given.
    pub fn extra_devices_given(&self) -> usize {
        self.devices.len().saturating_sub(1)
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        1u64 << self.sb.blkszbits
    }

    /// The packed inode that holds fragments, parsed once.
    pub(crate) fn packed_inode(&self) -> Result<&Inode> {
        let r = self.packed.get_or_init(|| {
            if self.sb.packed_nid == 0 {
                return Err("the image has no packed inode".to_string());
            }
            self.inode(self.sb.packed_nid).map_err(|e| e.to_string())
        });
        r.as_ref()
            .map_err(|e| Error::corrupt(format!("packed inode: {e}")))
    }

    /// The metabox inode, when the image has one.
    pub(crate) fn metabox_inode(&self) -> Option<&Inode> {
        self.metabox.as_ref()
    }

    /// Read metadata bytes: from the primary device, or from the metabox
    /// inode's data when `in_mbox`.
    pub(crate) fn meta_read(&self, in_mbox: bool, pos: u64, buf: &mut [u8]) -> Result<()> {
        if in_mbox {
            let mbox = self.metabox.as_ref().ok_or_else(|| {
                Error::corrupt_at(None, pos, "metadata in a metabox but the image has none")
            })?;
            let end = pos.checked_add(buf.len() as u64);
            if end.is_none_or(|e| e > mbox.size) {
                return Err(Error::corrupt_at(
                    None,
                    pos,
                    format!(
                        "{} bytes of metadata past the end of the metabox",
                        buf.len()
                    ),
                ));
            }
            let n = self.read_data(mbox, pos, buf)?;
            if n != buf.len() {
                return Err(Error::corrupt_at(None, pos, "short read from the metabox"));
            }
            return Ok(());
        }
        self.dev_read(0, pos, buf)
    }

    /// Read bytes of device `dev` at `pos`, checked against its size.
    pub(crate) fn dev_read(&self, dev: usize, pos: u64, buf: &mut [u8]) -> Result<()> {
        let d = self.devices.get(dev).ok_or_else(|| {
            Error::Invalid(format!(
                "data lives on extra device {dev}, which was not given (use --device)"
            ))
        })?;
        let end = pos.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > d.size) {
            let what = if dev == 0 {
                "the image".to_string()
            } else {
                format!("device {dev}")
            };
            return Err(Error::corrupt_at(
                None,
                pos,
                format!(
                    "read of {} bytes past the end of {what} ({} bytes)",
                    buf.len(),
                    d.size
                ),
            ));
        }
        d.source
            .read_exact_at(buf, pos)
            // A verified reader refuses a block that does not match its hash
            // tree (InvalidData): the image is corrupt or tampered with there.
            .map_err(|e| Error::from_io(pos, e))
    }
}
