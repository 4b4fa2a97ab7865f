//! Feature flags at the sidecar: a real registry holds the flag document, the sidecar
//! watches it and answers OFREP on its admin port from memory, with its own facts
//! (`$switchyard.version`) in the context; the answers go on while the registry is down
//! and after a sidecar restart from the disk cache alone. The OpenFeature SDK with its
//! OFREP provider runs against a sidecar in `.ci/run` (tests/flags/ofrep_check.py).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::*;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::config_client::ConfigClient;

const FLAGS: &str = r#"{
  "flags": {
    "new-checkout": {
      "state": "ENABLED",
      "variants": { "on": true, "off": false },
      "defaultVariant": "off",
      "targeting": { "if": [ { "==": [ { "var": "$switchyard.version" }, "2.0.0" ] }, "on", "off" ] }
    },
    "banner": {
      "state": "ENABLED",
      "variants": { "short": "Hi", "long": "Hello there" },
      "defaultVariant": "short",
      "targeting": { "if": [ { "ends_with": [ { "var": "email" }, "@example.com" ] }, "long", null ] }
    }
  }
}"#;

async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, ::http::HeaderMap, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("request");
    let r = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("in time")
        .expect("http");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, v)
}

async fn put_flags(url: &str, document: &str) -> u64 {
    let mut c = ConfigClient::connect(url.to_string())
        .await
        .expect("connect");
    c.put_flags(pb::PutFlagsRequest {
        namespace: String::new(),
        change: Some(pb::put_flags_request::Change::Document(document.into())),
        expected_revision: None,
    })
    .await
    .expect("put flags")
    .into_inner()
    .flags
    .map_or(0, |f| f.revision)
}

fn canary_sidecar(
    url: &str,
    cache: &std::path::Path,
    app: SocketAddr,
    version: &str,
) -> switchyard_sidecar::SidecarConfig {
    let mut cfg = sidecar_config(vec![url.to_string()], cache);
    let mut r = registrar_of("web", url, app, &format!("web-{version}"));
    r.service.version = version.into();
    cfg.registrar = Some(r);
    cfg
}

async fn evaluated(admin: SocketAddr, flag: &str, context: Value) -> Value {
    let body = json!({ "context": context }).to_string();
    let (s, _, v) = post(admin, &format!("/ofrep/v1/evaluate/flags/{flag}"), &body).await;
    assert_eq!(s, 200, "{v}");
    v
}

#[tokio::test]
async fn a_canary_only_flag_answers_from_memory_through_a_registry_outage_and_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let cache = tempfile::tempdir().expect("cache");
    let registry = start_registry(dir.path()).await;
    let url = format!("http://{}", registry.grpc_addr);
    let app = Backend::start("app", Duration::ZERO).await;
    put_flags(&url, FLAGS).await;
    let stable = start_sidecar(canary_sidecar(&url, cache.path(), app.addr, "1.0.0")).await;
    let canary_cache = tempfile::tempdir().expect("cache");
    let canary = start_sidecar(canary_sidecar(&url, canary_cache.path(), app.addr, "2.0.0")).await;
    for (sidecar, want) in [(&stable, false), (&canary, true)] {
        let admin = sidecar.admin_addr;
        assert_eventually(Duration::from_secs(5), "flags arrive", || async move {
            post(admin, "/ofrep/v1/evaluate/flags/new-checkout", "{}")
                .await
                .0
                == 200
        })
        .await;
        let v = evaluated(admin, "new-checkout", json!({ "targetingKey": "u1" })).await;
        assert_eq!(v["value"], json!(want), "{v}");
        assert_eq!(v["reason"], "TARGETING_MATCH");
        assert_eq!(v["variant"], if want { "on" } else { "off" });
        // A caller cannot claim to be the canary: the sidecar's facts win.
        let v = evaluated(
            admin,
            "new-checkout",
            json!({ "$switchyard": { "version": "2.0.0" } }),
        )
        .await;
        assert_eq!(v["value"], json!(want), "{v}");
    }
    let admin = stable.admin_addr;
    let v = evaluated(admin, "banner", json!({ "email": "ann@example.com" })).await;
    assert_eq!(
        (v["value"].clone(), v["variant"].clone()),
        (json!("Hello there"), json!("long"))
    );
    let v = evaluated(admin, "banner", json!({ "email": "bob@other.org" })).await;
    assert_eq!(
        (v["value"].clone(), v["reason"].clone()),
        (json!("Hi"), json!("DEFAULT"))
    );
    // A body without a context is accepted; an unknown flag is FLAG_NOT_FOUND (404).
    let (s, _, v) = post(admin, "/ofrep/v1/evaluate/flags/banner", "").await;
    assert_eq!((s, v["value"].clone()), (200, json!("Hi")));
    let (s, _, v) = post(admin, "/ofrep/v1/evaluate/flags/missing", "{}").await;
    assert_eq!((s, v["errorCode"].clone()), (404, json!("FLAG_NOT_FOUND")));
    let (s, _, v) = post(admin, "/ofrep/v1/evaluate/flags/banner", "{not json").await;
    assert_eq!((s, v["errorCode"].clone()), (400, json!("PARSE_ERROR")));
    let (s, _, v) = post(
        admin,
        "/ofrep/v1/evaluate/flags/banner",
        r#"{"context": 5}"#,
    )
    .await;
    assert_eq!((s, v["errorCode"].clone()), (400, json!("INVALID_CONTEXT")));
    // Bulk with ETag: unchanged flags and context → 304.
    let (s, h, v) = post(
        admin,
        "/ofrep/v1/evaluate/flags",
        r#"{"context":{"targetingKey":"u1"}}"#,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["flags"].as_array().map(Vec::len), Some(2), "{v}");
    let etag = h
        .get("etag")
        .expect("ETag")
        .to_str()
        .expect("ascii")
        .to_string();

    // A change pushed to the registry is seen by the sidecar's next evaluation.
    let flipped = FLAGS.replace(
        r#""defaultVariant": "short""#,
        r#""defaultVariant": "long""#,
    );
    put_flags(&url, &flipped).await;
    assert_eventually(Duration::from_secs(5), "the change arrives", || async move {
        evaluated(admin, "banner", json!({})).await["value"] == json!("Hello there")
    })
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{admin}/ofrep/v1/evaluate/flags"))
        .header("if-none-match", &etag)
        .body(Full::new(Bytes::from_static(
            br#"{"context":{"targetingKey":"u1"}}"#,
        )))
        .expect("request");
    let r = client.request(req).await.expect("http");
    assert_eq!(r.status().as_u16(), 200, "the ETag moved with the flags");

    // The registry goes away: the flags keep answering.
    registry.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = evaluated(admin, "banner", json!({})).await;
    assert_eq!(v["value"], "Hello there");
    // A restart with no registry answers from the disk cache.
    stable.shutdown().await;
    let again = start_sidecar(canary_sidecar(&url, cache.path(), app.addr, "1.0.0")).await;
    let v = evaluated(again.admin_addr, "banner", json!({})).await;
    assert_eq!(v["value"], "Hello there", "{v}");
    let v = evaluated(again.admin_addr, "new-checkout", json!({})).await;
    assert_eq!(v["value"], false);
    again.shutdown().await;
    canary.shutdown().await;
}

/// KV prefixes followed over the watch stream are served from memory at `/kv/KEY`, and
/// from the disk cache after a restart with the registry down.
#[tokio::test]
async fn followed_kv_prefixes_are_served_from_memory_and_the_cache() {
    let dir = tempfile::tempdir().expect("dir");
    let cache = tempfile::tempdir().expect("cache");
    let registry = start_registry(dir.path()).await;
    let url = format!("http://{}", registry.grpc_addr);
    let mut c = ConfigClient::connect(url.clone()).await.expect("connect");
    let put = |key: &str, value: &str| pb::KvPutRequest {
        namespace: String::new(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        flags: 0,
        cas: None,
    };
    c.put(put("app/timeout", "5s")).await.expect("put");
    c.put(put("secret/other", "no")).await.expect("put");
    let mut cfg = sidecar_config(vec![url.clone()], cache.path());
    cfg.discovery.kv_prefixes = vec!["app/".into()];
    let sidecar = start_sidecar(cfg.clone()).await;
    let admin = sidecar.admin_addr;
    assert_eventually(Duration::from_secs(5), "the value arrives", || async move {
        http_get(admin, "/kv/app/timeout").await == (200, "5s".to_string())
    })
    .await;
    assert_eq!(
        http_get(admin, "/kv/secret/other").await.0,
        404,
        "not followed"
    );
    c.put(put("app/retries", "3")).await.expect("put");
    assert_eventually(Duration::from_secs(5), "a new key arrives", || async move {
        http_get(admin, "/kv/app/retries").await.0 == 200
    })
    .await;
    let (s, keys) = http_get(admin, "/kv/app/?keys").await;
    assert_eq!(
        (s, keys.as_str()),
        (200, r#"["app/retries","app/timeout"]"#)
    );
    c.delete(pb::KvDeleteRequest {
        namespace: String::new(),
        key: "app/retries".into(),
        recurse: false,
        cas: None,
    })
    .await
    .expect("delete");
    assert_eventually(
        Duration::from_secs(5),
        "the delete arrives",
        || async move { http_get(admin, "/kv/app/retries").await.0 == 404 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // one cache flush
    registry.shutdown().await;
    sidecar.shutdown().await;
    let again = start_sidecar(cfg).await;
    assert_eq!(
        http_get(again.admin_addr, "/kv/app/timeout").await,
        (200, "5s".to_string())
    );
    again.shutdown().await;
}
