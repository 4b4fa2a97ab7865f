//! The sidecar's DNS port answers from its cached catalog: the same names as the
//! registry, the canary split included, and it keeps answering while no registry does.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use support::*;
use switchyard_proto::v1 as pb;
use tokio::net::UdpSocket;

async fn ask(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(&m.to_vec().expect("encode"), addr)
        .await
        .expect("send");
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    Message::from_vec(&buf[..n]).expect("decode")
}

fn ips(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_sidecar_answers_dns_from_its_cache_even_without_a_registry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let mut client = registry_client(&registry).await;
    for (id, port, version) in [("s-1", 9001, "1.0.0"), ("c-1", 9002, "2.0.0")] {
        register(
            &mut client,
            "web",
            id,
            format!("127.0.0.1:{port}").parse().expect("addr"),
            version,
            100,
        )
        .await;
    }
    let mut routing = switchyard_proto::v1::routing_client::RoutingClient::connect(format!(
        "http://{}",
        registry.grpc_addr
    ))
    .await
    .expect("connect");
    routing
        .put_policy(pb::PutPolicyRequest {
            namespace: String::new(),
            service: "web".into(),
            policy: Some(pb::Policy {
                subsets: vec![pb::Subset {
                    name: "canary".into(),
                    version: "2.0.0".into(),
                    ..Default::default()
                }],
                default_split: vec![
                    pb::WeightedSubset {
                        subset: "1.0.0".into(),
                        weight: 100,
                    },
                    pb::WeightedSubset {
                        subset: "canary".into(),
                        weight: 0,
                    },
                ],
                ..Default::default()
            }),
        })
        .await
        .expect("policy");
    let sidecar = start_sidecar(sidecar_config(
        vec![format!("http://{}", registry.grpc_addr)],
        dir.path(),
    ))
    .await;
    let dns = sidecar.dns_addr.expect("sidecar dns");
    eventually(Duration::from_secs(5), || async {
        sidecar
            .table
            .get("web")
            .filter(|v| v.endpoints.len() == 2 && v.dns.policy.is_some())
            .map(|_| ())
    })
    .await;

    // The split sends every answer to 1.0.0 (canary has weight 0).
    for _ in 0..20 {
        let a = ask(dns, "web.service.switchyard.", RecordType::A).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
    }
    let srv = ask(dns, "_web._tcp.service.switchyard.", RecordType::SRV).await;
    let ports: Vec<u16> = srv
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect();
    assert_eq!(ports, vec![9001], "weight-0 subsets get no SRV");
    let canary = ask(dns, "canary.web.service.switchyard.", RecordType::A).await;
    assert_eq!(ips(&canary), vec!["127.0.0.1"]);
    assert_eq!(
        ask(dns, "nope.service.switchyard.", RecordType::A)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );

    // The registry goes away: the sidecar still answers from its catalog.
    drop(client);
    registry.shutdown().await;
    eventually(Duration::from_secs(5), || async {
        (!sidecar.table.is_connected()).then_some(())
    })
    .await;
    let a = ask(dns, "web.service.switchyard.", RecordType::A).await;
    assert_eq!(ips(&a), vec!["127.0.0.1"]);
    sidecar.shutdown().await;
}
