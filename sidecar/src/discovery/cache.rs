//! The catalog on disk, so a sidecar restarted while no registry answers still routes.
//! Written atomically (temp file + rename) so a crash never leaves half a file.

use std::path::{Path, PathBuf};

use super::catalog::Catalog;

/// Reads the cached catalog; a missing file is `Ok(None)`, a damaged one an error.
pub fn load(path: &Path) -> Result<Option<Catalog>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "catalog cache {} is damaged ({e}); delete it or wait for a registry",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read catalog cache {}: {e}", path.display())),
    }
}

/// Writes the catalog atomically.
pub fn store(path: &Path, catalog: &Catalog) -> Result<(), String> {
    let bytes = serde_json::to_vec(catalog).map_err(|e| e.to_string())?;
    let tmp: PathBuf = path.with_extension("tmp");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(&tmp, &bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot replace {}: {e}", path.display()))
}
