//! `PUT /v1/agent/service/register` bodies, decoded the way Consul does: keys in any
//! case (py-consul sends `name`, Spring and Steeltoe send `Name`), `Check` or `Checks`
//! (TTL, HTTP, TCP, GRPC with `Interval`, `Timeout`, `DeregisterCriticalServiceAfter`),
//! and errors that name the field. Bounded: the body size is capped by the caller, and
//! every list here by a constant.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Map, Value};

use super::query::go_duration;
use super::view::TAGS_LABEL;
use crate::model::{validate_instance, Instance, State, ValidationError};

/// Largest registration body read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const MAX_TAGS: usize = 64;
pub const MAX_CHECKS: usize = 8;
/// Shortest interval of a check this node runs.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// What a check does.
#[derive(Clone, Debug, PartialEq)]
pub enum CheckKind {
    /// Passed by the client (`/v1/agent/check/pass/...`) within this long.
    Ttl(Duration),
    /// GET (or `Method`) of a URL: 2xx passing, 429 warning, anything else critical.
    Http { url: String, method: String },
    /// A TCP connect to `host:port`.
    Tcp(String),
    /// `grpc.health.v1.Health/Check` at `host:port`, for the service after a `/`.
    Grpc { addr: String, service: String },
}

/// One check of a registration.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckDef {
    pub id: String,
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub deregister_after: Option<Duration>,
}

/// A decoded registration.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub instance: Instance,
    pub checks: Vec<CheckDef>,
}

/// A body that does not decode; a 400 whose message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct BodyError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn body_error(field: impl Into<String>, reason: impl Into<String>) -> BodyError {
    BodyError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Whether two keys are the same to Consul: case and `_` ignored, so `TTL`, `ttl`,
/// `DeregisterCriticalServiceAfter` and `deregister_critical_service_after` match.
fn same_key(a: &str, b: &str) -> bool {
    fn fold(s: &str) -> impl Iterator<Item = u8> + '_ {
        s.bytes()
            .filter(|c| *c != b'_')
            .map(|c| c.to_ascii_lowercase())
    }
    fold(a).eq(fold(b))
}

/// The value of `key` in `obj`, whatever the case of the key (and snake_case).
pub(crate) fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| same_key(k, key))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn string(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<String>, BodyError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(body_error(format!("{path}{key}"), "must be a string")),
    }
}

fn duration(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<Duration>, BodyError> {
    match string(obj, key, path)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => go_duration(&s)
            .map(Some)
            .map_err(|e| body_error(format!("{path}{key}"), e)),
    }
}

/// Consul's field name for a field of our instance, so errors name what the client sent.
fn consul_field(e: ValidationError) -> BodyError {
    let field = match e.field.as_str() {
        "instance.service" => "Name",
        "instance.id" => "ID",
        "instance.address" => "Address",
        "instance.port" => "Port",
        "instance.version" => "Meta.version",
        "instance.labels" => "Meta",
        "instance.weight" => "Weights.Passing",
        "instance.zone" => "Meta.zone",
        "instance.namespace" => "Namespace",
        other => other,
    };
    body_error(field, e.reason)
}

/// Decodes a registration. `client` is the caller's address, used when the body has no
/// `Address` (Consul would use its agent's node address; the registering process's
/// address is the nearest thing a registry has).
pub fn decode(body: &[u8], client: IpAddr) -> Result<Registration, BodyError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        body_error(
            "body",
            format!("not JSON ({e}): send a Consul service definition"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(body_error("body", "must be a JSON object"));
    };
    let name = string(&obj, "Name", "")?.ok_or_else(|| body_error("Name", "is required"))?;
    let id = string(&obj, "ID", "")?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| name.clone());
    if let Some(kind) = string(&obj, "Kind", "")?.filter(|k| !k.is_empty()) {
        return Err(body_error(
            "Kind",
            format!("{kind:?} services (Connect proxies, gateways) are not supported: Switchyard's sidecar is the proxy; register the app itself"),
        ));
    }
    let tags: Vec<String> = match field(&obj, "Tags") {
        None => Vec::new(),
        Some(Value::Array(a)) if a.len() <= MAX_TAGS => a
            .iter()
            .map(|t| match t {
                Value::String(s) => Ok(s.clone()),
                _ => Err(body_error("Tags", "must be a list of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(a)) => {
            return Err(body_error(
                "Tags",
                format!("{} tags, at most {MAX_TAGS}", a.len()),
            ))
        }
        Some(_) => return Err(body_error("Tags", "must be a list of strings")),
    };
    let mut labels = BTreeMap::new();
    match field(&obj, "Meta") {
        None => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Value::String(v) = v else {
                    return Err(body_error(format!("Meta.{k}"), "must be a string"));
                };
                labels.insert(k.clone(), v.clone());
            }
        }
        Some(_) => return Err(body_error("Meta", "must be an object of strings")),
    }
    // Version: Meta.version, else a version-<v> tag, else "unknown".
    let version = labels
        .remove("version")
        .or_else(|| {
            tags.iter()
                .find_map(|t| t.strip_prefix("version-").map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".to_string());
    let zone = labels.remove("zone").unwrap_or_default();
    let kept: Vec<&String> = tags.iter().filter(|t| !t.starts_with("version-")).collect();
    if !kept.is_empty() {
        // Serializing strings cannot fail.
        labels.insert(
            TAGS_LABEL.to_string(),
            serde_json::to_string(&kept).unwrap_or_default(),
        );
    }
    let address = string(&obj, "Address", "")?
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| client.to_string());
    let port = match field(&obj, "Port") {
        None => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| body_error("Port", "must be 1-65535"))?,
        Some(_) => return Err(body_error("Port", "must be a number")),
    };
    let weight = match field(&obj, "Weights") {
        None => 0,
        Some(Value::Object(w)) => match field(w, "Passing") {
            None => 0,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| body_error("Weights.Passing", "must be a non-negative integer"))?,
            Some(_) => return Err(body_error("Weights.Passing", "must be a number")),
        },
        Some(_) => return Err(body_error("Weights", "must be an object")),
    };
    let namespace = string(&obj, "Namespace", "")?.unwrap_or_default();
    let instance = validate_instance(
        Instance {
            namespace,
            service: name,
            id,
            address,
            port: 0,
            version,
            labels: labels.into(),
            weight: 0,
            zone,
            state: State::Serving,
            mesh_port: 0,
        },
        port,
        weight,
    )
    .map_err(consul_field)?;
    let mut defs: Vec<(&Map<String, Value>, String)> = Vec::new();
    if let Some(c) = field(&obj, "Check") {
        let Value::Object(c) = c else {
            return Err(body_error("Check", "must be an object"));
        };
        defs.push((c, "Check.".into()));
    }
    match field(&obj, "Checks") {
        None => {}
        Some(Value::Array(a)) if a.len() + defs.len() <= MAX_CHECKS => {
            for (n, c) in a.iter().enumerate() {
                let Value::Object(c) = c else {
                    return Err(body_error(format!("Checks[{n}]"), "must be an object"));
                };
                defs.push((c, format!("Checks[{n}].")));
            }
        }
        Some(Value::Array(_)) => {
            return Err(body_error("Checks", format!("at most {MAX_CHECKS} checks")))
        }
        Some(_) => return Err(body_error("Checks", "must be a list")),
    }
    let many = defs.len() > 1;
    let mut checks = Vec::new();
    for (n, (c, path)) in defs.iter().enumerate() {
        // Consul's own ids: service:<id>, or service:<id>:<n> (from 1) for several.
        let default_id = if many {
            format!("service:{}:{}", instance.id, n + 1)
        } else {
            format!("service:{}", instance.id)
        };
        checks.push(check(c, path, default_id)?);
    }
    if checks
        .iter()
        .filter(|c| matches!(c.kind, CheckKind::Ttl(_)))
        .count()
        > 1
    {
        return Err(body_error(
            "Checks",
            "at most one TTL check per service: its passes renew the instance's lease",
        ));
    }
    Ok(Registration { instance, checks })
}

fn check(c: &Map<String, Value>, path: &str, default_id: String) -> Result<CheckDef, BodyError> {
    let id = string(c, "CheckID", path)?
        .or(string(c, "ID", path)?)
        .filter(|s| !s.is_empty())
        .unwrap_or(default_id);
    if id.len() > 256 || id.chars().any(char::is_control) {
        return Err(body_error(
            format!("{path}CheckID"),
            "at most 256 printable characters",
        ));
    }
    let interval = duration(c, "Interval", path)?;
    let timeout = duration(c, "Timeout", path)?.unwrap_or(Duration::from_secs(10));
    let deregister_after = duration(c, "DeregisterCriticalServiceAfter", path)?;
    let kind = if let Some(ttl) = duration(c, "TTL", path)? {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(3600) {
            return Err(body_error(format!("{path}TTL"), "must be 1s-1h"));
        }
        CheckKind::Ttl(ttl)
    } else if let Some(url) = string(c, "HTTP", path)? {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.len() <= 2048
            && url.parse::<hyper::Uri>().is_ok();
        if !ok {
            return Err(body_error(
                format!("{path}HTTP"),
                "must be an http:// or https:// URL",
            ));
        }
        let method = string(c, "Method", path)?.unwrap_or_else(|| "GET".into());
        if hyper::Method::from_bytes(method.as_bytes()).is_err() {
            return Err(body_error(format!("{path}Method"), "is not an HTTP method"));
        }
        CheckKind::Http { url, method }
    } else if let Some(addr) = string(c, "TCP", path)? {
        host_port(&addr).map_err(|e| body_error(format!("{path}TCP"), e))?;
        CheckKind::Tcp(addr)
    } else if let Some(target) = string(c, "GRPC", path)? {
        let (addr, service) = target.split_once('/').unwrap_or((&target, ""));
        host_port(addr).map_err(|e| body_error(format!("{path}GRPC"), e))?;
        CheckKind::Grpc {
            addr: addr.to_string(),
            service: service.to_string(),
        }
    } else {
        return Err(body_error(
            path.trim_end_matches('.'),
            "needs TTL, HTTP, TCP or GRPC (script, Docker, H2PING and alias checks are not supported)",
        ));
    };
    let interval = match (&kind, interval) {
        (CheckKind::Ttl(_), _) => Duration::ZERO,
        (_, None) => {
            return Err(body_error(
                format!("{path}Interval"),
                "is required for HTTP, TCP and GRPC checks",
            ))
        }
        (_, Some(i)) if i < MIN_INTERVAL => {
            return Err(body_error(format!("{path}Interval"), "must be at least 1s"))
        }
        (_, Some(i)) => i,
    };
    Ok(CheckDef {
        id,
        kind,
        interval,
        timeout,
        deregister_after,
    })
}

fn host_port(addr: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("{addr:?} is not HOST:PORT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> IpAddr {
        "192.0.2.9".parse().expect("as expected")
    }

    #[test]
    fn lowercase_keys_from_py_consul_decode_like_pascal_case() {
        let lower = br#"{"name":"web","id":"web-1","address":"10.0.0.1","port":8080,"tags":["a","version-2.0.0"],"check":{"ttl":"10s"}}"#;
        let pascal = br#"{"Name":"web","ID":"web-1","Address":"10.0.0.1","Port":8080,"Tags":["a","version-2.0.0"],"Check":{"TTL":"10s"}}"#;
        let a = decode(lower, client()).expect("as expected");
        assert_eq!(a, decode(pascal, client()).expect("as expected"));
        assert_eq!(a.instance.version, "2.0.0");
        assert_eq!(a.instance.labels[TAGS_LABEL], r#"["a"]"#);
        assert_eq!(a.checks[0].id, "service:web-1");
        assert_eq!(a.checks[0].kind, CheckKind::Ttl(Duration::from_secs(10)));
        // py-consul's snake_case keys and a `checks` list.
        let snake = br#"{"name":"web","id":"web-1","port":8080,"checks":[{"ttl":"10s","deregister_critical_service_after":"1m"}]}"#;
        let s = decode(snake, client()).expect("as expected");
        assert_eq!(s.checks[0].deregister_after, Some(Duration::from_secs(60)));
        assert_eq!(s.checks[0].id, "service:web-1");
    }

    #[test]
    fn version_comes_from_meta_then_a_tag_then_unknown() {
        let r = decode(br#"{"Name":"web","Port":1,"Meta":{"version":"3.1.0","zone":"eu-1","team":"x"},"Tags":["version-9"]}"#, client()).expect("as expected");
        assert_eq!(r.instance.version, "3.1.0");
        assert_eq!(r.instance.zone, "eu-1");
        assert_eq!(r.instance.labels["team"], "x");
        let r = decode(br#"{"Name":"web","Port":1}"#, client()).expect("as expected");
        assert_eq!(r.instance.version, "unknown");
        // No ID: the name; no Address: the caller's.
        assert_eq!(r.instance.id, "web");
        assert_eq!(r.instance.address, "192.0.2.9");
    }

    #[test]
    fn checks_of_every_kind_decode_with_their_ids() {
        let r = decode(
            br#"{"Name":"web","ID":"w1","Port":80,"Checks":[
                {"HTTP":"http://10.0.0.1:80/health","Interval":"10s","Timeout":"1s","DeregisterCriticalServiceAfter":"1m30s"},
                {"TCP":"10.0.0.1:80","Interval":"5s"},
                {"GRPC":"10.0.0.1:90/web","Interval":"5s","CheckID":"mine"}]}"#,
            client(),
        )
        .expect("as expected");
        assert_eq!(r.checks[0].id, "service:w1:1");
        assert_eq!(r.checks[0].deregister_after, Some(Duration::from_secs(90)));
        assert_eq!(r.checks[1].kind, CheckKind::Tcp("10.0.0.1:80".into()));
        assert_eq!(r.checks[2].id, "mine");
        assert_eq!(
            r.checks[2].kind,
            CheckKind::Grpc {
                addr: "10.0.0.1:90".into(),
                service: "web".into()
            }
        );
    }

    #[test]
    fn bad_bodies_are_refused_naming_the_field() {
        let e = |b: &[u8]| decode(b, client()).expect_err("refused").field;
        assert_eq!(e(b"{not json"), "body");
        assert_eq!(e(b"[]"), "body");
        assert_eq!(e(br#"{"Port":1}"#), "Name");
        assert_eq!(e(br#"{"Name":"web","Port":"80"}"#), "Port");
        assert_eq!(e(br#"{"Name":"web","Port":70000}"#), "Port");
        assert_eq!(e(br#"{"Name":"web"}"#), "Port");
        assert_eq!(e(br#"{"Name":"Bad Name","Port":1}"#), "Name");
        assert_eq!(e(br#"{"Name":"web","Port":1,"Tags":"a"}"#), "Tags");
        assert_eq!(e(br#"{"Name":"web","Port":1,"Meta":{"k":1}}"#), "Meta.k");
        assert_eq!(
            e(br#"{"Name":"web","Port":1,"Check":{"TTL":"ten"}}"#),
            "Check.TTL"
        );
        assert_eq!(
            e(br#"{"Name":"web","Port":1,"Check":{"HTTP":"ftp://x"}}"#),
            "Check.HTTP"
        );
        assert_eq!(
            e(br#"{"Name":"web","Port":1,"Check":{"HTTP":"http://x/"}}"#),
            "Check.Interval"
        );
        assert_eq!(
            e(br#"{"Name":"web","Port":1,"Check":{"Script":"rm"}}"#),
            "Check"
        );
        assert_eq!(e(br#"{"Name":"web","Port":1,"Checks":[1]}"#), "Checks[0]");
        assert_eq!(
            e(br#"{"Name":"web","Port":1,"Kind":"connect-proxy"}"#),
            "Kind"
        );
        assert_eq!(
            e(br#"{"Name":"web","Port":1,"Checks":[{"TTL":"5s"},{"TTL":"6s"}]}"#),
            "Checks"
        );
    }
}
