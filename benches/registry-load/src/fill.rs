//! `fill`: puts `count` instances in the server, in services of `per_lease` instances
//! that share one lease each (switchyard: the first `Register` of a service creates the
//! lease, the others join it with `lease_id`; etcd: `LeaseGrant` + `Put`, then `Put`s
//! with that lease). The leases get the longest TTL, so nothing expires before the
//! script reads the server's memory.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::Backend;
use crate::instance::{run_tag, Instance};
use crate::{pool, Result};

/// Runs the scenario; returns the RESULT fields.
pub async fn run(
    backend: &Backend,
    concurrency: usize,
    count: u64,
    per_lease: u64,
    ttl: u32,
) -> Result<String> {
    let tag = Arc::new(run_tag());
    let instance = {
        let tag = tag.clone();
        move |i: u64| {
            Instance::new(
                &format!("fill-{tag}-{}", i / per_lease),
                format!("fill-{tag}-{i}"),
                i,
            )
        }
    };
    let start = Instant::now();

    // The first instance of every service, each on a new lease.
    let services = count.div_ceil(per_lease);
    let leases = Arc::new(Mutex::new(vec![0u64; services as usize]));
    let first = {
        let (backend, leases, instance) = (backend.clone(), leases.clone(), instance.clone());
        pool::run(services, concurrency, move |s, w| {
            let (backend, leases) = (backend.clone(), leases.clone());
            let inst = instance(s * per_lease);
            async move {
                let lease = backend.register_new(w, &inst, ttl).await?;
                leases.lock().map_err(|_| "lease table poisoned")?[s as usize] = lease;
                Ok(())
            }
        })
        .await?
    };
    if first.errors > 0 {
        return Err(format!(
            "{} of {services} leases failed: {}",
            first.errors,
            first.first_error.unwrap_or_default()
        )
        .into());
    }
    let leases: Arc<Vec<u64>> =
        Arc::new(leases.lock().map_err(|_| "lease table poisoned")?.clone());

    // Every other instance joins its service's lease.
    let others = count - services;
    let rest = {
        let backend = backend.clone();
        pool::run(others, concurrency, move |j, w| {
            let backend = backend.clone();
            let (s, i) = joiner(j, per_lease);
            let inst = instance(i);
            let lease = leases[s as usize];
            async move { backend.attach(w, &inst, lease).await }
        })
        .await?
    };
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = &rest.first_error {
        eprintln!("fill: {} errors, the first: {e}", rest.errors);
    }
    let stored = services + rest.ok;
    Ok(format!(
        "stored={stored} leases={services} errors={} seconds={elapsed:.2} rate={:.1}",
        rest.errors,
        stored as f64 / elapsed
    ))
}

/// The `j`-th instance that is not the first of its service: (service, instance index).
/// Service `s` holds instances `s * per_lease ..= s * per_lease + per_lease - 1`; the
/// first of them created the lease, the others join it.
fn joiner(j: u64, per_lease: u64) -> (u64, u64) {
    let joiners = (per_lease - 1).max(1);
    let s = j / joiners;
    (s, s * per_lease + 1 + j % joiners)
}

#[cfg(test)]
mod tests {
    use super::joiner;

    #[test]
    fn joiners_cover_every_instance_but_the_firsts() {
        let (count, per_lease) = (1_050u64, 100u64);
        let services = count.div_ceil(per_lease);
        let mut all: Vec<u64> = (0..services).map(|s| s * per_lease).collect();
        for j in 0..count - services {
            let (s, i) = joiner(j, per_lease);
            assert_eq!(s, i / per_lease);
            all.push(i);
        }
        all.sort_unstable();
        assert_eq!(all, (0..count).collect::<Vec<_>>());
    }
}
