//! The Switchyard registry as a library.
//!
//! A tour, in the order a write travels:
//! - [`api`]: the gRPC services (`Registry`, `Discovery`); validate at the edge, convert
//!   wire types to [`model`] types, propose commands.
//! - [`raft`]: openraft glue: the log in redb (fsync'd batches), the state machine that
//!   applies commands to the [`catalog`], the peer network and the internal service.
//! - [`catalog`]: the deterministic state machine, `apply(index, Command)`.
//! - [`watch`]: the hub that fans applied changes out to Watch streams.
//! - [`lease`]: the leader's in-memory lease deadlines and the expiry loop's input.
//! - [`http`] and [`metrics`]: `/metrics` and `/health`.
//! - [`node`]: wires it together; [`start`] takes a config and bound listeners and
//!   returns a handle with the real addresses and a graceful `shutdown`.

pub mod api;
pub mod catalog;
pub mod config;
pub mod dns;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod node;
pub mod raft;
pub mod shared;
pub mod watch;

pub use catalog::Limits;
pub use config::{Listeners, RegistryConfig, StartError};
pub use node::{start, RegistryHandle};
