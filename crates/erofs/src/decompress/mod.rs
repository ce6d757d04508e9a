//! Decoders for compressed pclusters: LZ4, MicroLZMA, raw DEFLATE and
//! Zstandard, the four algorithms of `erofs_fs.h`.
//!
//! The mapping code finds a pcluster (its stored bytes) and the decoded
//! length a read needs; [`Decompressor::decompress`] turns one into the
//! other. Every decoder here writes only into the caller's `dst`, allocates
//! at most a bounded amount besides it (a window capped by the per-image
//! [`Config`]), and stops on any input after a number of steps bounded by
//! the input and output lengths. Malformed input gives a
//! [`DecompressError`], never a panic.

use std::borrow::Cow;
use std::fmt;

use crate::Error;

mod deflate;
mod lz4;
mod lzma;
mod zstd;

/// Largest pcluster the format allows (`Z_EROFS_PCLUSTER_MAX_SIZE`).
pub const PCLUSTER_MAX_SIZE: usize = 1024 * 1024;
/// Largest decoded length of one pcluster (`Z_EROFS_PCLUSTER_MAX_DSIZE`).
pub const PCLUSTER_MAX_DSIZE: usize = 12 * 1024 * 1024;
/// Largest LZMA dictionary the kernel accepts (`Z_EROFS_LZMA_MAX_DICT_SIZE`).
pub const LZMA_MAX_DICT_SIZE: u32 = 8 * PCLUSTER_MAX_SIZE as u32;
/// Smallest LZMA dictionary the kernel accepts.
pub const LZMA_MIN_DICT_SIZE: u32 = 4096;
/// Largest Zstandard window the kernel accepts (`Z_EROFS_ZSTD_MAX_DICT_SIZE`).
pub const ZSTD_MAX_WINDOW_SIZE: u32 = PCLUSTER_MAX_SIZE as u32;
/// Zstandard's smallest window log; the cfg record stores the log minus this.
const ZSTD_WINDOWLOG_ABSOLUTEMIN: u8 = 10;
/// Largest DEFLATE window log (zlib's `MAX_WBITS`).
const DEFLATE_MAX_WINDOWBITS: u8 = 15;

/// A compression algorithm, by its on-disk id (`Z_EROFS_COMPRESSION_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// LZ4 block format (id 0).
    Lz4,
    /// MicroLZMA, LZMA1 with the properties byte folded into the first
    /// range-coder byte (id 1).
    Lzma,
    /// Raw DEFLATE, no zlib header (id 2).
    Deflate,
    /// Zstandard frames (id 3).
    Zstd,
}

impl Algorithm {
    /// All algorithms, in on-disk id order.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Lz4,
        Algorithm::Lzma,
        Algorithm::Deflate,
        Algorithm::Zstd,
    ];

    /// The on-disk id.
    pub fn id(self) -> u8 {
        match self {
            Algorithm::Lz4 => 0,
            Algorithm::Lzma => 1,
            Algorithm::Deflate => 2,
            Algorithm::Zstd => 3,
        }
    }

    /// A short lower-case name, as mkfs.erofs spells it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Lzma => "lzma",
            Algorithm::Deflate => "deflate",
            Algorithm::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<u8> for Algorithm {
    type Error = Error;

    fn try_from(id: u8) -> Result<Self, Error> {
        match id {
            0 => Ok(Algorithm::Lz4),
            1 => Ok(Algorithm::Lzma),
            2 => Ok(Algorithm::Deflate),
            3 => Ok(Algorithm::Zstd),
            _ => Err(Error::Incompatible(format!(
                "unknown compression algorithm {id}"
            ))),
        }
    }
}

/// LZ4 settings (`struct z_erofs_lz4_cfgs`, or the superblock's
/// `lz4_max_distance` on images without COMPR_CFGS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lz4Config {
    /// Largest match distance the encoder used; 0 means LZ4's own 65535.
    /// The kernel sizes its bounce buffers with it but does not check
    /// streams against it, and neither do we: an LZ4 offset can never
    /// exceed 65535 and our output buffer is flat.
    pub max_distance: u16,
    /// Largest pcluster in blocks (0 on disk means 1).
    pub max_pclusterblks: u16,
}

impl Default for Lz4Config {
    fn default() -> Self {
        Lz4Config {
            max_distance: 0,
            max_pclusterblks: 1,
        }
    }
}

/// MicroLZMA settings (`struct z_erofs_lzma_cfgs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LzmaConfig {
    /// Dictionary size: no match may reach further back than this.
    pub dict_size: u32,
}

impl Default for LzmaConfig {
    /// The kernel refuses LZMA images without a cfg record; the default
    /// is the largest dictionary it would accept.
    fn default() -> Self {
        LzmaConfig {
            dict_size: LZMA_MAX_DICT_SIZE,
        }
    }
}

/// DEFLATE settings (`struct z_erofs_deflate_cfgs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Window log the encoder used (8..=15). Like the kernel, the decoder
    /// always accepts the full 32 KiB window.
    pub windowbits: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            windowbits: DEFLATE_MAX_WINDOWBITS,
        }
    }
}

/// Zstandard settings (`struct z_erofs_zstd_cfgs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZstdConfig {
    /// Largest window a frame may ask for, in bytes (a power of two,
    /// `1 << (windowlog + 10)`, at most [`ZSTD_MAX_WINDOW_SIZE`]).
    pub max_window_size: u32,
}

impl Default for ZstdConfig {
    /// The kernel refuses Zstandard images without a cfg record; the
    /// default is the largest window it would accept.
    fn default() -> Self {
        ZstdConfig {
            max_window_size: ZSTD_MAX_WINDOW_SIZE,
        }
    }
}

/// One algorithm's settings, as parsed from one COMPR_CFGS record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgConfig {
    /// Settings for [`Algorithm::Lz4`].
    Lz4(Lz4Config),
    /// Settings for [`Algorithm::Lzma`].
    Lzma(LzmaConfig),
    /// Settings for [`Algorithm::Deflate`].
    Deflate(DeflateConfig),
    /// Settings for [`Algorithm::Zstd`].
    Zstd(ZstdConfig),
}

/// The per-image settings of every algorithm. `Default` is what the kernel
/// assumes without COMPR_CFGS (only LZ4 is usable then).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    /// LZ4 settings.
    pub lz4: Lz4Config,
    /// MicroLZMA settings.
    pub lzma: LzmaConfig,
    /// DEFLATE settings.
    pub deflate: DeflateConfig,
    /// Zstandard settings.
    pub zstd: ZstdConfig,
}

impl Config {
    /// Replace one algorithm's settings.
    pub fn set(&mut self, cfg: AlgConfig) {
        match cfg {
            AlgConfig::Lz4(c) => self.lz4 = c,
            AlgConfig::Lzma(c) => self.lzma = c,
            AlgConfig::Deflate(c) => self.deflate = c,
            AlgConfig::Zstd(c) => self.zstd = c,
        }
    }
}

/// Parse the payload of one COMPR_CFGS record (the bytes after its
/// little-endian length field) for `alg`, with the kernel's checks: a
/// record shorter than its struct is corrupt; an unknown format, an LZMA
/// dictionary outside 4 KiB..=8 MiB, a DEFLATE window above 15 bits or a
/// Zstandard window above 1 MiB is unsupported. Longer records are fine
/// (the tail is reserved). LZ4's `max_pclusterblks` is checked against the
/// block size by [`Decompressor::new`].
pub fn parse_cfg(alg: Algorithm, record: &[u8]) -> Result<AlgConfig, Error> {
    let need = match alg {
        Algorithm::Lz4 | Algorithm::Lzma => 14,
        Algorithm::Deflate | Algorithm::Zstd => 6,
    };
    if record.len() < need {
        return Err(Error::corrupt(format!(
            "{alg} cfgs record is {} bytes, shorter than {need}",
            record.len()
        )));
    }
    let le16 = |at: usize| u16::from_le_bytes([record[at], record[at + 1]]);
    match alg {
        Algorithm::Lz4 => {
            let max_distance = le16(0);
            // 0 is a reserved value the kernel reads as one block.
            let max_pclusterblks = le16(2).max(1);
            Ok(AlgConfig::Lz4(Lz4Config {
                max_distance,
                max_pclusterblks,
            }))
        }
        Algorithm::Lzma => {
            let dict_size = u32::from_le_bytes([record[0], record[1], record[2], record[3]]);
            let format = le16(4);
            if format != 0 {
                return Err(Error::Incompatible(format!(
                    "unknown lzma format {format:#x}"
                )));
            }
            if !(LZMA_MIN_DICT_SIZE..=LZMA_MAX_DICT_SIZE).contains(&dict_size) {
                return Err(Error::Incompatible(format!(
                    "unsupported lzma dictionary size {dict_size}"
                )));
            }
            Ok(AlgConfig::Lzma(LzmaConfig { dict_size }))
        }
        Algorithm::Deflate => {
            let windowbits = record[0];
            if windowbits > DEFLATE_MAX_WINDOWBITS {
                return Err(Error::Incompatible(format!(
                    "unsupported deflate windowbits {windowbits}"
                )));
            }
            Ok(AlgConfig::Deflate(DeflateConfig { windowbits }))
        }
        Algorithm::Zstd => {
            let (format, windowlog) = (record[0], record[1]);
            if format != 0 {
                return Err(Error::Incompatible(format!(
                    "unknown zstd format {format:#x}"
                )));
            }
            // ilog2(1 MiB) - 10: the window the kernel's decoder is sized for.
            let max_log = ZSTD_MAX_WINDOW_SIZE.ilog2() as u8 - ZSTD_WINDOWLOG_ABSOLUTEMIN;
            if windowlog > max_log {
                return Err(Error::Incompatible(format!(
                    "unsupported zstd window log {windowlog}"
                )));
            }
            let max_window_size = 1u32 << (windowlog + ZSTD_WINDOWLOG_ABSOLUTEMIN);
            Ok(AlgConfig::Zstd(ZstdConfig { max_window_size }))
        }
    }
}

/// Why a pcluster failed to decode. The reader wraps it into
/// [`Error::Corrupt`] with the inode and offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecompressError {
    alg: Algorithm,
    msg: Cow<'static, str>,
}

impl DecompressError {
    pub(crate) fn new(alg: Algorithm, msg: impl Into<Cow<'static, str>>) -> Self {
        DecompressError {
            alg,
            msg: msg.into(),
        }
    }

    /// The algorithm whose stream was bad.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// What was wrong with it.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for DecompressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} decompression failed: {}", self.alg, self.msg)
    }
}

impl std::error::Error for DecompressError {}

impl From<DecompressError> for Error {
    fn from(e: DecompressError) -> Self {
        Error::corrupt(e.to_string())
    }
}

/// Decodes pclusters for one image. Holds only settings, so it is cheap,
/// `Send` and `Sync`; every call works on its own state.
#[derive(Debug, Clone)]
pub struct Decompressor {
    config: Config,
    block_size: usize,
}

impl Decompressor {
    /// A decompressor for an image with these settings and block size.
    /// Fails, as the kernel's mount does, when LZ4's largest pcluster is
    /// over 1 MiB.
    pub fn new(config: Config, block_size: u32) -> Result<Self, Error> {
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(Error::corrupt(format!(
                "block size {block_size} is not a power of two >= 512"
            )));
        }
        let lz4_max = u64::from(config.lz4.max_pclusterblks) * u64::from(block_size);
        if lz4_max > PCLUSTER_MAX_SIZE as u64 {
            return Err(Error::Incompatible(format!(
                "too large lz4 pclusterblks {}",
                config.lz4.max_pclusterblks
            )));
        }
        // usize is at least 32 bits on every target we build for.
        let block_size =
            usize::try_from(block_size).map_err(|_| Error::corrupt("block size too large"))?;
        Ok(Decompressor { config, block_size })
    }

    /// The settings this decompressor was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decode `src` (the pcluster bytes as stored, or an inline tail) into
    /// all of `dst`.
    ///
    /// Leading zero bytes are skipped, as the kernel does, for MicroLZMA,
    /// DEFLATE and Zstandard always and for LZ4 when `zero_padding` (the
    /// ZERO_PADDING feature) is set; the zeros must end within the first
    /// block. Without ZERO_PADDING an LZ4 pcluster may hold more than its
    /// extent, so LZ4 then always decodes in partial mode, like the kernel.
    ///
    /// With `partial == false` the stream must produce exactly `dst.len()`
    /// bytes and end there (LZ4 and MicroLZMA must also consume their input
    /// exactly). With `partial == true` decoding stops once `dst` is full.
    /// Output shorter than `dst`, output that would overflow it (when not
    /// partial) and malformed streams are errors. `dst` may be partly
    /// written when an error is returned.
    pub fn decompress(
        &self,
        alg: Algorithm,
        src: &[u8],
        dst: &mut [u8],
        partial: bool,
        zero_padding: bool,
    ) -> Result<(), DecompressError> {
        if src.len() > PCLUSTER_MAX_SIZE {
            return Err(DecompressError::new(
                alg,
                format!("pcluster of {} bytes is over 1 MiB", src.len()),
            ));
        }
        if dst.len() > PCLUSTER_MAX_DSIZE {
            return Err(DecompressError::new(
                alg,
                format!("decoded length {} is over 12 MiB", dst.len()),
            ));
        }
        let (src, partial) = match alg {
            Algorithm::Lz4 if !zero_padding => (src, true),
            _ => (self.skip_zero_padding(alg, src)?, partial),
        };
        match alg {
            Algorithm::Lz4 => lz4::decompress(src, dst, partial),
            Algorithm::Lzma => lzma::decompress(&self.config.lzma, src, dst, partial),
            Algorithm::Deflate => deflate::decompress(src, dst, partial),
            Algorithm::Zstd => zstd::decompress(&self.config.zstd, src, dst, partial),
        }
    }

    /// The kernel's `z_erofs_fixup_insize`: the stream starts at the first
    /// non-zero byte, which must lie in the first block.
    fn skip_zero_padding<'a>(
        &self,
        alg: Algorithm,
        src: &'a [u8],
    ) -> Result<&'a [u8], DecompressError> {
        let scan = &src[..src.len().min(self.block_size)];
        match scan.iter().position(|&b| b != 0) {
            Some(start) => Ok(&src[start..]),
            None => Err(DecompressError::new(
                alg,
                "no data in the first block of the pcluster",
            )),
        }
    }
}

/// Copy `len` bytes from `offset` bytes back to `op`, where the regions may
/// overlap (the source repeats with period `offset`). The caller checked
/// `1 <= offset <= op` and `op + len <= dst.len()`.
#[inline]
pub(crate) fn copy_match(dst: &mut [u8], op: usize, offset: usize, len: usize) {
    let start = op - offset;
    if offset >= len {
        dst.copy_within(start..start + len, op);
    } else if offset == 1 {
        let b = dst[start];
        dst[op..op + len].fill(b);
    } else {
        // Copy whole periods, doubling: after `done` bytes (a multiple of
        // `offset`), `dst[start..op + done]` is periodic and does not
        // overlap the next destination chunk.
        let mut done = 0;
        while done < len {
            let chunk = (offset + done).min(len - done);
            dst.copy_within(start..start + chunk, op + done);
            done += chunk;
        }
    }
}
