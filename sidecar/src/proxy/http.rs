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
//!
//! Each connection has a header-read timeout (HTTP/1), an idle timeout (no request in
//! flight, HTTP/1 and HTTP/2) and a place under a per-listener limit that a flood of
//! idle sockets cannot take from new clients ([`ConnLimits`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ::http::{Request, Response, StatusCode, Uri, Version};
use atomic_waker::AtomicWaker;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::body::{DownstreamBody, Guarded, ProxyBody, UpstreamBody};
use super::h1::{Received, UpstreamError};
use super::heads;
use super::pool::{overflow_of, Clients};
use super::retry::{self, Prepared};
use super::sniff::{Protocol, Sniffed};
use super::ProxyCtx;
use crate::balance::pick_from;
use crate::endpoint::{clock_ms_at, ActiveGuard};
use crate::error::ProxyError;
use crate::limits::{Limit, Permit};
use crate::metrics::{EndpointMetrics, SubsetMetrics};
use crate::resilience::{backoff, is_idempotent, Failure};
use crate::route::{decide, explain, NoRoute, Why, EXPLAIN_HEADER, SUBSET_HEADER};
use crate::table::ServiceView;

/// Default for the most downstream connections one listener keeps open at once
/// ([`ConnLimits::max_connections`]).
pub const MAX_CONNECTIONS: usize = 10_000;
/// Default time a caller has to send a request's head ([`ConnLimits::header_read_timeout`]).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may sit with no request in flight
/// ([`ConnLimits::idle_timeout`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown waits for in-flight requests before closing connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long an idle connection told to close (timed out or evicted) may take to say
/// goodbye (HTTP/2 GOAWAY) before its socket is dropped, once nothing is in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What one downstream connection may hold, per HTTP listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// HTTP/1: the time from starting to wait for a request head to having all of it
    /// (slowloris). The clock starts at accept and at the end of each request, so
    /// between requests on a kept-alive connection too: an idle HTTP/1 connection
    /// closes after the smaller of this and `idle_timeout` (as HAProxy's `timeout
    /// http-keep-alive` falls back to `timeout http-request`, and as hyper's
    /// `header_read_timeout`, which the listener's own timer replaces, counted it).
    pub header_read_timeout: Duration,
    /// HTTP/1 and HTTP/2: a connection with no request in flight for this long is
    /// closed (HTTP/2 with GOAWAY). Counts from accept, so a socket that never sends
    /// a byte is closed too (by the header-read timeout first, if it is shorter: a
    /// connection counts as HTTP/1 until its bytes say otherwise).
    pub idle_timeout: Duration,
    /// Most connections kept open at once; at the limit an idle one is closed to make
    /// room, first the oldest that never sent a whole request (see [`Conns::admit`]).
    pub max_connections: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// One open downstream connection, as the listener's bookkeeping sees it.
struct Conn {
    accepted: Instant,
    /// Requests whose response has not been fully sent yet.
    in_flight: AtomicUsize,
    /// When the last request finished, in ms since `accepted`.
    idle_since_ms: AtomicU64,
    /// What the listener has told it ([`Told`]).
    told: Told,
    /// A whole request head has arrived on it (set when its first request begins).
    served: AtomicBool,
    /// HTTP/1 or HTTP/2, from its first bytes (which timer applies while it waits).
    protocol: Arc<Protocol>,
}

/// The connection is evicted: close it once idle, to make room for a new one.
const EVICT: u8 = 1;
/// The listener is shutting down: close the connection gracefully.
const SHUTDOWN: u8 = 2;

/// What a listener tells one connection ([`EVICT`], [`SHUTDOWN`]): bits and a waker.
///
/// The connection's task looks at it on each of its polls (every read and write of every
/// request). A `Notify` is looked at under its mutex, and a shutdown `watch` under locks
/// shared by every connection of every proxy worker; this is two atomics.
#[derive(Default)]
struct Told {
    what: AtomicU8,
    waker: AtomicWaker,
}

impl Told {
    fn tell(&self, what: u8) {
        self.what.fetch_or(what, Ordering::AcqRel);
        self.waker.wake();
    }

    /// What was told since the last time this returned it.
    fn poll_told(&self, cx: &mut Context<'_>) -> Poll<u8> {
        let what = self.what.swap(0, Ordering::AcqRel);
        if what != 0 {
            return Poll::Ready(what);
        }
        self.waker.register(cx.waker());
        match self.what.swap(0, Ordering::AcqRel) {
            0 => Poll::Pending,
            what => Poll::Ready(what),
        }
    }
}

impl Conn {
    /// How long the connection may wait with no request in flight. HTTP/1: the time to
    /// a whole request head, from accept or from the end of the last request (as
    /// hyper's `header_read_timeout` counts it, which this replaces: so an idle HTTP/1
    /// connection closes after the smaller of the two timeouts, as HAProxy's
    /// `timeout http-keep-alive` falls back to `timeout http-request`). HTTP/2 (told
    /// by its whole preface, [`super::sniff`]): only the idle timeout, as hyper's
    /// timer never applied to it.
    fn wait_limit(&self, limits: ConnLimits) -> Duration {
        if self.protocol.is_h2() {
            limits.idle_timeout
        } else {
            limits.idle_timeout.min(limits.header_read_timeout)
        }
    }

    /// How long it has had no request in flight (`None` while one is).
    fn idle_for(&self) -> Option<Duration> {
        self.idle_at(Instant::now())
    }

    /// [`Conn::idle_for`] as of `now` (one clock read for a scan of many).
    fn idle_at(&self, now: Instant) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(
            now.saturating_duration_since(self.accepted)
                .saturating_sub(since),
        )
    }
}

/// Marks a request in flight on its connection until dropped with the response body.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn begin(conn: &Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.served.store(true, Ordering::Release);
        Self(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A listener's open connections, in accept order.
struct Conns {
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
    max: usize,
}

impl Conns {
    /// No connection open yet; at most `max` at once.
    fn new(max: usize) -> Self {
        Self {
            open: Mutex::new(BTreeMap::new()),
            max,
        }
    }

    /// Makes room for connection `id`, or says there is none.
    ///
    /// At the limit one idle connection (no request in flight) is told to close and
    /// stops counting at once: the oldest on which no whole request has arrived
    /// ([`Self::never_served`]), else the one idle the longest ([`Self::idle_longest`]),
    /// rather than the new one being refused: otherwise a flood of sockets that never
    /// send a request would lock every real client out until the idle timeout (which
    /// the flood can renew forever). A client that keeps sending requests on an
    /// established connection is never the one chosen while a flood socket has been
    /// idle longer, and a connection with a request in flight is never evicted. Only
    /// when every open connection is busy is the new one refused.
    ///
    /// The idle-longest scan runs only at the limit, under the lock admissions already
    /// take, and stops early: the map is in accept order and a connection cannot have been idle
    /// longer than it has been open, so once the best idle time found is at least the
    /// next connection's age, no later one can beat it. Under a flood that is after
    /// the established connections and the flood's oldest socket. (The other choice,
    /// headroom reserved for "good" clients, needs a way to tell them apart that an
    /// attacker cannot imitate; the oldest-idle rule needs none.) An evicted socket is
    /// closed at once (it has nothing in flight), so the file descriptors and buffers
    /// in use stay at `max` however fast a flood connects.
    fn admit(&self, id: u64) -> Option<Arc<Conn>> {
        let mut open = self.open.lock();
        if open.len() >= self.max {
            let victim = match Self::never_served(&open) {
                Some(v) => v,
                None => Self::idle_longest(&open)?,
            };
            if let Some(c) = open.remove(&victim) {
                c.told.tell(EVICT);
            }
        }
        let conn = Arc::new(Conn {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            told: Told::default(),
            served: AtomicBool::new(false),
            protocol: Arc::default(),
        });
        open.insert(id, conn.clone());
        Some(conn)
    }

    /// The oldest connection on which no whole request has arrived and none is in
    /// flight: a flood's socket, silent or sending a head byte by byte. Its idle time
    /// is its age, and the map is in accept order, so the first found is idle the
    /// longest of them. Such sockets go first: an established client's idle time is
    /// counted from its last answer, and under a flood a busy worker can take longer
    /// to read its next request (one turn of a run queue of thousands of new
    /// connections) than the flood's oldest socket has been open (found by
    /// `tests/flood.rs`).
    fn never_served(open: &BTreeMap<u64, Arc<Conn>>) -> Option<u64> {
        open.iter()
            .find(|(_, c)| {
                !c.served.load(Ordering::Acquire) && c.in_flight.load(Ordering::Acquire) == 0
            })
            .map(|(id, _)| *id)
    }

    /// The connection idle the longest, every open one having served a request.
    fn idle_longest(open: &BTreeMap<u64, Arc<Conn>>) -> Option<u64> {
        let now = Instant::now();
        let mut victim: Option<(u64, Duration)> = None;
        for (id, c) in open.iter() {
            let age = now.saturating_duration_since(c.accepted);
            if victim.is_some_and(|(_, best)| best >= age) {
                break;
            }
            if let Some(idle) = c.idle_at(now) {
                if victim.is_none_or(|(_, best)| idle > best) {
                    victim = Some((*id, idle));
                }
            }
        }
        victim.map(|(id, _)| id)
    }

    fn remove(&self, id: u64) {
        self.open.lock().remove(&id);
    }

    /// Tells every open connection to close gracefully.
    fn shut_down(&self) {
        for c in self.open.lock().values() {
            c.told.tell(SHUTDOWN);
        }
    }
}

/// Default time an upstream connection may sit unused in the pool.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

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
    let limits = ctx.conn_limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header-read timeout is `run_connection`'s, not hyper's: hyper arms a boxed
    // timer for every request head it waits for, a heap allocation, a clock read and a
    // timer-wheel insertion and removal per request. hyper's `Date` is off too (a
    // clock read per response): [`respond`] and [`local`] add one where it is missing.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .auto_date_header(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .auto_date_header(false);
    // Each worker keeps its share of the limit (its own bookkeeping, no lock shared
    // between workers); the kernel spreads connections evenly across them.
    let conns = Arc::new(Conns::new(
        limits.max_connections.div_ceil(ctx.workers.max(1)).max(1),
    ));
    let accepted_total = ctx
        .metrics
        .downstream_connections(crate::workers::current());
    // Every connection task holds a sender; `recv` returns `None` once all are gone.
    let (open_tx, mut all_closed) = mpsc::channel::<()>(1);
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::stopped(&mut shutdown) => {
                conns.shut_down();
                break;
            }
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        let Some(conn_state) = conns.admit(id) else {
            tracing::warn!(%remote, "connection limit reached, every connection busy; closing the new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        accepted_total.inc();
        // Everything a request on this connection needs, in one `Arc`: one reference
        // count per request, the client address formatted once.
        let here = Arc::new(Downstream {
            ctx: ctx.clone(),
            target: target.clone(),
            client_ip: HeaderValue::from_str(&remote.ip().to_string()).ok(),
            conn: conn_state.clone(),
        });
        let service = service_fn(move |req| {
            let here = here.clone();
            async move {
                let in_flight = InFlight::begin(&here.conn);
                let resp = proxy(&here.ctx, &here.target, here.client_ip.clone(), req).await;
                Ok::<_, Infallible>(resp.map(|body| Guarded {
                    body,
                    guard: in_flight,
                }))
            }
        });
        let conn = builder
            .serve_connection(
                super::turn::Held::new(TokioIo::new(Sniffed::new(
                    stream,
                    conn_state.protocol.clone(),
                ))),
                service,
            )
            .into_owned();
        let conns = conns.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            run_connection(conn, &conn_state, limits).await;
            conns.remove(id);
            drop(open);
        });
    }
    drop(listener);
    drop(open_tx);
    if tokio::time::timeout(SHUTDOWN_GRACE, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {SHUTDOWN_GRACE:?}; closing");
    }
}

/// One downstream connection's share of what its requests need.
struct Downstream {
    ctx: Arc<ProxyCtx>,
    target: ServiceBy,
    client_ip: Option<HeaderValue>,
    conn: Arc<Conn>,
}

/// Drives one connection to its end: closes it gracefully (HTTP/1: after the request
/// in flight; HTTP/2: GOAWAY) at shutdown, when evicted, or when it has waited too
/// long with no request in flight ([`Conn::wait_limit`]); an idle connection
/// that has not gone [`CLOSE_GRACE`] after being told is dropped. At shutdown,
/// [`serve`] bounds the wait instead.
///
/// One timer per connection does both timeouts; it fires at most once per timeout
/// however many requests the connection carries, not once per request.
async fn run_connection<F>(conn: F, state: &Conn, limits: ConnLimits)
where
    F: GracefulConnection,
    F::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let check = tokio::time::sleep(state.wait_limit(limits));
    tokio::pin!(check);
    // Some(forced) once told to close; forced: drop it after CLOSE_GRACE if idle.
    let mut closing: Option<bool> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "downstream connection ended");
                }
                return;
            }
            told = poll_fn(|cx| state.told.poll_told(cx)), if closing.is_none() => {
                if told & EVICT == 0 {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(false);
                    continue;
                }
                tracing::debug!("connection limit reached: closing a connection to admit a new one");
                // Nothing in flight: closed at once, so under a flood evicted sockets
                // do not pile up faster than they go (a request that began since it
                // was chosen still gets its graceful close). Polled once first: the
                // last response's write may be held for this turn ([`super::turn`]),
                // and is made now rather than lost with the socket.
                if state.idle_for().is_some() {
                    let _ = poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx).is_ready())).await;
                    return;
                }
                conn.as_mut().graceful_shutdown();
                closing = Some(true);
                check.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            _ = check.as_mut() => {
                let now = tokio::time::Instant::now();
                let limit = state.wait_limit(limits);
                match (closing, state.idle_for()) {
                    (Some(true), Some(_)) => return,
                    (Some(_), _) => check.as_mut().reset(now + CLOSE_GRACE),
                    (None, Some(d)) if d >= limit => {
                        let h2 = state.protocol.is_h2();
                        tracing::debug!(
                            ?limit,
                            h2,
                            "closing a connection that waited too long with no request in flight"
                        );
                        // HTTP/1: nothing is in flight and the time for a head is up, so
                        // the socket goes now, as hyper's timer closed it (a half-sent
                        // head would only be let finish by a graceful close). HTTP/2
                        // says GOAWAY first.
                        if !h2 {
                            return;
                        }
                        conn.as_mut().graceful_shutdown();
                        closing = Some(true);
                        check.as_mut().reset(now + CLOSE_GRACE);
                    }
                    (None, Some(d)) => check.as_mut().reset(now + (limit - d)),
                    (None, None) => check.as_mut().reset(now + limit),
                }
            }
        }
    }
}

fn local(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::text(message));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(header::DATE, date_now());
    r
}

/// A `Date` for a response that has none (RFC 9110 §6.6.1: a proxy adds one to a
/// response it forwards without). hyper's own date, which read the clock for every
/// response, is off: most apps send their own, and then no clock is read. Made once a
/// second per worker thread, as hyper did: a reference count per response after that.
fn date_now() -> HeaderValue {
    thread_local! {
        static DATE: std::cell::RefCell<Option<(u64, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|cached| match cached {
        Some((s, v)) if *s == second => v.clone(),
        _ => {
            let text = httpdate::fmt_http_date(now);
            // An IMF-fixdate is always a valid header value.
            let v = HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
            *cached = Some((second, v.clone()));
            v
        }
    })
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

/// The service a request on the shared listener names: by its `:authority` (HTTP/2, or
/// an absolute-form target), else its `Host` (the caller refuses two Hosts first). Public
/// (hidden) for the `sidecar_http_head` fuzz target.
#[doc(hidden)]
pub fn service_of_head<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
    suffix: &str,
) -> Result<Cow<'a, str>, ProxyError> {
    let host = match uri.authority() {
        Some(a) => Some(a.as_str()),
        None => headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    };
    let Some(host) = host else {
        return Err(ProxyError::MissingHost {
            suffix: suffix.to_string(),
        });
    };
    service_from_host(host, suffix).ok_or_else(|| ProxyError::BadHost {
        host: host.to_string(),
        suffix: suffix.to_string(),
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
/// removed anyway and re-framed by hyper). `token` is compared ignoring case, as header
/// names are.
fn protected(token: &str) -> bool {
    [
        header::HOST.as_str(),
        header::CONTENT_LENGTH.as_str(),
        header::TRANSFER_ENCODING.as_str(),
        "x-forwarded-for",
        SUBSET_HEADER,
    ]
    .iter()
    .any(|p| token.eq_ignore_ascii_case(p))
}

/// `Connection` lines kept on the stack while their tokens are removed; more than
/// this (never seen from a real client) spill into a `Vec`.
const CONNECTION_LINES: usize = 4;

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed set and any named in
/// `Connection`, except [`protected`] ones (such tokens are ignored). `TE: trailers`
/// survives on HTTP/2, where gRPC requires it.
///
/// Allocates nothing: the `Connection` values are looked at from a small array, and
/// each token is removed by its name as text (`http` lowercases it on the stack).
#[doc(hidden)]
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // One pass over the head notes which of them are present and copies the
    // `Connection` values (reference counts, so the map can change while their tokens
    // are read; `entry` would reserve room in the map, an allocation when hyper sized
    // it exactly). Only what is present is removed, each removal a hash, and a head
    // with none of them costs no hash at all.
    let mut present = [false; HOP_BY_HOP.len()];
    // The first TE value: `Some(true)` for `trailers`.
    let mut te: Option<bool> = None;
    let mut lines: [Option<HeaderValue>; CONNECTION_LINES] = Default::default();
    let mut more: Vec<HeaderValue> = Vec::new();
    let mut connection_lines = 0;
    for (k, v) in headers.iter() {
        // By text: one match on a length and a few bytes, not eight name comparisons.
        let i = match k.as_str() {
            "te" => {
                te.get_or_insert_with(|| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
                continue;
            }
            "connection" => 0,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "transfer-encoding" => 3,
            "upgrade" => 4,
            "proxy-authenticate" => 5,
            "proxy-authorization" => 6,
            "trailer" => 7,
            _ => continue,
        };
        debug_assert_eq!(HOP_BY_HOP[i], k);
        present[i] = true;
        if i == 0 {
            match lines.get_mut(connection_lines) {
                Some(slot) => *slot = Some(v.clone()),
                None => more.push(v.clone()),
            }
            connection_lines += 1;
        }
    }
    for value in lines.iter().flatten().chain(&more) {
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',').map(str::trim) {
            // `keep-alive`, the token almost every `Connection` carries, is one of the
            // fixed set, removed below: no removal by name for it.
            let fixed = token.eq_ignore_ascii_case("keep-alive");
            if !token.is_empty() && !fixed && !protected(token) {
                headers.remove(token);
            }
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    // Kept only on HTTP/2 and only as `trailers` (a `Connection` token may have
    // removed it already: removing it again is a miss).
    if te.is_some_and(|trailers| !(trailers && keep_te_trailers)) {
        headers.remove(header::TE);
    }
}

/// Appends the client's address to `X-Forwarded-For` (or starts it).
#[doc(hidden)]
pub fn add_forwarded_for(headers: &mut HeaderMap, client_ip: Option<HeaderValue>) {
    let Some(ip) = client_ip else {
        return;
    };
    // Built once, not validated again per request.
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let name = XFF.clone();
    let value = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
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
#[doc(hidden)]
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What a listener answers for one request: the upstream's response, or the sidecar's
/// own answer (with `x-envoy-overloaded` for a circuit-breaker limit, and the
/// explanation when the caller asked for one).
async fn proxy(
    ctx: &ProxyCtx,
    target: &ServiceBy,
    client_ip: Option<HeaderValue>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let explain_wanted = req
        .headers()
        .get(EXPLAIN_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    match forward(ctx, target, client_ip, req, explain_wanted).await {
        Ok(resp) => resp,
        Err(Refused { err: e, explain }) => {
            ctx.metrics.local_reply(e.service(), e.status().as_u16());
            let mut r = local(e.status(), format!("{e}\n"));
            if matches!(e, ProxyError::Overloaded { .. }) {
                r.headers_mut().insert(
                    HeaderName::from_static(OVERLOADED_HEADER),
                    HeaderValue::from_static("true"),
                );
            }
            if let Some(v) = explain.and_then(|t| HeaderValue::from_str(&t).ok()) {
                r.headers_mut()
                    .insert(HeaderName::from_static(EXPLAIN_HEADER), v);
            }
            r
        }
    }
}

/// Set to `true` on a 503 the sidecar answers because a circuit-breaker limit is
/// reached (Envoy's header, which clients already know: do not retry here at once).
pub const OVERLOADED_HEADER: &str = "x-envoy-overloaded";

/// An answer the sidecar makes itself, with what `x-switchyard-explain` should say.
struct Refused {
    err: ProxyError,
    explain: Option<String>,
}

impl From<ProxyError> for Refused {
    fn from(err: ProxyError) -> Self {
        Self { err, explain: None }
    }
}

/// The service's pooled upstream clients, made on its first request under its
/// connection limits.
///
/// Each proxy worker has its own (made on its first request for the service), so a
/// pooled connection is driven by the thread whose requests use it; the connection
/// limit they are counted under is the service's, shared.
fn service_clients<'a>(ctx: &ProxyCtx, view: &'a ServiceView) -> &'a Clients {
    let any = view.limits.clients.get_or_init(|| {
        let per_worker: PerWorker = (0..ctx.workers.max(1)).map(|_| OnceLock::new()).collect();
        Arc::new(per_worker) as Arc<dyn std::any::Any + Send + Sync>
    });
    let per_worker = match any.downcast_ref::<PerWorker>() {
        Some(c) => c,
        // Only this function fills the slot, always with `PerWorker`.
        None => unreachable!("a service's client slot holds its clients per worker"),
    };
    let slot = &per_worker[crate::workers::current().min(per_worker.len() - 1)];
    slot.get_or_init(|| {
        let mesh = ctx.mesh.clone().map(|m| (m, Arc::from(view.name.as_str())));
        Clients::new(ctx.pool, view.limits.conns.clone(), mesh)
    })
}

/// A service's pooled clients, one slot per proxy worker.
type PerWorker = Box<[OnceLock<Clients>]>;

/// Appends one clause to an explanation, if one was asked for.
fn note(explanation: &mut Option<String>, clause: std::fmt::Arguments<'_>) {
    if let Some(text) = explanation {
        use std::fmt::Write as _;
        let _ = write!(text, "; {clause}");
    }
}

/// Routes and forwards one request, retrying what the service's policy allows; every
/// answer the sidecar makes itself is an `Err`.
async fn forward(
    ctx: &ProxyCtx,
    target: &ServiceBy,
    client_ip: Option<HeaderValue>,
    mut req: Request<Incoming>,
    explain_wanted: bool,
) -> Result<Response<ProxyBody>, Refused> {
    // RFC 9112 §3.2: a request with more than one Host is answered 400 (the proxy would
    // route on one while the app might read the other).
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ProxyError::DuplicateHost { count: hosts }.into());
    }
    // Looked up while the Host is borrowed from the request: no copy of it per request.
    let view = match target {
        ServiceBy::Fixed(s) => ctx.table.get(s).ok_or_else(|| s.to_string()),
        ServiceBy::Host => {
            let s = service_of_head(req.uri(), req.headers(), &ctx.host_suffix)?;
            ctx.table.get(&s).ok_or_else(|| s.into_owned())
        }
    }
    .map_err(|service| ProxyError::UnknownService {
        service,
        revision: ctx.table.revision(),
    })?;
    let service = view.name.as_str();
    let settings = &view.resilience.settings;
    let policy = &view.resilience.retry;
    // The circuit breaker first: a refused request costs no pick and no buffering, and
    // is answered at once rather than queued.
    let Some(permit) = Permit::try_take(&view.limits, Limit::Requests, settings.max_requests)
    else {
        ctx.metrics.overflow(service, Limit::Requests.name());
        return Err(Refused {
            explain: explain_wanted.then(|| {
                format!(
                    "limit={} ({}) reached: refused at once, not queued",
                    Limit::Requests.name(),
                    settings.max_requests
                )
            }),
            err: ProxyError::Overloaded {
                service: service.to_string(),
                limit: Limit::Requests,
                max: settings.max_requests,
            },
        });
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started) + settings.timeout;
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
    let Some(mut endpoint) = picked else {
        return Err(ProxyError::NoEndpoint {
            service: service.to_string(),
            registered: view.endpoints.len(),
        }
        .into());
    };
    // Strict mTLS: the view holds mesh endpoints only, and this sidecar must be able
    // to dial them with its certificate.
    if view.mtls_strict && !ctx.meshed(endpoint) {
        return Err(ProxyError::MeshRequired {
            service: service.to_string(),
        }
        .into());
    }
    let mut explanation =
        explain_wanted.then(|| explain(&decision, &view.endpoints, pool, Some(endpoint)));
    if view.mtls_strict {
        note(
            &mut explanation,
            format_args!(
                "mtls=strict ({} endpoints outside the mesh not used)",
                view.outside_mesh
            ),
        );
    }
    if let Some(s) = decision.subset {
        if let Ok(v) = HeaderValue::from_str(&s.name) {
            req.headers_mut()
                .insert(HeaderName::from_static(SUBSET_HEADER), v);
        }
    }

    // gRPC needs HTTP/2 upstream; anything else goes upstream as HTTP/1.1 whatever it
    // arrived in, as Envoy and HAProxy do by default, so an h2c client can reach a plain
    // HTTP/1.1 service.
    let grpc = is_grpc(req.headers());
    let h2 = req.version() == Version::HTTP_2 && grpc;
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| ::http::uri::PathAndQuery::from_static("/"));
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    strip_hop_by_hop(req.headers_mut(), h2);
    add_forwarded_for(req.headers_mut(), client_ip);
    // RFC 9110 §9.2.2, an Idempotency-Key, or a route the policy marks retryable.
    let idempotent = decision.retryable || is_idempotent(req.method(), req.headers());
    let (head, body) = req.into_parts();

    // A request with no body (most GETs) is ready at once: no timer is made for it.
    let prepared = if hyper::body::Body::is_end_stream(&body) {
        Ok(retry::prepare(body, policy).await)
    } else {
        tokio::time::timeout_at(deadline, retry::prepare(body, policy)).await
    };
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Err(ProxyError::BadRequestBody {
                service: service.to_string(),
                cause: e.to_string(),
            }
            .into())
        }
        Err(_) => {
            return Err(ProxyError::BadRequestBody {
                service: service.to_string(),
                cause: format!(
                    "not received within the request timeout ({:?})",
                    settings.timeout
                ),
            }
            .into())
        }
    };
    // `replay`: the body again for a retry; `None` when this request is tried once.
    let (mut next_body, replay, body_failure) = match prepared {
        Prepared::Stream { prefix, body } => {
            let (b, failure) = DownstreamBody::with_prefix(prefix, body);
            (Some(UpstreamBody::Stream(b)), None, Some(failure))
        }
        Prepared::Full { data, trailers } => (
            Some(UpstreamBody::Full {
                data: data.clone(),
                trailers: trailers.clone(),
            }),
            Some((data, trailers)),
            None,
        ),
    };
    let retryable = replay.is_some();
    if retryable {
        view.limits.budget.deposit(clock_ms_at(started) / 1_000);
    }

    let mut head = KeptHead(Some(head));
    let mut attempt: u32 = 0;
    let mut tried: Vec<&crate::endpoint::Endpoint> = Vec::new();
    let mut retry_permit: Option<Permit> = None;
    loop {
        let last_chance = !retryable || attempt >= policy.retries;
        let subset_metrics = decision
            .subset
            .and_then(|s| s.metrics_for(&endpoint.version));
        // The endpoint's series exist from its first pick (not its first response), so
        // a long first request already shows in active_requests.
        let metrics = endpoint
            .live
            .metrics
            .get_or_init(|| Box::new(ctx.metrics.endpoint(service, &endpoint.id)));
        let guard = ActiveGuard::new(endpoint.live.clone());
        let bad_address = || ProxyError::BadAddress {
            service: service.to_string(),
            endpoint: endpoint.id.clone(),
            authority: endpoint.authority().into_owned(),
        };
        // An endpoint in the mesh is dialled on its mesh port with mTLS (`https`: the
        // pool's connector does the TLS), any other on its app port in clear text.
        let meshed = ctx.meshed(endpoint);
        let (scheme, authority) = if meshed {
            (
                ::http::uri::Scheme::HTTPS,
                endpoint.mesh_authority.as_deref().cloned(),
            )
        } else {
            (::http::uri::Scheme::HTTP, endpoint.uri_authority.clone())
        };
        let Some(authority) = authority else {
            return Err(bad_address().into());
        };
        if explanation.is_some() {
            match ctx.mesh.as_ref().and_then(|m| m.expected_identity(service)) {
                Some(expected) if meshed => note(
                    &mut explanation,
                    format_args!("mtls=on expected={expected}"),
                ),
                _ if endpoint.mesh_authority.is_some() => note(
                    &mut explanation,
                    format_args!("mtls=off (this sidecar has no mesh certificate)"),
                ),
                _ => note(
                    &mut explanation,
                    format_args!("mtls=off (endpoint not in the mesh)"),
                ),
            }
        }
        let mut parts = ::http::uri::Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority);
        parts.path_and_query = Some(path.clone());
        let uri = Uri::from_parts(parts).map_err(|_| bad_address())?;
        // The head is copied only while a retry may still need it.
        let mut req = match (last_chance, head.0.as_ref()) {
            (false, Some(h)) => {
                let mut r = Request::new(());
                *r.method_mut() = h.method.clone();
                *r.version_mut() = h.version;
                *r.headers_mut() = heads::copy_of(&h.headers);
                r
            }
            _ => match head.0.take() {
                Some(h) => Request::from_parts(h, ()),
                None => return Err(bad_address().into()),
            },
        };
        *req.uri_mut() = uri;
        let body = next_body.take().unwrap_or_else(|| match &replay {
            Some((data, trailers)) => UpstreamBody::Full {
                data: data.clone(),
                trailers: trailers.clone(),
            },
            None => UpstreamBody::empty(),
        });
        let req = req.map(|()| body);

        let try_started = Instant::now();
        let try_deadline = settings.per_try_timeout.map_or(deadline, |p| {
            (tokio::time::Instant::from_std(try_started) + p).min(deadline)
        });
        let clients = service_clients(ctx, &view);
        let sent = async {
            if h2 {
                let resp = clients.h2.request(req).await?;
                Ok(resp.map(|body| Received { body, lease: None }))
            } else {
                clients.h1.send(req, try_started).await
            }
        };
        let outcome: Result<Result<_, UpstreamError>, _> =
            tokio::time::timeout_at(try_deadline, sent).await;
        // A retry counts as active until its answer starts.
        drop(retry_permit.take());
        let body_broke = || body_failure.as_ref().and_then(|f| f.get());
        // What to answer if this attempt is not retried, and why it could be.
        let (failure, answer) = match outcome {
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                let failure = if last_chance {
                    None
                } else {
                    retry::classify_response(policy, status, resp.headers(), grpc)
                        .filter(|f| policy.allows(*f, idempotent))
                };
                match failure {
                    None => {
                        return Ok(respond(
                            ctx,
                            service,
                            endpoint,
                            resp,
                            guard,
                            permit,
                            metrics,
                            subset_metrics,
                            try_started,
                            body_broke().is_some(),
                            explanation,
                        ))
                    }
                    Some(f) => (f, Ok(resp)),
                }
            }
            Ok(Err(e)) => {
                // hyper reports a broken request body as a failed request: if it was the
                // caller's body, the endpoint did nothing wrong.
                if let Some(cause) = body_broke() {
                    let err = ProxyError::BadRequestBody {
                        service: service.to_string(),
                        cause: cause.to_string(),
                    };
                    tracing::debug!(error = ?e, "{err}");
                    return Err(err.into());
                }
                // A connection limit of the service, not the endpoint: refused at once
                // (503, x-envoy-overloaded), counted against nobody, not retried.
                if let Some(o) = overflow_of(&e) {
                    ctx.metrics.overflow(service, o.limit.name());
                    note(
                        &mut explanation,
                        format_args!(
                            "limit={} ({}) reached: refused at once, not queued",
                            o.limit.name(),
                            o.max
                        ),
                    );
                    return Err(Refused {
                        err: ProxyError::Overloaded {
                            service: service.to_string(),
                            limit: o.limit,
                            max: o.max,
                        },
                        explain: explanation,
                    });
                }
                let (endpoint_id, authority) =
                    (endpoint.id.clone(), endpoint.authority().into_owned());
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
                let err = upstream_failed(
                    ctx,
                    endpoint,
                    try_started,
                    &guard,
                    metrics,
                    subset_metrics,
                    err,
                );
                let f = retry::classify_error(&e, e.is_connect());
                if last_chance || !policy.allows(f, idempotent) {
                    return Err(Refused {
                        err,
                        explain: explanation,
                    });
                }
                (f, Err(err))
            }
            Err(_) => {
                let per_try = try_deadline < deadline;
                let err = ProxyError::Timeout {
                    service: service.to_string(),
                    endpoint: endpoint.id.clone(),
                    authority: endpoint.authority().into_owned(),
                    timeout: match settings.per_try_timeout {
                        Some(p) if per_try => p,
                        _ => settings.timeout,
                    },
                    per_try,
                    attempts: attempt + 1,
                };
                let err = upstream_failed(
                    ctx,
                    endpoint,
                    try_started,
                    &guard,
                    metrics,
                    subset_metrics,
                    err,
                );
                if !per_try || last_chance || !policy.allows(Failure::PerTryTimeout, idempotent) {
                    return Err(Refused {
                        err,
                        explain: explanation,
                    });
                }
                (Failure::PerTryTimeout, Err(err))
            }
        };

        // A retry is allowed by the policy; the retry limit and the budget decide.
        let max_retries = view
            .limits
            .retry_concurrency(settings.retry_budget_percent, settings.max_retries);
        let denied = match Permit::try_take(&view.limits, Limit::Retries, max_retries) {
            None => {
                ctx.metrics.overflow(service, Limit::Retries.name());
                Some(
                    format_args!(
                        "not retried: {} ({max_retries}) reached",
                        Limit::Retries.name()
                    )
                    .to_string(),
                )
            }
            Some(p) => {
                if view.limits.budget.withdraw(
                    clock_ms_at(Instant::now()) / 1_000,
                    settings.retry_budget_percent,
                    settings.min_retries_per_second,
                ) {
                    retry_permit = Some(p);
                    None
                } else {
                    ctx.metrics.retry_budget_exhausted(service);
                    Some("not retried: retry budget exhausted".to_string())
                }
            }
        };
        let pause = backoff(attempt, &mut rng);
        let denied = denied.or_else(|| {
            (tokio::time::Instant::now() + pause >= deadline)
                .then(|| "not retried: the request timeout is too near".to_string())
        });
        if let Some(why) = denied {
            tracing::debug!(service, endpoint = %endpoint.id, reason = %failure.reason(), "{why}");
            note(
                &mut explanation,
                format_args!("{} from {}, {why}", failure.reason(), endpoint.id),
            );
            return match answer {
                Ok(resp) => Ok(respond(
                    ctx,
                    service,
                    endpoint,
                    resp,
                    guard,
                    permit,
                    metrics,
                    subset_metrics,
                    try_started,
                    body_broke().is_some(),
                    explanation,
                )),
                Err(err) => Err(Refused {
                    err,
                    explain: explanation,
                }),
            };
        }
        // Retrying: the failed attempt counts against its endpoint (5xx and errors were
        // booked above), and frees it before the pause.
        if let Ok(resp) = &answer {
            book(
                ctx,
                service,
                endpoint,
                &guard,
                metrics,
                subset_metrics,
                resp.status(),
                resp.headers(),
                try_started,
                false,
            );
        }
        drop(answer);
        drop(guard);
        ctx.metrics.retry(service, failure.reason());
        tried.push(endpoint);
        tokio::time::sleep(pause).await;
        endpoint =
            retry::pick_other(&view.endpoints, pool, &ctx.lb, &mut rng, &tried).unwrap_or(endpoint);
        attempt += 1;
        note(
            &mut explanation,
            format_args!(
                "retry {attempt}: {} from {}, picked={}",
                failure.reason(),
                tried[tried.len() - 1].id,
                endpoint.id
            ),
        );
    }
}

/// The request head kept for a retry; its header map goes back to this thread's
/// [`heads`] pool when the request is done with it, however it ends.
struct KeptHead(Option<::http::request::Parts>);

impl Drop for KeptHead {
    fn drop(&mut self) {
        if let Some(parts) = self.0.take() {
            heads::give_back(parts.headers);
        }
    }
}

/// Books a response against its endpoint: latency, status class, and a 5xx towards
/// ejection unless the caller's body broke (the app may have answered that).
#[allow(clippy::too_many_arguments)]
fn book(
    ctx: &ProxyCtx,
    service: &str,
    endpoint: &crate::endpoint::Endpoint,
    guard: &ActiveGuard,
    metrics: &EndpointMetrics,
    subset_metrics: Option<&SubsetMetrics>,
    status: StatusCode,
    headers: &HeaderMap,
    started: Instant,
    body_broke: bool,
) {
    // One clock read for the telemetry and the histograms.
    let latency = started.elapsed();
    // Per attempt, to the version that answered (a broken caller body is not its fault).
    if !body_broke {
        ctx.telemetry.response(
            service,
            &endpoint.version,
            status.as_u16(),
            headers,
            latency,
        );
    }
    if status.is_server_error() {
        if let Some(kind) = (!body_broke).then(|| guard.failed()).flatten() {
            ctx.metrics.ejection(service, &endpoint.id, kind);
        }
    } else {
        guard.succeeded(&endpoint.id);
    }
    let elapsed = latency.as_secs_f64();
    metrics.latency.observe(elapsed);
    metrics.response(status.as_u16());
    if let Some(m) = subset_metrics {
        m.latency.observe(elapsed);
        m.response(status.as_u16());
    }
}

/// The upstream's response on its way to the caller: booked, hop-by-hop headers
/// removed, explained if asked, holding the endpoint's and the service's counts until
/// its body ends.
#[allow(clippy::too_many_arguments)]
fn respond(
    ctx: &ProxyCtx,
    service: &str,
    endpoint: &crate::endpoint::Endpoint,
    mut resp: Response<Received>,
    guard: ActiveGuard,
    permit: Permit,
    metrics: &EndpointMetrics,
    subset_metrics: Option<&SubsetMetrics>,
    started: Instant,
    body_broke: bool,
    explanation: Option<String>,
) -> Response<ProxyBody> {
    book(
        ctx,
        service,
        endpoint,
        &guard,
        metrics,
        subset_metrics,
        resp.status(),
        resp.headers(),
        started,
        body_broke,
    );
    strip_hop_by_hop(resp.headers_mut(), true);
    if !resp.headers().contains_key(header::DATE) {
        resp.headers_mut().insert(header::DATE, date_now());
    }
    let explanation = explanation.map(|mut t| {
        if let Some(seen) = resp.extensions().get::<super::pool::PeerSeen>() {
            use std::fmt::Write as _;
            let _ = write!(t, "; seen={}", seen.0);
        }
        t
    });
    if let Some(v) = explanation.and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut()
            .insert(HeaderName::from_static(EXPLAIN_HEADER), v);
    }
    // A gRPC status not in the head comes in the trailers: watch for it there.
    let late = (is_grpc(resp.headers()) && !resp.headers().contains_key("grpc-status"))
        .then(|| ctx.telemetry.late_status(service, &endpoint.version))
        .flatten();
    resp.map(|Received { body, lease }| ProxyBody::Upstream {
        body,
        lease,
        _guard: guard,
        _permit: permit,
        late,
    })
}

/// Books an upstream failure against its endpoint (ejection, per-endpoint and
/// per-subset responses) before the error is answered.
fn upstream_failed(
    ctx: &ProxyCtx,
    endpoint: &crate::endpoint::Endpoint,
    started: Instant,
    guard: &ActiveGuard,
    metrics: &EndpointMetrics,
    subset_metrics: Option<&SubsetMetrics>,
    err: ProxyError,
) -> ProxyError {
    // A transport failure (connect, reset, timeout) is an error of the version tried.
    if let ProxyError::Connect { service, .. }
    | ProxyError::Upstream { service, .. }
    | ProxyError::Timeout { service, .. } = &err
    {
        ctx.telemetry
            .attempt(service, &endpoint.version, true, started.elapsed());
    }
    if let Some(kind) = err
        .counts_against_endpoint()
        .then(|| guard.failed())
        .flatten()
    {
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
            ctx.metrics.ejection(service, endpoint, kind);
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

    /// At the limit the connection idle the longest goes, not the oldest one: an
    /// established client that keeps sending requests outlives younger sockets that
    /// never sent one. One with a request in flight is never chosen; with every one
    /// busy the new connection is refused.
    #[test]
    fn the_connection_idle_the_longest_makes_room_not_the_oldest() {
        let conns = Conns::new(3);
        let established = conns.admit(1).expect("room");
        std::thread::sleep(Duration::from_millis(30));
        let _flood_a = conns.admit(2).expect("room");
        let _flood_b = conns.admit(3).expect("room");
        std::thread::sleep(Duration::from_millis(30));
        // The established connection just finished a request.
        drop(InFlight::begin(&established));
        conns.admit(4).expect("room");
        let open: Vec<u64> = conns.open.lock().keys().copied().collect();
        assert_eq!(open, vec![1, 3, 4], "the flood's oldest socket went");

        // Busy connections are never chosen; all busy: refused.
        let busy: Vec<InFlight> = conns.open.lock().values().map(InFlight::begin).collect();
        assert!(conns.admit(5).is_none());
        drop(busy);
        assert!(conns.admit(5).is_some());
    }

    /// An established client whose last answer is older than a flood's newest socket
    /// (a busy worker has not read its next request yet) is not the one evicted:
    /// sockets that never sent a whole request go first. The idle-longest rule alone
    /// would evict the client here.
    #[test]
    fn a_socket_that_never_sent_a_request_makes_room_before_a_client() {
        let conns = Conns::new(2);
        let established = conns.admit(1).expect("room");
        drop(InFlight::begin(&established));
        let _silent = conns.admit(2).expect("room");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            Conns::idle_longest(&conns.open.lock()),
            Some(1),
            "by idle time alone the client would go"
        );
        conns.admit(3).expect("room");
        let open: Vec<u64> = conns.open.lock().keys().copied().collect();
        assert_eq!(open, vec![1, 3], "the silent socket went, not the client");
    }

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

    /// Each of the fixed set goes, whatever else the head holds, and `Connection:
    /// keep-alive` does not spare a `Keep-Alive` header.
    #[test]
    fn every_fixed_hop_by_hop_header_is_removed() {
        for name in HOP_BY_HOP.iter().chain([&header::TE]) {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("web"));
            h.insert(name.clone(), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
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
