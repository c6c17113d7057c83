//! Who a peer is: the principal named by its certificate.
//!
//! The first URI subject-alternative name (a SPIFFE id such as `spiffe://example.org/ns/feed`)
//! wins; a certificate without one is named by its subject's common name. A certificate with
//! neither has no principal and is treated as anonymous.

use std::fmt;
use std::sync::Arc;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The identity of a caller (or of a Rialto process), as ACLs name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal(Arc<str>);

impl Principal {
    /// A principal with this exact name.
    pub fn new(name: impl AsRef<str>) -> Principal {
        Principal(Arc::from(name.as_ref()))
    }

    /// The principal a DER certificate names: its first URI SAN, else its subject CN.
    /// `None` for an unparsable certificate or one naming nobody.
    pub fn from_certificate(der: &[u8]) -> Option<Principal> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    if !uri.is_empty() {
                        return Some(Principal::new(uri));
                    }
                }
            }
        }
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        (!cn.is_empty()).then(|| Principal::new(cn))
    }

    /// The principal of the peer of an established TLS connection: from the first (end-entity)
    /// certificate it presented, if any.
    pub fn of_peer(connection: &rustls::CommonState) -> Option<Principal> {
        let cert = connection.peer_certificates()?.first()?;
        Principal::from_certificate(cert.as_ref())
    }

    /// The name as ACLs store it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Completes a server's TLS handshake with a caller within `timeout`: the encrypted stream
/// and the caller's principal, from the certificate it presented (if any). A handshake that
/// fails or is too slow gives `None`, logged at debug level: a scanner or a misconfigured
/// client, not an error of this process.
#[cfg(feature = "accept")]
pub async fn accept_tls<IO>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: IO,
    peer: impl fmt::Display,
    timeout: std::time::Duration,
) -> Option<(tokio_rustls::server::TlsStream<IO>, Option<Principal>)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(stream)) => {
            let principal = Principal::of_peer(stream.get_ref().1);
            Some((stream, principal))
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// How a caller is named in errors and logs when it has no principal.
pub const ANONYMOUS: &str = "anonymous";

/// The name of an optional principal for messages: the principal, or `anonymous`.
pub fn name_of(principal: Option<&Principal>) -> &str {
    principal.map(Principal::as_str).unwrap_or(ANONYMOUS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn a_san_uri_names_the_principal_before_the_common_name() {
        let der = cert(
            Some("feed-service"),
            vec![
                SanType::DnsName("feed.internal".try_into().unwrap()),
                uri("spiffe://example.org/ns/feed"),
                uri("spiffe://example.org/other"),
            ],
        );
        assert_eq!(
            Principal::from_certificate(&der).unwrap().as_str(),
            "spiffe://example.org/ns/feed"
        );
    }

    #[test]
    fn without_a_uri_the_common_name_names_the_principal() {
        let der = cert(
            Some("alice"),
            vec![SanType::DnsName("alice.local".try_into().unwrap())],
        );
        assert_eq!(Principal::from_certificate(&der).unwrap().as_str(), "alice");
    }

    #[test]
    fn a_certificate_naming_nobody_or_garbage_has_no_principal() {
        let der = cert(None, vec![SanType::DnsName("x.local".try_into().unwrap())]);
        assert_eq!(Principal::from_certificate(&der), None);
        assert_eq!(Principal::from_certificate(b"not a certificate"), None);
        assert_eq!(Principal::from_certificate(&der[..der.len() / 2]), None);
        assert_eq!(name_of(None), ANONYMOUS);
    }
}
