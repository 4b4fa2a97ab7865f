//! Why the sidecar could not carry a request or connection, in one type that knows which
//! side failed and whether trying again is safe, mapped to an HTTP answer in one place
//! ([`ProxyError::status`]); the HTTP proxy, the TCP proxy and `/explain` all use it.

use std::time::Duration;

use http::StatusCode;

use crate::limits::Limit;

/// Which side of the sidecar an error belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The caller sent something the sidecar cannot route (bad Host, bad framing).
    Downstream,
    /// The sidecar's own view: no such service, no route, no usable endpoint.
    Local,
    /// The endpoint chosen failed: connect, reset, timeout.
    Upstream,
}

/// A request or connection the sidecar answered itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("missing Host: name the service, e.g. Host: payments or payments{suffix}")]
    MissingHost { suffix: String },
    #[error("Host {host:?} is not a service name: use SERVICE or SERVICE{suffix}")]
    BadHost { host: String, suffix: String },
    /// More than one `Host` field (RFC 9112 §3.2: answer 400).
    #[error("{count} Host headers: a request carries exactly one")]
    DuplicateHost { count: usize },
    /// The caller's request body broke while it was being sent upstream (a bad chunk
    /// header, a short body, a reset): the caller's fault, not the endpoint's.
    #[error("the request body for service {service:?} is malformed or was cut short: {cause}")]
    BadRequestBody { service: String, cause: String },
    #[error("no such service {service:?} in the catalog (revision {revision})")]
    UnknownService { service: String, revision: u64 },
    /// The routing policy leaves nothing to send to (`reason` says why).
    #[error("{reason}")]
    NoRoute { service: String, reason: String },
    #[error("no healthy upstream: service {service:?} has no usable endpoint ({registered} registered, none SERVING and not ejected)")]
    NoEndpoint { service: String, registered: usize },
    /// The service's mTLS mode is strict and this sidecar cannot speak mTLS.
    #[error("service {service:?} takes only mutual TLS (mtls: strict) and this sidecar has no mesh certificate: run it with --service and --mesh-identity, or set the service permissive (switchyard route mtls {service} permissive)")]
    MeshRequired { service: String },
    #[error("cannot address endpoint {endpoint} ({authority}): not a valid host:port")]
    BadAddress {
        service: String,
        endpoint: String,
        authority: String,
    },
    #[error("cannot connect to {endpoint} ({authority}) of service {service:?}: {cause}")]
    Connect {
        service: String,
        endpoint: String,
        authority: String,
        cause: String,
    },
    #[error("endpoint {endpoint} ({authority}) of service {service:?} failed: {cause}")]
    Upstream {
        service: String,
        endpoint: String,
        authority: String,
        cause: String,
    },
    /// No response head in time: `per_try` for one attempt's timeout, otherwise the
    /// request timeout, which bounds every attempt together.
    #[error("service {service:?} did not answer within {timeout:?} ({}; {attempts} attempt(s), the last to {endpoint} ({authority}))", if *per_try { "per-try timeout" } else { "request timeout" })]
    Timeout {
        service: String,
        endpoint: String,
        authority: String,
        timeout: Duration,
        per_try: bool,
        attempts: u32,
    },
    /// A circuit-breaker limit of the service is reached: answered at once (503 with
    /// `x-envoy-overloaded: true`) rather than queued.
    #[error("service {service:?} is at its {} limit ({max}): request refused at once", limit.name())]
    Overloaded {
        service: String,
        limit: Limit,
        max: u32,
    },
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            ProxyError::MissingHost { .. }
            | ProxyError::BadHost { .. }
            | ProxyError::DuplicateHost { .. }
            | ProxyError::BadRequestBody { .. } => Side::Downstream,
            ProxyError::UnknownService { .. }
            | ProxyError::NoRoute { .. }
            | ProxyError::NoEndpoint { .. }
            | ProxyError::MeshRequired { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::BadAddress { .. } => Side::Local,
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Timeout { .. } => Side::Upstream,
        }
    }

    /// True when the request provably never reached the app, so sending it to another
    /// endpoint is safe whatever its method (a refused or failed connect). A timeout or
    /// a failure mid-exchange may have reached it: only idempotent requests may retry.
    pub fn retry_safe(&self) -> bool {
        matches!(self, ProxyError::Connect { .. })
    }

    /// True when the failure counts against the endpoint (outlier ejection). Never for
    /// a downstream or local error: a bad caller must not eject a healthy endpoint.
    pub fn counts_against_endpoint(&self) -> bool {
        self.side() == Side::Upstream
    }

    /// The HTTP answer for this error; the one place errors become status codes.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingHost { .. }
            | ProxyError::BadHost { .. }
            | ProxyError::DuplicateHost { .. }
            | ProxyError::BadRequestBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::UnknownService { .. }
            | ProxyError::NoRoute { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::MeshRequired { .. }
            | ProxyError::NoEndpoint { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadAddress { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The service the error is about, for metric labels ("" when none is known).
    pub fn service(&self) -> &str {
        match self {
            ProxyError::MissingHost { .. }
            | ProxyError::BadHost { .. }
            | ProxyError::DuplicateHost { .. } => "",
            ProxyError::UnknownService { service, .. }
            | ProxyError::BadRequestBody { service, .. }
            | ProxyError::NoRoute { service, .. }
            | ProxyError::BadAddress { service, .. }
            | ProxyError::NoEndpoint { service, .. }
            | ProxyError::MeshRequired { service }
            | ProxyError::Overloaded { service, .. }
            | ProxyError::Connect { service, .. }
            | ProxyError::Upstream { service, .. }
            | ProxyError::Timeout { service, .. } => service,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect() -> ProxyError {
        ProxyError::Connect {
            service: "web".into(),
            endpoint: "web-1".into(),
            authority: "127.0.0.1:1".into(),
            cause: "connection refused".into(),
        }
    }

    #[test]
    fn each_error_knows_its_side_its_answer_and_whether_a_retry_is_safe() {
        let bad_host = ProxyError::BadHost {
            host: "a b".into(),
            suffix: ".service.switchyard".into(),
        };
        assert_eq!(bad_host.side(), Side::Downstream);
        assert_eq!(bad_host.status(), StatusCode::BAD_REQUEST);
        assert!(!bad_host.counts_against_endpoint());
        let none = ProxyError::NoEndpoint {
            service: "web".into(),
            registered: 2,
        };
        assert_eq!(none.side(), Side::Local);
        assert_eq!(none.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!none.retry_safe());
        assert_eq!(connect().side(), Side::Upstream);
        assert_eq!(connect().status(), StatusCode::BAD_GATEWAY);
        assert!(connect().retry_safe() && connect().counts_against_endpoint());
        let timeout = ProxyError::Timeout {
            service: "web".into(),
            endpoint: "web-1".into(),
            authority: "127.0.0.1:1".into(),
            timeout: Duration::from_secs(15),
            per_try: false,
            attempts: 2,
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            timeout.to_string(),
            "service \"web\" did not answer within 15s (request timeout; 2 attempt(s), the last to web-1 (127.0.0.1:1))"
        );
        let over = ProxyError::Overloaded {
            service: "web".into(),
            limit: Limit::Requests,
            max: 1024,
        };
        assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!over.counts_against_endpoint() && !over.retry_safe());
        assert_eq!(
            over.to_string(),
            "service \"web\" is at its max_requests limit (1024): request refused at once"
        );
        assert!(
            !timeout.retry_safe(),
            "a timed-out request may have reached the app"
        );
        for downstream in [
            ProxyError::DuplicateHost { count: 2 },
            ProxyError::BadRequestBody {
                service: "web".into(),
                cause: "invalid chunk size line".into(),
            },
        ] {
            assert_eq!(downstream.side(), Side::Downstream, "{downstream}");
            assert_eq!(downstream.status(), StatusCode::BAD_REQUEST, "{downstream}");
            assert!(!downstream.counts_against_endpoint(), "{downstream}");
            assert!(!downstream.retry_safe(), "{downstream}");
        }
        assert_eq!(
            connect().to_string(),
            "cannot connect to web-1 (127.0.0.1:1) of service \"web\": connection refused"
        );
    }
}
