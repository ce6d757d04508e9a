//! Signatures over the hex root hash, with keys and certificates made by
//! openssl in a temporary directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use verity::signature::verify_signature;
use verity::{sign_root_hash, verify_root_hash_signature, Error, RootHash, TrustStore};

use crate::common::{path_str, run_ok};

const ROOT: &str = "feb2dfacf5e2efa13ccb46c9914c35d1ec5fe623a1228df4462b47c10d3ad4f3";

/// A scratch directory of keys, certificates and trust directories.
struct Pki {
    dir: tempfile::TempDir,
}

/// A key and its certificate.
struct Signer {
    key: PathBuf,
    cert: PathBuf,
}

fn root() -> RootHash {
    ROOT.parse().unwrap()
}

impl Pki {
    fn new() -> Self {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(pki.path("roothash"), ROOT).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A self-signed certificate valid for 30 days; `key` is an openssl
    /// `-newkey` argument, `extra` more `req` arguments.
    fn self_signed(&self, name: &str, key: &str, extra: &[&str]) -> Signer {
        let signer = Signer {
            key: self.path(&format!("{name}.key")),
            cert: self.path(&format!("{name}.crt")),
        };
        let mut args = vec!["req", "-x509", "-newkey", key];
        if let Some(curve) = key.strip_prefix("ec:") {
            args = vec!["req", "-x509", "-newkey", "ec", "-pkeyopt"];
            args.push(if curve == "P-256" {
                "ec_paramgen_curve:P-256"
            } else {
                "ec_paramgen_curve:P-384"
            });
        }
        let subj = format!("/CN={name}");
        args.extend([
            "-nodes",
            "-keyout",
            path_str(&signer.key),
            "-out",
            path_str(&signer.cert),
            "-days",
            "30",
            "-subj",
            &subj,
        ]);
        args.extend(extra);
        run_ok("openssl", &args);
        signer
    }

    /// A self-signed certificate with explicit validity dates (YYYYMMDDHHMMSSZ),
    /// made with `openssl ca`, which `req` cannot do in openssl 3.0.
    fn dated(&self, name: &str, start: &str, end: &str) -> Signer {
        let ca = self.path(&format!("{name}-ca"));
        std::fs::create_dir(&ca).unwrap();
        std::fs::write(
            ca.join("ca.cnf"),
            "[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nnew_certs_dir=.\nserial=serial\n\
             default_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n",
        )
        .unwrap();
        std::fs::write(ca.join("index.txt"), "").unwrap();
        std::fs::write(ca.join("serial"), "01\n").unwrap();
        let signer = Signer {
            key: ca.join("key.pem"),
            cert: ca.join("cert.pem"),
        };
        let subj = format!("/CN={name}");
        let csr = ca.join("csr");
        run_ok(
            "openssl",
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                path_str(&signer.key),
                "-out",
                path_str(&csr),
                "-subj",
                &subj,
            ],
        );
        let cnf = ca.join("ca.cnf");
        let out = std::process::Command::new("openssl")
            .current_dir(&ca)
            .args([
                "ca",
                "-batch",
                "-config",
                path_str(&cnf),
                "-selfsign",
                "-keyfile",
                path_str(&signer.key),
                "-in",
                path_str(&csr),
                "-out",
                path_str(&signer.cert),
                "-notext",
                "-startdate",
                start,
                "-enddate",
                end,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        signer
    }

    /// `openssl smime -sign` over the root hash text.
    fn smime_sign(&self, signer: &Signer, noattr: bool) -> Vec<u8> {
        self.smime_sign_md(signer, noattr, "sha256")
    }

    /// `openssl smime -sign` with the digest algorithm `md`.
    fn smime_sign_md(&self, signer: &Signer, noattr: bool, md: &str) -> Vec<u8> {
        let out = self.path("sig.p7s");
        let mut args = vec![
            "smime", "-sign", "-nocerts", "-binary", "-outform", "der", "-md", md,
        ];
        if noattr {
            args.push("-noattr");
        }
        let input = self.path("roothash");
        args.extend([
            "-in",
            path_str(&input),
            "-inkey",
            path_str(&signer.key),
            "-signer",
            path_str(&signer.cert),
            "-out",
            path_str(&out),
        ]);
        run_ok("openssl", &args);
        std::fs::read(out).unwrap()
    }

    /// A trust directory holding copies of `certs`.
    fn trust(&self, name: &str, certs: &[&Path]) -> TrustStore {
        let dir = self.path(name);
        std::fs::create_dir(&dir).unwrap();
        for (i, cert) in certs.iter().enumerate() {
            std::fs::copy(cert, dir.join(format!("{i}.crt"))).unwrap();
        }
        std::fs::write(dir.join("README"), "not a certificate").unwrap();
        let store = TrustStore::load_dir(&dir).unwrap();
        assert_eq!(store.certs().len(), certs.len());
        store
    }
}

fn refused(result: verity::Result<verity::TrustedSigner>, why: &str) {
    match result {
        Err(Error::Untrusted(msg)) => assert!(msg.contains(why), "{msg:?} lacks {why:?}"),
        other => panic!("expected a refusal ({why}), got {other:?}"),
    }
}

#[test]
fn openssl_signatures_from_trusted_certificates_are_accepted() {
    let pki = Pki::new();
    for (name, key) in [
        ("rsa", "rsa:2048"),
        ("p256", "ec:P-256"),
        ("p384", "ec:P-384"),
    ] {
        let signer = pki.self_signed(name, key, &[]);
        let trust = pki.trust(&format!("trust-{name}"), &[&signer.cert]);
        for noattr in [true, false] {
            let sig = pki.smime_sign(&signer, noattr);
            let found = verify_root_hash_signature(&sig, &root(), &trust).unwrap();
            assert!(found.subject.contains(name), "{}", found.subject);
        }
    }
}

#[test]
fn sha384_and_sha512_digests_are_accepted() {
    let pki = Pki::new();
    for (name, key) in [("r", "rsa:2048"), ("e", "ec:P-384")] {
        let signer = pki.self_signed(name, key, &[]);
        let trust = pki.trust(&format!("trust-{name}"), &[&signer.cert]);
        for md in ["sha384", "sha512"] {
            for noattr in [true, false] {
                let sig = pki.smime_sign_md(&signer, noattr, md);
                verify_root_hash_signature(&sig, &root(), &trust).unwrap();
                let other: RootHash = ROOT.replace('e', "d").parse().unwrap();
                assert!(verify_root_hash_signature(&sig, &other, &trust).is_err());
            }
        }
    }
}

/// `openssl cms` writes CMS rather than PKCS#7: digest identifiers without
/// parameters, and with -keyid a signer named by subject key identifier.
#[test]
fn openssl_cms_signatures_are_accepted() {
    let pki = Pki::new();
    let signer = pki.self_signed("cms", "rsa:2048", &[]);
    let trust = pki.trust("trust", &[&signer.cert]);
    let other = pki.self_signed("cms-other", "ec:P-256", &[]);
    let untrusted = pki.trust("untrusted", &[&other.cert]);
    for extra in [&["-keyid", "-noattr"][..], &["-keyid"], &[]] {
        let out = pki.path("cms.p7s");
        let input = pki.path("roothash");
        let mut args = vec!["cms", "-sign", "-nocerts", "-binary", "-outform", "der"];
        args.extend(extra);
        args.extend([
            "-in",
            path_str(&input),
            "-signer",
            path_str(&signer.cert),
            "-inkey",
            path_str(&signer.key),
            "-out",
            path_str(&out),
        ]);
        run_ok("openssl", &args);
        let sig = std::fs::read(&out).unwrap();
        verify_root_hash_signature(&sig, &root(), &trust).unwrap();
        refused(
            verify_root_hash_signature(&sig, &root(), &untrusted),
            "not in the trust directory",
        );
    }
}

#[test]
fn der_certificates_in_the_trust_dir_work() {
    let pki = Pki::new();
    let signer = pki.self_signed("derca", "rsa:2048", &[]);
    let der = pki.path("derca.der");
    run_ok(
        "openssl",
        &[
            "x509",
            "-in",
            path_str(&signer.cert),
            "-outform",
            "der",
            "-out",
            path_str(&der),
        ],
    );
    let trust = pki.trust("trust", &[&der]);
    let sig = pki.smime_sign(&signer, true);
    verify_root_hash_signature(&sig, &root(), &trust).unwrap();
}

#[test]
fn untrusted_certificate_is_refused() {
    let pki = Pki::new();
    // Same subject, different key: only the trust dir's own cert counts.
    let signer = pki.self_signed("same", "rsa:2048", &[]);
    let other = pki.self_signed("same2", "rsa:2048", &["-subj", "/CN=same"]);
    let trust = pki.trust("trust", &[&other.cert]);
    let sig = pki.smime_sign(&signer, true);
    refused(
        verify_root_hash_signature(&sig, &root(), &trust),
        "not in the trust directory",
    );
    let empty = pki.trust("empty", &[]);
    refused(
        verify_root_hash_signature(&sig, &root(), &empty),
        "not in the trust directory",
    );
}

#[test]
fn expired_and_not_yet_valid_certificates_are_refused() {
    let pki = Pki::new();
    let old = pki.dated("old", "20200101000000Z", "20210101000000Z");
    let trust = pki.trust("trust-old", &[&old.cert]);
    let sig = pki.smime_sign(&old, true);
    refused(verify_root_hash_signature(&sig, &root(), &trust), "expired");
    // The same signature was fine while the certificate was valid.
    let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000); // Sep 2020
    verify_signature(&sig, ROOT.as_bytes(), &trust, then).unwrap();

    let future = pki.dated("future", "20990101000000Z", "21000101000000Z");
    let trust = pki.trust("trust-future", &[&future.cert]);
    let sig = pki.smime_sign(&future, true);
    refused(
        verify_root_hash_signature(&sig, &root(), &trust),
        "not valid before",
    );
}

#[test]
fn certificate_without_digital_signature_usage_is_refused() {
    let pki = Pki::new();
    let wrong = pki.self_signed(
        "wrong",
        "rsa:2048",
        &["-addext", "keyUsage=critical,keyCertSign"],
    );
    let trust = pki.trust("trust-wrong", &[&wrong.cert]);
    let sig = pki.smime_sign(&wrong, true);
    refused(
        verify_root_hash_signature(&sig, &root(), &trust),
        "digitalSignature",
    );

    let right = pki.self_signed(
        "right",
        "rsa:2048",
        &["-addext", "keyUsage=digitalSignature"],
    );
    let trust = pki.trust("trust-right", &[&right.cert]);
    let sig = pki.smime_sign(&right, true);
    verify_root_hash_signature(&sig, &root(), &trust).unwrap();
}

#[test]
fn corrupt_signatures_are_refused() {
    let pki = Pki::new();
    for (name, key) in [("c", "ec:P-256"), ("r", "rsa:2048")] {
        let signer = pki.self_signed(name, key, &[]);
        let trust = pki.trust(&format!("trust-{name}"), &[&signer.cert]);
        let good = pki.smime_sign(&signer, true);
        verify_root_hash_signature(&good, &root(), &trust).unwrap();
        // Every single-byte change is refused (never accepted, never a panic).
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x04;
            assert!(
                verify_root_hash_signature(&bad, &root(), &trust).is_err(),
                "{name}: byte {at} changed and still accepted"
            );
        }
        let mut bad = good.clone();
        let last = bad.len() - 3; // inside the signature value
        bad[last] ^= 0x01;
        refused(
            verify_root_hash_signature(&bad, &root(), &trust),
            "does not verify",
        );
        refused(
            verify_root_hash_signature(&good[..good.len() / 2], &root(), &trust),
            "not a DER PKCS#7",
        );
        refused(
            verify_root_hash_signature(b"", &root(), &trust),
            "not a DER PKCS#7",
        );
    }
}

#[test]
fn signature_over_another_root_hash_is_refused() {
    let pki = Pki::new();
    for (name, key) in [("r", "rsa:2048"), ("e", "ec:P-384")] {
        let signer = pki.self_signed(name, key, &[]);
        let trust = pki.trust(&format!("trust-{name}"), &[&signer.cert]);
        let other: RootHash = ROOT.replace('f', "0").parse().unwrap();
        for noattr in [true, false] {
            let sig = pki.smime_sign(&signer, noattr);
            assert!(verify_root_hash_signature(&sig, &other, &trust).is_err());
        }
        let sig = pki.smime_sign(&signer, true);
        refused(
            verify_root_hash_signature(&sig, &other, &trust),
            "does not verify",
        );
        // Uppercase hex is different content: dm-verity signs the exact text.
        refused(
            verify_signature(
                &sig,
                ROOT.to_uppercase().as_bytes(),
                &trust,
                SystemTime::now(),
            ),
            "does not verify",
        );
    }
}

/// RSA PKCS#1 v1.5 is deterministic, so our signature must equal openssl's
/// byte for byte; ECDSA signatures must pass `openssl smime -verify`.
#[test]
fn our_signatures_match_openssl() {
    let pki = Pki::new();
    let rsa = pki.self_signed("rsa", "rsa:2048", &[]);
    let key = std::fs::read(&rsa.key).unwrap();
    let cert = std::fs::read(&rsa.cert).unwrap();
    let ours = sign_root_hash(&root(), &key, &cert).unwrap();
    assert!(
        ours == pki.smime_sign(&rsa, true),
        "differs from openssl's signature"
    );

    // A PKCS#1 ("RSA PRIVATE KEY") key and a DER certificate give the same.
    let pkcs1 = pki.path("rsa.pkcs1");
    run_ok(
        "openssl",
        &[
            "rsa",
            "-in",
            path_str(&rsa.key),
            "-traditional",
            "-out",
            path_str(&pkcs1),
        ],
    );
    let der = pki.path("rsa.der");
    run_ok(
        "openssl",
        &[
            "x509",
            "-in",
            path_str(&rsa.cert),
            "-outform",
            "der",
            "-out",
            path_str(&der),
        ],
    );
    let again = sign_root_hash(
        &root(),
        &std::fs::read(&pkcs1).unwrap(),
        &std::fs::read(&der).unwrap(),
    )
    .unwrap();
    assert!(again == ours);

    for (name, key) in [("p256", "ec:P-256"), ("p384", "ec:P-384")] {
        let ec = pki.self_signed(name, key, &[]);
        let sig = sign_root_hash(
            &root(),
            &std::fs::read(&ec.key).unwrap(),
            &std::fs::read(&ec.cert).unwrap(),
        )
        .unwrap();
        let sig_path = pki.path(&format!("{name}.p7s"));
        std::fs::write(&sig_path, &sig).unwrap();
        let content = pki.path("roothash");
        run_ok(
            "openssl",
            &[
                "smime",
                "-verify",
                "-binary",
                "-inform",
                "der",
                "-in",
                path_str(&sig_path),
                "-content",
                path_str(&content),
                "-certfile",
                path_str(&ec.cert),
                "-nointern",
                "-noverify",
                "-out",
                "/dev/null",
            ],
        );
        let trust = pki.trust(&format!("trust-{name}"), &[&ec.cert]);
        verify_root_hash_signature(&sig, &root(), &trust).unwrap();
    }
}

#[test]
fn signing_with_a_key_of_another_certificate_fails() {
    let pki = Pki::new();
    let a = pki.self_signed("a", "rsa:2048", &[]);
    let b = pki.self_signed("b", "rsa:2048", &[]);
    let err = sign_root_hash(
        &root(),
        &std::fs::read(&a.key).unwrap(),
        &std::fs::read(&b.cert).unwrap(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}
