//! The sidecar's DNS port: the registry's DNS answers (`switchyard_core::dns`), served
//! from this sidecar's cached catalog, so lookups keep working on localhost while no
//! registry answers.

use std::sync::Arc;

use switchyard_core::dns::{DnsSource, ServiceRecords};

use crate::table::EndpointTable;

/// The endpoint table as a DNS source (one namespace: the one the sidecar watches).
pub struct TableSource {
    pub table: Arc<EndpointTable>,
    pub namespace: String,
}

impl DnsSource for TableSource {
    fn service(&self, namespace: &str, service: &str) -> Option<Arc<ServiceRecords>> {
        if namespace != self.namespace {
            return None;
        }
        Some(self.table.get(service)?.dns.clone())
    }

    fn revision(&self) -> u64 {
        self.table.revision()
    }
}

#[cfg(test)]
mod tests {
    //! DNS and the proxy must pick from the same subsets: both go through
    //! `switchyard_core::select`, and this property checks it end to end for random
    //! instances and policies (declared subsets by version, range and label, implicit
    //! version subsets, names in mixed case).

    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;

    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use proptest::prelude::*;
    use switchyard_core::dns::{DnsConfig, DnsHandler};
    use switchyard_core::model::policy::{Fallback, Policy, Split, Subset};
    use switchyard_core::model::{Instance, State};

    use super::*;
    use crate::table::{ServiceView, Views};

    const VERSIONS: [&str; 5] = ["1.4.2", "1.5.0", "2.0.0", "canary", "Blue"];
    const NAMES: [&str; 4] = ["stable", "Canary", "next", "b"];

    fn instance(n: usize, version: usize, track: bool, state: u8) -> Arc<Instance> {
        Arc::new(Instance {
            namespace: "default".into(),
            service: "web".into(),
            id: format!("web-{n}"),
            address: format!("10.0.0.{}", n + 1),
            port: 8080,
            version: VERSIONS[version].into(),
            labels: switchyard_core::model::Labels::from([(
                "track".to_string(),
                if track { "a" } else { "b" }.to_string(),
            )]),
            weight: 100,
            zone: String::new(),
            state: [State::Serving, State::Draining, State::Failing][usize::from(state % 3)],
            mesh_port: 0,
        })
    }

    fn subset(name: usize, kind: u8, version: usize) -> Subset {
        let mut s = Subset {
            name: NAMES[name].into(),
            version: String::new(),
            version_range: String::new(),
            labels: BTreeMap::new(),
        };
        match kind % 3 {
            // Upper-cased on purpose: names compare case-insensitively everywhere.
            0 => s.version = VERSIONS[version].to_ascii_uppercase(),
            1 => s.version_range = ["^1.4", ">=1.5.0", "*"][version % 3].into(),
            _ => {
                s.labels.insert("track".into(), "a".into());
            }
        }
        s
    }

    fn dns_addresses(handler: &DnsHandler<TableSource>, name: &str) -> BTreeSet<IpAddr> {
        let mut q = Message::new(7, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        let packet = q.to_vec().expect("encode");
        let (bytes, _) = handler.udp_response(&packet).expect("an answer");
        Message::from_vec(&bytes)
            .expect("decode")
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn dns_and_the_proxy_pick_from_the_same_subsets(
            specs in proptest::collection::vec((0..5usize, any::<bool>(), 0..3u8), 1..10),
            subsets in proptest::collection::btree_map(0..4usize, (0..3u8, 0..5usize), 0..4),
            split in proptest::collection::vec((0..9usize, 0..100u32), 0..4),
        ) {
            let instances: BTreeMap<String, Arc<Instance>> = specs
                .iter()
                .enumerate()
                .map(|(n, (v, t, s))| {
                    let i = instance(n, *v, *t, *s);
                    (i.id.clone(), i)
                })
                .collect();
            // Split entries name a declared subset (0-3) or a version (4-8).
            let mut seen = BTreeSet::new();
            let default_split: Vec<Split> = split
                .iter()
                .map(|(target, weight)| Split {
                    subset: if *target < 4 { NAMES[*target] } else { VERSIONS[*target - 4] }.to_string(),
                    weight: *weight,
                })
                .filter(|s| seen.insert(s.subset.to_ascii_lowercase()))
                .collect();
            let policy = Arc::new(Policy {
                subsets: subsets.iter().map(|(n, (k, v))| subset(*n, *k, *v)).collect(),
                routes: Vec::new(),
                default_split,
                fallback: Fallback::Default,
                sticky_header: String::new(),
                resilience: Default::default(),
            });
            let view = Arc::new(ServiceView::new("web".into(), 1, &instances, Some(&policy), None, None, &Default::default(), &Default::default()));
            let table = Arc::new(EndpointTable::default());
            table.store(Views::from([("web".to_string(), view.clone())]), 1);
            let handler = DnsHandler::new(
                TableSource { table, namespace: "default".into() },
                &DnsConfig::default(),
            )
            .expect("handler");
            let compiled = view.policy.as_ref().expect("compiled");
            let address = |i: usize| -> IpAddr {
                view.endpoints[i].address.parse().expect("an IP")
            };
            // Every subset the proxy knows, asked by name (a DNS label, lower-cased by
            // the resolver): the same serving members.
            for s in compiled.subsets.iter().filter(|s| !s.name.contains('.')) {
                let proxy: BTreeSet<IpAddr> = s.pool.usable.iter().map(|&i| address(i)).collect();
                let dns = dns_addresses(&handler, &format!("{}.web.service.switchyard.", s.name.to_ascii_lowercase()));
                prop_assert_eq!(&dns, &proxy, "subset {}", s.name);
            }
            // The plain name under a split: each answer is the whole serving set of one
            // subset the proxy could draw (weight > 0, something serving), or all serving
            // instances when no split applies.
            let drawable: Vec<BTreeSet<IpAddr>> = compiled
                .default
                .rule
                .entries
                .iter()
                .map(|(i, _)| compiled.subsets[*i].pool.usable.iter().map(|&e| address(e)).collect::<BTreeSet<_>>())
                .filter(|set| !set.is_empty())
                .collect();
            let all: BTreeSet<IpAddr> = view.pool.usable.iter().map(|&i| address(i)).collect();
            for _ in 0..8 {
                let dns = dns_addresses(&handler, "web.service.switchyard.");
                if compiled.default.rule.entries.is_empty() {
                    prop_assert_eq!(&dns, &all);
                } else if drawable.is_empty() {
                    prop_assert!(dns.is_empty());
                } else {
                    prop_assert!(drawable.contains(&dns), "{:?} is no drawable subset of {:?}", dns, drawable);
                }
            }
        }
    }
}
