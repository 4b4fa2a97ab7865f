//! The internal gRPC service peers call: Raft RPCs, and `Forward` for a command that
//! reached a follower.

use tonic::{Request, Response, Status};

use switchyard_proto::internal::raft_internal_server::RaftInternal;
use switchyard_proto::internal::RaftMessage;

use super::alias::Raft;
use super::propose::{ProposeError, Proposer, WireError};
use super::{decode, encode};
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

fn bad(e: postcard::Error) -> Status {
    Status::invalid_argument(format!("undecodable Raft message: {e}"))
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

    /// Proposes a follower's command here, without forwarding again (no loops): if this
    /// node lost the leadership meanwhile, the follower's client gets UNAVAILABLE.
    async fn forward(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let command: Command = decode(&request.into_inner().data).map_err(bad)?;
        let result = self.proposer.propose_here(command).await;
        let wire: Result<crate::catalog::Reply, WireError> = match result {
            Ok(r) => Ok(r),
            Err(ProposeError::Refused(e)) => Err(WireError::Refused(e)),
            Err(e) => Err(WireError::Unavailable(e.to_string())),
        };
        reply(&wire)
    }
}
