//! Our model as Consul shows it. Each instance is a synthetic node named by its address
//! (`Node.Node` = `Node.Address`: Ocelot dials the node name) running one service whose
//! `ID` is the instance id. Tags are `version-<v>`, each label as `k=v`, and the tags a
//! Consul client registered; `Meta` holds `version`, `zone` and the labels.
//!
//! Health: the check `service:<id>` is passing while the instance is SERVING, critical
//! while FAILING, and warning after a Consul client's `warn`; a DRAINING instance also
//! carries `_service_maintenance:<id>`, critical, named "Service Maintenance Mode", as
//! Consul shows a service in maintenance. Field names are exactly Consul's.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{Instance, State};

/// Label holding the tags a Consul client registered (a JSON array), verbatim: tags may
/// hold characters label keys may not.
pub const TAGS_LABEL: &str = "consul.tags";
/// Label set to `warning` by a Consul client's `warn` (cleared by `pass`).
pub const CHECK_LABEL: &str = "consul.check";
/// Label holding the output of the last check update, when a client sent one.
pub const OUTPUT_LABEL: &str = "consul.output";

fn reserved(key: &str) -> bool {
    key == TAGS_LABEL || key == CHECK_LABEL || key == OUTPUT_LABEL
}

/// What every view needs besides the instance.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub datacenter: &'a str,
    /// The service's modify index (Create/ModifyIndex of what it shows).
    pub index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaggedAddresses<'a> {
    pub lan: &'a str,
    pub lan_ipv4: &'a str,
    pub wan: &'a str,
    pub wan_ipv4: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node<'a> {
    #[serde(rename = "ID")]
    pub id: &'static str,
    pub node: &'a str,
    pub address: &'a str,
    pub datacenter: &'a str,
    #[serde(rename = "TaggedAddresses")]
    pub tagged_addresses: BTreeMap<&'static str, &'a str>,
    pub meta: BTreeMap<&'static str, &'a str>,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Service<'a> {
    #[serde(rename = "ID")]
    pub id: &'a str,
    pub service: &'a str,
    pub tags: Vec<String>,
    pub address: &'a str,
    pub meta: BTreeMap<&'a str, &'a str>,
    pub port: u16,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub kind: &'static str,
    pub namespace: &'a str,
    pub datacenter: &'a str,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck<'a> {
    pub node: &'a str,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub status: &'static str,
    pub notes: &'a str,
    pub output: &'a str,
    #[serde(rename = "ServiceID")]
    pub service_id: &'a str,
    pub service_name: &'a str,
    pub service_tags: Vec<String>,
    #[serde(rename = "Type")]
    pub kind: &'static str,
    pub namespace: &'a str,
    pub create_index: u64,
    pub modify_index: u64,
}

/// An entry of `/v1/health/service/:name`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry<'a> {
    pub node: Node<'a>,
    pub service: Service<'a>,
    pub checks: Vec<HealthCheck<'a>>,
}

/// An entry of `/v1/catalog/service/:name`: node and service flattened, as Consul does.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogService<'a> {
    #[serde(rename = "ID")]
    pub id: &'static str,
    pub node: &'a str,
    pub address: &'a str,
    pub datacenter: &'a str,
    pub tagged_addresses: BTreeMap<&'static str, &'a str>,
    pub node_meta: BTreeMap<&'static str, &'a str>,
    pub service_kind: &'static str,
    #[serde(rename = "ServiceID")]
    pub service_id: &'a str,
    pub service_name: &'a str,
    pub service_tags: Vec<String>,
    pub service_address: &'a str,
    pub service_weights: Weights,
    pub service_meta: BTreeMap<&'a str, &'a str>,
    pub service_port: u16,
    pub service_enable_tag_override: bool,
    pub namespace: &'a str,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Tags as Consul shows them: `version-<v>`, the labels as `k=v`, then the tags a
/// Consul client registered; each once, in that order.
pub fn tags(i: &Instance) -> Vec<String> {
    let mut out = vec![format!("version-{}", i.version)];
    for (k, v) in i.labels.iter().filter(|(k, _)| !reserved(k)) {
        out.push(format!("{k}={v}"));
    }
    for t in registered_tags(i) {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// The tags a Consul client registered, kept in [`TAGS_LABEL`].
pub fn registered_tags(i: &Instance) -> Vec<String> {
    i.labels
        .get(TAGS_LABEL)
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

/// `Meta`: `version`, `zone` (when set) and the labels.
pub fn meta(i: &Instance) -> BTreeMap<&str, &str> {
    let mut m: BTreeMap<&str, &str> = i
        .labels
        .iter()
        .filter(|(k, _)| !reserved(k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    m.insert("version", &i.version);
    if !i.zone.is_empty() {
        m.insert("zone", &i.zone);
    }
    m
}

fn node_meta(i: &Instance) -> BTreeMap<&'static str, &str> {
    let mut m = BTreeMap::new();
    if !i.zone.is_empty() {
        m.insert("zone", i.zone.as_str());
    }
    m
}

fn tagged(i: &Instance) -> BTreeMap<&'static str, &str> {
    let a = i.address.as_str();
    let mut m = BTreeMap::from([("lan", a), ("wan", a)]);
    if a.parse::<std::net::Ipv4Addr>().is_ok() {
        m.insert("lan_ipv4", a);
        m.insert("wan_ipv4", a);
    } else if a.parse::<std::net::Ipv6Addr>().is_ok() {
        m.insert("lan_ipv6", a);
        m.insert("wan_ipv6", a);
    }
    m
}

/// The status of the instance's service check.
pub fn service_status(i: &Instance) -> &'static str {
    match i.state {
        State::Failing => "critical",
        _ if i.labels.get(CHECK_LABEL).is_some_and(|s| s == "warning") => "warning",
        _ => "passing",
    }
}

/// The worst status of all its checks (what `passing` filters on).
pub fn status(i: &Instance) -> &'static str {
    if i.state == State::Draining {
        return "critical";
    }
    service_status(i)
}

pub fn node<'a>(i: &'a Instance, ctx: Ctx<'a>) -> Node<'a> {
    Node {
        id: "",
        node: &i.address,
        address: &i.address,
        datacenter: ctx.datacenter,
        tagged_addresses: tagged(i),
        meta: node_meta(i),
        create_index: ctx.index,
        modify_index: ctx.index,
    }
}

fn weights(i: &Instance) -> Weights {
    Weights {
        passing: i.weight,
        warning: 1,
    }
}

fn service_tagged<'a>(i: &'a Instance, ctx: Ctx<'a>, tags: Vec<String>) -> Service<'a> {
    Service {
        id: &i.id,
        service: &i.service,
        tags,
        address: &i.address,
        meta: meta(i),
        port: i.port,
        weights: weights(i),
        enable_tag_override: false,
        kind: "",
        namespace: &i.namespace,
        datacenter: ctx.datacenter,
        create_index: ctx.index,
        modify_index: ctx.index,
    }
}

/// The instance's checks: `service:<id>`, and the maintenance check while DRAINING.
pub fn checks<'a>(i: &'a Instance, ctx: Ctx<'a>) -> Vec<HealthCheck<'a>> {
    checks_tagged(i, ctx, &tags(i))
}

fn checks_tagged<'a>(i: &'a Instance, ctx: Ctx<'a>, tags: &[String]) -> Vec<HealthCheck<'a>> {
    let check = |check_id: String, name: String, status, output, kind| HealthCheck {
        node: &i.address,
        check_id,
        name,
        status,
        notes: "",
        output,
        service_id: &i.id,
        service_name: &i.service,
        service_tags: tags.to_vec(),
        kind,
        namespace: &i.namespace,
        create_index: ctx.index,
        modify_index: ctx.index,
    };
    let output = i.labels.get(OUTPUT_LABEL).map_or("", String::as_str);
    let mut out = vec![check(
        format!("service:{}", i.id),
        format!("Service '{}' check", i.service),
        service_status(i),
        output,
        "ttl",
    )];
    if i.state == State::Draining {
        out.push(check(
            format!("_service_maintenance:{}", i.id),
            "Service Maintenance Mode".into(),
            "critical",
            "",
            "maintenance",
        ));
    }
    out
}

/// An entry of `/v1/health/service/:name` (its tags built once, for the service and
/// its checks).
pub fn entry<'a>(i: &'a Instance, ctx: Ctx<'a>) -> ServiceEntry<'a> {
    let tags = tags(i);
    ServiceEntry {
        node: node(i, ctx),
        checks: checks_tagged(i, ctx, &tags),
        service: service_tagged(i, ctx, tags),
    }
}

pub fn catalog_service<'a>(i: &'a Instance, ctx: Ctx<'a>) -> CatalogService<'a> {
    CatalogService {
        id: "",
        node: &i.address,
        address: &i.address,
        datacenter: ctx.datacenter,
        tagged_addresses: tagged(i),
        node_meta: node_meta(i),
        service_kind: "",
        service_id: &i.id,
        service_name: &i.service,
        service_tags: tags(i),
        service_address: &i.address,
        service_weights: weights(i),
        service_meta: meta(i),
        service_port: i.port,
        service_enable_tag_override: false,
        namespace: &i.namespace,
        create_index: ctx.index,
        modify_index: ctx.index,
    }
}

/// Whether the instance carries every tag of `wanted` (Consul's AND of repeated `tag=`)
/// and every `node-meta` pair.
pub fn matches(i: &Instance, wanted: &[String], node_meta_wanted: &[(String, String)]) -> bool {
    let have = if wanted.is_empty() {
        Vec::new()
    } else {
        tags(i)
    };
    wanted.iter().all(|t| have.contains(t))
        && node_meta_wanted
            .iter()
            .all(|(k, v)| k == "zone" && !i.zone.is_empty() && &i.zone == v)
}

/// `?split=1`: the instances of one subset drawn by the service's current default split
/// (health-aware, like a sidecar's draw), so a client that asks per request follows the
/// canary weights. Without a policy, or with no weights, everything is returned.
pub fn split(
    policy: Option<&crate::model::Policy>,
    instances: Vec<std::sync::Arc<Instance>>,
) -> Vec<std::sync::Arc<Instance>> {
    use switchyard_core::select::{choose, Selection};
    let Some(policy) = policy else {
        return instances;
    };
    let sel = Selection::compile(policy);
    let healthy = |s: usize| {
        instances
            .iter()
            .any(|i| status(i) == "passing" && sel.subsets[s].selector.selects_instance(i))
    };
    let mut rng = fastrand::Rng::new();
    match choose(&sel.default, None, &mut rng, sel.fail_closed, healthy) {
        Ok(chosen) => instances
            .into_iter()
            .filter(|i| sel.subsets[chosen.subset].selector.selects_instance(i))
            .collect(),
        Err(_) if sel.default.entries.is_empty() => instances,
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn instance(id: &str, version: &str, state: State) -> Instance {
        Instance {
            namespace: "default".into(),
            service: "web".into(),
            id: id.into(),
            address: "10.0.0.7".into(),
            port: 8080,
            version: version.into(),
            labels: switchyard_core::model::Labels::from([
                ("team".to_string(), "blue".to_string()),
                (
                    TAGS_LABEL.to_string(),
                    r#"["urlprefix-/web","team=blue"]"#.to_string(),
                ),
            ]),
            weight: 3,
            zone: "eu-1".into(),
            state,
            mesh_port: 0,
        }
    }

    #[test]
    fn an_instance_is_a_node_named_by_its_address_with_consul_field_names() {
        let i = instance("web-1", "1.2.0", State::Serving);
        let ctx = Ctx {
            datacenter: "dc1",
            index: 9,
        };
        let v = serde_json::to_value(entry(&i, ctx)).expect("as expected");
        assert_eq!(v["Node"]["Node"], "10.0.0.7");
        assert_eq!(v["Node"]["Address"], "10.0.0.7");
        assert_eq!(v["Node"]["Datacenter"], "dc1");
        assert_eq!(v["Service"]["ID"], "web-1");
        assert_eq!(v["Service"]["Service"], "web");
        assert_eq!(v["Service"]["Port"], 8080);
        assert_eq!(v["Service"]["Kind"], "");
        assert_eq!(v["Service"]["Namespace"], "default");
        assert_eq!(v["Service"]["Weights"]["Passing"], 3);
        assert_eq!(
            v["Service"]["Tags"],
            serde_json::json!(["version-1.2.0", "team=blue", "urlprefix-/web"])
        );
        assert_eq!(v["Service"]["Meta"]["version"], "1.2.0");
        assert_eq!(v["Service"]["Meta"]["zone"], "eu-1");
        assert_eq!(v["Service"]["Meta"]["team"], "blue");
        assert!(v["Service"]["Meta"].get(TAGS_LABEL).is_none());
        assert_eq!(v["Checks"][0]["CheckID"], "service:web-1");
        assert_eq!(v["Checks"][0]["Status"], "passing");
        assert_eq!(v["Checks"].as_array().expect("as expected").len(), 1);
    }

    #[test]
    fn states_map_onto_consul_check_statuses() {
        let ctx = Ctx {
            datacenter: "dc1",
            index: 1,
        };
        let failing = instance("a", "1", State::Failing);
        assert_eq!(checks(&failing, ctx)[0].status, "critical");
        let draining = instance("b", "1", State::Draining);
        let c = checks(&draining, ctx);
        assert_eq!(c[1].check_id, "_service_maintenance:b");
        assert_eq!(c[1].name, "Service Maintenance Mode");
        assert_eq!(c[1].status, "critical");
        assert_eq!(status(&draining), "critical");
        let mut warned = instance("c", "1", State::Serving);
        warned.labels.insert(CHECK_LABEL.into(), "warning".into());
        assert_eq!(status(&warned), "warning");
    }

    #[test]
    fn repeated_tags_are_and_and_node_meta_matches_the_zone() {
        let i = instance("a", "2.0.0", State::Serving);
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches(&i, &t(&["version-2.0.0", "team=blue"]), &[]));
        assert!(!matches(&i, &t(&["version-2.0.0", "team=red"]), &[]));
        assert!(matches(&i, &[], &[("zone".into(), "eu-1".into())]));
        assert!(!matches(&i, &[], &[("zone".into(), "us-1".into())]));
        assert!(!matches(&i, &[], &[("rack".into(), "r1".into())]));
    }
}
