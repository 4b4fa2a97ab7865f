//! Per-upstream TCP listeners (`--upstream payments=127.0.0.1:9191`): each connection
//! goes to the endpoint with the fewest open connections (the same least-request
//! balancer, with connections as the load: ejection, panic mode and slow start
//! included), then bytes are copied both ways. Connect timeouts, connect-failure
//! retries and the service's `max_connections` apply as for HTTP.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::{retry, ProxyCtx};
use crate::balance::pick_from;
use crate::endpoint::{clock_ms, ActiveGuard, Endpoint};
use crate::error::{ProxyError, Side};
use crate::limits::Limit;
use crate::resilience::{backoff, Failure};
use crate::route::{decide, NoRoute};
use http::HeaderMap;

/// The connection to an endpoint: its app port, or its mesh port over mTLS.
enum Upstream {
    Plain(TcpStream),
    Mesh(Box<switchyard_tls::tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Most connections one TCP upstream listener carries at once.
pub const MAX_CONNECTIONS: usize = 10_000;

/// Accepts until shutdown. Open connections are left to finish on their own.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyCtx>,
    service: Arc<str>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::stopped(&mut shutdown) => return,
        };
        let (downstream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%remote, service = %service, "TCP connection limit reached; closing");
            continue;
        };
        let ctx = ctx.clone();
        let service = service.clone();
        tokio::spawn(async move {
            carry(&ctx, &service, downstream).await;
            drop(permit);
        });
    }
}

async fn carry(ctx: &ProxyCtx, service: &str, downstream: TcpStream) {
    if let Err(e) = connect_and_copy(ctx, service, downstream).await {
        tracing::warn!(service, side = ?e.side(), "{e}; closing the connection");
        if e.side() != Side::Upstream {
            ctx.metrics.local_reply(service, e.status().as_u16());
        }
    }
}

/// Picks an endpoint, connects and copies both ways; errors are the same [`ProxyError`]s
/// the HTTP proxy answers with.
///
/// What HTTP requests get, a connection gets too, from the service's resolved settings:
/// the connection holds one of the service's `max_connections` places for its life
/// (Envoy's per-cluster limit; over it the connection is closed at once), a connect
/// attempt is bounded by the connect timeout, and a failed connect (it never reached the
/// app) is retried on another endpoint when `retry_on` has `connect-failure`, up to
/// `retries` times, after a jittered back-off and within the retry budget. Outcomes
/// count towards ejection, and the pick honours ejection, panic mode and slow start.
async fn connect_and_copy(
    ctx: &ProxyCtx,
    service: &str,
    mut downstream: TcpStream,
) -> Result<(), ProxyError> {
    let view = ctx
        .table
        .get(service)
        .ok_or_else(|| ProxyError::UnknownService {
            service: service.to_string(),
            revision: ctx.table.revision(),
        })?;
    let settings = &view.resilience.settings;
    // The same gate as the service's HTTP connections: one count of connections to it.
    let Some(_place) = view.limits.conns.try_open() else {
        ctx.metrics.overflow(service, Limit::Connections.name());
        return Err(ProxyError::Overloaded {
            service: service.to_string(),
            limit: Limit::Connections,
            max: settings.max_connections,
        });
    };
    // The policy's default split applies to connections too (there are no headers).
    let mut rng = fastrand::Rng::new();
    let decision = decide(service, view.policy.as_ref(), &HeaderMap::new(), &mut rng).map_err(
        |NoRoute(reason)| ProxyError::NoRoute {
            service: service.to_string(),
            reason,
        },
    )?;
    let pool = decision.subset.map_or(&view.pool, |s| &s.pool);
    let mut endpoint = pick_from(&view.endpoints, pool, &ctx.lb, &mut rng).ok_or_else(|| {
        ProxyError::NoEndpoint {
            service: service.to_string(),
            registered: view.endpoints.len(),
        }
    })?;
    if view.mtls_strict && !ctx.meshed(endpoint) {
        return Err(ProxyError::MeshRequired {
            service: service.to_string(),
        });
    }
    let policy = &view.resilience.retry;
    let retries = if policy.matches(Failure::Connect) {
        policy.retries
    } else {
        0
    };
    if retries > 0 {
        view.limits.budget.deposit(clock_ms() / 1_000);
    }
    // Allocates only when a connect fails.
    let mut tried: Vec<&Endpoint> = Vec::new();
    let mut attempt = 0;
    loop {
        // Series from the first pick, so TCP endpoints show in active_requests too.
        endpoint
            .live
            .metrics
            .get_or_init(|| Box::new(ctx.metrics.endpoint(service, &endpoint.id)));
        let guard = ActiveGuard::new(endpoint.live.clone());
        ctx.metrics.tcp_connection(service, &endpoint.id);
        // In the mesh: mTLS to the mesh port (ALPN says "bytes, not HTTP").
        let mesh = ctx.meshed(endpoint).then_some(ctx.mesh.as_ref()).flatten();
        let authority = match (&mesh, &endpoint.mesh_authority) {
            (Some(_), Some(a)) => std::borrow::Cow::Borrowed(a.as_str()),
            _ => endpoint.authority(),
        };
        let started = std::time::Instant::now();
        let connect = async {
            let tcp = TcpStream::connect(authority.as_ref())
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            match mesh {
                Some(m) => m
                    .dial(tcp, service, crate::mesh::Alpn::Tcp)
                    .await
                    .map(|(tls, _)| Upstream::Mesh(Box::new(tls)))
                    .map_err(|e| e.to_string()),
                None => Ok(Upstream::Plain(tcp)),
            }
        };
        let cause = match tokio::time::timeout(ctx.connect_timeout, connect).await {
            Ok(Ok(upstream)) => {
                // Telemetry: for TCP an attempt is a connection, its latency the
                // connect time.
                ctx.telemetry
                    .attempt(service, &endpoint.version, false, started.elapsed());
                guard.succeeded(&endpoint.id);
                let _ = downstream.set_nodelay(true);
                let _ = match upstream {
                    Upstream::Plain(mut up) => {
                        tokio::io::copy_bidirectional(&mut downstream, &mut up).await
                    }
                    Upstream::Mesh(mut up) => {
                        tokio::io::copy_bidirectional(&mut downstream, &mut *up).await
                    }
                };
                return Ok(());
            }
            Ok(Err(e)) => e,
            Err(_) => format!("timed out after {:?}", ctx.connect_timeout),
        };
        ctx.telemetry
            .attempt(service, &endpoint.version, true, started.elapsed());
        if let Some(kind) = guard.failed() {
            ctx.metrics.ejection(service, &endpoint.id, kind);
        }
        let err = ProxyError::Connect {
            service: service.to_string(),
            endpoint: endpoint.id.clone(),
            authority: authority.to_string(),
            cause,
        };
        if attempt >= retries {
            return Err(err);
        }
        if !view.limits.budget.withdraw(
            clock_ms() / 1_000,
            settings.retry_budget_percent,
            settings.min_retries_per_second,
        ) {
            ctx.metrics.retry_budget_exhausted(service);
            return Err(err);
        }
        tracing::debug!(service, "{err}; retrying on another endpoint");
        ctx.metrics.retry(service, Failure::Connect.reason());
        drop(guard);
        tried.push(endpoint);
        tokio::time::sleep(backoff(attempt, &mut rng)).await;
        endpoint =
            retry::pick_other(&view.endpoints, pool, &ctx.lb, &mut rng, &tried).unwrap_or(endpoint);
        attempt += 1;
    }
}
