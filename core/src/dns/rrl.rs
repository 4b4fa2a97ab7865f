//! Response rate limiting for DNS over UDP, a much simplified BIND RRL: a token bucket per
//! source prefix (IPv4 /24, IPv6 /56), so a spoofed flood "from" one victim network gets
//! at most `rate` answers a second back however fast it comes. Past the bucket, every
//! [`SLIP`]th response is a TC=1 slip (no records, never larger than the query: a real
//! client retries over TCP, which is not limited) and the rest are dropped.
//!
//! The table is a fixed array of [`SLOTS`] buckets indexed by a keyed hash of the prefix
//! (allocated on the first limited source): memory is bounded whatever the sources, and a
//! prefix whose slot another takes over starts again with a full bucket, so collisions
//! only ever let more through, and an attacker cannot aim them (the hash key is random per
//! process). Loopback sources (127.0.0.0/8, ::1) are never limited: nothing off the host
//! can be reflected to them, and local benchmarks (dnsperf) measure the server, not this.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::Instant;

/// Buckets in the table (32 bytes each: 256 KiB once allocated).
pub(super) const SLOTS: usize = 8192;
/// One in this many limited responses is a slip (BIND's default `slip 2`).
pub(super) const SLIP: u32 = 2;

/// What to do with one query's response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Answer,
    Slip,
    Drop,
}

#[derive(Clone, Copy)]
struct Slot {
    /// The prefix this bucket counts, [`EMPTY`] for none.
    key: u128,
    /// When the bucket was last refilled, in ms since the limiter started.
    last_ms: u64,
    tokens: f32,
    /// Responses limited since the bucket was last full, to pick slips.
    limited: u32,
}

/// Never a prefix key: IPv6 keys have their low 72 bits zero, IPv4 keys the top ones.
const EMPTY: u128 = u128::MAX;

pub(super) struct RateLimiter {
    /// Responses per second per prefix, also the burst; 0 = off.
    rate: u32,
    exempt_loopback: bool,
    start: Instant,
    hasher: std::collections::hash_map::RandomState,
    slots: Vec<Slot>,
}

impl RateLimiter {
    pub(super) fn new(rate: u32) -> Self {
        Self {
            rate,
            exempt_loopback: true,
            start: Instant::now(),
            hasher: Default::default(),
            slots: Vec::new(),
        }
    }

    /// The same, limiting loopback sources too (tests on 127.0.0.1).
    #[cfg(test)]
    pub(super) fn with_loopback(rate: u32) -> Self {
        Self {
            exempt_loopback: false,
            ..Self::new(rate)
        }
    }

    /// The verdict for a response to `ip` now.
    pub(super) fn check(&mut self, ip: IpAddr) -> Verdict {
        if self.rate == 0 || (self.exempt_loopback && is_loopback(ip)) {
            return Verdict::Answer;
        }
        self.check_at(ip, Instant::now())
    }

    /// The verdict for a response to `ip` at `now`.
    pub(super) fn check_at(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        if self.rate == 0 || (self.exempt_loopback && is_loopback(ip)) {
            return Verdict::Answer;
        }
        if self.slots.is_empty() {
            self.slots = vec![
                Slot {
                    key: EMPTY,
                    last_ms: 0,
                    tokens: 0.0,
                    limited: 0,
                };
                SLOTS
            ];
        }
        let key = prefix(ip);
        let now_ms = u64::try_from(now.saturating_duration_since(self.start).as_millis())
            .unwrap_or(u64::MAX);
        // The rate as f32 is exact up to 2^24 responses/s, far past any use.
        let burst = self.rate as f32;
        let index = (self.hasher.hash_one(key) % SLOTS as u64) as usize;
        let Some(slot) = self.slots.get_mut(index) else {
            return Verdict::Answer;
        };
        if slot.key != key {
            *slot = Slot {
                key,
                last_ms: now_ms,
                tokens: burst,
                limited: 0,
            };
        }
        let elapsed = now_ms.saturating_sub(slot.last_ms);
        if elapsed > 0 {
            slot.tokens = (slot.tokens + elapsed as f32 * burst / 1000.0).min(burst);
            slot.last_ms = now_ms;
        }
        if slot.tokens >= 1.0 {
            slot.tokens -= 1.0;
            slot.limited = 0;
            return Verdict::Answer;
        }
        slot.limited = slot.limited.wrapping_add(1);
        if slot.limited.is_multiple_of(SLIP) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    /// Buckets allocated (0 or [`SLOTS`]).
    #[cfg(test)]
    pub(super) fn table_len(&self) -> usize {
        self.slots.len()
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The bucket key of a source: its /24 (IPv4, IPv4-mapped IPv6 included) or /56 (IPv6).
fn prefix(ip: IpAddr) -> u128 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        // The low bit set: never the key of an IPv6 /56 (low 72 bits zero).
        IpAddr::V4(v4) => u128::from(u32::from(v4) & 0xffff_ff00) | 1,
        IpAddr::V6(v6) => u128::from(v6) & !((1u128 << 72) - 1),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_prefix_gets_its_burst_then_slips_and_drops_then_refills() {
        let mut rrl = RateLimiter::new(10);
        let t0 = Instant::now();
        for n in 0..10 {
            // Two hosts of one /24 share the bucket.
            let host = if n % 2 == 0 {
                "192.0.2.1"
            } else {
                "192.0.2.200"
            };
            assert_eq!(rrl.check_at(ip(host), t0), Verdict::Answer, "burst {n}");
        }
        let over: Vec<Verdict> = (0..6).map(|_| rrl.check_at(ip("192.0.2.7"), t0)).collect();
        use Verdict::{Drop, Slip};
        assert_eq!(over, vec![Drop, Slip, Drop, Slip, Drop, Slip]);
        // Another /24 and another IPv6 /56 are counted apart.
        assert_eq!(rrl.check_at(ip("192.0.3.1"), t0), Verdict::Answer);
        for _ in 0..10 {
            assert_eq!(rrl.check_at(ip("2001:db8:0:100::1"), t0), Verdict::Answer);
        }
        assert_ne!(
            rrl.check_at(ip("2001:db8:0:1ff::2"), t0),
            Verdict::Answer,
            "same /56"
        );
        assert_eq!(rrl.check_at(ip("2001:db8:0:200::1"), t0), Verdict::Answer);
        // IPv4-mapped IPv6 is the IPv4 source.
        assert_ne!(rrl.check_at(ip("::ffff:192.0.2.9"), t0), Verdict::Answer);
        // 10/s: 100 ms gives one more answer, a second the whole burst back (no more).
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(rrl.check_at(ip("192.0.2.1"), t1), Verdict::Answer);
        assert_ne!(rrl.check_at(ip("192.0.2.1"), t1), Verdict::Answer);
        let t2 = t1 + Duration::from_secs(60);
        let answered = (0..50)
            .filter(|_| rrl.check_at(ip("192.0.2.1"), t2) == Verdict::Answer)
            .count();
        assert_eq!(answered, 10);
    }

    #[test]
    fn loopback_and_a_zero_rate_are_never_limited_and_the_table_is_bounded() {
        let mut rrl = RateLimiter::new(1);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(rrl.check_at(ip("127.0.0.1"), t0), Verdict::Answer);
            assert_eq!(rrl.check_at(ip("127.9.9.9"), t0), Verdict::Answer);
            assert_eq!(rrl.check_at(ip("::1"), t0), Verdict::Answer);
            assert_eq!(rrl.check_at(ip("::ffff:127.0.0.1"), t0), Verdict::Answer);
        }
        assert_eq!(rrl.table_len(), 0, "nothing allocated for loopback");
        let mut off = RateLimiter::new(0);
        for _ in 0..1000 {
            assert_eq!(off.check_at(ip("198.51.100.1"), t0), Verdict::Answer);
        }
        // 100,000 distinct /24s and /56s: the table stays SLOTS buckets.
        for n in 0..50_000u32 {
            rrl.check_at(IpAddr::V4((n << 8).into()), t0);
            rrl.check_at(
                IpAddr::V6(((u128::from(n) << 72) | (0x2001 << 112)).into()),
                t0,
            );
        }
        assert_eq!(rrl.table_len(), SLOTS);
    }
}
