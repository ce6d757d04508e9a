//! Readahead across files: when a file of a directory is read, the data of
//! the regular files listed after it is decoded on a thread of its own and
//! stored into the kernel's page cache (`FUSE_NOTIFY_STORE`) before anyone
//! asks, so that a reader walking the tree (tar, cp -r, a container
//! starting, a checksum of everything) finds most files already cached.
//!
//! Why: the kernel reads ahead within a file, never across files, so a cold
//! read of a tree of small files is one synchronous READ per file, each a
//! round trip through the server, which decodes while the reader waits:
//! one serial chain with a core idle. Pushed ahead, decoding runs on the
//! other core beside the reader, and the reader's requests mostly vanish.
//!
//! What is pushed, and when:
//! - The order is the one a walker reads in: the listing order of the
//!   directory, as the server sent it in READDIRPLUS replies. Only regular
//!   files the kernel was told about are pushed (it must hold their inodes:
//!   a store to an inode it does not hold is refused, and nothing else).
//! - A READ at offset 0 of a listed file starts a window after it: 256 KiB
//!   at first, doubling to 4 MiB while reads move forward through the
//!   directory, back to the start after a jump backwards. At most 512 KiB of
//!   one file is pushed (the kernel's own readahead takes over after that).
//!   A reader that reads one file pushes at most the first window.
//! - Files the reader has got to meanwhile are skipped, and the queue of
//!   windows is short and never waited on: when it is full a window is
//!   dropped, never the reader's own request.
//! - Memory: the pushed pages are ordinary page cache, which the kernel
//!   reclaims as it likes; the listings kept are capped ([`MAX_TRACKED`]
//!   entries, least recently used directories forgotten first).
//!
//! Off with `-o nopush`, and with `-o lowmem`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};

use crate::abi;
use crate::filesystem::Filesystem;

/// The first window after a read, in bytes of file data.
pub const FIRST_WINDOW: u64 = 256 * 1024;
/// The largest window, reached by doubling while reads move forward.
pub const MAX_WINDOW: u64 = 4 * 1024 * 1024;
/// At most this much of one file is pushed.
pub const MAX_PER_FILE: u64 = 512 * 1024;
/// Listing entries remembered at most, over all directories.
pub const MAX_TRACKED: usize = 1 << 16;
/// Windows waiting for the pushing thread at most.
const QUEUE: usize = 64;
/// `FUSE_NOTIFY_STORE`, in the error field of a notification header.
const NOTIFY_STORE: i32 = 4;
/// `sizeof(struct fuse_notify_store_out)`.
const STORE_OUT_LEN: usize = 24;
/// The unit of a store: the pushing thread's buffer.
const CHUNK: usize = 256 * 1024;

/// One regular file of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Listed {
    /// Its inode number.
    pub ino: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// What is known of one directory's listing and the reads in it.
#[derive(Debug, Default)]
struct DirState {
    files: Vec<Listed>,
    /// The readdir offset that continues the listing recorded so far.
    next_offset: u64,
    /// Files before this index were pushed or queued.
    queued_until: usize,
    /// The highest index read (offset 0) so far.
    last_read: Option<usize>,
    window: u64,
    stamp: u64,
}

/// A window to push: files of one directory, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    dir: u64,
    /// (index in the listing, inode, bytes to push).
    files: Vec<(usize, u64, u64)>,
}

/// The bookkeeping, apart from any thread or device so it can be tested.
#[derive(Debug, Default)]
struct Tracker {
    dirs: HashMap<u64, DirState>,
    /// Where each listed file is: (directory, index).
    place: HashMap<u64, (u64, usize)>,
    clock: u64,
}

impl Tracker {
    /// Record a page of a READDIRPLUS listing of `dir` that started at
    /// `offset` and ends at `next_offset`: `files` are its regular files.
    fn listed(&mut self, dir: u64, offset: u64, next_offset: u64, files: &[Listed]) {
        self.clock += 1;
        let clock = self.clock;
        let continues = offset != 0 && self.dirs.get(&dir).is_some_and(|d| d.next_offset == offset);
        if !continues {
            // A new listing (or one we lost the thread of): start again.
            self.forget_dir(dir);
        }
        if files.len() > MAX_TRACKED {
            return;
        }
        while self.place.len() + files.len() > MAX_TRACKED {
            if !self.evict_oldest(dir) {
                return;
            }
        }
        let state = self.dirs.entry(dir).or_default();
        state.next_offset = next_offset;
        state.stamp = clock;
        for f in files {
            let index = state.files.len();
            state.files.push(*f);
            self.place.insert(f.ino, (dir, index));
        }
    }

    fn forget_dir(&mut self, dir: u64) {
        if let Some(old) = self.dirs.remove(&dir) {
            for f in old.files {
                if self.place.get(&f.ino).is_some_and(|&(d, _)| d == dir) {
                    self.place.remove(&f.ino);
                }
            }
        }
    }

    /// Forget the least recently used directory other than `keep`; false
    /// when there is none.
    fn evict_oldest(&mut self, keep: u64) -> bool {
        let oldest = self
            .dirs
            .iter()
            .filter(|(&d, _)| d != keep)
            .min_by_key(|(_, s)| s.stamp)
            .map(|(&d, _)| d);
        match oldest {
            Some(d) => {
                self.forget_dir(d);
                true
            }
            None => false,
        }
    }

    /// A READ of `ino` at `offset`: the window to push after it, if any.
    fn read(&mut self, ino: u64, offset: u64) -> Option<Window> {
        if offset != 0 {
            return None;
        }
        let &(dir, index) = self.place.get(&ino)?;
        self.clock += 1;
        let clock = self.clock;
        let state = self.dirs.get_mut(&dir)?;
        state.stamp = clock;
        match state.last_read {
            Some(last) if index > last => {
                state.window = (state.window.saturating_mul(2)).clamp(FIRST_WINDOW, MAX_WINDOW);
            }
            Some(_) => {
                // A jump back: a new stream from here.
                state.window = FIRST_WINDOW;
                state.queued_until = index + 1;
            }
            None => state.window = FIRST_WINDOW,
        }
        state.last_read = Some(index);
        let (files, end) = window_from(state, index + 1, state.window);
        state.queued_until = state.queued_until.max(end);
        (!files.is_empty()).then_some(Window { dir, files })
    }

    /// Whether the reader has got to file `index` of `dir` already.
    fn passed(&self, dir: u64, index: usize) -> bool {
        self.dirs
            .get(&dir)
            .and_then(|d| d.last_read)
            .is_some_and(|last| last >= index)
    }
}

/// The files of `state` from index `from` that fill `window` bytes, less
/// those queued already, and the index after the last one counted. The
/// window is measured from `from` whatever was queued, so that it keeps
/// its distance ahead of the reader.
fn window_from(state: &DirState, from: usize, window: u64) -> (Vec<(usize, u64, u64)>, usize) {
    let mut budget = window;
    let mut files = Vec::new();
    let mut i = from;
    while budget > 0 {
        let Some(f) = state.files.get(i) else { break };
        let len = f.size.min(MAX_PER_FILE);
        if i >= state.queued_until && len > 0 {
            files.push((i, f.ino, len));
        }
        budget = budget.saturating_sub(len.max(1));
        i += 1;
    }
    (files, i)
}

/// Counts for `-o stats`.
#[derive(Debug, Default)]
pub(crate) struct PushStats {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub refused: AtomicU64,
}

/// The per-session side of pushing: shared by the workers, which report
/// listings and reads; the pushing thread takes the windows.
#[derive(Debug)]
pub(crate) struct Pusher {
    tracker: Arc<Mutex<Tracker>>,
    windows: SyncSender<Window>,
    pub stats: Arc<PushStats>,
}

/// The pushing thread's side.
pub(crate) struct PushThread {
    tracker: Arc<Mutex<Tracker>>,
    windows: Receiver<Window>,
    stats: Arc<PushStats>,
}

fn lock(t: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    // The tracker is advice only; a panic elsewhere leaves it consistent
    // enough (every update is a few map operations).
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A pusher and the thread body that serves it.
pub(crate) fn pusher() -> (Pusher, PushThread) {
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let stats = Arc::new(PushStats::default());
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    (
        Pusher {
            tracker: Arc::clone(&tracker),
            windows: tx,
            stats: Arc::clone(&stats),
        },
        PushThread {
            tracker,
            windows: rx,
            stats,
        },
    )
}

impl Pusher {
    /// A READDIRPLUS page of `dir` from `offset` to `next_offset` was
    /// answered, listing these regular files.
    pub fn listed(&self, dir: u64, offset: u64, next_offset: u64, files: &[Listed]) {
        lock(&self.tracker).listed(dir, offset, next_offset, files);
    }

    /// A READ of `ino` at `offset` was answered.
    pub fn read(&self, ino: u64, offset: u64) {
        // Only the start of a file moves a stream (see Tracker::read).
        if offset != 0 {
            return;
        }
        let Some(window) = lock(&self.tracker).read(ino, offset) else {
            return;
        };
        // When the thread is busy this window is dropped: the reader is
        // never held up. (Disconnected: the session is ending.)
        let _ = self.windows.try_send(window);
    }
}

impl PushThread {
    /// Push windows until every [`Pusher`] is gone. `nodeid` maps an inode
    /// number to the node id the kernel knows it by.
    pub fn run(self, fs: &dyn Filesystem, dev: &File, nodeid: impl Fn(u64) -> Option<u64>) {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(window) = self.windows.recv() {
            for (index, ino, len) in window.files {
                if lock(&self.tracker).passed(window.dir, index) {
                    continue;
                }
                let Some(node) = nodeid(ino) else { continue };
                match self.push_file(fs, dev, ino, node, len, &mut buf) {
                    Ok(()) => {}
                    // The mount is gone: nothing more to push, ever.
                    Err(Refused::Gone) => return,
                    // An inode the kernel let go of: the rest of the
                    // window likely went with it.
                    Err(Refused::NotCached) => break,
                }
            }
        }
    }

    /// Store the first `len` bytes of `ino`.
    fn push_file(
        &self,
        fs: &dyn Filesystem,
        dev: &File,
        ino: u64,
        node: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<(), Refused> {
        let mut offset = 0u64;
        while offset < len {
            let want = (len - offset).min(buf.len() as u64) as usize;
            // A fault is the READ's to report when someone asks.
            let Ok(n) = fs.read(ino, offset, &mut buf[..want]) else {
                return Ok(());
            };
            if n == 0 {
                return Ok(());
            }
            if let Err(e) = store(dev, node, offset, &buf[..n.min(want)]) {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            offset += n as u64;
            if n < want {
                break;
            }
        }
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Why a store did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// The kernel does not hold the inode (or refused this store).
    NotCached,
    /// The connection is gone (unmounted or aborted).
    Gone,
}

/// One `FUSE_NOTIFY_STORE` of `data` at `offset` of node `node`.
fn store(dev: &File, node: u64, offset: u64, data: &[u8]) -> Result<(), Refused> {
    let size = u32::try_from(data.len()).map_err(|_| Refused::NotCached)?;
    let total = abi::OUT_HEADER_LEN + STORE_OUT_LEN + data.len();
    let total = u32::try_from(total).map_err(|_| Refused::NotCached)?;
    let mut head = [0u8; abi::OUT_HEADER_LEN + STORE_OUT_LEN];
    head[0..4].copy_from_slice(&total.to_ne_bytes());
    head[4..8].copy_from_slice(&NOTIFY_STORE.to_ne_bytes());
    // unique 0: a notification, not a reply.
    head[16..24].copy_from_slice(&node.to_ne_bytes());
    head[24..32].copy_from_slice(&offset.to_ne_bytes());
    head[32..36].copy_from_slice(&size.to_ne_bytes());
    let iov = [IoSlice::new(&head), IoSlice::new(data)];
    match (&*dev).write_vectored(&iov) {
        Ok(n) if n == total as usize => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(Refused::Gone),
        _ => Err(Refused::NotCached),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn files(range: std::ops::Range<u64>, size: u64) -> Vec<Listed> {
        range.map(|ino| Listed { ino, size }).collect()
    }

    /// A walk through a directory pushes the files after each one read, in
    /// listing order, each once, the window doubling up to its cap.
    #[test]
    fn windows_follow_a_forward_walk_and_grow() {
        let mut t = Tracker::default();
        t.listed(1, 0, 100, &files(10..110, 64 * 1024));
        let w = t.read(10, 0).unwrap();
        assert_eq!(w.dir, 1);
        // 256 KiB of 64 KiB files after the one read.
        assert_eq!(
            w.files,
            vec![
                (1, 11, 65536),
                (2, 12, 65536),
                (3, 13, 65536),
                (4, 14, 65536)
            ]
        );
        // The reader reaches the first file not pushed: a window twice as
        // large, measured from there, without what was queued already.
        let w = t.read(15, 0).unwrap();
        let inos: Vec<u64> = w.files.iter().map(|f| f.1).collect();
        assert_eq!(inos, (16..24).collect::<Vec<_>>());
        // Reads at other offsets, and of files pushed, start nothing new.
        assert_eq!(t.read(15, 4096), None);
        let w = t.read(16, 0).unwrap();
        assert_eq!(w.files.first().map(|f| f.1), Some(24));
        for _ in 0..10 {
            let last = t.dirs[&1].queued_until as u64 + 10;
            if last >= 110 {
                break;
            }
            t.read(last, 0);
        }
        assert_eq!(t.dirs[&1].window, MAX_WINDOW);
    }

    /// One read pushes at most the first window; a jump back starts over.
    #[test]
    fn a_jump_back_starts_a_new_small_window() {
        let mut t = Tracker::default();
        t.listed(1, 0, 10, &files(100..200, 100 * 1024));
        t.read(150, 0).unwrap();
        t.read(160, 0).unwrap();
        assert_eq!(t.dirs[&1].window, 2 * FIRST_WINDOW);
        let w = t.read(120, 0).unwrap();
        assert_eq!(t.dirs[&1].window, FIRST_WINDOW);
        let inos: Vec<u64> = w.files.iter().map(|f| f.1).collect();
        assert_eq!(inos, vec![121, 122, 123]);
    }

    /// Big files count only up to the per-file cap; empty files are
    /// skipped; files not listed push nothing.
    #[test]
    fn sizes_are_capped_and_unknown_files_ignored() {
        let mut t = Tracker::default();
        let mut list = vec![Listed { ino: 1, size: 10 }];
        list.push(Listed { ino: 2, size: 0 });
        list.push(Listed {
            ino: 3,
            size: 100 << 20,
        });
        list.push(Listed { ino: 4, size: 5 });
        t.listed(7, 0, 4, &list);
        let w = t.read(1, 0).unwrap();
        assert_eq!(w.files, vec![(2, 3, MAX_PER_FILE)]);
        assert_eq!(t.read(99, 0), None);
    }

    /// A listing continued page by page is one listing; one restarted from
    /// 0 replaces it.
    #[test]
    fn listings_continue_across_pages() {
        let mut t = Tracker::default();
        t.listed(1, 0, 50, &files(10..20, 1000));
        t.listed(1, 50, 90, &files(20..30, 1000));
        assert_eq!(t.dirs[&1].files.len(), 20);
        assert_eq!(t.place[&25], (1, 15));
        t.listed(1, 0, 50, &files(10..20, 1000));
        assert_eq!(t.dirs[&1].files.len(), 10);
        assert!(!t.place.contains_key(&25));
        // A page that does not continue what is known starts over too.
        t.listed(1, 70, 90, &files(40..45, 1000));
        assert_eq!(t.dirs[&1].files.len(), 5);
    }

    /// However many directories are listed, the entries kept stay within
    /// the cap, the least recently used going first.
    #[test]
    fn the_tracker_is_bounded() {
        let mut t = Tracker::default();
        let per = 1000u64;
        for d in 0..200u64 {
            t.listed(d, 0, 1, &files(d * per..(d + 1) * per, 10));
            // Directory 3 stays in use.
            if d >= 3 {
                t.read(3 * per + d % 7, 0);
            }
            assert!(t.place.len() <= MAX_TRACKED);
        }
        assert!(t.dirs.contains_key(&199));
        assert!(t.dirs.contains_key(&3));
        assert!(!t.dirs.contains_key(&0));
        // A listing larger than the cap is not kept at all.
        t.listed(
            5000,
            0,
            1,
            &files(10_000_000..10_000_000 + MAX_TRACKED as u64 + 1, 1),
        );
        assert!(!t.dirs.contains_key(&5000));
        assert!(t.place.len() <= MAX_TRACKED);
    }

    /// Files the reader got to are skipped by the pushing thread.
    #[test]
    fn files_read_meanwhile_are_passed() {
        let mut t = Tracker::default();
        t.listed(1, 0, 10, &files(10..20, 10));
        t.read(10, 0).unwrap();
        assert!(!t.passed(1, 3));
        t.read(14, 0);
        assert!(t.passed(1, 3));
        assert!(t.passed(1, 4));
        assert!(!t.passed(1, 5));
    }
}
