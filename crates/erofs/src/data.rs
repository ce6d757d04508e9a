//! File data: mapping a logical offset to where its bytes are, and reading.
//!
//! Every layout answers one question, "where is the byte at logical offset
//! `la`, and how many bytes after it are laid out the same way?", as an
//! [`Extent`]. Reading is then the same loop for every layout; compressed
//! layouts (see `zdata`) answer with a pcluster to decode.

use crate::error::{Error, Result};
use crate::image::Image;
use crate::inode::{DataLayout, Inode, CHUNK_FORMAT_48BIT, CHUNK_FORMAT_INDEXES};

/// Where a run of logical bytes lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Reads as zeros.
    Hole,
    /// Plain bytes on a device, starting at `pos`.
    Device { dev: usize, pos: u64 },
    /// Plain bytes inline in the metadata (tail packing), starting at `pos`.
    Meta { in_mbox: bool, pos: u64 },
}

/// An extent covering `[la, la + len)` of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub(crate) la: u64,
    pub(crate) len: u64,
    pub(crate) extent: Extent,
}

impl Image {
    /// Read file data at `offset` into `buf`. Returns the bytes read, fewer
    /// than `buf.len()` only at the end of the file.
    ///
    /// Works for regular files and symlinks; use [`Image::read_dir`] for
    /// directories.
    pub fn read(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        match inode.file_type() {
            crate::FileType::Regular | crate::FileType::Symlink => {}
            crate::FileType::Directory => {
                return Err(Error::Invalid("is a directory".into()));
            }
            _ => return Err(Error::Invalid("not a regular file".into())),
        }
        self.read_data(inode, offset, buf)
            .map_err(|e| e.with_nid(inode.nid))
    }

    /// Read the whole of a file from its start, a piece of at most
    /// `buf.len()` bytes at a time, handing each piece and its offset to `f`.
    /// Data that ends before the file's size is a corruption error.
    pub fn for_each_piece<E: From<Error>>(
        &self,
        inode: &Inode,
        buf: &mut [u8],
        mut f: impl FnMut(u64, &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut off = 0u64;
        while off < inode.size {
            let n = self.read(inode, off, buf)?;
            if n == 0 {
                return Err(Error::corrupt_nid(inode.nid, "file data ends before its size").into());
            }
            f(off, &buf[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// Read the data of any inode that has data (files, symlinks,
    /// directories, the metabox and packed inodes).
    pub(crate) fn read_data(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= inode.size || buf.is_empty() {
            return Ok(0);
        }
        let want =
            usize::try_from((inode.size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        if inode.layout.is_compressed() {
            return self.read_compressed(inode, offset, &mut buf[..want]);
        }
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            let m = self.map_uncompressed(inode, pos)?;
            if m.la > pos || m.len == 0 || m.la.checked_add(m.len).is_none_or(|end| end <= pos) {
                return Err(Error::corrupt_nid(
                    inode.nid,
                    format!("no mapping for offset {pos}"),
                ));
            }
            let skip = pos - m.la;
            let n =
                usize::try_from((m.len - skip).min((want - done) as u64)).unwrap_or(want - done);
            let dst = &mut buf[done..done + n];
            match m.extent {
                Extent::Hole => dst.fill(0),
                Extent::Device { dev, pos: p } => {
                    let at = p
                        .checked_add(skip)
                        .ok_or_else(|| Error::corrupt_nid(inode.nid, "data address overflows"))?;
                    self.dev_read(dev, at, dst)?;
                }
                Extent::Meta { in_mbox, pos: p } => {
                    self.meta_read(in_mbox, p + skip, dst)?;
                }
            }
            done += n;
        }
        Ok(want)
    }

    /// Map a logical offset of an uncompressed inode.
    pub(crate) fn map_uncompressed(&self, inode: &Inode, la: u64) -> Result<Mapping> {
        let sb = self.superblock();
        let bits = sb.blkszbits;
        let bs = 1u64 << bits;
        if la >= inode.size {
            return Err(Error::corrupt_nid(
                inode.nid,
                format!("offset {la} is past the end"),
            ));
        }
        match inode.layout {
            DataLayout::FlatPlain | DataLayout::FlatInline => {
                let tail = inode.layout == DataLayout::FlatInline;
                if !tail && inode.startblk == u64::MAX {
                    return Ok(Mapping {
                        la: 0,
                        len: inode.size,
                        extent: Extent::Hole,
                    });
                }
                let nblocks = inode.size.div_ceil(bs);
                let plain_end = (nblocks - u64::from(tail)) << bits;
                if la < plain_end {
                    let start = inode.startblk.checked_mul(bs).ok_or_else(|| {
                        Error::corrupt_nid(inode.nid, "start block address overflows")
                    })?;
                    let (dev, pos) = self.map_device(0, start)?;
                    return Ok(Mapping {
                        la: 0,
                        len: plain_end,
                        extent: Extent::Device { dev, pos },
                    });
                }
                // The tail sits right after the inode and its xattrs, and
                // must not cross a block boundary (as the kernel requires).
                let pos = inode.after_xattrs()?;
                let len = inode.size - plain_end;
                if (pos & (bs - 1)) + len > bs {
                    return Err(Error::corrupt_at(
                        Some(inode.nid),
                        pos,
                        "inline data crosses a block boundary",
                    ));
                }
                Ok(Mapping {
                    la: plain_end,
                    len,
                    extent: Extent::Meta {
                        in_mbox: inode.in_mbox,
                        pos,
                    },
                })
            }
            DataLayout::ChunkBased => self.map_chunk(inode, la),
            DataLayout::CompressedFull | DataLayout::CompressedCompact => Err(Error::corrupt_nid(
                inode.nid,
                "compressed inode mapped as uncompressed",
            )),
        }
    }

    fn map_chunk(&self, inode: &Inode, la: u64) -> Result<Mapping> {
        let sb = self.superblock();
        let bs = 1u64 << sb.blkszbits;
        let indexes = inode.chunk_format & CHUNK_FORMAT_INDEXES != 0;
        let unit: u64 = if indexes { 8 } else { 4 };
        let chunknr = la >> inode.chunkbits;
        let base = inode.after_xattrs()?.next_multiple_of(unit);
        let pos = chunknr
            .checked_mul(unit)
            .and_then(|o| o.checked_add(base))
            .ok_or_else(|| Error::corrupt_nid(inode.nid, "chunk index position overflows"))?;
        let chunk_la = chunknr << inode.chunkbits;
        let chunk_size = 1u64 << inode.chunkbits;
        let len = chunk_size.min(inode.size - chunk_la);
        let mut raw = [0u8; 8];
        let raw = &mut raw[..unit as usize];
        self.meta_read(inode.in_mbox, pos, raw)?;
        if indexes {
            let hi = u64::from(u16::from_le_bytes([raw[0], raw[1]]));
            let device_id = u16::from_le_bytes([raw[2], raw[3]]) & sb.device_id_mask();
            let lo = u64::from(u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]));
            let mask = if inode.chunk_format & CHUNK_FORMAT_48BIT != 0 {
                (1u64 << 48) - 1
            } else {
                u32::MAX.into()
            };
            let startblk = ((hi << 32) | lo) & mask;
            if startblk == mask {
                return Ok(Mapping {
                    la: chunk_la,
                    len,
                    extent: Extent::Hole,
                });
            }
            let (dev, pos) = self.map_device(usize::from(device_id), startblk * bs)?;
            Ok(Mapping {
                la: chunk_la,
                len,
                extent: Extent::Device { dev, pos },
            })
        } else {
            let startblk = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            if startblk == u32::MAX {
                return Ok(Mapping {
                    la: chunk_la,
                    len,
                    extent: Extent::Hole,
                });
            }
            let (dev, pos) = self.map_device(0, u64::from(startblk) * bs)?;
            Ok(Mapping {
                la: chunk_la,
                len,
                extent: Extent::Device { dev, pos },
            })
        }
    }

    /// Resolve a device id and a physical address to the device that holds
    /// it: an explicit id names a device; id 0 on a multi-device image looks
    /// the address up in the unified address space of the device table.
    pub(crate) fn map_device(&self, device_id: usize, pa: u64) -> Result<(usize, u64)> {
        let sb = self.superblock();
        if device_id != 0 {
            if device_id > sb.devices.len() {
                return Err(Error::corrupt(format!(
                    "device id {device_id} but the image has {} extra devices",
                    sb.devices.len()
                )));
            }
            return Ok((device_id, pa));
        }
        for (i, d) in sb.devices.iter().enumerate() {
            if d.uniaddr == 0 {
                continue;
            }
            let start = d.uniaddr.saturating_mul(1u64 << sb.blkszbits);
            let len = d.blocks.saturating_mul(1u64 << sb.blkszbits);
            if pa >= start && pa - start < len {
                return Ok((i + 1, pa - start));
            }
        }
        Ok((0, pa))
    }
}
