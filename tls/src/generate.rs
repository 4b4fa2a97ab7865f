//! Certificates for a quick start (`switchyard tls init`): a CA, and one certificate
//! every registry node can use both to serve and, on the peer port, as its client
//! certificate. Production deployments bring their own from their PKI; these are for a
//! first cluster and for tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::files::TlsError;

/// The names every quick-start certificate carries, besides those asked for.
pub const DEFAULT_SANS: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// PEM texts of a CA and a registry certificate it signed.
pub struct Bundle {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are never printed.
        f.debug_struct("Bundle").finish_non_exhaustive()
    }
}

fn err(e: rcgen::Error) -> TlsError {
    TlsError(format!("cannot generate the certificates: {e}"))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = SystemTime::now();
    // An hour of slack for clocks a little behind.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(u64::from(days) * 86_400)).into();
}

/// A new CA (named `ca_name`) and a certificate for `sans` (plus [`DEFAULT_SANS`]),
/// valid for `days`, with both server and client authentication usages.
pub fn quickstart(ca_name: &str, sans: &[String], days: u32) -> Result<Bundle, TlsError> {
    if days == 0 {
        return Err(TlsError("--days must be at least 1".into()));
    }
    let mut names: Vec<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
    for s in sans {
        check_san(s)?;
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, days);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().map_err(err)?;
    let mut leaf = CertificateParams::new(names)
        .map_err(|e| TlsError(format!("a --san is not a DNS name or IP address: {e}")))?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, "switchyard registry");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.use_authority_key_identifier_extension = true;
    validity(&mut leaf, days);
    let cert = leaf.signed_by(&key, &issuer).map_err(err)?;
    Ok(Bundle {
        ca_cert: ca_cert.pem(),
        ca_key: issuer.key().serialize_pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A SAN is an IP address or a DNS name (letters, digits, `-`, dots; `*.` in front
/// for a wildcard); rcgen would take any ASCII.
fn check_san(san: &str) -> Result<(), TlsError> {
    if san.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = san.strip_prefix("*.").unwrap_or(san);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(TlsError(format!(
            "--san {san:?} is neither an IP address nor a DNS name"
        )))
    }
}

/// The file names [`write`] uses inside its directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT: &str = "registry.pem";
pub const KEY: &str = "registry-key.pem";

/// Writes the bundle into `dir` (created if missing), keys readable by the owner only.
/// Refuses to overwrite existing files unless `force`, so a rerun never replaces a CA a
/// cluster already trusts.
pub fn write(dir: &Path, bundle: &Bundle, force: bool) -> Result<Vec<PathBuf>, TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| TlsError::file(dir, e))?;
    let files = [
        (CA_CERT, &bundle.ca_cert, false),
        (CA_KEY, &bundle.ca_key, true),
        (CERT, &bundle.cert, false),
        (KEY, &bundle.key, true),
    ];
    if !force {
        for (name, _, _) in &files {
            let path = dir.join(name);
            if path.exists() {
                return Err(TlsError::file(
                    &path,
                    "already exists; pass --force to replace the CA and certificates (clients trusting the old CA will need the new ca.pem)",
                ));
            }
        }
    }
    let mut written = Vec::new();
    for (name, text, secret) in files {
        let path = dir.join(name);
        write_file(&path, text, secret)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes `text` to `path` through a temporary file and a rename, so a watcher never
/// sees half a file.
pub fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp.0, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| TlsError::file(&tmp.0, e))?;
    }
    let _ = secret;
    tmp.1
        .write_all(text.as_bytes())
        .and_then(|_| tmp.1.sync_all())
        .map_err(|e| TlsError::file(&tmp.0, e))?;
    std::fs::rename(&tmp.0, path).map_err(|e| TlsError::file(path, e))
}

fn tempfile_in(dir: &Path, path: &Path) -> Result<(PathBuf, std::fs::File), TlsError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| TlsError::file(&tmp, e))?;
    Ok((tmp, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quickstart_bundle_loads_as_server_and_client_configs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = quickstart("test CA", &["registry-1.example".into()], 1).expect("generate");
        let paths = write(dir.path(), &bundle, false).expect("write");
        assert_eq!(paths.len(), 4);
        let files = crate::server::ServerFiles {
            cert: dir.path().join(CERT),
            key: dir.path().join(KEY),
            client_ca: Some(dir.path().join(CA_CERT)),
        };
        crate::ServerTls::load(files, crate::server::ALPN_GRPC).expect("server config");
        crate::ClientTls::load(
            &dir.path().join(CA_CERT),
            Some((&dir.path().join(CERT), &dir.path().join(KEY))),
        )
        .expect("client config");
        // A second init refuses to replace the CA.
        let again = write(dir.path(), &bundle, false).expect_err("exists");
        assert!(again.0.contains("--force"), "{again}");
        write(dir.path(), &bundle, true).expect("forced");
    }

    #[test]
    fn bad_sans_and_zero_days_are_refused() {
        assert!(quickstart("ca", &["not a name!".into()], 1).is_err());
        assert!(quickstart("ca", &[], 0).is_err());
    }

    #[test]
    fn files_with_the_wrong_content_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = quickstart("ca", &[], 1).expect("generate");
        write(dir.path(), &bundle, false).expect("write");
        // The key passed as the certificate.
        let e = crate::files::read_certs(&dir.path().join(KEY)).expect_err("not a cert");
        assert!(
            e.0.contains(KEY) && e.0.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
        let e = crate::files::read_key(&dir.path().join(CA_CERT)).expect_err("not a key");
        assert!(e.0.contains("private key"), "{e}");
        let e = crate::files::read_certs(&dir.path().join("missing.pem")).expect_err("missing");
        assert!(e.0.contains("missing.pem"), "{e}");
        // A key that is not the certificate's.
        let other = quickstart("ca", &[], 1).expect("generate");
        write_file(&dir.path().join("other-key.pem"), &other.key, true).expect("write");
        let files = crate::server::ServerFiles {
            cert: dir.path().join(CERT),
            key: dir.path().join("other-key.pem"),
            client_ca: None,
        };
        let e = crate::ServerTls::load(files, crate::server::ALPN_GRPC).expect_err("mismatch");
        assert!(e.0.contains("issued for"), "{e}");
    }
}
