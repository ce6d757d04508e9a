//! Syscalls that the sandbox needs (identity, namespaces, limits).
