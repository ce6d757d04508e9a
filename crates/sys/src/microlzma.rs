//! liblzma's MicroLZMA encoder (the format of EROFS's LZMA pclusters) behind
//! a small safe API.
//!
//! MicroLZMA is a raw LZMA1 stream without header or end marker whose first
//! byte is the bitwise NOT of the lc/lp/pb properties byte. liblzma's
//! encoder for it takes a destination size and, in one pass, encodes as
//! much of the input as fits, then reports how much input that was: exactly
//! what a fixed-size pcluster needs. The bundled xz sources are used (not
//! the system library) so that the same input gives the same bytes on every
//! machine.

use std::fmt;

use liblzma_sys as ffi;

/// The largest dictionary the kernel accepts in an EROFS LZMA config.
pub const MAX_DICT_SIZE: u32 = 8 << 20;
/// The smallest dictionary liblzma accepts.
pub const MIN_DICT_SIZE: u32 = 4096;
/// The smallest destination liblzma can finish a MicroLZMA stream in.
pub const MIN_DST: usize = 6;

/// Why the encoder could not be set up or could not encode.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The preset level is not 0..=9.
    Level(u32),
    /// The dictionary size is outside [`MIN_DICT_SIZE`]..=[`MAX_DICT_SIZE`].
    DictSize(u32),
    /// The destination is smaller than [`MIN_DST`] bytes.
    DstTooSmall(usize),
    /// liblzma returned an unexpected code from `call`.
    Liblzma {
        /// The liblzma function.
        call: &'static str,
        /// Its `lzma_ret`.
        code: u32,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Level(l) => write!(f, "LZMA preset level {l} is not 0..=9"),
            Error::DictSize(d) => write!(
                f,
                "LZMA dictionary size {d} is not {MIN_DICT_SIZE}..={MAX_DICT_SIZE}"
            ),
            Error::DstTooSmall(n) => {
                write!(
                    f,
                    "MicroLZMA needs at least {MIN_DST} output bytes, not {n}"
                )
            }
            Error::Liblzma { call, code } => {
                let what = match *code {
                    ffi::LZMA_MEM_ERROR => "out of memory",
                    ffi::LZMA_OPTIONS_ERROR => "unsupported options",
                    ffi::LZMA_PROG_ERROR => "programming error",
                    _ => "unexpected result",
                };
                write!(f, "liblzma {call}: {what} (code {code})")
            }
        }
    }
}

impl std::error::Error for Error {}

/// Encoder settings: mkfs.erofs's `-zlzma,level=N` means preset N, or
/// preset N-100 with the extreme flag for N in 100..=109.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The xz preset level, 0..=9.
    pub preset: u32,
    /// The "extreme" variant of the preset (slower, a little smaller).
    pub extreme: bool,
    /// Dictionary size: the decoder's config record must be at least this.
    pub dict_size: u32,
}

/// A MicroLZMA encoder. It keeps its liblzma stream (and so the match
/// finder's tables) between calls, so one per thread reused for every
/// pcluster allocates only once; every call starts a new stream, so the
/// output depends only on that call's input.
pub struct Encoder {
    strm: ffi::lzma_stream,
    opts: ffi::lzma_options_lzma,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("dict_size", &self.opts.dict_size)
            .field("lc", &self.opts.lc)
            .field("lp", &self.opts.lp)
            .field("pb", &self.opts.pb)
            .finish()
    }
}

impl Encoder {
    /// An encoder with liblzma's settings for `opts.preset` (lc=3, lp=0,
    /// pb=2, its match finder and search depth) and `opts.dict_size`.
    pub fn new(opts: Options) -> Result<Encoder, Error> {
        if opts.preset > 9 {
            return Err(Error::Level(opts.preset));
        }
        if !(MIN_DICT_SIZE..=MAX_DICT_SIZE).contains(&opts.dict_size) {
            return Err(Error::DictSize(opts.dict_size));
        }
        let preset = if opts.extreme {
            opts.preset | ffi::LZMA_PRESET_EXTREME
        } else {
            opts.preset
        };
        // SAFETY: both are plain C structs of integers and raw pointers for
        // which all-zero is the documented initial value (LZMA_STREAM_INIT;
        // the options are filled in by lzma_lzma_preset below).
        let mut strm: ffi::lzma_stream = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut lzma_opts: ffi::lzma_options_lzma = unsafe { std::mem::zeroed() };
        strm.next_in = std::ptr::null();
        strm.next_out = std::ptr::null_mut();
        // SAFETY: `lzma_opts` is a valid, exclusively borrowed struct that
        // the call only writes.
        if unsafe { ffi::lzma_lzma_preset(&mut lzma_opts, preset) } != 0 {
            return Err(Error::Level(opts.preset));
        }
        lzma_opts.dict_size = opts.dict_size;
        Ok(Encoder {
            strm,
            opts: lzma_opts,
        })
    }

    /// Encode the longest prefix of `src` whose MicroLZMA stream fits in
    /// `dst_cap` bytes: (input bytes consumed, the stream). The stream
    /// decodes to exactly `src[..consumed]`; when all of `src` fits,
    /// `consumed == src.len()`.
    pub fn fill(&mut self, src: &[u8], dst_cap: usize) -> Result<(usize, Vec<u8>), Error> {
        if dst_cap < MIN_DST {
            return Err(Error::DstTooSmall(dst_cap));
        }
        // SAFETY: `strm` is either all-zero or was set up by an earlier
        // call of liblzma, which frees or reuses what it holds; `opts` is a
        // valid options struct that liblzma only reads (its preset_dict is
        // null).
        let ret = unsafe { ffi::lzma_microlzma_encoder(&mut self.strm, &self.opts) };
        if ret != ffi::LZMA_OK {
            return Err(Error::Liblzma {
                call: "lzma_microlzma_encoder",
                code: ret,
            });
        }
        let mut out: Vec<u8> = Vec::with_capacity(dst_cap);
        self.strm.next_in = src.as_ptr();
        self.strm.avail_in = src.len();
        self.strm.next_out = out.as_mut_ptr();
        self.strm.avail_out = dst_cap;
        // SAFETY: `next_in` points at `src.len()` readable bytes and
        // `next_out` at `dst_cap` writable ones (the Vec's capacity), both
        // alive for the call; liblzma keeps neither pointer for later (we
        // clear them below anyway).
        let ret = unsafe { ffi::lzma_code(&mut self.strm, ffi::LZMA_FINISH) };
        let left_in = self.strm.avail_in;
        let left_out = self.strm.avail_out;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        if ret != ffi::LZMA_STREAM_END {
            return Err(Error::Liblzma {
                call: "lzma_code",
                code: ret,
            });
        }
        // liblzma only ever lowers the counts it was given.
        let consumed = src.len() - left_in.min(src.len());
        let written = dst_cap - left_out.min(dst_cap);
        // SAFETY: liblzma wrote (initialised) exactly the first `written`
        // bytes of the buffer, and `written <= dst_cap == capacity`.
        unsafe { out.set_len(written) };
        Ok((consumed, out))
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: `strm` is all-zero or set up by liblzma; lzma_end accepts
        // both and frees what liblzma allocated. It is not used afterwards.
        unsafe { ffi::lzma_end(&mut self.strm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(preset: u32, extreme: bool) -> Encoder {
        Encoder::new(Options {
            preset,
            extreme,
            dict_size: 1 << 18,
        })
        .unwrap()
    }

    #[test]
    fn bad_options_are_errors() {
        let o = Options {
            preset: 10,
            extreme: false,
            dict_size: 1 << 16,
        };
        assert_eq!(Encoder::new(o).unwrap_err(), Error::Level(10));
        for dict_size in [0, 4095, MAX_DICT_SIZE + 1] {
            let o = Options {
                preset: 6,
                extreme: false,
                dict_size,
            };
            assert_eq!(Encoder::new(o).unwrap_err(), Error::DictSize(dict_size));
        }
        assert_eq!(
            enc(6, false).fill(b"abc", 5).unwrap_err(),
            Error::DstTooSmall(5)
        );
    }

    #[test]
    fn stream_starts_with_inverted_properties() {
        // lc=3, lp=0, pb=2: (2 * 5 + 0) * 9 + 3 = 93.
        let (n, out) = enc(6, false).fill(&[7u8; 10000], 4096).unwrap();
        assert_eq!(n, 10000);
        assert_eq!(out[0], !93u8);
        assert!(out.len() < 100, "10000 equal bytes took {}", out.len());
    }

    #[test]
    fn fills_the_destination_and_reports_the_prefix() {
        // Incompressible bytes cannot all fit: the stream fills the cap
        // almost exactly and covers a bit less input than that.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let src: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut e = enc(6, false);
        let (n, out) = e.fill(&src, 4096).unwrap();
        assert!(out.len() <= 4096 && out.len() > 4000, "{}", out.len());
        assert!(n > 3900 && n < 4096, "consumed {n}");
        // The encoder is reusable and its output depends only on the input.
        assert_eq!(e.fill(&src, 4096).unwrap(), (n, out.clone()));
        assert_eq!(enc(6, false).fill(&src, 4096).unwrap(), (n, out));
    }

    #[test]
    fn extreme_is_accepted() {
        let src: Vec<u8> = (0..50_000u32).map(|i| (i * i % 251) as u8).collect();
        let (n, out) = enc(9, true).fill(&src, 65536).unwrap();
        assert_eq!(n, src.len());
        assert!(out.len() < src.len() / 4);
    }
}
