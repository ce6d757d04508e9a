//! The one error type of the crate.

use std::io;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building, checking or trusting a tree.
///
/// The variants are categories the caller acts on: [`Error::Mismatch`] means
/// the image or its tree does not match the root hash (the CLI's exit code 1),
/// [`Error::Untrusted`] means a signature was refused, the rest are problems
/// with the request or the files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path or offset.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A superblock, parameter or argument is malformed or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// A valid setup that this implementation does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Data or tree does not match the root hash.
    #[error("{0}")]
    Mismatch(String),
    /// A signature is missing, malformed or not made by a trusted certificate.
    #[error("signature refused: {0}")]
    Untrusted(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    pub(crate) fn untrusted(msg: impl Into<String>) -> Self {
        Error::Untrusted(msg.into())
    }

    /// True when the error says the data does not match the root hash, as
    /// opposed to a problem reading it or with the request.
    pub fn is_mismatch(&self) -> bool {
        match self {
            Error::Mismatch(_) => true,
            // A verified read reports a bad block as InvalidData.
            Error::Io { source, .. } => source.kind() == io::ErrorKind::InvalidData,
            _ => false,
        }
    }
}
