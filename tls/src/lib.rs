//! TLS for Switchyard, with rustls and its `ring` provider.
//!
//! A tour:
//! - [`files`] reads PEM certificates and keys, with errors that name the file and say
//!   what is wrong with it.
//! - [`server`] builds the registry's server configurations (one per port: the client
//!   ports take any client, the peer port requires a certificate signed by the cluster's
//!   CA) and swaps them in place when the files change, so a reload never drops a
//!   connection: existing sessions keep their keys, new handshakes get the new files.
//! - [`incoming`] turns a listener into the stream of connections tonic and hyper serve,
//!   plain or TLS, handshaking off the accept loop with a deadline and a bound.
//! - [`client`] is the other side: a connector for tonic channels that verifies the
//!   registry against `--ca-file` (and, between registry nodes, presents the node's own
//!   certificate), and the rule that an `https://` URL means TLS.
//! - [`reload`] re-reads the files on SIGHUP and when they change on disk.
//! - [`generate`] makes a CA and a registry certificate for `switchyard tls init`.
//! - [`mesh_ca`] is the mesh's built-in CA: roots, and leaves built from a CSR's key only.
//!
//! Nothing here logs a key, and a configuration that cannot be loaded is never half
//! applied: the previous one stays in force.

pub mod client;
pub mod failure;
pub mod files;
pub mod generate;
pub mod incoming;
pub mod mesh_ca;
pub mod reload;
pub mod server;

pub use client::{ClientTls, Transport};
pub use files::TlsError;
pub use server::ServerTls;

/// The crypto provider every configuration is built with (never aws-lc).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// For callers (tests) that make CSRs.
pub use rcgen;
/// The rustls this crate is built on, for callers (tests) that speak TLS directly.
pub use rustls;
pub use tokio_rustls;
