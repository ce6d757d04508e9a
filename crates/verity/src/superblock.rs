//! The 512-byte superblock that `veritysetup format` puts in front of the
//! hash tree (cryptsetup's "VERITY" header, version 1).
//!
//! ```text
//! offset size field
//!      0    8 signature "verity\0\0"
//!      8    4 version (1)
//!     12    4 hash_type (1: salt prepended, digests padded to a power of two)
//!     16   16 uuid
//!     32   32 algorithm name, NUL padded ("sha256")
//!     64    4 data_block_size
//!     68    4 hash_block_size
//!     72    8 data_blocks
//!     80    2 salt_size
//!     82    6 padding
//!     88  256 salt
//!    344  168 padding
//! ```
//!
//! All integers are little-endian. The superblock is not covered by the
//! root hash: every field that shapes the tree (sizes, salt) changes the root
//! hash when altered, and the uuid is informational only.

use crate::geometry::VerityParams;
use crate::{Error, Result};

/// Size of the on-disk superblock.
pub const SUPERBLOCK_SIZE: usize = 512;
/// The first 8 bytes of a superblock.
pub const SIGNATURE: &[u8; 8] = b"verity\0\0";
/// Largest salt the superblock can hold.
pub const MAX_SALT_SIZE: usize = 256;
const ALGORITHM: &[u8] = b"sha256";

/// A decoded superblock: the tree parameters plus the uuid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Parameters that determine the tree.
    pub params: VerityParams,
    /// Random identifier of the hash device (not covered by the root hash).
    pub uuid: [u8; 16],
}

fn le32(b: &[u8; SUPERBLOCK_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Superblock {
    /// Decode and validate a superblock.
    pub fn parse(raw: &[u8; SUPERBLOCK_SIZE]) -> Result<Self> {
        if &raw[0..8] != SIGNATURE {
            return Err(Error::invalid("no verity superblock (bad signature)"));
        }
        let version = le32(raw, 8);
        if version != 1 {
            return Err(Error::Unsupported(format!(
                "verity superblock version {version}"
            )));
        }
        let hash_type = le32(raw, 12);
        if hash_type != 1 {
            return Err(Error::Unsupported(format!(
                "verity hash type {hash_type} (only type 1 is supported)"
            )));
        }
        let alg = &raw[32..64];
        let name_len = alg.iter().position(|&c| c == 0).unwrap_or(alg.len());
        if &alg[..name_len] != ALGORITHM || alg[name_len..].iter().any(|&c| c != 0) {
            return Err(Error::Unsupported(format!(
                "verity hash algorithm {:?} (only sha256 is supported)",
                String::from_utf8_lossy(&alg[..name_len])
            )));
        }
        let data_blocks = u64::from_le_bytes([
            raw[72], raw[73], raw[74], raw[75], raw[76], raw[77], raw[78], raw[79],
        ]);
        let salt_size = usize::from(u16::from_le_bytes([raw[80], raw[81]]));
        if salt_size > MAX_SALT_SIZE {
            return Err(Error::invalid(format!(
                "verity superblock salt size {salt_size} exceeds {MAX_SALT_SIZE}"
            )));
        }
        let params = VerityParams {
            data_block_size: le32(raw, 64),
            hash_block_size: le32(raw, 68),
            data_blocks,
            salt: raw[88..88 + salt_size].to_vec(),
        };
        params.validate()?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&raw[16..32]);
        Ok(Superblock { params, uuid })
    }

    /// Encode exactly as cryptsetup does (zeroed padding).
    pub fn to_bytes(&self) -> Result<[u8; SUPERBLOCK_SIZE]> {
        self.params.validate()?;
        let p = &self.params;
        let salt_size = u16::try_from(p.salt.len())
            .ok()
            .filter(|&n| usize::from(n) <= MAX_SALT_SIZE)
            .ok_or_else(|| Error::invalid("salt longer than 256 bytes"))?;
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        raw[0..8].copy_from_slice(SIGNATURE);
        raw[8..12].copy_from_slice(&1u32.to_le_bytes());
        raw[12..16].copy_from_slice(&1u32.to_le_bytes());
        raw[16..32].copy_from_slice(&self.uuid);
        raw[32..32 + ALGORITHM.len()].copy_from_slice(ALGORITHM);
        raw[64..68].copy_from_slice(&p.data_block_size.to_le_bytes());
        raw[68..72].copy_from_slice(&p.hash_block_size.to_le_bytes());
        raw[72..80].copy_from_slice(&p.data_blocks.to_le_bytes());
        raw[80..82].copy_from_slice(&salt_size.to_le_bytes());
        raw[88..88 + p.salt.len()].copy_from_slice(&p.salt);
        Ok(raw)
    }

    /// The uuid in the usual 8-4-4-4-12 text form.
    pub fn uuid_string(&self) -> String {
        let h = crate::hex::encode(&self.uuid);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// A fresh random version-4 uuid, as veritysetup makes for each tree.
pub fn random_uuid() -> Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    getrandom::getrandom(&mut uuid)
        .map_err(|e| Error::io("reading random bytes", std::io::Error::other(e)))?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            params: VerityParams {
                data_block_size: 4096,
                hash_block_size: 4096,
                data_blocks: 1453,
                salt: vec![0xab; 32],
            },
            uuid: [7; 16],
        }
    }

    #[test]
    fn round_trips() {
        let sb = sample();
        let raw = sb.to_bytes().unwrap();
        assert_eq!(&raw[0..8], SIGNATURE);
        assert_eq!(Superblock::parse(&raw).unwrap(), sb);
    }

    #[test]
    fn rejects_hostile_fields() {
        let good = sample().to_bytes().unwrap();
        // (offset, new byte) pairs that must each be refused.
        for (at, byte) in [
            (0, b'V'),
            (8, 2),
            (12, 0),
            (32, b'S'),
            (38, b'x'),
            (65, 0x11), // data block size not a power of two
            (70, 0x10), // hash block size 1 MiB + 4 KiB
            (81, 0x02), // salt size 512
        ] {
            let mut raw = good;
            raw[at] = byte;
            assert!(Superblock::parse(&raw).is_err(), "byte {at} = {byte}");
        }
        let mut zero_blocks = good;
        zero_blocks[72..80].fill(0);
        assert!(Superblock::parse(&zero_blocks).is_err());
    }

    /// Random bytes behind a valid signature parse or fail, never panic.
    #[test]
    fn random_superblocks_never_panic() {
        let mut x = 0x0dd_ba11_cafe_f00du64;
        let good = sample().to_bytes().unwrap();
        for round in 0..5_000 {
            let mut raw = good;
            // Randomise a few fields, keeping the signature most of the time.
            for _ in 0..(1 + round % 8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % SUPERBLOCK_SIZE as u64) as usize;
                raw[at] = (x >> 32) as u8;
            }
            if let Ok(sb) = Superblock::parse(&raw) {
                assert!(sb.params.validate().is_ok());
                let _ = crate::Geometry::new(sb.params, 0, true);
            }
        }
    }
}
