//! The one error type of the image writer.

use std::path::{Path, PathBuf};

/// Why a build failed. No partial image is left behind in any case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading an input file or writing the image failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The input cannot be turned into an image (bad tar, escaping path,
    /// a value the format cannot hold, ...).
    #[error("{0}")]
    Input(String),
    /// An option is out of range or options conflict.
    #[error("invalid option: {0}")]
    Option(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An input error with a message.
    pub fn input(msg: impl Into<String>) -> Error {
        Error::Input(msg.into())
    }

    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
