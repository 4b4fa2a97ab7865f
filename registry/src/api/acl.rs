//! `switchyard.v1.Acl`: bootstrap, tokens, who am I. A secret is made here, shown in the
//! answer once, and only its hash goes into the log.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::acl_server::Acl;

use super::status;
use crate::auth::{self, Caller};
use crate::catalog::Command;
use crate::model::acl::{
    new_accessor_id, service_identity, validate_description, validate_rules, Right, Rule, Secret,
    Token,
};
use crate::model::validate_name;
use crate::raft::propose::Proposer;
use crate::rollout::now_ms;
use crate::shared::Shared;

pub struct AclApi {
    shared: Arc<Shared>,
    proposer: Proposer,
}

fn info(t: &Token, acl_enabled: bool) -> pb::TokenInfo {
    pb::TokenInfo {
        accessor_id: t.accessor_id.clone(),
        description: t.description.clone(),
        rules: t.rules.iter().map(ToString::to_string).collect(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms.unwrap_or(0),
        anonymous: false,
        acl_enabled,
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The longest token lifetime accepted: 10 years.
const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// The token a `CreateToken` makes (and its secret, shown once), checked at the edge.
/// Public (hidden) for the `write_requests` fuzz target.
#[doc(hidden)]
pub fn token_of(req: pb::CreateTokenRequest) -> Result<(Token, String), Status> {
    if req.rules.len() > crate::model::acl::MAX_RULES {
        return Err(invalid(format!(
            "invalid rules: {} given, at most {}",
            req.rules.len(),
            crate::model::acl::MAX_RULES
        )));
    }
    let mut rules = req
        .rules
        .iter()
        .map(|r| Rule::parse(r).map_err(invalid))
        .collect::<Result<Vec<_>, _>>()?;
    if !req.service_identity.is_empty() {
        validate_name("service_identity", &req.service_identity)?;
        rules.extend(service_identity(&req.service_identity));
    }
    if rules.is_empty() {
        return Err(invalid(
            "a token needs at least one rule (--rule KIND:PATTERN:RIGHTS) or --service-identity",
        ));
    }
    AclApi::new_token(req.description, rules, req.ttl_ms)
}

impl AclApi {
    pub fn new(shared: Arc<Shared>, proposer: Proposer) -> Self {
        Self { shared, proposer }
    }

    fn new_token(
        description: String,
        rules: Vec<Rule>,
        ttl_ms: u64,
    ) -> Result<(Token, String), Status> {
        validate_description(&description).map_err(invalid)?;
        validate_rules(&rules).map_err(invalid)?;
        if ttl_ms > MAX_TTL_MS {
            return Err(Status::invalid_argument("invalid ttl: at most 10 years"));
        }
        let (secret, hash) = Secret::generate().map_err(|e| Status::internal(e.to_string()))?;
        let now = now_ms();
        Ok((
            Token {
                accessor_id: new_accessor_id().map_err(|e| Status::internal(e.to_string()))?,
                secret_hash: hash,
                description,
                rules,
                created_at_ms: now,
                expires_at_ms: (ttl_ms > 0).then(|| now.saturating_add(ttl_ms)),
            },
            secret,
        ))
    }

    async fn bootstrap(&self, req: pb::BootstrapRequest) -> Result<pb::TokenSecret, Status> {
        if self.shared.catalog.read().acl_enabled() {
            return Err(status(crate::raft::propose::ProposeError::Refused(
                crate::catalog::ApplyError::AlreadyBootstrapped,
            )));
        }
        let description = if req.description.is_empty() {
            "bootstrap operator token".to_string()
        } else {
            req.description
        };
        let rules = vec![
            Rule::parse("operator::members,acl,ca").map_err(invalid)?,
            Rule::parse("service:*:register,read,policy,rollout").map_err(invalid)?,
            Rule::parse("kv::read,write").map_err(invalid)?,
        ];
        let (token, secret) = Self::new_token(description, rules, 0)?;
        self.proposer
            .propose(Command::AclBootstrap {
                token: Box::new(token.clone()),
            })
            .await
            .map_err(status)?;
        tracing::info!(accessor = %token.accessor_id, "ACLs bootstrapped: the default is deny from now on");
        Ok(pb::TokenSecret {
            token: Some(info(&token, true)),
            secret,
        })
    }

    async fn create(&self, req: pb::CreateTokenRequest) -> Result<pb::TokenSecret, Status> {
        let (token, secret) = token_of(req)?;
        self.proposer
            .propose(Command::PutToken {
                token: Box::new(token.clone()),
            })
            .await
            .map_err(status)?;
        tracing::info!(accessor = %token.accessor_id, "token created");
        Ok(pb::TokenSecret {
            token: Some(info(&token, self.shared.catalog.read().acl_enabled())),
            secret,
        })
    }

    async fn delete(&self, req: pb::TokenRef) -> Result<pb::DeleteTokenResponse, Status> {
        self.proposer
            .propose(Command::DeleteToken {
                accessor_id: req.accessor_id.clone(),
            })
            .await
            .map_err(status)?;
        tracing::info!(accessor = %req.accessor_id, "token deleted");
        Ok(pb::DeleteTokenResponse {})
    }

    fn operator<T>(&self, req: &Request<T>, method: &'static str) -> Result<Caller, Status> {
        auth::check(&self.shared, req.metadata(), method, Right::Acl, "")
    }
}

#[tonic::async_trait]
impl Acl for AclApi {
    async fn bootstrap(
        &self,
        request: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::TokenSecret>, Status> {
        let r = AclApi::bootstrap(self, request.into_inner()).await;
        self.shared
            .metrics
            .observe("AclBootstrap", r)
            .map(Response::new)
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::TokenSecret>, Status> {
        let r = match self.operator(&request, "CreateToken") {
            Ok(_) => self.create(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("CreateToken", r)
            .map(Response::new)
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let r = self.operator(&request, "ListTokens").map(|_| {
            let catalog = self.shared.catalog.read();
            let on = catalog.acl_enabled();
            pb::ListTokensResponse {
                tokens: catalog.tokens().map(|t| info(t, on)).collect(),
            }
        });
        self.shared
            .metrics
            .observe("ListTokens", r)
            .map(Response::new)
    }

    async fn read_token(
        &self,
        request: Request<pb::TokenRef>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let r = self.operator(&request, "ReadToken").and_then(|_| {
            let catalog = self.shared.catalog.read();
            let id = &request.get_ref().accessor_id;
            catalog
                .token(id)
                .map(|t| info(t, catalog.acl_enabled()))
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "no token has accessor id {id:?}: see `switchyard acl token list`"
                    ))
                })
        });
        self.shared
            .metrics
            .observe("ReadToken", r)
            .map(Response::new)
    }

    async fn delete_token(
        &self,
        request: Request<pb::TokenRef>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        let r = match self.operator(&request, "DeleteToken") {
            Ok(_) => self.delete(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("DeleteToken", r)
            .map(Response::new)
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let r =
            auth::caller(&self.shared, request.metadata()).map(|c| match c {
                Caller::Token(t) => info(&t, true),
                Caller::Open => pb::TokenInfo {
                    anonymous: true,
                    acl_enabled: false,
                    description: "ACLs are not bootstrapped: every request is allowed".into(),
                    ..Default::default()
                },
                Caller::Anonymous(rules) => pb::TokenInfo {
                    anonymous: true,
                    acl_enabled: true,
                    description: format!(
                        "no token: anonymous requests have the rules below (--anonymous-rule); DNS answers by {}",
                        rules_text(&self.shared.config.acl.dns)
                    ),
                    rules: rules.iter().map(ToString::to_string).collect(),
                    ..Default::default()
                },
            });
        self.shared.metrics.observe("WhoAmI", r).map(Response::new)
    }
}

/// Rules as the CLI writes them, or `none`.
fn rules_text(rules: &[crate::model::acl::Rule]) -> String {
    if rules.is_empty() {
        return "none".into();
    }
    rules
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}
