//! `switchyard route resilience SERVICE …`: a service's timeouts, retries, limits,
//! slow start, ejection and panic mode, kept in its policy (history and rollback like
//! every other policy change).
//!
//! The flags only carry values; the registry checks them (one set of rules for every
//! client) and names the field of a bad one. Counts are signed on the wire so a negative
//! value reaches that check instead of failing in the argument parser.

use std::time::Duration;

use clap::Args;
use switchyard_proto::v1 as pb;

use super::config::parse_duration;

/// The flags of `route resilience`; each unset flag leaves that setting as it is.
#[derive(Args, Debug, Default)]
pub struct ResilienceFlags {
    /// Bounds every attempt of a request together (sidecar default 15s).
    #[arg(long, value_parser = parse_duration, env = "SWITCHYARD_ROUTE_RESILIENCE_TIMEOUT")]
    pub timeout: Option<Duration>,
    /// Bounds one attempt until its response starts (default: none).
    #[arg(long, value_parser = parse_duration, env = "SWITCHYARD_ROUTE_RESILIENCE_PER_TRY_TIMEOUT")]
    pub per_try_timeout: Option<Duration>,
    /// Retries after the first attempt, 0-10 (default 1).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_RETRIES"
    )]
    pub retries: Option<i32>,
    /// Comma-separated: connect-failure, refused-stream, reset, 5xx, gateway-error,
    /// unavailable, resource-exhausted, or HTTP status codes (default
    /// connect-failure,refused-stream,reset,gateway-error,unavailable).
    #[arg(
        long,
        value_delimiter = ',',
        env = "SWITCHYARD_ROUTE_RESILIENCE_RETRY_ON"
    )]
    pub retry_on: Vec<String>,
    /// Retries may add this percentage to the request rate, 0-100 (default 20).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_RETRY_BUDGET"
    )]
    pub retry_budget: Option<i32>,
    /// Retries always allowed per second on top of the budget (default 10).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_MIN_RETRIES_PER_SECOND"
    )]
    pub min_retries_per_second: Option<i32>,
    /// Most upstream connections (default 1024).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_MAX_CONNECTIONS"
    )]
    pub max_connections: Option<i32>,
    /// Most requests waiting for an upstream connection (default 1024).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_MAX_PENDING"
    )]
    pub max_pending: Option<i32>,
    /// Most requests in flight (default 1024).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_MAX_REQUESTS"
    )]
    pub max_requests: Option<i32>,
    /// Most retries in flight (default 3).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_MAX_RETRIES"
    )]
    pub max_retries: Option<i32>,
    /// A new endpoint ramps up its share over this window (default 0s: off).
    #[arg(long, value_parser = parse_duration, env = "SWITCHYARD_ROUTE_RESILIENCE_SLOW_START")]
    pub slow_start: Option<Duration>,
    /// Consecutive failures that eject an endpoint (default 5).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_EJECT_AFTER"
    )]
    pub eject_after: Option<i32>,
    /// Most endpoints ejected at once, percent (default 10; at least one).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_MAX_EJECTION"
    )]
    pub max_ejection: Option<i32>,
    /// Below this percentage of usable endpoints, balance over all (default 50; 0: off).
    #[arg(
        long,
        allow_negative_numbers = true,
        env = "SWITCHYARD_ROUTE_RESILIENCE_PANIC_BELOW"
    )]
    pub panic_below: Option<i32>,
    /// Drop every override first: the service gets the sidecars' defaults again (plus
    /// whatever other flags say).
    #[arg(long, env = "SWITCHYARD_ROUTE_RESILIENCE_RESET")]
    pub reset: bool,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ResilienceFlags {
    /// Whether any setting was given (else the verb only shows the policy).
    pub fn is_empty(&self) -> bool {
        !self.reset
            && self.timeout.is_none()
            && self.per_try_timeout.is_none()
            && self.retries.is_none()
            && self.retry_on.is_empty()
            && self.retry_budget.is_none()
            && self.min_retries_per_second.is_none()
            && self.max_connections.is_none()
            && self.max_pending.is_none()
            && self.max_requests.is_none()
            && self.max_retries.is_none()
            && self.slow_start.is_none()
            && self.eject_after.is_none()
            && self.max_ejection.is_none()
            && self.panic_below.is_none()
    }

    /// Writes the given settings into the policy, keeping the others.
    pub fn apply(&self, policy: &mut pb::Policy) {
        let mut r = if self.reset {
            pb::Resilience::default()
        } else {
            policy.resilience.clone().unwrap_or_default()
        };
        let set_ms = |slot: &mut Option<i64>, v: Option<Duration>| {
            if let Some(v) = v {
                *slot = Some(ms(v));
            }
        };
        let set = |slot: &mut Option<i32>, v: Option<i32>| {
            if v.is_some() {
                *slot = v;
            }
        };
        set_ms(&mut r.timeout_ms, self.timeout);
        set_ms(&mut r.per_try_timeout_ms, self.per_try_timeout);
        set(&mut r.retries, self.retries);
        if !self.retry_on.is_empty() {
            r.retry_on = self.retry_on.iter().map(|s| s.trim().to_string()).collect();
        }
        set(&mut r.retry_budget_percent, self.retry_budget);
        set(&mut r.min_retries_per_second, self.min_retries_per_second);
        set(&mut r.max_connections, self.max_connections);
        set(&mut r.max_pending, self.max_pending);
        set(&mut r.max_requests, self.max_requests);
        set(&mut r.max_retries, self.max_retries);
        set_ms(&mut r.slow_start_ms, self.slow_start);
        set(&mut r.eject_after, self.eject_after);
        set(&mut r.max_ejection_percent, self.max_ejection);
        set(&mut r.panic_below_percent, self.panic_below);
        policy.resilience = (r != pb::Resilience::default()).then_some(r);
    }
}

fn duration(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        Ok(ms) => format!("{ms}ms"),
        Err(_) => format!("{ms}ms"),
    }
}

/// The overrides as `flag=value` pairs, in the flags' order (empty: the sidecars'
/// defaults apply to everything).
pub fn describe(r: Option<&pb::Resilience>) -> Vec<(&'static str, String)> {
    let Some(r) = r else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut d = |name, v: Option<i64>| {
        if let Some(v) = v {
            out.push((name, duration(v)));
        }
    };
    d("timeout", r.timeout_ms);
    d("per-try-timeout", r.per_try_timeout_ms);
    let counts = [
        ("retries", r.retries),
        ("retry-budget", r.retry_budget_percent),
        ("min-retries-per-second", r.min_retries_per_second),
        ("max-connections", r.max_connections),
        ("max-pending", r.max_pending),
        ("max-requests", r.max_requests),
        ("max-retries", r.max_retries),
    ];
    for (name, v) in counts {
        if let Some(v) = v {
            out.push((name, v.to_string()));
        }
    }
    if !r.retry_on.is_empty() {
        out.insert(
            out.iter()
                .position(|(n, _)| *n == "retry-budget")
                .unwrap_or(out.len()),
            ("retry-on", r.retry_on.join(",")),
        );
    }
    if let Some(v) = r.slow_start_ms {
        out.push(("slow-start", duration(v)));
    }
    for (name, v) in [
        ("eject-after", r.eject_after),
        ("max-ejection", r.max_ejection_percent),
        ("panic-below", r.panic_below_percent),
    ] {
        if let Some(v) = v {
            out.push((name, v.to_string()));
        }
    }
    out
}

/// `describe` on one line: `timeout=3s retries=2`, or `(sidecar defaults)`.
pub fn summary(r: Option<&pb::Resilience>) -> String {
    let pairs = describe(r);
    if pairs.is_empty() {
        return "(sidecar defaults)".into();
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_change_only_what_they_name_and_reset_drops_the_rest() {
        let mut p = pb::Policy::default();
        ResilienceFlags {
            retries: Some(2),
            timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        }
        .apply(&mut p);
        ResilienceFlags {
            retry_on: vec!["5xx".into(), " 429".into()],
            ..Default::default()
        }
        .apply(&mut p);
        assert_eq!(
            summary(p.resilience.as_ref()),
            "timeout=3s retries=2 retry-on=5xx,429"
        );
        ResilienceFlags {
            reset: true,
            panic_below: Some(0),
            ..Default::default()
        }
        .apply(&mut p);
        assert_eq!(summary(p.resilience.as_ref()), "panic-below=0");
        ResilienceFlags {
            reset: true,
            ..Default::default()
        }
        .apply(&mut p);
        assert_eq!(p.resilience, None);
        assert_eq!(summary(None), "(sidecar defaults)");
    }
}
