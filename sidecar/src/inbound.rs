//! The mesh inbound listener (`--inbound`, port 15006): other sidecars connect here with
//! mutual TLS, and each request goes on to the local app.
//!
//! The handshake requires a client certificate the mesh's roots verify (chain first);
//! only then is the caller's SPIFFE id read from it, passed to the app as
//! `x-switchyard-peer-identity` (any such header the caller sent is removed), and
//! counted. Until the sidecar has its own certificate, connections are closed: there
//! is nothing to serve TLS with, and clear text is never accepted here.
//!
//! Intentions are enforced here, for this sidecar's service, from the caller's verified
//! identity and the namespace's intentions as the watch stream last delivered them: a
//! denied HTTP request gets 403, a denied gRPC call PERMISSION_DENIED, a denied TCP
//! connection is closed, and each is counted (`inbound_denied_total`). Until a
//! registry's snapshot has delivered the intentions (after a restart the cache file does
//! not hold them), every call is refused: fail closed.
//!
//! A connection whose ALPN is `switchyard-tcp` carries bytes, not HTTP: it is copied to
//! the app's port as it is, and so only when the app is declared TCP
//! (`--app-protocol tcp`). An HTTP app never gets one, since its bytes could carry a
//! forged `x-switchyard-peer-identity` that nothing here would remove; a TCP app gets
//! only those.

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
use crate::table::{EndpointTable, IntentionMap};
use switchyard_core::model::intention::{decide, Verdict};

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

/// Whose calls the inbound listener takes, and by which rules.
pub struct Local {
    pub namespace: Arc<str>,
    /// This sidecar's service: the destination intentions are checked for.
    pub service: Arc<str>,
    /// Where the namespace's intentions arrive.
    pub table: Arc<EndpointTable>,
    /// The app speaks TCP, not HTTP (`--app-protocol tcp`): only `switchyard-tcp`
    /// connections are taken.
    pub tcp: bool,
}

impl Local {
    /// `Err(why)` when the caller whose verified SPIFFE id is `peer` may not call this
    /// service now. Allocates only to say why.
    fn check(&self, peer: &str) -> Result<(), String> {
        let guard = self.table.intentions_guard();
        let Some(map) = guard.as_ref() else {
            return Err(format!(
                "{} has not received its intentions from a registry yet; refusing {peer}",
                self.service
            ));
        };
        let verdict = self.verdict(map, peer);
        if verdict.allowed {
            return Ok(());
        }
        Err(match verdict.by {
            Some(rule) => format!(
                "the intention {} {} -> {} denies {peer}",
                rule.action.as_str(),
                rule.source,
                rule.destination
            ),
            None => format!("no intention allows {peer} to call {}", self.service),
        })
    }

    /// What the intentions say of a caller whose verified SPIFFE id is `peer`.
    fn verdict<'a>(&self, map: &'a IntentionMap, peer: &str) -> Verdict<'a> {
        let source = crate::mesh::service_of(peer, &self.namespace);
        let rules = map
            .get(&*self.service)
            .into_iter()
            .chain(map.get("*"))
            .flat_map(|r| r.iter());
        decide(rules, source, &self.service)
    }
}

/// Serves the inbound listener until shutdown, forwarding to `app`.
pub async fn serve(
    listener: TcpListener,
    identity: Arc<MeshIdentity>,
    app: SocketAddr,
    local: Arc<Local>,
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
        let local = local.clone();
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
            let peer = switchyard_tls::mesh_ca::peer_spiffe_id(tls.get_ref().1);
            let Ok(peer_header) = HeaderValue::from_str(&peer) else {
                return;
            };
            let (requests, denied) = metrics.inbound_counters(&peer);
            let alpn_tcp =
                tls.get_ref().1.alpn_protocol() == Some(switchyard_tls::mesh_ca::ALPN_TCP);
            if alpn_tcp != local.tcp {
                tracing::debug!(%peer, tcp = alpn_tcp, "a connection in the other protocol than the app's (--app-protocol); closing it");
                return;
            }
            if alpn_tcp {
                requests.inc();
                if let Err(why) = local.check(&peer) {
                    denied.inc();
                    tracing::info!(destination = %local.service, "{why}; closing its TCP connection");
                    return;
                }
                carry_tcp(tls, app).await;
                return;
            }
            let conn = Arc::new(Conn {
                h1,
                h2,
                requests,
                denied,
                peer,
                peer_header,
                app_uri,
                local,
            });
            let service = service_fn(move |req| forward(conn.clone(), req));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

/// What every request of one inbound HTTP connection shares: one reference per request.
struct Conn {
    h1: Client<HttpConnector, Incoming>,
    h2: Client<HttpConnector, Incoming>,
    requests: prometheus_client::metrics::counter::Counter,
    denied: prometheus_client::metrics::counter::Counter,
    /// The caller's verified SPIFFE id, and the same as the header the app gets.
    peer: String,
    peer_header: HeaderValue,
    app_uri: Arc<String>,
    local: Arc<Local>,
}

/// One request of an inbound connection: checked against the intentions, given the
/// caller's identity, and sent on to the app.
async fn forward(
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    conn.requests.inc();
    if let Err(why) = conn.local.check(&conn.peer) {
        conn.denied.inc();
        return Ok(refused(req.headers(), &why));
    }
    let headers = req.headers_mut();
    headers.remove(PEER_IDENTITY);
    headers.insert(PEER_IDENTITY, conn.peer_header.clone());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = match format!("{}{path}", conn.app_uri).parse() {
        Ok(u) => u,
        Err(_) => return Ok(bad_gateway()),
    };
    let sent = if req.version() == http::Version::HTTP_2 {
        conn.h2.request(req).await
    } else {
        conn.h1.request(req).await
    };
    Ok(match sent {
        Ok(resp) => resp.map(http_body_util::Either::Left),
        Err(e) => {
            tracing::debug!(error = %e, "the local app did not answer an inbound request");
            bad_gateway()
        }
    })
}

/// Copies a TCP connection's bytes to the app and back.
async fn carry_tcp(
    mut tls: switchyard_tls::tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    app: SocketAddr,
) {
    match tokio::net::TcpStream::connect(app).await {
        Ok(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
        }
        Err(e) => tracing::debug!(error = %e, "the local app refused an inbound TCP connection"),
    }
}

/// The answer to a call an intention denies: PERMISSION_DENIED for gRPC, 403 otherwise.
fn refused(headers: &http::HeaderMap, why: &str) -> Response<Body> {
    tracing::debug!("{why}");
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut r = Response::new(http_body_util::Either::Right(http_body_util::Full::new(
        if grpc {
            bytes::Bytes::new()
        } else {
            bytes::Bytes::from(format!("{why}\n"))
        },
    )));
    if grpc {
        let headers = r.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("7"));
        if let Ok(v) = HeaderValue::from_str(why) {
            headers.insert("grpc-message", v);
        }
    } else {
        *r.status_mut() = http::StatusCode::FORBIDDEN;
    }
    r
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

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::model::intention::{Action, Intention};

    #[test]
    fn a_denied_call_is_403_for_http_and_permission_denied_for_grpc() {
        let why =
            "the intention deny web -> payments denies spiffe://example.org/ns/default/svc/web";
        let r = refused(&http::HeaderMap::new(), why);
        assert_eq!(r.status(), http::StatusCode::FORBIDDEN);
        let mut grpc = http::HeaderMap::new();
        grpc.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let r = refused(&grpc, why);
        assert_eq!(r.status(), http::StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert!(r.headers()["grpc-message"]
            .to_str()
            .expect("ascii")
            .contains("deny web -> payments"));
    }

    #[test]
    fn the_local_service_and_every_destination_rules_apply() {
        let local = Local {
            namespace: "default".into(),
            service: "payments".into(),
            table: Arc::new(EndpointTable::default()),
            tcp: false,
        };
        // Fail closed until a snapshot delivered the intentions.
        let web = "spiffe://example.org/ns/default/svc/web";
        assert!(local.check(web).is_err());
        local.table.store_intentions(Arc::new(IntentionMap::new()));
        assert!(local.check(web).is_ok());
        let rule = |src: &str, dst: &str, action| Intention {
            source: src.into(),
            destination: dst.into(),
            action,
            description: String::new(),
            revision: 1,
            updated_ms: 0,
        };
        let other_ns = "spiffe://example.org/ns/other/svc/web";
        let mut map = IntentionMap::new();
        assert!(local.verdict(&map, web).allowed);
        map.insert("*".into(), vec![rule("*", "*", Action::Deny)].into());
        assert!(!local.verdict(&map, web).allowed);
        map.insert(
            "payments".into(),
            vec![rule("web", "payments", Action::Allow)].into(),
        );
        assert!(local.verdict(&map, web).allowed);
        // The same service name from another namespace is not `web` here.
        assert!(!local.verdict(&map, other_ns).allowed);
        // Rules of other destinations do not apply.
        map.insert(
            "search".into(),
            vec![rule("web", "search", Action::Deny)].into(),
        );
        assert!(local.verdict(&map, web).allowed);
    }
}
