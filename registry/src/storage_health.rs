//! Whether this node can still write its data dir, and what to say when it cannot.
//!
//! A failed write or fsync of the Raft log, the vote or a snapshot is fatal to openraft
//! 0.9 (its core returns `Fatal::StorageError` and the `Raft` handle never works again),
//! and redb refuses every later operation on that file after one I/O error
//! ("Previous I/O error occurred. Please close and re-open the database"). Nothing in
//! the process can recover the node, so it must stop claiming health at once and be
//! restarted: [`StorageHealth`] records the first failure, sets the
//! `switchyard_registry_storage_failed` gauge, logs one ERROR naming the data dir and
//! the OS error, and wakes whoever waits on it (gRPC health, writes, KeepAlive streams,
//! `/health`, and [`RegistryHandle::failed`](crate::RegistryHandle::failed), on which the
//! `switchyard registry` binary exits non-zero so its supervisor restarts it; the
//! restart replays the log, which holds every write that was acknowledged).
//!
//! Also here: the words for an I/O error met while opening the data dir at start
//! ([`describe_open_error`]), so "disk full" and "permission denied" are told apart from
//! "another process holds the file".

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::raft::alias::Raft;

/// The first storage failure of this node: where, what was being written, and the OS
/// error as the OS words it (e.g. "No space left on device (os error 28)").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageFailure {
    pub dir: PathBuf,
    /// What was being written, e.g. "the Raft log".
    pub operation: String,
    pub error: String,
}

impl StorageFailure {
    /// The errno in the error text, when the OS gave one ("... (os error 28)").
    pub fn os_error(&self) -> Option<i32> {
        os_error_in(&self.error)
    }

    /// What the operator should do about it.
    pub fn hint(&self) -> &'static str {
        hint_for(self.os_error())
    }
}

impl fmt::Display for StorageFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the data dir {} cannot be written ({}): {}; {}",
            self.dir.display(),
            self.operation,
            self.error,
            self.hint()
        )
    }
}

/// The errno of the last "(os error N)" in `text` (how `std::io::Error` prints one,
/// and how it survives the string conversions of redb and openraft errors).
fn os_error_in(text: &str) -> Option<i32> {
    let (_, rest) = text.rsplit_once("(os error ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The operator's next step for an errno (Linux numbering).
fn hint_for(errno: Option<i32>) -> &'static str {
    match errno {
        Some(28) => "the disk is full: free space on it",
        Some(122) => "the disk quota is used up: free space or raise the quota",
        Some(13) | Some(1) => "permission denied: the switchyard user needs read and write access",
        Some(30) => "the filesystem is read-only: remount it read-write",
        Some(5) => "the disk reports I/O errors: check it (dmesg) before restarting",
        Some(20) => "a part of the path is a file, not a directory: choose another --data-dir",
        _ => "check the disk",
    }
}

/// The node's storage state: healthy until the first failure, failed for good after it
/// (see the module doc for why there is no way back in-process). Cheap to clone.
#[derive(Clone)]
pub struct StorageHealth {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    state: watch::Sender<Option<Arc<StorageFailure>>>,
    metrics: Arc<Metrics>,
}

impl StorageHealth {
    /// A healthy node whose data dir is `dir`.
    pub fn new(dir: PathBuf, metrics: Arc<Metrics>) -> Self {
        let (state, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                dir,
                state,
                metrics,
            }),
        }
    }

    /// Records a failed write or fsync. The first report wins (a later one is most often
    /// redb's "previous I/O error", which names no errno) and is the one logged; returns
    /// the failure on record.
    pub fn fail(&self, operation: &str, error: impl fmt::Display) -> Arc<StorageFailure> {
        let mut first = None;
        self.inner.state.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            let failure = Arc::new(StorageFailure {
                dir: self.inner.dir.clone(),
                operation: operation.to_string(),
                error: error.to_string(),
            });
            first = Some(failure.clone());
            *state = Some(failure);
            true
        });
        if let Some(failure) = first {
            self.inner.metrics.storage_failed.set(1);
            tracing::error!(
                data_dir = %failure.dir.display(),
                errno = failure.os_error(),
                "{failure}; this node stops serving: it answers health checks NOT_SERVING, refuses writes and must be restarted"
            );
            return failure;
        }
        self.failure().unwrap_or_else(|| {
            // Unreachable: the state only ever goes from None to Some.
            Arc::new(StorageFailure {
                dir: self.inner.dir.clone(),
                operation: operation.to_string(),
                error: error.to_string(),
            })
        })
    }

    /// The failure, once there was one.
    pub fn failure(&self) -> Option<Arc<StorageFailure>> {
        self.inner.state.borrow().clone()
    }

    /// Resolves with the failure once there is one (at once if there already was).
    pub async fn failed(&self) -> Arc<StorageFailure> {
        let mut rx = self.inner.state.subscribe();
        let failure = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|s| s.clone());
        match failure {
            Some(failure) => failure,
            // The sender lives in `self`: it cannot be gone while this waits.
            None => std::future::pending().await,
        }
    }

    /// A receiver of the state, for callers that want to `select!` on it themselves.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<StorageFailure>>> {
        self.inner.state.subscribe()
    }
}

/// Watches Raft until it stops. A stop on a storage error that the log store did not
/// report itself (the vote, the committed index, a snapshot, a truncation) is recorded
/// here; a stop asked for by shutdown is not a failure.
pub async fn watch_raft(raft: Raft, storage: StorageHealth, mut shutdown: watch::Receiver<bool>) {
    let mut metrics = raft.metrics();
    loop {
        let stopped = metrics.borrow_and_update().running_state.clone();
        if let Err(fatal) = stopped {
            if let openraft::error::Fatal::StorageError(e) = &fatal {
                storage.fail("Raft storage", e);
            } else if !*shutdown.borrow() {
                tracing::error!(error = %fatal, "Raft stopped; this node must be restarted");
            }
            return;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Marks every named gRPC service (and "", the whole server) NOT_SERVING once storage
/// failed, so health probes and balancers stop choosing this node. Ends at shutdown.
pub async fn not_serving_on_failure(
    storage: StorageHealth,
    health: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        // A failure wins over the shutdown it causes (the binary stops on it at once).
        biased;
        _ = storage.failed() => {}
        _ = shutdown.wait_for(|s| *s) => return,
    }
    for service in std::iter::once("").chain(services) {
        health
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// The reason an I/O error on the data dir at start is given, in the operator's terms:
/// a full disk and missing permissions say so, instead of a hint about another process.
pub fn describe_io_error(dir: &Path, e: &std::io::Error) -> String {
    match (e.kind(), e.raw_os_error()) {
        (std::io::ErrorKind::PermissionDenied, _) | (_, Some(1)) => format!(
            "permission denied on {}: the switchyard user needs read and write access to it ({e})",
            dir.display()
        ),
        (std::io::ErrorKind::StorageFull, _) | (_, Some(28)) => format!(
            "the disk holding {} is full ({e}): free space on it and start again",
            dir.display()
        ),
        _ => format!("{e} ({})", hint_for(e.raw_os_error())),
    }
}

/// [`describe_io_error`] for redb's error on opening the database file. Only redb's
/// "already open" (its file lock is held) means another process uses the data dir.
pub fn describe_open_error(dir: &Path, e: &redb::DatabaseError) -> String {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            format!("{e} (is another switchyard process using this --data-dir?)")
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => describe_io_error(dir, io),
        other => other.to_string(),
    }
}

/// The OS's words for a redb error: the `std::io::Error` inside it when there is one
/// ("No space left on device (os error 28)"), else redb's own text.
pub fn os_text(e: &redb::Error) -> String {
    match e {
        redb::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> StorageHealth {
        StorageHealth::new("/var/lib/switchyard".into(), Arc::new(Metrics::default()))
    }

    #[test]
    fn permission_denied_at_start_says_so_and_names_the_dir() {
        let dir = Path::new("/var/lib/switchyard");
        let e = std::io::Error::from_raw_os_error(13);
        let said = describe_io_error(dir, &e);
        assert!(
            said.starts_with("permission denied on /var/lib/switchyard: the switchyard user needs read and write access"),
            "{said}"
        );
        assert!(!said.contains("another switchyard process"), "{said}");
        let said = describe_open_error(
            dir,
            &redb::DatabaseError::Storage(redb::StorageError::Io(e)),
        );
        assert!(said.starts_with("permission denied on"), "{said}");
    }

    #[test]
    fn a_full_disk_at_start_says_so() {
        let said = describe_io_error(Path::new("/data"), &std::io::Error::from_raw_os_error(28));
        assert!(said.contains("the disk holding /data is full"), "{said}");
        assert!(said.contains("No space left on device"), "{said}");
    }

    #[test]
    fn only_a_held_lock_suggests_another_process() {
        let said = describe_open_error(
            Path::new("/data"),
            &redb::DatabaseError::DatabaseAlreadyOpen,
        );
        assert!(said.contains("is another switchyard process using this --data-dir?"));
    }

    #[test]
    fn the_errno_is_read_back_from_error_text() {
        assert_eq!(
            os_error_in("when Write Logs: I/O error: No space left on device (os error 28)"),
            Some(28)
        );
        assert_eq!(os_error_in("Previous I/O error occurred"), None);
    }

    #[tokio::test]
    async fn the_first_failure_is_kept_and_flips_the_gauge() {
        let h = health();
        assert!(h.failure().is_none());
        let first = h.fail("the Raft log", "No space left on device (os error 28)");
        let later = h.fail("the Raft log", "Previous I/O error occurred");
        assert_eq!(first, later);
        assert_eq!(h.failed().await, first);
        assert_eq!(first.os_error(), Some(28));
        let said = first.to_string();
        assert!(
            said.starts_with("the data dir /var/lib/switchyard cannot be written (the Raft log): No space left on device (os error 28); the disk is full"),
            "{said}"
        );
        assert_eq!(h.inner.metrics.storage_failed.get(), 1);
    }
}
