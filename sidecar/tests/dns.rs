//! The sidecar's DNS port answers from its cached catalog: the same names as the
//! registry, the canary split included, and it keeps answering while no registry does.

mod support;

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use support::dns::{ask, ips, srv_ports};
use support::*;
use switchyard_proto::v1 as pb;

#[tokio::test]
async fn the_sidecar_answers_dns_from_its_cache_even_without_a_registry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let policy = pb::Policy {
        subsets: vec![proto::subset("canary", "2.0.0")],
        default_split: split(&[("1.0.0", 100), ("canary", 0)]),
        ..Default::default()
    };
    fake.push(proto::snapshot(
        1,
        vec![proto::service_state(
            "web",
            [("s-1", 9001, "1.0.0"), ("c-1", 9002, "2.0.0")]
                .into_iter()
                .map(|(id, port, version)| {
                    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
                    instance_at("web", id, addr, version, 100)
                })
                .collect(),
            Some(policy),
        )],
    ));
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
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
    assert_eq!(srv_ports(&srv), vec![9001], "weight-0 subsets get no SRV");
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
    fake.shutdown().await;
    eventually(Duration::from_secs(5), || async {
        (!sidecar.table.is_connected()).then_some(())
    })
    .await;
    let a = ask(dns, "web.service.switchyard.", RecordType::A).await;
    assert_eq!(ips(&a), vec!["127.0.0.1"]);
    sidecar.shutdown().await;
}
