//! `switchyard sidecar`: the per-service proxy, registrar and catalog cache.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, Args};
use serde::{Deserialize, Serialize};
use switchyard_core::model::resilience::{ResilienceSettings, RetryOn};
use switchyard_sidecar::health::{Check, HealthConfig};
use switchyard_sidecar::workers::WorkerListeners;
use switchyard_sidecar::{
    LocalService, RegistrarConfig, SidecarConfig, SidecarHandle, SidecarListeners,
};
use tokio::net::TcpListener;

use super::config::{self, parse_duration, parse_ttl};
use super::{shutdown_signal, CliError, EXIT_CONFIG};

/// The sidecar role's configuration, `switchyard sidecar`'s flags. Each field is a flag, a
/// `SWITCHYARD_*` environment variable and a key of the `--config` TOML file (the field's
/// name); a flag wins over the environment, which wins over the file, which wins over the
/// default (see [`config::overlay_file`]). Unknown keys in the file are an error.
/// Repeatable flags are tables in the file (`upstreams`, `http_upstreams`, `labels`).
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct SidecarArgs {
    /// Registry gRPC URLs, comma-separated; the sidecar fails over between them.
    #[arg(
        long,
        env = "SWITCHYARD_REGISTRY",
        default_value = "http://127.0.0.1:7400",
        value_delimiter = ','
    )]
    pub registry: Vec<String>,
    /// KV prefixes to follow over the watch stream, comma-separated (at most 64): the
    /// entries under them are served from memory on the admin port at /kv/KEY, and kept
    /// in the cache file (needs `kv:PREFIX:read` once ACLs are on). Default: none.
    #[arg(
        long = "kv-prefix",
        env = "SWITCHYARD_KV_PREFIX",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub kv_prefixes: Vec<String>,
    /// A file holding the ACL token secret sent to the registry (watch, registration,
    /// telemetry); needed once ACLs are bootstrapped. Without it the global --token
    /// (SWITCHYARD_TOKEN) is used. Never logged.
    #[arg(long, env = "SWITCHYARD_TOKEN_FILE")]
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Get a mesh certificate for --service from the registry's built-in CA (a key made
    /// in memory, renewed at 70 % of its lifetime). Needs --service.
    #[arg(long, env = "SWITCHYARD_MESH_IDENTITY", default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "yes")]
    pub mesh_identity: bool,
    /// Admin HTTP address: /ready, /metrics, /endpoints.
    #[arg(long, env = "SWITCHYARD_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// HTTP proxy address (HTTP/1.1 and h2c; routes by Host). "off" disables it.
    #[arg(long, env = "SWITCHYARD_HTTP_PROXY", default_value = "127.0.0.1:15001")]
    pub http_proxy: String,
    /// Mesh inbound address: other sidecars call --service here with mutual TLS (the
    /// caller's identity reaches the app as x-switchyard-peer-identity, intentions are
    /// enforced), and the instance is registered with this port as its mesh port. Needs
    /// --service and --mesh-identity. "auto": 0.0.0.0:15006 inside a Kubernetes pod or
    /// when --address is not a loopback address, else 127.0.0.1:15006 (or a free port
    /// when another sidecar on the host holds it); off without --service. "off" disables it: peers then call the app port in clear
    /// text.
    #[arg(long, env = "SWITCHYARD_INBOUND", default_value = "auto")]
    #[serde(default = "auto")]
    pub inbound: String,
    /// What the local app speaks, for the inbound port: http (HTTP/1.1, h2 and gRPC,
    /// per request, with the caller's identity in x-switchyard-peer-identity) or tcp
    /// (each mesh connection's bytes copied as they are; from peers' --upstream
    /// listeners).
    #[arg(long, env = "SWITCHYARD_APP_PROTOCOL", value_enum, default_value_t = AppProtocol::Http)]
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// DNS address, UDP and TCP, answering from the cached catalog ("off" disables).
    #[arg(
        long,
        env = "SWITCHYARD_SIDECAR_DNS",
        default_value = "127.0.0.1:15053"
    )]
    pub dns: String,
    /// TCP upstream listener, repeatable: NAME=LISTEN_ADDR, e.g. payments=127.0.0.1:9191
    /// (the variable holds a comma-separated list).
    #[arg(long = "upstream", env = "SWITCHYARD_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    #[serde(with = "config::pairs")]
    pub upstreams: Vec<(String, SocketAddr)>,
    /// HTTP upstream listener, repeatable: NAME=LISTEN_ADDR (no Host header needed; the
    /// variable holds a comma-separated list).
    #[arg(long = "http-upstream", env = "SWITCHYARD_HTTP_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    #[serde(with = "config::pairs")]
    pub http_upstreams: Vec<(String, SocketAddr)>,
    /// Namespace to watch and register in.
    #[arg(
        long,
        short = 'n',
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// DNS domain used in Host names (SERVICE.service.DOMAIN).
    #[arg(long, env = "SWITCHYARD_DOMAIN", default_value = "switchyard")]
    pub domain: String,
    /// Where the last catalog is kept, so a restart without a registry still routes.
    /// Default: sidecar-catalog.json in the state directory: $STATE_DIRECTORY (systemd's
    /// StateDirectory=), else $XDG_STATE_HOME/switchyard, else ~/.local/state/switchyard
    /// (never the working directory, where another sidecar's file may lie).
    #[arg(
        long,
        env = "SWITCHYARD_CACHE_FILE",
        default_value_os_t = default_cache_file()
    )]
    pub cache_file: PathBuf,
    /// Endpoints sampled per pick when weights are equal (power of two choices = 2).
    #[arg(long, env = "SWITCHYARD_CHOICE_COUNT", default_value_t = 2)]
    pub choice_count: u32,
    /// Exponent on in-flight requests when weights differ: weight / (active + 1)^bias.
    #[arg(long, env = "SWITCHYARD_ACTIVE_REQUEST_BIAS", default_value_t = 1.0)]
    pub active_request_bias: f64,
    /// Upstream connect timeout.
    #[arg(long, env = "SWITCHYARD_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// Time a request has to get its response headers, all attempts together (504
    /// after); a service's policy may set its own.
    #[arg(long, env = "SWITCHYARD_REQUEST_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub request_timeout: Duration,
    /// Time one attempt has to get its response headers before it is retried (0s:
    /// none, only --request-timeout).
    #[arg(long, env = "SWITCHYARD_PER_TRY_TIMEOUT", default_value = "0s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub per_try_timeout: Duration,
    /// Retries after the first attempt, 0-10, to another endpoint where there is one.
    #[arg(long, env = "SWITCHYARD_RETRIES", default_value_t = 1)]
    pub retries: u32,
    /// What is retried, comma-separated: connect-failure, refused-stream, reset (never
    /// reached the app: any method), 5xx, gateway-error, unavailable,
    /// resource-exhausted, or a status code (idempotent requests only).
    #[arg(
        long,
        env = "SWITCHYARD_RETRY_ON",
        default_value = "connect-failure,refused-stream,reset,gateway-error,unavailable"
    )]
    pub retry_on: String,
    /// Retries may add this share to the request rate (over 10 s) and to the requests
    /// in flight, in percent.
    #[arg(long, env = "SWITCHYARD_RETRY_BUDGET", default_value_t = 20)]
    pub retry_budget: u32,
    /// Retries allowed per second whatever the request rate (over 10 s).
    #[arg(long, env = "SWITCHYARD_MIN_RETRIES_PER_SECOND", default_value_t = 10)]
    pub min_retries_per_second: u32,
    /// Circuit breaker, per upstream service: most connections open to its endpoints
    /// (a request that needs another waits among --max-pending).
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: u32,
    /// Circuit breaker: most requests waiting for an upstream connection (503 with
    /// x-envoy-overloaded: true above it).
    #[arg(long, env = "SWITCHYARD_MAX_PENDING", default_value_t = 1024)]
    pub max_pending: u32,
    /// Circuit breaker: most requests in flight to one service (503 with
    /// x-envoy-overloaded: true above it).
    #[arg(long, env = "SWITCHYARD_MAX_REQUESTS", default_value_t = 1024)]
    pub max_requests: u32,
    /// Circuit breaker: most retries in flight to one service (at least; the retry
    /// budget's share of active requests may allow more).
    #[arg(long, env = "SWITCHYARD_MAX_RETRIES", default_value_t = 3)]
    pub max_retries: u32,
    /// Outlier ejection: consecutive failures (connect errors, timeouts, 5xx) that eject
    /// an endpoint of a service.
    #[arg(long, env = "SWITCHYARD_EJECT_AFTER", default_value_t = 5)]
    pub eject_after: u32,
    /// Most endpoints of a service ejected at once, in percent (at least one; 0: never
    /// eject).
    #[arg(long, env = "SWITCHYARD_MAX_EJECTION", default_value_t = 10)]
    pub max_ejection: u32,
    /// Panic mode: below this percentage of usable endpoints, balance over all of them
    /// (0: never; then 503 "no healthy upstream").
    #[arg(long, env = "SWITCHYARD_PANIC_BELOW", default_value_t = 50)]
    pub panic_below: u32,
    /// Slow start: a new endpoint (or one back from ejection or FAILING) ramps up its
    /// share over this window (0s: off).
    #[arg(long, env = "SWITCHYARD_SLOW_START", default_value = "0s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub slow_start: Duration,
    /// An upstream connection unused for this long is closed.
    #[arg(long, env = "SWITCHYARD_UPSTREAM_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub upstream_idle_timeout: Duration,
    /// Time a client has to send a request's headers (also the keep-alive wait between
    /// HTTP/1.1 requests); the connection is closed after it.
    #[arg(long, env = "SWITCHYARD_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub header_read_timeout: Duration,
    /// A client connection with no request in flight for this long is closed.
    #[arg(long, env = "SWITCHYARD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub idle_timeout: Duration,
    /// Client connections per HTTP listener; at the limit an idle one is closed to admit a
    /// new client (the oldest that never sent a whole request, else the one idle longest).
    #[arg(
        long,
        env = "SWITCHYARD_MAX_DOWNSTREAM_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_downstream_connections: usize,
    /// Local service to register (needs --port and --version).
    #[arg(long, env = "SWITCHYARD_SERVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Port of the local service.
    #[arg(long, env = "SWITCHYARD_PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Version tag of the local service.
    #[arg(long, env = "SWITCHYARD_VERSION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Address peers use to reach the local service.
    #[arg(long, env = "SWITCHYARD_ADDRESS", default_value = "127.0.0.1")]
    pub address: String,
    /// Instance id; default SERVICE-ADDRESS-PORT.
    #[arg(long, env = "SWITCHYARD_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Label of the local service, repeatable: KEY=VALUE (the variable holds one).
    #[arg(long = "label", env = "SWITCHYARD_LABEL", value_parser = super::parse_label)]
    #[serde(with = "config::pairs")]
    pub labels: Vec<(String, String)>,
    /// Load-balancing weight of the local service, 1-10000.
    #[arg(long, env = "SWITCHYARD_WEIGHT", default_value_t = 100)]
    pub weight: u32,
    /// Lease TTL of the local service.
    #[arg(long, env = "SWITCHYARD_TTL", default_value = "10s", value_parser = parse_ttl)]
    #[serde(with = "config::ttl")]
    pub ttl: u32,
    /// Health check: GET this path on the local port (2xx/3xx = healthy).
    #[arg(long, env = "SWITCHYARD_HEALTH_HTTP", conflicts_with_all = ["health_tcp", "health_grpc"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_http: Option<String>,
    /// Health check: TCP connect to the local port.
    #[arg(long, env = "SWITCHYARD_HEALTH_TCP", conflicts_with = "health_grpc")]
    pub health_tcp: bool,
    /// Health check: grpc.health.v1 Check on the local port.
    #[arg(long, env = "SWITCHYARD_HEALTH_GRPC")]
    pub health_grpc: bool,
    /// Time between health checks.
    #[arg(long, env = "SWITCHYARD_HEALTH_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub health_interval: Duration,
    /// Time a health check may take.
    #[arg(long, env = "SWITCHYARD_HEALTH_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub health_timeout: Duration,
    /// Consecutive passes to become healthy again.
    #[arg(long, env = "SWITCHYARD_HEALTHY_THRESHOLD", default_value_t = 2)]
    pub healthy_threshold: u32,
    /// Consecutive failures to be marked FAILING.
    #[arg(long, env = "SWITCHYARD_UNHEALTHY_THRESHOLD", default_value_t = 3)]
    pub unhealthy_threshold: u32,
    /// On SIGTERM: time between DRAINING and deregistration.
    #[arg(long, env = "SWITCHYARD_DRAIN", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub drain: Duration,
    /// Length of a per-version telemetry window sent to the registry (requests,
    /// errors, slow, latency per version, for `switchyard top`); 0s disables it.
    #[arg(long, env = "SWITCHYARD_TELEMETRY_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub telemetry_interval: Duration,
    /// An upstream attempt slower than this (to its response head) counts as slow.
    #[arg(long, env = "SWITCHYARD_SLOW_THRESHOLD", default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "config::duration")]
    pub slow_threshold: Duration,
    /// Proxy worker threads (0 = one per core, at most 64): each runs a
    /// single-threaded runtime with its own SO_REUSEPORT socket on every HTTP
    /// address and its own upstream connections; the first also runs discovery,
    /// admin, DNS and registration.
    #[arg(long, env = "SWITCHYARD_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// TOML file with any of the keys above.
    #[arg(long, env = "SWITCHYARD_SIDECAR_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

impl SidecarArgs {
    /// The flags' defaults, pointed at one registry (for `switchyard dev`). Environment
    /// variables are not read: dev's sidecar is configured by dev's own flags only.
    pub fn defaults(registry: &str) -> Result<Self, CliError> {
        use clap::{Command, FromArgMatches};
        let internal =
            |e: clap::Error| CliError::new(1, format!("internal: sidecar defaults: {e}"));
        let cmd = Self::augment_args(Command::new("switchyard-sidecar"))
            .mut_args(|a| a.env(None::<&str>));
        let matches = cmd
            .try_get_matches_from(["switchyard-sidecar"])
            .map_err(internal)?;
        let mut args = Self::from_arg_matches(&matches).map_err(internal)?;
        args.registry = vec![registry.to_string()];
        Ok(args)
    }

    /// The flags merged with `--config` (if any): the one place precedence is applied.
    pub fn resolve(self, matches: Option<&ArgMatches>) -> Result<Self, CliError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let mut merged = config::overlay_file(&self, matches, &path)?;
        merged.config = Some(path);
        Ok(merged)
    }
}

fn parse_upstream(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=LISTEN_ADDR (e.g. payments=127.0.0.1:9191)"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not a listen address: {e}"))?;
    Ok((name.to_string(), addr))
}

/// Builds the library config from the flags.
pub fn config(
    args: &SidecarArgs,
    transport: &switchyard_tls::Transport,
) -> Result<SidecarConfig, CliError> {
    let bad = |m: String| CliError::new(EXIT_CONFIG, m);
    let mut config = SidecarConfig::new(args.registry.clone());
    config.discovery.namespace = args.namespace.clone();
    config.discovery.cache_file = Some(args.cache_file.clone());
    for (i, p) in args.kv_prefixes.iter().enumerate() {
        switchyard_core::model::kv::validate_kv_prefix(&format!("--kv-prefix[{i}]"), p)
            .map_err(|e| bad(e.to_string()))?;
    }
    if args.kv_prefixes.len() > 64 {
        return Err(bad(format!(
            "--kv-prefix: {} given, at most 64",
            args.kv_prefixes.len()
        )));
    }
    config.discovery.kv_prefixes = args.kv_prefixes.clone();
    config.lb.choice_count = args.choice_count;
    config.lb.active_request_bias = args.active_request_bias;
    config.domain = args.domain.clone();
    config.dns.domain = args.domain.clone();
    config.connect_timeout = args.connect_timeout;
    let mut retry_on = Vec::new();
    for name in args.retry_on.split(',').filter(|n| !n.trim().is_empty()) {
        retry_on.push(RetryOn::parse(name).ok_or_else(|| {
            bad(format!(
                "--retry-on {name:?}: use connect-failure, refused-stream, reset, 5xx, \
                 gateway-error, unavailable, resource-exhausted or a status code"
            ))
        })?);
    }
    config.resilience = ResilienceSettings {
        timeout: args.request_timeout,
        per_try_timeout: (!args.per_try_timeout.is_zero()).then_some(args.per_try_timeout),
        retries: args.retries,
        retry_on,
        retry_budget_percent: args.retry_budget,
        min_retries_per_second: args.min_retries_per_second,
        max_connections: args.max_connections,
        max_pending: args.max_pending,
        max_requests: args.max_requests,
        max_retries: args.max_retries,
        slow_start: args.slow_start,
        eject_after: args.eject_after,
        max_ejection_percent: args.max_ejection,
        panic_below_percent: args.panic_below,
    };
    config.upstream_idle_timeout = args.upstream_idle_timeout;
    config.header_read_timeout = args.header_read_timeout;
    config.idle_timeout = args.idle_timeout;
    config.max_connections = args.max_downstream_connections;
    config.telemetry.interval = args.telemetry_interval;
    config.telemetry.slow_threshold = args.slow_threshold;
    if let Some(name) = &args.service {
        config.telemetry.sidecar_id = format!("{name}-{}", std::process::id());
    }
    if let Some(name) = &args.service {
        let port = args
            .port
            .ok_or_else(|| bad("--service needs --port".into()))?;
        let version = args
            .version
            .clone()
            .ok_or_else(|| bad("--service needs --version".into()))?;
        let probe_ip: IpAddr = "127.0.0.1"
            .parse()
            .map_err(|_| bad("internal: probe address".into()))?;
        let check = if let Some(path) = &args.health_http {
            if !path.starts_with('/') {
                return Err(bad(format!("--health-http {path:?} must start with /")));
            }
            Check::Http { path: path.clone() }
        } else if args.health_tcp {
            Check::Tcp
        } else if args.health_grpc {
            Check::Grpc
        } else {
            Check::None
        };
        config.mesh_identity = args.mesh_identity;
        config.app_tcp = args.app_protocol == AppProtocol::Tcp;
        config.registrar = Some(RegistrarConfig {
            token: None,
            transport: Default::default(),
            service: LocalService {
                namespace: args.namespace.clone(),
                name: name.clone(),
                id: args
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("{name}-{}-{port}", args.address)),
                address: args.address.clone(),
                port,
                version,
                labels: with_admin_port(&args.labels, args.admin),
                weight: args.weight,
                zone: String::new(),
                ttl_seconds: args.ttl,
                mesh_port: 0,
            },
            health: HealthConfig {
                check,
                interval: args.health_interval,
                timeout: args.health_timeout,
                healthy_threshold: args.healthy_threshold,
                unhealthy_threshold: args.unhealthy_threshold,
            },
            drain: args.drain,
            registries: args.registry.clone(),
            probe_target: SocketAddr::new(probe_ip, port),
        });
    }
    config
        .validate()
        .map_err(|e| bad(format!("invalid configuration: {e}")))?;
    for url in &args.registry {
        transport
            .check(url)
            .map_err(|e| bad(format!("--registry: {e}")))?;
    }
    config.set_transport(transport.clone());
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read --token-file {}: {e}", path.display())))?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(bad(format!(
                "--token-file {} is empty: put the secret `switchyard acl token create` printed in it",
                path.display()
            )));
        }
        config.set_token(Some(secret.to_string()));
    }
    Ok(config)
}

/// The proxy workers `--worker-threads` asks for (0: one per core).
pub fn proxy_workers(args: &SidecarArgs) -> usize {
    match args.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(switchyard_sidecar::workers::MAX_WORKERS)
}

/// Binds one `SO_REUSEPORT` socket per proxy worker on `addr`: the first worker's as
/// a tokio listener, the others' to be taken by their own runtimes.
fn bind_http(
    addr: SocketAddr,
    workers: usize,
    what: &str,
) -> Result<(TcpListener, Vec<std::net::TcpListener>), CliError> {
    let failed = |e| cannot_listen(addr, what, e);
    let mut group = switchyard_sidecar::workers::bind_group(addr, workers)
        .map_err(failed)?
        .into_iter();
    let first = group
        .next()
        .ok_or_else(|| failed(std::io::Error::other("no socket bound")))?;
    Ok((
        TcpListener::from_std(first).map_err(failed)?,
        group.collect(),
    ))
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| cannot_listen(addr, what, e))
}

fn cannot_listen(addr: SocketAddr, what: &str, e: std::io::Error) -> CliError {
    CliError::new(
        EXIT_CONFIG,
        format!("cannot listen on {addr} ({what}): {e}; pick another address"),
    )
}

/// What the local app speaks (`--app-protocol`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    #[default]
    Http,
    Tcp,
}

/// The mesh inbound port (DESIGN.md's 15006).
const INBOUND_PORT: u16 = 15006;

/// Where `--inbound auto` listens: every interface in a pod or when peers reach the
/// instance at a non-loopback `address`, else loopback (peers dial --address).
fn auto_inbound(in_pod: bool, address: &str) -> SocketAddr {
    if in_pod || !is_loopback(address) {
        SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT))
    } else {
        SocketAddr::from(([127, 0, 0, 1], INBOUND_PORT))
    }
}

/// Whether peers reaching `address` (an IP literal or a hostname) stay on this host.
fn is_loopback(address: &str) -> bool {
    address == "localhost"
        || address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Inside a Kubernetes pod (the kubelet sets this for every container).
fn in_pod() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// `off` (or empty) disables a listener; anything else is a listen address.
fn optional_addr(value: &str, flag: &str) -> Result<Option<SocketAddr>, CliError> {
    match value {
        "off" | "" => Ok(None),
        a => a.parse().map(Some).map_err(|e| {
            CliError::new(
                EXIT_CONFIG,
                format!("invalid {flag} {a:?}: {e} (HOST:PORT or off)"),
            )
        }),
    }
}

/// Binds every listener the flags ask for and starts the sidecar. Every address is
/// parsed before the first socket is bound.
pub async fn start(args: &SidecarArgs, config: SidecarConfig) -> Result<SidecarHandle, CliError> {
    let http_proxy_addr = optional_addr(&args.http_proxy, "--http-proxy")?;
    let dns_addr = optional_addr(&args.dns, "--dns")?;
    let meshable = args.service.is_some() && args.mesh_identity;
    let inbound_auto = args.inbound == "auto";
    let inbound_addr = if inbound_auto {
        meshable.then(|| auto_inbound(in_pod(), &args.address))
    } else {
        optional_addr(&args.inbound, "--inbound")?
    };
    if inbound_addr.is_some() && !meshable {
        return Err(CliError::new(
            EXIT_CONFIG,
            "--inbound needs --service (the app it forwards to) and --mesh-identity (the certificate it serves)",
        ));
    }
    let n = proxy_workers(args);
    let mut workers: Vec<WorkerListeners> = (1..n).map(|_| WorkerListeners::default()).collect();
    let http_proxy = match http_proxy_addr {
        Some(addr) => {
            let (first, rest) = bind_http(addr, n, "--http-proxy")?;
            for (w, l) in workers.iter_mut().zip(rest) {
                w.http_proxy = Some(l);
            }
            Some(first)
        }
        None => None,
    };
    let mut upstreams = Vec::new();
    for (name, addr) in &args.upstreams {
        upstreams.push((name.clone(), bind(*addr, "--upstream").await?));
    }
    let mut http_upstreams = Vec::new();
    for (name, addr) in &args.http_upstreams {
        let (first, rest) = bind_http(*addr, n, "--http-upstream")?;
        for (w, l) in workers.iter_mut().zip(rest) {
            w.http_upstreams.push((name.clone(), l));
        }
        http_upstreams.push((name.clone(), first));
    }
    let dns = match dns_addr {
        Some(addr) => Some(switchyard_core::dns::bind(addr).await.map_err(|e| {
            CliError::new(
                EXIT_CONFIG,
                format!("cannot listen on {addr} (--dns): {e}; pick another address or --dns off"),
            )
        })?),
        None => None,
    };
    let listeners = SidecarListeners {
        workers,
        dns,
        admin: bind(args.admin, "--admin").await?,
        http_proxy,
        upstreams,
        http_upstreams,
        inbound: match inbound_addr {
            // Outside a pod several sidecars may share the host: the registered mesh
            // port is whatever was bound, so a free one serves as well.
            Some(a) if inbound_auto && a.ip().is_loopback() => {
                match tokio::net::TcpListener::bind(a).await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::info!(error = %e, "the mesh inbound port {a} is taken; using a free port (--inbound picks one)");
                        Some(bind(SocketAddr::new(a.ip(), 0), "--inbound").await?)
                    }
                }
            }
            Some(a) => Some(bind(a, "--inbound").await?),
            None => None,
        },
    };
    switchyard_sidecar::start(config, listeners)
        .await
        .map_err(|e| CliError::new(EXIT_CONFIG, e))
}

/// Runs the sidecar with flags already merged with `--config` ([`SidecarArgs::resolve`]).
/// Runs the sidecar; `token` is the global --token, used when no --token-file is given.
pub async fn run(args: SidecarArgs, token: Option<String>) -> Result<(), CliError> {
    let stop = shutdown_signal();
    let mut config = config(&args, &super::client::transport())?;
    if args.token_file.is_none() && token.is_some() {
        config.set_token(token);
    }
    let handle = start(&args, config).await?;
    stop.await;
    tracing::info!("shutting down: draining the local service, finishing in-flight requests");
    handle.shutdown().await;
    Ok(())
}

fn yes() -> bool {
    true
}

fn auto() -> String {
    "auto".into()
}

/// The sidecar's default cache file, in a state directory (see `--cache-file`).
fn default_cache_file() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = var("STATE_DIRECTORY")
        .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("switchyard")))
        .or_else(|| var("HOME").map(|h| h.join(".local/state/switchyard")))
        .unwrap_or_else(|| std::env::temp_dir().join("switchyard"));
    dir.join("sidecar-catalog.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_inbound_listens_where_peers_dial() {
        let any = SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT));
        let local = SocketAddr::from(([127, 0, 0, 1], INBOUND_PORT));
        assert_eq!(
            auto_inbound(true, "127.0.0.1"),
            any,
            "a pod: every interface"
        );
        assert_eq!(auto_inbound(false, "127.0.0.1"), local);
        assert_eq!(auto_inbound(false, "::1"), local);
        assert_eq!(auto_inbound(false, "localhost"), local);
        assert_eq!(auto_inbound(false, "10.0.0.5"), any, "peers dial 10.0.0.5");
        assert_eq!(
            auto_inbound(false, "web-v1"),
            any,
            "a hostname: another host"
        );
    }
}

/// The instance's labels, plus `sidecar-admin-port` when the admin listener (its
/// `/metrics`) is reachable from other hosts, so Prometheus finds the sidecar through
/// the registry's `/v1/prometheus/sd`.
fn with_admin_port(
    labels: &[(String, String)],
    admin: SocketAddr,
) -> std::collections::BTreeMap<String, String> {
    let mut out: std::collections::BTreeMap<String, String> = labels.iter().cloned().collect();
    if !admin.ip().is_loopback() && admin.port() != 0 {
        out.entry(switchyard_registry::http::prometheus_sd::SIDECAR_ADMIN_PORT_LABEL.to_string())
            .or_insert_with(|| admin.port().to_string());
    }
    out
}

#[cfg(test)]
mod admin_port_tests {
    use super::*;

    #[test]
    fn a_reachable_admin_port_is_labelled_for_prometheus_discovery() {
        let labels = vec![("team".to_string(), "blue".to_string())];
        let open = with_admin_port(&labels, "0.0.0.0:15000".parse().expect("addr"));
        assert_eq!(open["sidecar-admin-port"], "15000");
        assert_eq!(open["team"], "blue");
        let local = with_admin_port(&labels, "127.0.0.1:15000".parse().expect("addr"));
        assert!(!local.contains_key("sidecar-admin-port"));
    }
}
