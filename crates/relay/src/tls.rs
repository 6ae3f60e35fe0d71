//! TLS both ways, with rustls and its ring provider: the STARTTLS acceptor for intake and
//! each domain's outbound TLS settings.
//!
//! Outbound, as with Postfix's `smtp_tls_security_level`: `opportunistic` (`may`) and
//! `required` without `tls_ca` (`encrypt`) encrypt without checking the certificate, since a
//! customer's servers often present self-signed ones; `required` with `tls_ca` (`secure`)
//! also checks the chain and the server's name (or IP address) against that CA.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, CommonState, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
pub use tokio_rustls::TlsAcceptor;
use tokio_rustls::TlsConnector;

use crate::config::{ConfigProblem, DeliveryConfig, DomainConfig, RelayConfig, TlsMode};
use mxrelay_policy_core::Severity;

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

fn problem(location: &str, message: String) -> ConfigProblem {
    ConfigProblem { location: location.into(), severity: Severity::Error, message }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file", path.display()));
    }
    Ok(certs)
}

/// The STARTTLS acceptor for `[relay] tls_cert`/`tls_key`, or `None` when they are unset.
/// Errors name the key and the file.
pub fn acceptor(relay: &RelayConfig) -> Result<Option<TlsAcceptor>, ConfigProblem> {
    let (Some(cert), Some(key)) = (&relay.tls_cert, &relay.tls_key) else { return Ok(None) };
    let chain = read_certs(cert).map_err(|e| problem("relay.tls_cert", e))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| problem("relay.tls_key", format!("{}: no usable PEM private key: {e}", key.display())))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| problem("relay.tls_key", format!("does not fit relay.tls_cert: {e}")))?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// A domain's outbound TLS: the mode and the client configuration for the handshake.
#[derive(Clone)]
pub struct OutboundTls {
    /// Whether STARTTLS is used, tried, or required.
    pub mode: TlsMode,
    /// Whether the certificate is checked against `tls_ca`.
    pub verified: bool,
    connector: TlsConnector,
    /// Idle connections are shared only between domains with the same settings.
    pool: Arc<str>,
}

impl std::fmt::Debug for OutboundTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundTls").field("mode", &self.mode).field("verified", &self.verified).finish_non_exhaustive()
    }
}

/// The certificate the relay presents to servers that ask for one
/// (`[delivery] tls_client_cert`/`tls_client_key`).
#[derive(Debug)]
struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The certificate file, to keep pools of different identities apart.
    label: String,
}

impl ClientIdentity {
    /// `builder` finished with this identity; the key's error names `delivery.tls_client_key`.
    fn client_config(
        &self,
        builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    ) -> Result<ClientConfig, ConfigProblem> {
        builder
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| problem("delivery.tls_client_key", format!("does not fit delivery.tls_client_cert: {e}")))
    }
}

/// `builder` finished with the relay's client certificate, if it has one.
fn with_identity(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<&ClientIdentity>,
) -> Result<ClientConfig, ConfigProblem> {
    match identity {
        Some(identity) => identity.client_config(builder),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// What the outbound TLS of every domain shares: the relay's client certificate, if it
/// presents one, and one client configuration for all servers whose certificate is not
/// checked.
#[derive(Clone)]
pub struct ClientTls {
    identity: Option<Arc<ClientIdentity>>,
    unverified: TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("identity", &self.identity.as_ref().map(|i| &i.label)).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// No client certificate.
    pub fn anonymous() -> ClientTls {
        static ANONYMOUS: OnceLock<TlsConnector> = OnceLock::new();
        let unverified = ANONYMOUS.get_or_init(|| unverified_connector(None).expect("no client certificate to refuse"));
        ClientTls { identity: None, unverified: unverified.clone() }
    }

    /// The client certificate the delivery settings name, if any. The files are read now, so
    /// a renewed certificate takes effect on reload. Errors name the key.
    pub fn load(delivery: &DeliveryConfig) -> Result<ClientTls, ConfigProblem> {
        let (Some(cert), Some(key)) = (&delivery.tls_client_cert, &delivery.tls_client_key) else {
            return Ok(ClientTls::anonymous());
        };
        let chain = read_certs(cert).map_err(|e| problem("delivery.tls_client_cert", e))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| problem("delivery.tls_client_key", format!("{}: no usable PEM private key: {e}", key.display())))?;
        let identity = ClientIdentity { chain, key, label: cert.display().to_string() };
        // Checks the pair once, here, so that no domain's settings fail on it later.
        let unverified = unverified_connector(Some(&identity))?;
        Ok(ClientTls { identity: Some(Arc::new(identity)), unverified })
    }

    /// Opportunistic TLS without certificate checks (notifications via `bounce_relay`).
    pub fn opportunistic(&self) -> OutboundTls {
        self.unverified(TlsMode::Opportunistic)
    }

    fn unverified(&self, mode: TlsMode) -> OutboundTls {
        OutboundTls { mode, verified: false, connector: self.unverified.clone(), pool: self.pool_key(mode.as_str()) }
    }

    /// The pool key of TLS settings `base` with this identity.
    fn pool_key(&self, base: &str) -> Arc<str> {
        match &self.identity {
            Some(identity) => format!("{base}+as+{}", identity.label).into(),
            None => base.into(),
        }
    }
}

/// The client side for servers whose certificate is not checked.
fn unverified_connector(identity: Option<&ClientIdentity>) -> Result<TlsConnector, ConfigProblem> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem("delivery", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider().signature_verification_algorithms)));
    with_identity(builder, identity).map(|config| TlsConnector::from(Arc::new(config)))
}

impl OutboundTls {
    /// The settings of `domain`, presenting `client`'s certificate if a server asks for one.
    /// Errors name the domain and `tls_ca`.
    pub fn for_domain(domain: &DomainConfig, client: &ClientTls) -> Result<OutboundTls, ConfigProblem> {
        let Some(ca) = &domain.tls_ca else { return Ok(client.unverified(domain.tls)) };
        let location = format!("domain {}: tls_ca", domain.name);
        let mut roots = RootCertStore::empty();
        for cert in read_certs(ca).map_err(|e| problem(&location, e))? {
            roots.add(cert).map_err(|e| problem(&location, format!("{}: {e}", ca.display())))?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| problem(&location, e.to_string()))?
            .with_root_certificates(roots);
        let mut config = with_identity(builder, client.identity.as_deref())?;
        // rustls caches sessions by name, not port: servers on one IP that share ticket keys
        // (one Postfix, several listeners) would resume without showing their own certificate.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(OutboundTls {
            mode: domain.tls,
            verified: true,
            connector: TlsConnector::from(Arc::new(config)),
            pool: client.pool_key(&format!("{}+{}", domain.tls.as_str(), ca.display())),
        })
    }

    /// The handshake's client side.
    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    /// Connections made with these settings may be reused by others with the same key.
    pub fn pool_key(&self) -> &Arc<str> {
        &self.pool
    }
}

/// The name a server's certificate is checked against: its host name or IP literal.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host} cannot be checked against a certificate: {e}"))
}

/// `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384`, for Received headers and logs.
pub fn describe(state: &CommonState) -> String {
    let version = match state.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_string(),
    };
    match state.negotiated_cipher_suite() {
        Some(suite) => format!("{version} with cipher {:?}", suite.suite()),
        None => version,
    }
}

/// Accepts any certificate but still checks the handshake's signatures: encryption without
/// authentication, as Postfix's `may` and `encrypt` levels.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with `relay` and `delivery` lines.
    fn config(dir: &Path, relay: &str, delivery: &str) -> crate::config::Config {
        let text = format!(
            "[relay]\nhostname = \"relay.test\"\nlisten = [\"127.0.0.1:2525\"]\nqueue = \"q\"\n{relay}\n\n[delivery]\n{delivery}\n\n[[domain]]\nname = \"customer.test\"\n[[domain.server]]\nhost = \"192.0.2.1\"\n"
        );
        crate::config::Config::parse(&dir.join("relay.toml"), &text).expect("config")
    }

    fn relay_config(dir: &Path, cert: &str, key: &str) -> RelayConfig {
        config(dir, &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\""), "").relay
    }

    fn client_tls(dir: &Path, cert: &str, key: &str) -> Result<ClientTls, ConfigProblem> {
        ClientTls::load(&config(dir, "", &format!("tls_client_cert = \"{cert}\"\ntls_client_key = \"{key}\"")).delivery)
    }

    fn write_pair(dir: &Path, stem: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert =
            rcgen::CertificateParams::new(vec!["relay.test".to_string()]).expect("params").self_signed(&key).expect("cert");
        std::fs::write(dir.join(format!("{stem}.crt")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).expect("write");
        (format!("{stem}.crt"), format!("{stem}.key"))
    }

    #[test]
    fn acceptor_loads_a_matching_pair_and_names_the_key_that_does_not_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_a, key_a) = write_pair(dir.path(), "a");
        let (_, key_b) = write_pair(dir.path(), "b");
        assert!(acceptor(&relay_config(dir.path(), &cert_a, &key_a)).expect("loads").is_some());
        let err = acceptor(&relay_config(dir.path(), &cert_a, &key_b)).err().expect("mismatch refused");
        assert_eq!(err.location, "relay.tls_key", "{err}");
        let err = acceptor(&relay_config(dir.path(), &key_a, &key_a)).err().expect("a key is not a certificate");
        assert_eq!(err.location, "relay.tls_cert", "{err}");
        assert!(err.message.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn a_client_certificate_loads_as_a_matching_pair_and_keeps_its_pools_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_a, key_a) = write_pair(dir.path(), "a");
        let (_, key_b) = write_pair(dir.path(), "b");
        let presenting = client_tls(dir.path(), &cert_a, &key_a).expect("loads");
        assert!(presenting.identity.is_some());
        assert!(ClientTls::load(&config(dir.path(), "", "").delivery).expect("none").identity.is_none());
        let err = client_tls(dir.path(), &cert_a, &key_b).expect_err("mismatch refused");
        assert_eq!(err.location, "delivery.tls_client_key", "{err}");
        let err = client_tls(dir.path(), &key_a, &key_a).expect_err("a key is not a certificate");
        assert_eq!(err.location, "delivery.tls_client_cert", "{err}");

        // Sessions made with a certificate are never reused by mail that should go without.
        let (anonymous, presenting) = (ClientTls::anonymous().opportunistic(), presenting.opportunistic());
        assert_ne!(anonymous.pool_key(), presenting.pool_key());
    }
}
