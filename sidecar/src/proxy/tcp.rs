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

async fn carry(ctx: &ProxyCtx, service: &str, mut downstream: TcpStream) {
    let Some(view) = ctx.table.get(service) else {
        tracing::warn!(
            service,
            "no such service in the catalog; closing the connection"
        );
        ctx.metrics.local_reply(service, 503);
        return;
    };
    // The policy's default split applies to connections too (there are no headers).
    let mut rng = fastrand::Rng::new();
    let decision = match decide(service, view.policy.as_ref(), &HeaderMap::new(), &mut rng) {
        Ok(d) => d,
        Err(NoRoute(why)) => {
            tracing::warn!(service, "{why}; closing the connection");
            ctx.metrics.local_reply(service, 503);
            return;
        }
    };
    let pool = decision.subset.map_or(&view.pool, |s| &s.pool);
    let picked = pick_from(&view.endpoints, pool, &ctx.lb, &mut rng);
    let Some(endpoint) = picked else {
        tracing::warn!(service, "no usable endpoint; closing the connection");
        ctx.metrics.local_reply(service, 503);
        return;
    };
    // Series from the first pick, so TCP endpoints show in active_requests too.
    endpoint
        .live
        .metrics
        .get_or_init(|| ctx.metrics.endpoint(service, &endpoint.id));
    let guard = ActiveGuard::new(endpoint.live.clone());
    ctx.metrics.tcp_connection(service, &endpoint.id);
    let authority = endpoint.authority();
    let connect = TcpStream::connect(authority.as_ref());
    let mut upstream = match tokio::time::timeout(ctx.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if guard.failed() {
                ctx.metrics.ejection(service, &endpoint.id);
            }
            tracing::warn!(service, endpoint = %endpoint.id, error = %e, "cannot connect upstream");
            return;
        }
        Err(_) => {
            if guard.failed() {
                ctx.metrics.ejection(service, &endpoint.id);
            }
            tracing::warn!(service, endpoint = %endpoint.id, "upstream connect timed out");
            return;
        }
    };
    guard.succeeded();
    let _ = upstream.set_nodelay(true);
    let _ = downstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
}
