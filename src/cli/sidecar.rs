//! `switchyard sidecar`: the per-service proxy, registrar and catalog cache.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::Deserialize;
use switchyard_sidecar::health::{Check, HealthConfig};
use switchyard_sidecar::{
    LocalService, RegistrarConfig, SidecarConfig, SidecarHandle, SidecarListeners,
};
use tokio::net::TcpListener;

use super::register::parse_ttl;
use super::{shutdown_signal, CliError, EXIT_CONFIG};

/// Flags of `switchyard sidecar`. Each also has a TOML key of the same name (with `_`)
/// in `--config`; a flag or environment variable wins over the file, which wins over the
/// default.
#[derive(Args, Debug, Clone)]
pub struct SidecarArgs {
    /// Registry gRPC URLs, comma-separated; the sidecar fails over between them.
    #[arg(
        long,
        env = "SWITCHYARD_REGISTRY",
        default_value = "http://127.0.0.1:7400",
        value_delimiter = ','
    )]
    pub registry: Vec<String>,
    /// Admin HTTP address: /ready, /metrics, /endpoints.
    #[arg(long, env = "SWITCHYARD_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// HTTP proxy address (HTTP/1.1 and h2c; routes by Host). "off" disables it.
    #[arg(long, env = "SWITCHYARD_HTTP_PROXY", default_value = "127.0.0.1:15001")]
    pub http_proxy: String,
    /// DNS address, UDP and TCP, answering from the cached catalog ("off" disables).
    #[arg(
        long,
        env = "SWITCHYARD_SIDECAR_DNS",
        default_value = "127.0.0.1:15053"
    )]
    pub dns: String,
    /// TCP upstream listener, repeatable: NAME=LISTEN_ADDR, e.g. payments=127.0.0.1:9191.
    #[arg(long = "upstream", value_parser = parse_upstream)]
    pub upstreams: Vec<(String, SocketAddr)>,
    /// HTTP upstream listener, repeatable: NAME=LISTEN_ADDR (no Host header needed).
    #[arg(long = "http-upstream", value_parser = parse_upstream)]
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
    #[arg(long, default_value = "switchyard")]
    pub domain: String,
    /// Where the last catalog is kept, so a restart without a registry still routes.
    #[arg(
        long,
        env = "SWITCHYARD_CACHE_FILE",
        default_value = "switchyard-sidecar-catalog.json"
    )]
    pub cache_file: PathBuf,
    /// Endpoints sampled per pick when weights are equal (power of two choices = 2).
    #[arg(long, default_value_t = 2)]
    pub choice_count: u32,
    /// Exponent on in-flight requests when weights differ: weight / (active + 1)^bias.
    #[arg(long, default_value_t = 1.0)]
    pub active_request_bias: f64,
    /// Upstream connect timeout.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Time an upstream has to send response headers (504 after).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Local service to register (needs --port and --version).
    #[arg(long)]
    pub service: Option<String>,
    /// Port of the local service.
    #[arg(long)]
    pub port: Option<u16>,
    /// Version tag of the local service.
    #[arg(long)]
    pub version: Option<String>,
    /// Address peers use to reach the local service.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    /// Instance id; default SERVICE-ADDRESS-PORT.
    #[arg(long)]
    pub id: Option<String>,
    /// Label of the local service, repeatable: KEY=VALUE.
    #[arg(long = "label", value_parser = super::parse_label)]
    pub labels: Vec<(String, String)>,
    /// Load-balancing weight of the local service, 1-10000.
    #[arg(long, default_value_t = 100)]
    pub weight: u32,
    /// Lease TTL of the local service.
    #[arg(long, default_value = "10s", value_parser = parse_ttl)]
    pub ttl: u32,
    /// Health check: GET this path on the local port (2xx/3xx = healthy).
    #[arg(long, conflicts_with_all = ["health_tcp", "health_grpc"])]
    pub health_http: Option<String>,
    /// Health check: TCP connect to the local port.
    #[arg(long, conflicts_with = "health_grpc")]
    pub health_tcp: bool,
    /// Health check: grpc.health.v1 Check on the local port.
    #[arg(long)]
    pub health_grpc: bool,
    /// Time between health checks.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Time a health check may take.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub health_timeout: Duration,
    /// Consecutive passes to become healthy again.
    #[arg(long, default_value_t = 2)]
    pub healthy_threshold: u32,
    /// Consecutive failures to be marked FAILING.
    #[arg(long, default_value_t = 3)]
    pub unhealthy_threshold: u32,
    /// On SIGTERM: time between DRAINING and deregistration.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Tokio worker threads (0 = one per core).
    #[arg(long, env = "SWITCHYARD_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// TOML file with any of the keys above.
    #[arg(long, env = "SWITCHYARD_SIDECAR_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The keys `--config` may hold.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct SidecarFile {
    registry: Option<Vec<String>>,
    admin: Option<SocketAddr>,
    http_proxy: Option<String>,
    dns: Option<String>,
    upstreams: Option<BTreeMap<String, SocketAddr>>,
    http_upstreams: Option<BTreeMap<String, SocketAddr>>,
    namespace: Option<String>,
    domain: Option<String>,
    cache_file: Option<PathBuf>,
    choice_count: Option<u32>,
    active_request_bias: Option<f64>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    service: Option<String>,
    port: Option<u16>,
    version: Option<String>,
    address: Option<String>,
    id: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    weight: Option<u32>,
    ttl: Option<String>,
    health_http: Option<String>,
    health_tcp: Option<bool>,
    health_grpc: Option<bool>,
    health_interval: Option<String>,
    health_timeout: Option<String>,
    healthy_threshold: Option<u32>,
    unhealthy_threshold: Option<u32>,
    drain: Option<String>,
    worker_threads: Option<usize>,
}

impl SidecarArgs {
    /// The flags' defaults, pointed at one registry (for `switchyard dev`).
    pub fn defaults(registry: &str) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: SidecarArgs,
        }
        let mut args = Wrapper::parse_from(["switchyard-sidecar"]).args;
        args.registry = vec![registry.to_string()];
        args
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

/// Parses `250ms`, `5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 250ms, 5s or 2m");
    if let Some(n) = s.strip_suffix("ms") {
        return n.parse().map(Duration::from_millis).map_err(|_| bad());
    }
    let (n, mult) = match (s.strip_suffix('s'), s.strip_suffix('m')) {
        (Some(n), _) => (n, 1),
        (_, Some(n)) => (n, 60),
        _ => (s, 1),
    };
    let n: u64 = n.parse().map_err(|_| bad())?;
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

fn read_file(path: &Path) -> Result<SidecarFile, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::new(
            EXIT_CONFIG,
            format!("cannot read --config {}: {e}", path.display()),
        )
    })?;
    toml::from_str(&text).map_err(|e| {
        CliError::new(
            EXIT_CONFIG,
            format!("invalid --config {}: {e}", path.display()),
        )
    })
}

fn merge(
    args: &mut SidecarArgs,
    file: SidecarFile,
    matches: Option<&ArgMatches>,
) -> Result<(), CliError> {
    let defaulted = |id: &str| {
        matches.is_none_or(|m| matches!(m.value_source(id), Some(ValueSource::DefaultValue) | None))
    };
    let dur = |key: &str, v: String| {
        parse_duration(&v)
            .map_err(|e| CliError::new(EXIT_CONFIG, format!("invalid {key} in --config: {e}")))
    };
    macro_rules! take {
        ($($field:ident),*) => {$(
            if let Some(v) = file.$field {
                if defaulted(stringify!($field)) {
                    args.$field = v;
                }
            }
        )*};
    }
    macro_rules! take_some {
        ($($field:ident),*) => {$(
            if let Some(v) = file.$field {
                if defaulted(stringify!($field)) {
                    args.$field = Some(v);
                }
            }
        )*};
    }
    take!(
        registry,
        admin,
        http_proxy,
        dns,
        namespace,
        domain,
        cache_file,
        choice_count,
        active_request_bias,
        address,
        weight,
        health_tcp,
        health_grpc,
        healthy_threshold,
        unhealthy_threshold,
        worker_threads
    );
    take_some!(service, port, version, id, health_http);
    if let Some(v) = file.upstreams {
        if defaulted("upstreams") {
            args.upstreams = v.into_iter().collect();
        }
    }
    if let Some(v) = file.http_upstreams {
        if defaulted("http_upstreams") {
            args.http_upstreams = v.into_iter().collect();
        }
    }
    if let Some(v) = file.labels {
        if defaulted("labels") {
            args.labels = v.into_iter().collect();
        }
    }
    macro_rules! take_dur {
        ($($field:ident),*) => {$(
            if let Some(v) = file.$field {
                if defaulted(stringify!($field)) {
                    args.$field = dur(stringify!($field), v)?;
                }
            }
        )*};
    }
    take_dur!(
        connect_timeout,
        request_timeout,
        health_interval,
        health_timeout,
        drain
    );
    if let Some(v) = file.ttl {
        if defaulted("ttl") {
            args.ttl = parse_ttl(&v)
                .map_err(|e| CliError::new(EXIT_CONFIG, format!("invalid ttl in --config: {e}")))?;
        }
    }
    Ok(())
}

/// Reads `--config` (if any) into the flags the user left at their defaults.
pub fn resolve(
    mut args: SidecarArgs,
    matches: Option<&ArgMatches>,
) -> Result<SidecarArgs, CliError> {
    if let Some(path) = args.config.clone() {
        let file = read_file(&path)?;
        merge(&mut args, file, matches)?;
    }
    Ok(args)
}

/// Builds the library config from the flags.
pub fn config(args: &SidecarArgs) -> Result<SidecarConfig, CliError> {
    let bad = |m: String| CliError::new(EXIT_CONFIG, m);
    let mut config = SidecarConfig::new(args.registry.clone());
    config.discovery.namespace = args.namespace.clone();
    config.discovery.cache_file = Some(args.cache_file.clone());
    config.lb.choice_count = args.choice_count;
    config.lb.active_request_bias = args.active_request_bias;
    config.domain = args.domain.clone();
    config.dns.domain = args.domain.clone();
    config.connect_timeout = args.connect_timeout;
    config.request_timeout = args.request_timeout;
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
        config.registrar = Some(RegistrarConfig {
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
                labels: args.labels.iter().cloned().collect(),
                weight: args.weight,
                zone: String::new(),
                ttl_seconds: args.ttl,
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
    Ok(config)
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr).await.map_err(|e| {
        CliError::new(
            EXIT_CONFIG,
            format!("cannot listen on {addr} ({what}): {e}; pick another address"),
        )
    })
}

/// Binds every listener the flags ask for and starts the sidecar.
pub async fn start(args: &SidecarArgs, config: SidecarConfig) -> Result<SidecarHandle, CliError> {
    let http_proxy = match args.http_proxy.as_str() {
        "off" | "" => None,
        a => {
            let addr: SocketAddr = a.parse().map_err(|e| {
                CliError::new(EXIT_CONFIG, format!("invalid --http-proxy {a:?}: {e}"))
            })?;
            Some(bind(addr, "--http-proxy").await?)
        }
    };
    let mut upstreams = Vec::new();
    for (name, addr) in &args.upstreams {
        upstreams.push((name.clone(), bind(*addr, "--upstream").await?));
    }
    let mut http_upstreams = Vec::new();
    for (name, addr) in &args.http_upstreams {
        http_upstreams.push((name.clone(), bind(*addr, "--http-upstream").await?));
    }
    let dns = match args.dns.as_str() {
        "off" | "" => None,
        a => {
            let addr: SocketAddr = a.parse().map_err(|e| {
                CliError::new(
                    EXIT_CONFIG,
                    format!("invalid --dns {a:?}: {e} (HOST:PORT or off)"),
                )
            })?;
            Some(switchyard_core::dns::bind(addr).await.map_err(|e| {
                CliError::new(
                    EXIT_CONFIG,
                    format!(
                        "cannot listen on {addr} (--dns): {e}; pick another address or --dns off"
                    ),
                )
            })?)
        }
    };
    let listeners = SidecarListeners {
        dns,
        admin: bind(args.admin, "--admin").await?,
        http_proxy,
        upstreams,
        http_upstreams,
    };
    switchyard_sidecar::start(config, listeners)
        .await
        .map_err(|e| CliError::new(EXIT_CONFIG, e))
}

pub async fn run(args: SidecarArgs, matches: Option<&ArgMatches>) -> Result<(), CliError> {
    let stop = shutdown_signal();
    let args = resolve(args, matches)?;
    let config = config(&args)?;
    let handle = start(&args, config).await?;
    stop.await;
    tracing::info!("shutting down: draining the local service, finishing in-flight requests");
    handle.shutdown().await;
    Ok(())
}
