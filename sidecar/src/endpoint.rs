//! Endpoints as the balancer sees them, and the live state that outlives catalog updates.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::metrics::EndpointMetrics;

/// Whether an endpoint may take new traffic (from the registry's instance state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Serving,
    Draining,
    Failing,
}

/// Per-endpoint counters kept beside the immutable views, keyed by endpoint id, so a
/// catalog update that rebuilds a view keeps each endpoint's in-flight count.
#[derive(Debug, Default)]
pub struct LiveState {
    /// Requests (HTTP) or connections (TCP) in flight right now.
    pub active: AtomicU32,
    /// Consecutive failures (connect errors, timeouts); reset by a success.
    pub consecutive_failures: AtomicU32,
    /// Requests or connections sent here since the sidecar started.
    pub total: AtomicU64,
    /// Metric handles, made on the endpoint's first request: a sidecar that knows
    /// 10,000 endpoints but calls a few keeps series (and memory) for those few.
    pub metrics: OnceLock<EndpointMetrics>,
}

impl LiveState {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// One instance of a service, as the proxy routes to it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub id: String,
    /// `host:port`, ready for a connector.
    pub authority: String,
    /// `authority` parsed once per catalog update, so building each request's upstream
    /// URI copies a pointer instead of parsing text (`None` if it does not parse).
    pub uri_authority: Option<http::uri::Authority>,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
    pub zone: String,
    pub state: State,
    pub live: Arc<LiveState>,
}

impl Endpoint {
    /// Serving endpoints take new traffic; draining and failing ones do not.
    pub fn is_usable(&self) -> bool {
        self.state == State::Serving
    }
}

/// Counts one request or connection as active for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard {
    live: Arc<LiveState>,
}

impl ActiveGuard {
    pub fn new(live: Arc<LiveState>) -> Self {
        live.active.fetch_add(1, Ordering::Relaxed);
        live.total.fetch_add(1, Ordering::Relaxed);
        Self { live }
    }

    pub fn succeeded(&self) {
        self.live.consecutive_failures.store(0, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.live
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.live.active.fetch_sub(1, Ordering::Relaxed);
    }
}
