//! Real parts for the sidecar's tests: a registry, HTTP backends, a sidecar, clients.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_registry::{Listeners, RegistryConfig, RegistryHandle};
use switchyard_sidecar::{SidecarConfig, SidecarHandle, SidecarListeners};
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub async fn start_registry(dir: &Path) -> RegistryHandle {
    start_registry_on(dir, "127.0.0.1:0").await
}

pub async fn start_registry_on(dir: &Path, grpc: &str) -> RegistryHandle {
    switchyard_registry::start(
        RegistryConfig::new(dir.to_path_buf()),
        Listeners {
            grpc: TcpListener::bind(grpc).await.expect("bind"),
            http: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            dns: None,
        },
    )
    .await
    .expect("registry starts")
}

/// An HTTP/1.1 + h2c server answering `name` after `delay`, counting requests.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub delay_ms: Arc<AtomicU64>,
    /// Status to answer with (200 unless changed).
    pub status: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Backend {
    pub async fn start(name: &str, delay: Duration) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let status = Arc::new(AtomicU64::new(200));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (n, h, d, st) = (
            name.to_string(),
            hits.clone(),
            delay_ms.clone(),
            status.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.changed() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (n, h, d, st) = (n.clone(), h.clone(), d.clone(), st.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let (n, h, d, st) = (n.clone(), h.clone(), d.clone(), st.clone());
                        async move {
                            h.fetch_add(1, Ordering::Relaxed);
                            let ms = d.load(Ordering::Relaxed);
                            if ms > 0 {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let xff = req
                                .headers()
                                .get("x-forwarded-for")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let mut resp = hyper::Response::new(Full::new(Bytes::from(n)));
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(st.load(Ordering::Relaxed) as u16)
                                    .unwrap_or(hyper::StatusCode::OK);
                            resp.headers_mut().insert(
                                "x-seen-forwarded-for",
                                hyper::header::HeaderValue::from_str(&xff).expect("ascii"),
                            );
                            if let Some(s) = req.headers().get("x-switchyard-subset") {
                                resp.headers_mut().insert("x-seen-subset", s.clone());
                            }
                            let version = if req.version() == hyper::Version::HTTP_2 {
                                "h2"
                            } else {
                                "http/1.1"
                            };
                            resp.headers_mut().insert(
                                "x-seen-version",
                                hyper::header::HeaderValue::from_static(version),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            name: name.into(),
            addr,
            hits,
            delay_ms,
            status,
            stop,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

pub async fn registry_client(handle: &RegistryHandle) -> RegistryClient<Channel> {
    RegistryClient::connect(format!("http://{}", handle.grpc_addr))
        .await
        .expect("connect registry")
}

/// Registers `addr` as an instance of `service`; returns the registration's revision.
pub async fn register(
    client: &mut RegistryClient<Channel>,
    service: &str,
    id: &str,
    addr: SocketAddr,
    version: &str,
    weight: u32,
) -> u64 {
    client
        .register(pb::RegisterRequest {
            instance: Some(pb::Instance {
                namespace: String::new(),
                service: service.into(),
                id: id.into(),
                address: addr.ip().to_string(),
                port: u32::from(addr.port()),
                version: version.into(),
                labels: Default::default(),
                weight,
                zone: String::new(),
                state: 0,
            }),
            ttl_seconds: 60,
            lease_id: 0,
        })
        .await
        .expect("register")
        .into_inner()
        .revision
}

pub struct Upstreams {
    pub tcp: Vec<(String, TcpListener)>,
    pub http: Vec<(String, TcpListener)>,
}

pub async fn start_sidecar(config: SidecarConfig) -> SidecarHandle {
    start_sidecar_with(
        config,
        Upstreams {
            tcp: vec![],
            http: vec![],
        },
    )
    .await
}

pub async fn start_sidecar_with(config: SidecarConfig, upstreams: Upstreams) -> SidecarHandle {
    switchyard_sidecar::start(
        config,
        SidecarListeners {
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            http_proxy: Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
            upstreams: upstreams.tcp,
            http_upstreams: upstreams.http,
            dns: Some(
                switchyard_core::dns::bind("127.0.0.1:0".parse().expect("addr"))
                    .await
                    .expect("bind dns"),
            ),
        },
    )
    .await
    .expect("sidecar starts")
}

pub fn sidecar_config(registries: Vec<String>, cache: &Path) -> SidecarConfig {
    let mut c = SidecarConfig::new(registries);
    c.discovery.cache_file = Some(cache.join("catalog.json"));
    c.discovery.backoff_max = Duration::from_millis(500);
    c
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// One HTTP/2 (prior knowledge) GET to the proxy with `:authority` = `authority`.
/// GET over h2c (prior knowledge): (status, body, the version the backend saw).
pub async fn h2_get(proxy: SocketAddr, authority: &str) -> (u16, String, String) {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(format!("http://{authority}/hello"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    let status = resp.status().as_u16();
    let seen = resp
        .headers()
        .get("x-seen-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), seen)
}

/// GET through the sidecar with a Host header: (status, body, headers).
pub async fn get(
    client: &HttpClient,
    proxy: SocketAddr,
    host: &str,
) -> (u16, String, hyper::HeaderMap) {
    let req = hyper::Request::builder()
        .uri(format!("http://{proxy}/hello"))
        .header(hyper::header::HOST, host)
        .body(Empty::new())
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

/// A minimal HTTP/1.1 GET over a TCP socket: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the sidecar's table lists `n` endpoints for `service`.
pub async fn wait_endpoints(sidecar: &SidecarHandle, service: &str, n: usize) {
    eventually(Duration::from_secs(5), || async {
        (sidecar.table.get(service).map_or(0, |v| v.endpoints.len()) == n).then_some(())
    })
    .await;
}
