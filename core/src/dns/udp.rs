//! DNS over UDP: one loop that decodes, answers and encodes each datagram in place, and
//! the cache of encoded answers it keeps (RFC 1035 message size, RFC 6891 EDNS).

use std::collections::HashMap;
use std::sync::Arc;

use hickory_proto::op::{Edns, Header, Message, MessageType, ResponseCode};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::answer::{response_metadata, DnsHandler, Vary};
use super::DnsSource;

impl<S: DnsSource> DnsHandler<S> {
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

pub(super) async fn serve_udp<S: DnsSource>(
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
