//! Positional reads: the only way the format code reaches image bytes.
//!
//! The reader never assumes where bytes come from. A plain file, a byte
//! slice in memory and (in the `verity` crate) a reader that checks every
//! block against a hash tree all implement [`ReadAt`].

use std::io;
use std::sync::Arc;

/// A source of bytes addressed by absolute offset, like `pread(2)`.
///
/// Implementations must be usable from several threads at once.
pub trait ReadAt: Send + Sync {
    /// Fill all of `buf` with the bytes starting at `offset`.
    ///
    /// Reading past the end is an error of kind
    /// [`io::ErrorKind::UnexpectedEof`]; a short read is never returned.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The number of bytes this source holds.
    fn size(&self) -> io::Result<u64>;
}

fn eof(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at offset {offset} is past the end ({size} bytes)"),
    )
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.len() as u64;
        let start = usize::try_from(offset).map_err(|_| eof(offset, buf.len(), size))?;
        let end = start
            .checked_add(buf.len())
            .filter(|&end| end <= self.len())
            .ok_or_else(|| eof(offset, buf.len(), size))?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        let meta = self.metadata()?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // A block device reports length 0 in its metadata: seek to the end.
        use std::io::Seek;
        let mut f = self;
        f.seek(io::SeekFrom::End(0))
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_exactly_or_fails() {
        let data: &[u8] = b"0123456789";
        let mut buf = [0u8; 4];
        data.read_exact_at(&mut buf, 3).unwrap();
        assert_eq!(&buf, b"3456");
        assert_eq!(
            data.read_exact_at(&mut buf, 8).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(data.read_exact_at(&mut buf, u64::MAX).is_err());
        let mut empty = [0u8; 0];
        data.read_exact_at(&mut empty, 10).unwrap();
    }
}
