//! Certificate files as a node uses them: reading a CA bundle, a certificate chain and a key
//! from disk, checking that they can be used, and describing them (serial, validity).
//!
//! [`load_checked`] is the one gate every configured certificate passes, at start and on every
//! reload: the files are readable and PEM, every certificate parses, the CA and the node's
//! certificate are within their validity, the key belongs to the certificate, and the
//! certificate chains to the CA. Each failure is a [`TransportError::CertFile`] naming the file
//! at fault and the reason, so an operator can fix it without reading code.
//!
//! It must not: keep state, watch files (see `watch`), or know which subsystem uses the files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;

use super::error::TransportError;

/// The three files of one TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA bundle (PEM, one or more certificates).
    pub ca: PathBuf,
    /// The certificate chain (PEM, the node's own certificate first).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What a certificate says about itself, for logs, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The serial number, hex (as x509-parser prints it).
    pub serial: String,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertInfo {
    /// Reads serial and validity out of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, TransportError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TransportError::Certificate(format!("does not parse: {e}")))?;
        Ok(CertInfo {
            serial: cert.raw_serial_as_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Seconds from `now` until the certificate expires (negative once it has).
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        self.not_after.saturating_sub(unix_seconds(now))
    }
}

/// A checked TLS configuration read from its files.
pub struct LoadedTls {
    /// Where it was read from.
    pub files: TlsFiles,
    /// The CA bundle.
    pub roots: Vec<CertificateDer<'static>>,
    /// The certificate chain, own certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// The own certificate's serial and validity.
    pub leaf: CertInfo,
    /// The CA certificate that expires first.
    pub ca: CertInfo,
    /// The raw bytes of the three files, to tell a changed file from an unchanged one.
    pub contents: Vec<u8>,
}

impl std::fmt::Debug for LoadedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("LoadedTls")
            .field("files", &self.files)
            .field("leaf", &self.leaf)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl Clone for LoadedTls {
    fn clone(&self) -> Self {
        Self {
            files: self.files.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            leaf: self.leaf.clone(),
            ca: self.ca.clone(),
            contents: self.contents.clone(),
        }
    }
}

/// The raw bytes of the three files, concatenated with their lengths (cheap change detection).
pub fn read_contents(files: &TlsFiles) -> Result<Vec<u8>, TransportError> {
    let mut out = Vec::new();
    for path in [&files.ca, &files.cert, &files.key] {
        let bytes = read(path)?;
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// Whether a certificate must chain to the CA of its own configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainCheck {
    /// The CA file is the one peers verify this certificate with (gossip, the API, the
    /// publisher): a certificate it did not sign is refused.
    Required,
    /// The CA file verifies the other side only, and this certificate comes from another CA
    /// (globald's route certificate, from the route CA, beside a bundle of the regions' CAs).
    Skipped,
}

/// Reads and checks the three files at time `now`; see the module doc for what is checked.
pub fn load_checked(files: &TlsFiles, now: SystemTime) -> Result<LoadedTls, TransportError> {
    load_checked_with(files, now, ChainCheck::Required)
}

/// [`load_checked`], with the chain check as `chain` says.
pub fn load_checked_with(
    files: &TlsFiles,
    now: SystemTime,
    chain_check: ChainCheck,
) -> Result<LoadedTls, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_bytes = read(&files.ca)?;
    let cert_bytes = read(&files.cert)?;
    let key_bytes = read(&files.key)?;

    let roots = parse_certs(&files.ca, &ca_bytes)?;
    let mut ca_info: Option<CertInfo> = None;
    for der in &roots {
        let info = check_validity(&files.ca, der, now)?;
        if ca_info
            .as_ref()
            .is_none_or(|c| info.not_after < c.not_after)
        {
            ca_info = Some(info);
        }
    }
    let chain = parse_certs(&files.cert, &cert_bytes)?;
    let mut leaf = None;
    for der in &chain {
        let info = check_validity(&files.cert, der, now)?;
        leaf.get_or_insert(info);
    }
    let (Some(ca), Some(leaf)) = (ca_info, leaf) else {
        // parse_certs refuses empty bundles; this is unreachable but not worth a panic.
        return Err(file_error(&files.cert, "no certificate"));
    };

    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| file_error(&files.key, format!("not a PEM private key: {e}")))?;
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| file_error(&files.key, format!("unusable private key: {e}")))?;
    match CertifiedKey::new(chain.clone(), signing).keys_match() {
        // A key type whose public half rustls cannot derive is checked by the first handshake.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(file_error(
                &files.key,
                format!(
                    "does not match the certificate in {}: {e}",
                    files.cert.display()
                ),
            ));
        }
    }
    if chain_check == ChainCheck::Required {
        check_chain(files, &roots, &chain, &provider, now)?;
    }

    let mut contents = Vec::new();
    for bytes in [&ca_bytes, &cert_bytes, &key_bytes] {
        contents.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        contents.extend_from_slice(bytes);
    }
    Ok(LoadedTls {
        files: files.clone(),
        roots,
        chain,
        key,
        leaf,
        ca,
        contents,
    })
}

/// Seconds since the Unix epoch (0 for a clock before it).
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn file_error(path: &Path, reason: impl Into<String>) -> TransportError {
    TransportError::CertFile {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| file_error(path, format!("unreadable: {e}")))
}

/// Every certificate of a PEM file; an error naming the file if there is none or one does
/// not parse as X.509.
fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "not PEM: no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// The certificate's info, or an error if it is expired or not yet valid at `now`.
fn check_validity(
    path: &Path,
    der: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<CertInfo, TransportError> {
    let info = CertInfo::from_der(der).map_err(|e| file_error(path, e.to_string()))?;
    let now_s = unix_seconds(now);
    if now_s > info.not_after {
        return Err(file_error(
            path,
            format!(
                "certificate {} expired {} s ago (not after {} s since the epoch)",
                info.serial,
                now_s - info.not_after,
                info.not_after
            ),
        ));
    }
    if now_s < info.not_before {
        return Err(file_error(
            path,
            format!(
                "certificate {} is not yet valid: valid in {} s (not before {} s since the epoch)",
                info.serial,
                info.not_before - now_s,
                info.not_before
            ),
        ));
    }
    Ok(info)
}

/// Checks that the chain leads to one of the roots, as a peer will check it: as a client
/// certificate, or failing that (a certificate issued for serving only) as a server
/// certificate for one of its own DNS names.
fn check_chain(
    files: &TlsFiles,
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    provider: &Arc<CryptoProvider>,
    now: SystemTime,
) -> Result<(), TransportError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .map_err(|e| file_error(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let store = Arc::new(store);
    let (leaf, intermediates) = match chain.split_first() {
        Some(split) => split,
        None => return Err(file_error(&files.cert, "no certificate")),
    };
    let now = UnixTime::since_unix_epoch(
        now.duration_since(UNIX_EPOCH)
            .unwrap_or(std::time::Duration::ZERO),
    );
    let not_ours = |e: rustls::Error| {
        file_error(
            &files.cert,
            format!("not signed by the CA in {}: {e}", files.ca.display()),
        )
    };
    let client = WebPkiClientVerifier::builder_with_provider(store.clone(), provider.clone())
        .build()
        .map_err(|e| file_error(&files.ca, format!("unusable CA bundle: {e}")))?;
    let client_result = client.verify_client_cert(leaf, intermediates, now);
    let client_err = match client_result {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    if !matches!(
        client_err,
        rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurpose)
            | rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurposeContext { .. }
            )
    ) {
        return Err(not_ours(client_err));
    }
    // A server-only certificate: check it for the names it claims.
    let server = WebPkiServerVerifier::builder_with_provider(store, provider.clone())
        .build()
        .map_err(|e| file_error(&files.ca, format!("unusable CA bundle: {e}")))?;
    for name in dns_names(leaf) {
        let Ok(name) = ServerName::try_from(name) else {
            continue;
        };
        if server
            .verify_server_cert(leaf, intermediates, &name, &[], now)
            .is_ok()
        {
            return Ok(());
        }
    }
    Err(not_ours(client_err))
}

/// The DNS names in a certificate's subjectAltName.
fn dns_names(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}
