//! What the CLI and the daemon share: the verity options a user gives, the
//! systemd sidecar files found next to an image, and [`open_image`], which
//! turns both into a reader the EROFS parser can trust.
//!
//! Sidecars follow systemd's naming: for `IMAGE` (or `NAME.raw`, whose
//! `.raw` is replaced) the tree is `IMAGE.verity`, the root hash
//! `IMAGE.roothash` (hex text) and its signature `IMAGE.roothash.p7s`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use erofs::ReadAt;

use crate::signature::MAX_SIGNATURE_SIZE;
use crate::tree::geometry_from_superblock;
use crate::{
    verify_root_hash_signature, Error, Geometry, Result, RootHash, TrustStore, TrustedSigner,
    VerifiedReader,
};

/// Sidecar files found next to an image; each is `Some` only if it exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sidecars {
    /// `IMAGE.verity`: the hash tree (with superblock) in its own file.
    pub verity: Option<PathBuf>,
    /// `IMAGE.roothash`: the root hash as hex text.
    pub roothash: Option<PathBuf>,
    /// `IMAGE.roothash.p7s`: a detached PKCS#7 signature of the root hash.
    pub signature: Option<PathBuf>,
}

/// The path systemd gives the sidecar with `suffix` of `image`.
pub fn sidecar_path(image: &Path, suffix: &str) -> PathBuf {
    let mut name = image.as_os_str().to_os_string();
    // systemd replaces a ".raw" suffix; other names get the suffix appended.
    if let Some(stem) = image.to_str().and_then(|s| s.strip_suffix(".raw")) {
        name = stem.into();
    }
    name.push(suffix);
    PathBuf::from(name)
}

impl Sidecars {
    /// Look for the sidecars of `image`.
    pub fn discover(image: &Path) -> Self {
        let found = |suffix: &str| {
            let path = sidecar_path(image, suffix);
            path.is_file().then_some(path)
        };
        Sidecars {
            verity: found(".verity"),
            roothash: found(".roothash"),
            signature: found(".roothash.p7s"),
        }
    }
}

/// How signatures are judged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    /// Directory of trusted X.509 certificates (PEM or DER).
    pub trust_dir: Option<PathBuf>,
    /// Refuse images without a root hash signed by a trusted certificate.
    pub require_signature: bool,
}

/// The verity options of `mount`, `fsck`, `manifest`, `cat`, `extract`
/// and the daemon. All default to "not given".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerityOptions {
    /// Trusted root hash (`--root-hash`); else the `.roothash` sidecar.
    pub root_hash: Option<RootHash>,
    /// Signature of the root hash (`--root-hash-sig`); else the sidecar.
    pub root_hash_sig: Option<PathBuf>,
    /// Hash tree file (`--verity-data`); else the `.verity` sidecar, else
    /// the image itself at `hash_offset`.
    pub verity_data: Option<PathBuf>,
    /// Offset of the hash area in the tree file or the image.
    pub hash_offset: Option<u64>,
    /// Do not look for sidecar files.
    pub no_sidecars: bool,
    /// How signatures are judged.
    pub trust: TrustPolicy,
}

/// What is known about an image's root-hash signature.
#[derive(Debug, Clone)]
pub enum SignatureStatus {
    /// No signature was given or found.
    Absent,
    /// A sidecar signature exists but no trust directory was given, so it
    /// was not checked; the root hash is then only as trustworthy as the
    /// place it came from.
    Unchecked(PathBuf),
    /// The signature verified against this trusted certificate.
    Valid(TrustedSigner),
}

impl SignatureStatus {
    /// True when a trusted certificate signed the root hash.
    pub fn is_valid(&self) -> bool {
        matches!(self, SignatureStatus::Valid(_))
    }
}

/// Verity details of an opened image.
#[derive(Debug, Clone)]
pub struct VerityInfo {
    /// The root hash every block was checked against.
    pub root_hash: RootHash,
    /// Where it came from (`--root-hash` or a sidecar path).
    pub root_hash_source: String,
    /// The tree layout.
    pub geometry: Geometry,
    /// Where the tree was read from.
    pub tree_path: PathBuf,
    /// The signature verdict.
    pub signature: SignatureStatus,
}

/// An image ready for the EROFS parser.
pub struct OpenedImage {
    /// Every read is verified when `verity` is `Some`; else the plain file.
    pub reader: Arc<dyn ReadAt>,
    /// `None` when no verity was requested or found.
    pub verity: Option<VerityInfo>,
}

impl std::fmt::Debug for OpenedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedImage")
            .field("verity", &self.verity)
            .finish_non_exhaustive()
    }
}

impl OpenedImage {
    /// True when the root hash was signed by a trusted certificate.
    pub fn signed(&self) -> bool {
        self.verity.as_ref().is_some_and(|v| v.signature.is_valid())
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// Read a whole small file, refusing more than `max` bytes.
fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if bytes.len() as u64 > max {
        return Err(Error::invalid(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Open `image` as `opts` ask: the plain file when no root hash is given or
/// found, else a [`VerifiedReader`] over it, after checking the signature
/// as the trust policy demands.
///
/// Refused (an error) when: a signature is given or required and does not
/// verify against the trust directory; `require_signature` is set and there
/// is no valid signature; the tree's top does not match the root hash; a
/// tree or signature is given without a root hash.
pub fn open_image(image: &Path, opts: &VerityOptions) -> Result<OpenedImage> {
    let data: Arc<dyn ReadAt> = Arc::new(open(image)?);
    open_image_from(image, data, opts, &mut |p| Ok(Arc::new(File::open(p)?)))
}

/// [`open_image`] for a caller that reads through files of its own: `data`
/// is the image at `image` already opened, and `open_tree` opens a separate
/// hash tree file when one is used. The returned reader reads through them.
pub fn open_image_from(
    image: &Path,
    data: Arc<dyn ReadAt>,
    opts: &VerityOptions,
    open_tree: &mut dyn FnMut(&Path) -> std::io::Result<Arc<dyn ReadAt>>,
) -> Result<OpenedImage> {
    open_image_ahead(image, data, opts, None, open_tree)
}

/// [`open_image_from`] with hash-ahead ([`VerifiedReader::with_hash_ahead`])
/// when `ahead` is given: for a server whose reads come in sequences, such
/// as a FUSE server reading files through. `ahead` runs the hash-ahead
/// thread's reads, marked as the caller marks its reads of file data.
pub fn open_image_ahead(
    image: &Path,
    data: Arc<dyn ReadAt>,
    opts: &VerityOptions,
    ahead: Option<crate::ahead::ReadScope>,
    open_tree: &mut dyn FnMut(&Path) -> std::io::Result<Arc<dyn ReadAt>>,
) -> Result<OpenedImage> {
    let sidecars = if opts.no_sidecars {
        Sidecars::default()
    } else {
        Sidecars::discover(image)
    };
    let (root_hash, root_hash_source) = match (&opts.root_hash, &sidecars.roothash) {
        (Some(root), _) => (Some(*root), "--root-hash".to_string()),
        (None, Some(path)) => {
            let text = read_capped(path, 4096)?;
            let text = String::from_utf8(text)
                .map_err(|_| Error::invalid(format!("{} is not hex text", path.display())))?;
            let root = text
                .parse::<RootHash>()
                .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
            (Some(root), path.display().to_string())
        }
        (None, None) => (None, String::new()),
    };
    let Some(root_hash) = root_hash else {
        if opts.trust.require_signature {
            return Err(Error::untrusted(format!(
                "{} has no root hash, but a signed one is required",
                image.display()
            )));
        }
        if opts.root_hash_sig.is_some() || opts.verity_data.is_some() || opts.hash_offset.is_some()
        {
            return Err(Error::invalid(
                "verity options given without a root hash (--root-hash or IMAGE.roothash)",
            ));
        }
        return Ok(OpenedImage {
            reader: data,
            verity: None,
        });
    };

    let signature = check_signature(&root_hash, opts, &sidecars)?;

    let (tree, tree_path, offset): (Option<Arc<dyn ReadAt>>, PathBuf, u64) =
        match (&opts.verity_data, &sidecars.verity) {
            (Some(p), _) | (None, Some(p)) => (
                Some(open_tree(p).map_err(|e| Error::io(format!("opening {}", p.display()), e))?),
                p.clone(),
                opts.hash_offset.unwrap_or(0),
            ),
            (None, None) => match opts.hash_offset.or_else(|| appended_tree_offset(&*data)) {
                Some(off) => (None, image.to_path_buf(), off),
                None => {
                    return Err(Error::invalid(format!(
                "no hash tree for {}: give --verity-data or --hash-offset, or put {} next to it",
                image.display(),
                sidecar_path(image, ".verity").display()
            )))
                }
            },
        };
    let reader = open_verified(data, tree, offset, root_hash).map_err(|e| prefix(e, &tree_path))?;
    refuse_extra_devices(&reader, image)?;
    let geometry = reader.geometry().clone();
    let reader = match ahead {
        Some(scope) => reader.with_hash_ahead(scope),
        None => reader,
    };
    Ok(OpenedImage {
        reader: Arc::new(reader),
        verity: Some(VerityInfo {
            root_hash,
            root_hash_source,
            geometry,
            tree_path,
            signature,
        }),
    })
}

/// Where a hash tree appended to an EROFS image starts, for images given
/// without `--hash-offset`: right after the filesystem's blocks, rounded up
/// to 4 KiB, which is where `immount build --verity` and `immount verity
/// format` (and `veritysetup format` on the image file) put it. `None` when
/// `image` is not EROFS or has no verity superblock there.
///
/// Nothing read here is trusted: the offset only says where to look, and the
/// tree found there must still match the root hash.
pub fn appended_tree_offset(image: &dyn ReadAt) -> Option<u64> {
    let sb = erofs::Superblock::read(image).ok()?;
    let fs_end = sb.blocks.checked_mul(1u64 << sb.blkszbits)?;
    let offset = fs_end.checked_next_multiple_of(4096)?;
    let mut signature = [0u8; 8];
    image.read_exact_at(&mut signature, offset).ok()?;
    (&signature == crate::superblock::SIGNATURE).then_some(offset)
}

/// A [`VerifiedReader`] over `data` for the tree with a superblock at
/// `hash_offset` of `tree`, or of `data` itself when `tree` is `None` (the
/// tree appended to the image, which must then not overlap the data area).
/// For callers that hold open files rather than paths (the mount daemon and
/// the FUSE server, which receive file descriptors).
pub fn open_verified(
    data: Arc<dyn ReadAt>,
    tree: Option<Arc<dyn ReadAt>>,
    hash_offset: u64,
    root: RootHash,
) -> Result<VerifiedReader<Arc<dyn ReadAt>>> {
    let appended = tree.is_none();
    let tree = tree.unwrap_or_else(|| Arc::clone(&data));
    let geometry = geometry_from_superblock(&*tree, hash_offset)?;
    if appended && geometry.data_size() > hash_offset {
        return Err(Error::invalid(format!(
            "the verity data area ({} bytes) overlaps the hash tree at offset {hash_offset}",
            geometry.data_size()
        )));
    }
    VerifiedReader::new(data, tree, geometry, root)
}

/// Refuse an EROFS image whose device table lists extra devices (blobs,
/// `--device` files): the tree covers the primary image only, so their
/// bytes would reach the parser unchecked. `verified` must be the verified
/// reader, so the device table read here is itself checked. An image whose
/// superblock does not parse passes: the parser reports it, through the
/// same verified reads.
pub fn refuse_extra_devices(verified: &dyn ReadAt, image: &Path) -> Result<()> {
    match erofs::Superblock::read(verified) {
        Ok(sb) if !sb.devices.is_empty() => Err(Error::Unsupported(format!(
            "{} has {} extra device(s) (blobs), which dm-verity does not cover: \
             refused while verity is on",
            image.display(),
            sb.devices.len()
        ))),
        _ => Ok(()),
    }
}

fn prefix(e: Error, path: &Path) -> Error {
    match e {
        Error::Invalid(m) => Error::Invalid(format!("{}: {m}", path.display())),
        Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", path.display())),
        other => other,
    }
}

/// Apply the trust policy to the signature of `root`, if there is one.
fn check_signature(
    root: &RootHash,
    opts: &VerityOptions,
    sidecars: &Sidecars,
) -> Result<SignatureStatus> {
    let explicit = opts.root_hash_sig.is_some();
    let Some(sig_path) = opts.root_hash_sig.as_ref().or(sidecars.signature.as_ref()) else {
        if opts.trust.require_signature {
            return Err(Error::untrusted(
                "a signed root hash is required but there is no signature (--root-hash-sig or IMAGE.roothash.p7s)",
            ));
        }
        return Ok(SignatureStatus::Absent);
    };
    let Some(dir) = &opts.trust.trust_dir else {
        if explicit || opts.trust.require_signature {
            return Err(Error::untrusted(
                "a signature can only be checked against a trust directory (--trust-dir)",
            ));
        }
        return Ok(SignatureStatus::Unchecked(sig_path.clone()));
    };
    let store = TrustStore::load_dir(dir)?;
    let signature = read_capped(sig_path, MAX_SIGNATURE_SIZE)?;
    let signer = verify_root_hash_signature(&signature, root, &store).map_err(|e| match e {
        Error::Untrusted(m) => Error::Untrusted(format!("{}: {m}", sig_path.display())),
        other => other,
    })?;
    Ok(SignatureStatus::Valid(signer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree appended to an EROFS image is found right after its blocks,
    /// and `open_image` uses it when only the root hash is given; a file
    /// that is not EROFS has none.
    #[test]
    fn appended_tree_is_found_after_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("plain.erofs");
        // The reference corpus beside the repository (../shared/corpus).
        std::fs::copy("../../../shared/corpus/images/plain.erofs", &image)
            .expect("the corpus image ../shared/corpus/images/plain.erofs");
        let fs_size = std::fs::metadata(&image).unwrap().len();
        let opts = crate::FormatOptions {
            salt: Some(vec![7; 32]),
            uuid: Some([1; 16]),
            ..Default::default()
        };
        let report = crate::format_image(&image, None, None, &opts).unwrap();
        let file = File::open(&image).unwrap();
        assert_eq!(appended_tree_offset(&file), Some(report.hash_offset));
        assert_eq!(report.hash_offset, fs_size.next_multiple_of(4096));
        let opened = open_image(
            &image,
            &VerityOptions {
                root_hash: Some(report.root_hash),
                no_sidecars: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            opened.verity.unwrap().geometry.hash_offset(),
            report.hash_offset
        );

        let other = dir.path().join("data");
        std::fs::write(&other, vec![0u8; 8192]).unwrap();
        let report = crate::format_image(&other, None, None, &opts).unwrap();
        assert_eq!(appended_tree_offset(&File::open(&other).unwrap()), None);
        let err = open_image(
            &other,
            &VerityOptions {
                root_hash: Some(report.root_hash),
                no_sidecars: true,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("no hash tree"), "{err}");
    }

    #[test]
    fn sidecar_names_follow_systemd() {
        assert_eq!(
            sidecar_path(Path::new("/x/foo.raw"), ".roothash"),
            Path::new("/x/foo.roothash")
        );
        assert_eq!(
            sidecar_path(Path::new("/x/foo.erofs"), ".roothash.p7s"),
            Path::new("/x/foo.erofs.roothash.p7s")
        );
        assert_eq!(
            sidecar_path(Path::new("a"), ".verity"),
            Path::new("a.verity")
        );
    }
}
