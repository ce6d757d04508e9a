//! Extended attributes: an inline body after the inode (a header, ids of
//! shared entries, then inline entries) and a shared area for values that
//! several inodes carry. Names are stored as a prefix index plus a suffix;
//! long prefixes (XATTR_PREFIXES) extend the short ones with an infix.

use crate::error::{Error, Result};
use crate::image::Image;
use crate::inode::Inode;
use crate::superblock::{compat, incompat};

const XATTR_LONG_PREFIX: u8 = 0x80;
const XATTR_LONG_PREFIX_MASK: u8 = 0x7f;
const XATTR_FILTER_SEED: u32 = 0x25BB_E08F;
const ENTRY_HEADER: usize = 4;

/// The bit of an inode's xattr name filter that a name sets: `suffix` is
/// the name after its short prefix, `index` that prefix's index (as in
/// the entry). The writer sets it, the reader tests it.
pub fn filter_bit(suffix: &[u8], index: u8) -> u32 {
    xxhash_rust::xxh32::xxh32(suffix, XATTR_FILTER_SEED.wrapping_add(u32::from(index))) & 31
}

/// One extended attribute with its full name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    /// The full name, such as `user.comment` or `system.posix_acl_access`.
    pub name: Vec<u8>,
    /// The raw value (POSIX ACLs in their xattr encoding).
    pub value: Vec<u8>,
}

/// A long name prefix: a short prefix index and an infix appended to it.
#[derive(Debug, Clone)]
pub(crate) struct LongPrefix {
    base_index: u8,
    infix: Vec<u8>,
}

/// The short prefix of an index, as the kernel lists it; `None` for indexes
/// the kernel does not list (lustre, unknown).
fn short_prefix(index: u8) -> Option<&'static [u8]> {
    Some(match index {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        6 => b"security.",
        _ => return None,
    })
}

/// Split a full name into a short prefix index and the rest.
fn split_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for index in [1u8, 2, 3, 4, 6] {
        let p = short_prefix(index)?;
        if let Some(rest) = name.strip_prefix(p) {
            if (index == 2 || index == 3) && !rest.is_empty() {
                continue;
            }
            return Some((index, rest));
        }
    }
    None
}

/// One entry as stored: prefix index byte, name suffix, value.
struct RawEntry {
    index: u8,
    suffix: Vec<u8>,
    value: Vec<u8>,
}

/// The parsed inline body.
struct Body {
    name_filter: u32,
    shared: Vec<u32>,
    inline: Vec<RawEntry>,
}

fn entry_size(name_len: usize, value_len: usize) -> usize {
    (ENTRY_HEADER + name_len + value_len).next_multiple_of(4)
}

impl Image {
    /// Read the long xattr name prefixes from wherever the image keeps them.
    pub(crate) fn read_xattr_prefixes(&self) -> Result<Vec<LongPrefix>> {
        let sb = self.superblock();
        let count = sb.xattr_prefix_count;
        if count == 0 {
            return Ok(Vec::new());
        }
        if !sb.has_incompat(incompat::XATTR_PREFIXES) {
            return Ok(Vec::new());
        }
        let mut pos = u64::from(sb.xattr_prefix_start) * 4;
        let holder = if sb.has_compat(compat::PLAIN_XATTR_PFX) {
            None
        } else if let Some(m) = self.metabox_inode() {
            Some(m.clone())
        } else if sb.packed_nid != 0 {
            Some(self.packed_inode()?.clone())
        } else {
            None
        };
        let mut out = Vec::with_capacity(usize::from(count));
        for i in 0..count {
            pos = pos.next_multiple_of(4);
            let mut len = [0u8; 2];
            self.prefix_read(holder.as_ref(), pos, &mut len)?;
            let len = usize::from(u16::from_le_bytes(len));
            if len == 0 || len > 1 + 255 {
                return Err(Error::corrupt_at(
                    None,
                    pos,
                    format!("long xattr prefix {i} has length {len}"),
                ));
            }
            pos += 2;
            let mut raw = vec![0u8; len];
            self.prefix_read(holder.as_ref(), pos, &mut raw)?;
            pos += len as u64;
            let base_index = raw[0];
            if short_prefix(base_index).is_none() && base_index != 5 {
                return Err(Error::corrupt_at(
                    None,
                    pos,
                    format!("long xattr prefix {i} extends unknown index {base_index}"),
                ));
            }
            out.push(LongPrefix {
                base_index,
                infix: raw[1..].to_vec(),
            });
        }
        Ok(out)
    }

    fn prefix_read(&self, holder: Option<&Inode>, pos: u64, buf: &mut [u8]) -> Result<()> {
        match holder {
            None => self.dev_read(0, pos, buf),
            Some(inode) => {
                let n = self.read_data(inode, pos, buf)?;
                if n != buf.len() {
                    return Err(Error::corrupt_at(
                        Some(inode.nid),
                        pos,
                        "long xattr prefixes run past the end of their inode",
                    ));
                }
                Ok(())
            }
        }
    }

    fn xattr_body(&self, inode: &Inode) -> Result<Option<Body>> {
        if inode.xattr_isize == 0 {
            return Ok(None);
        }
        let start = inode.after_inode()?;
        let size = usize::try_from(inode.xattr_isize)
            .map_err(|_| Error::corrupt_nid(inode.nid, "xattr body too large"))?;
        let mut raw = vec![0u8; size];
        self.meta_read(inode.in_mbox, start, &mut raw)?;
        let name_filter = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let shared_count = usize::from(raw[4]);
        let mut off = 12 + 4 * shared_count;
        if off > size {
            return Err(Error::corrupt_at(
                Some(inode.nid),
                start,
                format!("{shared_count} shared xattrs do not fit a body of {size} bytes"),
            ));
        }
        let shared = (0..shared_count)
            .map(|i| {
                let o = 12 + 4 * i;
                u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]])
            })
            .collect();
        let mut inline = Vec::new();
        while off < size {
            if size - off < ENTRY_HEADER {
                return Err(Error::corrupt_at(
                    Some(inode.nid),
                    start + off as u64,
                    "truncated inline xattr entry",
                ));
            }
            let name_len = usize::from(raw[off]);
            let index = raw[off + 1];
            let value_len = usize::from(u16::from_le_bytes([raw[off + 2], raw[off + 3]]));
            let esize = entry_size(name_len, value_len);
            if esize > size - off {
                return Err(Error::corrupt_at(
                    Some(inode.nid),
                    start + off as u64,
                    "inline xattr entry runs past the xattr body",
                ));
            }
            let n0 = off + ENTRY_HEADER;
            inline.push(RawEntry {
                index,
                suffix: raw[n0..n0 + name_len].to_vec(),
                value: raw[n0 + name_len..n0 + name_len + value_len].to_vec(),
            });
            off += esize;
        }
        Ok(Some(Body {
            name_filter,
            shared,
            inline,
        }))
    }

    fn shared_xattr(&self, inode: &Inode, id: u32) -> Result<RawEntry> {
        let sb = self.superblock();
        let in_mbox = sb.has_compat(compat::SHARED_EA_IN_METABOX);
        let pos = (u64::from(sb.xattr_blkaddr) << sb.blkszbits) + u64::from(id) * 4;
        let mut head = [0u8; ENTRY_HEADER];
        self.meta_read(in_mbox, pos, &mut head)
            .map_err(|e| e.with_nid(inode.nid))?;
        let name_len = usize::from(head[0]);
        let value_len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let mut rest = vec![0u8; name_len + value_len];
        self.meta_read(in_mbox, pos + ENTRY_HEADER as u64, &mut rest)
            .map_err(|e| e.with_nid(inode.nid))?;
        let value = rest.split_off(name_len);
        Ok(RawEntry {
            index: head[1],
            suffix: rest,
            value,
        })
    }

    /// The full name of an entry, or `None` when the kernel would not list it.
    fn full_name(&self, inode: &Inode, e: &RawEntry) -> Result<Option<Vec<u8>>> {
        if e.index & XATTR_LONG_PREFIX != 0 {
            let i = usize::from(e.index & XATTR_LONG_PREFIX_MASK);
            let p = self.xattr_prefixes.get(i).ok_or_else(|| {
                Error::corrupt_nid(
                    inode.nid,
                    format!("xattr uses long prefix {i}, which does not exist"),
                )
            })?;
            let Some(base) = short_prefix(p.base_index) else {
                return Ok(None);
            };
            let mut name = base.to_vec();
            name.extend_from_slice(&p.infix);
            name.extend_from_slice(&e.suffix);
            return Ok(Some(name));
        }
        let Some(base) = short_prefix(e.index) else {
            return Ok(None);
        };
        let mut name = base.to_vec();
        name.extend_from_slice(&e.suffix);
        Ok(Some(name))
    }

    fn all_raw_xattrs(&self, inode: &Inode) -> Result<(Vec<RawEntry>, u32)> {
        let Some(body) = self.xattr_body(inode)? else {
            return Ok((Vec::new(), u32::MAX));
        };
        let mut all = body.inline;
        for id in body.shared {
            all.push(self.shared_xattr(inode, id)?);
        }
        Ok((all, body.name_filter))
    }

    /// Every extended attribute of `inode` that the kernel would list, inline
    /// ones first, then shared ones.
    pub fn list_xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        let (all, _) = self
            .all_raw_xattrs(inode)
            .map_err(|e| e.with_nid(inode.nid))?;
        let mut out = Vec::with_capacity(all.len());
        for e in all {
            if let Some(name) = self.full_name(inode, &e)? {
                out.push(Xattr {
                    name,
                    value: e.value,
                });
            }
        }
        Ok(out)
    }

    /// The value of the extended attribute `name`, if `inode` has it.
    pub fn get_xattr(&self, inode: &Inode, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some((index, rest)) = split_name(name) else {
            return Ok(None);
        };
        if inode.xattr_isize == 0 {
            return Ok(None);
        }
        let sb = self.superblock();
        if sb.has_compat(compat::XATTR_FILTER) {
            let body_filter = {
                let mut h = [0u8; 4];
                self.meta_read(inode.in_mbox, inode.after_inode()?, &mut h)?;
                u32::from_le_bytes(h)
            };
            let bit = filter_bit(rest, index);
            if body_filter & (1u32 << bit) != 0 {
                return Ok(None);
            }
        }
        let (all, _) = self
            .all_raw_xattrs(inode)
            .map_err(|e| e.with_nid(inode.nid))?;
        for e in all {
            if let Some(full) = self.full_name(inode, &e)? {
                if full == name {
                    return Ok(Some(e.value));
                }
            }
        }
        Ok(None)
    }

    /// The target of a symbolic link.
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        if inode.file_type() != crate::FileType::Symlink {
            return Err(Error::Invalid("not a symbolic link".into()));
        }
        // Linux symlink targets are at most PATH_MAX - 1 bytes.
        if inode.size == 0 || inode.size > 4095 {
            return Err(Error::corrupt_nid(
                inode.nid,
                format!("symlink target of {} bytes", inode.size),
            ));
        }
        let mut buf = vec![0u8; inode.size as usize];
        let n = self
            .read_data(inode, 0, &mut buf)
            .map_err(|e| e.with_nid(inode.nid))?;
        buf.truncate(n);
        Ok(buf)
    }
}
