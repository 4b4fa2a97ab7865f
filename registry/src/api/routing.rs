//! `switchyard.v1.Routing`: PutPolicy, GetPolicy, PolicyHistory, RollbackPolicy, and
//! SetMtls (a service's mTLS mode, kept beside its policy).

use std::collections::BTreeSet;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use tonic::{Request, Response, Status};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::routing_server::Routing;

use super::convert::{policy_from_proto, record_to_proto};
use super::status;
use crate::auth;
use crate::catalog::{Catalog, Command, Reply};
use crate::model::acl::Right;
use crate::model::policy::{validate_policy, MAX_POLICY_BYTES};
use crate::model::{validate_name, validate_namespace};
use crate::raft::propose::{ProposeError, Proposer};
use crate::shared::Shared;

pub struct RoutingApi {
    shared: Arc<Shared>,
    proposer: Proposer,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn record_of(reply: Reply) -> Result<pb::PolicyRecord, Status> {
    match reply {
        Reply::Policy { record } => Ok(record_to_proto(&record)),
        _ => Err(Status::internal("policy change produced no record")),
    }
}

/// The command a `PutPolicy` proposes, checked at the edge against this node's catalog
/// (the versions its instances have, and the catalog's own bounds), which `catalog`
/// reads (a lock held only for each look, not while the policy is checked). Public
/// (hidden) for the `write_requests` fuzz target.
#[doc(hidden)]
pub fn put_policy_command<C: Deref<Target = Catalog>>(
    catalog: impl Fn() -> C,
    req: pb::PutPolicyRequest,
    at_ms: u64,
) -> Result<Command, Status> {
    let namespace = RoutingApi::target(&req.namespace, &req.service)?;
    let policy = match req.policy {
        None => None,
        Some(p) => {
            let size = p.encoded_len();
            if size > MAX_POLICY_BYTES {
                return Err(Status::invalid_argument(format!(
                    "invalid policy: {size} bytes encoded, at most {MAX_POLICY_BYTES}"
                )));
            }
            let policy = policy_from_proto(p)?;
            let versions: BTreeSet<String> = catalog()
                .resolve(&namespace, &req.service, "")
                .iter()
                .map(|i| i.version.clone())
                .collect();
            validate_policy(&policy, &versions)?;
            Some(policy)
        }
    };
    // The catalog's own bounds, on this node's state: a request over one is refused
    // here with apply's message, without a log entry (apply checks again).
    catalog()
        .check_policy(&namespace, &req.service, policy.as_ref())
        .map_err(|e| status(ProposeError::Refused(e)))?;
    Ok(Command::PutPolicy {
        namespace,
        service: req.service,
        policy,
        at_ms,
    })
}

impl RoutingApi {
    pub fn new(shared: Arc<Shared>, proposer: Proposer) -> Self {
        Self { shared, proposer }
    }

    fn target(namespace: &str, service: &str) -> Result<String, Status> {
        let namespace = validate_namespace("namespace", namespace)?;
        validate_name("service", service)?;
        Ok(namespace)
    }

    async fn put(&self, req: pb::PutPolicyRequest) -> Result<pb::PutPolicyResponse, Status> {
        let command = put_policy_command(|| self.shared.catalog.read(), req, now_ms())?;
        let reply = self.proposer.propose(command).await.map_err(status)?;
        Ok(pb::PutPolicyResponse {
            revision: record_of(reply)?.revision,
        })
    }

    fn get(&self, req: pb::GetPolicyRequest) -> Result<pb::GetPolicyResponse, Status> {
        let namespace = Self::target(&req.namespace, &req.service)?;
        let catalog = self.shared.catalog.read();
        Ok(pb::GetPolicyResponse {
            current: catalog
                .policy(&namespace, &req.service)
                .filter(|r| r.policy.is_some())
                .map(record_to_proto),
            mtls: super::convert::mtls_mode(catalog.mtls_strict(&namespace, &req.service)) as i32,
        })
    }

    fn history(&self, req: pb::PolicyHistoryRequest) -> Result<pb::PolicyHistoryResponse, Status> {
        let namespace = Self::target(&req.namespace, &req.service)?;
        let catalog = self.shared.catalog.read();
        Ok(pb::PolicyHistoryResponse {
            records: catalog
                .policy_history(&namespace, &req.service)
                .iter()
                .map(record_to_proto)
                .collect(),
        })
    }

    async fn rollback(
        &self,
        req: pb::RollbackPolicyRequest,
    ) -> Result<pb::RollbackPolicyResponse, Status> {
        let namespace = Self::target(&req.namespace, &req.service)?;
        let reply = self
            .proposer
            .propose(Command::RollbackPolicy {
                namespace,
                service: req.service,
                to_revision: req.to_revision,
                at_ms: now_ms(),
            })
            .await
            .map_err(status)?;
        let restored = record_of(reply)?;
        Ok(pb::RollbackPolicyResponse {
            revision: restored.revision,
            restored: Some(restored),
        })
    }
}

#[tonic::async_trait]
impl Routing for RoutingApi {
    async fn set_mtls(
        &self,
        request: Request<pb::SetMtlsRequest>,
    ) -> Result<Response<pb::SetMtlsResponse>, Status> {
        let r = async {
            let req = request.get_ref();
            let namespace = Self::target(&req.namespace, &req.service)?;
            let strict = match pb::MtlsMode::try_from(req.mode) {
                Ok(pb::MtlsMode::Strict) => true,
                Ok(pb::MtlsMode::Permissive | pb::MtlsMode::Unspecified) => false,
                Err(_) => {
                    return Err(Status::invalid_argument(
                        "invalid mode: MTLS_MODE_PERMISSIVE or MTLS_MODE_STRICT",
                    ))
                }
            };
            auth::check(
                &self.shared,
                request.metadata(),
                "SetMtls",
                Right::Policy,
                &req.service,
            )?;
            let reply = self
                .proposer
                .propose(Command::SetMtls {
                    namespace,
                    service: req.service.clone(),
                    strict,
                })
                .await
                .map_err(status)?;
            Ok(pb::SetMtlsResponse {
                revision: match reply {
                    Reply::Done { revision } => revision,
                    _ => 0,
                },
            })
        }
        .await;
        self.shared.metrics.observe("SetMtls", r).map(Response::new)
    }

    async fn put_policy(
        &self,
        request: Request<pb::PutPolicyRequest>,
    ) -> Result<Response<pb::PutPolicyResponse>, Status> {
        let service = request.get_ref().service.clone();
        let r = match auth::check(
            &self.shared,
            request.metadata(),
            "PutPolicy",
            Right::Policy,
            &service,
        ) {
            Ok(_) => self.put(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("PutPolicy", r)
            .map(Response::new)
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let service = request.get_ref().service.clone();
        let r = match auth::check(
            &self.shared,
            request.metadata(),
            "GetPolicy",
            Right::Read,
            &service,
        ) {
            Ok(_) => self.get(request.into_inner()),
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("GetPolicy", r)
            .map(Response::new)
    }

    async fn policy_history(
        &self,
        request: Request<pb::PolicyHistoryRequest>,
    ) -> Result<Response<pb::PolicyHistoryResponse>, Status> {
        let service = request.get_ref().service.clone();
        let r = match auth::check(
            &self.shared,
            request.metadata(),
            "PolicyHistory",
            Right::Read,
            &service,
        ) {
            Ok(_) => self.history(request.into_inner()),
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("PolicyHistory", r)
            .map(Response::new)
    }

    async fn rollback_policy(
        &self,
        request: Request<pb::RollbackPolicyRequest>,
    ) -> Result<Response<pb::RollbackPolicyResponse>, Status> {
        let service = request.get_ref().service.clone();
        let r = match auth::check(
            &self.shared,
            request.metadata(),
            "RollbackPolicy",
            Right::Policy,
            &service,
        ) {
            Ok(_) => self.rollback(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("RollbackPolicy", r)
            .map(Response::new)
    }
}
