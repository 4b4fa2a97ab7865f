//! HTTP/1.1 upstream connections, pooled per endpoint and driven by the request that
//! uses them.
//!
//! hyper-util's pooled client runs each connection in a task of its own: a request
//! crosses to it through a channel and its response comes back through a oneshot, two
//! wake-ups per request, and every endpoint of the client shares one pool mutex. Here
//! a connection (hyper's low-level `client::conn::http1`) is polled by the request's
//! own task while it is in use: the send future and the connection are polled
//! together until the response head arrives, then the response body ([`Lease`], held
//! by `ProxyBody`) keeps polling the connection while the caller reads it. Once the
//! body has ended the connection goes back to its endpoint's idle list.
//!
//! An idle connection is polled by nobody, so a server's close is seen when it is next
//! taken (it is polled once first, and one that has ended is dropped) or by the sweep
//! that runs every second on the worker that owns the pool: it drops connections idle
//! for longer than the idle timeout and those whose server has closed them, which also
//! gives their places under the service's connection limit back.
//!
//! One pool per service per proxy worker (see `http::service_clients`), so its mutex is
//! only ever taken by one thread: one uncontended atomic per checkout and return.
//! A request that was never written because the server closed a reused connection
//! just then is sent again on a new connection, as hyper-util does.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::uri::{Authority, Uri};
use http::{header, HeaderValue, Request, Response};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use parking_lot::Mutex;

use super::body::UpstreamBody;
use super::pool::{GatedConn, GatedConnector, PeerSeen};

/// Idle connections kept per endpoint; more are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 256;
/// How often the sweep looks at idle connections (at most; less with a shorter idle
/// timeout).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an upstream attempt failed: the connection could not be made (refused, timed
/// out, a connection limit, mTLS), hyper failed the HTTP/1.1 exchange on it, or
/// hyper-util's HTTP/2 client (gRPC) failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(#[source] BoxError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    H2(#[from] hyper_util::client::legacy::Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect(_) => true,
            UpstreamError::Http(_) => false,
            UpstreamError::H2(e) => e.is_connect(),
        }
    }
}

/// A response from upstream: its body, and for HTTP/1.1 the connection it arrives on.
pub struct Received {
    pub body: Incoming,
    pub lease: Option<Lease>,
}

/// The endpoint a connection goes to: its authority, and whether it is the mesh port.
type Key = (bool, Exact);

/// An endpoint's authority, compared and hashed as its exact bytes. `Authority`'s own
/// `Eq` and `Hash` fold case byte by byte, a cost paid at every checkout and return;
/// the pool's authorities are the registry's, spelled the same way on every request
/// (two spellings of one host would only make two idle lists).
#[derive(Clone, Debug)]
struct Exact(Authority);

impl Exact {
    fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for Exact {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Exact {}

impl std::hash::Hash for Exact {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

/// One open connection: hyper's send half and the connection it drives.
struct Conn {
    send: http1::SendRequest<UpstreamBody>,
    io: http1::Connection<GatedConn, UpstreamBody>,
    /// Set once the connection future has ended (closed or failed).
    ended: bool,
    peer: Option<PeerSeen>,
}

impl Conn {
    /// Polls the connection once; true while it can still carry requests.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.ended && Pin::new(&mut self.io).poll(cx).is_ready() {
            self.ended = true;
        }
        !self.ended
    }

    /// Idle and usable: its last exchange is over and the server has not closed it.
    fn reusable(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && self.send.is_ready()
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// One service's HTTP/1.1 connections on one proxy worker, per endpoint.
pub struct H1Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>, foldhash::fast::RandomState>>,
    connector: GatedConnector,
    idle_timeout: Duration,
}

impl H1Pool {
    /// A pool dialling with `connector`, and its sweep on the current runtime.
    pub fn new(connector: GatedConnector, idle_timeout: Duration) -> Arc<Self> {
        let pool = Arc::new(Self {
            idle: Mutex::new(HashMap::default()),
            connector,
            idle_timeout,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(sweep(
            weak,
            SWEEP_EVERY
                .min(idle_timeout / 2)
                .max(Duration::from_millis(10)),
        ));
        pool
    }

    /// Sends `req` to the endpoint `uri` names (`https`: its mesh port over mTLS) on an
    /// idle connection or a new one, and returns the response with the connection,
    /// which the response body drives and then gives back. `now`: the attempt's start,
    /// read by the caller (an idle connection's age is measured against it).
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        now: Instant,
    ) -> Result<Response<Received>, UpstreamError> {
        let uri = req.uri().clone();
        let Some(authority) = uri.authority().cloned() else {
            return Err(UpstreamError::Connect(
                "an upstream URI without an authority".into(),
            ));
        };
        let key: Key = (
            uri.scheme() == Some(&http::uri::Scheme::HTTPS),
            Exact(authority),
        );
        // HTTP/1.1 wants the origin form (RFC 9112 §3.2.1) and a Host: the caller's, or
        // the endpoint's when the request came over HTTP/2 (which has none).
        if !req.headers().contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(key.1.as_str()) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        *req.uri_mut() = uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
        let mut reuse = true;
        loop {
            let taken = if reuse {
                poll_fn(|cx| Poll::Ready(self.checkout(&key, now, cx))).await
            } else {
                None
            };
            let reused = taken.is_some();
            let mut conn = match taken {
                Some(c) => c,
                None => self.dial(uri.clone()).await?,
            };
            let mut sent = std::pin::pin!(conn.send.try_send_request(req));
            let answer = poll_fn(|cx| {
                conn.drive(cx);
                sent.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(mut resp) => {
                    if let Some(peer) = conn.peer.clone() {
                        resp.extensions_mut().insert(peer);
                    }
                    let mut lease = Lease {
                        conn: Some(conn),
                        pool: Arc::downgrade(self),
                        key,
                    };
                    // Nothing to read (Content-Length: 0, 204, 304): the exchange is
                    // over with the head, and the caller's side may never poll an
                    // empty body.
                    if resp.body().is_end_stream() {
                        lease.finished();
                    }
                    return Ok(resp.map(|body| Received {
                        body,
                        lease: Some(lease),
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the server closed the idle connection just as it
                    // was taken. Once more, on a new connection.
                    Some(unsent) if reused => {
                        req = unsent;
                        reuse = false;
                    }
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection to `key` that is still good.
    fn checkout(&self, key: &Key, now: Instant, cx: &mut Context<'_>) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        while let Some(mut i) = list.pop() {
            if now.saturating_duration_since(i.since) < self.idle_timeout && i.conn.reusable(cx) {
                return Some(i.conn);
            }
        }
        None
    }

    /// A new connection (boxed: it moves between the pool, the request and the
    /// response body, and is a kilobyte).
    async fn dial(&self, uri: Uri) -> Result<Box<Conn>, UpstreamError> {
        use tower_service::Service as _;
        let mut connector = self.connector.clone();
        let io = connector.call(uri).await.map_err(UpstreamError::Connect)?;
        let peer = io.peer();
        let (send, io) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
        Ok(Box::new(Conn {
            send,
            io,
            ended: false,
            peer,
        }))
    }

    /// Takes a connection back after a finished exchange, if it can carry another.
    /// Not while a request waits for a place under the service's connection limit:
    /// the connection is closed instead, so that request can open its own (an idle
    /// connection holds its place).
    fn give_back(&self, key: Key, mut conn: Box<Conn>) {
        if self.connector.gate().pending() > 0
            || !conn.reusable(&mut Context::from_waker(Waker::noop()))
        {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Drops idle connections past the idle timeout or closed by their server, and
    /// every idle one while a request waits for a place under the connection limit.
    fn sweep_once(&self) {
        let mut cx = Context::from_waker(Waker::noop());
        let waiting = self.connector.gate().pending() > 0;
        let mut idle = self.idle.lock();
        idle.retain(|_, list| {
            list.retain_mut(|i| {
                !waiting && i.since.elapsed() < self.idle_timeout && i.conn.drive(&mut cx)
            });
            !list.is_empty()
        });
    }
}

async fn sweep(pool: Weak<H1Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.sweep_once();
    }
}

/// A connection on loan to one response: its body polls it (the response's bytes
/// arrive through it) and, once the body has ended, gives it back to the pool.
/// Dropped before the end (the caller went away, a retry, a timeout), the connection
/// is closed: what is left of the response is never read.
pub struct Lease {
    conn: Option<Box<Conn>>,
    pool: Weak<H1Pool>,
    key: Key,
}

impl Lease {
    /// Lets the connection make progress (call before polling the response body).
    pub fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(c) = &mut self.conn {
            c.drive(cx);
        }
    }

    /// The response body has ended: the connection may be reused.
    pub fn finished(&mut self) {
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade()) {
            pool.give_back(self.key.clone(), conn);
        }
    }
}
