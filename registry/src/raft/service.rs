//! The internal gRPC service peers call: Raft RPCs, and `Forward` for a command that
//! reached a follower.

use tonic::{Request, Response, Status};

use switchyard_proto::internal::raft_internal_server::RaftInternal;
use switchyard_proto::internal::RaftMessage;

use super::alias::Raft;
use super::propose::{ProposeError, Proposer, WireError};
use super::{decode, encode, DecodeError};
use crate::catalog::Command;

pub struct RaftService {
    raft: Raft,
    proposer: Proposer,
}

impl RaftService {
    pub fn new(raft: Raft, proposer: Proposer) -> Self {
        Self { raft, proposer }
    }
}

/// An undecodable message. One holding a command from a newer release is refused with
/// FAILED_PRECONDITION and logged (at most every 10 s, as the leader retries on every
/// heartbeat): this node stays behind, applying nothing, until it is upgraded.
fn bad(e: DecodeError) -> Status {
    match e {
        DecodeError::UnknownCommand(unknown) => {
            static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
            if now >= last + 10
                && LAST
                    .compare_exchange(
                        last,
                        now,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    )
                    .is_ok()
            {
                tracing::error!("refusing entries from the leader: {unknown}");
            }
            Status::failed_precondition(unknown.to_string())
        }
        DecodeError::Postcard(e) => {
            Status::invalid_argument(format!("undecodable Raft message: {e}"))
        }
    }
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    encode(value)
        .map(|data| Response::new(RaftMessage { data }))
        .map_err(|e| Status::internal(format!("cannot encode Raft message: {e}")))
}

#[tonic::async_trait]
impl RaftInternal for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let req = decode(&request.into_inner().data).map_err(bad)?;
        reply(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = decode(&request.into_inner().data).map_err(bad)?;
        reply(&self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let req = decode(&request.into_inner().data).map_err(bad)?;
        reply(&self.raft.install_snapshot(req).await)
    }

    async fn hello(
        &self,
        _: Request<switchyard_proto::internal::NodeHello>,
    ) -> Result<Response<switchyard_proto::internal::NodeHello>, Status> {
        Ok(Response::new(super::upgrade::hello()))
    }

    /// Proposes a follower's command here, without forwarding again (no loops): if this
    /// node lost the leadership meanwhile, the follower's client gets UNAVAILABLE.
    async fn forward(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let command: Command = decode(&request.into_inner().data).map_err(bad)?;
        check_forwarded(&command)?;
        let result = self.proposer.propose_here(command).await;
        let wire: Result<crate::catalog::Reply, WireError> = match result {
            Ok(r) => Ok(r),
            Err(ProposeError::Refused(e)) => Err(WireError::Refused(e)),
            Err(ProposeError::Overloaded {
                pending,
                retry_after,
            }) => Err(WireError::Overloaded {
                pending,
                retry_after_ms: u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
            }),
            Err(e) => Err(WireError::Unavailable(e.to_string())),
        };
        reply(&wire)
    }
}

/// The leader checks a forwarded command again instead of trusting the follower: only
/// commands a client may cause are accepted, each under the same rules as at the edge.
/// Commands only a leader originates (lease expiry and checkpoints, the cluster id) and
/// batches (the leader builds those itself) are refused.
fn check_forwarded(command: &Command) -> Result<(), Status> {
    use crate::model::policy::validate_policy;
    use crate::model::{validate_id, validate_instance, validate_namespace, validate_ttl};
    let invalid = |e: crate::model::ValidationError| Status::invalid_argument(e.to_string());
    match command {
        Command::Register {
            instance,
            ttl_seconds,
            ..
        } => {
            validate_ttl("ttl_seconds", *ttl_seconds).map_err(invalid)?;
            let checked =
                validate_instance(instance.clone(), u32::from(instance.port), instance.weight)
                    .map_err(invalid)?;
            if &checked != instance {
                return Err(Status::invalid_argument(
                    "forwarded instance is not in the form the edge produces",
                ));
            }
        }
        Command::Deregister { namespace, id } | Command::SetState { namespace, id, .. } => {
            validate_namespace("namespace", namespace).map_err(invalid)?;
            validate_id("id", id).map_err(invalid)?;
        }
        Command::PutPolicy {
            namespace,
            service,
            policy,
            ..
        } => {
            validate_namespace("namespace", namespace).map_err(invalid)?;
            crate::model::validate_name("service", service).map_err(invalid)?;
            if let Some(p) = policy {
                // Every bound and rule but "names a known version", which the leader's
                // apply cannot know cheaply here: accept the names the policy uses.
                let names = p
                    .default_split
                    .iter()
                    .chain(p.routes.iter().flat_map(|r| r.split.iter()))
                    .map(|s| s.subset.clone())
                    .collect();
                validate_policy(p, &names).map_err(invalid)?;
            }
        }
        Command::PutIntention {
            namespace,
            intention,
            ..
        } => {
            use crate::model::intention::{
                validate_description, validate_destination, validate_source,
            };
            validate_namespace("namespace", namespace).map_err(invalid)?;
            validate_source("source", &intention.source).map_err(invalid)?;
            validate_destination("destination", &intention.destination).map_err(invalid)?;
            validate_description("description", &intention.description).map_err(invalid)?;
        }
        Command::DeleteIntention {
            namespace,
            source,
            destination,
            ..
        } => {
            use crate::model::intention::{validate_destination, validate_source};
            validate_namespace("namespace", namespace).map_err(invalid)?;
            validate_source("source", source).map_err(invalid)?;
            validate_destination("destination", destination).map_err(invalid)?;
        }
        Command::KvPut {
            namespace,
            key,
            value,
            ..
        } => {
            use crate::model::kv::{validate_kv_key, MAX_KV_VALUE_BYTES};
            validate_namespace("namespace", namespace).map_err(invalid)?;
            validate_kv_key("key", key).map_err(invalid)?;
            if value.len() > MAX_KV_VALUE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "invalid value: {} bytes, at most {MAX_KV_VALUE_BYTES}",
                    value.len()
                )));
            }
        }
        Command::KvDelete { namespace, key, .. } => {
            validate_namespace("namespace", namespace).map_err(invalid)?;
            crate::model::kv::validate_kv_prefix("key", key).map_err(invalid)?;
        }
        Command::PutFlags {
            namespace,
            document,
            ..
        } => {
            validate_namespace("namespace", namespace).map_err(invalid)?;
            switchyard_core::flags::FlagSet::parse(document)
                .map_err(|e| Status::invalid_argument(format!("invalid flags: {e}")))?;
        }
        Command::RollbackFlags { namespace, .. } => {
            validate_namespace("namespace", namespace).map_err(invalid)?;
        }
        Command::RollbackPolicy {
            namespace, service, ..
        } => {
            validate_namespace("namespace", namespace).map_err(invalid)?;
            crate::model::validate_name("service", service).map_err(invalid)?;
        }
        Command::PutRollout {
            rollout, policy, ..
        } => {
            validate_namespace("namespace", &rollout.namespace).map_err(invalid)?;
            crate::model::validate_name("service", &rollout.service).map_err(invalid)?;
            crate::model::rollout::validate_spec(&rollout.spec).map_err(invalid)?;
            if let crate::catalog::RolloutPolicy::Put(p) = policy {
                let names = p
                    .default_split
                    .iter()
                    .chain(p.routes.iter().flat_map(|r| r.split.iter()))
                    .map(|s| s.subset.clone())
                    .collect();
                validate_policy(p, &names).map_err(invalid)?;
            }
        }
        Command::AclBootstrap { token } | Command::PutToken { token } => {
            crate::model::acl::validate_rules(&token.rules).map_err(invalid)?;
            crate::model::acl::validate_description(&token.description).map_err(invalid)?;
        }
        Command::DeleteToken { accessor_id } => {
            if accessor_id.len() > 64 {
                return Err(Status::invalid_argument(
                    "invalid accessor_id: longer than 64 bytes",
                ));
            }
        }
        Command::SetMtls {
            namespace, service, ..
        } => {
            validate_namespace("namespace", namespace).map_err(invalid)?;
            crate::model::validate_name("service", service).map_err(invalid)?;
        }
        Command::RotateMeshCa { root, .. } => {
            let pem_ok = |p: &str| p.len() <= 16 * 1024 && p.contains("-----BEGIN");
            if root.id.is_empty()
                || root.id.len() > 64
                || !pem_ok(&root.cert_pem)
                || root.key_pem.as_deref().is_some_and(|k| !pem_ok(k))
            {
                return Err(Status::invalid_argument(
                    "invalid mesh root: an id of 1-64 bytes and PEM of at most 16 KiB",
                ));
            }
        }
        Command::ExpireLeases { .. }
        | Command::CheckpointLeases { .. }
        | Command::InitCluster { .. }
        | Command::InitMeshCa { .. }
        | Command::SetClusterFormat { .. }
        | Command::Batch(_) => {
            return Err(Status::permission_denied(format!(
                "{} is proposed by the leader itself and never accepted from a peer",
                command.kind()
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, State};

    fn register(service: &str, ttl_seconds: u32) -> Command {
        Command::Register {
            instance: Instance {
                namespace: "default".into(),
                service: service.into(),
                id: "web-1".into(),
                address: "127.0.0.1".into(),
                port: 8080,
                version: "1.0.0".into(),
                labels: Default::default(),
                weight: 100,
                zone: String::new(),
                state: State::Serving,
                mesh_port: 0,
            },
            ttl_seconds,
            lease_id: None,
        }
    }

    /// What the hostile probe forwarded: an expiry of every lease, and a registration
    /// the edge would refuse. Both are refused by the leader now.
    #[test]
    fn forwarded_commands_are_checked_again_and_internal_ones_refused() {
        assert!(check_forwarded(&register("web", 10)).is_ok());
        let e = check_forwarded(&register("EVIL SERVICE!", 10)).expect_err("bad name");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = check_forwarded(&register("web", 4_294_967)).expect_err("136-year TTL");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        for internal in [
            Command::ExpireLeases {
                leases: vec![(1, 1)],
            },
            Command::CheckpointLeases { leases: vec![] },
            Command::InitCluster { id: "x".into() },
            Command::Batch(vec![register("web", 10)]),
        ] {
            let e = check_forwarded(&internal).expect_err("leader-only");
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{internal:?}");
        }
    }
}
