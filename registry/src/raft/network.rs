//! Raft RPCs to peers over the internal gRPC service, one cached channel per peer.
//! A peer that cannot be reached is reported `Unreachable`, so openraft backs off.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use switchyard_proto::internal::raft_internal_client::RaftInternalClient;
use switchyard_proto::internal::RaftMessage;
use tonic::transport::{Channel, Endpoint};

use super::alias::{Node, NodeId};
use super::{decode, encode, TypeConfig};

/// Largest Raft message (a snapshot chunk or a batch of entries).
pub const MAX_RAFT_MESSAGE: usize = 64 * 1024 * 1024;

/// Channels to peers, shared by every client the factory hands out.
#[derive(Clone, Default)]
pub struct Network {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Plain, or mutual TLS with this node's certificate when TLS is on.
    transport: switchyard_tls::Transport,
}

impl Network {
    pub fn new(transport: switchyard_tls::Transport) -> Self {
        Network {
            channels: Arc::default(),
            transport,
        }
    }

    /// The (lazily connecting) channel to a node's address.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock();
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let url = self.transport.url_for(addr);
        self.transport.check(&url).map_err(|e| e.to_string())?;
        let endpoint = Endpoint::from_shared(url)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = self.transport.connect_lazy(endpoint);
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    pub fn client(&self, addr: &str) -> Result<RaftInternalClient<Channel>, String> {
        Ok(RaftInternalClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE))
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerClient {
            target,
            client: self.client(&node.addr),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    client: Result<RaftInternalClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WireError(String);

impl PeerClient {
    /// Sends one message; the answer is the remote `Result<Resp, Err>`.
    async fn call<Req, Resp, Err>(
        &mut self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, Err>>
    where
        Req: Serialize,
        Resp: for<'a> Deserialize<'a>,
        Err: std::error::Error + for<'a> Deserialize<'a>,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&WireError(
                    e.clone(),
                ))))
            }
        };
        let data = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let msg = RaftMessage { data };
        let sent = async {
            match kind {
                Kind::Append => client.append_entries(msg).await,
                Kind::Vote => client.vote(msg).await,
                Kind::Snapshot => client.install_snapshot(msg).await,
            }
        };
        let answer = match tokio::time::timeout(option.hard_ttl(), sent).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&WireError(format!(
                    "no answer from node {} within {:?}",
                    self.target,
                    option.hard_ttl()
                )))))
            }
            Ok(Err(status)) => {
                let e = WireError(format!("node {}: {}", self.target, status.message()));
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, Err> =
            decode(&answer.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Kind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Kind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Kind::Vote, &rpc, &option).await
    }
}
