//! The sidecar's disk cache of the catalog (instances, policies, flags, KV): any bytes
//! as the file's content, read by `discovery::cache::load`, the function `load_cache`
//! calls at startup, then published into an endpoint table as `load_cache` does.
//!
//! Never a panic. A loaded catalog is consistent: stored with `cache::store` and loaded
//! again it is the same catalog, and every instance it kept passes the registry's rules
//! (and sits under its own id).
//!
//! The loader reads a path: each input is written to this process's own file in
//! `/dev/shm` (or the temporary directory), removed after the run; an in-memory parser
//! beside `load` would make this target faster.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_core::model::validate_instance;
use switchyard_sidecar::discovery::cache;
use switchyard_sidecar::discovery::catalog::Touched;
use switchyard_sidecar::EndpointTable;

/// The cache file and the one it is stored to again, removed when the run ends.
struct Files {
    file: PathBuf,
    stored: PathBuf,
}

impl Files {
    /// In `/dev/shm` when there is one (no disk writes), named for this process.
    fn new() -> Self {
        static BASE: OnceLock<PathBuf> = OnceLock::new();
        let base = BASE.get_or_init(|| {
            let dir = ["/dev/shm", "/tmp"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_dir())
                .unwrap_or_else(std::env::temp_dir);
            dir.join(format!("switchyard-fuzz-cache-{}", std::process::id()))
        });
        Files {
            file: base.with_extension("json"),
            stored: base.with_extension("stored.json"),
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(&self.stored);
    }
}

fuzz_target!(|data: &[u8]| {
    let files = Files::new();
    let path = &files.file;
    std::fs::write(path, data).expect("write the cache file");
    let Ok(Some(catalog)) = cache::load(path, "default") else {
        return;
    };
    for (service, instances) in &catalog.services {
        assert!(!instances.is_empty(), "{service} is kept with no instance");
        for (id, i) in instances.iter() {
            assert_eq!(&i.service, service);
            // Found here once: an instance was kept under its file's map key, not its
            // own id, so `{"a": {"id": "b", ...}}` kept a "b" that no watch delta for
            // "b" ever removed (fixed in `from_file`, test
            // `an_instance_filed_under_another_id_is_left_out`).
            assert_eq!(&i.id, id, "an instance is kept under another id");
            assert_eq!(i.namespace, "default");
            let again = validate_instance((**i).clone(), u32::from(i.port), i.weight)
                .expect("a kept instance passes the rules");
            assert_eq!(&again, &**i);
        }
    }
    cache::store(&files.stored, &catalog).expect("a loaded catalog stores");
    let again = cache::load(&files.stored, "default")
        .expect("a stored catalog loads")
        .expect("and is there");
    assert_eq!(again, catalog, "store then load gives the same catalog");
    // What load_cache does next: the table the proxy, DNS and the admin port read.
    let table = EndpointTable::default();
    catalog.publish(&Touched::All, &table, None);
});
