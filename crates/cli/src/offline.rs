//! The offline subcommands: read an image without mounting it.

use std::io::Write;

use anyhow::Context;
use erofs::superblock::{compat_names, incompat_names};
use erofs::{FileType, Image, Inode};

use crate::{ImageArgs, EXIT_CORRUPT};

/// How `getfattr` prints values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Encoding {
    /// Quoted text with octal escapes for unprintable bytes.
    Text,
    /// 0x followed by hex digits.
    Hex,
    /// 0s followed by base64.
    Base64,
}

fn resolve(image: &Image, path: &str) -> anyhow::Result<Inode> {
    if !path.starts_with('/') {
        anyhow::bail!("{path}: paths inside the image must be absolute");
    }
    Ok(image.resolve(path.as_bytes())?)
}

fn uuid_str(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// `immount inspect`.
pub fn inspect(args: &ImageArgs, json: bool) -> anyhow::Result<u8> {
    let image = crate::open_image(args)?;
    let sb = image.superblock();
    let name_end = sb.volume_name.iter().position(|&b| b == 0).unwrap_or(16);
    let volume = String::from_utf8_lossy(&sb.volume_name[..name_end]).into_owned();
    let image_size = std::fs::metadata(&args.image)?.len();
    let algorithms: Vec<&str> = sb
        .compr_cfgs
        .iter()
        .map(|(a, _)| match a {
            0 => "lz4",
            1 => "lzma",
            2 => "deflate",
            _ => "zstd",
        })
        .collect();
    let v = serde_json::json!({
        "magic": format!("0x{:08x}", erofs::superblock::MAGIC),
        "block_size": sb.block_size(),
        "uuid": uuid_str(&sb.uuid),
        "volume_name": volume,
        "features_compat": compat_names(sb.feature_compat),
        "features_incompat": incompat_names(sb.feature_incompat),
        "checksum": format!("0x{:08x}", sb.checksum),
        "root_nid": sb.root_nid,
        "inodes": sb.inos,
        "blocks": sb.blocks,
        "total_blocks": sb.total_blocks(),
        "image_bytes": image_size,
        "meta_blkaddr": sb.meta_blkaddr,
        "xattr_blkaddr": sb.xattr_blkaddr,
        "epoch": sb.epoch,
        "fixed_nsec": sb.fixed_nsec,
        "build_time": sb.build_time,
        "extra_devices": sb.devices.len(),
        "packed_nid": sb.packed_nid,
        "metabox_nid": sb.metabox_nid,
        "xattr_long_prefixes": sb.xattr_prefix_count,
        "compression_algorithms": algorithms,
    });
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{v}")?;
        return Ok(0);
    }
    writeln!(
        out,
        "Filesystem magic:        0x{:08x}",
        erofs::superblock::MAGIC
    )?;
    writeln!(out, "Block size:              {}", sb.block_size())?;
    writeln!(out, "UUID:                    {}", uuid_str(&sb.uuid))?;
    writeln!(out, "Volume name:             {volume}")?;
    writeln!(
        out,
        "Compatible features:     {}",
        compat_names(sb.feature_compat).join(" ")
    )?;
    writeln!(
        out,
        "Incompatible features:   {}",
        incompat_names(sb.feature_incompat).join(" ")
    )?;
    writeln!(out, "Root nid:                {}", sb.root_nid)?;
    writeln!(out, "Inodes:                  {}", sb.inos)?;
    writeln!(
        out,
        "Blocks (primary/total):  {} / {}",
        sb.blocks,
        sb.total_blocks()
    )?;
    writeln!(out, "Image size:              {image_size} bytes")?;
    writeln!(out, "Metadata start block:    {}", sb.meta_blkaddr)?;
    writeln!(out, "Shared xattr block:      {}", sb.xattr_blkaddr)?;
    writeln!(out, "Extra devices:           {}", sb.devices.len())?;
    for (i, d) in sb.devices.iter().enumerate() {
        writeln!(
            out,
            "  device {}: {} blocks, unified start block {}",
            i + 1,
            d.blocks,
            d.uniaddr
        )?;
    }
    if sb.packed_nid != 0 {
        writeln!(out, "Packed inode nid:        {}", sb.packed_nid)?;
    }
    if let Some(m) = sb.metabox_nid {
        writeln!(out, "Metabox inode nid:       {m}")?;
    }
    if !algorithms.is_empty() {
        writeln!(out, "Compression algorithms:  {}", algorithms.join(" "))?;
    }
    Ok(0)
}

fn type_char(ft: FileType) -> char {
    match ft {
        FileType::Regular => '-',
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::CharDevice => 'c',
        FileType::BlockDevice => 'b',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
    }
}

/// `ls -l` style permission string.
pub fn mode_string(inode: &Inode) -> String {
    let m = inode.mode;
    let mut s = String::with_capacity(10);
    s.push(type_char(inode.file_type()));
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = m & bit != 0;
        let special = match i {
            2 => Some((0o4000, 's')),
            5 => Some((0o2000, 's')),
            8 => Some((0o1000, 't')),
            _ => None,
        };
        match special {
            Some((sbit, sc)) if m & sbit != 0 => {
                s.push(if set { sc } else { sc.to_ascii_uppercase() })
            }
            _ => s.push(if set { *c } else { '-' }),
        }
    }
    s
}

fn long_line(image: &Image, inode: &Inode, name: &[u8]) -> anyhow::Result<String> {
    let size = match inode.file_type() {
        FileType::CharDevice | FileType::BlockDevice => {
            format!("{}, {}", inode.rdev_major(), inode.rdev_minor())
        }
        _ => inode.size.to_string(),
    };
    let mut line = format!(
        "{} {:>3} {:>6} {:>6} {:>10} {}.{:09} {}",
        mode_string(inode),
        inode.nlink,
        inode.uid,
        inode.gid,
        size,
        inode.mtime,
        inode.mtime_nsec,
        String::from_utf8_lossy(name)
    );
    if inode.file_type() == FileType::Symlink {
        line.push_str(" -> ");
        line.push_str(&String::from_utf8_lossy(&image.read_link(inode)?));
    }
    Ok(line)
}

/// `immount ls`.
pub fn ls(args: &ImageArgs, path: &str, long: bool, all: bool) -> anyhow::Result<u8> {
    let image = crate::open_image(args)?;
    let inode = resolve(&image, path)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if !inode.is_dir() {
        let line = if long {
            long_line(&image, &inode, path.as_bytes())?
        } else {
            path.to_string()
        };
        writeln!(out, "{line}")?;
        return Ok(0);
    }
    let mut entries = Vec::new();
    image.read_dir(&inode, 0, &mut |e| {
        entries.push(e.clone());
        true
    })?;
    for e in entries {
        if !all && e.is_dot_or_dotdot() {
            continue;
        }
        if long {
            let child = image.inode(e.nid)?;
            writeln!(out, "{}", long_line(&image, &child, &e.name)?)?;
        } else {
            out.write_all(&e.name)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(0)
}

/// `immount cat`.
pub fn cat(args: &ImageArgs, path: &str) -> anyhow::Result<u8> {
    let image = crate::open_image(args)?;
    let inode = resolve(&image, path)?;
    if inode.file_type() != FileType::Regular {
        anyhow::bail!("{path}: not a regular file");
    }
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    image
        .for_each_piece(&inode, &mut buf, |_, piece| {
            out.write_all(piece)?;
            Ok::<(), anyhow::Error>(())
        })
        .with_context(|| path.to_string())?;
    out.flush()?;
    Ok(0)
}

/// `immount stat`.
pub fn stat(args: &ImageArgs, path: &str) -> anyhow::Result<u8> {
    let image = crate::open_image(args)?;
    let inode = resolve(&image, path)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "  File: {path}")?;
    writeln!(
        out,
        "  Size: {:<12} Blocks: {:<10} Type: {:?}",
        inode.size,
        inode.blocks_512(image.superblock().blkszbits),
        inode.file_type()
    )?;
    writeln!(
        out,
        "   Nid: {:<12} Links: {:<10} Layout: {:?}{}",
        inode.nid,
        inode.nlink,
        inode.layout,
        if inode.extended {
            " (extended inode)"
        } else {
            " (compact inode)"
        }
    )?;
    writeln!(
        out,
        "Access: ({:04o}/{})  Uid: {}  Gid: {}",
        inode.permissions(),
        mode_string(&inode),
        inode.uid,
        inode.gid
    )?;
    if matches!(
        inode.file_type(),
        FileType::CharDevice | FileType::BlockDevice
    ) {
        writeln!(
            out,
            "Device: {}, {}",
            inode.rdev_major(),
            inode.rdev_minor()
        )?;
    }
    if inode.file_type() == FileType::Symlink {
        writeln!(
            out,
            "Target: {}",
            String::from_utf8_lossy(&image.read_link(&inode)?)
        )?;
    }
    writeln!(
        out,
        "Modify: {}.{:09} (seconds since the epoch)",
        inode.mtime, inode.mtime_nsec
    )?;
    let xattrs = image.list_xattrs(&inode)?;
    if !xattrs.is_empty() {
        writeln!(out, "Xattrs: {}", xattrs.len())?;
    }
    Ok(0)
}

fn encode_value(v: &[u8], enc: Encoding) -> String {
    match enc {
        Encoding::Hex => {
            let mut s = String::from("0x");
            for b in v {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
        Encoding::Base64 => format!("0s{}", base64(v)),
        Encoding::Text => {
            let mut s = String::from("\"");
            for &b in v {
                match b {
                    b'"' => s.push_str("\\\""),
                    b'\\' => s.push_str("\\\\"),
                    0x20..=0x7e => s.push(char::from(b)),
                    _ => s.push_str(&format!("\\{b:03o}")),
                }
            }
            s.push('"');
            s
        }
    }
}

fn base64(v: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in v.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// `immount getfattr`.
pub fn getfattr(
    args: &ImageArgs,
    path: &str,
    name: Option<&str>,
    enc: Encoding,
) -> anyhow::Result<u8> {
    let image = crate::open_image(args)?;
    let inode = resolve(&image, path)?;
    let mut out = std::io::stdout().lock();
    if let Some(name) = name {
        match image.get_xattr(&inode, name.as_bytes())? {
            Some(v) => {
                writeln!(out, "# file: {path}")?;
                writeln!(out, "{name}={}", encode_value(&v, enc))?;
                Ok(0)
            }
            None => anyhow::bail!("{path}: {name}: no such attribute"),
        }
    } else {
        let mut xattrs = image.list_xattrs(&inode)?;
        xattrs.sort_by(|a, b| a.name.cmp(&b.name));
        if !xattrs.is_empty() {
            writeln!(out, "# file: {path}")?;
        }
        for x in xattrs {
            writeln!(
                out,
                "{}={}",
                String::from_utf8_lossy(&x.name),
                encode_value(&x.value, enc)
            )?;
        }
        Ok(0)
    }
}

/// `immount fsck`: every inode, directory, xattr and data byte.
pub fn fsck(args: &ImageArgs, verbose: bool) -> anyhow::Result<u8> {
    let (image, verity) = crate::open_image_verified(args)?;
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let result = image.walk(&mut |path, inode| {
        if verbose {
            eprintln!("{}", String::from_utf8_lossy(path));
        }
        image.list_xattrs(inode)?;
        match inode.file_type() {
            FileType::Regular => {
                image.for_each_piece(inode, &mut buf, |_, _| Ok::<(), erofs::Error>(()))?;
                bytes += inode.size;
            }
            FileType::Symlink => {
                image.read_link(inode)?;
            }
            _ => {}
        }
        files += 1;
        Ok(())
    });
    match result {
        Ok(()) => {
            let how =
                verity.map(|v| format!(", every block checked: {}", crate::describe_verity(&v)));
            println!(
                "{}: clean, {files} inodes, {bytes} bytes of file data checked{}",
                args.image.display(),
                how.unwrap_or_default()
            );
            Ok(0)
        }
        Err(e) if e.is_image_fault() => {
            eprintln!("immount: {}: {e}", args.image.display());
            Ok(EXIT_CORRUPT)
        }
        Err(e) => Err(anyhow::Error::new(e).context(args.image.display().to_string())),
    }
}
