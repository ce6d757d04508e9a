//! `immount manifest`: the tree as the corpus' manifest.py prints it, one
//! JSON object a line, so that the reader can be compared with the kernel.
//!
//! The output imitates Python's `json.dumps(e, sort_keys=True,
//! ensure_ascii=True)` exactly, so the two can be compared as text as well as
//! parsed JSON; paths and names are decoded the way Python decodes file
//! names (UTF-8 with surrogate escapes for undecodable bytes).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;

use sha2::{Digest, Sha256};

use crate::ImageArgs;
use erofs::{FileType, Image, Inode};

/// Python's `str` of a file name: UTF-8, each undecodable byte b as the
/// lone surrogate U+DC00+b.
fn python_str(bytes: &[u8]) -> Vec<u32> {
    let mut out = Vec::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.extend(chunk.valid().chars().map(u32::from));
        out.extend(chunk.invalid().iter().map(|&b| 0xDC00 + u32::from(b)));
    }
    out
}

/// A JSON string literal as `json.dumps(..., ensure_ascii=True)` writes it.
fn json_str(out: &mut String, bytes: &[u8]) {
    out.push('"');
    for cp in python_str(bytes) {
        match cp {
            0x22 => out.push_str("\\\""),
            0x5c => out.push_str("\\\\"),
            0x0a => out.push_str("\\n"),
            0x0d => out.push_str("\\r"),
            0x09 => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            0x20..=0x7e => out.push(char::from_u32(cp).unwrap_or('?')),
            0x10000.. => {
                let v = cp - 0x10000;
                let _ = write!(
                    out,
                    "\\u{:04x}\\u{:04x}",
                    0xD800 + (v >> 10),
                    0xDC00 + (v & 0x3ff)
                );
            }
            _ => {
                let _ = write!(out, "\\u{cp:04x}");
            }
        }
    }
    out.push('"');
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The sha256 of a file's content, read in 1 MiB pieces.
pub fn file_sha256(image: &Image, inode: &Inode) -> erofs::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    image.for_each_piece(inode, &mut buf, |_, piece| {
        h.update(piece);
        Ok::<(), erofs::Error>(())
    })?;
    Ok(hex(&h.finalize()))
}

/// One manifest line for `inode` at `path`; `hardlink_of` names the group.
fn entry_line(
    image: &Image,
    path: &[u8],
    inode: &Inode,
    hardlink_of: Option<&[u8]>,
) -> erofs::Result<String> {
    // Keys in sorted order, as sort_keys=True writes them.
    let mut s = String::with_capacity(256);
    let _ = write!(s, "{{\"gid\": {}", inode.gid);
    if let Some(h) = hardlink_of {
        s.push_str(", \"hardlink_of\": ");
        json_str(&mut s, h);
    }
    let _ = write!(
        s,
        ", \"mode\": \"0o{:o}\", \"mtime_ns\": {}, \"nlink\": {}, \"path\": ",
        inode.permissions(),
        inode.mtime_ns(),
        inode.nlink
    );
    json_str(&mut s, path);
    match inode.file_type() {
        FileType::CharDevice | FileType::BlockDevice => {
            let _ = write!(
                s,
                ", \"rdev\": [{}, {}]",
                inode.rdev_major(),
                inode.rdev_minor()
            );
        }
        FileType::Regular => {
            let digest = file_sha256(image, inode)?;
            let _ = write!(s, ", \"sha256\": \"{digest}\", \"size\": {}", inode.size);
        }
        FileType::Symlink => {
            let target = image.read_link(inode)?;
            let _ = write!(s, ", \"size\": {}, \"target\": ", inode.size);
            json_str(&mut s, &target);
        }
        _ => {}
    }
    let _ = write!(
        s,
        ", \"type\": {}, \"uid\": {}",
        inode.mode >> 12,
        inode.uid
    );
    let mut xattrs = image.list_xattrs(inode)?;
    if !xattrs.is_empty() {
        xattrs.sort_by_key(|x| python_str(&x.name));
        s.push_str(", \"xattrs\": {");
        for (i, x) in xattrs.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            json_str(&mut s, &x.name);
            let _ = write!(s, ": \"{}\"", hex(&x.value));
        }
        s.push('}');
    }
    s.push('}');
    Ok(s)
}

/// Every path of the image with its inode, sorted by path bytes.
pub fn sorted_tree(image: &Image) -> erofs::Result<Vec<(Vec<u8>, Inode)>> {
    let mut all = Vec::new();
    image.walk(&mut |path, inode| {
        all.push((path.to_vec(), inode.clone()));
        Ok(())
    })?;
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all)
}

/// Write the manifest of `image` to `out`.
pub fn write_manifest(image: &Image, out: &mut dyn Write) -> anyhow::Result<()> {
    let all = sorted_tree(image)?;
    // A hard-link group is named by its smallest path.
    let mut first_by_nid: HashMap<u64, Vec<u8>> = HashMap::new();
    for (path, inode) in &all {
        let group = (inode.file_type() == FileType::Regular && inode.nlink > 1).then(|| {
            first_by_nid
                .entry(inode.nid)
                .or_insert_with(|| path.clone())
                .clone()
        });
        let line = entry_line(image, path, inode, group.as_deref())?;
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// `immount manifest IMAGE`.
pub fn manifest(args: &ImageArgs) -> anyhow::Result<u8> {
    let image = crate::open_image(args)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    write_manifest(&image, &mut out)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_like_python() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\te\u{1}ü日😀".as_bytes());
        assert_eq!(s, r#""a\"b\\c\nd\te\u0001\u00fc\u65e5\ud83d\ude00""#);
        let mut s = String::new();
        json_str(&mut s, b"bad\xffbyte");
        assert_eq!(s, r#""bad\udcffbyte""#);
    }
}
