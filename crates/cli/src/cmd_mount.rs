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
    };
    // The server confines itself (crates/sandbox) once the mount is up,
    // behind a supervisor that keeps the right to unmount.
    Ok(match fuse::daemon::serve(&request, notifier) {
        Ok(()) => 0,
        Err(e) => report(&e),
    })
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
