//! What Switchyard's integration tests share, so no test helper is copied between files.
//! A dev-dependency only: nothing here is built into a shipped crate.
//!
//! A tour of the modules, in the order a test usually meets them:
//!
//! - [`registry`]: a real registry on `127.0.0.1:0` with a temp data dir
//!   ([`TestRegistry`]), clients to it, and `register`.
//! - [`fake`]: a fake registry ([`FakeRegistry`]), a real tonic `switchyard.v1.Discovery`
//!   server on `127.0.0.1:0` whose handle pushes watch events to connected watchers,
//!   shows the watch requests it received, drops streams and answers Resolve and
//!   ListServices from what was pushed. For tests of a watcher that need a catalog but
//!   no Raft.
//! - [`proto`]: builders for instances, routing policies and watch events; Resolve; a
//!   watcher's [`View`] of the catalog built from the events it received.
//! - [`wait`]: [`eventually`] and [`assert_eventually`] (polling, bounded in time) and
//!   [`next_event`] of a watch stream.
//! - [`http`]: a bare HTTP/1.1 GET over TCP, any request sent as is, and reading a
//!   Prometheus metric line.
//! - [`dns`]: DNS queries over UDP and TCP with hickory-proto's message codec.
//! - [`backend`]: HTTP/1.1 + h2c backends that count their requests and can be slowed,
//!   made to fail or stopped.
//! - [`tmpfs`]: a small tmpfs (root only) to fill up under a registry's data dir.
//!
//! Everything binds `127.0.0.1:0`; nothing waits on a bare sleep.

pub mod backend;
pub mod dns;
pub mod fake;
pub mod http;
pub mod proto;
pub mod registry;
pub mod tmpfs;
pub mod wait;

pub use backend::Backend;
pub use fake::FakeRegistry;
pub use http::{http_get, metric, raw};
pub use proto::{
    canary_policy, instance, instance_at, open_watch, resolve, resolve_ids, split, version_stats,
    watch_all, watch_of, window_report, View,
};
pub use registry::{
    free_addr, keep_alive, register, register_at, start_at, start_cluster, start_cluster_with,
    start_in, TestRegistry,
};
pub use tmpfs::Tmpfs;
pub use wait::{assert_eventually, eventually, next_event};
