//! The instances the scenarios write, and their two encodings: a `switchyard.v1.Instance`
//! and, for etcd, a key under a per-service prefix with the instance as JSON (what an
//! etcd-based registry stores). Both carry the same fields, so both servers hold
//! comparable data (the JSON value is about 200 bytes).

use std::time::{SystemTime, UNIX_EPOCH};

use switchyard_proto::v1 as pb;

/// Namespace of every instance (the registry's default).
pub const NAMESPACE: &str = "default";

/// A tag unique to this process, put in every service name: registering an id that
/// already exists is an update in switchyard (keeping its lease) and an overwrite in etcd,
/// so reusing names across runs against one server would not be the same work.
pub fn run_tag() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}",
        (nanos as u64) ^ u64::from(std::process::id()).rotate_left(40)
    )
}

/// One instance: service, id, and a number its address and port are derived from.
#[derive(Clone, Debug)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub n: u64,
}

impl Instance {
    pub fn new(service: &str, id: String, n: u64) -> Self {
        Self {
            service: service.to_owned(),
            id,
            n,
        }
    }

    fn address(&self) -> String {
        let n = self.n;
        format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
    }

    fn port(&self) -> u32 {
        8000 + (self.n % 1000) as u32
    }

    /// The registry's wire form.
    pub fn to_proto(&self) -> pb::Instance {
        pb::Instance {
            namespace: NAMESPACE.to_owned(),
            service: self.service.clone(),
            id: self.id.clone(),
            address: self.address(),
            port: self.port(),
            version: "1.4.2".to_owned(),
            labels: [("tier".to_owned(), "bench".to_owned())]
                .into_iter()
                .collect(),
            weight: 100,
            zone: "zone-a".to_owned(),
            state: pb::State::Serving as i32,
            mesh_port: 0,
        }
    }

    /// The etcd key: `<prefix(service)><id>`.
    pub fn etcd_key(&self) -> String {
        format!("{}{}", etcd_prefix(&self.service), self.id)
    }

    /// The etcd value: the same fields as [`Instance::to_proto`], as JSON. Names and ids
    /// are `[A-Za-z0-9._-]`, so no escaping is needed.
    pub fn etcd_value(&self) -> String {
        format!(
            concat!(
                r#"{{"namespace":"{}","service":"{}","id":"{}","address":"{}","port":{},"#,
                r#""version":"1.4.2","labels":{{"tier":"bench"}},"weight":100,"#,
                r#""zone":"zone-a","state":"SERVING"}}"#
            ),
            NAMESPACE,
            self.service,
            self.id,
            self.address(),
            self.port()
        )
    }
}

/// The etcd key prefix of a service; a prefix watch covers `[prefix, prefix_end)`.
pub fn etcd_prefix(service: &str) -> String {
    format!("/registry/{NAMESPACE}/{service}/")
}

/// The end of a prefix range: the prefix with its last byte incremented (the prefix
/// ends in '/', so no carry is needed).
pub fn etcd_prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// The id of an instance from its etcd key (the last path segment).
pub fn id_from_etcd_key(key: &[u8]) -> &str {
    let key = std::str::from_utf8(key).unwrap_or("");
    key.rsplit('/').next().unwrap_or(key)
}
