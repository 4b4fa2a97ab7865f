//! What a Switchyard registry and sidecar must agree on, in one crate that neither
//! transport nor storage reaches into.
//!
//! A tour, in the order data flows:
//! - [`model`]: the domain types (instances, states, policies, changes) and the rules of
//!   DESIGN.md that validate them at the edge, with their limits. No tokio, tonic or hickory.
//! - [`convert`]: switchyard.v1 messages ⇄ model types, in one place.
//! - [`select`]: which instances a subset selects, the weighted and sticky draws, the
//!   one rule for name case and the only regex builder; DNS and the proxy both call it.
//! - [`dns`]: DNS answers from any [`dns::DnsSource`] (the registry's catalog, a sidecar's
//!   cache): name grammar, answers, the UDP loop and cache, the hickory-server adapter.
//! - [`gate`]: the canary gate, a sequential test on the canary's share of errors that
//!   stays valid under continuous monitoring (what a rollout judges a canary by).
//! - [`telemetry`]: the latency buckets, error rule and quantile estimate that sidecars'
//!   per-version reports and the registry's `Top` share.
//! - [`flags`]: feature-flag documents in flagd's schema, their evaluation (flagd's rules,
//!   pinned to flagd-core 2.0.0) and the OFREP request/response logic.

pub mod convert;
pub mod dns;
pub mod flags;
pub mod gate;
pub mod model;
pub mod select;
pub mod telemetry;
