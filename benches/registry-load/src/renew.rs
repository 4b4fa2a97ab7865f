//! `renew`: creates the leases first, then keeps `window` keep-alive messages in flight
//! on each of `streams` streams for the whole run, so the server, not the client's round
//! trips, sets the pace. Renewals are counted from responses (leases reported renewed),
//! never from requests sent.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::StreamExt;

use crate::backend::{Backend, RPC_TIMEOUT};
use crate::instance::{run_tag, Instance};
use crate::{pool, Result};

/// What `renew` does.
pub struct Options {
    pub streams: usize,
    pub leases: u64,
    /// Leases per message (switchyard only).
    pub batch: usize,
    /// Messages in flight per stream.
    pub window: usize,
    pub duration: Duration,
    pub ttl: u32,
}

/// Per-stream counts.
#[derive(Default)]
struct Counts {
    renewed: u64,
    not_found: u64,
    messages: u64,
    error: Option<String>,
}

/// Runs the scenario; returns the RESULT fields.
pub async fn run(backend: &Backend, opts: &Options) -> Result<String> {
    let setup = Instant::now();
    let leases = create_leases(backend, opts.leases, opts.ttl).await?;
    let setup_seconds = setup.elapsed().as_secs_f64();

    // Open every stream before the clock starts. Each is primed with one request whose
    // answer is awaited (and not counted): etcd (grpc-go) sends a stream's response
    // headers only with its first message, so opening an idle stream would never return.
    let mut opened = Vec::with_capacity(opts.streams);
    for s in 0..opts.streams {
        let (tx, rx) = mpsc::channel::<Vec<u64>>(opts.window);
        tx.send(vec![leases[s % leases.len()]])
            .await
            .map_err(|_| "keep-alive request channel closed")?;
        let mut inbound = backend.keep_alive(s, rx).await?;
        match tokio::time::timeout(RPC_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(status))) => return Err(status.into()),
            Ok(None) => return Err("the server ended a keep-alive stream at once".into()),
            Err(_) => return Err("no first keep-alive response".into()),
        }
        opened.push((tx, inbound));
    }
    let leases = Arc::new(leases);
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + opts.duration);
    let mut tasks = Vec::with_capacity(opts.streams);
    for (s, (tx, mut inbound)) in opened.into_iter().enumerate() {
        let in_flight = Arc::new(Semaphore::new(opts.window));
        let (leases, batch) = (leases.clone(), opts.batch);
        // Each stream walks the lease list from its own offset, `batch` ids a message.
        let mut cursor = s * leases.len() / opts.streams;
        let sender = {
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                loop {
                    let permit = match tokio::time::timeout_at(deadline, in_flight.acquire()).await
                    {
                        Ok(Ok(p)) => p,
                        _ => break,
                    };
                    permit.forget();
                    let ids: Vec<u64> = (0..batch)
                        .map(|k| leases[(cursor + k) % leases.len()])
                        .collect();
                    cursor = (cursor + batch) % leases.len();
                    if tx.send(ids).await.is_err() {
                        break;
                    }
                }
            })
        };
        tasks.push(tokio::spawn(async move {
            let mut c = Counts::default();
            loop {
                match tokio::time::timeout_at(deadline, inbound.next()).await {
                    Err(_) => break,
                    Ok(None) => {
                        c.error = Some("the server ended the keep-alive stream".into());
                        break;
                    }
                    Ok(Some(Err(status))) => {
                        c.error = Some(status.to_string());
                        break;
                    }
                    Ok(Some(Ok(r))) => {
                        c.renewed += r.ok;
                        c.not_found += r.not_found;
                        c.messages += 1;
                        in_flight.add_permits(1);
                    }
                }
            }
            sender.abort();
            c
        }));
    }
    let mut total = Counts::default();
    let mut errors = 0u64;
    for t in tasks {
        let c = t.await?;
        total.renewed += c.renewed;
        total.not_found += c.not_found;
        total.messages += c.messages;
        if let Some(e) = c.error {
            errors += 1;
            total.error.get_or_insert(e);
        }
    }
    if let Some(e) = &total.error {
        eprintln!("renew: {errors} streams failed, the first: {e}");
    }
    let secs = opts.duration.as_secs_f64();
    if total.renewed == 0 {
        return Err("no lease was renewed".into());
    }
    Ok(format!(
        "renewals={} not_found={} messages={} stream_errors={errors} seconds={secs:.2} rate={:.1} msg_rate={:.1} setup_seconds={setup_seconds:.2}",
        total.renewed,
        total.not_found,
        total.messages,
        total.renewed as f64 / secs,
        total.messages as f64 / secs,
    ))
}

/// Creates `n` leases, each with one instance on it (switchyard has no lease without an
/// instance; on etcd the key makes the lease equally loaded). 64 requests in flight.
async fn create_leases(backend: &Backend, n: u64, ttl: u32) -> Result<Vec<u64>> {
    let tag = run_tag();
    let slots = Arc::new(Mutex::new(vec![0u64; n as usize]));
    let done = {
        let (backend, slots) = (backend.clone(), slots.clone());
        pool::run(n, 64, move |i, w| {
            let (backend, slots) = (backend.clone(), slots.clone());
            let instance = Instance::new(
                &format!("renew-{tag}-{}", i / 100),
                format!("renew-{tag}-{i}"),
                i,
            );
            async move {
                let lease = backend.register_new(w, &instance, ttl).await?;
                let mut slots = slots.lock().map_err(|_| "lease table poisoned")?;
                slots[i as usize] = lease;
                Ok(())
            }
        })
        .await?
    };
    if done.errors > 0 {
        return Err(format!(
            "{} of {n} leases could not be created: {}",
            done.errors,
            done.first_error.unwrap_or_default()
        )
        .into());
    }
    let leases = slots.lock().map_err(|_| "lease table poisoned")?.clone();
    Ok(leases)
}
