//! Automated rollouts end to end: a real registry (or a three-node cluster) runs the
//! rollout, a real sidecar proxies real HTTP traffic to two versions of `web` and
//! reports per-version health, and the backends count what reached them. The gate
//! decides from what the backends answered; the tests look at the rollout's state and
//! at the backends' counters.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_proto::v1::rollouts_client::RolloutsClient;
use switchyard_proto::v1::routing_client::RoutingClient;
use switchyard_registry::RegistryHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

struct Setup {
    _dir: tempfile::TempDir,
    registries: Vec<Option<RegistryHandle>>,
    sidecar: switchyard_sidecar::SidecarHandle,
    stable: Backend,
    canary: Backend,
}

/// `web` 1.0 (stable) and 2.0 (canary) behind a sidecar that reports every 200 ms, with
/// one registry or a three-node cluster.
async fn setup(cluster: bool) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let registries: Vec<RegistryHandle> = if cluster {
        start_cluster(dir.path()).await.0.into_iter().collect()
    } else {
        vec![start_registry(&dir.path().join("reg")).await]
    };
    let urls: Vec<String> = registries
        .iter()
        .map(|r| format!("http://{}", r.grpc_addr))
        .collect();
    let mut client = eventually(Duration::from_secs(10), || async {
        registry_client(&registries[0]).await.into()
    })
    .await;
    let stable = Backend::start("stable", Duration::ZERO).await;
    let canary = Backend::start("canary", Duration::ZERO).await;
    register_at(&mut client, "web", "stable", stable.addr, "1.0", 100).await;
    register_at(&mut client, "web", "canary", canary.addr, "2.0", 100).await;
    let mut config = sidecar_config(urls, dir.path());
    config.telemetry.interval = Duration::from_millis(200);
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "web", 2).await;
    Setup {
        _dir: dir,
        registries: registries.into_iter().map(Some).collect(),
        sidecar,
        stable,
        canary,
    }
}

impl Setup {
    fn addr(&self) -> SocketAddr {
        self.registries
            .iter()
            .flatten()
            .next()
            .expect("a registry is up")
            .grpc_addr
    }

    async fn rollouts(&self) -> RolloutsClient<Channel> {
        RolloutsClient::connect(format!("http://{}", self.addr()))
            .await
            .expect("connect")
    }

    async fn start(&self, spec: pb::RolloutSpec) -> pb::Rollout {
        self.rollouts()
            .await
            .start(pb::StartRolloutRequest {
                namespace: String::new(),
                service: "web".into(),
                spec: Some(spec),
            })
            .await
            .expect("start")
            .into_inner()
            .rollout
            .expect("rollout")
    }

    /// The newest rollout. A follower may not have applied a write the leader just
    /// acknowledged, so NOT_FOUND is asked again (for a few seconds).
    async fn get(&self) -> pb::Rollout {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self
                .rollouts()
                .await
                .get(pb::RolloutRef {
                    namespace: String::new(),
                    service: "web".into(),
                })
                .await
            {
                Ok(r) => return r.into_inner().rollout.expect("rollout"),
                Err(e) if e.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                    // Poll interval of a wait bounded by its deadline.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("get: {e}"),
            }
        }
    }

    /// Waits until the rollout is in `phase`, failing at once if it ends elsewhere.
    async fn wait_phase(&self, phase: pb::RolloutPhase, limit: Duration) -> pb::Rollout {
        let deadline = Instant::now() + limit;
        loop {
            let r = self.get().await;
            let now = status(&r).phase();
            if now == phase {
                return r;
            }
            let ended = matches!(
                now,
                pb::RolloutPhase::Succeeded
                    | pb::RolloutPhase::Aborted
                    | pb::RolloutPhase::Superseded
            );
            assert!(!ended, "the rollout ended {now:?}, not {phase:?}: {r:#?}");
            assert!(
                Instant::now() < deadline,
                "not {phase:?} within {limit:?}: {r:#?}"
            );
            // Poll interval of a wait bounded by its deadline.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The default split of `web`'s current policy, as (version, weight).
    async fn split(&self) -> Vec<(String, u32)> {
        let mut c = RoutingClient::connect(format!("http://{}", self.addr()))
            .await
            .expect("connect");
        let current = c
            .get_policy(pb::GetPolicyRequest {
                namespace: String::new(),
                service: "web".into(),
            })
            .await
            .expect("get policy")
            .into_inner()
            .current;
        current
            .and_then(|r| r.policy)
            .map(|p| {
                p.default_split
                    .into_iter()
                    .map(|s| (s.subset, s.weight))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends `n` requests through the sidecar; how many the caller saw fail.
    async fn send(&self, n: usize) -> usize {
        let http = http_client();
        let proxy = self.sidecar.http_proxy_addr.expect("proxy");
        let mut failed = 0;
        for _ in 0..n {
            let (status, _, _) = get(&http, proxy, "web").await;
            failed += usize::from(status != 200);
        }
        failed
    }
}

fn status(r: &pb::Rollout) -> &pb::RolloutStatus {
    r.status.as_ref().expect("status")
}

fn evidence(r: &pb::Rollout) -> &pb::RolloutEvidence {
    status(r).evidence.as_ref().expect("evidence")
}

/// Steady traffic through the sidecar until dropped (at most 3 minutes, about 250
/// requests a second).
struct Traffic {
    stop: Arc<AtomicBool>,
}

impl Traffic {
    fn start(s: &Setup) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let proxy = s.sidecar.http_proxy_addr.expect("proxy");
        for _ in 0..2 {
            let stop = stop.clone();
            tokio::spawn(async move {
                let http = http_client();
                let until = Instant::now() + Duration::from_secs(180);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    let _ = get(&http, proxy, "web").await;
                    // Paces the load (about 125 requests a second per task).
                    tokio::time::sleep(Duration::from_millis(8)).await;
                }
            });
        }
        Traffic { stop }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn spec(steps: &[u32], pause_ms: u64, min_requests: u64) -> pb::RolloutSpec {
    pb::RolloutSpec {
        canary: "2.0".into(),
        steps: steps.to_vec(),
        pause_ms,
        interval_ms: 300,
        min_requests,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_healthy_canary_promotes_itself_through_every_step() {
    let s = setup(false).await;
    let _traffic = Traffic::start(&s);
    let started = s.start(spec(&[20, 60, 100], 1_000, 30)).await;
    assert_eq!(
        started.spec.as_ref().map(|p| p.baseline.as_str()),
        Some("1.0"),
        "the baseline is the serving version"
    );
    // Watch it go through each step's weight.
    let mut watch = s
        .rollouts()
        .await
        .watch(pb::RolloutRef {
            namespace: String::new(),
            service: "web".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut weights = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let next = tokio::time::timeout_at(deadline.into(), watch.message())
            .await
            .expect("the rollout ended within 90 s")
            .expect("watch stream")
            .expect("an event");
        let r = next.rollout.expect("rollout");
        let st = status(&r);
        if weights.last() != Some(&st.weight) {
            weights.push(st.weight);
        }
        match st.phase() {
            pb::RolloutPhase::Succeeded => break r,
            pb::RolloutPhase::Aborted | pb::RolloutPhase::Paused => {
                panic!("a healthy canary must not stop: {r:#?}")
            }
            _ => {}
        }
    };
    for w in [20, 60, 100] {
        assert!(weights.contains(&w), "went through {w}%: {weights:?}");
    }
    let e = evidence(&done);
    assert!(e.canary.as_ref().map_or(0, |c| c.requests) >= 60, "{e:?}");
    assert!(e.error_e < 20.0, "{e:?}");
    assert_eq!(s.split().await, vec![("2.0".to_string(), 100)]);
    // Once the sidecar has the final policy, the stable backend gets nothing.
    drop(_traffic);
    eventually(Duration::from_secs(5), || async {
        let before = s.stable.hits();
        s.send(20).await;
        (s.stable.hits() == before).then_some(())
    })
    .await;
    s.sidecar.shutdown().await;
}

#[tokio::test]
async fn a_canary_with_twice_the_baseline_error_rate_is_aborted_and_traffic_returns_to_baseline() {
    let s = setup(false).await;
    s.stable.fail_per_mille.store(100, Ordering::Relaxed);
    s.canary.fail_per_mille.store(200, Ordering::Relaxed);
    let traffic = Traffic::start(&s);
    // A long pause: only the gate can end this rollout in time.
    s.start(spec(&[50, 100], 120_000, 50)).await;
    let aborted = s
        .wait_phase(pb::RolloutPhase::Aborted, Duration::from_secs(60))
        .await;
    let st = status(&aborted);
    assert!(
        st.message.contains("errors are worse"),
        "aborted by the gate: {}",
        st.message
    );
    assert_eq!(st.weight, 0);
    let e = evidence(&aborted);
    assert!(e.error_e >= 20.0, "E reached 1/alpha: {e:?}");
    assert_eq!(s.split().await, vec![("1.0".to_string(), 100)]);
    drop(traffic);
    // Without errors now, so the sidecar's retries do not add attempts to the count.
    s.stable.fail_per_mille.store(0, Ordering::Relaxed);
    s.canary.fail_per_mille.store(0, Ordering::Relaxed);
    // Counted at the backends: once the sidecar has the policy, the canary gets nothing.
    eventually(Duration::from_secs(5), || async {
        let before = s.canary.hits();
        s.send(50).await;
        (s.canary.hits() == before).then_some(())
    })
    .await;
    let before = (s.stable.hits(), s.canary.hits());
    s.send(100).await;
    // At least the 100 (a request of the stopped load may still land there too).
    assert!(s.stable.hits() >= before.0 + 100);
    assert_eq!(s.canary.hits(), before.1);
    s.sidecar.shutdown().await;
}

#[tokio::test]
async fn an_idle_canary_pauses_instead_of_failing_or_promoting() {
    let s = setup(false).await;
    let mut idle = spec(&[50, 100], 500, 100);
    idle.step_deadline_ms = 2_000;
    s.start(idle).await;
    let paused = s
        .wait_phase(pb::RolloutPhase::Paused, Duration::from_secs(20))
        .await;
    let st = status(&paused);
    assert_eq!(st.pause_reason(), pb::PauseReason::InsufficientTraffic);
    assert!(st.message.contains("canary requests"), "{}", st.message);
    assert_eq!(st.weight, 50);
    // It stays paused: no silent promotion, no spurious failure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = s.get().await;
    assert_eq!(status(&later).phase(), pb::RolloutPhase::Paused);
    assert_eq!(status(&later).weight, 50);
    // An operator's promote goes on from there.
    let promoted = s
        .rollouts()
        .await
        .promote(pb::PromoteRolloutRequest {
            namespace: String::new(),
            service: "web".into(),
            full: true,
        })
        .await
        .expect("promote")
        .into_inner()
        .rollout
        .expect("rollout");
    assert_eq!(status(&promoted).phase(), pb::RolloutPhase::Promoting);
    s.wait_phase(pb::RolloutPhase::Succeeded, Duration::from_secs(10))
        .await;
    assert_eq!(s.split().await, vec![("2.0".to_string(), 100)]);
    s.sidecar.shutdown().await;
}

async fn leader_of(s: &Setup) -> usize {
    eventually(Duration::from_secs(15), || async {
        let mut c = ClusterClient::connect(format!("http://{}", s.addr()))
            .await
            .ok()?;
        let id = c
            .status(pb::StatusRequest {})
            .await
            .ok()?
            .into_inner()
            .leader_id;
        let i = (id as usize).checked_sub(1)?;
        s.registries.get(i)?.as_ref().map(|_| i)
    })
    .await
}

#[tokio::test]
async fn a_rollout_continues_where_it_was_after_the_leader_is_killed() {
    let mut s = setup(true).await;
    let _traffic = Traffic::start(&s);
    s.start(spec(&[25, 50, 100], 1_500, 30)).await;
    // Wait until it is well under way (the second step), then kill the leader.
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let r = s.get().await;
        if status(&r).step >= 1 {
            break r;
        }
        assert!(Instant::now() < deadline, "no second step: {r:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader = leader_of(&s).await;
    s.registries[leader]
        .take()
        .expect("the leader")
        .shutdown()
        .await;
    let done = s
        .wait_phase(pb::RolloutPhase::Succeeded, Duration::from_secs(90))
        .await;
    // The state and its evidence were kept: the new leader went on from them.
    let (b, d) = (evidence(&before), evidence(&done));
    let requests = |c: &Option<pb::RolloutCounts>| c.as_ref().map_or(0, |c| c.requests);
    assert!(
        requests(&d.canary) >= requests(&b.canary)
            && requests(&d.baseline) >= requests(&b.baseline),
        "{b:?} then {d:?}"
    );
    assert!(status(&done).generation > status(&before).generation);
    assert_eq!(s.split().await, vec![("2.0".to_string(), 100)]);
    s.sidecar.shutdown().await;
    for r in s.registries.iter_mut().filter_map(Option::take) {
        r.shutdown().await;
    }
}

/// A webhook: answers every POST with the status in `code`, and keeps each body.
struct Hook {
    url: String,
    code: Arc<AtomicU64>,
    bodies: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Hook {
    async fn start(code: u16) -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let code = Arc::new(AtomicU64::new(u64::from(code)));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, b) = (code.clone(), bodies.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (c, b) = (c.clone(), b.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // One request per connection: head, then content-length bytes.
                    while buf.len() < 65_536 {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text[..end]
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                b.lock()
                                    .expect("bodies")
                                    .push(text[end + 4..end + 4 + len].to_string());
                                break;
                            }
                        }
                    }
                    let code = c.load(Ordering::Relaxed);
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        Hook { url, code, bodies }
    }
}

#[tokio::test]
async fn webhooks_gate_the_rollout_with_flaggers_payload() {
    let s = setup(false).await;
    let pre = Hook::start(200).await;
    let confirm = Hook::start(403).await;
    let _traffic = Traffic::start(&s);
    let mut with_hooks = spec(&[50, 100], 500, 20);
    with_hooks.webhooks = vec![
        pb::Webhook {
            r#type: "pre-rollout".into(),
            url: pre.url.clone(),
        },
        pb::Webhook {
            r#type: "confirm-promotion".into(),
            url: confirm.url.clone(),
        },
    ];
    s.start(with_hooks).await;
    let waiting = s
        .wait_phase(pb::RolloutPhase::Paused, Duration::from_secs(60))
        .await;
    let st = status(&waiting);
    assert_eq!(st.pause_reason(), pb::PauseReason::WaitingForGate);
    assert!(st.message.contains("confirm-promotion"), "{}", st.message);
    // Held where it is: not promoted while the gate says no.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = s.get().await;
    assert_eq!(status(&held).phase(), pb::RolloutPhase::Paused);
    assert_eq!(status(&held).step, 1, "at its last step, not promoted");
    confirm.code.store(200, Ordering::Relaxed);
    s.wait_phase(pb::RolloutPhase::Succeeded, Duration::from_secs(20))
        .await;
    assert_eq!(s.split().await, vec![("2.0".to_string(), 100)]);
    // Flagger's payload: name, namespace, phase, checksum, metadata.
    let bodies = pre.bodies.lock().expect("bodies").clone();
    let first: serde_json::Value =
        serde_json::from_str(bodies.first().expect("pre-rollout was called")).expect("json");
    assert_eq!(first["name"], "web");
    assert_eq!(first["namespace"], "default");
    assert_eq!(first["type"], "pre-rollout");
    assert!(first["checksum"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(first["metadata"]["canary"], "2.0");
    assert!(!confirm.bodies.lock().expect("bodies").is_empty());
    s.sidecar.shutdown().await;
}

#[tokio::test]
async fn losing_every_canary_pauses_with_its_share_on_the_baseline_and_an_abort_is_one_revision() {
    let s = setup(false).await;
    let _traffic = Traffic::start(&s);
    s.start(spec(&[50, 100], 120_000, 20)).await;
    eventually(Duration::from_secs(20), || async {
        (status(&s.get().await).weight == 50).then_some(())
    })
    .await;
    let mut client = registry_client(s.registries[0].as_ref().expect("up")).await;
    client
        .deregister(pb::DeregisterRequest {
            namespace: String::new(),
            id: "canary".into(),
        })
        .await
        .expect("deregister");
    let paused = s
        .wait_phase(pb::RolloutPhase::Paused, Duration::from_secs(10))
        .await;
    assert_eq!(
        status(&paused).pause_reason(),
        pb::PauseReason::NoCanaryEndpoints
    );
    assert_eq!(s.split().await, vec![("1.0".to_string(), 100)]);
    // The canary is back: the step starts again at its weight.
    register_at(&mut client, "web", "canary", s.canary.addr, "2.0", 100).await;
    let resumed = s
        .wait_phase(pb::RolloutPhase::Progressing, Duration::from_secs(10))
        .await;
    assert_eq!(status(&resumed).weight, 50);
    assert_eq!(
        s.split().await,
        vec![("1.0".to_string(), 50), ("2.0".to_string(), 50)]
    );
    // An abort is immediate and writes exactly one policy revision.
    let mut routing = RoutingClient::connect(format!("http://{}", s.addr()))
        .await
        .expect("connect");
    let history = |r: pb::PolicyHistoryResponse| r.records.len();
    let req = || pb::PolicyHistoryRequest {
        namespace: String::new(),
        service: "web".into(),
    };
    let before = history(
        routing
            .policy_history(req())
            .await
            .expect("history")
            .into_inner(),
    );
    let aborted = s
        .rollouts()
        .await
        .abort(pb::RolloutRef {
            namespace: String::new(),
            service: "web".into(),
        })
        .await
        .expect("abort")
        .into_inner()
        .rollout
        .expect("rollout");
    assert_eq!(status(&aborted).phase(), pb::RolloutPhase::Aborted);
    let after = history(
        routing
            .policy_history(req())
            .await
            .expect("history")
            .into_inner(),
    );
    assert_eq!(after, before + 1);
    assert_eq!(s.split().await, vec![("1.0".to_string(), 100)]);
    s.sidecar.shutdown().await;
}
