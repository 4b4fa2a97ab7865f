//! `switchyard.v1.Registry`: Register, KeepAlive, Deregister, SetState.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_proto::v1::registry_server::Registry;

use super::convert::{instance_from_proto, state_from_proto};
use super::{status, MAX_LEASES_PER_KEEPALIVE};
use crate::auth::{self, Caller};
use crate::catalog::{Command, Reply};
use crate::model::acl::Right;
use crate::model::{validate_id, validate_namespace, validate_ttl};
use crate::raft::propose::Proposer;
use crate::shared::Shared;

pub struct RegistryApi {
    shared: Arc<Shared>,
    proposer: Proposer,
    /// KeepAlive streams open on this node (relayed ones included), bounded by
    /// `max_keepalive_streams`.
    keepalives: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one open KeepAlive stream for as long as it lives.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl StreamSlot {
    /// A slot, or `None` when `max` streams are open already.
    fn take(open: &Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| StreamSlot(open.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The command a `Register` proposes, checked at the edge. Public (hidden) for the
/// `write_requests` fuzz target.
#[doc(hidden)]
pub fn register_command(req: pb::RegisterRequest) -> Result<Command, Status> {
    let instance = req
        .instance
        .ok_or_else(|| Status::invalid_argument("invalid instance: must be set"))?;
    let instance = instance_from_proto(instance)?;
    let ttl_seconds = validate_ttl("ttl_seconds", req.ttl_seconds)?;
    let lease_id = (req.lease_id != 0).then_some(req.lease_id);
    Ok(Command::Register {
        instance,
        ttl_seconds,
        lease_id,
    })
}

impl RegistryApi {
    pub fn new(shared: Arc<Shared>, proposer: Proposer) -> Self {
        Self {
            shared,
            proposer,
            keepalives: Arc::default(),
        }
    }

    async fn register(&self, req: pb::RegisterRequest) -> Result<pb::RegisterResponse, Status> {
        let reply = self
            .proposer
            .propose(register_command(req)?)
            .await
            .map_err(status)?;
        match reply {
            Reply::Registered {
                lease_id,
                ttl_seconds,
                revision,
            } => Ok(pb::RegisterResponse {
                lease_id,
                revision,
                ttl_seconds,
            }),
            _ => Err(Status::internal("register produced no lease")),
        }
    }

    /// A token may deregister or change the state of the instances of the services it
    /// may register (an unknown instance: only with register on `*`).
    fn may_change<T>(
        &self,
        request: &Request<T>,
        namespace: &str,
        id: &str,
        method: &'static str,
    ) -> Result<(), Status> {
        let service = auth::service_of_instance(&self.shared, namespace, id);
        auth::check(
            &self.shared,
            request.metadata(),
            method,
            Right::Register,
            &service,
        )
        .map(|_| ())
    }

    async fn deregister(
        &self,
        req: pb::DeregisterRequest,
    ) -> Result<pb::DeregisterResponse, Status> {
        let namespace = validate_namespace("namespace", &req.namespace)?;
        validate_id("id", &req.id)?;
        let reply = self
            .proposer
            .propose(Command::Deregister {
                namespace,
                id: req.id,
            })
            .await
            .map_err(status)?;
        Ok(pb::DeregisterResponse {
            revision: revision_of(&reply),
        })
    }

    async fn set_state(&self, req: pb::SetStateRequest) -> Result<pb::SetStateResponse, Status> {
        let namespace = validate_namespace("namespace", &req.namespace)?;
        validate_id("id", &req.id)?;
        let state = state_from_proto("state", req.state, None)?;
        let reply = self
            .proposer
            .propose(Command::SetState {
                namespace,
                id: req.id,
                state,
            })
            .await
            .map_err(status)?;
        Ok(pb::SetStateResponse {
            revision: revision_of(&reply),
        })
    }
}

/// Refuses unless `caller` may register every service the leases keep alive.
fn may_renew(shared: &Shared, caller: &Caller, leases: &[u64]) -> Result<(), Status> {
    if matches!(caller, Caller::Open) {
        return Ok(());
    }
    let catalog = shared.catalog.read();
    for lease in leases {
        for service in catalog.lease_services(*lease) {
            if !caller.may(Right::Register, &service) {
                drop(catalog);
                return Err(auth::denied(
                    shared,
                    caller,
                    "KeepAlive",
                    Right::Register,
                    &service,
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn revision_of(reply: &Reply) -> u64 {
    match reply {
        Reply::Registered { revision, .. } | Reply::Done { revision } => *revision,
        Reply::Policy { record } => record.revision,
        Reply::Rollout { revision, .. } | Reply::Kv { revision, .. } => *revision,
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for RegistryApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let service = request
            .get_ref()
            .instance
            .as_ref()
            .map(|i| i.service.clone())
            .unwrap_or_default();
        let r = match auth::check(
            &self.shared,
            request.metadata(),
            "Register",
            Right::Register,
            &service,
        ) {
            Ok(_) => self.register(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("Register", r)
            .map(Response::new)
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let max = self.shared.config.max_keepalive_streams;
        let Some(slot) = StreamSlot::take(&self.keepalives, max) else {
            return Err(Status::resource_exhausted(format!(
                "this node already serves {max} KeepAlive streams: renew many leases in one stream (up to {MAX_LEASES_PER_KEEPALIVE} per message), use another node, or raise max_keepalive_streams"
            )));
        };
        // A node whose storage failed has a stopped Raft that may still name itself the
        // leader: relaying to that address would loop back here. Its lease clocks are
        // dead too, so renewing here would lie: send the client elsewhere.
        if let Some(failure) = self.shared.storage.failure() {
            return Err(Status::unavailable(format!(
                "{failure}; this node renews no leases until it restarts: reconnect to another node"
            )));
        }
        // Who renews: each message's leases are checked against the token's register
        // rights on the services they keep alive, on this node, before any renewal.
        let caller = auth::caller(&self.shared, request.metadata())?;
        let token_header = request.metadata().get("authorization").cloned();
        self.shared.metrics.grpc("KeepAlive", Code::Ok);
        if !self.proposer.is_leader() {
            // Only the leader runs lease clocks: relay the stream to it.
            let Some((_, addr)) = self.proposer.leader() else {
                return Err(Status::unavailable(
                    "no registry leader is elected; retry when a majority of nodes is up",
                ));
            };
            let channel = self
                .proposer
                .network()
                .channel(&addr)
                .map_err(Status::unavailable)?;
            let inbound = request.into_inner();
            let shared = self.shared.clone();
            let outbound = inbound
                .take_while(move |r| match r {
                    Ok(req) => may_renew(&shared, &caller, &req.lease_ids).is_ok(),
                    Err(_) => false,
                })
                .filter_map(|r| r.ok());
            let mut relay = Request::new(outbound);
            if let Some(h) = token_header {
                relay.metadata_mut().insert("authorization", h);
            }
            let relayed = RegistryClient::new(channel)
                .keep_alive(relay)
                .await?
                .into_inner();
            // The slot lives as long as the relayed stream.
            let relayed = relayed.map(move |r| {
                let _slot = &slot;
                r
            });
            return Ok(Response::new(Box::pin(relayed)));
        }
        let mut inbound = request.into_inner();
        let shared = self.shared.clone();
        let proposer = self.proposer.clone();
        let (tx, rx) = mpsc::channel(16);
        let mut shutdown = shared.shutdown.clone();
        let storage = shared.storage.clone();
        tokio::spawn(async move {
            // Counted until this task ends (the client went away or the node stops).
            let _slot = slot;
            let mut renewed = Vec::new();
            loop {
                // Err: the node stops serving this stream (shutdown, or storage failed).
                let msg = tokio::select! {
                    m = inbound.next() => Ok(m),
                    _ = shutdown.wait_for(|s| *s) => Err(None),
                    failure = storage.failed() => Err(Some(failure)),
                };
                let req = match msg {
                    Ok(Some(Ok(req))) => req,
                    // A message that does not decode or is over the limit: say so (the
                    // stream used to end with OK and no answer).
                    Ok(Some(Err(status))) => {
                        let status = match status.code() {
                            Code::OutOfRange => Status::resource_exhausted(format!(
                                "a KeepAlive message is larger than {} bytes; send at most {MAX_LEASES_PER_KEEPALIVE} lease ids per message",
                                crate::config::MAX_REQUEST_BYTES
                            )),
                            _ => status,
                        };
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    // The client closed its side.
                    Ok(None) => return,
                    Err(None) => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "the registry is shutting down; reconnect to another node",
                            )))
                            .await;
                        return;
                    }
                    Err(Some(failure)) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "{failure}; this node renews no leases until it restarts: reconnect to another node"
                            ))))
                            .await;
                        return;
                    }
                };
                if req.lease_ids.len() > MAX_LEASES_PER_KEEPALIVE {
                    let _ = tx
                        .send(Err(Status::invalid_argument(format!(
                            "invalid lease_ids: {} ids in one message, at most {MAX_LEASES_PER_KEEPALIVE}",
                            req.lease_ids.len()
                        ))))
                        .await;
                    return;
                }
                if let Err(e) = may_renew(&shared, &caller, &req.lease_ids) {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                // Only the leader's clocks count: a stream opened while this node led
                // must not go on renewing here once another node leads (that one would
                // expire the leases). The client reconnects; any node relays.
                if !proposer.is_leader() {
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "this registry node no longer leads, so it cannot renew leases: reconnect (any node relays KeepAlive to the leader)",
                        )))
                        .await;
                    return;
                }
                renewed.clear();
                shared.leases.renew(&req.lease_ids, &mut renewed);
                let leases = renewed
                    .iter()
                    .map(|(lease_id, ttl)| pb::LeaseStatus {
                        lease_id: *lease_id,
                        ttl_seconds: ttl.unwrap_or(0),
                        found: ttl.is_some(),
                    })
                    .collect();
                if tx.send(Ok(pb::KeepAliveResponse { leases })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let r = match self.may_change(
            &request,
            request.get_ref().namespace.as_str(),
            &request.get_ref().id,
            "Deregister",
        ) {
            Ok(()) => self.deregister(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("Deregister", r)
            .map(Response::new)
    }

    async fn set_state(
        &self,
        request: Request<pb::SetStateRequest>,
    ) -> Result<Response<pb::SetStateResponse>, Status> {
        let r = match self.may_change(
            &request,
            request.get_ref().namespace.as_str(),
            &request.get_ref().id,
            "SetState",
        ) {
            Ok(()) => self.set_state(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("SetState", r)
            .map(Response::new)
    }
}
