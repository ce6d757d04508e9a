//! `immount extract`: write the whole tree of an image into a directory.
//!
//! Names come from a hostile image, so nothing is trusted: the reader has
//! already refused names with '/' or NUL and "." / ".." are skipped; every
//! file is created with O_EXCL and every directory with mkdir (never
//! "create if missing"), so a name that appears twice, or a symlink made
//! earlier in the walk, stops the extraction instead of being followed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rustix::fs::{AtFlags, FileType as RxFileType, Mode, Timespec, Timestamps, CWD};

use crate::ImageArgs;
use erofs::{FileType, Image, Inode};

fn dest_path(dest: &Path, path: &[u8]) -> PathBuf {
    let rel = path.strip_prefix(b"/").unwrap_or(path);
    if rel.is_empty() {
        dest.to_path_buf()
    } else {
        dest.join(OsStr::from_bytes(rel))
    }
}

fn set_times(p: &Path, inode: &Inode) -> anyhow::Result<()> {
    let t = Timespec {
        tv_sec: inode.mtime,
        tv_nsec: i64::from(inode.mtime_nsec),
    };
    let ts = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW)
        .with_context(|| format!("cannot set times of {}", p.display()))?;
    Ok(())
}

fn set_owner_and_xattrs(image: &Image, p: &Path, inode: &Inode, root: bool) -> anyhow::Result<()> {
    if root {
        let uid = rustix::fs::Uid::from_raw(inode.uid);
        let gid = rustix::fs::Gid::from_raw(inode.gid);
        rustix::fs::chownat(CWD, p, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .with_context(|| format!("cannot chown {}", p.display()))?;
    }
    for x in image.list_xattrs(inode)? {
        let name = std::ffi::CString::new(x.name.clone())
            .map_err(|_| anyhow::anyhow!("xattr name with NUL"))?;
        // trusted.* and security.* need privileges: without them, skip quietly
        // as tar does; with them, failure is an error.
        if let Err(e) = rustix::fs::lsetxattr(
            p,
            name.as_c_str(),
            &x.value,
            rustix::fs::XattrFlags::empty(),
        ) {
            let privileged = x.name.starts_with(b"trusted.") || x.name.starts_with(b"security.");
            if root || !privileged {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot set xattr {} on {}",
                    String::from_utf8_lossy(&x.name),
                    p.display()
                )));
            }
        }
    }
    if inode.file_type() != FileType::Symlink {
        fs::set_permissions(p, fs::Permissions::from_mode(inode.permissions()))
            .with_context(|| format!("cannot chmod {}", p.display()))?;
    }
    Ok(())
}

fn write_file(image: &Image, p: &Path, inode: &Inode) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(p)
        .with_context(|| format!("cannot create {}", p.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    image.for_each_piece(inode, &mut buf, |off, piece| {
        // Keep holes as holes: seek over all-zero pieces.
        if piece.iter().all(|&b| b == 0) {
            f.set_len(off + piece.len() as u64)?;
        } else {
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(off))?;
            f.write_all(piece)?;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    f.set_len(inode.size)?;
    Ok(())
}

/// `immount extract IMAGE DEST`.
pub fn extract(args: &ImageArgs, dest: &Path) -> anyhow::Result<u8> {
    let image = crate::open_image(args)?;
    match fs::read_dir(dest) {
        Ok(mut it) => {
            if it.next().is_some() {
                anyhow::bail!("{}: destination is not empty", dest.display());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dest)
                .with_context(|| format!("cannot create {}", dest.display()))?;
        }
        Err(e) => return Err(anyhow::Error::new(e).context(dest.display().to_string())),
    }
    let root = rustix::process::geteuid().is_root();
    let mut first_path: HashMap<u64, PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, Inode)> = Vec::new();
    let tree = crate::manifest::sorted_tree(&image)?;
    for (path, inode) in &tree {
        let p = dest_path(dest, path);
        if path.as_slice() == b"/" {
            dirs.push((p, inode.clone()));
            continue;
        }
        // Hard links: every later path of the same non-directory inode is a link.
        if !inode.is_dir() && inode.nlink > 1 {
            if let Some(first) = first_path.get(&inode.nid) {
                fs::hard_link(first, &p).with_context(|| format!("cannot link {}", p.display()))?;
                continue;
            }
            first_path.insert(inode.nid, p.clone());
        }
        match inode.file_type() {
            FileType::Directory => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&p)
                    .with_context(|| format!("cannot create {}", p.display()))?;
                dirs.push((p.clone(), inode.clone()));
                continue;
            }
            FileType::Regular => write_file(&image, &p, inode)?,
            FileType::Symlink => {
                let target = image.read_link(inode)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &p)
                    .with_context(|| format!("cannot create symlink {}", p.display()))?;
            }
            FileType::CharDevice | FileType::BlockDevice | FileType::Fifo | FileType::Socket => {
                let ft = match inode.file_type() {
                    FileType::CharDevice => RxFileType::CharacterDevice,
                    FileType::BlockDevice => RxFileType::BlockDevice,
                    FileType::Fifo => RxFileType::Fifo,
                    _ => RxFileType::Socket,
                };
                let dev = rustix::fs::makedev(inode.rdev_major(), inode.rdev_minor());
                rustix::fs::mknodat(CWD, &p, ft, Mode::from_raw_mode(0o600), dev)
                    .with_context(|| format!("cannot create {}", p.display()))?;
            }
        }
        set_owner_and_xattrs(&image, &p, inode, root)?;
        set_times(&p, inode)?;
    }
    // Directories last, deepest first, so their times stay as set.
    for (p, inode) in dirs.iter().rev() {
        set_owner_and_xattrs(&image, p, inode, root)?;
        set_times(p, inode)?;
    }
    Ok(0)
}
