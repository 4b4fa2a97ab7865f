//! `PUT /v1/agent/service/register` and `.../check/update` bodies: any bytes decode to a
//! registration or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_registry::consul::registration;

fuzz_target!(|data: &[u8]| {
    let client = std::net::IpAddr::from([192, 0, 2, 1]);
    if let Ok(r) = registration::decode(data, client) {
        // What decoded is valid: every check has an id and TTL checks are bounded.
        assert!(r.checks.iter().all(|c| !c.id.is_empty()));
    }
    let _ = switchyard_registry::consul::update_body(data);
});
