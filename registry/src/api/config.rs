//! `switchyard.v1.Config`: the KV store (Get, Put with check-and-set, Delete with
//! recurse, List) and feature flags (PutFlags, GetFlags, FlagHistory, RollbackFlags).
//!
//! KV calls need `kv` read or write rights on the key (a prefix for List); flags are the
//! resource `flags/<flag>` (`flags/` for whole documents), so `kv:flags/:write` lets a
//! token change every flag. A flag edit (set one, remove one, enable or disable) is a
//! read-modify-write of the namespace's document, proposed with the revision it read:
//! a concurrent edit makes it read again instead of losing one of the two.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use switchyard_core::flags::{self, FlagSet, EMPTY_DOCUMENT};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::config_server::Config;

use super::convert::kv_entry_to_proto;
use super::status;
use crate::auth;
use crate::catalog::{ApplyError, Command, Reply};
use crate::model::acl::Right;
use crate::model::kv::{validate_kv_key, validate_kv_prefix, MAX_KV_RECURSE, MAX_KV_VALUE_BYTES};
use crate::model::validate_namespace;
use crate::raft::propose::{ProposeError, Proposer};
use crate::rollout::now_ms;
use crate::shared::Shared;

/// Read-modify-write attempts of one flag edit before it gives up (each retry means
/// another edit landed in between).
const FLAG_EDIT_ATTEMPTS: usize = 5;

/// The ACL resource of one flag.
pub(crate) fn flag_resource(key: &str) -> String {
    format!("{}{key}", super::watch_route::FLAGS_RESOURCE)
}

pub struct ConfigApi {
    shared: Arc<Shared>,
    proposer: Proposer,
}

/// What a KV write did: applied or not (check-and-set), and the revision after it.
pub(crate) fn kv_outcome(reply: Reply) -> (bool, u64) {
    match reply {
        Reply::Kv { applied, revision } => (applied, revision),
        other => (true, super::registry::revision_of(&other)),
    }
}

/// Checks a KV write at the edge and makes its command (shared with the Consul API, and
/// public, hidden, for the `write_requests` fuzz target).
#[doc(hidden)]
pub fn kv_put_command(
    namespace: String,
    key: &str,
    value: Vec<u8>,
    flags: u64,
    cas: Option<u64>,
) -> Result<Command, Status> {
    validate_kv_key("key", key)?;
    if value.len() > MAX_KV_VALUE_BYTES {
        return Err(Status::invalid_argument(format!(
            "invalid value: {} bytes, at most {MAX_KV_VALUE_BYTES}: store large data elsewhere and keep a reference here",
            value.len()
        )));
    }
    Ok(Command::KvPut {
        namespace,
        key: key.to_string(),
        value,
        flags,
        cas,
    })
}

/// Checks a KV delete at the edge and makes its command (shared with the Consul API).
pub(crate) fn kv_delete_command(
    namespace: String,
    key: &str,
    recurse: bool,
    cas: Option<u64>,
) -> Result<Command, Status> {
    if recurse {
        validate_kv_prefix("key", key)?;
        if cas.is_some() {
            return Err(Status::invalid_argument(
                "invalid cas: check-and-set applies to one key, not with recurse",
            ));
        }
    } else {
        validate_kv_key("key", key)?;
    }
    Ok(Command::KvDelete {
        namespace,
        key: key.to_string(),
        recurse,
        cas,
    })
}

fn flags_reply(document: &str, revision: u64) -> pb::FlagsResponse {
    pb::FlagsResponse {
        flags: Some(pb::FlagsDocument {
            document: document.to_string(),
            revision,
        }),
    }
}

fn invalid_flags(e: flags::DocumentError) -> Status {
    Status::invalid_argument(format!("invalid flags: {e}"))
}

impl ConfigApi {
    pub fn new(shared: Arc<Shared>, proposer: Proposer) -> Self {
        Self { shared, proposer }
    }

    /// The namespace's current document and its revision (0 and an empty document when
    /// it has none).
    fn current_flags(&self, namespace: &str) -> (Arc<str>, u64) {
        let catalog = self.shared.catalog.read();
        match catalog.flags(namespace) {
            Some(r) => (r.document.clone(), r.revision),
            None => (EMPTY_DOCUMENT.into(), 0),
        }
    }

    async fn put_flags(
        &self,
        request: Request<pb::PutFlagsRequest>,
    ) -> Result<pb::FlagsResponse, Status> {
        use pb::put_flags_request::Change;
        let namespace = validate_namespace("namespace", &request.get_ref().namespace)?;
        let req = request.get_ref();
        let change = req.change.as_ref().ok_or_else(|| {
            Status::invalid_argument("change: required (document, import, set, remove or state)")
        })?;
        let resource = match change {
            Change::Set(d) => flag_resource(&d.key),
            Change::Remove(k) => flag_resource(k),
            Change::State(s) => flag_resource(&s.key),
            Change::Document(_) | Change::Import(_) => {
                super::watch_route::FLAGS_RESOURCE.to_string()
            }
        };
        auth::check(
            &self.shared,
            request.metadata(),
            "PutFlags",
            Right::KvWrite,
            &resource,
        )?;
        for _ in 0..FLAG_EDIT_ATTEMPTS {
            let (current, revision) = self.current_flags(&namespace);
            let document = match change {
                Change::Document(d) => FlagSet::parse(d).map(|s| s.document().to_string()),
                Change::Import(d) => flags::import(&current, d),
                Change::Set(d) => flags::set_flag(&current, &d.key, &d.definition),
                Change::Remove(k) => flags::remove_flag(&current, k),
                Change::State(s) => flags::set_state(&current, &s.key, s.enabled),
            }
            .map_err(invalid_flags)?;
            // A whole document replaces whatever is there unless the caller names a
            // revision; an edit is always made against the revision it read.
            let expected = match change {
                Change::Document(_) => req.expected_revision,
                _ => Some(req.expected_revision.unwrap_or(revision)),
            };
            let proposed = self
                .proposer
                .propose(Command::PutFlags {
                    namespace: namespace.clone(),
                    document: document.clone(),
                    expected_revision: expected,
                    at_ms: now_ms(),
                })
                .await;
            match proposed {
                Ok(reply) => {
                    return Ok(flags_reply(&document, super::registry::revision_of(&reply)));
                }
                // Someone else's edit landed between the read and the write: read again,
                // unless the caller pinned the revision itself.
                Err(ProposeError::Refused(ApplyError::FlagsChanged { .. }))
                    if req.expected_revision.is_none() =>
                {
                    // This node may not have applied that edit yet (a follower).
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => return Err(status(e)),
            }
        }
        Err(Status::aborted(format!(
            "the flags of namespace {namespace:?} kept changing during {FLAG_EDIT_ATTEMPTS} attempts: retry"
        )))
    }
}

#[tonic::async_trait]
impl Config for ConfigApi {
    async fn get(
        &self,
        request: Request<pb::KvGetRequest>,
    ) -> Result<Response<pb::KvGetResponse>, Status> {
        let r = (|| {
            let req = request.get_ref();
            let namespace = validate_namespace("namespace", &req.namespace)?;
            validate_kv_key("key", &req.key)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "KvGet",
                Right::KvRead,
                &req.key,
            )?;
            let catalog = self.shared.catalog.read();
            Ok(pb::KvGetResponse {
                entry: catalog
                    .kv_get(&namespace, &req.key)
                    .map(|e| kv_entry_to_proto(&e)),
                revision: catalog.revision(),
            })
        })();
        self.shared.metrics.observe("KvGet", r).map(Response::new)
    }

    async fn put(
        &self,
        request: Request<pb::KvPutRequest>,
    ) -> Result<Response<pb::KvWriteResponse>, Status> {
        let r = async {
            let (metadata, _, req) = request.into_parts();
            let namespace = validate_namespace("namespace", &req.namespace)?;
            let command = kv_put_command(namespace, &req.key, req.value, req.flags, req.cas)?;
            auth::check(&self.shared, &metadata, "KvPut", Right::KvWrite, &req.key)?;
            let (applied, revision) =
                kv_outcome(self.proposer.propose(command).await.map_err(status)?);
            Ok(pb::KvWriteResponse { applied, revision })
        }
        .await;
        self.shared.metrics.observe("KvPut", r).map(Response::new)
    }

    async fn delete(
        &self,
        request: Request<pb::KvDeleteRequest>,
    ) -> Result<Response<pb::KvWriteResponse>, Status> {
        let r = async {
            let req = request.get_ref();
            let namespace = validate_namespace("namespace", &req.namespace)?;
            let command = kv_delete_command(namespace, &req.key, req.recurse, req.cas)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "KvDelete",
                Right::KvWrite,
                &req.key,
            )?;
            let (applied, revision) =
                kv_outcome(self.proposer.propose(command).await.map_err(status)?);
            Ok(pb::KvWriteResponse { applied, revision })
        }
        .await;
        self.shared
            .metrics
            .observe("KvDelete", r)
            .map(Response::new)
    }

    async fn list(
        &self,
        request: Request<pb::KvListRequest>,
    ) -> Result<Response<pb::KvListResponse>, Status> {
        let r = (|| {
            let req = request.get_ref();
            let namespace = validate_namespace("namespace", &req.namespace)?;
            validate_kv_prefix("prefix", &req.prefix)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "KvList",
                Right::KvRead,
                &req.prefix,
            )?;
            let catalog = self.shared.catalog.read();
            let entries = catalog.kv_list(&namespace, &req.prefix, MAX_KV_RECURSE);
            Ok(pb::KvListResponse {
                entries: entries
                    .iter()
                    .map(|e| {
                        let mut p = kv_entry_to_proto(e);
                        if req.keys_only {
                            p.value.clear();
                        }
                        p
                    })
                    .collect(),
                revision: catalog.revision(),
            })
        })();
        self.shared.metrics.observe("KvList", r).map(Response::new)
    }

    async fn put_flags(
        &self,
        request: Request<pb::PutFlagsRequest>,
    ) -> Result<Response<pb::FlagsResponse>, Status> {
        let r = self.put_flags(request).await;
        self.shared
            .metrics
            .observe("PutFlags", r)
            .map(Response::new)
    }

    async fn get_flags(
        &self,
        request: Request<pb::GetFlagsRequest>,
    ) -> Result<Response<pb::FlagsResponse>, Status> {
        let r = (|| {
            let namespace = validate_namespace("namespace", &request.get_ref().namespace)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "GetFlags",
                Right::KvRead,
                super::watch_route::FLAGS_RESOURCE,
            )?;
            let (document, revision) = self.current_flags(&namespace);
            Ok(flags_reply(&document, revision))
        })();
        self.shared
            .metrics
            .observe("GetFlags", r)
            .map(Response::new)
    }

    async fn flag_history(
        &self,
        request: Request<pb::FlagHistoryRequest>,
    ) -> Result<Response<pb::FlagHistoryResponse>, Status> {
        let r = (|| {
            let namespace = validate_namespace("namespace", &request.get_ref().namespace)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "FlagHistory",
                Right::KvRead,
                super::watch_route::FLAGS_RESOURCE,
            )?;
            let records = self.shared.catalog.read().flag_history(&namespace);
            Ok(pb::FlagHistoryResponse {
                records: records
                    .into_iter()
                    .map(|r| pb::FlagRecord {
                        revision: r.revision,
                        at_ms: r.at_ms,
                        action: r.action,
                        document: r.document.to_string(),
                    })
                    .collect(),
            })
        })();
        self.shared
            .metrics
            .observe("FlagHistory", r)
            .map(Response::new)
    }

    async fn rollback_flags(
        &self,
        request: Request<pb::RollbackFlagsRequest>,
    ) -> Result<Response<pb::FlagsResponse>, Status> {
        let r = async {
            let namespace = validate_namespace("namespace", &request.get_ref().namespace)?;
            auth::check(
                &self.shared,
                request.metadata(),
                "RollbackFlags",
                Right::KvWrite,
                super::watch_route::FLAGS_RESOURCE,
            )?;
            let reply = self
                .proposer
                .propose(Command::RollbackFlags {
                    namespace: namespace.clone(),
                    to_revision: request.get_ref().to_revision,
                    at_ms: now_ms(),
                })
                .await
                .map_err(status)?;
            let written = super::registry::revision_of(&reply);
            // Answer with the restored document as this node applied it (a follower
            // applies the leader's commit a moment later).
            for _ in 0..200 {
                let (document, revision) = self.current_flags(&namespace);
                if revision >= written {
                    return Ok(flags_reply(&document, revision));
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(Status::unavailable(format!(
                "rolled back at revision {written}, but this node has not applied it within 2 s: read the flags again"
            )))
        }
        .await;
        self.shared
            .metrics
            .observe("RollbackFlags", r)
            .map(Response::new)
    }
}
