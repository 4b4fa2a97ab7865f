//! DNS with a real registry and hickory's own message codec over real UDP and TCP
//! sockets: names, record types, negative answers, the canary split, truncation, and
//! garbage that must not stall the server.

use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use switchyard_proto::v1 as pb;
use switchyard_testkit::dns::{ips, query, tcp, udp, udp_sized, with_edns};
use switchyard_testkit::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

async fn reg(
    client: &mut switchyard_proto::v1::registry_client::RegistryClient<tonic::transport::Channel>,
    id: &str,
    address: &str,
    port: u32,
    version: &str,
) {
    let mut i = instance("web", id, version);
    i.address = address.into();
    i.port = port;
    register(client, i, 60).await;
}

#[tokio::test]
async fn names_types_and_negative_answers() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    reg(&mut client, "web-1", "10.0.0.1", 8080, "1.0.0").await;
    reg(&mut client, "web-2", "10.0.0.2", 8081, "2.0.0").await;
    reg(&mut client, "web-6", "fd00::6", 8082, "2.0.0").await;
    let mut staging = instance("api", "api-1", "1.0.0");
    staging.namespace = "staging".into();
    staging.address = "10.9.9.9".into();
    register(&mut client, staging, 60).await;

    let a = udp(dns, &query("web.service.switchyard.", RecordType::A, 1)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(ips(&a), vec!["10.0.0.1", "10.0.0.2"]);
    assert_eq!(a.answers[0].ttl, 5);
    let aaaa = udp(dns, &query("web.service.switchyard.", RecordType::AAAA, 2)).await;
    assert_eq!(ips(&aaaa), vec!["fd00::6"]);
    // Case-insensitive, and TCP answers the same.
    let upper = tcp(dns, &query("WEB.Service.SwitchYard.", RecordType::A, 3)).await;
    assert_eq!(ips(&upper), vec!["10.0.0.1", "10.0.0.2"]);
    // Version filter.
    let v2 = udp(
        dns,
        &query("2.0.0.web.service.switchyard.", RecordType::A, 4),
    )
    .await;
    assert_eq!(
        v2.metadata.response_code,
        ResponseCode::NXDomain,
        "2.0.0 has dots: not one label"
    );
    let v1 = udp(
        dns,
        &query("canary.web.service.switchyard.", RecordType::A, 5),
    )
    .await;
    assert_eq!(
        v1.metadata.response_code,
        ResponseCode::NXDomain,
        "no such version or subset"
    );
    // SRV, both forms, with resolvable targets in the additional section.
    for name in ["_web._tcp.service.switchyard.", "web.service.switchyard."] {
        let srv = udp(dns, &query(name, RecordType::SRV, 6)).await;
        assert_eq!(srv.answers.len(), 3, "{name}");
        for rec in &srv.answers {
            let RData::SRV(s) = &rec.data else {
                panic!("SRV expected")
            };
            assert!([8080, 8081, 8082].contains(&s.port));
            assert!(
                srv.additionals.iter().any(|a| a.name == s.target),
                "target {} resolvable",
                &s.target
            );
        }
        let target = match &srv.answers[0].data {
            RData::SRV(s) => s.target.clone(),
            _ => unreachable!(),
        };
        let addr_type = if srv
            .additionals
            .iter()
            .any(|a| a.name == target && a.record_type() == RecordType::AAAA)
        {
            RecordType::AAAA
        } else {
            RecordType::A
        };
        let resolved = udp(dns, &query(&target.to_ascii(), addr_type, 7)).await;
        assert_eq!(resolved.answers.len(), 1, "{target} resolves");
    }
    // Other namespaces.
    let ns = udp(
        dns,
        &query("api.service.staging.ns.switchyard.", RecordType::A, 8),
    )
    .await;
    assert_eq!(ips(&ns), vec!["10.9.9.9"]);
    // NODATA: a known name without that type → NOERROR, no answer, SOA in authority.
    let nodata = udp(dns, &query("web.service.switchyard.", RecordType::MX, 9)).await;
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert_eq!(
        nodata.authorities.first().map(|r| r.record_type()),
        Some(RecordType::SOA)
    );
    // NXDOMAIN with SOA.
    let nx = udp(dns, &query("nosuch.service.switchyard.", RecordType::A, 10)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        nx.authorities.first().map(|r| r.record_type()),
        Some(RecordType::SOA)
    );
    // REFUSED outside the domain: no recursion.
    let refused = udp(dns, &query("example.com.", RecordType::A, 11)).await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(!refused.metadata.recursion_available);
    // Draining instances are not answered.
    client
        .set_state(pb::SetStateRequest {
            namespace: String::new(),
            id: "web-1".into(),
            state: pb::State::Draining as i32,
        })
        .await
        .expect("drain");
    let a = udp(dns, &query("web.service.switchyard.", RecordType::A, 12)).await;
    assert_eq!(ips(&a), vec!["10.0.0.2"]);
    r.handle.shutdown().await;
}

#[tokio::test]
async fn hostnames_answer_with_cname_and_versions_filter() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    reg(&mut client, "db-1", "db-1.internal.example", 5432, "canary").await;
    let a = udp(dns, &query("web.service.switchyard.", RecordType::A, 1)).await;
    assert_eq!(a.answers.len(), 1);
    assert!(
        matches!(&a.answers[0].data, RData::CNAME(c) if c.0.to_ascii() == "db-1.internal.example.")
    );
    let v = udp(
        dns,
        &query("canary.web.service.switchyard.", RecordType::A, 2),
    )
    .await;
    assert_eq!(
        v.metadata.response_code,
        ResponseCode::NoError,
        "a version tag that is a DNS label"
    );
    assert_eq!(v.answers.len(), 1);
    r.handle.shutdown().await;
}

#[tokio::test]
async fn dns_follows_the_canary_split() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    reg(&mut client, "s-1", "10.0.1.1", 80, "1.0.0").await;
    reg(&mut client, "s-2", "10.0.1.2", 80, "1.0.0").await;
    reg(&mut client, "c-1", "10.0.2.1", 80, "2.0.0").await;
    let mut routing = r.routing().await;
    let split = |e: &[(&str, u32)]| {
        e.iter()
            .map(|(s, w)| pb::WeightedSubset {
                subset: s.to_string(),
                weight: *w,
            })
            .collect()
    };
    routing
        .put_policy(pb::PutPolicyRequest {
            namespace: String::new(),
            service: "web".into(),
            policy: Some(pb::Policy {
                subsets: vec![
                    proto::subset("stable", "1.0.0"),
                    proto::subset("canary", "2.0.0"),
                ],
                default_split: split(&[("stable", 80), ("canary", 20)]),
                ..Default::default()
            }),
        })
        .await
        .expect("policy");
    let mut canary = 0;
    const N: u16 = 1_000;
    for id in 0..N {
        let a = udp(dns, &query("web.service.switchyard.", RecordType::A, id)).await;
        let got = ips(&a);
        if got == vec!["10.0.2.1"] {
            canary += 1;
        } else {
            assert_eq!(
                got,
                vec!["10.0.1.1", "10.0.1.2"],
                "an answer holds one subset"
            );
        }
    }
    // Binomial(1000, 0.2): sd 12.6; 4 sd either side.
    assert!(
        (150..=250).contains(&canary),
        "canary answered {canary} of {N}"
    );
    // Subset names resolve too, and SRV weights are split weight × instance weight.
    let sub = udp(
        dns,
        &query("canary.web.service.switchyard.", RecordType::A, 1),
    )
    .await;
    assert_eq!(ips(&sub), vec!["10.0.2.1"]);
    let srv = udp(
        dns,
        &query("_web._tcp.service.switchyard.", RecordType::SRV, 2),
    )
    .await;
    let weight_of = |ip_hex: &str| {
        srv.answers
            .iter()
            .find_map(|r| match &r.data {
                RData::SRV(s) if s.target.to_ascii().starts_with(ip_hex) => Some(s.weight),
                _ => None,
            })
            .expect("srv for target")
    };
    let (stable_w, canary_w) = (weight_of("0a000101"), weight_of("0a000201"));
    assert_eq!(stable_w, 65_535);
    assert!(
        (16_000..=16_500).contains(&canary_w),
        "canary SRV weight {canary_w} ≈ 1/4 of stable's"
    );
    r.handle.shutdown().await;
}

#[tokio::test]
async fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    for n in 0..60u32 {
        reg(
            &mut client,
            &format!("web-{n}"),
            &format!("fd00::{:x}", n + 1),
            8000 + n,
            "1.0.0",
        )
        .await;
    }
    let small = udp(dns, &query("web.service.switchyard.", RecordType::AAAA, 1)).await;
    assert!(
        small.metadata.truncation,
        "60 AAAA records do not fit 512 bytes"
    );
    let whole = tcp(dns, &query("web.service.switchyard.", RecordType::AAAA, 2)).await;
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 60);
    // With EDNS0 a larger UDP answer fits.
    let mut big = query("web.service.switchyard.", RecordType::AAAA, 3);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    big.set_edns(edns);
    let edns_answer = udp(dns, &big).await;
    assert!(edns_answer.answers.len() > small.answers.len());
    r.handle.shutdown().await;
}

#[tokio::test]
async fn malformed_packets_never_crash_or_stall_the_server() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    reg(&mut client, "web-1", "10.0.0.1", 80, "1.0.0").await;
    let valid = query("web.service.switchyard.", RecordType::A, 7)
        .to_vec()
        .expect("encode");
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut rng = fastrand::Rng::with_seed(2026);
    // 2,000 random and truncated packets (bounded count), then a valid query must work.
    for n in 0..2_000usize {
        let packet: Vec<u8> = if n % 2 == 0 {
            let len = rng.usize(0..600);
            (0..len).map(|_| rng.u8(..)).collect()
        } else {
            let mut p = valid[..rng.usize(0..valid.len())].to_vec();
            if !p.is_empty() && rng.bool() {
                let i = rng.usize(..p.len());
                p[i] = rng.u8(..);
            }
            p
        };
        let _ = sock.send_to(&packet, dns).await;
    }
    // Garbage over TCP too: a length prefix promising more than is sent, then close.
    let mut s = TcpStream::connect(dns).await.expect("connect");
    s.write_all(&[0xff, 0xff, 1, 2, 3]).await.expect("write");
    drop(s);
    let a = udp(dns, &query("web.service.switchyard.", RecordType::A, 9)).await;
    assert_eq!(ips(&a), vec!["10.0.0.1"]);
    let t = tcp(dns, &query("web.service.switchyard.", RecordType::A, 10)).await;
    assert_eq!(ips(&t), vec!["10.0.0.1"]);
    r.handle.shutdown().await;
}

/// The UDP loop answers queries only: a datagram that is itself a response gets nothing
/// back (no reflection loops between two servers), and a query whose header reads but
/// whose body does not gets FORMERR with its id instead of a client-side timeout.
#[tokio::test]
async fn responses_are_never_answered_and_unreadable_queries_get_formerr() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut buf = vec![0u8; 4096];

    let mut response = query("web.service.switchyard.", RecordType::A, 11);
    response.metadata.message_type = MessageType::Response;
    sock.send_to(&response.to_vec().expect("encode"), dns)
        .await
        .expect("send");
    let silent = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await;
    assert!(silent.is_err(), "a response datagram must not be answered");

    // A valid header announcing one question, followed by a cut-off name.
    let mut cut = query("web.service.switchyard.", RecordType::A, 4242)
        .to_vec()
        .expect("encode");
    cut.truncate(16);
    sock.send_to(&cut, dns).await.expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .expect("FORMERR in time")
        .expect("recv");
    let answer = Message::from_vec(&buf[..n]).expect("decode");
    assert_eq!(answer.metadata.id, 4242);
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(answer.metadata.message_type, MessageType::Response);
    r.handle.shutdown().await;
}

/// Repeated queries are answered from kept encodings: each answer carries its own
/// query's id, shuffled answers still vary in order, and a catalog change shows at once.
#[tokio::test]
async fn repeated_queries_get_their_own_ids_and_fresh_data_after_a_change() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    for n in 1..=4u32 {
        reg(
            &mut client,
            &format!("web-{n}"),
            &format!("10.0.0.{n}"),
            80,
            "1.0.0",
        )
        .await;
    }
    let mut firsts = std::collections::BTreeSet::new();
    for id in 0..200u16 {
        let a = udp(
            dns,
            &query("web.service.switchyard.", RecordType::A, 1000 + id),
        )
        .await;
        assert_eq!(
            a.metadata.id,
            1000 + id,
            "the answer carries the query's id"
        );
        assert_eq!(ips(&a).len(), 4);
        if let Some(RData::A(first)) = a.answers.first().map(|r| &r.data) {
            firsts.insert(first.0.to_string());
        }
    }
    assert!(
        firsts.len() > 1,
        "answers keep varying in order: {firsts:?}"
    );
    reg(&mut client, "web-5", "10.0.0.5", 80, "1.0.0").await;
    let a = udp(dns, &query("web.service.switchyard.", RecordType::A, 7)).await;
    assert_eq!(ips(&a).len(), 5, "a registration shows in the next answer");
    r.handle.shutdown().await;
}

/// Point 13 of issue 13, truncation: an answer too large for UDP keeps the whole records
/// that fit (TC set, the client may retry over TCP) instead of coming back empty; the UDP
/// size is the client's EDNS size within 512..=1232; dropped additional records alone
/// never set TC (RFC 2181 §9).
#[tokio::test]
async fn truncated_answers_keep_the_records_that_fit_within_512_to_1232_bytes() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    for n in 0..60u32 {
        reg(
            &mut client,
            &format!("web-{n}"),
            &format!("fd00::{:x}", n + 1),
            8000 + n,
            "1.0.0",
        )
        .await;
    }
    for n in 0..8u32 {
        let mut i = instance("api", &format!("api-{n}"), "1.0.0");
        i.address = format!("10.0.3.{}", n + 1);
        register(&mut client, i, 60).await;
    }
    let registered: Vec<String> = (1..=60).map(|n| format!("fd00::{n:x}")).collect();
    let aaaa = || query("web.service.switchyard.", RecordType::AAAA, 1);
    let check = |(size, m): &(usize, Message), limit: usize| {
        assert!(*size <= limit, "{size} bytes over {limit}");
        assert!(
            m.metadata.truncation,
            "60 AAAA records do not fit {limit} bytes"
        );
        let got = ips(m);
        assert!(!got.is_empty(), "a truncated answer keeps what fits");
        assert!(got.len() < 60);
        assert!(got.windows(2).all(|w| w[0] != w[1]), "no duplicates");
        assert!(got.iter().all(|ip| registered.contains(ip)));
        got.len()
    };
    let plain = check(&udp_sized(dns, &aaaa()).await, 512);
    // An EDNS size below 512 counts as 512; above 1232 as 1232 (no fragments).
    let tiny = check(&udp_sized(dns, &with_edns(aaaa(), 100, 0)).await, 512);
    let big = check(&udp_sized(dns, &with_edns(aaaa(), 4096, 0)).await, 1232);
    let max = check(&udp_sized(dns, &with_edns(aaaa(), 65_535, 0)).await, 1232);
    let exact = check(&udp_sized(dns, &with_edns(aaaa(), 1232, 0)).await, 1232);
    assert!(
        plain > 10 && tiny <= plain,
        "{plain} plain, {tiny} with EDNS 100"
    );
    assert!(
        big > plain && big == max && big == exact,
        "{big} {max} {exact}"
    );
    // TCP has no such limit.
    let whole = tcp(dns, &aaaa()).await;
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 60);

    // 8 SRV records fit 512 bytes, their 8 A targets in the additional section do not:
    // all 8 SRV records, the targets that fit, and no TC.
    let (size, srv) = udp_sized(
        dns,
        &query("_api._tcp.service.switchyard.", RecordType::SRV, 2),
    )
    .await;
    assert!(size <= 512);
    assert!(!srv.metadata.truncation, "only additionals were dropped");
    assert_eq!(srv.answers.len(), 8);
    assert!(
        srv.additionals.len() < 8,
        "{} additionals",
        srv.additionals.len()
    );
    for extra in &srv.additionals {
        assert!(srv
            .answers
            .iter()
            .any(|a| matches!(&a.data, RData::SRV(s) if s.target == extra.name)));
    }
    let with_room = udp(
        dns,
        &with_edns(
            query("_api._tcp.service.switchyard.", RecordType::SRV, 3),
            1232,
            0,
        ),
    )
    .await;
    assert_eq!(
        (with_room.answers.len(), with_room.additionals.len()),
        (8, 8)
    );
    // 60 SRV records do not fit: some SRV records, no additionals, TC.
    let (size, srv) = udp_sized(
        dns,
        &query("_web._tcp.service.switchyard.", RecordType::SRV, 4),
    )
    .await;
    assert!(size <= 512);
    assert!(srv.metadata.truncation);
    assert!(!srv.answers.is_empty() && srv.answers.len() < 60);
    assert!(srv.additionals.is_empty());
    r.handle.shutdown().await;
}

/// RFC 6891 §6.1.3: EDNS versions above 0 get BADVERS (extended RCODE 16) with an OPT
/// record of version 0, over UDP and TCP.
#[tokio::test]
async fn edns_versions_above_zero_get_badvers() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    reg(&mut client, "web-1", "10.0.0.1", 80, "1.0.0").await;
    let q = || with_edns(query("web.service.switchyard.", RecordType::A, 21), 1232, 1);
    for (transport, m) in [("udp", udp(dns, &q()).await), ("tcp", tcp(dns, &q()).await)] {
        assert_eq!(
            u16::from(m.metadata.response_code),
            16,
            "{transport}: BADVERS"
        );
        assert_eq!(m.metadata.id, 21);
        assert!(m.answers.is_empty(), "{transport}");
        let edns = m.edns.as_ref().expect("an OPT record");
        assert_eq!(edns.version(), 0, "{transport}: the version we speak");
    }
    // Version 0 still answers.
    let ok = udp(
        dns,
        &with_edns(query("web.service.switchyard.", RecordType::A, 22), 1232, 0),
    )
    .await;
    assert_eq!(ok.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&ok), vec!["10.0.0.1"]);
    r.handle.shutdown().await;
}

/// No zone transfers: AXFR and IXFR are REFUSED over UDP and TCP. ANY is answered like
/// any type the name lacks (NOERROR, no records, the SOA): small, no amplification.
#[tokio::test]
async fn zone_transfers_are_refused_and_any_stays_small() {
    let r = TestRegistry::start().await;
    let dns = r.handle.dns_addr.expect("dns");
    let mut client = r.registry().await;
    for n in 1..=20u32 {
        reg(
            &mut client,
            &format!("web-{n}"),
            &format!("10.0.0.{n}"),
            80,
            "1.0.0",
        )
        .await;
    }
    for qtype in [RecordType::AXFR, RecordType::IXFR] {
        for name in ["switchyard.", "web.service.switchyard."] {
            let u = udp(dns, &query(name, qtype, 31)).await;
            assert_eq!(
                u.metadata.response_code,
                ResponseCode::Refused,
                "{qtype} {name} udp"
            );
            assert!(u.answers.is_empty());
        }
    }
    let t = tcp(dns, &query("switchyard.", RecordType::AXFR, 32)).await;
    assert_eq!(
        t.metadata.response_code,
        ResponseCode::Refused,
        "AXFR over TCP"
    );
    assert!(t.answers.is_empty());
    let any = query("web.service.switchyard.", RecordType::ANY, 33);
    let asked = any.to_vec().expect("encode").len();
    let (size, m) = udp_sized(dns, &any).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(
        size < 3 * asked,
        "ANY: {size} bytes for a {asked}-byte query"
    );
    r.handle.shutdown().await;
}
