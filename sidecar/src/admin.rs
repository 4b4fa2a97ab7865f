//! The admin port (localhost): `/ready`, `/metrics`, `/endpoints`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::endpoint::State;
use crate::metrics::Metrics;
use crate::table::EndpointTable;

#[derive(Serialize)]
struct EndpointsDoc<'a> {
    revision: u64,
    registry_connected: bool,
    /// Seconds since a registry last confirmed the catalog; null if none ever did.
    catalog_age_seconds: Option<f64>,
    services: Vec<ServiceDoc<'a>>,
}

#[derive(Serialize)]
struct ServiceDoc<'a> {
    service: &'a str,
    revision: u64,
    endpoints: Vec<EndpointDoc<'a>>,
}

#[derive(Serialize)]
struct EndpointDoc<'a> {
    id: &'a str,
    address: &'a str,
    version: &'a str,
    weight: u32,
    state: State,
    active: u32,
    total: u64,
    consecutive_failures: u32,
}

pub async fn serve(
    listener: TcpListener,
    table: Arc<EndpointTable>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::stopped(&mut shutdown) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let table = table.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let r = route(&table, &metrics, req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn route(
    table: &EndpointTable,
    metrics: &Metrics,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    match req.uri().path() {
        "/ready" => {
            if table.is_loaded() {
                respond(
                    StatusCode::OK,
                    "text/plain",
                    format!("ready at revision {}\n", table.revision()),
                )
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no catalog yet (waiting for a registry or the disk cache)\n".into(),
                )
            }
        }
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(table),
        ),
        "/endpoints" => {
            let views = table.all();
            let mut services: Vec<ServiceDoc<'_>> = views
                .values()
                .map(|v| ServiceDoc {
                    service: &v.name,
                    revision: v.revision,
                    endpoints: v
                        .endpoints
                        .iter()
                        .map(|e| EndpointDoc {
                            id: &e.id,
                            address: &e.authority,
                            version: &e.version,
                            weight: e.weight,
                            state: e.state,
                            active: e.live.active(),
                            total: e.live.total.load(std::sync::atomic::Ordering::Relaxed),
                            consecutive_failures: e
                                .live
                                .consecutive_failures
                                .load(std::sync::atomic::Ordering::Relaxed),
                        })
                        .collect(),
                })
                .collect();
            services.sort_by(|a, b| a.service.cmp(b.service));
            let doc = EndpointsDoc {
                revision: table.revision(),
                registry_connected: table.is_connected(),
                catalog_age_seconds: table.age().map(|a| a.as_secs_f64()),
                services,
            };
            match serde_json::to_string_pretty(&doc) {
                Ok(mut s) => {
                    s.push('\n');
                    respond(StatusCode::OK, "application/json", s)
                }
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ready, /metrics or /endpoints\n".into(),
        ),
    }
}
