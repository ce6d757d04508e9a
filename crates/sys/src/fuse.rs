//! Syscalls that the FUSE server needs (mounting, /dev/fuse clones).
