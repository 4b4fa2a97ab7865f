//! The catalog under Raft (openraft 0.9): one code path for one node and for a cluster.
//!
//! - [`log_store`]: the Raft log, vote and committed index in redb; every append is one
//!   fsync'd transaction, and openraft hands over entries in batches (group commit).
//! - [`state_machine`]: applies committed commands to the catalog, fans changes out to
//!   watchers and mirrors leases into the lease keeper; snapshots are the catalog's
//!   persisted form, kept in the same redb file.
//! - [`network`]: one cached tonic channel per peer; Raft messages travel as
//!   postcard-encoded bytes over the internal `RaftInternal` service.
//! - [`propose`]: the write path: the leader's group commit, and forwarding from a
//!   follower to the leader over the internal service.
//! - [`service`]: that service's server side, including `Forward` for writes that reach a
//!   follower.
//! - [`leadership`]: follows Raft's role into the metrics; a new leader restarts every
//!   lease clock.
//! - [`membership`]: a `--join`ing node asks a member to add it.
//! - [`upgrade`]: rolling upgrades: the leader raises the cluster's log format once every
//!   member runs it.

// openraft's trait methods return its `StorageError` (over 200 bytes); our helpers return
// the same type so `?` works, and boxing it would only add a conversion at every call.
#![allow(clippy::result_large_err)]

pub mod leadership;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod propose;
pub mod service;
pub mod state_machine;
pub mod upgrade;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::catalog::{ApplyError, Command, Reply};

/// What a committed entry answered (the `R` of the Raft type config): one reply, or
/// one per command of a batch, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CommandReply {
    One(Result<Reply, ApplyError>),
    Batch(Vec<Result<Reply, ApplyError>>),
}

impl Default for CommandReply {
    fn default() -> Self {
        CommandReply::One(Ok(Reply::Done { revision: 0 }))
    }
}

openraft::declare_raft_types!(
    /// Raft types of the registry: commands in, replies out, nodes addressed by their
    /// gRPC address.
    pub TypeConfig:
        D = Command,
        R = CommandReply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The long generic names, spelled once.
pub mod alias {
    use super::TypeConfig;
    pub type NodeId = u64;
    pub type Node = openraft::BasicNode;
    pub type Raft = openraft::Raft<TypeConfig>;
    pub type Entry = openraft::Entry<TypeConfig>;
    pub type LogId = openraft::LogId<NodeId>;
    pub type Vote = openraft::Vote<NodeId>;
    pub type StorageError = openraft::StorageError<NodeId>;
    pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
    pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
    pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
}

/// Encodes a Raft message for the wire or the disk.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

/// Why bytes from the wire or the disk did not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A command kind from a newer release: said plainly, since this node must be
    /// upgraded rather than repaired.
    #[error(transparent)]
    UnknownCommand(#[from] crate::catalog::format::UnknownCommand),
    #[error(transparent)]
    Postcard(#[from] postcard::Error),
}

/// Decodes a Raft message from the wire or the disk.
pub fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, DecodeError> {
    use crate::catalog::format::take_unknown;
    let _ = take_unknown();
    postcard::from_bytes(bytes).map_err(|e| match take_unknown() {
        Some(unknown) => DecodeError::UnknownCommand(unknown),
        None => DecodeError::Postcard(e),
    })
}
