//! `switchyard.v1.Discovery`: Watch, Resolve, ListServices, served from applied state.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_server::Discovery;

use super::convert::{
    delta_event, instance_to_proto, policy_to_proto, snapshot_event, summary_to_proto,
};
use super::MAX_WATCH_SERVICES;
use crate::model::{validate_name, validate_namespace, validate_version, Change, Revision};
use crate::node::Shared;
use crate::watch::filter;

/// Events a watcher's stream may hold before the watcher waits on the client. While it
/// waits, the hub's buffer fills and the watcher is resynced; the registry never waits.
const WATCH_STREAM_BUFFER: usize = 4;

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

    fn watch(&self, req: pb::WatchRequest) -> Result<WatchStream, Status> {
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
        let mut services = req.services;
        services.sort();
        services.dedup();
        let metrics = &self.shared.metrics;
        if metrics.watchers.get() >= self.shared.config.max_watchers as i64 {
            return Err(Status::resource_exhausted(format!(
                "this node already serves {} watches: watch from another node or raise max_watchers",
                self.shared.config.max_watchers
            )));
        }

        // Subscribe and read the starting state under one read lock: every change is
        // then either in that state or on the receiver, never both, never neither.
        let (rx, first) = {
            let catalog = self.shared.catalog.read();
            let rx = self.shared.hub.subscribe();
            let current = catalog.revision();
            let resumed = (req.since_revision > 0 && req.since_revision <= current)
                .then(|| self.shared.hub.since(req.since_revision))
                .flatten();
            let first: Vec<pb::WatchEvent> = match resumed {
                Some(changes) => changes
                    .iter()
                    .filter_map(|c| filter(c, &namespace, &services))
                    .map(|c| delta_event(&c))
                    .collect(),
                None => vec![snapshot_event(
                    current,
                    &catalog.snapshot(&namespace, &services),
                )],
            };
            (rx, first)
        };

        // Counted before the task starts, so a burst cannot overshoot max_watchers.
        self.shared.metrics.watchers.inc();
        let (tx, out) = mpsc::channel(WATCH_STREAM_BUFFER);
        let watcher = Watcher {
            shared: self.shared.clone(),
            namespace,
            services,
            tx,
        };
        tokio::spawn(watcher.run(rx, first));
        Ok(Box::pin(ReceiverStream::new(out)))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// One Watch stream: forwards matching changes, resyncs when it falls behind.
struct Watcher {
    shared: Arc<Shared>,
    namespace: String,
    services: Vec<String>,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
}

impl Watcher {
    async fn run(self, mut rx: broadcast::Receiver<Arc<Change>>, first: Vec<pb::WatchEvent>) {
        let metrics = &self.shared.metrics;
        let mut shutdown = self.shared.shutdown.clone();
        let mut seen: Revision = 0;
        let result: Result<(), ()> = async {
            for event in first {
                seen = seen.max(event.revision);
                self.send(event, &mut shutdown).await?;
            }
            loop {
                let received = tokio::select! {
                    r = rx.recv() => r,
                    _ = shutdown.wait_for(|s| *s) => return Err(()),
                    // The client went away while nothing changed: free the slot now.
                    _ = self.tx.closed() => return Err(()),
                };
                match received {
                    Ok(change) if change.reset => {
                        metrics.watch_resyncs.inc();
                        let event = {
                            let catalog = self.shared.catalog.read();
                            snapshot_event(
                                catalog.revision(),
                                &catalog.snapshot(&self.namespace, &self.services),
                            )
                        };
                        seen = event.revision;
                        self.send(event, &mut shutdown).await?;
                    }
                    Ok(change) => {
                        if change.revision <= seen {
                            continue;
                        }
                        seen = change.revision;
                        if let Some(c) = filter(&change, &self.namespace, &self.services) {
                            self.send(delta_event(&c), &mut shutdown).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        metrics.watch_resyncs.inc();
                        tracing::debug!(missed, namespace = %self.namespace, "watcher fell behind; resyncing with a snapshot");
                        let event = {
                            let catalog = self.shared.catalog.read();
                            snapshot_event(
                                catalog.revision(),
                                &catalog.snapshot(&self.namespace, &self.services),
                            )
                        };
                        // Changes still on the receiver up to here are in the snapshot.
                        seen = event.revision;
                        self.send(event, &mut shutdown).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(()),
                }
            }
        }
        .await;
        let _ = result;
        metrics.watchers.dec();
    }

    /// Sends one event; `Err` when the client is gone or the node stops.
    async fn send(
        &self,
        event: pb::WatchEvent,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ()> {
        tokio::select! {
            r = self.tx.send(Ok(event)) => r.map_err(|_| ()),
            _ = shutdown.wait_for(|s| *s) => Err(()),
        }
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryApi {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = self.watch(request.into_inner());
        self.shared.metrics.observe("Watch", r).map(Response::new)
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let r = self.resolve(request.into_inner());
        self.shared.metrics.observe("Resolve", r).map(Response::new)
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let r = self.list_services(request.into_inner());
        self.shared
            .metrics
            .observe("ListServices", r)
            .map(Response::new)
    }
}
