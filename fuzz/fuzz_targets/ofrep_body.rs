//! OFREP request bodies: any bytes get a reply with a known status and a JSON body (empty
//! only for 304), for the single and the bulk endpoint, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use switchyard_core::flags::{ofrep, FlagSet};

const DOCUMENT: &str = r##"{
  "metadata": {"flagSetId": "fuzz"},
  "$evaluators": {"internal": {"ends_with": [{"var": "email"}, "@example.com"]}},
  "flags": {
    "split": {"state": "ENABLED", "variants": {"a": "a", "b": "b", "c": "c"}, "defaultVariant": "a",
              "targeting": {"fractional": [["a", 30], ["b", 70], ["c"]]}},
    "split-by": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
                 "targeting": {"fractional": [{"var": "account"}, ["a", 1], ["b", 1]]}},
    "split-cat": {"state": "ENABLED", "variants": {"x": true, "y": false}, "defaultVariant": "x",
                  "targeting": {"fractional": [{"cat": [{"var": "$flagd.flagKey"}, {"var": "email"}]}, ["x", 5], ["y", 5]]}},
    "version": {"state": "ENABLED", "variants": {"new": {"v": 2}, "old": {"v": 1}}, "defaultVariant": "old",
                "targeting": {"if": [{"sem_ver": [{"var": "appVersion"}, ">=", "1.4.0"]}, "new",
                                     {"sem_ver": [{"var": "appVersion"}, "^", {"var": "major"}]}, "old", null]}},
    "gated": {"state": "ENABLED", "variants": {"on": true, "off": false},
              "targeting": {"if": [{"and": [{"$ref": "internal"}, {"starts_with": [{"var": "email"}, "beta-"]}]}, "on", {"var": "pick"}]}},
    "math": {"state": "ENABLED", "variants": {"1": 1, "2": 2}, "defaultVariant": "1",
             "targeting": {"+": [{"var": "n"}, {"/": [{"var": "m"}, {"var": "d"}]}]}},
    "killed": {"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"}
  }
}"##;

fn set() -> &'static FlagSet {
    static SET: OnceLock<FlagSet> = OnceLock::new();
    SET.get_or_init(|| FlagSet::parse(DOCUMENT).expect("the fuzz document parses"))
}

fn check(reply: &ofrep::Reply) {
    assert!(
        matches!(reply.status, 200 | 304 | 400 | 404 | 413),
        "{}",
        reply.status
    );
    if reply.status == 304 {
        assert!(reply.body.is_empty());
    } else {
        serde_json::from_slice::<serde_json::Value>(&reply.body).expect("a JSON body");
    }
}

fuzz_target!(|data: &[u8]| {
    let set = set();
    let facts = json!({"service": "web", "version": "1.2.3", "zone": "eu-1"});
    for key in [
        "split",
        "split-by",
        "split-cat",
        "version",
        "gated",
        "math",
        "killed",
        "nope",
    ] {
        check(&ofrep::evaluate_one(set, key, data, None));
    }
    check(&ofrep::evaluate_one(set, "split", data, Some(&facts)));
    let bulk = ofrep::evaluate_bulk(set, 7, data, None, Some(&facts));
    check(&bulk);
    if let Some(etag) = &bulk.etag {
        let again = ofrep::evaluate_bulk(set, 7, data, Some(etag), Some(&facts));
        assert_eq!(again.status, 304);
    }
});
