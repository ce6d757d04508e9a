//! Compressed files: fixed-size pclusters filled by the encoders, compact
//! lcluster indexes as mkfs.erofs writes them, both cores at work.
//!
//! A file is cut into segments compressed independently (in parallel);
//! each segment becomes a run of extents, each either a compressed
//! pcluster (at most `pcluster_size` bytes, right-aligned after zero
//! padding) or one raw block when compression would not save a block. The
//! data is written in file order as batches complete; only the extent
//! lengths stay in memory until the file's indexes are encoded.

pub mod fit;

mod lzma;

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::format;
use crate::tree::Data;
use crate::write::{data_name, Out};

/// Compression algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// LZ4 (fast).
    Lz4,
    /// LZ4 with a deeper match search.
    Lz4hc,
    /// MicroLZMA.
    Lzma,
    /// Raw DEFLATE.
    Deflate,
    /// Zstandard.
    Zstd,
}

impl Algorithm {
    /// The on-disk algorithm id.
    fn id(self) -> u8 {
        match self {
            Algorithm::Lz4 | Algorithm::Lz4hc => 0,
            Algorithm::Lzma => 1,
            Algorithm::Deflate => 2,
            Algorithm::Zstd => 3,
        }
    }

    fn default_level(self) -> i32 {
        match self {
            Algorithm::Lz4 => 1,
            Algorithm::Lz4hc => 9,
            Algorithm::Lzma => lzma::DEFAULT_LEVEL,
            Algorithm::Deflate => 1,
            Algorithm::Zstd => 3,
        }
    }
}

/// How to compress.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Its level, or its default.
    pub level: Option<i32>,
    /// Largest pcluster in bytes (a multiple of the block size).
    pub pcluster_size: u32,
    /// Tail pclusters inline after the inode's indexes when they fit.
    pub ztailpacking: bool,
    /// Tails (each file's last extent) in the packed inode, identical tails
    /// stored once.
    pub fragments: bool,
    /// Store identical pclusters once: every extent whose compressed
    /// pcluster and length match one written before references it (such
    /// files get full indexes); with `fragments`, identical tails too.
    pub dedupe: bool,
}

/// Input compressed independently per work item.
const SEGMENT: u64 = 4 << 20;
/// Input in flight per batch (bounds memory).
const BATCH: u64 = 64 << 20;
/// Most input one extent covers.
const EXTENT_MAX: usize = 1 << 20;
/// Zstandard window: one extent.
const DICT_SIZE: u32 = EXTENT_MAX as u32;

/// Input handed to the compressing threads and not yet written: room for
/// the batch being written and the next one.
const IN_FLIGHT: u64 = 2 * BATCH;

/// Bounds the input in flight between the task producer and the writer.
#[derive(Debug, Default)]
struct Window {
    /// Bytes in flight, and whether the writer has stopped.
    state: std::sync::Mutex<(u64, bool)>,
    room: std::sync::Condvar,
}

impl Window {
    /// Wait until `n` more bytes fit (or nothing is in flight); `false`
    /// once the writer has stopped.
    fn acquire(&self, n: u64) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        while !st.1 && st.0 != 0 && st.0 + n > IN_FLIGHT {
            st = match self.room.wait(st) {
                Ok(st) => st,
                Err(_) => return false,
            };
        }
        st.0 += n;
        !st.1
    }

    /// `n` bytes were written.
    fn release(&self, n: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = st.0.saturating_sub(n);
        }
        self.room.notify_all();
    }
}

/// Tells the producer that the writer has stopped, when dropped.
struct StopOnDrop<'a>(&'a Window);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.1 = true;
        }
        self.0.room.notify_all();
    }
}

/// Compressed file with one 8-byte index per lcluster.
const LAYOUT_COMPRESSED_FULL: u16 = 1;
const ADVISE_COMPACTED_2B: u16 = 0x0001;
const ADVISE_BIG_PCLUSTER_1: u16 = 0x0002;
const ADVISE_BIG_PCLUSTER_2: u16 = 0x0004;
const ADVISE_INLINE_PCLUSTER: u16 = 0x0008;
const ADVISE_FRAGMENT_PCLUSTER: u16 = 0x0020;
const LI_D0_CBLKCNT: u16 = 1 << 11;
const TYPE_PLAIN: u16 = 0;
const TYPE_HEAD1: u16 = 1;
const TYPE_NONHEAD: u16 = 2;

/// An extent once written.
#[derive(Debug, Clone, Copy)]
struct ExtentMeta {
    /// Input bytes.
    len: u64,
    /// Stored uncompressed.
    raw: bool,
    /// Blocks of its pcluster (for the index).
    blocks: u64,
    /// Blocks written after the previous extent's (0 when inline, a
    /// fragment, or shared).
    written: u64,
    /// The block of an identical pcluster written earlier, when dedupe
    /// shares it.
    shared: Option<u64>,
}

/// What makes two pclusters interchangeable: the same decompressed length,
/// kind and stored bytes (the decoders are deterministic, so equal stored
/// bytes decode to equal data).
type PclusterKey = (u64, bool, [u8; 32]);

fn pcluster_key(e: &Extent) -> PclusterKey {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&e.data);
    (e.len, e.raw, digest.into())
}

/// One extent: `len` input bytes stored in `data` (whole blocks).
#[derive(Debug)]
struct Extent {
    len: u64,
    raw: bool,
    /// Bytes of compressed data at the end of `data` (`len` when raw).
    clen: usize,
    data: Vec<u8>,
}

/// Result of compressing one file.
#[derive(Debug)]
pub(crate) struct FileResult {
    pub layout: u16,
    pub i_u: u32,
    pub inline: Vec<u8>,
}

/// Compression state across the image.
#[derive(Debug)]
pub(crate) struct State {
    opts: CompressOptions,
    bs: u32,
    level: i32,
    /// Fragments are being collected (off while the packed inode itself is
    /// compressed).
    fragmenting: bool,
    /// The packed inode's data and where each distinct tail is in it.
    packed: Vec<u8>,
    fragment_at: std::collections::HashMap<Vec<u8>, u32>,
    /// Pclusters are shared (off for the packed inode, whose fragments are
    /// distinct already).
    deduping: bool,
    /// Where each distinct pcluster was written.
    pcluster_at: std::collections::HashMap<PclusterKey, u64>,
}

fn check(c: &CompressOptions, bs: u32) -> Result<()> {
    if c.pcluster_size < bs || !c.pcluster_size.is_multiple_of(bs) || c.pcluster_size > 1 << 20 {
        return Err(Error::Option(format!(
            "pcluster size {} is not a multiple of the block size up to 1 MiB",
            c.pcluster_size
        )));
    }
    if let (Algorithm::Lzma, Some(level)) = (c.algorithm, c.level) {
        if lzma::preset(level).is_none() {
            return Err(lzma::bad_level(level));
        }
    }
    Ok(())
}

fn big_pcluster(c: &CompressOptions, bs: u32) -> bool {
    c.pcluster_size > bs
}

/// The configuration records after the superblock (empty for plain LZ4
/// with one-block pclusters, which needs none).
pub(crate) fn config_records(c: &CompressOptions, bs: u32) -> Result<Vec<u8>> {
    check(c, bs)?;
    let mut out = Vec::new();
    match c.algorithm {
        Algorithm::Lz4 | Algorithm::Lz4hc => {
            if big_pcluster(c, bs) {
                out.extend_from_slice(&14u16.to_le_bytes());
                out.extend_from_slice(&0u16.to_le_bytes()); // default distance
                out.extend_from_slice(&((c.pcluster_size / bs) as u16).to_le_bytes());
                out.extend_from_slice(&[0u8; 10]);
            }
        }
        Algorithm::Lzma => {
            out.extend_from_slice(&14u16.to_le_bytes());
            out.extend_from_slice(&lzma::dict_size(c.pcluster_size).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&[0u8; 8]);
        }
        Algorithm::Deflate => {
            out.extend_from_slice(&6u16.to_le_bytes());
            out.push(15);
            out.extend_from_slice(&[0u8; 5]);
        }
        Algorithm::Zstd => {
            out.extend_from_slice(&6u16.to_le_bytes());
            out.push(0);
            out.push((DICT_SIZE.trailing_zeros() - 10) as u8);
            out.extend_from_slice(&[0u8; 4]);
        }
    }
    Ok(out)
}

/// Per-thread encoders.
enum Encoder {
    /// liblz4's fast encoder, which fills a destination in one pass
    /// (`LZ4_compress_destSize`, what mkfs.erofs uses).
    Lz4(Vec<u8>),
    /// liblz4's HC encoder at this level, which fills a destination in one
    /// pass (what mkfs.erofs uses: same ratio at less CPU than ours).
    Lz4hc(i32, Vec<u8>),
    /// liblzma's MicroLZMA encoder, which also fills a destination in one
    /// pass (what mkfs.erofs uses).
    Lzma(lzma::LzmaEncoder),
    /// DEFLATE and Zstandard, which compress whole inputs only.
    Fit(fit::Fitter),
}

impl Encoder {
    fn new(alg: Algorithm, level: i32, pcluster_size: u32) -> Result<Encoder> {
        Ok(match alg {
            Algorithm::Lz4 => Encoder::Lz4(Vec::new()),
            Algorithm::Lz4hc => Encoder::Lz4hc(level.clamp(2, 12), Vec::new()),
            Algorithm::Lzma => Encoder::Lzma(lzma::LzmaEncoder::new(level, pcluster_size)?),
            Algorithm::Deflate | Algorithm::Zstd => {
                Encoder::Fit(fit::Fitter::new(alg, level, DICT_SIZE))
            }
        })
    }

    /// The longest prefix of `src` that compresses into at most `cap`
    /// bytes: (consumed, compressed), or `None` when nothing fits.
    fn fill(&mut self, src: &[u8], cap: usize) -> Result<Option<(usize, Vec<u8>)>> {
        Ok(match self {
            Encoder::Lz4(buf) => {
                buf.resize(cap, 0);
                match lzzzz::lz4::compress_fill(src, &mut buf[..cap]) {
                    Ok((n, w)) if n > 0 => Some((n, buf[..w].to_vec())),
                    _ => None,
                }
            }
            Encoder::Lz4hc(level, buf) => {
                buf.resize(cap, 0);
                match lzzzz::lz4_hc::compress_fill(src, &mut buf[..cap], *level) {
                    Ok((n, w)) if n > 0 => Some((n, buf[..w].to_vec())),
                    _ => None,
                }
            }
            Encoder::Lzma(e) => e.fill(src, cap)?,
            Encoder::Fit(f) => f.fit(src, cap),
        })
    }
}

/// What a thread's encoder was made for: algorithm, level, pcluster size.
type EncoderKey = (Algorithm, i32, u32);

thread_local! {
    /// This thread's encoder, reused while its key stays the same.
    static ENCODER: std::cell::RefCell<Option<(EncoderKey, Encoder)>> =
        const { std::cell::RefCell::new(None) };
}

/// For tail packing: re-cut a last extent of several blocks into one
/// that fills a block less and a tail of under a block, which can then go
/// inline after the inode. Leaves `out` alone when that does not work out.
fn split_tail(enc: &mut Encoder, out: &mut Vec<Extent>, src: &[u8], bs: usize) -> Result<()> {
    let Some(last) = out.last() else {
        return Ok(());
    };
    let blocks = last.data.len() / bs;
    if last.raw || blocks < 2 {
        return Ok(());
    }
    let len = last.len as usize;
    let start = src.len() - len;
    let Some((n1, c1)) = enc.fill(&src[start..], (blocks - 1) * bs)? else {
        return Ok(());
    };
    if n1 >= len || c1.len().div_ceil(bs) >= n1.div_ceil(bs) || c1.first() == Some(&0) {
        return Ok(());
    }
    let rest = &src[start + n1..];
    // The tail must reach into the next lcluster: older kernels and
    // fsck.erofs 1.5 cannot read a compressed tail that starts and ends in
    // one lcluster after another extent's end. (Segments start on block
    // boundaries, so offsets in `src` have the file's block alignment.)
    if (start + n1) % bs + rest.len() < bs {
        return Ok(());
    }
    let second = match enc.fill(rest, bs - 1)? {
        Some((n2, c2)) if n2 == rest.len() && c2.len() < rest.len() && c2.first() != Some(&0) => {
            let mut data = vec![0u8; bs - c2.len()];
            data.extend_from_slice(&c2);
            Extent {
                len: n2 as u64,
                raw: false,
                clen: c2.len(),
                data,
            }
        }
        _ if rest.len() <= bs => {
            let mut data = rest.to_vec();
            data.resize(bs, 0);
            Extent {
                len: rest.len() as u64,
                raw: true,
                clen: rest.len(),
                data,
            }
        }
        _ => return Ok(()),
    };
    let mut data = vec![0u8; c1.len().div_ceil(bs) * bs - c1.len()];
    data.extend_from_slice(&c1);
    out.pop();
    out.push(Extent {
        len: n1 as u64,
        raw: false,
        clen: c1.len(),
        data,
    });
    out.push(second);
    Ok(())
}

/// Read `len` bytes at `offset` of a file's data.
fn read_segment(data: &Data, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let short = || {
        Error::input(format!(
            "{}: file changed size while the image was built",
            data_name(data)
        ))
    };
    match data {
        Data::Path(p) => {
            let f = File::open(p).map_err(|e| Error::io(p, e))?;
            f.read_exact_at(&mut buf, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    short()
                } else {
                    Error::io(p, e)
                }
            })?;
        }
        Data::Spill { file, offset: base } => {
            file.read_exact_at(&mut buf, base + offset)
                .map_err(|e| Error::io("<spill file>", e))?;
        }
        Data::Bytes(b) => {
            let end = offset as usize + len;
            buf.copy_from_slice(b.get(offset as usize..end).ok_or_else(short)?);
        }
    }
    Ok(buf)
}

impl State {
    pub(crate) fn new(opts: CompressOptions, bs: u32) -> State {
        let level = opts.level.unwrap_or(opts.algorithm.default_level());
        let fragmenting = opts.fragments;
        State {
            bs,
            level,
            fragmenting,
            packed: Vec::new(),
            fragment_at: std::collections::HashMap::new(),
            deduping: opts.dedupe,
            pcluster_at: std::collections::HashMap::new(),
            opts,
        }
    }

    /// The packed inode's data; no more fragments are made afterwards.
    pub(crate) fn take_packed(&mut self) -> Vec<u8> {
        self.fragmenting = false;
        // fsck.erofs 1.9.3 cannot read fragments out of a packed inode
        // whose own tail is inline: keep the packed inode's tail in a block.
        self.opts.ztailpacking = false;
        self.fragment_at.clear();
        self.deduping = false;
        self.pcluster_at.clear();
        std::mem::take(&mut self.packed)
    }

    /// Cut one segment into extents.
    /// `file_end`: the segment ends the file (its last extent may be split
    /// so that a tail small enough to pack inline comes out).
    fn compress_segment(
        opts: &CompressOptions,
        bs: u32,
        level: i32,
        src: &[u8],
        file_end: bool,
    ) -> Result<Vec<Extent>> {
        let bs = bs as usize;
        let cap = opts.pcluster_size as usize;
        let key = (opts.algorithm, level, opts.pcluster_size);
        ENCODER.with(|cell| {
            let mut slot = cell.borrow_mut();
            if !matches!(&*slot, Some((k, _)) if *k == key) {
                *slot = Some((key, Encoder::new(key.0, level, key.2)?));
            }
            let Some((_, enc)) = slot.as_mut() else {
                return Ok(Vec::new());
            };
            if let Encoder::Fit(f) = enc {
                f.reset();
            }
            let mut out = Vec::new();
            let mut pos = 0usize;
            while pos < src.len() {
                let rest = &src[pos..src.len().min(pos + EXTENT_MAX)];
                let attempt = enc.fill(rest, cap)?;
                let tried = attempt.as_ref().map(|a| a.0).unwrap_or(0);
                let fitted = attempt.filter(|(n, c)| {
                    // Worth it only when a block is saved; a leading zero
                    // byte would be taken for padding.
                    c.len().div_ceil(bs) < n.div_ceil(bs) && c.first() != Some(&0)
                });
                match fitted {
                    Some((n, c)) => {
                        let plen = c.len().div_ceil(bs) * bs;
                        let mut data = vec![0u8; plen - c.len()];
                        data.extend_from_slice(&c);
                        out.push(Extent {
                            len: n as u64,
                            raw: false,
                            clen: c.len(),
                            data,
                        });
                        pos += n;
                    }
                    None => {
                        // Store what the encoder looked at as raw blocks,
                        // rather than compress the same bytes again.
                        let blocks = (tried / bs).max(1);
                        for _ in 0..blocks {
                            if pos >= src.len() {
                                break;
                            }
                            let n = (src.len() - pos).min(bs);
                            let mut data = src[pos..pos + n].to_vec();
                            data.resize(bs, 0);
                            out.push(Extent {
                                len: n as u64,
                                raw: true,
                                clen: n,
                                data,
                            });
                            pos += n;
                        }
                    }
                }
            }
            if file_end && opts.ztailpacking && !opts.fragments {
                split_tail(enc, &mut out, src, bs)?;
            }
            Ok(out)
        })
    }

    /// Compress `jobs` (plan index, data, size) and write their pclusters;
    /// `inode_part(i)` is the size of plan i's inode plus xattr body.
    /// Files that compression would not shrink are left out of the result
    /// (and unwritten) for the flat writer.
    pub(crate) fn compress_files(
        &mut self,
        jobs: &[(usize, Data, u64)],
        out: &mut Out,
        bar: &indicatif::ProgressBar,
        inode_part: impl Fn(usize) -> usize,
    ) -> Result<Vec<(usize, FileResult)>> {
        let bs = u64::from(self.bs);
        // Work items: (job, offset, len), in file order.
        let mut items: Vec<(usize, u64, usize)> = Vec::new();
        for (j, (_, _, size)) in jobs.iter().enumerate() {
            if *size <= bs && !self.fragmenting {
                continue; // one block or less: nothing to save
            }
            let mut off = 0;
            while off < *size {
                let len = (*size - off).min(SEGMENT);
                items.push((j, off, len as usize));
                off += len;
            }
        }
        let mut results = Vec::new();
        // Extents (len, raw, blocks) of the file being finished, its first
        // block, and whether its data was written already.
        let mut cur: Option<(usize, Vec<ExtentMeta>, u64)> = None;
        // Batches of work items, written in turn by this thread while the
        // rayon pool compresses the items of this and the next batches.
        let mut bounds = Vec::new();
        let mut i = 0;
        while i < items.len() {
            let mut end = i;
            let mut bytes = 0u64;
            while end < items.len() && (end == i || bytes + items[end].2 as u64 <= BATCH) {
                bytes += items[end].2 as u64;
                end += 1;
            }
            bounds.push((i, end));
            i = end;
        }
        let (opts, level) = (self.opts.clone(), self.level);
        let block_size = self.bs;
        let items = &items;
        let window = Window::default();
        std::thread::scope(|scope| -> Result<()> {
            // Whatever way this thread leaves, the producer stops handing
            // out work.
            let _stop = StopOnDrop(&window);
            let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<Vec<Extent>>)>();
            let (opts, window) = (&opts, &window);
            // One task per item, in file order, as long as the input in
            // flight stays under IN_FLIGHT. No batch waits for the previous
            // one's slowest item, so both cores stay busy to the end.
            // (In place: this thread, not a pool thread, waits for room;
            // its tasks queue on the pool in order.)
            scope.spawn(move || {
                rayon::in_place_scope(|pool| {
                    for (k, &(j, off, len)) in items.iter().enumerate() {
                        if !window.acquire(len as u64) {
                            break; // the writer stopped on an error
                        }
                        let tx = tx.clone();
                        pool.spawn(move |_| {
                            let done = read_segment(&jobs[j].1, off, len).and_then(|src| {
                                let file_end = off + len as u64 == jobs[j].2;
                                State::compress_segment(opts, block_size, level, &src, file_end)
                            });
                            // Fails only when the writer stopped on an error.
                            let _ = tx.send((k, done));
                        });
                    }
                });
            });
            // Items done ahead of the one the writer needs next.
            let mut early: std::collections::HashMap<usize, Result<Vec<Extent>>> =
                std::collections::HashMap::new();
            for (i, end) in bounds {
                let mut done = Vec::with_capacity(end - i);
                for k in i..end {
                    let d = loop {
                        if let Some(d) = early.remove(&k) {
                            break d;
                        }
                        let (at, d) = rx
                            .recv()
                            .map_err(|_| Error::input("the compression threads stopped"))?;
                        early.insert(at, d);
                    };
                    done.push(d);
                }
                let batch_bytes: u64 = items[i..end].iter().map(|it| it.2 as u64).sum();
                let mut done = done.into_iter();
                let mut k = i;
                while k < end {
                    // Gather this file's items of the batch.
                    let j = items[k].0;
                    let mut file_exts: Vec<Extent> = Vec::new();
                    let mut last_item = k;
                    while last_item < end && items[last_item].0 == j {
                        file_exts.extend(done.next().unwrap_or_else(|| Ok(Vec::new()))?);
                        bar.inc(items[last_item].2 as u64);
                        last_item += 1;
                    }
                    let starts_here = items[k].1 == 0;
                    let ends_here = last_item == items.len() || items[last_item].0 != j;
                    let size = jobs[j].2;
                    let comp_blocks: u64 = file_exts.iter().map(|e| e.data.len() as u64 / bs).sum();
                    // Entirely in this batch and not smaller: store it flat
                    // (with fragments, its tail is worth packing anyway).
                    if starts_here
                        && ends_here
                        && !self.fragmenting
                        && comp_blocks >= size.div_ceil(bs)
                    {
                        k = last_item;
                        continue;
                    }
                    if starts_here {
                        cur = Some((j, Vec::new(), out.block()));
                    }
                    let Some((_, exts, _)) = cur.as_mut() else {
                        return Err(Error::input("compression bookkeeping lost a file"));
                    };
                    // With dedupe, a pcluster already in the image is
                    // referenced instead of written again. The file's last
                    // extent may still become an inline tail or a fragment,
                    // so it is looked up once it is known to be written.
                    let n_ext = file_exts.len();
                    let mut shared: Vec<Option<u64>> = vec![None; n_ext];
                    let mut next = out.block();
                    if self.deduping {
                        let sure = n_ext - usize::from(ends_here && n_ext > 0);
                        for (x, e) in file_exts.iter().enumerate().take(sure) {
                            next = self.share(e, next, &mut shared[x]);
                        }
                    }
                    // Shared pclusters need full indexes (compact ones give
                    // only the first block of each pack).
                    let full_indexes = exts.iter().any(|e| e.shared.is_some())
                        || shared.iter().any(Option::is_some);
                    // With tail packing, the file's last pcluster goes after
                    // its indexes when it fits in the inode's block.
                    let mut tail = None;
                    let mut fragment = None;
                    if ends_here && self.fragmenting {
                        if let Some(e) = file_exts.last() {
                            let bytes = read_segment(&jobs[j].1, size - e.len, e.len as usize)?;
                            let at = match self.fragment_at.get(&bytes) {
                                Some(&at) => at,
                                None => {
                                    let at = u32::try_from(self.packed.len()).map_err(|_| {
                                        Error::input("fragments exceed 4 GiB in the packed inode")
                                    })?;
                                    self.packed.extend_from_slice(&bytes);
                                    self.fragment_at.insert(bytes, at);
                                    at
                                }
                            };
                            fragment = Some(at);
                        }
                    } else if ends_here && self.opts.ztailpacking {
                        if let Some(e) = file_exts.last() {
                            let lclusters = size.div_ceil(bs) as usize;
                            let meta = inode_part(jobs[j].0).next_multiple_of(8)
                                + 8
                                + if full_indexes {
                                    8 + (lclusters + 1) * 8
                                } else {
                                    compact_len(lclusters, inode_part(jobs[j].0), self.bs)
                                };
                            if (e.raw || e.data.len() as u64 == bs) && meta + e.clen <= bs as usize
                            {
                                let t = if e.raw {
                                    e.data[..e.clen].to_vec()
                                } else {
                                    e.data[e.data.len() - e.clen..].to_vec()
                                };
                                tail = Some(t);
                            }
                        }
                    }
                    let last_stored = tail.is_some() || fragment.is_some();
                    if self.deduping && ends_here && !last_stored {
                        if let Some(e) = file_exts.last() {
                            self.share(e, next, &mut shared[n_ext - 1]);
                        }
                    }
                    for (x, e) in file_exts.into_iter().enumerate() {
                        let blocks = e.data.len() as u64 / bs;
                        let meta = ExtentMeta {
                            len: e.len,
                            raw: e.raw,
                            blocks,
                            written: 0,
                            shared: None,
                        };
                        if last_stored && x + 1 == n_ext {
                            // A fragment's head is a compressed (HEAD1) one
                            // whatever its data was: the kernel and
                            // fsck.erofs refuse plain heads as fragments.
                            exts.push(ExtentMeta {
                                raw: e.raw && fragment.is_none(),
                                ..meta
                            });
                        } else if let Some(at) = shared[x] {
                            exts.push(ExtentMeta {
                                shared: Some(at),
                                ..meta
                            });
                        } else {
                            exts.push(ExtentMeta {
                                written: blocks,
                                ..meta
                            });
                            out.write(&e.data)?;
                        }
                    }
                    if ends_here {
                        if let Some((j, exts, start)) = cur.take() {
                            let (plan, _, size) = &jobs[j];
                            let r = self.finish_file(
                                &exts,
                                start,
                                *size,
                                inode_part(*plan),
                                tail,
                                fragment,
                            )?;
                            results.push((*plan, r));
                        }
                    }
                    k = last_item;
                }
                window.release(batch_bytes);
            }
            Ok(())
        })?;
        if out.block() > u64::from(u32::MAX) {
            return Err(Error::input("image too large for 32-bit block addresses"));
        }
        Ok(results)
    }

    /// Share `e` with an identical pcluster written before (its block goes
    /// to `shared`), or note that it is about to be written at block `next`.
    /// Returns where the next written pcluster will start.
    fn share(&mut self, e: &Extent, next: u64, shared: &mut Option<u64>) -> u64 {
        use std::collections::hash_map::Entry;
        match self.pcluster_at.entry(pcluster_key(e)) {
            Entry::Occupied(o) => {
                *shared = Some(*o.get());
                next
            }
            Entry::Vacant(v) => {
                v.insert(next);
                next + e.data.len() as u64 / u64::from(self.bs)
            }
        }
    }

    /// The map header and indexes of a file whose written extents start at
    /// block `start`: compact indexes, or full ones when some pclusters are
    /// shared (each head then names its own block).
    fn finish_file(
        &self,
        exts: &[ExtentMeta],
        start: u64,
        size: u64,
        inode_part: usize,
        tail: Option<Vec<u8>>,
        fragment: Option<u32>,
    ) -> Result<FileResult> {
        let bs = u64::from(self.bs);
        let bbits = self.bs.trailing_zeros();
        let big = big_pcluster(&self.opts, self.bs);
        // Full (per-lcluster) indexes first.
        let mut lcs: Vec<Lcluster> = Vec::with_capacity(size.div_ceil(bs) as usize);
        let mut clusterofs = 0u64;
        let mut pblk = start;
        for (x, e) in exts.iter().enumerate() {
            let head_type = if e.raw { TYPE_PLAIN } else { TYPE_HEAD1 };
            let addr = match e.shared {
                Some(at) => at as u32,
                // In full indexes a fragment's head holds the high 32 bits
                // of its offset in the packed inode (always 0 here).
                None if fragment.is_some() && x + 1 == exts.len() => 0,
                None => pblk as u32,
            };
            let mut count = e.len;
            let mut d0 = 0u64;
            let mut d1 = (clusterofs + count) >> bbits;
            if d1 == 0 {
                lcs.push(Lcluster::Head(head_type, clusterofs as u16, addr));
                clusterofs = 0;
                pblk += e.written;
                continue;
            }
            loop {
                if d0 == 0 {
                    lcs.push(Lcluster::Head(head_type, clusterofs as u16, addr));
                } else if d0 == 1 && big {
                    lcs.push(Lcluster::NonHead(
                        e.blocks as u16 | LI_D0_CBLKCNT,
                        d1.min(0xffff) as u16,
                    ));
                } else {
                    lcs.push(Lcluster::NonHead(
                        d0.min(u64::from(LI_D0_CBLKCNT) - 1) as u16,
                        d1.min(0xffff) as u16,
                    ));
                }
                count -= bs - clusterofs;
                clusterofs = 0;
                d0 += 1;
                d1 -= 1;
                if count < bs {
                    break;
                }
            }
            clusterofs = count;
            pblk += e.written;
        }
        if clusterofs != 0 {
            lcs.push(Lcluster::Head(TYPE_PLAIN, clusterofs as u16, 0));
        }
        // Blocks this file added to the image (shared ones were counted
        // by their first user).
        let total_blocks = pblk - start;
        let full = exts.iter().any(|e| e.shared.is_some());

        let mut advise = 0u16;
        if full {
            // (The bit that means "2-byte packs" in compact indexes means
            // "extent records" in full ones: it stays clear.)
            if big {
                advise |= ADVISE_BIG_PCLUSTER_1;
            }
        } else {
            if bbits <= 12 {
                advise |= ADVISE_COMPACTED_2B;
            }
            if big {
                // Compact indexes need both bits alike.
                advise |= ADVISE_BIG_PCLUSTER_1 | ADVISE_BIG_PCLUSTER_2;
            }
        }
        let hdr_start = inode_part.next_multiple_of(8);
        let mpos = hdr_start + 8;
        let mut inline = vec![0u8; hdr_start - inode_part];
        if tail.is_some() {
            advise |= ADVISE_INLINE_PCLUSTER;
        }
        if let Some(at) = fragment {
            // The last extent's data is in the packed inode at `at`.
            advise |= ADVISE_FRAGMENT_PCLUSTER;
            inline.extend_from_slice(&at.to_le_bytes());
        } else {
            let idata_size = tail.as_ref().map(|t| t.len() as u16).unwrap_or(0);
            inline.extend_from_slice(&0u16.to_le_bytes());
            inline.extend_from_slice(&idata_size.to_le_bytes());
        }
        inline.extend_from_slice(&advise.to_le_bytes());
        inline.push(self.opts.algorithm.id());
        inline.push(0); // lcluster = block
        if full {
            // Full indexes start 8 bytes after the map header.
            inline.extend_from_slice(&[0u8; 8]);
            inline.extend_from_slice(&encode_full(&lcs));
        } else {
            inline.extend_from_slice(&encode_compact(
                &lcs,
                mpos,
                start as u32,
                big,
                bbits,
                advise & ADVISE_COMPACTED_2B != 0,
            ));
        }
        if let Some(t) = tail {
            inline.extend_from_slice(&t);
        }
        Ok(FileResult {
            layout: if full {
                LAYOUT_COMPRESSED_FULL
            } else {
                format::LAYOUT_COMPRESSED_COMPACT
            },
            i_u: total_blocks as u32,
            inline,
        })
    }

    pub(crate) fn incompat(&self) -> u32 {
        let mut bits = 0;
        if self.opts.ztailpacking {
            bits |= format::INCOMPAT_ZTAILPACKING;
        }
        if self.opts.fragments {
            bits |= format::INCOMPAT_FRAGMENTS;
        }
        bits
    }

    pub(crate) fn sb_u1(&self) -> u16 {
        let needs_cfgs = !matches!(self.opts.algorithm, Algorithm::Lz4 | Algorithm::Lz4hc)
            || big_pcluster(&self.opts, self.bs);
        if needs_cfgs {
            1 << self.opts.algorithm.id()
        } else {
            0
        }
    }
}

/// Bytes of the compact indexes of `total` lclusters after an inode part
/// of `inode_part` bytes (the same split as [`encode_compact`]).
fn compact_len(total: usize, inode_part: usize, bs: u32) -> usize {
    let mpos = inode_part.next_multiple_of(8) + 8;
    if bs.trailing_zeros() > 12 {
        return total.div_ceil(2) * 8;
    }
    let mut init4 = (32 - mpos % 32) / 4;
    if init4 == 8 {
        init4 = 0;
    }
    if init4 > total {
        return total.div_ceil(2) * 8;
    }
    let c2b = (total - init4) / 16 * 16;
    let end4 = total - init4 - c2b;
    init4 / 2 * 8 + c2b / 16 * 32 + end4.div_ceil(2) * 8
}

/// One logical cluster's full index.
#[derive(Debug, Clone, Copy)]
enum Lcluster {
    /// A head (type, offset of the extent start in this lcluster, block of
    /// its pcluster).
    Head(u16, u16, u32),
    /// A non-head (delta[0], delta[1]).
    NonHead(u16, u16),
}

/// Encode full indexes in the compacted format: 4-byte packs until the
/// indexes are 32-byte aligned, then 2-byte packs of 16, then 4-byte packs.
/// Each pack ends with the block address of its first pcluster; the rest
/// follow from the pcluster sizes (one block, or the CBLKCNT of the first
/// non-head).
fn encode_compact(
    lcs: &[Lcluster],
    mpos: usize,
    start: u32,
    big: bool,
    lclusterbits: u32,
    two_byte: bool,
) -> Vec<u8> {
    let total = lcs.len();
    let (mut init4, mut c2b, mut end4);
    if two_byte {
        init4 = (32 - mpos % 32) / 4;
        if init4 == 8 {
            init4 = 0;
        }
        if init4 > total {
            init4 = 0;
            c2b = 0;
            end4 = total;
        } else {
            c2b = (total - init4) / 16 * 16;
            end4 = total - init4 - c2b;
        }
    } else {
        init4 = 0;
        c2b = 0;
        end4 = total;
    }
    let mut out = Vec::new();
    let mut st = PackState {
        blkaddr: if big { start } else { start.wrapping_sub(1) },
        dummy_head: !big,
        big,
        lobits: lclusterbits.max(12),
    };
    let mut idx = 0;
    while init4 > 0 {
        st.pack(&mut out, &lcs[idx..idx + 2], 4);
        idx += 2;
        init4 -= 2;
    }
    while c2b > 0 {
        st.pack(&mut out, &lcs[idx..idx + 16], 2);
        idx += 16;
        c2b -= 16;
    }
    while end4 > 1 {
        st.pack(&mut out, &lcs[idx..idx + 2], 4);
        idx += 2;
        end4 -= 2;
    }
    if end4 == 1 {
        st.pack(&mut out, &[lcs[idx], Lcluster::Head(TYPE_PLAIN, 0, 0)], 4);
    }
    out
}

/// Encode full indexes as stored: 8 bytes per lcluster (advise with the
/// type, cluster offset, then the pcluster's block for a head or the two
/// distances for a non-head).
fn encode_full(lcs: &[Lcluster]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lcs.len() * 8);
    for lc in lcs {
        match *lc {
            Lcluster::Head(ty, ofs, blkaddr) => {
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&ofs.to_le_bytes());
                out.extend_from_slice(&blkaddr.to_le_bytes());
            }
            Lcluster::NonHead(d0, d1) => {
                out.extend_from_slice(&TYPE_NONHEAD.to_le_bytes());
                out.extend_from_slice(&0u16.to_le_bytes());
                out.extend_from_slice(&d0.to_le_bytes());
                out.extend_from_slice(&d1.to_le_bytes());
            }
        }
    }
    out
}

struct PackState {
    blkaddr: u32,
    dummy_head: bool,
    big: bool,
    lobits: u32,
}

impl PackState {
    fn pack(&mut self, out: &mut Vec<u8>, cv: &[Lcluster], unit: usize) {
        let vcnt = cv.len();
        let size = unit * vcnt;
        let encodebits = (size * 8 - 32) / vcnt;
        let mut buf = vec![0u8; size];
        let mut stored = self.blkaddr;
        let mut blkaddr = self.blkaddr;
        let mut update = self.big;
        for (i, lc) in cv.iter().enumerate() {
            let (ty, offset) = match *lc {
                Lcluster::NonHead(d0, d1) => {
                    let off = if d0 & LI_D0_CBLKCNT != 0 {
                        blkaddr = blkaddr.wrapping_add(u32::from(d0 & !LI_D0_CBLKCNT));
                        self.dummy_head = false;
                        d0
                    } else if i + 1 == vcnt {
                        d1.min(LI_D0_CBLKCNT - 1)
                    } else {
                        d0
                    };
                    (TYPE_NONHEAD, off)
                }
                Lcluster::Head(ty, ofs, _) => {
                    if self.dummy_head {
                        blkaddr = blkaddr.wrapping_add(1);
                        if update {
                            stored = blkaddr;
                        }
                    }
                    self.dummy_head = true;
                    update = false;
                    (ty, ofs)
                }
            };
            let v = (u32::from(ty) << self.lobits) | u32::from(offset);
            let pos = i * encodebits;
            let word = v << (pos % 8);
            for b in 0..3 {
                if let Some(slot) = buf.get_mut(pos / 8 + b) {
                    *slot |= (word >> (8 * b)) as u8;
                }
            }
        }
        buf[size - 4..].copy_from_slice(&stored.to_le_bytes());
        self.blkaddr = blkaddr;
        out.extend_from_slice(&buf);
    }
}
