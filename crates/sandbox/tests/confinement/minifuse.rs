//! A minimal FUSE server for the confinement tests: one directory holding
//! one file, `hello`, served from a raw `/dev/fuse` descriptor. It is small
//! on purpose — the point is that serving real kernel requests works under
//! the sandbox's seccomp allowlist, and that a request which drives the
//! server into a forbidden syscall (looking up `crash` opens a socket, as an
//! exploited parser might) kills it in a way the supervisor can explain and
//! clean up after.
//!
//! The structures are those of `<linux/fuse.h>` (protocol 7.31), written
//! out field by field in little-endian order.

use std::fs::File;
use std::io::{self, Read, Write};

/// The content of the one file.
pub const HELLO: &[u8] = b"hello from a confined server\n";

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const ROOT: u64 = 1;
const HELLO_INO: u64 = 2;

/// `sizeof(struct fuse_in_header)`.
const IN_HEADER: usize = 40;

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// `struct fuse_attr` (88 bytes).
fn attr(ino: u64) -> Vec<u8> {
    let (size, mode, nlink) = if ino == ROOT {
        (0u64, 0o040_555u32, 2u32)
    } else {
        (HELLO.len() as u64, 0o100_444u32, 1u32)
    };
    let mut a = Vec::with_capacity(88);
    a.extend_from_slice(&ino.to_le_bytes());
    a.extend_from_slice(&size.to_le_bytes());
    a.extend_from_slice(&size.div_ceil(512).to_le_bytes()); // blocks
    a.extend_from_slice(&[0u8; 24]); // atime, mtime, ctime
    a.extend_from_slice(&[0u8; 12]); // their nanoseconds
    a.extend_from_slice(&mode.to_le_bytes());
    a.extend_from_slice(&nlink.to_le_bytes());
    a.extend_from_slice(&0u32.to_le_bytes()); // uid
    a.extend_from_slice(&0u32.to_le_bytes()); // gid
    a.extend_from_slice(&0u32.to_le_bytes()); // rdev
    a.extend_from_slice(&4096u32.to_le_bytes()); // blksize
    a.extend_from_slice(&0u32.to_le_bytes()); // flags
    a
}

/// `struct fuse_init_out` (64 bytes) for protocol 7.31, no optional flags.
fn init_out() -> Vec<u8> {
    let mut o = Vec::with_capacity(64);
    o.extend_from_slice(&7u32.to_le_bytes()); // major
    o.extend_from_slice(&31u32.to_le_bytes()); // minor
    o.extend_from_slice(&(128u32 * 1024).to_le_bytes()); // max_readahead
    o.extend_from_slice(&0u32.to_le_bytes()); // flags
    o.extend_from_slice(&16u16.to_le_bytes()); // max_background
    o.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
    o.extend_from_slice(&(128u32 * 1024).to_le_bytes()); // max_write
    o.extend_from_slice(&1u32.to_le_bytes()); // time_gran
    o.extend_from_slice(&32u16.to_le_bytes()); // max_pages
    o.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
    o.extend_from_slice(&0u32.to_le_bytes()); // flags2
    o.extend_from_slice(&[0u8; 28]); // unused
    o
}

fn reply(dev: &mut File, unique: u64, error: i32, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(16 + payload.len()).map_err(io::Error::other)?;
    let mut msg = Vec::with_capacity(16 + payload.len());
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(&(-error).to_le_bytes());
    msg.extend_from_slice(&unique.to_le_bytes());
    msg.extend_from_slice(payload);
    dev.write_all(&msg)
}

/// Serves until the filesystem is unmounted; returns the number of requests
/// answered.
pub fn serve(dev: &mut File) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut answered = 0;
    loop {
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            // Unmounted: the connection is gone.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(answered),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let req = &buf[..n];
        let opcode = u32_at(req, 4);
        let unique = u64_at(req, 8);
        let nodeid = u64_at(req, 16);
        let arg = req.get(IN_HEADER..).unwrap_or(&[]);
        match opcode {
            FUSE_INIT => reply(dev, unique, 0, &init_out())?,
            FUSE_LOOKUP => {
                let name = arg.split(|&b| b == 0).next().unwrap_or(&[]);
                if nodeid == ROOT && name == b"hello" {
                    let mut out = Vec::with_capacity(128);
                    out.extend_from_slice(&HELLO_INO.to_le_bytes()); // nodeid
                    out.extend_from_slice(&0u64.to_le_bytes()); // generation
                    out.extend_from_slice(&1u64.to_le_bytes()); // entry_valid
                    out.extend_from_slice(&1u64.to_le_bytes()); // attr_valid
                    out.extend_from_slice(&[0u8; 8]); // their nanoseconds
                    out.extend_from_slice(&attr(HELLO_INO));
                    reply(dev, unique, 0, &out)?;
                } else if nodeid == ROOT && name == b"crash" {
                    // What an exploited parser would try: reach the network.
                    let s = std::net::UdpSocket::bind("127.0.0.1:0");
                    eprintln!("socket() returned: {s:?}");
                    reply(dev, unique, libc::EIO, &[])?;
                } else {
                    reply(dev, unique, libc::ENOENT, &[])?;
                }
            }
            FUSE_GETATTR if nodeid == ROOT || nodeid == HELLO_INO => {
                let mut out = Vec::with_capacity(104);
                out.extend_from_slice(&1u64.to_le_bytes()); // attr_valid
                out.extend_from_slice(&[0u8; 8]); // attr_valid_nsec, dummy
                out.extend_from_slice(&attr(nodeid));
                reply(dev, unique, 0, &out)?;
            }
            FUSE_OPEN | FUSE_OPENDIR => reply(dev, unique, 0, &[0u8; 16])?,
            FUSE_READ if nodeid == HELLO_INO => {
                let offset = usize::try_from(u64_at(arg, 8)).unwrap_or(usize::MAX);
                let size = usize::try_from(u32_at(arg, 16)).unwrap_or(0);
                let start = offset.min(HELLO.len());
                let end = start.saturating_add(size).min(HELLO.len());
                reply(dev, unique, 0, &HELLO[start..end])?;
            }
            FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FLUSH => reply(dev, unique, 0, &[])?,
            FUSE_FORGET | FUSE_BATCH_FORGET => continue,
            FUSE_DESTROY => {
                reply(dev, unique, 0, &[])?;
                return Ok(answered + 1);
            }
            _ => reply(dev, unique, libc::ENOSYS, &[])?,
        }
        answered += 1;
    }
}
