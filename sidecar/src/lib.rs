//! The Switchyard sidecar as a library.
//!
//! A tour, from the leaves up (each module imports only those before it):
//! - [`latency`]: the request-latency histogram, atomic buckets instead of a mutex.
//! - [`metrics`]: Prometheus handles; per-endpoint ones are made on first use.
//! - [`outlier`] and [`slow_start`]: the rules of ejection (the cap, the
//!   failure-percentage check) and of the slow-start ramp, apart from where they run.
//! - [`endpoint`]: an endpoint is the shared `Arc<Instance>` plus the live state
//!   (in-flight counts, ejection and probation, slow start) that survives every
//!   catalog update.
//! - [`balance`]: least request (power of two choices, or weighted by
//!   `weight / (active + 1)^bias`) over a [`balance::Pool`] of usable endpoints,
//!   passing over ejected ones, with panic mode and slow start.
//! - [`route`]: header matches and per-subset pools over `switchyard_core::select`,
//!   which decides subsets, splits and sticky hashing (the code DNS uses too).
//! - [`resilience`] and [`limits`]: each service's timeouts, retry conditions and
//!   circuit-breaker limits, resolved once per update, and the atomic counters and
//!   retry budget that outlive updates.
//! - [`table`]: per-service immutable views swapped atomically; readers never lock.
//! - [`error`]: why the sidecar answered a request itself, which side failed and
//!   whether a retry is safe, mapped to HTTP in one place.
//! - Then what reads the table: [`discovery`] (one `Watch` stream: reconnect,
//!   failover, resume, disk cache), [`proxy`] (HTTP/1.1 + h2c by Host or fixed
//!   upstream, and TCP upstream listeners; its HTTP listeners run on every proxy worker
//!   of [`workers`], a single-threaded runtime and `SO_REUSEPORT` socket each), [`admin`] (`/ready`, `/metrics`,
//!   `/endpoints`, `/explain`, and [`ofrep`]: feature flags evaluated from the watched
//!   flag document) and [`dns`] (the core DNS answers over the table).
//! - Beside them: [`registrar`] and [`health`] register the local service, probe it
//!   and drain it; [`sweep`] runs the failure-percentage check every interval;
//!   [`telemetry`] counts every upstream attempt per (service, version) of the
//!   endpoint that answered and reports the deltas to the registry per window.
//!
//! [`start`] takes a config and listeners bound by the caller and returns a handle with
//! the real addresses and a graceful `shutdown` (drain, deregister, finish in-flight).

pub mod admin;
pub mod balance;
pub mod discovery;
pub mod dns;
pub mod endpoint;
pub mod error;
pub mod health;
pub mod identity;
pub mod inbound;
pub mod latency;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod ofrep;
pub mod outlier;
pub mod proxy;
pub mod registrar;
pub mod resilience;
pub mod route;
pub mod slow_start;
pub mod sweep;
pub mod table;
pub mod telemetry;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::model::resilience::ResilienceSettings;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use balance::LbConfig;
pub use discovery::DiscoveryConfig;

/// `msg` with `authorization: Bearer <token>` when the sidecar has an ACL token (the
/// registry needs one once ACLs are bootstrapped). The secret is never logged.
pub(crate) fn authorized<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(value) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
        req.metadata_mut().insert("authorization", value);
    }
    req
}
pub use registrar::{LocalService, RegistrarConfig};
pub use table::EndpointTable;

use metrics::Metrics;
use proxy::ProxyCtx;

/// How a sidecar behaves. Listeners are bound by the caller.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    pub discovery: DiscoveryConfig,
    pub lb: LbConfig,
    /// DNS domain for Host matching (`payments.service.<domain>`).
    pub domain: String,
    pub connect_timeout: Duration,
    /// Timeouts, retries, retry budget and circuit-breaker limits for every service
    /// whose policy does not override them (`resilience.timeout` is the request
    /// timeout: it bounds every attempt of a request together).
    pub resilience: ResilienceSettings,
    /// Outlier timing: how often the failure-percentage check runs and how long an
    /// ejection lasts (how eagerly to eject is per service, in `resilience`).
    pub outlier: outlier::OutlierConfig,
    /// An upstream connection unused this long is closed (below the usual server
    /// keep-alive timeouts, so the sidecar closes first rather than reusing a
    /// connection the server is closing).
    pub upstream_idle_timeout: Duration,
    /// HTTP proxy: time a caller has to send a request head (HTTP/1; counted from
    /// accept and from the end of each request, so also between kept-alive requests).
    pub header_read_timeout: Duration,
    /// HTTP proxy: a downstream connection with no request in flight this long is
    /// closed (HTTP/1 and HTTP/2).
    pub idle_timeout: Duration,
    /// HTTP proxy: most downstream connections per listener; at the limit an idle one
    /// is closed to admit a new one (first the oldest that never sent a whole request).
    pub max_connections: usize,
    /// The local service to register, if any.
    pub registrar: Option<RegistrarConfig>,
    /// DNS zone and TTL (served when `SidecarListeners::dns` is given).
    pub dns: switchyard_core::dns::DnsConfig,
    /// Per-version reports to the registry (window, slow threshold).
    pub telemetry: telemetry::TelemetryConfig,
    /// Get and renew a mesh certificate for the registered service (needs `registrar`).
    pub mesh_identity: bool,
    /// The local app speaks TCP, not HTTP: the inbound port copies mesh connections'
    /// bytes to it (and takes no HTTP); with false it takes HTTP only.
    pub app_tcp: bool,
}

impl SidecarConfig {
    /// Sends `token` (an ACL token's secret) with every call to the registry: watch,
    /// registration and telemetry.
    pub fn set_token(&mut self, token: Option<String>) {
        self.discovery.token.clone_from(&token);
        self.telemetry.token.clone_from(&token);
        if let Some(r) = &mut self.registrar {
            r.token = token;
        }
    }

    /// Reaches the registries over `transport` (TLS when they are `https://`).
    pub fn set_transport(&mut self, transport: switchyard_tls::Transport) {
        self.discovery.transport = transport.clone();
        self.telemetry.transport = transport.clone();
        if let Some(r) = &mut self.registrar {
            r.transport = transport;
        }
    }

    pub fn new(registries: Vec<String>) -> Self {
        Self {
            discovery: DiscoveryConfig {
                token: None,
                transport: switchyard_tls::Transport::plain(),
                registries,
                namespace: "default".into(),
                cache_file: None,
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(10),
                kv_prefixes: Vec::new(),
            },
            lb: LbConfig::default(),
            domain: "switchyard".into(),
            connect_timeout: Duration::from_secs(1),
            resilience: ResilienceSettings::default(),
            outlier: outlier::OutlierConfig::default(),
            upstream_idle_timeout: proxy::http::UPSTREAM_IDLE_TIMEOUT,
            header_read_timeout: proxy::http::HEADER_READ_TIMEOUT,
            idle_timeout: proxy::http::IDLE_TIMEOUT,
            max_connections: proxy::http::MAX_CONNECTIONS,
            registrar: None,
            dns: switchyard_core::dns::DnsConfig::default(),
            telemetry: telemetry::TelemetryConfig::default(),
            mesh_identity: false,
            app_tcp: false,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.discovery.registries.is_empty() {
            return Err("at least one --registry URL is needed".into());
        }
        for r in &self.discovery.registries {
            if !(r.starts_with("http://") || r.starts_with("https://")) {
                return Err(format!(
                    "registry {r:?} must be a URL like http://127.0.0.1:7400"
                ));
            }
        }
        self.lb.validate()?;
        self.outlier.validate()?;
        self.dns.validate()?;
        switchyard_core::model::resilience::validate_resilience(&self.resilience.as_overrides())
            .map_err(|e| {
                format!(
                    "{}: {}",
                    e.field.trim_start_matches("policy.resilience."),
                    e.reason
                )
            })?;
        if self.connect_timeout.is_zero()
            || self.upstream_idle_timeout.is_zero()
            || self.header_read_timeout.is_zero()
            || self.idle_timeout.is_zero()
        {
            return Err("timeouts must be above zero".into());
        }
        if self.telemetry.interval > Duration::from_secs(3600)
            || (!self.telemetry.interval.is_zero()
                && self.telemetry.interval < Duration::from_millis(100))
        {
            return Err("--telemetry-interval must be 0s (off) or 100ms-1h".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if let Some(r) = &self.registrar {
            if r.service.port == 0 {
                return Err("--port must be 1-65535".into());
            }
            if !(1..=3600).contains(&r.service.ttl_seconds) {
                return Err("--ttl must be 1s-1h".into());
            }
        }
        Ok(())
    }
}

/// Sockets the sidecar serves on.
pub struct SidecarListeners {
    pub admin: TcpListener,
    pub http_proxy: Option<TcpListener>,
    /// `(service, listener)`: TCP, one endpoint per connection.
    pub upstreams: Vec<(String, TcpListener)>,
    /// `(service, listener)`: HTTP, balanced per request, no Host needed.
    pub http_upstreams: Vec<(String, TcpListener)>,
    /// UDP socket and TCP listener for DNS (same port), if DNS is served.
    pub dns: Option<(tokio::net::UdpSocket, TcpListener)>,
    /// The mesh inbound port (mTLS from other sidecars to the local app); served only
    /// with a registrar and `mesh_identity`.
    pub inbound: Option<TcpListener>,
    /// One entry per proxy worker after the first (`--worker-threads`): its own
    /// `SO_REUSEPORT` sockets on the HTTP addresses above ([`workers`]).
    pub workers: Vec<workers::WorkerListeners>,
}

/// A running sidecar.
pub struct SidecarHandle {
    pub admin_addr: SocketAddr,
    pub http_proxy_addr: Option<SocketAddr>,
    pub upstream_addrs: Vec<(String, SocketAddr)>,
    pub http_upstream_addrs: Vec<(String, SocketAddr)>,
    /// The DNS port (UDP and TCP), when served.
    pub dns_addr: Option<SocketAddr>,
    /// The mesh inbound port, when served.
    pub inbound_addr: Option<SocketAddr>,
    pub table: Arc<EndpointTable>,
    /// The mesh certificate (empty until the registry issued one).
    pub identity: Arc<identity::MeshIdentity>,
    registrar_stop: watch::Sender<bool>,
    registrar: Option<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The telemetry reporter stops last, after the proxies drained, so its final
    /// window holds their last attempts.
    telemetry_stop: watch::Sender<bool>,
    telemetry: Option<JoinHandle<()>>,
}

impl SidecarHandle {
    /// Drains the local service (DRAINING, drain period, deregister), then stops the
    /// listeners, letting in-flight requests finish, and writes the catalog cache.
    pub async fn shutdown(mut self) {
        let _ = self.registrar_stop.send(true);
        if let Some(r) = self.registrar.take() {
            let _ = r.await;
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let _ = self.telemetry_stop.send(true);
        if let Some(t) = self.telemetry.take() {
            let _ = t.await;
        }
        tracing::info!("sidecar stopped");
    }
}

/// Resolves once the flag is set. Returns `()` rather than tokio's borrow guard, so it
/// can sit in a `select!` whose other arms `.await` (the guard is not `Send`).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn addr(l: &TcpListener) -> std::io::Result<SocketAddr> {
    l.local_addr()
}

/// Starts every part of the sidecar on the given listeners.
pub async fn start(
    config: SidecarConfig,
    listeners: SidecarListeners,
) -> Result<SidecarHandle, String> {
    config.validate()?;
    let table =
        Arc::new(EndpointTable::new(config.resilience.clone()).with_outlier(config.outlier));
    let metrics = Arc::new(Metrics::default());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (registrar_stop, registrar_rx) = watch::channel(false);

    let catalog = discovery::load_cache(&config.discovery, &table, &metrics);
    let recorder = Arc::new(
        telemetry::Recorder::new(&config.discovery.namespace, config.telemetry.slow_threshold)
            .with_dropped_counter(metrics.telemetry_dropped("keys")),
    );
    let (telemetry_stop, telemetry_rx) = watch::channel(false);
    let mut ctx = ProxyCtx::new(
        table.clone(),
        metrics.clone(),
        config.lb,
        &config.domain,
        config.connect_timeout,
        config.upstream_idle_timeout,
        proxy::http::ConnLimits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
        },
    );
    ctx.telemetry = recorder.clone();
    let mesh_identity = Arc::new(identity::MeshIdentity::default());
    let in_mesh = config.mesh_identity && config.registrar.is_some();
    if in_mesh {
        ctx.mesh = Some(Arc::new(mesh::MeshClient::new(
            mesh_identity.clone(),
            &config.discovery.namespace,
        )));
    }
    if listeners.workers.len() >= workers::MAX_WORKERS {
        return Err(format!(
            "{} proxy workers asked for; at most {} (--worker-threads)",
            listeners.workers.len() + 1,
            workers::MAX_WORKERS
        ));
    }
    ctx.workers = 1 + listeners.workers.len();
    let ctx = Arc::new(ctx);
    let admin_addr = addr(&listeners.admin).map_err(|e| e.to_string())?;
    let http_proxy_addr = match &listeners.http_proxy {
        Some(l) => Some(addr(l).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut upstream_addrs = Vec::new();
    let mut http_upstream_addrs = Vec::new();

    let mut tasks = vec![
        tokio::spawn(discovery::run(
            config.discovery.clone(),
            table.clone(),
            metrics.clone(),
            catalog,
            shutdown_rx.clone(),
        )),
        tokio::spawn(sweep::run(
            table.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(admin::serve(
            listeners.admin,
            table.clone(),
            metrics.clone(),
            config.registrar.as_ref().map(|r| {
                Arc::new(ofrep::facts(
                    &r.service.name,
                    &r.service.version,
                    &r.service.zone,
                ))
            }),
            shutdown_rx.clone(),
        )),
    ];
    if let Some(l) = listeners.http_proxy {
        tasks.push(tokio::spawn(proxy::http::serve(
            l,
            ctx.clone(),
            proxy::http::ServiceBy::Host,
            shutdown_rx.clone(),
        )));
    }
    for (service, l) in listeners.http_upstreams {
        http_upstream_addrs.push((service.clone(), addr(&l).map_err(|e| e.to_string())?));
        tasks.push(tokio::spawn(proxy::http::serve(
            l,
            ctx.clone(),
            proxy::http::ServiceBy::Fixed(service.into()),
            shutdown_rx.clone(),
        )));
    }
    for (i, w) in listeners.workers.into_iter().enumerate() {
        tasks.push(workers::spawn(i + 1, w, ctx.clone(), shutdown_rx.clone())?);
    }
    for (service, l) in listeners.upstreams {
        upstream_addrs.push((service.clone(), addr(&l).map_err(|e| e.to_string())?));
        tasks.push(tokio::spawn(proxy::tcp::serve(
            l,
            ctx.clone(),
            service.into(),
            shutdown_rx.clone(),
        )));
    }
    let dns_addr = match &listeners.dns {
        Some((udp, _)) => Some(udp.local_addr().map_err(|e| e.to_string())?),
        None => None,
    };
    if let Some((udp, tcp)) = listeners.dns {
        let handler = switchyard_core::dns::DnsHandler::new(
            dns::TableSource {
                table: table.clone(),
                namespace: config.discovery.namespace.clone(),
            },
            &config.dns,
        )?;
        tasks.push(tokio::spawn(switchyard_core::dns::serve(
            handler,
            udp,
            tcp,
            shutdown_rx.clone(),
        )));
    }
    let telemetry = Some(tokio::spawn(telemetry::run(
        config.telemetry.clone(),
        config.discovery.registries.clone(),
        recorder,
        metrics.telemetry_dropped("unsent"),
        telemetry_rx,
    )));
    if let (true, Some(r)) = (in_mesh, &config.registrar) {
        tasks.push(tokio::spawn(identity::run(
            identity::IdentityConfig {
                registries: r.registries.clone(),
                namespace: r.service.namespace.clone(),
                service: r.service.name.clone(),
                token: r.token.clone(),
                transport: r.transport.clone(),
                renew_at: 0.7,
                retry_min: Duration::from_secs(1),
                retry_max: Duration::from_secs(30),
            },
            mesh_identity.clone(),
            table.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        )));
    }
    let mut inbound_addr = None;
    if let (true, Some(r), Some(l)) = (config.mesh_identity, &config.registrar, listeners.inbound) {
        inbound_addr = Some(addr(&l).map_err(|e| e.to_string())?);
        tasks.push(tokio::spawn(inbound::serve(
            l,
            mesh_identity.clone(),
            r.probe_target,
            Arc::new(inbound::Local {
                namespace: r.service.namespace.as_str().into(),
                service: r.service.name.as_str().into(),
                table: table.clone(),
                tcp: config.app_tcp,
            }),
            metrics.clone(),
            shutdown_rx.clone(),
        )));
    }
    // Peers reach the app through the inbound port: the instance says where it is.
    let registrar = config.registrar.clone().map(|mut r| {
        r.service.mesh_port = inbound_addr.map_or(0, |a| a.port());
        let mesh = (r.service.mesh_port != 0).then(|| registrar::MeshReadiness {
            identity: mesh_identity.clone(),
            table: table.clone(),
        });
        tokio::spawn(registrar::run(r, mesh, registrar_rx))
    });
    tracing::info!(
        admin = %admin_addr,
        http_proxy = %http_proxy_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        inbound = %inbound_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        upstreams = upstream_addrs.len() + http_upstream_addrs.len(),
        workers = ctx.workers,
        "sidecar serving"
    );
    Ok(SidecarHandle {
        admin_addr,
        http_proxy_addr,
        upstream_addrs,
        http_upstream_addrs,
        dns_addr,
        inbound_addr,
        table,
        identity: mesh_identity,
        registrar_stop,
        registrar,
        shutdown,
        tasks,
        telemetry_stop,
        telemetry,
    })
}
