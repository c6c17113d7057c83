//! Rialto's security building blocks, shared by the storage server, the controller and the
//! admin tools (the fast client builds its own `rustls` settings so that it stays lean):
//!
//! * [`tls`]: `rustls` server and client settings from PEM files, with mutual TLS when a client
//!   CA is given.
//! * [`principal`]: the identity of a peer, read from its certificate (a SAN URI such as
//!   `spiffe://…`, else the subject CN).
//! * [`certs`]: a local CA and certificates for servers, controllers and named clients
//!   (`rialto-admin certs init`), for development and tests.
//! * [`signing`]: the secret a registered real-time writer signs its records with, and the
//!   check a partition leader makes before copying one.
//!
//! Authorization itself (the ACL records and the check) is in `rialto_protocol::acl`: it is
//! data every process reads from etcd.

#[cfg(feature = "certs")]
pub mod certs;
#[cfg(feature = "principal")]
pub mod principal;
#[cfg(feature = "signing")]
pub mod signing;
pub mod tls;

#[cfg(feature = "principal")]
pub use principal::Principal;

/// Everything that can go wrong loading or creating TLS material. Every message names the
/// file or setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("cannot write {path}: {detail}")]
    Write { path: String, detail: String },
    #[error("{what}: {detail}")]
    Pem { what: String, detail: String },
    #[error("TLS settings: {0}")]
    Config(String),
    #[error("certificate generation: {0}")]
    Generate(String),
}
