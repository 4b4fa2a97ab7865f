//! The catalog as a deterministic state machine: `apply(index, Command)`.
//!
//! No clock reads and no I/O happen here; everything apply needs travels inside the
//! command, and iteration is over ordered maps. Two replicas that apply the same commands
//! in the same order hold the same catalog, which is what lets the cluster feed this
//! through Raft unchanged.

mod state;

pub use state::{ApplyError, ApplyResult, Catalog, Limits, PersistedCatalog, Reply};

use serde::{Deserialize, Serialize};

use crate::model::{Instance, LeaseId, State};

/// A change to the catalog, as written to the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Adds or updates an instance. With `lease_id` the instance joins that lease;
    /// without it, it keeps its current lease or gets a new one with `ttl_seconds`.
    Register {
        instance: Instance,
        ttl_seconds: u32,
        lease_id: Option<LeaseId>,
    },
    Deregister {
        namespace: String,
        id: String,
    },
    SetState {
        namespace: String,
        id: String,
        state: State,
    },
    /// Proposed by the lease keeper: removes the leases and every instance they hold.
    ExpireLeases {
        lease_ids: Vec<LeaseId>,
    },
}

impl Command {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Register { .. } => "register",
            Command::Deregister { .. } => "deregister",
            Command::SetState { .. } => "set_state",
            Command::ExpireLeases { .. } => "expire_leases",
        }
    }
}
