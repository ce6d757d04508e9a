//! `immount verity format|verify|sign`: dm-verity hash trees and signed root
//! hashes, without device-mapper. The work is done by the `verity` crate;
//! this module parses arguments, prints results and picks exit codes:
//! 0 success, 1 the image does not match its root hash, 2 usage or I/O error.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use verity::policy::sidecar_path;
use verity::{
    format_image, geometry_from_superblock, verify_image, FormatOptions, Geometry, RootHash,
    TrustPolicy, VerityOptions, VerityParams,
};

/// Exit code: the image or tree does not match the root hash.
const EXIT_MISMATCH: i32 = 1;
/// Exit code: usage or I/O error.
const EXIT_USAGE: i32 = 2;

/// The `verity` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum VerityCommand {
    /// Compute the hash tree of IMAGE (the format `veritysetup format`
    /// writes), write it, and print the root hash. Without --hash-file the
    /// tree is appended to the image at the next 4096-aligned offset, which
    /// is printed.
    Format(FormatArgs),
    /// Check every block of IMAGE and of its tree against a root hash.
    /// Exit 0 when it matches, 1 when it does not, 2 for usage or I/O errors.
    Verify(VerifyArgs),
    /// Sign a root hash: a detached DER PKCS#7 signature over its hex text,
    /// as `openssl smime -sign -nocerts -noattr -binary -outform der` makes,
    /// for the kernel's dm-verity, systemd and `--root-hash-sig`.
    Sign(SignArgs),
}

/// Tree shape options shared by `format` and `verify --no-superblock`.
#[derive(clap::Args, Debug, Clone)]
pub struct ShapeArgs {
    /// Data block size in bytes.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub data_block_size: u32,
    /// Hash block size in bytes.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub hash_block_size: u32,
    /// Number of data blocks covered (default: the whole image).
    #[arg(long, value_name = "N")]
    pub data_blocks: Option<u64>,
    /// Salt as hex, or "-" for none (format default: 32 random bytes).
    #[arg(long, value_name = "HEX")]
    pub salt: Option<String>,
    /// The tree has no superblock in front of it.
    #[arg(long)]
    pub no_superblock: bool,
}

/// Arguments of `verity format`.
#[derive(clap::Args, Debug)]
pub struct FormatArgs {
    /// The image to protect. Only written to when the tree is appended.
    pub image: PathBuf,
    /// Write the tree to this file (created or truncated), e.g.
    /// IMAGE.verity, instead of appending it to the image.
    #[arg(long, value_name = "FILE")]
    pub hash_file: Option<PathBuf>,
    /// Where the tree starts in the hash file or image (a multiple of the
    /// hash block size).
    #[arg(long, value_name = "N")]
    pub hash_offset: Option<u64>,
    /// Also write the root hash as hex text to this file, e.g. IMAGE.roothash.
    #[arg(long, value_name = "FILE")]
    pub root_hash_file: Option<PathBuf>,
    #[command(flatten)]
    pub shape: ShapeArgs,
}

/// Arguments of `verity verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The image to check.
    pub image: PathBuf,
    /// The tree's file (default: the image itself when --hash-offset is
    /// given, else IMAGE.verity, else a tree appended to an EROFS image
    /// right after its blocks).
    #[arg(long, value_name = "FILE")]
    pub hash_file: Option<PathBuf>,
    /// Where the tree starts in the hash file or image.
    #[arg(long, value_name = "N")]
    pub hash_offset: Option<u64>,
    /// The trusted root hash (default: the contents of IMAGE.roothash).
    #[arg(long, value_name = "HEX")]
    pub root_hash: Option<String>,
    #[command(flatten)]
    pub shape: ShapeArgs,
}

/// Arguments of `verity sign`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["root_hash", "image"])))]
pub struct SignArgs {
    /// Private key, PEM (PKCS#8, PKCS#1 RSA or SEC1 EC; RSA, P-256, P-384).
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
    /// The key's X.509 certificate, PEM or DER.
    #[arg(long, value_name = "CERT")]
    pub cert: PathBuf,
    /// The root hash to sign.
    #[arg(long, value_name = "HEX")]
    pub root_hash: Option<String>,
    /// Sign the root hash in this image's IMAGE.roothash sidecar.
    pub image: Option<PathBuf>,
    /// Where to write the signature (e.g. IMAGE.roothash.p7s).
    #[arg(short = 'o', long = "output", value_name = "SIG")]
    pub output: PathBuf,
}

/// The verity options of the commands that open an image (`mount`, `fsck`,
/// `manifest`, `cat`, `extract`): flatten into their arguments and call
/// [`VerityArgs::options`] for [`verity::open_image`].
#[derive(clap::Args, Debug, Clone, Default)]
pub struct VerityArgs {
    /// Check every block against this dm-verity root hash (default: the
    /// IMAGE.roothash sidecar, if present).
    #[arg(long, value_name = "HEX")]
    pub root_hash: Option<String>,
    /// Detached PKCS#7 signature of the root hash (default: the
    /// IMAGE.roothash.p7s sidecar, if present).
    #[arg(long, value_name = "FILE")]
    pub root_hash_sig: Option<PathBuf>,
    /// The hash tree (default: the IMAGE.verity sidecar, else the image at
    /// --hash-offset, else a tree appended to an EROFS image right after
    /// its blocks).
    #[arg(long, value_name = "FILE")]
    pub verity_data: Option<PathBuf>,
    /// Offset of the hash tree in --verity-data or in the image.
    #[arg(long, value_name = "N")]
    pub hash_offset: Option<u64>,
    /// Directory of trusted X.509 certificates (PEM or DER) for signatures.
    #[arg(long, value_name = "DIR")]
    pub trust_dir: Option<PathBuf>,
    /// Refuse images whose root hash is not signed by a trusted certificate.
    #[arg(long)]
    pub require_signature: bool,
}

impl VerityArgs {
    /// The library options these arguments ask for.
    pub fn options(&self) -> anyhow::Result<VerityOptions> {
        let root_hash = self
            .root_hash
            .as_deref()
            .map(str::parse::<RootHash>)
            .transpose()
            .context("--root-hash")?;
        Ok(VerityOptions {
            root_hash,
            root_hash_sig: self.root_hash_sig.clone(),
            verity_data: self.verity_data.clone(),
            hash_offset: self.hash_offset,
            no_sidecars: false,
            trust: TrustPolicy {
                trust_dir: self.trust_dir.clone(),
                require_signature: self.require_signature,
            },
        })
    }
}

/// Run a `verity` subcommand; returns the exit code. Errors are printed
/// here, as one line, so the code is chosen deliberately.
pub fn run(cmd: VerityCommand) -> anyhow::Result<i32> {
    let result = match cmd {
        VerityCommand::Format(args) => format(&args),
        VerityCommand::Verify(args) => verify(&args),
        VerityCommand::Sign(args) => sign(&args),
    };
    match result {
        Ok(code) => Ok(code),
        Err(err) => {
            let mismatch = err.chain().any(|e| {
                e.downcast_ref::<verity::Error>()
                    .is_some_and(|v| v.is_mismatch())
            });
            eprintln!("immount verity: {err:#}");
            Ok(if mismatch { EXIT_MISMATCH } else { EXIT_USAGE })
        }
    }
}

fn parse_salt(salt: Option<&str>) -> anyhow::Result<Option<Vec<u8>>> {
    match salt {
        None => Ok(None),
        Some("-") => Ok(Some(Vec::new())),
        Some(hex) => Ok(Some(verity::hex::decode(hex, "salt")?)),
    }
}

fn format(args: &FormatArgs) -> anyhow::Result<i32> {
    if let Some(out) = &args.root_hash_file {
        refuse_same_file(out, &args.image, "--root-hash-file")?;
    }
    let shape = &args.shape;
    let opts = FormatOptions {
        data_block_size: shape.data_block_size,
        hash_block_size: shape.hash_block_size,
        salt: parse_salt(shape.salt.as_deref())?,
        uuid: None,
        superblock: !shape.no_superblock,
        data_blocks: shape.data_blocks,
    };
    let report = format_image(
        &args.image,
        args.hash_file.as_deref(),
        args.hash_offset,
        &opts,
    )?;
    let params = &report.superblock.params;
    println!("Root hash:       {}", report.root_hash);
    let salt = verity::hex::encode(&params.salt);
    println!(
        "Salt:            {}",
        if salt.is_empty() { "-" } else { &salt }
    );
    println!("Data blocks:     {}", params.data_blocks);
    println!("Data block size: {}", params.data_block_size);
    println!("Hash block size: {}", params.hash_block_size);
    match &args.hash_file {
        Some(path) => println!("Hash file:       {}", path.display()),
        None => println!("Hash offset:     {}", report.hash_offset),
    }
    if !shape.no_superblock {
        println!("UUID:            {}", report.superblock.uuid_string());
    }
    if let Some(out) = &args.root_hash_file {
        std::fs::write(out, format!("{}\n", report.root_hash))
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(0)
}

fn read_root_hash_file(path: &Path) -> anyhow::Result<RootHash> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the root hash from {}", path.display()))?;
    text.parse()
        .with_context(|| format!("{} does not hold a root hash", path.display()))
}

fn verify(args: &VerifyArgs) -> anyhow::Result<i32> {
    let root: RootHash = match &args.root_hash {
        Some(hex) => hex.parse().context("--root-hash")?,
        None => {
            let sidecar = sidecar_path(&args.image, ".roothash");
            if !sidecar.is_file() {
                bail!(
                    "no --root-hash given and {} does not exist",
                    sidecar.display()
                );
            }
            read_root_hash_file(&sidecar)?
        }
    };
    let open =
        |p: &Path| std::fs::File::open(p).with_context(|| format!("opening {}", p.display()));
    let data = open(&args.image)?;
    let (hash_path, offset) = match (&args.hash_file, args.hash_offset) {
        (Some(path), off) => (path.clone(), off.unwrap_or(0)),
        (None, Some(off)) => (args.image.clone(), off),
        (None, None) => {
            let sidecar = sidecar_path(&args.image, ".verity");
            // A sidecar wins, as for the image commands; else a tree that
            // `build --verity` or `verity format` appended to an EROFS image.
            let appended = (!sidecar.is_file() && !args.shape.no_superblock)
                .then(|| verity::policy::appended_tree_offset(&data))
                .flatten();
            match appended {
                Some(off) => (args.image.clone(), off),
                None if sidecar.is_file() => (sidecar, 0),
                None => bail!(
                    "no hash tree: give --hash-file or --hash-offset, put {} next to the image, \
                     or append the tree to an EROFS image",
                    sidecar.display()
                ),
            }
        }
    };
    let hash = open(&hash_path)?;
    let shape = &args.shape;
    let geometry = if shape.no_superblock {
        let data_blocks = match shape.data_blocks {
            Some(n) => n,
            None => {
                let size = data.metadata()?.len();
                let dbs = u64::from(shape.data_block_size);
                if !size.is_multiple_of(dbs) || args.hash_file.is_none() {
                    bail!("--no-superblock needs --data-blocks here");
                }
                size / dbs
            }
        };
        let params = VerityParams {
            data_block_size: shape.data_block_size,
            hash_block_size: shape.hash_block_size,
            data_blocks,
            salt: parse_salt(shape.salt.as_deref())?.unwrap_or_default(),
        };
        Geometry::new(params, offset, false)?
    } else {
        geometry_from_superblock(&hash, offset)
            .with_context(|| format!("reading the tree in {}", hash_path.display()))?
    };
    match verify_image(&data, &hash, &geometry, &root) {
        Ok(()) => {
            println!(
                "{}: {} data blocks verified against root hash {root}",
                args.image.display(),
                geometry.params().data_blocks
            );
            Ok(0)
        }
        Err(e) => Err(anyhow::Error::new(e).context(args.image.display().to_string())),
    }
}

/// Refuse to write `out` when it is the same file as `input`.
fn refuse_same_file(out: &Path, input: &Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(out), std::fs::metadata(input)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            bail!(
                "{what} {} is the same file as {}",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

fn sign(args: &SignArgs) -> anyhow::Result<i32> {
    let root: RootHash = match (&args.root_hash, &args.image) {
        (Some(hex), _) => hex.parse().context("--root-hash")?,
        (None, Some(image)) => {
            let sidecar = sidecar_path(image, ".roothash");
            if !sidecar.is_file() {
                bail!(
                    "{} does not exist: run `immount verity format --root-hash-file` first, or give --root-hash",
                    sidecar.display()
                );
            }
            read_root_hash_file(&sidecar)?
        }
        (None, None) => bail!("give --root-hash or an image"),
    };
    for input in [Some(&args.key), Some(&args.cert), args.image.as_ref()]
        .into_iter()
        .flatten()
    {
        refuse_same_file(&args.output, input, "-o")?;
    }
    let key =
        std::fs::read(&args.key).with_context(|| format!("reading {}", args.key.display()))?;
    let cert =
        std::fs::read(&args.cert).with_context(|| format!("reading {}", args.cert.display()))?;
    let signature = verity::sign_root_hash(&root, &key, &cert)?;
    std::fs::write(&args.output, signature)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("Signed root hash {root} into {}", args.output.display());
    Ok(0)
}
