//! A local certificate authority for development and tests (`rialto-admin certs init`).
//!
//! [`init`] writes, under one directory, a CA (`ca.crt`, `ca.key`), a certificate for storage
//! servers (`server.crt`/`.key`, principal `spiffe://rialto/server`) and one for controllers
//! (`controller.crt`/`.key`, principal `spiffe://rialto/controller`), both valid for
//! `localhost`, `127.0.0.1` and any extra host names, usable as server and as client
//! certificates; and per named client `client-NAME.crt`/`.key` whose principal is NAME (its
//! subject CN). Run again on the same directory it keeps the CA and every existing file and adds
//! what is missing, so more clients can be issued later. Keys are written mode 0600.
//!
//! Production clusters use their own PKI: Rialto only needs PEM files.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::SecurityError;

/// Principal of the certificate `init` writes for storage servers.
pub const SERVER_PRINCIPAL: &str = "spiffe://rialto/server";
/// Principal of the certificate `init` writes for controllers.
pub const CONTROLLER_PRINCIPAL: &str = "spiffe://rialto/controller";
/// Validity of every certificate `init` writes.
pub const VALID_DAYS: i64 = 825;

/// What to create.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// Client names; each gets `client-NAME.crt`/`.key` with principal NAME.
    pub clients: Vec<String>,
    /// Host names or IP addresses, beyond `localhost` and `127.0.0.1`, that the server and
    /// controller certificates are valid for.
    pub hosts: Vec<String>,
}

/// The files `init` wrote or found.
#[derive(Debug, Clone, Default)]
pub struct InitReport {
    pub written: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
}

/// The files of one identity under a certificate directory.
pub fn identity_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// Checks a client name: letters, digits, `.`, `_`, `-`, `@`, 1 to 64 characters.
pub fn validate_client_name(name: &str) -> Result<(), SecurityError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(SecurityError::Generate(format!(
            "client name `{name}`: use 1 to 64 letters, digits, `.`, `_`, `-` or `@`"
        )))
    }
}

fn generate_err(e: rcgen::Error) -> SecurityError {
    SecurityError::Generate(e.to_string())
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), SecurityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| SecurityError::Write {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)
}

fn validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(VALID_DAYS as u64 * 86_400)).into();
}

/// The CA that signs: its certificate and key.
struct Issuer {
    cert: Certificate,
    key: KeyPair,
}

/// Loads the CA under `dir`, or creates it.
fn ca(dir: &Path, report: &mut InitReport) -> Result<Issuer, SecurityError> {
    let (cert_path, key_path) = identity_files(dir, "ca");
    if cert_path.exists() && key_path.exists() {
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| SecurityError::Read {
            path: key_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| SecurityError::Read {
            path: cert_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(generate_err)?;
        // The same subject and key as the file's: what it signs verifies against the file.
        let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(generate_err)?;
        let cert = params.self_signed(&key).map_err(generate_err)?;
        report.kept.push(cert_path);
        return Ok(Issuer { cert, key });
    }
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Rialto local CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params);
    let key = KeyPair::generate().map_err(generate_err)?;
    let cert = params.self_signed(&key).map_err(generate_err)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    report.written.push(cert_path);
    report.written.push(key_path);
    Ok(Issuer { cert, key })
}

fn leaf(
    dir: &Path,
    file_name: &str,
    common_name: &str,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    issuer: &Issuer,
    report: &mut InitReport,
) -> Result<(), SecurityError> {
    let (cert_path, key_path) = identity_files(dir, file_name);
    if cert_path.exists() || key_path.exists() {
        report.kept.push(cert_path);
        return Ok(());
    }
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.extended_key_usages = usages;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params);
    let key = KeyPair::generate().map_err(generate_err)?;
    let cert = params
        .signed_by(&key, &issuer.cert, &issuer.key)
        .map_err(generate_err)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    report.written.push(cert_path);
    report.written.push(key_path);
    Ok(())
}

fn host_sans(hosts: &[String]) -> Result<Vec<SanType>, SecurityError> {
    let mut all = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    all.extend(hosts.iter().cloned());
    all.dedup();
    all.into_iter()
        .map(|h| match h.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(h.as_str().try_into().map_err(
                |e: rcgen::Error| SecurityError::Generate(format!("host `{h}`: {e}")),
            )?)),
        })
        .collect()
}

fn uri(s: &str) -> Result<SanType, SecurityError> {
    Ok(SanType::URI(s.try_into().map_err(generate_err)?))
}

/// Creates (or completes) a certificate directory; see the module documentation.
pub fn init(dir: &Path, options: &InitOptions) -> Result<InitReport, SecurityError> {
    for name in &options.clients {
        validate_client_name(name)?;
    }
    std::fs::create_dir_all(dir).map_err(|e| SecurityError::Write {
        path: dir.display().to_string(),
        detail: e.to_string(),
    })?;
    let mut report = InitReport::default();
    let issuer = ca(dir, &mut report)?;
    let both = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    for (file, cn, principal) in [
        ("server", "rialto-server", SERVER_PRINCIPAL),
        ("controller", "rialto-controller", CONTROLLER_PRINCIPAL),
    ] {
        let mut sans = host_sans(&options.hosts)?;
        sans.push(uri(principal)?);
        leaf(dir, file, cn, sans, both.clone(), &issuer, &mut report)?;
    }
    for name in &options.clients {
        leaf(
            dir,
            &format!("client-{name}"),
            name,
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            &issuer,
            &mut report,
        )?;
    }
    Ok(report)
}

#[cfg(test)]
#[cfg(feature = "principal")]
mod tests {
    use super::*;
    use crate::Principal;

    fn principal_of(path: &Path) -> Option<Principal> {
        let pem = std::fs::read(path).unwrap();
        let der = crate::tls::certificates(&pem, "test").unwrap().remove(0);
        Principal::from_certificate(der.as_ref())
    }

    #[test]
    fn init_writes_a_ca_and_identities_and_completes_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let report = init(
            dir.path(),
            &InitOptions {
                clients: vec!["alice".into()],
                hosts: vec!["storage-1.internal".into(), "10.0.0.7".into()],
            },
        )
        .unwrap();
        assert_eq!(report.written.len(), 8, "{report:?}");
        assert_eq!(
            principal_of(&dir.path().join("server.crt"))
                .unwrap()
                .as_str(),
            SERVER_PRINCIPAL
        );
        assert_eq!(
            principal_of(&dir.path().join("client-alice.crt"))
                .unwrap()
                .as_str(),
            "alice"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let ca_before = std::fs::read(dir.path().join("ca.crt")).unwrap();
        let again = init(
            dir.path(),
            &InitOptions {
                clients: vec!["alice".into(), "bob".into()],
                hosts: vec![],
            },
        )
        .unwrap();
        assert_eq!(again.written.len(), 2, "only bob is new: {again:?}");
        assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), ca_before);
        assert!(init(
            dir.path(),
            &InitOptions {
                clients: vec!["../evil".into()],
                hosts: vec![]
            }
        )
        .is_err());
    }
}
