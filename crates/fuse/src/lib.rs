//! The FUSE server of immount: serves an EROFS image read-only through
//! `/dev/fuse`, speaking the protocol itself.
//!
//! - [`abi`]: the wire structs of `include/uapi/linux/fuse.h`, bounds-checked.
//! - [`filesystem`]: the read-only filesystem interface the server serves.
//! - [`erofs_fs`]: that interface for an EROFS image.
//! - [`image_file`]: the image as the reader reads it, data around the
//!   page cache.
//! - [`server`]: INIT negotiation and the worker threads.
//! - [`push`]: readahead across files, into the kernel's page cache.
//! - [`mount`]: mounting (directly or through fusermount3) and unmounting.
//! - [`daemon`]: `immount mount` end to end: backgrounding, and the
//!   server confined by crates/sandbox behind a supervisor that unmounts.
//!
//! Why not the `fuser` crate: it cannot serve from several threads on
//! cloned `/dev/fuse` files, nor negotiate `max_pages`, which the speed
//! targets need; the subset a read-only server needs is small.
#![forbid(unsafe_code)]

pub mod abi;
pub mod daemon;
pub mod erofs_fs;
pub mod filesystem;
pub mod image_file;
pub mod mount;
pub mod push;
pub mod server;

pub use daemon::{Confinement, MountError, MountRequest};
pub use erofs_fs::ErofsFs;
pub use filesystem::{Filesystem, FsError};
pub use server::{Session, SessionConfig};
