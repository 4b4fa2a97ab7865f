//! The gRPC servers of a node: the client port (every public service and health) and
//! the peer port (Raft, forwarded writes, `Cluster` for membership changes a follower
//! hands to the leader, and `Telemetry` windows followers forward), with the limits and error mapping that apply to them.
//!
//! The internal service is never served on the client port: it takes commands a client
//! must not send (lease expiry) and Raft messages that can depose a leader, so it lives
//! on a listener operators firewall off (and that, with TLS on, takes only clients with a certificate the cluster's CA signed).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use switchyard_proto::internal::raft_internal_server::RaftInternalServer;
use switchyard_proto::v1::acl_server::AclServer;
use switchyard_proto::v1::cluster_server::ClusterServer;
use switchyard_proto::v1::config_server::ConfigServer;
use switchyard_proto::v1::discovery_server::DiscoveryServer;
use switchyard_proto::v1::identity_server::IdentityServer;
use switchyard_proto::v1::intentions_server::IntentionsServer;
use switchyard_proto::v1::registry_server::RegistryServer;
use switchyard_proto::v1::rollouts_server::RolloutsServer;
use switchyard_proto::v1::routing_server::RoutingServer;
use switchyard_proto::v1::telemetry_server::TelemetryServer;

use super::{ClusterApi, DiscoveryApi, RegistryApi, RoutingApi, TelemetryApi};
use crate::config::MAX_REQUEST_BYTES;
use crate::raft::network::MAX_RAFT_MESSAGE;
use crate::raft::propose::Proposer;
use crate::raft::service::RaftService;
use crate::shared::Shared;

/// Resolves once the shutdown flag is set (or its sender is gone).
async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// How long shutdown waits for open gRPC streams before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// HTTP/2 streams one client connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// tonic answers a message over the size limit with OUT_OF_RANGE; gRPC's convention (and
/// what clients retry on differently) is RESOURCE_EXHAUSTED. Rewrites the status of such
/// answers, in the headers (trailers-only responses) or the trailers, and says what the
/// limit is.
fn oversized_is_resource_exhausted(
    resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt;
    let mut resp = resp;
    rewrite_oversized(resp.headers_mut());
    resp.map(|body| {
        tonic::body::Body::new(body.map_frame(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                rewrite_oversized(&mut trailers);
                http_body::Frame::trailers(trailers)
            }
            Err(frame) => frame,
        }))
    })
}

fn rewrite_oversized(headers: &mut http::HeaderMap) {
    let oversized = headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"11")
        && headers
            .get("grpc-message")
            // Percent-encoded (tonic encodes spaces).
            .is_some_and(|m| m.as_bytes().windows(11).any(|w| w == b"too%20large"));
    if oversized {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "the request message is larger than 1 MiB, the registry's limit per message",
            ),
        );
    }
}

pub(crate) async fn serve_grpc(
    shared: Arc<Shared>,
    proposer: Proposer,
    forwarder: crate::telemetry_forward::Forwarder,
    listener: TcpListener,
    tls: Option<Arc<switchyard_tls::ServerTls>>,
    mesh: Arc<crate::identity::MeshSettings>,
    shutdown: watch::Receiver<bool>,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RegistryServer<RegistryApi>>().await;
    health.set_serving::<DiscoveryServer<DiscoveryApi>>().await;
    health.set_serving::<RoutingServer<RoutingApi>>().await;
    // In memory only: it keeps serving when the data dir fails.
    health.set_serving::<TelemetryServer<TelemetryApi>>().await;
    tokio::spawn(crate::storage_health::not_serving_on_failure(
        shared.storage.clone(),
        health.clone(),
        vec![
            <RegistryServer<RegistryApi> as tonic::server::NamedService>::NAME,
            <DiscoveryServer<DiscoveryApi> as tonic::server::NamedService>::NAME,
            <RoutingServer<RoutingApi> as tonic::server::NamedService>::NAME,
        ],
        shutdown.clone(),
    ));
    let routing = RoutingServer::new(RoutingApi::new(shared.clone(), proposer.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let rollouts = RolloutsServer::new(super::RolloutsApi::new(shared.clone(), proposer.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let acl = AclServer::new(super::AclApi::new(shared.clone(), proposer.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let cluster = ClusterServer::new(ClusterApi::new(shared.clone(), proposer.clone()));
    let intentions =
        IntentionsServer::new(super::IntentionsApi::new(shared.clone(), proposer.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
    // A flag document may be 1 MiB of JSON, a KV value 512 KiB.
    let config = ConfigServer::new(super::ConfigApi::new(shared.clone(), proposer.clone()))
        .max_decoding_message_size(2 * MAX_REQUEST_BYTES);
    let identity = IdentityServer::new(super::IdentityApi::new(
        shared.clone(),
        mesh,
        proposer.clone(),
    ))
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    // In memory only (never the log): served by every node, with its own message bound.
    let telemetry = TelemetryServer::new(TelemetryApi::client(
        shared.clone(),
        proposer.clone(),
        forwarder,
    ))
    .max_decoding_message_size(crate::telemetry::MAX_REPORT_BYTES);
    let registry = RegistryServer::new(RegistryApi::new(shared.clone(), proposer))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let discovery = DiscoveryServer::new(DiscoveryApi::new(shared.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    // Watch is served by its own route, which bounds what unread streams hold.
    let metrics = shared.metrics.clone();
    let discovery = super::watch_route::WatchRoute::new(discovery, shared);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Streams per connection (KeepAlive and Watch streams a client never reads hold
        // memory): a bound per connection, on top of max_watchers.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(tower::util::MapResponseLayer::new(
            oversized_is_resource_exhausted,
        ))
        // Addresses that keep failing authentication back off (see `auth_backoff`).
        .layer(crate::auth_backoff::BackoffLayer::new(metrics))
        .add_service(health_service)
        .add_service(registry)
        .add_service(discovery)
        .add_service(routing)
        .add_service(rollouts)
        .add_service(acl)
        .add_service(identity)
        .add_service(intentions)
        .add_service(config)
        .add_service(cluster)
        .add_service(telemetry)
        .serve_with_incoming_shutdown(
            // tonic ignores its own TCP_NODELAY setting for a listener handed in; the
            // incoming stream sets it, or Nagle holds a watch event back until the
            // client's delayed ACK (40 ms) whenever little else is being sent.
            switchyard_tls::incoming::incoming(listener, tls),
            wait_for(shutdown.clone()),
        );
    finish("gRPC", server, shutdown).await;
}

/// Serves the peer port: `RaftInternal` (Raft RPCs, `Forward`), `Cluster` (a
/// follower hands membership changes to the leader here, and members ask each other for
/// their status), `Registry` (KeepAlive streams a follower relays to the leader, which
/// alone runs the lease clocks) and `Telemetry` (windows followers forward, and their
/// `Top`).
pub(crate) async fn serve_peer(
    shared: Arc<Shared>,
    proposer: Proposer,
    listener: TcpListener,
    tls: Option<Arc<switchyard_tls::ServerTls>>,
    shutdown: watch::Receiver<bool>,
) {
    let cluster = ClusterServer::new(ClusterApi::new(shared.clone(), proposer.clone()));
    // A follower relays KeepAlive streams (its sidecars' and its Consul API's TTL
    // passes) to the leader's peer address: the leader must serve Registry here too.
    let registry = RegistryServer::new(RegistryApi::new(shared.clone(), proposer.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let telemetry = TelemetryServer::new(TelemetryApi::peer(shared))
        .max_decoding_message_size(crate::telemetry::MAX_REPORT_BYTES);
    let internal =
        RaftInternalServer::new(RaftService::new(proposer.raft().clone(), proposer.clone()))
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(internal)
        .add_service(cluster)
        .add_service(registry)
        .add_service(telemetry)
        .serve_with_incoming_shutdown(
            // With TLS on, the peer port's configuration requires a client certificate
            // the cluster's CA signed: nothing else can vote, append or forward.
            switchyard_tls::incoming::incoming(listener, tls),
            wait_for(shutdown.clone()),
        );
    finish("peer gRPC", server, shutdown).await;
}

/// Runs a server until it ends, or until the grace period after shutdown has passed.
async fn finish(
    name: &str,
    server: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    shutdown: watch::Receiver<bool>,
) {
    tokio::pin!(server);
    // Streams we do not own (a client's grpc.health.v1 Watch) never end by themselves:
    // after the grace period the server is dropped, closing them.
    let grace = async {
        wait_for(shutdown).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = &mut server => {
            if let Err(e) = result {
                tracing::error!(error = %e, "{name} server failed");
            }
        }
        _ = grace => tracing::warn!("{name} streams still open {SHUTDOWN_GRACE:?} after shutdown; closing them"),
    }
}
