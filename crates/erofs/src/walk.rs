//! A depth-first walk of the whole tree, safe on hostile images: bounded
//! depth, bounded entry count, and every directory visited at most once.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::inode::Inode;

/// The deepest directory nesting a walk follows (PATH_MAX allows ~2048).
pub const DEPTH_MAX: usize = 2048;
/// The most entries one walk visits.
pub const ENTRIES_MAX: u64 = 1 << 24;

impl Image {
    /// Visit every inode reachable from the root, parents before children,
    /// entries of a directory in on-disk (sorted) order. `f` gets the
    /// absolute path ("/" for the root) and the inode.
    ///
    /// A directory reachable twice (a cycle, or a hard-linked directory)
    /// is a corruption error, which also rules out endless walks.
    pub fn walk(&self, f: &mut dyn FnMut(&[u8], &Inode) -> Result<()>) -> Result<()> {
        let root = self.root()?;
        let mut seen_dirs = HashSet::new();
        seen_dirs.insert(root.nid);
        f(b"/", &root)?;
        // Each frame: a directory's path, the directory, the offset to read
        // on from, and the rest of the current batch (one directory block),
        // reversed so that pop() yields entries in order. Memory stays
        // bounded by depth times one block's entries.
        struct Frame {
            path: Vec<u8>,
            dir: Inode,
            next: u64,
            batch: Vec<crate::DirEntry>,
        }
        let mut stack = vec![Frame {
            path: Vec::new(),
            dir: root,
            next: 0,
            batch: Vec::new(),
        }];
        let mut visited: u64 = 1;
        while let Some(frame) = stack.last_mut() {
            let entry = match frame.batch.pop() {
                Some(e) => e,
                None => {
                    let mut batch = self.read_dir_batch(&frame.dir, frame.next)?;
                    match batch.last() {
                        None => {
                            stack.pop();
                            continue;
                        }
                        Some(last) => frame.next = last.next_offset,
                    }
                    batch.retain(|e| !e.is_dot_or_dotdot());
                    batch.reverse();
                    frame.batch = batch;
                    continue;
                }
            };
            visited += 1;
            if visited > ENTRIES_MAX {
                return Err(Error::corrupt(format!(
                    "more than {ENTRIES_MAX} entries in the tree"
                )));
            }
            let mut path = frame.path.clone();
            path.push(b'/');
            path.extend_from_slice(&entry.name);
            let inode = self.inode(entry.nid)?;
            f(&path, &inode)?;
            if inode.is_dir() {
                if !seen_dirs.insert(inode.nid) {
                    return Err(Error::corrupt_nid(
                        inode.nid,
                        format!(
                            "directory reached twice (at {}): a cycle or a hard-linked directory",
                            String::from_utf8_lossy(&path)
                        ),
                    ));
                }
                if stack.len() >= DEPTH_MAX {
                    return Err(Error::corrupt_nid(
                        inode.nid,
                        format!("directories nested deeper than {DEPTH_MAX}"),
                    ));
                }
                stack.push(Frame {
                    path,
                    dir: inode,
                    next: 0,
                    batch: Vec::new(),
                });
            }
        }
        Ok(())
    }
}
