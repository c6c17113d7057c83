//! `rustls` settings from PEM files.
//!
//! A server presents its certificate chain; given a client CA it also requires every client to
//! present a certificate that CA signed (mutual TLS), and the caller's
//! [`Principal`](crate::Principal) is read from it. A client trusts one CA (the cluster's) and
//! may present its own certificate. Everything uses the `ring` provider and TLS 1.2/1.3.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::SecurityError;

/// A server's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA whose certificates clients must present (mutual TLS); `None` accepts any client.
    pub client_ca: Option<PathBuf>,
}

/// A client's TLS files: the CA it trusts and, for mutual TLS, its own identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificate(s) (PEM) the client trusts.
    pub ca: PathBuf,
    /// The client's certificate chain and key (PEM), presented when the server asks.
    pub identity: Option<(PathBuf, PathBuf)>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|e| SecurityError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Every certificate in a PEM text; an error if there is none.
pub fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SecurityError::Pem {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(SecurityError::Pem {
            what: what.to_string(),
            detail: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM text.
pub fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, SecurityError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| SecurityError::Pem {
            what: what.to_string(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| SecurityError::Pem {
            what: what.to_string(),
            detail: "no PEM private key in it".into(),
        })
}

/// A root store holding every certificate of a PEM text.
pub fn roots(pem: &[u8], what: &str) -> Result<RootCertStore, SecurityError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(pem, what)? {
        roots.add(cert).map_err(|e| SecurityError::Pem {
            what: what.to_string(),
            detail: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// A server's `rustls` settings, offering the ALPN protocols given (`h2`, `http/1.1`).
pub fn server_config(
    files: &ServerTlsFiles,
    alpn: &[&[u8]],
) -> Result<ServerConfig, SecurityError> {
    let cert_what = format!("certificate {}", files.cert.display());
    let key_what = format!("key {}", files.key.display());
    let chain = certificates(&read(&files.cert)?, &cert_what)?;
    let key = private_key(&read(&files.key)?, &key_what)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SecurityError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let what = format!("client CA {}", ca.display());
            let roots = roots(&read(ca)?, &what)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| SecurityError::Config(format!("{what}: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| SecurityError::Config(format!("{cert_what} with {key_what}: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The TLS settings of a listening endpoint: `None` for plaintext (logged loudly as such), and
/// refused when `authorize` is asked for without client certificates to name callers.
pub fn endpoint_config(
    files: Option<&ServerTlsFiles>,
    alpn: &[&[u8]],
    endpoint: &str,
    authorize: bool,
) -> Result<Option<ServerConfig>, SecurityError> {
    if authorize && files.is_none_or(|f| f.client_ca.is_none()) {
        return Err(SecurityError::Config(format!(
            "authorization on {endpoint} needs caller identities: give --tls-client-ca so that \
             callers present certificates"
        )));
    }
    match files {
        Some(files) => server_config(files, alpn).map(Some),
        None => {
            warn_plaintext(endpoint, "give --tls-cert and --tls-key");
            Ok(None)
        }
    }
}

/// A client's `rustls` settings from PEM texts: the trusted CA and an optional identity
/// (certificate chain, key).
pub fn client_config_from_pem(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, SecurityError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SecurityError::Config(e.to_string()))?
        .with_root_certificates(roots(ca_pem, "CA certificate")?);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates(cert, "client certificate")?,
                private_key(key, "client key")?,
            )
            .map_err(|e| SecurityError::Config(format!("client certificate and key: {e}")))?,
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client's `rustls` settings from its files.
pub fn client_config(
    files: &ClientTlsFiles,
    alpn: &[&[u8]],
) -> Result<ClientConfig, SecurityError> {
    let ca = read(&files.ca)?;
    let identity = match &files.identity {
        None => None,
        Some((cert, key)) => Some((read(cert)?, read(key)?)),
    };
    client_config_from_pem(
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        alpn,
    )
    .map_err(|e| match e {
        SecurityError::Pem { what, detail } => SecurityError::Pem {
            what: format!("{what} (CA {})", files.ca.display()),
            detail,
        },
        other => other,
    })
}

/// Logs, once per process and loudly, that an endpoint runs without TLS.
pub fn warn_plaintext(endpoint: &str, how_to_fix: &str) {
    tracing::warn!(
        endpoint,
        "PLAINTEXT: {endpoint} runs without TLS; traffic is readable and callers are \
         unauthenticated. Use this only on a trusted local machine ({how_to_fix})."
    );
}

/// The flags of every binary that talks to etcd over TLS: `--etcd-ca-cert`, `--etcd-cert`,
/// `--etcd-key` (or `RIALTO_ETCD_CA_CERT`, `RIALTO_ETCD_CERT`, `RIALTO_ETCD_KEY`). Use `https://`
/// endpoints with them.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// CA certificate (PEM) of etcd's server certificate; turns on TLS to etcd.
    #[arg(long, env = "RIALTO_ETCD_CA_CERT", global = true)]
    pub etcd_ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd (`--client-cert-auth`).
    #[arg(long, env = "RIALTO_ETCD_CERT", requires = "etcd_key", global = true)]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "RIALTO_ETCD_KEY", requires = "etcd_cert", global = true)]
    pub etcd_key: Option<PathBuf>,
}

#[cfg(feature = "cli")]
impl EtcdTlsArgs {
    /// The files these flags name; `None` for plaintext etcd.
    pub fn files(&self) -> Result<Option<ClientTlsFiles>, SecurityError> {
        match (&self.etcd_ca_cert, &self.etcd_cert) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(SecurityError::Config(
                "--etcd-cert needs --etcd-ca-cert: the CA of etcd's certificate".into(),
            )),
            (Some(ca), _) => Ok(Some(ClientTlsFiles {
                ca: ca.clone(),
                identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_needs_client_certificates_and_plaintext_is_allowed_without_it() {
        let err = endpoint_config(None, &[], "the test endpoint", true).unwrap_err();
        assert!(err.to_string().contains("--tls-client-ca"), "{err}");
        assert!(endpoint_config(None, &[], "the test endpoint", false)
            .unwrap()
            .is_none());
        let files = ServerTlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        };
        let err = endpoint_config(Some(&files), &[], "the test endpoint", true).unwrap_err();
        assert!(err.to_string().contains("--tls-client-ca"), "{err}");
        let err = endpoint_config(Some(&files), &[], "the test endpoint", false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
