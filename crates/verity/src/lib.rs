//! dm-verity in userspace: hash trees in the format `veritysetup format`
//! writes, a reader that checks every block against the tree before handing
//! out its bytes, and PKCS#7 signatures over the root hash.
//!
//! This machine has no device-mapper and unprivileged users never will, so
//! immount does the kernel's dm-verity check itself: [`VerifiedReader`] wraps
//! any [`erofs::ReadAt`] and the EROFS parser only ever sees blocks whose
//! hashes chain up to a trusted root hash.
//!
//! The on-disk layout is cryptsetup's "VERITY" format, hash type 1:
//!
//! ```text
//! hash area:  [superblock, one hash block] [top level] ... [level 1] [level 0]
//! level 0:    sha256(salt || data block) for every data block
//! level n+1:  sha256(salt || hash block) for every hash block of level n
//! root hash:  sha256(salt || the single block of the top level)
//! ```
//!
//! Modules: [`superblock`] (the 512-byte header), [`geometry`] (where each
//! level lives), [`tree`] (computing and writing trees, checking a whole
//! image), [`reader`] (the verified positional reader), [`signature`]
//! (CMS signatures and the trust directory) and [`policy`] (sidecar files and
//! the options the CLI and the daemon share).

#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a test failure with a backtrace.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod ahead;
mod error;
pub mod geometry;
pub mod hex;
pub mod policy;
pub mod reader;
mod root_hash;
pub mod signature;
pub mod superblock;
pub mod tree;

pub use error::{Error, Result};
pub use geometry::{Geometry, VerityParams};
pub use policy::{
    open_image, open_image_ahead, open_image_from, open_verified, refuse_extra_devices,
    OpenedImage, Sidecars, SignatureStatus, TrustPolicy, VerityOptions,
};
pub use reader::VerifiedReader;
pub use root_hash::RootHash;
pub use signature::{sign_root_hash, verify_root_hash_signature, TrustStore, TrustedSigner};
pub use superblock::Superblock;
pub use tree::{
    compute_tree, compute_tree_with_threads, format_image, geometry_from_superblock, verify_image,
    FormatOptions, FormatReport, HashTree,
};
