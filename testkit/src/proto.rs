//! Builders for wire messages the tests repeat: instances, routing policies, watch
//! requests and events; Resolve; telemetry windows; and a watcher's view of the catalog.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use tonic::transport::Channel;

/// An instance of `service` at 127.0.0.1:8080 in the default namespace, weight unset.
pub fn instance(service: &str, id: &str, version: &str) -> pb::Instance {
    pb::Instance {
        namespace: String::new(),
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        version: version.into(),
        labels: Default::default(),
        weight: 0,
        zone: String::new(),
        state: 0,
        mesh_port: 0,
    }
}

/// An instance of `service` listening on `addr`, with `weight`.
pub fn instance_at(
    service: &str,
    id: &str,
    addr: SocketAddr,
    version: &str,
    weight: u32,
) -> pb::Instance {
    pb::Instance {
        address: addr.ip().to_string(),
        port: u32::from(addr.port()),
        weight,
        ..instance(service, id, version)
    }
}

/// A weighted split: `[("stable", 90), ("canary", 10)]`.
pub fn split(entries: &[(&str, u32)]) -> Vec<pb::WeightedSubset> {
    entries
        .iter()
        .map(|(s, w)| pb::WeightedSubset {
            subset: s.to_string(),
            weight: *w,
        })
        .collect()
}

/// A subset named `name` selecting one exact `version`.
pub fn subset(name: &str, version: &str) -> pb::Subset {
    pb::Subset {
        name: name.into(),
        version: version.into(),
        ..Default::default()
    }
}

/// The canary policy the routing tests share: subsets `stable` (1.0.0) and `canary`
/// (2.0.0), a route `testers` sending `x-canary: true` all to canary, and `default` as
/// the default split.
pub fn canary_policy(default: &[(&str, u32)]) -> pb::Policy {
    pb::Policy {
        subsets: vec![subset("stable", "1.0.0"), subset("canary", "2.0.0")],
        routes: vec![pb::Route {
            name: "testers".into(),
            headers: vec![pb::HeaderMatch {
                name: "x-canary".into(),
                r#match: Some(pb::header_match::Match::Exact("true".into())),
            }],
            split: split(&[("canary", 100)]),
            sticky_header: String::new(),
            retryable: false,
        }],
        default_split: split(default),
        fallback: pb::Fallback::Default as i32,
        sticky_header: String::new(),
        resilience: None,
    }
}

/// A watch of every service in the default namespace, resuming after `since`.
pub fn watch_all(since: u64) -> pb::WatchRequest {
    pb::WatchRequest {
        namespace: String::new(),
        services: vec![],
        since_revision: since,
        cluster_id: String::new(),
        flags: false,
        kv_prefixes: Vec::new(),
    }
}

/// A watch of the given services in the default namespace, resuming after `since`.
pub fn watch_of(services: &[&str], since: u64) -> pb::WatchRequest {
    pb::WatchRequest {
        services: services.iter().map(|s| s.to_string()).collect(),
        ..watch_all(since)
    }
}

/// One service's state in a snapshot.
pub fn service_state(
    service: &str,
    instances: Vec<pb::Instance>,
    policy: Option<pb::Policy>,
) -> pb::ServiceState {
    pb::ServiceState {
        service: service.into(),
        instances,
        policy,
    }
}

/// A snapshot event: the whole catalog at `revision`.
pub fn snapshot(revision: u64, services: Vec<pb::ServiceState>) -> pb::WatchEvent {
    pb::WatchEvent {
        revision,
        cluster_id: String::new(),
        kind: Some(pb::watch_event::Kind::Snapshot(pb::Snapshot { services })),
        intentions: Vec::new(),
        trust_bundle: String::new(),
        mtls: Vec::new(),
        ..Default::default()
    }
}

/// A snapshot of instances only, grouped by their service.
pub fn snapshot_of(revision: u64, instances: Vec<pb::Instance>) -> pb::WatchEvent {
    let mut services: BTreeMap<String, Vec<pb::Instance>> = BTreeMap::new();
    for i in instances {
        services.entry(i.service.clone()).or_default().push(i);
    }
    snapshot(
        revision,
        services
            .into_iter()
            .map(|(s, i)| service_state(&s, i, None))
            .collect(),
    )
}

/// A delta event at `revision`.
pub fn delta(
    revision: u64,
    upserted: Vec<pb::Instance>,
    removed: Vec<pb::InstanceRef>,
    policies: Vec<pb::ServiceState>,
) -> pb::WatchEvent {
    pb::WatchEvent {
        revision,
        cluster_id: String::new(),
        kind: Some(pb::watch_event::Kind::Delta(pb::Delta {
            upserted,
            removed,
            policies,
        })),
        intentions: Vec::new(),
        trust_bundle: String::new(),
        mtls: Vec::new(),
        ..Default::default()
    }
}

/// A reference to instance `id` of `service` in the default namespace.
pub fn instance_ref(service: &str, id: &str) -> pb::InstanceRef {
    pb::InstanceRef {
        namespace: String::new(),
        service: service.into(),
        id: id.into(),
    }
}

/// A delta that sets (or, with `None`, clears) the policy of `service`.
pub fn policy_delta(revision: u64, service: &str, policy: Option<pb::Policy>) -> pb::WatchEvent {
    delta(
        revision,
        vec![],
        vec![],
        vec![service_state(service, vec![], policy)],
    )
}

/// Resolve of every version of `service` in the default namespace.
pub async fn resolve(client: &mut DiscoveryClient<Channel>, service: &str) -> pb::ResolveResponse {
    client
        .resolve(pb::ResolveRequest {
            namespace: String::new(),
            service: service.into(),
            version: String::new(),
        })
        .await
        .expect("resolve")
        .into_inner()
}

/// The instance ids Resolve answers for `service`.
pub async fn resolve_ids(client: &mut DiscoveryClient<Channel>, service: &str) -> Vec<String> {
    resolve(client, service)
        .await
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect()
}

/// A watcher's view of the catalog, built only from the events it received.
#[derive(Default, Debug)]
pub struct View {
    pub revision: u64,
    pub instances: BTreeMap<String, pb::Instance>,
    pub snapshots: usize,
}

impl View {
    pub fn apply(&mut self, event: pb::WatchEvent) {
        self.revision = event.revision;
        match event.kind {
            Some(pb::watch_event::Kind::Snapshot(s)) => {
                self.snapshots += 1;
                self.instances.clear();
                for svc in s.services {
                    for i in svc.instances {
                        self.instances.insert(i.id.clone(), i);
                    }
                }
            }
            Some(pb::watch_event::Kind::Delta(d)) => {
                for i in d.upserted {
                    self.instances.insert(i.id.clone(), i);
                }
                for r in d.removed {
                    self.instances.remove(&r.id);
                }
            }
            None => panic!("event without kind"),
        }
    }
}

/// Opens a watch stream with `request`.
pub async fn open_watch(
    client: &mut DiscoveryClient<Channel>,
    request: pb::WatchRequest,
) -> tonic::Streaming<pb::WatchEvent> {
    client.watch(request).await.expect("watch").into_inner()
}

/// One version's telemetry in the default namespace: `requests` attempts, all in the
/// 10-25 ms latency bucket, `errors` of them failed, none slow.
pub fn version_stats(service: &str, version: &str, requests: u64, errors: u64) -> pb::VersionStats {
    let mut latency_buckets = vec![0; switchyard_core::telemetry::BUCKETS];
    latency_buckets[4] = requests;
    pb::VersionStats {
        namespace: String::new(),
        service: service.into(),
        version: version.into(),
        requests,
        errors,
        slow: 0,
        latency_buckets,
    }
}

/// A 10 s telemetry window from sidecar `test` holding `versions`.
pub fn window_report(versions: Vec<pb::VersionStats>) -> pb::WindowReport {
    pb::WindowReport {
        sidecar_id: "test".into(),
        window_start_unix_ms: 0,
        window_seconds: 10,
        versions,
    }
}
