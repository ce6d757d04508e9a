//! Filling a fixed destination size with encoders that only compress whole
//! inputs (DEFLATE, Zstandard): compress a guess, then move the
//! input length by the observed ratio until the output fills the pcluster
//! closely. The last ratio seeds the next pcluster's first guess, so most
//! pclusters take two or three attempts.

use super::Algorithm;

/// A whole-input encoder plus the ratio learned so far.
pub struct Fitter {
    alg: Algorithm,
    level: i32,
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
    /// A fitter for `alg` (DEFLATE or Zstandard) at `level`; `dict_size`
    /// bounds Zstandard's window.
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
            Algorithm::Lz4 | Algorithm::Lz4hc | Algorithm::Lzma => None,
        }
    }

    /// Compress a prefix of `src` into at most `cap` bytes: (consumed,
    /// block), or `None` when not even a small prefix fits.
    pub fn fit(&mut self, src: &[u8], cap: usize) -> Option<(usize, Vec<u8>)> {
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
