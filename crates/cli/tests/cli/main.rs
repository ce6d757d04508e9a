//! Integration tests of the `immount` binary against the corpus in
//! ../shared/corpus: the kernel's manifest of each image is the oracle.

mod build;
mod common;
mod corpus;
mod crafted;
mod errors;
mod extract;
mod mutation;
mod verity;
