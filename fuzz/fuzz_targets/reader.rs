//! Fuzz the whole reader: open an image from the input bytes and read
//! everything a mount or an fsck would (every inode, directory entry,
//! lookup, xattr, symlink and data byte).
//!
//! Invariant: errors are fine; panics, hangs and unbounded memory are bugs.
//! Seed the corpus with the reference images (see fuzz/README.md); most
//! mutations then land in real metadata.
#![no_main]

use std::sync::Arc;

use erofs::{FileType, Image};
use libfuzzer_sys::fuzz_target;

/// Stop reading data after this many bytes per input, so that a valid
/// image with big files does not make one execution slow; metadata is
/// still walked in full.
const DATA_BUDGET: u64 = 8 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(image) = Image::open(Arc::new(data.to_vec())) else { return };
    let _ = image.superblock().total_blocks();
    let mut budget = DATA_BUDGET;
    let mut buf = vec![0u8; 64 << 10];
    let _ = image.walk(&mut |_, inode| {
        let _ = image.list_xattrs(inode);
        let _ = image.get_xattr(inode, b"user.a");
        let _ = image.get_xattr(inode, b"system.posix_acl_access");
        match inode.file_type() {
            FileType::Regular => {
                let mut off = 0;
                while off < inode.size && budget > 0 {
                    match image.read(inode, off, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            off += n as u64;
                            budget = budget.saturating_sub(n as u64);
                        }
                    }
                }
            }
            FileType::Symlink => {
                let _ = image.read_link(inode);
            }
            FileType::Directory => {
                for name in [&b"."[..], b"..", b"a", b"zzzz"] {
                    let _ = image.lookup(inode, name);
                }
                let _ = image.read_dir(inode, 13, &mut |_| true);
            }
            _ => {}
        }
        Ok(())
    });
    let _ = image.resolve(b"/a/b/../c");
});
