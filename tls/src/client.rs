//! The client side: how a sidecar, the CLI or a registry node reaches a registry.
//!
//! `http://` means plain TCP and `https://` means TLS verified against `--ca-file`; a
//! mismatch is refused before connecting, so a client never falls back to plaintext
//! silently. Between registry nodes the client also presents the node's certificate.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::files::{read_certs, read_key, read_roots, TlsError};

/// A client configuration that reloads in place (see [`crate::reload`]).
pub struct ClientTls {
    ca: PathBuf,
    identity: Option<(PathBuf, PathBuf)>,
    config: ArcSwap<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CAs in `ca`; with `identity` (certificate, key), presents it when the
    /// server asks (the registry's peer port does).
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Arc<Self>, TlsError> {
        let ca = ca.to_path_buf();
        let identity = identity.map(|(c, k)| (c.to_path_buf(), k.to_path_buf()));
        let config = build(&ca, identity.as_ref())?;
        Ok(Arc::new(ClientTls {
            ca,
            identity,
            config: ArcSwap::from_pointee(config),
        }))
    }

    /// Reads the files again; new connections use them, open ones are untouched.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.ca, self.identity.as_ref())?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.ca.clone()];
        if let Some((c, k)) = &self.identity {
            paths.push(c.clone());
            paths.push(k.clone());
        }
        paths
    }
}

fn build(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> Result<ClientConfig, TlsError> {
    let roots = read_roots(ca)?;
    let builder = ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS protocol versions: {e}")))?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| {
                TlsError(format!(
                    "{} and {} do not make a usable client certificate ({e})",
                    cert.display(),
                    key.display()
                ))
            })?,
    };
    // Every Switchyard client speaks gRPC, i.e. HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Plain TCP or TLS, for every channel a process opens to registries.
#[derive(Clone, Debug, Default)]
pub struct Transport {
    tls: Option<Arc<ClientTls>>,
}

impl Transport {
    pub fn plain() -> Self {
        Transport { tls: None }
    }

    pub fn tls(tls: Arc<ClientTls>) -> Self {
        Transport { tls: Some(tls) }
    }

    /// TLS trusting `ca_file` when given, else plain.
    pub fn from_ca_file(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        Ok(match ca_file {
            None => Transport::plain(),
            Some(ca) => Transport::tls(ClientTls::load(ca, None)?),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn client_tls(&self) -> Option<&Arc<ClientTls>> {
        self.tls.as_ref()
    }

    /// The URL of a `host:port` address (a peer), with the scheme this transport speaks.
    pub fn url_for(&self, addr: &str) -> String {
        if addr.starts_with("http://") || addr.starts_with("https://") {
            return addr.to_string();
        }
        if self.is_tls() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    }

    /// Refuses a URL whose scheme disagrees with the transport.
    pub fn check(&self, url: &str) -> Result<(), TlsError> {
        let https = url.starts_with("https://");
        match (https, self.is_tls()) {
            (true, false) => Err(TlsError(format!(
                "{url} is https but no CA was given: pass --ca-file (SWITCHYARD_CA_FILE) with the CA that signed the registry's certificate"
            ))),
            (false, true) => Err(TlsError(format!(
                "--ca-file (SWITCHYARD_CA_FILE) is set but {url} is not https://: use an https:// URL, or drop --ca-file for a plaintext registry"
            ))),
            _ => Ok(()),
        }
    }

    /// A channel that connects on first use (and reconnects), over this transport.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        match &self.tls {
            None => endpoint.connect_lazy(),
            Some(tls) => endpoint.connect_with_connector_lazy(Connector { tls: tls.clone() }),
        }
    }

    /// A channel connected now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            None => endpoint.connect().await,
            Some(tls) => {
                endpoint
                    .connect_with_connector(Connector { tls: tls.clone() })
                    .await
            }
        }
    }
}

/// Dials TCP and runs the TLS handshake, verifying the server's name from the URI.
#[derive(Clone)]
pub struct Connector {
    tls: Arc<ClientTls>,
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.config.load_full();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URL has no host"))?;
            // An IPv6 literal comes bracketed.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// An error and its causes on one line, with what to do when the cause is a certificate
/// the client does not trust (tonic's own message is only "transport error").
pub fn explain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    if text.contains("invalid peer certificate") {
        text.push_str(
            " (the registry's certificate is not signed by the CA in --ca-file, has expired, or does not name this host: check --ca-file and the registry's --tls-cert)",
        );
    } else if text.contains("certificate required") || text.contains("CertificateRequired") {
        text.push_str(" (this port requires a client certificate signed by the cluster's CA)");
    }
    text
}
