//! The registry's HTTP port (7401, and `--consul-http` if given): `/metrics`
//! (Prometheus text), `/health` (200 while serving; 503 while stopping, or for good once
//! the data dir cannot be written, with the dir and the OS error in the body), the
//! Consul-compatible `/v1/...` ([`crate::consul`]), Prometheus discovery
//! `/v1/prometheus/sd` ([`prometheus_sd`]) and our own JSON API `/api/v1/...`
//! ([`json_api`]) and OFREP flag evaluation `/ofrep/v1/...` ([`ofrep`]).

pub mod json_api;
pub mod ofrep;
pub mod prometheus_sd;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::consul::Consul;
use crate::raft::propose::Proposer;
use crate::shared::Shared;

/// What the HTTP port serves from.
pub struct HttpApi {
    pub shared: Arc<Shared>,
    pub proposer: Proposer,
    pub consul: Arc<Consul>,
    /// Compiled flag documents for OFREP.
    pub flags: ofrep::FlagCache,
}

/// Default most connections the HTTP port holds at once (`--max-http-connections`).
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 4_096;
/// Default time a client has to send a request head; also how long a kept-alive
/// connection may wait for its next request (hyper starts the clock at each head).
pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What one HTTP listener may hold.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Connections open at once; past it a new one is closed at once (and counted in
    /// `switchyard_registry_http_connections_refused_total`) rather than queued.
    pub max_connections: usize,
    /// Time to send a request head (slowloris), and an idle keep-alive's lifetime.
    pub header_read_timeout: std::time::Duration,
}

/// Serves until the shutdown flag is set. Each connection is its own task; bodies are
/// bounded per endpoint, blocking reads per client and per node (see [`crate::consul`]),
/// connections by `limits`.
pub async fn serve(
    api: Arc<HttpApi>,
    listener: TcpListener,
    tls: Option<Arc<switchyard_tls::ServerTls>>,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut incoming = switchyard_tls::incoming::incoming(listener, tls);
    loop {
        let accepted = tokio::select! {
            a = incoming.next() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(Ok(stream)) = accepted else {
            return;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            api.shared.metrics.http_connections_refused.inc();
            drop(stream);
            continue;
        };
        let client = stream
            .remote_addr()
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let api = api.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(dispatch(&api, req, client).await) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

async fn dispatch(
    api: &HttpApi,
    req: Request<Incoming>,
    client: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let shared = &api.shared;
    let path = req.uri().path();
    if path == "/v1/prometheus/sd" {
        return prometheus_sd::serve(api, &req);
    }
    if path.starts_with("/v1/") {
        return api.consul.handle(req, client).await;
    }
    if path.starts_with("/ofrep/") {
        return ofrep::serve(api, req).await;
    }
    if path.starts_with("/api/v1/") {
        return json_api::serve(api, &req);
    }
    match (req.method(), path) {
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        (&Method::GET, "/health") => {
            let stopping = *shared.shutdown.borrow();
            let failure = shared.storage.failure();
            let mut health = Health {
                status: "serving",
                revision: shared.catalog.read().revision(),
                data_dir: None,
                error: None,
                errno: None,
                message: None,
            };
            let code = if let Some(f) = &failure {
                health.status = "storage_failed";
                health.data_dir = Some(f.dir.display().to_string());
                health.error = Some(&f.error);
                health.errno = f.os_error();
                health.message = Some(f.to_string());
                StatusCode::SERVICE_UNAVAILABLE
            } else if stopping {
                health.status = "stopping";
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            // Serializing plain strings and numbers cannot fail.
            let body = serde_json::to_string(&health).unwrap_or_default();
            respond(code, "application/json", format!("{body}\n"))
        }
        (_, "/metrics" | "/health") => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /health, /api/v1/services, /v1/health/service/NAME or /v1/prometheus/sd\n".into(),
        ),
    }
}

/// The `/health` body; the storage fields only once the data dir cannot be written.
#[derive(serde::Serialize)]
struct Health<'a> {
    status: &'static str,
    revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

fn respond(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}
