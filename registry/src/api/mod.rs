//! The gRPC services. Handlers validate at the edge, convert to domain types, and hand
//! commands to the writer; no business rule lives here. Errors become `tonic::Status`
//! in one place ([`status`]).

mod acl;
pub(crate) mod cluster;
use switchyard_core::convert;
mod config;
mod discovery;
mod identity;
mod intentions;
mod registry;
mod rollouts;
mod routing;
pub(crate) mod server;
mod telemetry;
mod watch_route;

pub use acl::AclApi;
pub use cluster::ClusterApi;
pub use config::ConfigApi;
pub(crate) use config::{flag_resource, kv_delete_command, kv_outcome};
pub use discovery::DiscoveryApi;
pub use identity::IdentityApi;
pub use intentions::IntentionsApi;
pub use registry::RegistryApi;
pub use rollouts::RolloutsApi;
pub use routing::RoutingApi;
pub use telemetry::TelemetryApi;

// The edge checks of the write requests, as each handler runs them before proposing:
// public (hidden) for the `write_requests` fuzz target.
#[doc(hidden)]
pub use acl::token_of;
#[doc(hidden)]
pub use config::kv_put_command;
#[doc(hidden)]
pub use registry::register_command;
#[doc(hidden)]
pub use rollouts::start_spec;
#[doc(hidden)]
pub use routing::put_policy_command;

use tonic::Status;

use crate::catalog::ApplyError;
use crate::raft::propose::ProposeError;

/// Most lease ids in one `KeepAlive` message.
pub const MAX_LEASES_PER_KEEPALIVE: usize = 1_000;
/// Most services one `Watch` may filter on.
pub const MAX_WATCH_SERVICES: usize = 256;
/// Most KV prefixes one `Watch` may follow.
pub const MAX_WATCH_KV_PREFIXES: usize = 64;

/// Maps a failed proposal to the status a client can act on.
pub fn status(e: ProposeError) -> Status {
    match e {
        ProposeError::Refused(ApplyError::LeaseNotFound(_))
        | ProposeError::Refused(ApplyError::InstanceNotFound { .. })
        | ProposeError::Refused(ApplyError::PolicyRevisionNotFound { .. }) => {
            Status::not_found(e.to_string())
        }
        ProposeError::Refused(ApplyError::PolicyTooLarge { .. }) => {
            Status::invalid_argument(e.to_string())
        }
        ProposeError::Refused(ApplyError::NoPolicyToClear(_)) => Status::not_found(e.to_string()),
        ProposeError::Refused(ApplyError::NoEarlierPolicy(_)) => {
            Status::failed_precondition(e.to_string())
        }
        ProposeError::Refused(ApplyError::Batch) => Status::invalid_argument(e.to_string()),
        ProposeError::Refused(ApplyError::NoRollout(_)) => Status::not_found(e.to_string()),
        ProposeError::Refused(ApplyError::RolloutActive { .. }) => {
            Status::already_exists(e.to_string())
        }
        ProposeError::Refused(ApplyError::RolloutChanged { .. })
        | ProposeError::Refused(ApplyError::RolloutRefused(_)) => {
            Status::failed_precondition(e.to_string())
        }
        ProposeError::Refused(ApplyError::AlreadyBootstrapped) => {
            Status::failed_precondition(e.to_string())
        }
        ProposeError::Refused(ApplyError::TokenExists(_)) => Status::already_exists(e.to_string()),
        ProposeError::Refused(ApplyError::TokenNotFound(_))
        | ProposeError::Refused(ApplyError::IntentionNotFound { .. }) => {
            Status::not_found(e.to_string())
        }
        ProposeError::Refused(ApplyError::NoMeshCa) => Status::unavailable(e.to_string()),
        ProposeError::Refused(ApplyError::TooManyStrictServices(..)) => {
            Status::resource_exhausted(e.to_string())
        }
        ProposeError::Refused(ApplyError::TooManyMeshRoots(_))
        | ProposeError::Refused(ApplyError::MeshRootExists(_)) => {
            Status::failed_precondition(e.to_string())
        }
        ProposeError::Refused(ApplyError::TooManyIntentions(..))
        | ProposeError::Refused(ApplyError::TooManyIntentionsFor(..)) => {
            Status::resource_exhausted(e.to_string())
        }
        ProposeError::Refused(ApplyError::TooManyTokens(_)) => {
            Status::resource_exhausted(e.to_string())
        }
        ProposeError::Refused(ApplyError::TooManyRollouts(..)) => {
            Status::resource_exhausted(e.to_string())
        }
        ProposeError::Refused(ApplyError::KvFull { .. })
        | ProposeError::Refused(ApplyError::KvRecurseTooLarge { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        ProposeError::Refused(ApplyError::FlagsChanged { .. }) => Status::aborted(e.to_string()),
        ProposeError::Refused(ApplyError::FlagRevisionNotFound { .. }) => {
            Status::not_found(e.to_string())
        }
        ProposeError::Refused(ApplyError::FlagDocumentTooLarge { .. }) => {
            Status::invalid_argument(e.to_string())
        }
        ProposeError::Refused(ApplyError::TooManyInstances(_))
        | ProposeError::Refused(ApplyError::TooManyPolicies(..))
        | ProposeError::Refused(ApplyError::PolicyBytesExceeded { .. })
        | ProposeError::Refused(ApplyError::LeaseFull(..)) => {
            Status::resource_exhausted(e.to_string())
        }
        ProposeError::Refused(ApplyError::FormatTooNew(_)) => {
            Status::failed_precondition(e.to_string())
        }
        ProposeError::Overloaded { retry_after, .. } => {
            // gRFC A6's server pushback: clients with a retry policy wait this long.
            let mut status = Status::resource_exhausted(e.to_string());
            if let Ok(v) = retry_after.as_millis().to_string().parse() {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
            status
        }
        ProposeError::Storage(_)
        | ProposeError::StorageFailed(_)
        | ProposeError::RaftStopped(_)
        | ProposeError::ShuttingDown
        | ProposeError::NoLeader(_)
        | ProposeError::NoQuorum(_)
        | ProposeError::LeaderUnreachable { .. } => Status::unavailable(e.to_string()),
    }
}
