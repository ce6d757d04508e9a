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
    /// lowmem, stats (print request counts at exit), fsname=NAME, threads=N,
    /// readahead_kb=N (ro, nosuid, nodev and default_permissions are implied).
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
    /// The socket of immountd, the delegation daemon (default: $IMMOUNT_SOCKET,
    /// else /run/immount/io.immount.Mount). A plain user's mount goes
    /// through the daemon when its socket exists.
    #[arg(long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Never go through immountd; mount with fusermount3 or directly.
    #[arg(long = "no-daemon")]
    pub no_daemon: bool,
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
    if notifier.is_none() && !args.no_daemon && !rustix::process::geteuid().is_root() {
        let socket = mountd::client::socket_path(args.socket.as_deref());
        if mountd::client::daemon_available(&socket) {
            return Ok(mount_through_daemon(&args, &socket));
        }
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
    let request = fuse::MountRequest {
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
    };
    // The server confines itself (crates/sandbox) once the mount is up,
    // behind a supervisor that keeps the right to unmount.
    Ok(match fuse::daemon::serve(&request, notifier) {
        Ok(()) => 0,
        Err(e) => report(&e),
    })
}

/// Flow (b) of immountd: the daemon decides by its policy, serves the image
/// from a sandboxed server of its own and attaches the mount to DIR, which
/// this user must own; always nosuid,nodev.
fn mount_through_daemon(args: &MountArgs, socket: &std::path::Path) -> i32 {
    let mut options = Vec::new();
    for o in args
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        match o {
            "allow_other" | "noexec" => options.push(o.to_string()),
            _ => {
                eprintln!("immount: warning: option {o} is not used when mounting through immountd")
            }
        }
    }
    if !args.devices.is_empty() {
        eprintln!("immount: extra devices cannot be passed to immountd; use --no-daemon");
        return fuse::daemon::EXIT_USAGE;
    }
    let spec = mountd::client::ImageSpec {
        image: args.image.clone(),
        options,
        sidecars: true,
        ..Default::default()
    };
    match mountd::client::mount_via_daemon(socket, &spec, &args.mountpoint) {
        Ok(d) => {
            eprintln!(
                "immount: mounted through immountd ({}): {} image {}, {}",
                socket.display(),
                d.class,
                d.image_identity,
                d.options
            );
            0
        }
        Err(e) => {
            eprintln!("immount: {e}");
            e.exit_code()
        }
    }
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
