//! `watch`: the delay for one change to reach many watchers.
//!
//! `watchers` streams watch one service (etcd: its key prefix). Once every one is
//! established, the client makes `changes` writes to that service, one every `interval`,
//! each adding a new instance (switchyard: `Register` on an existing lease; etcd: `Put`
//! with an existing lease). A sample is the time from just before the write is *sent* to
//! a watcher receiving it, for every (change, watcher) pair: the stricter clock, as it
//! includes the write's own commit (fsync, and replication on three nodes). Writers and
//! watchers share this process, so one monotonic clock times both ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch as signal};
use tokio_stream::StreamExt;

use crate::backend::Backend;
use crate::instance::{run_tag, Instance};
use crate::stats::Samples;
use crate::Result;

/// Instances per lease for the changes (switchyard allows 1,000 per lease).
const CHANGES_PER_LEASE: u64 = 500;
/// How long establishing all watchers may take.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// What `watch` does.
pub struct Options {
    pub watchers: usize,
    pub changes: u64,
    pub interval: Duration,
    pub grace: Duration,
    pub ttl: u32,
}

/// What one watcher saw: when it first received each change, by change number.
struct Seen {
    at: Vec<Option<Instant>>,
    error: Option<String>,
}

/// Runs the scenario; returns the RESULT fields.
pub async fn run(backend: &Backend, opts: &Options) -> Result<String> {
    let tag = run_tag();
    let service = format!("watched-{tag}");
    let id_prefix = Arc::new(format!("chg-{tag}-"));
    let k = opts.changes as usize;

    // Leases for the changes, each created with a seed instance in the service (so they
    // exist before the watchers start and the changes are single writes).
    let mut leases = Vec::new();
    for j in 0..opts.changes.div_ceil(CHANGES_PER_LEASE) {
        let seed = Instance::new(&service, format!("seed-{tag}-{j}"), j);
        leases.push(backend.register_new(j as usize, &seed, opts.ttl).await?);
    }

    // Watchers: each reports once when established (or failed), then records arrivals.
    let (stop_tx, stop_rx) = signal::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<std::result::Result<(), String>>(opts.watchers);
    let establish = Instant::now();
    let mut handles = Vec::with_capacity(opts.watchers);
    for i in 0..opts.watchers {
        let (backend, service, id_prefix) = (backend.clone(), service.clone(), id_prefix.clone());
        let (ready_tx, mut stop_rx) = (ready_tx.clone(), stop_rx.clone());
        handles.push(tokio::spawn(async move {
            let mut seen = Seen {
                at: vec![None; k],
                error: None,
            };
            let opened = async {
                let mut stream = backend.watch(i, &service).await?;
                match tokio::time::timeout(ESTABLISH_TIMEOUT, stream.next()).await {
                    Ok(Some(Ok(_first))) => Ok(stream),
                    Ok(Some(Err(status))) => Err(status.to_string().into()),
                    Ok(None) => Err("the watch ended before it was established".into()),
                    Err(_) => Err(crate::BoxError::from("no first watch event")),
                }
            };
            let mut stream = match opened.await {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(())).await;
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string())).await;
                    seen.error = Some(e.to_string());
                    return seen;
                }
            };
            drop(ready_tx);
            let mut missing = k;
            while missing > 0 {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = stop_rx.wait_for(|s| *s) => break,
                };
                let now = Instant::now();
                let ids = match item {
                    Some(Ok(ids)) => ids,
                    Some(Err(status)) => {
                        seen.error = Some(status.to_string());
                        break;
                    }
                    None => {
                        seen.error = Some("the watch stream ended".into());
                        break;
                    }
                };
                for id in ids {
                    let Some(n) = id
                        .strip_prefix(id_prefix.as_str())
                        .and_then(|n| n.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    if n < k && seen.at[n].is_none() {
                        seen.at[n] = Some(now);
                        missing -= 1;
                    }
                }
            }
            seen
        }));
    }
    drop(ready_tx);
    let mut established = 0;
    let mut failed: Option<String> = None;
    let establish_deadline = tokio::time::Instant::now() + ESTABLISH_TIMEOUT;
    while established < opts.watchers {
        match tokio::time::timeout_at(establish_deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => established += 1,
            Ok(Some(Err(e))) => {
                failed = Some(e);
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if established < opts.watchers {
        let _ = stop_tx.send(true);
        for h in handles {
            h.abort();
        }
        return Err(format!(
            "only {established} of {} watchers established: {}",
            opts.watchers,
            failed.unwrap_or_else(|| "timed out".into())
        )
        .into());
    }
    let establish_seconds = establish.elapsed().as_secs_f64();

    // The changes, spaced by `interval`; each one waits for its acknowledgement.
    let mut sent: Vec<Option<Instant>> = vec![None; k];
    let mut acks = Samples::with_capacity(k);
    let mut write_errors = 0u64;
    let mut first_write_error = None;
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for (n, slot) in sent.iter_mut().enumerate() {
        ticker.tick().await;
        let instance = Instance::new(&service, format!("{id_prefix}{n}"), n as u64);
        let lease = leases[n / CHANGES_PER_LEASE as usize];
        let t0 = Instant::now();
        match backend.attach(n, &instance, lease).await {
            Ok(()) => {
                acks.push(t0.elapsed());
                *slot = Some(t0);
            }
            Err(e) => {
                write_errors += 1;
                first_write_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    // Give the watchers `grace` to catch up, then stop them.
    let grace = opts.grace;
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let _ = stop_tx.send(true);
    });
    let mut delays = Samples::with_capacity(k * opts.watchers);
    let mut missed = 0u64;
    let mut watch_errors = 0u64;
    let mut first_watch_error = None;
    for h in handles {
        let seen = h.await?;
        if let Some(e) = seen.error {
            watch_errors += 1;
            first_watch_error.get_or_insert(e);
        }
        for (sent, got) in sent.iter().zip(&seen.at) {
            match (sent, got) {
                (Some(s), Some(g)) => delays.push(g.saturating_duration_since(*s)),
                (Some(_), None) => missed += 1,
                (None, _) => {}
            }
        }
    }
    stopper.abort();
    if let Some(e) = first_write_error {
        eprintln!("watch: {write_errors} writes failed, the first: {e}");
    }
    if let Some(e) = first_watch_error {
        eprintln!("watch: {watch_errors} watchers failed, the first: {e}");
    }
    let samples = delays.len();
    Ok(format!(
        "samples={samples} missed={missed} write_errors={write_errors} watch_errors={watch_errors} establish_seconds={establish_seconds:.2} {} {}",
        delays.sorted().fields(""),
        acks.sorted().fields("ack_")
    ))
}
