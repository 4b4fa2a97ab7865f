//! `switchyard.v1.Discovery`: Watch, Resolve, ListServices, served from applied state.

use std::pin::Pin;
use std::sync::Arc;

use std::task::{Context, Poll};

use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_server::Discovery;

use super::convert::{
    delta_event, destination_intentions, instance_to_proto, policy_to_proto, snapshot_event,
    summary_to_proto,
};
use super::{MAX_WATCH_KV_PREFIXES, MAX_WATCH_SERVICES};
use crate::model::{validate_name, validate_namespace, validate_version, Change, Revision};
use crate::shared::Shared;
use crate::watch::{filter, Interest};

pub struct DiscoveryApi {
    shared: Arc<Shared>,
}

impl DiscoveryApi {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn resolve(&self, req: pb::ResolveRequest) -> Result<pb::ResolveResponse, Status> {
        let namespace = validate_namespace("namespace", &req.namespace)?;
        validate_name("service", &req.service)?;
        if !req.version.is_empty() {
            validate_version("version", &req.version)?;
        }
        let catalog = self.shared.catalog.read();
        let instances = catalog.resolve(&namespace, &req.service, &req.version);
        Ok(pb::ResolveResponse {
            instances: instances.iter().map(|i| instance_to_proto(i)).collect(),
            policy: catalog
                .current_policy(&namespace, &req.service)
                .as_deref()
                .map(policy_to_proto),
            revision: catalog.revision(),
        })
    }

    fn list_services(
        &self,
        req: pb::ListServicesRequest,
    ) -> Result<pb::ListServicesResponse, Status> {
        let namespace = validate_namespace("namespace", &req.namespace)?;
        let catalog = self.shared.catalog.read();
        Ok(pb::ListServicesResponse {
            services: catalog
                .list_services(&namespace)
                .into_iter()
                .map(summary_to_proto)
                .collect(),
            revision: catalog.revision(),
        })
    }

    /// Opens a Watch stream: checks the request and the node's bounds, subscribes, and
    /// notes where the watcher starts. Nothing is built yet: the starting snapshot (or
    /// the deltas since `since_revision`) is built when the stream is first polled,
    /// i.e. when its connection has room for it.
    pub(crate) fn open_watch(&self, req: pb::WatchRequest) -> Result<WatchEvents, Status> {
        let namespace = validate_namespace("namespace", &req.namespace)?;
        if req.services.len() > MAX_WATCH_SERVICES {
            return Err(Status::invalid_argument(format!(
                "invalid services: {} given, at most {MAX_WATCH_SERVICES}",
                req.services.len()
            )));
        }
        for (i, s) in req.services.iter().enumerate() {
            validate_name(&format!("services[{i}]"), s)?;
        }
        if req.kv_prefixes.len() > MAX_WATCH_KV_PREFIXES {
            return Err(Status::invalid_argument(format!(
                "invalid kv_prefixes: {} given, at most {MAX_WATCH_KV_PREFIXES}",
                req.kv_prefixes.len()
            )));
        }
        for (i, p) in req.kv_prefixes.iter().enumerate() {
            crate::model::kv::validate_kv_prefix(&format!("kv_prefixes[{i}]"), p)?;
        }
        let mut services = req.services;
        services.sort();
        services.dedup();
        let mut kv_prefixes = req.kv_prefixes;
        kv_prefixes.sort();
        kv_prefixes.dedup();
        let metrics = &self.shared.metrics;
        if metrics.watchers.get() >= self.shared.config.max_watchers as i64 {
            return Err(Status::resource_exhausted(format!(
                "this node already serves {} watches: watch from another node or raise max_watchers",
                self.shared.config.max_watchers
            )));
        }
        let budget = &self.shared.watch_budget;
        if budget.is_full() {
            self.shared.metrics.watch_buffer_closes.inc();
            return Err(buffer_full(budget.held(), budget.cap()));
        }

        // Subscribe and take the starting point under one read lock: every change is
        // then either in the starting state or on the receiver, never both, never
        // neither (a snapshot built later, at a newer revision, skips the receiver's
        // changes up to it).
        let (rx, resumed, cluster_id) = {
            let catalog = self.shared.catalog.read();
            let rx = self.shared.hub.subscribe();
            let current = catalog.revision();
            // A revision is only meaningful in the cluster that issued it: a watcher that
            // last heard from another cluster (or from this one before its data was
            // wiped) starts over with a snapshot, whatever number it brings.
            let same_cluster = req.cluster_id.is_empty() || req.cluster_id == catalog.cluster_id();
            if !same_cluster {
                tracing::info!(theirs = %req.cluster_id, ours = %catalog.cluster_id(), since = req.since_revision, "a watcher resumes from another cluster's revision; sending a snapshot");
            }
            // A watcher that has seen a later revision than this node applied (it last
            // watched a node further ahead): a snapshot from here would take it back in
            // time. Send it elsewhere; this node catches up by itself.
            if same_cluster && !req.cluster_id.is_empty() && req.since_revision > current {
                return Err(Status::unavailable(format!(
                    "this registry node has applied up to revision {current}, behind the {} this watcher has already seen (it is catching up): resume on another node, or retry in a moment",
                    req.since_revision
                )));
            }
            // The changes themselves are shared with the hub's history: holding them
            // costs a pointer each, and each becomes an event only when it is sent.
            let resumed = (same_cluster && req.since_revision > 0 && req.since_revision <= current)
                .then(|| self.shared.hub.since(req.since_revision))
                .flatten();
            (rx, resumed, catalog.cluster_id().to_string())
        };

        // Counted now, so a burst cannot overshoot max_watchers; uncounted when the stream
        // is dropped (client gone, node stopping).
        self.shared.metrics.watchers.inc();
        let shutdown = WatchStream::from_changes(self.shared.shutdown.clone());
        Ok(WatchEvents {
            shared: self.shared.clone(),
            interest: Interest {
                namespace,
                services,
                flags: req.flags,
                kv_prefixes,
            },
            snapshot_first: resumed.is_none(),
            first: resumed.unwrap_or_default().into_iter(),
            changes: BroadcastStream::new(rx),
            shutdown,
            seen: 0,
            cluster_id,
        })
    }
}

/// The status of a watcher closed because the node's watch buffer is full.
pub(crate) fn buffer_full(held: usize, cap: usize) -> Status {
    Status::resource_exhausted(format!(
        "this node holds {held} bytes of watch events its watchers have not read, at most {cap} (max_watch_buffer_bytes): read the Watch stream as events arrive, reconnect (with since_revision to resume), or watch from another node"
    ))
}

type WatchResponse = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// One Watch stream: the starting events, then each matching change, and a fresh snapshot
/// when it falls behind the hub. It is a plain stream polled by the connection that
/// carries it, with no task or channel of its own per watcher: a change reaches 1,000
/// watchers with a third fewer wake-ups. A client that reads slowly is not polled, falls
/// behind the hub's buffer, and gets a snapshot; the registry never waits for it. Every
/// event is built when polled, so an unpolled watcher holds no event (what it was sent
/// and has not read is bounded by `watch::budget`).
pub(crate) struct WatchEvents {
    shared: Arc<Shared>,
    /// The namespace, services, flags and KV prefixes it watches.
    interest: Interest,
    /// Start with a snapshot (no resume from a revision).
    snapshot_first: bool,
    /// The changes a resuming watcher missed, from the hub's history.
    first: std::vec::IntoIter<Arc<Change>>,
    changes: BroadcastStream<Arc<Change>>,
    shutdown: WatchStream<bool>,
    /// The newest revision this watcher has been sent (in an event or a snapshot).
    seen: Revision,
    /// Stamped on every event; read again from the catalog while still empty (a watch
    /// opened in the moment before the first leader committed the id).
    cluster_id: String,
}

impl WatchEvents {
    /// The watcher's starting state. Under the catalog's read lock only what is shared
    /// is taken (pointers to instances, policies and KV entries, the flag document's
    /// `Arc`); the protobuf is built after the lock is released, so a resync of many
    /// watchers (a reconnecting fleet) does not hold off the writer applying commits.
    fn snapshot(&mut self) -> pb::WatchEvent {
        let interest = &self.interest;
        let (revision, services, flags, kv, intentions, mtls, trust_bundle) = {
            let catalog = self.shared.catalog.read();
            // A reset (a snapshot installed from the leader) may bring the id.
            self.cluster_id = catalog.cluster_id().to_string();
            let flags = interest.flags.then(|| {
                catalog
                    .flags(&interest.namespace)
                    .map(|r| (r.document.clone(), r.revision))
            });
            let kv: Vec<_> = interest
                .kv_prefixes
                .iter()
                .flat_map(|prefix| catalog.kv_list(&interest.namespace, prefix, usize::MAX))
                .collect();
            (
                catalog.revision(),
                catalog.snapshot(&interest.namespace, &interest.services),
                flags,
                kv,
                catalog.intentions_by_destination(&interest.namespace),
                catalog.strict_services(&interest.namespace, &interest.services),
                catalog.trusted_mesh_ca(crate::rollout::now_ms()),
            )
        };
        let mut event = snapshot_event(revision, &services);
        if let Some(flags) = flags {
            event.flags = Some(match flags {
                Some((document, revision)) => pb::FlagsDocument {
                    document: document.to_string(),
                    revision,
                },
                None => pb::FlagsDocument {
                    document: switchyard_core::flags::EMPTY_DOCUMENT.to_string(),
                    revision: 0,
                },
            });
        }
        if !interest.kv_prefixes.is_empty() {
            event.kv_snapshot = true;
            event.kv = kv
                .iter()
                .map(|e| super::convert::kv_entry_to_proto(e))
                .collect();
        }
        event.intentions = intentions
            .iter()
            .map(|(d, rules)| destination_intentions(d, rules))
            .collect();
        event.mtls = mtls
            .iter()
            .map(|s| super::convert::mtls_setting(s, true))
            .collect();
        event.trust_bundle = trust_bundle.map(|ca| ca.bundle_pem()).unwrap_or_default();
        event.cluster_id.clone_from(&self.cluster_id);
        // Changes still on the receiver up to here are in the snapshot.
        self.seen = event.revision;
        event
    }

    fn stamped(&mut self, mut event: pb::WatchEvent) -> pb::WatchEvent {
        if self.cluster_id.is_empty() {
            self.cluster_id = self.shared.catalog.read().cluster_id().to_string();
        }
        event.cluster_id.clone_from(&self.cluster_id);
        event
    }
}

/// gRPC's message prefix: a compressed flag and a big-endian length.
pub(crate) const PREFIX: usize = 5;

/// One watch event as a gRPC length-prefixed message.
pub(crate) fn grpc_frame(event: &pb::WatchEvent) -> Result<Vec<u8>, Status> {
    use prost::Message;
    let len = event.encoded_len();
    let prefix =
        u32::try_from(len).map_err(|_| Status::internal("a watch event too large to frame"))?;
    let mut data = Vec::with_capacity(PREFIX + len);
    data.push(0);
    data.extend_from_slice(&prefix.to_be_bytes());
    // A Vec grows as needed: encoding into it cannot run out of room.
    event
        .encode(&mut data)
        .map_err(|e| Status::internal(format!("cannot encode a watch event: {e}")))?;
    Ok(data)
}

/// What a watch sends next.
pub(crate) enum Next {
    /// An event to encode for this watcher alone (a snapshot, a resumed change).
    Event(Box<pb::WatchEvent>),
    /// A live delta already encoded, the same bytes every watcher of its kind is sent.
    Frame(bytes::Bytes),
}

impl WatchEvents {
    /// The next event, with live deltas as frames shared between watchers of the same
    /// interest (`WatchHub::encoded`): what the Watch route sends.
    pub(crate) fn poll_next_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Next, Status>>> {
        self.poll_next_inner(cx, true)
    }

    fn poll_next_inner(
        &mut self,
        cx: &mut Context<'_>,
        shared_frames: bool,
    ) -> Poll<Option<Result<Next, Status>>> {
        let this = self;
        if std::mem::take(&mut this.snapshot_first) {
            return Poll::Ready(Some(Ok(Next::Event(Box::new(this.snapshot())))));
        }
        for change in this.first.by_ref() {
            this.seen = this.seen.max(change.revision);
            if let Some(c) = filter(&change, &this.interest) {
                let event = delta_event(&c);
                return Poll::Ready(Some(Ok(Next::Event(Box::new(this.stamped(event))))));
            }
        }
        // The node is stopping: end the stream so clients reconnect elsewhere at once.
        if let Poll::Ready(stopping) = Pin::new(&mut this.shutdown).poll_next(cx) {
            if stopping.is_none_or(|s| s) {
                return Poll::Ready(None);
            }
        }
        loop {
            let change = match Pin::new(&mut this.changes).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    tracing::debug!(missed, namespace = %this.interest.namespace, "watcher fell behind; resyncing with a snapshot");
                    this.shared.metrics.watch_resyncs.inc();
                    return Poll::Ready(Some(Ok(Next::Event(Box::new(this.snapshot())))));
                }
                Poll::Ready(Some(Ok(change))) => change,
            };
            if change.reset {
                this.shared.metrics.watch_resyncs.inc();
                return Poll::Ready(Some(Ok(Next::Event(Box::new(this.snapshot())))));
            }
            if change.revision <= this.seen {
                continue;
            }
            this.seen = change.revision;
            if shared_frames {
                if this.cluster_id.is_empty() {
                    this.cluster_id = this.shared.catalog.read().cluster_id().to_string();
                }
                let mut failed = None;
                let frame = this.shared.hub.encoded(
                    change.revision,
                    &this.interest,
                    &this.cluster_id,
                    || {
                        let c = filter(&change, &this.interest)?;
                        let mut event = delta_event(&c);
                        event.cluster_id.clone_from(&this.cluster_id);
                        grpc_frame(&event)
                            .map_err(|e| failed = Some(e))
                            .ok()
                            .map(bytes::Bytes::from)
                    },
                );
                if let Some(status) = failed {
                    return Poll::Ready(Some(Err(status)));
                }
                if let Some(frame) = frame {
                    return Poll::Ready(Some(Ok(Next::Frame(frame))));
                }
                continue;
            }
            if let Some(c) = filter(&change, &this.interest) {
                let event = delta_event(&c);
                return Poll::Ready(Some(Ok(Next::Event(Box::new(this.stamped(event))))));
            }
        }
    }
}

impl Stream for WatchEvents {
    type Item = Result<pb::WatchEvent, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_next_inner(cx, false).map(|next| {
            next.map(|r| {
                r.and_then(|n| match n {
                    Next::Event(event) => Ok(*event),
                    // Only asked for with shared frames, which this path does not.
                    Next::Frame(_) => Err(Status::internal("a shared frame on a message stream")),
                })
            })
        })
    }
}

impl Drop for WatchEvents {
    fn drop(&mut self) {
        self.shared.metrics.watchers.dec();
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryApi {
    type WatchStream = WatchResponse;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Served through `watch_route` on the node's server (which bounds the bytes a
        // watcher holds); this path is for a DiscoveryServer used without it.
        let r = self
            .open_watch(request.into_inner())
            .map(|events| Box::pin(events) as WatchResponse);
        self.shared.metrics.observe("Watch", r).map(Response::new)
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let service = request.get_ref().service.clone();
        let r = crate::auth::check(
            &self.shared,
            request.metadata(),
            "Resolve",
            crate::model::acl::Right::Read,
            &service,
        )
        .and_then(|_| self.resolve(request.into_inner()));
        self.shared.metrics.observe("Resolve", r).map(Response::new)
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        // Only the services the caller may read; a filtered answer says so in the
        // `x-switchyard-filtered` header, so it never passes for "no services".
        let r = crate::auth::caller(&self.shared, request.metadata()).and_then(|caller| {
            self.list_services(request.into_inner()).map(|mut l| {
                let before = l.services.len();
                l.services
                    .retain(|s| caller.may(crate::model::acl::Right::Read, &s.name));
                let filtered =
                    l.services.len() < before || !caller.may(crate::model::acl::Right::Read, "*");
                (l, filtered)
            })
        });
        self.shared
            .metrics
            .observe("ListServices", r)
            .map(|(l, filtered)| {
                let mut resp = Response::new(l);
                if filtered {
                    resp.metadata_mut().insert(
                        "x-switchyard-filtered",
                        tonic::metadata::MetadataValue::from_static("true"),
                    );
                }
                resp
            })
    }
}
