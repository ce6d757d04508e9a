//! `open_image`: sidecars, explicit options and the trust policy.

use std::path::Path;

use erofs::ReadAt;
use verity::{
    format_image, open_image, sign_root_hash, Error, FormatOptions, OpenedImage, RootHash,
    SignatureStatus, TrustPolicy, VerityOptions,
};

use crate::common::{copy_image, corpus_bytes, path_str, run_ok};

/// Make a key and self-signed certificate named `name` in `dir`, returning
/// (key PEM, cert PEM) and putting the certificate in `dir/trust-NAME/`.
fn key_and_cert(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    let subj = format!("/CN={name}");
    run_ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            path_str(&key),
            "-out",
            path_str(&cert),
            "-days",
            "2",
            "-subj",
            &subj,
        ],
    );
    let trust = dir.join(format!("trust-{name}"));
    std::fs::create_dir(&trust).unwrap();
    std::fs::copy(&cert, trust.join("signer.crt")).unwrap();
    (std::fs::read(key).unwrap(), std::fs::read(cert).unwrap())
}

/// An image with `.verity`, `.roothash` and `.roothash.p7s` sidecars signed
/// by `name`'s key. Returns the image path and the root hash.
fn image_with_sidecars(
    dir: &Path,
    image_name: &str,
    base: &str,
    name: &str,
) -> (std::path::PathBuf, RootHash) {
    let img = copy_image("plain.erofs", dir);
    let img = {
        let renamed = dir.join(image_name);
        std::fs::rename(&img, &renamed).unwrap();
        renamed
    };
    let report = format_image(
        &img,
        Some(&dir.join(format!("{base}.verity"))),
        None,
        &FormatOptions::default(),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{base}.roothash")),
        format!("{}\n", report.root_hash),
    )
    .unwrap();
    let (key, cert) = key_and_cert(dir, name);
    let sig = sign_root_hash(&report.root_hash, &key, &cert).unwrap();
    std::fs::write(dir.join(format!("{base}.roothash.p7s")), sig).unwrap();
    (img, report.root_hash)
}

fn reads_back(opened: &OpenedImage) {
    let expected = corpus_bytes("plain.erofs");
    let mut all = vec![0u8; expected.len()];
    opened.reader.read_exact_at(&mut all, 0).unwrap();
    assert!(all == expected);
}

fn trust(dir: &Path, name: &str, require: bool) -> TrustPolicy {
    TrustPolicy {
        trust_dir: Some(dir.join(format!("trust-{name}"))),
        require_signature: require,
    }
}

#[test]
fn image_without_verity_is_the_plain_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("plain.erofs", dir.path());
    let opened = open_image(&img, &VerityOptions::default()).unwrap();
    assert!(opened.verity.is_none());
    assert!(!opened.signed());
    reads_back(&opened);
    // Asking for a signature when there is no root hash at all is refused.
    let opts = VerityOptions {
        trust: TrustPolicy {
            trust_dir: None,
            require_signature: true,
        },
        ..VerityOptions::default()
    };
    assert!(matches!(open_image(&img, &opts), Err(Error::Untrusted(_))));
    // A tree without a root hash to check it against is a usage error.
    let opts = VerityOptions {
        hash_offset: Some(0),
        ..VerityOptions::default()
    };
    assert!(matches!(open_image(&img, &opts), Err(Error::Invalid(_))));
}

#[test]
fn signed_sidecars_are_found_and_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (img, root) = image_with_sidecars(dir.path(), "os.erofs", "os.erofs", "alice");
    let opts = VerityOptions {
        trust: trust(dir.path(), "alice", true),
        ..VerityOptions::default()
    };
    let opened = open_image(&img, &opts).unwrap();
    assert!(opened.signed());
    let info = opened.verity.as_ref().unwrap();
    assert_eq!(info.root_hash, root);
    assert!(info.tree_path.ends_with("os.erofs.verity"));
    match &info.signature {
        SignatureStatus::Valid(signer) => assert!(signer.subject.contains("alice")),
        other => panic!("{other:?}"),
    }
    reads_back(&opened);

    // Without a trust dir the signature is reported unchecked, and reads
    // are still verified against the sidecar root hash.
    let opened = open_image(&img, &VerityOptions::default()).unwrap();
    assert!(matches!(
        opened.verity.as_ref().unwrap().signature,
        SignatureStatus::Unchecked(_)
    ));
    reads_back(&opened);

    // A different trusted signer: refused, even without require_signature.
    key_and_cert(dir.path(), "mallory");
    let opts = VerityOptions {
        trust: trust(dir.path(), "mallory", false),
        ..VerityOptions::default()
    };
    let err = open_image(&img, &opts).unwrap_err();
    assert!(matches!(err, Error::Untrusted(_)), "{err}");
    assert!(
        err.to_string().contains("not in the trust directory"),
        "{err}"
    );
}

#[test]
fn raw_suffix_is_replaced_like_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = image_with_sidecars(dir.path(), "usr.raw", "usr", "bob");
    let opts = VerityOptions {
        trust: trust(dir.path(), "bob", true),
        ..VerityOptions::default()
    };
    assert!(open_image(&img, &opts).unwrap().signed());
}

#[test]
fn tampered_image_or_wrong_root_hash_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (img, root) = image_with_sidecars(dir.path(), "t.erofs", "t.erofs", "carol");
    // A wrong explicit root hash: the signature (over the true one) fails.
    let mut wrong = root;
    wrong.0[0] ^= 1;
    let opts = VerityOptions {
        root_hash: Some(wrong),
        trust: trust(dir.path(), "carol", false),
        ..VerityOptions::default()
    };
    assert!(matches!(open_image(&img, &opts), Err(Error::Untrusted(_))));
    // Without the signature in play, the tree itself refuses it.
    let opts = VerityOptions {
        root_hash: Some(wrong),
        no_sidecars: true,
        verity_data: Some(dir.path().join("t.erofs.verity")),
        ..VerityOptions::default()
    };
    assert!(open_image(&img, &opts).unwrap_err().is_mismatch());

    // One changed byte in the image: signed and opened, but that block's
    // reads fail while others succeed.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[5 * 4096 + 9] ^= 0x20;
    std::fs::write(&img, &bytes).unwrap();
    let opts = VerityOptions {
        trust: trust(dir.path(), "carol", true),
        ..VerityOptions::default()
    };
    let opened = open_image(&img, &opts).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = opened.reader.read_exact_at(&mut buf, 5 * 4096).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    opened.reader.read_exact_at(&mut buf, 4 * 4096).unwrap();
}

#[test]
fn tree_appended_to_the_image_is_used_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let img = copy_image("plain.erofs", dir.path());
    let report = format_image(&img, None, None, &FormatOptions::default()).unwrap();
    let opts = VerityOptions {
        root_hash: Some(report.root_hash),
        hash_offset: Some(report.hash_offset),
        ..VerityOptions::default()
    };
    let opened = open_image(&img, &opts).unwrap();
    assert_eq!(
        opened.reader.size().unwrap(),
        corpus_bytes("plain.erofs").len() as u64
    );
    reads_back(&opened);
    // An explicit signature file needs a trust dir to be judged.
    let opts = VerityOptions {
        root_hash_sig: Some(dir.path().join("missing.p7s")),
        ..opts
    };
    assert!(matches!(open_image(&img, &opts), Err(Error::Untrusted(_))));
}

/// An image whose device table lists extra devices (a blob) is refused
/// under verity, since the tree does not cover them; the same image opens
/// without verity, and an image without devices opens with it.
#[test]
fn extra_devices_are_refused_under_verity() {
    let dir = tempfile::tempdir().unwrap();
    for (name, refused) in [("blobdev.erofs", true), ("plain.erofs", false)] {
        let img = copy_image(name, dir.path());
        let tree = dir.path().join(format!("{name}.tree"));
        let report = format_image(&img, Some(&tree), None, &FormatOptions::default()).unwrap();
        let opts = VerityOptions {
            root_hash: Some(report.root_hash),
            verity_data: Some(tree),
            no_sidecars: true,
            ..VerityOptions::default()
        };
        match open_image(&img, &opts) {
            Err(Error::Unsupported(m)) if refused => {
                assert!(m.contains("1 extra device"), "{m}")
            }
            Ok(opened) if !refused => assert!(opened.verity.is_some()),
            other => panic!("{name}: {other:?}"),
        }
        let plain = VerityOptions {
            no_sidecars: true,
            ..VerityOptions::default()
        };
        assert!(open_image(&img, &plain).unwrap().verity.is_none());
    }
}
