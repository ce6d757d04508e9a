//! The client side: ask immountd to mount an image.
//!
//! - [`mount_via_daemon`]: flow (b), for `immount mount IMAGE DIR` run by a
//!   plain user in the host namespace: the daemon attaches the mount on
//!   `DIR`, which the caller must own.
//! - [`mount_in_own_namespace`]: flow (a), for a caller in its own user and
//!   mount namespace: it receives a detached mount and attaches it itself.
//! - [`mount_fd_via_daemon`]: flow (a) without attaching.
//!
//! The image (and its verity data) are opened here, with the caller's own
//! permissions, and passed as descriptors: the daemon never opens a path
//! for the caller.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use base64ct::Encoding;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::varlink::{Connection, VarlinkError};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/immount/io.immount.Mount";
/// The environment variable that overrides [`DEFAULT_SOCKET`] for clients.
pub const SOCKET_ENV: &str = "IMMOUNT_SOCKET";

/// The socket to use: `explicit` (`--socket`), else `$IMMOUNT_SOCKET`, else
/// [`DEFAULT_SOCKET`].
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_owned();
    }
    match std::env::var_os(SOCKET_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// Whether a daemon socket exists at `socket` (it may still refuse us).
pub fn daemon_available(socket: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket())
}

/// The image to mount and how.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// The EROFS image.
    pub image: PathBuf,
    /// The dm-verity root hash (hex); else the `.roothash` sidecar, if
    /// `sidecars` is set.
    pub root_hash: Option<String>,
    /// The hash tree file; else the `.verity` sidecar.
    pub verity_data: Option<PathBuf>,
    /// Offset of the verity superblock in the tree file (or the image).
    pub hash_offset: Option<u64>,
    /// A PKCS#7 signature of the root hash; else the `.roothash.p7s` sidecar.
    pub signature: Option<PathBuf>,
    /// Options: `noexec`, `allow_other`, `mapids`.
    pub options: Vec<String>,
    /// Look for systemd-style sidecar files next to the image.
    pub sidecars: bool,
}

/// What the daemon decided (the `decision` of the reply).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// `signed` or `unsigned`.
    pub class: String,
    /// `verity:<hex>` or `sha256:<hex>`.
    pub image_identity: String,
    /// `namespace` or `directory`.
    pub flow: String,
    /// Whether the image's owners are kept.
    pub ids_kept: bool,
    /// `allow_other`.
    pub allow_other: bool,
    /// `nosuid`.
    pub nosuid: bool,
    /// `nodev`.
    pub nodev: bool,
    /// `noexec`.
    pub noexec: bool,
    /// The server's memory cap in bytes.
    pub server_memory_limit: u64,
    /// The options applied, comma-separated.
    pub options: String,
}

/// Why a mount through the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A local file or the socket failed.
    #[error("{0}: {1}")]
    Io(String, io::Error),
    /// The daemon refused (its varlink error).
    #[error("immountd: {0}")]
    Daemon(VarlinkError),
    /// The daemon's reply made no sense.
    #[error("immountd: bad reply: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The exit code `immount mount` should use: 1 for an image that
    /// cannot be served (corrupt, bad verity), 2 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Daemon(e)
                if e.name == "io.immount.Mount.IncompatibleImage"
                    || e.name == "io.immount.Mount.VerityFailure" =>
            {
                1
            }
            _ => 2,
        }
    }
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ClientError {
    let what = what.to_string();
    move |e| ClientError::Io(what, e)
}

fn open_read(path: &Path) -> Result<File, ClientError> {
    File::open(path).map_err(io_err(path.display()))
}

/// The sidecar `suffix` of `image`, if it exists.
fn sidecar(image: &Path, suffix: &str) -> Option<PathBuf> {
    let p = verity::policy::sidecar_path(image, suffix);
    p.is_file().then_some(p)
}

/// Descriptors and parameters of a MountImage call, without the target.
struct Prepared {
    params: Map<String, Value>,
    fds: Vec<OwnedFd>,
}

fn prepare(spec: &ImageSpec) -> Result<Prepared, ClientError> {
    let mut params = Map::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let push = |fds: &mut Vec<OwnedFd>, fd: OwnedFd| {
        fds.push(fd);
        Value::from(fds.len() - 1)
    };
    let image = open_read(&spec.image)?;
    params.insert("imageFileDescriptor".into(), push(&mut fds, image.into()));
    let side = |given: &Option<PathBuf>, suffix: &str| {
        given.clone().or_else(|| {
            spec.sidecars
                .then(|| sidecar(&spec.image, suffix))
                .flatten()
        })
    };
    let root_hash = match (&spec.root_hash, side(&None, ".roothash")) {
        (Some(r), _) => Some(r.trim().to_owned()),
        (None, Some(p)) => {
            let text = std::fs::read_to_string(&p).map_err(io_err(p.display()))?;
            Some(text.trim().to_owned())
        }
        (None, None) => None,
    };
    if let Some(root) = root_hash {
        params.insert("rootHash".into(), Value::String(root));
        if let Some(v) = side(&spec.verity_data, ".verity") {
            let f = open_read(&v)?;
            params.insert("verityDataFileDescriptor".into(), push(&mut fds, f.into()));
        }
        if let Some(off) = spec.hash_offset {
            params.insert("verityHashOffset".into(), Value::from(off));
        }
        if let Some(sig) = side(&spec.signature, ".roothash.p7s") {
            let bytes = std::fs::read(&sig).map_err(io_err(sig.display()))?;
            params.insert(
                "rootHashSignature".into(),
                Value::String(base64ct::Base64::encode_string(&bytes)),
            );
        }
    }
    if !spec.options.is_empty() {
        params.insert("options".into(), Value::from(spec.options.clone()));
    }
    Ok(Prepared { params, fds })
}

/// Call MountImage: returns the reply's parameters and the descriptors
/// that came with it.
fn call(
    socket: &Path,
    params: Map<String, Value>,
    fds: &[BorrowedFd<'_>],
) -> Result<(Map<String, Value>, Vec<OwnedFd>), ClientError> {
    let stream = UnixStream::connect(socket).map_err(io_err(socket.display()))?;
    let mut conn = Connection::new(stream);
    let request = serde_json::json!({
        "method": "io.immount.Mount.MountImage",
        "parameters": Value::Object(params),
    });
    conn.send(&request, fds).map_err(io_err(socket.display()))?;
    let msg = conn
        .read_message()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let reply: Value =
        serde_json::from_slice(&msg.json).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let Value::Object(mut reply) = reply else {
        return Err(ClientError::Protocol("not an object".into()));
    };
    let parameters = match reply.remove("parameters") {
        Some(Value::Object(p)) => p,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(ClientError::Protocol("parameters not an object".into())),
    };
    if let Some(name) = reply.remove("error") {
        let name = name.as_str().unwrap_or("?").to_owned();
        return Err(ClientError::Daemon(VarlinkError { name, parameters }));
    }
    Ok((parameters, msg.fds))
}

fn decision(params: &mut Map<String, Value>) -> Result<Decision, ClientError> {
    let d = params
        .remove("decision")
        .ok_or_else(|| ClientError::Protocol("no decision".into()))?;
    serde_json::from_value(d).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Flow (b): mount `spec` on `dir` through the daemon at `socket`. The
/// daemon attaches it only if the caller owns `dir`, always
/// `nosuid,nodev`. Unmount with `fusermount3 -u DIR` (or `immount umount`).
pub fn mount_via_daemon(
    socket: &Path,
    spec: &ImageSpec,
    dir: &Path,
) -> Result<Decision, ClientError> {
    let mut prepared = prepare(spec)?;
    let dir_file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(io_err(dir.display()))?;
    prepared.fds.push(dir_file.into());
    prepared.params.insert(
        "directoryFileDescriptor".into(),
        Value::from(prepared.fds.len() - 1),
    );
    let fds: Vec<BorrowedFd<'_>> = prepared.fds.iter().map(AsFd::as_fd).collect();
    let (mut params, _) = call(socket, prepared.params, &fds)?;
    decision(&mut params)
}

/// Flow (a): ask for a detached mount of `spec` for the caller's user
/// namespace; attach the returned descriptor with `move_mount`.
pub fn mount_fd_via_daemon(
    socket: &Path,
    spec: &ImageSpec,
) -> Result<(OwnedFd, Decision), ClientError> {
    let mut prepared = prepare(spec)?;
    let ns = open_read(Path::new("/proc/self/ns/user"))?;
    prepared.fds.push(ns.into());
    prepared.params.insert(
        "userNamespaceFileDescriptor".into(),
        Value::from(prepared.fds.len() - 1),
    );
    let fds: Vec<BorrowedFd<'_>> = prepared.fds.iter().map(AsFd::as_fd).collect();
    let (mut params, mut got) = call(socket, prepared.params, &fds)?;
    let index = params
        .get("mountFileDescriptor")
        .and_then(Value::as_u64)
        .and_then(|i| usize::try_from(i).ok())
        .filter(|&i| i < got.len())
        .ok_or_else(|| ClientError::Protocol("no mount descriptor".into()))?;
    let fd = got.swap_remove(index);
    Ok((fd, decision(&mut params)?))
}

/// Flow (a) end to end: get the mount and attach it at `dir` in our own
/// mount namespace (needs `CAP_SYS_ADMIN` there, as after `unshare -Urm`).
pub fn mount_in_own_namespace(
    socket: &Path,
    spec: &ImageSpec,
    dir: &Path,
) -> Result<Decision, ClientError> {
    let (fd, decision) = mount_fd_via_daemon(socket, spec)?;
    immount_sys::mountd::attach_mount_at(fd.as_fd(), dir)
        .map_err(io_err(format!("move_mount to {}", dir.display())))?;
    Ok(decision)
}
