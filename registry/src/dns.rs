//! The registry's DNS interface (hickory-server): the only module that imports hickory.
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
//!
//! Negative answers follow RFC 2308: NXDOMAIN for unknown names and NOERROR with no
//! answer for known names without that type, both with the zone's SOA in the authority
//! section. Names outside the domain are REFUSED (no recursion). Answers larger than the
//! client's UDP size (512, or its EDNS payload) go back empty with TC set, so clients
//! retry over TCP, which carries the whole answer.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::model::policy::{Policy, Subset};
use crate::model::{Instance, State, DEFAULT_NAMESPACE};
use crate::shared::Shared;

/// Most records in one answer (UDP answers are further bounded by the packet size).
const MAX_ANSWERS: usize = 64;

/// DNS settings of a registry node.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The zone, e.g. `switchyard` for `web.service.switchyard`.
    pub domain: String,
    /// TTL of positive answers and the SOA minimum (negative caching), in seconds.
    pub ttl: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            domain: "switchyard".into(),
            ttl: 5,
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

/// A service as DNS sees it: its instances and its routing policy.
pub type ServiceRecords = (Vec<Arc<Instance>>, Option<Arc<Policy>>);

/// Where answers come from: a registry's applied catalog, or a sidecar's cached copy.
pub trait DnsSource: Send + Sync + Unpin + 'static {
    /// A service's instances and routing policy; `None` when the service is unknown.
    fn service(&self, namespace: &str, service: &str) -> Option<ServiceRecords>;
    /// The catalog revision the answers come from: cached UDP answers are kept only
    /// while it stays the same.
    fn revision(&self) -> u64;
}

/// The registry's own catalog as a DNS source.
pub struct CatalogSource(pub Arc<Shared>);

impl DnsSource for CatalogSource {
    fn service(&self, namespace: &str, service: &str) -> Option<ServiceRecords> {
        let catalog = self.0.catalog.read();
        let policy = catalog.current_policy(namespace, service);
        let instances = catalog.resolve(namespace, service, "");
        (!instances.is_empty() || policy.is_some()).then_some((instances, policy))
    }

    fn revision(&self) -> u64 {
        self.0.catalog.read().revision()
    }
}

/// Answers queries from a [`DnsSource`].
pub struct DnsHandler<S: DnsSource> {
    source: S,
    /// `<domain>` lower-case, without the trailing dot.
    domain: String,
    soa: Record,
    ttl: u32,
}

/// What a query resolves to.
struct Answer {
    code: ResponseCode,
    answers: Vec<Record>,
    additionals: Vec<Record>,
    /// Negative answers carry the SOA (RFC 2308).
    soa: bool,
    vary: Vary,
}

/// How an answer varies between two identical queries at the same revision, which is
/// what decides whether its encoded form may be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vary {
    /// Always the same bytes.
    Fixed,
    /// The same records in a random order: a few orders are kept and served at random.
    Shuffled,
    /// Drawn per query (a canary split): never reused, or the split would freeze.
    Drawn,
}

impl Answer {
    fn refused() -> Self {
        Self {
            code: ResponseCode::Refused,
            answers: Vec::new(),
            additionals: Vec::new(),
            soa: false,
            vary: Vary::Fixed,
        }
    }

    fn nxdomain() -> Self {
        Self {
            code: ResponseCode::NXDomain,
            answers: Vec::new(),
            additionals: Vec::new(),
            soa: true,
            vary: Vary::Fixed,
        }
    }

    fn records(answers: Vec<Record>, additionals: Vec<Record>) -> Self {
        let soa = answers.is_empty();
        Self {
            code: ResponseCode::NoError,
            answers,
            additionals,
            soa,
            vary: Vary::Fixed,
        }
    }
}

/// The labels of a query name below the domain, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Apex,
    Service {
        namespace: &'a str,
        service: &'a str,
        filter: Option<&'a str>,
        srv_form: bool,
    },
    Addr(IpAddr),
    Unknown,
}

fn parse_hex_ip(label: &str) -> Option<IpAddr> {
    match label.len() {
        8 => u32::from_str_radix(label, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(label, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

fn hex_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

/// Splits `labels` (below the domain, leftmost first) into what they name.
fn parse<'a>(labels: &'a [&'a str]) -> Target<'a> {
    // Namespace suffix: ... .<namespace>.ns
    let (labels, namespace) = match labels {
        [rest @ .., ns, "ns"] => (rest, *ns),
        _ => (labels, DEFAULT_NAMESPACE),
    };
    match labels {
        [] => Target::Apex,
        [hex, "addr"] => parse_hex_ip(hex).map_or(Target::Unknown, Target::Addr),
        [svc, "_tcp", "service"] => match svc.strip_prefix('_') {
            Some(service) => Target::Service {
                namespace,
                service,
                filter: None,
                srv_form: true,
            },
            None => Target::Unknown,
        },
        [service, "service"] => Target::Service {
            namespace,
            service,
            filter: None,
            srv_form: false,
        },
        [filter, service, "service"] => Target::Service {
            namespace,
            service,
            filter: Some(filter),
            srv_form: false,
        },
        _ => Target::Unknown,
    }
}

fn subset_selects(s: &Subset, i: &Instance) -> bool {
    let range_ok = if s.version_range.is_empty() {
        true
    } else {
        match (
            semver::VersionReq::parse(&s.version_range),
            semver::Version::parse(&i.version),
        ) {
            (Ok(r), Ok(v)) => r.matches(&v),
            _ => false,
        }
    };
    (s.version.is_empty() || s.version == i.version)
        && range_ok
        && s.labels.iter().all(|(k, v)| i.labels.get(k) == Some(v))
}

/// Whether `name` (a subset of the policy, or else a version tag) selects `i`.
fn selects(policy: Option<&Policy>, name: &str, i: &Instance) -> bool {
    match policy.and_then(|p| p.subsets.iter().find(|s| s.name.eq_ignore_ascii_case(name))) {
        Some(s) => subset_selects(s, i),
        None => i.version.eq_ignore_ascii_case(name),
    }
}

impl<S: DnsSource> DnsHandler<S> {
    pub fn new(source: S, config: &DnsConfig) -> Result<Self, String> {
        let domain = config.domain.to_ascii_lowercase();
        let origin = Name::from_ascii(format!("{domain}.")).map_err(|e| e.to_string())?;
        let mname = Name::from_ascii(format!("ns.{domain}.")).map_err(|e| e.to_string())?;
        let rname = Name::from_ascii(format!("hostmaster.{domain}.")).map_err(|e| e.to_string())?;
        let soa = Record::from_rdata(
            origin,
            config.ttl,
            RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86_400, config.ttl)),
        );
        Ok(Self {
            source,
            domain,
            soa,
            ttl: config.ttl,
        })
    }

    fn name(&self, s: &str) -> Option<Name> {
        Name::from_ascii(format!("{s}.{}.", self.domain)).ok()
    }

    /// The answer to one question. The owner of every record is the query name
    /// lower-cased, taken from the parsed name rather than re-parsed from text.
    fn answer(&self, name: &Name, qtype: RecordType) -> Answer {
        let owner = name.to_lowercase();
        let text = owner.to_ascii();
        let qname = text.trim_end_matches('.');
        let Some(below) = qname
            .strip_suffix(&self.domain)
            .filter(|rest| rest.is_empty() || rest.ends_with('.'))
        else {
            return Answer::refused();
        };
        let below = below.trim_end_matches('.');
        let labels: Vec<&str> = if below.is_empty() {
            Vec::new()
        } else {
            below.split('.').collect()
        };
        match parse(&labels) {
            Target::Unknown => Answer::nxdomain(),
            Target::Apex => match qtype {
                RecordType::SOA => Answer::records(vec![self.soa.clone()], Vec::new()),
                _ => Answer::records(Vec::new(), Vec::new()),
            },
            Target::Addr(ip) => {
                let rdata = match (ip, qtype) {
                    (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(v4))),
                    (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(v6))),
                    _ => None,
                };
                Answer::records(
                    rdata
                        .map(|r| Record::from_rdata(owner.clone(), self.ttl, r))
                        .into_iter()
                        .collect(),
                    Vec::new(),
                )
            }
            Target::Service {
                namespace,
                service,
                filter,
                srv_form,
            } => self.service(owner, namespace, service, filter, srv_form, qtype),
        }
    }

    fn service(
        &self,
        owner: Name,
        namespace: &str,
        service: &str,
        filter: Option<&str>,
        srv_form: bool,
        qtype: RecordType,
    ) -> Answer {
        let Some((all, policy)) = self.source.service(namespace, service) else {
            return Answer::nxdomain();
        };
        let policy = policy.as_deref();
        if let Some(f) = filter {
            let known = policy
                .is_some_and(|p| p.subsets.iter().any(|s| s.name.eq_ignore_ascii_case(f)))
                || all.iter().any(|i| i.version.eq_ignore_ascii_case(f));
            if !known {
                return Answer::nxdomain();
            }
        }
        let serving: Vec<&Instance> = all
            .iter()
            .map(|i| i.as_ref())
            .filter(|i| i.state == State::Serving)
            .filter(|i| filter.is_none_or(|f| selects(policy, f, i)))
            .collect();

        // (instance, weight) pairs, the weight including the split's share.
        let split: Vec<(&str, u32)> = policy
            .filter(|_| filter.is_none())
            .map(|p| {
                p.default_split
                    .iter()
                    .filter(|s| s.weight > 0)
                    .map(|s| (s.subset.as_str(), s.weight))
                    .collect()
            })
            .unwrap_or_default();
        let in_subset = |name: &str| -> Vec<&Instance> {
            serving
                .iter()
                .copied()
                .filter(|i| selects(policy, name, i))
                .collect()
        };
        let mut rng = fastrand::Rng::new();
        match qtype {
            RecordType::SRV => {
                let weighted: Vec<(&Instance, u64)> = if split.is_empty() {
                    serving.iter().map(|i| (*i, u64::from(i.weight))).collect()
                } else {
                    split
                        .iter()
                        .flat_map(|(name, w)| {
                            in_subset(name)
                                .into_iter()
                                .map(move |i| (i, u64::from(*w) * u64::from(i.weight)))
                        })
                        .collect()
                };
                self.srv(owner, weighted)
            }
            RecordType::A | RecordType::AAAA if !srv_form => {
                let mut drawn = false;
                let chosen: Vec<&Instance> = if split.is_empty() {
                    serving.clone()
                } else {
                    // Health-aware: subsets with nothing serving are left out of the draw.
                    let live: Vec<(Vec<&Instance>, u32)> = split
                        .iter()
                        .map(|(name, w)| (in_subset(name), *w))
                        .filter(|(members, _)| !members.is_empty())
                        .collect();
                    let total: u64 = live.iter().map(|(_, w)| u64::from(*w)).sum();
                    drawn = live.len() > 1;
                    if total == 0 {
                        Vec::new()
                    } else {
                        let mut point = rng.u64(..total);
                        let mut pick = Vec::new();
                        for (members, w) in live {
                            if point < u64::from(w) {
                                pick = members;
                                break;
                            }
                            point -= u64::from(w);
                        }
                        pick
                    }
                };
                let mut answer = self.addresses(owner, chosen, qtype, &mut rng);
                if drawn {
                    answer.vary = Vary::Drawn;
                }
                answer
            }
            _ => Answer::records(Vec::new(), Vec::new()),
        }
    }

    fn addresses(
        &self,
        owner: Name,
        mut chosen: Vec<&Instance>,
        qtype: RecordType,
        rng: &mut fastrand::Rng,
    ) -> Answer {
        rng.shuffle(&mut chosen);
        let vary = if chosen.len() > 1 {
            Vary::Shuffled
        } else {
            Vary::Fixed
        };
        let mut answers = Vec::new();
        let mut hostnames = Vec::new();
        for i in chosen.iter().take(MAX_ANSWERS * 4) {
            match (i.address.parse::<IpAddr>(), qtype) {
                (Ok(IpAddr::V4(v4)), RecordType::A) => answers.push(RData::A(A(v4))),
                (Ok(IpAddr::V6(v6)), RecordType::AAAA) => answers.push(RData::AAAA(AAAA(v6))),
                (Ok(_), _) => {}
                (Err(_), _) => hostnames.push(i.address.as_str()),
            }
        }
        answers.dedup();
        if answers.is_empty() {
            // Instances registered by hostname: one CNAME (a name has at most one).
            if let Some(target) = hostnames
                .first()
                .and_then(|h| Name::from_ascii(format!("{}.", h.trim_end_matches('.'))).ok())
            {
                // One of several hostnames, picked by the shuffle: kept like a shuffle.
                return Answer {
                    vary,
                    ..Answer::records(
                        vec![Record::from_rdata(
                            owner,
                            self.ttl,
                            RData::CNAME(CNAME(target)),
                        )],
                        Vec::new(),
                    )
                };
            }
        }
        Answer {
            vary,
            ..Answer::records(
                answers
                    .into_iter()
                    .take(MAX_ANSWERS)
                    .map(|r| Record::from_rdata(owner.clone(), self.ttl, r))
                    .collect(),
                Vec::new(),
            )
        }
    }

    /// RFC 2782: priority 1 for all; weight 0-65535 scaled from the effective weights.
    fn srv(&self, owner: Name, weighted: Vec<(&Instance, u64)>) -> Answer {
        let max = weighted.iter().map(|(_, w)| *w).max().unwrap_or(1).max(1);
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        for (i, w) in weighted.into_iter().take(MAX_ANSWERS) {
            let weight = u16::try_from((w * 65_535 / max).max(1)).unwrap_or(u16::MAX);
            let target = match i.address.parse::<IpAddr>() {
                Ok(ip) => {
                    let Some(name) = self.name(&format!("{}.addr", hex_ip(ip))) else {
                        continue;
                    };
                    let rdata = match ip {
                        IpAddr::V4(v4) => RData::A(A(v4)),
                        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                    };
                    additionals.push(Record::from_rdata(name.clone(), self.ttl, rdata));
                    name
                }
                Err(_) => match Name::from_ascii(format!("{}.", i.address.trim_end_matches('.'))) {
                    Ok(n) => n,
                    Err(_) => continue,
                },
            };
            answers.push(Record::from_rdata(
                owner.clone(),
                self.ttl,
                RData::SRV(SRV::new(1, weight, i.port, target)),
            ));
        }
        Answer::records(answers, additionals)
    }
}

#[tonic::async_trait]
impl<S: DnsSource> RequestHandler for DnsHandler<S> {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        if request.edns.is_some() {
            builder.edns(&edns);
        }
        let queries = request.queries.queries();
        let first = queries
            .first()
            .map(|q| (q.original().name(), q.query_type()));
        let answer = self.outcome(&request.metadata, queries.len(), first);
        let metadata = response_metadata(&request.metadata, &answer);
        let soa: Vec<&Record> = if answer.soa {
            vec![&self.soa]
        } else {
            Vec::new()
        };
        let response = builder.build(
            metadata,
            answer.answers.iter(),
            std::iter::empty(),
            soa,
            answer.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "DNS response not sent");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_server::proto::op::Header {
                    metadata,
                    counts: Default::default(),
                })
            }
        }
    }
}

impl<S: DnsSource> DnsHandler<S> {
    /// The answer to a request's question section, or the error code when the request
    /// is no plain query with exactly one question.
    fn outcome(
        &self,
        request: &Metadata,
        question_count: usize,
        first: Option<(&Name, RecordType)>,
    ) -> Answer {
        if request.message_type != MessageType::Query || request.op_code != OpCode::Query {
            return Answer {
                code: ResponseCode::NotImp,
                ..Answer::refused()
            };
        }
        match first {
            Some((name, qtype)) if question_count == 1 => self.answer(name, qtype),
            _ => Answer {
                code: ResponseCode::FormErr,
                ..Answer::refused()
            },
        }
    }

    /// The whole UDP exchange for one datagram: decode (hickory-proto), answer, encode,
    /// and truncate with TC when the answer exceeds what the client can take (512 bytes,
    /// or its EDNS payload size). `None`: nothing to send back, e.g. the datagram was
    /// itself a response, which must never be answered (no reflection loops).
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
                    .map(|bytes| (bytes, Vary::Drawn));
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let first = request.queries.first().map(|q| (q.name(), q.query_type()));
        let answer = self.outcome(&request.metadata, request.queries.len(), first);
        let vary = answer.vary;
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata = response_metadata(&request.metadata, &answer);
        let limit = match &request.edns {
            Some(edns) => {
                let mut ours = Edns::new();
                ours.set_max_payload(EDNS_PAYLOAD);
                response.edns = Some(ours);
                usize::from(edns.max_payload()).max(PLAIN_UDP_PAYLOAD)
            }
            None => PLAIN_UDP_PAYLOAD,
        };
        response.queries = request.queries;
        if answer.soa {
            response.authorities.push(self.soa.clone());
        }
        response.answers = answer.answers;
        response.additionals = answer.additionals;
        let bytes = response.to_vec().ok()?;
        if bytes.len() <= limit {
            Some((bytes, vary))
        } else {
            response.truncate().to_vec().ok().map(|b| (b, vary))
        }
    }
}

/// Largest UDP answer for a client that sent no EDNS (RFC 1035).
const PLAIN_UDP_PAYLOAD: usize = 512;
/// The UDP payload size this server advertises (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

fn response_metadata(request: &Metadata, answer: &Answer) -> Metadata {
    let mut metadata = Metadata::response_from_request(request);
    metadata.authoritative = answer.code != ResponseCode::Refused;
    metadata.recursion_available = false;
    metadata.response_code = answer.code;
    metadata
}

/// Lets hickory-server (TCP) and the UDP loop share one handler.
struct SharedHandler<S: DnsSource>(Arc<DnsHandler<S>>);

#[tonic::async_trait]
impl<S: DnsSource> RequestHandler for SharedHandler<S> {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.0
            .handle_request::<R, T>(request, response_handle)
            .await
    }
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
    mut shutdown: watch::Receiver<bool>,
) {
    let handler = Arc::new(handler);
    let udp_loop = tokio::spawn(serve_udp(handler.clone(), udp, shutdown.clone()));
    let mut server = Server::new(SharedHandler(handler));
    server.register_listener(tcp, Duration::from_secs(5), 64);
    let _ = shutdown.wait_for(|s| *s).await;
    if let Err(e) = server.shutdown_gracefully().await {
        tracing::debug!(error = %e, "DNS server stopped with an error");
    }
    let _ = udp_loop.await;
}

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
/// query costs a copy and an id, not a decode, a lookup and an encode. Canary-split
/// answers are never kept. Owned by the UDP loop alone, so it needs no lock.
pub struct UdpCache {
    revision: u64,
    entries: HashMap<Box<[u8]>, Kept>,
    /// Bytes held in `entries` (keys and answers).
    bytes: usize,
    /// The datagram being sent, reused so a kept answer costs no allocation.
    out: Vec<u8>,
}

/// The encodings kept for one query.
#[derive(Default)]
struct Kept {
    variants: Vec<Vec<u8>>,
    /// True when no more are wanted: one fixed answer, or enough shuffled orders.
    full: bool,
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
            let bytes = kept.variants.get(rng.usize(..kept.variants.len()))?;
            self.out.clear();
            self.out.extend_from_slice(bytes);
            self.out.get_mut(..2)?.copy_from_slice(id);
            return Some(&self.out);
        }
        let (bytes, vary) = handler.udp_response(packet)?;
        if vary != Vary::Drawn && bytes.len() >= 2 {
            if (!self.entries.contains_key(key) && self.entries.len() >= CACHE_ENTRIES)
                || self.bytes + key.len() + bytes.len() > CACHE_BYTES
            {
                self.entries.clear();
                self.bytes = 0;
            }
            if !self.entries.contains_key(key) {
                self.bytes += key.len();
            }
            self.bytes += bytes.len();
            let kept = self.entries.entry(key.into()).or_default();
            kept.variants.push(bytes.clone());
            kept.full = vary == Vary::Fixed || kept.variants.len() >= SHUFFLED_VARIANTS;
        }
        self.out = bytes;
        Some(&self.out)
    }
}

async fn serve_udp<S: DnsSource>(
    handler: Arc<DnsHandler<S>>,
    socket: UdpSocket,
    mut shutdown: watch::Receiver<bool>,
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
        let Some(response) = buf
            .get(..len)
            .and_then(|p| cache.answer(&handler, p, &mut rng))
        else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_into_targets() {
        assert_eq!(parse(&[]), Target::Apex);
        assert_eq!(
            parse(&["web", "service"]),
            Target::Service {
                namespace: "default",
                service: "web",
                filter: None,
                srv_form: false
            }
        );
        assert_eq!(
            parse(&["canary", "web", "service"]),
            Target::Service {
                namespace: "default",
                service: "web",
                filter: Some("canary"),
                srv_form: false
            }
        );
        assert_eq!(
            parse(&["_web", "_tcp", "service"]),
            Target::Service {
                namespace: "default",
                service: "web",
                filter: None,
                srv_form: true
            }
        );
        assert_eq!(
            parse(&["web", "service", "staging", "ns"]),
            Target::Service {
                namespace: "staging",
                service: "web",
                filter: None,
                srv_form: false
            }
        );
        assert_eq!(
            parse(&["7f000001", "addr"]),
            Target::Addr("127.0.0.1".parse().expect("ip"))
        );
        assert_eq!(parse(&["web"]), Target::Unknown);
        assert_eq!(parse(&["web", "_tcp", "service"]), Target::Unknown);
        assert_eq!(hex_ip("::1".parse().expect("ip")), format!("{:032x}", 1));
    }
}
