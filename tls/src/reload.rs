//! Re-reading certificates: on SIGHUP, and when a watched file changes (checked every
//! [`CHECK_INTERVAL`], comparing length and modification time, which is what a
//! cert-manager or a Kubernetes Secret update changes). A reload that fails keeps the
//! configuration in force and says why; it is tried again on the next change.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::files::{stamp, TlsError};
use crate::{ClientTls, ServerTls};

/// How often the files are checked for a change.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Reloads that took effect, and reloads refused, process-wide (exported as metrics).
pub static RELOADS: AtomicU64 = AtomicU64::new(0);
pub static RELOAD_FAILURES: AtomicU64 = AtomicU64::new(0);

/// A configuration built from files.
pub trait Reloadable: Send + Sync {
    fn reload(&self) -> Result<(), TlsError>;
    fn paths(&self) -> Vec<PathBuf>;
}

impl Reloadable for ServerTls {
    fn reload(&self) -> Result<(), TlsError> {
        ServerTls::reload(self)
    }
    fn paths(&self) -> Vec<PathBuf> {
        ServerTls::paths(self)
    }
}

impl Reloadable for ClientTls {
    fn reload(&self) -> Result<(), TlsError> {
        ClientTls::reload(self)
    }
    fn paths(&self) -> Vec<PathBuf> {
        ClientTls::paths(self)
    }
}

type Stamps = Vec<Option<(u64, std::time::SystemTime)>>;

/// Watches `items`' files until `stop` resolves, reloading all of them together (the
/// certificate and its key change together).
///
/// The SIGHUP handler is installed here, before the future is first polled: a process
/// that says it serves once this returns must not miss (or die of) a SIGHUP sent at
/// once. Must be called inside a Tokio runtime.
pub fn watch(
    items: Vec<Arc<dyn Reloadable>>,
    stop: impl Future<Output = ()>,
) -> impl Future<Output = ()> {
    let hangup = if items.is_empty() { None } else { hangup() };
    watch_with(items, hangup, stop)
}

async fn watch_with(
    items: Vec<Arc<dyn Reloadable>>,
    mut hangup: Hangup,
    stop: impl Future<Output = ()>,
) {
    if items.is_empty() {
        return;
    }
    let paths: Vec<PathBuf> = items.iter().flat_map(|i| i.paths()).collect();
    let stamps = |paths: &[PathBuf]| -> Stamps { paths.iter().map(stamp).collect() };
    let mut last = stamps(&paths);
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let why = tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                let now = stamps(&paths);
                if now == last {
                    continue;
                }
                last = now;
                "the files changed"
            }
            _ = next_hangup(&mut hangup) => {
                last = stamps(&paths);
                "SIGHUP"
            }
        };
        reload_all(&items, why);
    }
}

/// Reloads every item; logs the outcome.
pub fn reload_all(items: &[Arc<dyn Reloadable>], why: &str) {
    let mut failed = false;
    for item in items {
        if let Err(e) = item.reload() {
            failed = true;
            RELOAD_FAILURES.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot reload TLS files after {why}; the previous certificates stay in use until the files are fixed");
        }
    }
    if !failed {
        RELOADS.fetch_add(1, Ordering::Relaxed);
        tracing::info!("reloaded TLS certificates after {why}; open connections keep theirs");
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup() -> Hangup {
    None
}

#[cfg(unix)]
async fn next_hangup(h: &mut Hangup) {
    match h {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangup) {
    std::future::pending().await
}
