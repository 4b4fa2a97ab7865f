//! DNS answers from a catalog, shared by the registry and every sidecar.
//!
//! In the order a query travels:
//! - [`udp`]: the UDP loop (decode, answer, encode in place) and its cache of encoded
//!   answers; [`server`]: TCP through hickory-server (the only file naming it).
//! - `rrl`: the per-source-prefix response rate limit of the UDP loop.
//! - [`name`]: the grammar of names below the zone.
//! - [`answer`]: what a name answers, with the RFCs it follows; subsets and splits come
//!   from [`crate::select`], the same code the proxy uses.
//!
//! Names under the domain (default `switchyard`):
//! - `<service>.service.<domain>` → A/AAAA of SERVING instances in random order; when the
//!   service has a routing policy with a default split, each answer holds one subset drawn
//!   by the split's weights, so DNS-only clients get the canary share too;
//! - `<version|subset>.<service>.service.<domain>` → only that version tag or subset;
//! - `_<service>._tcp.service.<domain>` and SRV on the plain name → SRV per RFC 2782,
//!   targets `<hex-ip>.addr.<domain>` (resolvable, also sent as additional records) or the
//!   instance's hostname; weights are split weight × instance weight;
//! - `<service>.service.<namespace>.ns.<domain>` for other namespaces;
//! - `<hex-ip>.addr.<domain>` → the address it encodes.

pub mod answer;
pub mod name;
mod rrl;
#[doc(hidden)]
pub mod server;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::model::policy::Policy;
use crate::model::Instance;
use crate::select::Selection;

pub use answer::{DnsHandler, Vary};
pub use udp::UdpCache;

/// DNS settings of a registry node or a sidecar.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The zone, e.g. `switchyard` for `web.service.switchyard`.
    pub domain: String,
    /// TTL of positive answers and the SOA minimum (negative caching), in seconds.
    pub ttl: u32,
    /// UDP responses per second to one source prefix (IPv4 /24, IPv6 /56), with a burst
    /// of as many; past it every second response is a TC=1 "slip" (the client retries
    /// over TCP) and the others are dropped, as BIND's RRL does. 0 turns it off; loopback
    /// sources are never limited (dns/rrl.rs).
    pub rate_limit: u32,
}

/// The default of [`DnsConfig::rate_limit`].
pub const DEFAULT_RATE_LIMIT: u32 = 200;

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            domain: "switchyard".into(),
            ttl: 5,
            rate_limit: DEFAULT_RATE_LIMIT,
        }
    }
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), String> {
        let ok = !self.domain.is_empty()
            && self.domain.len() <= 200
            && self.domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(format!("dns domain {:?} is not a DNS name", self.domain));
        }
        if self.ttl > 86_400 {
            return Err("dns ttl must be at most 86400 s".into());
        }
        Ok(())
    }
}

/// A service as DNS sees it: its instances, its routing policy and that policy compiled
/// for selection (once, when the records are built).
#[derive(Debug, Default)]
pub struct ServiceRecords {
    pub instances: Vec<Arc<Instance>>,
    pub policy: Option<Arc<Policy>>,
    pub selection: Option<Selection>,
}

impl ServiceRecords {
    pub fn new(instances: Vec<Arc<Instance>>, policy: Option<Arc<Policy>>) -> Self {
        let selection = policy.as_deref().map(Selection::compile);
        Self {
            instances,
            policy,
            selection,
        }
    }
}

/// Where answers come from: a registry's applied catalog, or a sidecar's cached copy.
pub trait DnsSource: Send + Sync + Unpin + 'static {
    /// A service's records; `None` when the service is unknown.
    fn service(&self, namespace: &str, service: &str) -> Option<Arc<ServiceRecords>>;
    /// Whether DNS may answer for this service at all (the registry's `--dns-rule`
    /// after ACL bootstrap). A service it may not is REFUSED, which says "not for you"
    /// where NXDOMAIN would say "no such service".
    fn may_read(&self, _namespace: &str, _service: &str) -> bool {
        true
    }
    /// The catalog revision the answers come from: cached UDP answers are kept only
    /// while it stays the same.
    fn revision(&self) -> u64;
}

/// Serves DNS on the given UDP socket and TCP listener until shutdown.
///
/// UDP, the bulk of DNS traffic, runs in one loop that decodes, answers and encodes each
/// datagram in place: no task, channel or response handle per query, which is what
/// hickory-server's generic path costs (about half the CPU per query here). TCP keeps
/// hickory-server for framing, idle timeouts and pipelining.
pub async fn serve<S: DnsSource>(
    handler: DnsHandler<S>,
    udp: UdpSocket,
    tcp: TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let handler = Arc::new(handler);
    let udp_loop = tokio::spawn(udp::serve_udp(handler.clone(), udp, shutdown.clone()));
    server::serve_tcp(handler, tcp, shutdown).await;
    let _ = udp_loop.await;
}

/// Binds both the UDP socket and the TCP listener of a DNS address. With port 0 the
/// kernel picks the UDP port and TCP takes the same one; when that TCP port is already
/// taken, another pair is tried (bounded: 50 attempts).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let attempts = if addr.port() == 0 { 50 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free DNS port")))
}
