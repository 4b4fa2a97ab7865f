//! A service's resilience settings as the request path reads them: resolved once per
//! catalog update (sidecar defaults with the policy's overrides), with the retry
//! conditions turned into a bit mask, so a request tests bits instead of walking a list.
//!
//! Which failures may be retried follows RFC 9110 §9.2.2: a failure that provably never
//! reached the app (connect failure, HTTP/2 REFUSED_STREAM, a request the connection
//! dropped before writing it) is retried whatever the method; anything the app may have
//! seen (a 5xx, a gateway error, a gRPC `unavailable`, a reset mid-exchange, a per-try
//! timeout) only for idempotent methods, or a request carrying an `Idempotency-Key`
//! (draft-ietf-httpapi-idempotency-key), whose sender says a repeat is safe.

use std::time::Duration;

use http::{HeaderMap, Method};
use switchyard_core::model::resilience::{Resilience, ResilienceSettings, RetryOn};

/// Largest request body kept for a retry (Envoy's default `per_request_buffer_limit`
/// is 1 MiB for the whole request; Linkerd keeps 64 KiB). Larger bodies are streamed
/// and their request is not retried.
pub const MAX_RETRY_BODY: u64 = 64 * 1024;
/// Back-off before the first retry is drawn from 0..BASE (Envoy's 25 ms), doubling per
/// retry up to CAP (Envoy's 10 × base = 250 ms), fully jittered.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const BACKOFF_CAP: Duration = Duration::from_millis(250);

const CONNECT: u8 = 1;
const REFUSED: u8 = 1 << 1;
const RESET: u8 = 1 << 2;
const S5XX: u8 = 1 << 3;
const GATEWAY: u8 = 1 << 4;
const UNAVAILABLE: u8 = 1 << 5;
const EXHAUSTED: u8 = 1 << 6;

/// Why one attempt failed, as far as retrying goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be made.
    Connect,
    /// The endpoint refused the HTTP/2 stream (it never processed it).
    RefusedStream,
    /// The connection closed before the request was written.
    ResetUnsent,
    /// The connection broke mid-exchange: the app may have acted on the request.
    Reset,
    /// No response head within the per-try timeout.
    PerTryTimeout,
    /// The endpoint answered with this status.
    Status(u16),
    /// gRPC `unavailable` (14) in the response head.
    GrpcUnavailable,
    /// gRPC `resource-exhausted` (8) in the response head.
    GrpcResourceExhausted,
}

impl Failure {
    /// True when the request provably never reached the app.
    pub fn never_reached_app(self) -> bool {
        matches!(
            self,
            Failure::Connect | Failure::RefusedStream | Failure::ResetUnsent
        )
    }

    /// The `reason` label of the retries metric.
    pub fn reason(self) -> String {
        match self {
            Failure::Connect => "connect-failure".into(),
            Failure::RefusedStream => "refused-stream".into(),
            Failure::ResetUnsent | Failure::Reset => "reset".into(),
            Failure::PerTryTimeout => "per-try-timeout".into(),
            Failure::Status(s) => s.to_string(),
            Failure::GrpcUnavailable => "unavailable".into(),
            Failure::GrpcResourceExhausted => "resource-exhausted".into(),
        }
    }
}

/// The retry conditions of one service, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 turns the machinery off.
    pub retries: u32,
    mask: u8,
    /// Extra statuses named in `retry_on`.
    statuses: Vec<u16>,
}

impl RetryPolicy {
    pub fn new(retries: u32, on: &[RetryOn]) -> Self {
        let mut mask = 0;
        let mut statuses = Vec::new();
        for c in on {
            mask |= match c {
                RetryOn::ConnectFailure => CONNECT,
                RetryOn::RefusedStream => REFUSED,
                RetryOn::Reset => RESET,
                RetryOn::Status5xx => S5XX,
                RetryOn::GatewayError => GATEWAY,
                RetryOn::Unavailable => UNAVAILABLE,
                RetryOn::ResourceExhausted => EXHAUSTED,
                RetryOn::Status(s) => {
                    statuses.push(*s);
                    0
                }
            };
        }
        Self {
            retries,
            mask,
            statuses,
        }
    }

    /// True when some request could be retried at all: otherwise the request path skips
    /// every step a retry needs (buffering, copying the head, the budget).
    pub fn enabled(&self) -> bool {
        self.retries > 0 && (self.mask != 0 || !self.statuses.is_empty())
    }

    /// True when a gRPC status in the response head could matter.
    pub fn on_grpc(&self) -> bool {
        self.mask & (UNAVAILABLE | EXHAUSTED) != 0
    }

    /// True when `status` could be retried (a 2xx is never looked at further).
    pub fn on_status(&self, status: u16) -> bool {
        (status >= 500 && self.mask & (S5XX | GATEWAY) != 0) || self.statuses.contains(&status)
    }

    /// True when `retry_on` names this failure.
    pub fn matches(&self, f: Failure) -> bool {
        let has = |bit| self.mask & bit != 0;
        match f {
            Failure::Connect => has(CONNECT),
            Failure::RefusedStream => has(REFUSED),
            Failure::ResetUnsent | Failure::Reset => has(RESET),
            // A per-try timeout is answered 504: retried as a gateway error (Envoy).
            Failure::PerTryTimeout => has(S5XX) || has(GATEWAY) || self.statuses.contains(&504),
            Failure::Status(s) => {
                (s >= 500 && has(S5XX))
                    || (matches!(s, 502..=504) && has(GATEWAY))
                    || self.statuses.contains(&s)
            }
            Failure::GrpcUnavailable => has(UNAVAILABLE),
            Failure::GrpcResourceExhausted => has(EXHAUSTED),
        }
    }

    /// True when this failure of a request may be retried: `retry_on` names it, and
    /// either it never reached the app or the request is idempotent.
    pub fn allows(&self, f: Failure, idempotent: bool) -> bool {
        self.matches(f) && (idempotent || f.never_reached_app())
    }
}

/// RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT and DELETE are idempotent; any other
/// request is treated as one only when it carries an `Idempotency-Key`.
pub fn is_idempotent(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || headers.contains_key("idempotency-key")
}

/// Fully jittered exponential back-off before retry number `retry` (0 for the first):
/// uniform in `0..min(CAP, BASE × 2^retry)`, so retries of many callers spread out.
pub fn backoff(retry: u32, rng: &mut fastrand::Rng) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << retry.min(16))
        .min(BACKOFF_CAP);
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rng.u64(0..=micros))
}

/// One service's settings, resolved and compiled for the request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub settings: ResilienceSettings,
    pub retry: RetryPolicy,
}

impl Default for Resolved {
    fn default() -> Self {
        Self::new(ResilienceSettings::default())
    }
}

impl Resolved {
    pub fn new(settings: ResilienceSettings) -> Self {
        Self {
            retry: RetryPolicy::new(settings.retries, &settings.retry_on),
            settings,
        }
    }

    /// These defaults with a service's overrides.
    pub fn with(&self, overrides: &Resilience) -> Self {
        Self::new(self.settings.with(overrides))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> RetryPolicy {
        RetryPolicy::new(1, &RetryOn::DEFAULT)
    }

    #[test]
    fn what_never_reached_the_app_is_retried_whatever_the_method() {
        let p = default_policy();
        for f in [
            Failure::Connect,
            Failure::RefusedStream,
            Failure::ResetUnsent,
        ] {
            assert!(p.allows(f, false), "{f:?}");
        }
        for f in [
            Failure::Reset,
            Failure::Status(503),
            Failure::PerTryTimeout,
            Failure::GrpcUnavailable,
        ] {
            assert!(!p.allows(f, false), "{f:?} not for POST");
            assert!(p.allows(f, true), "{f:?} for GET");
        }
    }

    #[test]
    fn the_default_set_skips_500_and_named_statuses_are_added() {
        let p = default_policy();
        assert!(
            !p.allows(Failure::Status(500), true),
            "a 500 is usually a bug"
        );
        assert!(p.on_status(500), "looked at: it may be a gateway error");
        assert!(!p.on_status(429) && !p.on_status(200));
        let p = RetryPolicy::new(2, &[RetryOn::Status(429), RetryOn::Status5xx]);
        assert!(p.allows(Failure::Status(429), true));
        assert!(p.allows(Failure::Status(500), true));
        assert!(
            !p.allows(Failure::Connect, true),
            "only what retry_on names"
        );
        assert!(!p.on_grpc());
        assert!(!RetryPolicy::new(0, &RetryOn::DEFAULT).enabled());
    }

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        let none = HeaderMap::new();
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&m.parse().expect("method"), &none), "{m}");
        }
        assert!(!is_idempotent(&Method::POST, &none));
        assert!(!is_idempotent(&Method::PATCH, &none));
        let mut keyed = HeaderMap::new();
        keyed.insert("idempotency-key", "8e03978e".parse().expect("value"));
        assert!(is_idempotent(&Method::POST, &keyed));
    }

    #[test]
    fn back_off_is_jittered_below_a_doubling_ceiling_capped_at_250ms() {
        let mut rng = fastrand::Rng::with_seed(4);
        for retry in 0..20 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1 << retry.min(16))
                .min(BACKOFF_CAP);
            let draws: Vec<Duration> = (0..200).map(|_| backoff(retry, &mut rng)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "retry {retry}");
            assert!(
                draws.iter().any(|d| *d < ceiling / 2),
                "retry {retry}: jittered"
            );
        }
        assert!((0..1000).all(|_| backoff(0, &mut rng) <= Duration::from_millis(25)));
    }
}
