//! The FUSE wire protocol: the subset of `include/uapi/linux/fuse.h` that a
//! read-only filesystem speaks, parsed with checked bounds.
//!
//! Structures travel in the host's byte order. Requests are parsed by a
//! cursor that fails on a short buffer instead of slicing blindly; replies
//! are built by appending fields to a `Vec<u8>`, so their layout reads like
//! the C structs they mirror.

/// The protocol major version we speak.
pub const KERNEL_VERSION: u32 = 7;
/// The protocol minor version we reply with: 7.31 has everything we use
/// (max_pages 7.28, CACHE_SYMLINKS 7.28, NO_OPENDIR_SUPPORT 7.29).
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// The node id the kernel uses for the root directory.
pub const ROOT_ID: u64 = 1;

/// Request opcodes (`enum fuse_opcode`).
#[allow(missing_docs)]
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;

    /// The name of an opcode, for logs and request counts.
    pub fn name(op: u32) -> String {
        let known = match op {
            LOOKUP => "LOOKUP",
            FORGET => "FORGET",
            GETATTR => "GETATTR",
            SETATTR => "SETATTR",
            READLINK => "READLINK",
            OPEN => "OPEN",
            READ => "READ",
            STATFS => "STATFS",
            RELEASE => "RELEASE",
            FLUSH => "FLUSH",
            GETXATTR => "GETXATTR",
            LISTXATTR => "LISTXATTR",
            INIT => "INIT",
            OPENDIR => "OPENDIR",
            READDIR => "READDIR",
            RELEASEDIR => "RELEASEDIR",
            ACCESS => "ACCESS",
            INTERRUPT => "INTERRUPT",
            DESTROY => "DESTROY",
            BATCH_FORGET => "BATCH_FORGET",
            READDIRPLUS => "READDIRPLUS",
            LSEEK => "LSEEK",
            _ => return format!("op{op}"),
        };
        known.to_owned()
    }
}

/// `FUSE_INIT` flags (`fuse_init_in.flags` / `fuse_init_out.flags`).
#[allow(missing_docs)]
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const NO_OPEN_SUPPORT: u32 = 1 << 17;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const POSIX_ACL: u32 = 1 << 20;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u32 = 1 << 24;
}

/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER_LEN: usize = 16;
/// `sizeof(struct fuse_attr)`.
pub const ATTR_LEN: usize = 88;
/// `sizeof(struct fuse_entry_out)`.
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// `offsetof(struct fuse_dirent, name)`.
pub const DIRENT_NAME_OFFSET: usize = 24;

/// A request had fewer bytes than its opcode needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// A bounds-checked reader over the bytes of one request.
#[derive(Debug, Clone, Copy)]
pub struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes }
    }

    /// Take the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if n > self.bytes.len() {
            return Err(Truncated);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    /// Take a native-endian u32.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        let b = self.take(4)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Take a native-endian u64.
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_ne_bytes(a))
    }

    /// Take a NUL-terminated string (without its NUL). A name with no NUL
    /// in the remaining bytes is malformed.
    pub fn cstr(&mut self) -> Result<&'a [u8], Truncated> {
        let end = self.bytes.iter().position(|&b| b == 0).ok_or(Truncated)?;
        let s = self.take(end)?;
        self.take(1)?;
        Ok(s)
    }

    /// The bytes not yet taken.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }
}

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    /// Total length of the request, header included.
    pub len: u32,
    /// What is asked.
    pub opcode: u32,
    /// The id to answer with.
    pub unique: u64,
    /// The node the request is about.
    pub nodeid: u64,
    /// Caller's uid (in the connection's user namespace).
    pub uid: u32,
    /// Caller's gid.
    pub gid: u32,
    /// Caller's pid.
    pub pid: u32,
}

impl InHeader {
    /// Parse the header of a request of `total` bytes and check that its
    /// length field agrees with what the device returned.
    pub fn parse(buf: &[u8]) -> Result<(InHeader, &[u8]), Truncated> {
        let mut c = Cursor::new(buf);
        let h = InHeader {
            len: c.u32()?,
            opcode: c.u32()?,
            unique: c.u64()?,
            nodeid: c.u64()?,
            uid: c.u32()?,
            gid: c.u32()?,
            pid: c.u32()?,
        };
        c.u32()?; // padding
        if usize::try_from(h.len).ok() != Some(buf.len()) {
            return Err(Truncated);
        }
        Ok((h, c.rest()))
    }
}

/// Append a native-endian u32.
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_ne_bytes());
}

/// Append a native-endian u64.
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_ne_bytes());
}

/// The attributes of one node, as `struct fuse_attr` carries them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    /// Inode number shown in `st_ino`.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Size in 512-byte units.
    pub blocks: u64,
    /// Seconds since the epoch (atime, mtime and ctime are the same).
    pub mtime: i64,
    /// Nanoseconds of the mtime.
    pub mtime_nsec: u32,
    /// Full `st_mode`, type bits included.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number, in the kernel's `new_encode_dev` layout.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

impl Attr {
    /// Append this as a `struct fuse_attr`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.ino);
        put_u64(out, self.size);
        put_u64(out, self.blocks);
        // The wire carries seconds as u64; the kernel reads them back as a
        // signed time64_t, so a pre-1970 time round-trips as its bit pattern.
        let secs = self.mtime as u64;
        put_u64(out, secs); // atime
        put_u64(out, secs); // mtime
        put_u64(out, secs); // ctime
        put_u32(out, self.mtime_nsec);
        put_u32(out, self.mtime_nsec);
        put_u32(out, self.mtime_nsec);
        put_u32(out, self.mode);
        put_u32(out, self.nlink);
        put_u32(out, self.uid);
        put_u32(out, self.gid);
        put_u32(out, self.rdev);
        put_u32(out, self.blksize);
        put_u32(out, 0); // flags
    }
}

/// Append a `struct fuse_entry_out`: `nodeid` 0 with a timeout is a cached
/// negative entry.
pub fn encode_entry(out: &mut Vec<u8>, nodeid: u64, attr: &Attr, timeout: u64) {
    put_u64(out, nodeid);
    put_u64(out, 0); // generation: node ids are never reused
    put_u64(out, timeout); // entry_valid
    put_u64(out, timeout); // attr_valid
    put_u32(out, 0);
    put_u32(out, 0);
    attr.encode(out);
}

/// The size of one `fuse_dirent` (or, with `plus`, `fuse_direntplus`)
/// holding a name of `name_len` bytes, padded to 8 bytes.
pub fn dirent_size(name_len: usize, plus: bool) -> usize {
    let base = if plus { ENTRY_OUT_LEN } else { 0 } + DIRENT_NAME_OFFSET + name_len;
    (base + 7) & !7
}

/// Append a `struct fuse_dirent` with its name and padding.
pub fn encode_dirent(out: &mut Vec<u8>, ino: u64, next_offset: u64, dtype: u32, name: &[u8]) {
    put_u64(out, ino);
    put_u64(out, next_offset);
    put_u32(out, name.len() as u32); // names are at most 255 bytes
    put_u32(out, dtype);
    out.extend_from_slice(name);
    let padded = (out.len() + 7) & !7;
    out.resize(padded, 0);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_header() {
        let mut v = Vec::new();
        Attr::default().encode(&mut v);
        assert_eq!(v.len(), ATTR_LEN);
        v.clear();
        encode_entry(&mut v, 1, &Attr::default(), 0);
        assert_eq!(v.len(), ENTRY_OUT_LEN);
        v.clear();
        encode_dirent(&mut v, 1, 2, 4, b"abc");
        assert_eq!(v.len(), dirent_size(3, false));
        assert_eq!(v.len(), 32);
    }

    #[test]
    fn cursor_refuses_short_input() {
        let mut c = Cursor::new(&[1, 0, 0]);
        assert_eq!(c.u32(), Err(Truncated));
        let mut c = Cursor::new(b"abc");
        assert_eq!(c.cstr(), Err(Truncated));
        let mut c = Cursor::new(b"abc\0rest");
        assert_eq!(c.cstr(), Ok(&b"abc"[..]));
        assert_eq!(c.rest(), b"rest");
    }

    #[test]
    fn header_length_must_match() {
        let mut buf = Vec::new();
        put_u32(&mut buf, 41);
        buf.resize(IN_HEADER_LEN, 0);
        assert!(InHeader::parse(&buf).is_err());
        buf[0] = 40;
        let (h, rest) = InHeader::parse(&buf).unwrap();
        assert_eq!(h.len, 40);
        assert!(rest.is_empty());
    }
}
