//! Development certificates: a cluster CA and node certificates, generated with rcgen.
//!
//! `regiond tls ca` / `globald tls ca` and `... tls node` call these. Keys are ECDSA P-256, and
//! certificates are valid for about ten years from an hour ago (the hour absorbs clock skew
//! between the machine that issues them and the nodes). Production clusters may use any CA that
//! issues certificates of the same shape (see `tls`); nothing here is needed at run time.
//!
//! It must not: touch any file other than the two it is asked to write, or overwrite one.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::error::TransportError;
use super::tls::PeerIdentity;

/// How long generated certificates are valid: ten years (dev clusters should not expire under
/// their operators).
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// How far back a certificate's validity starts, so a node whose clock is a little behind the
/// issuer's accepts it at once.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// The organization named in generated certificates.
const ORGANIZATION: &str = "Strata";

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertPair {
    /// The certificate, PEM (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`). Secret.
    pub key_pem: String,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("CertPair")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl CertPair {
    /// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` and returns their paths. The key file
    /// is created with mode 0600 on unix. Refuses to overwrite either file (a CA key replaced
    /// by mistake would orphan every certificate it signed).
    pub fn write(
        &self,
        dir: impl AsRef<Path>,
        stem: &str,
    ) -> Result<(PathBuf, PathBuf), TransportError> {
        let dir = dir.as_ref();
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(TransportError::io(
                    format!("writing {}", path.display()),
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ));
            }
        }
        write_new(&cert_path, self.cert_pem.as_bytes(), false)?;
        write_new(&key_path, self.key_pem.as_bytes(), true)?;
        Ok((cert_path, key_path))
    }
}

/// Creates `path` (it must not exist) and writes `data`; `secret` files get mode 0600 on unix
/// from the moment they exist.
fn write_new(path: &Path, data: &[u8], secret: bool) -> Result<(), TransportError> {
    let context = || format!("writing {}", path.display());
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options
        .open(path)
        .map_err(|e| TransportError::io(context(), e))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|e| TransportError::io(context(), e))
}

/// Generates a self-signed cluster CA named `common_name` (e.g. `strata regional iad CA`).
pub fn generate_ca(common_name: &str) -> Result<CertPair, TransportError> {
    let mut params = named(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Generates a node certificate signed by `ca`, for `identity`.
///
/// Subject alternative names: the URI `strata://<tier>/<region>/<node>`, the DNS name
/// `<region>.<tier>.strata`, then `dns` and `ips` (for clients that dial the node by another
/// name or by address). Extended key usage: server and client authentication, since every node
/// both accepts and dials.
pub fn generate_node(
    ca: &CertPair,
    identity: &PeerIdentity,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<CertPair, TransportError> {
    let now = SystemTime::now();
    generate_node_valid(
        ca,
        identity,
        dns,
        ips,
        now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH),
        now + VALIDITY,
    )
}

/// [`generate_node`] with a chosen validity, `not_before` to `not_after` (whole seconds): for
/// tests of expiry warnings, expired or not-yet-valid certificates, and rotation.
pub fn generate_node_valid(
    ca: &CertPair,
    identity: &PeerIdentity,
    dns: &[String],
    ips: &[IpAddr],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertPair, TransportError> {
    identity.validate()?;
    let issuer = load_issuer(ca)?;

    let mut params = named(identity.node.as_str());
    let mut sans = vec![
        SanType::URI(ia5(identity.uri())?),
        SanType::DnsName(ia5(identity.cluster_name())?),
    ];
    for name in dns {
        sans.push(SanType::DnsName(ia5(name.clone())?));
    }
    sans.extend(ips.iter().copied().map(SanType::IpAddress));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_validity_range(&mut params, not_before, not_after);

    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Generates a client certificate signed by `ca` that names no strata identity: common name
/// `name`, the DNS SAN `name`, client authentication only. Such a certificate is accepted by
/// the API's TLS but may only read (tests, and read-only tools of an operator).
pub fn generate_client_without_identity(
    ca: &CertPair,
    name: &str,
) -> Result<CertPair, TransportError> {
    let issuer = load_issuer(ca)?;
    let mut params = named(name);
    params.subject_alt_names = vec![SanType::DnsName(ia5(name.to_owned())?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Certificate parameters whose subject is our organization and `common_name`.
fn named(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
}

/// Validity from `not_before` to `not_after`, in whole seconds (a time before the epoch counts
/// as the epoch).
fn set_validity_range(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) {
    let secs = |t: SystemTime| {
        Duration::from_secs(
            t.duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs(),
        )
    };
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + secs(not_before);
    params.not_after = epoch + secs(not_after);
}

/// From an hour ago to ten years from now.
fn set_validity(params: &mut CertificateParams) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(BACKDATE);
    params.not_after = epoch + since_epoch + VALIDITY;
}

fn ia5(s: String) -> Result<rcgen::string::Ia5String, TransportError> {
    rcgen::string::Ia5String::try_from(s.as_str())
        .map_err(|e| TransportError::InvalidIdentity(format!("{s:?} is not ASCII: {e}")))
}

/// The CA as an rcgen issuer: its key, and its subject name copied from its certificate so the
/// node certificate's issuer field matches it byte for byte (webpki chains by name).
fn load_issuer(ca: &CertPair) -> Result<Issuer<'static, KeyPair>, TransportError> {
    let key = KeyPair::from_pem(&ca.key_pem)?;
    let der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).map_err(|e| {
        TransportError::Pem {
            what: "CA certificate".into(),
            reason: e.to_string(),
        }
    })?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| TransportError::Certificate(format!("CA does not parse: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = copy_name(cert.subject())?;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(Issuer::new(params, key))
}

/// An rcgen name with the same attributes, in the same order and string types, as `name`.
fn copy_name(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName, TransportError> {
    use x509_parser::asn1_rs::Tag;

    let unsupported =
        |why: &str| TransportError::Certificate(format!("CA subject name not supported: {why}"));
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(unsupported(
                "a name component with other than one attribute",
            ));
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| unsupported("an attribute type OID too large"))?
            .collect();
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data).map_err(|_| unsupported("non-UTF-8 text"))?;
        let value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| unsupported("a bad PrintableString"))?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                text.try_into()
                    .map_err(|_| unsupported("a bad IA5String"))?,
            ),
            _ => {
                return Err(unsupported(
                    "a string type other than UTF8, Printable or IA5",
                ));
            }
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::{Tier, TlsConfig, identity_from_der};

    #[test]
    fn node_certificate_names_its_identity() {
        let ca = generate_ca("test CA").unwrap();
        let identity = PeerIdentity::new("node-7", Tier::Regional, "iad").unwrap();
        let ips = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let node = generate_node(&ca, &identity, &["node-7.example".into()], &ips).unwrap();

        let der = CertificateDer::from_pem_slice(node.cert_pem.as_bytes()).unwrap();
        assert_eq!(identity_from_der(&der).unwrap(), identity);

        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            names.iter().any(|n| n.contains("iad.regional.strata")),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n.contains("node-7.example")),
            "{names:?}"
        );
        // webpki chains by name: the issuer field must equal the CA's subject byte for byte.
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());

        let tls = TlsConfig::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        assert_eq!(tls.identity(), &identity);
    }

    #[test]
    fn ca_certificate_has_no_identity() {
        let ca = generate_ca("test CA").unwrap();
        let err = TlsConfig::from_pem(&ca.cert_pem, &ca.cert_pem, &ca.key_pem).unwrap_err();
        assert!(matches!(err, TransportError::Certificate(_)), "{err}");
    }

    #[test]
    fn invalid_identity_is_refused() {
        let ca = generate_ca("test CA").unwrap();
        let bad = PeerIdentity {
            node: "a/b".into(),
            tier: Tier::Global,
            region: "iad".into(),
        };
        assert!(generate_node(&ca, &bad, &[], &[]).is_err());
    }

    #[test]
    fn write_creates_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA").unwrap();
        let (crt, key) = ca.write(dir.path(), "ca").unwrap();
        assert_eq!(std::fs::read_to_string(&crt).unwrap(), ca.cert_pem);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), ca.key_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(ca.write(dir.path(), "ca").is_err());

        let identity = PeerIdentity::new("n1", Tier::Global, "fra").unwrap();
        let node = generate_node(&ca, &identity, &[], &[]).unwrap();
        let (ncrt, nkey) = node.write(dir.path(), "n1").unwrap();
        let tls = TlsConfig::load(&crt, &ncrt, &nkey).unwrap();
        assert_eq!(tls.identity(), &identity);
    }
}
