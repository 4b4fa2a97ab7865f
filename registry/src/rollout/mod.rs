//! Canary rollouts run by the registry: the transitions a rollout can make
//! ([`transitions`], pure), the evidence folded from the sidecars' telemetry
//! ([`evidence`], pure), and the leader's loop that moves every active rollout along
//! ([`driver`]). Every transition is a `PutRollout` command through Raft, so a new
//! leader continues a rollout from the state the log holds.

pub mod driver;
pub mod evidence;
pub mod transitions;

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds: what transitions record (they outlive a leader, so they
/// cannot use a node's monotonic clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
