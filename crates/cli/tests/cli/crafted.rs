//! Crafted compressed images whose indexes lie about sizes: a pcluster far
//! larger than the format allows, and an extent that claims to decode to
//! hundreds of MiB from one block. Each must give one clean error line and
//! exit code 1 while the process stays small.

use std::io::Write;
use std::sync::Arc;

use crate::common::*;

/// Where the full (legacy) lcluster indexes of `path` in `image` start, and
/// the inode's own position.
fn full_index_start(data: &[u8], path: &[u8]) -> (usize, usize) {
    let image = erofs::Image::open(Arc::new(data.to_vec())).unwrap();
    let inode = image.resolve(path).unwrap();
    assert_eq!(inode.layout, erofs::DataLayout::CompressedFull);
    assert!(!inode.extended);
    let (in_mbox, iloc) = inode.location();
    assert!(!in_mbox);
    let header = (iloc + 32 + inode.xattr_body_size()).next_multiple_of(8);
    (header as usize + 16, iloc as usize)
}

fn put16(d: &mut [u8], at: usize, v: u16) {
    d[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Run `immount cat` on a crafted image under /usr/bin/time; return the
/// exit code, stderr and the peak RSS in KiB.
fn cat_with_rss(data: &[u8], path: &str) -> (i32, String, u64) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(data).unwrap();
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "RSS_KB=%M", env!("CARGO_BIN_EXE_immount"), "cat"])
        .arg(f.path())
        .arg(path)
        .stdout(std::process::Stdio::null())
        .output()
        .expect("run /usr/bin/time (package time)");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let rss = err
        .lines()
        .find_map(|l| l.strip_prefix("RSS_KB="))
        .and_then(|v| v.trim().parse().ok())
        .expect("peak RSS from /usr/bin/time");
    let msg: String = err
        .lines()
        .filter(|l| !l.starts_with("RSS_KB=") && !l.starts_with("Command exited"))
        .collect::<Vec<_>>()
        .join("\n");
    (out.status.code().unwrap_or(-1), msg, rss)
}

const FILE: &str = "/big/text-1m5";
const RSS_LIMIT_KB: u64 = 64 * 1024;

#[test]
fn huge_pcluster_claim_is_a_clean_error() {
    let mut data = std::fs::read(corpus().join("legacy.erofs")).unwrap();
    let (idx, _) = full_index_start(&data, FILE.as_bytes());
    // Turn on big pclusters in the map header and make lcluster 1 claim
    // that the pcluster of lcluster 0 spans 2000 blocks (8 MiB > 1 MiB).
    let header = idx - 16;
    let advise = u16::from_le_bytes([data[header + 4], data[header + 5]]) | 0x0002;
    put16(&mut data, header + 4, advise);
    put16(&mut data, idx + 8, 2); // NONHEAD
    put16(&mut data, idx + 8 + 4, (1 << 11) | 2000); // D0_CBLKCNT | blocks
    put16(&mut data, idx + 8 + 6, 1);
    let (code, err, rss) = cat_with_rss(&data, FILE);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("pcluster of 2000 blocks") && err.contains("nid"),
        "{err}"
    );
    assert!(rss < RSS_LIMIT_KB, "peak RSS {rss} KiB");
}

#[test]
fn absurd_decoded_length_is_a_clean_error() {
    let mut data = std::fs::read(corpus().join("legacy.erofs")).unwrap();
    let (idx, iloc) = full_index_start(&data, FILE.as_bytes());
    // A 3.75 GiB file whose first extent continues for 65535 lclusters
    // (256 MiB from one 4 KiB pcluster).
    data[iloc + 8..iloc + 12].copy_from_slice(&0xF000_0000u32.to_le_bytes());
    put16(&mut data, idx + 8, 2); // NONHEAD
    put16(&mut data, idx + 8 + 4, 1); // delta[0]: head is one back
    put16(&mut data, idx + 8 + 6, 0xffff); // delta[1]: next head far ahead
    let (code, err, rss) = cat_with_rss(&data, FILE);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("more than 12 MiB"), "{err}");
    assert!(rss < RSS_LIMIT_KB, "peak RSS {rss} KiB");
}

#[test]
fn a_valid_big_file_reads_in_bounded_memory() {
    // The control: the real file decodes and the process stays small too.
    let data = std::fs::read(corpus().join("lz4hc-big.erofs")).unwrap();
    let (code, err, rss) = cat_with_rss(&data, FILE);
    assert_eq!(code, 0, "{err}");
    assert!(rss < RSS_LIMIT_KB, "peak RSS {rss} KiB");
}
