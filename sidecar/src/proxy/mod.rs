//! The proxy listeners: HTTP (by Host, or fixed to one upstream) and TCP.

pub mod body;
pub mod h1;
pub mod heads;
pub mod http;
pub mod pool;
pub mod retry;
pub mod sniff;
pub mod tcp;
pub mod turn;

use std::sync::Arc;
use std::time::Duration;

use crate::balance::LbConfig;
use crate::metrics::Metrics;
use crate::table::EndpointTable;

/// What every proxy listener shares.
pub struct ProxyCtx {
    pub table: Arc<EndpointTable>,
    pub metrics: Arc<Metrics>,
    pub lb: LbConfig,
    /// `.service.<domain>`, precomputed for Host matching.
    pub host_suffix: String,
    pub connect_timeout: Duration,
    /// Timeouts and limit for downstream HTTP connections.
    pub conn_limits: http::ConnLimits,
    /// How each service's upstream clients connect and pool (made per service, under
    /// its connection limits: see [`pool`]).
    pub(crate) pool: pool::PoolConfig,
    /// Per-version attempt counts for the registry (replaced by `start` with one in
    /// the sidecar's namespace and slow threshold).
    pub telemetry: Arc<crate::telemetry::Recorder>,
    /// mTLS to endpoints in the mesh (`None`: this sidecar has no mesh identity, and
    /// dials every endpoint's app port in clear text).
    pub mesh: Option<Arc<crate::mesh::MeshClient>>,
    /// Proxy workers serving the HTTP listeners ([`crate::workers`]): each has its own
    /// pooled upstream connections and its share of `conn_limits.max_connections`.
    pub workers: usize,
}

impl ProxyCtx {
    pub fn new(
        table: Arc<EndpointTable>,
        metrics: Arc<Metrics>,
        lb: LbConfig,
        domain: &str,
        connect_timeout: Duration,
        upstream_idle_timeout: Duration,
        conn_limits: http::ConnLimits,
    ) -> Self {
        Self {
            table,
            metrics,
            lb,
            host_suffix: format!(".service.{domain}"),
            connect_timeout,
            conn_limits,
            pool: pool::PoolConfig {
                connect_timeout,
                idle_timeout: upstream_idle_timeout,
            },
            telemetry: Arc::new(crate::telemetry::Recorder::new(
                "default",
                crate::telemetry::DEFAULT_SLOW_THRESHOLD,
            )),
            mesh: None,
            workers: 1,
        }
    }

    /// Whether a request to `endpoint` goes over mTLS to its mesh port: it is in the
    /// mesh and this sidecar can present a certificate.
    pub fn meshed(&self, endpoint: &crate::endpoint::Endpoint) -> bool {
        endpoint.mesh_authority.is_some() && self.mesh.as_ref().is_some_and(|m| m.ready())
    }
}
