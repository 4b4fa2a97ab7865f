//! The admin port (localhost): `/ready`, `/metrics`, `/endpoints`, and OFREP flag
//! evaluation under `/ofrep/v1/` ([`crate::ofrep`]).

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

use crate::error::ProxyError;
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
    address: std::borrow::Cow<'a, str>,
    version: &'a str,
    weight: u32,
    state: &'static str,
    active: u32,
    total: u64,
    consecutive_failures: u32,
}

pub async fn serve(
    listener: TcpListener,
    table: Arc<EndpointTable>,
    metrics: Arc<Metrics>,
    facts: Option<Arc<serde_json::Value>>,
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
        let facts = facts.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (table, metrics, facts) = (table.clone(), metrics.clone(), facts.clone());
                async move {
                    let r = if req.uri().path().starts_with("/kv/") {
                        kv(&table, &req)
                    } else if req.uri().path().starts_with("/ofrep/") {
                        crate::ofrep::serve(&table, facts.as_deref(), req).await
                    } else {
                        dispatch(&table, &metrics, req)
                    };
                    Ok::<_, Infallible>(r)
                }
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

/// Decodes `%XX` and `+` in a query component.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Serialize)]
struct ExplainDoc<'a> {
    service: &'a str,
    route: &'a str,
    subset: Option<&'a str>,
    why: String,
    candidates: Vec<EndpointDoc<'a>>,
    would_pick: Option<&'a str>,
}

/// `GET /kv/KEY`: the value of a key under a followed prefix (`--kv-prefix`), from
/// memory; `GET /kv/PREFIX?keys`: the keys under it, as JSON.
fn kv(table: &EndpointTable, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    let raw = req.uri().path().trim_start_matches("/kv/");
    let key = unescape(raw);
    let kv = table.kv();
    if req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "keys"))
    {
        let keys: Vec<&String> = kv
            .range(key.clone()..)
            .take_while(|(k, _)| k.starts_with(&key))
            .map(|(k, _)| k)
            .collect();
        return respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&keys).unwrap_or_default(),
        );
    }
    match kv.get(&key) {
        Some(e) => {
            let mut r = Response::new(Full::new(Bytes::from(e.value.to_vec())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = http::HeaderValue::from_str(&e.modify_revision.to_string()) {
                r.headers_mut().insert("x-switchyard-revision", v);
            }
            r
        }
        None => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("{key:?} is not under a followed prefix or does not exist (--kv-prefix)\n"),
        ),
    }
}

fn bad(msg: String) -> Response<Full<Bytes>> {
    respond(StatusCode::BAD_REQUEST, "text/plain", msg)
}

/// `/explain?service=web&header=x-canary:true`: the routing decision for such a
/// request, without sending it.
fn explain_route(table: &EndpointTable, query: &str) -> Response<Full<Bytes>> {
    let mut service = None;
    let mut headers = http::HeaderMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()).take(64) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (unescape(k), unescape(v));
        match k.as_str() {
            "service" => service = Some(v),
            "header" => {
                let (name, value) = v.split_once(':').unwrap_or((v.as_str(), ""));
                let name =
                    http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes());
                let value = http::HeaderValue::from_str(value.trim());
                match (name, value) {
                    (Ok(n), Ok(val)) => {
                        headers.append(n, val);
                    }
                    _ => return bad(format!("bad header {v:?}: use header=NAME:VALUE\n")),
                }
            }
            other => {
                return bad(format!(
                    "unknown parameter {other:?}: use service= and header=\n"
                ))
            }
        }
    }
    let Some(service) = service else {
        return bad("missing service=NAME\n".into());
    };
    let Some(view) = table.get(&service) else {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such service {service:?} in the catalog\n"),
        );
    };
    let mut rng = fastrand::Rng::new();
    let decision = match crate::route::decide(&service, view.policy.as_ref(), &headers, &mut rng) {
        Ok(d) => d,
        Err(crate::route::NoRoute(reason)) => {
            let e = ProxyError::NoRoute {
                service: service.clone(),
                reason,
            };
            return respond(e.status(), "text/plain", format!("{e}\n"));
        }
    };
    let pool = decision.subset.map_or(&view.pool, |s| &s.pool);
    let picked = crate::balance::pick_from(
        &view.endpoints,
        pool,
        &crate::balance::LbConfig::default(),
        &mut rng,
    );
    let line = crate::route::explain(&decision, &view.endpoints, pool, picked);
    let why = line
        .split("; ")
        .find_map(|p| p.strip_prefix("why="))
        .unwrap_or("")
        .to_string();
    let doc = ExplainDoc {
        service: &view.name,
        route: decision.route.unwrap_or("default"),
        subset: decision.subset.map(|s| s.name.as_str()),
        why,
        candidates: pool
            .usable
            .iter()
            .filter_map(|&i| view.endpoints.get(i))
            .map(endpoint_doc)
            .collect(),
        would_pick: picked.map(|e| e.id.as_str()),
    };
    json(&doc)
}

/// The metrics text, with the gauges read from the table refreshed first.
fn scrape(metrics: &Metrics, table: &EndpointTable) -> String {
    metrics.set_catalog(table.age(), table.revision(), table.is_connected());
    for view in table.all() {
        // Endpoints that never carried a request have no series (see LiveState).
        for e in view
            .endpoints
            .iter()
            .filter(|e| e.live.metrics.get().is_some())
        {
            metrics.set_active(&view.name, &e.id, e.live.active());
        }
        // Series only for services this sidecar calls, as for endpoints.
        if !view
            .endpoints
            .iter()
            .any(|e| e.live.metrics.get().is_some())
        {
            continue;
        }
        // Every pool recounts (not only up to the first in panic): picks then find
        // their counts current.
        let mut panic = false;
        for pool in view.pools() {
            panic |= pool.refresh(&view.endpoints).0;
        }
        let ejected = view
            .endpoints
            .iter()
            .filter(|e| e.live.is_ejected())
            .count();
        let window = crate::outlier::millis(view.resilience.settings.slow_start);
        let now = crate::endpoint::clock_ms();
        let ramping = view
            .endpoints
            .iter()
            .filter(|e| window > 0 && e.live.is_ramping(now, window))
            .count();
        metrics.set_outliers(&view.name, panic, ejected, ramping);
    }
    metrics.encode()
}

fn json<T: Serialize>(doc: &T) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(doc) {
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

fn endpoint_doc(e: &crate::endpoint::Endpoint) -> EndpointDoc<'_> {
    EndpointDoc {
        id: &e.id,
        address: e.authority(),
        version: &e.version,
        weight: e.weight,
        state: e.state.as_str(),
        active: e.live.active(),
        total: e.live.total.load(std::sync::atomic::Ordering::Relaxed),
        consecutive_failures: e
            .live
            .consecutive_failures
            .load(std::sync::atomic::Ordering::Relaxed),
    }
}

fn dispatch(
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
            scrape(metrics, table),
        ),
        "/endpoints" => {
            let views = table.all();
            let mut services: Vec<ServiceDoc<'_>> = views
                .iter()
                .map(|v| ServiceDoc {
                    service: &v.name,
                    revision: v.revision,
                    endpoints: v.endpoints.iter().map(endpoint_doc).collect(),
                })
                .collect();
            services.sort_by(|a, b| a.service.cmp(b.service));
            let doc = EndpointsDoc {
                revision: table.revision(),
                registry_connected: table.is_connected(),
                catalog_age_seconds: table.age().map(|a| a.as_secs_f64()),
                services,
            };
            json(&doc)
        }
        "/explain" => explain_route(table, req.uri().query().unwrap_or("")),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ready, /metrics, /endpoints or /explain?service=NAME&header=K:V\n"
                .into(),
        ),
    }
}
