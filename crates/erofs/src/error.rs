//! The one error type of the reader.

use std::fmt;
use std::io;

/// Where in the image a problem was found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Location {
    /// The inode being read, when there is one.
    pub nid: Option<u64>,
    /// The byte offset in the image (or in the metabox or packed inode).
    pub offset: Option<u64>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.nid, self.offset) {
            (Some(nid), Some(off)) => write!(f, " (nid {nid}, offset {off})"),
            (Some(nid), None) => write!(f, " (nid {nid})"),
            (None, Some(off)) => write!(f, " (offset {off})"),
            (None, None) => Ok(()),
        }
    }
}

/// Everything that can go wrong while reading an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the underlying bytes failed (including reads past the end of
    /// a device that the image says is larger than it is).
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        /// Absolute offset of the failed read in its device.
        offset: u64,
        /// What the byte source reported.
        source: io::Error,
    },
    /// The image uses a feature this reader does not implement.
    #[error("unsupported image: {0}")]
    Incompatible(String),
    /// The image contradicts itself or the format.
    #[error("corrupt image: {what}{loc}")]
    Corrupt {
        /// What is wrong.
        what: String,
        /// Where it was found.
        loc: Location,
    },
    /// A path component does not exist.
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// A path component that must be a directory is not one.
    #[error("not a directory: {0}")]
    NotADirectory(String),
    /// The request does not fit the object (reading a directory as a file,
    /// a path that is not absolute, ...).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A corruption error with no location yet.
    pub fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            loc: Location::default(),
        }
    }

    /// A corruption error about inode `nid`.
    pub fn corrupt_nid(nid: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            loc: Location {
                nid: Some(nid),
                offset: None,
            },
        }
    }

    /// A corruption error at `offset`, about inode `nid` when known.
    pub fn corrupt_at(nid: Option<u64>, offset: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            loc: Location {
                nid,
                offset: Some(offset),
            },
        }
    }

    /// An error from the byte source at `offset`: a read past the end or a
    /// block that a verified reader refused (`InvalidData`) is the image's
    /// fault; anything else is I/O.
    pub fn from_io(offset: u64, e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => {
                Error::corrupt_at(None, offset, e.to_string())
            }
            _ => Error::Io { offset, source: e },
        }
    }

    /// Attach an inode number to a corruption error that has none.
    #[must_use]
    pub fn with_nid(self, nid: u64) -> Self {
        match self {
            Error::Corrupt { what, mut loc } => {
                loc.nid.get_or_insert(nid);
                Error::Corrupt { what, loc }
            }
            other => other,
        }
    }

    /// True when the image itself is at fault (corrupt or unsupported), as
    /// opposed to the I/O underneath or the caller's request.
    pub fn is_image_fault(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::Incompatible(_))
    }

    /// The closest errno, for servers that must answer with one.
    pub fn errno_name(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "ENOENT",
            Error::NotADirectory(_) => "ENOTDIR",
            Error::Invalid(_) => "EINVAL",
            Error::Incompatible(_) => "EOPNOTSUPP",
            Error::Io { .. } | Error::Corrupt { .. } => "EIO",
        }
    }
}

/// The reader's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
