//! DNS over UDP: one loop that decodes, answers and encodes each datagram in place, and
//! the cache of encoded answers it keeps (RFC 1035 message size, RFC 6891 EDNS).

use std::collections::HashMap;
use std::sync::Arc;

use hickory_proto::op::{Edns, Header, Message, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::answer::{response_metadata, DnsHandler, Vary};
use super::rrl::{RateLimiter, Verdict};
use super::DnsSource;

impl<S: DnsSource> DnsHandler<S> {
    /// The whole UDP exchange for one datagram: decode (hickory-proto), answer, encode
    /// within what the client can take (`udp_limit`), trimmed by `fit`. `None`:
    /// nothing to send back, e.g. the datagram was itself a response, which must never be
    /// answered (no reflection loops).
    pub fn udp_response(&self, packet: &[u8]) -> Option<(Vec<u8>, Vary)> {
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(_) => {
                // A readable header gets FORMERR, so the client need not time out.
                let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
                if header.message_type != MessageType::Query {
                    return None;
                }
                return Message::error_msg(header.id, header.op_code, ResponseCode::FormErr)
                    .to_vec()
                    .ok()
                    .map(|bytes| (bytes, Vary::Never));
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let first = request.queries.first().map(|q| (q.name(), q.query_type()));
        let edns_version = request.edns.as_ref().map(|e| e.version());
        let answer = self.outcome(
            &request.metadata,
            request.queries.len(),
            first,
            edns_version,
        );
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata = response_metadata(&request.metadata, &answer);
        let vary = answer.vary;
        let limit = udp_limit(request.edns.as_ref());
        // RFC 6891 §6.1.1: an EDNS query gets an OPT record back (BADVERS included, whose
        // upper RCODE bits travel in it).
        response.edns = request.edns.as_ref().map(|_| our_edns());
        response.queries = request.queries;
        if answer.soa {
            response.authorities.push(self.soa.clone());
        }
        fit(response, answer.answers, answer.additionals, limit).map(|bytes| (bytes, vary))
    }

    /// The "slip" sent instead of a rate-limited answer now and then: the question with
    /// TC=1 and no records, never larger than the query, so a real client retries over
    /// TCP (not rate-limited) while a spoofed victim gets no amplification. `None` for a
    /// datagram that is no readable query. Never kept by the [`UdpCache`].
    pub(super) fn slip_response(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(packet).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata = Metadata::response_from_request(&request.metadata);
        response.metadata.recursion_available = false;
        response.metadata.truncation = true;
        response.edns = request.edns.as_ref().map(|_| our_edns());
        response.queries = request.queries;
        response.to_vec().ok()
    }
}

/// The OPT record of our EDNS responses: version 0, our payload size.
fn our_edns() -> Edns {
    let mut ours = Edns::new();
    ours.set_max_payload(EDNS_PAYLOAD);
    ours
}

/// The largest UDP answer for a query: 512 bytes without EDNS (RFC 1035 §4.2.1; there are
/// no DNS cookies here, so no query counts as coming from a verified source), else the
/// client's EDNS payload size bounded by ours (1232, so answers never fragment) and at
/// least 512 (RFC 6891 §6.2.5: smaller values are treated as 512).
fn udp_limit(edns: Option<&Edns>) -> usize {
    match edns {
        Some(edns) => usize::from(edns.max_payload().min(EDNS_PAYLOAD)).max(PLAIN_UDP_PAYLOAD),
        None => PLAIN_UDP_PAYLOAD,
    }
}

/// Encodes `response` with `answers` and `additionals`, within `limit` bytes:
/// 1. everything, when it fits;
/// 2. else all answers and as many additional records as fit, without TC: RFC 2181 §9
///    lets additional data go without truncation (SRV targets missing here still resolve
///    by their own `<hex-ip>.addr` query);
/// 3. else as many answer records as fit, no additionals, and TC=1.
///
/// Step 3 is where RFC 2181 §9 ("a truncated response must not contain partial RRsets")
/// meets a zone whose every answer is one RRset (all A, AAAA or SRV records of a name):
/// sending whole RRsets only would send nothing, which is what a client without TCP
/// fallback then resolves to. Like Consul, which cuts A and SRV answers to what fits the
/// UDP size, a truncated answer here keeps a prefix of the (shuffled, or split-drawn)
/// records: each is a usable address on its own, and TC tells clients that can to get
/// the whole set over TCP. Every record kept is whole; the header counts match.
/// Additionals are never the reason for TC.
fn fit(
    mut response: Message,
    answers: Vec<Record>,
    additionals: Vec<Record>,
    limit: usize,
) -> Option<Vec<u8>> {
    let fits = |m: &Message| m.to_vec().ok().filter(|b| b.len() <= limit);
    response.answers = answers;
    response.additionals = additionals;
    if let Some(bytes) = fits(&response) {
        return Some(bytes);
    }
    let additionals = std::mem::take(&mut response.additionals);
    if fits(&response).is_some() {
        let n = longest_prefix(additionals.len(), |n| {
            response.additionals = additionals[..n].to_vec();
            fits(&response).is_some()
        });
        response.additionals = additionals[..n].to_vec();
        return fits(&response);
    }
    let answers = std::mem::take(&mut response.answers);
    response.metadata.truncation = true;
    let n = longest_prefix(answers.len(), |n| {
        response.answers = answers[..n].to_vec();
        fits(&response).is_some()
    });
    response.answers = answers[..n].to_vec();
    // Even the bare question does not fit (not possible within 512 bytes, but cheap to
    // handle): the header and question alone, as hickory truncates.
    fits(&response).or_else(|| response.truncate().to_vec().ok())
}

/// The largest `n` in `0..=len` for which `ok(n)` holds, given that `ok` holds for every
/// `n` below one for which it holds (longer prefixes encode longer) and for 0.
fn longest_prefix(len: usize, mut ok: impl FnMut(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Largest UDP answer for a client that sent no EDNS (RFC 1035).
const PLAIN_UDP_PAYLOAD: usize = 512;
/// The UDP payload size this server advertises (the DNS flag day 2020 value).
pub(super) const EDNS_PAYLOAD: u16 = 1232;

/// Orders kept per shuffled answer: each query gets one of them at random.
const SHUFFLED_VARIANTS: usize = 8;
/// Datagrams answered back to back before the UDP loop lets other tasks run.
const YIELD_EVERY: u32 = 64;
/// Distinct queries whose answers are kept; past it the cache starts over.
const CACHE_ENTRIES: usize = 10_000;
/// Bytes of kept answers (keys included); past it the cache starts over. Clients that
/// randomise the case of names (0x20) make many keys per name; this bounds what they cost.
const CACHE_BYTES: usize = 16 << 20;

/// Encoded UDP answers, keyed by the query datagram without its 2-byte id (so flags,
/// question, case and EDNS all match) and valid for one source revision: a repeated
/// query costs a copy and an id, not a decode, a lookup and an encode. A canary split's
/// answers are kept per outcome, and a query draws its outcome from the split's weights
/// (so the split holds); until every outcome has been seen, queries are answered fresh.
/// Owned by the UDP loop alone, so it needs no lock.
pub struct UdpCache {
    revision: u64,
    entries: HashMap<Box<[u8]>, Kept>,
    /// Bytes held in `entries` (keys and answers).
    bytes: usize,
    /// The datagram being sent, reused so a kept answer costs no allocation.
    out: Vec<u8>,
}

/// The encodings kept for one query: one outcome, or one per outcome of a split.
#[derive(Default)]
struct Kept {
    outcomes: Vec<Outcome>,
    /// The outcomes' chances, `(outcome, weight)` (empty when the answer is not drawn).
    weights: Arc<[(usize, u32)]>,
    /// True when every outcome has all it needs.
    full: bool,
}

/// The encodings kept for one outcome.
#[derive(Default)]
struct Outcome {
    variants: Vec<Vec<u8>>,
    /// True when no more are wanted: one fixed answer, or enough shuffled orders.
    full: bool,
}

impl Kept {
    /// A kept answer: an outcome drawn by the weights, then one of its orders.
    fn pick(&self, rng: &mut fastrand::Rng) -> Option<&[u8]> {
        let outcome = match self.weights.len() {
            0 => self.outcomes.first()?,
            // The split's own draw (the weights are never all zero: such an answer is
            // fixed, not drawn).
            _ => self
                .outcomes
                .get(crate::select::draw(&self.weights, None, rng)?)?,
        };
        outcome
            .variants
            .get(rng.usize(..outcome.variants.len()))
            .map(Vec::as_slice)
    }

    /// Keeps one more encoding of outcome `at` (of `weights.len()`, or the only one);
    /// true if it was wanted.
    fn keep(
        &mut self,
        at: usize,
        weights: Option<&Arc<[(usize, u32)]>>,
        bytes: &[u8],
        shuffled: bool,
    ) -> bool {
        let n = weights.map_or(1, |w| w.len());
        if weights.is_some_and(|w| *w != self.weights) || self.outcomes.len() != n {
            // First seen, or (never within one revision) drawn differently: start over.
            self.weights = weights.cloned().unwrap_or_else(|| Arc::from([]));
            self.outcomes = (0..n).map(|_| Outcome::default()).collect();
        }
        let Some(outcome) = self.outcomes.get_mut(at).filter(|o| !o.full) else {
            return false;
        };
        outcome.variants.push(bytes.to_vec());
        outcome.full = !shuffled || outcome.variants.len() >= SHUFFLED_VARIANTS;
        // An outcome with no chance is never drawn, so it needs nothing kept.
        self.full = self
            .outcomes
            .iter()
            .zip(
                self.weights
                    .iter()
                    .map(|(_, w)| *w)
                    .chain(std::iter::repeat(1)),
            )
            .all(|(o, w)| o.full || w == 0);
        true
    }
}

impl Default for UdpCache {
    fn default() -> Self {
        Self {
            revision: u64::MAX,
            entries: HashMap::new(),
            bytes: 0,
            out: Vec::with_capacity(4096),
        }
    }
}

impl UdpCache {
    /// The answer to `packet`: a kept one with the request's id, or a new one (kept
    /// when it may be reused).
    pub fn answer<S: DnsSource>(
        &mut self,
        handler: &DnsHandler<S>,
        packet: &[u8],
        rng: &mut fastrand::Rng,
    ) -> Option<&[u8]> {
        let revision = handler.source.revision();
        if revision != self.revision {
            self.entries.clear();
            self.bytes = 0;
            self.revision = revision;
        }
        let (id, key) = (packet.get(..2)?, packet.get(2..)?);
        if let Some(kept) = self.entries.get(key).filter(|k| k.full) {
            let bytes = kept.pick(rng)?;
            self.out.clear();
            self.out.extend_from_slice(bytes);
            self.out.get_mut(..2)?.copy_from_slice(id);
            return Some(&self.out);
        }
        let (bytes, vary) = handler.udp_response(packet)?;
        let (at, weights, shuffled) = match &vary {
            Vary::Fixed => (0, None, false),
            Vary::Shuffled => (0, None, true),
            Vary::Drawn {
                outcome,
                weights,
                shuffled,
            } => (*outcome, Some(weights), *shuffled),
            Vary::Never => {
                self.out = bytes;
                return Some(&self.out);
            }
        };
        if bytes.len() >= 2 {
            if (!self.entries.contains_key(key) && self.entries.len() >= CACHE_ENTRIES)
                || self.bytes + key.len() + bytes.len() > CACHE_BYTES
            {
                self.entries.clear();
                self.bytes = 0;
            }
            if !self.entries.contains_key(key) {
                self.bytes += key.len();
            }
            let kept = self.entries.entry(key.into()).or_default();
            if kept.keep(at, weights, &bytes, shuffled) {
                self.bytes += bytes.len();
            }
        }
        self.out = bytes;
        Some(&self.out)
    }
}

pub(super) async fn serve_udp<S: DnsSource>(
    handler: Arc<DnsHandler<S>>,
    socket: UdpSocket,
    shutdown: watch::Receiver<bool>,
) {
    let limiter = RateLimiter::new(handler.rate_limit);
    serve_udp_with(handler, socket, shutdown, limiter).await;
}

/// The UDP loop with a given rate limiter (tests limit loopback sources too).
async fn serve_udp_with<S: DnsSource>(
    handler: Arc<DnsHandler<S>>,
    socket: UdpSocket,
    mut shutdown: watch::Receiver<bool>,
    mut limiter: RateLimiter,
) {
    // Large enough for any EDNS query; longer datagrams are cut and then fail to decode.
    let mut buf = vec![0u8; 4096];
    let mut cache = UdpCache::default();
    let mut rng = fastrand::Rng::new();
    let mut served: u32 = 0;
    loop {
        // Drain what the socket holds without going back to the runtime per datagram;
        // wait (for data or shutdown) only when it is empty.
        let received = match socket.try_recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::select! {
                    biased;
                    r = socket.readable() => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "DNS UDP socket failed; UDP answers stop");
                            return;
                        }
                    }
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
            r => r,
        };
        // A busy socket must not starve Raft, gRPC or shutdown: the runtime gets a turn
        // every so many datagrams, answered or not (a flood of junk counts too).
        served = served.wrapping_add(1);
        if served.is_multiple_of(YIELD_EVERY) {
            tokio::task::yield_now().await;
            if *shutdown.borrow() {
                return;
            }
        }
        let (len, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                // E.g. an ICMP error from an earlier send; the socket itself is fine.
                tracing::debug!(error = %e, "DNS UDP receive failed");
                continue;
            }
        };
        let Some(packet) = buf.get(..len) else {
            continue;
        };
        // Rate-limited responses bypass the cache both ways: a slip is built here and
        // never kept, and a dropped query is not even decoded.
        let slip;
        let response = match limiter.check(peer.ip()) {
            Verdict::Answer => cache.answer(&handler, packet, &mut rng),
            Verdict::Slip => {
                slip = handler.slip_response(packet);
                slip.as_deref()
            }
            Verdict::Drop => None,
        };
        let Some(response) = response else {
            continue;
        };
        let sent = match socket.try_send_to(response, peer) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                socket.send_to(response, peer).await
            }
            r => r,
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, %peer, "DNS UDP answer not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    //! The rate limit end to end: the real UDP loop on 127.0.0.1 with loopback limited
    //! (the default exempts it), hickory's codec on the client side.

    use std::time::Duration;

    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;
    use crate::dns::{DnsConfig, ServiceRecords};
    use crate::model::{Instance, State};

    struct OneService(Arc<ServiceRecords>);

    impl DnsSource for OneService {
        fn service(&self, _: &str, service: &str) -> Option<Arc<ServiceRecords>> {
            (service == "web").then(|| self.0.clone())
        }
        fn revision(&self) -> u64 {
            1
        }
    }

    /// A serving instance of `web` on port 80.
    fn web(id: &str, address: &str, version: &str) -> Arc<Instance> {
        Arc::new(Instance {
            namespace: "default".into(),
            service: "web".into(),
            id: id.into(),
            address: address.into(),
            port: 80,
            version: version.into(),
            labels: Default::default(),
            weight: 100,
            zone: String::new(),
            state: State::Serving,
            mesh_port: 0,
        })
    }

    fn handler() -> DnsHandler<OneService> {
        let web = web("web-1", "10.0.0.1", "1.0.0");
        let source = OneService(Arc::new(ServiceRecords::new(vec![web], None)));
        DnsHandler::new(source, &DnsConfig::default()).expect("handler")
    }

    fn query(id: u16) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        let name = Name::from_ascii("web.service.switchyard.").expect("name");
        m.add_query(Query::query(name, RecordType::A));
        m.to_vec().expect("encode")
    }

    #[tokio::test]
    async fn over_the_rate_a_source_gets_slips_or_nothing_and_slips_are_never_kept() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let (stop, shutdown) = watch::channel(false);
        let rate = 20;
        let serving = tokio::spawn(serve_udp_with(
            Arc::new(handler()),
            server,
            shutdown,
            RateLimiter::with_loopback(rate),
        ));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let sent = 200u16;
        for id in 0..sent {
            client.send_to(&query(id), addr).await.expect("send");
        }
        let (mut answered, mut slipped) = (0u32, 0u32);
        let mut buf = vec![0u8; 4096];
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await
        {
            let m = Message::from_vec(&buf[..n]).expect("decode");
            assert!(m.metadata.id < sent);
            if m.metadata.truncation {
                assert!(
                    m.answers.is_empty() && m.additionals.is_empty(),
                    "a slip is empty"
                );
                assert_eq!(m.queries.len(), 1, "a slip carries the question");
                assert!(n <= query(0).len(), "a slip is no larger than the query");
                slipped += 1;
            } else {
                assert_eq!(m.answers.len(), 1);
                answered += 1;
            }
        }
        // The burst (20), plus what refills while the 200 queries arrive; of the rest,
        // every second one slips.
        assert!(
            (rate..rate + 10).contains(&answered),
            "{answered} answered of {sent}"
        );
        let limited = u32::from(sent).saturating_sub(answered);
        assert!(
            ((limited / 2).saturating_sub(5)..=limited / 2 + 5).contains(&slipped),
            "{slipped} slips of {limited} limited"
        );
        // The bucket refills; the same query (its answer kept by now) is answered whole,
        // not with a kept slip.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for id in 1000..1005u16 {
            client.send_to(&query(id), addr).await.expect("send");
            let (n, _) = tokio::time::timeout(Duration::from_secs(3), client.recv_from(&mut buf))
                .await
                .expect("an answer in time")
                .expect("recv");
            let m = Message::from_vec(&buf[..n]).expect("decode");
            assert_eq!(m.metadata.id, id);
            assert!(!m.metadata.truncation, "refilled: a whole answer");
            assert_eq!(m.answers.len(), 1);
        }
        stop.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(3), serving)
            .await
            .expect("the loop stops")
            .expect("join");
    }

    /// A source with a canary split (stable 1.0.0 ×2 at 80, canary 2.0.0 at 20) that
    /// counts its lookups, so a test can tell a kept answer from a fresh one.
    struct Split {
        records: Arc<ServiceRecords>,
        lookups: std::sync::atomic::AtomicUsize,
    }

    impl DnsSource for Split {
        fn service(&self, _: &str, service: &str) -> Option<Arc<ServiceRecords>> {
            self.lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (service == "web").then(|| self.records.clone())
        }
        fn revision(&self) -> u64 {
            1
        }
    }

    fn split_handler(
        fallback: crate::model::policy::Fallback,
        canary_up: bool,
    ) -> DnsHandler<Split> {
        use crate::model::policy::{Policy, Split as Weighted, Subset};
        let at = web;
        let mut instances = vec![
            at("s-1", "10.0.1.1", "1.0.0"),
            at("s-2", "10.0.1.2", "1.0.0"),
        ];
        if canary_up {
            instances.push(at("c-1", "10.0.2.1", "2.0.0"));
        }
        let subset = |name: &str, version: &str| Subset {
            name: name.into(),
            version: version.into(),
            version_range: String::new(),
            labels: Default::default(),
        };
        let policy = Policy {
            subsets: vec![subset("stable", "1.0.0"), subset("canary", "2.0.0")],
            routes: vec![],
            default_split: vec![
                Weighted {
                    subset: "stable".into(),
                    weight: 80,
                },
                Weighted {
                    subset: "canary".into(),
                    weight: 20,
                },
            ],
            fallback,
            sticky_header: String::new(),
            resilience: Default::default(),
        };
        let records = Arc::new(ServiceRecords::new(instances, Some(Arc::new(policy))));
        let source = Split {
            records,
            lookups: Default::default(),
        };
        DnsHandler::new(source, &DnsConfig::default()).expect("handler")
    }

    /// Answers 2,000 identical queries through the cache: (canary answers, stable
    /// answers, empty answers, lookups made).
    fn draw_through_the_cache(handler: &DnsHandler<Split>) -> (usize, usize, usize, usize) {
        let mut cache = UdpCache::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut canary, mut stable, mut empty) = (0, 0, 0);
        for id in 0..2_000u16 {
            let bytes = cache
                .answer(handler, &query(id), &mut rng)
                .expect("an answer")
                .to_vec();
            let m = Message::from_vec(&bytes).expect("decode");
            assert_eq!(m.metadata.id, id, "the query's own id");
            let mut ips: Vec<String> = m
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_proto::rr::RData::A(a) => Some(a.0.to_string()),
                    _ => None,
                })
                .collect();
            ips.sort();
            match ips.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["10.0.2.1"] => canary += 1,
                ["10.0.1.1", "10.0.1.2"] => stable += 1,
                [] => empty += 1,
                ref other => panic!("an answer mixing subsets: {other:?}"),
            }
        }
        let lookups = handler
            .source
            .lookups
            .load(std::sync::atomic::Ordering::Relaxed);
        (canary, stable, empty, lookups)
    }

    #[test]
    fn a_canary_split_is_kept_per_outcome_and_still_drawn_by_its_weights() {
        let handler = split_handler(crate::model::policy::Fallback::Default, true);
        let (canary, stable, empty, lookups) = draw_through_the_cache(&handler);
        // Binomial(2000, 0.2): sd 17.9; 4 sd either side.
        assert!((328..=472).contains(&canary), "canary {canary} of 2000");
        assert_eq!((canary + stable, empty), (2_000, 0));
        // Kept once both outcomes were seen (the canary once, stable in 8 orders):
        // a few dozen fresh answers, not 2,000.
        assert!(lookups < 100, "{lookups} lookups for 2,000 queries");
    }

    #[test]
    fn a_fail_closed_split_keeps_its_empty_answer_at_the_down_subsets_weight() {
        // The canary has no instance: fail closed answers nothing for its 20 %.
        let handler = split_handler(crate::model::policy::Fallback::Fail, false);
        let (canary, stable, empty, lookups) = draw_through_the_cache(&handler);
        assert_eq!(canary, 0);
        assert!((328..=472).contains(&empty), "empty {empty} of 2000");
        assert_eq!(stable + empty, 2_000);
        assert!(lookups < 100, "{lookups} lookups for 2,000 queries");
        // Fail open instead: the canary's share goes to stable, a fixed answer.
        let handler = split_handler(crate::model::policy::Fallback::Default, false);
        let (canary, stable, empty, lookups) = draw_through_the_cache(&handler);
        assert_eq!((canary, stable, empty), (0, 2_000, 0));
        assert!(lookups < 100, "{lookups} lookups for 2,000 queries");
    }

    #[test]
    fn the_udp_limit_is_the_clients_edns_size_within_512_and_1232() {
        let edns = |size: u16| {
            let mut e = Edns::new();
            e.set_max_payload(size);
            e
        };
        assert_eq!(udp_limit(None), 512);
        assert_eq!(udp_limit(Some(&edns(100))), 512);
        assert_eq!(udp_limit(Some(&edns(1000))), 1000);
        assert_eq!(udp_limit(Some(&edns(4096))), 1232);
        assert_eq!(udp_limit(Some(&edns(65_535))), 1232);
    }
}
