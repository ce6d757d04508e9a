//! A depth-first walk of the whole tree, safe on hostile images: bounded
//! depth, bounded entry count, and every directory visited at most once.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::inode::Inode;

/// The deepest directory nesting a walk follows (PATH_MAX allows ~2048).
pub const DEPTH_MAX: usize = 2048;
/// The most entries one walk visits.
pub const ENTRIES_MAX: u64 = 1 << 26;

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
        // Each frame: a directory's path and its remaining entries, reversed
        // so that pop() yields them in order.
        let mut stack: Vec<(Vec<u8>, Vec<crate::DirEntry>)> = Vec::new();
        let mut entries = self.entries(&root)?;
        entries.reverse();
        stack.push((Vec::new(), entries));
        let mut visited: u64 = 1;
        while let Some((dir_path, pending)) = stack.last_mut() {
            let Some(entry) = pending.pop() else {
                stack.pop();
                continue;
            };
            visited += 1;
            if visited > ENTRIES_MAX {
                return Err(Error::corrupt(format!(
                    "more than {ENTRIES_MAX} entries in the tree"
                )));
            }
            let mut path = dir_path.clone();
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
                let mut children = self.entries(&inode)?;
                children.reverse();
                stack.push((path, children));
            }
        }
        Ok(())
    }
}
