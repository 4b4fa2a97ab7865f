//! Prometheus metrics of the sidecar. Per-endpoint handles are created once, when an
//! endpoint first appears, and kept in its `LiveState`, so the request path only
//! touches atomics.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::latency::LatencyHistogram;
use crate::outlier::EjectKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub service: String,
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub endpoint: String,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub service: String,
    pub endpoint: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubsetLabels {
    pub service: String,
    pub subset: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubsetClassLabels {
    pub service: String,
    pub subset: String,
    pub version: String,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub service: String,
    pub from: String,
    pub to: String,
}

/// The metric handles of one (subset, version) of a service.
#[derive(Clone, Debug)]
pub struct SubsetMetrics {
    classes: [Counter; 5],
    pub latency: LatencyHistogram,
}

impl SubsetMetrics {
    pub fn response(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.classes[i].inc();
    }
}

/// The metric handles of one endpoint.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    classes: [Counter; 5],
    pub latency: LatencyHistogram,
}

impl EndpointMetrics {
    pub fn response(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.classes[i].inc();
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, LatencyHistogram>,
    active: Family<EndpointLabels, Gauge<i64, AtomicI64>>,
    /// Answers the sidecar gave itself (400/502/503/504) per service.
    pub local_replies: Family<RequestLabels, Counter>,
    pub catalog_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub catalog_revision: Gauge<i64, AtomicI64>,
    pub registry_connected: Gauge<i64, AtomicI64>,
    pub watch_reconnects: Counter,
    pub tcp_connections: Family<EndpointLabels, Counter>,
    /// Outlier ejections per endpoint and kind.
    ejections: Family<EjectionLabels, Counter>,
    /// Per service, read from the table at scrape time: 1 while some pool of it is in
    /// panic mode; endpoints ejected now; endpoints ramping up in slow start.
    panic: Family<ServiceLabels, Gauge<i64, AtomicI64>>,
    ejected: Family<ServiceLabels, Gauge<i64, AtomicI64>>,
    slow_start: Family<ServiceLabels, Gauge<i64, AtomicI64>>,
    subset_requests: Family<SubsetClassLabels, Counter>,
    subset_latency: Family<SubsetLabels, LatencyHistogram>,
    split_fallbacks: Family<FallbackLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    retry_budget_exhausted: Family<ServiceLabels, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    telemetry_dropped: Family<ReasonLabels, Counter>,
    /// Seconds until the mesh certificate expires (absent until the first one).
    pub certificate_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Certificate requests to the registry, by result (ok, error).
    pub certificate_requests: Family<ReasonLabels, Counter>,
    /// Trust bundles from the watch stream that added a root (the CA rotated).
    pub trust_bundle_updates: Counter,
    /// Requests on the mesh inbound port, by the caller's verified identity.
    inbound_requests: Family<PeerLabels, Counter>,
    /// Inbound requests (HTTP) and connections (TCP) an intention refused, by caller.
    inbound_denied: Family<PeerLabels, Counter>,
    /// Inbound TLS handshakes refused (no or an untrusted client certificate, clear
    /// text) or timed out, by reason (`switchyard_tls::failure::Reason`).
    pub inbound_handshake_failures: Family<ReasonLabels, Counter>,
    /// Downstream HTTP connections accepted, per proxy worker (how evenly the kernel
    /// spreads them across the workers' `SO_REUSEPORT` sockets).
    downstream_connections: Family<WorkerLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("switchyard_sidecar");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabels, LatencyHistogram>::default();
        let active = Family::default();
        let local_replies = Family::default();
        let catalog_age = Gauge::default();
        let catalog_revision = Gauge::default();
        let registry_connected = Gauge::default();
        let watch_reconnects = Counter::default();
        let tcp_connections = Family::default();
        let downstream_connections = Family::<WorkerLabels, Counter>::default();
        let ejections = Family::<EjectionLabels, Counter>::default();
        let panic = Family::<ServiceLabels, Gauge<i64, AtomicI64>>::default();
        let ejected = Family::<ServiceLabels, Gauge<i64, AtomicI64>>::default();
        let slow_start = Family::<ServiceLabels, Gauge<i64, AtomicI64>>::default();
        let subset_requests = Family::default();
        let subset_latency = Family::<SubsetLabels, LatencyHistogram>::default();
        let split_fallbacks = Family::default();
        let retries = Family::<RetryLabels, Counter>::default();
        let retry_budget_exhausted = Family::<ServiceLabels, Counter>::default();
        let overflows = Family::<OverflowLabels, Counter>::default();
        let telemetry_dropped = Family::<ReasonLabels, Counter>::default();
        let certificate_expiry = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let certificate_requests = Family::<ReasonLabels, Counter>::default();
        let trust_bundle_updates = Counter::default();
        registry.register(
            "trust_bundle_updates",
            "Trust bundles from the watch stream that added a mesh root (a rotation); each re-issues the leaf",
            trust_bundle_updates.clone(),
        );
        let inbound_requests = Family::<PeerLabels, Counter>::default();
        let inbound_denied = Family::<PeerLabels, Counter>::default();
        registry.register(
            "inbound_denied",
            "Inbound requests (HTTP, gRPC) and connections (TCP) refused by an intention, by the caller's verified SPIFFE id",
            inbound_denied.clone(),
        );
        let inbound_handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "inbound_requests",
            "Requests on the mesh inbound port by the caller's verified SPIFFE id",
            inbound_requests.clone(),
        );
        registry.register(
            "inbound_handshake_failures",
            "Inbound mTLS handshakes refused or timed out, by reason: no_client_cert, unknown_ca (not signed by the mesh CA), expired, bad_certificate, not_tls (clear text), client_rejected, timeout, closed, other",
            inbound_handshake_failures.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until this sidecar's mesh certificate expires (it renews at 70 % of the lifetime)",
            certificate_expiry.clone(),
        );
        registry.register(
            "certificate_requests",
            "Requests for a mesh certificate to the registry, by reason (ok, error)",
            certificate_requests.clone(),
        );
        registry.register(
            "telemetry_dropped",
            "Upstream attempts that never reached the registry's telemetry: unsent (their window could not be sent), keys (beyond the versions counted at once)",
            telemetry_dropped.clone(),
        );
        registry.register(
            "retries",
            "Retries by service and reason (connect-failure, refused-stream, reset, per-try-timeout, unavailable, resource-exhausted, or the status)",
            retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries not made because the service's retry budget (share of requests over 10 s plus a floor per second) was spent",
            retry_budget_exhausted.clone(),
        );
        registry.register(
            "overflows",
            "Requests refused at once (503, x-envoy-overloaded) or retries not made, by circuit-breaker limit",
            overflows.clone(),
        );
        registry.register(
            "subset_requests",
            "Proxied requests by service, subset, version and status class (5xx = errors)",
            subset_requests.clone(),
        );
        registry.register(
            "subset_request_duration_seconds",
            "Time to the upstream's response headers, by service, subset and version",
            subset_latency.clone(),
        );
        registry.register(
            "split_fallbacks",
            "Requests whose drawn subset had no healthy endpoint and went to another",
            split_fallbacks.clone(),
        );
        registry.register(
            "requests",
            "Proxied HTTP requests by upstream service, endpoint and status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the upstream's response headers, per endpoint",
            latency.clone(),
        );
        registry.register(
            "active_requests",
            "Requests or TCP connections in flight per endpoint",
            active.clone(),
        );
        registry.register(
            "local_replies",
            "Answers the sidecar gave itself (no endpoint, bad host, upstream failure, timeout)",
            local_replies.clone(),
        );
        registry.register(
            "catalog_age_seconds",
            "Seconds since a registry last confirmed the catalog (0 while a watch is open)",
            catalog_age.clone(),
        );
        registry.register(
            "catalog_revision",
            "Registry revision of the catalog in use",
            catalog_revision.clone(),
        );
        registry.register(
            "registry_connected",
            "1 while a watch stream to a registry is open",
            registry_connected.clone(),
        );
        registry.register(
            "watch_reconnects",
            "Watch streams (re)opened to a registry",
            watch_reconnects.clone(),
        );
        registry.register(
            "downstream_connections",
            "Downstream HTTP connections accepted, per proxy worker (--worker-threads)",
            downstream_connections.clone(),
        );
        registry.register(
            "tcp_connections",
            "TCP connections proxied per endpoint",
            tcp_connections.clone(),
        );
        registry.register(
            "ejections",
            "Outlier ejections per endpoint by kind: consecutive (failures in a row: connect errors, timeouts, 5xx), failure-percentage (85 % of 50+ requests in an interval), probe-failed (ejected again after its probation probe)",
            ejections.clone(),
        );
        registry.register(
            "panic_mode",
            "1 while some pool of the service has fewer usable endpoints than panic_below_percent and balances over all of them",
            panic.clone(),
        );
        registry.register(
            "ejected_endpoints",
            "Endpoints of the service ejected now (including those on probation)",
            ejected.clone(),
        );
        registry.register(
            "slow_start_endpoints",
            "Endpoints of the service ramping up their share (slow start)",
            slow_start.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            active,
            local_replies,
            catalog_age,
            catalog_revision,
            registry_connected,
            watch_reconnects,
            tcp_connections,
            ejections,
            panic,
            ejected,
            slow_start,
            subset_requests,
            subset_latency,
            split_fallbacks,
            retries,
            retry_budget_exhausted,
            overflows,
            telemetry_dropped,
            certificate_expiry,
            certificate_requests,
            trust_bundle_updates,
            inbound_requests,
            inbound_denied,
            inbound_handshake_failures,
            downstream_connections,
        }
    }
}

impl Metrics {
    /// Counts a refused inbound handshake under its reason.
    pub fn inbound_handshake_failed(&self, reason: switchyard_tls::failure::Reason) {
        self.inbound_handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The counters of requests from `peer` and of those an intention refused (a
    /// SPIFFE id: one per calling service, so the label set stays as small as the
    /// mesh). Taken once per connection, so a request only increments.
    pub fn inbound_counters(&self, peer: &str) -> (Counter, Counter) {
        let labels = PeerLabels {
            peer: peer.to_string(),
        };
        (
            self.inbound_requests.get_or_create(&labels).clone(),
            self.inbound_denied.get_or_create(&labels).clone(),
        )
    }

    /// The counter of attempts telemetry dropped for `reason` (unsent, keys).
    /// The accepted-connections counter of proxy worker `worker` (a handle: one
    /// atomic add per connection).
    pub fn downstream_connections(&self, worker: usize) -> Counter {
        self.downstream_connections
            .get_or_create(&WorkerLabels {
                worker: worker.to_string(),
            })
            .clone()
    }

    pub fn telemetry_dropped(&self, reason: &'static str) -> Counter {
        self.telemetry_dropped
            .get_or_create(&ReasonLabels { reason })
            .clone()
    }

    /// Handles for one endpoint, created when it first appears in the catalog.
    pub fn endpoint(&self, service: &str, endpoint: &str) -> EndpointMetrics {
        let class = |class| {
            self.requests
                .get_or_create(&RequestLabels {
                    service: service.to_string(),
                    endpoint: endpoint.to_string(),
                    class,
                })
                .clone()
        };
        EndpointMetrics {
            classes: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            latency: self
                .latency
                .get_or_create(&EndpointLabels {
                    service: service.to_string(),
                    endpoint: endpoint.to_string(),
                })
                .clone(),
        }
    }

    /// Handles for one (subset, version), created when a policy is compiled.
    pub fn subset(&self, service: &str, subset: &str, version: &str) -> SubsetMetrics {
        let class = |class| {
            self.subset_requests
                .get_or_create(&SubsetClassLabels {
                    service: service.to_string(),
                    subset: subset.to_string(),
                    version: version.to_string(),
                    class,
                })
                .clone()
        };
        SubsetMetrics {
            classes: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            latency: self
                .subset_latency
                .get_or_create(&SubsetLabels {
                    service: service.to_string(),
                    subset: subset.to_string(),
                    version: version.to_string(),
                })
                .clone(),
        }
    }

    /// Counts a request whose subset had no healthy endpoint (rare: a lock is fine).
    pub fn split_fallback(&self, service: &str, from: &str, to: &str) {
        self.split_fallbacks
            .get_or_create(&FallbackLabels {
                service: service.to_string(),
                from: from.to_string(),
                to: to.to_string(),
            })
            .inc();
    }

    /// Counts a retry (the retry path only: a lookup by label is fine there).
    pub fn retry(&self, service: &str, reason: String) {
        self.retries
            .get_or_create(&RetryLabels {
                service: service.to_string(),
                reason,
            })
            .inc();
    }

    pub fn retry_budget_exhausted(&self, service: &str) {
        self.retry_budget_exhausted
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .inc();
    }

    pub fn overflow(&self, service: &str, limit: &'static str) {
        self.overflows
            .get_or_create(&OverflowLabels {
                service: service.to_string(),
                limit,
            })
            .inc();
    }

    pub fn local_reply(&self, service: &str, status: u16) {
        let class = match status {
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.local_replies
            .get_or_create(&RequestLabels {
                service: service.to_string(),
                endpoint: String::new(),
                class,
            })
            .inc();
    }

    /// Records an outlier ejection (and says so in the log: it changes where traffic goes).
    pub fn ejection(&self, service: &str, endpoint: &str, kind: EjectKind) {
        tracing::warn!(service, endpoint, kind = kind.name(), "endpoint ejected");
        self.ejections
            .get_or_create(&EjectionLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
                kind: kind.name(),
            })
            .inc();
    }

    /// Sets a service's outlier gauges (read from the table at scrape time).
    pub fn set_outliers(&self, service: &str, panic: bool, ejected: usize, ramping: usize) {
        let labels = ServiceLabels {
            service: service.to_string(),
        };
        self.panic.get_or_create(&labels).set(i64::from(panic));
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.ejected.get_or_create(&labels).set(n(ejected));
        self.slow_start.get_or_create(&labels).set(n(ramping));
    }

    pub fn tcp_connection(&self, service: &str, endpoint: &str) {
        self.tcp_connections
            .get_or_create(&EndpointLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
            })
            .inc();
    }

    /// Sets the gauges that describe the catalog (read from the table at scrape time).
    pub fn set_catalog(&self, age: Option<std::time::Duration>, revision: u64, connected: bool) {
        self.catalog_age.set(age.map_or(-1.0, |a| a.as_secs_f64()));
        self.catalog_revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
        self.registry_connected.set(i64::from(connected));
    }

    /// Sets an endpoint's in-flight gauge (read from its live state at scrape time).
    pub fn set_active(&self, service: &str, endpoint: &str, active: u32) {
        self.active
            .get_or_create(&EndpointLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
            })
            .set(i64::from(active));
    }

    /// Everything in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
