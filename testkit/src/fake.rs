//! A fake registry: a real tonic `switchyard.v1.Discovery` server on `127.0.0.1:0`
//! with no Raft, no leases and no history. The test is the control plane: it pushes
//! watch events through the handle, and the fake hands them to every connected watcher
//! and keeps the catalog they add up to, to answer Resolve, ListServices and new
//! watchers from.
//!
//! A new watch is answered like a registry that keeps no history: nothing when it
//! resumes at the current revision, else a snapshot of the catalog (when anything was
//! pushed). Namespaces are not looked at: one catalog serves them all.
//!
//! Hazard: a watch registers under the same lock a push takes, so a watcher sees
//! either the snapshot with an event in it or the event itself, never neither.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_server::{Discovery, DiscoveryServer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

type Events = mpsc::UnboundedSender<Result<pb::WatchEvent, Status>>;

/// One service as pushed so far.
#[derive(Default, Clone)]
struct Service {
    instances: BTreeMap<String, pb::Instance>,
    policy: Option<pb::Policy>,
}

#[derive(Default)]
struct State {
    revision: u64,
    services: BTreeMap<String, Service>,
    watchers: Vec<Events>,
    requests: Vec<pb::WatchRequest>,
    /// While set, new watches are refused with this status.
    refusing: Option<Status>,
}

impl State {
    fn apply(&mut self, event: &pb::WatchEvent) {
        self.revision = event.revision;
        match &event.kind {
            Some(pb::watch_event::Kind::Snapshot(s)) => {
                self.services.clear();
                for svc in &s.services {
                    let entry = self.services.entry(svc.service.clone()).or_default();
                    entry.policy = svc.policy.clone();
                    for i in &svc.instances {
                        entry.instances.insert(i.id.clone(), i.clone());
                    }
                }
            }
            Some(pb::watch_event::Kind::Delta(d)) => {
                for r in &d.removed {
                    if let Some(s) = self.services.get_mut(&r.service) {
                        s.instances.remove(&r.id);
                    }
                }
                for i in &d.upserted {
                    self.services
                        .entry(i.service.clone())
                        .or_default()
                        .instances
                        .insert(i.id.clone(), i.clone());
                }
                for p in &d.policies {
                    self.services.entry(p.service.clone()).or_default().policy = p.policy.clone();
                }
            }
            None => {}
        }
        self.services
            .retain(|_, s| !s.instances.is_empty() || s.policy.is_some());
    }

    fn snapshot(&self) -> pb::WatchEvent {
        pb::WatchEvent {
            revision: self.revision,
            cluster_id: String::new(),
            kind: Some(pb::watch_event::Kind::Snapshot(pb::Snapshot {
                services: self
                    .services
                    .iter()
                    .map(|(name, s)| pb::ServiceState {
                        service: name.clone(),
                        instances: s.instances.values().cloned().collect(),
                        policy: s.policy.clone(),
                    })
                    .collect(),
            })),
            intentions: Vec::new(),
            trust_bundle: String::new(),
            mtls: Vec::new(),
            ..Default::default()
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// How many watch requests arrived so far.
    watches: watch::Sender<usize>,
}

struct Api(Arc<Shared>);

#[tonic::async_trait]
impl Discovery for Api {
    type WatchStream = UnboundedReceiverStream<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let since = req.since_revision;
        let answer = {
            let mut st = self.0.state.lock();
            st.requests.push(req);
            match st.refusing.clone() {
                Some(status) => Err(status),
                None => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    if st.revision > 0 && since != st.revision {
                        let _ = tx.send(Ok(st.snapshot()));
                    }
                    st.watchers.push(tx);
                    Ok(Response::new(UnboundedReceiverStream::new(rx)))
                }
            }
        };
        self.0.watches.send_modify(|n| *n += 1);
        answer
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let req = request.into_inner();
        let st = self.0.state.lock();
        let service = st.services.get(&req.service).cloned().unwrap_or_default();
        Ok(Response::new(pb::ResolveResponse {
            instances: service
                .instances
                .into_values()
                .filter(|i| req.version.is_empty() || i.version == req.version)
                .collect(),
            policy: service.policy,
            revision: st.revision,
        }))
    }

    async fn list_services(
        &self,
        _request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let st = self.0.state.lock();
        let services = st
            .services
            .iter()
            .filter(|(_, s)| !s.instances.is_empty())
            .map(|(name, s)| {
                let mut versions: Vec<String> =
                    s.instances.values().map(|i| i.version.clone()).collect();
                versions.sort();
                versions.dedup();
                pb::ServiceSummary {
                    name: name.clone(),
                    instance_count: s.instances.len() as u32,
                    versions,
                }
            })
            .collect();
        Ok(Response::new(pb::ListServicesResponse {
            services,
            revision: st.revision,
        }))
    }
}

/// The handle of a running fake registry. Dropping it stops the server.
pub struct FakeRegistry {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeRegistry {
    /// Serves an empty catalog at revision 0 on `127.0.0.1:0`.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake registry");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            watches: watch::channel(0).0,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let service = DiscoveryServer::from_arc(Arc::new(Api(shared.clone())));
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                // As the registry does: without TCP_NODELAY a lone event waits for the
                // client's delayed ACK.
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Self {
            addr,
            shared,
            stop: Some(stop),
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `event` to the catalog and sends it to every connected watcher.
    pub fn push(&self, event: pb::WatchEvent) {
        let mut st = self.shared.state.lock();
        st.apply(&event);
        st.watchers.retain(|w| w.send(Ok(event.clone())).is_ok());
    }

    /// The revision of the last event pushed.
    pub fn revision(&self) -> u64 {
        self.shared.state.lock().revision
    }

    /// Upserts `instances` in a delta at the next revision; returns that revision.
    pub fn upsert(&self, instances: Vec<pb::Instance>) -> u64 {
        let revision = self.revision() + 1;
        self.push(crate::proto::delta(revision, instances, vec![], vec![]));
        revision
    }

    /// Removes instance `id` of `service` in a delta at the next revision.
    pub fn remove(&self, service: &str, id: &str) -> u64 {
        let revision = self.revision() + 1;
        let gone = vec![crate::proto::instance_ref(service, id)];
        self.push(crate::proto::delta(revision, vec![], gone, vec![]));
        revision
    }

    /// Sets (or clears) the policy of `service` in a delta at the next revision.
    pub fn set_policy(&self, service: &str, policy: Option<pb::Policy>) -> u64 {
        let revision = self.revision() + 1;
        self.push(crate::proto::policy_delta(revision, service, policy));
        revision
    }

    /// Every watch request received so far, in order (refused ones included).
    pub fn requests(&self) -> Vec<pb::WatchRequest> {
        self.shared.state.lock().requests.clone()
    }

    /// Waits until `n` watch requests have arrived (at most `limit`); returns the n-th.
    pub async fn nth_watch(&self, n: usize, limit: Duration) -> pb::WatchRequest {
        assert!(n > 0, "watches count from 1");
        let mut count = self.shared.watches.subscribe();
        tokio::time::timeout(limit, count.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} watch requests within {limit:?}"))
            .expect("the fake registry is alive");
        self.shared.state.lock().requests[n - 1].clone()
    }

    /// How many watch streams are open (a client gone is noticed on the next send).
    pub fn watchers(&self) -> usize {
        let mut st = self.shared.state.lock();
        st.watchers.retain(|w| !w.is_closed());
        st.watchers.len()
    }

    /// Ends every open watch stream, as a registry going away would; the watchers see
    /// the stream end and reconnect.
    pub fn drop_streams(&self) {
        self.shared.state.lock().watchers.clear();
    }

    /// Fails every open watch stream with `status`.
    pub fn fail_streams(&self, status: Status) {
        for w in self.shared.state.lock().watchers.drain(..) {
            let _ = w.send(Err(status.clone()));
        }
    }

    /// From now on, refuses new watches with `Unavailable` (they are still counted in
    /// [`requests`](Self::requests)); open streams are left alone.
    pub fn refuse_watches(&self) {
        self.shared.state.lock().refusing = Some(Status::unavailable("the fake is down"));
    }

    /// Accepts new watches again.
    pub fn accept_watches(&self) {
        self.shared.state.lock().refusing = None;
    }

    /// Ends every stream and stops the server; its port is closed once this returns.
    pub async fn shutdown(mut self) {
        self.drop_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let server = &mut self.server;
        if tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .is_err()
        {
            self.server.abort();
        }
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}
