//! `immount build`: write a reproducible EROFS image from a directory, a tar
//! stream, OCI layers or an OCI image layout. The work is done by the
//! `mkfs` crate; this module maps options (in the spirit of mkfs.erofs) and
//! prints results. Exit codes: 0 success, 2 usage, input or I/O error.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Exit code: usage, input or I/O error.
const EXIT_USAGE: i32 = 2;

/// Arguments of `immount build`.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// SOURCE IMAGE: the directory to pack and the image to write; with
    /// --tar, --oci or --oci-layers only IMAGE.
    #[arg(value_name = "PATHS", required = true, num_args = 1..=2)]
    pub paths: Vec<PathBuf>,
    /// Read a tar stream ("-" for stdin); gzip and zstd are detected.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["oci", "oci_layers"])]
    pub tar: Option<PathBuf>,
    /// Apply these OCI layer tars in order (whiteouts resolved).
    #[arg(long, value_name = "LAYER", num_args = 1.., conflicts_with = "oci")]
    pub oci_layers: Vec<PathBuf>,
    /// Read the image of an OCI image layout directory.
    #[arg(long, value_name = "DIR")]
    pub oci: Option<PathBuf>,
    /// Compress: lz4, lz4hc, lzma, deflate or zstd, optionally ",level=N"
    /// (as mkfs.erofs: lzma 0-9, or 100-109 for the slower "extreme" presets).
    #[arg(short = 'z', value_name = "ALG[,level=N]")]
    pub compress: Option<String>,
    /// Largest physical cluster in bytes (a multiple of the block size).
    #[arg(short = 'C', value_name = "BYTES")]
    pub pcluster_size: Option<u32>,
    /// Extended options, comma separated: ztailpacking, fragments, dedupe,
    /// noinline_data, xattr-name-filter.
    #[arg(short = 'E', value_name = "OPTS")]
    pub extended: Vec<String>,
    /// Store xattr names that start with PREFIX (which starts with user.,
    /// trusted. or security.) through a long prefix, kept once; repeatable.
    #[arg(long, value_name = "PREFIX")]
    pub xattr_prefix: Vec<String>,
    /// Block size in bytes.
    #[arg(short = 'b', value_name = "BYTES", default_value_t = 4096)]
    pub block_size: u32,
    /// Chunk-based files with chunks of this many bytes.
    #[arg(long, alias = "chunksize", value_name = "BYTES")]
    pub chunk_size: Option<u32>,
    /// Give every file this modification time (also the build time).
    #[arg(short = 'T', value_name = "SECONDS", allow_hyphen_values = true)]
    pub timestamp: Option<i64>,
    /// Volume UUID.
    #[arg(short = 'U', value_name = "UUID")]
    pub uuid: Option<String>,
    /// Volume label (at most 16 bytes).
    #[arg(short = 'L', value_name = "LABEL")]
    pub label: Option<String>,
    /// Make every file owned by root.
    #[arg(long)]
    pub all_root: bool,
    /// Add N to every uid.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub uid_offset: u32,
    /// Add N to every gid.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub gid_offset: u32,
    /// Append a dm-verity hash tree and print its root hash and offset.
    #[arg(long)]
    pub verity: bool,
    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

fn parse_uuid(s: &str) -> anyhow::Result<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        bail!("UUID {s:?} does not have 32 hex digits");
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("UUID {s:?} is not hex"))?;
    }
    Ok(out)
}

fn parse_compress(
    spec: &str,
    pcluster: Option<u32>,
    bs: u32,
) -> anyhow::Result<mkfs::CompressOptions> {
    let mut parts = spec.split(',');
    let alg = match parts.next().unwrap_or("") {
        "lz4" => mkfs::Algorithm::Lz4,
        "lz4hc" => mkfs::Algorithm::Lz4hc,
        "lzma" => mkfs::Algorithm::Lzma,
        "deflate" => mkfs::Algorithm::Deflate,
        "zstd" => mkfs::Algorithm::Zstd,
        other => bail!("unknown compression algorithm {other:?} (lz4, lz4hc, lzma, deflate, zstd)"),
    };
    let mut level = None;
    for p in parts {
        match p.split_once('=') {
            Some(("level", v)) => {
                level = Some(v.parse().with_context(|| format!("bad level {v:?}"))?)
            }
            _ => bail!("unknown compression option {p:?}"),
        }
    }
    Ok(mkfs::CompressOptions {
        algorithm: alg,
        level,
        pcluster_size: pcluster.unwrap_or(bs),
        ztailpacking: false,
        fragments: false,
        dedupe: false,
    })
}

/// Run `immount build`; returns the exit code.
pub fn run(args: BuildArgs) -> anyhow::Result<i32> {
    match build(args) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("immount build: {e:#}");
            Ok(EXIT_USAGE)
        }
    }
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let streamed = args.tar.is_some() || args.oci.is_some() || !args.oci_layers.is_empty();
    let (source, image) = match (streamed, args.paths.as_slice()) {
        (false, [src, img]) => (Some(src.clone()), img.clone()),
        (true, [img]) => (None, img.clone()),
        (false, _) => bail!("give SOURCE and IMAGE (or --tar/--oci/--oci-layers and IMAGE)"),
        (true, _) => bail!("with --tar, --oci or --oci-layers give only IMAGE"),
    };
    let mut opts = mkfs::Options {
        block_size: args.block_size,
        all_root: args.all_root,
        uid_offset: args.uid_offset,
        gid_offset: args.gid_offset,
        chunk_size: args.chunk_size,
        fixed_time: args.timestamp,
        progress: !args.quiet && std::io::stderr().is_terminal(),
        xattr_prefixes: args
            .xattr_prefix
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect(),
        ..Default::default()
    };
    if args.timestamp.is_none() {
        if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
            opts.clamp_time = Some(
                v.trim()
                    .parse()
                    .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number"))?,
            );
        }
    }
    if let Some(u) = &args.uuid {
        opts.uuid = Some(parse_uuid(u)?);
    }
    if let Some(l) = &args.label {
        opts.volume_name = l.as_bytes().to_vec();
    }
    if let Some(spec) = &args.compress {
        opts.compress = Some(parse_compress(spec, args.pcluster_size, args.block_size)?);
    } else if args.pcluster_size.is_some() {
        bail!("-C needs -z");
    }
    for e in args.extended.iter().flat_map(|s| s.split(',')) {
        match e {
            "noinline_data" => opts.inline_data = false,
            "xattr-name-filter" => opts.xattr_name_filter = true,
            "ztailpacking" | "fragments" | "dedupe" => {
                let Some(c) = opts.compress.as_mut() else {
                    bail!("-E {e} needs -z");
                };
                match e {
                    "ztailpacking" => c.ztailpacking = true,
                    "fragments" => c.fragments = true,
                    _ => c.dedupe = true,
                }
            }
            "" => {}
            other => bail!("unknown extended option {other:?}"),
        }
    }

    let spill_dir = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tree = if let Some(tar) = &args.tar {
        mkfs::tree_from_tar(tar, &spill_dir)?
    } else if let Some(oci) = &args.oci {
        mkfs::tree_from_oci(oci, &spill_dir)?
    } else if !args.oci_layers.is_empty() {
        mkfs::tree_from_layers(&args.oci_layers, &spill_dir)?
    } else {
        // Checked above: a directory build has a source.
        let src = source.unwrap_or_default();
        mkfs::scan_dir(&src)?
    };
    let report = mkfs::build_image(&tree, &image, &opts)?;
    if !args.quiet {
        eprintln!(
            "{}: {} inodes, {} blocks, {} bytes",
            image.display(),
            report.inodes,
            report.blocks,
            report.bytes
        );
    }
    if args.verity {
        if let Err(e) = append_verity(&image, &report, args.block_size) {
            // No half-protected image left behind.
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
    }
    Ok(())
}

/// Append a dm-verity tree (salt and uuid derived from the image's uuid, so
/// the result stays reproducible) and print the root hash.
fn append_verity(image: &Path, report: &mkfs::BuildReport, bs: u32) -> anyhow::Result<()> {
    use sha2::Digest;
    let salt = sha2::Sha256::digest(report.uuid).to_vec();
    let opts = verity::FormatOptions {
        data_block_size: bs.min(4096),
        hash_block_size: 4096,
        salt: Some(salt),
        uuid: Some(report.uuid),
        ..Default::default()
    };
    let r = verity::format_image(image, None, None, &opts)
        .with_context(|| format!("appending a verity tree to {}", image.display()))?;
    // The same lines as `immount verity format`. The offset is where the
    // tree starts (the image's blocks rounded up to 4 KiB), for tools such
    // as veritysetup; immount's own commands find it by themselves.
    println!("Root hash:       {}", r.root_hash);
    println!("Hash offset:     {}", r.hash_offset);
    Ok(())
}
