//! The etcd side: a minimal v3 client generated from `proto/etcd.proto`, calling the
//! same RPCs etcd's own Go client sends for these operations.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::backend::{BoxStream, Renewed};
use crate::instance::{etcd_prefix, etcd_prefix_end, id_from_etcd_key, Instance};
use crate::Result;

/// Types generated from `proto/etcd.proto` (package `etcdserverpb`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// `Lease.LeaseGrant` with a server-chosen id. etcd reports some refusals in the
/// response's `error` field rather than as a gRPC status.
pub async fn grant(channel: Channel, ttl: u32) -> Result<u64> {
    let reply = LeaseClient::new(channel)
        .lease_grant(pb::LeaseGrantRequest {
            ttl: i64::from(ttl),
            id: 0,
        })
        .await?
        .into_inner();
    if !reply.error.is_empty() {
        return Err(format!("LeaseGrant: {}", reply.error).into());
    }
    Ok(reply.id as u64)
}

/// `KV.Put` of the instance's key and JSON value, attached to `lease` (0: none).
pub async fn put(channel: Channel, instance: &Instance, lease: u64) -> Result<()> {
    KvClient::new(channel)
        .put(pb::PutRequest {
            key: instance.etcd_key().into_bytes(),
            value: instance.etcd_value().into_bytes(),
            lease: lease as i64,
            prev_kv: false,
        })
        .await?;
    Ok(())
}

/// `Lease.LeaseKeepAlive`: one lease per request (the API has no batch form); etcd
/// answers every request with one response, TTL <= 0 meaning the lease is gone.
pub async fn keep_alive(
    channel: Channel,
    requests: mpsc::Receiver<Vec<u64>>,
) -> Result<BoxStream<Renewed>> {
    let outbound = ReceiverStream::new(requests).map(|ids| pb::LeaseKeepAliveRequest {
        id: ids.first().copied().unwrap_or(0) as i64,
    });
    let inbound = LeaseClient::new(channel)
        .lease_keep_alive(outbound)
        .await?
        .into_inner();
    Ok(Box::pin(inbound.map(|r| {
        r.map(|resp| {
            if resp.ttl > 0 {
                Renewed {
                    ok: 1,
                    not_found: 0,
                }
            } else {
                Renewed {
                    ok: 0,
                    not_found: 1,
                }
            }
        })
    })))
}

/// `Watch.Watch` with one prefix watch on the stream, from the current revision. The
/// request side is kept open for the life of the returned stream: etcd ends a watch
/// stream whose client half-closes.
pub async fn watch(channel: Channel, service: &str) -> Result<BoxStream<Vec<String>>> {
    let prefix = etcd_prefix(service);
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                range_end: etcd_prefix_end(&prefix),
                key: prefix.into_bytes(),
                start_revision: 0,
                progress_notify: false,
                prev_kv: false,
            },
        )),
    })
    .await
    .map_err(|_| "watch request channel closed")?;
    let inbound = WatchClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(Box::pin(inbound.map(move |r| {
        // Moved in so the request side stays open as long as the stream is read.
        let _open = &tx;
        r.and_then(|resp| {
            if resp.canceled {
                return Err(tonic::Status::aborted(format!(
                    "watch canceled: {}",
                    resp.cancel_reason
                )));
            }
            Ok(resp
                .events
                .iter()
                .filter_map(|e| e.kv.as_ref())
                .map(|kv| id_from_etcd_key(&kv.key).to_owned())
                .collect())
        })
    })))
}
