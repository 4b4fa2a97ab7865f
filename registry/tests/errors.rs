//! Unclear errors the hostile probe found, each answered with the gRPC code a client can
//! act on: a KeepAlive message over the limit is RESOURCE_EXHAUSTED (the stream used to
//! end with OK and no answer; the unary case is in validation.rs), and bytes that are not
//! protobuf are INVALID_ARGUMENT (prost's codec said INTERNAL).

use std::time::Duration;

use bytes::{Buf, BufMut};
use switchyard_proto::v1 as pb;
use switchyard_testkit::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

#[tokio::test]
async fn an_oversized_keepalive_message_ends_the_stream_with_a_clear_error() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let (tx, rx) = mpsc::channel(2);
    let mut responses = registry
        .keep_alive(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    tx.send(pb::KeepAliveRequest {
        // 10-byte varints: about 2 MB, over the 1 MiB limit.
        lease_ids: (0..200_000).map(|n| u64::MAX - n).collect(),
    })
    .await
    .expect("send");
    let answer = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("an answer in time");
    let err = answer.expect_err("the stream ends with an error, not OK");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("lease ids"), "{}", err.message());
}

/// Sends raw bytes as a request body, to call a method with something that is not
/// the protobuf it expects.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test]
async fn bytes_that_are_not_protobuf_are_invalid_argument() {
    let reg = TestRegistry::start().await;
    let mut grpc = tonic::client::Grpc::new(reg.channel().await);
    let path = ::http::uri::PathAndQuery::from_static("/switchyard.v1.Registry/Register");
    // Field 1 (instance) as a length-delimited value whose nested field 3 (id) is a
    // string holding invalid UTF-8; then a truncated varint.
    for body in [
        vec![0x0a, 0x04, 0x1a, 0x02, 0xff, 0xfe],
        vec![0x10, 0xff, 0xff, 0xff],
    ] {
        grpc.ready().await.expect("ready");
        let err = grpc
            .unary(tonic::Request::new(body), path.clone(), RawCodec)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
}

/// KeepAlive streams are bounded per node (the probe opened 10,000 never-read ones:
/// 96 -> 447 MB): past the cap a new stream is RESOURCE_EXHAUSTED saying what to do, and
/// a closed stream frees its slot.
#[tokio::test]
async fn keepalive_streams_are_bounded_per_node() {
    let reg = TestRegistry::start_with(|c| c.max_keepalive_streams = 2).await;
    let mut registry = reg.registry().await;
    let lease = register(&mut registry, instance("web", "web-1", "1.0.0"), 30)
        .await
        .lease_id;
    let open = |mut registry: switchyard_proto::v1::registry_client::RegistryClient<
        tonic::transport::Channel,
    >| async move {
        let (tx, rx) = mpsc::channel(2);
        let stream = registry.keep_alive(ReceiverStream::new(rx)).await;
        (tx, stream)
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, stream) = open(registry.clone()).await;
        let mut stream = stream.expect("under the cap").into_inner();
        tx.send(pb::KeepAliveRequest {
            lease_ids: vec![lease],
        })
        .await
        .expect("send");
        let answer = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("an answer");
        assert!(answer.leases[0].found);
        held.push((tx, stream));
    }
    let (_tx, third) = open(registry.clone()).await;
    let err = third.expect_err("over the cap");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("max_keepalive_streams"),
        "{}",
        err.message()
    );
    // Closing one stream frees its slot.
    drop(held.pop());
    eventually(Duration::from_secs(5), || {
        let registry = registry.clone();
        async move { open(registry).await.1.ok().map(|_| ()) }
    })
    .await;
}
