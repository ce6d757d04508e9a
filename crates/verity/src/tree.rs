//! Computing hash trees (`veritysetup format`), writing them, and checking a
//! whole image against a root hash (`veritysetup verify`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use erofs::ReadAt;

use crate::geometry::{Geometry, VerityParams};
use crate::root_hash::{RootHash, DIGEST_SIZE};
use crate::superblock::{random_uuid, Superblock, SUPERBLOCK_SIZE};
use crate::{Error, Result};

/// Largest single read while hashing, so huge blocks do not mean huge buffers.
const READ_CHUNK: usize = 1 << 20;

/// A computed tree, held in memory (its size is about 1/128 of the data for
/// 4 KiB blocks), ready to be written.
#[derive(Debug, Clone)]
pub struct HashTree {
    geometry: Geometry,
    uuid: [u8; 16],
    /// Level bytes, lowest level first, each `blocks * hash_block_size` long.
    levels: Vec<Vec<u8>>,
    root: RootHash,
}

impl HashTree {
    /// The root hash of the tree.
    pub fn root_hash(&self) -> RootHash {
        self.root
    }

    /// The layout the tree was computed for.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The superblock that describes the tree.
    pub fn superblock(&self) -> Superblock {
        Superblock {
            params: self.geometry.params().clone(),
            uuid: self.uuid,
        }
    }

    /// The bytes of each level, lowest level first.
    pub fn levels(&self) -> &[Vec<u8>] {
        &self.levels
    }

    /// Write the hash area (superblock when the geometry has one, then the
    /// levels top first) at the geometry's hash offset of `out`.
    pub fn write_to(&self, out: &File) -> Result<()> {
        let hbs = self.geometry.params().hash_block_size as usize;
        if self.geometry.has_superblock() {
            let mut block = vec![0u8; hbs];
            block[..SUPERBLOCK_SIZE].copy_from_slice(&self.superblock().to_bytes()?);
            let at = self.geometry.hash_offset();
            out.write_all_at(&block, at)
                .map_err(|e| Error::io(format!("writing the verity superblock at {at}"), e))?;
        }
        for (i, (level, bytes)) in self.geometry.levels().iter().zip(&self.levels).enumerate() {
            out.write_all_at(bytes, level.offset).map_err(|e| {
                Error::io(
                    format!("writing hash level {i} at offset {}", level.offset),
                    e,
                )
            })?;
        }
        out.sync_all()
            .map_err(|e| Error::io("syncing the hash tree", e))
    }
}

/// Hash `count` blocks of `block_size` bytes from `src` into one level:
/// `ceil(count / 2^bits)` hash blocks, using every core.
fn hash_level(
    src: &dyn ReadAt,
    block_size: usize,
    count: u64,
    params: &VerityParams,
    bits: u32,
    threads: usize,
) -> Result<Vec<u8>> {
    let hbs = params.hash_block_size as usize;
    let per = 1u64 << bits;
    let out_blocks = usize::try_from((count - 1) / per + 1)
        .map_err(|_| Error::invalid("hash level does not fit in memory"))?;
    let out_len = out_blocks
        .checked_mul(hbs)
        .ok_or_else(|| Error::invalid("hash level does not fit in memory"))?;
    let mut out = vec![0u8; out_len];
    let threads = threads.min(out_blocks).max(1);
    let per_thread = out_blocks.div_ceil(threads);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = out
            .chunks_mut(per_thread * hbs)
            .enumerate()
            .map(|(t, chunk)| {
                let first_out = (t * per_thread) as u64;
                scope.spawn(move || {
                    hash_range(src, block_size, count, params, bits, first_out, chunk)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("hashing thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect::<Result<()>>()?;
    Ok(out)
}

/// One thread's share of [`hash_level`]: the hash blocks starting at
/// `first_out`, written into `out`.
fn hash_range(
    src: &dyn ReadAt,
    block_size: usize,
    count: u64,
    params: &VerityParams,
    bits: u32,
    first_out: u64,
    out: &mut [u8],
) -> Result<()> {
    let hbs = params.hash_block_size as usize;
    let blocks_per_read = (READ_CHUNK / block_size).max(1);
    let mut buf = vec![0u8; blocks_per_read * block_size];
    let first_block = first_out << bits;
    let end_block = (first_block + ((out.len() / hbs) as u64) * (1 << bits)).min(count);
    let mut block = first_block;
    while block < end_block {
        let n = (end_block - block).min(blocks_per_read as u64) as usize;
        let chunk = &mut buf[..n * block_size];
        let offset = block * block_size as u64;
        src.read_exact_at(chunk, offset)
            .map_err(|e| Error::io(format!("reading block {block} at offset {offset}"), e))?;
        params
            .digest_each(chunk, block_size, |i, digest| {
                let index = block + i as u64 - first_block;
                let out_block = (index >> bits) as usize;
                let slot = (index & ((1 << bits) - 1)) as usize;
                let at = out_block * hbs + slot * DIGEST_SIZE;
                out[at..at + DIGEST_SIZE].copy_from_slice(digest);
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap_or_else(|never| match never {});
        block += n as u64;
    }
    Ok(())
}

/// Number of hashing threads: one per core.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Compute the whole tree of `data` for `geometry` (the data source must
/// hold at least the geometry's data area), hashing on every core.
pub fn compute_tree(data: &dyn ReadAt, geometry: Geometry, uuid: [u8; 16]) -> Result<HashTree> {
    compute_tree_with_threads(data, geometry, uuid, default_threads())
}

/// [`compute_tree`] with a given number of hashing threads (for benchmarks).
pub fn compute_tree_with_threads(
    data: &dyn ReadAt,
    geometry: Geometry,
    uuid: [u8; 16],
    threads: usize,
) -> Result<HashTree> {
    let params = geometry.params().clone();
    let bits = geometry.bits();
    let hbs = params.hash_block_size as usize;
    let mut levels: Vec<Vec<u8>> = Vec::with_capacity(geometry.levels().len());
    for (i, level) in geometry.levels().iter().enumerate() {
        let bytes = match levels.last() {
            None => hash_level(
                data,
                params.data_block_size as usize,
                params.data_blocks,
                &params,
                bits,
                threads,
            )?,
            Some(below) => hash_level(
                below,
                hbs,
                (below.len() / hbs) as u64,
                &params,
                bits,
                threads,
            )?,
        };
        debug_assert_eq!(bytes.len() as u64, level.blocks * hbs as u64, "level {i}");
        levels.push(bytes);
    }
    let root = match levels.last() {
        Some(top) => params.digest(top),
        None => {
            // One data block: the root hash is that block's digest.
            let mut block = vec![0u8; params.data_block_size as usize];
            data.read_exact_at(&mut block, 0)
                .map_err(|e| Error::io("reading data block 0", e))?;
            params.digest(&block)
        }
    };
    Ok(HashTree {
        geometry,
        uuid,
        levels,
        root: RootHash(root),
    })
}

/// Read the superblock at `hash_offset` of `hash` and lay out its tree,
/// checking that the hash source holds the whole tree.
pub fn geometry_from_superblock(hash: &dyn ReadAt, hash_offset: u64) -> Result<Geometry> {
    let mut raw = [0u8; SUPERBLOCK_SIZE];
    hash.read_exact_at(&mut raw, hash_offset).map_err(|e| {
        Error::io(
            format!("reading the verity superblock at offset {hash_offset}"),
            e,
        )
    })?;
    let sb = Superblock::parse(&raw)?;
    let geometry = Geometry::new(sb.params, hash_offset, true)?;
    check_sizes(None, hash, &geometry)?;
    Ok(geometry)
}

/// Refuse sources too small for the geometry, before anything is trusted.
pub(crate) fn check_sizes(
    data: Option<&dyn ReadAt>,
    hash: &dyn ReadAt,
    geometry: &Geometry,
) -> Result<()> {
    let hash_size = hash
        .size()
        .map_err(|e| Error::io("reading the hash source size", e))?;
    if hash_size < geometry.hash_end() {
        return Err(Error::invalid(format!(
            "hash tree needs {} bytes up to offset {} but the hash source has {hash_size}",
            geometry.hash_area_size(),
            geometry.hash_end()
        )));
    }
    if let Some(data) = data {
        let data_size = data
            .size()
            .map_err(|e| Error::io("reading the data size", e))?;
        if data_size < geometry.data_size() {
            return Err(Error::invalid(format!(
                "tree covers {} data bytes but the image has only {data_size}",
                geometry.data_size()
            )));
        }
    }
    Ok(())
}

/// Check every block of `data` and of the stored tree in `hash` against
/// `root`, like `veritysetup verify`. The first bad block is named in a
/// [`Error::Mismatch`].
pub fn verify_image(
    data: &dyn ReadAt,
    hash: &dyn ReadAt,
    geometry: &Geometry,
    root: &RootHash,
) -> Result<()> {
    check_sizes(Some(data), hash, geometry)?;
    let params = geometry.params();
    let hbs = params.hash_block_size as usize;
    // Read the stored levels; their size was checked against the file.
    let mut stored: Vec<Vec<u8>> = Vec::with_capacity(geometry.levels().len());
    for (i, level) in geometry.levels().iter().enumerate() {
        let len = usize::try_from(level.blocks * hbs as u64)
            .map_err(|_| Error::invalid("hash level does not fit in memory"))?;
        let mut bytes = vec![0u8; len];
        hash.read_exact_at(&mut bytes, level.offset)
            .map_err(|e| Error::io(format!("reading hash level {i}"), e))?;
        stored.push(bytes);
    }
    // Top down: each stored block must hash to its entry one level up.
    if let Some(top) = stored.last() {
        if params.digest(top) != root.0 {
            return Err(Error::Mismatch(format!(
                "root hash mismatch: the tree's top level does not hash to {root}"
            )));
        }
    }
    for i in (0..stored.len().saturating_sub(1)).rev() {
        let parent = &stored[i + 1];
        for (j, block) in stored[i].chunks_exact(hbs).enumerate() {
            let (p, range) = geometry.parent_entry(j as u64);
            let at = p as usize * hbs;
            if params.digest(block)[..] != parent[at..at + hbs][range] {
                return Err(Error::Mismatch(format!(
                    "hash block {j} of level {i} does not match its parent"
                )));
            }
        }
    }
    // Then the data, hashed on every core and compared with level 0.
    let Some(level0) = stored.first() else {
        let mut block = vec![0u8; params.data_block_size as usize];
        data.read_exact_at(&mut block, 0)
            .map_err(|e| Error::io("reading data block 0", e))?;
        if params.digest(&block) != root.0 {
            return Err(Error::Mismatch(
                "data block 0 does not match the root hash".into(),
            ));
        }
        return Ok(());
    };
    let computed = hash_level(
        data,
        params.data_block_size as usize,
        params.data_blocks,
        params,
        geometry.bits(),
        default_threads(),
    )?;
    if computed != *level0 {
        let first = computed
            .iter()
            .zip(level0)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        let slot = (first % hbs) / DIGEST_SIZE;
        if slot >= 1 << geometry.bits() {
            return Err(Error::Mismatch(format!(
                "hash block {} of level 0 has non-zero padding",
                first / hbs
            )));
        }
        let block = ((first / hbs) as u64) << geometry.bits() | slot as u64;
        return Err(Error::Mismatch(format!(
            "data block {block} (offset {}) does not match its hash",
            block * u64::from(params.data_block_size)
        )));
    }
    Ok(())
}

/// How to format a tree, with veritysetup's defaults.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    /// Data block size in bytes (default 4096).
    pub data_block_size: u32,
    /// Hash block size in bytes (default 4096).
    pub hash_block_size: u32,
    /// Salt; `None` makes 32 random bytes like veritysetup.
    pub salt: Option<Vec<u8>>,
    /// Uuid for the superblock; `None` makes a random one.
    pub uuid: Option<[u8; 16]>,
    /// Write a superblock in front of the tree (veritysetup's default).
    pub superblock: bool,
    /// Number of data blocks to cover; `None` covers the whole image, whose
    /// size must then be a multiple of the data block size.
    pub data_blocks: Option<u64>,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            data_block_size: 4096,
            hash_block_size: 4096,
            salt: None,
            uuid: None,
            superblock: true,
            data_blocks: None,
        }
    }
}

/// What [`format_image`] made.
#[derive(Debug, Clone)]
pub struct FormatReport {
    /// The root hash to trust or sign.
    pub root_hash: RootHash,
    /// Where the hash area starts in the hash file or image.
    pub hash_offset: u64,
    /// The tree's parameters and uuid.
    pub superblock: Superblock,
    /// Bytes of the hash area, superblock included.
    pub hash_area_size: u64,
}

fn same_file(a: &File, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Compute the tree of `image` and write it to `hash_file` or, when that is
/// `None` (or the image itself), append it to the image at `hash_offset`
/// (default: the image size rounded up to 4096 bytes or the hash block
/// size). A separate hash file is created, and truncated unless a
/// `hash_offset` places the tree inside it. Nothing else is written.
pub fn format_image(
    image: &Path,
    hash_file: Option<&Path>,
    hash_offset: Option<u64>,
    opts: &FormatOptions,
) -> Result<FormatReport> {
    let show = image.display();
    let probe = File::open(image).map_err(|e| Error::io(format!("opening {show}"), e))?;
    // The image named as its own hash file means appending to it.
    let hash_file = match hash_file {
        Some(path) if same_file(&probe, path) => {
            if hash_offset.is_none() {
                return Err(Error::invalid(format!(
                    "hash file {} is the image itself: give --hash-offset or leave it out to append",
                    path.display()
                )));
            }
            None
        }
        other => other,
    };
    drop(probe);
    let data = OpenOptions::new()
        .read(true)
        .write(hash_file.is_none())
        .open(image)
        .map_err(|e| Error::io(format!("opening {show}"), e))?;
    let size =
        ReadAt::size(&data).map_err(|e| Error::io(format!("reading the size of {show}"), e))?;
    let dbs = u64::from(opts.data_block_size);
    let data_blocks = match opts.data_blocks {
        Some(n) => n,
        None if dbs != 0 && size.is_multiple_of(dbs) => size / dbs,
        None => {
            return Err(Error::invalid(format!(
                "{show}: size {size} is not a multiple of the data block size {dbs}"
            )))
        }
    };
    let salt = match &opts.salt {
        Some(s) => s.clone(),
        None => {
            let mut s = vec![0u8; 32];
            getrandom::getrandom(&mut s)
                .map_err(|e| Error::io("reading random bytes", std::io::Error::other(e)))?;
            s
        }
    };
    let params = VerityParams {
        data_block_size: opts.data_block_size,
        hash_block_size: opts.hash_block_size,
        data_blocks,
        salt,
    };
    params.validate()?;
    let data_size = params.data_size()?;
    if data_size > size {
        return Err(Error::invalid(format!(
            "{show} has {size} bytes, fewer than {data_blocks} blocks of {dbs}"
        )));
    }
    let align = u64::from(opts.hash_block_size).max(4096);
    let offset = match (hash_file, hash_offset) {
        (Some(_), Some(off)) => off,
        (Some(_), None) => 0,
        (None, Some(off)) => off,
        (None, None) => size
            .checked_next_multiple_of(align)
            .ok_or_else(|| Error::invalid("image too large"))?,
    };
    if hash_file.is_none() && offset < data_size {
        return Err(Error::invalid(format!(
            "hash offset {offset} overlaps the data area (ends at {data_size})"
        )));
    }
    let geometry = Geometry::new(params, offset, opts.superblock)?;
    let uuid = match opts.uuid {
        Some(u) => u,
        None => random_uuid()?,
    };
    let tree = compute_tree(&data, geometry, uuid)?;
    match hash_file {
        Some(path) => {
            let out = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(hash_offset.is_none())
                .open(path)
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
            tree.write_to(&out)?;
        }
        None => tree.write_to(&data)?,
    }
    Ok(FormatReport {
        root_hash: tree.root_hash(),
        hash_offset: offset,
        hash_area_size: tree.geometry().hash_area_size(),
        superblock: tree.superblock(),
    })
}
