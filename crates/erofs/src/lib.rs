//! A reader of the EROFS on-disk format that treats every image as hostile.
//!
//! Every number read from an image is checked before it is used: offsets
//! and sizes against the image length, counts and depths against explicit
//! caps, walks against cycles. Malformed input gives an [`Error`], never a
//! panic, an endless loop or an unbounded allocation.
//!
//! The crate knows nothing of where bytes come from ([`ReadAt`]) or of how
//! they are served (FUSE, a CLI): it is the on-disk format and nothing else.
#![forbid(unsafe_code)]
// Library code never unwraps: an image must not be able to cause a panic.
#![warn(clippy::unwrap_used)]

mod data;
pub mod decompress;
pub mod dir;
pub mod error;
pub mod image;
pub mod inode;
mod le;
pub mod read;
pub mod superblock;
pub mod walk;
pub mod xattr;
mod zdata;

pub use dir::DirEntry;
pub use error::{Error, Location, Result};
pub use image::Image;
pub use inode::{DataLayout, FileType, Inode};
pub use read::ReadAt;
pub use superblock::Superblock;
pub use xattr::Xattr;
