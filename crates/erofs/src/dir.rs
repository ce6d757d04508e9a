//! Directories: blocks of 12-byte dirents followed by their names, sorted
//! by name within and across blocks, so lookups binary-search.

use std::cmp::Ordering;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::inode::{FileType, Inode};

/// Size of one on-disk dirent.
const DIRENT_SIZE: usize = 12;
/// The longest name a dirent may carry.
pub const NAME_LEN_MAX: usize = 255;
/// The largest directory we read (256 MiB of dirent blocks is millions of
/// entries; anything larger is a hostile image trying to make walks endless).
pub const DIR_SIZE_MAX: u64 = 1 << 28;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name, arbitrary bytes except `/` and NUL.
    pub name: Vec<u8>,
    /// The nid of the entry's inode.
    pub nid: u64,
    /// The type recorded in the entry.
    pub file_type: FileType,
    /// The offset to pass to [`Image::read_dir`] to continue after this
    /// entry. Never 0 (0 means the start of the directory).
    pub next_offset: u64,
}

impl DirEntry {
    /// True for the "." and ".." entries.
    pub fn is_dot_or_dotdot(&self) -> bool {
        self.name == b"." || self.name == b".."
    }
}

/// One parsed directory block: its dirents as (name range, nid, type).
struct DirBlock {
    data: Vec<u8>,
    entries: Vec<(usize, usize, u64, u8)>,
}

impl DirBlock {
    fn name(&self, i: usize) -> &[u8] {
        let (s, e, _, _) = self.entries[i];
        &self.data[s..e]
    }
}

fn dir_corrupt(dir: &Inode, pos: u64, what: impl Into<String>) -> Error {
    Error::corrupt_at(Some(dir.nid), pos, what)
}

impl Image {
    fn check_dir(&self, dir: &Inode) -> Result<u64> {
        if !dir.is_dir() {
            return Err(Error::NotADirectory(format!("nid {}", dir.nid)));
        }
        if dir.size > DIR_SIZE_MAX {
            return Err(Error::corrupt_nid(
                dir.nid,
                format!(
                    "directory of {} bytes is larger than the {DIR_SIZE_MAX} allowed",
                    dir.size
                ),
            ));
        }
        Ok(dir.size.div_ceil(self.block_size()))
    }

    /// Read and validate directory block `index` of `dir`.
    fn dir_block(&self, dir: &Inode, index: u64) -> Result<DirBlock> {
        let bs = self.block_size();
        let start = index * bs;
        let len = (dir.size - start).min(bs) as usize;
        let mut data = vec![0u8; len];
        let n = self
            .read_data(dir, start, &mut data)
            .map_err(|e| e.with_nid(dir.nid))?;
        if n != len {
            return Err(dir_corrupt(dir, start, "directory block is short"));
        }
        if len < DIRENT_SIZE {
            return Err(dir_corrupt(
                dir,
                start,
                format!("directory block of {len} bytes"),
            ));
        }
        let nameoff0 = usize::from(u16::from_le_bytes([data[8], data[9]]));
        if nameoff0 < DIRENT_SIZE || nameoff0 >= len || nameoff0 % DIRENT_SIZE != 0 {
            return Err(dir_corrupt(
                dir,
                start,
                format!("invalid first name offset {nameoff0}"),
            ));
        }
        let count = nameoff0 / DIRENT_SIZE;
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let d = &data[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE];
            let nid = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let nameoff = usize::from(u16::from_le_bytes([d[8], d[9]]));
            let file_type = d[10];
            let end = if i + 1 < count {
                let o = i + 1;
                usize::from(u16::from_le_bytes([
                    data[o * DIRENT_SIZE + 8],
                    data[o * DIRENT_SIZE + 9],
                ]))
            } else {
                let tail = data.get(nameoff..).unwrap_or(&[]);
                nameoff + tail.iter().position(|&b| b == 0).unwrap_or(tail.len())
            };
            if nameoff < nameoff0 || end < nameoff || end > len {
                return Err(dir_corrupt(
                    dir,
                    start + (i * DIRENT_SIZE) as u64,
                    format!("bogus name offset {nameoff} of entry {i}"),
                ));
            }
            let namelen = end - nameoff;
            if namelen == 0 || namelen > NAME_LEN_MAX {
                return Err(dir_corrupt(
                    dir,
                    start + (i * DIRENT_SIZE) as u64,
                    format!("name length {namelen} of entry {i}"),
                ));
            }
            if let Some(&(ps, pe, _, _)) = entries.last() {
                if data[ps..pe] >= data[nameoff..end] {
                    return Err(dir_corrupt(
                        dir,
                        start + (i * DIRENT_SIZE) as u64,
                        format!("entry {i} is out of name order"),
                    ));
                }
            }
            entries.push((nameoff, end, nid, file_type));
        }
        Ok(DirBlock { data, entries })
    }

    fn make_entry(&self, dir: &Inode, blk: &DirBlock, i: usize, pos: u64) -> Result<DirEntry> {
        let (_, _, nid, ft) = blk.entries[i];
        let name = blk.name(i);
        if name.contains(&b'/') || name.contains(&0) {
            return Err(dir_corrupt(dir, pos, "a name with '/' or NUL in it"));
        }
        let file_type = FileType::from_dirent(ft)
            .ok_or_else(|| dir_corrupt(dir, pos, format!("unknown file type {ft}")))?;
        Ok(DirEntry {
            name: name.to_vec(),
            nid,
            file_type,
            next_offset: pos + DIRENT_SIZE as u64 + 1,
        })
    }

    /// The entries of `dir` from `offset` (0 is the start; otherwise an
    /// entry's `next_offset`) to the end of the directory block that holds
    /// it: a bounded batch. Empty at the end of the directory.
    ///
    /// "." and ".." are included as stored; a directory that omits "." on
    /// disk gets one made up at the start, as the kernel does.
    pub fn read_dir_batch(&self, dir: &Inode, offset: u64) -> Result<Vec<DirEntry>> {
        let nblocks = self.check_dir(dir)?;
        let mut out = Vec::new();
        if offset == 0 && dir.dot_omitted {
            out.push(DirEntry {
                name: b".".to_vec(),
                nid: dir.nid,
                file_type: FileType::Directory,
                next_offset: 1,
            });
            return Ok(out);
        }
        let bs = self.block_size();
        let mut pos = offset.saturating_sub(1);
        while pos / bs < nblocks {
            let index = pos / bs;
            let blk = self.dir_block(dir, index)?;
            let first = ((pos % bs) as usize).div_ceil(DIRENT_SIZE);
            for i in first..blk.entries.len() {
                let epos = index * bs + (i * DIRENT_SIZE) as u64;
                out.push(self.make_entry(dir, &blk, i, epos)?);
            }
            if !out.is_empty() {
                break;
            }
            // Resuming just past a block's last entry: go on to the next block.
            pos = (index + 1) * bs;
        }
        Ok(out)
    }

    /// Call `f` for each entry of `dir` from `offset` on (0 is the start;
    /// otherwise an entry's `next_offset`), until `f` returns false.
    pub fn read_dir(
        &self,
        dir: &Inode,
        offset: u64,
        f: &mut dyn FnMut(&DirEntry) -> bool,
    ) -> Result<()> {
        let mut offset = offset;
        loop {
            let batch = self.read_dir_batch(dir, offset)?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            offset = last.next_offset;
            for e in &batch {
                if !f(e) {
                    return Ok(());
                }
            }
        }
    }

    /// All entries of `dir`, "." and ".." left out.
    pub fn entries(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        self.read_dir(dir, 0, &mut |e| {
            if !e.is_dot_or_dotdot() {
                out.push(e.clone());
            }
            true
        })?;
        Ok(out)
    }

    /// Find `name` in `dir` by binary search: first over the blocks by
    /// their first names, then within the one block that can hold it.
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        let nblocks = self.check_dir(dir)?;
        if name.is_empty() || name.len() > NAME_LEN_MAX {
            return Ok(None);
        }
        let bs = self.block_size();
        let (mut lo, mut hi) = (0u64, nblocks);
        let mut candidate: Option<(u64, DirBlock)> = None;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let blk = self.dir_block(dir, mid)?;
            match name.cmp(blk.name(0)) {
                Ordering::Less => hi = mid,
                Ordering::Equal => {
                    let e = self.make_entry(dir, &blk, 0, mid * bs)?;
                    return Ok(Some(e));
                }
                Ordering::Greater => {
                    lo = mid + 1;
                    candidate = Some((mid, blk));
                }
            }
        }
        let Some((index, blk)) = candidate else {
            return Ok(None);
        };
        let (mut lo, mut hi) = (0usize, blk.entries.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match name.cmp(blk.name(mid)) {
                Ordering::Less => hi = mid,
                Ordering::Equal => {
                    let e =
                        self.make_entry(dir, &blk, mid, index * bs + (mid * DIRENT_SIZE) as u64)?;
                    return Ok(Some(e));
                }
                Ordering::Greater => lo = mid + 1,
            }
        }
        Ok(None)
    }

    /// The inode at absolute `path` inside the image ("/" is the root).
    /// Symlinks are not followed; "." and ".." are resolved by the path.
    pub fn resolve(&self, path: &[u8]) -> Result<Inode> {
        let mut stack = vec![self.root()?];
        for comp in path.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let Some(cur) = stack.last() else { break };
            if !cur.is_dir() {
                return Err(Error::NotADirectory(
                    String::from_utf8_lossy(path).into_owned(),
                ));
            }
            let entry = self
                .lookup(cur, comp)?
                .ok_or_else(|| Error::NotFound(String::from_utf8_lossy(path).into_owned()))?;
            let inode = self.inode(entry.nid)?;
            if stack.len() > crate::walk::DEPTH_MAX {
                return Err(Error::Invalid("path is too deep".into()));
            }
            stack.push(inode);
        }
        // The stack always holds the root.
        stack
            .pop()
            .ok_or_else(|| Error::Invalid("empty path".into()))
    }
}
