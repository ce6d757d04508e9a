//! immountd: the delegation daemon of immount (placeholder while it lands).
#![forbid(unsafe_code)]
