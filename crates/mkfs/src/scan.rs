//! Reading a host directory into a [`Tree`]: metadata and xattrs now, file
//! contents later (when the image is written), hard links by (dev, ino).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::{Error, Result};
use crate::tree::{Data, Kind, Node, NodeId, Tree};

/// Directory depth we follow before calling the input hostile.
const MAX_DEPTH: usize = 4096;

/// Read the directory `root` (not following symlinks) into a tree.
pub fn scan_dir(root: &Path) -> Result<Tree> {
    let meta = fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::input(format!("{}: not a directory", root.display())));
    }
    let mut tree = Tree::new();
    let root_node = node_from_meta(root, &meta)?;
    tree.nodes[tree.root] = root_node;
    let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
    let root_id = tree.root;
    scan_into(&mut tree, root_id, root, &mut links, 0)?;
    Ok(tree)
}

fn scan_into(
    tree: &mut Tree,
    dir: NodeId,
    path: &Path,
    links: &mut HashMap<(u64, u64), NodeId>,
    depth: usize,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::input(format!(
            "{}: directories nest too deeply",
            path.display()
        )));
    }
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    for ent in fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        names.push(ent.map_err(|e| Error::io(path, e))?.file_name());
    }
    // Sorted so that node ids (and thus the image) do not depend on the
    // host's directory order.
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        if name.len() > 255 {
            return Err(Error::input(format!(
                "{}: name longer than 255 bytes",
                path.join(&name).display()
            )));
        }
        let child = path.join(&name);
        let meta = fs::symlink_metadata(&child).map_err(|e| Error::io(&child, e))?;
        let id = if !meta.is_dir() && meta.nlink() > 1 {
            if let Some(&id) = links.get(&(meta.dev(), meta.ino())) {
                Some(id)
            } else {
                None
            }
        } else {
            None
        };
        let id = match id {
            Some(id) => id,
            None => {
                let node = node_from_meta(&child, &meta)?;
                let is_dir = node.is_dir();
                let id = tree.add(node);
                if !is_dir && meta.nlink() > 1 {
                    links.insert((meta.dev(), meta.ino()), id);
                }
                if is_dir {
                    scan_into(tree, id, &child, links, depth + 1)?;
                }
                id
            }
        };
        tree.dir_entries_mut(dir, path.as_os_str().as_bytes())?
            .insert(name.as_bytes().to_vec(), id);
    }
    Ok(())
}

fn node_from_meta(path: &Path, meta: &fs::Metadata) -> Result<Node> {
    let ft = meta.file_type();
    let rdev = meta.rdev();
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let kind = if ft.is_dir() {
        Kind::Dir(BTreeMap::new())
    } else if ft.is_file() {
        Kind::File {
            data: Data::Path(path.to_path_buf()),
            size: meta.len(),
        }
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(|e| Error::io(path, e))?;
        Kind::Symlink(target.as_os_str().as_bytes().to_vec())
    } else if ft.is_char_device() {
        Kind::CharDev(major, minor)
    } else if ft.is_block_device() {
        Kind::BlockDev(major, minor)
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        return Err(Error::input(format!(
            "{}: unknown file type",
            path.display()
        )));
    };
    let mut node = Node::new(kind, meta.mode());
    node.uid = meta.uid();
    node.gid = meta.gid();
    node.mtime = meta.mtime();
    node.mtime_nsec = u32::try_from(meta.mtime_nsec()).unwrap_or(0);
    node.xattrs = read_xattrs(path)?;
    Ok(node)
}

/// All xattrs of `path` (not following a symlink).
fn read_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 4096];
    let list = loop {
        match rustix::fs::llistxattr(path, &mut buf) {
            Ok(n) => break buf[..n].to_vec(),
            Err(rustix::io::Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            // Filesystems without xattr support have none to copy.
            Err(rustix::io::Errno::NOTSUP) => return Ok(out),
            Err(e) => return Err(Error::io(path, e.into())),
        }
        if buf.len() > 1 << 24 {
            return Err(Error::input(format!(
                "{}: xattr list too large",
                path.display()
            )));
        }
    };
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = OsStr::from_bytes(name);
        let mut vbuf = vec![0u8; 4096];
        let value = loop {
            match rustix::fs::lgetxattr(path, cname, &mut vbuf) {
                Ok(n) => break Some(vbuf[..n].to_vec()),
                Err(rustix::io::Errno::RANGE) if vbuf.len() < 1 << 17 => {
                    vbuf.resize(vbuf.len() * 4, 0)
                }
                // Removed between listing and reading.
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(Error::io(path, e.into())),
            }
        };
        if let Some(value) = value {
            out.insert(name.to_vec(), value);
        }
    }
    Ok(out)
}
