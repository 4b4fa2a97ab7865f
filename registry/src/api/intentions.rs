//! `switchyard.v1.Intentions`: Put, Delete, List, Check.
//!
//! Writing needs `policy` on the destination (who may call a service is its owners'
//! call, as its routing is); for the destination `*` that means `policy` on every
//! service (a `service:*:policy` rule). Reading needs `read` on the destination.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::intentions_server::Intentions;

use super::convert::{intention_from_proto, intention_record_to_proto, intention_to_proto};
use super::status;
use crate::auth;
use crate::catalog::{Command, Reply};
use crate::model::acl::Right;
use crate::model::intention::{decide, validate_destination, validate_source};
use crate::model::validate_namespace;
use crate::raft::propose::Proposer;
use crate::rollout::now_ms;
use crate::shared::Shared;

pub struct IntentionsApi {
    shared: Arc<Shared>,
    proposer: Proposer,
}

impl IntentionsApi {
    pub fn new(shared: Arc<Shared>, proposer: Proposer) -> Self {
        Self { shared, proposer }
    }
}

fn revision_of(reply: Reply) -> u64 {
    match reply {
        Reply::Done { revision } => revision,
        _ => 0,
    }
}

#[tonic::async_trait]
impl Intentions for IntentionsApi {
    async fn put(
        &self,
        request: Request<pb::PutIntentionRequest>,
    ) -> Result<Response<pb::IntentionReply>, Status> {
        let r = async {
            let namespace = validate_namespace("namespace", &request.get_ref().namespace)?;
            let wire = request
                .get_ref()
                .intention
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("intention: required"))?;
            let intention = intention_from_proto(wire)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "PutIntention",
                Right::Policy,
                &intention.destination,
            )?;
            let reply = self
                .proposer
                .propose(Command::PutIntention {
                    namespace,
                    intention,
                    at_ms: now_ms(),
                })
                .await
                .map_err(status)?;
            Ok(pb::IntentionReply {
                revision: revision_of(reply),
            })
        }
        .await;
        self.shared
            .metrics
            .observe("PutIntention", r)
            .map(Response::new)
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteIntentionRequest>,
    ) -> Result<Response<pb::IntentionReply>, Status> {
        let r = async {
            let req = request.get_ref();
            let namespace = validate_namespace("namespace", &req.namespace)?;
            validate_source("source", &req.source)?;
            validate_destination("destination", &req.destination)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "DeleteIntention",
                Right::Policy,
                &req.destination,
            )?;
            let reply = self
                .proposer
                .propose(Command::DeleteIntention {
                    namespace,
                    source: req.source.clone(),
                    destination: req.destination.clone(),
                    at_ms: now_ms(),
                })
                .await
                .map_err(status)?;
            Ok(pb::IntentionReply {
                revision: revision_of(reply),
            })
        }
        .await;
        self.shared
            .metrics
            .observe("DeleteIntention", r)
            .map(Response::new)
    }

    async fn list(
        &self,
        request: Request<pb::ListIntentionsRequest>,
    ) -> Result<Response<pb::ListIntentionsResponse>, Status> {
        let r = (|| {
            let req = request.get_ref();
            let namespace = validate_namespace("namespace", &req.namespace)?;
            if !req.destination.is_empty() {
                validate_destination("destination", &req.destination)?;
            }
            let resource = if req.destination.is_empty() {
                "*"
            } else {
                &req.destination
            };
            auth::check(
                &self.shared,
                request.metadata(),
                "ListIntentions",
                Right::Read,
                resource,
            )?;
            let wanted = |d: &str| req.destination.is_empty() || d == req.destination;
            let catalog = self.shared.catalog.read();
            Ok(pb::ListIntentionsResponse {
                intentions: catalog
                    .intentions(&namespace)
                    .iter()
                    .filter(|i| wanted(&i.destination))
                    .map(intention_to_proto)
                    .collect(),
                history: if req.history {
                    catalog
                        .intention_history(&namespace)
                        .iter()
                        .filter(|r| wanted(&r.destination))
                        .map(intention_record_to_proto)
                        .collect()
                } else {
                    Vec::new()
                },
                revision: catalog.revision(),
            })
        })();
        self.shared
            .metrics
            .observe("ListIntentions", r)
            .map(Response::new)
    }

    async fn check(
        &self,
        request: Request<pb::CheckIntentionRequest>,
    ) -> Result<Response<pb::CheckIntentionResponse>, Status> {
        let r = (|| {
            let req = request.get_ref();
            let namespace = validate_namespace("namespace", &req.namespace)?;
            crate::model::validate_name("source", &req.source)?;
            crate::model::validate_name("destination", &req.destination)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "CheckIntention",
                Right::Read,
                &req.destination,
            )?;
            let rules = self.shared.catalog.read().intentions(&namespace);
            let verdict = decide(&rules, Some(&req.source), &req.destination);
            Ok(pb::CheckIntentionResponse {
                allowed: verdict.allowed,
                matched: verdict.by.map(intention_to_proto),
            })
        })();
        self.shared
            .metrics
            .observe("CheckIntention", r)
            .map(Response::new)
    }
}
