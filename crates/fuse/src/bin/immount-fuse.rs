//! `immount-fuse mount|umount ...`: the mount commands of `immount`, alone.
//!
//! It compiles the CLI's own module, so it behaves exactly like
//! `immount mount` and `immount umount`; the integration tests of this
//! crate run it (or the binary named by `IMMOUNT_BIN`).
#![forbid(unsafe_code)]

#[path = "../../../cli/src/cmd_mount.rs"]
mod cmd_mount;
// cmd_mount's verity options; the `verity` subcommand itself is unused here.
#[allow(dead_code)]
#[path = "../../../cli/src/cmd_verity.rs"]
mod cmd_verity;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "immount-fuse", about = "Mount an EROFS image through FUSE")]
// Parsed once per run: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Cli {
    /// Mount IMAGE on MOUNTPOINT.
    Mount(cmd_mount::MountArgs),
    /// Unmount MOUNTPOINT.
    Umount(cmd_mount::UmountArgs),
}

fn main() {
    let code = match Cli::parse() {
        Cli::Mount(a) => cmd_mount::run_mount(a),
        Cli::Umount(a) => cmd_mount::run_umount(a),
    };
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("immount: {e:#}");
            std::process::exit(2);
        }
    }
}
