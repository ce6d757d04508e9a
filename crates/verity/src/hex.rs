//! Lowercase hex, as veritysetup prints root hashes and salts.

use crate::{Error, Result};

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Bytes from hex (either case); `what` names the value in the error.
pub fn decode(text: &str, what: &str) -> Result<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return Err(Error::invalid(format!(
            "{what} is not hex: odd number of digits ({})",
            text.len()
        )));
    }
    let nibble = |c: u8| -> Result<u8> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(Error::invalid(format!(
                "{what} is not hex: unexpected character {:?}",
                char::from(c)
            ))),
        }
    };
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Ok((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        assert_eq!(encode(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(decode(" 00ABff\n", "x").unwrap(), vec![0, 0xab, 0xff]);
        assert!(decode("abc", "x").is_err());
        assert!(decode("zz", "x").is_err());
        assert_eq!(decode("", "x").unwrap(), Vec::<u8>::new());
    }
}
