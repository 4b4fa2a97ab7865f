//! How a registry node is configured and what it is given to start: [`RegistryConfig`]
//! (checked by `validate` before any socket is used), the caller's bound [`Listeners`],
//! and [`StartError`] for a node that did not start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::catalog::Limits;
use crate::model::acl::Rule;
use crate::shared::SharedConfig;

/// Largest gRPC message the registry accepts (a registration is well under 8 KiB; a
/// `KeepAlive` message of 1,000 lease ids is about 10 KiB).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// How a registry node behaves; every field has a default that suits one node.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Where the log and snapshots live.
    pub data_dir: PathBuf,
    pub limits: Limits,
    /// Changes a watcher may fall behind before it is resynced with a snapshot.
    pub watch_buffer: usize,
    /// Changes kept so a watcher can resume from a revision without a snapshot.
    pub watch_history: usize,
    /// Log entries between snapshots (which bound the log on disk).
    pub snapshot_every: u64,
    /// Most open Watch streams per node.
    pub max_watchers: usize,
    /// Bytes of watch events built and not yet taken by their watchers' connections,
    /// for the node (see [`crate::watch::budget`]).
    pub max_watch_buffer_bytes: usize,
    /// Most open KeepAlive streams per node (each holds a task and buffers; a client
    /// that opens them and never reads must not grow the node without bound).
    pub max_keepalive_streams: usize,
    /// Writes that may wait to commit on the leader; past it a write is refused with
    /// RESOURCE_EXHAUSTED and a retry hint (see [`crate::raft::propose`]).
    pub max_pending_writes: usize,
    /// The HTTP port's (and `--consul-http`'s) connection bound and head timeout.
    pub http: crate::http::HttpLimits,
    /// Most (namespace, service, version) keys the telemetry store holds (see
    /// [`crate::telemetry`]); a report adding keys beyond it is refused.
    pub max_telemetry_keys: usize,
    /// This node's Raft id (1 for a single node).
    pub node_id: u64,
    /// Every voting member at first start, this node included: id -> peer address
    /// (`Listeners::peer`, port 7402 by default). Empty means a single-node group of this
    /// node alone.
    pub peers: BTreeMap<u64, String>,
    /// The peer address other members use to reach this node (Raft and forwarded
    /// writes); default: the peer listener's address, with 0.0.0.0 read as 127.0.0.1.
    pub advertise: Option<String>,
    /// Join a running cluster through a member's gRPC (or peer) address instead of
    /// starting a group: this node asks to be added as a member and waits.
    pub join: Option<String>,
    /// Raft heartbeat; elections start after 5-10 heartbeats of silence.
    pub heartbeat: Duration,
    /// How often the leader checkpoints every lease's remaining TTL into the log
    /// (zero: never; a new leader then gives every lease its full TTL).
    pub lease_checkpoint_interval: Duration,
    /// Self-preservation: when more than this share of the leases is past its deadline
    /// at once, expiry pauses (1.0 disables it).
    pub self_preservation_threshold: f64,
    /// Self-preservation applies only with at least this many leases.
    pub self_preservation_min_leases: usize,
    /// DNS zone and TTL (served when `Listeners::dns` is given).
    pub dns: switchyard_core::dns::DnsConfig,
    /// TLS on every TCP port (plaintext when `None`).
    pub tls: Option<TlsFiles>,
    /// The mesh's built-in CA.
    pub mesh: MeshConfig,
    /// What callers without a token may do after `acl bootstrap`.
    pub acl: AclDefaults,
    /// The Consul-compatible API (on the HTTP port, and on `consul.listen` if set).
    pub consul: crate::consul::ConsulConfig,
}

/// What requests without a token may do once ACLs are bootstrapped (before bootstrap
/// everything is allowed). Per node, from its flags: give every node the same.
#[derive(Clone, Debug)]
pub struct AclDefaults {
    /// Rights of a gRPC request without a token (`--anonymous-rule`; none by default).
    /// Read and kv-read rights only (see `parse_anonymous_rules`).
    pub anonymous: Arc<[Rule]>,
    /// What DNS may answer (`--dns-rule`; every service by default, so DNS keeps
    /// working after bootstrap; a service outside it is REFUSED, never NXDOMAIN).
    pub dns: Arc<[Rule]>,
}

impl Default for AclDefaults {
    fn default() -> Self {
        Self {
            anonymous: Arc::from(Vec::new()),
            dns: Arc::from(crate::model::acl::default_dns_rules()),
        }
    }
}

/// The mesh CA's settings (see [`crate::identity`]).
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Ends every leaf's DNS name; taken when the first root is made.
    pub trust_domain: String,
    pub leaf_ttl: Duration,
    /// The root from files every node is given (its key then never enters the state).
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Leaves a node signs per second at most.
    pub csr_per_second: u32,
    /// After a rotation, how long the new root is only trusted before it signs: time
    /// for every sidecar's watch to deliver it, so no leaf it signed meets a peer that
    /// does not trust it yet. Sidecars re-issue their leaves after this plus 1-5 s.
    pub root_propagation: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.into(),
            leaf_ttl: crate::identity::DEFAULT_LEAF_TTL,
            ca_cert: None,
            ca_key: None,
            csr_per_second: crate::identity::DEFAULT_CSR_PER_SECOND,
            root_propagation: crate::identity::ROOT_PROPAGATION,
        }
    }
}

/// The files of a node's TLS: its certificate and key (served on every TCP port, and
/// presented as its client certificate to other nodes) and the CA that signed every
/// node's certificate (the peer port requires a client certificate it signed).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl RegistryConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            limits: Limits::default(),
            watch_buffer: 1_024,
            watch_history: 10_000,
            snapshot_every: 10_000,
            max_watchers: 10_000,
            max_watch_buffer_bytes: crate::watch::budget::DEFAULT_MAX_WATCH_BUFFER_BYTES,
            max_keepalive_streams: 10_000,
            max_pending_writes: crate::raft::propose::DEFAULT_MAX_PENDING_WRITES,
            http: crate::http::HttpLimits {
                max_connections: crate::http::DEFAULT_MAX_HTTP_CONNECTIONS,
                header_read_timeout: crate::http::DEFAULT_HEADER_READ_TIMEOUT,
            },
            max_telemetry_keys: crate::telemetry::DEFAULT_MAX_KEYS,
            node_id: 1,
            peers: BTreeMap::new(),
            advertise: None,
            join: None,
            heartbeat: Duration::from_millis(100),
            lease_checkpoint_interval: Duration::from_secs(5),
            self_preservation_threshold: 0.5,
            self_preservation_min_leases: 20,
            dns: switchyard_core::dns::DnsConfig::default(),
            tls: None,
            mesh: MeshConfig::default(),
            acl: AclDefaults::default(),
            consul: crate::consul::ConsulConfig::default(),
        }
    }

    /// Checks the configuration before any socket is used.
    pub fn validate(&self) -> Result<(), String> {
        if self.limits.max_instances == 0 {
            return Err("max_instances must be at least 1".into());
        }
        if self.limits.max_policies_per_namespace == 0
            || self.limits.max_policy_bytes_per_namespace == 0
        {
            return Err(
                "max_policies_per_namespace and max_policy_bytes_per_namespace must be at least 1"
                    .into(),
            );
        }
        if self.watch_buffer == 0 || self.watch_buffer > 1_000_000 {
            return Err("watch_buffer must be 1-1000000".into());
        }
        if self.watch_history == 0 || self.watch_history > 10_000_000 {
            return Err("watch_history must be 1-10000000".into());
        }
        if self.snapshot_every == 0 {
            return Err("snapshot_every must be at least 1".into());
        }
        if self.max_watchers == 0 {
            return Err("max_watchers must be at least 1".into());
        }
        if self.max_watch_buffer_bytes < 1024 * 1024 {
            return Err("max_watch_buffer_bytes must be at least 1048576 (1 MiB)".into());
        }
        if self.max_keepalive_streams == 0 {
            return Err("max_keepalive_streams must be at least 1".into());
        }
        if !(1..=1_000_000).contains(&self.http.max_connections) {
            return Err("max_http_connections must be 1-1000000".into());
        }
        if self.http.header_read_timeout < std::time::Duration::from_millis(100) {
            return Err("the HTTP header read timeout must be at least 100ms".into());
        }
        if !(1..=1_000_000).contains(&self.max_pending_writes) {
            return Err("max_pending_writes must be 1-1000000".into());
        }
        if self.max_telemetry_keys == 0 {
            return Err("max_telemetry_keys must be at least 1".into());
        }
        if self.node_id == 0 {
            return Err("node_id must be at least 1".into());
        }
        if !self.peers.is_empty() && !self.peers.contains_key(&self.node_id) {
            return Err(format!(
                "peers must include this node (id {}): list every member as ID=ADDR",
                self.node_id
            ));
        }
        if self.heartbeat < Duration::from_millis(10) || self.heartbeat > Duration::from_secs(5) {
            return Err("heartbeat must be 10ms-5s".into());
        }
        self.dns.validate()?;
        // Built by a library caller, not only parsed from flags: the same bounds apply.
        crate::model::acl::check_anonymous_rules(&self.acl.anonymous)
            .and_then(|()| crate::model::acl::check_dns_rules(&self.acl.dns))
            .map_err(|e| e.to_string())?;
        crate::model::mesh_ca::validate_trust_domain(&self.mesh.trust_domain)?;
        if self.mesh.leaf_ttl < Duration::from_secs(10)
            || self.mesh.leaf_ttl > Duration::from_secs(366 * 86_400)
        {
            return Err("leaf_ttl must be 10s-366d".into());
        }
        if self.mesh.ca_cert.is_some() != self.mesh.ca_key.is_some() {
            return Err("mesh_ca_cert and mesh_ca_key go together: pass both, or neither for a CA the registry makes".into());
        }
        if self.mesh.csr_per_second == 0 {
            return Err("csr_per_second must be at least 1".into());
        }
        if self.consul.datacenter.is_empty()
            || self.consul.datacenter.len() > 64
            || !self
                .consul
                .datacenter
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Err("consul_datacenter must be 1-64 of A-Z a-z 0-9 - _".into());
        }
        if self.consul.max_blocking == 0 || self.consul.max_blocking_per_client == 0 {
            return Err(
                "consul_max_blocking and consul_max_blocking_per_client must be at least 1".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.self_preservation_threshold)
            || self.self_preservation_threshold == 0.0
        {
            return Err("self_preservation_threshold must be above 0 and at most 1".into());
        }
        Ok(())
    }

    /// The part of this configuration the request handlers and the catalog's owners read.
    pub fn shared(&self) -> SharedConfig {
        SharedConfig {
            limits: self.limits,
            watch_buffer: self.watch_buffer,
            watch_history: self.watch_history,
            max_watchers: self.max_watchers,
            max_watch_buffer_bytes: self.max_watch_buffer_bytes,
            max_keepalive_streams: self.max_keepalive_streams,
            telemetry: crate::telemetry::TelemetryLimits {
                max_keys: self.max_telemetry_keys,
            },
            acl: self.acl.clone(),
        }
    }
}

/// Sockets bound by the caller (tests bind port 0 and read the real address back).
pub struct Listeners {
    /// The client port: Registry, Discovery, Routing, Cluster, health.
    pub grpc: TcpListener,
    /// The peer port: Raft and forwarded writes (`switchyard.internal.v1.RaftInternal`)
    /// and `Cluster` for membership changes handed to the leader. Never the client port,
    /// so a client cannot reach the internal service by accident of a shared listener.
    pub peer: TcpListener,
    pub http: TcpListener,
    /// UDP socket and TCP listener for DNS (same port), if DNS is served.
    pub dns: Option<(tokio::net::UdpSocket, TcpListener)>,
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot use data dir {dir}: {reason}")]
    Store { dir: PathBuf, reason: String },
    #[error("cannot start Raft: {0}")]
    Raft(String),
    #[error("cannot start the writer thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot read the listener address: {0}")]
    Addr(std::io::Error),
    #[error("cannot use the TLS files: {0}")]
    Tls(String),
}
