//! What the HTTP proxy needs to try a request again: a copy of a small body, the
//! failure of an attempt in `retry_on` terms, and another endpoint to send it to.
//!
//! Nothing here runs unless the service's retry policy could use it: a request to a
//! service with `retries = 0` streams its body and is never classified.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

use crate::balance::{pick_from, LbConfig, Pool};
use crate::endpoint::Endpoint;
use crate::resilience::{Failure, RetryPolicy, MAX_RETRY_BODY};

/// The request body, ready for its first attempt.
pub enum Prepared {
    /// Streamed: the request cannot be sent twice. `prefix` holds what was already read
    /// from the body while looking for its end.
    Stream {
        prefix: Option<Bytes>,
        body: Incoming,
    },
    /// In memory (or empty): every attempt sends the same bytes.
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

/// Appends a data frame to what was read so far (one copy only once a second frame
/// arrives).
fn keep(first: &mut Option<Bytes>, joined: &mut Option<BytesMut>, d: Bytes) {
    match (joined.as_mut(), first.take()) {
        (Some(j), _) => j.extend_from_slice(&d),
        (None, None) => *first = Some(d),
        (None, Some(f)) => {
            let mut j = BytesMut::with_capacity(f.len() + d.len());
            j.extend_from_slice(&f);
            j.extend_from_slice(&d);
            *joined = Some(j);
        }
    }
}

/// Keeps the body for retries when that costs little: an empty body (a GET) needs
/// nothing, a body whose length is known and at most [`MAX_RETRY_BODY`] is read into
/// memory. A body of unknown length (chunked, or gRPC over HTTP/2) is kept if all of it,
/// at most [`MAX_RETRY_BODY`], is already there (a unary gRPC call arrives with its end):
/// only frames that are ready are read, never waited for, so a streaming call is not held
/// back. Any other body is streamed and its request is not retried. An `Err` is the
/// caller's body breaking (answered 400).
pub async fn prepare(body: Incoming, retry: &RetryPolicy) -> Result<Prepared, hyper::Error> {
    if !retry.enabled() {
        return Ok(Prepared::Stream { prefix: None, body });
    }
    if body.is_end_stream() {
        return Ok(Prepared::Full {
            data: None,
            trailers: None,
        });
    }
    let known = body.size_hint().exact();
    if matches!(known, Some(n) if n > MAX_RETRY_BODY) {
        return Ok(Prepared::Stream { prefix: None, body });
    }
    let mut body = body;
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut kept = 0u64;
    let mut trailers = None;
    loop {
        let next = if known.is_some() {
            Some(body.frame().await)
        } else {
            // Only what is ready now: a zero timeout polls the frame once.
            tokio::time::timeout(std::time::Duration::ZERO, body.frame())
                .await
                .ok()
        };
        let Some(frame) = next else {
            // The rest is not here yet (a streaming call): stream it after what was read.
            let prefix = joined.map(BytesMut::freeze).or(first);
            return Ok(Prepared::Stream { prefix, body });
        };
        let Some(frame) = frame else { break };
        let frame = frame?;
        match frame.into_data() {
            Ok(d) if d.is_empty() => {}
            Ok(d) => {
                kept += d.len() as u64;
                keep(&mut first, &mut joined, d);
                if kept > MAX_RETRY_BODY {
                    let prefix = joined.map(BytesMut::freeze).or(first);
                    return Ok(Prepared::Stream { prefix, body });
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    let data = joined.map(BytesMut::freeze).or(first);
    Ok(Prepared::Full { data, trailers })
}

/// An attempt's error in `retry_on` terms. Only a failed connect, a refused HTTP/2
/// stream or a request dropped before it was written (hyper: "canceled") prove the
/// app never saw the request; anything else broke mid-exchange.
pub fn classify_error(e: &(dyn std::error::Error + 'static), is_connect: bool) -> Failure {
    if is_connect {
        return Failure::Connect;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Failure::RefusedStream;
            }
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_canceled() {
                return Failure::ResetUnsent;
            }
        }
        cur = err.source();
    }
    Failure::Reset
}

/// A response head in `retry_on` terms, when it is a failure the policy looks at. The
/// gRPC status is read only from a gRPC response's head (a trailers-only answer, which
/// is how servers refuse a call); trailers after a body come too late to retry.
pub fn classify_response(
    policy: &RetryPolicy,
    status: u16,
    headers: &HeaderMap,
    grpc: bool,
) -> Option<Failure> {
    if policy.on_status(status) {
        return Some(Failure::Status(status));
    }
    if grpc && policy.on_grpc() {
        return match headers.get("grpc-status").map(|v| v.as_bytes()) {
            Some(b"14") => Some(Failure::GrpcUnavailable),
            Some(b"8") => Some(Failure::GrpcResourceExhausted),
            _ => None,
        };
    }
    None
}

/// An endpoint for a retry, other than those `tried` when the pool has another: a
/// least-request pick, drawn again a few times if it lands on a tried one, then the
/// first untried endpoint from a random place.
pub fn pick_other<'a>(
    endpoints: &'a [Endpoint],
    pool: &Pool,
    cfg: &LbConfig,
    rng: &mut fastrand::Rng,
    tried: &[&Endpoint],
) -> Option<&'a Endpoint> {
    let was_tried = |e: &Endpoint| {
        tried
            .iter()
            .any(|t| std::ptr::eq(t.live.as_ref(), e.live.as_ref()))
    };
    let mut last = None;
    for _ in 0..3 {
        let e = pick_from(endpoints, pool, cfg, rng)?;
        if !was_tried(e) {
            return Some(e);
        }
        last = Some(e);
    }
    let n = pool.usable.len();
    let start = rng.usize(..n.max(1));
    (0..n)
        .filter_map(|k| endpoints.get(pool.usable[(start + k) % n]))
        .find(|e| !was_tried(e) && !e.live.is_ejected())
        .or(last)
}

#[cfg(test)]
mod tests {
    use switchyard_core::model::resilience::RetryOn;
    use switchyard_core::model::State;

    use super::*;
    use crate::endpoint::test_instance;

    #[test]
    fn a_retry_goes_to_another_endpoint_when_there_is_one() {
        let endpoints: Vec<Endpoint> = (0..3)
            .map(|n| {
                Endpoint::new(
                    test_instance(&format!("e{n}"), "1", 100, State::Serving),
                    None,
                )
            })
            .collect();
        let pool = Pool::new(&endpoints, vec![0, 1, 2]);
        let mut rng = fastrand::Rng::with_seed(8);
        for _ in 0..500 {
            let e = pick_other(
                &endpoints,
                &pool,
                &LbConfig::default(),
                &mut rng,
                &[&endpoints[1]],
            )
            .expect("picked");
            assert_ne!(e.id, "e1");
        }
        let e = pick_other(
            &endpoints,
            &pool,
            &LbConfig::default(),
            &mut rng,
            &[&endpoints[0], &endpoints[1], &endpoints[2]],
        );
        assert!(e.is_some(), "every one tried: one is used again");
        let lone = Pool::new(&endpoints, vec![2]);
        let e = pick_other(
            &endpoints,
            &lone,
            &LbConfig::default(),
            &mut rng,
            &[&endpoints[2]],
        );
        assert_eq!(e.map(|e| e.id.as_str()), Some("e2"), "the only endpoint");
    }

    #[test]
    fn grpc_refusals_are_read_from_the_head_of_grpc_responses_only() {
        let p = RetryPolicy::new(1, &RetryOn::DEFAULT);
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().expect("value"));
        assert_eq!(
            classify_response(&p, 200, &h, true),
            Some(Failure::GrpcUnavailable)
        );
        assert_eq!(classify_response(&p, 200, &h, false), None);
        assert_eq!(classify_response(&p, 200, &HeaderMap::new(), true), None);
        assert_eq!(
            classify_response(&p, 503, &HeaderMap::new(), false),
            Some(Failure::Status(503))
        );
    }
}
