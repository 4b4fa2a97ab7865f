//! Three `switchyard registry` processes on loopback: kill -9 the leader, measure the
//! failover, check nothing acknowledged is lost and no lease expires because of the
//! election, restart the old leader, lose a majority, and watch a sidecar fail over.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_testkit::{assert_eventually, http_get, instance, resolve_ids};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A registry process killed when the test ends.
struct Node {
    id: u64,
    grpc: String,
    http: String,
    child: Option<Child>,
}

impl Node {
    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Ports for peers must be known before the processes start: take free ones from the
/// kernel and release them (a small race with other processes, acceptable in a test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts node `id`; its peer listener is its own entry in `peers`.
fn spawn(id: u64, grpc: &str, http: &str, peers: &str, dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join(format!("node{id}.log"))).expect("log file");
    let own = format!("{id}=");
    let peer_listen = peers
        .split(',')
        .find_map(|p| p.strip_prefix(own.as_str()))
        .expect("peers name this node");
    Command::new(BIN)
        .args([
            "registry",
            "--node-id",
            &id.to_string(),
            "--peers",
            peers,
            "--peer-listen",
            peer_listen,
            "--listen",
            grpc,
            "--http",
            http,
            "--data-dir",
            dir.join(format!("node{id}")).to_str().expect("utf-8"),
            "--lease-checkpoint-interval",
            "500ms",
            "--dns",
            "off",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn registry")
}

async fn status(url: &str) -> Option<pb::StatusResponse> {
    let mut c = ClusterClient::connect(url.to_string()).await.ok()?;
    tokio::time::timeout(Duration::from_millis(500), c.status(pb::StatusRequest {}))
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
}

async fn leader_of(nodes: &[Node], limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        for n in nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(s) = status(&n.url()).await {
                if s.leader_id != 0 && s.role == "leader" {
                    return s.node_id;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader within {limit:?}");
        // Poll interval of a wait bounded by `deadline`; the nodes are real processes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leader once every node reports the same one (within `limit`).
async fn agreed_leader(nodes: &[Node], limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let mut seen = Vec::new();
        for n in nodes.iter().filter(|n| n.child.is_some()) {
            seen.push(status(&n.url()).await.map_or(0, |s| s.leader_id));
        }
        if seen[0] != 0 && seen.iter().all(|l| *l == seen[0]) {
            return seen[0];
        }
        assert!(
            Instant::now() < deadline,
            "the nodes did not agree on a leader within {limit:?}: {seen:?}"
        );
        // Poll interval of a wait bounded by `deadline`; the nodes are real processes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register(url: &str, id: &str, ttl: u32) -> Result<pb::RegisterResponse, tonic::Status> {
    let channel = Channel::from_shared(url.to_string())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    RegistryClient::new(channel)
        .register(pb::RegisterRequest {
            instance: Some(instance("web", id, "1.0.0")),
            ttl_seconds: ttl,
            lease_id: 0,
        })
        .await
        .map(|r| r.into_inner())
}

async fn ids(url: &str) -> Vec<String> {
    let mut d = DiscoveryClient::connect(url.to_string())
        .await
        .expect("connect");
    let mut ids = resolve_ids(&mut d, "web").await;
    ids.sort();
    ids
}

/// Renews `leases` every second through `urls` (in turn, reopening the stream when it
/// breaks), until `stop` flips. Bounded: at most 120 rounds.
fn keep_alive(
    urls: Vec<String>,
    leases: Vec<u64>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in 0..120usize {
            if *stop.borrow() {
                return;
            }
            let url = &urls[n % urls.len()];
            let Ok(mut client) = RegistryClient::connect(url.clone()).await else {
                // Pause before retrying a registry that does not answer (a renewer's pace).
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let (tx, rx) = mpsc::channel(4);
            let Ok(resp) = client.keep_alive(ReceiverStream::new(rx)).await else {
                // Pause before retrying a registry that does not answer (a renewer's pace).
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut resp = resp.into_inner();
            loop {
                if *stop.borrow()
                    || tx
                        .send(pb::KeepAliveRequest {
                            lease_ids: leases.clone(),
                        })
                        .await
                        .is_err()
                {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(2), resp.message()).await {
                    Ok(Ok(Some(_))) => {
                        // The renewer's pace: one keep-alive a second keeps 5 s leases alive.
                        tokio::time::sleep(Duration::from_millis(1000)).await
                    }
                    _ => break,
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_registry_processes_survive_losing_the_leader() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let peers = (0..3)
        .map(|i| format!("{}=127.0.0.1:{}", i + 1, free_port()))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Node> = ports
        .iter()
        .enumerate()
        .map(|(i, (g, h))| {
            let id = i as u64 + 1;
            let grpc = format!("127.0.0.1:{g}");
            let http = format!("127.0.0.1:{h}");
            let child = spawn(id, &grpc, &http, &peers, dir.path());
            Node {
                id,
                grpc,
                http,
                child: Some(child),
            }
        })
        .collect();
    let leader = leader_of(&nodes, Duration::from_secs(15)).await;
    let follower = nodes
        .iter()
        .find(|n| n.id != leader)
        .expect("a follower")
        .url();

    // 30 registrations through a follower (forwarded to the leader), TTL 5 s, kept alive.
    let mut acknowledged = Vec::new();
    let mut leases = Vec::new();
    for n in 0..30 {
        let id = format!("web-{n:02}");
        let r = register(&follower, &id, 5)
            .await
            .expect("register through a follower");
        acknowledged.push(id);
        leases.push(r.lease_id);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let survivors: Vec<String> = nodes
        .iter()
        .filter(|n| n.id != leader)
        .map(Node::url)
        .collect();
    let renewer = keep_alive(survivors.clone(), leases.clone(), stop_rx);

    // A sidecar watching all three registries.
    let sidecar_dir = tempfile::tempdir().expect("temp dir");
    let mut config = switchyard_sidecar::SidecarConfig::new(nodes.iter().map(Node::url).collect());
    config.discovery.cache_file = Some(sidecar_dir.path().join("catalog.json"));
    config.discovery.backoff_max = Duration::from_millis(300);
    let sidecar = switchyard_sidecar::start(
        config,
        switchyard_sidecar::SidecarListeners {
            workers: Vec::new(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
            http_proxy: None,
            upstreams: vec![],
            http_upstreams: vec![],
            dns: None,
            inbound: None,
        },
    )
    .await
    .expect("sidecar");
    assert_eventually(
        Duration::from_secs(10),
        "the sidecar sees the 30 instances",
        || async { sidecar.table.get("web").map_or(0, |v| v.endpoints.len()) >= 30 },
    )
    .await;

    // A dead instance: TTL 6 s, never renewed, registered 3 s before the kill. With its
    // checkpoints honoured the new leader gives it max(3 s left, 3 s grace) from the
    // election, about 5 s after the kill; a full TTL would keep it past 7.5 s.
    register(&follower, "dead-one", 6)
        .await
        .expect("register the dead one");
    // Wall time on purpose: the dead instance's lease must have run for 3 s of the
    // real processes' clocks before the kill.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // kill -9 the leader; measure until a surviving node accepts a write.
    let killed_at = Instant::now();
    nodes
        .iter_mut()
        .find(|n| n.id == leader)
        .expect("leader")
        .kill9();
    let mut written = None;
    'retry: for attempt in 0..500 {
        for url in &survivors {
            if register(url, &format!("after-{attempt}"), 30).await.is_ok() {
                written = Some(killed_at.elapsed());
                break 'retry;
            }
        }
        // Retry pace while measuring the failover (the measurement is wall time).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = written.expect("a new leader accepted a write");
    println!("kill -9 of the leader (node {leader}): writes accepted again after {failover:?}");
    assert!(
        failover < Duration::from_secs(3),
        "failover took {failover:?}"
    );

    // The dead instance expires within a bounded error of its real deadline.
    let deadline = killed_at + Duration::from_secs(7);
    loop {
        if !ids(&survivors[0]).await.contains(&"dead-one".to_string()) {
            break;
        }
        if Instant::now() >= deadline {
            let mut report = String::new();
            for n in nodes.iter().filter(|n| n.child.is_some()) {
                let log = std::fs::read_to_string(dir.path().join(format!("node{}.log", n.id)))
                    .unwrap_or_default();
                for l in log
                    .lines()
                    .filter(|l| l.contains("leads now") || l.contains("checkpoint"))
                {
                    report.push_str(&format!("node {} log: {l}\n", n.id));
                }
                let m = http_get(n.http.parse().expect("addr"), "/metrics").await.1;
                for l in m.lines().filter(|l| {
                    l.contains("self_preservation ")
                        || l.contains("raft_is_leader ")
                        || l.contains("expiries_total")
                        || l.contains("switchyard_registry_leases ")
                }) {
                    report.push_str(&format!("node {}: {l}\n", n.id));
                }
            }
            panic!("the dead instance outlived its checkpointed TTL:\n{report}");
        }
        // Poll interval of a wait bounded by `deadline` (with a report on failure).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "the never-renewed instance expired {:?} after the kill",
        killed_at.elapsed()
    );

    // Every acknowledged registration is still there, and none expires because of the
    // election: wait past the 5 s TTL, renewing through the survivors.
    // Wall time on purpose: nothing may expire over the real processes' lease clocks.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(killed_at.elapsed())).await;
    let present = ids(&survivors[0]).await;
    for id in &acknowledged {
        assert!(present.contains(id), "{id} lost after the failover");
    }
    let new_leader = leader_of(&nodes, Duration::from_secs(5)).await;
    let leader_http = nodes
        .iter()
        .find(|n| n.id == new_leader)
        .expect("node")
        .http
        .clone();
    let metrics = http_get(leader_http.parse().expect("addr"), "/metrics")
        .await
        .1;
    let expiries: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_registry_lease_expiries_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("expiry counter");
    assert_eq!(
        expiries, 1.0,
        "only the dead instance's lease expired, none because of the election"
    );

    // The sidecar failed over and sees a write made after the failover.
    assert_eventually(
        Duration::from_secs(10),
        "the sidecar fails over",
        || async {
            sidecar.table.get("web").map_or(0, |v| v.endpoints.len()) >= 31
                && sidecar.table.is_connected()
        },
    )
    .await;

    // The old leader restarts and catches up.
    let old = nodes
        .iter_mut()
        .find(|n| n.id == leader)
        .expect("old leader");
    old.child = Some(spawn(
        old.id,
        &old.grpc.clone(),
        &old.http.clone(),
        &peers,
        dir.path(),
    ));
    let old_url = old.url();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leader_status = status(
            &nodes
                .iter()
                .find(|n| n.id == new_leader)
                .expect("leader")
                .url(),
        )
        .await;
        let old_status = status(&old_url).await;
        if let (Some(l), Some(o)) = (leader_status, old_status) {
            if o.applied_index >= l.commit_index
                && o.revision == l.revision
                && o.leader_id == new_leader
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node did not catch up"
        );
        // Poll interval of a wait bounded by `deadline`; the nodes are real processes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ids(&old_url).await, ids(&survivors[0]).await);

    // Lose a majority: the last node refuses writes quickly and clearly, reads still work.
    let _ = stop_tx.send(true);
    let _ = renewer.await;
    let last = nodes
        .iter()
        .find(|n| n.id != new_leader && n.id != leader)
        .expect("third node")
        .id;
    for n in nodes.iter_mut().filter(|n| n.id != last) {
        n.kill9();
    }
    let last_url = nodes.iter().find(|n| n.id == last).expect("last").url();
    // Wall time on purpose: the last node must have lost its peers' heartbeats.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = Instant::now();
    let err = register(&last_url, "no-quorum", 30)
        .await
        .expect_err("no majority");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("majority"), "{}", err.message());
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "failed in {:?}",
        asked.elapsed()
    );
    assert!(ids(&last_url).await.len() >= 30, "reads still answer");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_a_running_registry_and_is_removed_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (g1, h1, g2, h2) = (free_port(), free_port(), free_port(), free_port());
    let first_grpc = format!("127.0.0.1:{g1}");
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log");
    let mut first = Node {
        id: 1,
        grpc: first_grpc.clone(),
        http: format!("127.0.0.1:{h1}"),
        child: Some(
            Command::new(BIN)
                .args([
                    "registry",
                    "--dns",
                    "off",
                    "--listen",
                    &first_grpc,
                    "--peer-listen",
                    "127.0.0.1:0",
                    "--http",
                    &format!("127.0.0.1:{h1}"),
                ])
                .arg("--data-dir")
                .arg(dir.path().join("n1"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log("n1.log"))
                .spawn()
                .expect("spawn"),
        ),
    };
    leader_of(std::slice::from_ref(&first), Duration::from_secs(10)).await;
    register(&first.url(), "before-join", 60)
        .await
        .expect("register");

    let second_grpc = format!("127.0.0.1:{g2}");
    let mut second = Node {
        id: 2,
        grpc: second_grpc.clone(),
        http: format!("127.0.0.1:{h2}"),
        child: Some(
            Command::new(BIN)
                .args([
                    "registry",
                    "--dns",
                    "off",
                    "--node-id",
                    "2",
                    "--join",
                    &first_grpc,
                    "--listen",
                    &second_grpc,
                    "--peer-listen",
                    &format!("127.0.0.1:{}", free_port()),
                    "--http",
                    &format!("127.0.0.1:{h2}"),
                ])
                .arg("--data-dir")
                .arg(dir.path().join("n2"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log("n2.log"))
                .spawn()
                .expect("spawn"),
        ),
    };
    // The joiner becomes a voter and serves the catalog it caught up on.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let voters = status(&second.url())
            .await
            .map(|s| s.members.iter().filter(|m| m.voter).count())
            .unwrap_or(0);
        if voters == 2
            && ids(&second.url())
                .await
                .contains(&"before-join".to_string())
        {
            break;
        }
        assert!(Instant::now() < deadline, "node 2 did not join");
        // Poll interval of a wait bounded by `deadline`; the nodes are real processes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `switchyard members remove` through the CLI.
    let out = Command::new(BIN)
        .args(["members", "remove", "2", "--registry", &second.url()])
        .output()
        .expect("members remove");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eventually(
        Duration::from_secs(10),
        "node 2 is no longer a member",
        || async { status(&first.url()).await.map(|s| s.members.len()) == Some(1) },
    )
    .await;
    // The single remaining node still takes writes alone.
    register(&first.url(), "after-remove", 60)
        .await
        .expect("write after the removal");
    second.kill9();
    first.kill9();
}

/// Found by the chaos test: a KeepAlive stream opened on the leader went on renewing
/// there after another node took over (the leader was paused with SIGSTOP, the others
/// elected, it resumed), so the new leader, which never saw those renewals, expired the
/// leases. The stream now ends with UNAVAILABLE at its first message after the
/// leadership moved, and the client reconnects (any node relays to the leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_on_a_deposed_leader_ends_so_the_client_reconnects() {
    let dir = tempfile::tempdir().expect("temp dir");
    let peers = (0..3)
        .map(|i| format!("{}=127.0.0.1:{}", i + 1, free_port()))
        .collect::<Vec<_>>()
        .join(",");
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let id = i as u64 + 1;
            let grpc = format!("127.0.0.1:{}", free_port());
            let http = format!("127.0.0.1:{}", free_port());
            let child = spawn(id, &grpc, &http, &peers, dir.path());
            Node {
                id,
                grpc,
                http,
                child: Some(child),
            }
        })
        .collect();
    // A leader every node agrees on: one elected at start-up can be deposed a moment
    // later, and a stream opened on a follower is relayed to the leader (and renews
    // there, rightly), which is not the case under test.
    let leader = agreed_leader(&nodes, Duration::from_secs(15)).await;
    let old = nodes.iter().find(|n| n.id == leader).expect("the leader");
    let pid = old.child.as_ref().expect("running").id().to_string();
    let r = register(&old.url(), "web-1", 30).await.expect("register");
    let mut client = RegistryClient::connect(old.url()).await.expect("connect");
    let (tx, rx) = mpsc::channel(4);
    let mut answers = client
        .keep_alive(ReceiverStream::new(rx))
        .await
        .expect("keep-alive")
        .into_inner();
    let renew = pb::KeepAliveRequest {
        lease_ids: vec![r.lease_id],
    };
    tx.send(renew.clone()).await.expect("send");
    let first = answers.message().await.expect("answer").expect("a message");
    assert!(first.leases[0].found);
    assert!(
        status(&old.url()).await.is_some_and(|s| s.role == "leader"),
        "node {leader} stopped leading before the test paused it"
    );

    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let others: Vec<String> = nodes
        .iter()
        .filter(|n| n.id != leader)
        .map(Node::url)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    'elected: loop {
        for url in &others {
            if status(url).await.is_some_and(|s| s.role == "leader") {
                break 'elected;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new leader while the old one is paused"
        );
        // Poll interval of a wait bounded by `deadline`; the nodes are real processes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&old.url()).await.is_none_or(|s| s.role == "leader") {
        assert!(
            Instant::now() < deadline,
            "the old leader never stepped down"
        );
        // Poll interval of a wait bounded by `deadline`; the nodes are real processes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.send(renew).await.expect("send");
    let ended = tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .expect("an answer in time")
        .expect_err("the deposed leader does not renew");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended}");
    assert!(ended.message().contains("no longer leads"), "{ended}");
}
