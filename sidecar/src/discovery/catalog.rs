//! The sidecar's copy of the catalog, built only from watch events, and the views it
//! publishes to the endpoint table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use switchyard_proto::v1 as pb;

use crate::endpoint::State;
use crate::metrics::Metrics;
use crate::table::{EndpointTable, InstanceRecord, ServiceView, Views};

/// Services and their instances at one revision; also the disk cache's format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub revision: u64,
    pub services: BTreeMap<String, BTreeMap<String, InstanceRecord>>,
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
                for svc in s.services {
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
        let names: Vec<&String> = match touched {
            Touched::All => self.services.keys().collect(),
            Touched::Some(set) => set.iter().collect(),
        };
        for name in names {
            match self.services.get(name) {
                Some(records) => {
                    let view = ServiceView::new(
                        name.clone(),
                        self.revision,
                        records,
                        old.get(name).map(|v| v.as_ref()),
                        metrics,
                    );
                    views.insert(name.clone(), Arc::new(view));
                }
                None => {
                    views.remove(name);
                }
            }
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
