//! The in-memory file tree that every input (a directory, tar streams, OCI
//! layers) is turned into before an image is laid out.
//!
//! Nodes live in one vector and are named by index; a directory maps names to
//! node ids, so a hard link is simply a second entry with the same id.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Index of a node in [`Tree::nodes`].
pub type NodeId = usize;

/// Where a regular file's bytes come from.
#[derive(Debug, Clone)]
pub enum Data {
    /// A file on the host, read when the image is written.
    Path(PathBuf),
    /// A range of a spill file (tar input, whose stream cannot be re-read).
    Spill {
        /// The spill file.
        file: Arc<File>,
        /// Start of the range.
        offset: u64,
    },
    /// Bytes held in memory.
    Bytes(Arc<Vec<u8>>),
}

/// What a node is.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A directory: entry names (no "." or "..") to node ids, in byte order.
    Dir(BTreeMap<Vec<u8>, NodeId>),
    /// A regular file of `size` bytes.
    File {
        /// Its bytes.
        data: Data,
        /// Its size.
        size: u64,
    },
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A character device (major, minor).
    CharDev(u32, u32),
    /// A block device (major, minor).
    BlockDev(u32, u32),
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

/// One file, directory or special node.
#[derive(Debug, Clone)]
pub struct Node {
    /// What it is.
    pub kind: Kind,
    /// Permission bits (no type bits).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes by full name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Node {
    /// A new node with root ownership and a zero time.
    pub fn new(kind: Kind, perm: u32) -> Node {
        Node {
            kind,
            perm: perm & 0o7777,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: BTreeMap::new(),
        }
    }

    /// The `S_IFMT` bits of this node.
    pub fn type_bits(&self) -> u32 {
        match self.kind {
            Kind::Dir(_) => 0o040000,
            Kind::File { .. } => 0o100000,
            Kind::Symlink(_) => 0o120000,
            Kind::CharDev(..) => 0o020000,
            Kind::BlockDev(..) => 0o060000,
            Kind::Fifo => 0o010000,
            Kind::Socket => 0o140000,
        }
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }
}

/// A whole tree: nodes plus the root's id.
#[derive(Debug, Clone)]
pub struct Tree {
    /// Every node ever created (some may be unreachable after whiteouts).
    pub nodes: Vec<Node>,
    /// The root directory.
    pub root: NodeId,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    /// A tree holding only an empty root directory (mode 0755).
    pub fn new() -> Tree {
        Tree {
            nodes: vec![Node::new(Kind::Dir(BTreeMap::new()), 0o755)],
            root: 0,
        }
    }

    /// Add a node and return its id (not yet linked anywhere).
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The entries of directory `dir`, or an error naming `path`.
    pub fn dir_entries_mut(
        &mut self,
        dir: NodeId,
        path: &[u8],
    ) -> Result<&mut BTreeMap<Vec<u8>, NodeId>> {
        match &mut self.nodes[dir].kind {
            Kind::Dir(entries) => Ok(entries),
            _ => Err(Error::input(format!(
                "{}: not a directory",
                String::from_utf8_lossy(path)
            ))),
        }
    }

    /// Split a relative path into its components, refusing any that would
    /// leave the root ("..") and dropping "." and empty ones.
    pub fn components(path: &[u8]) -> Result<Vec<&[u8]>> {
        let mut out = Vec::new();
        for c in path.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    return Err(Error::input(format!(
                        "{}: path escapes the root",
                        String::from_utf8_lossy(path)
                    )))
                }
                _ => {
                    if c.len() > 255 {
                        return Err(Error::input(format!(
                            "{}: a name is longer than 255 bytes",
                            String::from_utf8_lossy(path)
                        )));
                    }
                    out.push(c)
                }
            }
        }
        Ok(out)
    }

    /// The node at `path` (relative to the root), if any; no symlinks are
    /// followed.
    pub fn lookup(&self, path: &[u8]) -> Result<Option<NodeId>> {
        let mut cur = self.root;
        for c in Tree::components(path)? {
            match &self.nodes[cur].kind {
                Kind::Dir(entries) => match entries.get(c) {
                    Some(&id) => cur = id,
                    None => return Ok(None),
                },
                _ => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// The directory that will hold `path`'s last component, creating missing
    /// parents (mode 0755, root-owned, as tar extractors do), and that name.
    pub fn parent_of<'p>(&mut self, path: &'p [u8]) -> Result<(NodeId, &'p [u8])> {
        let comps = Tree::components(path)?;
        let Some((last, parents)) = comps.split_last() else {
            return Err(Error::input("an entry names the root itself"));
        };
        let mut cur = self.root;
        for c in parents {
            let next = self.dir_entries_mut(cur, path)?.get(*c).copied();
            cur = match next {
                Some(id) if self.nodes[id].is_dir() => id,
                Some(_) => {
                    return Err(Error::input(format!(
                        "{}: a parent is not a directory",
                        String::from_utf8_lossy(path)
                    )))
                }
                None => {
                    let id = self.add(Node::new(Kind::Dir(BTreeMap::new()), 0o755));
                    self.dir_entries_mut(cur, path)?.insert(c.to_vec(), id);
                    id
                }
            };
        }
        Ok((cur, last))
    }
}
