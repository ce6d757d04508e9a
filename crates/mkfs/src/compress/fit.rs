//! Filling a fixed destination size with encoders that only compress whole
//! inputs (MicroLZMA, DEFLATE, Zstandard): compress a guess, then move the
//! input length by the observed ratio until the output fills the pcluster
//! closely. The last ratio seeds the next pcluster's first guess, so most
//! pclusters take two or three attempts.

use std::io::Write;

use super::Algorithm;

/// A whole-input encoder plus the ratio learned so far.
pub struct Fitter {
    alg: Algorithm,
    level: i32,
    dict_size: u32,
    /// Input bytes per output byte seen last time.
    ratio: f64,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Fitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fitter").field("alg", &self.alg).finish()
    }
}

impl Fitter {
    /// A fitter for `alg` at `level`; `dict_size` bounds LZMA's dictionary
    /// and Zstandard's window.
    pub fn new(alg: Algorithm, level: i32, dict_size: u32) -> Fitter {
        let zstd = if alg == Algorithm::Zstd {
            zstd::bulk::Compressor::new(level).ok().map(|mut c| {
                let _ = c.set_parameter(zstd::stream::raw::CParameter::WindowLog(
                    dict_size.trailing_zeros(),
                ));
                let _ = c.set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(false));
                let _ = c.set_parameter(zstd::stream::raw::CParameter::ContentSizeFlag(true));
                c
            })
        } else {
            None
        };
        Fitter {
            alg,
            level,
            dict_size,
            ratio: 3.0,
            zstd,
        }
    }

    /// Forget the learned ratio, so that a segment's output depends only
    /// on its bytes (not on what this thread compressed before): builds stay
    /// reproducible and identical files compress to identical pclusters.
    pub fn reset(&mut self) {
        self.ratio = 3.0;
    }

    fn encode(&mut self, src: &[u8]) -> Option<Vec<u8>> {
        match self.alg {
            Algorithm::Deflate => Some(miniz_oxide::deflate::compress_to_vec(
                src,
                self.level.clamp(0, 10) as u8,
            )),
            Algorithm::Zstd => self.zstd.as_mut()?.compress(src).ok(),
            Algorithm::Lzma => microlzma(src, self.level, self.dict_size),
            Algorithm::Lz4 | Algorithm::Lz4hc => None,
        }
    }

    /// Compress a prefix of `src` into at most `cap` bytes: (consumed,
    /// block), or `None` when not even a small prefix fits.
    pub fn fit(&mut self, src: &[u8], cap: usize) -> Option<(usize, Vec<u8>)> {
        if self.alg == Algorithm::Lzma {
            if let Some(done) = self.fit_lzma_streaming(src, cap) {
                return Some(done);
            }
        }
        self.fit_by_guesses(src, cap)
    }

    /// LZMA in one pass, as MicroLZMA's own encoder does: feed the input in
    /// small steps while watching the output grow, and finish the stream
    /// once the output plus what the encoder still holds back (its
    /// lookahead, at the ratio seen so far) would fill `cap`. `None` when
    /// the finished stream came out too large after all (then the
    /// guessing loop takes over, seeded with what was learned).
    fn fit_lzma_streaming(&mut self, src: &[u8], cap: usize) -> Option<(usize, Vec<u8>)> {
        // Input bytes fed per step, and input the encoder may hold back
        // unencoded (its longest match plus one step).
        const STEP: usize = 128;
        const HELD_BACK: f64 = (273 + STEP) as f64;
        let mut w = lzma_writer(src.len(), self.level, self.dict_size, cap)?;
        let mut fed = 0usize;
        while fed < src.len() {
            let produced = w.inner().len();
            // Bytes in per byte out so far; before any output, assume the
            // held-back input will not compress.
            let ratio = if produced > 64 {
                (fed as f64 / produced as f64).max(0.25)
            } else {
                1.0
            };
            let reserve = (HELD_BACK / ratio * 1.25) as usize + 16;
            if produced + reserve >= cap {
                break;
            }
            let n = STEP.min(src.len() - fed);
            w.write_all(&src[fed..fed + n]).ok()?;
            fed += n;
        }
        let props = w.props();
        let mut out = w.finish().ok()?;
        if fed == 0 || out.first() != Some(&0) {
            return None;
        }
        self.ratio = fed as f64 / out.len().max(1) as f64;
        if out.len() > cap {
            return None;
        }
        out[0] = !props;
        Some((fed, out))
    }

    /// Compress guessed prefixes until one fills `cap` closely.
    fn fit_by_guesses(&mut self, src: &[u8], cap: usize) -> Option<(usize, Vec<u8>)> {
        let mut best: Option<(usize, Vec<u8>)> = None;
        let mut too_big = src.len() + 1; // smallest length known not to fit
        let mut m = ((cap as f64 * self.ratio) as usize).clamp(cap.min(src.len()), src.len());
        for _ in 0..8 {
            let out = self.encode(&src[..m])?;
            if out.len() <= cap {
                self.ratio = m as f64 / out.len().max(1) as f64;
                let done = m == src.len() || out.len() + cap / 64 + 8 >= cap;
                best = Some((m, out));
                if done {
                    break;
                }
                // Grow towards a full pcluster, staying below a known miss.
                let next = ((m as f64) * (cap as f64) / (best.as_ref()?.1.len().max(1) as f64)
                    * 0.99) as usize;
                let next = next.min(too_big - 1).min(src.len());
                if next <= m + cap / 32 {
                    break;
                }
                m = next;
            } else {
                too_big = m;
                self.ratio = m as f64 / out.len() as f64;
                let lo = best.as_ref().map(|b| b.0).unwrap_or(0);
                let next = ((m as f64) * (cap as f64) / (out.len() as f64) * 0.97) as usize;
                let next = next.min(m - 1);
                if next <= lo {
                    break;
                }
                m = next.max(1);
            }
        }
        best
    }
}

/// A raw LZMA1 encoder (no header, no end marker) for up to `input` bytes,
/// its output buffer sized for `expect` bytes.
fn lzma_writer(
    input: usize,
    level: i32,
    dict_size: u32,
    expect: usize,
) -> Option<lzma_rust2::LzmaWriter<Vec<u8>>> {
    let mut opts = lzma_rust2::LzmaOptions::with_preset(level.clamp(0, 9) as u32);
    // A dictionary larger than the input finds nothing more, and the match
    // finder's tables (allocated and cleared for every stream) grow with
    // it: size it to the input.
    let fits_input = u32::try_from(input)
        .unwrap_or(u32::MAX)
        .checked_next_power_of_two()
        .unwrap_or(u32::MAX);
    opts.dict_size = fits_input.min(dict_size).max(4096);
    lzma_rust2::LzmaWriter::new_no_header(Vec::with_capacity(expect + 64), &opts, false).ok()
}

/// MicroLZMA as EROFS stores it: a raw LZMA1 stream without header or end
/// marker whose first byte (always 0 from the range encoder) is replaced by
/// the bitwise NOT of the properties byte.
fn microlzma(src: &[u8], level: i32, dict_size: u32) -> Option<Vec<u8>> {
    let mut w = lzma_writer(src.len(), level, dict_size, src.len() / 2)?;
    w.write_all(src).ok()?;
    let props = w.props();
    let mut out = w.finish().ok()?;
    if out.first() != Some(&0) {
        return None;
    }
    out[0] = !props;
    Some(out)
}
