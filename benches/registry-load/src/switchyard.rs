//! The switchyard side, through the project's own generated clients
//! (`switchyard_proto::v1`), as any switchyard client would call them.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;

use crate::backend::{BoxStream, Renewed};
use crate::instance::{Instance, NAMESPACE};
use crate::Result;

/// `Register`: a new lease when `lease_id` is 0 (with `ttl`), else joins that lease.
/// Returns the instance's lease id.
pub async fn register(
    channel: Channel,
    instance: &Instance,
    ttl: u32,
    lease_id: u64,
) -> Result<u64> {
    let reply = RegistryClient::new(channel)
        .register(pb::RegisterRequest {
            instance: Some(instance.to_proto()),
            ttl_seconds: ttl,
            lease_id,
        })
        .await?
        .into_inner();
    Ok(reply.lease_id)
}

/// `KeepAlive`: each batch of ids is one `KeepAliveRequest`; the registry answers each
/// request with one response listing every lease in it.
pub async fn keep_alive(
    channel: Channel,
    requests: mpsc::Receiver<Vec<u64>>,
) -> Result<BoxStream<Renewed>> {
    let outbound =
        ReceiverStream::new(requests).map(|lease_ids| pb::KeepAliveRequest { lease_ids });
    let inbound = RegistryClient::new(channel)
        .keep_alive(outbound)
        .await?
        .into_inner();
    Ok(Box::pin(inbound.map(|r| {
        r.map(|resp| {
            let ok = resp.leases.iter().filter(|l| l.found).count() as u64;
            Renewed {
                ok,
                not_found: resp.leases.len() as u64 - ok,
            }
        })
    })))
}

/// `Discovery.Watch` on one service, from a snapshot (since_revision 0). Yields the ids
/// of the instances each event carries: upserts of a delta, everything in a snapshot.
pub async fn watch(channel: Channel, service: &str) -> Result<BoxStream<Vec<String>>> {
    let events = DiscoveryClient::new(channel)
        .watch(pb::WatchRequest {
            namespace: NAMESPACE.to_owned(),
            services: vec![service.to_owned()],
            since_revision: 0,
            cluster_id: String::new(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(Box::pin(events.map(|r| {
        r.map(|event| match event.kind {
            Some(pb::watch_event::Kind::Delta(d)) => d.upserted.into_iter().map(|i| i.id).collect(),
            Some(pb::watch_event::Kind::Snapshot(s)) => s
                .services
                .into_iter()
                .flat_map(|s| s.instances)
                .map(|i| i.id)
                .collect(),
            None => Vec::new(),
        })
    })))
}
