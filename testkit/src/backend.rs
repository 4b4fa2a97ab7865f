//! HTTP backends for proxy tests: each answers its name, counts its requests, and can
//! be slowed, made to answer another status, or stopped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// An HTTP/1.1 + h2c server answering `name` after `delay`, counting requests. It
/// echoes what it saw in response headers: `x-seen-forwarded-for`, `x-seen-subset`
/// (the `x-switchyard-subset` request header), `x-seen-peer-identity` (the mesh inbound's header) and `x-seen-version` (`h2` or
/// `http/1.1`).
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub delay_ms: Arc<AtomicU64>,
    /// Status to answer with (200 unless changed).
    pub status: Arc<AtomicU64>,
    /// Answer 503 to this many of every 1,000 requests, spread evenly (0 unless set):
    /// a version with a known error rate.
    pub fail_per_mille: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// The shared knobs one request reads.
#[derive(Clone)]
struct Knobs {
    name: String,
    hits: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
    status: Arc<AtomicU64>,
    fail_per_mille: Arc<AtomicU64>,
}

impl Backend {
    pub async fn start(name: &str, delay: Duration) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let knobs = Knobs {
            name: name.to_string(),
            hits: Arc::new(AtomicUsize::new(0)),
            delay_ms: Arc::new(AtomicU64::new(delay.as_millis() as u64)),
            status: Arc::new(AtomicU64::new(200)),
            fail_per_mille: Arc::new(AtomicU64::new(0)),
        };
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let serving = knobs.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.changed() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let knobs = serving.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(knobs.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            name: name.into(),
            addr,
            hits: knobs.hits,
            delay_ms: knobs.delay_ms,
            status: knobs.status,
            fail_per_mille: knobs.fail_per_mille,
            stop,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops accepting connections (the port is closed once the listener drops).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

async fn answer(
    k: Knobs,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let n = k.hits.fetch_add(1, Ordering::Relaxed) as u64 + 1;
    let per_mille = k.fail_per_mille.load(Ordering::Relaxed);
    // Request n fails when n·p/1000 crosses an integer: exactly p of every 1,000.
    let fails = per_mille > 0 && (n * per_mille) / 1000 != ((n - 1) * per_mille) / 1000;
    let ms = k.delay_ms.load(Ordering::Relaxed);
    if ms > 0 {
        // The backend's own latency, not a test waiting: this is what is measured.
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let xff = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut resp = hyper::Response::new(Full::new(Bytes::from(k.name)));
    *resp.status_mut() = if fails {
        hyper::StatusCode::SERVICE_UNAVAILABLE
    } else {
        hyper::StatusCode::from_u16(k.status.load(Ordering::Relaxed) as u16)
            .unwrap_or(hyper::StatusCode::OK)
    };
    resp.headers_mut().insert(
        "x-seen-forwarded-for",
        hyper::header::HeaderValue::from_str(&xff).expect("ascii"),
    );
    if let Some(s) = req.headers().get("x-switchyard-peer-identity") {
        resp.headers_mut().insert("x-seen-peer-identity", s.clone());
    }
    if let Some(s) = req.headers().get("x-switchyard-subset") {
        resp.headers_mut().insert("x-seen-subset", s.clone());
    }
    let version = if req.version() == hyper::Version::HTTP_2 {
        "h2"
    } else {
        "http/1.1"
    };
    resp.headers_mut().insert(
        "x-seen-version",
        hyper::header::HeaderValue::from_static(version),
    );
    Ok(resp)
}
