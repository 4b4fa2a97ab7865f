//! Resilience settings of a service: timeouts, retries and their budget, circuit-breaker
//! limits, slow start, outlier ejection and panic mode.
//!
//! A policy carries [`Resilience`]: per-service overrides, each `None` meaning "the
//! sidecar's default". A sidecar resolves them over its own defaults
//! ([`ResilienceSettings`], from flags/TOML/env) into the concrete values its request
//! path reads. The defaults are Envoy's and Linkerd's; where they differ the safer one is
//! taken (README, "Resilience").

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::ValidationError;

/// Longest request or per-try timeout, and longest slow-start window.
pub const MAX_DURATION: Duration = Duration::from_secs(3_600);
/// Most retries of one request.
pub const MAX_RETRIES: u32 = 10;
/// Most entries in `retry_on`.
pub const MAX_RETRY_ON: usize = 16;
/// Largest circuit-breaker limit or count.
pub const MAX_COUNT: u32 = 1_000_000;

/// What makes a failed attempt worth retrying (Envoy's `retry_on` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    /// The connection to the endpoint could not be made (never reached the app).
    ConnectFailure,
    /// The endpoint refused the HTTP/2 stream (REFUSED_STREAM: never processed).
    RefusedStream,
    /// The connection was reset before any byte of the request was written.
    Reset,
    /// Any 5xx answer (idempotent requests only).
    Status5xx,
    /// 502, 503 or 504 (idempotent requests only).
    GatewayError,
    /// gRPC `unavailable` (idempotent requests only).
    Unavailable,
    /// gRPC `resource-exhausted` (idempotent requests only).
    ResourceExhausted,
    /// This HTTP status (idempotent requests only).
    Status(u16),
}

impl RetryOn {
    /// The default set: failures that never reached the app, gateway errors and gRPC
    /// `unavailable` (Istio's default plus `reset`; not every 5xx, since a 500 is usually
    /// a bug a retry repeats).
    pub const DEFAULT: [RetryOn; 5] = [
        RetryOn::ConnectFailure,
        RetryOn::RefusedStream,
        RetryOn::Reset,
        RetryOn::GatewayError,
        RetryOn::Unavailable,
    ];

    /// Reads one name of `--retry-on`: `connect-failure`, `refused-stream`, `reset`,
    /// `5xx`, `gateway-error`, `unavailable`, `resource-exhausted`, or a status code.
    pub fn parse(s: &str) -> Option<RetryOn> {
        Some(match s.trim() {
            "connect-failure" => RetryOn::ConnectFailure,
            "refused-stream" => RetryOn::RefusedStream,
            "reset" => RetryOn::Reset,
            "5xx" => RetryOn::Status5xx,
            "gateway-error" => RetryOn::GatewayError,
            "unavailable" => RetryOn::Unavailable,
            "resource-exhausted" => RetryOn::ResourceExhausted,
            code => match code.parse::<u16>() {
                Ok(c @ 100..=599) => RetryOn::Status(c),
                _ => return None,
            },
        })
    }

    /// The name `parse` reads.
    pub fn name(self) -> String {
        match self {
            RetryOn::ConnectFailure => "connect-failure".into(),
            RetryOn::RefusedStream => "refused-stream".into(),
            RetryOn::Reset => "reset".into(),
            RetryOn::Status5xx => "5xx".into(),
            RetryOn::GatewayError => "gateway-error".into(),
            RetryOn::Unavailable => "unavailable".into(),
            RetryOn::ResourceExhausted => "resource-exhausted".into(),
            RetryOn::Status(c) => c.to_string(),
        }
    }

    /// Whether this condition means the request never reached the app, so a retry is
    /// safe whatever the method.
    pub fn never_reached_app(self) -> bool {
        matches!(
            self,
            RetryOn::ConnectFailure | RetryOn::RefusedStream | RetryOn::Reset
        )
    }
}

/// A service's overrides of the sidecar's resilience defaults; `None` keeps the default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resilience {
    /// Bounds every attempt of a request together.
    pub timeout: Option<Duration>,
    /// Bounds one attempt until its response starts.
    pub per_try_timeout: Option<Duration>,
    /// Retries after the first attempt (0: none).
    pub retries: Option<u32>,
    pub retry_on: Option<Vec<RetryOn>>,
    /// Retries may add this share to the request rate (Linkerd's budget)...
    pub retry_budget_percent: Option<u32>,
    /// ...plus this many per second.
    pub min_retries_per_second: Option<u32>,
    /// Circuit-breaker limits per service (Envoy's).
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    /// Most retries in flight at once.
    pub max_retries: Option<u32>,
    /// A new endpoint ramps up its share over this window (zero: off).
    pub slow_start: Option<Duration>,
    /// Consecutive failures that eject an endpoint.
    pub eject_after: Option<u32>,
    /// Most endpoints ejected at once, in percent (at least one is always allowed).
    pub max_ejection_percent: Option<u32>,
    /// Below this share of usable endpoints, balance over all of them (0: never).
    pub panic_below_percent: Option<u32>,
}

impl Resilience {
    /// Whether every field is unset (the policy then carries no resilience at all).
    pub fn is_empty(&self) -> bool {
        *self == Resilience::default()
    }
}

/// The concrete settings a sidecar applies to one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResilienceSettings {
    pub timeout: Duration,
    pub per_try_timeout: Option<Duration>,
    pub retries: u32,
    pub retry_on: Vec<RetryOn>,
    pub retry_budget_percent: u32,
    pub min_retries_per_second: u32,
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    pub slow_start: Duration,
    pub eject_after: u32,
    pub max_ejection_percent: u32,
    pub panic_below_percent: u32,
}

impl Default for ResilienceSettings {
    /// Envoy's and Linkerd's defaults (README, "Resilience", says which is whose).
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(15),
            per_try_timeout: None,
            retries: 1,
            retry_on: RetryOn::DEFAULT.to_vec(),
            retry_budget_percent: 20,
            min_retries_per_second: 10,
            max_connections: 1_024,
            max_pending: 1_024,
            max_requests: 1_024,
            max_retries: 3,
            slow_start: Duration::ZERO,
            eject_after: 5,
            max_ejection_percent: 10,
            panic_below_percent: 50,
        }
    }
}

impl ResilienceSettings {
    /// These settings with a service's overrides applied.
    pub fn with(&self, o: &Resilience) -> ResilienceSettings {
        ResilienceSettings {
            timeout: o.timeout.unwrap_or(self.timeout),
            per_try_timeout: o.per_try_timeout.or(self.per_try_timeout),
            retries: o.retries.unwrap_or(self.retries),
            retry_on: o.retry_on.clone().unwrap_or_else(|| self.retry_on.clone()),
            retry_budget_percent: o.retry_budget_percent.unwrap_or(self.retry_budget_percent),
            min_retries_per_second: o
                .min_retries_per_second
                .unwrap_or(self.min_retries_per_second),
            max_connections: o.max_connections.unwrap_or(self.max_connections),
            max_pending: o.max_pending.unwrap_or(self.max_pending),
            max_requests: o.max_requests.unwrap_or(self.max_requests),
            max_retries: o.max_retries.unwrap_or(self.max_retries),
            slow_start: o.slow_start.unwrap_or(self.slow_start),
            eject_after: o.eject_after.unwrap_or(self.eject_after),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(self.max_ejection_percent),
            panic_below_percent: o.panic_below_percent.unwrap_or(self.panic_below_percent),
        }
    }

    /// These settings as overrides (every field set): how sidecar-wide defaults from
    /// flags are checked by the same rules as a policy's.
    pub fn as_overrides(&self) -> Resilience {
        Resilience {
            timeout: Some(self.timeout),
            per_try_timeout: self.per_try_timeout,
            retries: Some(self.retries),
            retry_on: Some(self.retry_on.clone()),
            retry_budget_percent: Some(self.retry_budget_percent),
            min_retries_per_second: Some(self.min_retries_per_second),
            max_connections: Some(self.max_connections),
            max_pending: Some(self.max_pending),
            max_requests: Some(self.max_requests),
            max_retries: Some(self.max_retries),
            slow_start: Some(self.slow_start),
            eject_after: Some(self.eject_after),
            max_ejection_percent: Some(self.max_ejection_percent),
            panic_below_percent: Some(self.panic_below_percent),
        }
    }
}

fn duration_ok(field: &str, d: Option<Duration>, zero_ok: bool) -> Result<(), ValidationError> {
    match d {
        Some(d) if d.is_zero() && !zero_ok => Err(ValidationError::new(
            field,
            "must be above zero (leave it unset for the sidecar's default)",
        )),
        Some(d) if d > MAX_DURATION => Err(ValidationError::new(
            field,
            format!("{d:?} is above {MAX_DURATION:?}"),
        )),
        _ => Ok(()),
    }
}

fn count_ok(field: &str, v: Option<u32>, min: u32, max: u32) -> Result<(), ValidationError> {
    match v {
        Some(v) if v < min || v > max => Err(ValidationError::new(
            field,
            format!("{v} is outside {min}-{max}"),
        )),
        _ => Ok(()),
    }
}

/// Checks a service's overrides (field names as on the wire, under `policy.resilience`).
pub fn validate_resilience(r: &Resilience) -> Result<(), ValidationError> {
    let f = |name: &str| format!("policy.resilience.{name}");
    duration_ok(&f("timeout_ms"), r.timeout, false)?;
    duration_ok(&f("per_try_timeout_ms"), r.per_try_timeout, false)?;
    if let (Some(per_try), Some(timeout)) = (r.per_try_timeout, r.timeout) {
        if per_try > timeout {
            return Err(ValidationError::new(
                f("per_try_timeout_ms"),
                format!("{per_try:?} is above the request timeout {timeout:?}, which bounds every attempt"),
            ));
        }
    }
    count_ok(&f("retries"), r.retries, 0, MAX_RETRIES)?;
    if let Some(on) = &r.retry_on {
        if on.is_empty() || on.len() > MAX_RETRY_ON {
            return Err(ValidationError::new(
                f("retry_on"),
                format!("give 1-{MAX_RETRY_ON} conditions (or leave it unset)"),
            ));
        }
    }
    count_ok(&f("retry_budget_percent"), r.retry_budget_percent, 0, 100)?;
    count_ok(
        &f("min_retries_per_second"),
        r.min_retries_per_second,
        0,
        MAX_COUNT,
    )?;
    count_ok(&f("max_connections"), r.max_connections, 1, MAX_COUNT)?;
    count_ok(&f("max_pending"), r.max_pending, 1, MAX_COUNT)?;
    count_ok(&f("max_requests"), r.max_requests, 1, MAX_COUNT)?;
    count_ok(&f("max_retries"), r.max_retries, 1, MAX_COUNT)?;
    duration_ok(&f("slow_start_ms"), r.slow_start, true)?;
    count_ok(&f("eject_after"), r.eject_after, 1, MAX_COUNT)?;
    count_ok(&f("max_ejection_percent"), r.max_ejection_percent, 0, 100)?;
    count_ok(&f("panic_below_percent"), r.panic_below_percent, 0, 100)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Resilience) -> String {
        validate_resilience(&r).expect_err("refused").field
    }

    #[test]
    fn the_defaults_pass_their_own_rules() {
        validate_resilience(&ResilienceSettings::default().as_overrides()).expect("valid");
        validate_resilience(&Resilience::default()).expect("valid");
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let secs = |s| Some(Duration::from_secs(s));
        let cases = [
            (
                Resilience {
                    timeout: secs(1),
                    per_try_timeout: secs(2),
                    ..Default::default()
                },
                "per_try_timeout_ms",
            ),
            (
                Resilience {
                    timeout: secs(0),
                    ..Default::default()
                },
                "timeout_ms",
            ),
            (
                Resilience {
                    timeout: secs(7_200),
                    ..Default::default()
                },
                "timeout_ms",
            ),
            (
                Resilience {
                    retries: Some(11),
                    ..Default::default()
                },
                "retries",
            ),
            (
                Resilience {
                    retry_on: Some(vec![]),
                    ..Default::default()
                },
                "retry_on",
            ),
            (
                Resilience {
                    retry_budget_percent: Some(101),
                    ..Default::default()
                },
                "retry_budget_percent",
            ),
            (
                Resilience {
                    max_connections: Some(0),
                    ..Default::default()
                },
                "max_connections",
            ),
            (
                Resilience {
                    max_pending: Some(0),
                    ..Default::default()
                },
                "max_pending",
            ),
            (
                Resilience {
                    max_requests: Some(0),
                    ..Default::default()
                },
                "max_requests",
            ),
            (
                Resilience {
                    max_retries: Some(0),
                    ..Default::default()
                },
                "max_retries",
            ),
            (
                Resilience {
                    eject_after: Some(0),
                    ..Default::default()
                },
                "eject_after",
            ),
            (
                Resilience {
                    max_ejection_percent: Some(150),
                    ..Default::default()
                },
                "max_ejection_percent",
            ),
            (
                Resilience {
                    panic_below_percent: Some(101),
                    ..Default::default()
                },
                "panic_below_percent",
            ),
        ];
        for (r, field) in cases {
            assert_eq!(field_of(r), format!("policy.resilience.{field}"));
        }
    }

    #[test]
    fn zero_turns_off_what_zero_can_mean_off() {
        validate_resilience(&Resilience {
            retries: Some(0),
            retry_budget_percent: Some(0),
            min_retries_per_second: Some(0),
            slow_start: Some(Duration::ZERO),
            max_ejection_percent: Some(0),
            panic_below_percent: Some(0),
            ..Default::default()
        })
        .expect("valid");
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let base = ResilienceSettings::default();
        let s = base.with(&Resilience {
            retries: Some(3),
            ..Default::default()
        });
        assert_eq!(s.retries, 3);
        assert_eq!(s.timeout, base.timeout);
        assert_eq!(s.retry_on, base.retry_on);
    }

    #[test]
    fn retry_on_names_round_trip_and_unknown_ones_are_refused() {
        for name in [
            "connect-failure",
            "refused-stream",
            "reset",
            "5xx",
            "gateway-error",
            "unavailable",
            "resource-exhausted",
            "429",
        ] {
            let on = RetryOn::parse(name).expect(name);
            assert_eq!(on.name(), name);
        }
        assert_eq!(RetryOn::parse("sometimes"), None);
        assert_eq!(RetryOn::parse("99"), None);
        assert_eq!(RetryOn::parse("600"), None);
    }
}
