//! The root hash: the one value a verified image is trusted through.

use std::fmt;
use std::str::FromStr;

use crate::{hex, Error};

/// Size of a sha256 digest, the only hash algorithm supported.
pub const DIGEST_SIZE: usize = 32;

/// A sha256 root hash of a verity tree.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RootHash(pub [u8; DIGEST_SIZE]);

impl RootHash {
    /// The lowercase hex text, the form that is signed and stored in
    /// `IMAGE.roothash`.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl fmt::Display for RootHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for RootHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootHash({})", self.to_hex())
    }
}

impl FromStr for RootHash {
    type Err = Error;

    /// Parse 64 hex digits; surrounding whitespace (a trailing newline in a
    /// `.roothash` file) is ignored.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bytes = hex::decode(s, "root hash")?;
        let arr: [u8; DIGEST_SIZE] = bytes.as_slice().try_into().map_err(|_| {
            Error::invalid(format!(
                "root hash must be {} hex digits, got {}",
                DIGEST_SIZE * 2,
                s.trim().len()
            ))
        })?;
        Ok(RootHash(arr))
    }
}
