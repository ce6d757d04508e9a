//! Extended attributes as an image stores them.
//!
//! Each inode with xattrs gets an inline body after it: a 12-byte header
//! (name filter, count of shared ids), the ids of its shared entries, then
//! its own entries. An entry names its xattr by a prefix index and the rest
//! of the name. Short prefixes (`user.`, `trusted.`, ...) are fixed by the
//! format; long prefixes (`--xattr-prefix`, INCOMPAT_XATTR_PREFIXES) are a
//! table of "short prefix index + infix" records that an entry names with
//! index `0x80 | n`, so that a name part repeated on many files (such as
//! `trusted.overlay.`) is stored once.
//!
//! The table is stored plainly on the primary device (COMPAT_PLAIN_XATTR_PFX)
//! right after the shared entries, at the head of the metadata area, and not
//! in the packed inode: it then never depends on fragments being enabled.
//!
//! With the name filter (COMPAT_XATTR_FILTER), the header's first word is a
//! 32-bit Bloom filter of the inode's xattr names in which a set bit means
//! "no name hashes here", so that a lookup of an absent name usually stops
//! without reading any entry.

use std::collections::{BTreeMap, HashMap};

use erofs::superblock::{compat, incompat};

use crate::error::{Error, Result};

/// An entry's prefix index refers to the long prefix table.
const LONG_PREFIX: u8 = 0x80;
/// At most this many long prefixes: their number must fit 7 bits.
const MAX_LONG_PREFIXES: usize = 0x80;
/// Size of an inline body's header.
const BODY_HEADER: usize = 12;

/// The short prefixes that a long prefix may extend, by index.
const SHORT_PREFIXES: [(u8, &[u8]); 3] = [(1, b"user."), (4, b"trusted."), (6, b"security.")];

/// One long prefix: the full prefix and the short index it extends.
#[derive(Debug, Clone)]
struct LongPrefix {
    full: Vec<u8>,
    base_index: u8,
    base_len: usize,
}

/// How a full xattr name is stored.
struct StoredName<'a> {
    /// Index byte of the entry (short index, or `0x80 | n`).
    index: u8,
    /// The bytes after the (short or long) prefix.
    suffix: &'a [u8],
    /// The short prefix index, which the name filter hashes with.
    base_index: u8,
    /// The bytes after the short prefix, which the name filter hashes.
    after_base: &'a [u8],
}

/// Turns full names into stored names, given the long prefixes.
struct Namer {
    long: Vec<LongPrefix>,
}

impl Namer {
    fn new(prefixes: &[Vec<u8>]) -> Result<Namer> {
        if prefixes.len() > MAX_LONG_PREFIXES {
            return Err(Error::Option(format!(
                "{} xattr prefixes given, at most {MAX_LONG_PREFIXES} fit",
                prefixes.len()
            )));
        }
        let mut long: Vec<LongPrefix> = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            let shown = String::from_utf8_lossy(p);
            let Some(&(base_index, base)) = SHORT_PREFIXES.iter().find(|(_, s)| p.starts_with(s))
            else {
                return Err(Error::Option(format!(
                    "xattr prefix {shown:?} does not start with user., trusted. or security."
                )));
            };
            // The record's length (index byte + infix) and an entry's name
            // length are single bytes in places; keep the whole prefix short.
            if p.len() > 255 {
                return Err(Error::Option(format!(
                    "xattr prefix {shown:?} is longer than 255 bytes"
                )));
            }
            if long.iter().any(|l| l.full == *p) {
                return Err(Error::Option(format!(
                    "xattr prefix {shown:?} is given twice"
                )));
            }
            long.push(LongPrefix {
                full: p.clone(),
                base_index,
                base_len: base.len(),
            });
        }
        Ok(Namer { long })
    }

    /// How `name` is stored: through the longest long prefix that leaves a
    /// non-empty rest, else through its short prefix.
    fn store<'a>(&self, name: &'a [u8]) -> Result<StoredName<'a>> {
        let long = self
            .long
            .iter()
            .enumerate()
            .filter(|(_, l)| name.len() > l.full.len() && name.starts_with(&l.full))
            .max_by_key(|(_, l)| l.full.len());
        let stored = if let Some((n, l)) = long {
            StoredName {
                // n < 128, checked in `new`.
                index: LONG_PREFIX | n as u8,
                suffix: &name[l.full.len()..],
                base_index: l.base_index,
                after_base: &name[l.base_len..],
            }
        } else {
            let (index, rest) = crate::format::xattr_split(name).ok_or_else(|| {
                Error::input(format!(
                    "xattr {} cannot be stored in EROFS (unknown namespace)",
                    String::from_utf8_lossy(name)
                ))
            })?;
            StoredName {
                index,
                suffix: rest,
                base_index: index,
                after_base: rest,
            }
        };
        if stored.suffix.len() > 255 {
            return Err(Error::input(format!(
                "xattr name {} is too long",
                String::from_utf8_lossy(name)
            )));
        }
        Ok(stored)
    }

    /// The table of long prefixes as stored: per prefix a 2-byte length,
    /// the short index and the infix, padded to 4 bytes.
    fn table(&self) -> Vec<u8> {
        let mut b = Vec::new();
        for l in &self.long {
            let infix = &l.full[l.base_len..];
            // At most 1 + 255 - 5, checked in `new`.
            b.extend_from_slice(&(1 + infix.len() as u16).to_le_bytes());
            b.push(l.base_index);
            b.extend_from_slice(infix);
            b.resize(b.len().next_multiple_of(4), 0);
        }
        b
    }
}

/// The name filter bit of a name (its part after the short prefix and the
/// short prefix index), as the kernel computes it on lookup.
pub fn filter_bit(after_base: &[u8], base_index: u8) -> u32 {
    erofs::xattr::filter_bit(after_base, base_index)
}

/// Every xattr of an image, laid out.
#[derive(Debug)]
pub(crate) struct XattrLayout {
    /// The head of the metadata area: shared entries (ids count 4-byte
    /// words from its start), then the long prefix table.
    pub(crate) head: Vec<u8>,
    /// Per input set, in order, its inline body (empty when it has none).
    pub(crate) bodies: Vec<Vec<u8>>,
    /// Offset of the long prefix table in `head`.
    table_offset: usize,
    /// Number of long prefixes.
    prefix_count: usize,
    /// Some inode's filter has a bit set, so the feature is worth flagging.
    filter_used: bool,
}

impl XattrLayout {
    /// Lay out the xattr `sets` (one per inode, in inode order): pairs that
    /// more than one inode carries become shared entries, the rest inline.
    /// `prefixes` are the long prefixes; `name_filter` fills each header's
    /// filter.
    pub(crate) fn new(
        sets: &[&BTreeMap<Vec<u8>, Vec<u8>>],
        prefixes: &[Vec<u8>],
        name_filter: bool,
    ) -> Result<XattrLayout> {
        let namer = Namer::new(prefixes)?;
        let mut pair_count: BTreeMap<(&[u8], &[u8]), u32> = BTreeMap::new();
        for set in sets {
            for (name, value) in set.iter() {
                namer.store(name)?;
                if value.len() > 65535 {
                    return Err(Error::input(format!(
                        "xattr {} value is larger than 64 KiB",
                        String::from_utf8_lossy(name)
                    )));
                }
                *pair_count.entry((name, value)).or_insert(0) += 1;
            }
        }
        let mut head = Vec::new();
        let mut shared_id: HashMap<(&[u8], &[u8]), u32> = HashMap::new();
        for (&(name, value), &count) in &pair_count {
            if count > 1 {
                let s = namer.store(name)?;
                let id = u32::try_from(head.len() / 4)
                    .map_err(|_| Error::input("too many shared xattrs"))?;
                shared_id.insert((name, value), id);
                head.extend_from_slice(&crate::format::xattr_entry(s.index, s.suffix, value));
            }
        }
        let table_offset = head.len();
        head.extend_from_slice(&namer.table());

        let mut bodies = Vec::with_capacity(sets.len());
        let mut filter_used = false;
        for set in sets {
            if set.is_empty() {
                bodies.push(Vec::new());
                continue;
            }
            let mut ids = Vec::new();
            let mut inline = Vec::new();
            let mut seen_bits = 0u32;
            for (name, value) in set.iter() {
                let s = namer.store(name)?;
                seen_bits |= 1 << filter_bit(s.after_base, s.base_index);
                match shared_id.get(&(name.as_slice(), value.as_slice())) {
                    // The header counts shared ids in one byte.
                    Some(&id) if ids.len() < 255 => ids.push(id),
                    _ => inline
                        .extend_from_slice(&crate::format::xattr_entry(s.index, s.suffix, value)),
                }
            }
            let mut body = vec![0u8; BODY_HEADER];
            if name_filter {
                let filter = !seen_bits;
                filter_used |= filter != 0;
                body[0..4].copy_from_slice(&filter.to_le_bytes());
            }
            // Fewer than 256, checked above.
            body[4] = ids.len() as u8;
            for id in ids {
                body.extend_from_slice(&id.to_le_bytes());
            }
            body.extend_from_slice(&inline);
            if (body.len() - BODY_HEADER) / 4 + 1 > 0xffff {
                return Err(Error::input("an inode's xattrs are too large"));
            }
            bodies.push(body);
        }
        Ok(XattrLayout {
            head,
            bodies,
            table_offset,
            prefix_count: namer.long.len(),
            filter_used,
        })
    }

    /// Set the superblock's xattr fields, given the byte offset of `head` in
    /// the image: the feature bits (ORed into what `sb` has) and where the
    /// long prefix table is.
    pub(crate) fn fill_superblock(&self, sb: &mut [u8], head_offset: u64) -> Result<()> {
        let or_le32 = |sb: &mut [u8], at: usize, bits: u32| {
            let old = u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]);
            sb[at..at + 4].copy_from_slice(&(old | bits).to_le_bytes());
        };
        if self.filter_used {
            or_le32(sb, 8, compat::XATTR_FILTER);
        }
        if self.prefix_count > 0 {
            // The start is counted in 4-byte words and has 32 bits.
            let start = (head_offset + self.table_offset as u64) / 4;
            let start = u32::try_from(start).map_err(|_| {
                Error::input("the xattr prefix table lies beyond 16 GiB into the image")
            })?;
            or_le32(sb, 8, compat::PLAIN_XATTR_PFX);
            or_le32(sb, 80, incompat::XATTR_PREFIXES);
            // At most 128, checked when the table was made.
            sb[91] = self.prefix_count as u8;
            sb[92..96].copy_from_slice(&start.to_le_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prefix_names() {
        let namer = Namer::new(&[b"trusted.overlay.".to_vec(), b"user.k".to_vec()]).unwrap();
        let s = namer.store(b"trusted.overlay.opaque").unwrap();
        assert_eq!((s.index, s.suffix), (0x80, &b"opaque"[..]));
        assert_eq!((s.base_index, s.after_base), (4, &b"overlay.opaque"[..]));
        let s = namer.store(b"user.k07").unwrap();
        assert_eq!((s.index, s.suffix), (0x81, &b"07"[..]));
        // Nothing left after the long prefix: the short one is used.
        let s = namer.store(b"user.k").unwrap();
        assert_eq!((s.index, s.suffix), (1, &b"k"[..]));
        assert_eq!(
            namer.table(),
            [&[9u8, 0, 4][..], b"overlay.", &[0], &[2, 0, 1], b"k"].concat()
        );
        assert!(Namer::new(&[b"system.foo".to_vec()]).is_err());
        assert!(Namer::new(&[b"user.a".to_vec(), b"user.a".to_vec()]).is_err());
        assert!(Namer::new(&vec![b"user.".to_vec(); 129]).is_err());
    }
}
