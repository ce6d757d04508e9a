//! `immount`: mount, inspect, verify and build EROFS images without trusting
//! them. This binary is a thin layer: the format lives in the `erofs` crate,
//! and every subcommand turns library errors into one line and an exit code.

mod cmd_build;
mod cmd_mount;
mod cmd_mount_daemon;
mod cmd_verity;
mod extract;
mod manifest;
mod offline;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Exit code: the image is corrupt or unsupported.
pub const EXIT_CORRUPT: u8 = 1;
/// Exit code: usage or I/O error.
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "immount",
    version,
    about = "Mount and inspect EROFS images without trusting them",
    long_about = "immount reads EROFS images with a memory-safe parser that treats every image as \
hostile.\n\nExit codes: 0 success, 1 the image is corrupt or unsupported, 2 usage or I/O error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every subcommand that opens an image.
#[derive(clap::Args, Debug, Clone)]
pub struct ImageArgs {
    /// The EROFS image file (or block device).
    pub image: PathBuf,
    /// An extra device of the image, in device-table order (repeatable).
    #[arg(long = "device", value_name = "PATH")]
    pub devices: Vec<PathBuf>,
    /// dm-verity: check every block before the parser sees it.
    #[command(flatten)]
    pub verity: cmd_verity::VerityArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount an image read-only through FUSE (as root, as a plain user
    /// through fusermount3, or inside a user namespace). Returns once the
    /// mount is ready; the server keeps serving in the background.
    Mount(cmd_mount::MountArgs),
    /// Unmount a mount made by `immount mount`; the server then exits.
    Umount(cmd_mount::UmountArgs),
    /// Build a reproducible EROFS image from a directory, a tar stream, OCI
    /// layers or an OCI image layout.
    Build(cmd_build::BuildArgs),
    /// dm-verity hash trees and signed root hashes: format, verify, sign.
    Verity {
        #[command(subcommand)]
        command: cmd_verity::VerityCommand,
    },
    /// Print the superblock: features, block size, counts.
    Inspect {
        #[command(flatten)]
        image: ImageArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List a directory of the image.
    Ls {
        #[command(flatten)]
        image: ImageArgs,
        /// The directory (or file) inside the image.
        #[arg(default_value = "/")]
        path: String,
        /// Long listing: mode, links, owner, size, mtime.
        #[arg(short = 'l')]
        long: bool,
        /// Include "." and "..".
        #[arg(short = 'a')]
        all: bool,
    },
    /// Write a file of the image to standard output.
    Cat {
        #[command(flatten)]
        image: ImageArgs,
        /// The file inside the image.
        path: String,
    },
    /// Print everything known about one inode.
    Stat {
        #[command(flatten)]
        image: ImageArgs,
        /// The path inside the image.
        path: String,
    },
    /// Print the extended attributes of a path, like `getfattr -d -m -`.
    Getfattr {
        #[command(flatten)]
        image: ImageArgs,
        /// The path inside the image.
        path: String,
        /// Only this attribute.
        #[arg(short = 'n', long = "name")]
        name: Option<String>,
        /// Value encoding: text, hex or base64.
        #[arg(short = 'e', long = "encoding", default_value = "text")]
        encoding: offline::Encoding,
    },
    /// Extract the whole tree into DEST (modes, owners when root, times,
    /// xattrs, hard links, devices).
    Extract {
        #[command(flatten)]
        image: ImageArgs,
        /// A directory that does not exist yet, or is empty.
        dest: PathBuf,
    },
    /// Print a manifest of the tree, one JSON object a line, in the format of
    /// the corpus' manifest.py.
    Manifest {
        #[command(flatten)]
        image: ImageArgs,
    },
    /// Check the whole image: every inode, directory, xattr and data byte.
    /// Exit 0 when clean, 1 when corrupt, 2 for usage or I/O errors.
    Fsck {
        #[command(flatten)]
        image: ImageArgs,
        /// Print each path as it is checked.
        #[arg(short, long)]
        verbose: bool,
    },
}

/// Open an image and its extra devices; with verity options (or sidecar
/// files next to the image), every block is checked against the hash tree
/// before the parser sees it.
pub fn open_image(args: &ImageArgs) -> anyhow::Result<erofs::Image> {
    Ok(open_image_verified(args)?.0)
}

/// One line saying how an image was verified.
pub fn describe_verity(info: &verity::policy::VerityInfo) -> String {
    let signature = match &info.signature {
        verity::SignatureStatus::Absent => "no signature".to_string(),
        verity::SignatureStatus::Unchecked(p) => {
            format!("signature {} not checked (no --trust-dir)", p.display())
        }
        verity::SignatureStatus::Valid(s) => format!("signed by {}", s.subject),
    };
    format!(
        "verity root hash {} ({}), {signature}",
        info.root_hash, info.root_hash_source
    )
}

/// [`open_image`], also saying how the image was verified, if it was.
pub fn open_image_verified(
    args: &ImageArgs,
) -> anyhow::Result<(erofs::Image, Option<verity::policy::VerityInfo>)> {
    let opts = args.verity.options()?;
    let opened = verity::open_image(&args.image, &opts)
        .with_context(|| format!("cannot open {}", args.image.display()))?;
    let mut extra: Vec<Arc<dyn erofs::ReadAt>> = Vec::new();
    for d in &args.devices {
        let f = std::fs::File::open(d).with_context(|| format!("cannot open {}", d.display()))?;
        extra.push(Arc::new(f));
    }
    let image = erofs::Image::open_with_devices(opened.reader, extra)
        .with_context(|| format!("{}", args.image.display()))?;
    if image.extra_devices_given() < image.extra_devices_expected() {
        eprintln!(
            "immount: warning: {} has {} extra device(s); data on them cannot be read without --device",
            args.image.display(),
            image.extra_devices_expected()
        );
    }
    Ok((image, opened.verity))
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Mount(args) => {
            let code = match cmd_mount_daemon::try_mount(&args) {
                Some(code) => code,
                None => cmd_mount::run_mount(args)?,
            };
            Ok(u8::try_from(code).unwrap_or(EXIT_USAGE))
        }
        Command::Umount(args) => {
            Ok(u8::try_from(cmd_mount::run_umount(args)?).unwrap_or(EXIT_USAGE))
        }
        Command::Build(args) => Ok(u8::try_from(cmd_build::run(args)?).unwrap_or(EXIT_USAGE)),
        Command::Verity { command } => {
            Ok(u8::try_from(cmd_verity::run(command)?).unwrap_or(EXIT_USAGE))
        }
        Command::Inspect { image, json } => offline::inspect(&image, json),
        Command::Ls {
            image,
            path,
            long,
            all,
        } => offline::ls(&image, &path, long, all),
        Command::Cat { image, path } => offline::cat(&image, &path),
        Command::Stat { image, path } => offline::stat(&image, &path),
        Command::Getfattr {
            image,
            path,
            name,
            encoding,
        } => offline::getfattr(&image, &path, name.as_deref(), encoding),
        Command::Extract { image, dest } => extract::extract(&image, &dest),
        Command::Manifest { image } => manifest::manifest(&image),
        Command::Fsck { image, verbose } => offline::fsck(&image, verbose),
    }
}

/// The exit code for an error: 1 when the image is at fault, 2 otherwise.
fn exit_code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<erofs::Error>() {
            return if e.is_image_fault() {
                EXIT_CORRUPT
            } else {
                EXIT_USAGE
            };
        }
        if let Some(e) = cause.downcast_ref::<verity::Error>() {
            // A tree that does not match, or a signature that is not
            // trusted: the image is refused, as a corrupt one is.
            return if e.is_mismatch() || matches!(e, verity::Error::Untrusted(_)) {
                EXIT_CORRUPT
            } else {
                EXIT_USAGE
            };
        }
    }
    EXIT_USAGE
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // A reader that stops early (`immount cat ... | head`) is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("immount: {}", chain.join(": "));
            ExitCode::from(exit_code_for(&e))
        }
    }
}
