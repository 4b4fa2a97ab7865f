//! Per-upstream TCP listeners (`--upstream payments=127.0.0.1:9191`): each connection
//! goes to the endpoint with the fewest open connections (the same least-request
//! balancer, with connections as the load), then bytes are copied both ways.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::ProxyCtx;
use crate::balance::pick_from;
use crate::endpoint::ActiveGuard;
use crate::error::{ProxyError, Side};
use crate::route::{decide, NoRoute};
use http::HeaderMap;

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
    // The policy's default split applies to connections too (there are no headers).
    let mut rng = fastrand::Rng::new();
    let decision = decide(service, view.policy.as_ref(), &HeaderMap::new(), &mut rng).map_err(
        |NoRoute(reason)| ProxyError::NoRoute {
            service: service.to_string(),
            reason,
        },
    )?;
    let pool = decision.subset.map_or(&view.pool, |s| &s.pool);
    let endpoint = pick_from(&view.endpoints, pool, &ctx.lb, &mut rng).ok_or_else(|| {
        ProxyError::NoEndpoint {
            service: service.to_string(),
            registered: view.endpoints.len(),
        }
    })?;
    // Series from the first pick, so TCP endpoints show in active_requests too.
    endpoint
        .live
        .metrics
        .get_or_init(|| ctx.metrics.endpoint(service, &endpoint.id));
    let guard = ActiveGuard::new(endpoint.live.clone());
    ctx.metrics.tcp_connection(service, &endpoint.id);
    let authority = endpoint.authority();
    let started = std::time::Instant::now();
    let connect = TcpStream::connect(authority.as_ref());
    let failed = |cause: String| {
        // Telemetry: for TCP an attempt is a connection, its latency the connect time.
        ctx.telemetry
            .attempt(service, &endpoint.version, true, started.elapsed());
        if guard.failed() {
            ctx.metrics.ejection(service, &endpoint.id);
        }
        ProxyError::Connect {
            service: service.to_string(),
            endpoint: endpoint.id.clone(),
            authority: authority.to_string(),
            cause,
        }
    };
    let mut upstream = match tokio::time::timeout(ctx.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => return Err(failed(format!("timed out after {:?}", ctx.connect_timeout))),
    };
    ctx.telemetry
        .attempt(service, &endpoint.version, false, started.elapsed());
    guard.succeeded();
    let _ = upstream.set_nodelay(true);
    let _ = downstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
    Ok(())
}
