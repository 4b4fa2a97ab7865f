//! DNS queries over UDP and TCP, encoded and decoded with hickory-proto's message codec.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long a server may take to answer one query.
const ANSWER: Duration = Duration::from_secs(3);

/// A query for `name` (absolute, e.g. `web.service.switchyard.`) of type `rtype`.
pub fn query(name: &str, rtype: RecordType, id: u16) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    m
}

/// Sends `msg` in one datagram and decodes the answer.
pub async fn udp(addr: SocketAddr, msg: &Message) -> Message {
    udp_sized(addr, msg).await.1
}

/// Sends `msg` in one datagram; the answer and its size on the wire.
pub async fn udp_sized(addr: SocketAddr, msg: &Message) -> (usize, Message) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(&msg.to_vec().expect("encode"), addr)
        .await
        .expect("send");
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(ANSWER, sock.recv_from(&mut buf))
        .await
        .expect("an answer in time")
        .expect("recv");
    (n, Message::from_vec(&buf[..n]).expect("decode"))
}

/// `m` with an EDNS OPT record of this payload size and version.
pub fn with_edns(mut m: Message, payload: u16, version: u8) -> Message {
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(payload);
    edns.set_version(version);
    m.set_edns(edns);
    m
}

/// Sends `msg` over TCP (two-byte length prefix, RFC 1035 4.2.2) and decodes the answer.
pub async fn tcp(addr: SocketAddr, msg: &Message) -> Message {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let bytes = msg.to_vec().expect("encode");
    s.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .expect("len");
    s.write_all(&bytes).await.expect("write");
    let mut len = [0u8; 2];
    tokio::time::timeout(ANSWER, s.read_exact(&mut len))
        .await
        .expect("in time")
        .expect("read");
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.expect("read");
    Message::from_vec(&buf).expect("decode")
}

/// One query over UDP: `name` of type `rtype`.
pub async fn ask(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    udp(addr, &query(name, rtype, 7)).await
}

/// The addresses of the A and AAAA answers, sorted.
pub fn ips(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// The ports of the SRV answers, in answer order.
pub fn srv_ports(m: &Message) -> Vec<u16> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect()
}
