//! The registry's hot paths below the network: applying a command to the catalog state
//! machine, and turning a change into the bytes a watcher receives.
//!
//! - `apply/register_new`: a new instance (new lease) into a catalog of 10,000.
//! - `apply/reregister`: the same instance registered again (a restart or update).
//! - `watch_encode/delta_1`: one upserted instance → `WatchEvent` → protobuf bytes, the
//!   per-watcher work for a typical change.
//! - `watch_encode/snapshot_100`: a 100-instance service as the first event of a watch.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use prost::Message;
use switchyard_benches::instance;
use switchyard_core::convert::{delta_event, snapshot_event};
use switchyard_core::model::Change;
use switchyard_registry::catalog::{Catalog, Command};
use switchyard_registry::Limits;

const BASE: usize = 10_000;

fn filled_catalog() -> (Catalog, u64) {
    let mut catalog = Catalog::new(Limits::default());
    let mut index = 0;
    for i in 0..BASE {
        index += 1;
        catalog.apply(
            index,
            &Command::Register {
                instance: instance(i, 100),
                ttl_seconds: 30,
                lease_id: None,
            },
        );
    }
    (catalog, index)
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    let (mut catalog, mut index) = filled_catalog();
    let mut next = BASE;
    group.bench_function("register_new", |b| {
        b.iter_batched(
            || {
                next += 1;
                Command::Register {
                    instance: instance(next, 100),
                    ttl_seconds: 30,
                    lease_id: None,
                }
            },
            |command| {
                index += 1;
                catalog.apply(index, black_box(&command)).change.is_some()
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let again = Command::Register {
        instance: instance(17, 100),
        ttl_seconds: 30,
        lease_id: None,
    };
    group.bench_function("reregister", |b| {
        b.iter(|| {
            index += 1;
            catalog.apply(index, black_box(&again)).change.is_some()
        })
    });
    group.finish();
}

fn watch_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("watch_encode");
    let change = Change {
        revision: 42,
        upserted: vec![std::sync::Arc::new(instance(1, 100))],
        ..Change::default()
    };
    let mut buf = Vec::with_capacity(4096);
    group.bench_function("delta_1", |b| {
        b.iter(|| {
            buf.clear();
            let event = delta_event(black_box(&change));
            event.encode(&mut buf).map(|()| buf.len()).ok()
        })
    });
    let (catalog, _) = filled_catalog();
    let views = catalog.snapshot("default", &["svc-0003".to_string()]);
    group.bench_function("snapshot_100", |b| {
        b.iter(|| {
            buf.clear();
            let event = snapshot_event(42, black_box(&views));
            event.encode(&mut buf).map(|()| buf.len()).ok()
        })
    });
    group.finish();
}

criterion_group!(benches, apply, watch_encode);
criterion_main!(benches);
