//! The `switchyard.v1` API: generated prost messages and tonic clients and servers.
//!
//! Only transport lives here. Each crate converts these types to its own domain types in
//! one place, so the wire format can grow without touching business rules.
//!
//! Modules: [`v1`] (the public API) and [`internal`] (registry peers), both generated
//! with [`codec::EdgeCodec`], prost's codec with decode errors as `INVALID_ARGUMENT`.

pub mod codec;

/// Messages and services of package `switchyard.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("switchyard.v1");
}

/// Traffic between registry nodes (Raft). Not a public API.
pub mod internal {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("switchyard.internal.v1");
}
