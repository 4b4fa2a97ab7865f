//! `switchyard.v1.Cluster`: Members, AddMember, RemoveMember, Status.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tonic::{Request, Response, Status};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_proto::v1::cluster_server::Cluster;

use crate::raft::propose::Proposer;
use crate::shared::Shared;

pub struct ClusterApi {
    shared: Arc<Shared>,
    proposer: Proposer,
}

/// Membership changes can take a while (a learner catching up).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new member has to replicate the log before it is made a voter.
const CATCH_UP: Duration = Duration::from_secs(10);

pub(crate) fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl ClusterApi {
    pub fn new(shared: Arc<Shared>, proposer: Proposer) -> Self {
        Self { shared, proposer }
    }

    fn members(&self) -> pb::MembersResponse {
        let m = self.proposer.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        pb::MembersResponse {
            members: membership
                .nodes()
                .map(|(id, node)| pb::Member {
                    id: *id,
                    address: node.addr.clone(),
                    voter: voters.contains(id),
                })
                .collect(),
            leader_id: m.current_leader.unwrap_or(0),
        }
    }

    fn status(&self) -> pb::StatusResponse {
        let m = self.proposer.raft().metrics().borrow().clone();
        let leader_address = self.proposer.leader().map(|(_, a)| a).unwrap_or_default();
        pb::StatusResponse {
            node_id: m.id,
            role: role(m.state).into(),
            leader_id: m.current_leader.unwrap_or(0),
            leader_address,
            term: m.current_term,
            commit_index: self.shared.committed.load(Ordering::Acquire),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            members: self.members().members,
            revision: self.shared.catalog.read().revision(),
        }
    }

    /// The leader's Cluster client, for a follower to hand a membership change over.
    async fn leader_client(
        &self,
    ) -> Result<Option<ClusterClient<tonic::transport::Channel>>, Status> {
        if self.proposer.is_leader() {
            return Ok(None);
        }
        let (_, addr) = self.proposer.leader().ok_or_else(|| {
            Status::unavailable(
                "no registry leader is elected; retry when a majority of nodes is up",
            )
        })?;
        let channel = self
            .proposer
            .network()
            .channel(&addr)
            .map_err(Status::unavailable)?;
        Ok(Some(ClusterClient::new(channel)))
    }

    async fn change(&self, change: ChangeMembers<u64, BasicNode>) -> Result<(), Status> {
        let raft = self.proposer.raft();
        match tokio::time::timeout(CHANGE_TIMEOUT, raft.change_membership(change, false)).await {
            Err(_) => Err(Status::unavailable(format!(
                "the membership change did not commit within {CHANGE_TIMEOUT:?}"
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn add(&self, req: pb::AddMemberRequest) -> Result<pb::MembersResponse, Status> {
        if req.id == 0 {
            return Err(Status::invalid_argument("invalid id: must be at least 1"));
        }
        if req.address.is_empty()
            || req.address.len() > 255
            || req.address.parse::<std::net::SocketAddr>().is_err() && !req.address.contains(':')
        {
            return Err(Status::invalid_argument(
                "invalid address: use HOST:PORT of the node's peer listener (--peer-listen, port 7402 by default)",
            ));
        }
        if let Some(mut leader) = self.leader_client().await? {
            return leader.add_member(req).await.map(Response::into_inner);
        }
        // Once the cluster's log format moved up, a node of an older release would
        // meet entries it cannot decode: refuse it now, naming both formats.
        let cluster = self
            .shared
            .cluster_format
            .load(std::sync::atomic::Ordering::Acquire);
        if cluster > crate::catalog::format::UNVERSIONED {
            match crate::raft::upgrade::member_format(self.proposer.network(), &req.address).await {
                Ok(f) if f.format >= cluster => {}
                Ok(f) => {
                    return Err(Status::failed_precondition(format!(
                        "node {} at {} runs release {} (log format {}), but the cluster is at log format {cluster}: start it with this release ({}) or newer; downgrades are not supported",
                        req.id,
                        req.address,
                        f.release,
                        f.format,
                        env!("CARGO_PKG_VERSION")
                    )))
                }
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "cannot ask node {} at {} its release ({e}): start it before it joins",
                        req.id, req.address
                    )))
                }
            }
        }
        let raft = self.proposer.raft();
        let node = BasicNode::new(req.address.clone());
        // Learner first (it catches up without counting toward the quorum), then voter.
        // Not "blocking": openraft's blocking add_learner gives up waiting after half a
        // second and reports success anyway, which is how a node that never answered was
        // promoted to voter. The catch-up is checked here instead.
        let added =
            match tokio::time::timeout(CHANGE_TIMEOUT, raft.add_learner(req.id, node, false)).await
            {
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "adding node {} as a learner did not commit within {CHANGE_TIMEOUT:?}",
                        req.id
                    )))
                }
                Ok(Err(e)) => {
                    return Err(Status::unavailable(format!(
                        "cannot add node {} as a learner: {e}",
                        req.id
                    )))
                }
                Ok(Ok(r)) => r,
            };
        let upto = added.log_id.index;
        let caught_up = raft
            .wait(Some(CATCH_UP))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&req.id))
                        .and_then(|matched| matched.as_ref())
                        .is_some_and(|l| l.index >= upto)
                },
                "the new learner catches up",
            )
            .await;
        if caught_up.is_err() {
            // Never promote a node that has not replicated the log: the cluster would be
            // one failure from stopping. Take the learner out again.
            let _ = self
                .change(ChangeMembers::RemoveNodes(BTreeSet::from([req.id])))
                .await;
            return Err(Status::failed_precondition(format!(
                "node {} at {} did not catch up with the log within {CATCH_UP:?}: is it running, is that its peer address (--peer-listen) and was it started with --join? It was not added",
                req.id, req.address
            )));
        }
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([req.id])))
            .await?;
        tracing::info!(id = req.id, address = %req.address, "member added");
        Ok(self.members())
    }

    /// Refuses a removal after which the voters left would not have a majority that
    /// answers now (each is asked for its status, briefly): the cluster would stop taking
    /// writes. A stopped member is taken out first, or the removal forced.
    async fn check_quorum_without(
        &self,
        id: u64,
        members: &pb::MembersResponse,
    ) -> Result<(), Status> {
        let me = self.proposer.raft().metrics().borrow().id;
        let left: Vec<&pb::Member> = members
            .members
            .iter()
            .filter(|m| m.voter && m.id != id)
            .collect();
        let mut live = 0;
        for m in &left {
            if m.id == me || self.answers(&m.address).await {
                live += 1;
            }
        }
        let need = left.len() / 2 + 1;
        if live < need {
            return Err(Status::failed_precondition(format!(
                "removing node {id} leaves {} voters of which {live} answer, and a majority is {need}: the cluster would stop taking writes. Bring the others back first, or pass --force",
                left.len()
            )));
        }
        Ok(())
    }

    /// Whether the member at `addr` answers a status call within a second.
    async fn answers(&self, addr: &str) -> bool {
        let Ok(channel) = self.proposer.network().channel(addr) else {
            return false;
        };
        let mut client = ClusterClient::new(channel);
        let call = client.status(pb::StatusRequest {});
        matches!(
            tokio::time::timeout(Duration::from_secs(1), call).await,
            Ok(Ok(_))
        )
    }

    async fn remove(&self, req: pb::RemoveMemberRequest) -> Result<pb::MembersResponse, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            return leader.remove_member(req).await.map(Response::into_inner);
        }
        let members = self.members();
        let Some(member) = members.members.iter().find(|m| m.id == req.id) else {
            return Err(Status::not_found(format!(
                "node {} is not a member",
                req.id
            )));
        };
        if member.voter {
            if members.members.iter().filter(|m| m.voter).count() == 1 {
                return Err(Status::failed_precondition("cannot remove the last voter"));
            }
            if !req.force {
                self.check_quorum_without(req.id, &members).await?;
            }
            self.change(ChangeMembers::RemoveVoters(BTreeSet::from([req.id])))
                .await?;
        }
        self.change(ChangeMembers::RemoveNodes(BTreeSet::from([req.id])))
            .await?;
        tracing::info!(id = req.id, "member removed");
        Ok(self.members())
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn members(
        &self,
        _: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        self.shared
            .metrics
            .observe("Members", Ok(self.members()))
            .map(Response::new)
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        let r = match crate::auth::check(
            &self.shared,
            request.metadata(),
            "AddMember",
            crate::model::acl::Right::Members,
            "",
        ) {
            Ok(_) => self.add(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("AddMember", r)
            .map(Response::new)
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        let r = match crate::auth::check(
            &self.shared,
            request.metadata(),
            "RemoveMember",
            crate::model::acl::Right::Members,
            "",
        ) {
            Ok(_) => self.remove(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("RemoveMember", r)
            .map(Response::new)
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.shared
            .metrics
            .observe("Status", Ok(self.status()))
            .map(Response::new)
    }
}
