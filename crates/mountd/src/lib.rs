//! immountd, the delegation daemon of immount: a small privileged service
//! that decides by policy who may mount which EROFS image and how, and
//! never parses image content itself.
//!
//! - [`varlink`]: the wire protocol (NUL-terminated JSON, fds by
//!   `SCM_RIGHTS`), strict and size-limited.
//! - [`interface`]: the varlink interfaces served (`io.immount.Mount`,
//!   `org.varlink.service`).
//! - [`policy`]: the TOML policy (trust dirs, signed/unsigned classes).
//! - [`daemon`]: the service: decisions, mounts, server lifetimes, logs.
//! - [`server`]: the per-mount sandboxed FUSE server process.
//! - [`client`]: asking the daemon for a mount (flows a and b).
#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a test failure with a backtrace.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod client;
pub mod daemon;
pub mod interface;
pub mod policy;
pub mod server;
pub mod varlink;
