//! `register`: closed-loop workers, each registering a new instance with a new lease and
//! waiting for the answer before the next; the rate is completions over the wall time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::instance::{run_tag, Instance};
use crate::stats::Samples;
use crate::Result;

/// Instances per service: services of realistic size rather than one huge one.
const PER_SERVICE: u64 = 100;

/// Runs `concurrency` workers for `duration` (or until `max` registrations were sent).
/// Returns the RESULT fields.
pub async fn run(
    backend: &Backend,
    concurrency: usize,
    duration: Duration,
    max: Option<u64>,
    ttl: u32,
) -> Result<String> {
    let backend = Arc::new(backend.clone());
    let tag = Arc::new(run_tag());
    let next = Arc::new(AtomicU64::new(0));
    let max = max.unwrap_or(u64::MAX);
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let (backend, tag, next) = (backend.clone(), tag.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Samples::with_capacity(4_096);
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= max {
                    break;
                }
                let service = format!("reg-{tag}-{}", n / PER_SERVICE);
                let instance = Instance::new(&service, format!("reg-{tag}-{n}"), n);
                let t0 = Instant::now();
                match backend.register_new(w, &instance, ttl).await {
                    Ok(_) => samples.push(t0.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        // A failing server answers fast: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (samples, errors, first_error)
        }));
    }
    let mut all = Samples::default();
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let (samples, e, first) = w.await?;
        all.extend(samples);
        errors += e;
        first_error = first_error.or(first);
    }
    if let Some(e) = first_error {
        eprintln!("register: {errors} errors, the first: {e}");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ops = all.len();
    if ops == 0 {
        return Err(format!("no registration succeeded ({errors} errors)").into());
    }
    let rate = ops as f64 / elapsed;
    Ok(format!(
        "ops={ops} errors={errors} seconds={elapsed:.2} rate={rate:.1} {}",
        all.sorted().fields("")
    ))
}
