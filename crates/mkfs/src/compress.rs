//! Compressed files (work in progress).

use crate::error::{Error, Result};
use crate::tree::Data;
use crate::write::Out;

/// Compression algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// LZ4 (fast).
    Lz4,
    /// LZ4 with a deeper match search.
    Lz4hc,
    /// MicroLZMA.
    Lzma,
    /// Raw DEFLATE.
    Deflate,
    /// Zstandard.
    Zstd,
}

/// How to compress.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Its level, or its default.
    pub level: Option<i32>,
    /// Largest pcluster in bytes (a multiple of the block size).
    pub pcluster_size: u32,
    /// Tail pclusters inline after the inode.
    pub ztailpacking: bool,
    /// Tails in the packed inode.
    pub fragments: bool,
    /// Share identical pclusters.
    pub dedupe: bool,
}

/// Result of compressing one file.
#[derive(Debug)]
pub(crate) struct FileResult {
    pub layout: u16,
    pub i_u: u32,
    pub inline: Vec<u8>,
}

/// Compression state across the image.
#[derive(Debug)]
pub(crate) struct State {
    opts: CompressOptions,
}

/// The configuration records after the superblock.
pub(crate) fn config_records(_c: &CompressOptions, _bs: u32) -> Result<Vec<u8>> {
    Ok(Vec::new())
}

impl State {
    pub(crate) fn new(opts: CompressOptions, _bs: u32) -> State {
        State { opts }
    }
    pub(crate) fn compress_files(
        &mut self,
        _jobs: &[(usize, Data, u64)],
        _out: &mut Out,
        _bar: &indicatif::ProgressBar,
        _inode_part: impl Fn(usize) -> usize,
    ) -> Result<Vec<(usize, FileResult)>> {
        Err(Error::Option(format!(
            "{:?} is not supported yet",
            self.opts.algorithm
        )))
    }
    pub(crate) fn incompat(&self) -> u32 {
        0
    }
    pub(crate) fn sb_u1(&self) -> u16 {
        0
    }
    pub(crate) fn packed_nid(&self) -> Option<u64> {
        None
    }
}
