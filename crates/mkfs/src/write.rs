//! Laying out and writing an image.
//!
//! The image is written front to back in one pass over the data:
//!
//! ```text
//! block 0 (and 1-2 for 512-byte blocks): superblock, compression configs
//! file data: full blocks of flat files, chunks, pclusters, in inode order
//! metadata (meta_blkaddr = xattr_blkaddr): shared xattrs, then inodes with
//!   their xattr bodies, inline tails, chunk maps and compression indexes
//! directory blocks (their names need every nid, known only here)
//! ```
//!
//! Putting the metadata after the data lets each file be read (and
//! compressed) once, in order, with nothing but its tail kept in memory.
//! Everything is sorted and no host state (time, random numbers) is used,
//! so the same input gives the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use sha2::Digest;

use crate::compress::{self, CompressOptions};
use crate::error::{Error, Result};
use crate::format::{self, InodeFields};
use crate::tree::{Data, Kind, NodeId, Tree};
use crate::xattr::XattrLayout;

/// How to build an image.
#[derive(Debug, Clone)]
pub struct Options {
    /// Block size in bytes (a power of two, 512 to 65536; the kernel mounts
    /// block sizes up to its page size).
    pub block_size: u32,
    /// Volume UUID; by default one derived from the image's metadata.
    pub uuid: Option<[u8; 16]>,
    /// Volume name (at most 16 bytes).
    pub volume_name: Vec<u8>,
    /// Give every inode this modification time (`-T`).
    pub fixed_time: Option<i64>,
    /// Clamp modification times to at most this (SOURCE_DATE_EPOCH); also
    /// the build time.
    pub clamp_time: Option<i64>,
    /// Make every file owned by root.
    pub all_root: bool,
    /// Added to every uid.
    pub uid_offset: u32,
    /// Added to every gid.
    pub gid_offset: u32,
    /// Store tails after the inode when they fit (FLAT_INLINE).
    pub inline_data: bool,
    /// Chunk-based regular files with chunks of this many bytes.
    pub chunk_size: Option<u32>,
    /// Compress regular files.
    pub compress: Option<CompressOptions>,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// Long xattr name prefixes (`--xattr-prefix`), each starting with
    /// `user.`, `trusted.` or `security.`.
    pub xattr_prefixes: Vec<Vec<u8>>,
    /// Fill each inode's xattr name filter (`-E xattr-name-filter`).
    pub xattr_name_filter: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            block_size: 4096,
            uuid: None,
            volume_name: Vec::new(),
            fixed_time: None,
            clamp_time: None,
            all_root: false,
            uid_offset: 0,
            gid_offset: 0,
            inline_data: true,
            chunk_size: None,
            compress: None,
            progress: false,
            xattr_prefixes: Vec::new(),
            xattr_name_filter: false,
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// Inodes in the image.
    pub inodes: u64,
    /// Blocks in the image.
    pub blocks: u64,
    /// Image size in bytes.
    pub bytes: u64,
    /// The volume UUID.
    pub uuid: [u8; 16],
}

/// Write `tree` as an EROFS image to `dest`, atomically: the image is
/// written to a temporary file next to `dest` and renamed over it only when
/// complete, so a failure leaves nothing behind.
pub fn build_image(tree: &Tree, dest: &Path, opts: &Options) -> Result<BuildReport> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".immount-build-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let report = write_image(tree, tmp.as_file(), opts)?;
    // Temporary files are private (0600); an image is an ordinary file.
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    // No fsync: like mkfs.erofs and linkers, the build leaves write-back to
    // the kernel (syncing made a compressed build wait a second or more for
    // the disk). The rename still shows readers a whole image or none; a
    // caller that needs it on disk across a crash runs `sync`.
    tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
    Ok(report)
}

/// Attributes of one inode as they will be stored.
struct Plan {
    node: NodeId,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    nlink: u32,
    size: u64,
    extended: bool,
    xattr_body: Vec<u8>,
    layout: u16,
    i_u: u32,
    /// Bytes after the xattr body: inline tail, chunk map, compression map.
    inline: Vec<u8>,
    /// For directories: the inline tail's length (filled once nids are
    /// known) and the number of full blocks.
    dir_inline_len: usize,
    dir_blocks: u64,
    nid: u64,
    parent: NodeId,
}

impl Plan {
    fn isize(&self) -> usize {
        if self.extended {
            64
        } else {
            32
        }
    }
    fn inline_len(&self) -> usize {
        self.inline.len().max(self.dir_inline_len)
    }
    fn meta_size(&self) -> usize {
        self.isize() + self.xattr_body.len() + self.inline_len()
    }
}

/// The output file with a position, written front to back.
pub(crate) struct Out<'a> {
    w: BufWriter<&'a File>,
    pub(crate) pos: u64,
    block_size: u64,
}

impl Out<'_> {
    pub(crate) fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).map_err(|e| Error::io("<image>", e))?;
        self.pos += b.len() as u64;
        Ok(())
    }
    /// Zero-fill up to the next block boundary.
    pub(crate) fn pad_block(&mut self) -> Result<()> {
        let rem = self.pos % self.block_size;
        if rem != 0 {
            let zeros = vec![0u8; (self.block_size - rem) as usize];
            self.write(&zeros)?;
        }
        Ok(())
    }
    pub(crate) fn block(&self) -> u64 {
        self.pos / self.block_size
    }
}

/// A reader over a file's bytes, whatever their source.
pub(crate) fn open_data(data: &Data) -> Result<Box<dyn Read + Send>> {
    Ok(match data {
        Data::Path(p) => Box::new(File::open(p).map_err(|e| Error::io(p, e))?),
        Data::Spill { file, offset } => Box::new(SpillReader {
            file: Arc::clone(file),
            pos: *offset,
        }),
        Data::Bytes(b) => Box::new(std::io::Cursor::new(Arc::clone(b).to_vec())),
    })
}

struct SpillReader {
    file: Arc<File>,
    pos: u64,
}

impl Read for SpillReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Fill `buf` from `r`, returning how many bytes were read (short at EOF).
pub(crate) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub(crate) fn data_name(data: &Data) -> String {
    match data {
        Data::Path(p) => p.display().to_string(),
        _ => "<input>".to_string(),
    }
}

pub(crate) fn changed(data: &Data) -> Error {
    Error::input(format!(
        "{}: file changed size while the image was built",
        data_name(data)
    ))
}

/// Copy `len` bytes from `from`'s position to `to`'s, advancing both, with
/// `copy_file_range` (no copy through user space); fewer only at the end of
/// `from`. Called directly rather than through `std::io::copy`, which asks
/// both files for their metadata on every call: two `statx` per file of the
/// tree. Where the kernel cannot copy between these files, `std::io::copy`
/// does it.
fn copy_range(from: &File, to: &File, len: u64) -> std::io::Result<u64> {
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(from, None, to, None, want) {
            Ok(0) => break,
            Ok(n) => done += n as u64,
            Err(rustix::io::Errno::INTR) => {}
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::PERM,
            ) if done == 0 => {
                let mut to = to;
                return std::io::copy(&mut from.take(len), &mut to);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Read exactly `len` bytes of a file's data.
pub(crate) fn read_exact_data(r: &mut dyn Read, data: &Data, buf: &mut [u8]) -> Result<()> {
    let n = read_full(r, buf).map_err(|e| Error::io(data_name(data), e))?;
    if n != buf.len() {
        return Err(changed(data));
    }
    Ok(())
}

/// Nodes in inode order (root first; then each directory's new children
/// together, directories depth first), link counts and parents.
fn order_nodes(tree: &Tree) -> (Vec<NodeId>, HashMap<NodeId, u32>, HashMap<NodeId, NodeId>) {
    let mut order = vec![tree.root];
    let mut nlink: HashMap<NodeId, u32> = HashMap::new();
    let mut parent: HashMap<NodeId, NodeId> = HashMap::new();
    parent.insert(tree.root, tree.root);
    let mut stack = vec![tree.root];
    while let Some(dir) = stack.pop() {
        let Kind::Dir(entries) = &tree.nodes[dir].kind else {
            continue;
        };
        let mut subdirs = Vec::new();
        for &child in entries.values() {
            let node = &tree.nodes[child];
            if node.is_dir() {
                // A directory has exactly one parent (a tar cannot hard-link
                // directories: the tar reader refuses it).
                parent.insert(child, dir);
                order.push(child);
                subdirs.push(child);
            } else {
                let n = nlink.entry(child).or_insert(0);
                if *n == 0 {
                    order.push(child);
                }
                *n += 1;
            }
        }
        nlink.insert(dir, 2 + subdirs.len() as u32);
        stack.extend(subdirs.into_iter().rev());
    }
    (order, nlink, parent)
}

fn check_options(opts: &Options) -> Result<u32> {
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
        return Err(Error::Option(format!(
            "block size {bs} is not a power of two from 512 to 65536"
        )));
    }
    if let Some(c) = opts.chunk_size {
        if !c.is_power_of_two() || c < bs || (c / bs).trailing_zeros() > 31 {
            return Err(Error::Option(format!(
                "chunk size {c} is not a power of two of at least one block"
            )));
        }
        if opts.compress.is_some() {
            return Err(Error::Option(
                "chunk-based files cannot be compressed".into(),
            ));
        }
    }
    if opts.volume_name.len() > 16 {
        return Err(Error::Option("volume name is longer than 16 bytes".into()));
    }
    Ok(bs.trailing_zeros())
}

/// Write the image of `tree` into `file` (from offset 0).
pub fn write_image(tree: &Tree, file: &File, opts: &Options) -> Result<BuildReport> {
    let blkbits = check_options(opts)?;
    let bs = u64::from(opts.block_size);
    let (order, nlinks, parents) = order_nodes(tree);
    if order.len() > u32::MAX as usize {
        return Err(Error::input("too many inodes"));
    }

    // Attributes after --all-root, offsets and time policies.
    let mut plans: Vec<Plan> = Vec::with_capacity(order.len());
    for &id in &order {
        let node = &tree.nodes[id];
        let (mut uid, mut gid) = if opts.all_root {
            (0, 0)
        } else {
            (node.uid, node.gid)
        };
        uid = uid.checked_add(opts.uid_offset).ok_or_else(|| {
            Error::input(format!("uid {uid} + offset {} overflows", opts.uid_offset))
        })?;
        gid = gid.checked_add(opts.gid_offset).ok_or_else(|| {
            Error::input(format!("gid {gid} + offset {} overflows", opts.gid_offset))
        })?;
        let (mut mtime, mut nsec) = (node.mtime, node.mtime_nsec);
        if let Some(t) = opts.fixed_time {
            (mtime, nsec) = (t, 0);
        } else if let Some(t) = opts.clamp_time {
            if mtime > t {
                (mtime, nsec) = (t, 0);
            }
        }
        let size = match &node.kind {
            Kind::File { size, .. } => *size,
            Kind::Symlink(t) => t.len() as u64,
            _ => 0,
        };
        plans.push(Plan {
            node: id,
            mode: node.type_bits() | (node.perm & 0o7777),
            uid,
            gid,
            mtime,
            mtime_nsec: nsec,
            nlink: nlinks.get(&id).copied().unwrap_or(1),
            size,
            extended: false,
            xattr_body: Vec::new(),
            layout: format::LAYOUT_FLAT_PLAIN,
            i_u: 0,
            inline: Vec::new(),
            dir_inline_len: 0,
            dir_blocks: 0,
            nid: 0,
            parent: parents.get(&id).copied().unwrap_or(tree.root),
        });
    }

    // Compact inodes take their time from the superblock: choose the most
    // common one (ties: the earliest) so that most inodes can be compact.
    let (epoch, fixed_nsec) = {
        let mut counts: HashMap<(i64, u32), u64> = HashMap::new();
        for p in &plans {
            *counts.entry((p.mtime, p.mtime_nsec)).or_insert(0) += 1;
        }
        counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(k, _)| k)
            .unwrap_or((0, 0))
    };
    let epoch = epoch.max(0);
    for p in &mut plans {
        p.extended = p.uid > 0xffff
            || p.gid > 0xffff
            || p.nlink > 0xffff
            || p.size > u64::from(u32::MAX)
            || p.mtime != epoch
            || p.mtime_nsec != fixed_nsec;
    }

    // Shared xattrs, inline bodies, long prefixes and name filters.
    let xattr_sets: Vec<_> = plans.iter().map(|p| &tree.nodes[p.node].xattrs).collect();
    let mut xattrs = XattrLayout::new(&xattr_sets, &opts.xattr_prefixes, opts.xattr_name_filter)?;
    for (p, body) in plans.iter_mut().zip(std::mem::take(&mut xattrs.bodies)) {
        p.xattr_body = body;
    }
    let shared_area = std::mem::take(&mut xattrs.head);

    let mut incompat = 0u32;
    let cfgs = match &opts.compress {
        Some(c) => compress::config_records(c, opts.block_size)?,
        None => Vec::new(),
    };
    let sb_end = (format::SUPER_OFFSET + format::SB_SIZE + cfgs.len()) as u64;
    let data_start = sb_end.div_ceil(bs);
    let mut out = Out {
        w: BufWriter::with_capacity(1 << 20, file),
        pos: 0,
        block_size: bs,
    };
    out.write(&vec![0u8; (data_start * bs) as usize])?;

    // File data, in inode order.
    let total_bytes: u64 = plans
        .iter()
        .filter(|p| p.mode & 0o170000 == 0o100000)
        .map(|p| p.size)
        .sum();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(total_bytes)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if opts.progress {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    }
    let mut zstate = opts
        .compress
        .as_ref()
        .map(|c| compress::State::new(c.clone(), opts.block_size));
    let flat_plans: Vec<usize> = (0..plans.len())
        .filter(|&i| {
            matches!(
                tree.nodes[plans[i].node].kind,
                Kind::File { .. } | Kind::Symlink(_)
            )
        })
        .collect();
    // Compressed files go through the compressor in batches (both cores);
    // the rest is copied as it comes.
    if let Some(z) = zstate.as_mut() {
        let mut jobs = Vec::new();
        for &i in &flat_plans {
            let p = &plans[i];
            if let Kind::File { data, size } = &tree.nodes[p.node].kind {
                if *size > 0 {
                    jobs.push((i, data.clone(), *size));
                }
            }
        }
        let results = z.compress_files(&jobs, &mut out, &bar, |i| {
            let p = &plans[i];
            p.isize() + p.xattr_body.len()
        })?;
        for (i, r) in results {
            let p = &mut plans[i];
            p.layout = r.layout;
            p.i_u = r.i_u;
            p.inline = r.inline;
        }
        incompat |= z.incompat();
    }
    for &i in &flat_plans {
        let p = &mut plans[i];
        if p.layout != format::LAYOUT_FLAT_PLAIN || p.size == 0 {
            continue; // compressed already, or nothing to store
        }
        let (data, is_file) = match &tree.nodes[p.node].kind {
            Kind::File { data, .. } => (data.clone(), true),
            Kind::Symlink(t) => (Data::Bytes(Arc::new(t.clone())), false),
            _ => continue,
        };
        // Host files are read through one descriptor so that full blocks
        // can move with copy_file_range (no copy through user space).
        let host = match &data {
            Data::Path(path) => Some(File::open(path).map_err(|e| Error::io(path, e))?),
            _ => None,
        };
        let mut r: Box<dyn Read + '_> = match &host {
            Some(f) => Box::new(f),
            None => open_data(&data)?,
        };
        if is_file && opts.chunk_size.is_some() {
            let chunk = u64::from(opts.chunk_size.unwrap_or(opts.block_size));
            write_chunked(p, &mut *r, &data, chunk, blkbits, &mut out)?;
            incompat |= format::INCOMPAT_CHUNKED_FILE;
        } else {
            write_flat(
                p,
                &mut *r,
                host.as_ref(),
                &data,
                bs,
                opts.inline_data,
                &mut out,
            )?;
        }
        if is_file {
            bar.inc(p.size);
        }
        if is_file && matches!(data, Data::Path(_)) {
            // The file must end where its size said.
            let mut probe = [0u8; 1];
            if read_full(&mut *r, &mut probe).map_err(|e| Error::io(data_name(&data), e))? != 0 {
                return Err(changed(&data));
            }
        }
    }
    // The packed inode: every fragment, compressed like a file, reachable
    // only from the superblock.
    let mut packed_plan = None;
    if let Some(z) = zstate.as_mut() {
        let packed = z.take_packed();
        if opts.compress.as_ref().is_some_and(|c| c.fragments) {
            let size = packed.len() as u64;
            plans.push(Plan {
                node: usize::MAX, // in no directory
                mode: 0o100600,
                uid: 0,
                gid: 0,
                mtime: epoch,
                mtime_nsec: fixed_nsec,
                nlink: 1,
                size,
                extended: size > u64::from(u32::MAX),
                xattr_body: Vec::new(),
                layout: format::LAYOUT_FLAT_PLAIN,
                i_u: 0,
                inline: Vec::new(),
                dir_inline_len: 0,
                dir_blocks: 0,
                nid: 0,
                parent: tree.root,
            });
            let idx = plans.len() - 1;
            let data = Data::Bytes(Arc::new(packed));
            let res = z.compress_files(&[(idx, data.clone(), size)], &mut out, &bar, |i| {
                let p = &plans[i];
                p.isize() + p.xattr_body.len()
            })?;
            if let Some((_, r)) = res.into_iter().next() {
                let p = &mut plans[idx];
                p.layout = r.layout;
                p.i_u = r.i_u;
                p.inline = r.inline;
            } else if size > 0 {
                let mut r = open_data(&data)?;
                write_flat(
                    &mut plans[idx],
                    &mut *r,
                    None,
                    &data,
                    bs,
                    opts.inline_data,
                    &mut out,
                )?;
            }
            packed_plan = Some(idx);
        }
    }
    bar.finish_and_clear();
    out.pad_block()?;

    // Devices keep their number in i_u.
    for p in &mut plans {
        match tree.nodes.get(p.node).map(|n| &n.kind) {
            Some(&Kind::CharDev(ma, mi)) | Some(&Kind::BlockDev(ma, mi)) => {
                p.i_u = format::encode_dev(ma, mi)
            }
            _ => {}
        }
    }

    // Directory sizes and inline tails depend only on names.
    let mut dir_names: HashMap<usize, Vec<(Vec<u8>, NodeId)>> = HashMap::new();
    for (i, p) in plans.iter_mut().enumerate() {
        let Some(Kind::Dir(entries)) = tree.nodes.get(p.node).map(|n| &n.kind) else {
            continue;
        };
        let mut names: Vec<(Vec<u8>, NodeId)> = Vec::with_capacity(entries.len() + 2);
        names.push((b".".to_vec(), p.node));
        names.push((b"..".to_vec(), p.parent));
        for (n, &id) in entries {
            names.push((n.clone(), id));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let refs: Vec<&[u8]> = names.iter().map(|(n, _)| n.as_slice()).collect();
        let blocks = format::dir_block_plan(&refs, bs as usize);
        let last = blocks.last().map(|b| b.1).unwrap_or(0);
        p.size = (blocks.len() as u64 - 1) * bs + last as u64;
        if p.size > u64::from(u32::MAX) {
            p.extended = true;
        }
        let fits = p.isize() + p.xattr_body.len() + last <= bs as usize;
        if opts.inline_data && fits && last < bs as usize {
            p.layout = format::LAYOUT_FLAT_INLINE;
            p.dir_inline_len = last;
            p.dir_blocks = blocks.len() as u64 - 1;
        } else {
            p.layout = format::LAYOUT_FLAT_PLAIN;
            p.dir_blocks = blocks.len() as u64;
        }
        dir_names.insert(i, names);
    }

    // Metadata layout: shared xattrs at the start of the area, then inodes.
    let meta_blkaddr = out.block();
    if meta_blkaddr > u64::from(u32::MAX) {
        return Err(Error::input("image too large for 32-bit block addresses"));
    }
    // Slot 0 stays unused: a zero nid means "none" in some fields.
    let mut packer = MetaPacker::new(
        bs,
        (shared_area.len() as u64)
            .max(format::ISLOT)
            .next_multiple_of(format::ISLOT),
    );
    for p in &mut plans {
        p.nid = packer.place(p.meta_size() as u64) / format::ISLOT;
    }
    let cursor = packer.end();
    let root_nid = plans[0].nid;
    if root_nid > 0xffff {
        return Err(Error::input("the root inode lands beyond nid 65535"));
    }
    let meta_len = cursor.next_multiple_of(bs);
    let mut dir_blk = meta_blkaddr + meta_len / bs;

    // Directory blocks, now that nids are known.
    let nid_of: HashMap<NodeId, (u64, u8)> = plans
        .iter()
        .map(|p| (p.node, (p.nid, format::dirent_type(p.mode & 0o170000))))
        .collect();
    let mut dir_data: Vec<u8> = Vec::new();
    for (i, p) in plans.iter_mut().enumerate() {
        let Some(names) = dir_names.get(&i) else {
            continue;
        };
        let refs: Vec<&[u8]> = names.iter().map(|(n, _)| n.as_slice()).collect();
        let blocks = format::dir_block_plan(&refs, bs as usize);
        let mut start = 0;
        let mut encoded: Vec<Vec<u8>> = Vec::new();
        for (count, _) in &blocks {
            let ents: Vec<(&[u8], u64, u8)> = names[start..start + count]
                .iter()
                .map(|(n, id)| {
                    let (nid, ft) = nid_of[id];
                    (n.as_slice(), nid, ft)
                })
                .collect();
            encoded.push(format::dir_block(&ents));
            start += count;
        }
        if p.layout == format::LAYOUT_FLAT_INLINE {
            p.inline = encoded.pop().unwrap_or_default();
        }
        p.i_u = if encoded.is_empty() {
            0
        } else {
            dir_blk as u32
        };
        for mut b in encoded {
            b.resize(bs as usize, 0);
            dir_data.extend_from_slice(&b);
            dir_blk += 1;
        }
        if dir_blk > u64::from(u32::MAX) {
            return Err(Error::input("image too large for 32-bit block addresses"));
        }
    }

    // Encode the metadata area.
    let mut meta = vec![0u8; meta_len as usize];
    meta[..shared_area.len()].copy_from_slice(&shared_area);
    for (ino, p) in plans.iter().enumerate() {
        let fields = InodeFields {
            extended: p.extended,
            layout: p.layout,
            xattr_icount: if p.xattr_body.is_empty() {
                0
            } else {
                ((p.xattr_body.len() - 12) / 4 + 1) as u16
            },
            mode: p.mode,
            nlink: p.nlink,
            size: p.size,
            i_u: p.i_u,
            ino: ino as u32 + 1,
            uid: p.uid,
            gid: p.gid,
            mtime: p.mtime,
            mtime_nsec: p.mtime_nsec,
        };
        let mut at = (p.nid * format::ISLOT) as usize;
        for part in [&fields.encode(), &p.xattr_body, &p.inline] {
            meta[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }
    out.write(&meta)?;
    out.write(&dir_data)?;
    out.w.flush().map_err(|e| Error::io("<image>", e))?;
    let blocks = out.block();

    let uuid = opts.uuid.unwrap_or_else(|| {
        let mut h = sha2::Sha256::new();
        h.update(&meta);
        h.update(&dir_data);
        let d = h.finalize();
        let mut u = [0u8; 16];
        u.copy_from_slice(&d[..16]);
        u[6] = (u[6] & 0x0f) | 0x40;
        u[8] = (u[8] & 0x3f) | 0x80;
        u
    });
    let build_time = opts
        .fixed_time
        .or(opts.clamp_time)
        .unwrap_or_else(|| plans.iter().map(|p| p.mtime).max().unwrap_or(0));

    // The superblock and the configuration records after it.
    let mut sb = [0u8; format::SB_SIZE];
    sb[0..4].copy_from_slice(&format::MAGIC.to_le_bytes());
    sb[8..12].copy_from_slice(&format::COMPAT_SB_CHKSUM.to_le_bytes());
    sb[12] = blkbits as u8;
    sb[13] = 0;
    sb[14..16].copy_from_slice(&(root_nid as u16).to_le_bytes());
    sb[16..24].copy_from_slice(&(plans.len() as u64).to_le_bytes());
    sb[24..32].copy_from_slice(&epoch.to_le_bytes());
    sb[32..36].copy_from_slice(&fixed_nsec.to_le_bytes());
    sb[36..40].copy_from_slice(&(blocks as u32).to_le_bytes());
    sb[40..44].copy_from_slice(&(meta_blkaddr as u32).to_le_bytes());
    sb[44..48].copy_from_slice(&(meta_blkaddr as u32).to_le_bytes());
    sb[48..64].copy_from_slice(&uuid);
    sb[64..64 + opts.volume_name.len()].copy_from_slice(&opts.volume_name);
    if let Some(z) = &zstate {
        incompat |= format::INCOMPAT_ZERO_PADDING;
        let u1 = z.sb_u1();
        if !cfgs.is_empty() {
            incompat |= format::INCOMPAT_COMPR_CFGS;
        }
        sb[84..86].copy_from_slice(&u1.to_le_bytes());
        if let Some(idx) = packed_plan {
            sb[96..104].copy_from_slice(&plans[idx].nid.to_le_bytes());
        }
    }
    sb[80..84].copy_from_slice(&incompat.to_le_bytes());
    xattrs.fill_superblock(&mut sb, meta_blkaddr * bs)?;
    let bt = build_time
        .saturating_sub(epoch)
        .clamp(0, i64::from(u32::MAX)) as u32;
    sb[108..112].copy_from_slice(&bt.to_le_bytes());
    let crc_len = if bs as usize > format::SUPER_OFFSET {
        bs as usize - format::SUPER_OFFSET
    } else {
        bs as usize
    };
    let mut head = vec![0u8; crc_len.max(format::SB_SIZE + cfgs.len())];
    head[..format::SB_SIZE].copy_from_slice(&sb);
    head[format::SB_SIZE..format::SB_SIZE + cfgs.len()].copy_from_slice(&cfgs);
    let crc = format::kernel_crc32c(&head[..crc_len]);
    head[4..8].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&head, format::SUPER_OFFSET as u64)
        .map_err(|e| Error::io("<image>", e))?;
    let bytes = blocks * bs;
    file.set_len(bytes).map_err(|e| Error::io("<image>", e))?;
    Ok(BuildReport {
        inodes: plans.len() as u64,
        blocks,
        bytes,
        uuid,
    })
}

/// Places inodes (with their xattrs and inline data) in the metadata area.
///
/// An inode that fits in a block stays in one block (the kernel requires it
/// of inline data); a larger one starts a block. Inline tails make inodes of
/// very different sizes, so placing them one after the other would leave a
/// partly empty block behind each one that does not fit the current block:
/// instead each goes into the fullest block that still has room for it
/// (best fit), which packs the area nearly as tight as its contents.
struct MetaPacker {
    bs: u64,
    /// Bytes used in each block of the area.
    used: Vec<u64>,
    /// `by_free[k]`: blocks with exactly `k` free inode slots, the most
    /// recently used last (so neighbours in inode order stay close).
    by_free: Vec<Vec<usize>>,
}

impl MetaPacker {
    /// An area whose first `reserved` bytes are taken already.
    fn new(bs: u64, reserved: u64) -> MetaPacker {
        let mut packer = MetaPacker {
            bs,
            used: Vec::new(),
            by_free: vec![Vec::new(); (bs / format::ISLOT) as usize + 1],
        };
        let full = reserved / bs;
        packer.used.resize(full as usize, bs);
        if !reserved.is_multiple_of(bs) {
            packer.used.push(reserved % bs);
            packer.file(full as usize);
        }
        packer
    }

    /// Put block `b` in the bucket of its free space.
    fn file(&mut self, b: usize) {
        let free = (self.bs - self.used[b]) / format::ISLOT;
        if free > 0 {
            self.by_free[free as usize].push(b);
        }
    }

    /// Room for `size` bytes: their offset in the area.
    fn place(&mut self, size: u64) -> u64 {
        let size = size.next_multiple_of(format::ISLOT);
        if size <= self.bs {
            let want = (size / format::ISLOT) as usize;
            let found = (want.max(1)..self.by_free.len()).find(|&k| !self.by_free[k].is_empty());
            let b = match found.and_then(|k| self.by_free[k].pop()) {
                Some(b) => b,
                None => {
                    self.used.push(0);
                    self.used.len() - 1
                }
            };
            let at = b as u64 * self.bs + self.used[b];
            self.used[b] += size;
            self.file(b);
            return at;
        }
        let first = self.used.len();
        let blocks = size.div_ceil(self.bs);
        self.used.resize(first + blocks as usize, self.bs);
        let last = self.used.len() - 1;
        self.used[last] = size - (blocks - 1) * self.bs;
        self.file(last);
        first as u64 * self.bs
    }

    /// The end of the area's last used block, in bytes.
    fn end(&self) -> u64 {
        self.used.len() as u64 * self.bs
    }
}

/// A flat file: full blocks now, the tail inline after the inode when it
/// fits in the inode's block, else in one more block.
fn write_flat(
    p: &mut Plan,
    r: &mut dyn Read,
    host: Option<&File>,
    data: &Data,
    bs: u64,
    inline_data: bool,
    out: &mut Out,
) -> Result<()> {
    let full = p.size / bs;
    let tail = (p.size % bs) as usize;
    let start = out.block();
    let mut left = full * bs;
    if let (Some(f), true) = (host, left > 0) {
        out.w.flush().map_err(|e| Error::io("<image>", e))?;
        let n = copy_range(f, out.w.get_ref(), left).map_err(|e| Error::io(data_name(data), e))?;
        out.pos += n;
        if n != left {
            return Err(changed(data));
        }
        left = 0;
    }
    let mut buf = vec![0u8; (1 << 20).min(left.max(bs)) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        read_exact_data(r, data, &mut buf[..n])?;
        out.write(&buf[..n])?;
        left -= n as u64;
    }
    let mut tail_bytes = vec![0u8; tail];
    read_exact_data(r, data, &mut tail_bytes)?;
    let inode_part = p.isize() + p.xattr_body.len();
    if inline_data && tail > 0 && inode_part + tail <= bs as usize {
        p.layout = format::LAYOUT_FLAT_INLINE;
        p.inline = tail_bytes;
        p.i_u = if full > 0 { start as u32 } else { 0 };
    } else {
        p.layout = format::LAYOUT_FLAT_PLAIN;
        if tail > 0 {
            out.write(&tail_bytes)?;
            out.pad_block()?;
        }
        p.i_u = start as u32;
    }
    if out.block() > u64::from(u32::MAX) {
        return Err(Error::input("image too large for 32-bit block addresses"));
    }
    Ok(())
}

/// A chunk-based file: each chunk's blocks in a row, a block map after the
/// inode, all-zero chunks as holes.
fn write_chunked(
    p: &mut Plan,
    r: &mut dyn Read,
    data: &Data,
    chunk: u64,
    blkbits: u32,
    out: &mut Out,
) -> Result<()> {
    let count = p.size.div_ceil(chunk);
    let mut map = Vec::with_capacity(count as usize * 4);
    let mut buf = vec![0u8; chunk as usize];
    let mut left = p.size;
    for _ in 0..count {
        let n = left.min(chunk) as usize;
        read_exact_data(r, data, &mut buf[..n])?;
        left -= n as u64;
        if buf[..n].iter().all(|&b| b == 0) {
            map.extend_from_slice(&format::NULL_ADDR32.to_le_bytes());
            continue;
        }
        let blk = out.block();
        if blk >= u64::from(u32::MAX) {
            return Err(Error::input("image too large for 32-bit block addresses"));
        }
        map.extend_from_slice(&(blk as u32).to_le_bytes());
        out.write(&buf[..n])?;
        out.pad_block()?;
    }
    p.layout = format::LAYOUT_CHUNK_BASED;
    p.i_u = (chunk.trailing_zeros() - blkbits) & 0x1f;
    p.inline = map;
    Ok(())
}
