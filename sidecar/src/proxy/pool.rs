//! Upstream connections per service, under Envoy's two connection limits: at most
//! `max_connections` open to the service's endpoints, and at most `max_pending` requests
//! waiting for one. A request past both is refused at once ([`Overflowed`]: 503 with
//! `x-envoy-overloaded: true`), never queued without bound.
//!
//! Each service gets its own pooled clients (made on its first request, so a sidecar
//! that knows 10,000 services and calls a few holds pools for those few), whose
//! connector passes every new connection through the service's [`ConnGate`] (in
//! `limits`): a request that reuses a pooled connection never touches it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::limits::{ConnGate, ConnPermit, Overflowed};
use crate::proxy::body::UpstreamBody;

/// hyper's connector, each connection counted by the service's gate.
#[derive(Clone)]
pub struct GatedConnector {
    inner: HttpConnector,
    gate: Arc<ConnGate>,
    /// How long a connect may wait for a place under the connection limit.
    wait: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for GatedConnector {
    type Response = GatedConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<GatedConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let gate = self.gate.clone();
        let mut inner = self.inner.clone();
        let wait = self.wait;
        Box::pin(async move {
            let permit = gate.acquire(wait).await?;
            let io = inner.call(uri).await?;
            Ok(GatedConn {
                io,
                _permit: permit,
            })
        })
    }
}

/// A TCP connection that holds its place under the service's connection limit.
pub struct GatedConn {
    io: TokioIo<TcpStream>,
    _permit: ConnPermit,
}

impl Connection for GatedConn {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for GatedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for GatedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// How upstream connections are made and pooled (the same for every service).
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// One service's pooled clients: one speaking HTTP/1.1, one HTTP/2 (prior knowledge);
/// a request goes upstream in the protocol it arrived in, so gRPC stays HTTP/2.
pub struct Clients {
    pub h1: Client<GatedConnector, UpstreamBody>,
    pub h2: Client<GatedConnector, UpstreamBody>,
}

impl Clients {
    pub fn new(cfg: PoolConfig, gate: Arc<ConnGate>) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(cfg.connect_timeout));
        inner.enforce_http(true);
        let connector = GatedConnector {
            inner,
            gate,
            wait: cfg.connect_timeout,
        };
        // The pool's timer is what closes idle connections: without one hyper only drops
        // an expired connection when it would next be checked out.
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.idle_timeout)
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.idle_timeout)
            .build(connector);
        Self { h1, h2 }
    }
}

/// The connection limit that refused a request, if that is why hyper failed it.
pub fn overflow_of<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Overflowed> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(o) = err.downcast_ref::<Overflowed>() {
            return Some(o);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limit;

    #[test]
    fn an_overflow_is_found_through_the_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect")]
        struct Outer(#[source] Overflowed);
        let e = Outer(Overflowed {
            limit: Limit::Connections,
            max: 3,
        });
        assert_eq!(overflow_of(&e).map(|o| o.max), Some(3));
    }
}
