//! Where every level of a hash tree lives, computed the way cryptsetup does.
//!
//! Level 0 holds one digest per data block, level n+1 one digest per hash
//! block of level n, up to a level of a single block. Each hash block holds
//! `2^bits` digests (128 for 4 KiB blocks and sha256), zero padded. The levels
//! are stored top level first, right after the superblock's hash block.

use immount_sys::sha256x16::{sha256_16x, sha256_16x_supported, LANES};
use immount_sys::sha256x2::sha256_2x;
use sha2::{Digest, Sha256};

use crate::root_hash::DIGEST_SIZE;
use crate::{Error, Result};

/// Smallest block size cryptsetup accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted; cryptsetup's own limit.
pub const MAX_BLOCK_SIZE: u32 = 512 * 1024;
/// cryptsetup refuses trees deeper than this.
pub const MAX_LEVELS: usize = 63;

/// The parameters that determine a tree and its root hash (what the
/// superblock stores, without the uuid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// Size of a data block in bytes (a power of two, 512 to 512 KiB).
    pub data_block_size: u32,
    /// Size of a hash block in bytes (a power of two, 512 to 512 KiB).
    pub hash_block_size: u32,
    /// Number of data blocks covered by the tree (at least one).
    pub data_blocks: u64,
    /// Salt prepended to every block before hashing (at most 256 bytes).
    pub salt: Vec<u8>,
}

impl VerityParams {
    /// Check sizes and counts; every constructor of a [`Geometry`] calls this.
    pub fn validate(&self) -> Result<()> {
        for (what, size) in [
            ("data block size", self.data_block_size),
            ("hash block size", self.hash_block_size),
        ] {
            if !size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) {
                return Err(Error::invalid(format!(
                    "{what} {size} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
                )));
            }
        }
        if self.data_blocks == 0 {
            return Err(Error::invalid(
                "a verity tree needs at least one data block",
            ));
        }
        if self.salt.len() > crate::superblock::MAX_SALT_SIZE {
            return Err(Error::invalid("salt longer than 256 bytes"));
        }
        self.data_size()?;
        Ok(())
    }

    /// Bytes of data covered: `data_blocks * data_block_size`.
    pub fn data_size(&self) -> Result<u64> {
        self.data_blocks
            .checked_mul(u64::from(self.data_block_size))
            .ok_or_else(|| Error::invalid("data area size overflows"))
    }

    /// Hash `block` with the salt in front (hash type 1).
    pub fn digest(&self, block: &[u8]) -> [u8; DIGEST_SIZE] {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(block);
        h.finalize().into()
    }

    /// Hash every whole `block_size` block of `buf` (salt in front, like
    /// [`VerityParams::digest`]) and hand each digest to `each` with the
    /// block's index in `buf`, in order; the first error `each` returns
    /// stops the walk and is returned.
    ///
    /// Why in batches: one SHA-256 leaves the CPU's hashing units idle
    /// between dependent rounds; several independent blocks hashed
    /// together fill them: sixteen in AVX-512 lanes where the CPU has them
    /// (`immount_sys::sha256x16`), the rest two at a time with SHA-NI
    /// (`immount_sys::sha256x2`). On the development machine's Xeon,
    /// `examples/bench.rs` measured verified 128 KiB reads at 1.7-1.8x
    /// and a one-thread tree at 1.5-1.7x the speed of one block at a time
    /// (two at a time alone: 1.25x), so AVX-512's lower clock, if any,
    /// does not eat the gain there. The digests are
    /// those of the very bytes in `buf`, so a caller that compares them and
    /// then hands out `buf` hands out exactly what was checked. A block
    /// left over by the batches, or a CPU without the extensions, takes
    /// the one-block path.
    pub fn digest_each<E>(
        &self,
        buf: &[u8],
        block_size: usize,
        mut each: impl FnMut(usize, &[u8; DIGEST_SIZE]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        if block_size == 0 {
            return Ok(());
        }
        let mut index = 0;
        let mut rest = buf;
        // Sixteen at a time (AVX-512) pays only for whole groups: a group
        // of sixteen costs about as much as nine blocks two at a time.
        if buf.len() >= LANES * block_size && sha256_16x_supported() {
            let mut groups = buf.chunks_exact(LANES * block_size);
            for group in groups.by_ref() {
                let blocks: [&[u8]; LANES] =
                    std::array::from_fn(|l| &group[l * block_size..(l + 1) * block_size]);
                match sha256_16x(&self.salt, &blocks) {
                    Some(digests) => {
                        for digest in &digests {
                            each(index, digest)?;
                            index += 1;
                        }
                    }
                    None => {
                        for block in blocks {
                            each(index, &self.digest(block))?;
                            index += 1;
                        }
                    }
                }
            }
            rest = groups.remainder();
        }
        let mut pairs = rest.chunks_exact(2 * block_size);
        for pair in pairs.by_ref() {
            let (a, b) = pair.split_at(block_size);
            match sha256_2x(&self.salt, a, b) {
                Some((da, db)) => {
                    each(index, &da)?;
                    each(index + 1, &db)?;
                }
                None => {
                    each(index, &self.digest(a))?;
                    each(index + 1, &self.digest(b))?;
                }
            }
            index += 2;
        }
        if let Some(last) = pairs.remainder().chunks_exact(block_size).next() {
            each(index, &self.digest(last))?;
        }
        Ok(())
    }
}

/// One level of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Byte offset of the level's first block in the hash source.
    pub offset: u64,
    /// Number of hash blocks in the level.
    pub blocks: u64,
}

/// A validated tree layout: parameters plus the position of every level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    params: VerityParams,
    hash_offset: u64,
    superblock: bool,
    /// Index 0 is the lowest level (digests of data blocks).
    levels: Vec<Level>,
    /// log2 of the number of digests per hash block.
    bits: u32,
    hash_end: u64,
}

impl Geometry {
    /// Lay out a tree whose hash area starts at `hash_offset` of the hash
    /// source (a multiple of the hash block size), with or without a
    /// superblock in its first block.
    pub fn new(params: VerityParams, hash_offset: u64, superblock: bool) -> Result<Self> {
        params.validate()?;
        let hbs = u64::from(params.hash_block_size);
        if !hash_offset.is_multiple_of(hbs) {
            return Err(Error::invalid(format!(
                "hash offset {hash_offset} is not a multiple of the hash block size {hbs}"
            )));
        }
        // Digests are padded to a power of two for hash type 1; sha256 is.
        let per_block = params.hash_block_size / DIGEST_SIZE as u32;
        let bits = per_block.ilog2();
        let mut count = 0usize;
        let last = params.data_blocks - 1; // data_blocks >= 1 by validate()
        while (bits as usize) * count < 64
            && last.checked_shr(bits * count as u32).unwrap_or(0) != 0
        {
            count += 1;
        }
        if count > MAX_LEVELS {
            return Err(Error::invalid(format!(
                "tree of {count} levels is too deep"
            )));
        }
        let mut position = hash_offset / hbs + u64::from(superblock);
        let mut levels = vec![
            Level {
                offset: 0,
                blocks: 0
            };
            count
        ];
        for (i, level) in levels.iter_mut().enumerate().rev() {
            let shift = bits * (i as u32 + 1);
            // ceil(data_blocks / 2^shift), also right when shift >= 64.
            let blocks = last.checked_shr(shift).unwrap_or(0) + 1;
            let offset = position
                .checked_mul(hbs)
                .ok_or_else(|| Error::invalid("hash area offset overflows"))?;
            *level = Level { offset, blocks };
            position = position
                .checked_add(blocks)
                .ok_or_else(|| Error::invalid("hash area size overflows"))?;
        }
        let hash_end = position
            .checked_mul(hbs)
            .ok_or_else(|| Error::invalid("hash area size overflows"))?;
        Ok(Geometry {
            params,
            hash_offset,
            superblock,
            levels,
            bits,
            hash_end,
        })
    }

    /// The tree parameters.
    pub fn params(&self) -> &VerityParams {
        &self.params
    }

    /// Where the hash area (superblock or first level) starts.
    pub fn hash_offset(&self) -> u64 {
        self.hash_offset
    }

    /// Whether the hash area starts with a superblock.
    pub fn has_superblock(&self) -> bool {
        self.superblock
    }

    /// The levels, lowest (data digests) first. Empty for a one-block image,
    /// whose root hash is the digest of that block.
    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// One past the last byte of the hash area in the hash source.
    pub fn hash_end(&self) -> u64 {
        self.hash_end
    }

    /// Bytes of the hash area, superblock included.
    pub fn hash_area_size(&self) -> u64 {
        self.hash_end - self.hash_offset
    }

    /// Bytes of data covered.
    pub fn data_size(&self) -> u64 {
        // Checked in validate(); cannot overflow here.
        self.params.data_blocks * u64::from(self.params.data_block_size)
    }

    /// log2 of the digests per hash block.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// For the block `index` of the level below `parent` (or the data block
    /// `index` when `parent` is 0): the parent block's index and the byte
    /// range of the digest inside it.
    pub fn parent_entry(&self, index: u64) -> (u64, std::ops::Range<usize>) {
        let mask = (1u64 << self.bits) - 1;
        // Below 2^19 / 32 entries per block, so the cast is lossless.
        let start = (index & mask) as usize * DIGEST_SIZE;
        (index >> self.bits, start..start + DIGEST_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(data_blocks: u64) -> VerityParams {
        VerityParams {
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks,
            salt: vec![],
        }
    }

    #[test]
    fn layout_matches_veritysetup() {
        // veritysetup format of 1453 blocks: a 57344-byte hash device, that is
        // the superblock block, one top block and 12 blocks of level 0.
        let g = Geometry::new(params(1453), 0, true).unwrap();
        assert_eq!(g.levels().len(), 2);
        assert_eq!(
            g.levels()[1],
            Level {
                offset: 4096,
                blocks: 1
            }
        );
        assert_eq!(
            g.levels()[0],
            Level {
                offset: 8192,
                blocks: 12
            }
        );
        assert_eq!(g.hash_end(), 57344);
        let one = Geometry::new(params(1), 8192, false).unwrap();
        assert!(one.levels().is_empty());
        assert_eq!(one.hash_end(), 8192);
        let g = Geometry::new(params(128), 0, false).unwrap();
        assert_eq!(g.levels().len(), 1);
        let g = Geometry::new(params(129), 0, false).unwrap();
        assert_eq!(g.levels().len(), 2);
        assert_eq!(g.levels()[0].blocks, 2);
    }

    /// Batched digests equal one-at-a-time digests, in order, for every
    /// count around the batch sizes, odd block sizes and salt lengths; a
    /// trailing partial block is not hashed; an error stops the walk.
    #[test]
    fn digest_each_matches_digest() {
        let data: Vec<u8> = (0..70 * 1024u32)
            .map(|i| (i * 7 + i / 1000) as u8)
            .collect();
        for salt_len in [0, 1, 32, 63, 64, 65, 256] {
            let params = VerityParams {
                salt: (0..salt_len).map(|i| i as u8 ^ 0xa5).collect(),
                ..params(1)
            };
            for block_size in [512, 1024, 4096] {
                for count in (0..=35).chain([48, 64]) {
                    let len = (count * block_size + block_size / 2).min(data.len());
                    let buf = &data[..len];
                    let whole = len / block_size;
                    let mut seen = Vec::new();
                    params
                        .digest_each(buf, block_size, |i, d| {
                            seen.push((i, *d));
                            Ok::<(), ()>(())
                        })
                        .unwrap();
                    let expected: Vec<_> = buf
                        .chunks_exact(block_size)
                        .map(|b| params.digest(b))
                        .enumerate()
                        .collect();
                    assert_eq!(seen.len(), whole, "salt {salt_len}, {block_size} x {count}");
                    assert_eq!(seen, expected, "salt {salt_len}, {block_size} x {count}");
                }
            }
        }
        // Block 5 of 16 fails: nothing after it is looked at.
        let params = params(1);
        let mut last = None;
        let err = params.digest_each(&data[..16 * 4096], 4096, |i, _| {
            last = Some(i);
            if i == 5 {
                Err(i)
            } else {
                Ok(())
            }
        });
        assert_eq!((err, last), (Err(5), Some(5)));
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let g = Geometry::new(params(u64::MAX / 4096), 0, true).unwrap();
        assert!(g.levels().len() <= MAX_LEVELS);
        assert!(Geometry::new(params(u64::MAX), 0, true).is_err());
        assert!(Geometry::new(params(10), 100, true).is_err());
    }

    /// Arbitrary sizes and offsets give a layout or an error, never a panic,
    /// and every layout's levels fit inside its hash area in order.
    #[test]
    fn arbitrary_parameters_never_panic() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let sizes = [0, 1, 511, 512, 4096, 65536, 1 << 19, 1 << 20, u32::MAX];
        for _ in 0..20_000 {
            let r = next();
            let pick = |v: u64| sizes[(v % sizes.len() as u64) as usize];
            let data_blocks = match r % 4 {
                0 => next(),
                1 => next() % 1_000_000,
                2 => u64::MAX - next() % 4,
                _ => 1 + next() % 3,
            };
            let params = VerityParams {
                data_block_size: if r & 16 == 0 {
                    pick(next())
                } else {
                    next() as u32
                },
                hash_block_size: pick(next()),
                data_blocks,
                salt: vec![0; (next() % 300) as usize],
            };
            let offset = if r & 32 == 0 {
                next()
            } else {
                (next() % 64) * 4096
            };
            if let Ok(g) = Geometry::new(params, offset, r & 64 == 0) {
                let mut end = g.hash_end();
                for level in g.levels() {
                    assert!(level.offset >= g.hash_offset());
                    assert!(
                        level.offset + level.blocks * u64::from(g.params().hash_block_size) <= end
                    );
                    end = level.offset;
                }
            }
        }
    }
}
