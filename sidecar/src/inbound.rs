//! The mesh inbound listener (`--inbound`, port 15006): other sidecars connect here with
//! mutual TLS, and each request goes on to the local app.
//!
//! The handshake requires a client certificate the mesh's roots verify (chain first);
//! only then is the caller's SPIFFE id read from it, passed to the app as
//! `x-switchyard-peer-identity` (any such header the caller sent is removed), and
//! counted. Until the sidecar has its own certificate, connections are closed: there
//! is nothing to serve TLS with, and clear text is never accepted here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use switchyard_tls::tokio_rustls::TlsAcceptor;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::{Issued, MeshIdentity};
use crate::metrics::Metrics;

/// The header carrying the verified caller identity to the app.
pub const PEER_IDENTITY: &str = "x-switchyard-peer-identity";
/// How long a caller has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server configuration for the current leaf, rebuilt when the leaf changes.
#[derive(Default)]
struct Configs {
    built: ArcSwapOption<(Arc<Issued>, Arc<switchyard_tls::rustls::ServerConfig>)>,
}

impl Configs {
    fn current(
        &self,
        identity: &MeshIdentity,
    ) -> Option<Arc<switchyard_tls::rustls::ServerConfig>> {
        let issued = identity.current()?;
        if let Some(b) = self.built.load().as_ref() {
            if Arc::ptr_eq(&b.0, &issued) {
                return Some(b.1.clone());
            }
        }
        match switchyard_tls::mesh_ca::mesh_server_config(
            &issued.leaf_pem,
            &issued.key_pem,
            &issued.bundle_pem,
        ) {
            Ok(c) => {
                let c = Arc::new(c);
                self.built.store(Some(Arc::new((issued, c.clone()))));
                Some(c)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot serve the mesh certificate");
                None
            }
        }
    }
}

/// Serves the inbound listener until shutdown, forwarding to `app`.
pub async fn serve(
    listener: TcpListener,
    identity: Arc<MeshIdentity>,
    app: SocketAddr,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let configs = Configs::default();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let h1: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector.clone());
    let h2: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let app_uri = Arc::new(format!("http://{app}"));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::stopped(&mut shutdown) => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(config) = configs.current(&identity) else {
            tracing::debug!(%remote, "no mesh certificate yet; closing an inbound connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (h1, h2, metrics, app_uri) = (h1.clone(), h2.clone(), metrics.clone(), app_uri.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                TlsAcceptor::from(config).accept(stream),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    let reason = switchyard_tls::failure::Reason::of(&e);
                    metrics.inbound_handshake_failed(reason);
                    tracing::debug!(%remote, error = %e, reason = reason.as_str(), "inbound TLS handshake refused");
                    return;
                }
                Err(_) => {
                    metrics.inbound_handshake_failed(switchyard_tls::failure::Reason::Timeout);
                    return;
                }
            };
            // The handshake verified the chain; only now is the name read from it.
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| switchyard_tls::mesh_ca::spiffe_id_of(c))
                .unwrap_or_default();
            let Ok(peer_header) = HeaderValue::from_str(&peer) else {
                return;
            };
            let peer: Arc<str> = peer.into();
            let service = service_fn(move |mut req: Request<Incoming>| {
                let (h1, h2, metrics) = (h1.clone(), h2.clone(), metrics.clone());
                let peer_header = peer_header.clone();
                let peer = peer.clone();
                let app_uri = app_uri.clone();
                async move {
                    let headers = req.headers_mut();
                    headers.remove(PEER_IDENTITY);
                    headers.insert(PEER_IDENTITY, peer_header);
                    let path = req
                        .uri()
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_string();
                    *req.uri_mut() = match format!("{app_uri}{path}").parse() {
                        Ok(u) => u,
                        Err(_) => return Ok::<_, hyper::Error>(bad_gateway()),
                    };
                    metrics.inbound_request(&peer);
                    let sent = if req.version() == http::Version::HTTP_2 {
                        h2.request(req).await
                    } else {
                        h1.request(req).await
                    };
                    Ok(match sent {
                        Ok(resp) => resp.map(http_body_util::Either::Left),
                        Err(e) => {
                            tracing::debug!(error = %e, "the local app did not answer an inbound request");
                            bad_gateway()
                        }
                    })
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

/// What goes back to the caller: the app's answer, or the sidecar's own 502.
type Body = http_body_util::Either<Incoming, http_body_util::Full<bytes::Bytes>>;

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(http_body_util::Either::Right(http_body_util::Full::new(
        bytes::Bytes::from_static(b"the local app did not answer\n"),
    )));
    *r.status_mut() = http::StatusCode::BAD_GATEWAY;
    r
}
