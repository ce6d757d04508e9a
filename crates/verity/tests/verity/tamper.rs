//! Any single changed byte in the data, in any tree level or in the
//! superblock makes the affected reads fail and never returns wrong bytes;
//! reads elsewhere still succeed.

use std::io;
use std::os::unix::fs::FileExt;

use erofs::ReadAt;
use verity::{
    format_image, geometry_from_superblock, verify_image, Error, FormatOptions, Geometry, RootHash,
    VerifiedReader,
};

use crate::common::copy_image;

/// An image and its tree (with superblock at 0 of the hash bytes).
struct Fixture {
    data: Vec<u8>,
    hash: Vec<u8>,
    root: RootHash,
    geometry: Geometry,
    /// Memory budget of the readers made: the default loads these small
    /// trees whole at open, zero takes the lazy, cached path.
    budget: usize,
}

/// Both ways of holding the tree: loaded at open, and cached on demand.
const BUDGETS: [usize; 2] = [verity::reader::DEFAULT_CACHE_BYTES, 0];

fn fixture(name: &str, dbs: u32, hbs: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image(name, dir.path());
    let tree = dir.path().join("tree");
    let opts = FormatOptions {
        data_block_size: dbs,
        hash_block_size: hbs,
        ..FormatOptions::default()
    };
    let report = format_image(&img, Some(&tree), None, &opts).unwrap();
    let hash = std::fs::read(&tree).unwrap();
    let geometry = geometry_from_superblock(&hash, 0).unwrap();
    Fixture {
        data: std::fs::read(&img).unwrap(),
        hash,
        root: report.root_hash,
        geometry,
        budget: BUDGETS[0],
    }
}

impl Fixture {
    fn reader(&self, data: Vec<u8>, hash: Vec<u8>) -> verity::Result<VerifiedReader<Vec<u8>>> {
        let r = VerifiedReader::with_cache_bytes(
            data,
            hash,
            self.geometry.clone(),
            self.root,
            self.budget,
        )?;
        assert_eq!(r.tree_loaded(), self.budget > 0, "budget {}", self.budget);
        Ok(r)
    }

    fn dbs(&self) -> u64 {
        u64::from(self.geometry.params().data_block_size)
    }

    fn blocks(&self) -> u64 {
        self.geometry.params().data_blocks
    }

    /// Read data block `index`: its verified bytes or the error.
    fn read_block(&self, reader: &dyn ReadAt, index: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0xee; self.dbs() as usize];
        match reader.read_exact_at(&mut buf, index * self.dbs()) {
            Ok(()) => Ok(buf),
            Err(e) => {
                assert!(
                    buf.iter().all(|&b| b == 0),
                    "a failed read left bytes behind"
                );
                Err(e)
            }
        }
    }

    fn original(&self, index: u64) -> &[u8] {
        let at = (index * self.dbs()) as usize;
        &self.data[at..at + self.dbs() as usize]
    }

    /// Data blocks under hash block `index` of `level`.
    fn covered(&self, level: usize, index: u64) -> std::ops::Range<u64> {
        let shift = self.geometry.bits() * (level as u32 + 1);
        let start = index << shift;
        start..((index + 1) << shift).min(self.blocks())
    }
}

fn assert_corrupt(err: &io::Error, what: &str) {
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(
        err.to_string().contains(what),
        "{err:?} does not name {what}"
    );
}

#[test]
fn changed_data_byte_fails_only_its_block() {
    for budget in BUDGETS {
        changed_data_byte_fails_only_its_block_with(budget);
    }
}

fn changed_data_byte_fails_only_its_block_with(budget: usize) {
    let f = Fixture {
        budget,
        ..fixture("plain.erofs", 4096, 4096)
    };
    let last = f.blocks() - 1;
    for block in [0, 1, 700, last] {
        let mut data = f.data.clone();
        let at = (block * f.dbs() + 17) as usize;
        data[at] ^= 0x01;
        let reader = f.reader(data.clone(), f.hash.clone()).unwrap();
        let err = f.read_block(&reader, block).unwrap_err();
        assert_corrupt(&err, &format!("data block {block} "));
        // A read that merely overlaps the block fails as a whole.
        let mut span = vec![0u8; 50];
        let err = reader
            .read_exact_at(&mut span, block * f.dbs() + 4000)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        for other in [block.wrapping_sub(1), block + 1] {
            if other < f.blocks() {
                assert_eq!(f.read_block(&reader, other).unwrap(), f.original(other));
            }
        }
        let err = verify_image(&data, &f.hash, &f.geometry, &f.root).unwrap_err();
        assert!(err.is_mismatch());
        assert!(
            err.to_string().contains(&format!("data block {block} ")),
            "{err}"
        );
    }
    verify_image(&f.data, &f.hash, &f.geometry, &f.root).unwrap();
}

#[test]
fn changed_byte_in_each_tree_level_fails_only_what_it_covers() {
    // 512-byte blocks: 16 digests per hash block and a four-level tree.
    for (name, dbs, hbs, budget) in [
        ("plain.erofs", 4096, 4096, BUDGETS[0]),
        ("plain.erofs", 4096, 4096, BUDGETS[1]),
        ("bs512.erofs", 512, 512, BUDGETS[0]),
        ("bs512.erofs", 512, 512, BUDGETS[1]),
    ] {
        let f = Fixture {
            budget,
            ..fixture(name, dbs, hbs)
        };
        let levels = f.geometry.levels().to_vec();
        assert!(levels.len() >= 2);
        let top = levels.len() - 1;
        for (l, level) in levels.iter().enumerate() {
            for index in [0, level.blocks / 2, level.blocks - 1] {
                // A byte inside a digest, and the last byte of the block
                // (padding in a partly filled block).
                for inner in [5, u64::from(hbs) - 1] {
                    let mut hash = f.hash.clone();
                    hash[(level.offset + index * u64::from(hbs) + inner) as usize] ^= 0x80;
                    let err = verify_image(&f.data, &hash, &f.geometry, &f.root).unwrap_err();
                    assert!(err.is_mismatch(), "{err}");
                    if l == top {
                        // The top block is checked against the root at open.
                        let err = f.reader(f.data.clone(), hash).unwrap_err();
                        assert!(matches!(err, Error::Mismatch(_)), "{err}");
                        continue;
                    }
                    let reader = f.reader(f.data.clone(), hash).unwrap();
                    let covered = f.covered(l, index);
                    for block in [covered.start, covered.end - 1] {
                        let err = f.read_block(&reader, block).unwrap_err();
                        assert_corrupt(&err, &format!("level {l}"));
                    }
                    for block in [covered.start.wrapping_sub(1), covered.end] {
                        if block < f.blocks() {
                            assert_eq!(f.read_block(&reader, block).unwrap(), f.original(block));
                        }
                    }
                }
            }
        }
    }
}

/// Every byte of the superblock, changed: the tree is refused, or every
/// read returns the true bytes or an error.
#[test]
fn changed_superblock_byte_never_yields_wrong_bytes() {
    let f = fixture("plain.erofs", 4096, 4096);
    let samples: Vec<u64> = (0..f.blocks())
        .step_by(97)
        .chain([f.blocks() - 1])
        .collect();
    let mut accepted = Vec::new();
    for at in 0..512usize {
        let mut hash = f.hash.clone();
        hash[at] ^= 0x01;
        let Ok(geometry) = geometry_from_superblock(&hash, 0) else {
            continue;
        };
        let Ok(reader) = VerifiedReader::new(f.data.clone(), hash, geometry, f.root) else {
            continue;
        };
        accepted.push(at);
        for &block in &samples {
            if let Ok(bytes) = f.read_block(&reader, block) {
                assert_eq!(
                    bytes,
                    f.original(block),
                    "superblock byte {at}, block {block}"
                );
            }
        }
    }
    // Only bytes that do not shape the tree may be accepted: the uuid,
    // padding, and the data block count (fewer blocks, same tree).
    for at in &accepted {
        assert!(
            (16..32).contains(at)
                || (72..80).contains(at)
                || (82..88).contains(at)
                || *at >= 88 + 32,
            "superblock byte {at} changed and the tree was still accepted"
        );
    }
    assert!(
        !accepted.iter().any(|at| (88..120).contains(at)),
        "salt change accepted"
    );
}

#[test]
fn wrong_root_hash_is_refused_at_open() {
    let f = fixture("plain.erofs", 4096, 4096);
    let mut root = f.root;
    root.0[31] ^= 1;
    for budget in BUDGETS {
        let err = VerifiedReader::with_cache_bytes(
            f.data.clone(),
            f.hash.clone(),
            f.geometry.clone(),
            root,
            budget,
        )
        .unwrap_err();
        assert!(err.is_mismatch(), "{err}");
        assert!(err.to_string().contains("root hash mismatch"), "{err}");
    }
    let err = verify_image(&f.data, &f.hash, &f.geometry, &root).unwrap_err();
    assert!(err.to_string().contains("root hash mismatch"), "{err}");
}

#[test]
fn reads_past_the_data_area_fail() {
    let f = fixture("plain.erofs", 4096, 4096);
    // Give the reader a longer file: the bytes past the tree's data area
    // exist but are not covered, so they are not readable.
    let mut longer = f.data.clone();
    longer.extend_from_slice(&[0u8; 8192]);
    let reader = f.reader(longer, f.hash.clone()).unwrap();
    let size = f.data.len() as u64;
    assert_eq!(reader.size().unwrap(), size);
    let mut buf = [0u8; 20];
    let err = reader.read_exact_at(&mut buf, size - 10).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert!(reader.read_exact_at(&mut buf, u64::MAX - 5).is_err());
    reader.read_exact_at(&mut [], size).unwrap();
    reader.read_exact_at(&mut buf, size - 20).unwrap();
    assert_eq!(buf[..], f.data[f.data.len() - 20..]);
}

#[test]
fn short_data_or_tree_is_refused() {
    let f = fixture("plain.erofs", 4096, 4096);
    let short = f.data[..f.data.len() - 4096].to_vec();
    assert!(matches!(
        f.reader(short, f.hash.clone()),
        Err(Error::Invalid(_))
    ));
    let short = f.hash[..f.hash.len() - 1].to_vec();
    assert!(matches!(
        f.reader(f.data.clone(), short),
        Err(Error::Invalid(_))
    ));
}

/// Several threads reading at random with a tiny cache (constant eviction)
/// all get the true bytes; the cache stays within its bound.
#[test]
fn concurrent_reads_with_a_tiny_cache() {
    let f = fixture("bs512.erofs", 512, 512);
    let reader = VerifiedReader::with_cache_bytes(
        f.data.clone(),
        f.hash.clone(),
        f.geometry.clone(),
        f.root,
        16 * 512,
    )
    .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (reader, f) = (&reader, &f);
            s.spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for _ in 0..400 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = (x % 20_000) as usize;
                    let offset = (x >> 20) % (f.data.len() - len) as u64;
                    let mut buf = vec![0u8; len];
                    reader.read_exact_at(&mut buf, offset).unwrap();
                    assert!(buf[..] == f.data[offset as usize..offset as usize + len]);
                }
            });
        }
    });
    assert!(
        reader.cached_hash_blocks() <= 16,
        "{}",
        reader.cached_hash_blocks()
    );
}

/// Bytes are hashed on every read: changing the file after a block was read
/// (and its hash blocks cached) is still caught.
#[test]
fn change_after_open_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("plain.erofs", dir.path());
    let tree = dir.path().join("tree");
    let report = format_image(&img, Some(&tree), None, &FormatOptions::default()).unwrap();
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let hash = std::fs::File::open(&tree).unwrap();
    let geometry = geometry_from_superblock(&hash, 0).unwrap();
    let reader = VerifiedReader::new(&data, &hash, geometry, report.root_hash).unwrap();
    let mut buf = vec![0u8; 4096];
    reader.read_exact_at(&mut buf, 8192).unwrap();
    data.write_all_at(b"X", 8192 + 100).unwrap();
    let err = reader.read_exact_at(&mut buf, 8192).unwrap_err();
    assert_corrupt(&err, "data block 2 ");
    reader.read_exact_at(&mut buf, 4096).unwrap();
}

/// Records every read passed to the image beneath.
struct Recording {
    bytes: Vec<u8>,
    reads: std::sync::Mutex<Vec<(u64, usize)>>,
}

impl ReadAt for Recording {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.lock().unwrap().push((offset, buf.len()));
        self.bytes.read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }
}

/// A read smaller than a block reaches the image beneath as itself (the
/// image file tells metadata from data by each read's size and alignment),
/// with the rest of its blocks read apart; the bytes are the true ones, and
/// a second read of the same block comes from the verified copy.
#[test]
fn partial_reads_reach_the_image_as_asked() {
    let f = fixture("plain.erofs", 4096, 4096);
    for budget in BUDGETS {
        let data = Recording {
            bytes: f.data.clone(),
            reads: Default::default(),
        };
        let reader =
            VerifiedReader::with_cache_bytes(&data, &f.hash, f.geometry.clone(), f.root, budget)
                .unwrap();
        for (offset, len) in [(8192 + 100, 60), (4096 * 5, 904), (4096 * 7 - 10, 30)] {
            data.reads.lock().unwrap().clear();
            let mut buf = vec![0u8; len];
            reader.read_exact_at(&mut buf, offset).unwrap();
            assert_eq!(buf[..], f.data[offset as usize..offset as usize + len]);
            let reads = data.reads.lock().unwrap().clone();
            assert!(reads.contains(&(offset, len)), "{reads:?}");
            // The rest of the blocks, and nothing else.
            let total: usize = reads.iter().map(|r| r.1).sum();
            let blocks = (offset + len as u64).div_ceil(4096) - offset / 4096;
            assert_eq!(total as u64, blocks * 4096, "{reads:?}");
        }
        data.reads.lock().unwrap().clear();
        let mut buf = [0u8; 10];
        reader.read_exact_at(&mut buf, 8192 + 200).unwrap();
        assert!(data.reads.lock().unwrap().is_empty());
    }
}

/// A 1 MiB read (what the FUSE server asks for) fails wherever in it the
/// changed byte lies, and leaves nothing behind.
#[test]
fn big_reads_fail_wherever_the_change_lies() {
    for budget in BUDGETS {
        let f = Fixture {
            budget,
            ..fixture("plain.erofs", 4096, 4096)
        };
        let len = (1 << 20).min(f.blocks() * f.dbs()) as usize;
        assert!(len >= 512 * 1024, "the image is too small for this test");
        let reader = f.reader(f.data.clone(), f.hash.clone()).unwrap();
        let mut buf = vec![0u8; len];
        reader.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, f.data[..len]);
        for at in [100, len / 2 - 1, len / 2 + 1, len - 1] {
            let mut data = f.data.clone();
            data[at] ^= 0x80;
            let reader = f.reader(data, f.hash.clone()).unwrap();
            let mut buf = vec![0xeeu8; len];
            let err = reader.read_exact_at(&mut buf, 0).unwrap_err();
            assert_corrupt(&err, &format!("data block {} ", at as u64 / f.dbs()));
            assert!(
                buf.iter().all(|&b| b == 0),
                "bytes left behind (change at {at})"
            );
        }
    }
}

/// Reads are hashed in batches (16 or 2 blocks at once where the CPU can),
/// but the error still names the block that changed, wherever it lies in
/// the read and in the batch, and names the first one when two changed:
/// block 5 of a 16-block read, every position of reads of 1 to 40 blocks
/// (full batches, pairs and a single left over), at an offset that is not
/// a multiple of 16 blocks.
#[test]
fn batched_reads_name_the_right_block() {
    for budget in BUDGETS {
        let f = Fixture {
            budget,
            ..fixture("plain.erofs", 4096, 4096)
        };
        assert!(f.blocks() >= 100, "the image is too small for this test");
        let read = |reader: &dyn ReadAt, first: u64, count: u64| {
            let mut buf = vec![0xeeu8; (count * f.dbs()) as usize];
            let result = reader.read_exact_at(&mut buf, first * f.dbs());
            if result.is_err() {
                assert!(buf.iter().all(|&b| b == 0), "bytes left behind");
            }
            result.map(|()| buf)
        };

        // Block 5 of a 16-block read.
        let mut data = f.data.clone();
        data[(5 * f.dbs() + 99) as usize] ^= 0x04;
        let reader = f.reader(data, f.hash.clone()).unwrap();
        let err = read(&reader, 0, 16).unwrap_err();
        assert_corrupt(&err, "data block 5 ");
        assert_eq!(read(&reader, 6, 16).unwrap(), f.data[6 * 4096..22 * 4096]);

        // Every position in reads of 1..=40 blocks starting at block 7.
        let first = 7;
        for bad in first..first + 40 {
            let mut data = f.data.clone();
            data[(bad * f.dbs()) as usize] ^= 0x01;
            let reader = f.reader(data, f.hash.clone()).unwrap();
            for count in 1..=40 {
                let end = first + count;
                match read(&reader, first, count) {
                    Err(err) => {
                        assert!(bad < end, "read {first}+{count} failed without {bad}");
                        assert_corrupt(&err, &format!("data block {bad} "));
                    }
                    Ok(buf) => {
                        assert!(bad >= end, "read {first}+{count} passed over {bad}");
                        let range = (first * f.dbs()) as usize..(end * f.dbs()) as usize;
                        assert_eq!(buf, f.data[range]);
                    }
                }
            }
        }

        // Two changed blocks in one batch: the first is named.
        let mut data = f.data.clone();
        data[(20 * f.dbs() + 1) as usize] ^= 0x01;
        data[(12 * f.dbs() + 2) as usize] ^= 0x01;
        let reader = f.reader(data, f.hash.clone()).unwrap();
        assert_corrupt(&read(&reader, 8, 32).unwrap_err(), "data block 12 ");
        assert_corrupt(&read(&reader, 13, 32).unwrap_err(), "data block 20 ");
    }
}
