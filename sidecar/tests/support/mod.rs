//! The sidecar's own test parts: a sidecar on `127.0.0.1:0`, its config, HTTP clients
//! through its proxy. Registries (real and fake), backends, waiting, HTTP GET and DNS
//! come from switchyard-testkit, re-exported here.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_registry::{RegistryConfig, RegistryHandle};
use switchyard_sidecar::{SidecarConfig, SidecarHandle, SidecarListeners};
pub use switchyard_testkit::*;
use tokio::net::TcpListener;
use tonic::transport::Channel;

/// A real registry with its data in `dir`, every port on `127.0.0.1:0`.
pub async fn start_registry(dir: &Path) -> RegistryHandle {
    start_in(RegistryConfig::new(dir.to_path_buf())).await
}

/// A real registry with its data in `dir` on the gRPC address `grpc` (a restart; a
/// single node never calls its own peer port, so that one may change).
pub async fn start_registry_on(dir: &Path, grpc: SocketAddr) -> RegistryHandle {
    let peer = "127.0.0.1:0".parse().expect("addr");
    start_at(RegistryConfig::new(dir.to_path_buf()), grpc, peer).await
}

pub async fn registry_client(handle: &RegistryHandle) -> RegistryClient<Channel> {
    RegistryClient::connect(format!("http://{}", handle.grpc_addr))
        .await
        .expect("connect registry")
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
            workers: Vec::new(),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            http_proxy: Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
            upstreams: upstreams.tcp,
            http_upstreams: upstreams.http,
            dns: Some(
                switchyard_core::dns::bind("127.0.0.1:0".parse().expect("addr"))
                    .await
                    .expect("bind dns"),
            ),
            inbound: Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
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

/// Waits until the sidecar's table lists `n` endpoints for `service`.
pub async fn wait_endpoints(sidecar: &SidecarHandle, service: &str, n: usize) {
    eventually(Duration::from_secs(5), || async {
        (sidecar.table.get(service).map_or(0, |v| v.endpoints.len()) == n).then_some(())
    })
    .await;
}

/// A registrar for `service` (id `id`, version 1.0.0) on `app`, no health check, 1 s TTL.
pub fn registrar_of(
    service: &str,
    url: &str,
    app: std::net::SocketAddr,
    id: &str,
) -> switchyard_sidecar::RegistrarConfig {
    use switchyard_sidecar::health::{Check, HealthConfig};
    use switchyard_sidecar::{LocalService, RegistrarConfig};
    RegistrarConfig {
        token: None,
        transport: Default::default(),
        service: LocalService {
            namespace: "default".into(),
            name: service.into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port: app.port(),
            version: "1.0.0".into(),
            labels: Default::default(),
            weight: 100,
            zone: String::new(),
            ttl_seconds: 1,
            mesh_port: 0,
        },
        health: HealthConfig {
            check: Check::None,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        },
        drain: Duration::from_millis(100),
        registries: vec![url.to_string()],
        probe_target: app,
    }
}
