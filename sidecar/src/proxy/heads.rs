//! Header maps kept for reuse by the thread that serves requests.
//!
//! A request that may be retried is sent upstream as a copy of its headers and keeps
//! the original for the next attempt (hyper consumes what it sends). Filling a fresh
//! `HeaderMap` would allocate its tables on every request; instead the copy is made
//! into a map this thread used before, and the original goes back here once the
//! request is done with it. At steady state a retryable request costs no allocation
//! for its head: one map leaves the pool (sent, then dropped by hyper) and one comes
//! back (the original). Names and values are reference-counted `Bytes`, so copying
//! them allocates nothing.
//!
//! Each proxy worker is one thread, so the pool is thread-local: no lock.

use std::cell::RefCell;

use http::HeaderMap;

/// Maps kept per thread: one per request a worker has in flight at once, up to this
/// many (at most about 3.5 KiB each, so under 250 KiB per worker at worst).
const KEPT: usize = 64;

/// A map that grew past this many entries (a request with a hundred headers) is not
/// kept: it would hold its size for every later request.
const MAX_KEPT_CAPACITY: usize = 32;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// A copy of `headers`, in a map this thread used before when there is one.
pub fn copy_of(headers: &HeaderMap) -> HeaderMap {
    let mut map = SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| HeaderMap::with_capacity(headers.len()));
    // One step to the size needed when a kept map is smaller (a no-op otherwise).
    map.reserve(headers.keys_len());
    for (name, value) in headers {
        map.append(name.clone(), value.clone());
    }
    map
}

/// Keeps `map`'s tables for a later [`copy_of`] (its entries are dropped now).
pub fn give_back(mut map: HeaderMap) {
    // `capacity` counts names; `len` counts values too, whose extra storage `clear`
    // keeps (an HTTP/2 head of a few names with hundreds of cookie crumbs).
    if map.capacity() > MAX_KEPT_CAPACITY || map.len() > MAX_KEPT_CAPACITY {
        return;
    }
    map.clear();
    SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        if spare.len() < KEPT {
            spare.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue, ACCEPT, HOST};

    fn sample() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("web"));
        h.append(ACCEPT, HeaderValue::from_static("text/plain"));
        h.append(ACCEPT, HeaderValue::from_static("text/html"));
        h.insert(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("1"),
        );
        h
    }

    #[test]
    fn a_copy_holds_every_value_in_order_even_in_a_reused_map() {
        let original = sample();
        let mut used = HeaderMap::new();
        used.insert(HOST, HeaderValue::from_static("stale"));
        give_back(used);
        let copy = copy_of(&original);
        assert_eq!(copy, original);
        let accept: Vec<_> = copy.get_all(ACCEPT).iter().collect();
        assert_eq!(accept, ["text/plain", "text/html"]);
    }

    #[test]
    fn a_map_holding_many_values_of_one_name_is_not_kept() {
        let mut many = HeaderMap::new();
        for _ in 0..=MAX_KEPT_CAPACITY {
            many.append(ACCEPT, HeaderValue::from_static("x"));
        }
        let before = SPARE.with(|s| s.borrow().len());
        give_back(many);
        assert_eq!(SPARE.with(|s| s.borrow().len()), before);
    }

    #[test]
    fn a_map_grown_large_is_not_kept() {
        let mut big = HeaderMap::with_capacity(MAX_KEPT_CAPACITY * 4);
        big.insert(HOST, HeaderValue::from_static("web"));
        let before = SPARE.with(|s| s.borrow().len());
        give_back(big);
        assert_eq!(SPARE.with(|s| s.borrow().len()), before);
    }
}
