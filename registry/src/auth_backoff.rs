//! Back-off on failed authentication, per peer address, on the client port.
//!
//! A token secret is 32 random bytes, so guessing one is hopeless; what a stranger can do
//! is hammer the port with bad tokens, filling logs and metrics and costing a hash per
//! try. After [`MAX_FAILURES`] answers of UNAUTHENTICATED to one address within
//! [`WINDOW`], every request from it is refused with RESOURCE_EXHAUSTED (and a
//! `retry-after` in the message) for a back-off that starts at [`FIRST_BACKOFF`] and
//! doubles each time the address trips it again, up to [`MAX_BACKOFF`]. An address quiet
//! for [`FORGET_AFTER`] starts over. The table is bounded ([`MAX_TRACKED`]); past it new
//! addresses are not tracked (counted in the log), never an unbounded map a stranger grows.
//!
//! The layer reads the status tonic writes in the response headers (a handler's `Err`
//! is a trailers-only answer), so no handler has to call it. Its fast path, when no
//! address has failed lately, is one atomic load.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::transport::server::TcpConnectInfo;

use crate::metrics::Metrics;

/// Failed authentications from one address within [`WINDOW`] that start a back-off.
pub const MAX_FAILURES: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(10);
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// An address with no failure for this long is forgotten (its back-off starts over).
pub const FORGET_AFTER: Duration = Duration::from_secs(300);
/// Addresses tracked at once.
pub const MAX_TRACKED: usize = 4_096;

/// gRPC's UNAUTHENTICATED.
const UNAUTHENTICATED: &[u8] = b"16";

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    last_failure: Instant,
    blocked_until: Option<Instant>,
    /// The next back-off.
    backoff: Duration,
}

/// The per-address failure table.
#[derive(Debug)]
pub struct Backoff {
    /// `entries.len()`, read without the lock: zero is the fast path.
    tracked: AtomicUsize,
    entries: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    map: HashMap<IpAddr, Entry>,
    last_sweep: Instant,
    untracked_logged: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            tracked: AtomicUsize::new(0),
            entries: Mutex::new(Table {
                map: HashMap::new(),
                last_sweep: Instant::now(),
                untracked_logged: false,
            }),
        }
    }
}

impl Backoff {
    /// How long `ip` must still wait, if it is backing off.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut table = self.entries.lock();
        self.sweep(&mut table, now);
        let until = table.map.get(&ip)?.blocked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Books a failed authentication from `ip`; returns the back-off it started, if any.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut table = self.entries.lock();
        self.sweep(&mut table, now);
        if !table.map.contains_key(&ip) {
            if table.map.len() >= MAX_TRACKED {
                if !table.untracked_logged {
                    table.untracked_logged = true;
                    tracing::warn!(
                        tracked = MAX_TRACKED,
                        "failed authentications from more addresses than the back-off table holds; new addresses are not backed off until old ones are forgotten"
                    );
                }
                return None;
            }
            table.map.insert(
                ip,
                Entry {
                    window_start: now,
                    failures: 0,
                    last_failure: now,
                    blocked_until: None,
                    backoff: FIRST_BACKOFF,
                },
            );
            self.tracked.store(table.map.len(), Ordering::Relaxed);
        }
        let entry = table.map.get_mut(&ip)?;
        if now.saturating_duration_since(entry.window_start) > WINDOW {
            entry.window_start = now;
            entry.failures = 0;
        }
        entry.failures += 1;
        entry.last_failure = now;
        if entry.failures < MAX_FAILURES {
            return None;
        }
        let backoff = entry.backoff;
        entry.blocked_until = Some(now + backoff);
        entry.backoff = (backoff * 2).min(MAX_BACKOFF);
        entry.failures = 0;
        entry.window_start = now;
        Some(backoff)
    }

    /// Forgets quiet addresses, at most once a second (an O(n) pass over ≤ 4,096).
    fn sweep(&self, table: &mut Table, now: Instant) {
        if now.saturating_duration_since(table.last_sweep) < Duration::from_secs(1) {
            return;
        }
        table.last_sweep = now;
        table.map.retain(|_, e| {
            e.blocked_until.is_some_and(|u| u > now)
                || now.saturating_duration_since(e.last_failure) < FORGET_AFTER
        });
        if table.map.len() < MAX_TRACKED {
            table.untracked_logged = false;
        }
        self.tracked.store(table.map.len(), Ordering::Relaxed);
    }
}

/// The tower layer of the client port.
#[derive(Clone)]
pub struct BackoffLayer {
    table: Arc<Backoff>,
    metrics: Arc<Metrics>,
}

impl BackoffLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            table: Arc::new(Backoff::default()),
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for BackoffLayer {
    type Service = BackoffService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BackoffService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BackoffService<S> {
    inner: S,
    layer: BackoffLayer,
}

fn peer_ip<B>(req: &http::Request<B>) -> Option<IpAddr> {
    req.extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .map(|a| a.ip())
}

impl<S, B> tower::Service<http::Request<B>> for BackoffService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BackoffFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ip = peer_ip(&req);
        // Health probes are never backed off: a kubelet shares no fate with a guesser.
        let probe = req.uri().path().starts_with("/grpc.health.v1.Health/");
        if let (Some(ip), false) = (ip, probe) {
            if let Some(wait) = self.layer.table.blocked(ip, Instant::now()) {
                self.layer.metrics.acl_auth_backoff_refused.inc();
                let status = tonic::Status::resource_exhausted(format!(
                    "too many failed authentications from {ip}: retry in {}s with a valid token (--token or SWITCHYARD_TOKEN)",
                    wait.as_secs().max(1)
                ));
                return BackoffFuture::Refused {
                    response: Some(status.into_http()),
                };
            }
        }
        BackoffFuture::Inner {
            future: self.inner.call(req),
            ip,
            layer: self.layer.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner call, watched for UNAUTHENTICATED, or a refusal made without it.
    #[project = Proj]
    pub enum BackoffFuture<F> {
        Refused { response: Option<http::Response<tonic::body::Body>> },
        Inner { #[pin] future: F, ip: Option<IpAddr>, layer: BackoffLayer },
    }
}

impl<F, E> Future for BackoffFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Refused { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                // Polled after completion: a refusal is answered once.
                None => Poll::Pending,
            },
            Proj::Inner { future, ip, layer } => {
                let result = std::task::ready!(future.poll(cx));
                if let Ok(resp) = &result {
                    let failed = resp
                        .headers()
                        .get("grpc-status")
                        .is_some_and(|s| s.as_bytes() == UNAUTHENTICATED);
                    if failed {
                        layer.metrics.acl_auth_failures.inc();
                        if let Some(ip) = *ip {
                            if let Some(backoff) = layer.table.failed(ip, Instant::now()) {
                                tracing::warn!(
                                    peer = %ip,
                                    backoff_secs = backoff.as_secs(),
                                    "too many failed authentications: refusing this address for a while"
                                );
                            }
                        }
                    }
                }
                Poll::Ready(result)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 9));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 10));

    fn fail_n(t: &Backoff, ip: IpAddr, n: u32, now: Instant) -> Option<Duration> {
        (0..n).filter_map(|_| t.failed(ip, now)).last()
    }

    #[test]
    fn ten_failures_in_the_window_back_off_doubling_to_a_minute() {
        let t = Backoff::default();
        let t0 = Instant::now();
        assert_eq!(t.blocked(A, t0), None, "nothing tracked: fast path");
        assert_eq!(fail_n(&t, A, MAX_FAILURES - 1, t0), None);
        assert_eq!(t.blocked(A, t0), None);
        assert_eq!(t.failed(A, t0), Some(FIRST_BACKOFF));
        assert!(t.blocked(A, t0).is_some());
        assert_eq!(t.blocked(B, t0), None, "per address");
        let later = t0 + Duration::from_millis(1_100);
        assert_eq!(t.blocked(A, later), None, "the back-off ends");
        let mut expected = FIRST_BACKOFF;
        let mut now = later;
        for _ in 0..8 {
            expected = (expected * 2).min(MAX_BACKOFF);
            assert_eq!(fail_n(&t, A, MAX_FAILURES, now), Some(expected));
            now += expected + Duration::from_millis(10);
        }
        assert_eq!(expected, MAX_BACKOFF);
        // Quiet long enough: forgotten, and the back-off starts over.
        let quiet = now + FORGET_AFTER + Duration::from_secs(2);
        assert_eq!(t.blocked(A, quiet), None);
        assert_eq!(t.tracked.load(Ordering::Relaxed), 0);
        assert_eq!(fail_n(&t, A, MAX_FAILURES, quiet), Some(FIRST_BACKOFF));
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_back_off() {
        let t = Backoff::default();
        let t0 = Instant::now();
        for i in 0..30u32 {
            let now = t0 + WINDOW / 4 * i;
            assert_eq!(t.failed(A, now), None, "failure {i}");
        }
    }

    #[test]
    fn the_table_is_bounded() {
        let t = Backoff::default();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            t.failed(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), now);
        }
        assert_eq!(t.tracked.load(Ordering::Relaxed), MAX_TRACKED);
        assert_eq!(t.entries.lock().map.len(), MAX_TRACKED);
    }
}
