//! The registry node as a Consul agent for the services registered through it.
//!
//! A TTL check is the instance's lease: `pass` renews it (`fail`, `warn` and `update`
//! renew it too and set the status), so a client that stops passing is deregistered
//! when the TTL runs out, and its next `pass` answers 404 so it registers again (what
//! Spring and Steeltoe do). These work on any node: the check names the instance, the
//! catalog names its lease, and a follower relays the renewal to the leader.
//!
//! HTTP, TCP and gRPC checks are run by the node that received the registration, every
//! `Interval`, each bounded by its `Timeout`: critical → FAILING, warning (HTTP 429) →
//! `warning` in the Consul view, passing → SERVING; critical for longer than
//! `DeregisterCriticalServiceAfter` → deregistered. That node also keeps the lease of a
//! service without a TTL check alive, as a Consul agent keeps its services; if the node
//! stops, those leases run out ([`AGENT_LEASE_TTL`]) and the instances go, as a
//! Consul agent's services go critical when it dies. The table is in memory only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::registration::{CheckDef, CheckKind};
use super::view::{CHECK_LABEL, OUTPUT_LABEL};
use crate::catalog::Command;
use crate::model::{Instance, LeaseId, State};
use crate::raft::propose::Proposer;
use crate::shared::Shared;

/// Lease TTL of a service whose liveness this node vouches for (no TTL check).
pub const AGENT_LEASE_TTL: u32 = 30;
/// How often this node renews those leases.
const AGENT_RENEW_EVERY: Duration = Duration::from_secs(10);
/// Most services one node runs checks for (each costs a probe per interval).
pub const MAX_AGENT_SERVICES: usize = 10_000;
/// Longest check output kept (it is replicated with the instance).
const MAX_OUTPUT_BYTES: usize = 512;

/// A check status as Consul names it, from best to worst (a service shows its worst).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }
}

struct Probe {
    def: CheckDef,
    status: Status,
    /// The last run's line of output.
    output: String,
    critical_since: Option<Instant>,
    next: Instant,
}

struct Local {
    lease: LeaseId,
    /// The lease is this node's to renew (no TTL check).
    renew: bool,
    probes: Vec<Probe>,
    /// The registering caller's `authorization` value, to relay renewals with it.
    token: Option<http::HeaderValue>,
}

/// Services registered through this node that it renews or checks.
pub struct Agent {
    shared: Arc<Shared>,
    proposer: Proposer,
    local: Mutex<HashMap<(String, String), Local>>,
    http: HttpClient,
}

/// The client HTTP checks run with (pooled, plain HTTP).
type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

/// The answer to a check that names no registered instance (never registered, or its
/// TTL ran out): 404, which Spring reads as "register again".
pub fn unknown_check(check_id: &str) -> AgentError {
    err(
        http::StatusCode::NOT_FOUND,
        format!("CheckID {check_id:?} does not have associated TTL: the service is not registered (its TTL ran out?); register it again"),
    )
}

/// Why a check update could not be applied, as the HTTP status and message.
#[derive(Debug)]
pub struct AgentError {
    pub status: http::StatusCode,
    pub message: String,
}

fn err(status: http::StatusCode, message: impl Into<String>) -> AgentError {
    AgentError {
        status,
        message: message.into(),
    }
}

impl Agent {
    pub fn new(shared: Arc<Shared>, proposer: Proposer) -> Arc<Self> {
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Arc::new(Self {
            shared,
            proposer,
            local: Mutex::new(HashMap::new()),
            http,
        })
    }

    /// Room for one more service, unless it is already here.
    pub fn has_room(&self, namespace: &str, id: &str) -> bool {
        let l = self.local.lock();
        l.len() < MAX_AGENT_SERVICES || l.contains_key(&(namespace.to_string(), id.to_string()))
    }

    /// Remembers a registration this node renews or checks (nothing for a TTL-only one).
    pub fn adopt(
        &self,
        instance: &Instance,
        lease: LeaseId,
        checks: &[CheckDef],
        token: Option<http::HeaderValue>,
    ) {
        let key = (instance.namespace.clone(), instance.id.clone());
        let renew = !checks.iter().any(|c| matches!(c.kind, CheckKind::Ttl(_)));
        let probes: Vec<Probe> = checks
            .iter()
            .filter(|c| !matches!(c.kind, CheckKind::Ttl(_)))
            .map(|c| Probe {
                def: c.clone(),
                status: Status::Critical,
                output: String::new(),
                critical_since: None,
                next: Instant::now(),
            })
            .collect();
        let mut l = self.local.lock();
        if !renew && probes.is_empty() {
            l.remove(&key);
            return;
        }
        l.insert(
            key,
            Local {
                lease,
                renew,
                probes,
                token,
            },
        );
    }

    /// Forgets a service (deregistered).
    pub fn forget(&self, namespace: &str, id: &str) {
        self.local
            .lock()
            .remove(&(namespace.to_string(), id.to_string()));
    }

    /// Renews `leases` here (leader) or through the leader; `Ok(false)` when one of them
    /// no longer exists.
    pub async fn renew(
        &self,
        leases: &[LeaseId],
        token: Option<&http::HeaderValue>,
    ) -> Result<bool, String> {
        if self.proposer.is_leader() {
            let mut out = Vec::with_capacity(leases.len());
            self.shared.leases.renew(leases, &mut out);
            return Ok(out.iter().all(|(_, ttl)| ttl.is_some()));
        }
        let (_, addr) = self
            .proposer
            .leader()
            .ok_or("no registry leader is elected; retry when a majority of nodes is up")?;
        let channel = self.proposer.network().channel(&addr)?;
        let mut req =
            tonic::Request::new(tokio_stream::once(switchyard_proto::v1::KeepAliveRequest {
                lease_ids: leases.to_vec(),
            }));
        if let Some(t) =
            token.and_then(|t| tonic::metadata::MetadataValue::try_from(t.as_bytes()).ok())
        {
            req.metadata_mut().insert("authorization", t);
        }
        let mut stream = switchyard_proto::v1::registry_client::RegistryClient::new(channel)
            .keep_alive(req)
            .await
            .map_err(|s| {
                format!(
                    "the leader refused the renewal ({:?}): {}",
                    s.code(),
                    s.message()
                )
            })?
            .into_inner();
        use tokio_stream::StreamExt;
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(r))) => Ok(r.leases.iter().all(|l| l.found)),
            Ok(Some(Err(s))) => Err(format!(
                "the leader refused the renewal ({:?}): {}",
                s.code(),
                s.message()
            )),
            _ => Err("the leader did not answer the renewal".into()),
        }
    }

    /// The instance a check id names (`service:<id>`, `service:<id>:<n>`, or the id
    /// itself) and the lease that keeps it alive, if it is registered.
    pub fn find_check(&self, namespace: &str, check_id: &str) -> Option<(Arc<Instance>, LeaseId)> {
        let catalog = self.shared.catalog.read();
        instance_of_check(check_id)
            .into_iter()
            .find_map(|id| catalog.instance_and_lease(namespace, id))
    }

    /// Applies a client's check update (`pass`, `warn`, `fail`, `update`) to the
    /// instance [`find_check`](Self::find_check) found: renews its lease and writes the
    /// status only when it changes. A lease gone meanwhile: 404, so the client
    /// registers again.
    pub async fn update(
        &self,
        check_id: &str,
        instance: Arc<Instance>,
        lease: LeaseId,
        status: Status,
        output: Option<String>,
        token: Option<&http::HeaderValue>,
    ) -> Result<Arc<Instance>, AgentError> {
        match self.renew(&[lease], token).await {
            Ok(true) => {}
            Ok(false) => return Err(unknown_check(check_id)),
            Err(e) => return Err(err(http::StatusCode::SERVICE_UNAVAILABLE, e)),
        }
        let output = output.map(|mut o| {
            if o.len() > MAX_OUTPUT_BYTES {
                let mut end = MAX_OUTPUT_BYTES;
                while !o.is_char_boundary(end) {
                    end -= 1;
                }
                o.truncate(end);
            }
            o.retain(|c| !c.is_control());
            o
        });
        self.set_status(&instance, lease, status, output)
            .await
            .map_err(|e| err(http::StatusCode::SERVICE_UNAVAILABLE, e))
    }

    /// Writes `status` (and `output`) onto the instance if it differs from what it shows.
    async fn set_status(
        &self,
        instance: &Arc<Instance>,
        lease: LeaseId,
        status: Status,
        output: Option<String>,
    ) -> Result<Arc<Instance>, String> {
        let mut next = Instance::clone(instance);
        match status {
            Status::Passing => {
                next.labels.remove(CHECK_LABEL);
                if next.state == State::Failing {
                    next.state = State::Serving;
                }
            }
            Status::Warning => {
                next.labels.insert(CHECK_LABEL.into(), "warning".into());
                if next.state == State::Failing {
                    next.state = State::Serving;
                }
            }
            Status::Critical => {
                next.labels.remove(CHECK_LABEL);
                if next.state == State::Serving {
                    next.state = State::Failing;
                }
            }
        }
        match output {
            Some(o) if !o.is_empty() => {
                next.labels.insert(OUTPUT_LABEL.into(), o);
            }
            Some(_) => {
                next.labels.remove(OUTPUT_LABEL);
            }
            None => {}
        }
        if next == **instance {
            return Ok(instance.clone());
        }
        let ttl_seconds = self
            .shared
            .catalog
            .read()
            .lease_ttl(lease)
            .unwrap_or(AGENT_LEASE_TTL);
        let next = Arc::new(next);
        self.proposer
            .propose(Command::Register {
                instance: Instance::clone(&next),
                ttl_seconds,
                lease_id: Some(lease),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(next)
    }

    /// Renews the leases this node vouches for and runs the checks that are due, until
    /// the node stops.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_renew = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            self.prune();
            if last_renew.elapsed() >= AGENT_RENEW_EVERY {
                last_renew = Instant::now();
                self.renew_own().await;
            }
            self.probe_due().await;
        }
    }

    /// Drops services the catalog no longer holds (deregistered or expired elsewhere).
    fn prune(&self) {
        let catalog = self.shared.catalog.read();
        self.local.lock().retain(|(ns, id), l| {
            catalog
                .instance_and_lease(ns, id)
                .is_some_and(|(_, lease)| lease == l.lease)
        });
    }

    async fn renew_own(&self) {
        // Grouped by the token each was registered with, one renewal per group.
        let mut by_token: HashMap<Option<http::HeaderValue>, Vec<LeaseId>> = HashMap::new();
        for l in self.local.lock().values().filter(|l| l.renew) {
            by_token.entry(l.token.clone()).or_default().push(l.lease);
        }
        for (token, leases) in by_token {
            for chunk in leases.chunks(crate::api::MAX_LEASES_PER_KEEPALIVE) {
                if let Err(e) = self.renew(chunk, token.as_ref()).await {
                    tracing::warn!(error = %e, "cannot renew the leases of services registered through the Consul API");
                }
            }
        }
    }

    /// Runs every due probe at once (each its own task, bounded by its timeout), then
    /// writes the services whose status changed.
    async fn probe_due(&self) {
        let now = Instant::now();
        let mut running = tokio::task::JoinSet::new();
        for (key, local) in self.local.lock().iter_mut() {
            for (n, p) in local.probes.iter_mut().enumerate() {
                if p.next <= now {
                    p.next = now + p.def.interval;
                    let (key, kind, timeout) = (key.clone(), p.def.kind.clone(), p.def.timeout);
                    let client = self.http.clone();
                    running.spawn(async move { (key, n, probe(&client, &kind, timeout).await) });
                }
            }
        }
        let mut changed: Vec<(String, String)> = Vec::new();
        while let Some(done) = running.join_next().await {
            let Ok((key, n, (status, output))) = done else {
                continue;
            };
            let mut l = self.local.lock();
            if let Some(p) = l.get_mut(&key).and_then(|local| local.probes.get_mut(n)) {
                p.status = status;
                p.output = output;
                p.critical_since = match status {
                    Status::Critical => p.critical_since.or(Some(now)),
                    _ => None,
                };
                if !changed.contains(&key) {
                    changed.push(key);
                }
            }
        }
        for key in changed {
            self.settle(&key).await;
        }
    }

    /// Writes one service's worst status (and the first output of its probes), or
    /// deregisters it once critical past its `DeregisterCriticalServiceAfter`.
    async fn settle(&self, key: &(String, String)) {
        let (worst, expired, lease, output) = {
            let l = self.local.lock();
            let Some(local) = l.get(key) else { return };
            let worst = local
                .probes
                .iter()
                .map(|p| p.status)
                .max()
                .unwrap_or(Status::Passing);
            let expired = local.probes.iter().any(|p| {
                matches!((p.critical_since, p.def.deregister_after), (Some(since), Some(after)) if since.elapsed() >= after)
            });
            let output = local
                .probes
                .iter()
                .map(|p| p.output.as_str())
                .find(|o| !o.is_empty())
                .map(str::to_string);
            (worst, expired, local.lease, output)
        };
        if expired {
            tracing::info!(namespace = %key.0, id = %key.1, "critical past DeregisterCriticalServiceAfter; deregistering");
            self.forget(&key.0, &key.1);
            let _ = self
                .proposer
                .propose(Command::Deregister {
                    namespace: key.0.clone(),
                    id: key.1.clone(),
                })
                .await;
            return;
        }
        let Some((instance, _)) = self
            .shared
            .catalog
            .read()
            .instance_and_lease(&key.0, &key.1)
        else {
            return;
        };
        if let Err(e) = self.set_status(&instance, lease, worst, output).await {
            tracing::warn!(error = %e, id = %key.1, "cannot write a check's status");
        }
    }
}

/// One probe: its status and a line of output.
async fn probe(client: &HttpClient, kind: &CheckKind, timeout: Duration) -> (Status, String) {
    let run = async {
        match kind {
            CheckKind::Ttl(_) => (Status::Passing, String::new()),
            CheckKind::Tcp(addr) => match tokio::net::TcpStream::connect(addr.as_str()).await {
                Ok(_) => (Status::Passing, format!("TCP connect {addr}: Success")),
                Err(e) => (Status::Critical, format!("dial tcp {addr}: {e}")),
            },
            CheckKind::Http { url, method } => {
                let req = http::Request::builder()
                    .method(method.as_str())
                    .uri(url.as_str())
                    .header("user-agent", "Consul Health Check")
                    .body(http_body_util::Empty::new());
                let Ok(req) = req else {
                    return (Status::Critical, format!("bad request to {url}"));
                };
                match client.request(req).await {
                    Ok(r) => {
                        let code = r.status();
                        let status = if code.is_success() {
                            Status::Passing
                        } else if code == http::StatusCode::TOO_MANY_REQUESTS {
                            Status::Warning
                        } else {
                            Status::Critical
                        };
                        (status, format!("HTTP {method} {url}: {code}"))
                    }
                    Err(e) => (Status::Critical, format!("HTTP {method} {url}: {e}")),
                }
            }
            CheckKind::Grpc { addr, service } => grpc_probe(addr, service).await,
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => (Status::Critical, format!("timed out after {timeout:?}")),
    }
}

async fn grpc_probe(addr: &str, service: &str) -> (Status, String) {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return (Status::Critical, format!("{addr:?} is not an address"));
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return (Status::Critical, format!("gRPC {addr}: {e}")),
    };
    match HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
    {
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {
            (Status::Passing, format!("gRPC {addr} {service}: SERVING"))
        }
        Ok(r) => (
            Status::Critical,
            format!("gRPC {addr} {service}: status {}", r.get_ref().status),
        ),
        Err(s) => (
            Status::Critical,
            format!("gRPC {addr} {service}: {}", s.message()),
        ),
    }
}

/// The instance ids a check id may name: `service:<id>`, `service:<id>:<n>`, or the
/// instance id itself (a client that set its own CheckID to it).
pub(crate) fn instance_of_check(check_id: &str) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(rest) = check_id.strip_prefix("service:") {
        out.push(rest);
        if let Some((id, n)) = rest.rsplit_once(':') {
            if n.parse::<u32>().is_ok() {
                out.push(id);
            }
        }
    } else {
        out.push(check_id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_ids_name_their_instance() {
        assert_eq!(instance_of_check("service:web-1"), ["web-1"]);
        assert_eq!(instance_of_check("service:web-1:2"), ["web-1:2", "web-1"]);
        assert_eq!(instance_of_check("web-1"), ["web-1"]);
    }
}
