//! Balancer pick: what the sidecar does per request once it knows the service.
//!
//! - `pick/{equal,unequal}/N`: least request over N usable endpoints, no policy.
//! - `route_and_pick/{default,header}/N`: a canary policy: the route match (header or not),
//!   the 90/10 split draw, then least request inside the chosen version.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use switchyard_benches::{request_headers, sidecar_view, Weights};
use switchyard_sidecar::balance::{pick_from, LbConfig};
use switchyard_sidecar::route::decide;

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

fn pick_without_policy(c: &mut Criterion) {
    let cfg = LbConfig::default();
    let mut group = c.benchmark_group("pick");
    for (label, weights) in [("equal", Weights::Equal), ("unequal", Weights::Unequal)] {
        for n in SIZES {
            let view = sidecar_view(n, weights, false);
            let mut rng = fastrand::Rng::with_seed(7);
            group.bench_with_input(BenchmarkId::new(label, n), &view, |b, view| {
                b.iter(|| {
                    let view = black_box(view);
                    pick_from(&view.endpoints, &view.pool, &cfg, &mut rng).map(|e| e.weight)
                })
            });
        }
    }
    group.finish();
}

fn route_and_pick(c: &mut Criterion) {
    let cfg = LbConfig::default();
    let mut group = c.benchmark_group("route_and_pick");
    for (label, canary) in [("default", false), ("header", true)] {
        let headers = request_headers(canary);
        for n in SIZES {
            let view = sidecar_view(n, Weights::Equal, true);
            let mut rng = fastrand::Rng::with_seed(7);
            group.bench_with_input(BenchmarkId::new(label, n), &view, |b, view| {
                b.iter(|| {
                    let decision = decide("web", view.policy.as_ref(), &headers, &mut rng).ok()?;
                    let pool = decision.subset.map_or(&view.pool, |s| &s.pool);
                    pick_from(&view.endpoints, pool, &cfg, &mut rng).map(|e| e.weight)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick_without_policy, route_and_pick);
criterion_main!(benches);
