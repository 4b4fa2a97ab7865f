//! A bounded worker pool over an index range: `n` operations, at most `concurrency` in
//! flight, each told its index and its worker (which picks the connection). Used to set
//! up leases and to fill the registry.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::Result;

/// Outcome of a pool run.
#[derive(Debug, Default)]
pub struct Done {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Runs `op(index, worker)` for every index in `0..n`. Errors are counted, not fatal:
/// the caller decides how many it tolerates.
pub async fn run<F, Fut>(n: u64, concurrency: usize, op: F) -> Result<Done>
where
    F: Fn(u64, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency.max(1) {
        let (op, next) = (op.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Done::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match op(i, w).await {
                    Ok(()) => done.ok += 1,
                    Err(e) => {
                        done.errors += 1;
                        done.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            done
        }));
    }
    let mut total = Done::default();
    for w in workers {
        let d = w.await?;
        total.ok += d.ok;
        total.errors += d.errors;
        total.first_error = total.first_error.or(d.first_error);
    }
    Ok(total)
}
