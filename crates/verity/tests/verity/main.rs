//! Integration tests of the verity crate: interoperability with
//! `veritysetup` (package cryptsetup-bin), tampering, signatures made and
//! checked by `openssl`, and the sidecar policy.

#![allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace

mod common;
mod interop;
mod parser;
mod policy;
mod signature;
mod tamper;
