//! Calling a rollout's webhooks, the way Flagger does, so hooks written for Flagger
//! (its load tester, approval gates, notifiers) work unchanged.
//!
//! The leader POSTs a [`HookPayload`] as JSON (`content-type: application/json`) to each
//! [`Webhook`] of the stage it is at; any 2xx answer is success. One timeout bounds the
//! whole call (connect, response head and body), and at most [`MAX_RESPONSE_BYTES`] of
//! the answer are read.
//!
//! Checked against Flagger's source (fluxcd/flagger, `pkg/controller/webhook.go` and
//! `CanaryWebhookPayload` in `pkg/apis/flagger/v1beta1/canary.go`): the fields `name`,
//! `namespace`, `phase`, `checksum` and `metadata` (left out when empty, Go's
//! `omitempty`), and a 10 s default timeout. The `type` field (the hook's kind, by
//! Flagger's name) could not be confirmed in the version of the source searched; it is
//! sent as this project's design asks, and hooks that do not know it ignore it.
//! Flagger treats 203-299 as failure (`StatusCode > 202`); here every 2xx is success.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;

use crate::model::{Webhook, WebhookKind};

/// Flagger's default webhook timeout.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this much of a hook's answer is read; the rest is dropped unread.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// At most this many characters of a refusing hook's answer go into [`HookError::Status`].
pub const MAX_ERROR_BODY_CHARS: usize = 512;

/// What a hook receives: Flagger's `CanaryWebhookPayload`, field for field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookPayload<'a> {
    /// The service being rolled out.
    pub name: &'a str,
    pub namespace: &'a str,
    /// The rollout's phase, by Flagger's names (`Progressing`, `Promoting`, ...).
    pub phase: &'a str,
    /// Identifies the rollout's target configuration; stays the same across the calls
    /// of one rollout.
    pub checksum: &'a str,
    /// The hook's kind, by Flagger's name (`pre-rollout`, ...).
    #[serde(rename = "type")]
    pub kind: WebhookKind,
    /// Left out of the JSON when empty, as Flagger's `omitempty` does.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// Why a hook call did not succeed. Every URL in here is [`redacted`]: no query string
/// (secrets often live there), no userinfo.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("webhook {url} did not answer within {after:?}: check that it is up and answers within the timeout, or raise the hook's timeout")]
    Timeout { url: String, after: Duration },
    #[error("webhook {url} could not be reached ({reason}): check the host and port, and that the registry leader can connect to it")]
    Connect { url: String, reason: String },
    #[error("webhook {url} answered HTTP {code} (a refusal; 2xx is success), saying {body:?}: see the hook's logs")]
    Status {
        url: String,
        code: u16,
        /// The start of the answer, at most [`MAX_ERROR_BODY_CHARS`] characters.
        body: String,
    },
    #[error("webhook URL {url} cannot be called ({reason}): write it as http://HOST[:PORT]/PATH")]
    BadUrl { url: String, reason: String },
}

/// Whether a failed call of a hook of this kind counts toward the rollout's failed-check
/// threshold, as in Flagger:
/// - `confirm-rollout`, `confirm-traffic-increase`, `confirm-promotion`: gates. A failure
///   only holds the rollout where it is (it is retried on the next step); no failed check.
/// - `pre-rollout`, `rollout`: a failure is a failed check; enough of them (the
///   threshold) roll the canary back.
/// - `rollback`: inverted; a 2xx answer means "roll back now", a failure means carry on.
///   Not a failed check.
/// - `post-rollout`: the rollout is already over; a failure is only logged.
pub fn counts_as_failed_check(kind: WebhookKind) -> bool {
    matches!(kind, WebhookKind::PreRollout | WebhookKind::Rollout)
}

/// `url` fit for logs and errors: without its query string and fragment (secrets often
/// live there; `?…` marks that there was one) and without any userinfo.
pub fn redacted(url: &str) -> String {
    let (base, cut) = match url.find(['?', '#']) {
        Some(i) => (&url[..i], true),
        None => (url, false),
    };
    let (scheme, rest) = match base.find("://") {
        Some(i) => base.split_at(i + 3),
        None => ("", base),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    let mut out = format!("{scheme}{rest}");
    if cut {
        out.push_str("?…");
    }
    out
}

/// Calls webhooks over one pooled HTTP/1.1 client, each call bounded by one timeout.
pub struct HookCaller {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HookCaller {
    /// A caller whose every call gives up after `timeout` (Flagger's default is
    /// [`DEFAULT_HOOK_TIMEOUT`]).
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { client, timeout }
    }

    /// The bound on one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POSTs `payload` as JSON to `hook.url`; `Ok` on any 2xx answer.
    pub async fn call(&self, hook: &Webhook, payload: &HookPayload<'_>) -> Result<(), HookError> {
        let url = redacted(&hook.url);
        let bad = |reason: String| HookError::BadUrl {
            url: url.clone(),
            reason,
        };
        let uri: Uri = hook
            .url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only plain http:// is supported until TLS lands".into()));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("it has no host".into()));
        }
        // Strings and a string map: serializing cannot fail.
        let json = serde_json::to_vec(payload).map_err(|e| bad(e.to_string()))?;
        let request = Request::post(uri)
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("switchyard/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| bad(e.to_string()))?;

        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| HookError::Connect {
                    url: url.clone(),
                    reason: chain(&e),
                })?;
            let code = response.status();
            let mut body = response.into_body();
            let mut read = Vec::new();
            while read.len() < MAX_RESPONSE_BYTES {
                match body.frame().await {
                    None => break,
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            let room = MAX_RESPONSE_BYTES - read.len();
                            read.extend_from_slice(&data[..data.len().min(room)]);
                        }
                    }
                    Some(Err(e)) => {
                        return Err(HookError::Connect {
                            url: url.clone(),
                            reason: format!("the answer broke off: {}", chain(&e)),
                        })
                    }
                }
            }
            if code.is_success() {
                Ok(())
            } else {
                Err(HookError::Status {
                    url: url.clone(),
                    code: code.as_u16(),
                    body: String::from_utf8_lossy(&read)
                        .chars()
                        .take(MAX_ERROR_BODY_CHARS)
                        .collect(),
                })
            }
        };
        let outcome = tokio::time::timeout(self.timeout, exchange).await;
        match outcome {
            Ok(result) => result,
            Err(_) => Err(HookError::Timeout {
                url,
                after: self.timeout,
            }),
        }
    }
}

/// An error and its sources, `outer: inner: ...` (hyper's own message says little:
/// "client error (Connect)"; the OS error is further down).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        out.push_str(": ");
        out.push_str(&inner.to_string());
        cur = inner.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::time::Instant;

    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// What the test server saw of one request.
    struct Seen {
        method: String,
        path: String,
        content_type: String,
        body: Vec<u8>,
    }

    /// An HTTP/1.1 server answering every request with `status` and `body`, reporting
    /// each request it receives.
    async fn server(
        status: u16,
        body: &'static str,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let content_type = req
                                .headers()
                                .get(CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let got = req.into_body().collect().await.expect("body").to_bytes();
                            let _ = tx.send(Seen {
                                method,
                                path,
                                content_type,
                                body: got.to_vec(),
                            });
                            let mut resp =
                                Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(status).expect("status");
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, rx)
    }

    fn payload() -> HookPayload<'static> {
        HookPayload {
            name: "checkout",
            namespace: "shop",
            phase: "Progressing",
            checksum: "6f9c2a",
            kind: WebhookKind::PreRollout,
            metadata: BTreeMap::from([("cmd".to_string(), "hey -z 1m".to_string())]),
        }
    }

    fn hook(url: String) -> Webhook {
        Webhook {
            kind: WebhookKind::PreRollout,
            url,
        }
    }

    #[tokio::test]
    async fn a_hook_receives_flaggers_json() {
        let (addr, mut seen) = server(200, "ok").await;
        let caller = HookCaller::new(Duration::from_secs(5));
        caller
            .call(
                &hook(format!("http://{addr}/gate?token=s3cret")),
                &payload(),
            )
            .await
            .expect("2xx");
        let got = seen.recv().await.expect("a request");
        assert_eq!(got.method, "POST");
        assert_eq!(got.path, "/gate?token=s3cret");
        assert_eq!(got.content_type, "application/json");
        assert_eq!(
            String::from_utf8(got.body).expect("utf-8"),
            r#"{"name":"checkout","namespace":"shop","phase":"Progressing","checksum":"6f9c2a","type":"pre-rollout","metadata":{"cmd":"hey -z 1m"}}"#
        );
    }

    #[test]
    fn empty_metadata_is_left_out_like_go_omitempty() {
        let p = HookPayload {
            metadata: BTreeMap::new(),
            kind: WebhookKind::ConfirmTrafficIncrease,
            ..payload()
        };
        assert_eq!(
            serde_json::to_string(&p).expect("json"),
            r#"{"name":"checkout","namespace":"shop","phase":"Progressing","checksum":"6f9c2a","type":"confirm-traffic-increase"}"#
        );
    }

    #[tokio::test]
    async fn any_2xx_is_success() {
        for status in [200, 202, 204] {
            let (addr, _seen) = server(status, "").await;
            let caller = HookCaller::new(Duration::from_secs(5));
            assert_eq!(
                caller
                    .call(&hook(format!("http://{addr}/")), &payload())
                    .await,
                Ok(()),
                "{status}"
            );
        }
    }

    #[tokio::test]
    async fn a_refusal_carries_the_body_but_not_the_query() {
        let (addr, _seen) = server(500, "load test failed: p99 812ms").await;
        let caller = HookCaller::new(Duration::from_secs(5));
        let err = caller
            .call(&hook(format!("http://{addr}/run?token=s3cret")), &payload())
            .await
            .expect_err("500");
        match &err {
            HookError::Status { url, code, body } => {
                assert_eq!(*code, 500);
                assert_eq!(body, "load test failed: p99 812ms");
                assert_eq!(url, &format!("http://{addr}/run?…"));
            }
            other => panic!("not a status error: {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("load test failed"), "{msg}");
        assert!(msg.contains("500"), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[tokio::test]
    async fn a_silent_hook_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts, and holds the connections open without ever answering.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let bound = Duration::from_millis(200);
        let caller = HookCaller::new(bound);
        let start = Instant::now();
        let err = caller
            .call(&hook(format!("http://{addr}/?token=s3cret")), &payload())
            .await
            .expect_err("timeout");
        let took = start.elapsed();
        assert!(
            matches!(err, HookError::Timeout { after, .. } if after == bound),
            "{err:?}"
        );
        assert!(took >= bound && took < bound * 2, "took {took:?}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let caller = HookCaller::new(Duration::from_secs(5));
        let err = caller
            .call(&hook(format!("http://{addr}/")), &payload())
            .await
            .expect_err("closed");
        assert!(matches!(err, HookError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[tokio::test]
    async fn an_unusable_url_is_refused_before_any_connect() {
        let caller = HookCaller::new(Duration::from_secs(5));
        for url in ["https://gate.test/", "not a url", "http:///x"] {
            let err = caller
                .call(&hook(url.to_string()), &payload())
                .await
                .expect_err(url);
            assert!(matches!(err, HookError::BadUrl { .. }), "{url}: {err:?}");
        }
    }

    #[test]
    fn redaction_drops_query_fragment_and_userinfo() {
        assert_eq!(redacted("http://h.test/a?t=x"), "http://h.test/a?…");
        assert_eq!(redacted("http://h.test/a#frag"), "http://h.test/a?…");
        assert_eq!(redacted("http://u:pw@h.test/a"), "http://h.test/a");
        assert_eq!(redacted("http://h.test/a@b"), "http://h.test/a@b");
        assert_eq!(redacted("http://h.test:80"), "http://h.test:80");
    }

    #[test]
    fn only_pre_rollout_and_rollout_failures_are_failed_checks() {
        for kind in WebhookKind::ALL {
            let expected = matches!(kind, WebhookKind::PreRollout | WebhookKind::Rollout);
            assert_eq!(counts_as_failed_check(kind), expected, "{kind}");
        }
    }
}
