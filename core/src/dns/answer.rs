//! What a query name answers: A/AAAA, SRV (RFC 2782), CNAME for hostnames, and negative
//! answers with the zone's SOA (RFC 2308). Which instances a subset or split selects is
//! decided by [`crate::select`], the code the proxy uses too.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::name::{hex_ip, parse, QueryName};
use super::{DnsConfig, DnsSource};
use crate::model::{Instance, State};
use crate::select::{choose, Selection, Selector};

/// Most records in one answer (UDP answers are further bounded by the packet size).
const MAX_ANSWERS: usize = 64;

/// Answers queries from a [`DnsSource`].
pub struct DnsHandler<S: DnsSource> {
    pub(super) source: S,
    /// `<domain>` lower-case, without the trailing dot.
    domain: String,
    pub(super) soa: Record,
    ttl: u32,
    /// [`DnsConfig::rate_limit`], applied by the UDP loop.
    pub(super) rate_limit: u32,
}

/// What a query resolves to.
pub(super) struct Answer {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
    /// Negative answers carry the SOA (RFC 2308).
    pub soa: bool,
    pub vary: Vary,
}

/// How an answer varies between two identical queries at the same revision, which is
/// what decides whether its encoded form may be reused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vary {
    /// Always the same bytes.
    Fixed,
    /// The same records in a random order: a few orders are kept and served at random.
    Shuffled,
    /// One outcome of a weighted draw (a canary split): outcome `outcome` of
    /// `weights.len()`, entry `i` being `(i, its weight)`, the form
    /// [`crate::select::draw`] takes. The cache keeps the answers of every outcome and
    /// draws one per query with `draw` over the same weights, so the split holds
    /// without a lookup per query; `shuffled`: the outcome's records come in a random
    /// order too.
    Drawn {
        outcome: usize,
        weights: Arc<[(usize, u32)]>,
        shuffled: bool,
    },
    /// Never reused (an error made for one malformed datagram).
    Never,
}

impl Answer {
    pub fn refused() -> Self {
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
            rate_limit: config.rate_limit,
        })
    }

    fn name(&self, s: &str) -> Option<Name> {
        Name::from_ascii(format!("{s}.{}.", self.domain)).ok()
    }

    /// The answer to a request's question section, or the error code when the request
    /// is no plain query with exactly one question. `edns_version` is the version of the
    /// request's OPT record, if it has one.
    pub(super) fn outcome(
        &self,
        request: &Metadata,
        question_count: usize,
        first: Option<(&Name, RecordType)>,
        edns_version: Option<u8>,
    ) -> Answer {
        // RFC 6891 §6.1.3: only EDNS version 0 is implemented; a higher one gets BADVERS
        // (extended RCODE 16, carried in the response's OPT record) before anything else.
        if edns_version.is_some_and(|v| v > 0) {
            return Answer {
                code: ResponseCode::BADVERS,
                ..Answer::refused()
            };
        }
        if request.message_type != MessageType::Query || request.op_code != OpCode::Query {
            return Answer {
                code: ResponseCode::NotImp,
                ..Answer::refused()
            };
        }
        match first {
            // No zone transfers, over UDP or TCP: the zone is the live catalog, not a zone
            // to copy. RFC 5936 §2.2.1 lets a server refuse a transfer for policy reasons
            // with REFUSED (what BIND answers when allow-transfer denies the client), and
            // §4.2 leaves AXFR over UDP undefined; IXFR (RFC 1995) is refused alike.
            Some((_, RecordType::AXFR | RecordType::IXFR)) if question_count == 1 => {
                Answer::refused()
            }
            Some((name, qtype)) if question_count == 1 => self.answer(name, qtype),
            _ => Answer {
                code: ResponseCode::FormErr,
                ..Answer::refused()
            },
        }
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
            QueryName::Unknown => Answer::nxdomain(),
            QueryName::Apex => match qtype {
                RecordType::SOA => Answer::records(vec![self.soa.clone()], Vec::new()),
                _ => Answer::records(Vec::new(), Vec::new()),
            },
            QueryName::Addr(ip) => {
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
            QueryName::Service {
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
        if !self.source.may_read(namespace, service) {
            return Answer::refused();
        }
        let Some(records) = self.source.service(namespace, service) else {
            return Answer::nxdomain();
        };
        let empty = Selection::default();
        let selection = records.selection.as_ref().unwrap_or(&empty);
        // A filter label names a declared subset, or else a version tag some instance has.
        let filter = match filter {
            None => None,
            Some(f) => {
                let declared = selection
                    .find(f)
                    .is_some_and(|i| selection.subsets[i].declared);
                let selector = selection.selector_for(f);
                if !declared
                    && !records
                        .instances
                        .iter()
                        .any(|i| selector.selects_instance(i))
                {
                    return Answer::nxdomain();
                }
                Some(selector)
            }
        };
        let serving: Vec<&Instance> = records
            .instances
            .iter()
            .map(|i| i.as_ref())
            .filter(|i| i.state == State::Serving)
            .filter(|i| filter.as_ref().is_none_or(|f| f.selects_instance(i)))
            .collect();
        // The default split applies to the plain name only (a filter picks one subset).
        let split = (filter.is_none() && !selection.default.entries.is_empty())
            .then_some(&selection.default);
        let members = |index: usize| -> Vec<&Instance> {
            let selector: &Selector = &selection.subsets[index].selector;
            serving
                .iter()
                .copied()
                .filter(|i| selector.selects_instance(i))
                .collect()
        };
        let mut rng = fastrand::Rng::new();
        match qtype {
            RecordType::SRV => {
                // (instance, weight) pairs, the weight including the split's share.
                let weighted: Vec<(&Instance, u64)> = match split {
                    None => serving.iter().map(|i| (*i, u64::from(i.weight))).collect(),
                    Some(split) => split
                        .entries
                        .iter()
                        .flat_map(|&(index, w)| {
                            members(index)
                                .into_iter()
                                .map(move |i| (i, u64::from(w) * u64::from(i.weight)))
                        })
                        .collect(),
                };
                self.srv(owner, weighted)
            }
            RecordType::A | RecordType::AAAA if !srv_form => {
                let Some(split) = split else {
                    return self.addresses(owner, serving, qtype, &mut rng);
                };
                // Health-aware, as in the proxy: a subset with nothing serving gives its
                // share to the others (or, with fallback = fail, answers nothing).
                // Each subset's serving members, selected once per query.
                let mut groups: Vec<(usize, u32, Vec<&Instance>)> = split
                    .entries
                    .iter()
                    .map(|&(i, w)| (i, w, members(i)))
                    .filter(|(_, _, m)| !m.is_empty())
                    .collect();
                let live = groups.len();
                let varies =
                    live > 1 || (selection.fail_closed && live > 0 && live < split.entries.len());
                // The outcomes and their chances, as `choose` draws them: a subset with
                // members gets its weight; the ones without either pass their share on
                // (fail open: the live weights alone) or answer nothing (fail closed:
                // one more outcome, the empty answer, with their weight together).
                // (At most MAX_SUBSETS weights of at most MAX_SPLIT_WEIGHT: a sum fits.)
                let mut weights: Vec<(usize, u32)> = groups
                    .iter()
                    .enumerate()
                    .map(|(i, (_, w, _))| (i, *w))
                    .collect();
                if selection.fail_closed {
                    let live_weight: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
                    let all: u64 = split.entries.iter().map(|(_, w)| u64::from(*w)).sum();
                    let down = u32::try_from(all.saturating_sub(live_weight)).unwrap_or(u32::MAX);
                    weights.push((weights.len(), down));
                }
                let at = choose(split, None, &mut rng, selection.fail_closed, |i| {
                    groups.iter().any(|(g, _, _)| *g == i)
                })
                .ok()
                .and_then(|c| groups.iter().position(|(g, _, _)| *g == c.subset));
                let outcome = at.unwrap_or(live);
                let chosen = at.map(|at| groups.swap_remove(at).2).unwrap_or_default();
                let mut answer = self.addresses(owner, chosen, qtype, &mut rng);
                // Zero weights everywhere: `choose` draws nothing, the answer is fixed.
                if varies && weights.iter().any(|(_, w)| *w > 0) && outcome < weights.len() {
                    answer.vary = Vary::Drawn {
                        outcome,
                        shuffled: answer.vary == Vary::Shuffled,
                        weights: weights.into(),
                    };
                }
                answer
            }
            // Other types, ANY included, have no records here: NODATA. RFC 8482 lets ANY
            // get less than every RRset; this ~100-byte answer amplifies nothing.
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

/// The header of a response to `request` carrying `answer`'s code.
pub(super) fn response_metadata(request: &Metadata, answer: &Answer) -> Metadata {
    let mut metadata = Metadata::response_from_request(request);
    metadata.authoritative = !matches!(answer.code, ResponseCode::Refused | ResponseCode::BADVERS);
    metadata.recursion_available = false;
    metadata.response_code = answer.code;
    metadata
}
