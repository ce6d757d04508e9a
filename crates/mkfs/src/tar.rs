//! Tar input: plain, gzip or zstd streams (detected by magic), with PAX
//! xattrs and times, GNU long names, hard links and devices; OCI layers
//! applied in order with whiteouts (`.wh.NAME`) and opaque directories
//! (`.wh..wh..opq`); OCI image layout directories.
//!
//! File contents go to a spill file (a tar stream cannot be read twice);
//! the tree refers to ranges of it.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tree::{Data, Kind, Node, NodeId, Tree};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Builds a tree from one or more tar streams.
#[derive(Debug)]
pub struct TarImporter {
    tree: Tree,
    spill: Arc<File>,
    spill_len: u64,
}

/// Wrap `r` in a gzip or zstd decoder when its first bytes say so.
pub fn decompressing_reader<'a>(r: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(1 << 16, r);
    let head = br
        .fill_buf()
        .map_err(|e| Error::io("<tar>", e))?
        .get(..4)
        .map(|h| h.to_vec())
        .unwrap_or_default();
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(br))
    } else if head == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::with_buffer(br).map_err(|e| Error::io("<tar>", e))?)
    } else {
        Box::new(br)
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parse a PAX time ("123", "-5", "123.456789").
fn pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    Some((secs, nsec))
}

/// Records that apply to the next real entry.
#[derive(Default)]
struct Pending {
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// Read a metadata record's data (PAX, long name), at most 16 MiB.
fn read_small(r: &mut impl Read, name: &str) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    r.take(1 << 24)
        .read_to_end(&mut data)
        .map_err(|e| Error::input(format!("{name}: {e}")))?;
    Ok(data)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Parse PAX records ("LEN key=value\n", LEN counting the whole record);
/// values may hold any byte, newlines included.
fn parse_pax(mut data: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&data[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return None;
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=')?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Some(out)
}

impl TarImporter {
    /// A new importer whose spill file lives in `spill_dir` (use the image's
    /// directory: the spill can be as large as the input).
    pub fn new(spill_dir: &Path) -> Result<TarImporter> {
        let spill = tempfile::tempfile_in(spill_dir).map_err(|e| Error::io(spill_dir, e))?;
        Ok(TarImporter {
            tree: Tree::new(),
            spill: Arc::new(spill),
            spill_len: 0,
        })
    }

    /// The tree built so far.
    pub fn into_tree(self) -> Tree {
        self.tree
    }

    /// Apply one tar stream (maybe compressed). With `layer`, entries named
    /// `.wh.*` are OCI whiteouts instead of files.
    pub fn apply(&mut self, r: impl Read, name: &str, layer: bool) -> Result<()> {
        let r = decompressing_reader(r)?;
        let mut ar = tar::Archive::new(r);
        let ctx = |e: std::io::Error| Error::input(format!("{name}: {e}"));
        // Nodes this layer created: an opaque marker keeps them.
        let mut fresh: HashSet<NodeId> = HashSet::new();
        // Raw entries: the tar crate's own PAX parser splits records at
        // newlines, which breaks binary xattr values (ACLs), so PAX and GNU
        // long-name records are decoded here.
        let mut meta = Pending::default();
        for entry in ar.entries().map_err(ctx)?.raw(true) {
            let mut entry = entry.map_err(ctx)?;
            let etype = entry.header().entry_type();
            match etype {
                tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => {
                    let data = read_small(&mut entry, name)?;
                    let recs = parse_pax(&data)
                        .ok_or_else(|| Error::input(format!("{name}: malformed PAX header")))?;
                    if etype == tar::EntryType::XHeader {
                        meta.pax.extend(recs);
                    }
                }
                tar::EntryType::GNULongName => {
                    meta.long_name = Some(trim_nul(read_small(&mut entry, name)?));
                }
                tar::EntryType::GNULongLink => {
                    meta.long_link = Some(trim_nul(read_small(&mut entry, name)?));
                }
                _ => {
                    let m = std::mem::take(&mut meta);
                    self.apply_entry(&mut entry, m, name, layer, &mut fresh)?;
                }
            }
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        meta: Pending,
        name: &str,
        layer: bool,
        fresh: &mut HashSet<NodeId>,
    ) -> Result<()> {
        let header = entry.header().clone();
        let mut path = header.path_bytes().into_owned();
        let mut link = header.link_name_bytes().map(|l| l.into_owned());
        if let Some(p) = meta.long_name {
            path = p;
        }
        if let Some(l) = meta.long_link {
            link = Some(l);
        }
        let etype = header.entry_type();

        // PAX records: names, xattrs, exact times and large ids.
        let mut xattrs = BTreeMap::new();
        let (mut mtime, mut nsec) = (header.mtime().unwrap_or(0) as i64, 0u32);
        let mut uid = header.uid().unwrap_or(0);
        let mut gid = header.gid().unwrap_or(0);
        let num = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
        };
        for (key, value) in meta.pax {
            if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.insert(x.to_vec(), value);
            } else {
                match key.as_slice() {
                    b"path" => path = value,
                    b"linkpath" => link = Some(value),
                    b"mtime" => {
                        if let Some(t) = pax_time(&value) {
                            (mtime, nsec) = t;
                        }
                    }
                    b"uid" => uid = num(&value).unwrap_or(uid),
                    b"gid" => gid = num(&value).unwrap_or(gid),
                    b"size" if num(&value) != Some(entry.size()) => {
                        return Err(Error::input(format!(
                            "{name}: {}: PAX size records are not supported",
                            lossy(&path)
                        )))
                    }
                    _ => {}
                }
            }
        }
        let shown = || format!("{name}: {}", lossy(&path));
        let comps = Tree::components(&path).map_err(|e| Error::input(format!("{name}: {e}")))?;
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(Error::input(format!(
                "{}: id does not fit 32 bits",
                shown()
            )));
        };

        if comps.is_empty() {
            // "./" itself: the root's attributes.
            if etype.is_dir() {
                let root = self.tree.root;
                let n = &mut self.tree.nodes[root];
                n.perm = header.mode().unwrap_or(0o755) & 0o7777;
                (n.uid, n.gid, n.mtime, n.mtime_nsec) = (uid, gid, mtime, nsec);
                n.xattrs = xattrs;
            }
            return Ok(());
        }
        let (parent, last) = self
            .tree
            .parent_of(&path)
            .map_err(|e| Error::input(format!("{name}: {e}")))?;
        let last = last.to_vec();

        if layer && last == OPAQUE_MARKER {
            let entries = self.tree.dir_entries_mut(parent, &path)?;
            entries.retain(|_, id| fresh.contains(id));
            return Ok(());
        }
        if layer {
            if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) {
                self.tree.dir_entries_mut(parent, &path)?.remove(hidden);
                return Ok(());
            }
        }

        let perm = header.mode().unwrap_or(0o644) & 0o7777;
        let existing = self
            .tree
            .dir_entries_mut(parent, &path)?
            .get(&last)
            .copied();
        let kind = match etype {
            tar::EntryType::Directory => {
                if let Some(id) = existing.filter(|&id| self.tree.nodes[id].is_dir()) {
                    // A directory seen again (or from a lower layer): new
                    // attributes, same children.
                    let n = &mut self.tree.nodes[id];
                    n.perm = perm;
                    (n.uid, n.gid, n.mtime, n.mtime_nsec) = (uid, gid, mtime, nsec);
                    n.xattrs = xattrs;
                    return Ok(());
                }
                Kind::Dir(BTreeMap::new())
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                let offset = self.spill_len;
                let mut buf = vec![0u8; (1 << 20).min(size.max(1)) as usize];
                let mut left = size;
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = crate::write::read_full(entry, &mut buf[..want])
                        .map_err(|e| Error::input(format!("{}: {e}", shown())))?;
                    if n == 0 {
                        return Err(Error::input(format!(
                            "{}: the tar ends in the middle of this file",
                            shown()
                        )));
                    }
                    self.spill
                        .write_all_at(&buf[..n], self.spill_len)
                        .map_err(|e| Error::io("<spill file>", e))?;
                    self.spill_len += n as u64;
                    left -= n as u64;
                }
                Kind::File {
                    data: Data::Spill {
                        file: Arc::clone(&self.spill),
                        offset,
                    },
                    size,
                }
            }
            tar::EntryType::Symlink => Kind::Symlink(
                link.ok_or_else(|| Error::input(format!("{}: symlink without target", shown())))?,
            ),
            tar::EntryType::Link => {
                let target = link.ok_or_else(|| {
                    Error::input(format!("{}: hard link without target", shown()))
                })?;
                let id = self
                    .tree
                    .lookup(&target)
                    .map_err(|e| Error::input(format!("{name}: {e}")))?
                    .ok_or_else(|| {
                        Error::input(format!(
                            "{}: hard link to {}, which is not in the archive",
                            shown(),
                            lossy(&target)
                        ))
                    })?;
                if self.tree.nodes[id].is_dir() {
                    return Err(Error::input(format!(
                        "{}: hard link to a directory",
                        shown()
                    )));
                }
                self.tree.dir_entries_mut(parent, &path)?.insert(last, id);
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                if etype == tar::EntryType::Char {
                    Kind::CharDev(major, minor)
                } else {
                    Kind::BlockDev(major, minor)
                }
            }
            tar::EntryType::Fifo => Kind::Fifo,
            other => {
                return Err(Error::input(format!(
                    "{}: unsupported tar entry type {other:?}",
                    shown()
                )))
            }
        };
        let mut node = Node::new(kind, perm);
        (node.uid, node.gid, node.mtime, node.mtime_nsec) = (uid, gid, mtime, nsec);
        node.xattrs = xattrs;
        let id = self.tree.add(node);
        fresh.insert(id);
        self.tree.dir_entries_mut(parent, &path)?.insert(last, id);
        Ok(())
    }
}

/// Read a tar file (or stdin for "-") into a tree.
pub fn tree_from_tar(tar: &Path, spill_dir: &Path) -> Result<Tree> {
    let mut imp = TarImporter::new(spill_dir)?;
    if tar == Path::new("-") {
        imp.apply(std::io::stdin().lock(), "<stdin>", false)?;
    } else {
        let f = File::open(tar).map_err(|e| Error::io(tar, e))?;
        imp.apply(f, &tar.display().to_string(), false)?;
    }
    Ok(imp.into_tree())
}

/// Apply OCI layer tars in order.
pub fn tree_from_layers(layers: &[PathBuf], spill_dir: &Path) -> Result<Tree> {
    let mut imp = TarImporter::new(spill_dir)?;
    for l in layers {
        let f = File::open(l).map_err(|e| Error::io(l, e))?;
        imp.apply(f, &l.display().to_string(), true)?;
    }
    Ok(imp.into_tree())
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&b)
        .map_err(|e| Error::input(format!("{}: bad JSON: {e}", path.display())))
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| Error::input(format!("bad digest {digest}")))?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok(alg) || !ok(hex) {
        return Err(Error::input(format!("bad digest {digest}")));
    }
    Ok(dir.join("blobs").join(alg).join(hex))
}

/// The layer blobs of the (single) image in an OCI image layout directory:
/// index.json, then nested indexes, then the manifest's layers in order.
pub fn oci_layers(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut doc = read_json(&dir.join("index.json"))?;
    for _ in 0..4 {
        if let Some(layers) = doc.get("layers").and_then(|l| l.as_array()) {
            return layers
                .iter()
                .map(|l| {
                    let d = l
                        .get("digest")
                        .and_then(|d| d.as_str())
                        .ok_or_else(|| Error::input("an OCI layer has no digest".to_string()))?;
                    blob_path(dir, d)
                })
                .collect();
        }
        let manifests = doc
            .get("manifests")
            .and_then(|m| m.as_array())
            .ok_or_else(|| Error::input("OCI index has no manifests"))?;
        let pick = match manifests.len() {
            0 => return Err(Error::input("OCI index lists no manifest")),
            1 => &manifests[0],
            _ => manifests
                .iter()
                .find(|m| {
                    m.pointer("/platform/architecture").and_then(|a| a.as_str())
                        == Some(std::env::consts::ARCH.replace("x86_64", "amd64").as_str())
                })
                .ok_or_else(|| {
                    Error::input("OCI index lists several images and none for this architecture")
                })?,
        };
        let d = pick
            .get("digest")
            .and_then(|d| d.as_str())
            .ok_or_else(|| Error::input("OCI manifest entry has no digest"))?;
        doc = read_json(&blob_path(dir, d)?)?;
    }
    Err(Error::input("OCI indexes nest too deeply"))
}

/// Apply the layers of an OCI image layout directory.
pub fn tree_from_oci(dir: &Path, spill_dir: &Path) -> Result<Tree> {
    tree_from_layers(&oci_layers(dir)?, spill_dir)
}
