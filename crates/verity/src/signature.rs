//! PKCS#7/CMS detached signatures over the hex root hash, as the kernel's
//! dm-verity and systemd check them, and the trust directory of X.509
//! certificates they are checked against.
//!
//! The signed content is the lowercase hex text of the root hash, without a
//! newline. `openssl smime -sign -nocerts -noattr -binary -outform der` over
//! that text makes such a signature: SignedData version 1, a sha256 digest
//! algorithm, detached id-data content, no certificates, and one SignerInfo
//! naming the signer by issuer and serial number with no signed attributes.
//! [`sign_root_hash`] writes that same structure; the verifier also accepts
//! signed attributes and a signer named by subject key identifier.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cms::cert::IssuerAndSerialNumber;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use der::asn1::{Any, ObjectIdentifier, OctetString, SetOfVec};
use der::{Decode, Encode, Tagged};
use ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256, Sha384, Sha512};
use spki::AlgorithmIdentifierOwned;
use x509_cert::ext::pkix::{KeyUsage, SubjectKeyIdentifier};
use x509_cert::Certificate;

use crate::{Error, Result, RootHash};

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ID_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const SHA384_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_WITH_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Trust-directory files larger than this are not certificates; skip them.
const MAX_CERT_FILE: u64 = 1 << 20;
/// Signatures larger than this are refused unread.
pub const MAX_SIGNATURE_SIZE: u64 = 1 << 20;

/// Digest algorithms a SignerInfo may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DigestAlg {
    Sha256,
    Sha384,
    Sha512,
}

impl DigestAlg {
    fn from_oid(oid: &ObjectIdentifier) -> Result<Self> {
        match *oid {
            ID_SHA256 => Ok(DigestAlg::Sha256),
            ID_SHA384 => Ok(DigestAlg::Sha384),
            ID_SHA512 => Ok(DigestAlg::Sha512),
            _ => Err(Error::untrusted(format!(
                "unsupported digest algorithm {oid}"
            ))),
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            DigestAlg::Sha256 => Sha256::digest(data).to_vec(),
            DigestAlg::Sha384 => Sha384::digest(data).to_vec(),
            DigestAlg::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    fn pkcs1v15(self) -> Pkcs1v15Sign {
        match self {
            DigestAlg::Sha256 => Pkcs1v15Sign::new::<Sha256>(),
            DigestAlg::Sha384 => Pkcs1v15Sign::new::<Sha384>(),
            DigestAlg::Sha512 => Pkcs1v15Sign::new::<Sha512>(),
        }
    }
}

/// A public key from a certificate, of a kind we can verify with.
enum PublicKey {
    Rsa(RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
}

impl PublicKey {
    fn from_cert(cert: &Certificate) -> Result<Self> {
        let spki = &cert.tbs_certificate.subject_public_key_info;
        let der = spki
            .to_der()
            .map_err(|e| Error::untrusted(format!("certificate public key: {e}")))?;
        let bad = |e: spki::Error| Error::untrusted(format!("certificate public key: {e}"));
        match spki.algorithm.oid {
            RSA_ENCRYPTION => Ok(PublicKey::Rsa(
                RsaPublicKey::from_public_key_der(&der).map_err(bad)?,
            )),
            ID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
                match curve {
                    Some(SECP256R1) => Ok(PublicKey::P256(
                        p256::ecdsa::VerifyingKey::from_public_key_der(&der).map_err(bad)?,
                    )),
                    Some(SECP384R1) => Ok(PublicKey::P384(
                        p384::ecdsa::VerifyingKey::from_public_key_der(&der).map_err(bad)?,
                    )),
                    _ => Err(Error::untrusted(
                        "certificate uses an unsupported elliptic curve",
                    )),
                }
            }
            other => Err(Error::untrusted(format!(
                "certificate key algorithm {other} is not supported"
            ))),
        }
    }

    /// Check `signature` over a message whose digest (by `alg`) is `digest`.
    fn verify(
        &self,
        sig_alg: &ObjectIdentifier,
        alg: DigestAlg,
        digest: &[u8],
        signature: &[u8],
    ) -> bool {
        match self {
            PublicKey::Rsa(key) => {
                let alg_ok = match *sig_alg {
                    RSA_ENCRYPTION => true,
                    SHA256_WITH_RSA => alg == DigestAlg::Sha256,
                    SHA384_WITH_RSA => alg == DigestAlg::Sha384,
                    SHA512_WITH_RSA => alg == DigestAlg::Sha512,
                    _ => false,
                };
                alg_ok && key.verify(alg.pkcs1v15(), digest, signature).is_ok()
            }
            PublicKey::P256(_) | PublicKey::P384(_) => {
                let alg_ok = match *sig_alg {
                    ID_EC_PUBLIC_KEY => true,
                    ECDSA_WITH_SHA256 => alg == DigestAlg::Sha256,
                    ECDSA_WITH_SHA384 => alg == DigestAlg::Sha384,
                    ECDSA_WITH_SHA512 => alg == DigestAlg::Sha512,
                    _ => false,
                };
                alg_ok
                    && match self {
                        PublicKey::P256(key) => p256::ecdsa::Signature::from_der(signature)
                            .is_ok_and(|s| key.verify_prehash(digest, &s).is_ok()),
                        PublicKey::P384(key) => p384::ecdsa::Signature::from_der(signature)
                            .is_ok_and(|s| key.verify_prehash(digest, &s).is_ok()),
                        PublicKey::Rsa(_) => false,
                    }
            }
        }
    }
}

/// A certificate loaded from the trust directory.
#[derive(Debug, Clone)]
pub struct TrustedCert {
    /// The certificate.
    pub cert: Certificate,
    /// The file it came from.
    pub path: PathBuf,
}

/// The certificates whose signatures are trusted.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    certs: Vec<TrustedCert>,
    skipped: Vec<PathBuf>,
}

/// Parse one or more certificates from PEM text or a single DER certificate.
pub fn parse_certificates(bytes: &[u8]) -> Result<Vec<Certificate>> {
    let text_start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    if text_start.is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN")) {
        let certs = Certificate::load_pem_chain(bytes)
            .map_err(|e| Error::invalid(format!("not a PEM certificate: {e}")))?;
        if certs.is_empty() {
            return Err(Error::invalid("no certificate in PEM file"));
        }
        Ok(certs)
    } else {
        Certificate::from_der(bytes)
            .map(|c| vec![c])
            .map_err(|e| Error::invalid(format!("not a DER certificate: {e}")))
    }
}

impl TrustStore {
    /// Load every certificate (PEM or DER, any file name) in `dir`. Files
    /// that are not certificates are skipped and listed by
    /// [`TrustStore::skipped`].
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let show = dir.display();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("reading trust dir {show}"), e))?;
        let mut paths: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("reading trust dir {show}"), e))?;
            paths.push(entry.path());
        }
        paths.sort();
        let mut store = TrustStore::default();
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                store.skipped.push(path);
                continue;
            };
            if !meta.is_file() || meta.len() > MAX_CERT_FILE {
                store.skipped.push(path);
                continue;
            }
            let bytes = std::fs::read(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            match parse_certificates(&bytes) {
                Ok(certs) => store
                    .certs
                    .extend(certs.into_iter().map(|cert| TrustedCert {
                        cert,
                        path: path.clone(),
                    })),
                Err(_) => store.skipped.push(path),
            }
        }
        Ok(store)
    }

    /// A store of the given certificates.
    pub fn from_certs(certs: Vec<TrustedCert>) -> Self {
        TrustStore {
            certs,
            skipped: Vec::new(),
        }
    }

    /// The trusted certificates.
    pub fn certs(&self) -> &[TrustedCert] {
        &self.certs
    }

    /// Files of the directory that held no certificate.
    pub fn skipped(&self) -> &[PathBuf] {
        &self.skipped
    }

    /// Certificates the signer identifier names.
    fn matching<'a>(&'a self, sid: &SignerIdentifier) -> Vec<&'a TrustedCert> {
        self.certs
            .iter()
            .filter(|t| match sid {
                SignerIdentifier::IssuerAndSerialNumber(isn) => {
                    let tbs = &t.cert.tbs_certificate;
                    tbs.serial_number == isn.serial_number
                        && tbs.issuer.to_der().ok() == isn.issuer.to_der().ok()
                }
                SignerIdentifier::SubjectKeyIdentifier(skid) => t
                    .cert
                    .tbs_certificate
                    .get::<SubjectKeyIdentifier>()
                    .ok()
                    .flatten()
                    .is_some_and(|(_, ours)| ours == *skid),
            })
            .collect()
    }
}

/// The certificate a signature was accepted from.
#[derive(Debug, Clone)]
pub struct TrustedSigner {
    /// The signer's subject, RFC 4514 text.
    pub subject: String,
    /// The trust-directory file holding the certificate.
    pub cert_path: PathBuf,
}

fn describe_sid(sid: &SignerIdentifier) -> String {
    match sid {
        SignerIdentifier::IssuerAndSerialNumber(isn) => format!(
            "issuer {}, serial {}",
            isn.issuer,
            crate::hex::encode(isn.serial_number.as_bytes())
        ),
        SignerIdentifier::SubjectKeyIdentifier(skid) => {
            format!("subject key id {}", crate::hex::encode(skid.0.as_bytes()))
        }
    }
}

/// Check that `cert` may sign now: inside its validity period and, when it
/// has a key usage extension, allowed digitalSignature.
fn check_cert_use(cert: &TrustedCert, now: SystemTime) -> Result<()> {
    let tbs = &cert.cert.tbs_certificate;
    let subject = &tbs.subject;
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let validity = &tbs.validity;
    if now < validity.not_before.to_unix_duration() {
        return Err(Error::untrusted(format!(
            "certificate {subject} ({}) is not valid before {}",
            cert.path.display(),
            validity.not_before
        )));
    }
    if now > validity.not_after.to_unix_duration() {
        return Err(Error::untrusted(format!(
            "certificate {subject} ({}) expired on {}",
            cert.path.display(),
            validity.not_after
        )));
    }
    match tbs.get::<KeyUsage>() {
        Ok(None) => {}
        Ok(Some((_, usage))) if usage.digital_signature() => {}
        Ok(Some(_)) => {
            return Err(Error::untrusted(format!(
                "certificate {subject} ({}) is not allowed to sign: its key usage lacks digitalSignature",
                cert.path.display()
            )))
        }
        Err(e) => {
            return Err(Error::untrusted(format!(
                "certificate {subject} ({}) has a malformed extension: {e}",
                cert.path.display()
            )))
        }
    }
    Ok(())
}

/// The digest the signature covers: of the content, or, with signed
/// attributes, of their DER encoding after checking they name the content.
fn signed_digest(info: &SignerInfo, alg: DigestAlg, content: &[u8]) -> Result<Vec<u8>> {
    let content_digest = alg.digest(content);
    let Some(attrs) = &info.signed_attrs else {
        return Ok(content_digest);
    };
    let single = |oid: ObjectIdentifier| -> Result<&Any> {
        let mut found = attrs.iter().filter(|a| a.oid == oid);
        match (found.next(), found.next()) {
            (Some(a), None) if a.values.len() == 1 => a
                .values
                .get(0)
                .ok_or_else(|| Error::untrusted("empty signed attribute")),
            _ => Err(Error::untrusted(format!(
                "signed attribute {oid} missing or repeated"
            ))),
        }
    };
    let digest = single(ID_MESSAGE_DIGEST)?
        .decode_as::<OctetString>()
        .map_err(|e| Error::untrusted(format!("malformed message digest: {e}")))?;
    if digest.as_bytes() != content_digest.as_slice() {
        return Err(Error::untrusted(
            "signature is over different content (message digest differs)",
        ));
    }
    let content_type = single(ID_CONTENT_TYPE)?
        .decode_as::<ObjectIdentifier>()
        .map_err(|e| Error::untrusted(format!("malformed content type: {e}")))?;
    if content_type != ID_DATA {
        return Err(Error::untrusted(format!(
            "signed content type {content_type} is not data"
        )));
    }
    // RFC 5652 5.4: the signature covers the attributes encoded as a SET OF.
    let der = attrs
        .to_der()
        .map_err(|e| Error::untrusted(format!("signed attributes: {e}")))?;
    Ok(alg.digest(&der))
}

/// Check the DER `signature` over `content` against the trust store at time
/// `now`; returns the trusted signer or why it was refused.
pub fn verify_signature(
    signature: &[u8],
    content: &[u8],
    trust: &TrustStore,
    now: SystemTime,
) -> Result<TrustedSigner> {
    let info = ContentInfo::from_der(signature)
        .map_err(|e| Error::untrusted(format!("not a DER PKCS#7 signature: {e}")))?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(Error::untrusted(format!(
            "PKCS#7 content type {} is not signedData",
            info.content_type
        )));
    }
    let signed: SignedData = info
        .content
        .decode_as()
        .map_err(|e| Error::untrusted(format!("malformed PKCS#7 signedData: {e}")))?;
    let encap = &signed.encap_content_info;
    if encap.econtent_type != ID_DATA {
        return Err(Error::untrusted("signed content is not of type data"));
    }
    if let Some(embedded) = &encap.econtent {
        // Not detached: the embedded content must be the root hash itself.
        let bytes = embedded
            .decode_as::<OctetString>()
            .map_err(|e| Error::untrusted(format!("malformed embedded content: {e}")))?;
        if bytes.as_bytes() != content {
            return Err(Error::untrusted("signature embeds a different root hash"));
        }
    }
    // Versions as RFC 5652 and the kernel's PKCS#7 parser allow them.
    if !matches!(signed.version, CmsVersion::V1 | CmsVersion::V3) {
        return Err(Error::untrusted(format!(
            "signedData version {:?} is not 1 or 3",
            signed.version
        )));
    }
    let mut first_error = None;
    for signer in signed.signer_infos.0.iter() {
        if let Err(e) = check_signer_form(signer, &signed) {
            first_error.get_or_insert(e);
            continue;
        }
        match verify_signer(signer, content, trust, now) {
            Ok(found) => return Ok(found),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| Error::untrusted("signature has no signer")))
}

/// Parameters of a digest or ECDSA algorithm identifier: absent or NULL.
fn params_absent_or_null(alg: &AlgorithmIdentifierOwned) -> bool {
    alg.parameters
        .as_ref()
        .is_none_or(|p| p.tag() == der::Tag::Null && p.value().is_empty())
}

/// Refuse malleable encodings: the unsigned parts of a SignerInfo must be
/// well formed, so changing any byte of a signature invalidates it.
fn check_signer_form(signer: &SignerInfo, signed: &SignedData) -> Result<()> {
    let version_ok = match signer.sid {
        SignerIdentifier::IssuerAndSerialNumber(_) => signer.version == CmsVersion::V1,
        SignerIdentifier::SubjectKeyIdentifier(_) => signer.version == CmsVersion::V3,
    };
    if !version_ok {
        return Err(Error::untrusted(format!(
            "signerInfo version {:?} does not fit its signer identifier",
            signer.version
        )));
    }
    if !signed
        .digest_algorithms
        .iter()
        .any(|a| *a == signer.digest_alg)
    {
        return Err(Error::untrusted(
            "the signer's digest algorithm is not listed in signedData",
        ));
    }
    if !params_absent_or_null(&signer.digest_alg) {
        return Err(Error::untrusted("digest algorithm has parameters"));
    }
    let sig_params_ok = match signer.signature_algorithm.oid {
        // RFC 5758: ECDSA identifiers have no parameters at all.
        ECDSA_WITH_SHA256 | ECDSA_WITH_SHA384 | ECDSA_WITH_SHA512 => {
            signer.signature_algorithm.parameters.is_none()
        }
        _ => params_absent_or_null(&signer.signature_algorithm),
    };
    if !sig_params_ok {
        return Err(Error::untrusted(
            "signature algorithm has unexpected parameters",
        ));
    }
    if signer.unsigned_attrs.is_some() {
        return Err(Error::untrusted("signerInfo has unsigned attributes"));
    }
    Ok(())
}

fn verify_signer(
    signer: &SignerInfo,
    content: &[u8],
    trust: &TrustStore,
    now: SystemTime,
) -> Result<TrustedSigner> {
    let candidates = trust.matching(&signer.sid);
    if candidates.is_empty() {
        return Err(Error::untrusted(format!(
            "signer ({}) is not in the trust directory",
            describe_sid(&signer.sid)
        )));
    }
    let alg = DigestAlg::from_oid(&signer.digest_alg.oid)?;
    let digest = signed_digest(signer, alg, content)?;
    let mut first_error = None;
    for cert in candidates {
        let key = PublicKey::from_cert(&cert.cert)?;
        if !key.verify(
            &signer.signature_algorithm.oid,
            alg,
            &digest,
            signer.signature.as_bytes(),
        ) {
            first_error.get_or_insert(Error::untrusted(format!(
                "signature does not verify with {} (corrupt, or not over root hash {})",
                cert.path.display(),
                String::from_utf8_lossy(content)
            )));
            continue;
        }
        // Checked after the signature so a forged signature is reported as
        // such, and an expired signer only once it really signed.
        check_cert_use(cert, now)?;
        return Ok(TrustedSigner {
            subject: cert.cert.tbs_certificate.subject.to_string(),
            cert_path: cert.path.clone(),
        });
    }
    Err(first_error.unwrap_or_else(|| Error::untrusted("no matching certificate")))
}

/// Check a signature over `root`'s hex text against the trust store, now.
pub fn verify_root_hash_signature(
    signature: &[u8],
    root: &RootHash,
    trust: &TrustStore,
) -> Result<TrustedSigner> {
    verify_signature(
        signature,
        root.to_hex().as_bytes(),
        trust,
        SystemTime::now(),
    )
}

/// A private key for signing.
enum SigningKey {
    Rsa(Box<RsaPrivateKey>),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

fn parse_key(pem: &[u8]) -> Result<SigningKey> {
    let (label, der) = der::pem::decode_vec(pem)
        .map_err(|e| Error::invalid(format!("private key is not PEM: {e}")))?;
    let bad = |e: &dyn std::fmt::Display| Error::invalid(format!("private key: {e}"));
    match label {
        "PRIVATE KEY" => {
            let info = pkcs8::PrivateKeyInfo::try_from(der.as_slice()).map_err(|e| bad(&e))?;
            match info.algorithm.oid {
                RSA_ENCRYPTION => RsaPrivateKey::from_pkcs8_der(&der)
                    .map(|k| SigningKey::Rsa(Box::new(k)))
                    .map_err(|e| bad(&e)),
                ID_EC_PUBLIC_KEY => match info.algorithm.parameters_oid() {
                    Ok(SECP256R1) => p256::ecdsa::SigningKey::from_pkcs8_der(&der)
                        .map(SigningKey::P256)
                        .map_err(|e| bad(&e)),
                    Ok(SECP384R1) => p384::ecdsa::SigningKey::from_pkcs8_der(&der)
                        .map(SigningKey::P384)
                        .map_err(|e| bad(&e)),
                    _ => Err(Error::Unsupported("private key curve".into())),
                },
                other => Err(Error::Unsupported(format!("private key algorithm {other}"))),
            }
        }
        "RSA PRIVATE KEY" => RsaPrivateKey::from_pkcs1_der(&der)
            .map(|k| SigningKey::Rsa(Box::new(k)))
            .map_err(|e| bad(&e)),
        "EC PRIVATE KEY" => {
            if let Ok(k) = p256::SecretKey::from_sec1_der(&der) {
                Ok(SigningKey::P256(k.into()))
            } else {
                p384::SecretKey::from_sec1_der(&der)
                    .map(|k| SigningKey::P384(k.into()))
                    .map_err(|e| bad(&e))
            }
        }
        "ENCRYPTED PRIVATE KEY" => Err(Error::Unsupported(
            "encrypted private keys (decrypt it with openssl first)".into(),
        )),
        other => Err(Error::invalid(format!(
            "PEM block {other:?} is not a private key"
        ))),
    }
}

/// Sign `content` (the hex root hash) with the PEM private key `key_pem`
/// belonging to the certificate `cert` (PEM or DER): a detached DER
/// PKCS#7 signature with sha256, no signed attributes and no certificates,
/// shaped like `openssl smime -sign -nocerts -noattr -binary -outform der`.
pub fn sign(content: &[u8], key_pem: &[u8], cert: &[u8]) -> Result<Vec<u8>> {
    let key = parse_key(key_pem)?;
    let cert = parse_certificates(cert)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::invalid("no certificate"))?;
    let public = PublicKey::from_cert(&cert).map_err(|e| Error::invalid(e.to_string()))?;
    let digest = Sha256::digest(content);
    let null = Some(Any::null());
    let (signature, sig_alg) = match (&key, &public) {
        (SigningKey::Rsa(k), PublicKey::Rsa(p)) if k.to_public_key() == *p => {
            let sig = k
                .sign_with_rng(
                    &mut rsa::rand_core::OsRng,
                    Pkcs1v15Sign::new::<Sha256>(),
                    &digest,
                )
                .map_err(|e| Error::invalid(format!("RSA signing failed: {e}")))?;
            (
                sig,
                AlgorithmIdentifierOwned {
                    oid: RSA_ENCRYPTION,
                    parameters: null.clone(),
                },
            )
        }
        (SigningKey::P256(k), PublicKey::P256(p)) if k.verifying_key() == p => {
            let sig: p256::ecdsa::Signature = k
                .sign_prehash(&digest)
                .map_err(|e| Error::invalid(format!("ECDSA signing failed: {e}")))?;
            (
                sig.to_der().as_bytes().to_vec(),
                AlgorithmIdentifierOwned {
                    oid: ECDSA_WITH_SHA256,
                    parameters: None,
                },
            )
        }
        (SigningKey::P384(k), PublicKey::P384(p)) if k.verifying_key() == p => {
            let sig: p384::ecdsa::Signature = k
                .sign_prehash(&digest)
                .map_err(|e| Error::invalid(format!("ECDSA signing failed: {e}")))?;
            (
                sig.to_der().as_bytes().to_vec(),
                AlgorithmIdentifierOwned {
                    oid: ECDSA_WITH_SHA256,
                    parameters: None,
                },
            )
        }
        _ => {
            return Err(Error::invalid(
                "the private key does not belong to the certificate",
            ))
        }
    };
    let sha256 = AlgorithmIdentifierOwned {
        oid: ID_SHA256,
        parameters: null,
    };
    let enc = |e: der::Error| Error::invalid(format!("encoding the signature: {e}"));
    let signer = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: cert.tbs_certificate.issuer.clone(),
            serial_number: cert.tbs_certificate.serial_number.clone(),
        }),
        digest_alg: sha256.clone(),
        signed_attrs: None,
        signature_algorithm: sig_alg,
        signature: OctetString::new(signature).map_err(enc)?,
        unsigned_attrs: None,
    };
    let signed = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![sha256]).map_err(enc)?,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: None,
        },
        certificates: None,
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![signer]).map_err(enc)?),
    };
    ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: Any::encode_from(&signed).map_err(enc)?,
    }
    .to_der()
    .map_err(enc)
}

/// Sign `root`'s hex text: [`sign`] over what [`verify_root_hash_signature`]
/// checks.
pub fn sign_root_hash(root: &RootHash, key_pem: &[u8], cert: &[u8]) -> Result<Vec<u8>> {
    sign(root.to_hex().as_bytes(), key_pem, cert)
}
