//! Compressed data: the lcluster indexes (full, compacted 2/4-byte, and the
//! 48-bit extent records), how they map a logical offset to a pcluster, and
//! the read path with its bounded cache of decoded pclusters.
//!
//! Unlike the kernel, which decodes into the page cache, a read here decodes
//! a whole extent once and keeps it in a byte-bounded cache, so neighbouring
//! reads (and thousands of small files sharing the packed inode's pclusters)
//! decode nothing again.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::decompress::{
    parse_cfg, Algorithm, Config, Decompressor, PCLUSTER_MAX_DSIZE, PCLUSTER_MAX_SIZE,
};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::inode::{DataLayout, Inode};
use crate::le::{le16, le32};
use crate::superblock::{incompat, Superblock};

const ADVISE_COMPACTED_2B: u16 = 0x0001;
const ADVISE_EXTENTS: u16 = 0x0001;
const ADVISE_BIG_PCLUSTER_1: u16 = 0x0002;
const ADVISE_BIG_PCLUSTER_2: u16 = 0x0004;
const ADVISE_INLINE_PCLUSTER: u16 = 0x0008;
const ADVISE_INTERLACED_PCLUSTER: u16 = 0x0010;
const ADVISE_FRAGMENT_PCLUSTER: u16 = 0x0020;

const LCLUSTER_TYPE_PLAIN: u8 = 0;
const LCLUSTER_TYPE_HEAD1: u8 = 1;
const LCLUSTER_TYPE_NONHEAD: u8 = 2;
const LCLUSTER_TYPE_HEAD2: u8 = 3;
const LI_PARTIAL_REF: u16 = 1 << 15;
const LI_D0_CBLKCNT: u64 = 1 << 11;

const EXTENT_PLEN_PARTIAL: u32 = 1 << 27;
const EXTENT_PLEN_FMT_BIT: u32 = 28;
const EXTENT_PLEN_MASK: u32 = ((PCLUSTER_MAX_SIZE as u32) << 1) - 1;

/// Default budget of the decoded-pcluster cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// How many per-inode compression headers are remembered.
const ZINFO_CACHE_MAX: usize = 1 << 16;
/// Evicted decode buffers kept for the next decodes, at most this many...
const SPARE_BUFFERS: usize = 8;
/// ...and this many bytes of capacity in all (a hostile image's 12 MiB
/// extents must not pin much memory beside the cache).
const SPARE_BYTES: usize = 16 << 20;

thread_local! {
    /// The stored bytes of the pcluster being decoded: one buffer per
    /// thread (at most [`PCLUSTER_MAX_SIZE`]), reused by every decode.
    static RAW: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Per-image state of the compressed read path.
#[derive(Debug, Default)]
pub(crate) struct ZState {
    decompressor: Option<Decompressor>,
    zero_padding: bool,
    available_algs: u16,
    cache: PclusterCache,
    infos: Mutex<HashMap<u64, Arc<ZInfo>>>,
}

impl ZState {
    pub(crate) fn new(sb: &Superblock) -> Result<Self> {
        let mut config = Config::default();
        let available_algs;
        if sb.has_incompat(incompat::COMPR_CFGS) {
            available_algs = sb.u1;
            for (id, record) in &sb.compr_cfgs {
                let alg = Algorithm::try_from(*id)?;
                config.set(parse_cfg(alg, record)?);
            }
        } else {
            available_algs = 1;
            config.lz4.max_distance = sb.u1;
        }
        let decompressor = Decompressor::new(config, sb.block_size())?;
        Ok(ZState {
            decompressor: Some(decompressor),
            zero_padding: sb.has_incompat(incompat::ZERO_PADDING),
            available_algs,
            cache: PclusterCache::new(DEFAULT_CACHE_BYTES),
            infos: Mutex::new(HashMap::new()),
        })
    }
}

/// How a pcluster's bytes become file data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Format {
    /// Compressed with an algorithm.
    Alg(Algorithm),
    /// Stored plainly from the start of the pcluster.
    Shifted,
    /// Stored plainly, rotated by the extent's offset in its block.
    Interlaced,
}

/// Where a pcluster is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    /// On a device (id 0 is resolved through the unified address space).
    Device(u64),
    /// Inline after the inode's indexes (ztailpacking).
    Inline { in_mbox: bool, pos: u64 },
}

/// What a logical range of a compressed file maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ZKind {
    /// Reads as zeros.
    Unmapped,
    /// Stored in the packed inode from this offset.
    Fragment(u64),
    /// A pcluster of `plen` bytes decoding to the extent.
    Pcluster {
        src: Source,
        plen: u64,
        format: Format,
        partial: bool,
    },
}

/// A whole extent: logical `[la, la + llen)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ZExtent {
    la: u64,
    llen: u64,
    kind: ZKind,
}

/// The pcluster fields of an extent that must be one.
fn pcluster_of(inode: &Inode, ext: &ZExtent) -> Result<(Source, u64, Format, bool)> {
    match ext.kind {
        ZKind::Pcluster {
            src,
            plen,
            format,
            partial,
        } => Ok((src, plen, format, partial)),
        _ => Err(zc(inode, "not a pcluster")),
    }
}

/// Records between two remembered physical addresses of 4-byte extent
/// records (one 4 KiB metadata read at most per lookup).
const RECORD_CHECKPOINT_STRIDE: u64 = 1024;

/// The per-inode map header and what was derived from it once.
#[derive(Debug, Default)]
struct ZInfo {
    /// The whole file lives in the packed inode at `fragment_off`.
    whole_fragment: bool,
    fragment_off: u64,
    advise: u16,
    lclusterbits: u8,
    algs: [u8; 2],
    idata_size: u16,
    extents: u64,
    /// The head lcluster of the last extent (the tail pcluster or fragment).
    tail_headlcn: u64,
    /// Where the inline tail pcluster is, when ztailpacking.
    inline_pos: u64,
    /// 4-byte extent records store only lengths, so the physical address of
    /// record n is the sum of those before it: remembered every
    /// [`RECORD_CHECKPOINT_STRIDE`] records, so a lookup costs one bounded
    /// read instead of a scan from the start of the file.
    checkpoints: Mutex<Vec<u64>>,
}

impl ZInfo {
    fn uses_extent_records(&self, layout: DataLayout) -> bool {
        layout == DataLayout::CompressedFull && self.advise & ADVISE_EXTENTS != 0
    }
}

/// The state of a walk over lcluster indexes, as the kernel keeps it.
#[derive(Debug, Default)]
struct Recorder {
    lcn: u64,
    typ: u8,
    headtype: u8,
    clusterofs: u64,
    delta: [u64; 2],
    pblk: u64,
    compressedblks: u64,
    nextpackoff: u64,
    partialref: bool,
}

fn zc(inode: &Inode, what: impl Into<String>) -> Error {
    Error::corrupt_nid(inode.nid, what)
}

/// One compacted index entry: `lobits` bits of value then 2 bits of type,
/// at bit `pos` of the pack.
fn decode_compacted(lobits: u32, pack: &[u8], pos: u64) -> (u64, u8) {
    let byte = (pos / 8) as usize;
    let mut w = [0u8; 4];
    for (i, b) in w.iter_mut().enumerate() {
        *b = pack.get(byte + i).copied().unwrap_or(0);
    }
    let v = u32::from_le_bytes(w) >> (pos & 7);
    (
        u64::from(v & ((1u32 << lobits) - 1)),
        ((v >> lobits) & 3) as u8,
    )
}

impl Image {
    /// The map header of a compressed inode, parsed once.
    fn z_info(&self, inode: &Inode) -> Result<Arc<ZInfo>> {
        if let Some(zi) = self
            .z
            .infos
            .lock()
            .ok()
            .and_then(|m| m.get(&inode.nid).cloned())
        {
            return Ok(zi);
        }
        let zi = Arc::new(self.read_z_info(inode)?);
        if let Ok(mut m) = self.z.infos.lock() {
            if m.len() >= ZINFO_CACHE_MAX {
                m.clear();
            }
            m.insert(inode.nid, zi.clone());
        }
        Ok(zi)
    }

    fn header_pos(inode: &Inode) -> Result<u64> {
        Ok(inode.after_xattrs()?.next_multiple_of(8))
    }

    fn read_z_info(&self, inode: &Inode) -> Result<ZInfo> {
        let sb = self.superblock();
        let pos = Self::header_pos(inode)?;
        let mut h = [0u8; 8];
        self.meta_read(inode.in_mbox, pos, &mut h)?;
        let mut zi = ZInfo::default();
        if h[7] >> 7 != 0 {
            zi.whole_fragment = true;
            zi.advise = ADVISE_FRAGMENT_PCLUSTER;
            zi.fragment_off = u64::from_le_bytes(h) ^ (1u64 << 63);
            return Ok(zi);
        }
        zi.advise = le16(&h, 4);
        let cbits = h[7] & 15;
        if u32::from(sb.blkszbits) + u32::from(cbits) > 30 {
            return Err(zc(
                inode,
                format!(
                    "logical cluster size 2^{} is too large",
                    sb.blkszbits + cbits
                ),
            ));
        }
        zi.lclusterbits = sb.blkszbits + cbits;
        if zi.uses_extent_records(inode.layout) {
            zi.extents = u64::from(le32(&h, 0)) | (u64::from(le16(&h, 6)) << 32);
            return Ok(zi);
        }
        zi.algs = [h[6] & 15, h[6] >> 4];
        if zi.advise & ADVISE_FRAGMENT_PCLUSTER != 0 {
            zi.fragment_off = u64::from(le32(&h, 0));
        } else if zi.advise & ADVISE_INLINE_PCLUSTER != 0 {
            zi.idata_size = le16(&h, 2);
        }
        if inode.layout == DataLayout::CompressedCompact
            && (zi.advise & ADVISE_BIG_PCLUSTER_1 == 0) != (zi.advise & ADVISE_BIG_PCLUSTER_2 == 0)
        {
            return Err(zc(
                inode,
                "big pcluster heads 1 and 2 of compact indexes disagree",
            ));
        }
        if zi.idata_size != 0 || zi.advise & ADVISE_FRAGMENT_PCLUSTER != 0 {
            // Find the tail extent once: which lcluster heads it, where its
            // inline pcluster is, and the high bits of a fragment offset.
            if inode.size == 0 {
                return Err(zc(inode, "an empty file with a tail pcluster"));
            }
            let mut m = Recorder::default();
            let initial = (inode.size - 1) >> zi.lclusterbits;
            self.load_lcluster(inode, &zi, &mut m, initial, false)?;
            zi.inline_pos = m.nextpackoff;
            let endoff = (inode.size - 1) & ((1u64 << zi.lclusterbits) - 1);
            self.find_head(inode, &zi, &mut m, endoff)?;
            zi.tail_headlcn = m.lcn;
            if zi.advise & ADVISE_FRAGMENT_PCLUSTER != 0
                && inode.layout == DataLayout::CompressedFull
            {
                zi.fragment_off |= m.pblk << 32;
            }
        }
        Ok(zi)
    }

    fn load_lcluster(
        &self,
        inode: &Inode,
        zi: &ZInfo,
        m: &mut Recorder,
        lcn: u64,
        lookahead: bool,
    ) -> Result<()> {
        match inode.layout {
            DataLayout::CompressedCompact => self.load_compact(inode, zi, m, lcn, lookahead)?,
            _ => self.load_full(inode, zi, m, lcn)?,
        }
        if m.typ != LCLUSTER_TYPE_NONHEAD && m.clusterofs >= 1u64 << zi.lclusterbits {
            return Err(zc(
                inode,
                format!(
                    "cluster offset {} of lcluster {lcn} is too large",
                    m.clusterofs
                ),
            ));
        }
        Ok(())
    }

    fn load_full(&self, inode: &Inode, zi: &ZInfo, m: &mut Recorder, lcn: u64) -> Result<()> {
        let base = Self::header_pos(inode)? + 16;
        let pos = lcn
            .checked_mul(8)
            .and_then(|o| o.checked_add(base))
            .ok_or_else(|| zc(inode, "lcluster index position overflows"))?;
        let mut di = [0u8; 8];
        self.meta_read(inode.in_mbox, pos, &mut di)?;
        m.lcn = lcn;
        m.nextpackoff = pos + 8;
        let advise = le16(&di, 0);
        m.typ = (advise & 3) as u8;
        if m.typ == LCLUSTER_TYPE_NONHEAD {
            m.clusterofs = 1u64 << zi.lclusterbits;
            m.delta[0] = u64::from(le16(&di, 4));
            if m.delta[0] & LI_D0_CBLKCNT != 0 {
                if zi.advise & (ADVISE_BIG_PCLUSTER_1 | ADVISE_BIG_PCLUSTER_2) == 0 {
                    return Err(zc(
                        inode,
                        format!("block count in lcluster {lcn} without big pclusters"),
                    ));
                }
                m.compressedblks = m.delta[0] & !LI_D0_CBLKCNT;
                m.delta[0] = 1;
            }
            m.delta[1] = u64::from(le16(&di, 6));
        } else {
            m.partialref = advise & LI_PARTIAL_REF != 0;
            m.clusterofs = u64::from(le16(&di, 2));
            m.pblk = u64::from(le32(&di, 4));
        }
        Ok(())
    }

    fn load_compact(
        &self,
        inode: &Inode,
        zi: &ZInfo,
        m: &mut Recorder,
        lcn: u64,
        lookahead: bool,
    ) -> Result<()> {
        let sb = self.superblock();
        let ebase = Self::header_pos(inode)? + 8;
        let bits = u32::from(zi.lclusterbits);
        let totalidx = inode.size.div_ceil(1u64 << sb.blkszbits);
        if lcn >= totalidx || bits > 14 {
            return Err(zc(inode, format!("lcluster {lcn} is out of range")));
        }
        m.lcn = lcn;
        let initial_4b = ((32 - ebase % 32) / 4) & 7;
        let compacted_2b = if zi.advise & ADVISE_COMPACTED_2B != 0 && initial_4b < totalidx {
            (totalidx - initial_4b) / 16 * 16
        } else {
            0
        };
        let mut pos = ebase;
        let mut rel = lcn;
        let mut shift = 2u32;
        if rel >= initial_4b {
            pos += initial_4b * 4;
            rel -= initial_4b;
            if rel < compacted_2b {
                shift = 1;
            } else {
                pos += compacted_2b * 2;
                rel -= compacted_2b;
            }
        }
        pos += rel << shift;
        let vcnt: u64 = match shift {
            2 if bits <= 14 => 2,
            1 if bits <= 12 => 16,
            _ => {
                return Err(Error::Incompatible(format!(
                    "nid {}: compacted indexes with lcluster size 2^{bits}",
                    inode.nid
                )))
            }
        };
        let packsize = vcnt << shift;
        let packpos = pos / packsize * packsize;
        let mut pack = [0u8; 32];
        let pack = &mut pack[..packsize as usize];
        self.meta_read(inode.in_mbox, packpos, pack)?;
        m.nextpackoff = packpos + packsize;
        let lobits = bits.max(12);
        let encodebits = ((packsize - 4) * 8) / vcnt;
        let i = (pos - packpos) >> shift;
        let (lo, typ) = decode_compacted(lobits, pack, encodebits * i);
        m.typ = typ;
        let big = zi.advise & ADVISE_BIG_PCLUSTER_1 != 0;
        if typ == LCLUSTER_TYPE_NONHEAD {
            m.clusterofs = 1u64 << bits;
            if lookahead {
                // delta[1]: the distance to the next head, from the entries
                // after this one in the pack.
                let mut d1 = 0u64;
                let mut j = i;
                loop {
                    let (l, t) = decode_compacted(lobits, pack, encodebits * j);
                    if t != LCLUSTER_TYPE_NONHEAD {
                        break;
                    }
                    d1 += 1;
                    j += 1;
                    if j >= vcnt {
                        // The pack's last entry holds the rest of delta[1].
                        if l & LI_D0_CBLKCNT == 0 {
                            d1 += l.saturating_sub(1);
                        }
                        break;
                    }
                }
                m.delta[1] = d1;
            }
            if lo & LI_D0_CBLKCNT != 0 {
                if !big {
                    return Err(zc(
                        inode,
                        format!("block count in lcluster {lcn} without big pclusters"),
                    ));
                }
                m.compressedblks = lo & !LI_D0_CBLKCNT;
                m.delta[0] = 1;
                return Ok(());
            } else if i + 1 != vcnt {
                m.delta[0] = lo;
                return Ok(());
            }
            // The last entry of a pack holds delta[1]; delta[0] comes from
            // the entry before it.
            let (plo, ptype) = decode_compacted(lobits, pack, encodebits * (i - 1));
            let plo = if ptype != LCLUSTER_TYPE_NONHEAD {
                0
            } else if plo & LI_D0_CBLKCNT != 0 {
                1
            } else {
                plo
            };
            m.delta[0] = plo + 1;
            return Ok(());
        }
        m.clusterofs = lo;
        m.delta[0] = 0;
        // The pack stores one base block; count the pclusters before this
        // head within the pack to find its own.
        let mut nblk: u64 = 0;
        let mut j = i as i64;
        if !big {
            nblk = 1;
            while j > 0 {
                j -= 1;
                let (l, t) = decode_compacted(lobits, pack, encodebits * j as u64);
                if t == LCLUSTER_TYPE_NONHEAD {
                    j -= l as i64;
                }
                if j >= 0 {
                    nblk += 1;
                }
            }
        } else {
            while j > 0 {
                j -= 1;
                let (l, t) = decode_compacted(lobits, pack, encodebits * j as u64);
                if t == LCLUSTER_TYPE_NONHEAD {
                    if l & LI_D0_CBLKCNT != 0 {
                        j -= 1;
                        nblk += l & !LI_D0_CBLKCNT;
                        continue;
                    }
                    if l <= 1 {
                        return Err(zc(
                            inode,
                            format!("bogus delta in the pack of lcluster {lcn}"),
                        ));
                    }
                    j -= l as i64 - 2;
                    continue;
                }
                nblk += 1;
            }
        }
        let base = u64::from(le32(pack, pack.len() - 4));
        m.pblk = base + nblk;
        Ok(())
    }

    /// From the lcluster loaded in `m` for a logical offset whose offset in
    /// its lcluster is `endoff`, walk back to the head of its extent.
    /// Returns true when the extent ends at the loaded head (the offset lies
    /// before that head's cluster offset).
    fn find_head(&self, inode: &Inode, zi: &ZInfo, m: &mut Recorder, endoff: u64) -> Result<bool> {
        let mut ends_at_loaded = false;
        let distance = match m.typ {
            LCLUSTER_TYPE_PLAIN | LCLUSTER_TYPE_HEAD1 | LCLUSTER_TYPE_HEAD2 => {
                if endoff >= m.clusterofs {
                    m.headtype = m.typ;
                    return Ok(false);
                }
                if m.lcn == 0 {
                    return Err(zc(inode, "logical cluster 0 starts after its offset"));
                }
                ends_at_loaded = true;
                1
            }
            _ => m.delta[0],
        };
        let mut distance = distance;
        // Each step moves back at least one lcluster, so this ends.
        loop {
            if distance == 0 || m.lcn < distance {
                return Err(zc(
                    inode,
                    format!("bogus lookback distance {distance} at lcluster {}", m.lcn),
                ));
            }
            let lcn = m.lcn - distance;
            self.load_lcluster(inode, zi, m, lcn, false)?;
            if m.typ == LCLUSTER_TYPE_NONHEAD {
                distance = m.delta[0];
                continue;
            }
            m.headtype = m.typ;
            return Ok(ends_at_loaded);
        }
    }

    /// Map logical offset `la` of a compressed inode to its whole extent.
    fn map_z(&self, inode: &Inode, zi: &ZInfo, la: u64) -> Result<ZExtent> {
        if zi.whole_fragment {
            return Ok(ZExtent {
                la: 0,
                llen: inode.size,
                kind: ZKind::Fragment(zi.fragment_off),
            });
        }
        if zi.uses_extent_records(inode.layout) {
            return self.map_z_records(inode, zi, la);
        }
        let fragment = zi.advise & ADVISE_FRAGMENT_PCLUSTER != 0;
        if fragment && zi.tail_headlcn == 0 {
            return Ok(ZExtent {
                la: 0,
                llen: inode.size,
                kind: ZKind::Fragment(zi.fragment_off),
            });
        }
        let bits = zi.lclusterbits;
        let mut m = Recorder::default();
        let initial = la >> bits;
        self.load_lcluster(inode, zi, &mut m, initial, false)?;
        self.find_head(inode, zi, &mut m, la & ((1u64 << bits) - 1))?;
        let head_la = (m.lcn << bits) | m.clusterofs;
        let partial = m.partialref;
        let headlcn = m.lcn;
        let headtype = m.headtype;
        let pblk = m.pblk;

        let src;
        let plen;
        let is_tail = headlcn == zi.tail_headlcn && (zi.idata_size != 0 || fragment);
        if is_tail && zi.idata_size != 0 {
            src = Source::Inline {
                in_mbox: inode.in_mbox,
                pos: zi.inline_pos,
            };
            plen = u64::from(zi.idata_size);
            let bs = self.block_size();
            if (zi.inline_pos & (bs - 1)) + plen > bs {
                return Err(zc(
                    inode,
                    format!("inline pcluster of {plen} bytes crosses a block"),
                ));
            }
        } else if is_tail {
            let llen = inode
                .size
                .checked_sub(head_la)
                .ok_or_else(|| zc(inode, "tail fragment starts past the end"))?;
            return Ok(ZExtent {
                la: head_la,
                llen,
                kind: ZKind::Fragment(zi.fragment_off),
            });
        } else {
            src = Source::Device(pblk << self.superblock().blkszbits);
            plen = self.compressed_len(inode, zi, &mut m)? << self.superblock().blkszbits;
        }
        let llen = self.decompressed_len(inode, zi, &mut m, headlcn, head_la)?;
        let format = match headtype {
            LCLUSTER_TYPE_PLAIN => {
                if llen > plen {
                    return Err(zc(
                        inode,
                        format!("plain pcluster of {plen} bytes for {llen} bytes of data"),
                    ));
                }
                if zi.advise & ADVISE_INTERLACED_PCLUSTER != 0 {
                    Format::Interlaced
                } else {
                    Format::Shifted
                }
            }
            LCLUSTER_TYPE_HEAD2 => self.algorithm(inode, zi.algs[1])?,
            _ => self.algorithm(inode, zi.algs[0])?,
        };
        Ok(ZExtent {
            la: head_la,
            llen,
            kind: ZKind::Pcluster {
                src,
                plen,
                format,
                partial,
            },
        })
    }

    fn algorithm(&self, inode: &Inode, id: u8) -> Result<Format> {
        let alg = Algorithm::try_from(id).map_err(|_| {
            Error::Incompatible(format!(
                "nid {}: unknown compression algorithm {id}",
                inode.nid
            ))
        })?;
        if self.z.available_algs & (1 << id) == 0 {
            return Err(zc(
                inode,
                format!("algorithm {alg} is not among the image's algorithms"),
            ));
        }
        Ok(Format::Alg(alg))
    }

    /// Blocks of the pcluster headed at `m.lcn`.
    fn compressed_len(&self, inode: &Inode, zi: &ZInfo, m: &mut Recorder) -> Result<u64> {
        let big1 = zi.advise & ADVISE_BIG_PCLUSTER_1 != 0;
        let big2 = zi.advise & ADVISE_BIG_PCLUSTER_2 != 0;
        let lcn = m.lcn + 1;
        if (m.headtype == LCLUSTER_TYPE_HEAD1 && !big1)
            || ((m.headtype == LCLUSTER_TYPE_PLAIN || m.headtype == LCLUSTER_TYPE_HEAD2) && !big2)
            || (lcn << zi.lclusterbits) >= inode.size
        {
            m.compressedblks = 1;
        }
        if m.compressedblks == 0 {
            self.load_lcluster(inode, zi, m, lcn, false)?;
            if m.typ == LCLUSTER_TYPE_NONHEAD {
                if m.delta[0] != 1 {
                    return Err(zc(inode, format!("bogus block count at lcluster {lcn}")));
                }
            } else {
                m.compressedblks = 1;
            }
        }
        if m.compressedblks == 0
            || m.compressedblks << self.superblock().blkszbits > PCLUSTER_MAX_SIZE as u64
        {
            return Err(zc(
                inode,
                format!("pcluster of {} blocks", m.compressedblks),
            ));
        }
        Ok(m.compressedblks)
    }

    /// The decoded length of the extent headed at lcluster `headlcn`.
    fn decompressed_len(
        &self,
        inode: &Inode,
        zi: &ZInfo,
        m: &mut Recorder,
        headlcn: u64,
        head_la: u64,
    ) -> Result<u64> {
        let bits = zi.lclusterbits;
        let mut lcn = headlcn;
        loop {
            if (lcn << bits) >= inode.size {
                return inode
                    .size
                    .checked_sub(head_la)
                    .ok_or_else(|| zc(inode, "extent starts past the end"));
            }
            if (lcn << bits).saturating_sub(head_la) > PCLUSTER_MAX_DSIZE as u64 {
                return Err(zc(
                    inode,
                    format!("extent at {head_la} decodes to more than 12 MiB"),
                ));
            }
            self.load_lcluster(inode, zi, m, lcn, true)?;
            if m.typ == LCLUSTER_TYPE_NONHEAD {
                lcn += m.delta[1].max(1);
            } else {
                if lcn != headlcn {
                    break;
                }
                lcn += 1;
            }
        }
        let end = (lcn << bits) + m.clusterofs;
        end.checked_sub(head_la)
            .filter(|&l| l > 0)
            .ok_or_else(|| zc(inode, format!("extent at {head_la} has no length")))
    }

    /// The 48-bit extent records of COMPRESSED_FULL inodes.
    fn map_z_records(&self, inode: &Inode, zi: &ZInfo, la: u64) -> Result<ZExtent> {
        let bs = self.block_size();
        let recsz: u64 = 4 << ((zi.advise >> 1) & 3);
        let pos = (Self::header_pos(inode)? + 8).next_multiple_of(recsz);
        let lsize = 1u64 << zi.lclusterbits;
        let mut lend = inode.size;
        let (mut lstart, mut plen, mut pa, last);
        let mut rec = [0u8; 32];
        if recsz <= 8 {
            // Fixed-length extents, one record per lcluster.
            let t = la >> zi.lclusterbits;
            if t >= zi.extents {
                return Err(zc(
                    inode,
                    format!("offset {la} is past the {} extent records", zi.extents),
                ));
            }
            if recsz == 4 {
                let records = pos + 8;
                (pa, plen) = self.record4(inode, zi, pos, records, t)?;
            } else {
                let r = &mut rec[..8];
                self.meta_read(inode.in_mbox, pos + t * 8, r)?;
                plen = le32(r, 0);
                pa = u64::from(le32(r, 4));
            }
            lstart = t << zi.lclusterbits;
            let next = lstart + lsize;
            last = next >= inode.size.next_multiple_of(lsize);
            lend = lend.min(next);
        } else {
            lstart = lend;
            plen = 0;
            pa = 0;
            let (mut l, mut r) = (0u64, zi.extents);
            while l < r {
                let mid = l + (r - l) / 2;
                let at = mid
                    .checked_mul(recsz)
                    .and_then(|o| o.checked_add(pos))
                    .ok_or_else(|| zc(inode, "extent record position overflows"))?;
                let b = &mut rec[..recsz as usize];
                self.meta_read(inode.in_mbox, at, b)?;
                let mut rla = u64::from(le32(b, 12));
                let rpa = u64::from(le32(b, 4)) | (u64::from(le32(b, 8)) << 32);
                if recsz > 16 {
                    rla |= u64::from(le32(b, 16)) << 32;
                }
                if rla > la {
                    r = mid;
                    if rla > lend {
                        return Err(zc(inode, "extent records out of order"));
                    }
                    lend = rla;
                } else {
                    l = mid + 1;
                    if la == rla {
                        r = r.min(l + 1);
                    }
                    lstart = rla;
                    plen = le32(b, 0);
                    pa = rpa;
                }
            }
            last = l >= zi.extents;
        }
        if lstart >= lend || lstart > la {
            return Err(zc(inode, format!("no extent record covers offset {la}")));
        }
        let llen = lend - lstart;
        if last && zi.advise & ADVISE_FRAGMENT_PCLUSTER != 0 {
            let mut off = u64::from(plen);
            if recsz > 4 {
                off |= pa << 32;
            }
            return Ok(ZExtent {
                la: lstart,
                llen,
                kind: ZKind::Fragment(off),
            });
        }
        if plen & EXTENT_PLEN_MASK == 0 {
            return Ok(ZExtent {
                la: lstart,
                llen,
                kind: ZKind::Unmapped,
            });
        }
        let fmt = plen >> EXTENT_PLEN_FMT_BIT;
        let partial = plen & EXTENT_PLEN_PARTIAL != 0;
        let plen = u64::from(plen & EXTENT_PLEN_MASK);
        let format = if fmt != 0 {
            self.algorithm(inode, (fmt - 1) as u8)?
        } else if zi.advise & ADVISE_INTERLACED_PCLUSTER != 0 && (pa | plen) & (bs - 1) == 0 {
            Format::Interlaced
        } else {
            Format::Shifted
        };
        if matches!(format, Format::Interlaced | Format::Shifted) && llen > plen {
            return Err(zc(
                inode,
                format!("plain pcluster of {plen} bytes for {llen} bytes of data"),
            ));
        }
        Ok(ZExtent {
            la: lstart,
            llen,
            kind: ZKind::Pcluster {
                src: Source::Device(pa),
                plen,
                format,
                partial,
            },
        })
    }

    /// The physical address and raw length of 4-byte extent record `t`:
    /// addresses start at the 8-byte value at `head` and advance by each
    /// record's length.
    fn record4(
        &self,
        inode: &Inode,
        zi: &ZInfo,
        head: u64,
        records: u64,
        t: u64,
    ) -> Result<(u64, u32)> {
        let stride = RECORD_CHECKPOINT_STRIDE;
        let read_lens = |first: u64, count: u64| -> Result<Vec<u32>> {
            let mut raw = vec![0u8; (count * 4) as usize];
            self.meta_read(inode.in_mbox, records + first * 4, &mut raw)?;
            Ok(raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let c = t / stride;
        let base = {
            let mut cps = zi
                .checkpoints
                .lock()
                .map_err(|_| zc(inode, "extent checkpoints poisoned"))?;
            if cps.is_empty() {
                let mut b = [0u8; 8];
                self.meta_read(inode.in_mbox, head, &mut b)?;
                cps.push(u64::from_le_bytes(b));
            }
            while (cps.len() as u64) <= c {
                let k = cps.len() as u64 - 1;
                let lens = read_lens(k * stride, stride.min(zi.extents - k * stride))?;
                let mut p = *cps.last().unwrap_or(&0);
                for l in lens {
                    p = p.saturating_add(u64::from(l & EXTENT_PLEN_MASK));
                }
                cps.push(p);
            }
            cps[c as usize]
        };
        let lens = read_lens(c * stride, t - c * stride + 1)?;
        let before: u64 = lens[..lens.len() - 1]
            .iter()
            .map(|&l| u64::from(l & EXTENT_PLEN_MASK))
            .sum();
        let plen = *lens.last().unwrap_or(&0);
        Ok((base.saturating_add(before), plen))
    }

    /// Decode a whole extent, or take it from the cache, for a read of
    /// its bytes `[start, end)` (see [`PclusterCache::get`]).
    fn decoded(&self, inode: &Inode, ext: &ZExtent, start: usize, end: usize) -> Result<Decoded> {
        let (src, plen, format, partial) = pcluster_of(inode, ext)?;
        if plen > PCLUSTER_MAX_SIZE as u64 || ext.llen > PCLUSTER_MAX_DSIZE as u64 {
            return Err(Error::Incompatible(format!(
                "nid {}: pcluster of {plen} bytes decoding to {} bytes is over the format's limits",
                inode.nid, ext.llen
            )));
        }
        let bs = self.block_size();
        let key = CacheKey {
            src,
            plen,
            llen: ext.llen,
            partial,
            rotate: if format == Format::Interlaced {
                ext.la & (bs - 1)
            } else {
                0
            },
        };
        if let Some(hit) = self.z.cache.get(&key, start, end) {
            return Ok(hit);
        }
        // Both buffers come back from earlier decodes and are not zeroed:
        // the stored bytes are read in whole and every decoder writes all
        // of `out` or fails (and a failed `out` is never shown to anyone).
        let mut out = self.z.cache.take_buffer(ext.llen as usize);
        RAW.with(|cell| match cell.try_borrow_mut() {
            Ok(mut raw) => self.decode_extent(inode, ext, &mut raw, &mut out),
            // Only a decode nested in another (a compressed metabox) gets
            // here; a buffer of its own is just as correct.
            Err(_) => self.decode_extent(inode, ext, &mut Vec::new(), &mut out),
        })?;
        let data: Decoded = Arc::new(out);
        self.z.cache.put(key, data.clone(), start, end);
        Ok(data)
    }

    /// Read the pcluster of `ext` into `raw` and decode it into all of
    /// `out` (exactly `ext.llen` bytes).
    fn decode_extent(
        &self,
        inode: &Inode,
        ext: &ZExtent,
        raw: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<()> {
        let (src, plen, format, partial) = pcluster_of(inode, ext)?;
        let bs = self.block_size();
        // Old bytes left in `raw` are overwritten by the exact read below.
        raw.resize(plen as usize, 0);
        let raw = &mut raw[..];
        match src {
            Source::Device(pa) => {
                let (dev, pos) = self.map_device(0, pa)?;
                self.dev_read(dev, pos, raw)
                    .map_err(|e| e.with_nid(inode.nid))?;
            }
            Source::Inline { in_mbox, pos } => self.meta_read(in_mbox, pos, raw)?,
        }
        let llen = out.len();
        match format {
            Format::Shifted => {
                let a = raw
                    .get(..llen)
                    .ok_or_else(|| zc(inode, "plain pcluster too short"))?;
                out.copy_from_slice(a);
            }
            Format::Interlaced => {
                if plen > bs {
                    return Err(zc(inode, "interlaced pcluster larger than a block"));
                }
                let skip = (ext.la & (bs - 1)) as usize;
                let right = (bs as usize - skip).min(llen);
                let a = raw
                    .get(skip..skip + right)
                    .ok_or_else(|| zc(inode, "interlaced pcluster too short"))?;
                out[..right].copy_from_slice(a);
                let b = raw
                    .get(..llen - right)
                    .ok_or_else(|| zc(inode, "interlaced pcluster too short"))?;
                out[right..].copy_from_slice(b);
            }
            Format::Alg(alg) => {
                let d = self
                    .z
                    .decompressor
                    .as_ref()
                    .ok_or_else(|| zc(inode, "no decompressor"))?;
                d.decompress(alg, raw, out, partial, self.z.zero_padding)
                    .map_err(|e| {
                        let at = match src {
                            Source::Device(pa) => pa,
                            Source::Inline { pos, .. } => pos,
                        };
                        Error::corrupt_at(
                            Some(inode.nid),
                            at,
                            format!("pcluster for offset {}: {e}", ext.la),
                        )
                    })?;
            }
        }
        Ok(())
    }

    /// Read from a compressed inode.
    pub(crate) fn read_compressed(
        &self,
        inode: &Inode,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let zi = self.z_info(inode)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let ext = self.map_z(inode, &zi, pos)?;
            let end = ext
                .la
                .checked_add(ext.llen)
                .ok_or_else(|| zc(inode, "extent end overflows"))?;
            if ext.la > pos || end <= pos {
                return Err(zc(
                    inode,
                    format!("extent [{}, {end}) does not cover offset {pos}", ext.la),
                ));
            }
            let skip = pos - ext.la;
            let n = ((end - pos) as usize).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match ext.kind {
                ZKind::Unmapped => dst.fill(0),
                ZKind::Fragment(off) => {
                    let packed = self.packed_inode()?;
                    if packed.nid == inode.nid {
                        return Err(zc(inode, "the packed inode refers to a fragment of itself"));
                    }
                    let at = off
                        .checked_add(skip)
                        .ok_or_else(|| zc(inode, "fragment offset overflows"))?;
                    let got = self.read_data(packed, at, dst)?;
                    if got != n {
                        return Err(zc(
                            inode,
                            format!("fragment at {off} runs past the packed inode"),
                        ));
                    }
                }
                ZKind::Pcluster { .. } => {
                    let start = skip as usize;
                    let data = self.decoded(inode, &ext, start, start + n)?;
                    dst.copy_from_slice(&data[start..start + n]);
                }
            }
            done += n;
        }
        Ok(done)
    }
}

/// What identifies one decoded extent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    src: Source,
    plen: u64,
    llen: u64,
    partial: bool,
    rotate: u64,
}

/// A decoded extent, shared by every read that needs it.
type Decoded = Arc<Vec<u8>>;

/// Decoded extents, bounded in bytes, least recently used evicted first.
/// Every operation is O(log n): entries are ordered by their last use.
///
/// An extent that reads have consumed from its first byte to its last, in
/// order, is done: that is how a file is read front to back (by one
/// reader, or as thousands of small files take their fragments from the
/// packed inode in turn), and such an extent is rarely wanted again. Done
/// extents leave the cache as soon as no reader holds them, and their
/// buffers go to the next decodes. A cold read of a whole image then keeps
/// a few extents and reuses their memory, instead of filling the whole
/// budget with memory that is never read twice (and, with the allocator
/// handing freed memory back to the kernel, taking a page fault for every
/// page of every extent), and the budget is left to reads that come back:
/// random access, files read out of order.
#[derive(Debug, Default)]
struct PclusterCache {
    budget: usize,
    inner: Mutex<CacheInner>,
}

/// One cached extent.
#[derive(Debug)]
struct Entry {
    data: Decoded,
    /// The tick of its last use, its key in `by_use`.
    last: u64,
    /// Reads have had `data[..served]`, contiguously from the start.
    served: usize,
}

impl Entry {
    fn is_done(&self) -> bool {
        self.served >= self.data.len()
    }

    /// Record a read of `[start, end)`; true when that made the extent
    /// done (every byte read in one contiguous run from the start).
    fn serve(&mut self, start: usize, end: usize) -> bool {
        let was_done = self.is_done();
        if start <= self.served {
            self.served = self.served.max(end);
        }
        !was_done && self.is_done()
    }
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<CacheKey, Entry>,
    by_use: BTreeMap<u64, CacheKey>,
    bytes: usize,
    tick: u64,
    /// Keys of extents that became done, oldest first (see
    /// [`PclusterCache`]); at most one per cached extent.
    done: VecDeque<CacheKey>,
    /// Buffers of extents that left the cache and that no reader held any
    /// more, handed to the next decodes.
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
}

impl CacheInner {
    fn remove(&mut self, key: &CacheKey) {
        if let Some(e) = self.map.remove(key) {
            self.by_use.remove(&e.last);
            self.bytes -= e.data.len();
            // A reader still holding the extent frees it later.
            if let Ok(buf) = Arc::try_unwrap(e.data) {
                self.recycle(buf);
            }
        }
    }

    /// Remove the done extents that no reader holds any more; those still
    /// held (a reply being written from them) stay queued.
    fn drop_done(&mut self) {
        for _ in 0..self.done.len() {
            let Some(key) = self.done.pop_front() else {
                break;
            };
            match self.map.get(&key) {
                Some(e) if e.is_done() && Arc::strong_count(&e.data) > 1 => {
                    self.done.push_back(key);
                }
                Some(e) if e.is_done() => self.remove(&key),
                // Evicted already, or evicted and decoded again since.
                _ => {}
            }
        }
    }

    /// Keep `buf` for a later decode if there is room; the smallest
    /// buffer goes when there is not.
    fn recycle(&mut self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap > SPARE_BYTES {
            return;
        }
        self.spare.push(buf);
        self.spare_bytes += cap;
        while self.spare.len() > SPARE_BUFFERS || self.spare_bytes > SPARE_BYTES {
            let Some((i, _)) = self
                .spare
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.capacity())
            else {
                break;
            };
            let gone = self.spare.swap_remove(i);
            self.spare_bytes -= gone.capacity();
        }
    }
}

impl PclusterCache {
    fn new(budget: usize) -> Self {
        PclusterCache {
            budget,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    /// The extent under `key`, for a read of its bytes `[start, end)`.
    fn get(&self, key: &CacheKey, start: usize, end: usize) -> Option<Decoded> {
        let mut g = self.inner.lock().ok()?;
        g.tick += 1;
        let tick = g.tick;
        let e = g.map.get_mut(key)?;
        let old = std::mem::replace(&mut e.last, tick);
        let data = e.data.clone();
        let done = e.serve(start, end);
        g.by_use.remove(&old);
        g.by_use.insert(tick, key.clone());
        if done {
            g.done.push_back(key.clone());
        }
        Some(data)
    }

    /// Keep a freshly decoded extent, which a read of its bytes
    /// `[start, end)` asked for.
    fn put(&self, key: CacheKey, data: Decoded, start: usize, end: usize) {
        let Ok(mut g) = self.inner.lock() else { return };
        g.remove(&key);
        let len = data.len();
        if len > self.budget {
            return;
        }
        let mut entry = Entry {
            data,
            last: 0,
            served: 0,
        };
        if entry.serve(start, end) {
            g.done.push_back(key.clone());
        }
        g.tick += 1;
        entry.last = g.tick;
        g.by_use.insert(entry.last, key.clone());
        g.map.insert(key, entry);
        g.bytes += len;
        while g.bytes > self.budget {
            let Some((_, victim)) = g.by_use.pop_first() else {
                break;
            };
            g.remove(&victim);
        }
    }

    /// A buffer of exactly `len` bytes for a decode: a spare one when one
    /// is large enough (the smallest such), else a new one. The bytes of a
    /// spare buffer are those of an old extent, not zeros: the decode must
    /// overwrite all of them.
    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let spare = self.inner.lock().ok().and_then(|mut g| {
            g.drop_done();
            let (i, _) = g
                .spare
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())?;
            let buf = g.spare.swap_remove(i);
            g.spare_bytes -= buf.capacity();
            Some(buf)
        });
        match spare {
            Some(mut buf) => {
                // Within capacity: no allocation; only bytes past the old
                // length are zeroed.
                buf.resize(len, 0);
                buf
            }
            None => vec![0u8; len],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> CacheKey {
        CacheKey {
            src: Source::Device(n * 4096),
            plen: 4096,
            llen: 1000,
            partial: false,
            rotate: 0,
        }
    }

    /// A read of one byte in the middle: never makes an extent done.
    fn peek(cache: &PclusterCache, n: u64) -> Option<Decoded> {
        cache.get(&key(n), 500, 501)
    }

    fn put(cache: &PclusterCache, n: u64, data: Vec<u8>) {
        cache.put(key(n), Arc::new(data), 500, 501);
    }

    #[test]
    fn cache_stays_within_budget_and_evicts_least_recently_used() {
        let cache = PclusterCache::new(3000);
        for n in 0..3 {
            put(&cache, n, vec![n as u8; 1000]);
        }
        // Touch 0, so 1 is now the least recently used.
        assert_eq!(peek(&cache, 0).unwrap()[0], 0);
        put(&cache, 3, vec![3; 1000]);
        assert!(
            peek(&cache, 1).is_none(),
            "the least recently used entry goes first"
        );
        for n in [0, 2, 3] {
            assert!(peek(&cache, n).is_some(), "entry {n} stays");
        }
        let g = cache.inner.lock().unwrap();
        assert_eq!(g.bytes, 3000);
        assert_eq!(g.map.len(), g.by_use.len());
        drop(g);
        // Something larger than the whole budget is not kept at all.
        put(&cache, 9, vec![9; 5000]);
        assert!(peek(&cache, 9).is_none());
        // Replacing an entry does not count it twice.
        put(&cache, 2, vec![2; 500]);
        assert_eq!(cache.inner.lock().unwrap().bytes, 2500);
    }

    #[test]
    fn an_extent_read_front_to_back_leaves_once_released() {
        let cache = PclusterCache::new(1 << 20);
        let data = Arc::new(vec![7u8; 1000]);
        let ptr = data.as_ptr();
        cache.put(key(0), data, 0, 300);
        drop(cache.get(&key(0), 300, 700).unwrap());
        // The last read still holds the extent while its reply is written.
        let last = cache.get(&key(0), 700, 1000).unwrap();
        assert_eq!(cache.inner.lock().unwrap().done.len(), 1);
        drop(cache.take_buffer(10));
        assert!(
            peek(&cache, 0).is_some(),
            "a done extent stays while a reader holds it"
        );
        drop(last);
        // The next decode frees it and gets its buffer, without zeroing.
        let buf = cache.take_buffer(900);
        assert_eq!(buf.len(), 900);
        assert_eq!(buf.as_ptr(), ptr, "the done extent's buffer is reused");
        assert!(peek(&cache, 0).is_none(), "the done extent is gone");
        let g = cache.inner.lock().unwrap();
        assert_eq!((g.bytes, g.map.len(), g.by_use.len()), (0, 0, 0));
        assert!(g.done.is_empty() && g.spare.is_empty());
    }

    #[test]
    fn reads_out_of_order_or_with_gaps_keep_an_extent() {
        let cache = PclusterCache::new(1 << 20);
        // A gap: [0, 400) then [500, 1000) never covers [400, 500).
        cache.put(key(0), Arc::new(vec![0; 1000]), 0, 400);
        cache.get(&key(0), 500, 1000).unwrap();
        // The end first, then the start.
        cache.put(key(1), Arc::new(vec![1; 1000]), 600, 1000);
        cache.get(&key(1), 0, 600).unwrap();
        drop(cache.take_buffer(1000));
        assert!(peek(&cache, 0).is_some() && peek(&cache, 1).is_some());
        // One read of the whole extent makes it done at once.
        cache.put(key(2), Arc::new(vec![2; 1000]), 0, 1000);
        drop(cache.take_buffer(1));
        assert!(peek(&cache, 2).is_none());
    }

    #[test]
    fn spare_buffers_are_bounded_and_fit() {
        let cache = PclusterCache::new(64 << 20);
        for n in 0..20u64 {
            cache.put(key(n), Arc::new(vec![0; 1000 + n as usize]), 0, 2000);
        }
        drop(cache.take_buffer(5000));
        let g = cache.inner.lock().unwrap();
        assert!(g.spare.len() <= SPARE_BUFFERS);
        assert_eq!(
            g.spare_bytes,
            g.spare.iter().map(|b| b.capacity()).sum::<usize>()
        );
        assert!(g.map.is_empty() && g.bytes == 0);
        // The largest buffers are the ones kept.
        assert!(g.spare.iter().all(|b| b.capacity() >= 1012));
        drop(g);
        // The smallest buffer that fits is taken, at the asked length.
        let b = cache.take_buffer(1013);
        assert_eq!((b.len(), b.capacity()), (1013, 1013));
        // None fits: a new one.
        assert_eq!(cache.take_buffer(50_000).len(), 50_000);
        // Too large to keep.
        cache
            .inner
            .lock()
            .unwrap()
            .recycle(vec![0; SPARE_BYTES + 1]);
        assert!(cache.inner.lock().unwrap().spare_bytes <= SPARE_BYTES);
    }
}
