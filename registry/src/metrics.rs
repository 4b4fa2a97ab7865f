//! Prometheus metrics of the registry, served as text on the HTTP port.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::catalog::Catalog;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// Every metric the registry exports. Cheap to update: atomics behind `Arc`s.
pub struct Metrics {
    registry: Registry,
    pub instances: Gauge<i64, AtomicI64>,
    pub leases: Gauge<i64, AtomicI64>,
    /// Bytes the KV store holds, as counted against --max-kv-bytes.
    pub kv_bytes: Gauge<i64, AtomicI64>,
    pub revision: Gauge<i64, AtomicI64>,
    /// The cluster's log format (what every node can decode; see `catalog::format`).
    pub cluster_format: Gauge<i64, AtomicI64>,
    pub lease_expiries: Counter,
    /// Writes refused because the leader's queue of pending writes was full.
    pub writes_overloaded: Counter,
    /// HTTP connections closed at accept because the port held its maximum.
    pub http_connections_refused: Counter,
    pub watchers: Gauge<i64, AtomicI64>,
    pub watch_resyncs: Counter,
    /// Bytes of watch events built and not yet taken by their connections (the node's
    /// watch buffer budget in use; see `watch::budget`).
    pub watch_buffered_bytes: Gauge<i64, AtomicI64>,
    pub watch_buffer_closes: Counter,
    /// Consul blocking queries refused because the node or the client held too many.
    pub consul_blocking_refused: Counter,
    /// Consul blocking queries held now.
    pub consul_blocked: Gauge<i64, AtomicI64>,
    pub grpc_requests: Family<GrpcLabels, Counter>,
    pub commit_batch_size: Histogram,
    pub commit_seconds: Histogram,
    pub raft_term: Gauge<i64, AtomicI64>,
    pub raft_leader: Gauge<i64, AtomicI64>,
    pub raft_is_leader: Gauge<i64, AtomicI64>,
    pub raft_commit_index: Gauge<i64, AtomicI64>,
    pub raft_applied_index: Gauge<i64, AtomicI64>,
    pub raft_replication_lag: Family<PeerLabels, Gauge<i64, AtomicI64>>,
    pub proposals: Family<OutcomeLabels, Counter>,
    pub self_preservation: Gauge<i64, AtomicI64>,
    pub lease_checkpoints: Counter,
    pub storage_failed: Gauge<i64, AtomicI64>,
    /// Attempts, errors and slow attempts sidecars reported per version (see
    /// `telemetry`); one series per key the telemetry store holds, so bounded by its
    /// key limit, and removed when the store forgets a key.
    pub telemetry_requests: Family<VersionLabels, Counter>,
    pub telemetry_errors: Family<VersionLabels, Counter>,
    pub telemetry_slow: Family<VersionLabels, Counter>,
    /// Telemetry windows by outcome (accepted, invalid, full).
    pub telemetry_reports: Family<OutcomeLabels, Counter>,
    /// Windows a follower handed to its stream to the leader, and those it dropped
    /// (queue full, no leader, or the stream failed).
    pub telemetry_forwarded: Counter,
    pub telemetry_forward_dropped: Counter,
    /// Rollout transitions the leader's loop applied, by the phase entered.
    pub rollout_transitions: Family<PhaseLabels, Counter>,
    /// Per rollout (set by the leader): the canary's weight, 1 for its phase (0 for the
    /// others), and the sequential test's E on errors.
    pub rollout_weight: Family<ServiceLabels, Gauge<i64, AtomicI64>>,
    pub rollout_phase: Family<RolloutPhaseLabels, Gauge<i64, AtomicI64>>,
    pub rollout_error_e: Family<ServiceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Requests refused by ACLs, by method (or `unknown_token`, `expired_token`).
    pub acl_denials: Family<MethodLabels, Counter>,
    /// Answers of UNAUTHENTICATED on the client port (a bad or unknown token).
    pub acl_auth_failures: Counter,
    /// Requests refused while their peer address was backing off after failed
    /// authentications.
    pub acl_auth_backoff_refused: Counter,
    /// Copied from `switchyard_tls`'s process-wide counters when scraped.
    tls_handshake_failures: Family<ReasonLabels, Counter>,
    tls_reloads: Counter,
    tls_reload_failures: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutPhaseLabels {
    pub namespace: String,
    pub service: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub namespace: String,
    pub service: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("switchyard_registry");
        let instances = Gauge::default();
        let leases = Gauge::default();
        let kv_bytes = Gauge::default();
        let revision = Gauge::default();
        let lease_expiries = Counter::default();
        let watchers = Gauge::default();
        let watch_resyncs = Counter::default();
        let watch_buffered_bytes = Gauge::default();
        let watch_buffer_closes = Counter::default();
        let consul_blocking_refused = Counter::default();
        let consul_blocked = Gauge::default();
        registry.register(
            "consul_blocking_refused",
            "Consul blocking queries refused with 503 (too many held on the node or for the client)",
            consul_blocking_refused.clone(),
        );
        registry.register(
            "consul_blocked_queries",
            "Consul blocking queries held open now",
            consul_blocked.clone(),
        );
        let grpc_requests = Family::default();
        let commit_batch_size = Histogram::new(exponential_buckets(1.0, 4.0, 7));
        let commit_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 8));
        let raft_term = Gauge::default();
        let raft_leader = Gauge::default();
        let raft_is_leader = Gauge::default();
        let raft_commit_index = Gauge::default();
        let raft_applied_index = Gauge::default();
        let raft_replication_lag = Family::default();
        let proposals = Family::default();
        let self_preservation = Gauge::default();
        let lease_checkpoints = Counter::default();
        let storage_failed = Gauge::default();
        let telemetry_requests = Family::default();
        let telemetry_errors = Family::default();
        let telemetry_slow = Family::default();
        let telemetry_reports = Family::default();
        let telemetry_forwarded = Counter::default();
        let telemetry_forward_dropped = Counter::default();
        let rollout_transitions = Family::default();
        let rollout_weight = Family::default();
        let rollout_phase = Family::default();
        let rollout_error_e = Family::default();
        let acl_denials = Family::default();
        let acl_auth_failures = Counter::default();
        let acl_auth_backoff_refused = Counter::default();
        let tls_handshake_failures = Family::<ReasonLabels, Counter>::default();
        let tls_reloads = Counter::default();
        let tls_reload_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on this node's ports that failed or timed out, by reason: unknown_ca (a client certificate another CA signed), no_client_cert (peer port), not_tls (plaintext to a TLS port), client_rejected (the client refused this node's certificate), expired, bad_certificate, timeout, closed, other",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "tls_reloads",
            "Certificate reloads that took effect (SIGHUP or a changed file)",
            tls_reloads.clone(),
        );
        registry.register(
            "tls_reload_failures",
            "Certificate reloads refused (the previous certificates stay in use): fix the files",
            tls_reload_failures.clone(),
        );
        registry.register(
            "acl_denials",
            "Requests refused by ACLs, by method (unknown_token and expired_token: the token itself)",
            acl_denials.clone(),
        );
        registry.register(
            "acl_auth_failures",
            "Requests answered UNAUTHENTICATED (unknown, expired or malformed token)",
            acl_auth_failures.clone(),
        );
        registry.register(
            "acl_auth_backoff_refused",
            "Requests refused with RESOURCE_EXHAUSTED because their address failed authentication too often (it backs off 1s doubling to 60s)",
            acl_auth_backoff_refused.clone(),
        );
        registry.register(
            "rollout_transitions",
            "Rollout transitions the leader's loop applied, by the phase entered",
            rollout_transitions.clone(),
        );
        registry.register(
            "rollout_weight",
            "The canary's weight (percent) each rollout has written (set by the leader)",
            rollout_weight.clone(),
        );
        registry.register(
            "rollout_phase",
            "1 for each rollout's phase, 0 for the phases it is not in (set by the leader)",
            rollout_phase.clone(),
        );
        registry.register(
            "rollout_error_e",
            "Each rollout's sequential-test evidence E on errors; it aborts at 1/alpha (set by the leader)",
            rollout_error_e.clone(),
        );
        registry.register(
            "telemetry_forwarded",
            "Telemetry windows this follower handed on to the leader (the cluster's view is the leader's)",
            telemetry_forwarded.clone(),
        );
        registry.register(
            "telemetry_forward_dropped",
            "Telemetry windows this follower could not hand on to the leader (queue full, no leader, stream failed); filed here only",
            telemetry_forward_dropped.clone(),
        );
        registry.register(
            "telemetry_requests",
            "Attempts sidecars reported per (namespace, service, version), each retry on its own",
            telemetry_requests.clone(),
        );
        registry.register(
            "telemetry_errors",
            "Failed attempts sidecars reported (HTTP 5xx, transport failures, server-side gRPC codes)",
            telemetry_errors.clone(),
        );
        registry.register(
            "telemetry_slow",
            "Attempts sidecars reported as slower than their slow threshold",
            telemetry_slow.clone(),
        );
        registry.register(
            "telemetry_reports",
            "Telemetry windows received by outcome (accepted, invalid, full)",
            telemetry_reports.clone(),
        );
        registry.register(
            "storage_failed",
            "1 once a write or fsync of the data dir failed: the node stops serving and must restart",
            storage_failed.clone(),
        );
        registry.register(
            "self_preservation",
            "1 while lease expiry is paused because too many leases would expire at once",
            self_preservation.clone(),
        );
        registry.register(
            "lease_checkpoints",
            "Lease remaining-TTL checkpoints written to the log (leader)",
            lease_checkpoints.clone(),
        );
        registry.register("raft_term", "Current Raft term", raft_term.clone());
        registry.register(
            "raft_leader",
            "Node id of the current leader (0: none known)",
            raft_leader.clone(),
        );
        registry.register(
            "raft_is_leader",
            "1 while this node is the leader",
            raft_is_leader.clone(),
        );
        registry.register(
            "raft_commit_index",
            "Highest log index known committed",
            raft_commit_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Highest log index applied to the catalog",
            raft_applied_index.clone(),
        );
        registry.register(
            "raft_replication_lag",
            "Log entries a peer is behind the leader (on the leader only)",
            raft_replication_lag.clone(),
        );
        registry.register(
            "proposals",
            "Commands proposed on this node by outcome (ok, refused, forwarded, unavailable)",
            proposals.clone(),
        );
        registry.register("instances", "Registered instances", instances.clone());
        registry.register("leases", "Live leases", leases.clone());
        registry.register(
            "kv_bytes",
            "Bytes the KV store holds (keys, values, 64 per entry), against --max-kv-bytes",
            kv_bytes.clone(),
        );
        registry.register(
            "revision",
            "Revision of the last applied change",
            revision.clone(),
        );
        let cluster_format = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "cluster_format",
            "The cluster's log format: raised by the leader once every node runs a release of it; commands of a newer format are refused until then",
            cluster_format.clone(),
        );
        let writes_overloaded = Counter::default();
        registry.register(
            "writes_overloaded",
            "Writes refused with RESOURCE_EXHAUSTED (and a retry hint) because the leader's queue of pending writes was full (--max-pending-writes)",
            writes_overloaded.clone(),
        );
        let http_connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "HTTP connections closed at accept because the port held --max-http-connections",
            http_connections_refused.clone(),
        );
        let node_format = Gauge::<i64, AtomicI64>::default();
        node_format.set(i64::from(crate::catalog::format::FORMAT));
        registry.register(
            "node_format",
            "The log format this node's release reads and writes",
            node_format,
        );
        registry.register(
            "lease_expiries",
            "Leases expired because they were not renewed in time",
            lease_expiries.clone(),
        );
        registry.register("watchers", "Open Watch streams", watchers.clone());
        registry.register(
            "watch_resyncs",
            "Watchers that fell behind and were sent a fresh snapshot",
            watch_resyncs.clone(),
        );
        registry.register(
            "watch_buffered_bytes",
            "Bytes of watch events built but not yet taken by their watchers' connections (bounded by --max-watch-buffer-bytes)",
            watch_buffered_bytes.clone(),
        );
        registry.register(
            "watch_buffer_closes",
            "Watch streams closed with RESOURCE_EXHAUSTED because the node's watch buffer was full",
            watch_buffer_closes.clone(),
        );
        registry.register(
            "grpc_requests",
            "gRPC requests by method and status code",
            grpc_requests.clone(),
        );
        registry.register(
            "commit_batch_size",
            "Commands per Raft log entry: the leader packs concurrent writes into one entry (group commit)",
            commit_batch_size.clone(),
        );
        registry.register(
            "commit_seconds",
            "Time to write and fsync one batch of Raft log entries",
            commit_seconds.clone(),
        );
        Self {
            registry,
            instances,
            leases,
            kv_bytes,
            revision,
            cluster_format,
            writes_overloaded,
            http_connections_refused,
            lease_expiries,
            watchers,
            watch_resyncs,
            watch_buffered_bytes,
            watch_buffer_closes,
            consul_blocking_refused,
            consul_blocked,
            grpc_requests,
            commit_batch_size,
            commit_seconds,
            raft_term,
            raft_leader,
            raft_is_leader,
            raft_commit_index,
            raft_applied_index,
            raft_replication_lag,
            proposals,
            self_preservation,
            lease_checkpoints,
            storage_failed,
            telemetry_requests,
            telemetry_errors,
            telemetry_slow,
            telemetry_reports,
            telemetry_forwarded,
            telemetry_forward_dropped,
            rollout_transitions,
            rollout_weight,
            rollout_phase,
            rollout_error_e,
            acl_denials,
            acl_auth_failures,
            acl_auth_backoff_refused,
            tls_handshake_failures,
            tls_reloads,
            tls_reload_failures,
        }
    }
}

impl Metrics {
    /// Counts a request refused by ACLs.
    pub fn acl_denied(&self, method: &'static str) {
        self.acl_denials
            .get_or_create(&MethodLabels { method })
            .inc();
    }

    /// Counts a transition into `phase`.
    pub fn rollout_transition(&self, phase: &'static str) {
        self.rollout_transitions
            .get_or_create(&PhaseLabels { phase })
            .inc();
    }

    /// Sets a rollout's gauges from its state.
    pub fn set_rollout(&self, r: &crate::model::rollout::Rollout) {
        use crate::model::rollout::Phase;
        let svc = ServiceLabels {
            namespace: r.namespace.clone(),
            service: r.service.clone(),
        };
        self.rollout_weight
            .get_or_create(&svc)
            .set(i64::from(r.status.weight));
        self.rollout_error_e
            .get_or_create(&svc)
            .set(r.error_evidence().e_value());
        for phase in [
            Phase::Pending,
            Phase::Initializing,
            Phase::Progressing,
            Phase::Promoting,
            Phase::Succeeded,
            Phase::Paused,
            Phase::Aborting,
            Phase::Aborted,
            Phase::Superseded,
        ] {
            self.rollout_phase
                .get_or_create(&RolloutPhaseLabels {
                    namespace: r.namespace.clone(),
                    service: r.service.clone(),
                    phase: phase.as_str(),
                })
                .set(i64::from(phase == r.status.phase));
        }
    }

    /// Sets the catalog gauges (after an apply or a snapshot load).
    pub fn set_catalog_gauges(&self, catalog: &Catalog) {
        self.instances.set(catalog.instance_count() as i64);
        self.leases.set(catalog.lease_count() as i64);
        self.kv_bytes.set(catalog.kv_bytes() as i64);
        self.revision.set(catalog.revision() as i64);
        self.cluster_format.set(i64::from(catalog.cluster_format()));
    }

    /// Counts a finished unary call by method and status, and passes the result on.
    pub fn observe<T>(
        &self,
        method: &'static str,
        r: Result<T, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        let code = r
            .as_ref()
            .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
        self.grpc(method, code);
        r
    }

    pub fn grpc(&self, method: &'static str, code: tonic::Code) {
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let copy = |to: &Counter, from: &std::sync::atomic::AtomicU64| {
            to.inner().store(from.load(Relaxed), Relaxed);
        };
        for (reason, n) in switchyard_tls::incoming::HANDSHAKE_FAILURES.counts() {
            // Zeros stay unwritten, so only reasons that happened are exported.
            if n > 0 {
                self.tls_handshake_failures
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inner()
                    .store(n, Relaxed);
            }
        }
        copy(&self.tls_reloads, &switchyard_tls::reload::RELOADS);
        copy(
            &self.tls_reload_failures,
            &switchyard_tls::reload::RELOAD_FAILURES,
        );
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
