//! Server configurations that reload in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::files::{read_certs, read_key, read_roots, TlsError};

/// Where a server's certificate, key and (for mutual TLS) client CA live.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

/// One port's TLS configuration. Each handshake takes the current one, so
/// [`ServerTls::reload`] affects new connections only.
pub struct ServerTls {
    files: ServerFiles,
    alpn: Vec<Vec<u8>>,
    config: ArcSwap<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// ALPN for a gRPC port (HTTP/2 only).
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN for the HTTP port (HTTP/1.1).
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

impl ServerTls {
    /// Loads the files; fails (naming the file) if any cannot be used.
    pub fn load(files: ServerFiles, alpn: &[&[u8]]) -> Result<Arc<Self>, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = build(&files, &alpn)?;
        Ok(Arc::new(ServerTls {
            files,
            alpn,
            config: ArcSwap::from_pointee(config),
        }))
    }

    /// Reads the files again and, if they make a valid configuration, uses it for every
    /// new handshake. On an error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files, &self.alpn)?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// The files this configuration is read from (what the reloader watches).
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.files.cert.clone(), self.files.key.clone()];
        paths.extend(self.files.client_ca.clone());
        paths
    }

    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

fn build(files: &ServerFiles, alpn: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS protocol versions: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = read_roots(ca)?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::provider())
                    .build()
                    .map_err(|e| {
                        TlsError::file(ca, format!("cannot verify clients with it ({e})"))
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| key_mismatch(&files.cert, &files.key, e))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

fn key_mismatch(cert: &Path, key: &Path, e: rustls::Error) -> TlsError {
    TlsError(format!(
        "{} and {} do not make a usable certificate ({e}); is the key the one the certificate was issued for?",
        cert.display(),
        key.display()
    ))
}
