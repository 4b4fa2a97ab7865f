//! flagd documents: any UTF-8 parses or is refused with a path, never a panic; whatever
//! parses evaluates for every flag, with no context and a small fixed one, without a panic,
//! and its canonical text parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use switchyard_core::flags::FlagSet;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = FlagSet::parse(text) else {
        return;
    };
    let again = FlagSet::parse(set.document()).expect("canonical text parses");
    assert_eq!(again.document(), set.document());
    let empty = Map::new();
    let Value::Object(context) = json!({
        "targetingKey": "user-1",
        "email": "ann@example.com",
        "appVersion": "v1.2",
        "age": 30,
        "score": 0.5,
        "tags": ["a", "vip"],
        "account": {"org": "o", "paid": true},
    }) else {
        return;
    };
    let facts = json!({"service": "web", "version": "1.2.3", "zone": "eu-1"});
    for key in set.keys() {
        let _ = set.evaluate(key, &empty, None);
        if let Ok(e) = set.evaluate(key, &context, Some(&facts)) {
            // A variant, when there is one, is one of the flag's.
            assert!(
                e.variant.is_empty()
                    || set
                        .flag_json(key)
                        .is_some_and(|f| f["variants"].get(&e.variant).is_some())
            );
        }
    }
});
