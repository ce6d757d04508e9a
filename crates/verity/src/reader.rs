//! [`VerifiedReader`]: positional reads that only ever return bytes whose
//! hashes chain up to the trusted root hash.
//!
//! Every read hashes each data block it reads from the image: the bytes
//! handed out are the bytes that were hashed (or a kept copy of them), so
//! changing the image after it was opened cannot slip anything past.
//!
//! Hash blocks: when the tree fits the memory budget (16 MiB of tree covers
//! 2 GiB of data), the whole tree is read at open in one sequential read,
//! checked top-down once, and its lowest level kept as an immutable copy, so
//! checking a data block is one hash and one compare: no lock, no I/O, and
//! no shared counter that every FUSE thread would write, and none of the
//! lazy path's synchronous 4 KiB reads of hash blocks (the server reads the
//! hash file without kernel readahead) in the middle of a READ. On a
//! 191 MiB Debian image read cold through the mount, both paths measured
//! the same within the noise of a shared machine: what verity costs there
//! is the hashing itself (sha256 with SHA-NI, about 0.17 s of CPU for the
//! image). Larger trees keep the lazy path: hash blocks verified on demand,
//! up the tree to the root, and kept in a bounded cache of verified copies.
//!
//! Reads smaller than a block (the parser's metadata reads) go through a
//! small cache of verified data blocks, so reading an inode after its
//! neighbour does not hash the block again. No cache ever holds bytes that
//! did not verify.
//!
//! With [`VerifiedReader::with_hash_ahead`] (the FUSE server), a thread
//! reads and verifies the data after each sequential read, so that the
//! next read copies verified bytes instead of hashing while the program
//! reading the mount waits (see [`crate::ahead`]).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use erofs::ReadAt;

use crate::ahead::{Ahead, ReadScope, VerifyRead};
use crate::geometry::Geometry;
use crate::root_hash::RootHash;
use crate::tree::check_sizes;
use crate::{Error, Result};

/// Default memory for verified hash blocks: 16 MiB, which covers 2 GiB of
/// data at level 0 with 4 KiB blocks. A tree (all levels) no larger than the
/// budget is loaded whole at open; a larger one is cached block by block.
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;

/// Memory for verified data blocks that served partial-block reads.
pub const DATA_CACHE_BYTES: usize = 1 << 20;

/// A verified hash block and when it was last used.
#[derive(Debug)]
struct Entry {
    bytes: Arc<[u8]>,
    last_used: AtomicU64,
}

/// Verified hash blocks keyed by (level, index), least recently used
/// evicted in batches so the cost per insert stays constant.
#[derive(Debug)]
struct HashCache {
    map: RwLock<HashMap<(usize, u64), Entry>>,
    clock: AtomicU64,
    capacity: usize,
}

impl HashCache {
    fn new(capacity: usize) -> Self {
        HashCache {
            map: RwLock::new(HashMap::new()),
            clock: AtomicU64::new(0),
            capacity: capacity.max(8),
        }
    }

    fn get(&self, key: (usize, u64)) -> Option<Arc<[u8]>> {
        // A poisoned lock still guards only verified blocks: keep using it.
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let entry = map.get(&key)?;
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        entry.last_used.store(now, Ordering::Relaxed);
        Some(Arc::clone(&entry.bytes))
    }

    fn insert(&self, key: (usize, u64), bytes: Arc<[u8]>) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.capacity {
            // Drop the older half: amortised O(1) per insert.
            let mut stamps: Vec<u64> = map
                .values()
                .map(|e| e.last_used.load(Ordering::Relaxed))
                .collect();
            let mid = stamps.len() / 2;
            let (_, &mut cutoff, _) = stamps.select_nth_unstable(mid);
            map.retain(|_, e| e.last_used.load(Ordering::Relaxed) > cutoff);
        }
        map.insert(
            key,
            Entry {
                bytes,
                last_used: AtomicU64::new(now),
            },
        );
    }

    fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Where the verified digests of data blocks come from.
#[derive(Debug)]
enum LowestLevel {
    /// The tree was read and checked whole at open (it fit the budget).
    Loaded(LoadedLevel),
    /// Hash blocks are read and checked on demand, and cached.
    Lazy(HashCache),
}

/// The lowest level of a tree checked whole at open.
#[derive(Debug)]
struct LoadedLevel {
    /// The level's bytes, `blocks * hash_block_size`. Only blocks not in
    /// `bad` verified; the others are kept for their offsets' sake only.
    bytes: Box<[u8]>,
    /// Level-0 blocks that did not verify, with the first corrupt block on
    /// their way to the root (level, index): reads under them fail. Empty
    /// unless the tree was damaged.
    bad: BTreeMap<u64, (usize, u64)>,
}

/// A [`ReadAt`] over the data area of an image that checks every block
/// against a dm-verity hash tree before returning its bytes.
///
/// `R` is the image, `H` the source of the hash tree (the same file when the
/// tree is appended to the image). A block that does not verify makes the
/// read fail with [`io::ErrorKind::InvalidData`] and a message naming the
/// block; reads past the data area fail with
/// [`io::ErrorKind::UnexpectedEof`]. Safe to share between threads.
#[derive(Debug)]
pub struct VerifiedReader<R, H = R> {
    core: Arc<Core<R, H>>,
    /// Verifies ahead of sequential reads, when asked for
    /// ([`VerifiedReader::with_hash_ahead`]).
    ahead: Option<Ahead>,
}

/// The reader proper, shared with the hash-ahead worker.
#[derive(Debug)]
struct Core<R, H> {
    data: R,
    hash: H,
    geometry: Geometry,
    root: RootHash,
    lowest: LowestLevel,
    /// Verified data blocks, keyed by (0, index).
    data_cache: HashCache,
}

impl<R: ReadAt, H: ReadAt> VerifiedReader<R, H> {
    /// Wrap `data` with the tree in `hash` laid out by `geometry`, trusting
    /// `root`. The top of the tree is checked now, so a wrong root hash
    /// fails here rather than on the first read.
    pub fn new(data: R, hash: H, geometry: Geometry, root: RootHash) -> Result<Self> {
        Self::with_cache_bytes(data, hash, geometry, root, DEFAULT_CACHE_BYTES)
    }

    /// Like [`VerifiedReader::new`] with a memory budget for hash blocks:
    /// a tree no larger than `cache_bytes` is read and checked whole now;
    /// a larger one is read block by block and cached within the budget.
    pub fn with_cache_bytes(
        data: R,
        hash: H,
        geometry: Geometry,
        root: RootHash,
        cache_bytes: usize,
    ) -> Result<Self> {
        check_sizes(Some(&data), &hash, &geometry)?;
        let hbs = geometry.params().hash_block_size as usize;
        let data_capacity = DATA_CACHE_BYTES / geometry.params().data_block_size as usize;
        let tree_bytes = geometry
            .levels()
            .last()
            .map_or(0, |top| geometry.hash_end() - top.offset);
        let loaded = !geometry.levels().is_empty() && tree_bytes <= cache_bytes as u64;
        let lowest = if loaded {
            LowestLevel::Loaded(load_tree(&hash, &geometry, &root)?)
        } else {
            LowestLevel::Lazy(HashCache::new(cache_bytes / hbs))
        };
        let reader = Core {
            data,
            hash,
            geometry,
            root,
            lowest,
            data_cache: HashCache::new(data_capacity),
        };
        if loaded {
            return Ok(VerifiedReader {
                core: Arc::new(reader),
                ahead: None,
            });
        }
        match reader.geometry.levels().len() {
            0 => {
                let mut block = vec![0u8; reader.geometry.params().data_block_size as usize];
                reader.read_verified(&mut block, 0)
            }
            n => reader.hash_block(n - 1, 0).map(drop),
        }
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => root_mismatch(&reader.root),
            _ => Error::io("reading the top of the hash tree", e),
        })?;
        Ok(VerifiedReader {
            core: Arc::new(reader),
            ahead: None,
        })
    }

    /// The tree layout.
    pub fn geometry(&self) -> &Geometry {
        &self.core.geometry
    }

    /// The trusted root hash.
    pub fn root_hash(&self) -> RootHash {
        self.core.root
    }

    /// Number of verified hash blocks held in memory: the whole lowest
    /// level when the tree was loaded at open, else those cached.
    pub fn cached_hash_blocks(&self) -> usize {
        match &self.core.lowest {
            LowestLevel::Loaded(level) => {
                level.bytes.len() / self.core.geometry.params().hash_block_size as usize
            }
            LowestLevel::Lazy(cache) => cache.len(),
        }
    }

    /// Whether the whole tree was read and checked at open.
    pub fn tree_loaded(&self) -> bool {
        matches!(self.core.lowest, LowestLevel::Loaded(_))
    }

    /// Verify ahead of sequential reads on a thread of its own (see
    /// [`crate::ahead`]): a read of several whole blocks has the window
    /// after it read and verified in the background, into a bounded store
    /// of verified copies that later reads copy from. The thread starts on
    /// the first such read, and runs its reads inside `scope`.
    pub fn with_hash_ahead(mut self, scope: ReadScope) -> Self
    where
        R: 'static,
        H: 'static,
    {
        let core = Arc::clone(&self.core);
        let verify: VerifyRead = Arc::new(move |buf, offset| core.read_verified(buf, offset));
        let dbs = u64::from(self.core.geometry.params().data_block_size);
        self.ahead = Some(Ahead::new(
            verify,
            scope,
            dbs,
            self.core.geometry.data_size(),
        ));
        self
    }
}

impl<R: ReadAt, H: ReadAt> Core<R, H> {
    /// The verified hash block `index` of `level`, from the cache or read
    /// and checked against its parent (recursively up to the root).
    /// Only used on the lazy path (the cache is its own).
    fn hash_block(&self, level: usize, index: u64) -> io::Result<Arc<[u8]>> {
        let LowestLevel::Lazy(cache) = &self.lowest else {
            return Err(invalid(
                "verity: the hash tree was loaded at open, not cached".into(),
            ));
        };
        if let Some(bytes) = cache.get((level, index)) {
            return Ok(bytes);
        }
        let params = self.geometry.params();
        let info = self.geometry.levels()[level];
        if index >= info.blocks {
            return Err(invalid(format!(
                "hash block {index} of level {level} is outside the tree"
            )));
        }
        let hbs = u64::from(params.hash_block_size);
        let mut bytes = vec![0u8; params.hash_block_size as usize];
        // offset + index * hbs lies below hash_end, which did not overflow.
        let offset = info.offset + index * hbs;
        self.hash.read_exact_at(&mut bytes, offset)?;
        let digest = params.digest(&bytes);
        let ok = if level + 1 == self.geometry.levels().len() {
            digest == self.root.0
        } else {
            let (parent, range) = self.geometry.parent_entry(index);
            let parent_bytes = self.hash_block(level + 1, parent)?;
            parent_bytes[range] == digest
        };
        if !ok {
            return Err(invalid(format!(
                "verity: hash block {index} of level {level} (offset {offset}) is corrupt"
            )));
        }
        let bytes: Arc<[u8]> = bytes.into();
        cache.insert((level, index), Arc::clone(&bytes));
        Ok(bytes)
    }

    /// The verified data block `index`, from the data cache or read, checked
    /// and kept. `want` is the part of it the caller asked for (see
    /// [`VerifiedReader::read_around`]).
    fn verified_data_block(&self, index: u64, want: Range<u64>) -> io::Result<Arc<[u8]>> {
        if let Some(bytes) = self.data_cache.get((0, index)) {
            return Ok(bytes);
        }
        let dbs = self.geometry.params().data_block_size;
        let mut block = vec![0u8; dbs as usize];
        self.read_around(&mut block, index * u64::from(dbs), want)?;
        self.check_blocks(&block, index * u64::from(dbs))?;
        let block: Arc<[u8]> = block.into();
        self.data_cache.insert((0, index), Arc::clone(&block));
        Ok(block)
    }

    /// Fill `buf` (whole blocks from `start`) with the bytes the caller
    /// asked for, `want`, read as asked, and the rest of the blocks read
    /// apart, before and after it.
    ///
    /// Why not one read of the whole blocks: the image file beneath decides
    /// from each read's size and alignment whether it is file data (read
    /// once, then dropped from the page cache) or metadata (kept cached). A
    /// 60-byte inode read widened to its whole block would look like data,
    /// and the metadata around it would be dropped from the page cache and
    /// read from disk again on the next lookup. Read as asked, every piece
    /// is classified as it would be without verity.
    fn read_around(&self, buf: &mut [u8], start: u64, want: Range<u64>) -> io::Result<()> {
        // start <= want.start <= want.end <= start + buf.len(), all within
        // the data area (checked by read_checked), so these fit in usize.
        let head = (want.start - start) as usize;
        let tail = (want.end - start) as usize;
        let (before, rest) = buf.split_at_mut(head);
        let (middle, after) = rest.split_at_mut(tail - head);
        self.data.read_exact_at(middle, want.start)?;
        if !before.is_empty() {
            self.data.read_exact_at(before, start)?;
        }
        if !after.is_empty() {
            self.data.read_exact_at(after, want.end)?;
        }
        Ok(())
    }

    /// Fill `buf`, whose length is a multiple of the data block size, from
    /// the block-aligned `offset`, and check every block.
    fn read_verified(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.data.read_exact_at(buf, offset)?;
        self.check_blocks(buf, offset)
    }

    /// Check the whole data blocks in `buf`, read from the block-aligned
    /// `offset`, against the tree. The blocks are hashed in batches
    /// ([`crate::VerityParams::digest_each`]) but compared in order, so the
    /// error names the first block that fails, as one at a time would.
    fn check_blocks(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let params = self.geometry.params();
        let dbs = params.data_block_size as usize;
        let first = offset / dbs as u64;
        params.digest_each(buf, dbs, |i, digest| {
            let index = first + i as u64;
            let ok = if self.geometry.levels().is_empty() {
                *digest == self.root.0
            } else {
                let (parent, range) = self.geometry.parent_entry(index);
                match &self.lowest {
                    LowestLevel::Loaded(level) => {
                        if let Some(&(l, i)) = level.bad.get(&parent) {
                            return Err(corrupt_hash_block(l, i));
                        }
                        // parent < blocks of level 0, so the entry lies
                        // inside the level; get() all the same.
                        let at = parent as usize * params.hash_block_size as usize;
                        level.bytes.get(at + range.start..at + range.end) == Some(&digest[..])
                    }
                    LowestLevel::Lazy(_) => self.hash_block(0, parent)?[range] == digest[..],
                }
            };
            if ok {
                Ok(())
            } else {
                Err(invalid(format!(
                    "verity: data block {index} (offset {}) does not match its hash",
                    index * dbs as u64
                )))
            }
        })
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn corrupt_hash_block(level: usize, index: u64) -> io::Error {
    invalid(format!(
        "verity: hash block {index} of level {level} is corrupt"
    ))
}

fn root_mismatch(root: &RootHash) -> Error {
    Error::Mismatch(format!(
        "root hash mismatch: the tree does not match {root}"
    ))
}

/// Read every level of the tree in one sequential read and check it from
/// the top down: the top block against `root`, each block of a level below
/// against its parent's digest. A top block that does not match refuses
/// the tree; a lower block that does not match (or whose parent did not)
/// only marks the data under it as unreadable, as on the lazy path.
fn load_tree<H: ReadAt>(hash: &H, geometry: &Geometry, root: &RootHash) -> Result<LoadedLevel> {
    let levels = geometry.levels();
    let (Some(top), Some(lowest)) = (levels.last(), levels.first()) else {
        return Err(Error::invalid("a tree without levels has nothing to load"));
    };
    let params = geometry.params();
    let hbs = params.hash_block_size as usize;
    // Levels lie top first, back to back, up to hash_end (see Geometry).
    let len = usize::try_from(geometry.hash_end() - top.offset)
        .map_err(|_| Error::invalid("hash tree larger than memory"))?;
    let mut area = vec![0u8; len];
    hash.read_exact_at(&mut area, top.offset)
        .map_err(|e| Error::io("reading the hash tree", e))?;
    let level_bytes = |l: usize| -> Result<&[u8]> {
        let level = levels[l];
        let start = usize::try_from(level.offset - top.offset).ok();
        let end = usize::try_from(level.blocks)
            .ok()
            .and_then(|b| b.checked_mul(hbs))
            .zip(start)
            .and_then(|(n, s)| s.checked_add(n));
        start
            .zip(end)
            .and_then(|(s, e)| area.get(s..e))
            .ok_or_else(|| Error::invalid(format!("hash level {l} lies outside the tree")))
    };
    let top_level = levels.len() - 1;
    if params.digest(level_bytes(top_level)?) != root.0 {
        return Err(root_mismatch(root));
    }
    // For the level being checked: the first corrupt ancestor (or the block
    // itself) of each bad block, by index.
    let mut bad: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
    for l in (0..top_level).rev() {
        let parent = level_bytes(l + 1)?;
        let mut bad_here = BTreeMap::new();
        params
            .digest_each(level_bytes(l)?, hbs, |index, digest| {
                let index = index as u64;
                let (p, range) = geometry.parent_entry(index);
                if let Some(&why) = bad.get(&p) {
                    bad_here.insert(index, why);
                } else {
                    let at = p as usize * hbs;
                    if parent.get(at + range.start..at + range.end) != Some(&digest[..]) {
                        bad_here.insert(index, (l, index));
                    }
                }
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap_or_else(|never| match never {});
        bad = bad_here;
    }
    let start = usize::try_from(lowest.offset - top.offset)
        .map_err(|_| Error::invalid("hash level 0 lies outside the tree"))?;
    // Keep only the lowest level: the others served their purpose.
    let bytes = area.split_off(start).into_boxed_slice();
    Ok(LoadedLevel { bytes, bad })
}

impl<R: ReadAt, H: ReadAt> Core<R, H> {
    /// Whether a read of `len` bytes at `offset` is not empty and lies
    /// inside the data area.
    fn inside(&self, len: usize, offset: u64) -> bool {
        len > 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.geometry.data_size())
    }

    /// The body of [`ReadAt::read_exact_at`]; the caller clears `buf` on error.
    fn read_checked(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.geometry.data_size();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at offset {offset} is past the verified data area ({size} bytes)",
                        buf.len()
                    ),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let dbs = u64::from(self.geometry.params().data_block_size);
        let start = offset - offset % dbs;
        let stop = end.next_multiple_of(dbs); // <= size, a multiple of dbs
        if start == offset && stop == end {
            return self.read_verified(buf, offset);
        }
        if stop - start == dbs {
            // Part of one block: serve it from a kept verified copy.
            let block = self.verified_data_block(start / dbs, offset..end)?;
            let skip = (offset - start) as usize;
            buf.copy_from_slice(&block[skip..skip + buf.len()]);
            return Ok(());
        }
        // Unaligned: read whole blocks aside, copy out only if all verify.
        let len = usize::try_from(stop - start).map_err(io::Error::other)?;
        let mut scratch = vec![0u8; len];
        self.read_around(&mut scratch, start, offset..end)?;
        self.check_blocks(&scratch, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&scratch[skip..skip + buf.len()]);
        Ok(())
    }
}

impl<R: ReadAt, H: ReadAt> ReadAt for VerifiedReader<R, H> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let result = match &self.ahead {
            Some(ahead) if self.core.inside(buf.len(), offset) => {
                ahead.read(buf, offset, |b, o| self.core.read_checked(b, o))
            }
            _ => self.core.read_checked(buf, offset),
        };
        if result.is_err() {
            // Never leave unverified bytes behind for a careless caller.
            buf.fill(0);
        }
        result
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.core.geometry.data_size())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use super::*;
    use crate::ahead::{STORE_BYTES, WINDOW};
    use crate::tree::{format_image, geometry_from_superblock, FormatOptions};

    /// An image in memory that can be changed after the reader opened it,
    /// and counts the bytes read from it: all, and those read by the
    /// reader's caller rather than the hash-ahead worker.
    #[derive(Debug)]
    struct Mem {
        bytes: Mutex<Vec<u8>>,
        read: AtomicUsize,
        read_by_caller: AtomicUsize,
    }

    impl ReadAt for Mem {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.read.fetch_add(buf.len(), Ordering::Relaxed);
            if std::thread::current().name() != Some("verity-ahead") {
                self.read_by_caller.fetch_add(buf.len(), Ordering::Relaxed);
            }
            self.bytes.lock().unwrap().read_exact_at(buf, offset)
        }

        fn size(&self) -> io::Result<u64> {
            Ok(self.bytes.lock().unwrap().len() as u64)
        }
    }

    type Reader = VerifiedReader<Arc<Mem>, Vec<u8>>;

    const DBS: usize = 4096;
    const READ: usize = 128 * 1024;

    fn no_scope(f: &mut dyn FnMut()) {
        f()
    }

    /// 8 MiB of data that differs from block to block, its tree, and a
    /// reader with hash-ahead over them.
    fn fixture() -> (Vec<u8>, Arc<Mem>, Reader) {
        let data: Vec<u8> = (0..8usize << 20)
            .map(|i| (i.wrapping_mul(31) ^ (i >> 12)) as u8)
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let (img, tree) = (dir.path().join("img"), dir.path().join("tree"));
        std::fs::write(&img, &data).unwrap();
        let report = format_image(&img, Some(&tree), None, &FormatOptions::default()).unwrap();
        let hash = std::fs::read(&tree).unwrap();
        let geometry = geometry_from_superblock(&hash, 0).unwrap();
        let mem = Arc::new(Mem {
            bytes: Mutex::new(data.clone()),
            read: AtomicUsize::new(0),
            read_by_caller: AtomicUsize::new(0),
        });
        let reader = VerifiedReader::new(Arc::clone(&mem), hash, geometry, report.root_hash)
            .unwrap()
            .with_hash_ahead(no_scope);
        (data, mem, reader)
    }

    fn ahead<R, H>(reader: &VerifiedReader<R, H>) -> &Ahead {
        reader.ahead.as_ref().unwrap()
    }

    /// A sequential read returns the image's bytes, and once the worker has
    /// verified the window, the next reads copy from the store without
    /// reading the image.
    #[test]
    fn sequential_reads_are_served_from_verified_copies() {
        let (data, mem, reader) = fixture();
        let mut buf = vec![0u8; READ];
        let mut served_from_store = 0;
        for at in (0..data.len()).step_by(READ) {
            ahead(&reader).wait_idle();
            let before = mem.read_by_caller.load(Ordering::Relaxed);
            reader.read_exact_at(&mut buf, at as u64).unwrap();
            assert!(buf == data[at..at + READ], "bytes at {at}");
            if mem.read_by_caller.load(Ordering::Relaxed) == before {
                served_from_store += 1;
            }
            assert!(ahead(&reader).stored_bytes() <= STORE_BYTES);
        }
        // All but the first read found their bytes verified ahead.
        assert_eq!(served_from_store, data.len() / READ - 1);
        // Every block was read once: the worker's copies were used, not
        // read again.
        ahead(&reader).wait_idle();
        assert_eq!(mem.read.load(Ordering::Relaxed), data.len());
        assert_eq!(mem.read_by_caller.load(Ordering::Relaxed), READ);
    }

    /// Reads the size of files (each from a block boundary, most ending
    /// inside a block) and small reads inside blocks return the image's
    /// bytes, and a sequence of them is served from the store.
    #[test]
    fn unaligned_reads_are_served_too() {
        let (data, mem, reader) = fixture();
        let mut at = 0usize;
        let mut i = 0usize;
        while at + 3 * READ < data.len() {
            ahead(&reader).wait_idle();
            let len = [5000, 2 * DBS, 100, 3 * DBS + 1, 70_000, 1][i % 6];
            let mut buf = vec![0u8; len];
            reader.read_exact_at(&mut buf, at as u64).unwrap();
            assert!(buf == data[at..at + len], "{len} bytes at {at}");
            // An inode-sized read in the middle of the next block.
            let mut small = [0u8; 64];
            let inner = at + len.next_multiple_of(DBS) + 128;
            reader.read_exact_at(&mut small, inner as u64).unwrap();
            assert!(small == data[inner..inner + 64], "64 bytes at {inner}");
            at += len.next_multiple_of(DBS);
            i += 1;
        }
        ahead(&reader).wait_idle();
        // The caller read the first piece; the worker nearly all the rest.
        let by_caller = mem.read_by_caller.load(Ordering::Relaxed);
        assert!(
            by_caller < at / 4,
            "{by_caller} of {at} bytes read by the caller"
        );
    }

    /// A block corrupted in the window ahead is never stored: the read that
    /// covers it fails and returns no bytes, while the reads around it, from
    /// the store or not, still return the right bytes.
    #[test]
    fn a_corrupt_block_ahead_fails_the_read_that_covers_it() {
        let (data, mem, reader) = fixture();
        let bad = 3 * READ + 5 * DBS + 17;
        mem.bytes.lock().unwrap()[bad] ^= 0x40;
        let mut buf = vec![0u8; READ];
        for at in (0..6 * READ).step_by(READ) {
            ahead(&reader).wait_idle();
            let r = reader.read_exact_at(&mut buf, at as u64);
            if (at..at + READ).contains(&bad) {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                assert!(buf.iter().all(|&b| b == 0), "bytes handed out at {at}");
            } else {
                r.unwrap();
                assert!(buf == data[at..at + READ], "bytes at {at}");
            }
        }
        // A one-block read of the bad block fails too.
        let mut block = vec![0u8; DBS];
        let e = reader
            .read_exact_at(&mut block, (bad - bad % DBS) as u64)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    /// Bytes verified ahead are the bytes handed out: changing the image
    /// after the worker checked a chunk does not show through it, and a
    /// chunk changed before the worker reads it fails.
    #[test]
    fn verified_copies_are_what_was_hashed() {
        let (data, mem, reader) = fixture();
        let mut buf = vec![0u8; READ];
        reader.read_exact_at(&mut buf, 0).unwrap();
        ahead(&reader).wait_idle();
        assert!(ahead(&reader).stored_bytes() >= WINDOW as usize);
        // Tamper with the next read's bytes, now in the store.
        mem.bytes.lock().unwrap()[READ + 100] ^= 1;
        reader.read_exact_at(&mut buf, READ as u64).unwrap();
        assert!(buf == data[READ..2 * READ]);
    }

    /// However the reads jump about, the store stays within its bound and
    /// every read returns the image's bytes.
    #[test]
    fn the_store_stays_within_its_bound() {
        let (data, _mem, reader) = fixture();
        let mut buf = vec![0u8; 2 * DBS];
        let blocks = data.len() / DBS;
        // A stride that visits blocks out of order and never consumes what
        // was verified ahead of it.
        for i in 0..100usize {
            let at = (i * 397 % (blocks - 2)) * DBS;
            reader.read_exact_at(&mut buf, at as u64).unwrap();
            assert!(buf == data[at..at + 2 * DBS], "bytes at {at}");
            let stored = ahead(&reader).stored_bytes();
            assert!(stored <= STORE_BYTES, "{stored} bytes stored");
        }
        ahead(&reader).wait_idle();
        assert!(ahead(&reader).stored_bytes() <= STORE_BYTES);
        // Dropping the reader stops and joins the worker (no hang).
        drop(reader);
    }
}
