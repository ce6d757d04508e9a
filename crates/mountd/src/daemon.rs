//! The daemon: accepts varlink connections, decides each MountImage by
//! policy, makes the FUSE mount, starts a sandboxed server for it and hands
//! the mount to the caller (flow a) or attaches it on the caller's directory
//! (flow b). It never reads image content beyond hashing it for the log.
//!
//! One thread per connection (at most [`DaemonConfig::max_connections`],
//! each with an idle timeout) and one reaper thread per live server, which
//! frees the caller's mount slot when the server exits and, if the server
//! died with its mount still attached, detaches that mount.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64ct::Encoding;
use immount_sys::mountd::{self as sys, PeerCred};
use rustix::fs::OFlags;
use serde_json::{json, Map, Value};
use sha2::Digest;

use crate::interface;
use crate::policy::{Applied, Class, Flow, Ids, Policy, Wanted};
use crate::server::{self, ServerConfig};
use crate::varlink::{self, Call, Connection, Params, ReadError, VarlinkError};

/// How long a server may take to open its image and answer INIT.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest signature accepted (base64 text).
const MAX_SIGNATURE_TEXT: usize = 64 * 1024;
/// The readahead given to a mount, as `immount mount` does as root.
const READAHEAD_KIB: u32 = 1024;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where to listen when not socket-activated.
    pub socket: PathBuf,
    /// The policy.
    pub policy: Policy,
    /// The program to start servers with (`immountd` itself).
    pub server_exe: PathBuf,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
}

impl DaemonConfig {
    /// Defaults around `socket`, `policy` and `server_exe`.
    pub fn new(socket: PathBuf, policy: Policy, server_exe: PathBuf) -> Self {
        DaemonConfig {
            socket,
            policy,
            server_exe,
            max_connections: 256,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A failure to start the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Setting up the listening socket failed.
    #[error("{0}: {1}")]
    Listen(String, io::Error),
}

struct State {
    config: DaemonConfig,
    /// Live mounts per (uid, class).
    mounts: Mutex<HashMap<(u32, &'static str), usize>>,
    connections: AtomicUsize,
}

/// Write one log line to stderr (the journal under systemd).
fn log(line: &str) {
    eprintln!("immountd: {line}");
}

/// Listen and serve forever (until the process is killed).
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    let listener = listen(&config.socket)?;
    log(&format!(
        "listening on {}; unsigned: {}, signed: {}",
        config.socket.display(),
        describe_class(&config.policy, Class::Unsigned),
        describe_class(&config.policy, Class::Signed),
    ));
    serve(listener, config);
    Ok(())
}

fn describe_class(policy: &Policy, class: Class) -> String {
    let c = policy.class(class);
    if !c.allowed {
        return "refused".into();
    }
    let flows: Vec<&str> = c.flows.iter().map(|f| f.name()).collect();
    format!(
        "flows={} ids={} max={} mem={}MiB",
        flows.join("+"),
        if c.ids == Ids::Kept { "kept" } else { "caller" },
        c.max_mounts_per_user,
        c.server_memory >> 20
    )
}

/// The socket systemd passed (`LISTEN_FDS`), else a new one at `path`,
/// connectable by everyone (the policy decides, not the file mode).
fn listen(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |what: &str, e| DaemonError::Listen(format!("{what} {}", path.display()), e);
    let mut passed = sys::listen_fds().map_err(|e| err("LISTEN_FDS for", e))?;
    if !passed.is_empty() {
        return Ok(UnixListener::from(passed.swap_remove(0)));
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| err("creating the directory of", e))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    // A socket left by an earlier run; anything else is not ours to remove.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| err("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| err("chmod", e))?;
    Ok(listener)
}

/// Serve connections from `listener` forever.
pub fn serve(listener: UnixListener, config: DaemonConfig) {
    let state = Arc::new(State {
        config,
        mounts: Mutex::new(HashMap::new()),
        connections: AtomicUsize::new(0),
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let busy = state.connections.fetch_add(1, Ordering::SeqCst);
        if busy >= state.config.max_connections {
            state.connections.fetch_sub(1, Ordering::SeqCst);
            log("too many connections: one refused");
            continue;
        }
        let st = Arc::clone(&state);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                handle_connection(&st, stream);
                st.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            state.connections.fetch_sub(1, Ordering::SeqCst);
            log("cannot start a thread: one connection refused");
        }
    }
}

fn handle_connection(state: &Arc<State>, stream: UnixStream) {
    let Ok(peer) = sys::peer_credentials(stream.as_fd()) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(state.config.idle_timeout));
    let _ = stream.set_write_timeout(Some(state.config.idle_timeout));
    let mut conn = Connection::new(stream);
    loop {
        let msg = match conn.read_message() {
            Ok(m) => m,
            Err(ReadError::Closed) => return,
            Err(e) => {
                log(&format!(
                    "uid={} pid={}: connection dropped: {e}",
                    peer.uid, peer.pid
                ));
                return;
            }
        };
        let call = match Call::parse(&msg.json) {
            Ok(c) => c,
            Err(Some(e)) => {
                if conn.send(&e.to_reply(), &[]).is_err() {
                    return;
                }
                continue;
            }
            Err(None) => {
                log(&format!(
                    "uid={} pid={}: connection dropped: not a JSON object",
                    peer.uid, peer.pid
                ));
                return;
            }
        };
        let (reply, fd) = match dispatch(state, peer, call.clone(), msg.fds) {
            Ok((params, fd)) => (varlink::reply(params), fd),
            Err(e) => (e.to_reply(), None),
        };
        if call.oneway {
            continue;
        }
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(AsFd::as_fd).collect();
        if let Err(e) = conn.send(&reply, &fds) {
            // The caller is gone; a mount fd not delivered is closed here,
            // which destroys the detached mount and ends its server.
            log(&format!(
                "uid={} pid={}: reply lost: {e}",
                peer.uid, peer.pid
            ));
            return;
        }
    }
}

type Reply = (Map<String, Value>, Option<OwnedFd>);

fn dispatch(
    state: &Arc<State>,
    peer: PeerCred,
    call: Call,
    fds: Vec<OwnedFd>,
) -> Result<Reply, VarlinkError> {
    let no_fds = |fds: &Vec<OwnedFd>| {
        if fds.is_empty() {
            Ok(())
        } else {
            Err(bad_fd("this method takes no file descriptors"))
        }
    };
    match call.method.as_str() {
        "org.varlink.service.GetInfo" => {
            no_fds(&fds)?;
            Params::new(call.parameters).finish()?;
            let Value::Object(m) = json!({
                "vendor": "immount",
                "product": "immountd",
                "version": env!("CARGO_PKG_VERSION"),
                "url": "https://example.invalid/immount",
                "interfaces": [interface::SERVICE_INTERFACE, interface::MOUNT_INTERFACE],
            }) else {
                unreachable!("a JSON object literal")
            };
            Ok((m, None))
        }
        "org.varlink.service.GetInterfaceDescription" => {
            no_fds(&fds)?;
            let mut p = Params::new(call.parameters);
            let name = p
                .opt_string("interface", 256)?
                .ok_or_else(|| VarlinkError::invalid_parameter("interface"))?;
            p.finish()?;
            let text = interface::description(&name)
                .ok_or_else(|| VarlinkError::interface_not_found(&name))?;
            let mut m = Map::new();
            m.insert("description".into(), Value::String(text.into()));
            Ok((m, None))
        }
        "io.immount.Mount.MountImage" => mount_image(state, peer, call.parameters, fds),
        other => {
            let iface = call.interface();
            if interface::description(iface).is_some() {
                Err(VarlinkError::method_not_found(other))
            } else {
                Err(VarlinkError::interface_not_found(iface))
            }
        }
    }
}

fn err(name: &str, reason: impl Into<String>) -> VarlinkError {
    VarlinkError::new(&format!("io.immount.Mount.{name}"), "reason", reason)
}

fn bad_fd(reason: impl Into<String>) -> VarlinkError {
    err("BadFileDescriptor", reason)
}

/// The descriptors of one call, each to be claimed once by index.
struct FdTable(Vec<Option<OwnedFd>>);

impl FdTable {
    fn take(&mut self, index: Option<u64>, what: &str) -> Result<Option<OwnedFd>, VarlinkError> {
        let Some(i) = index else { return Ok(None) };
        usize::try_from(i)
            .ok()
            .and_then(|i| self.0.get_mut(i))
            .and_then(Option::take)
            .map(Some)
            .ok_or_else(|| {
                bad_fd(format!(
                    "{what}: no descriptor {i} was sent (or it is used twice)"
                ))
            })
    }

    fn finish(self) -> Result<(), VarlinkError> {
        let unused = self.0.iter().filter(|f| f.is_some()).count();
        if unused > 0 {
            return Err(bad_fd(format!(
                "{unused} descriptor(s) sent but not named by a parameter"
            )));
        }
        Ok(())
    }
}

/// A readable regular file, not `O_PATH`: what the caller could open.
fn check_readable_file(fd: &OwnedFd, what: &str) -> Result<(), VarlinkError> {
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|e| bad_fd(format!("{what}: {e}")))?;
    if flags.contains(OFlags::PATH) || flags.contains(OFlags::WRONLY) {
        return Err(bad_fd(format!("{what}: not open for reading")));
    }
    let st = rustix::fs::fstat(fd).map_err(|e| bad_fd(format!("{what}: {e}")))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(bad_fd(format!("{what}: not a regular file")));
    }
    Ok(())
}

/// Fields of one decision's log line, filled in as they become known.
struct Decision {
    peer: PeerCred,
    flow: Option<Flow>,
    identity: Option<String>,
    class: Option<Class>,
    signer: Option<String>,
    options: Option<String>,
}

impl Decision {
    fn log(&self, result: &str) {
        let mut line = format!(
            "mount uid={} gid={} pid={}",
            self.peer.uid, self.peer.gid, self.peer.pid
        );
        let field = |line: &mut String, k: &str, v: &Option<String>| {
            line.push_str(&format!(" {k}={}", v.as_deref().unwrap_or("-")));
        };
        field(&mut line, "flow", &self.flow.map(|f| f.name().to_owned()));
        field(&mut line, "image", &self.identity);
        field(&mut line, "class", &self.class.map(|c| c.name().to_owned()));
        if let Some(s) = &self.signer {
            line.push_str(&format!(" signer={s:?}"));
        }
        field(&mut line, "options", &self.options);
        line.push_str(&format!(" result={result}"));
        log(&line);
    }
}

fn mount_image(
    state: &Arc<State>,
    peer: PeerCred,
    params: Map<String, Value>,
    fds: Vec<OwnedFd>,
) -> Result<Reply, VarlinkError> {
    let mut decision = Decision {
        peer,
        flow: None,
        identity: None,
        class: None,
        signer: None,
        options: None,
    };
    let result = mount_image_inner(state, &mut decision, params, fds);
    match &result {
        Ok(_) => decision.log("ok"),
        Err(e) => decision.log(&format!("refused ({e})")),
    }
    result
}

fn mount_image_inner(
    state: &Arc<State>,
    d: &mut Decision,
    params: Map<String, Value>,
    fds: Vec<OwnedFd>,
) -> Result<Reply, VarlinkError> {
    let peer = d.peer;
    let mut p = Params::new(params);
    let image_index = p.u64("imageFileDescriptor")?;
    let userns_index = p.opt_u64("userNamespaceFileDescriptor")?;
    let dir_index = p.opt_u64("directoryFileDescriptor")?;
    let verity_index = p.opt_u64("verityDataFileDescriptor")?;
    let hash_offset = p.opt_u64("verityHashOffset")?;
    let root_hash = p.opt_string("rootHash", 256)?;
    let signature = p.opt_string("rootHashSignature", MAX_SIGNATURE_TEXT)?;
    let options = p.opt_strings("options", 16, 64)?;
    p.finish()?;
    let wanted = Wanted::parse(&options).map_err(|_| VarlinkError::invalid_parameter("options"))?;

    let mut table = FdTable(fds.into_iter().map(Some).collect());
    let image = table
        .take(Some(image_index), "imageFileDescriptor")?
        .ok_or_else(|| bad_fd("imageFileDescriptor"))?;
    let userns = table.take(userns_index, "userNamespaceFileDescriptor")?;
    let dir = table.take(dir_index, "directoryFileDescriptor")?;
    let verity = table.take(verity_index, "verityDataFileDescriptor")?;
    table.finish()?;
    check_readable_file(&image, "imageFileDescriptor")?;
    if let Some(v) = &verity {
        check_readable_file(v, "verityDataFileDescriptor")?;
    }

    // Which flow, and may this caller use that target?
    let flow = match (&userns, &dir) {
        (Some(_), Some(_)) => {
            return Err(VarlinkError::invalid_parameter("directoryFileDescriptor"))
        }
        (None, None) => {
            return Err(VarlinkError::invalid_parameter(
                "userNamespaceFileDescriptor",
            ))
        }
        (Some(ns), None) => {
            let owner = sys::user_namespace_owner(ns.as_fd()).map_err(|e| {
                bad_fd(format!(
                    "userNamespaceFileDescriptor: not a user namespace ({e})"
                ))
            })?;
            if owner != peer.uid && peer.uid != 0 {
                d.flow = Some(Flow::Namespace);
                return Err(err("Denied", "the user namespace is not the caller's"));
            }
            Flow::Namespace
        }
        (None, Some(dir)) => {
            let st = rustix::fs::fstat(dir)
                .map_err(|e| bad_fd(format!("directoryFileDescriptor: {e}")))?;
            d.flow = Some(Flow::Directory);
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
                return Err(bad_fd("directoryFileDescriptor: not a directory"));
            }
            if st.st_uid != peer.uid && peer.uid != 0 {
                return Err(err("Denied", "the caller does not own the directory"));
            }
            Flow::Directory
        }
    };
    d.flow = Some(flow);

    // Trust class and identity. The daemon checks the signature over the
    // root hash; the server checks every block against the root hash.
    let root = match &root_hash {
        Some(text) => Some(
            text.parse::<verity::RootHash>()
                .map_err(|_| VarlinkError::invalid_parameter("rootHash"))?,
        ),
        None => None,
    };
    if root.is_none() && (verity.is_some() || signature.is_some() || hash_offset.is_some()) {
        return Err(err(
            "VerityFailure",
            "verity data or signature given without rootHash",
        ));
    }
    // A rootHash alone means a tree appended to the image (as `immount
    // build --verity` writes): the sandboxed server finds it, since the
    // daemon never reads the image's format.
    let class = match (&root, &signature) {
        (Some(root), Some(sig)) => {
            let sig = base64ct::Base64::decode_vec(sig)
                .map_err(|_| VarlinkError::invalid_parameter("rootHashSignature"))?;
            match check_signature(&state.config.policy, root, &sig) {
                Ok(signer) => {
                    d.signer = Some(signer);
                    Class::Signed
                }
                Err(why) => {
                    d.signer = Some(format!("invalid: {why}"));
                    Class::Unsigned
                }
            }
        }
        _ => Class::Unsigned,
    };
    d.class = Some(class);
    d.identity = Some(match &root {
        Some(r) => format!("verity:{}", r.to_hex()),
        None => image_digest(&image)
            .map_err(|e| bad_fd(format!("imageFileDescriptor: reading failed: {e}")))?,
    });
    let applied = state
        .config
        .policy
        .decide(class, flow, &wanted)
        .map_err(|why| err("Denied", why))?;
    d.options = Some(applied.to_string());

    let slot = Slot::claim(state, peer.uid, &applied)?;
    let mount = make_mount(
        state,
        peer,
        &applied,
        d,
        &image,
        verity.as_ref(),
        root,
        hash_offset,
    )?;
    drop(image);
    drop(verity);
    let (mount_fd, started) = mount;

    let attached = match &dir {
        Some(dir) => match attach(&mount_fd, dir) {
            Ok(at) => Some(at),
            Err(e) => {
                started.kill();
                return Err(err("InternalError", format!("attaching the mount: {e}")));
            }
        },
        None => None,
    };
    let pid = started.child.id();
    let reaper_state = Arc::clone(state);
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reap(reaper_state, started, slot, attached));
    if spawned.is_err() {
        return Err(err("InternalError", "cannot start a thread"));
    }

    let mut reply = Map::new();
    reply.insert("decision".into(), decision_json(&applied, d));
    let fd = match flow {
        Flow::Namespace => {
            reply.insert("mountFileDescriptor".into(), json!(0));
            Some(mount_fd)
        }
        Flow::Directory => None,
    };
    d.options = Some(format!("{} server={pid}", applied));
    Ok((reply, fd))
}

fn decision_json(applied: &Applied, d: &Decision) -> Value {
    json!({
        "class": applied.class.name(),
        "imageIdentity": d.identity.clone().unwrap_or_default(),
        "flow": applied.flow.name(),
        "idsKept": applied.ids == Ids::Kept,
        "allowOther": applied.allow_other,
        "nosuid": applied.nosuid,
        "nodev": applied.nodev,
        "noexec": applied.noexec,
        "serverMemoryLimit": applied.server_memory,
        "options": applied.to_string(),
    })
}

fn check_signature(policy: &Policy, root: &verity::RootHash, sig: &[u8]) -> Result<String, String> {
    let mut why = String::from("no trust directory");
    for dir in &policy.trust_dirs {
        let store = match verity::TrustStore::load_dir(dir) {
            Ok(s) => s,
            Err(e) => {
                why = e.to_string();
                continue;
            }
        };
        match verity::verify_root_hash_signature(sig, root, &store) {
            Ok(signer) => return Ok(signer.subject),
            Err(e) => why = e.to_string(),
        }
    }
    Err(why)
}

/// `sha256:<hex>` of the whole image, read through the caller's descriptor.
fn image_digest(image: &OwnedFd) -> io::Result<String> {
    let file = File::from(image.try_clone()?);
    let mut hasher = sha2::Sha256::new();
    // 64 KiB, not more: each connection thread's malloc arena keeps what
    // it freed, and fifty clients at once must not grow the daemon by
    // fifty megabyte-sized buffers.
    let mut buf = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(format!(
        "sha256:{}",
        verity::hex::encode(&hasher.finalize())
    ))
}

/// One of the caller's mount slots, given back when dropped.
struct Slot {
    state: Arc<State>,
    key: (u32, &'static str),
}

impl Slot {
    fn claim(state: &Arc<State>, uid: u32, applied: &Applied) -> Result<Slot, VarlinkError> {
        let key = (uid, applied.class.name());
        let mut mounts = state.mounts.lock().unwrap_or_else(|p| p.into_inner());
        let n = mounts.entry(key).or_insert(0);
        if *n >= applied.max_mounts {
            let mut e = VarlinkError::new("io.immount.Mount.LimitReached", "limit", "");
            e.parameters
                .insert("limit".into(), json!(applied.max_mounts));
            return Err(e);
        }
        *n += 1;
        Ok(Slot {
            state: Arc::clone(state),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut mounts = self.state.mounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = mounts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                mounts.remove(&self.key);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn make_mount(
    state: &Arc<State>,
    peer: PeerCred,
    applied: &Applied,
    d: &Decision,
    image: &OwnedFd,
    verity: Option<&OwnedFd>,
    root: Option<verity::RootHash>,
    hash_offset: Option<u64>,
) -> Result<(OwnedFd, server::Started), VarlinkError> {
    let internal = |what: &str, e: io::Error| err("InternalError", format!("{what}: {e}"));
    let dev = immount_sys::fuse::open_dev_fuse().map_err(|e| internal("/dev/fuse", e))?;
    let identity = d.identity.as_deref().unwrap_or("image");
    let spec = sys::FuseMountSpec {
        source: format!(
            "immount:{}",
            identity.get(..32.min(identity.len())).unwrap_or("image")
        ),
        user_id: peer.uid,
        group_id: peer.gid,
        allow_other: applied.allow_other,
        nosuid: applied.nosuid,
        nodev: applied.nodev,
        noexec: applied.noexec,
    };
    let mount_fd = sys::fuse_fsmount(dev.as_fd(), &spec).map_err(|e| internal("fsmount", e))?;
    let config = ServerConfig {
        root_hash: root.map(|r| r.to_hex()),
        hash_offset,
        verity_fd: verity.is_some(),
        map_ids_to: (applied.ids == Ids::Caller).then_some((peer.uid, peer.gid)),
        memory_limit: applied.server_memory,
    };
    let mut started = server::start(&state.config.server_exe, &config, &dev, image, verity)
        .map_err(|e| internal("starting the server", e))?;
    // The server holds the connection now; ours would keep it alive past
    // the server's death.
    drop(dev);
    if let Err((code, message)) = started.wait_ready(SERVER_READY_TIMEOUT) {
        started.kill();
        return Err(match code {
            server::CODE_BAD_IMAGE => err("IncompatibleImage", message),
            server::CODE_VERITY => err("VerityFailure", message),
            _ => err("InternalError", message),
        });
    }
    raise_readahead(&mount_fd);
    Ok((mount_fd, started))
}

/// What `immount mount` does as root: FUSE starts a mount's readahead at
/// 128 KiB, while the server answers READs of up to 1 MiB, which serve big
/// files faster. Best effort: a failure leaves the default.
fn raise_readahead(mount: &OwnedFd) {
    // Cached attributes only (DONT_SYNC): the device number needs no
    // request to the server, which must never be able to stall us.
    let Ok(st) = rustix::fs::statx(
        mount,
        "",
        rustix::fs::AtFlags::EMPTY_PATH | rustix::fs::AtFlags::STATX_DONT_SYNC,
        rustix::fs::StatxFlags::empty(),
    ) else {
        return;
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        st.stx_dev_major, st.stx_dev_minor
    );
    let _ = std::fs::write(path, READAHEAD_KIB.to_string());
}

/// Where a mount was attached: the directory's path then, and the mount id.
struct Attached {
    path: PathBuf,
    mount_id: u64,
}

fn attach(mount: &OwnedFd, dir: &OwnedFd) -> io::Result<Attached> {
    // Read before attaching: the path names the directory, then the mount.
    let step =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let path = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(step("reading the directory's path"))?;
    // Asked before attaching; the id stays with the mount.
    let mount_id = mount_id_of_fd(mount.as_raw_fd()).map_err(step("reading fdinfo"))?;
    sys::attach_mount_on_fd(mount.as_fd(), dir.as_fd()).map_err(step("move_mount"))?;
    Ok(Attached { path, mount_id })
}

fn reap(state: Arc<State>, mut started: server::Started, slot: Slot, attached: Option<Attached>) {
    let status = started.child.wait();
    drop(slot);
    let _ = &state;
    let mut line = format!(
        "server {} exited ({})",
        started.child.id(),
        match &status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        }
    );
    // A server that died with its mount still attached leaves a dead mount
    // (ENOTCONN) behind: detach it, if the path still shows that very mount.
    if let Some(at) = attached {
        if mount_is_at(at.mount_id, &at.path) {
            match sys::unmount_detach(&at.path) {
                Ok(()) => line.push_str(&format!("; detached its mount at {}", at.path.display())),
                Err(e) => line.push_str(&format!("; cannot detach {}: {e}", at.path.display())),
            }
        }
    }
    log(&line);
}

/// The id of the mount a descriptor is on, from /proc/self/fdinfo: a
/// `statx` would ask the FUSE filesystem, which refuses the daemon (only
/// the caller may use the mount without allow_other).
fn mount_id_of_fd(fd: std::os::fd::RawFd) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no mnt_id in fdinfo"))
}

/// Whether mount `id` is attached at `path`, per /proc/self/mountinfo (a
/// `stat` of a dead FUSE mount would fail with ENOTCONN).
fn mount_is_at(id: u64, path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mountinfo_escape(&path.to_string_lossy());
    info.lines().any(|l| {
        let mut f = l.split(' ');
        let mid = f.next().and_then(|m| m.parse::<u64>().ok());
        let point = f.nth(3);
        mid == Some(id) && point == Some(want.as_str())
    })
}

/// Paths in mountinfo have space, tab, newline and backslash as octal.
fn mountinfo_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}
