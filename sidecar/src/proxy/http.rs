//! The HTTP proxy: HTTP/1.1 keep-alive and HTTP/2 cleartext (so gRPC) on one port,
//! balanced per request.
//!
//! A request names its service by `Host`/`:authority` (`payments`,
//! `payments.service.switchyard`, either with a port) on the shared `--http-proxy`
//! listener, or implicitly on a per-upstream `--http-upstream` listener. Errors are
//! answered here, with a body that says what went wrong ([`ProxyError`] picks the
//! status): 400 for a Host that is no service name, two Hosts, or a request body that
//! breaks on its way upstream (never counted against the endpoint), 503 when the
//! service is unknown or has no usable endpoint, 502 when the upstream fails, 504 when
//! it is too slow.

use std::borrow::Cow;
use std::convert::Infallible;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ::http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::body::{DownstreamBody, ProxyBody};
use super::ProxyCtx;
use crate::balance::pick_from;
use crate::endpoint::ActiveGuard;
use crate::error::ProxyError;
use crate::metrics::{EndpointMetrics, SubsetMetrics};
use crate::route::{decide, explain, NoRoute, Why, EXPLAIN_HEADER, SUBSET_HEADER};

/// Most downstream connections one listener serves at once.
pub const MAX_CONNECTIONS: usize = 10_000;
/// How long shutdown waits for in-flight requests before closing connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Pooled upstream clients: one speaking HTTP/1.1, one HTTP/2 (prior knowledge). A
/// request goes upstream in the protocol it arrived in, so gRPC stays HTTP/2.
pub(crate) struct Clients {
    h1: Client<HttpConnector, DownstreamBody>,
    h2: Client<HttpConnector, DownstreamBody>,
}

impl Clients {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self { h1, h2 }
    }
}

/// How a listener learns which service a request is for.
#[derive(Clone, Debug)]
pub enum ServiceBy {
    /// Read the service from `Host` / `:authority`.
    Host,
    /// Always this service (a `--http-upstream` listener).
    Fixed(Arc<str>),
}

/// Serves one HTTP listener until shutdown, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyCtx>,
    target: ServiceBy,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::stopped(&mut shutdown) => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "connection limit reached; closing the new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let target = target.clone();
        // Formatted once per connection, not per request.
        let client_ip = HeaderValue::from_str(&remote.ip().to_string()).ok();
        let service = service_fn(move |req| {
            let ctx = ctx.clone();
            let target = target.clone();
            let client_ip = client_ip.clone();
            async move { Ok::<_, Infallible>(proxy(&ctx, &target, client_ip, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {SHUTDOWN_GRACE:?}; closing");
    }
}

fn local(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::text(message));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The service a Host names, lower-cased: `svc`, `svc.service.<domain>`, optional port
/// and trailing dot. `None` when it names no valid service.
pub fn service_from_host<'a>(host: &'a str, suffix: &str) -> Option<Cow<'a, str>> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let host: Cow<'a, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    let name_len = match host.strip_suffix(suffix) {
        Some(name) => name.len(),
        None => host.len(),
    };
    let valid = {
        let b = &host.as_bytes()[..name_len];
        !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    if !valid {
        return None;
    }
    Some(match host {
        Cow::Borrowed(h) => Cow::Borrowed(&h[..name_len]),
        Cow::Owned(mut h) => {
            h.truncate(name_len);
            Cow::Owned(h)
        }
    })
}

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
];

/// True for a header that a `Connection` token may not remove: those the proxy itself
/// relies on or sets. `Host` (what the app routes on), `X-Forwarded-For` (the chain of
/// callers: `Connection: x-forwarded-for` would erase it), the sidecar's subset header,
/// and the framing headers hyper handles (`Content-Length`; `Transfer-Encoding` is
/// removed anyway and re-framed by hyper).
fn protected(name: &HeaderName) -> bool {
    name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name.as_str() == "x-forwarded-for"
        || name.as_str() == SUBSET_HEADER
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed set and any named in
/// `Connection`, except [`protected`] ones (such tokens are ignored). `TE: trailers`
/// survives on HTTP/2, where gRPC requires it.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !protected(n))
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let te_ok = keep_te_trailers
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_ok {
        headers.remove(header::TE);
    }
}

/// Appends the client's address to `X-Forwarded-For` (or starts it).
fn add_forwarded_for(headers: &mut HeaderMap, client_ip: Option<HeaderValue>) {
    let Some(ip) = client_ip else {
        return;
    };
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) => {
            let joined = format!("{existing}, {}", ip.to_str().unwrap_or_default());
            match HeaderValue::from_str(&joined) {
                Ok(v) => v,
                Err(_) => return,
            }
        }
        None => ip,
    };
    headers.insert(name, value);
}

/// True for gRPC (`content-type: application/grpc…`), which needs HTTP/2 end to end.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

async fn proxy(
    ctx: &ProxyCtx,
    target: &ServiceBy,
    client_ip: Option<HeaderValue>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    match forward(ctx, target, client_ip, req).await {
        Ok(resp) => resp,
        Err(e) => {
            ctx.metrics.local_reply(e.service(), e.status().as_u16());
            local(e.status(), format!("{e}\n"))
        }
    }
}

/// Routes and forwards one request; every answer the sidecar makes itself is an `Err`.
async fn forward(
    ctx: &ProxyCtx,
    target: &ServiceBy,
    client_ip: Option<HeaderValue>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // RFC 9112 §3.2: a request with more than one Host is answered 400 (the proxy would
    // route on one while the app might read the other).
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ProxyError::DuplicateHost { count: hosts });
    }
    // Looked up while the Host is borrowed from the request: no copy of it per request.
    let view = match target {
        ServiceBy::Fixed(s) => ctx.table.get(s).ok_or_else(|| s.to_string()),
        ServiceBy::Host => {
            let host = match req.uri().authority() {
                Some(a) => Some(a.as_str()),
                None => req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok()),
            };
            let Some(host) = host else {
                return Err(ProxyError::MissingHost {
                    suffix: ctx.host_suffix.clone(),
                });
            };
            match service_from_host(host, &ctx.host_suffix) {
                Some(s) => ctx.table.get(&s).ok_or_else(|| s.into_owned()),
                None => {
                    return Err(ProxyError::BadHost {
                        host: host.to_string(),
                        suffix: ctx.host_suffix.clone(),
                    })
                }
            }
        }
    }
    .map_err(|service| ProxyError::UnknownService {
        service,
        revision: ctx.table.revision(),
    })?;
    let service = view.name.as_str();
    let mut rng = fastrand::Rng::new();
    let decision = decide(service, view.policy.as_ref(), req.headers(), &mut rng).map_err(
        |NoRoute(reason)| ProxyError::NoRoute {
            service: service.to_string(),
            reason,
        },
    )?;
    let pool = decision.subset.map_or(&view.pool, |s| &s.pool);
    if let (Why::Fallback { wanted }, Some(s)) = (&decision.why, decision.subset) {
        ctx.metrics.split_fallback(service, wanted, &s.name);
    }
    let picked = pick_from(&view.endpoints, pool, &ctx.lb, &mut rng);
    let Some(endpoint) = picked else {
        return Err(ProxyError::NoEndpoint {
            service: service.to_string(),
            registered: view.endpoints.len(),
        });
    };
    let explanation = req
        .headers()
        .get(EXPLAIN_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1")
        .then(|| explain(&decision, &view.endpoints, &pool.usable, Some(endpoint)));
    if let Some(s) = decision.subset {
        if let Ok(v) = HeaderValue::from_str(&s.name) {
            req.headers_mut()
                .insert(HeaderName::from_static(SUBSET_HEADER), v);
        }
    }
    let subset_metrics = decision
        .subset
        .and_then(|s| s.metrics_for(&endpoint.version));
    // The endpoint's series exist from its first pick (not its first response), so a
    // long first request already shows in active_requests.
    let metrics = endpoint
        .live
        .metrics
        .get_or_init(|| ctx.metrics.endpoint(service, &endpoint.id));
    let guard = ActiveGuard::new(endpoint.live.clone());

    // gRPC needs HTTP/2 upstream; anything else goes upstream as HTTP/1.1 whatever it
    // arrived in, as Envoy and HAProxy do by default, so an h2c client can reach a plain
    // HTTP/1.1 service.
    let h2 = req.version() == Version::HTTP_2 && is_grpc(req.headers());
    let bad_address = || ProxyError::BadAddress {
        service: service.to_string(),
        endpoint: endpoint.id.clone(),
        authority: endpoint.authority().into_owned(),
    };
    let Some(authority) = endpoint.uri_authority.clone() else {
        return Err(bad_address());
    };
    let mut parts = ::http::uri::Parts::default();
    parts.scheme = Some(::http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| ::http::uri::PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(parts).map_err(|_| bad_address())?;
    *req.uri_mut() = uri;
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    strip_hop_by_hop(req.headers_mut(), h2);
    add_forwarded_for(req.headers_mut(), client_ip);
    let (head, body) = req.into_parts();
    let (body, body_failure) = DownstreamBody::new(body);
    let req = Request::from_parts(head, body);

    let started = Instant::now();
    let sent = if h2 {
        ctx.clients.h2.request(req)
    } else {
        ctx.clients.h1.request(req)
    };
    let result = tokio::time::timeout(ctx.request_timeout, sent).await;
    match result {
        Ok(Ok(mut resp)) => {
            // A 5xx is passed to the client as it is, and counts towards ejection
            // unless the caller's body broke (the app may have answered that).
            if resp.status().is_server_error() {
                if body_failure.get().is_none() && guard.failed() {
                    ctx.metrics.ejection(service, &endpoint.id);
                }
            } else {
                guard.succeeded();
            }
            let elapsed = started.elapsed().as_secs_f64();
            metrics.latency.observe(elapsed);
            metrics.response(resp.status().as_u16());
            if let Some(m) = subset_metrics {
                m.latency.observe(elapsed);
                m.response(resp.status().as_u16());
            }
            strip_hop_by_hop(resp.headers_mut(), true);
            if let Some(text) = explanation {
                if let Ok(v) = HeaderValue::from_str(&text) {
                    resp.headers_mut()
                        .insert(HeaderName::from_static(EXPLAIN_HEADER), v);
                }
            }
            Ok(resp.map(|body| ProxyBody::Upstream {
                body,
                _guard: guard,
            }))
        }
        Ok(Err(e)) => {
            // hyper reports a broken request body as a failed request: if it was the
            // caller's body, the endpoint did nothing wrong.
            if let Some(cause) = body_failure.get() {
                let err = ProxyError::BadRequestBody {
                    service: service.to_string(),
                    cause: cause.to_string(),
                };
                tracing::debug!(error = ?e, "{err}");
                return Err(err);
            }
            let (endpoint_id, authority) = (endpoint.id.clone(), endpoint.authority().into_owned());
            let err = if e.is_connect() {
                ProxyError::Connect {
                    service: service.to_string(),
                    endpoint: endpoint_id,
                    authority,
                    cause: root_cause(&e),
                }
            } else {
                ProxyError::Upstream {
                    service: service.to_string(),
                    endpoint: endpoint_id,
                    authority,
                    cause: root_cause(&e),
                }
            };
            tracing::debug!(error = ?e, "{err}");
            Err(upstream_failed(ctx, &guard, metrics, subset_metrics, err))
        }
        Err(_) => {
            let err = ProxyError::Timeout {
                service: service.to_string(),
                endpoint: endpoint.id.clone(),
                authority: endpoint.authority().into_owned(),
                timeout: ctx.request_timeout,
            };
            Err(upstream_failed(ctx, &guard, metrics, subset_metrics, err))
        }
    }
}

/// Books an upstream failure against its endpoint (ejection, per-endpoint and
/// per-subset responses) before the error is answered.
fn upstream_failed(
    ctx: &ProxyCtx,
    guard: &ActiveGuard,
    metrics: &EndpointMetrics,
    subset_metrics: Option<&SubsetMetrics>,
    err: ProxyError,
) -> ProxyError {
    if err.counts_against_endpoint() && guard.failed() {
        if let ProxyError::Connect {
            service, endpoint, ..
        }
        | ProxyError::Upstream {
            service, endpoint, ..
        }
        | ProxyError::Timeout {
            service, endpoint, ..
        } = &err
        {
            ctx.metrics.ejection(service, endpoint);
        }
    }
    let code = err.status().as_u16();
    metrics.response(code);
    if let Some(m) = subset_metrics {
        m.response(code);
    }
    err
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_services() {
        let s = ".service.switchyard";
        let ok = |h: &str| service_from_host(h, s).map(|c| c.into_owned());
        assert_eq!(ok("payments").as_deref(), Some("payments"));
        assert_eq!(ok("payments:8080").as_deref(), Some("payments"));
        assert_eq!(
            ok("payments.service.switchyard").as_deref(),
            Some("payments")
        );
        assert_eq!(
            ok("Payments.Service.Switchyard:15001").as_deref(),
            Some("payments")
        );
        assert_eq!(
            ok("payments.service.switchyard.").as_deref(),
            Some("payments")
        );
        for bad in [
            "",
            "pay_ments",
            "a.b",
            "payments.example.com",
            "-x",
            "[::1]:80",
            "127.0.0.1:80",
            ".service.switchyard",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut h1 = h.clone();
        strip_hop_by_hop(&mut h1, false);
        assert_eq!(h1.len(), 1, "{h1:?}");
        assert!(h1.contains_key("x-kept"));
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key(header::TE), "gRPC keeps TE: trailers");
    }

    #[test]
    fn connection_cannot_name_the_headers_the_proxy_relies_on() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static(
                "Host, X-Forwarded-For, content-length, x-switchyard-subset, x-private",
            ),
        );
        h.insert(header::HOST, HeaderValue::from_static("web"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(SUBSET_HEADER, HeaderValue::from_static("v2"));
        h.insert("x-private", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 4, "{h:?}");
        assert!(!h.contains_key("x-private"));
        for kept in ["host", "x-forwarded-for", "content-length", SUBSET_HEADER] {
            assert!(h.contains_key(kept), "{kept}: {h:?}");
        }
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        add_forwarded_for(&mut h, Some(HeaderValue::from_static("10.0.0.1")));
        add_forwarded_for(&mut h, Some(HeaderValue::from_static("127.0.0.1")));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
