//! PEM files: the certificate chain, the private key and the CA bundle.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// A TLS file or configuration that cannot be used, said so an operator can fix it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

impl TlsError {
    pub(crate) fn file(path: &Path, what: impl std::fmt::Display) -> Self {
        TlsError(format!("{}: {what}", path.display()))
    }
}

/// The certificate chain in `path`, leaf first.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::file(path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(TlsError::file(
            path,
            "holds no `BEGIN CERTIFICATE` block; pass the PEM certificate (chain), not the key",
        ));
    }
    Ok(certs)
}

/// The private key in `path` (PKCS#8, PKCS#1 or SEC1 PEM).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        TlsError::file(
            path,
            format!("holds no PEM private key ({e}); pass the key that goes with --tls-cert"),
        )
    })
}

/// The CA certificates in `path`, as trust roots.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::file(path, format!("not a usable CA certificate ({e})")))?;
    }
    Ok(roots)
}

/// The CA certificates in a PEM text (a trust bundle from the registry), as trust roots.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError(format!("the trust bundle is not PEM ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| TlsError(format!("the trust bundle holds an unusable CA ({e})")))?;
    }
    if roots.is_empty() {
        return Err(TlsError("the trust bundle holds no certificate".into()));
    }
    Ok(roots)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    // Certificate files are small; a bound keeps a wrong path (a log, a device) harmless.
    const MAX_PEM_BYTES: u64 = 1024 * 1024;
    let meta = std::fs::metadata(path).map_err(|e| TlsError::file(path, e))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(TlsError::file(
            path,
            format!(
                "is {} bytes, larger than a PEM file should be (1 MiB)",
                meta.len()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| TlsError::file(path, e))
}

/// A file's length and modification time: what the reloader compares.
pub(crate) fn stamp(path: &PathBuf) -> Option<(u64, std::time::SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}
