//! `switchyard registry` and `switchyard dev`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, Args};
use serde::{Deserialize, Serialize};
use switchyard_registry::{Limits, Listeners, RegistryConfig, RegistryHandle};
use tokio::net::TcpListener;

use super::config::{self, parse_duration};
use super::{shutdown_signal, CliError, EXIT_CONFIG, EXIT_STORAGE};

/// The registry role's configuration, `switchyard registry`'s flags. Each field is a flag,
/// a `SWITCHYARD_*` environment variable and a key of the `--config` TOML file (the field's
/// name); a flag wins over the environment, which wins over the file, which wins over the
/// default (see [`config::overlay_file`]). Unknown keys in the file are an error.
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RegistryArgs {
    /// gRPC address (Registry, Discovery, grpc.health.v1).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// Peer address: Raft and writes forwarded to the leader (never served on
    /// --listen). Firewall it to the other registry nodes.
    #[arg(long, env = "SWITCHYARD_PEER_LISTEN", default_value = "0.0.0.0:7402")]
    pub peer_listen: SocketAddr,
    /// HTTP address: /metrics, /health, the JSON API (/api/v1), the Consul-compatible
    /// API (/v1) and Prometheus discovery (/v1/prometheus/sd).
    #[arg(long, env = "SWITCHYARD_HTTP", default_value = "0.0.0.0:7401")]
    pub http: SocketAddr,
    /// A second address serving the same HTTP API, for clients that expect Consul's
    /// port (for example 0.0.0.0:8500). Unset: only --http.
    #[arg(long, env = "SWITCHYARD_CONSUL_HTTP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consul_http: Option<SocketAddr>,
    /// Datacenter the Consul API reports (a `dc=` naming another gets Consul's "No path
    /// to datacenter").
    #[arg(long, env = "SWITCHYARD_CONSUL_DATACENTER", default_value = "dc1")]
    pub consul_datacenter: String,
    /// Consul blocking queries (index + wait) held open at once on this node; past it,
    /// 503 with Retry-After.
    #[arg(long, env = "SWITCHYARD_CONSUL_MAX_BLOCKING", default_value_t = 20_000)]
    pub consul_max_blocking: usize,
    /// Consul blocking queries held open at once for one client address.
    #[arg(
        long,
        env = "SWITCHYARD_CONSUL_MAX_BLOCKING_PER_CLIENT",
        default_value_t = 2_500
    )]
    pub consul_max_blocking_per_client: usize,
    /// DNS address, UDP and TCP ("off" disables DNS).
    #[arg(long, env = "SWITCHYARD_DNS", default_value = "0.0.0.0:8600")]
    pub dns: String,
    /// DNS zone: SERVICE.service.DOMAIN.
    #[arg(long, env = "SWITCHYARD_DNS_DOMAIN", default_value = "switchyard")]
    pub dns_domain: String,
    /// TTL of DNS answers (and of negative answers, via the SOA), in seconds.
    #[arg(long, env = "SWITCHYARD_DNS_TTL", default_value_t = 5)]
    pub dns_ttl: u32,
    /// Directory for the catalog's log and snapshots (created if missing).
    #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = "switchyard-data")]
    pub data_dir: PathBuf,
    /// Most instances the registry holds.
    #[arg(long, env = "SWITCHYARD_MAX_INSTANCES", default_value_t = 1_000_000)]
    pub max_instances: usize,
    /// Services with a routing policy (or its kept history) per namespace.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_POLICIES_PER_NAMESPACE",
        default_value_t = 1_000
    )]
    pub max_policies_per_namespace: usize,
    /// Bytes of current routing policies per namespace (encoded; every sidecar of the
    /// namespace holds them): a put past it is refused.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_POLICY_BYTES_PER_NAMESPACE",
        default_value_t = switchyard_registry::DEFAULT_MAX_POLICY_BYTES_PER_NAMESPACE
    )]
    pub max_policy_bytes_per_namespace: usize,
    /// Bytes of superseded policy records kept for history and rollback per namespace:
    /// past it the oldest are dropped.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_POLICY_HISTORY_BYTES_PER_NAMESPACE",
        default_value_t = switchyard_registry::DEFAULT_MAX_POLICY_HISTORY_BYTES_PER_NAMESPACE
    )]
    pub max_policy_history_bytes_per_namespace: usize,
    /// Bytes the KV store holds across every namespace (keys, values and 64 bytes per
    /// entry); a write past it is refused. Every node should use the same value.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_KV_BYTES",
        default_value_t = switchyard_registry::DEFAULT_MAX_KV_BYTES
    )]
    pub max_kv_bytes: usize,
    /// Bytes of watch events built but not yet taken by their watchers' connections, for
    /// the whole node: a watcher whose next event does not fit is closed with
    /// RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_WATCH_BUFFER_BYTES",
        default_value_t = switchyard_registry::DEFAULT_MAX_WATCH_BUFFER_BYTES
    )]
    pub max_watch_buffer_bytes: usize,
    /// Changes a watcher may fall behind before it is resynced with a snapshot.
    #[arg(long, env = "SWITCHYARD_WATCH_BUFFER", default_value_t = 1_024)]
    pub watch_buffer: usize,
    /// Changes kept so watchers can resume from a revision without a snapshot.
    #[arg(long, env = "SWITCHYARD_WATCH_HISTORY", default_value_t = 10_000)]
    pub watch_history: usize,
    /// Most open Watch streams.
    #[arg(long, env = "SWITCHYARD_MAX_WATCHERS", default_value_t = 10_000)]
    pub max_watchers: usize,
    /// Most open KeepAlive streams (one per registered client; many leases fit in one).
    #[arg(
        long,
        env = "SWITCHYARD_MAX_KEEPALIVE_STREAMS",
        default_value_t = 10_000
    )]
    pub max_keepalive_streams: usize,
    /// Writes that may wait to commit on the leader (group commit takes 256 per log
    /// entry); past it a write is refused with RESOURCE_EXHAUSTED and a retry hint
    /// (gRPC `grpc-retry-pushback-ms`, HTTP 429 with `Retry-After`).
    #[arg(
        long,
        env = "SWITCHYARD_MAX_PENDING_WRITES",
        default_value_t = switchyard_registry::raft::propose::DEFAULT_MAX_PENDING_WRITES
    )]
    pub max_pending_writes: usize,
    /// Connections the HTTP port (and --consul-http) holds at once; a new one past it
    /// is closed at once. Keep it above --consul-max-blocking. A client has 10 s to send
    /// a request head, and a kept-alive connection closes after 10 s without one.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_HTTP_CONNECTIONS",
        default_value_t = switchyard_registry::http::DEFAULT_MAX_HTTP_CONNECTIONS
    )]
    pub max_http_connections: usize,
    /// Most (namespace, service, version) keys the node's telemetry store holds: a
    /// sidecar's report adding more is refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_TELEMETRY_KEYS",
        default_value_t = switchyard_registry::telemetry::DEFAULT_MAX_KEYS
    )]
    pub max_telemetry_keys: usize,
    /// Log entries between snapshots of the catalog.
    #[arg(long, env = "SWITCHYARD_SNAPSHOT_EVERY", default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// This node's Raft id.
    #[arg(long, env = "SWITCHYARD_NODE_ID", default_value_t = 1)]
    pub node_id: u64,
    /// Every member at first start, this node included: ID=HOST:PORT,... (peer
    /// addresses, --peer-listen). Empty: a single-node group. In the file: a table id ->
    /// address.
    #[arg(long, env = "SWITCHYARD_PEERS", value_delimiter = ',', value_parser = parse_peer, conflicts_with = "join")]
    #[serde(with = "peers")]
    pub peers: Vec<(u64, String)>,
    /// Join a running cluster through any member's gRPC or peer address (HOST:PORT).
    #[arg(long, env = "SWITCHYARD_JOIN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    /// Peer address the other members use for this node; default: --peer-listen
    /// (0.0.0.0 read as 127.0.0.1).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Raft heartbeat; a leader is suspected dead after 5-10 heartbeats of silence.
    #[arg(long, env = "SWITCHYARD_HEARTBEAT", default_value = "100ms", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub heartbeat: Duration,
    /// How often the leader checkpoints every lease's remaining TTL into the log, for a
    /// new leader to honour (0s: never; a new leader then gives full TTLs).
    #[arg(long, env = "SWITCHYARD_LEASE_CHECKPOINT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub lease_checkpoint_interval: Duration,
    /// Pause expiry while more than this share of leases missed their renewals at once
    /// (1.0 disables self-preservation).
    #[arg(
        long,
        env = "SWITCHYARD_SELF_PRESERVATION_THRESHOLD",
        default_value_t = 0.5
    )]
    pub self_preservation_threshold: f64,
    /// Self-preservation applies only with at least this many leases.
    #[arg(
        long,
        env = "SWITCHYARD_SELF_PRESERVATION_MIN_LEASES",
        default_value_t = 20
    )]
    pub self_preservation_min_leases: usize,
    /// TLS certificate (PEM, leaf first) served on --listen, --http and --peer-listen,
    /// and presented to other nodes as this node's client certificate (so it needs the
    /// serverAuth and clientAuth usages). Without it every port is plaintext. Re-read on
    /// SIGHUP or when the file changes.
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The mesh CA's trust domain: leaves are named `<svc>.<ns>.svc.<trust-domain>` and
    /// `spiffe://<trust-domain>/ns/<ns>/svc/<svc>`. Fixed when the first root is made.
    #[arg(
        long,
        env = "SWITCHYARD_TRUST_DOMAIN",
        default_value = "switchyard.local"
    )]
    pub trust_domain: String,
    /// Lifetime of the leaves the mesh CA issues (sidecars renew at 70 %).
    #[arg(long, env = "SWITCHYARD_LEAF_TTL", default_value = "72h", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub leaf_ttl: Duration,
    /// The mesh CA's root certificate (PEM) from a file every node is given, instead of
    /// a root the registry makes and keeps in its replicated state.
    #[arg(long, env = "SWITCHYARD_MESH_CA_CERT", requires = "mesh_ca_key")]
    pub mesh_ca_cert: Option<PathBuf>,
    /// The key of --mesh-ca-cert; it stays in this file, never in the replicated state.
    #[arg(long, env = "SWITCHYARD_MESH_CA_KEY", requires = "mesh_ca_cert")]
    pub mesh_ca_key: Option<PathBuf>,
    /// Leaves this node signs per second at most (bursts of twice that).
    #[arg(long, env = "SWITCHYARD_MAX_CSR_PER_SECOND", default_value_t = 50)]
    pub max_csr_per_second: u32,
    /// What a request without a token may do after `acl bootstrap` (repeatable, or
    /// space-separated in the variable): read rules only, e.g. `service:web-*:read` or
    /// `kv:public/:read`. None by default: anonymous requests get no rights. Give every
    /// node the same.
    #[arg(
        long = "anonymous-rule",
        env = "SWITCHYARD_ANONYMOUS_RULE",
        value_delimiter = ' ',
        value_parser = parse_anonymous_rule
    )]
    #[serde(default)]
    pub anonymous_rule: Vec<String>,
    /// Which services DNS answers for after `acl bootstrap` (DNS carries no token):
    /// service read rules, or `none`. By default every service, so DNS keeps working;
    /// a service outside the rules is answered REFUSED.
    #[arg(
        long = "dns-rule",
        env = "SWITCHYARD_DNS_RULE",
        value_delimiter = ' ',
        default_value = "service:*:read",
        value_parser = parse_dns_rule
    )]
    #[serde(default = "default_dns_rule")]
    pub dns_rule: Vec<String>,
    /// The CA of the cluster (the global --ca-file, or this key in the --config file).
    #[arg(skip)]
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// TOML file with any of the keys above.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

impl RegistryArgs {
    /// The flags merged with `--config` (if any): the one place precedence is applied.
    pub fn resolve(self, matches: Option<&ArgMatches>) -> Result<Self, CliError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let mut merged = config::overlay_file(&self, matches, &path)?;
        merged.config = Some(path);
        Ok(merged)
    }

    /// The library's config (validated by `start_registry` before it binds anything).
    fn registry_config(&self) -> Result<RegistryConfig, CliError> {
        let mut config = RegistryConfig::new(self.data_dir.clone());
        config.limits = Limits {
            max_instances: self.max_instances,
            max_policies_per_namespace: self.max_policies_per_namespace,
            max_policy_bytes_per_namespace: self.max_policy_bytes_per_namespace,
            max_policy_history_bytes_per_namespace: self.max_policy_history_bytes_per_namespace,
            max_kv_bytes: self.max_kv_bytes,
            ..Limits::default()
        };
        config.max_watch_buffer_bytes = self.max_watch_buffer_bytes;
        config.watch_buffer = self.watch_buffer;
        config.watch_history = self.watch_history;
        config.max_watchers = self.max_watchers;
        config.max_keepalive_streams = self.max_keepalive_streams;
        config.max_pending_writes = self.max_pending_writes;
        config.http.max_connections = self.max_http_connections;
        config.max_telemetry_keys = self.max_telemetry_keys;
        config.consul = switchyard_registry::consul::ConsulConfig {
            datacenter: self.consul_datacenter.clone(),
            max_blocking: self.consul_max_blocking,
            max_blocking_per_client: self.consul_max_blocking_per_client,
            listen: self.consul_http,
        };
        config.snapshot_every = self.snapshot_every;
        config.node_id = self.node_id;
        config.peers = self.peers.iter().cloned().collect();
        config.join = self.join.clone();
        config.advertise = self.advertise.clone();
        config.heartbeat = self.heartbeat;
        config.lease_checkpoint_interval = self.lease_checkpoint_interval;
        config.self_preservation_threshold = self.self_preservation_threshold;
        config.self_preservation_min_leases = self.self_preservation_min_leases;
        config.dns.domain = self.dns_domain.clone();
        config.dns.ttl = self.dns_ttl;
        config.mesh = switchyard_registry::MeshConfig {
            trust_domain: self.trust_domain.clone(),
            leaf_ttl: self.leaf_ttl,
            ca_cert: self.mesh_ca_cert.clone(),
            ca_key: self.mesh_ca_key.clone(),
            csr_per_second: self.max_csr_per_second,
            ..switchyard_registry::MeshConfig::default()
        };
        // Checked again here: a --config file's rules did not pass the flag's parser.
        let bad = |e: switchyard_core::model::ValidationError| {
            CliError::new(
                EXIT_CONFIG,
                format!("{e}: fix the flag or the --config key"),
            )
        };
        config.acl = switchyard_registry::AclDefaults {
            anonymous: switchyard_core::model::acl::parse_anonymous_rules(&self.anonymous_rule)
                .map_err(bad)?
                .into(),
            dns: switchyard_core::model::acl::parse_dns_rules(&self.dns_rule)
                .map_err(bad)?
                .into(),
        };
        Ok(config)
    }
}

/// `peers` in the file: a table `{ 1 = "host:7402", 2 = ... }`, every entry checked as
/// the flag's ID=HOST:PORT.
mod peers {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[(u64, String)], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|(id, addr)| (id.to_string(), addr))
            .collect::<BTreeMap<_, _>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, String)>, D::Error> {
        BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(id, addr)| super::parse_peer(&format!("{id}={addr}")))
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}

fn default_dns_rule() -> Vec<String> {
    vec!["service:*:read".into()]
}

/// One `--anonymous-rule`: a rule an anonymous caller may have.
fn parse_anonymous_rule(s: &str) -> Result<String, String> {
    switchyard_core::model::acl::parse_anonymous_rules(&[s.to_string()])
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// One `--dns-rule`: a service read rule, or `none`.
fn parse_dns_rule(s: &str) -> Result<String, String> {
    switchyard_core::model::acl::parse_dns_rules(&[s.to_string()])
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=HOST:PORT"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("{id:?} is not a node id"))?;
    if id == 0 {
        return Err("node ids start at 1".into());
    }
    Ok((id, addr.trim().to_string()))
}

/// The dev role's configuration, `switchyard dev`'s flags: the registry's and the
/// sidecar's addresses, with the environment variables those roles use for them. The
/// embedded sidecar otherwise runs on its defaults.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// Keep the catalog here instead of in a temporary directory removed at exit.
    #[arg(long, env = "SWITCHYARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Registry gRPC address.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Registry peer address (Raft; a dev registry has no peers, but the port is open).
    #[arg(long, env = "SWITCHYARD_PEER_LISTEN", default_value = "127.0.0.1:7402")]
    pub peer_listen: SocketAddr,
    /// Registry HTTP address for /metrics and /health.
    #[arg(long, env = "SWITCHYARD_HTTP", default_value = "127.0.0.1:7401")]
    pub http: SocketAddr,
    /// Registry DNS address ("off" disables DNS).
    #[arg(long, env = "SWITCHYARD_DNS", default_value = "127.0.0.1:8600")]
    pub dns: String,
    /// Sidecar admin address: /ready, /metrics, /endpoints.
    #[arg(long, env = "SWITCHYARD_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Sidecar DNS address, answering from its cache ("off" disables).
    #[arg(
        long,
        env = "SWITCHYARD_SIDECAR_DNS",
        default_value = "127.0.0.1:15053"
    )]
    pub sidecar_dns: String,
    /// Sidecar HTTP proxy address (routes by Host).
    #[arg(long, env = "SWITCHYARD_HTTP_PROXY", default_value = "127.0.0.1:15001")]
    pub http_proxy: SocketAddr,
    /// Serve TLS with a CA and certificate generated into the data dir (`tls/`), and
    /// connect the sidecar over it; the CA's path is printed for clients' --ca-file.
    #[arg(long, env = "SWITCHYARD_DEV_TLS")]
    pub tls: bool,
}

pub async fn run_registry(
    mut args: RegistryArgs,
    ca_file: Option<PathBuf>,
) -> Result<(), CliError> {
    if ca_file.is_some() {
        args.ca_file = ca_file;
    }
    let mut config = args.registry_config()?;
    config.tls = tls_files(&args)?;
    print_mode(config.tls.is_some(), "registry");
    log_runtime();
    let addrs = Addrs {
        listen: args.listen,
        peer: args.peer_listen,
        http: args.http,
        dns: dns_addr(&args.dns)?,
    };
    serve(config, addrs).await
}

/// `token` is the global --token: once ACLs are bootstrapped, the dev sidecar needs one.
pub async fn run_dev(args: DevArgs, token: Option<String>) -> Result<(), CliError> {
    let stop = shutdown_signal();
    // The temp dir lives until this function returns, i.e. until both parts stopped.
    let (_temp, data_dir) = match args.data_dir {
        Some(dir) => (None, dir),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("switchyard-dev-")
                .tempdir()
                .map_err(|e| CliError::new(1, format!("cannot create a temp data dir: {e}")))?;
            let path = temp.path().to_path_buf();
            (Some(temp), path)
        }
    };
    let addrs = Addrs {
        listen: args.listen,
        peer: args.peer_listen,
        http: args.http,
        dns: dns_addr(&args.dns)?,
    };
    let mut registry_config = RegistryConfig::new(data_dir.join("registry"));
    let transport = if args.tls {
        let files = dev_certificates(&data_dir.join("tls"))?;
        let transport = switchyard_tls::Transport::from_ca_file(Some(&files.ca))
            .map_err(|e| CliError::new(1, e.0))?;
        registry_config.tls = Some(files);
        transport
    } else {
        switchyard_tls::Transport::plain()
    };
    print_mode(args.tls, "dev");
    let tls_ca = registry_config.tls.as_ref().map(|t| t.ca.clone());
    let registry = start_registry(registry_config, addrs).await?;
    let url = transport.url_for(&registry.grpc_addr.to_string());
    let mut sidecar_args = super::sidecar::SidecarArgs::defaults(&url)?;
    sidecar_args.admin = args.admin;
    sidecar_args.dns = args.sidecar_dns.clone();
    sidecar_args.http_proxy = args.http_proxy.to_string();
    sidecar_args.cache_file = data_dir.join("sidecar-catalog.json");
    let mut config = super::sidecar::config(&sidecar_args, &transport)?;
    if token.is_some() {
        config.set_token(token);
    }
    let sidecar = match super::sidecar::start(&sidecar_args, config).await {
        Ok(s) => s,
        Err(e) => {
            registry.shutdown().await;
            return Err(e);
        }
    };
    eprintln!(
        "switchyard dev: registry on {} (gRPC), http://{} (metrics, health, Consul and JSON APIs) and {} (DNS); sidecar proxy on http://{}, admin on http://{}; data in {}",
        registry.grpc_addr,
        registry.http_addr,
        registry.dns_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        sidecar.http_proxy_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
        sidecar.admin_addr,
        data_dir.display()
    );
    match &tls_ca {
        Some(ca) => eprintln!(
            "  TLS on: clients use --registry {url} --ca-file {} (or SWITCHYARD_CA_FILE)",
            ca.display()
        ),
        None => eprintln!("  TLS off: plaintext (start with --tls for TLS on every port)"),
    }
    eprintln!(
        "  try: switchyard register --service web --address 127.0.0.1 --port 8080 --version 1.0.0"
    );
    eprintln!(
        "       switchyard services; curl -H 'Host: web' http://{}/",
        sidecar
            .http_proxy_addr
            .map_or_else(String::new, |a| a.to_string())
    );
    let failed = tokio::select! {
        _ = stop => None,
        failure = registry.failed() => Some(failure),
    };
    tracing::info!("shutting down: sidecar first, then the registry");
    sidecar.shutdown().await;
    match failed {
        Some(failure) => Err(exit_on_storage_failure(registry, &failure).await),
        None => {
            registry.shutdown().await;
            Ok(())
        }
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr).await.map_err(|e| {
        CliError::new(
            EXIT_CONFIG,
            format!("cannot listen on {addr} ({flag}): {e}; is another registry running? pick another address with {flag}"),
        )
    })
}

/// `dev --tls`: the quick-start certificates in `dir`, made on first use.
fn dev_certificates(dir: &std::path::Path) -> Result<switchyard_registry::TlsFiles, CliError> {
    use switchyard_tls::generate;
    let files = switchyard_registry::TlsFiles {
        cert: dir.join(generate::CERT),
        key: dir.join(generate::KEY),
        ca: dir.join(generate::CA_CERT),
    };
    if !files.cert.exists() {
        generate::quickstart("switchyard dev CA", &[], 30)
            .and_then(|b| generate::write(dir, &b, true))
            .map_err(|e| CliError::new(1, e.0))?;
    }
    Ok(files)
}

/// The node's TLS files from the flags: all three, or none.
fn tls_files(args: &RegistryArgs) -> Result<Option<switchyard_registry::TlsFiles>, CliError> {
    match (&args.tls_cert, &args.tls_key, &args.ca_file) {
        (None, None, _) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => Ok(Some(switchyard_registry::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        })),
        (Some(_), Some(_), None) => Err(CliError::new(
            EXIT_CONFIG,
            "--tls-cert needs --ca-file (SWITCHYARD_CA_FILE): the CA that signed every registry node's certificate, which the peer port requires of other nodes (`switchyard tls init` makes one)",
        )),
        _ => Err(CliError::new(
            EXIT_CONFIG,
            "--tls-cert and --tls-key go together: pass both, or neither for plaintext",
        )),
    }
}

/// Which runtime serves, and why (see `cli::worker_threads`).
fn log_runtime() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => tracing::info!(
            cpus,
            "runtime: current-thread (this process may use one CPU)"
        ),
        _ => tracing::info!(cpus, "runtime: multi-thread, one worker per CPU"),
    }
}

/// Says on stderr whether the ports speak TLS, so plaintext is never a surprise.
fn print_mode(tls: bool, who: &str) {
    if tls {
        tracing::info!(
            "{who}: TLS on every TCP port (gRPC, HTTP, peer with mutual TLS); DNS is plaintext"
        );
    } else {
        tracing::warn!(role = who, "plaintext on every port (no --tls-cert): anyone who can reach them can read the traffic; see `switchyard tls init`");
    }
}

/// `off` (or empty) disables DNS; anything else is a listen address.
fn dns_addr(value: &str) -> Result<Option<SocketAddr>, CliError> {
    match value {
        "off" | "" => Ok(None),
        a => a.parse().map(Some).map_err(|e| {
            CliError::new(
                EXIT_CONFIG,
                format!("invalid --dns {a:?}: {e} (use HOST:PORT or off)"),
            )
        }),
    }
}

/// Where a registry listens (from the flags).
struct Addrs {
    listen: SocketAddr,
    peer: SocketAddr,
    http: SocketAddr,
    dns: Option<SocketAddr>,
}

async fn start_registry(config: RegistryConfig, addrs: Addrs) -> Result<RegistryHandle, CliError> {
    config
        .validate()
        .map_err(|e| CliError::new(EXIT_CONFIG, format!("invalid configuration: {e}")))?;
    let dns = match addrs.dns {
        Some(addr) => Some(switchyard_core::dns::bind(addr).await.map_err(|e| {
            CliError::new(
                EXIT_CONFIG,
                format!("cannot listen on {addr} (--dns): {e}; pick another address or --dns off"),
            )
        })?),
        None => None,
    };
    let listeners = Listeners {
        grpc: bind(addrs.listen, "--listen").await?,
        peer: bind(addrs.peer, "--peer-listen").await?,
        http: bind(addrs.http, "--http").await?,
        dns,
    };
    switchyard_registry::start(config, listeners)
        .await
        .map_err(|e| CliError::new(1, e.to_string()))
}

async fn serve(config: RegistryConfig, addrs: Addrs) -> Result<(), CliError> {
    let stop = shutdown_signal();
    let handle = start_registry(config, addrs).await?;
    let failed = tokio::select! {
        _ = stop => None,
        failure = handle.failed() => Some(failure),
    };
    match failed {
        Some(failure) => Err(exit_on_storage_failure(handle, &failure).await),
        None => {
            tracing::info!("shutting down: finishing in-flight writes, closing streams");
            handle.shutdown().await;
            Ok(())
        }
    }
}

/// How long a registry whose storage failed may take to stop before it exits anyway.
const FAILED_STOP_LIMIT: Duration = Duration::from_secs(15);

/// A registry whose data dir cannot be written is stopped (bounded) and the process
/// exits with [`EXIT_STORAGE`]. Exiting, rather than recovering in place, because
/// openraft 0.9's core ends for good on a storage error and redb refuses the file after
/// one I/O error; a restart by the supervisor (systemd `Restart=on-failure`, Kubernetes,
/// compose `restart:`) reopens both, replays the log (which holds every acknowledged
/// write) and rejoins once the disk takes writes again.
async fn exit_on_storage_failure(
    handle: RegistryHandle,
    failure: &switchyard_registry::StorageFailure,
) -> CliError {
    tracing::error!(
        data_dir = %failure.dir.display(),
        "stopping: the data dir cannot be written; exiting with status {EXIT_STORAGE} for the supervisor to restart this node"
    );
    if tokio::time::timeout(FAILED_STOP_LIMIT, handle.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("the registry did not stop within {FAILED_STOP_LIMIT:?}; exiting anyway");
    }
    CliError::new(
        EXIT_STORAGE,
        format!("{failure}; exiting with status {EXIT_STORAGE}: restart this node once the data dir takes writes again (it replays its log and rejoins)"),
    )
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RegistryArgs,
    }

    fn parse(argv: &[&str]) -> (RegistryArgs, ArgMatches) {
        let matches = Cli::command()
            .try_get_matches_from(argv)
            .expect("valid flags");
        let args = Cli::from_arg_matches(&matches).expect("flags").args;
        (args, matches)
    }

    #[test]
    fn max_telemetry_keys_goes_from_the_flag_or_the_file_to_the_telemetry_limits() {
        let max_keys = |argv: &[&str]| {
            let (args, _) = parse(argv);
            let config = args.registry_config().expect("config");
            config.shared().telemetry.max_keys
        };
        assert_eq!(
            max_keys(&["registry"]),
            switchyard_registry::telemetry::DEFAULT_MAX_KEYS
        );
        assert_eq!(max_keys(&["registry", "--max-telemetry-keys", "42"]), 42);
        let file = std::env::temp_dir().join(format!(
            "switchyard-telemetry-keys-{}.toml",
            std::process::id()
        ));
        std::fs::write(&file, "max_telemetry_keys = 7\n").expect("write the file");
        let (args, matches) = parse(&["registry", "--config", file.to_str().expect("path")]);
        let merged = args.resolve(Some(&matches));
        let _ = std::fs::remove_file(&file);
        let config = merged.expect("merged").registry_config().expect("config");
        assert_eq!(config.shared().telemetry.max_keys, 7);
        let mut zero = config;
        zero.max_telemetry_keys = 0;
        assert!(zero.validate().is_err());
    }

    #[test]
    fn anonymous_and_dns_rules_come_from_flags_or_the_file_and_bad_ones_fail() {
        let (args, _) = parse(&["registry"]);
        let config = args.registry_config().expect("config");
        assert!(
            config.acl.anonymous.is_empty(),
            "no anonymous rights by default"
        );
        assert_eq!(config.acl.dns.len(), 1);
        assert_eq!(config.acl.dns[0].to_string(), "service:*:read");
        let (args, _) = parse(&[
            "registry",
            "--anonymous-rule",
            "service:web-*:read",
            "--anonymous-rule",
            "kv:public/:read",
            "--dns-rule",
            "none",
        ]);
        let config = args.registry_config().expect("config");
        assert_eq!(config.acl.anonymous.len(), 2);
        assert!(config.acl.dns.is_empty());
        for bad in [
            ["--anonymous-rule", "service:*:register"],
            ["--anonymous-rule", "bogus:x:read"],
            ["--dns-rule", "service:*:policy"],
        ] {
            let argv = ["registry", bad[0], bad[1]];
            let e = match Cli::command().try_get_matches_from(argv) {
                Ok(_) => panic!("{bad:?} must be refused"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(bad[1]), "{e}");
        }
        let file = std::env::temp_dir().join(format!(
            "switchyard-anonymous-rule-{}.toml",
            std::process::id()
        ));
        std::fs::write(&file, "anonymous_rule = [\"operator::acl\"]\n").expect("write");
        let (args, matches) = parse(&["registry", "--config", file.to_str().expect("path")]);
        let merged = args.resolve(Some(&matches)).expect("merged");
        let _ = std::fs::remove_file(&file);
        let e = match merged.registry_config() {
            Ok(_) => panic!("operator rights must be refused"),
            Err(e) => e.message,
        };
        assert!(e.contains("without a token"), "{e}");
    }
}
