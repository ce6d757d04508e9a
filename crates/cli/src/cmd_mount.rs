//! `immount mount` and `immount umount`: the command-line face of the FUSE
//! server (crate `immount-fuse`, lib `fuse`), which does the work.

use std::path::PathBuf;

/// Arguments of `immount mount`.
#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// Stay attached and serve in the foreground (logs go to stderr).
    #[arg(short = 'f', long = "foreground")]
    pub foreground: bool,
    /// Mount options, comma-separated: allow_other, suid, dev, noacl,
    /// lowmem, nopush (no readahead across files), stats (print request
    /// counts at exit), fsname=NAME, threads=N, readahead_kb=N (ro, nosuid,
    /// nodev and default_permissions are implied).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// An extra device of the image (repeat, in the image's device order).
    #[arg(long = "device", value_name = "PATH")]
    pub devices: Vec<PathBuf>,
    /// Serve without the sandbox (for debugging only): the process that
    /// parses the image then keeps every right it was started with.
    #[arg(long = "no-sandbox")]
    pub no_sandbox: bool,
    /// Print what confinement is in place once the mount is ready.
    #[arg(long = "sandbox-report")]
    pub sandbox_report: bool,
    /// Started as root, the server becomes USER (a name or a number) and
    /// GROUP (default: USER's group, or the number USER) with no
    /// supplementary groups; never root. Default: nobody, 65534:65534.
    #[arg(long = "sandbox-user", value_name = "USER[:GROUP]", value_parser = parse_sandbox_user)]
    pub sandbox_user: Option<SandboxUser>,
    /// The most memory the server may allocate (RLIMIT_DATA): a size in
    /// bytes with K, M, G or T (powers of 1024), at least 64M, or
    /// "unlimited". Default: 1G. A server that needs more than this ends,
    /// and its mount goes away.
    #[arg(long = "sandbox-memory", value_name = "SIZE", value_parser = parse_memory_cap)]
    pub sandbox_memory: Option<MemoryCap>,
    /// The socket of immountd, the delegation daemon (default: $IMMOUNT_SOCKET,
    /// else /run/immount/io.immount.Mount). A plain user's mount goes
    /// through the daemon when its socket exists.
    #[arg(long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Never go through immountd; mount with fusermount3 or directly.
    #[arg(long = "no-daemon")]
    pub no_daemon: bool,
    /// dm-verity: check every block before the parser sees it.
    #[command(flatten)]
    pub verity: crate::cmd_verity::VerityArgs,
    /// Append the background server's messages (image faults) to FILE.
    #[arg(long = "log", value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// The EROFS image.
    pub image: PathBuf,
    /// The directory to mount it on.
    pub mountpoint: PathBuf,
}

/// Arguments of `immount umount`.
#[derive(clap::Args, Debug, Clone)]
pub struct UmountArgs {
    /// The mount point to unmount.
    pub mountpoint: PathBuf,
}

/// Mount and serve. Without `-f`, returns once the mount is ready while a
/// background copy of this program serves it. The exit code is 0 when
/// mounted, 1 for an image that cannot be served, 2 for anything else.
pub fn run_mount(args: MountArgs) -> anyhow::Result<i32> {
    let notifier = fuse::daemon::ReadyNotifier::from_env();
    if args.no_sandbox && notifier.is_none() {
        eprintln!("immount: warning: --no-sandbox: the server parses the image unconfined");
    }
    // Said once, by the command the user ran, not by its background copy.
    let chose = args.sandbox_user.is_some() || args.sandbox_memory.is_some();
    if chose && args.no_sandbox && notifier.is_none() {
        eprintln!(
            "immount: warning: --sandbox-user and --sandbox-memory do nothing with --no-sandbox"
        );
    } else if args.sandbox_user.is_some()
        && notifier.is_none()
        && !rustix::process::geteuid().is_root()
    {
        eprintln!(
            "immount: warning: --sandbox-user applies only when immount runs as root: \
             the server keeps your own uid"
        );
    }
    if !args.foreground && notifier.is_none() {
        return Ok(match fuse::daemon::spawn_background(args.log.as_deref()) {
            Ok(text) => {
                if !text.trim().is_empty() {
                    eprintln!("immount: {}", text.trim_end());
                }
                0
            }
            Err(e) => report(&e),
        });
    }
    let verity = match args.verity.options() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("immount: {e:#}");
            return Ok(fuse::daemon::EXIT_USAGE);
        }
    };
    let confinement = confinement(&args);
    let request = fuse::MountRequest {
        verity,
        image: args.image,
        mountpoint: args.mountpoint,
        devices: args.devices,
        options: args
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .map(str::to_owned)
            .collect(),
        no_sandbox: args.no_sandbox,
        sandbox_report: args.sandbox_report,
        confinement,
    };
    // The server confines itself (crates/sandbox) once the mount is up,
    // behind a supervisor that keeps the right to unmount.
    Ok(match fuse::daemon::serve(&request, notifier) {
        Ok(()) => 0,
        Err(e) => report(&e),
    })
}

/// The sandbox settings the user chose, over the defaults.
fn confinement(args: &MountArgs) -> fuse::Confinement {
    let mut c = fuse::Confinement::default();
    if let Some(u) = args.sandbox_user {
        (c.uid, c.gid) = (u.uid, u.gid);
    }
    if let Some(MemoryCap(m)) = args.sandbox_memory {
        c.memory_limit = m;
    }
    c
}

/// The identity of `--sandbox-user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxUser {
    /// The uid, not 0.
    pub uid: u32,
    /// The gid, not 0.
    pub gid: u32,
}

/// `--sandbox-memory`: bytes, or `None` for "unlimited".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryCap(pub Option<u64>);

/// The least `--sandbox-memory`. A server reading a whole Debian tree
/// through (lz4hc) peaks at 35-40 MiB of `RLIMIT_DATA`'s count, mostly its
/// threads' stacks and buffers; with 32 MiB it died half-way (an
/// allocation failed and Rust aborts), with 64 MiB it did not.
const MIN_MEMORY_CAP: u64 = 64 << 20;

/// USER[:GROUP] for `--sandbox-user`: numbers, or names looked up in
/// /etc/passwd and /etc/group (the files only: the server is started by
/// root, whose local accounts these are).
fn parse_sandbox_user(text: &str) -> Result<SandboxUser, String> {
    let (user, group) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => lookup_account("/etc/passwd", user)
            .ok_or_else(|| format!("no user {user:?} in /etc/passwd"))?,
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                lookup_account("/etc/group", g)
                    .ok_or_else(|| format!("no group {g:?} in /etc/group"))?
                    .0
            }
        },
    };
    if uid == 0 || gid == 0 {
        return Err("the server never runs as root (uid or gid 0)".into());
    }
    Ok(SandboxUser { uid, gid })
}

/// The third and fourth fields (uid and gid in /etc/passwd, gid in
/// /etc/group) of the line of `file` named `name`.
fn lookup_account(file: &str, name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() != Some(&name) || fields.len() < 3 {
            return None;
        }
        let id = fields[2].parse().ok()?;
        let second = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
        Some((id, second))
    })
}

/// SIZE for `--sandbox-memory` (see [`MemoryCap`]).
fn parse_memory_cap(text: &str) -> Result<MemoryCap, String> {
    if text == "unlimited" {
        return Ok(MemoryCap(None));
    }
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        Some(b'T' | b't') => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{text:?}: expected a size such as 512M or 2G, or \"unlimited\""))?;
    if bytes < MIN_MEMORY_CAP {
        return Err(format!("{text}: at least 64M"));
    }
    Ok(MemoryCap(Some(bytes)))
}

fn report(e: &fuse::MountError) -> i32 {
    eprintln!("immount: {}", e.message);
    e.code
}

/// Unmount a mount made by `immount mount` (directly when allowed, else
/// through fusermount3). The server then exits by itself.
pub fn run_umount(args: UmountArgs) -> anyhow::Result<i32> {
    match fuse::mount::unmount(&args.mountpoint) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("immount: cannot unmount {}: {e}", args.mountpoint.display());
            Ok(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_users_are_numbers_or_names_and_never_root() {
        let u = |uid, gid| Ok(SandboxUser { uid, gid });
        assert_eq!(parse_sandbox_user("4242"), u(4242, 4242));
        assert_eq!(parse_sandbox_user("4242:4343"), u(4242, 4343));
        // Debian's nobody and nogroup.
        assert_eq!(parse_sandbox_user("nobody"), u(65534, 65534));
        assert_eq!(parse_sandbox_user("nobody:nogroup"), u(65534, 65534));
        assert_eq!(parse_sandbox_user("daemon"), u(1, 1));
        for bad in [
            "0",
            "4242:0",
            "root",
            "nobody:root",
            "no-such-user",
            "1:no-such-group",
            "",
        ] {
            assert!(parse_sandbox_user(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn memory_caps_take_binary_suffixes_a_floor_and_unlimited() {
        assert_eq!(parse_memory_cap("512M"), Ok(MemoryCap(Some(512 << 20))));
        assert_eq!(parse_memory_cap("2g"), Ok(MemoryCap(Some(2 << 30))));
        assert_eq!(parse_memory_cap("67108864"), Ok(MemoryCap(Some(64 << 20))));
        assert_eq!(parse_memory_cap("unlimited"), Ok(MemoryCap(None)));
        for bad in ["63M", "1K", "", "M", "-1G", "1.5G", "99999999999T", "lots"] {
            assert!(parse_memory_cap(bad).is_err(), "{bad:?} accepted");
        }
    }
}
