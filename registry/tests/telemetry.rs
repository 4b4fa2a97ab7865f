//! `Telemetry/Report` over real gRPC: every rule of a report is checked at the edge
//! (INVALID_ARGUMENT naming the field; nothing of a refused report is kept), the key
//! limit answers RESOURCE_EXHAUSTED, an oversized message is refused, and `Top` adds up
//! what was accepted.

use switchyard_core::telemetry::BUCKETS;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::telemetry_client::TelemetryClient;
use switchyard_testkit::*;
use tonic::transport::Channel;
use tonic::Code;

async fn client(reg: &TestRegistry) -> TelemetryClient<Channel> {
    TelemetryClient::new(reg.channel().await).max_encoding_message_size(64 * 1024 * 1024)
}

async fn send(
    c: &mut TelemetryClient<Channel>,
    reports: Vec<pb::WindowReport>,
) -> Result<u64, tonic::Status> {
    c.report(tokio_stream::iter(reports))
        .await
        .map(|r| r.into_inner().accepted)
}

async fn top(c: &mut TelemetryClient<Channel>, service: &str) -> Vec<pb::VersionTop> {
    c.top(pb::TopRequest {
        namespace: String::new(),
        service: service.into(),
        window_seconds: 0,
    })
    .await
    .expect("top")
    .into_inner()
    .versions
}

#[tokio::test]
async fn each_report_rule_names_its_field_and_keeps_nothing() {
    let reg = TestRegistry::start().await;
    let mut c = client(&reg).await;
    let good = version_stats("web", "1.0", 10, 1);
    let with = |f: &dyn Fn(&mut pb::VersionStats)| {
        let mut s = version_stats("web", "2.0", 10, 1);
        f(&mut s);
        window_report(vec![good.clone(), s])
    };
    let cases: Vec<(&str, pb::WindowReport)> = vec![
        ("versions[1].errors", with(&|s| s.errors = 11)),
        ("versions[1].slow", with(&|s| s.slow = 11)),
        (
            "versions[1].service",
            with(&|s| s.service = "Web_Front".into()),
        ),
        ("versions[1].service", with(&|s| s.service = String::new())),
        (
            "versions[1].namespace",
            with(&|s| s.namespace = "-prod".into()),
        ),
        ("versions[1].version", with(&|s| s.version = "a b".into())),
        ("versions[1].version", with(&|s| s.version = "v".repeat(65))),
        (
            "versions[1].latency_buckets",
            with(&|s| s.latency_buckets = vec![1; BUCKETS + 1]),
        ),
        (
            "versions[1].latency_buckets",
            with(&|s| s.latency_buckets = vec![3]),
        ),
        (
            "window_seconds",
            pb::WindowReport {
                window_seconds: 0,
                ..window_report(vec![good.clone()])
            },
        ),
        ("versions", window_report(vec![good.clone(); 1_001])),
    ];
    for (field, r) in cases {
        let e = send(&mut c, vec![r]).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {}", e.message());
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    assert!(
        top(&mut c, "").await.is_empty(),
        "a refused report keeps nothing"
    );
    // The reports before a refused one on the same stream stay accepted.
    let e = send(
        &mut c,
        vec![window_report(vec![good.clone()]), with(&|s| s.errors = 99)],
    )
    .await
    .expect_err("second is refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    let t = top(&mut c, "web").await;
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].version.as_str(), t[0].requests, t[0].errors),
        ("1.0", 10, 1)
    );
    let m = reg.metrics().await;
    assert!(
        m.contains("switchyard_registry_telemetry_reports_total{outcome=\"invalid\"} 12"),
        "{m}"
    );
}

#[tokio::test]
async fn more_keys_than_the_limit_is_resource_exhausted() {
    let reg = TestRegistry::start().await;
    let mut c = client(&reg).await;
    // 10,000 keys in ten reports of 1,000 (one stream) fill the store.
    let reports: Vec<pb::WindowReport> = (0..10)
        .map(|r| {
            window_report(
                (0..1_000)
                    .map(|i| version_stats(&format!("s{r}"), &format!("v{i}"), 1, 0))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(send(&mut c, reports).await.expect("fills the store"), 10);
    // Known keys are still taken; one new key is not.
    assert_eq!(
        send(
            &mut c,
            vec![window_report(vec![version_stats("s0", "v0", 1, 0)])]
        )
        .await
        .expect("known key"),
        1
    );
    let e = send(
        &mut c,
        vec![window_report(vec![version_stats("new", "1", 1, 0)])],
    )
    .await
    .expect_err("full");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("10000"), "{}", e.message());
    assert!(top(&mut c, "new").await.is_empty());
    assert_eq!(top(&mut c, "s0").await.len(), 1_000);
}

#[tokio::test]
async fn an_oversized_report_is_refused() {
    let reg = TestRegistry::start().await;
    let mut c = client(&reg).await;
    let mut s = version_stats("web", "1.0", 1, 0);
    s.namespace = "n".repeat(1024 * 1024);
    let e = send(&mut c, vec![window_report(vec![s])])
        .await
        .expect_err("too large");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
}

#[tokio::test]
async fn top_refuses_a_window_beyond_the_ring_and_bad_names() {
    let reg = TestRegistry::start().await;
    let mut c = client(&reg).await;
    for (req, field) in [
        (
            pb::TopRequest {
                namespace: String::new(),
                service: String::new(),
                window_seconds: 301,
            },
            "window_seconds",
        ),
        (
            pb::TopRequest {
                namespace: String::new(),
                service: "Bad_Name".into(),
                window_seconds: 0,
            },
            "service",
        ),
    ] {
        let e = c.top(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{}", e.message());
    }
}
