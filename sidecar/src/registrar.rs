//! The registrar: registers the local service, keeps its lease alive, reports its health
//! as SERVING or FAILING, and on shutdown drains it: DRAINING, wait, deregister.
//!
//! It reconnects across the registry list like the discovery client, and registers again
//! whenever the registry answers `found=false` (the lease expired while it was away).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::registry_client::RegistryClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::health::{HealthConfig, Prober, Verdict};
use crate::identity::MeshIdentity;
use crate::table::EndpointTable;

/// The local service this sidecar registers.
#[derive(Clone, Debug)]
pub struct LocalService {
    pub namespace: String,
    pub name: String,
    pub id: String,
    /// Address other hosts use to reach the service.
    pub address: String,
    pub port: u16,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
    pub zone: String,
    pub ttl_seconds: u32,
    /// The sidecar's mesh inbound port, registered beside `port` (0: not in the mesh).
    /// Set by the sidecar from the listener it serves.
    pub mesh_port: u16,
}

#[derive(Clone, Debug)]
pub struct RegistrarConfig {
    pub service: LocalService,
    pub health: HealthConfig,
    /// Time between DRAINING and deregistration, for peers' sidecars to stop sending.
    pub drain: Duration,
    pub registries: Vec<String>,
    /// Where the health checks connect (the service's local port).
    pub probe_target: SocketAddr,
    /// ACL token secret for the registry (`None`: none sent). Never logged.
    pub token: Option<String>,
    /// Plain TCP for `http://` registries, TLS with `--ca-file` for `https://`.
    pub transport: switchyard_tls::Transport,
}

fn instance(s: &LocalService, state: pb::State, mesh_port: u16) -> pb::Instance {
    pb::Instance {
        namespace: s.namespace.clone(),
        service: s.name.clone(),
        id: s.id.clone(),
        address: s.address.clone(),
        port: u32::from(s.port),
        version: s.version.clone(),
        labels: s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        weight: s.weight,
        zone: s.zone.clone(),
        state: state as i32,
        mesh_port: u32::from(mesh_port),
    }
}

fn state_of(healthy: bool) -> pb::State {
    if healthy {
        pb::State::Serving
    } else {
        pb::State::Failing
    }
}

/// Longest wait for the answer to a lease renewal before the stream is given up.
const RENEWAL_ANSWER_LIMIT: Duration = Duration::from_secs(2);

async fn connect(
    url: &str,
    transport: &switchyard_tls::Transport,
) -> Result<RegistryClient<Channel>, String> {
    transport.check(url).map_err(|e| e.0)?;
    // Unary calls time out and dead connections are noticed by HTTP/2 pings, so a
    // registry host that vanishes without closing sockets is failed over promptly.
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(RegistryClient::new(
        transport
            .connect(ep)
            .await
            .map_err(|e| switchyard_tls::client::explain(&e))?,
    ))
}

/// What the inbound port needs before peers may be sent to it: the sidecar's mesh
/// certificate (to finish handshakes) and the namespace's intentions (to admit
/// callers; without them it refuses every request, failing closed).
pub struct MeshReadiness {
    pub identity: Arc<MeshIdentity>,
    pub table: Arc<EndpointTable>,
}

impl MeshReadiness {
    fn ready(&self) -> bool {
        self.identity.current().is_some() && self.table.intentions_guard().is_some()
    }
}

/// The mesh port to register now: the inbound port once the sidecar holds a mesh
/// certificate to serve it with and the intentions to judge callers by, 0 before.
/// Peers would otherwise dial a port that closes every handshake, or (a sidecar
/// restarted before its watch stream delivered a snapshot) answers 403 to every
/// caller; with 0 they use the app port meanwhile, or leave the instance out under
/// strict mTLS.
fn advertised(cfg: &RegistrarConfig, mesh: Option<&MeshReadiness>) -> u16 {
    match mesh {
        Some(m) if cfg.service.mesh_port != 0 && m.ready() => cfg.service.mesh_port,
        _ => 0,
    }
}

/// Runs until `stop` flips, then drains and returns. `mesh`: the sidecar's certificate
/// and intentions, when it serves the inbound port (`service.mesh_port`).
pub async fn run(
    cfg: RegistrarConfig,
    mesh: Option<MeshReadiness>,
    mut stop: watch::Receiver<bool>,
) {
    let mesh = mesh.as_ref();
    let prober = Prober::new(cfg.probe_target, cfg.health.clone());
    let first = prober.probe().await;
    if let Err(e) = &first {
        tracing::warn!(service = %cfg.service.name, "local service is not healthy yet: {e}");
    }
    let mut verdict = Verdict::new(first.is_ok(), &cfg.health);
    let mut rng = fastrand::Rng::new();
    let mut attempt = 0u32;
    let mut next = 0usize;
    // (client, lease, registered since the last backoff)
    let mut session: Option<(RegistryClient<Channel>, u64, bool)> = None;
    loop {
        let url = cfg.registries[next % cfg.registries.len()].clone();
        next += 1;
        match hold(
            &cfg,
            mesh,
            &url,
            &prober,
            &mut verdict,
            &mut stop,
            &mut session,
        )
        .await
        {
            Held::Stopped => break,
            Held::Lost(e) => {
                tracing::warn!(registry = %url, "registrar lost the registry: {e}; retrying");
            }
        }
        // A session that got as far as registering starts the backoff over.
        if session.as_ref().is_some_and(|(_, _, fresh)| *fresh) {
            attempt = 0;
            if let Some((_, _, fresh)) = session.as_mut() {
                *fresh = false;
            }
        }
        let base = Duration::from_millis(100)
            .saturating_mul(1 << attempt.min(7))
            .min(Duration::from_secs(10));
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(base.mul_f64(0.5 + rng.f64() * 0.5)) => {}
            _ = crate::stopped(&mut stop) => break,
        }
    }
    drain(&cfg, session).await;
}

enum Held {
    Stopped,
    Lost(String),
}

async fn register(
    client: &mut RegistryClient<Channel>,
    cfg: &RegistrarConfig,
    healthy: bool,
    mesh_port: u16,
) -> Result<u64, String> {
    let r = client
        .register(crate::authorized(
            pb::RegisterRequest {
                instance: Some(instance(&cfg.service, state_of(healthy), mesh_port)),
                ttl_seconds: cfg.service.ttl_seconds,
                lease_id: 0,
            },
            cfg.token.as_deref(),
        ))
        .await
        .map_err(|s| format!("register refused: {}", s.message()))?
        .into_inner();
    tracing::info!(service = %cfg.service.name, id = %cfg.service.id, lease = r.lease_id, state = state_of(healthy).as_str_name(), mesh_port, "registered the local service");
    Ok(r.lease_id)
}

async fn hold(
    cfg: &RegistrarConfig,
    mesh: Option<&MeshReadiness>,
    url: &str,
    prober: &Prober,
    verdict: &mut Verdict,
    stop: &mut watch::Receiver<bool>,
    session: &mut Option<(RegistryClient<Channel>, u64, bool)>,
) -> Held {
    let mut client = tokio::select! {
        c = connect(url, &cfg.transport) => match c {
            Ok(c) => c,
            Err(e) => return Held::Lost(e),
        },
        _ = crate::stopped(stop) => return Held::Stopped,
    };
    let mut mesh_port = advertised(cfg, mesh);
    let mut lease = match register(&mut client, cfg, verdict.healthy(), mesh_port).await {
        Ok(l) => l,
        Err(e) => return Held::Lost(e),
    };
    // Registers again (same id, same lease) when the port to advertise changes: the
    // mesh certificate and the intentions arrived.
    let mut mesh_check = tokio::time::interval(Duration::from_secs(1));
    *session = Some((client.clone(), lease, true));
    let (tx, rx) = mpsc::channel(4);
    let mut responses = match client
        .keep_alive(crate::authorized(
            ReceiverStream::new(rx),
            cfg.token.as_deref(),
        ))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return Held::Lost(s.message().to_string()),
    };
    let renew_every = Duration::from_millis(u64::from(cfg.service.ttl_seconds) * 1000 / 3)
        .max(Duration::from_millis(200));
    let mut renew = tokio::time::interval(renew_every);
    // A renewal must be answered this soon, or the stream is taken for dead and the
    // lease renewed through another node: a registry cut off (or paused) keeps the
    // socket open, HTTP/2 pings notice only after 10 s, and a new leader gives a lease
    // as little as half its TTL. Found by the chaos test (a partition expired leases).
    let answer_within = renew_every.min(RENEWAL_ANSWER_LIMIT);
    let mut awaiting: Option<tokio::time::Instant> = None;
    let mut probe = tokio::time::interval(cfg.health.interval);
    probe.tick().await;
    loop {
        let answer_by = awaiting;
        tokio::select! {
            _ = renew.tick() => {
                if tx.send(pb::KeepAliveRequest { lease_ids: vec![lease] }).await.is_err() {
                    return Held::Lost("keep-alive stream closed".into());
                }
                awaiting.get_or_insert_with(|| tokio::time::Instant::now() + answer_within);
            }
            _ = async { if let Some(t) = answer_by { tokio::time::sleep_until(t).await } }, if answer_by.is_some() => {
                return Held::Lost(format!(
                    "the registry did not answer a lease renewal within {answer_within:?}; renewing through another node"
                ));
            }
            msg = responses.message() => match msg {
                Ok(Some(r)) => {
                    awaiting = None;
                    if r.leases.iter().any(|l| l.lease_id == lease && !l.found) {
                        tracing::warn!(lease, "the registry forgot our lease; registering again");
                        match register(&mut client, cfg, verdict.healthy(), mesh_port).await {
                            Ok(l) => {
                                lease = l;
                                *session = Some((client.clone(), lease, true));
                            }
                            Err(e) => return Held::Lost(e),
                        }
                    }
                }
                Ok(None) => return Held::Lost("keep-alive stream ended".into()),
                Err(s) => return Held::Lost(s.message().to_string()),
            },
            _ = mesh_check.tick(), if mesh.is_some() => {
                let now = advertised(cfg, mesh);
                if now != mesh_port {
                    match register(&mut client, cfg, verdict.healthy(), now).await {
                        Ok(l) => {
                            lease = l;
                            mesh_port = now;
                            *session = Some((client.clone(), lease, true));
                        }
                        Err(e) => return Held::Lost(e),
                    }
                }
            }
            _ = probe.tick() => {
                let result = prober.probe().await;
                if let Some(healthy) = verdict.record(result.is_ok()) {
                    match &result {
                        Ok(()) => tracing::info!(service = %cfg.service.name, "local service is healthy again; marking SERVING"),
                        Err(e) => tracing::warn!(service = %cfg.service.name, "local service failed its health checks ({e}); marking FAILING"),
                    }
                    let r = client.set_state(crate::authorized(pb::SetStateRequest {
                        namespace: cfg.service.namespace.clone(),
                        id: cfg.service.id.clone(),
                        state: state_of(healthy) as i32,
                    }, cfg.token.as_deref())).await;
                    if let Err(s) = r {
                        return Held::Lost(format!("set state failed: {}", s.message()));
                    }
                }
            }
            _ = crate::stopped(stop) => return Held::Stopped,
        }
    }
}

/// DRAINING → wait the drain period (renewing the lease) → deregister; bounded so a
/// vanished registry cannot hold shutdown past the drain period plus a few seconds.
async fn drain(cfg: &RegistrarConfig, session: Option<(RegistryClient<Channel>, u64, bool)>) {
    let limit = cfg.drain + Duration::from_secs(10);
    if tokio::time::timeout(limit, drain_inner(cfg, session))
        .await
        .is_err()
    {
        tracing::warn!(service = %cfg.service.name, "drain did not finish within {limit:?}; exiting without deregistering (the lease will expire)");
    }
}

async fn drain_inner(cfg: &RegistrarConfig, session: Option<(RegistryClient<Channel>, u64, bool)>) {
    let Some((mut client, lease, _)) = session else {
        return;
    };
    let name = &cfg.service.name;
    match client
        .set_state(crate::authorized(
            pb::SetStateRequest {
                namespace: cfg.service.namespace.clone(),
                id: cfg.service.id.clone(),
                state: pb::State::Draining as i32,
            },
            cfg.token.as_deref(),
        ))
        .await
    {
        Ok(_) => {
            tracing::info!(service = %name, drain = ?cfg.drain, "marked DRAINING; waiting for peers to stop sending")
        }
        Err(s) => tracing::warn!(service = %name, "could not mark DRAINING: {}", s.message()),
    }
    let (tx, rx) = mpsc::channel(4);
    let renewing = client
        .keep_alive(crate::authorized(
            ReceiverStream::new(rx),
            cfg.token.as_deref(),
        ))
        .await
        .ok();
    let deadline = tokio::time::Instant::now() + cfg.drain;
    let every = Duration::from_millis(u64::from(cfg.service.ttl_seconds) * 1000 / 3)
        .max(Duration::from_millis(200));
    while tokio::time::Instant::now() < deadline {
        let _ = tx.try_send(pb::KeepAliveRequest {
            lease_ids: vec![lease],
        });
        tokio::time::sleep(every.min(deadline - tokio::time::Instant::now())).await;
    }
    drop(renewing);
    match client
        .deregister(crate::authorized(
            pb::DeregisterRequest {
                namespace: cfg.service.namespace.clone(),
                id: cfg.service.id.clone(),
            },
            cfg.token.as_deref(),
        ))
        .await
    {
        Ok(_) => tracing::info!(service = %name, "deregistered"),
        Err(s) => tracing::warn!(service = %name, "could not deregister: {}", s.message()),
    }
}
