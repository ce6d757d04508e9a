//! Compressed data: per-image decoder state and the read path of the
//! compressed layouts.

use crate::error::{Error, Result};
use crate::image::Image;
use crate::inode::Inode;
use crate::superblock::Superblock;

/// Per-image state of the compressed read path.
#[derive(Debug, Default)]
pub(crate) struct ZState {}

impl ZState {
    pub(crate) fn new(_sb: &Superblock) -> Result<Self> {
        Ok(ZState {})
    }
}

impl Image {
    /// Read from a compressed inode.
    pub(crate) fn read_compressed(
        &self,
        inode: &Inode,
        _offset: u64,
        _buf: &mut [u8],
    ) -> Result<usize> {
        Err(Error::Incompatible(format!(
            "nid {}: compressed layouts are not supported yet",
            inode.nid
        )))
    }
}
