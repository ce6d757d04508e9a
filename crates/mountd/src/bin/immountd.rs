//! `immountd`: the delegation daemon, its client and its per-mount server.
//!
//! - `immountd [--socket PATH] [--policy FILE]`: run the daemon (or under
//!   systemd socket activation, on the socket passed in `LISTEN_FDS`).
//! - `immountd mount [--namespace] IMAGE DIR`: ask the daemon for a mount
//!   (flow b by default; flow a with `--namespace`, from inside one's own
//!   user and mount namespace).
//! - `immountd __serve`: the per-mount server the daemon starts (internal).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The policy read when `--policy` is not given, if it exists.
const DEFAULT_POLICY: &str = "/etc/immount/policy.toml";

#[derive(Parser, Debug)]
#[command(
    name = "immountd",
    about = "Mount EROFS images for unprivileged users, by policy"
)]
struct Cli {
    /// The socket to listen on (daemon) or connect to (mount); the client
    /// also honours IMMOUNT_SOCKET.
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// The policy file (TOML) [default: /etc/immount/policy.toml if it
    /// exists, else built-in defaults].
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Connections served at once.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_connections: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask the daemon to mount IMAGE on DIR.
    Mount(MountArgs),
}

#[derive(clap::Args, Debug)]
struct MountArgs {
    /// Flow (a): get a detached mount for our own user namespace and attach
    /// it ourselves (run inside `unshare -Urm`).
    #[arg(long)]
    namespace: bool,
    /// The dm-verity root hash (hex).
    #[arg(long, value_name = "HEX")]
    root_hash: Option<String>,
    /// A PKCS#7 signature of the root hash.
    #[arg(long, value_name = "FILE")]
    root_hash_sig: Option<PathBuf>,
    /// The hash tree file.
    #[arg(long, value_name = "FILE")]
    verity_data: Option<PathBuf>,
    /// Offset of the verity superblock in the tree file (or the image).
    #[arg(long, value_name = "BYTES")]
    hash_offset: Option<u64>,
    /// Do not look for IMAGE.roothash, IMAGE.verity, IMAGE.roothash.p7s.
    #[arg(long)]
    no_sidecars: bool,
    /// Options, comma-separated: noexec, allow_other, mapids.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// The EROFS image.
    image: PathBuf,
    /// Where to mount it.
    dir: PathBuf,
}

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == mountd::server::SERVE_ARG)
    {
        std::process::exit(mountd::server::serve_main());
    }
    let cli = Cli::parse();
    std::process::exit(match cli.command {
        Some(Command::Mount(args)) => client(cli.socket, args),
        None => daemon(cli.socket, cli.policy, cli.max_connections),
    });
}

fn daemon(socket: Option<PathBuf>, policy: Option<PathBuf>, max_connections: usize) -> i32 {
    // The default policy file is optional; one named with --policy is not.
    let default_file = PathBuf::from(DEFAULT_POLICY);
    let policy = policy.or_else(|| default_file.exists().then_some(default_file));
    let policy = match policy {
        Some(p) => match mountd::policy::Policy::load(&p) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("immountd: {e}");
                return 2;
            }
        },
        None => mountd::policy::Policy::default(),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("immountd: cannot find our own program: {e}");
            return 2;
        }
    };
    let socket = socket.unwrap_or_else(|| PathBuf::from(mountd::client::DEFAULT_SOCKET));
    let mut config = mountd::daemon::DaemonConfig::new(socket, policy, exe);
    config.max_connections = max_connections.max(1);
    match mountd::daemon::run(config) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("immountd: {e}");
            2
        }
    }
}

fn client(socket: Option<PathBuf>, args: MountArgs) -> i32 {
    let socket = mountd::client::socket_path(socket.as_deref());
    let spec = mountd::client::ImageSpec {
        image: args.image,
        root_hash: args.root_hash,
        verity_data: args.verity_data,
        hash_offset: args.hash_offset,
        signature: args.root_hash_sig,
        options: args
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
            .collect(),
        sidecars: !args.no_sidecars,
    };
    let result = if args.namespace {
        mountd::client::mount_in_own_namespace(&socket, &spec, &args.dir)
    } else {
        mountd::client::mount_via_daemon(&socket, &spec, &args.dir)
    };
    match result {
        Ok(d) => {
            println!(
                "{}",
                serde_json::json!({
                    "class": d.class, "imageIdentity": d.image_identity, "flow": d.flow,
                    "idsKept": d.ids_kept, "options": d.options,
                })
            );
            0
        }
        Err(e) => {
            eprintln!("immountd mount: {e}");
            e.exit_code()
        }
    }
}
