//! The image file as the reader sees it ([`ReadAt`]), arranged so that the
//! page cache does not hold the image beside the files decoded from it.
//!
//! The kernel caches what a READ returns in the FUSE file's own pages. If
//! the bytes it was decoded from also stayed in the image file's pages, a
//! cold read of everything would cache the data twice, as the kernel's own
//! loop mount does (about 190 MiB of a 199 MiB Debian image stay cached
//! after reading every file through it). So the server drives the image's
//! page cache itself instead of leaving it to the kernel's readahead:
//!
//! - Kernel readahead is off (`POSIX_FADV_RANDOM`). Metadata and data
//!   blocks are interleaved in an image, and readahead on metadata reads
//!   pulls the data around them in; on that Debian image a cold stat walk
//!   alone cached 72 MiB of it for 9 MiB of metadata.
//! - Metadata (inodes, directories, xattrs, compression indexes) stays
//!   cached, as lookups and listings want it. A metadata read that misses
//!   the page cache (`preadv2(RWF_NOWAIT)` tells) fetches the aligned
//!   [`META_WINDOW`] around it (`POSIX_FADV_WILLNEED`): neighbouring inodes
//!   come with it. The 4 KiB blocks metadata reads touch are also kept in
//!   the server ([`META_CACHE_BYTES`]), so reading an inode next to one
//!   read before costs no system call.
//! - Data read to serve a READ (the thread-local flag set by
//!   [`serving_data`]) is fetched with [`DATA_AHEAD`] bytes after it
//!   (`POSIX_FADV_WILLNEED`, asynchronous: the next file of a tree is
//!   usually next on disk; a few such streams are followed at once, as
//!   READs and the pushing of files ahead read in different places), and
//!   dropped from the page cache once read
//!   (`POSIX_FADV_DONTNEED`): it is decoded and cached in the FUSE file.
//!   A read counts as data when it starts on a 512-byte boundary and is at
//!   least 512 bytes long: plain data blocks and pclusters always are,
//!   while the small reads of inline tails and compression indexes in
//!   between are not, and stay cached like other metadata.
//!
//! Measured on that image (cold read of every file, 2 busy cores): 14 MiB
//! of the image stay cached instead of 150 with the kernel's readahead and
//! exact drops, for cold reads up to a fifth slower (the runs were noisy);
//! reading data with `O_DIRECT` instead (no page cache at all, our own
//! windows) was 1.5 to 2 times slower for want of asynchronous readahead.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use erofs::ReadAt;

use immount_sys::fuse as sys;

/// What a metadata read that misses the page cache fetches around itself:
/// on the Debian image, a cold stat walk leaves 18 MiB of the image cached
/// with 64 KiB (14 with 32, 24 with 128).
pub const META_WINDOW: u64 = 64 * 1024;
/// How far past a data read to fetch ahead. Cold reads of every file of
/// the Debian image through the mount, alternated six times on a busy
/// machine: 2 MiB took a median 0.82 s in 950 disk reads, 512 KiB 0.95 s
/// in 1,500 (the disk's own readahead, which the kernel's loop mount
/// rides on, is 2.5 MiB).
pub const DATA_AHEAD: u64 = 2 * 1024 * 1024;
/// A small image is fetched ahead in smaller steps: a sixteenth of it, at
/// least this much. Fetched ahead is what another stream may have read
/// and dropped already (READs and the pushing of files ahead read the same
/// data), and 2 MiB of that is a third of a 6 MiB image.
const MIN_DATA_AHEAD: u64 = 64 * 1024;
/// The unit of the metadata cache.
const META_BLOCK: u64 = 4096;
/// Memory for metadata blocks kept in the server itself. Inodes, directory
/// blocks and xattrs are read many times over (a cold stat walk of the
/// Debian image made seven metadata reads per request, each a system call
/// that a seccomp filter also pays for); the whole metadata of that image
/// is 9 MiB.
pub const META_CACHE_BYTES: usize = 16 << 20;
/// Shards of the metadata cache, so that worker threads rarely wait on
/// each other.
const META_SHARDS: usize = 16;

/// Metadata blocks by index, least recently used evicted in halves per
/// shard (amortised O(1) per insert).
#[derive(Debug)]
struct MetaCache {
    shards: Vec<Mutex<MetaShard>>,
    per_shard: usize,
}

#[derive(Debug, Default)]
struct MetaShard {
    blocks: HashMap<u64, (Arc<[u8]>, u64)>,
    clock: u64,
}

impl MetaCache {
    fn new(bytes: usize) -> MetaCache {
        MetaCache {
            shards: (0..META_SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: (bytes / META_BLOCK as usize / META_SHARDS).max(4),
        }
    }

    fn shard(&self, index: u64) -> std::sync::MutexGuard<'_, MetaShard> {
        // Neighbouring blocks land in different shards.
        let i = (index % META_SHARDS as u64) as usize;
        // A poisoned shard holds only whole blocks read from the image.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, index: u64) -> Option<Arc<[u8]>> {
        let mut shard = self.shard(index);
        shard.clock += 1;
        let now = shard.clock;
        let (bytes, stamp) = shard.blocks.get_mut(&index)?;
        *stamp = now;
        Some(Arc::clone(bytes))
    }

    fn insert(&self, index: u64, bytes: Arc<[u8]>) {
        let mut shard = self.shard(index);
        if shard.blocks.len() >= self.per_shard {
            let mut stamps: Vec<u64> = shard.blocks.values().map(|(_, t)| *t).collect();
            let mid = stamps.len() / 2;
            let (_, &mut cutoff, _) = stamps.select_nth_unstable(mid);
            shard.blocks.retain(|_, (_, t)| *t > cutoff);
        }
        shard.clock += 1;
        let now = shard.clock;
        shard.blocks.insert(index, (bytes, now));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        (0..META_SHARDS as u64)
            .map(|i| self.shard(i).blocks.len())
            .sum()
    }
}

/// Data streams followed at once: the reads of one walk through the tree
/// come from READs and from the thread that pushes files ahead
/// (crate::push), in two places of the image at a time, and a file read
/// with readahead adds one more. With a single stream each would restart
/// the other's, fetching 2 MiB anew at every switch.
const STREAMS: usize = 4;

/// Where each stream's data fetched ahead ends, least recently used first
/// to go.
#[derive(Debug, Default)]
struct Streams {
    /// (end of what was fetched, last use).
    ahead: [(u64, u64); STREAMS],
    clock: u64,
}

impl Streams {
    /// A data read of `[offset, end)`, fetching `ahead` bytes past it: the
    /// range to fetch, if any. A read within the last `2 * ahead` before a
    /// stream's end continues it; any other read starts a stream in place
    /// of the least recently used one.
    fn advance(&mut self, offset: u64, end: u64, ahead: u64) -> Option<(u64, u64)> {
        self.clock += 1;
        let target = end.saturating_add(ahead);
        let near = |until: u64| offset <= until && offset >= until.saturating_sub(2 * ahead);
        let (slot, from) = match self.ahead.iter().position(|&(until, _)| near(until)) {
            Some(i) => {
                let until = self.ahead[i].0;
                self.ahead[i].1 = self.clock;
                // The same stream: fetch only what is not on its way yet.
                if end.saturating_add(ahead / 2) <= until {
                    return None;
                }
                (i, until)
            }
            None => {
                let (i, _) = self
                    .ahead
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, &(_, used))| used)?;
                (i, offset)
            }
        };
        self.ahead[slot] = (target, self.clock);
        Some((from, target))
    }
}

/// The smallest read counted as data (see the module docs).
const MIN_DATA_READ: usize = 512; // a power of two

thread_local! {
    /// Set while this thread serves a READ.
    static SERVING_DATA: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with reads on this thread counted as file data (see the module
/// docs).
pub fn serving_data<T>(f: impl FnOnce() -> T) -> T {
    SERVING_DATA.with(|s| s.set(true));
    let r = f();
    SERVING_DATA.with(|s| s.set(false));
    r
}

/// An image (or extra device) file: metadata kept in the page cache, data
/// passed through it (see the module docs).
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    size: u64,
    /// Whether reads fetch around and ahead of themselves; off with
    /// `low_memory`, or once the filesystem refuses `RWF_NOWAIT`.
    prefetch: AtomicBool,
    /// The streams of data reads being fetched ahead (see
    /// [`ImageFile::fetch_ahead`]).
    streams: Mutex<Streams>,
    /// How far past a data read to fetch: [`DATA_AHEAD`], less for a small
    /// image (see [`MIN_DATA_AHEAD`]).
    data_ahead: u64,
    /// Metadata blocks read already (none with `low_memory`).
    meta: Option<MetaCache>,
}

impl ImageFile {
    /// Open `path` read-only. With `low_memory`, nothing is fetched beyond
    /// what is read: least memory, slowest cold reads.
    pub fn open(path: &Path, low_memory: bool) -> io::Result<ImageFile> {
        ImageFile::from_file(File::open(path)?, low_memory)
    }

    /// Like [`ImageFile::open`] for a file opened elsewhere (a descriptor
    /// passed by a client of the delegation daemon).
    pub fn from_file(file: File, low_memory: bool) -> io::Result<ImageFile> {
        let size = ReadAt::size(&file)?;
        // Advice only: a failure changes nothing but memory use.
        let _ = sys::fadvise_random(file.as_fd());
        Ok(ImageFile {
            file,
            size,
            prefetch: AtomicBool::new(!low_memory),
            streams: Mutex::default(),
            data_ahead: (size / 16).clamp(MIN_DATA_AHEAD, DATA_AHEAD),
            meta: (!low_memory).then(|| MetaCache::new(META_CACHE_BYTES)),
        })
    }

    /// The descriptor the image is read from, for a sandbox to keep.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A metadata read, served from [`MetaCache`] blocks where it can be.
    fn read_metadata(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(cache) = &self.meta else {
            return self.read_metadata_uncached(buf, offset);
        };
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let mut at = offset;
        while at < end {
            let index = at / META_BLOCK;
            let start = index * META_BLOCK;
            let block = match cache.get(index) {
                Some(b) => b,
                None => {
                    // The whole block (shorter at the file's end).
                    let len = META_BLOCK.min(self.size - start) as usize;
                    let mut bytes = vec![0u8; len];
                    self.read_metadata_uncached(&mut bytes, start)?;
                    let bytes: Arc<[u8]> = bytes.into();
                    cache.insert(index, Arc::clone(&bytes));
                    bytes
                }
            };
            let from = (at - start) as usize;
            let n = (block.len() - from).min((end - at) as usize);
            let to = (at - offset) as usize;
            buf[to..to + n].copy_from_slice(&block[from..from + n]);
            at += n as u64;
        }
        Ok(())
    }

    fn read_metadata_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        if self.prefetch.load(Ordering::Relaxed) {
            match sys::pread_cached(self.file.as_fd(), buf, offset) {
                Ok(n) if n == buf.len() => return Ok(()),
                Ok(n) => {
                    done = n;
                    let at = offset + n as u64;
                    let start = at - at % META_WINDOW;
                    let _ = sys::fadvise_willneed(self.file.as_fd(), start, META_WINDOW);
                }
                // The filesystem cannot say what is cached: plain reads.
                Err(_) => self.prefetch.store(false, Ordering::Relaxed),
            }
        }
        FileExt::read_exact_at(&self.file, &mut buf[done..], offset + done as u64)
    }

    /// Keep [`DATA_AHEAD`] bytes past `end` on their way into the page
    /// cache. Topped up only once half of it is used, so that the disk sees
    /// a few large requests rather than one small one per file.
    fn fetch_ahead(&self, offset: u64, end: u64) {
        // A poisoned table holds only positions: still fine advice.
        let fetch = self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .advance(offset, end, self.data_ahead);
        if let Some((from, to)) = fetch {
            let _ = sys::fadvise_willneed(self.file.as_fd(), from, to - from);
        }
    }

    fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        if self.prefetch.load(Ordering::Relaxed) {
            self.fetch_ahead(offset, offset.saturating_add(len));
        }
        FileExt::read_exact_at(&self.file, buf, offset)?;
        // Only pages wholly inside the range go, so metadata sharing a page
        // with the data stays cached.
        let _ = sys::fadvise_dontneed(self.file.as_fd(), offset, len);
        Ok(())
    }
}

impl ReadAt for ImageFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let is_data = SERVING_DATA.with(Cell::get)
            && buf.len() >= MIN_DATA_READ
            && offset & (MIN_DATA_READ as u64 - 1) == 0;
        if is_data {
            self.read_data(buf, offset)
        } else {
            self.read_metadata(buf, offset)
        }
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// Every kind of read returns the file's bytes, as metadata or data,
    /// cached or not, up to the file's end, with or without fetching ahead.
    #[test]
    fn reads_match_the_file_whatever_the_path() {
        let dir = std::env::temp_dir().join(format!("immount-imagefile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let len = 3 * META_WINDOW as usize + 1234;
        let bytes = pattern(len);
        std::fs::write(&path, &bytes).unwrap();
        for low_memory in [false, true] {
            let f = ImageFile::open(&path, low_memory).unwrap();
            let cases: &[(u64, usize)] = &[
                (0, 100),
                (512, 512),
                (4096, 8192),
                (META_WINDOW - 1024, 4096),
                (META_WINDOW, META_WINDOW as usize),
                (3 * 512, 2 * META_WINDOW as usize + 77),
                (len as u64 - 1234, 1234),
                (len as u64 - 512 - 1234, 1234 + 512),
            ];
            for &(off, n) in cases {
                for data in [false, true] {
                    let mut buf = vec![0u8; n];
                    let mut read = || ReadAt::read_exact_at(&f, &mut buf, off);
                    if data {
                        serving_data(read).unwrap();
                    } else {
                        read().unwrap();
                    }
                    assert_eq!(
                        buf,
                        bytes[off as usize..off as usize + n],
                        "{off}+{n} data={data}"
                    );
                }
            }
            // Past the end is an error, not a short or padded read.
            let mut buf = vec![0u8; 1024];
            assert!(
                serving_data(|| ReadAt::read_exact_at(&f, &mut buf, len as u64 - 512)).is_err()
            );
            let mut big = vec![0u8; 2 * META_WINDOW as usize];
            assert!(serving_data(|| ReadAt::read_exact_at(&f, &mut big, 2 * META_WINDOW)).is_err());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Metadata blocks are read from the file once: a changed file does not
    /// show through a block read before, while data reads still go to it.
    #[test]
    fn metadata_blocks_are_read_once() {
        let dir = std::env::temp_dir().join(format!("immount-metacache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let bytes = pattern(5 * 4096 + 100);
        std::fs::write(&path, &bytes).unwrap();
        let f = ImageFile::open(&path, false).unwrap();
        let mut inode = [0u8; 64];
        ReadAt::read_exact_at(&f, &mut inode, 4096 + 128).unwrap();
        assert_eq!(inode[..], bytes[4096 + 128..4096 + 192]);
        // Across a block boundary and up to the file's short last block.
        let mut across = vec![0u8; 4096 + 200];
        ReadAt::read_exact_at(&f, &mut across, 4 * 4096 - 100).unwrap();
        assert_eq!(across[..], bytes[4 * 4096 - 100..]);
        std::fs::write(&path, vec![0xeeu8; bytes.len()]).unwrap();
        let mut again = [0u8; 64];
        ReadAt::read_exact_at(&f, &mut again, 4096 + 1000).unwrap();
        assert_eq!(again[..], bytes[4096 + 1000..4096 + 1064]);
        let mut data = vec![0u8; 4096];
        serving_data(|| ReadAt::read_exact_at(&f, &mut data, 4096)).unwrap();
        assert_eq!(data, vec![0xeeu8; 4096]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two sequential readers interleaved each keep their stream: after
    /// its first read a stream is fetched from where its last fetch ended,
    /// never restarted at the read; a fifth stream displaces the least
    /// recently used one only.
    #[test]
    fn interleaved_streams_do_not_restart_each_other() {
        let mut s = Streams::default();
        let (a, b) = (0u64, 1 << 30);
        assert_eq!(
            s.advance(a, a + 65536, DATA_AHEAD),
            Some((a, a + 65536 + DATA_AHEAD))
        );
        assert_eq!(
            s.advance(b, b + 4096, DATA_AHEAD),
            Some((b, b + 4096 + DATA_AHEAD))
        );
        let mut fetched = [a + 65536 + DATA_AHEAD, b + 4096 + DATA_AHEAD];
        let mut pos = [a + 65536, b + 4096];
        for step in 0..400u64 {
            let k = (step % 2) as usize;
            let len = 65536 + (step % 5) * 4096;
            match s.advance(pos[k], pos[k] + len, DATA_AHEAD) {
                None => assert!(pos[k] + len + DATA_AHEAD / 2 <= fetched[k]),
                Some((from, to)) => {
                    assert_eq!(from, fetched[k], "stream {k} restarted at step {step}");
                    assert_eq!(to, pos[k] + len + DATA_AHEAD);
                    fetched[k] = to;
                }
            }
            pos[k] += len;
        }
        // Three more streams: the third displaces neither a nor b, which
        // are in use; a fourth new one displaces the oldest.
        for (i, c) in [(0u64, 3u64 << 30), (1, 4 << 30)] {
            assert_eq!(
                s.advance(c, c + 4096, DATA_AHEAD).map(|r| r.0),
                Some(c),
                "new stream {i}"
            );
        }
        assert_eq!(
            s.advance(pos[0], pos[0] + 4096, DATA_AHEAD).map(|r| r.0),
            Some(fetched[0]).filter(|_| pos[0] + 4096 + DATA_AHEAD / 2 > fetched[0])
        );
        let e = 5u64 << 30;
        s.advance(e, e + 4096, DATA_AHEAD);
        // b was the least recently used: it starts over where it is read.
        assert_eq!(
            s.advance(pos[1], pos[1] + 4096, DATA_AHEAD),
            Some((pos[1], pos[1] + 4096 + DATA_AHEAD))
        );
    }

    /// The cache stays within its budget however much is read.
    #[test]
    fn the_metadata_cache_is_bounded() {
        let cache = MetaCache::new(64 * 4096);
        for i in 0..10_000u64 {
            if cache.get(i % 300).is_none() {
                cache.insert(i % 300, vec![0u8; 16].into());
            }
            assert!(cache.len() <= 64, "{} blocks after {i}", cache.len());
        }
        // The most recent block is still there.
        assert!(cache.get(9_999 % 300).is_some());
    }
}
