//! The registry's HTTP port: `/metrics` (Prometheus text) and `/health` (200 while
//! serving; 503 while stopping, or for good once the data dir cannot be written, with
//! the dir and the OS error in the body).

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

use crate::shared::Shared;

/// Serves until the shutdown flag is set. Each connection is its own task; requests are
/// tiny, so no per-connection limits beyond hyper's header limits are needed.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<Arc<switchyard_tls::ServerTls>>,
    mut shutdown: watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt;
    let mut incoming = switchyard_tls::incoming::incoming(listener, tls);
    loop {
        let accepted = tokio::select! {
            a = incoming.next() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(Ok(stream)) = accepted else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(dispatch(&shared, req)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn dispatch(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
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
            "not found: try /metrics or /health\n".into(),
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
