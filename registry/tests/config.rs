//! The Config service on a real registry: the KV store (check-and-set, recurse, bounds),
//! KV and flags over the Watch stream (snapshot, deltas, resume), and flag documents
//! validated on write with history and rollback. The Consul KV endpoints are in
//! consul.rs; evaluation at the sidecar in the sidecar's tests/flags.rs.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::config_client::ConfigClient;
use switchyard_testkit::*;
use tonic::transport::Channel;

async fn config(reg: &TestRegistry) -> ConfigClient<Channel> {
    ConfigClient::new(reg.channel().await).max_encoding_message_size(8 << 20)
}

async fn put(
    c: &mut ConfigClient<Channel>,
    key: &str,
    value: &str,
    cas: Option<u64>,
) -> pb::KvWriteResponse {
    c.put(pb::KvPutRequest {
        namespace: String::new(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        flags: 0,
        cas,
    })
    .await
    .expect("put")
    .into_inner()
}

async fn current_flags(c: &mut ConfigClient<Channel>) -> pb::FlagsDocument {
    c.get_flags(pb::GetFlagsRequest {
        namespace: String::new(),
    })
    .await
    .expect("get flags")
    .into_inner()
    .flags
    .expect("a document")
}

async fn next(stream: &mut tonic::Streaming<pb::WatchEvent>) -> pb::WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an event in time")
        .expect("stream")
        .expect("not ended")
}

#[tokio::test]
async fn kv_put_get_cas_list_delete_and_bounds() {
    let reg = TestRegistry::start().await;
    let mut c = config(&reg).await;
    let w = put(&mut c, "config/web/timeout", "5s", Some(0)).await;
    assert!(w.applied);
    let again = put(&mut c, "config/web/timeout", "6s", Some(0)).await;
    assert!(!again.applied, "cas=0 creates only");
    let got = c
        .get(pb::KvGetRequest {
            namespace: String::new(),
            key: "config/web/timeout".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .entry
        .expect("entry");
    assert_eq!(
        (got.value.as_slice(), got.modify_revision),
        (&b"5s"[..], w.revision)
    );
    assert!(
        put(&mut c, "config/web/timeout", "7s", Some(w.revision))
            .await
            .applied
    );
    put(&mut c, "config/api/x", "1", None).await;
    let list = c
        .list(pb::KvListRequest {
            namespace: String::new(),
            prefix: "config/".into(),
            keys_only: true,
        })
        .await
        .expect("list")
        .into_inner();
    let keys: Vec<&str> = list.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["config/api/x", "config/web/timeout"]);
    assert!(list.entries.iter().all(|e| e.value.is_empty()), "keys only");
    let d = c
        .delete(pb::KvDeleteRequest {
            namespace: String::new(),
            key: "config/".into(),
            recurse: true,
            cas: None,
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(d.applied);
    let gone = c
        .get(pb::KvGetRequest {
            namespace: String::new(),
            key: "config/api/x".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(gone.entry.is_none());
    // Bad input is refused naming the field, and nothing is written.
    for (key, value, field) in [
        ("/abs", "x".to_string(), "key"),
        ("a b", "x".to_string(), "key"),
        (&*"k".repeat(513), "x".to_string(), "key"),
        ("big", "x".repeat(512 * 1024 + 1), "value"),
    ] {
        let err = c
            .put(pb::KvPutRequest {
                namespace: String::new(),
                key: key.into(),
                value: value.into_bytes(),
                flags: 0,
                cas: None,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    let err = c
        .delete(pb::KvDeleteRequest {
            namespace: String::new(),
            key: "a/".into(),
            recurse: true,
            cas: Some(3),
        })
        .await
        .expect_err("cas with recurse");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_full_store_refuses_writes_with_a_clear_error() {
    let reg = TestRegistry::start_with(|c| c.limits.max_kv_bytes = 4096).await;
    let mut c = config(&reg).await;
    assert!(put(&mut c, "a", &"x".repeat(3000), None).await.applied);
    let err = c
        .put(pb::KvPutRequest {
            namespace: String::new(),
            key: "b".into(),
            value: vec![b'y'; 3000],
            flags: 0,
            cas: None,
        })
        .await
        .expect_err("full");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains("--max-kv-bytes"),
        "{}",
        err.message()
    );
    let b = c
        .get(pb::KvGetRequest {
            namespace: String::new(),
            key: "b".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(b.entry.is_none());
}

#[tokio::test]
async fn kv_prefixes_and_flags_come_over_the_watch_stream_and_resume() {
    let reg = TestRegistry::start().await;
    let mut c = config(&reg).await;
    put(&mut c, "app/a", "1", None).await;
    put(&mut c, "other/z", "1", None).await;
    let mut d = reg.discovery().await;
    let request = pb::WatchRequest {
        flags: true,
        kv_prefixes: vec!["app/".into()],
        ..watch_all(0)
    };
    let mut stream = open_watch(&mut d, request.clone()).await;
    let first = next(&mut stream).await;
    assert!(first.kv_snapshot);
    let keys: Vec<&str> = first.kv.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["app/a"]);
    let flags = first
        .flags
        .expect("flags in every snapshot of a flags watcher");
    assert_eq!(
        (flags.document.as_str(), flags.revision),
        (r#"{"flags":{}}"#, 0)
    );
    // A key elsewhere sends nothing; one under the prefix a delta; a delete its key.
    put(&mut c, "other/y", "2", None).await;
    let w = put(&mut c, "app/b", "2", None).await;
    let e = next(&mut stream).await;
    assert_eq!(e.revision, w.revision, "the other key sent no event");
    assert_eq!(
        e.kv.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["app/b"]
    );
    c.delete(pb::KvDeleteRequest {
        namespace: String::new(),
        key: "app/a".into(),
        recurse: false,
        cas: None,
    })
    .await
    .expect("delete");
    let e = next(&mut stream).await;
    assert_eq!(e.kv_removed, ["app/a"]);
    // Flags: a change is one delta carrying the whole document.
    let r = c
        .put_flags(pb::PutFlagsRequest {
            namespace: String::new(),
            change: Some(pb::put_flags_request::Change::Set(pb::FlagDefinition {
                key: "dark-mode".into(),
                definition: r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off"}"#.into(),
            })),
            expected_revision: None,
        })
        .await
        .expect("set flag")
        .into_inner();
    let rev = r.flags.expect("flags").revision;
    let e = next(&mut stream).await;
    let f = e.flags.expect("flags in the delta");
    assert_eq!(f.revision, rev);
    assert!(f.document.contains("dark-mode"), "{}", f.document);
    // Resuming from before the flag change replays it (and the KV changes), no snapshot.
    drop(stream);
    let mut resumed = open_watch(
        &mut d,
        pb::WatchRequest {
            since_revision: w.revision,
            ..request
        },
    )
    .await;
    let e = next(&mut resumed).await;
    assert!(!e.kv_snapshot);
    assert_eq!(e.kv_removed, ["app/a"]);
    let e = next(&mut resumed).await;
    assert_eq!(e.flags.map(|f| f.revision), Some(rev));
    // A watcher that did not ask for flags or KV sees none of it.
    let mut plain = open_watch(&mut d, watch_all(0)).await;
    let e = next(&mut plain).await;
    assert!(e.flags.is_none() && e.kv.is_empty() && !e.kv_snapshot);
}

#[tokio::test]
async fn flag_documents_are_validated_recorded_and_rolled_back() {
    use pb::put_flags_request::Change;
    let reg = TestRegistry::start().await;
    let mut c = config(&reg).await;
    let change = |change| pb::PutFlagsRequest {
        namespace: String::new(),
        change: Some(change),
        expected_revision: None,
    };
    // Refused, naming the path; nothing recorded.
    let err = c
        .put_flags(change(Change::Set(pb::FlagDefinition {
            key: "color".into(),
            definition:
                r#"{"state":"ENABLED","variants":{"red":"r","green":"g"},"defaultVariant":"blue"}"#
                    .into(),
        })))
        .await
        .expect_err("bad default");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("flags.color.defaultVariant"),
        "{}",
        err.message()
    );
    let err = c
        .put_flags(change(Change::Document("{\"flags\": [1]}".into())))
        .await
        .expect_err("not an object");
    assert!(err.message().contains("flags"), "{}", err.message());
    let deep = format!("{}true{}", "{\"!\":[".repeat(40), "]}".repeat(40));
    let err = c
        .put_flags(change(Change::Set(pb::FlagDefinition {
            key: "deep".into(),
            definition: format!(r#"{{"state":"ENABLED","variants":{{"a":1}},"defaultVariant":"a","targeting":{deep}}}"#),
        })))
        .await
        .expect_err("too deep");
    assert!(
        err.message().contains("flags.deep.targeting"),
        "{}",
        err.message()
    );
    let history = c
        .flag_history(pb::FlagHistoryRequest {
            namespace: String::new(),
        })
        .await
        .expect("history")
        .into_inner();
    assert!(history.records.is_empty());
    // Set, disable, import, roll back.
    let set = c
        .put_flags(change(Change::Set(pb::FlagDefinition {
            key: "color".into(),
            definition:
                r#"{"state":"ENABLED","variants":{"red":"r","green":"g"},"defaultVariant":"red"}"#
                    .into(),
        })))
        .await
        .expect("set")
        .into_inner();
    c.put_flags(change(Change::State(pb::FlagState {
        key: "color".into(),
        enabled: false,
    })))
    .await
    .expect("disable");
    let doc = current_flags(&mut c).await;
    assert!(doc.document.contains("DISABLED"), "{}", doc.document);
    let err = c
        .put_flags(change(Change::State(pb::FlagState {
            key: "nope".into(),
            enabled: false,
        })))
        .await
        .expect_err("no such flag");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    c.put_flags(change(Change::Import(
        r#"{"$schema":"https://flagd.dev/schema/v0/flags.json","flags":{"size":{"state":"ENABLED","variants":{"s":1,"l":2},"defaultVariant":"s"}}}"#.into(),
    )))
    .await
    .expect("import");
    let doc = current_flags(&mut c).await;
    assert!(
        doc.document.contains("size") && doc.document.contains("color"),
        "{}",
        doc.document
    );
    // A stale expected revision is refused.
    let err = c
        .put_flags(pb::PutFlagsRequest {
            namespace: String::new(),
            change: Some(Change::Remove("size".into())),
            expected_revision: Some(set.flags.as_ref().map_or(0, |f| f.revision)),
        })
        .await
        .expect_err("stale");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    let history = c
        .flag_history(pb::FlagHistoryRequest {
            namespace: String::new(),
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(history.records.len(), 3);
    let back = c
        .rollback_flags(pb::RollbackFlagsRequest {
            namespace: String::new(),
            to_revision: set.flags.as_ref().map_or(0, |f| f.revision),
        })
        .await
        .expect("rollback")
        .into_inner()
        .flags
        .expect("doc");
    assert!(
        back.document.contains("ENABLED") && !back.document.contains("size"),
        "{}",
        back.document
    );
    let history = c
        .flag_history(pb::FlagHistoryRequest {
            namespace: String::new(),
        })
        .await
        .expect("history")
        .into_inner();
    assert!(history
        .records
        .last()
        .is_some_and(|r| r.action.starts_with("rollback to")));
    // The registry answers OFREP too.
    let (status, body) =
        post_json(reg.handle.http_addr, "/ofrep/v1/evaluate/flags/color", "{}").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"variant\":\"red\""), "{body}");
}

/// KV entries and flag documents are in the snapshot a restarted node comes back with.
#[tokio::test]
async fn kv_and_flags_survive_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let grpc = free_addr();
    let peer = free_addr();
    let reg = start_at(
        switchyard_registry::RegistryConfig::new(dir.path().to_path_buf()),
        grpc,
        peer,
    )
    .await;
    let url = format!("http://{grpc}");
    let mut c = ConfigClient::connect(url.clone()).await.expect("connect");
    c.put(pb::KvPutRequest {
        namespace: String::new(),
        key: "k".into(),
        value: b"v".to_vec(),
        flags: 3,
        cas: None,
    })
    .await
    .expect("put");
    c.put_flags(pb::PutFlagsRequest {
        namespace: String::new(),
        change: Some(pb::put_flags_request::Change::Document(
            r#"{"flags":{"f":{"state":"ENABLED","variants":{"a":"A"},"defaultVariant":"a"}}}"#
                .into(),
        )),
        expected_revision: None,
    })
    .await
    .expect("flags");
    reg.shutdown().await;
    let reg = start_at(
        switchyard_registry::RegistryConfig::new(dir.path().to_path_buf()),
        grpc,
        free_addr(),
    )
    .await;
    let mut c = ConfigClient::connect(url).await.expect("connect");
    let e = eventually(Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            c.get(pb::KvGetRequest {
                namespace: String::new(),
                key: "k".into(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().entry)
        }
    })
    .await;
    assert_eq!((e.value.as_slice(), e.flags), (&b"v"[..], 3));
    let doc = current_flags(&mut c).await;
    assert!(doc.document.contains("\"f\""), "{}", doc.document);
    reg.shutdown().await;
}

async fn post_json(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            body.as_bytes(),
        )))
        .expect("request");
    let r = client.request(req).await.expect("http");
    let status = r.status().as_u16();
    let b = r.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}
