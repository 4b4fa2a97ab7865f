//! Query strings of Consul reads and Go durations: any input parses or is refused
//! naming the parameter, never a panic, and a parsed hold is within the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_registry::consul::query::{go_duration, Query, MAX_WAIT};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = Query::parse(Some(text)) {
        assert!(q.hold() <= MAX_WAIT + MAX_WAIT / 16);
    }
    let _ = go_duration(text);
});
