//! Proxy workers: `--worker-threads N` serves the HTTP listeners on N threads, each a
//! single-threaded runtime with its own listening socket on the same address
//! (`SO_REUSEPORT`, so the kernel spreads new connections across them), as HAProxy's
//! `nbthread` and nginx's workers do.
//!
//! Why not one multi-threaded runtime: there a connection's tasks move between
//! threads (work stealing), the accept loop is one task, and a request's wake-ups cross
//! threads. Here a connection is accepted, served and proxied on one thread from start
//! to end, and each worker has its own pooled upstream connections
//! ([`current`] picks them), so nothing on the request path is shared but atomics and
//! the table's `ArcSwap`s. The control plane (discovery, admin, DNS, registration,
//! telemetry, TCP upstreams, the mesh inbound port) runs on the first worker, the
//! thread that runs `main`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::proxy::{self, ProxyCtx};

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The proxy worker this thread is (0 on the main thread and anywhere else).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Most proxy workers: more threads than this on one sidecar only add contention.
pub const MAX_WORKERS: usize = 64;

/// Binds `n` listening sockets to `addr` with `SO_REUSEPORT` (port 0: the port the
/// first one got), so each worker accepts on its own. `n = 1` is a plain listener.
pub fn bind_group(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n.max(1) {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        if n > 1 {
            socket.set_reuse_port(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(1024)?;
        let listener = std::net::TcpListener::from(socket);
        at = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// One extra worker's sockets: its own listener on each HTTP address (same order and
/// addresses as the first worker's).
#[derive(Debug, Default)]
pub struct WorkerListeners {
    pub http_proxy: Option<std::net::TcpListener>,
    pub http_upstreams: Vec<(String, std::net::TcpListener)>,
}

/// Starts worker `index` (1..) on its own thread; the returned task ends when the
/// worker's listeners have drained after `shutdown`.
pub fn spawn(
    index: usize,
    listeners: WorkerListeners,
    ctx: Arc<ProxyCtx>,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, String> {
    let (done_tx, done_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("proxy-worker-{index}"))
        .spawn(move || {
            WORKER.with(|w| w.set(index));
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot start a proxy worker's runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let mut serving = Vec::new();
                if let Some(l) = listeners.http_proxy {
                    serving.push(listen(l, &ctx, proxy::http::ServiceBy::Host, &shutdown));
                }
                for (service, l) in listeners.http_upstreams {
                    let target = proxy::http::ServiceBy::Fixed(service.into());
                    serving.push(listen(l, &ctx, target, &shutdown));
                }
                for s in serving.into_iter().flatten() {
                    let _ = s.await;
                }
            });
            let _ = done_tx.send(());
        })
        .map_err(|e| format!("cannot start proxy worker {index}: {e}"))?;
    Ok(tokio::spawn(async move {
        let _ = done_rx.await;
    }))
}

/// Serves one listener on this worker's runtime.
fn listen(
    l: std::net::TcpListener,
    ctx: &Arc<ProxyCtx>,
    target: proxy::http::ServiceBy,
    shutdown: &watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    match tokio::net::TcpListener::from_std(l) {
        Ok(l) => Some(tokio::spawn(proxy::http::serve(
            l,
            ctx.clone(),
            target,
            shutdown.clone(),
        ))),
        Err(e) => {
            tracing::error!(worker = current(), error = %e, "a proxy worker cannot take its listener");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_one_port() -> std::io::Result<()> {
        let group = bind_group("127.0.0.1:0".parse().map_err(std::io::Error::other)?, 3)?;
        assert_eq!(group.len(), 3);
        let port = group[0].local_addr()?.port();
        assert_ne!(port, 0);
        for l in &group {
            assert_eq!(l.local_addr()?.port(), port);
        }
        // A socket without SO_REUSEPORT cannot join the group.
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
        Ok(())
    }
}
