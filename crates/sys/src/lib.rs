//! Syscall wrappers for immount: the one crate of the workspace allowed to
//! contain `unsafe`. Every `unsafe` block carries a `// SAFETY:` comment that
//! says why it is sound. Every other crate forbids unsafe code.
#![allow(unsafe_code)]

pub mod fuse;
#[cfg(feature = "microlzma")]
pub mod microlzma;
pub mod mountd;
pub mod sandbox;
#[cfg(target_arch = "x86_64")]
mod sha256_consts;
pub mod sha256x16;
pub mod sha256x2;
