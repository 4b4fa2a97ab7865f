//! The catalog on disk, so a sidecar restarted while no registry answers still routes.
//! Written atomically (temp file + rename) so a crash never leaves half a file.
//!
//! The file is JSON: `{revision, services: {service: {id: instance}}, policies: {service:
//! protobuf bytes}}`, the format every release so far has written and read. Instances
//! are written straight from the shared `Arc`s (no copy of the catalog) and read back
//! through the same validation as a watch event.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use serde::{Deserialize, Serialize};
use switchyard_core::convert::{policy_from_proto, policy_to_proto};
use switchyard_core::model::{validate_instance, Instance, State};
use switchyard_proto::v1 as pb;

use super::catalog::LocalCatalog;

/// The cache file's format: 1 for files written before it was numbered (0.1.0 and
/// earlier; the field is absent), 2 since. A file of a newer format than this release
/// knows is set aside with a warning (the sidecar waits for a registry) rather than read
/// half-understood; older ones are read. Releases before 0.2.0 ignore the field, which
/// is safe while the shape only gains optional fields.
pub const CACHE_FORMAT: u32 = 2;

fn unversioned() -> u32 {
    1
}

/// What is read back: every instance, borrowed from the file's bytes where it can be.
type ReadServices<'a> = BTreeMap<String, BTreeMap<String, CachedInstance<'a>>>;

/// The file. `S` is the services map: [`ReadServices`] when reading, and when writing
/// [`WriteServices`], which streams the catalog's instances to the writer one by one
/// rather than building a copy of the catalog (and a buffer of the whole file) first.
#[derive(Serialize, Deserialize)]
struct CacheFile<'a, S = ReadServices<'a>> {
    #[serde(default = "unversioned")]
    format: u32,
    revision: u64,
    services: S,
    #[serde(default)]
    policies: BTreeMap<String, Vec<u8>>,
    /// The registry cluster the catalog came from (absent in files written before it).
    #[serde(default, borrow)]
    cluster_id: Cow<'a, str>,
    /// The namespace's flag document, so that flags answer after a restart without a
    /// registry (absent in files written before flags).
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    flags: Option<CachedFlags<'a>>,
    /// The entries under the followed KV prefixes (absent in files written before KV).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    kv: Vec<switchyard_core::model::kv::KvEntry>,
}

#[derive(Serialize, Deserialize)]
struct CachedFlags<'a> {
    revision: u64,
    #[serde(borrow)]
    document: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
struct CachedInstance<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    address: Cow<'a, str>,
    port: u16,
    #[serde(borrow)]
    version: Cow<'a, str>,
    #[serde(default)]
    labels: Cow<'a, switchyard_core::model::Labels>,
    weight: u32,
    #[serde(default, borrow)]
    zone: Cow<'a, str>,
    state: CachedState,
    /// Added with the mesh; files written before have none (0: not in the mesh).
    #[serde(default)]
    mesh_port: u16,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum CachedState {
    Serving,
    Draining,
    Failing,
}

impl From<State> for CachedState {
    fn from(s: State) -> Self {
        match s {
            State::Serving => CachedState::Serving,
            State::Draining => CachedState::Draining,
            State::Failing => CachedState::Failing,
        }
    }
}

impl From<CachedState> for State {
    fn from(s: CachedState) -> Self {
        match s {
            CachedState::Serving => State::Serving,
            CachedState::Draining => State::Draining,
            CachedState::Failing => State::Failing,
        }
    }
}

/// The catalog's services as the file's `services` map, serialized straight from the
/// shared instances.
struct WriteServices<'a>(&'a BTreeMap<String, super::catalog::Instances>);

/// One service's instances, likewise.
struct WriteInstances<'a>(&'a BTreeMap<String, Arc<Instance>>);

impl Serialize for WriteServices<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .iter()
                .map(|(svc, i)| (svc, WriteInstances(i.as_ref()))),
        )
    }
}

impl Serialize for WriteInstances<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(id, i)| {
            let cached = CachedInstance {
                id: Cow::Borrowed(&i.id),
                address: Cow::Borrowed(&i.address),
                port: i.port,
                version: Cow::Borrowed(&i.version),
                labels: Cow::Borrowed(&i.labels),
                weight: i.weight,
                zone: Cow::Borrowed(&i.zone),
                state: i.state.into(),
                mesh_port: i.mesh_port,
            };
            (id, cached)
        }))
    }
}

fn to_file(catalog: &LocalCatalog) -> CacheFile<'_, WriteServices<'_>> {
    CacheFile {
        format: CACHE_FORMAT,
        revision: catalog.revision,
        services: WriteServices(&catalog.services),
        policies: catalog
            .policies
            .iter()
            .map(|(svc, p)| (svc.clone(), policy_to_proto(p).encode_to_vec()))
            .collect(),
        cluster_id: Cow::Borrowed(&catalog.cluster_id),
        flags: catalog.flags.as_ref().map(|f| CachedFlags {
            revision: f.revision,
            document: Cow::Borrowed(f.set.document()),
        }),
        kv: catalog.kv.values().map(|e| (**e).clone()).collect(),
    }
}

fn from_file(file: CacheFile<'_>, namespace: &str, path: &Path) -> LocalCatalog {
    let mut catalog = LocalCatalog {
        revision: file.revision,
        cluster_id: file.cluster_id.into_owned(),
        flags: file
            .flags
            .and_then(|f| super::catalog::compile_flags(&f.document, f.revision)),
        kv: std::sync::Arc::new(
            file.kv
                .into_iter()
                .filter(|e| switchyard_core::model::kv::validate_kv_key("key", &e.key).is_ok())
                .map(|e| (e.key.clone(), std::sync::Arc::new(e)))
                .collect(),
        ),
        ..LocalCatalog::default()
    };
    for (service, instances) in file.services {
        let mut kept = BTreeMap::new();
        for (id, c) in instances {
            let instance = Instance {
                namespace: namespace.to_string(),
                service: service.clone(),
                id: c.id.into_owned(),
                address: c.address.into_owned(),
                port: 0,
                version: c.version.into_owned(),
                labels: c.labels.into_owned(),
                weight: 0,
                zone: c.zone.into_owned(),
                state: c.state.into(),
                mesh_port: c.mesh_port,
            };
            match validate_instance(instance, u32::from(c.port), c.weight) {
                // Watch deltas remove instances by id: one filed under another key
                // would never be removed. Only a damaged file has one.
                Ok(i) if i.id != id => {
                    tracing::warn!(path = %path.display(), %service, key = %id, id = %i.id, "a cached instance is filed under another id; left out")
                }
                Ok(i) => {
                    kept.insert(id, Arc::new(i));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), %service, error = %e, "a cached instance breaks the rules; left out")
                }
            }
        }
        if !kept.is_empty() {
            catalog.services.insert(service, Arc::new(kept));
        }
    }
    for (service, bytes) in file.policies {
        match pb::Policy::decode(bytes.as_slice())
            .map_err(|e| e.to_string())
            .and_then(|p| policy_from_proto(p).map_err(|e| e.to_string()))
        {
            Ok(p) => {
                catalog.policies.insert(service, Arc::new(p));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), %service, error = %e, "a cached policy cannot be read; left out")
            }
        }
    }
    catalog
}

/// Reads the cached catalog of `namespace`; a missing file is `Ok(None)`, a damaged one
/// an error.
pub fn load(path: &Path, namespace: &str) -> Result<Option<LocalCatalog>, String> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let file = serde_json::from_slice::<CacheFile<'_>>(&bytes).map_err(|e| {
                format!(
                    "catalog cache {} is damaged ({e}); delete it or wait for a registry",
                    path.display()
                )
            })?;
            if file.format > CACHE_FORMAT {
                return Err(format!(
                    "catalog cache {} is of format {}, written by a newer release; this one ({}) reads format {CACHE_FORMAT} and older, so it waits for a registry instead (and rewrites the file in its own format)",
                    path.display(),
                    file.format,
                    env!("CARGO_PKG_VERSION")
                ));
            }
            Ok(Some(from_file(file, namespace, path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read catalog cache {}: {e}", path.display())),
    }
}

/// Writes the catalog atomically.
/// Writes the catalog atomically. The JSON is streamed to the file through a small
/// buffer: with 10,000 instances a buffer of the whole file (2 MB) and a copy of the
/// catalog to serialize were the sidecar's largest passing allocations, and freed heap
/// stays in the process's RSS.
pub fn store(path: &Path, catalog: &LocalCatalog) -> Result<(), String> {
    use std::io::Write;
    let tmp: PathBuf = path.with_extension("tmp");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let cannot_write = |e: &dyn std::fmt::Display| format!("cannot write {}: {e}", tmp.display());
    let file = std::fs::File::create(&tmp).map_err(|e| cannot_write(&e))?;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, file);
    serde_json::to_writer(&mut out, &to_file(catalog)).map_err(|e| cannot_write(&e))?;
    out.flush().map_err(|e| cannot_write(&e))?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot replace {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file as an early release wrote it (before cluster ids): it still loads.
    const OLD_RELEASE_FILE: &str = r#"{"revision":7,"services":{"web":{"web-1":{"id":"web-1","address":"127.0.0.1","port":8080,"version":"1.0.0","labels":{"zone":"eu"},"weight":100,"zone":"","state":"SERVING"},"web-2":{"id":"web-2","address":"::1","port":8081,"version":"2.0.0","weight":50,"state":"DRAINING"}}},"policies":{}}"#;

    #[test]
    fn a_file_written_by_the_previous_release_loads_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.json");
        std::fs::write(&path, OLD_RELEASE_FILE).expect("write");
        let catalog = load(&path, "default").expect("readable").expect("present");
        assert_eq!(catalog.revision, 7);
        let web = &catalog.services["web"];
        assert_eq!(web["web-1"].labels["zone"], "eu");
        assert_eq!(web["web-2"].state, State::Draining);
        assert_eq!(web["web-2"].service, "web");
        assert_eq!(catalog.cluster_id, "", "early files have no cluster id");
        assert_eq!(web["web-1"].mesh_port, 0, "older files have no mesh port");
        let mut catalog = catalog;
        catalog.cluster_id = "0123456789abcdef0123456789abcdef".into();
        if let Some(i) = catalog
            .services
            .get_mut("web")
            .and_then(|w| Arc::make_mut(w).get_mut("web-1"))
        {
            Arc::make_mut(i).mesh_port = 15006;
        }
        store(&path, &catalog).expect("store");
        let again = load(&path, "default").expect("readable").expect("present");
        assert_eq!(
            again, catalog,
            "the cluster id and mesh ports are kept with the catalog"
        );
        assert_eq!(again.services["web"]["web-1"].mesh_port, 15006);
        // Intentions are not in the file: a loaded catalog asks for a snapshot.
        assert!(!again.intentions_known);
    }

    #[test]
    fn files_carry_their_format_and_a_newer_one_is_set_aside_with_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.json");
        std::fs::write(&path, OLD_RELEASE_FILE).expect("write");
        let catalog = load(&path, "default").expect("readable").expect("present");
        store(&path, &catalog).expect("store");
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(written["format"], CACHE_FORMAT, "{written}");
        let newer = OLD_RELEASE_FILE.replacen('{', r#"{"format":3,"#, 1);
        std::fs::write(&path, newer).expect("write");
        let e = load(&path, "default").expect_err("a newer format is not read");
        assert!(e.contains("format 3") && e.contains("newer release"), "{e}");
    }

    /// Found by the `sidecar_cache` fuzz target: an instance filed under a key other
    /// than its id is left out (a watch delta for its id could never remove it).
    #[test]
    fn an_instance_filed_under_another_id_is_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.json");
        std::fs::write(
            &path,
            r#"{"revision":1,"services":{"web":{"a":{"id":"b","address":"10.0.0.1","port":80,"version":"1","weight":1,"state":"SERVING"},"c":{"id":"c","address":"10.0.0.2","port":80,"version":"1","weight":1,"state":"SERVING"}}}}"#,
        )
        .expect("write");
        let catalog = load(&path, "default").expect("readable").expect("present");
        let web = &catalog.services["web"];
        assert_eq!(web.keys().collect::<Vec<_>>(), vec!["c"]);
        assert!(web.iter().all(|(key, i)| *key == i.id));
    }

    #[test]
    fn a_damaged_file_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.json");
        std::fs::write(&path, b"{not json").expect("write");
        let e = load(&path, "default").expect_err("damaged");
        assert!(e.contains("delete it"), "{e}");
        assert_eq!(load(&dir.path().join("none.json"), "default"), Ok(None));
    }
}
