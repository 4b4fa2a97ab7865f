//! Feature-flag evaluation from memory, as a sidecar answers OFREP:
//!
//! - `flags/static`: a flag without targeting.
//! - `flags/fractional_30_70`: a 30/70 `fractional` rollout (CBOR + murmur3 + bucket).
//! - `flags/canary_version`: targeting on the sidecar's `$switchyard.version` fact.
//! - `flags/ofrep_one`: the whole OFREP single-flag path: parse the request body,
//!   evaluate, write the JSON reply.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Map, Value};
use switchyard_core::flags::{ofrep, FlagSet};

const DOCUMENT: &str = r#"{"flags": {
  "greeting": {"state": "ENABLED", "variants": {"a": "Hi", "b": "Hello"}, "defaultVariant": "a"},
  "new-checkout": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
    "targeting": {"fractional": [["on", 30], ["off", 70]]}},
  "canary-banner": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
    "targeting": {"if": [{"==": [{"var": "$switchyard.version"}, "2.0.0"]}, "on", "off"]}}
}}"#;

fn flags(c: &mut Criterion) {
    let set = FlagSet::parse(DOCUMENT).expect("document");
    let facts = json!({"service": "web", "version": "2.0.0", "zone": "eu-1"});
    let mut ctx = Map::new();
    ctx.insert("targetingKey".into(), Value::String("user-42".into()));
    let mut group = c.benchmark_group("flags");
    group.bench_function("static", |b| {
        b.iter(|| set.evaluate(black_box("greeting"), &ctx, Some(&facts)))
    });
    group.bench_function("fractional_30_70", |b| {
        b.iter(|| set.evaluate(black_box("new-checkout"), &ctx, Some(&facts)))
    });
    group.bench_function("canary_version", |b| {
        b.iter(|| set.evaluate(black_box("canary-banner"), &ctx, Some(&facts)))
    });
    let body = br#"{"context": {"targetingKey": "user-42", "email": "ann@example.com"}}"#;
    group.bench_function("ofrep_one", |b| {
        b.iter(|| ofrep::evaluate_one(&set, black_box("new-checkout"), body, Some(&facts)))
    });
    group.finish();
}

criterion_group!(benches, flags);
criterion_main!(benches);
