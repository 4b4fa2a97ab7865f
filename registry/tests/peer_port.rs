//! The internal service lives on the peer port only. The hostile probe reached
//! `RaftInternal/Forward` on the client port and deregistered every instance with one
//! forwarded `ExpireLeases`; forged AppendEntries there stopped all writes.

use switchyard_proto::internal::raft_internal_client::RaftInternalClient;
use switchyard_proto::internal::RaftMessage;
use switchyard_registry::catalog::Command;
use switchyard_registry::raft::encode;
use switchyard_testkit::*;
use tonic::transport::Endpoint;
use tonic::Code;

async fn internal_client(
    addr: std::net::SocketAddr,
) -> RaftInternalClient<tonic::transport::Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    RaftInternalClient::new(channel)
}

fn expire_all() -> RaftMessage {
    RaftMessage {
        data: encode(&Command::ExpireLeases {
            leases: (1..=100).map(|l| (l, 1)).collect(),
        })
        .expect("encode"),
    }
}

#[tokio::test]
async fn the_client_port_does_not_serve_the_internal_service() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let addr = "127.0.0.1:8080".parse().expect("addr");
    register_at(&mut registry, "web", "web-1", addr, "1.0.0", 100).await;

    let mut on_client_port = internal_client(reg.handle.grpc_addr).await;
    let err = on_client_port
        .forward(expire_all())
        .await
        .expect_err("not served here");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = on_client_port
        .append_entries(RaftMessage { data: vec![] })
        .await
        .expect_err("not served here");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    // On the peer port the leader refuses a command only it may originate.
    let mut on_peer_port = internal_client(reg.handle.peer_addr).await;
    let err = on_peer_port
        .forward(expire_all())
        .await
        .expect_err("leader-only command");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let resolved = reg
        .discovery()
        .await
        .resolve(switchyard_proto::v1::ResolveRequest {
            namespace: String::new(),
            service: "web".into(),
            version: String::new(),
        })
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(resolved.instances.len(), 1, "nothing was expired");
    reg.handle.shutdown().await;
}
