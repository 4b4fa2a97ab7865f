//! The sidecar's copy of the catalog, built only from watch events, and the views it
//! publishes to the endpoint table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use prost::Message;
use serde::{Deserialize, Serialize};
use switchyard_proto::v1 as pb;

use crate::endpoint::State;
use crate::metrics::Metrics;
use crate::table::{EndpointTable, InstanceRecord, ServiceView, Views};

/// Services, their instances and their routing policies at one revision; also the disk
/// cache's format (policies as their protobuf encoding).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub revision: u64,
    pub services: BTreeMap<String, BTreeMap<String, InstanceRecord>>,
    #[serde(default)]
    pub policies: BTreeMap<String, Vec<u8>>,
}

fn record(i: pb::Instance) -> Option<InstanceRecord> {
    let state = match pb::State::try_from(i.state) {
        Ok(pb::State::Draining) => State::Draining,
        Ok(pb::State::Failing) => State::Failing,
        _ => State::Serving,
    };
    Some(InstanceRecord {
        port: u16::try_from(i.port).ok().filter(|p| *p != 0)?,
        id: i.id,
        address: i.address,
        version: i.version,
        labels: i.labels.into_iter().collect(),
        weight: i.weight,
        zone: i.zone,
        state,
    })
}

impl Catalog {
    /// Applies one watch event; returns the services it touched (all, for a snapshot).
    pub fn apply(&mut self, event: pb::WatchEvent) -> Touched {
        self.revision = event.revision;
        match event.kind {
            Some(pb::watch_event::Kind::Snapshot(s)) => {
                self.services.clear();
                self.policies.clear();
                for mut svc in s.services {
                    if let Some(p) = svc.policy.take() {
                        self.policies.insert(svc.service.clone(), p.encode_to_vec());
                    }
                    if svc.instances.is_empty() {
                        continue;
                    }
                    let instances = svc
                        .instances
                        .into_iter()
                        .filter_map(|i| record(i).map(|r| (r.id.clone(), r)))
                        .collect();
                    self.services.insert(svc.service, instances);
                }
                Touched::All
            }
            Some(pb::watch_event::Kind::Delta(d)) => {
                let mut touched = BTreeSet::new();
                for r in d.removed {
                    if let Some(instances) = self.services.get_mut(&r.service) {
                        instances.remove(&r.id);
                        if instances.is_empty() {
                            self.services.remove(&r.service);
                        }
                    }
                    touched.insert(r.service);
                }
                for i in d.upserted {
                    let service = i.service.clone();
                    if let Some(r) = record(i) {
                        self.services
                            .entry(service.clone())
                            .or_default()
                            .insert(r.id.clone(), r);
                    }
                    touched.insert(service);
                }
                for p in d.policies {
                    match p.policy {
                        Some(policy) => {
                            self.policies
                                .insert(p.service.clone(), policy.encode_to_vec());
                        }
                        None => {
                            self.policies.remove(&p.service);
                        }
                    }
                    touched.insert(p.service);
                }
                Touched::Some(touched)
            }
            None => Touched::Some(BTreeSet::new()),
        }
    }

    /// Publishes the touched services to the table; untouched views (and so every
    /// in-flight count) are carried over as they are.
    pub fn publish(&self, touched: &Touched, table: &EndpointTable, metrics: Option<&Metrics>) {
        let old = table.all();
        let mut views: Views = match touched {
            Touched::All => HashMap::with_capacity(self.services.len()),
            Touched::Some(_) => (*old).clone(),
        };
        let names: BTreeSet<&String> = match touched {
            Touched::All => self.services.keys().chain(self.policies.keys()).collect(),
            Touched::Some(set) => set.iter().collect(),
        };
        let empty = BTreeMap::new();
        for name in names {
            let records = self.services.get(name);
            let policy = self
                .policies
                .get(name)
                .and_then(|bytes| pb::Policy::decode(bytes.as_slice()).ok());
            if records.is_none() && policy.is_none() {
                views.remove(name);
                continue;
            }
            let view = ServiceView::new(
                name.clone(),
                self.revision,
                records.unwrap_or(&empty),
                policy.as_ref(),
                old.get(name).map(|v| v.as_ref()),
                metrics,
            );
            views.insert(name.clone(), Arc::new(view));
        }
        table.store(views, self.revision);
    }
}

/// Which services an event changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Touched {
    All,
    Some(BTreeSet<String>),
}
