//! The Consul-compatible HTTP API, on the registry's HTTP port (and `--consul-http`), so
//! Ocelot, Steeltoe, Spring Cloud Consul, py-consul and Prometheus's Consul discovery
//! work when `CONSUL_HTTP_ADDR` points at a registry node.
//!
//! A tour:
//! - [`query`]: the query string (`passing`, `tag`, `dc`, `ns`, `node-meta`, `index`,
//!   `wait` as Go durations, consistency modes), bounded and parsed once.
//! - [`view`]: our instances in Consul's shapes and field names.
//! - [`index`]: `X-Consul-Index` per service, and blocking reads that park until it moves.
//! - [`registration`]: `PUT /v1/agent/service/register` bodies, keys in any case.
//! - [`agent`]: TTL checks as leases; the HTTP/TCP/gRPC checks this node runs.
//! - `kv`: `/v1/kv/<key>` on the replicated KV store (Ocelot's configuration store).
//!
//! Reads are served by any node from its applied state (Consul's `stale`). Tokens come
//! from `X-Consul-Token`, `Authorization: Bearer` or `?token=` and get the same rights as
//! on gRPC; a read the token may not see returns no entries, as Consul's ACL filter does.

// Handlers return the response a failed step answers with (`Err(HttpResponse)`): it is
// the reply itself, built once on a path that ends the request, so boxing it buys
// nothing.
#![allow(clippy::result_large_err)]

pub mod agent;
pub mod index;
mod kv;
pub mod query;
pub mod registration;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;

use self::agent::{Agent, Status};
use self::index::{Blocking, ServiceIndex};
use self::query::Query;
use self::view::Ctx;
use crate::auth::{self, Caller};
use crate::catalog::Command;
use crate::model::acl::Right;
use crate::model::{validate_namespace, Instance, State};
use crate::raft::propose::Proposer;
use crate::shared::Shared;

/// How the Consul API behaves on this node.
#[derive(Clone, Debug)]
pub struct ConsulConfig {
    /// `Datacenter` in every answer; a `dc=` naming another is refused as Consul does.
    pub datacenter: String,
    /// Blocking queries held at once on this node.
    pub max_blocking: usize,
    /// Blocking queries held at once for one client address.
    pub max_blocking_per_client: usize,
    /// A second address serving the same HTTP port (Consul's 8500), if any.
    pub listen: Option<SocketAddr>,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        Self {
            datacenter: "dc1".into(),
            max_blocking: 20_000,
            max_blocking_per_client: 2_500,
            listen: None,
        }
    }
}

/// The three reads of one service's instances.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ServiceRead {
    Health,
    Checks,
    Catalog,
}

/// The Consul API of one node.
pub struct Consul {
    shared: Arc<Shared>,
    proposer: Proposer,
    pub index: Arc<ServiceIndex>,
    blocking: Blocking,
    pub agent: Arc<Agent>,
    config: ConsulConfig,
}

pub type HttpResponse = Response<Full<Bytes>>;

/// A response with a body and a content type.
pub fn respond(
    code: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> HttpResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

/// A JSON body (`null` if it cannot be encoded, which plain data never fails to be).
pub fn json(code: StatusCode, value: &impl Serialize) -> HttpResponse {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    respond(code, "application/json", body)
}

/// A plain-text error, as Consul answers them.
pub fn text(code: StatusCode, message: impl Into<String>) -> HttpResponse {
    let mut m = message.into();
    m.push('\n');
    respond(code, "text/plain; charset=utf-8", m)
}

/// The token a request carries (`X-Consul-Token`, `Authorization`, or the `?token=`
/// value given), as the `authorization` value auth reads.
pub(crate) fn token(headers: &http::HeaderMap, query_token: Option<&str>) -> Option<HeaderValue> {
    if let Some(t) = headers.get("x-consul-token").filter(|t| !t.is_empty()) {
        let mut v = b"Bearer ".to_vec();
        v.extend_from_slice(t.as_bytes());
        return HeaderValue::from_bytes(&v).ok();
    }
    if let Some(a) = headers.get(http::header::AUTHORIZATION) {
        return Some(a.clone());
    }
    query_token.and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok())
}

pub(crate) fn caller(shared: &Shared, token: Option<&HeaderValue>) -> Result<Caller, HttpResponse> {
    let mut md = tonic::metadata::MetadataMap::new();
    if let Some(t) = token.and_then(|t| tonic::metadata::MetadataValue::try_from(t.as_bytes()).ok())
    {
        md.insert("authorization", t);
    }
    auth::caller(shared, &md).map_err(|s| {
        text(
            StatusCode::FORBIDDEN,
            format!("ACL not found: {}", s.message()),
        )
    })
}

/// The request's path segment after `prefix`, percent-decoded; `None` if empty or not UTF-8.
fn tail(path: &str, prefix: &str) -> Option<String> {
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    percent_encoding::percent_decode_str(rest)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

impl Consul {
    pub fn new(shared: Arc<Shared>, proposer: Proposer, config: ConsulConfig) -> Arc<Self> {
        let floor = shared.catalog.read().revision();
        let index = Arc::new(ServiceIndex::new(floor));
        let agent = Agent::new(shared.clone(), proposer.clone());
        Arc::new(Self {
            blocking: Blocking::new(config.max_blocking, config.max_blocking_per_client),
            shared,
            proposer,
            index,
            agent,
            config,
        })
    }

    /// Starts following the hub (for indexes) and the agent's checks.
    pub fn spawn(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let changes = self.shared.hub.subscribe();
        let catalog = self.shared.catalog.clone();
        // Read after subscribing: a change in between is seen twice, harmlessly.
        self.index.reset(catalog.read().revision());
        vec![
            tokio::spawn(index::follow(
                self.index.clone(),
                changes,
                move || catalog.read().revision(),
                self.shared.shutdown.clone(),
            )),
            tokio::spawn(self.agent.clone().run(self.shared.shutdown.clone())),
        ]
    }

    /// Serves a `/v1/...` request.
    pub async fn handle(
        &self,
        req: http::Request<hyper::body::Incoming>,
        client: SocketAddr,
    ) -> HttpResponse {
        let q = match Query::parse(req.uri().query()) {
            Ok(q) => q,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        };
        if let Some(dc) = &q.dc {
            if dc != &self.config.datacenter {
                // Consul's own answer for a datacenter it cannot reach.
                return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
            }
        }
        let namespace = match validate_namespace("ns", q.namespace.as_deref().unwrap_or("")) {
            Ok(ns) => ns,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let token = token(req.headers(), q.token.as_deref());
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let get = method == Method::GET || method == Method::HEAD;
        let put = method == Method::PUT || method == Method::POST;
        let mut r = match path.as_str() {
            "/v1/catalog/services" if get => self.catalog_services(&q, &namespace, token.as_ref(), client).await,
            "/v1/catalog/nodes" if get => self.catalog_nodes(&q, &namespace, token.as_ref(), client).await,
            "/v1/agent/self" if get => self.agent_self(),
            "/v1/status/leader" if get => json(StatusCode::OK, &self.leader()),
            "/v1/status/peers" if get => json(StatusCode::OK, &self.peers()),
            "/v1/agent/service/register" if put => self.register(req, client, token).await,
            p if get && p.starts_with("/v1/health/service/") => match tail(p, "/v1/health/service/") {
                Some(name) => self.service_read(ServiceRead::Health, &q, &namespace, &name, token.as_ref(), client).await,
                None => text(StatusCode::BAD_REQUEST, "missing service name: GET /v1/health/service/:name"),
            },
            p if get && p.starts_with("/v1/health/checks/") => match tail(p, "/v1/health/checks/") {
                Some(name) => self.service_read(ServiceRead::Checks, &q, &namespace, &name, token.as_ref(), client).await,
                None => text(StatusCode::BAD_REQUEST, "missing service name: GET /v1/health/checks/:service"),
            },
            p if get && p.starts_with("/v1/catalog/service/") => match tail(p, "/v1/catalog/service/") {
                Some(name) => self.service_read(ServiceRead::Catalog, &q, &namespace, &name, token.as_ref(), client).await,
                None => text(StatusCode::BAD_REQUEST, "missing service name: GET /v1/catalog/service/:name"),
            },
            p if put && p.starts_with("/v1/agent/service/deregister/") => {
                match tail(p, "/v1/agent/service/deregister/") {
                    Some(id) => self.deregister(&namespace, &id, token.as_ref()).await,
                    None => text(StatusCode::BAD_REQUEST, "missing service id"),
                }
            }
            p if put && p.starts_with("/v1/agent/service/maintenance/") => {
                match tail(p, "/v1/agent/service/maintenance/") {
                    Some(id) => self.maintenance(&q, &namespace, &id, token.as_ref()).await,
                    None => text(StatusCode::BAD_REQUEST, "missing service id"),
                }
            }
            p if put && p.starts_with("/v1/agent/check/") => self.check(req, &q, &namespace, p, token.as_ref()).await,
            p if p.starts_with("/v1/kv/") || p == "/v1/kv" => {
                let raw = p.strip_prefix("/v1/kv").unwrap_or_default().trim_start_matches('/');
                match percent_encoding::percent_decode_str(raw).decode_utf8() {
                    Ok(key) => {
                        let key = key.into_owned();
                        self.kv(req, &q, &namespace, &key, token.as_ref(), client).await
                    }
                    Err(_) => text(StatusCode::BAD_REQUEST, "the key is not UTF-8"),
                }
            }
            p if p.starts_with("/v1/") && !get && !put => text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed"),
            ),
            p => text(
                StatusCode::NOT_FOUND,
                format!("{p} is not part of Switchyard's Consul API: see the README's table of supported endpoints"),
            ),
        };
        self.headers(&mut r, &namespace, get);
        r
    }

    /// Consul's headers on every answer; a GET without an index of its own (an error,
    /// `agent/self`) gets the namespace's, since clients such as py-consul require one.
    fn headers(&self, r: &mut HttpResponse, namespace: &str, get: bool) {
        let known = self.proposer.leader().is_some();
        if get && !r.headers().contains_key("x-consul-index") {
            let index = self.index.index(namespace, "");
            if let Ok(v) = HeaderValue::from_str(&index.to_string()) {
                r.headers_mut().insert("x-consul-index", v);
            }
        }
        let h = r.headers_mut();
        h.insert(
            "x-consul-knownleader",
            HeaderValue::from_static(if known { "true" } else { "false" }),
        );
        h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
        h.insert(
            "x-consul-effective-consistency",
            HeaderValue::from_static("stale"),
        );
    }

    /// Waits, for a blocking read, until the index passes the client's; the index to
    /// answer with, or a 503 when this client or node holds too many.
    async fn block(
        &self,
        q: &Query,
        namespace: &str,
        service: &str,
        client: SocketAddr,
    ) -> Result<u64, HttpResponse> {
        let now = self.index.index(namespace, service);
        let Some(seen) = q.index.filter(|seen| now <= *seen) else {
            return Ok(now);
        };
        let _held = self.blocking.take(client.ip()).map_err(|e| {
            self.shared.metrics.consul_blocking_refused.inc();
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, e);
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        })?;
        let mut stop = self.shared.shutdown.clone();
        self.shared.metrics.consul_blocked.inc();
        let index = tokio::select! {
            i = self.index.wait_past(namespace, service, seen, q.hold()) => i,
            _ = stop.wait_for(|s| *s) => self.index.index(namespace, service),
        };
        self.shared.metrics.consul_blocked.dec();
        Ok(index)
    }

    /// What every read starts with: the caller, then the index to answer with (after
    /// holding the request, for a blocking read).
    async fn begin(
        &self,
        q: &Query,
        namespace: &str,
        service: &str,
        token: Option<&HeaderValue>,
        client: SocketAddr,
    ) -> Result<(Caller, u64), HttpResponse> {
        let caller = caller(&self.shared, token)?;
        let index = self.block(q, namespace, service, client).await?;
        Ok((caller, index))
    }

    fn with_index(mut r: HttpResponse, index: u64) -> HttpResponse {
        if let Ok(v) = HeaderValue::from_str(&index.to_string()) {
            r.headers_mut().insert("x-consul-index", v);
        }
        r
    }

    /// The service's instances the caller may read, filtered by the query.
    fn instances(
        &self,
        q: &Query,
        namespace: &str,
        name: &str,
        caller: &Caller,
        passing: bool,
    ) -> (Vec<Arc<Instance>>, bool) {
        if !caller.may(Right::Read, name) {
            return (Vec::new(), true);
        }
        let catalog = self.shared.catalog.read();
        let all = catalog.resolve(namespace, name, "");
        let kept: Vec<Arc<Instance>> = all
            .into_iter()
            .filter(|i| view::matches(i, &q.tags, &q.node_meta))
            .filter(|i| !passing || view::status(i) == "passing")
            .collect();
        if q.split {
            let policy = catalog.current_policy(namespace, name);
            return (view::split(policy.as_deref(), kept), false);
        }
        (kept, false)
    }

    fn filtered(mut r: HttpResponse, filtered: bool) -> HttpResponse {
        if filtered {
            r.headers_mut().insert(
                "x-consul-results-filtered-by-acls",
                HeaderValue::from_static("true"),
            );
        }
        r
    }

    /// `/v1/health/service/:name`, `/v1/health/checks/:name`, `/v1/catalog/service/:name`.
    async fn service_read(
        &self,
        kind: ServiceRead,
        q: &Query,
        ns: &str,
        name: &str,
        token: Option<&HeaderValue>,
        client: SocketAddr,
    ) -> HttpResponse {
        let (caller, index) = match self.begin(q, ns, name, token, client).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let passing = q.passing && kind == ServiceRead::Health;
        let (list, filtered) = self.instances(q, ns, name, &caller, passing);
        let ctx = Ctx {
            datacenter: &self.config.datacenter,
            index,
        };
        let body = match kind {
            ServiceRead::Health => json(
                StatusCode::OK,
                &list.iter().map(|i| view::entry(i, ctx)).collect::<Vec<_>>(),
            ),
            ServiceRead::Checks => {
                let checks: Vec<_> = list
                    .iter()
                    .flat_map(|i| view::checks(i, ctx))
                    .filter(|c| !q.passing || c.status == "passing")
                    .collect();
                json(StatusCode::OK, &checks)
            }
            ServiceRead::Catalog => json(
                StatusCode::OK,
                &list
                    .iter()
                    .map(|i| view::catalog_service(i, ctx))
                    .collect::<Vec<_>>(),
            ),
        };
        Self::filtered(Self::with_index(body, index), filtered)
    }

    async fn catalog_services(
        &self,
        q: &Query,
        ns: &str,
        token: Option<&HeaderValue>,
        client: SocketAddr,
    ) -> HttpResponse {
        let (caller, index) = match self.begin(q, ns, "", token, client).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let snapshot = self.shared.catalog.read().snapshot(ns, &[]);
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut filtered = false;
        for s in snapshot.iter().filter(|s| !s.instances.is_empty()) {
            if !caller.may(Right::Read, &s.service) {
                filtered = true;
                continue;
            }
            let mut tags: Vec<String> = s
                .instances
                .iter()
                .filter(|i| view::matches(i, &[], &q.node_meta))
                .flat_map(|i| view::tags(i))
                .collect();
            if tags.is_empty() && !q.node_meta.is_empty() {
                continue;
            }
            tags.sort();
            tags.dedup();
            out.insert(s.service.clone(), tags);
        }
        Self::filtered(
            Self::with_index(json(StatusCode::OK, &out), index),
            filtered,
        )
    }

    async fn catalog_nodes(
        &self,
        q: &Query,
        ns: &str,
        token: Option<&HeaderValue>,
        client: SocketAddr,
    ) -> HttpResponse {
        let (caller, index) = match self.begin(q, ns, "", token, client).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let snapshot = self.shared.catalog.read().snapshot(ns, &[]);
        let ctx = Ctx {
            datacenter: &self.config.datacenter,
            index,
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut nodes = Vec::new();
        for s in snapshot
            .iter()
            .filter(|s| caller.may(Right::Read, &s.service))
        {
            for i in s
                .instances
                .iter()
                .filter(|i| view::matches(i, &[], &q.node_meta))
            {
                if seen.insert(i.address.clone()) {
                    nodes.push(i.clone());
                }
            }
        }
        nodes.sort_by(|a, b| a.address.cmp(&b.address));
        let out: Vec<_> = nodes.iter().map(|i| view::node(i, ctx)).collect();
        Self::with_index(json(StatusCode::OK, &out), index)
    }

    fn leader(&self) -> String {
        self.proposer.leader().map(|(_, a)| a).unwrap_or_default()
    }

    fn peers(&self) -> Vec<String> {
        let m = self.proposer.raft().metrics().borrow().clone();
        m.membership_config
            .membership()
            .nodes()
            .map(|(_, n)| n.addr.clone())
            .collect()
    }

    fn agent_self(&self) -> HttpResponse {
        let m = self.proposer.raft().metrics().borrow().clone();
        let name = format!("switchyard-{}", m.id);
        let body = serde_json::json!({
            "Config": {
                "Datacenter": self.config.datacenter,
                "PrimaryDatacenter": self.config.datacenter,
                "NodeName": name,
                "NodeID": format!("00000000-0000-0000-0000-{:012x}", m.id),
                "Server": true,
                "Revision": "switchyard",
                "Version": "1.17.0",
                "BuildDate": "",
            },
            "DebugConfig": {},
            "Coord": {"Vec": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "Error": 1.5, "Adjustment": 0.0, "Height": 1e-5},
            "Member": {"Name": name, "Addr": self.leader(), "Port": 0, "Tags": {"role": "consul", "dc": self.config.datacenter}, "Status": 1},
            "Stats": {"switchyard": {"revision": self.shared.catalog.read().revision().to_string()}},
            "Meta": {},
            "xDS": {"SupportedProxies": {}, "Port": -1, "Ports": {}},
        });
        json(StatusCode::OK, &body)
    }

    async fn register(
        &self,
        req: http::Request<hyper::body::Incoming>,
        client: SocketAddr,
        token: Option<HeaderValue>,
    ) -> HttpResponse {
        let body = match read_body(req, registration::MAX_BODY_BYTES).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let mut reg = match registration::decode(&body, client.ip()) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        };
        if let Err(r) = self.authorize(&reg.instance.service, token.as_ref()) {
            return r;
        }
        if !self
            .agent
            .has_room(&reg.instance.namespace, &reg.instance.id)
        {
            return text(
                StatusCode::TOO_MANY_REQUESTS,
                format!("this node already checks {} services registered through it: register through another node", agent::MAX_AGENT_SERVICES),
            );
        }
        let ttl = reg.checks.iter().find_map(|c| match c.kind {
            registration::CheckKind::Ttl(t) => Some(t),
            _ => None,
        });
        let ttl_seconds = ttl.map_or(agent::AGENT_LEASE_TTL, |t| {
            u32::try_from(t.as_secs().max(1)).unwrap_or(agent::AGENT_LEASE_TTL)
        });
        // Consul starts a check critical until it first passes; a registration without
        // checks is passing.
        if !reg.checks.is_empty() {
            reg.instance.state = State::Failing;
        }
        let reply = self
            .proposer
            .propose(Command::Register {
                instance: reg.instance.clone(),
                ttl_seconds,
                lease_id: None,
            })
            .await;
        match reply {
            Ok(crate::catalog::Reply::Registered { lease_id, .. }) => {
                self.agent
                    .adopt(&reg.instance, lease_id, &reg.checks, token);
                respond(StatusCode::OK, "text/plain; charset=utf-8", "")
            }
            Ok(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "register produced no lease",
            ),
            Err(e) => propose_refusal(&e),
        }
    }

    /// Refuses unless the caller may register `service` ("" for an unknown instance:
    /// only `register` on `*` may touch it).
    fn authorize(&self, service: &str, token: Option<&HeaderValue>) -> Result<(), HttpResponse> {
        let caller = caller(&self.shared, token)?;
        if caller.may(Right::Register, service) {
            return Ok(());
        }
        let s = auth::denied(
            &self.shared,
            &caller,
            "ConsulRegister",
            Right::Register,
            service,
        );
        Err(text(
            StatusCode::FORBIDDEN,
            format!("Permission denied: {}", s.message()),
        ))
    }

    /// [`authorize`](Self::authorize) for the service of instance `id`.
    fn may_change(
        &self,
        ns: &str,
        id: &str,
        token: Option<&HeaderValue>,
    ) -> Result<(), HttpResponse> {
        self.authorize(&auth::service_of_instance(&self.shared, ns, id), token)
    }

    async fn deregister(&self, ns: &str, id: &str, token: Option<&HeaderValue>) -> HttpResponse {
        if let Err(r) = self.may_change(ns, id, token) {
            return r;
        }
        self.agent.forget(ns, id);
        match self
            .proposer
            .propose(Command::Deregister { namespace: ns.to_string(), id: id.to_string() })
            .await
        {
            Ok(_) => respond(StatusCode::OK, "text/plain; charset=utf-8", ""),
            Err(crate::raft::propose::ProposeError::Refused(crate::catalog::ApplyError::InstanceNotFound { .. })) => {
                text(StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."))
            }
            Err(e) => propose_refusal(&e),
        }
    }

    async fn maintenance(
        &self,
        q: &Query,
        ns: &str,
        id: &str,
        token: Option<&HeaderValue>,
    ) -> HttpResponse {
        let Some(enable) = q.enable else {
            return text(StatusCode::BAD_REQUEST, "Missing value for enable");
        };
        if let Err(r) = self.may_change(ns, id, token) {
            return r;
        }
        let Some((instance, _)) = self.shared.catalog.read().instance_and_lease(ns, id) else {
            return text(StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}"));
        };
        let state = match (enable, instance.state) {
            (true, _) => State::Draining,
            (false, State::Draining) => State::Serving,
            (false, s) => s,
        };
        if state == instance.state {
            return respond(StatusCode::OK, "text/plain; charset=utf-8", "");
        }
        match self
            .proposer
            .propose(Command::SetState {
                namespace: ns.to_string(),
                id: id.to_string(),
                state,
            })
            .await
        {
            Ok(_) => respond(StatusCode::OK, "text/plain; charset=utf-8", ""),
            Err(e) => propose_refusal(&e),
        }
    }

    async fn check(
        &self,
        req: http::Request<hyper::body::Incoming>,
        q: &Query,
        ns: &str,
        path: &str,
        token: Option<&HeaderValue>,
    ) -> HttpResponse {
        let Some(rest) = path.strip_prefix("/v1/agent/check/") else {
            return text(StatusCode::NOT_FOUND, "unknown check endpoint");
        };
        let Some((verb, id)) = rest.split_once('/') else {
            return text(
                StatusCode::NOT_FOUND,
                "use /v1/agent/check/{pass,warn,fail,update}/:check_id",
            );
        };
        let Some(check_id) = percent_encoding::percent_decode_str(id)
            .decode_utf8()
            .ok()
            .map(|s| s.into_owned())
        else {
            return text(StatusCode::BAD_REQUEST, "the check id is not UTF-8");
        };
        let note = q.note.clone();
        let (status, output) = match verb {
            "pass" => (Status::Passing, note),
            "warn" => (Status::Warning, note),
            "fail" => (Status::Critical, note),
            "update" => {
                let body = match read_body(req, 16 * 1024).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                match update_body(&body) {
                    Ok(u) => u,
                    Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
                }
            }
            _ => {
                return text(
                    StatusCode::NOT_FOUND,
                    "use /v1/agent/check/{pass,warn,fail,update}/:check_id",
                )
            }
        };
        // Who may update it: a token with register on the instance's service.
        let found = self.agent.find_check(ns, &check_id);
        let service = found.as_ref().map_or("", |(i, _)| i.service.as_str());
        if let Err(r) = self.authorize(service, token) {
            return r;
        }
        let Some((instance, lease)) = found else {
            let e = agent::unknown_check(&check_id);
            return text(e.status, e.message);
        };
        match self
            .agent
            .update(&check_id, instance, lease, status, output, token)
            .await
        {
            Ok(_) => respond(StatusCode::OK, "text/plain; charset=utf-8", ""),
            Err(e) => text(e.status, e.message),
        }
    }
}

/// `PUT /v1/agent/check/update/:id`'s body: `{"Status": ..., "Output": ...}`.
pub fn update_body(body: &[u8]) -> Result<(Status, Option<String>), registration::BodyError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| registration::body_error("body", format!("not JSON: {e}")))?;
    let serde_json::Value::Object(obj) = v else {
        return Err(registration::body_error("body", "must be a JSON object"));
    };
    let status = match registration::field(&obj, "Status") {
        Some(serde_json::Value::String(s)) => Status::parse(s).ok_or_else(|| {
            registration::body_error("Status", "must be passing, warning or critical")
        })?,
        Some(_) => return Err(registration::body_error("Status", "must be a string")),
        None => Status::Passing,
    };
    let output = match registration::field(&obj, "Output") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(registration::body_error("Output", "must be a string")),
        None => None,
    };
    Ok((status, output))
}

/// The answer to a write that did not commit: 400 for a refusal, 429 with `Retry-After`
/// (whole seconds, at least 1) when the leader is overloaded, 503 otherwise.
pub(crate) fn propose_refusal(e: &crate::raft::propose::ProposeError) -> HttpResponse {
    use crate::raft::propose::ProposeError;
    match e {
        ProposeError::Refused(crate::catalog::ApplyError::KvFull { .. }) => {
            text(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        ProposeError::Refused(_) => text(StatusCode::BAD_REQUEST, e.to_string()),
        ProposeError::Overloaded { retry_after, .. } => {
            let mut r = text(StatusCode::TOO_MANY_REQUESTS, e.to_string());
            let secs = retry_after.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
            r
        }
        _ => {
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// The body, at most `max` bytes (413 past it).
pub async fn read_body(
    req: http::Request<hyper::body::Incoming>,
    max: usize,
) -> Result<Bytes, HttpResponse> {
    match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {max} bytes"),
            ))
        }
        Err(e) => Err(text(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}"),
        )),
    }
}
