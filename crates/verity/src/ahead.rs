//! Hash-ahead: verify the data after a sequential read on a thread of its
//! own, so that the next read copies bytes already checked instead of
//! reading and hashing them while its caller waits.
//!
//! A cold read of a whole image through the mount is a chain of waits (the
//! reading program, the FUSE request, the image read, the hashing, the
//! reply) that leaves the CPUs partly idle; hashing in that chain adds its
//! full cost to the elapsed time. Here a read of several data blocks asks a
//! worker to read and verify the [`WINDOW`] after it, in chunks of
//! [`CHUNK_BLOCKS`] blocks, into a bounded store ([`STORE_BYTES`]). A later
//! read whose first blocks lie in the store copies them out; the rest, if
//! any, takes the ordinary path. A read whose next bytes the worker is
//! reading right now waits for them rather than reading them a second time.
//!
//! Security: the store holds copies of bytes that verified, never a file
//! range to re-read, so what a read copies out is what was hashed. A chunk
//! that fails is not stored: the read that needs it takes the ordinary path
//! and reports the error there.
//!
//! The worker starts on the first read that asks for it, in the process
//! that serves reads: the FUSE server forks and confines itself after
//! opening the image, and a fork keeps only the calling thread.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// How far past the end of a read the worker verifies.
pub const WINDOW: u64 = 2 << 20;
/// The most verified bytes held at once; the oldest chunk goes first.
pub const STORE_BYTES: usize = 4 << 20;
/// The most bytes held in leftover blocks (see [`State::leftovers`]).
pub const LEFTOVER_BYTES: usize = 4 << 20;
/// The shortest read that moves the window when the store served it (the
/// image file's own test for file data).
const MIN_DATA_READ: usize = 512;
/// How long a read waits for the chunk the worker is verifying before it
/// reads the bytes itself: far longer than a chunk takes from disk.
const IN_FLIGHT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);
/// Data blocks per chunk the worker reads and verifies in one go (64 KiB
/// with 4 KiB blocks): sixteen blocks are what the hashing does at once,
/// and a read that finds its bytes being verified waits for one small
/// chunk only. On the Debian image (cold read of every file through the
/// mount, nine runs each) 16 blocks with a 2 MiB window cost 1.07x against
/// 1.14x for 64 blocks with 1 MiB. At most 64, so a chunk's served blocks
/// fit a `u64`.
pub const CHUNK_BLOCKS: u64 = 16;

/// Runs the worker's body: the caller's chance to mark the thread's reads
/// the way its own reads of file data are marked (the FUSE server's image
/// file drops file data from the page cache once read, and keeps other
/// reads cached).
pub type ReadScope = fn(&mut dyn FnMut());

/// Reads and verifies whole data blocks (`buf` from the block-aligned
/// offset), filling `buf` only with bytes that matched the tree.
pub(crate) type VerifyRead = Arc<dyn Fn(&mut [u8], u64) -> io::Result<()> + Send + Sync>;

/// A run of verified data blocks.
#[derive(Debug)]
struct Chunk {
    bytes: Box<[u8]>,
    /// One bit per block already copied out; the chunk goes when all are.
    served: u64,
    /// Insertion order, for eviction.
    seq: u64,
}

impl Chunk {
    fn full_mask(&self, dbs: u64) -> u64 {
        let blocks = self.bytes.len() as u64 / dbs; // 1..=CHUNK_BLOCKS
        if blocks >= 64 {
            u64::MAX
        } else {
            (1u64 << blocks) - 1
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Verified chunks by data offset.
    chunks: BTreeMap<u64, Chunk>,
    /// Sum of the chunks' lengths, at most [`STORE_BYTES`].
    bytes: usize,
    /// Blocks of chunks that left the store before a read took them, by
    /// data offset, oldest first in `leftover_order`. Mostly metadata:
    /// images interleave inodes with file data, and the worker's reads,
    /// marked as data, drop every page they read from the page cache, so
    /// an inode read after the worker passed would go to the disk.
    leftovers: HashMap<u64, Box<[u8]>>,
    leftover_order: VecDeque<u64>,
    /// At most [`LEFTOVER_BYTES`].
    leftover_bytes: usize,
    seq: u64,
    /// The end of the latest read that asked for hash-ahead, not yet seen
    /// by the worker.
    wanted: Option<u64>,
    /// The range the worker is reading and verifying now.
    in_flight: Option<(u64, u64)>,
    started: bool,
    /// The worker could not be started: every read takes the ordinary path.
    disabled: bool,
    shutdown: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when `wanted`, `in_flight` or `shutdown` changes.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock still guards only verified copies.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The hash-ahead store and its worker, one per reader.
pub(crate) struct Ahead {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    verify: VerifyRead,
    scope: ReadScope,
    dbs: u64,
    data_size: u64,
}

impl std::fmt::Debug for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Ahead")
            .field("chunks", &state.chunks.len())
            .field("bytes", &state.bytes)
            .field("started", &state.started)
            .finish_non_exhaustive()
    }
}

impl Ahead {
    pub(crate) fn new(verify: VerifyRead, scope: ReadScope, dbs: u64, data_size: u64) -> Ahead {
        Ahead {
            shared: Arc::default(),
            worker: Mutex::new(None),
            verify,
            scope,
            dbs,
            data_size,
        }
    }

    /// Serve a read (`buf` from `offset`, inside the data area): its first
    /// bytes from the store where they are, the rest through `read` (the
    /// ordinary verified path).
    pub(crate) fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        read: impl FnOnce(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let (served, from_chunks) = self.take(buf, offset);
        // The next read of a sequence starts at the next block at the
        // latest (files' blocks are aligned), and the window is made of
        // whole blocks.
        let end = (offset + buf.len() as u64).next_multiple_of(self.dbs);
        // Only reads that look like file data move the window: from a
        // block boundary, and either longer than a block or a sequence
        // going on (served from chunks). A read of one block or less is as
        // likely metadata, and a jump there to verify what follows would
        // read again the data verified and dropped from the page cache.
        let long = buf.len() as u64 >= 2 * self.dbs;
        let going_on = from_chunks && buf.len() >= MIN_DATA_READ;
        if offset.is_multiple_of(self.dbs) && (long || going_on) {
            self.want(end);
        }
        let rest = &mut buf[served..];
        if rest.is_empty() {
            return Ok(());
        }
        read(rest, offset + served as u64)
    }

    /// Copy the leading bytes of the read from stored chunks and leftover
    /// blocks, waiting for a chunk the worker is verifying now; returns the
    /// bytes copied and whether any came from a chunk.
    fn take(&self, buf: &mut [u8], offset: u64) -> (usize, bool) {
        let mut from_chunks = false;
        let end = offset + buf.len() as u64;
        let mut at = offset;
        let mut state = self.shared.lock();
        while at < end {
            let found = state
                .chunks
                .range(..=at)
                .next_back()
                .filter(|(&start, c)| start + c.bytes.len() as u64 > at)
                .map(|(&start, _)| start);
            if let Some(start) = found {
                let state = &mut *state;
                // found came from the map just now, under the same lock.
                let Some(chunk) = state.chunks.get_mut(&start) else {
                    break;
                };
                let chunk_end = start + chunk.bytes.len() as u64;
                let stop = chunk_end.min(end);
                let (from, to) = ((at - start) as usize, (stop - start) as usize);
                let dst = (at - offset) as usize;
                buf[dst..dst + (to - from)].copy_from_slice(&chunk.bytes[from..to]);
                // A block counts as served when a read took all of it: one
                // read in part (an inode among file data) may be read again,
                // and goes to the leftovers when the chunk leaves.
                let first = (from as u64).div_ceil(self.dbs);
                let last = to as u64 / self.dbs;
                for b in first..last {
                    chunk.served |= 1 << b;
                }
                if chunk.served == chunk.full_mask(self.dbs) {
                    state.bytes -= chunk.bytes.len();
                    state.chunks.remove(&start);
                }
                at = stop;
                from_chunks = true;
            } else if let Some(block) = state.leftovers.get(&(at - at % self.dbs)) {
                let from = (at % self.dbs) as usize;
                let n = (block.len() - from).min((end - at) as usize);
                let dst = (at - offset) as usize;
                buf[dst..dst + n].copy_from_slice(&block[from..from + n]);
                at += n as u64;
            } else if matches!(state.in_flight, Some((s, e)) if s <= at && at < e) {
                // Bounded, in case the worker is gone (a panic, or a fork
                // that did not copy it): the ordinary path then serves.
                let (guard, waited) = self
                    .shared
                    .changed
                    .wait_timeout(state, IN_FLIGHT_PATIENCE)
                    .unwrap_or_else(PoisonError::into_inner);
                state = guard;
                if waited.timed_out() {
                    break;
                }
            } else {
                break;
            }
        }
        ((at - offset) as usize, from_chunks)
    }

    /// Ask the worker to verify the window after `end`, starting it first
    /// if this is the first time.
    fn want(&self, end: u64) {
        let mut state = self.shared.lock();
        if state.disabled || state.shutdown || end >= self.data_size {
            return;
        }
        state.wanted = Some(end);
        if !state.started {
            state.started = true;
            let worker = Worker {
                shared: Arc::clone(&self.shared),
                verify: Arc::clone(&self.verify),
                dbs: self.dbs,
                data_size: self.data_size,
            };
            let scope = self.scope;
            let spawned = std::thread::Builder::new()
                .name("verity-ahead".into())
                .spawn(move || scope(&mut || worker.run()));
            match spawned {
                Ok(handle) => {
                    *self.worker.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
                }
                Err(_) => state.disabled = true,
            }
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Bytes held in the store now.
    #[cfg(test)]
    pub(crate) fn stored_bytes(&self) -> usize {
        let state = self.shared.lock();
        debug_assert_eq!(
            state.bytes,
            state.chunks.values().map(|c| c.bytes.len()).sum::<usize>()
        );
        assert!(state.leftover_bytes <= LEFTOVER_BYTES);
        debug_assert_eq!(
            state.leftover_bytes,
            state.leftovers.values().map(|b| b.len()).sum::<usize>()
        );
        state.bytes
    }

    /// Wait until the worker has nothing left to do (tests only).
    #[cfg(test)]
    pub(crate) fn wait_idle(&self) {
        loop {
            {
                let state = self.shared.lock();
                if state.wanted.is_none() && state.in_flight.is_none() {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        let handle = self
            .worker
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            // A worker that panicked has nothing left to clean up.
            let _ = handle.join();
        }
    }
}

/// What the worker thread owns.
struct Worker {
    shared: Arc<Shared>,
    verify: VerifyRead,
    dbs: u64,
    data_size: u64,
}

impl Worker {
    fn run(&self) {
        // The chain being verified: [chain_start, cursor), and how far to go.
        let (mut chain_start, mut cursor, mut target) = (0u64, 0u64, 0u64);
        // Held from storing one chunk to choosing the next, so that a read
        // never sees the worker idle between two chunks of one window.
        let mut state = self.shared.lock();
        loop {
            let len = loop {
                if state.shutdown {
                    return;
                }
                if let Some(wanted) = state.wanted.take() {
                    if !(chain_start <= wanted && wanted <= cursor) {
                        // A jump: start a new chain where the reader is.
                        (chain_start, cursor) = (wanted, wanted);
                    }
                    target = wanted.saturating_add(WINDOW).min(self.data_size);
                }
                // Skip what the store holds already.
                while let Some(end) = state
                    .chunks
                    .range(..=cursor)
                    .next_back()
                    .map(|(&s, c)| s + c.bytes.len() as u64)
                    .filter(|&e| e > cursor)
                {
                    cursor = end;
                }
                if cursor < target {
                    break (CHUNK_BLOCKS * self.dbs).min(self.data_size - cursor);
                }
                state = self
                    .shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            };
            let start = cursor;
            state.in_flight = Some((start, start + len));
            drop(state);

            // len <= CHUNK_BLOCKS blocks: a few hundred KiB at most.
            let mut bytes = vec![0u8; len as usize].into_boxed_slice();
            let verified = (self.verify)(&mut bytes, start).is_ok();

            state = self.shared.lock();
            state.in_flight = None;
            if verified {
                store(&mut state, start, bytes, self.dbs);
            }
            // A failed chunk is skipped: the read that needs it reports the
            // error on the ordinary path.
            cursor = start + len;
            self.shared.changed.notify_all();
        }
    }
}

/// Insert a verified chunk, evicting the oldest to stay within
/// [`STORE_BYTES`].
fn store(state: &mut State, start: u64, bytes: Box<[u8]>, dbs: u64) {
    while state.bytes + bytes.len() > STORE_BYTES {
        let oldest = state
            .chunks
            .iter()
            .min_by_key(|(_, c)| c.seq)
            .map(|(&s, _)| s);
        let Some((at, oldest)) = oldest.and_then(|s| state.chunks.remove(&s).map(|c| (s, c)))
        else {
            break;
        };
        state.bytes -= oldest.bytes.len();
        retire(state, at, &oldest, dbs);
    }
    state.seq += 1;
    state.bytes += bytes.len();
    let chunk = Chunk {
        bytes,
        served: 0,
        seq: state.seq,
    };
    if let Some(old) = state.chunks.insert(start, chunk) {
        state.bytes -= old.bytes.len();
    }
}

/// Keep the blocks of a chunk leaving the store that no read took, within
/// [`LEFTOVER_BYTES`], the oldest going first.
fn retire(state: &mut State, start: u64, chunk: &Chunk, dbs: u64) {
    for (i, block) in chunk.bytes.chunks(dbs as usize).enumerate() {
        let at = start + i as u64 * dbs;
        if chunk.served & (1 << i) != 0 || state.leftovers.contains_key(&at) {
            continue;
        }
        state.leftover_bytes += block.len();
        state.leftovers.insert(at, block.into());
        state.leftover_order.push_back(at);
        while state.leftover_bytes > LEFTOVER_BYTES {
            let Some(old) = state.leftover_order.pop_front() else {
                break;
            };
            if let Some(b) = state.leftovers.remove(&old) {
                state.leftover_bytes -= b.len();
            }
        }
    }
}
