//! Upstream connections per service, under Envoy's two connection limits: at most
//! `max_connections` open to the service's endpoints, and at most `max_pending` requests
//! waiting for one. A request past both is refused at once ([`Overflowed`]: 503 with
//! `x-envoy-overloaded: true`), never queued without bound.
//!
//! Each service gets its own connections on each proxy worker (made on its first
//! request there, so a sidecar that knows 10,000 services and calls a few holds pools
//! for those few): HTTP/1.1 pooled per endpoint in [`super::h1`], HTTP/2 (gRPC) in
//! hyper-util's client. Their connector passes every new connection through the
//! service's [`ConnGate`] (in `limits`): a request that reuses a pooled connection
//! never touches it.
//!
//! An endpoint in the mesh is asked for with an `https` URI on its mesh port: the
//! connector then wraps the socket in mutual TLS for the service ([`crate::mesh`]), and
//! the pools keep those connections apart from clear-text ones (their key is scheme and
//! authority). The SPIFFE id the server presented rides on each response
//! ([`PeerSeen`]), for `/explain`.

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

use switchyard_tls::tokio_rustls::client::TlsStream;

use crate::limits::{ConnGate, ConnPermit, Overflowed};
use crate::mesh::{Alpn, MeshClient};
use crate::proxy::body::UpstreamBody;
use crate::proxy::turn::Turn;

/// hyper's connector, each connection counted by the service's gate.
#[derive(Clone)]
pub struct GatedConnector {
    inner: HttpConnector,
    gate: Arc<ConnGate>,
    /// How long a connect may wait for a place under the connection limit.
    wait: Duration,
    /// For `https` URIs: mTLS to the service's mesh endpoints.
    mesh: Option<MeshDial>,
}

impl GatedConnector {
    /// The service's connection limit this connector dials under.
    pub fn gate(&self) -> &Arc<ConnGate> {
        &self.gate
    }
}

/// What a connector needs to dial the service's endpoints in the mesh.
#[derive(Clone)]
pub struct MeshDial {
    pub client: Arc<MeshClient>,
    pub service: Arc<str>,
    pub alpn: Alpn,
}

/// The SPIFFE id a mesh endpoint's verified certificate carried, in the extensions of
/// every response that came over the connection.
#[derive(Clone, Debug)]
pub struct PeerSeen(pub Arc<str>);

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
        let mesh = (uri.scheme() == Some(&http::uri::Scheme::HTTPS)).then(|| self.mesh.clone());
        Box::pin(async move {
            let permit = gate.acquire(wait).await?;
            let io = match mesh {
                None => Io::Plain(inner.call(uri).await?),
                Some(None) => {
                    return Err("an https endpoint for a service without mesh dialling".into())
                }
                Some(Some(m)) => {
                    let tcp = inner.call(uri).await?.into_inner();
                    let (tls, seen) = m.client.dial(tcp, &m.service, m.alpn).await?;
                    Io::Mesh(Box::new(TokioIo::new(tls)), PeerSeen(seen))
                }
            };
            Ok(GatedConn {
                io,
                turn: Turn::default(),
                _permit: permit,
            })
        })
    }
}

/// The socket under a pooled connection.
enum Io {
    Plain(TokioIo<TcpStream>),
    /// Boxed: a TLS session is a kilobyte, a pooled plain connection should not be.
    Mesh(Box<TokioIo<TlsStream<TcpStream>>>, PeerSeen),
}

/// A connection that holds its place under the service's connection limit.
pub struct GatedConn {
    io: Io,
    turn: Turn,
    _permit: ConnPermit,
}

impl GatedConn {
    /// The SPIFFE id a mesh endpoint presented (`None`: clear text).
    pub fn peer(&self) -> Option<PeerSeen> {
        match &self.io {
            Io::Plain(_) => None,
            Io::Mesh(_, seen) => Some(seen.clone()),
        }
    }
}

impl Connection for GatedConn {
    fn connected(&self) -> Connected {
        match &self.io {
            Io::Plain(io) => io.connected(),
            Io::Mesh(io, seen) => io.inner().get_ref().0.connected().extra(seen.clone()),
        }
    }
}

/// Runs `$e` on whichever socket the `&mut Io` `$on` holds.
macro_rules! on_io {
    ($on:expr, |$io:ident| $e:expr) => {
        match $on {
            Io::Plain($io) => $e,
            Io::Mesh($io, _) => {
                let $io = &mut **$io;
                $e
            }
        }
    };
}

impl hyper::rt::Read for GatedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        on_io!(&mut self.io, |io| Pin::new(io).poll_read(cx, buf))
    }
}

impl hyper::rt::Write for GatedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let (turn, io) = (&mut this.turn, &mut this.io);
        turn.write(cx, buf.len(), |cx| {
            on_io!(io, |io| Pin::new(io).poll_write(cx, buf))
        })
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_io!(&mut self.io, |io| Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_io!(&mut self.io, |io| Pin::new(io).poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Mesh(io, _) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let (turn, io) = (&mut this.turn, &mut this.io);
        let len = bufs.iter().map(|b| b.len()).sum();
        turn.write(cx, len, |cx| {
            on_io!(io, |io| Pin::new(io).poll_write_vectored(cx, bufs))
        })
    }
}

/// How upstream connections are made and pooled (the same for every service).
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// One service's upstream connections on one proxy worker: HTTP/1.1 pooled per
/// endpoint and driven by the requests using them ([`super::h1`]), and hyper-util's
/// HTTP/2 client (prior knowledge) for gRPC, which stays HTTP/2 upstream.
pub struct Clients {
    pub h1: Arc<super::h1::H1Pool>,
    pub h2: Client<GatedConnector, UpstreamBody>,
}

impl Clients {
    /// `mesh`: this sidecar's mTLS client and the service's name, for endpoints in the
    /// mesh (`None`: the sidecar has no mesh identity; every endpoint is dialled plain).
    pub fn new(
        cfg: PoolConfig,
        gate: Arc<ConnGate>,
        mesh: Option<(Arc<MeshClient>, Arc<str>)>,
    ) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(cfg.connect_timeout));
        // `https` URIs are mesh endpoints: TCP here, mTLS in `GatedConnector`.
        inner.enforce_http(false);
        let dial = |alpn| {
            mesh.as_ref().map(|(client, service)| MeshDial {
                client: client.clone(),
                service: service.clone(),
                alpn,
            })
        };
        let h1_connector = GatedConnector {
            inner: inner.clone(),
            gate: gate.clone(),
            wait: cfg.connect_timeout,
            mesh: dial(Alpn::Http1),
        };
        let connector = GatedConnector {
            inner,
            gate,
            wait: cfg.connect_timeout,
            mesh: dial(Alpn::Http2),
        };
        let h1 = super::h1::H1Pool::new(h1_connector, cfg.idle_timeout);
        // The pool's timer is what closes idle connections: without one hyper only drops
        // an expired connection when it would next be checked out.
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
