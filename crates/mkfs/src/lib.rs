//! immount-mkfs: a reproducible EROFS image writer.
//!
//! Inputs (a host directory, tar streams, OCI layers) become one in-memory
//! [`Tree`]; [`build_image`] lays it out and writes it. The same tree and
//! options give the same bytes: names are sorted, times and the UUID come
//! from the input or the options, never from the host.
#![forbid(unsafe_code)]

pub mod compress;
mod error;
pub mod format;
pub mod scan;
pub mod tar;
pub mod tree;
pub mod write;
pub mod xattr;

pub use compress::{Algorithm, CompressOptions};
pub use error::{Error, Result};
pub use scan::scan_dir;
pub use tar::{oci_layers, tree_from_layers, tree_from_oci, tree_from_tar, TarImporter};
pub use tree::{Data, Kind, Node, NodeId, Tree};
pub use write::{build_image, write_image, BuildReport, Options};
