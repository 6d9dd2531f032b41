//! Node identities and mutual TLS.
//!
//! A cluster has its own CA. A node certificate, signed by it, carries:
//!
//! - a URI SAN `strata://<tier>/<region>/<node>`: the node's [`PeerIdentity`];
//! - a DNS SAN `<region>.<tier>.strata`: the name every member of the cluster presents, and the
//!   TLS server name a node dials with, so a server of another tier or region fails the ordinary
//!   name check;
//! - any extra DNS or IP SANs the operator asked for (for gRPC clients that dial by address).
//!
//! On top of the chain and name checks of webpki, both directions check the URI identity: a
//! [`TlsConfig`] only completes a QUIC handshake with a peer of its own tier and region, and
//! rejects any other in the handshake with an error that names the peer and what was expected.
//!
//! This module builds rustls configurations with the ring provider explicitly
//! (`builder_with_provider`) and installs nothing process-wide. Binaries still call
//! `rustls::crypto::ring::default_provider().install_default()` at start, because tonic's TLS
//! server builds its own configuration with the process default provider.
//!
//! It must not: know anything about membership, SQL or gRPC services; read files other than the
//! ones it is given.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};

use super::error::TransportError;
use super::material::{LoadedTls, TlsFiles, load_checked};

/// The ALPN protocol of node-to-node QUIC connections. A peer that does not offer it fails the
/// handshake, so an incompatible wire protocol is refused before any frame is read.
pub const ALPN_QUIC: &[u8] = b"strata/1";

/// The URI scheme of node identities in certificates.
const URI_SCHEME: &str = "strata://";

/// The DNS suffix of cluster names (`<region>.<tier>.strata`).
const CLUSTER_DOMAIN: &str = "strata";

/// Longest node name, in bytes. Node names travel in every certificate and log line; 128 is
/// generous for a hostname-like id.
const NODE_NAME_LEN_MAX: usize = 128;

/// Longest region name, in bytes: a DNS label.
const REGION_NAME_LEN_MAX: usize = 63;

/// The tier a node belongs to. Regional and global clusters never peer with each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// A `regiond` cluster: one region's per-Machine rows.
    Regional,
    /// The `globald` cluster: the application-to-region map.
    Global,
}

impl Tier {
    /// The lowercase name used in certificates, names and config (`regional`, `global`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Regional => "regional",
            Tier::Global => "global",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "regional" => Ok(Tier::Regional),
            "global" => Ok(Tier::Global),
            other => Err(TransportError::InvalidIdentity(format!(
                "unknown tier {other:?} (expected \"regional\" or \"global\")"
            ))),
        }
    }
}

/// Who a node is, as its certificate says: name, tier and region.
///
/// The fields are public for convenience; [`PeerIdentity::new`] and every parser validate them,
/// and certificate generation refuses an invalid one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The node's name, unique in its cluster: 1 to 128 bytes of `[A-Za-z0-9._-]`.
    pub node: String,
    /// The node's tier.
    pub tier: Tier,
    /// The node's region: a lowercase DNS label (`[a-z0-9-]`, 1 to 63 bytes, no leading or
    /// trailing `-`). Global nodes also name the region they run in.
    pub region: String,
}

impl PeerIdentity {
    /// A validated identity.
    pub fn new(
        node: impl Into<String>,
        tier: Tier,
        region: impl Into<String>,
    ) -> Result<Self, TransportError> {
        let identity = Self {
            node: node.into(),
            tier,
            region: region.into(),
        };
        identity.validate()?;
        Ok(identity)
    }

    /// Checks the node and region names (see the field docs).
    pub fn validate(&self) -> Result<(), TransportError> {
        validate_node(&self.node)?;
        validate_region(&self.region)
    }

    /// The URI SAN: `strata://<tier>/<region>/<node>`.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}/{}", self.tier, self.region, self.node)
    }

    /// Parses and validates a `strata://<tier>/<region>/<node>` URI.
    pub fn from_uri(uri: &str) -> Result<Self, TransportError> {
        let rest = uri.strip_prefix(URI_SCHEME).ok_or_else(|| {
            TransportError::InvalidIdentity(format!("{uri:?} does not start with {URI_SCHEME}"))
        })?;
        let mut parts = rest.split('/');
        let (Some(tier), Some(region), Some(node), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TransportError::InvalidIdentity(format!(
                "{uri:?} is not {URI_SCHEME}<tier>/<region>/<node>"
            )));
        };
        Self::new(node, tier.parse()?, region)
    }

    /// The cluster's DNS name, `<region>.<tier>.strata`: the TLS server name every node of this
    /// cluster presents and dials with.
    pub fn cluster_name(&self) -> String {
        cluster_name(self.tier, &self.region)
    }

    /// Whether `other` belongs to the same cluster (same tier and region).
    pub fn same_cluster(&self, other: &PeerIdentity) -> bool {
        self.tier == other.tier && self.region == other.region
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{URI_SCHEME}{}/{}/{}", self.tier, self.region, self.node)
    }
}

/// `<region>.<tier>.strata`.
fn cluster_name(tier: Tier, region: &str) -> String {
    format!("{region}.{tier}.{CLUSTER_DOMAIN}")
}

fn validate_node(node: &str) -> Result<(), TransportError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if node.is_empty() || node.len() > NODE_NAME_LEN_MAX || !node.chars().all(ok_char) {
        return Err(TransportError::InvalidIdentity(format!(
            "node name {node:?} must be 1 to {NODE_NAME_LEN_MAX} bytes of [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

fn validate_region(region: &str) -> Result<(), TransportError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if region.is_empty()
        || region.len() > REGION_NAME_LEN_MAX
        || !region.chars().all(ok_char)
        || region.starts_with('-')
        || region.ends_with('-')
    {
        return Err(TransportError::InvalidIdentity(format!(
            "region {region:?} must be a lowercase DNS label: 1 to {REGION_NAME_LEN_MAX} bytes \
             of [a-z0-9-], not starting or ending with '-'"
        )));
    }
    Ok(())
}

/// Reads the strata identity out of a DER certificate: its one `strata://` URI SAN.
///
/// Errors if the certificate does not parse, has no such SAN, or has more than one.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, TransportError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TransportError::Certificate(format!("does not parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TransportError::Certificate(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| TransportError::Certificate("no subjectAltName extension".into()))?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with(URI_SCHEME) => {
                Some(*uri)
            }
            _ => None,
        });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(TransportError::Certificate(format!(
            "expected exactly one {URI_SCHEME} URI in subjectAltName"
        )));
    };
    PeerIdentity::from_uri(uri)
        .map_err(|e| TransportError::Certificate(format!("bad identity URI: {e}")))
}

/// The verified identity of the peer of a QUIC connection, read from its certificate.
///
/// `None` if the connection has no peer certificate (never the case for connections made by
/// [`super::Transport`], whose handshakes require one) or it carries no valid identity.
pub fn peer_identity(conn: &quinn::Connection) -> Option<PeerIdentity> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    identity_from_der(chain.first()?).ok()
}

/// The certificate the peer of a QUIC connection presented (its own, first in its chain).
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// A predicate over peer identities, shared by the verifiers.
type PeerFilter = Arc<dyn Fn(&PeerIdentity) -> bool + Send + Sync>;

/// A node's TLS material: the cluster CA, its certificate chain and key, and the identity its
/// certificate names. Builds the QUIC and rustls configurations the node needs.
pub struct TlsConfig {
    /// The cluster CA (one or more certificates, e.g. during a CA rotation).
    roots: Arc<RootCertStore>,
    /// This node's certificate first, then any intermediates.
    chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    key: PrivateKeyDer<'static>,
    /// The identity in `chain[0]`.
    identity: PeerIdentity,
    /// ring, always; never the process default.
    provider: Arc<CryptoProvider>,
}

impl Clone for TlsConfig {
    fn clone(&self) -> Self {
        Self {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
            provider: self.provider.clone(),
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("TlsConfig")
            .field("identity", &self.identity)
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Builds the configuration from PEM text: the CA bundle, this node's certificate chain
    /// (its own certificate first) and its private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// Checks everything it can without a peer: the PEM parses, the certificate carries a
    /// strata identity, and rustls accepts the key with the certificate.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        let ca = parse_certs("CA bundle", ca_pem)?;
        let chain = parse_certs("certificate chain", cert_pem)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TransportError::Pem {
                what: "private key".into(),
                reason: e.to_string(),
            })?;
        Self::from_der(ca, chain, key)
    }

    /// Reads the three PEM files, checks them (see [`load_checked`]: readable, PEM, within
    /// validity now, key matching, signed by the CA) and builds the configuration. Every error
    /// names the file at fault.
    pub fn load(
        ca_path: impl AsRef<Path>,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TransportError> {
        let files = TlsFiles {
            ca: ca_path.as_ref().to_owned(),
            cert: cert_path.as_ref().to_owned(),
            key: key_path.as_ref().to_owned(),
        };
        let loaded = load_checked(&files, std::time::SystemTime::now())?;
        Self::from_loaded(&loaded)
    }

    /// The configuration of checked material; an error naming the certificate file if it
    /// carries no strata identity.
    pub fn from_loaded(loaded: &LoadedTls) -> Result<Self, TransportError> {
        Self::from_der(
            loaded.roots.clone(),
            loaded.chain.clone(),
            loaded.key.clone_key(),
        )
        .map_err(|e| match e {
            TransportError::Certificate(reason) | TransportError::InvalidIdentity(reason) => {
                TransportError::CertFile {
                    path: loaded.files.cert.clone(),
                    reason,
                }
            }
            other => other,
        })
    }

    fn from_der(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TransportError> {
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| TransportError::Pem {
                what: "CA bundle".into(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let leaf = chain.first().ok_or_else(|| TransportError::Pem {
            what: "certificate chain".into(),
            reason: "no certificate".into(),
        })?;
        let identity = identity_from_der(leaf)?;
        let config = Self {
            roots: Arc::new(roots),
            chain,
            key,
            identity,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        // Fail now, not at the first handshake, if rustls refuses the key or the CA, or if
        // peers would refuse our certificate.
        config.quic_server_config()?;
        config.quic_client_config()?;
        config.check_own_certificate()?;
        Ok(config)
    }

    /// Verifies our own certificate as a peer would: it chains to the CA, is valid now, and
    /// names our cluster.
    fn check_own_certificate(&self) -> Result<(), TransportError> {
        let verifier =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()?;
        let name = ServerName::try_from(self.server_name()).map_err(|e| {
            TransportError::InvalidIdentity(format!("cluster name {}: {e}", self.server_name()))
        })?;
        let (leaf, intermediates) = match self.chain.split_first() {
            Some(split) => split,
            None => return Err(TransportError::Certificate("empty chain".into())),
        };
        verifier
            .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
            .map_err(|e| {
                TransportError::Certificate(format!(
                    "this node's certificate would be refused by its peers: {e}"
                ))
            })?;
        Ok(())
    }

    /// The identity this node's certificate names.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// The QUIC stateless-reset key of this node, derived from its private key, so that a
    /// restarted process can reset its predecessor's connections (see `reset`).
    pub(crate) fn stateless_reset_key(&self) -> Arc<dyn quinn::crypto::HmacKey> {
        Arc::new(super::reset::ResetKey::derive(self.key.secret_der()))
    }

    /// The TLS server name of this node's cluster, `<region>.<tier>.strata`.
    pub fn server_name(&self) -> String {
        self.identity.cluster_name()
    }

    /// The rustls server configuration for node-to-node QUIC: TLS 1.3, ALPN [`ALPN_QUIC`], a
    /// client certificate is required, must chain to the CA and must name a node of this
    /// node's tier and region.
    pub fn quic_rustls_server_config(&self) -> Result<rustls::ServerConfig, TransportError> {
        let (filter, expected) = self.same_cluster_filter();
        let mut config = self.server_config_with(filter, expected)?;
        config.alpn_protocols = vec![ALPN_QUIC.to_vec()];
        Ok(config)
    }

    /// The rustls client configuration for node-to-node QUIC: TLS 1.3, ALPN [`ALPN_QUIC`], our
    /// certificate as the client certificate; the server must chain to the CA, be valid for the
    /// dialed server name, and name a node of this node's tier and region.
    pub fn quic_rustls_client_config(&self) -> Result<rustls::ClientConfig, TransportError> {
        let (filter, expected) = self.same_cluster_filter();
        let mut config = self.client_config_with(filter, expected)?;
        config.alpn_protocols = vec![ALPN_QUIC.to_vec()];
        Ok(config)
    }

    /// A quinn server configuration from [`TlsConfig::quic_rustls_server_config`], with quinn's
    /// default transport settings (the endpoint sets its own).
    pub fn quic_server_config(&self) -> Result<quinn::ServerConfig, TransportError> {
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(self.quic_rustls_server_config()?)
                .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
    }

    /// A quinn client configuration from [`TlsConfig::quic_rustls_client_config`], with quinn's
    /// default transport settings (the endpoint sets its own).
    pub fn quic_client_config(&self) -> Result<quinn::ClientConfig, TransportError> {
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(self.quic_rustls_client_config()?)
                .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        Ok(quinn::ClientConfig::new(Arc::new(crypto)))
    }

    /// A rustls server configuration for other protocols on the same CA (the gRPC API): TLS 1.3,
    /// this node's certificate, and a required client certificate that chains to the CA and
    /// whose identity `accept` approves. ALPN is left empty: set `alpn_protocols` for the
    /// protocol served (`h2` for gRPC).
    pub fn rustls_server_config<F>(&self, accept: F) -> Result<rustls::ServerConfig, TransportError>
    where
        F: Fn(&PeerIdentity) -> bool + Send + Sync + 'static,
    {
        self.server_config_with(
            Arc::new(accept),
            "a peer this server's filter accepts".into(),
        )
    }

    /// A rustls client configuration for other protocols on the same CA (the gRPC API): TLS 1.3,
    /// this node's certificate as the client certificate, and a server that chains to the CA,
    /// is valid for the server name the connector dials with, and whose identity `accept`
    /// approves. ALPN is left empty.
    pub fn rustls_client_config<F>(&self, accept: F) -> Result<rustls::ClientConfig, TransportError>
    where
        F: Fn(&PeerIdentity) -> bool + Send + Sync + 'static,
    {
        self.client_config_with(
            Arc::new(accept),
            "a server this client's filter accepts".into(),
        )
    }

    /// The rustls server configuration of the gRPC API: TLS 1.2 or 1.3 (gRPC clients in other
    /// languages may lack 1.3), ALPN `h2`, this node's certificate, and a required client
    /// certificate that chains to the CA. It does not require a strata identity: a certificate
    /// without one may read, and the API decides per request who may write (`api::caller`).
    pub fn api_server_config(loaded: &LoadedTls) -> Result<rustls::ServerConfig, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in &loaded.roots {
            roots
                .add(cert.clone())
                .map_err(|e| TransportError::CertFile {
                    path: loaded.files.ca.clone(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(loaded.chain.clone(), loaded.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    fn same_cluster_filter(&self) -> (PeerFilter, String) {
        let ours = self.identity.clone();
        let expected = format!("a {} node of region {}", ours.tier, ours.region);
        (Arc::new(move |peer| ours.same_cluster(peer)), expected)
    }

    fn server_config_with(
        &self,
        accept: PeerFilter,
        expected: String,
    ) -> Result<rustls::ServerConfig, TransportError> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()?;
        let verifier = Arc::new(IdentityClientVerifier {
            inner,
            accept,
            expected,
        });
        let config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(config)
    }

    fn client_config_with(
        &self,
        accept: PeerFilter,
        expected: String,
    ) -> Result<rustls::ClientConfig, TransportError> {
        let inner =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()?;
        let verifier = Arc::new(IdentityServerVerifier {
            inner,
            accept,
            expected,
        });
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(config)
    }
}

/// Every certificate in a PEM text; an error if there is none or one does not parse.
fn parse_certs(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Pem {
            what: what.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TransportError::Pem {
            what: what.into(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Checks a peer certificate's identity after webpki has checked its chain; the error names
/// the peer and what was expected.
fn check_identity(
    end_entity: &CertificateDer<'_>,
    accept: &PeerFilter,
    expected: &str,
) -> Result<(), rustls::Error> {
    // A certificate without a strata identity is as unacceptable as one of another cluster.
    let peer = identity_from_der(end_entity).map_err(other_error)?;
    if accept(&peer) {
        Ok(())
    } else {
        Err(other_error(TransportError::PeerRejected {
            peer,
            expected: expected.to_owned(),
        }))
    }
}

/// Wraps our error so rustls reports it verbatim (`Error::Other` displays its source, and quinn
/// sends that text to the peer as the close reason).
fn other_error(e: TransportError) -> rustls::Error {
    rustls::Error::Other(rustls::OtherError(Arc::new(e)))
}

/// webpki's client verifier plus the identity check.
struct IdentityClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    accept: PeerFilter,
    expected: String,
}

impl fmt::Debug for IdentityClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityClientVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for IdentityClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.accept, &self.expected)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// webpki's server verifier (chain and server name) plus the identity check.
struct IdentityServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    accept: PeerFilter,
    expected: String,
}

impl fmt::Debug for IdentityServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_identity(end_entity, &self.accept, &self.expected)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_round_trips_through_text_and_serde() {
        for tier in [Tier::Regional, Tier::Global] {
            assert_eq!(tier.to_string().parse::<Tier>().unwrap(), tier);
            let json = serde_json::to_string(&tier).unwrap();
            assert_eq!(json, format!("\"{tier}\""));
            assert_eq!(serde_json::from_str::<Tier>(&json).unwrap(), tier);
        }
        assert!("Regional".parse::<Tier>().is_err());
    }

    #[test]
    fn identity_uri_round_trips() {
        let id = PeerIdentity::new("node-1.a_b", Tier::Regional, "iad-2").unwrap();
        assert_eq!(id.uri(), "strata://regional/iad-2/node-1.a_b");
        assert_eq!(id.to_string(), id.uri());
        assert_eq!(PeerIdentity::from_uri(&id.uri()).unwrap(), id);
        assert_eq!(id.cluster_name(), "iad-2.regional.strata");
    }

    #[test]
    fn bad_identities_are_refused() {
        for uri in [
            "strata://regional/iad",
            "strata://regional/iad/n/extra",
            "strata://local/iad/n",
            "strata://regional/IAD/n",
            "strata://regional/-iad/n",
            "strata://regional//n",
            "strata://regional/iad/",
            "strata://regional/iad/n%2F",
            "https://regional/iad/n",
        ] {
            assert!(PeerIdentity::from_uri(uri).is_err(), "{uri} accepted");
        }
        let long = "x".repeat(NODE_NAME_LEN_MAX + 1);
        assert!(PeerIdentity::new(long, Tier::Global, "iad").is_err());
        assert!(PeerIdentity::new("n", Tier::Global, "a".repeat(64)).is_err());
    }

    #[test]
    fn garbage_der_is_an_error() {
        assert!(identity_from_der(&[]).is_err());
        assert!(identity_from_der(&[0x30, 0x03, 0x01, 0x01, 0xff]).is_err());
    }
}
