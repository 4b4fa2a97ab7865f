//! A chaos test of the whole system (issue 20, point 1), with real processes and a seeded
//! fault schedule.
//!
//! # What runs
//!
//! - Three `switchyard registry` nodes with TLS on every port (`switchyard tls init`),
//!   ACLs bootstrapped (`switchyard acl bootstrap`, then one token per kind of client),
//!   `--snapshot-every 500` so snapshots and log compaction happen under the faults, each
//!   data dir on its own small tmpfs (root only; a temp dir otherwise).
//! - Six `switchyard sidecar` processes with mesh identities: `web-a` and `web-b` carry the
//!   load (their HTTP proxies) and report telemetry every second; `api-v1-a`, `api-v1-b`
//!   (stable, 1.0.0) and `api-v2-a`, `api-v2-b` (canary, 2.0.0) sit in front of in-process
//!   HTTP backends on loopback and take the calls on their mesh inbound ports: web → api is
//!   mutual TLS, with an `allow web api` intention.
//! - HTTP load (three workers, `Host: api`, a fresh connection per request) through the
//!   web sidecars' proxies. A proxy being restarted is taken out of the rotation first.
//! - Three registration clients (gRPC, in this process): each registers fresh instances of
//!   service `reg` under one lease (TTL 10 s) it renews every second on a KeepAlive stream,
//!   deregisters some, and resolves `reg` on random nodes. Every attempt is recorded with
//!   its node, its invoke and complete times and its outcome (acknowledged with a
//!   revision, unknown, or "gone"); a failed attempt is retried on the next node until
//!   acknowledged (at most 40 s). A KeepAlive answer found=false is confirmed by a
//!   Register on the lease before the client believes it (NOT_FOUND: the lease is gone).
//! - Three Watch clients (all services), reconnecting on errors to the next node and
//!   resuming from the last revision they saw; the third also hops to the node restarted
//!   last, as soon as it serves (what a sidecar failing over may do).
//! - A rollout in progress: `route split api 1.0.0=100`, then `switchyard rollout start
//!   api --canary 2.0.0 --baseline 1.0.0 --steps 20,50,100 --latency-slo 1s` (pause: a
//!   sixth of the faults' time, 3-90 s) when the faults begin; every backend is healthy
//!   and fast, so without faults it ends Succeeded with 100 % on 2.0.0.
//!
//! # The fault schedule
//!
//! A `u64` seed (`SWITCHYARD_CHAOS_SEED`, default [`DEFAULT_SEED`]) drives a xorshift64*
//! generator that plans, before anything starts (the plan is printed): one fault of each
//! kind in a seeded order, then more seeded faults while `SWITCHYARD_CHAOS_SECS` (default
//! [`DEFAULT_SECS`]) lasts, one at a time, each followed by a wait for the cluster to settle:
//!
//! - `kill -9` of the leader or a follower, restarted after a few seconds;
//! - the leader cut off: the nodes live in network namespaces on a bridge (as
//!   tests/partition.rs), and its bridge port goes down for a few seconds. The test itself,
//!   the sidecars and the backends then run in a fourth namespace on the same bridge (the
//!   test re-runs itself there), so nothing touches the host's network. Where `ip netns`
//!   fails the nodes run on loopback and a kill replaces the partition (it says so);
//! - `SIGSTOP`/`SIGCONT` of the leader or a follower;
//! - a full disk: the node's tmpfs is filled until it exits 74 (the registrations' own
//!   writes get there within a second; after 3 s small KV ballast is written too); then
//!   the space is freed and it restarts on the same data dir;
//! - the whole registry down: all three nodes `kill -9`ed for a few seconds, and one web
//!   sidecar is `kill -9`ed and restarted meanwhile, so it must route from its cache file.
//!
//! Beside them, on a second seeded timeline, sidecars are restarted gracefully (SIGTERM:
//! drain, deregister; then started again), never during the whole-registry outage, and a
//! canary sidecar only once the rollout has ended (a canary restart's connection errors
//! are evidence against the canary, which would change the rollout's outcome).
//!
//! # The checks
//!
//! Asserted (hard guarantees): no request through the sidecars fails while one registry
//! node is down, nor while the whole registry is down; no acknowledged registration is
//! lost; no watcher ever sees a revision lower than one it saw (same cluster id); after
//! the faults stop (and once every sidecar has registered again: a registrar that found
//! no registry backs off up to 10 s) every node and every watcher holds the leader's
//! instances (id, service, version, state, ports) within [`CONVERGENCE_BOUND`], compared
//! through Discovery on each node; no lease expires while its holder keeps renewing it (the
//! registry's `switchyard_registry_lease_expiries_total` stays 0 on every node, since no
//! lease in this test is ever abandoned, and no instance disappears without its owner's
//! deregistration); the rollout ends Succeeded with every request on 2.0.0 over mutual
//! TLS; the model check below finds nothing; every full disk made its node exit 74; the
//! web sidecar restarted during the outage serves from its cache. Every broken one is
//! named in the failure. Printed: everything else (requests and failures while all nodes
//! are up, stale reads, reconnects, what each node said about the leader over time, the
//! history of every key that came out wrong, registry log lines about leadership and
//! expiry), as `chaos: <name> = <value>` lines in one block.
//!
//! A request counts in the most severe period it overlapped: "one registry node down"
//! from the fault's start until the node serves again (killed, paused, cut off, or exited
//! on its full disk), "whole registry down" from the kills until a leader is elected again.
//!
//! # The model check (per key, revision-based)
//!
//! The registry orders every write by its revision (the Raft index of the entry that made
//! it); a `Resolve` answers a node's applied state together with its revision. The model
//! is sequential, per instance id: present or absent, changed only by its owner's
//! Register (present) and Deregister (absent). An attempt is *acknowledged* (with the
//! revision it was given), *gone* (a Deregister answered NOT_FOUND, or PERMISSION_DENIED
//! by a node that does not hold the instance while the leader does not hold it either:
//! some earlier attempt removed it) or *unknown* (an error or a timeout: it
//! may take effect at any time after its invoke, or never). A lease found expired adds,
//! for each instance on it, an unknown Deregister from the last successful renewal to the
//! moment it was noticed. Then:
//!
//! 1. Writes respect real time: an acknowledged write that completed before another was
//!    invoked has a revision no higher (an unchanged re-register answers the current
//!    revision, so equal is allowed).
//! 2. Every Resolve at revision R is explained, for every key: the key's state after its
//!    last acknowledged write with revision <= R (absent if none) is what R shows, unless
//!    some unknown or gone attempt on the key, invoked before the Resolve returned, would
//!    give what it shows (that attempt is then linearized just before the read). An id in
//!    an answer that no client ever wrote is a violation too.
//! 3. At the end, on the leader: a key whose owner's last operation was an acknowledged
//!    Register must be there (else: a lost acknowledged registration); one whose last
//!    operation was an acknowledged Deregister must not be, unless an unknown Register of
//!    it could explain it (a phantom, printed).
//!
//! Reads from a follower may lag (a Resolve carries no minimum revision): a Resolve whose
//! revision is below that of a write acknowledged before it was invoked is counted as a
//! stale read and printed, not failed; the check of point 2 holds for it all the same.
//!
//! # Running it
//!
//! `cargo test --test chaos --no-run`, then `cargo test --test chaos -- --nocapture`. The
//! default run takes under a minute of wall time (45 s of faults) on a 2-core machine,
//! about 65 s with cargo's start; the long form is
//! `SWITCHYARD_CHAOS_SECS=600`. Another seed: `SWITCHYARD_CHAOS_SEED=7`. The processes'
//! logs go to a temp dir, or to `SWITCHYARD_CHAOS_LOGS` (kept); `SWITCHYARD_CHAOS_LOOPBACK=1`
//! runs the loopback form (no namespaces, no partition) even where it could. Needs root for
//! the namespaces and the tmpfs; without them those faults are skipped and said so. Every
//! process is killed and every namespace deleted when the test ends, whatever happens;
//! traffic stays on loopback and inside the namespaces the test creates.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_proto::v1::config_client::ConfigClient;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_proto::v1::rollouts_client::RolloutsClient;
use switchyard_proto::v1::routing_client::RoutingClient;
use switchyard_testkit::{instance, watch_all, Backend, Tmpfs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use common::BIN;

/// The seed when `SWITCHYARD_CHAOS_SEED` is unset (the issue's number).
const DEFAULT_SEED: u64 = 20;
/// Seconds of faults when `SWITCHYARD_CHAOS_SECS` is unset: the short form CI runs.
const DEFAULT_SECS: u64 = 45;
/// After the faults stop, every node and watcher holds the leader's instances within this.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(10);
/// The registration clients' lease TTL; they renew every second.
const CLIENT_TTL: u32 = 10;
/// Set (to the lab's tag) for the run inside the client namespace.
const INNER: &str = "SWITCHYARD_CHAOS_LAB";
/// Addresses of the lab; they exist only inside the namespaces the test creates.
const NET: &str = "10.213.79";
/// This test's name, for the run inside the client namespace.
const TEST_NAME: &str = "the_whole_system_keeps_its_guarantees_under_a_seeded_fault_schedule";
const CLIENTS: usize = 3;
const WATCHERS: usize = 3;
const LOAD_WORKERS: usize = 3;

// ---------------------------------------------------------------------------------------
// The seeded generator and the plan.

/// xorshift64* seeded through splitmix64: small, and the same sequence for a seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo, hi))
    }

    fn fork(&mut self, salt: u64) -> Rng {
        Rng::new(self.next() ^ salt)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Leader,
    Follower,
}

#[derive(Clone, Debug)]
enum Fault {
    Kill { who: Who, down: Duration },
    Partition { cut: Duration },
    Pause { who: Who, paused: Duration },
    DiskFull { who: Who },
    WholeDown { down: Duration, sidecar: usize },
}

impl Fault {
    /// About how long it takes, recovery included (for planning only).
    fn cost(&self) -> Duration {
        match self {
            Fault::Kill { down, .. } => *down + Duration::from_secs(3),
            Fault::Partition { cut } => *cut + Duration::from_secs(4),
            Fault::Pause { paused, .. } => *paused + Duration::from_secs(2),
            Fault::DiskFull { .. } => Duration::from_secs(8),
            Fault::WholeDown { down, .. } => *down + Duration::from_secs(5),
        }
    }

    fn describe(&self) -> String {
        let who = |w: &Who| {
            if *w == Who::Leader {
                "leader"
            } else {
                "a follower"
            }
        };
        match self {
            Fault::Kill { who: w, down } => format!("kill -9 {} for {:.1}s", who(w), secs(*down)),
            Fault::Partition { cut } => format!("cut the leader off for {:.1}s", secs(*cut)),
            Fault::Pause { who: w, paused } => {
                format!("SIGSTOP {} for {:.1}s", who(w), secs(*paused))
            }
            Fault::DiskFull { who: w } => format!("fill the disk of {}", who(w)),
            Fault::WholeDown { down, sidecar } => format!(
                "kill -9 every registry node for {:.1}s; meanwhile kill -9 and restart {} (from its cache)",
                secs(*down),
                SIDECARS[*sidecar].0
            ),
        }
    }
}

struct Plan {
    /// Planned start (from the start of the faults) and fault.
    faults: Vec<(Duration, Fault)>,
    /// Planned start and sidecar (index in [`SIDECARS`]).
    sidecar_restarts: Vec<(Duration, usize)>,
}

fn plan(seed: u64, secs: u64, partitions: bool) -> Plan {
    let mut rng = Rng::new(seed);
    let mut kinds = [0u64, 1, 2, 3, 4];
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let budget = Duration::from_secs(secs);
    let who = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            Who::Leader
        } else {
            Who::Follower
        }
    };
    let mut faults = Vec::new();
    let mut t = Duration::from_secs(2);
    for i in 0..10_000usize {
        let kind = match kinds.get(i) {
            Some(k) => *k,
            // Later faults: the whole outage less often than the others.
            None => [0, 0, 1, 1, 2, 2, 3, 4][rng.below(8) as usize],
        };
        let fault = match kind {
            0 => Fault::Kill {
                who: who(&mut rng),
                down: rng.ms(2_000, 4_000),
            },
            1 if partitions => Fault::Partition {
                cut: rng.ms(3_000, 5_000),
            },
            1 => Fault::Kill {
                who: Who::Leader,
                down: rng.ms(3_000, 5_000),
            },
            2 => Fault::Pause {
                who: who(&mut rng),
                paused: rng.ms(2_000, 4_000),
            },
            3 => Fault::DiskFull { who: who(&mut rng) },
            _ => Fault::WholeDown {
                down: rng.ms(3_000, 5_000),
                sidecar: rng.below(2) as usize,
            },
        };
        let cost = fault.cost();
        if i >= kinds.len() && t + cost > budget {
            break;
        }
        faults.push((t, fault));
        t += cost + rng.ms(1_000, 2_000);
    }
    let end = t.max(budget);
    let mut sidecar_restarts = Vec::new();
    let mut s = Duration::from_secs(4);
    while s + Duration::from_secs(4) < end {
        sidecar_restarts.push((s, rng.below(SIDECARS.len() as u64) as usize));
        s += rng.ms(6_000, 10_000);
    }
    Plan {
        faults,
        sidecar_restarts,
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// The network lab (outer process) and the entry point.

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The namespaces of one run: `hub` (a bridge), `n1`..`n3` (a registry node each) and `c`
/// (this test, the sidecars, the backends). Dropped: every process still in them is
/// killed (they are this test's children) and the namespaces are deleted.
struct Lab {
    tag: String,
}

impl Lab {
    fn ns(tag: &str, name: &str) -> String {
        format!("sy{tag}{name}")
    }

    fn create() -> Option<Lab> {
        let tag = format!("{}", std::process::id() % 100_000);
        let hub = Lab::ns(&tag, "hub");
        if !ip(&["netns", "add", &hub]) {
            return None;
        }
        let lab = Lab { tag: tag.clone() };
        let ok = ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])
            && ip(&["-n", &hub, "link", "set", "br0", "up"]);
        if !ok {
            return None;
        }
        for (name, host) in [("n1", "1"), ("n2", "2"), ("n3", "3"), ("c", "100")] {
            let ns = Lab::ns(&tag, name);
            let suffix = name.trim_start_matches('n');
            let (inner, outer) = (format!("v{tag}{suffix}"), format!("b{tag}{suffix}"));
            let ok = ip(&["netns", "add", &ns])
                && ip(&[
                    "link", "add", &inner, "type", "veth", "peer", "name", &outer,
                ])
                && ip(&["link", "set", &inner, "netns", &ns])
                && ip(&["link", "set", &outer, "netns", &hub])
                && ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"])
                && ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{NET}.{host}/24"),
                    "dev",
                    &inner,
                ])
                && ip(&["-n", &ns, "link", "set", &inner, "up"])
                && ip(&["-n", &ns, "link", "set", "lo", "up"]);
            if !ok {
                return None;
            }
        }
        Some(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in ["c", "n1", "n2", "n3", "hub"] {
            let ns = Lab::ns(&self.tag, name);
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            ip(&["netns", "del", &ns]);
        }
    }
}

/// Where the registry nodes live.
#[derive(Clone)]
enum Net {
    /// In the lab's namespaces (partitions possible); the tag names them.
    Lab(String),
    /// On loopback, ports picked now (no partitions).
    Loopback,
}

#[test]
fn the_whole_system_keeps_its_guarantees_under_a_seeded_fault_schedule() {
    let seed = env_u64("SWITCHYARD_CHAOS_SEED", DEFAULT_SEED);
    let secs = env_u64("SWITCHYARD_CHAOS_SECS", DEFAULT_SECS).max(10);
    if let Ok(tag) = std::env::var(INNER) {
        return run(Net::Lab(tag), seed, secs);
    }
    // SWITCHYARD_CHAOS_LOOPBACK=1 runs the loopback form even where namespaces work.
    let lab = match std::env::var("SWITCHYARD_CHAOS_LOOPBACK") {
        Ok(v) if v == "1" => None,
        _ => Lab::create(),
    };
    match lab {
        Some(lab) => run_inside(&lab, secs),
        None => {
            println!(
                "chaos: network namespaces cannot be created here (needs root and iproute2): \
                 the nodes run on loopback and the partition fault is skipped (a kill of the leader replaces it)"
            );
            run(Net::Loopback, seed, secs)
        }
    }
}

/// Runs this test again inside the lab's client namespace and relays its output.
fn run_inside(lab: &Lab, secs: u64) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &Lab::ns(&lab.tag, "c")])
        .arg(exe)
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads", "1"])
        .env(INNER, &lab.tag)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the test inside the lab");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let relay_out = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
        }
    });
    let relay_err = std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    // Bounded: the faults, plus generous room for setup, convergence and the checks.
    let deadline = Instant::now() + Duration::from_secs(secs * 2 + 300);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the chaos run did not finish within {secs} s x 2 + 300 s");
        }
        // Poll interval of a wait bounded by its deadline (a real process).
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = relay_out.join();
    let _ = relay_err.join();
    assert!(status.success(), "the chaos run failed: {status}");
}

fn run(net: Net, seed: u64, secs: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(chaos(net, seed, secs));
    rt.shutdown_timeout(Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------
// Processes: the registry nodes.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The text of `path` from byte `offset` on.
fn log_since(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let from = (offset as usize).min(text.len());
    String::from_utf8_lossy(&text[from..]).into_owned()
}

/// The first line containing `marker` written to `path` after `offset`, waiting up to
/// `limit`.
async fn wait_log(path: &Path, offset: u64, marker: &str, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(line) = log_since(path, offset).lines().find(|l| l.contains(marker)) {
            return Some(line.to_string());
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Poll interval of a wait bounded by its deadline (a real process's log).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn field(line: &str, key: &str) -> String {
    common::field(line, key).to_string()
}

struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// The three registry processes; killed when dropped.
struct Cluster {
    net: Net,
    grpc: Vec<String>,
    http: Vec<String>,
    peer: Vec<String>,
    dirs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    tls: TlsFiles,
    procs: Vec<Option<Child>>,
    disks: Vec<Option<Tmpfs>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn spawn(&mut self, i: usize) -> u64 {
        let offset = file_len(&self.logs[i]);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.logs[i])
            .expect("node log");
        let peers = (0..3)
            .map(|j| format!("{}={}", j + 1, self.peer[j]))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = match &self.net {
            Net::Lab(tag) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &Lab::ns(tag, &format!("n{}", i + 1)), BIN]);
                c
            }
            Net::Loopback => Command::new(BIN),
        };
        cmd.args([
            "registry",
            "--node-id",
            &(i + 1).to_string(),
            "--peers",
            &peers,
        ])
        .args(["--listen", &self.grpc[i], "--peer-listen", &self.peer[i]])
        .args([
            "--http",
            &self.http[i],
            "--dns",
            "off",
            "--snapshot-every",
            "500",
        ])
        .arg("--data-dir")
        .arg(&self.dirs[i])
        .arg("--tls-cert")
        .arg(&self.tls.cert)
        .arg("--tls-key")
        .arg(&self.tls.key)
        .arg("--ca-file")
        .arg(&self.tls.ca)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        self.procs[i] = Some(cmd.spawn().expect("spawn registry"));
        offset
    }

    async fn start(&mut self, i: usize) -> bool {
        let offset = self.spawn(i);
        self.serving(i, offset).await
    }

    /// Whether node `i` logged "registry serving" after `offset` (within 20 s).
    async fn serving(&self, i: usize, offset: u64) -> bool {
        wait_log(
            &self.logs[i],
            offset,
            "registry serving",
            Duration::from_secs(20),
        )
        .await
        .is_some()
    }

    fn kill9(&mut self, i: usize) -> Option<ExitStatus> {
        let mut c = self.procs[i].take()?;
        let _ = c.kill();
        c.wait().ok()
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].as_ref().map(Child::id)
    }

    async fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(c) = self.procs[i].as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.procs[i] = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Poll interval of a wait bounded by its deadline (a real process's exit).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn link(&self, i: usize, up: bool) -> bool {
        let Net::Lab(tag) = &self.net else {
            return false;
        };
        ip(&[
            "-n",
            &Lab::ns(tag, "hub"),
            "link",
            "set",
            &format!("b{tag}{}", i + 1),
            if up { "up" } else { "down" },
        ])
    }

    fn log_tail(&self, i: usize, lines: usize, filter: &str) -> Vec<String> {
        let text = std::fs::read_to_string(&self.logs[i]).unwrap_or_default();
        let kept: Vec<String> = text
            .lines()
            .filter(|l| l.contains(filter))
            .map(|l| format!("node {}: {l}", i + 1))
            .collect();
        kept[kept.len().saturating_sub(lines)..].to_vec()
    }
}

// ---------------------------------------------------------------------------------------
// Processes: the sidecars.

/// (name, version, load-carrying web sidecar?)
const SIDECARS: [(&str, &str, bool); 6] = [
    ("web-a", "1.0.0", true),
    ("web-b", "1.0.0", true),
    ("api-v1-a", "1.0.0", false),
    ("api-v1-b", "1.0.0", false),
    ("api-v2-a", "2.0.0", false),
    ("api-v2-b", "2.0.0", false),
];

struct Sidecar {
    index: usize,
    app_port: u16,
    log: PathBuf,
    cache: PathBuf,
    token_file: PathBuf,
    proc: Option<Child>,
    proxy: Option<String>,
    admin: Option<String>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Sidecar {
    fn name(&self) -> &'static str {
        SIDECARS[self.index].0
    }

    fn is_web(&self) -> bool {
        SIDECARS[self.index].2
    }

    /// Starts the process and waits for its "sidecar serving" line.
    async fn start(&mut self, ctx: &Ctx) -> bool {
        let (name, version, web) = SIDECARS[self.index];
        let offset = file_len(&self.log);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("sidecar log");
        let service = if web { "web" } else { "api" };
        let mut cmd = Command::new(BIN);
        cmd.args(["sidecar", "--registry", &ctx.urls.join(",")])
            .arg("--ca-file")
            .arg(&ctx.ca)
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--cache-file")
            .arg(&self.cache)
            .args(["--admin", "127.0.0.1:0", "--dns", "off"])
            .args(["--service", service, "--id", name, "--version", version])
            .args(["--port", &self.app_port.to_string()])
            .args(["--inbound", "127.0.0.1:0", "--worker-threads", "1"]);
        if web {
            cmd.args(["--http-proxy", "127.0.0.1:0", "--telemetry-interval", "1s"])
                .args(["--drain", "1s"]);
        } else {
            cmd.args(["--http-proxy", "off", "--telemetry-interval", "0s"])
                .args(["--drain", "2s"]);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.proc = Some(cmd.spawn().expect("spawn sidecar"));
        let Some(line) = wait_log(
            &self.log,
            offset,
            "sidecar serving",
            Duration::from_secs(20),
        )
        .await
        else {
            return false;
        };
        self.admin = Some(field(&line, "admin="));
        self.proxy = web.then(|| field(&line, "http_proxy="));
        true
    }

    /// SIGTERM (drain, deregister) and wait for the exit.
    async fn stop(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut c = self.proc.take()?;
        signal(c.id(), "-TERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            // Poll interval of a wait bounded by its deadline (a real process's exit).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn ready(&self) -> bool {
        let Some(admin) = &self.admin else {
            return false;
        };
        matches!(
            http_get(admin, "admin", "/ready", Duration::from_secs(2)).await,
            Ok((200, _, _))
        )
    }
}

/// The web proxies requests may use now, with the requests in flight through each.
struct Rotation {
    slots: Mutex<Vec<Option<String>>>,
    inflight: Vec<Arc<AtomicUsize>>,
    next: AtomicUsize,
}

impl Rotation {
    fn new(n: usize) -> Self {
        Rotation {
            slots: Mutex::new(vec![None; n]),
            inflight: (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect(),
            next: AtomicUsize::new(0),
        }
    }

    fn set(&self, slot: usize, proxy: Option<String>) {
        if let Ok(mut s) = self.slots.lock() {
            s[slot] = proxy;
        }
    }

    /// A proxy in the rotation, its in-flight count already raised.
    fn pick(&self) -> Option<(usize, String, Arc<AtomicUsize>)> {
        let slots = self.slots.lock().ok()?;
        let n = slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|k| {
            let i = (start + k) % n;
            slots[i].clone().map(|p| {
                self.inflight[i].fetch_add(1, Ordering::SeqCst);
                (i, p, self.inflight[i].clone())
            })
        })
    }

    /// Waits (bounded) until nothing is in flight through `slot`.
    async fn drained(&self, slot: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.inflight[slot].load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            // Poll interval of a wait bounded by its deadline (requests in flight).
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

// ---------------------------------------------------------------------------------------
// Clients.

/// `authorization: Bearer <secret>` on every call.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn bearer(secret: &str) -> Bearer {
    Bearer(
        format!("Bearer {secret}")
            .parse()
            .expect("a token fits a header"),
    )
}

type Authed = InterceptedService<Channel, Bearer>;

struct Tokens {
    reg: Bearer,
    read: Bearer,
    op: Bearer,
}

/// What period a moment belongs to, by how many registry nodes are out.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Period {
    AllUp = 0,
    OneDown = 1,
    WholeDown = 2,
}

impl Period {
    fn from_u8(v: u8) -> Period {
        match v {
            0 => Period::AllUp,
            1 => Period::OneDown,
            _ => Period::WholeDown,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Register,
    Deregister,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Acked(u64),
    Unknown,
    Gone,
}

#[derive(Clone, Debug)]
struct Op {
    key: String,
    kind: Kind,
    /// The node the attempt was sent to (`usize::MAX` for an expiry's pseudo-operation).
    node: usize,
    invoke: f64,
    complete: f64,
    outcome: Outcome,
}

#[derive(Clone, Debug)]
struct Read {
    node: usize,
    invoke: f64,
    complete: f64,
    revision: u64,
    ids: BTreeSet<String>,
}

#[derive(Clone, Debug)]
struct LeaseLoss {
    client: usize,
    at: f64,
    last_ok: f64,
    instances: usize,
}

#[derive(Default)]
struct History {
    ops: Vec<Op>,
    reads: Vec<Read>,
    lease_losses: Vec<LeaseLoss>,
    /// Keys whose first Deregister attempt found nothing: something else removed them.
    missing_at_deregister: Vec<String>,
    gave_up: Vec<String>,
    /// Failed attempts by gRPC code (or "timeout").
    errors: BTreeMap<String, u64>,
    /// The first message of each code.
    error_samples: BTreeMap<String, String>,
    /// Keep-alive answers of found=false for a lease a Register then still found.
    spurious_not_found: u64,
    /// Deregister attempts answered PERMISSION_DENIED (the node did not hold the instance).
    deregister_denied: u64,
}

#[derive(Default)]
struct LoadStats {
    sent: [u64; 3],
    failed: [u64; 3],
    mtls: u64,
    by_backend: BTreeMap<String, u64>,
    /// The first failures of each period.
    samples: [Vec<String>; 3],
}

/// A sidecar's restart, for explaining its instance's removal.
struct RestartWindow {
    id: &'static str,
    from: f64,
    to: f64,
}

#[derive(Default)]
struct WatchState {
    node: usize,
    events: u64,
    snapshots: u64,
    reconnects: u64,
    hops: u64,
    last_rev: u64,
    cluster: String,
    cluster_changes: u64,
    /// One line per stream on which revisions went backwards (its first such event).
    backwards: Vec<String>,
    /// Every event below a revision this watcher had already seen.
    backwards_events: u64,
    /// The current stream already went backwards.
    stream_went_back: bool,
    view: BTreeMap<String, pb::Instance>,
    removals: Vec<Removal>,
}

#[derive(Clone, Debug)]
struct Removal {
    id: String,
    service: String,
    revision: u64,
    at: f64,
    backwards_snapshot: bool,
}

/// What every task shares.
struct Ctx {
    t0: Instant,
    urls: Vec<String>,
    http: Vec<String>,
    ca: PathBuf,
    unary: Vec<Channel>,
    streams: Vec<Channel>,
    tls: Arc<switchyard_tls::rustls::ClientConfig>,
    tokens: Tokens,
    period: AtomicU8,
    /// Registration clients may write.
    churn: AtomicBool,
    /// Clients idle (not inside a write) while churn is off.
    idle: AtomicUsize,
    /// Load workers run.
    load_on: AtomicBool,
    /// Every task runs.
    running: AtomicBool,
    /// The faults' timelines run.
    faults_on: AtomicBool,
    whole_down_pending: AtomicBool,
    rollout_over: AtomicBool,
    /// (generation << 2) | node of the node restarted last.
    restarted: AtomicU64,
    expiries_max: AtomicU64,
    term_max: AtomicU64,
    history: Mutex<History>,
    load: Mutex<LoadStats>,
    restarts: Mutex<Vec<RestartWindow>>,
    notes: Mutex<Vec<String>>,
    anomalies: Mutex<Vec<String>>,
    rollout_phases: Mutex<Vec<String>>,
    /// (when, what each node said about the leader) at each change.
    leader_timeline: Mutex<Vec<(f64, String)>>,
}

impl Ctx {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn period(&self) -> Period {
        Period::from_u8(self.period.load(Ordering::SeqCst))
    }

    fn set_period(&self, p: Period) {
        self.period.store(p as u8, Ordering::SeqCst);
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    fn note(&self, line: String) {
        let line = format!("[{:7.2}s] {line}", self.now());
        println!("{line}");
        if let Ok(mut n) = self.notes.lock() {
            n.push(line);
        }
    }

    fn anomaly(&self, line: String) {
        self.note(format!("ANOMALY: {line}"));
        if let Ok(mut a) = self.anomalies.lock() {
            a.push(line);
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().expect("history lock")
    }

    fn registry(&self, node: usize, token: &Bearer) -> RegistryClient<Authed> {
        RegistryClient::with_interceptor(self.unary[node].clone(), token.clone())
    }

    fn registry_stream(&self, node: usize, token: &Bearer) -> RegistryClient<Authed> {
        RegistryClient::with_interceptor(self.streams[node].clone(), token.clone())
    }

    fn discovery(&self, node: usize, token: &Bearer) -> DiscoveryClient<Authed> {
        DiscoveryClient::with_interceptor(self.unary[node].clone(), token.clone())
            .max_decoding_message_size(64 << 20)
    }

    fn cluster(&self, node: usize) -> ClusterClient<Authed> {
        ClusterClient::with_interceptor(self.unary[node].clone(), self.tokens.op.clone())
    }

    async fn status(&self, node: usize) -> Option<pb::StatusResponse> {
        let mut client = self.cluster(node);
        let call = client.status(pb::StatusRequest {});
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// The leader's node index, as the first node that answers says.
    async fn leader(&self) -> Option<usize> {
        for n in 0..3 {
            if let Some(s) = self.status(n).await {
                if s.leader_id != 0 {
                    return Some(s.leader_id as usize - 1);
                }
            }
        }
        None
    }

    /// Waits (bounded) for a leader every answering node agrees on.
    async fn wait_leader(&self, limit: Duration) -> Option<usize> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.leader().await {
                if let Some(s) = self.status(l).await {
                    if s.role == "leader" {
                        return Some(l);
                    }
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Poll interval of a wait bounded by its deadline (an election).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until every node answers, they agree on the leader, and each has
    /// applied what the leader had committed when the wait began.
    async fn settle(&self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let deadline = started + limit;
        let mut target = None;
        loop {
            let mut all = Vec::new();
            for n in 0..3 {
                all.push(self.status(n).await);
            }
            if let Some(l) = self.leader().await {
                if target.is_none() {
                    target = all[l]
                        .as_ref()
                        .filter(|s| s.role == "leader")
                        .map(|s| s.commit_index);
                }
                if let Some(t) = target {
                    let ok = all.iter().all(|s| {
                        s.as_ref()
                            .is_some_and(|s| s.leader_id as usize == l + 1 && s.applied_index >= t)
                    });
                    if ok {
                        return Some(started.elapsed());
                    }
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Poll interval of a wait bounded by its deadline (replication catching up).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn resolve(&self, node: usize, service: &str) -> Option<pb::ResolveResponse> {
        let mut client = self.discovery(node, &self.tokens.read);
        let call = client.resolve(pb::ResolveRequest {
            namespace: String::new(),
            service: service.into(),
            version: String::new(),
        });
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Every instance a node holds, by id: (service, version, state, port, mesh port).
    async fn catalog(&self, node: usize) -> Option<BTreeMap<String, String>> {
        let mut client = self.discovery(node, &self.tokens.read);
        let call = client.list_services(pb::ListServicesRequest {
            namespace: String::new(),
        });
        let services = match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) => r.into_inner().services,
            _ => return None,
        };
        let mut all = BTreeMap::new();
        for s in services {
            for i in self.resolve(node, &s.name).await?.instances {
                all.insert(i.id.clone(), project(&i));
            }
        }
        Some(all)
    }
}

/// What the convergence check compares of an instance.
fn project(i: &pb::Instance) -> String {
    format!(
        "{} {} state={} port={} mesh={}",
        i.service, i.version, i.state, i.port, i.mesh_port
    )
}

fn endpoint(url: &str, unary: bool) -> Endpoint {
    let e = Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true);
    if unary {
        e.timeout(Duration::from_secs(3))
    } else {
        e
    }
}

/// A raw HTTP/1.1 GET with `Connection: close`: (status, head, body).
async fn http_get(
    addr: &str,
    host: &str,
    path: &str,
    limit: Duration,
) -> Result<(u16, String, String), String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no response head in {text:?}"))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        Ok((code, head.to_string(), body.to_string()))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

/// An HTTPS GET of a registry's HTTP port (its `/metrics`), verified against the CA.
async fn https_get(ctx: &Ctx, addr: &str, path: &str) -> Option<String> {
    use switchyard_tls::rustls::pki_types::ServerName;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let host = addr.rsplit_once(':')?.0.to_string();
        let name = ServerName::try_from(host).ok()?;
        let mut s = switchyard_tls::tokio_rustls::TlsConnector::from(ctx.tls.clone())
            .connect(name, tcp)
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: registry\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        // A TLS server may close without close_notify: keep what arrived.
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Runs the switchyard CLI with the operator token (blocking: setup, or spawn_blocking).
fn cli(token: Option<&str>, ca: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--ca-file").arg(ca).stdin(Stdio::null());
    if let Some(t) = token {
        cmd.env("SWITCHYARD_TOKEN", t);
    }
    cmd.output().expect("run switchyard")
}

fn cli_ok(token: Option<&str>, ca: &Path, args: &[&str]) -> String {
    let out = cli(token, ca, args);
    assert!(
        out.status.success(),
        "switchyard {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn secret_of(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).expect("json from acl");
    v["secret"].as_str().expect("a secret").to_string()
}

// ---------------------------------------------------------------------------------------
// The workers.

async fn load_worker(ctx: Arc<Ctx>, rotation: Arc<Rotation>) {
    for _ in 0..50_000_000u64 {
        if !ctx.load_on.load(Ordering::SeqCst) {
            return;
        }
        let Some((_, proxy, inflight)) = rotation.pick() else {
            // Both proxies out of the rotation for a moment: wait for one.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let before = ctx.period();
        let at = ctx.now();
        let result = http_get(&proxy, "api", "/", Duration::from_secs(5)).await;
        inflight.fetch_sub(1, Ordering::SeqCst);
        let period = before.max(ctx.period());
        if let Ok(mut s) = ctx.load.lock() {
            let p = period as usize;
            s.sent[p] += 1;
            match &result {
                Ok((200, head, body)) => {
                    let name = ["api-v1-a", "api-v1-b", "api-v2-a", "api-v2-b"]
                        .into_iter()
                        .find(|n| body.contains(n))
                        .unwrap_or("?");
                    *s.by_backend.entry(name.to_string()).or_default() += 1;
                    if head
                        .to_lowercase()
                        .contains("x-seen-peer-identity: spiffe://")
                    {
                        s.mtls += 1;
                    }
                }
                other => {
                    s.failed[p] += 1;
                    if s.samples[p].len() < 10 {
                        let what = match other {
                            Ok((code, _, body)) => format!("{code} {}", body.trim()),
                            Err(e) => e.clone(),
                        };
                        s.samples[p].push(format!("{at:.2}s {period:?} via {proxy}: {what}"));
                    }
                }
            }
        }
        // The load's pace: about 40 requests a second per worker.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[derive(Default)]
struct LeaseState {
    id: Option<u64>,
    last_ok: f64,
    /// A keep-alive said found=false: confirm with a Register on the lease.
    suspect: bool,
}

/// Renews the client's lease every second through one KeepAlive stream, moving to the
/// next node when the stream fails or stalls.
async fn keep_alive(ctx: Arc<Ctx>, c: usize, lease: Arc<Mutex<LeaseState>>) {
    let mut node = c % 3;
    let current = |lease: &Mutex<LeaseState>| lease.lock().ok().and_then(|l| l.id);
    for _ in 0..1_000_000u64 {
        if !ctx.running() {
            return;
        }
        let Some(id) = current(&lease) else {
            // No lease yet: the client's first Register makes it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let _ = tx.try_send(pb::KeepAliveRequest {
            lease_ids: vec![id],
        });
        let mut client = ctx.registry_stream(node, &ctx.tokens.reg);
        let opened = tokio::time::timeout(
            Duration::from_secs(2),
            client.keep_alive(ReceiverStream::new(rx)),
        )
        .await;
        let mut responses = match opened {
            Ok(Ok(r)) => r.into_inner(),
            _ => {
                node = (node + 1) % 3;
                // Pause before the next node (a renewer's pace).
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for _ in 0..1_000_000u64 {
            match tokio::time::timeout(Duration::from_secs(2), responses.message()).await {
                Ok(Ok(Some(m))) => {
                    if let Ok(mut l) = lease.lock() {
                        let mine = l.id;
                        for s in m.leases.iter().filter(|s| Some(s.lease_id) == mine) {
                            if s.found {
                                l.last_ok = ctx.now();
                            } else {
                                l.suspect = true;
                            }
                        }
                    }
                }
                _ => break,
            }
            // The renewer's pace: one keep-alive a second keeps a 10 s lease.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(id) = current(&lease) else { break };
            if !ctx.running()
                || tx
                    .send(pb::KeepAliveRequest {
                        lease_ids: vec![id],
                    })
                    .await
                    .is_err()
            {
                break;
            }
        }
        node = (node + 1) % 3;
        // Pause before the next node (a renewer's pace).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

enum Written {
    Done,
    GaveUp,
    LeaseGone,
}

/// One write, retried (on the next node) until acknowledged; every attempt recorded.
async fn write(
    ctx: &Ctx,
    lease: &Mutex<LeaseState>,
    node: &mut usize,
    kind: Kind,
    key: &str,
    rng: &mut Rng,
) -> Written {
    let started = Instant::now();
    let mut failed_before = false;
    for _ in 0..400 {
        if started.elapsed() > Duration::from_secs(40) || !ctx.running() {
            break;
        }
        let lease_id = lease.lock().ok().and_then(|l| l.id).unwrap_or(0);
        let mut client = ctx.registry(*node, &ctx.tokens.reg);
        let invoke = ctx.now();
        let result = match kind {
            Kind::Register => tokio::time::timeout(
                Duration::from_secs(3),
                client.register(pb::RegisterRequest {
                    instance: Some(instance("reg", key, "1.0.0")),
                    ttl_seconds: CLIENT_TTL,
                    lease_id,
                }),
            )
            .await
            .map(|r| r.map(|r| (r.get_ref().revision, Some(r.get_ref().lease_id)))),
            Kind::Deregister => tokio::time::timeout(
                Duration::from_secs(3),
                client.deregister(pb::DeregisterRequest {
                    namespace: String::new(),
                    id: key.to_string(),
                }),
            )
            .await
            .map(|r| r.map(|r| (r.get_ref().revision, None))),
        };
        let complete = ctx.now();
        let sent_to = *node;
        let op = |outcome| Op {
            key: key.to_string(),
            kind,
            node: sent_to,
            invoke,
            complete,
            outcome,
        };
        // What to record, which error to count, and whether this attempt ends the write.
        let (record, error, missing, verdict) = match result {
            Ok(Ok((revision, granted))) => {
                if let (Some(g), Ok(mut l)) = (granted, lease.lock()) {
                    l.id = Some(g);
                    if l.last_ok < invoke {
                        l.last_ok = invoke;
                    }
                }
                (
                    Some(op(Outcome::Acked(revision))),
                    None,
                    false,
                    Some(Written::Done),
                )
            }
            Ok(Err(s)) if s.code() == tonic::Code::NotFound && kind == Kind::Deregister => (
                Some(op(Outcome::Gone)),
                None,
                !failed_before,
                Some(Written::Done),
            ),
            // A node that does not hold the instance (it lags, or the instance is gone)
            // checks the token against no service: "lacks service::register". Whether it
            // is gone, the leader says.
            Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied && kind == Kind::Deregister => {
                ctx.history().deregister_denied += 1;
                ctx.history()
                    .error_samples
                    .entry("PermissionDenied(deregister)".into())
                    .or_insert_with(|| format!("node {}: {}", *node + 1, s.message()));
                // Asked twice, 300 ms apart: a leader elected a moment ago may not have
                // applied everything it committed yet.
                let mut gone = Some(true);
                for round in 0..2 {
                    if round > 0 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let absent = match ctx.leader().await {
                        Some(l) => ctx
                            .resolve(l, "reg")
                            .await
                            .map(|r| !r.instances.iter().any(|i| i.id == key)),
                        None => None,
                    };
                    if absent != Some(true) {
                        gone = absent;
                    }
                }
                if gone == Some(true) {
                    (
                        Some(op(Outcome::Gone)),
                        None,
                        !failed_before,
                        Some(Written::Done),
                    )
                } else {
                    (
                        Some(op(Outcome::Unknown)),
                        Some("PermissionDenied(deregister)".to_string()),
                        false,
                        None,
                    )
                }
            }
            // The lease is gone: refused, nothing applied.
            Ok(Err(s)) if s.code() == tonic::Code::NotFound && lease_id != 0 => (
                None,
                Some("NotFound(lease)".to_string()),
                false,
                Some(Written::LeaseGone),
            ),
            Ok(Err(s)) => {
                let code = format!("{:?}", s.code());
                ctx.history()
                    .error_samples
                    .entry(code.clone())
                    .or_insert_with(|| format!("node {}: {}", *node + 1, s.message()));
                (Some(op(Outcome::Unknown)), Some(code), false, None)
            }
            Err(_) => (
                Some(op(Outcome::Unknown)),
                Some("timeout".to_string()),
                false,
                None,
            ),
        };
        {
            let mut h = ctx.history();
            if let Some(o) = record {
                h.ops.push(o);
            }
            if let Some(e) = error {
                *h.errors.entry(e).or_default() += 1;
            }
            if missing {
                h.missing_at_deregister.push(key.to_string());
            }
        }
        if let Some(v) = verdict {
            return v;
        }
        failed_before = true;
        *node = (*node + 1) % 3;
        // Pause before retrying on the next node.
        tokio::time::sleep(rng.ms(150, 300)).await;
    }
    ctx.history().gave_up.push(key.to_string());
    Written::GaveUp
}

/// Registers fresh instances of `reg` under one lease, deregisters some, resolves; until
/// churn stops (then it only renews).
async fn registration_client(ctx: Arc<Ctx>, c: usize, mut rng: Rng) {
    let lease = Arc::new(Mutex::new(LeaseState::default()));
    let keeper = tokio::spawn(keep_alive(ctx.clone(), c, lease.clone()));
    let mut live: Vec<String> = Vec::new();
    let mut seq = 0u64;
    let mut node = c % 3;
    let mut idle_counted = false;
    for _ in 0..1_000_000u64 {
        if !ctx.running() {
            break;
        }
        // A keep-alive said the lease is gone: confirm with a Register on it.
        let suspect = lease.lock().map(|l| l.suspect).unwrap_or(false);
        let mut gone = false;
        if suspect {
            if let Ok(mut l) = lease.lock() {
                l.suspect = false;
            }
            match live.first().cloned() {
                Some(key) => {
                    match write(&ctx, &lease, &mut node, Kind::Register, &key, &mut rng).await {
                        Written::LeaseGone => gone = true,
                        _ => ctx.history().spurious_not_found += 1,
                    }
                }
                None => {
                    if let Ok(mut l) = lease.lock() {
                        l.id = None;
                    }
                }
            }
        }
        if !ctx.churn.load(Ordering::SeqCst) && !gone {
            if !idle_counted {
                ctx.idle.fetch_add(1, Ordering::SeqCst);
                idle_counted = true;
            }
            // Churn is over: only the keep-alives run now.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let roll = rng.below(100);
        let result = if gone {
            Written::LeaseGone
        } else if live.len() < 3 || (roll < 40 && live.len() < 12) {
            seq += 1;
            let key = format!("reg-{c}-{seq}");
            let r = write(&ctx, &lease, &mut node, Kind::Register, &key, &mut rng).await;
            if matches!(r, Written::Done) {
                live.push(key);
            }
            r
        } else if roll < 70 {
            let key = live.swap_remove(rng.below(live.len() as u64) as usize);
            let r = write(&ctx, &lease, &mut node, Kind::Deregister, &key, &mut rng).await;
            if matches!(r, Written::LeaseGone) {
                live.push(key);
            }
            r
        } else {
            read(&ctx, rng.below(3) as usize).await;
            Written::Done
        };
        if matches!(result, Written::LeaseGone) {
            // Every instance on the lease is gone: an expiry. Record it as an unknown
            // Deregister of each (from the last renewal to now), then register them again.
            let now = ctx.now();
            let last_ok = lease.lock().map(|l| l.last_ok).unwrap_or(0.0);
            {
                let mut h = ctx.history();
                h.lease_losses.push(LeaseLoss {
                    client: c,
                    at: now,
                    last_ok,
                    instances: live.len(),
                });
                for key in &live {
                    h.ops.push(Op {
                        key: key.clone(),
                        kind: Kind::Deregister,
                        node: usize::MAX,
                        invoke: last_ok,
                        complete: now,
                        outcome: Outcome::Unknown,
                    });
                }
            }
            ctx.note(format!(
                "client {c}: its lease is gone ({} instances); last renewal at {last_ok:.2}s",
                live.len()
            ));
            if let Ok(mut l) = lease.lock() {
                l.id = None;
            }
            let mut again = Vec::new();
            for key in std::mem::take(&mut live) {
                if let Written::Done =
                    write(&ctx, &lease, &mut node, Kind::Register, &key, &mut rng).await
                {
                    again.push(key);
                }
            }
            live = again;
        }
        // The clients' pace: a write or a read every 30-120 ms each.
        tokio::time::sleep(rng.ms(30, 120)).await;
    }
    let _ = keeper.await;
}

async fn read(ctx: &Ctx, node: usize) {
    let invoke = ctx.now();
    let mut client = ctx.discovery(node, &ctx.tokens.reg);
    let call = client.resolve(pb::ResolveRequest {
        namespace: String::new(),
        service: "reg".into(),
        version: String::new(),
    });
    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), call).await {
        let r = r.into_inner();
        let complete = ctx.now();
        ctx.history().reads.push(Read {
            node,
            invoke,
            complete,
            revision: r.revision,
            ids: r.instances.into_iter().map(|i| i.id).collect(),
        });
    }
}

fn apply_event(st: &mut WatchState, ev: pb::WatchEvent, node: usize, at: f64) {
    st.events += 1;
    if !ev.cluster_id.is_empty() {
        if !st.cluster.is_empty() && st.cluster != ev.cluster_id {
            // Another cluster: its revisions are not comparable with what came before.
            st.cluster_changes += 1;
            st.last_rev = 0;
        }
        st.cluster = ev.cluster_id.clone();
    }
    let kind = match &ev.kind {
        Some(pb::watch_event::Kind::Snapshot(_)) => "snapshot",
        Some(pb::watch_event::Kind::Delta(_)) => "delta",
        None => "event without kind",
    };
    let backwards = ev.revision < st.last_rev;
    if backwards {
        st.backwards_events += 1;
    }
    if backwards && !std::mem::replace(&mut st.stream_went_back, true) {
        st.backwards.push(format!(
            "{at:.2}s: node {} sent a {kind} at revision {} after this watcher had seen revision {}",
            node + 1,
            ev.revision,
            st.last_rev
        ));
    }
    st.last_rev = st.last_rev.max(ev.revision);
    let mut removed = Vec::new();
    match ev.kind {
        Some(pb::watch_event::Kind::Snapshot(s)) => {
            st.snapshots += 1;
            let mut fresh = BTreeMap::new();
            for svc in s.services {
                for i in svc.instances {
                    fresh.insert(i.id.clone(), i);
                }
            }
            for (id, i) in &st.view {
                if !fresh.contains_key(id) {
                    removed.push((id.clone(), i.service.clone()));
                }
            }
            st.view = fresh;
        }
        Some(pb::watch_event::Kind::Delta(d)) => {
            for i in d.upserted {
                st.view.insert(i.id.clone(), i);
            }
            for r in d.removed {
                if st.view.remove(&r.id).is_some() {
                    removed.push((r.id, r.service));
                }
            }
        }
        None => {}
    }
    for (id, service) in removed {
        st.removals.push(Removal {
            id,
            service,
            revision: ev.revision,
            at,
            backwards_snapshot: backwards,
        });
    }
}

/// One Watch client: resumes from its last revision on the next node after any error;
/// with `hop`, it also moves to the node restarted last as soon as it serves.
async fn watcher(ctx: Arc<Ctx>, w: usize, st: Arc<Mutex<WatchState>>, hop: bool) {
    let mut node = w % 3;
    let mut seen_restart = ctx.restarted.load(Ordering::SeqCst);
    for _ in 0..1_000_000u64 {
        if !ctx.running() {
            return;
        }
        let (since, cluster) = match st.lock() {
            Ok(mut s) => {
                s.node = node;
                s.stream_went_back = false;
                (s.last_rev, s.cluster.clone())
            }
            Err(_) => return,
        };
        let mut client =
            DiscoveryClient::with_interceptor(ctx.streams[node].clone(), ctx.tokens.read.clone())
                .max_decoding_message_size(64 << 20);
        let mut req = watch_all(since);
        req.cluster_id = cluster;
        let opened = tokio::time::timeout(Duration::from_secs(3), client.watch(req)).await;
        if let Ok(Ok(stream)) = opened {
            let mut stream = stream.into_inner();
            for _ in 0..100_000_000u64 {
                tokio::select! {
                    m = stream.next() => match m {
                        Some(Ok(ev)) => {
                            let at = ctx.now();
                            if let Ok(mut s) = st.lock() {
                                apply_event(&mut s, ev, node, at);
                            }
                        }
                        _ => break,
                    },
                    // How often a watcher looks up from its stream: to stop, or to hop.
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if !ctx.running() {
                            return;
                        }
                        let r = ctx.restarted.load(Ordering::SeqCst);
                        if hop && r != seen_restart {
                            seen_restart = r;
                            let to = (r & 3) as usize;
                            if to != node {
                                node = to;
                                if let Ok(mut s) = st.lock() {
                                    s.hops += 1;
                                }
                                break;
                            }
                        }
                    }
                }
            }
            if let Ok(s) = st.lock() {
                if s.node == node {
                    // The stream failed (not a hop): try the next node.
                    node = (node + 1) % 3;
                }
            }
        } else {
            node = (node + 1) % 3;
        }
        if let Ok(mut s) = st.lock() {
            s.reconnects += 1;
        }
        // Pause before reconnecting (a watcher's back-off, short on purpose).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scrapes every node's /metrics now and then: the most lease expiries any node counted,
/// and the highest Raft term.
async fn scraper(ctx: Arc<Ctx>) {
    for _ in 0..1_000_000u64 {
        if !ctx.running() {
            return;
        }
        for n in 0..3 {
            if let Some(text) = https_get(&ctx, &ctx.http[n], "/metrics").await {
                if let Some(v) = metric(&text, "switchyard_registry_lease_expiries_total") {
                    ctx.expiries_max.fetch_max(v as u64, Ordering::SeqCst);
                }
                if let Some(v) = metric(&text, "switchyard_registry_raft_term") {
                    ctx.term_max.fetch_max(v as u64, Ordering::SeqCst);
                }
            }
        }
        // Who each node says leads, and in which term: a line when that changes.
        let mut view = Vec::new();
        for n in 0..3 {
            view.push(match ctx.status(n).await {
                Some(s) if s.role == "leader" => format!("n{}:LEADER/t{}", n + 1, s.term),
                Some(s) => format!("n{}:{}->{}/t{}", n + 1, s.role, s.leader_id, s.term),
                None => format!("n{}:-", n + 1),
            });
        }
        let view = view.join(" ");
        if let Ok(mut t) = ctx.leader_timeline.lock() {
            if t.last().map(|(_, v)| v) != Some(&view) {
                t.push((ctx.now(), view));
            }
        }
        // The scrape interval (Prometheus would use 15 s; the faults are faster).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn phase_name(p: i32) -> String {
    pb::RolloutPhase::try_from(p)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("ROLLOUT_PHASE_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("phase {p}"))
}

async fn get_rollout(ctx: &Ctx, node: usize) -> Option<pb::Rollout> {
    let mut client =
        RolloutsClient::with_interceptor(ctx.unary[node].clone(), ctx.tokens.op.clone());
    let call = client.get(pb::RolloutRef {
        namespace: String::new(),
        service: "api".into(),
    });
    match tokio::time::timeout(Duration::from_secs(2), call).await {
        Ok(Ok(r)) => r.into_inner().rollout,
        _ => None,
    }
}

/// Follows the rollout: each change of phase, step or weight is noted.
async fn rollout_watcher(ctx: Arc<Ctx>) {
    let mut last = String::new();
    for _ in 0..1_000_000usize {
        if !ctx.running() {
            return;
        }
        // From the leader: a follower may answer an older state (it lags, or was paused).
        let Some(leader) = ctx.leader().await else {
            // No leader right now (an election, or the whole registry down).
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if let Some(r) = get_rollout(&ctx, leader).await {
            let s = r.status.unwrap_or_default();
            let now = format!(
                "{} step {} weight {}%",
                phase_name(s.phase),
                s.step + 1,
                s.weight
            );
            if now != last {
                ctx.note(format!("rollout: {now}: {}", s.message));
                if let Ok(mut p) = ctx.rollout_phases.lock() {
                    p.push(format!("{:.1}s {now}", ctx.now()));
                }
                last = now;
            }
            let terminal = [
                pb::RolloutPhase::Succeeded,
                pb::RolloutPhase::Aborted,
                pb::RolloutPhase::Superseded,
            ]
            .iter()
            .any(|p| *p as i32 == s.phase);
            ctx.rollout_over.store(terminal, Ordering::SeqCst);
        }
        // How often the rollout is looked at.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The faults.

struct FaultReport {
    counts: BTreeMap<&'static str, u64>,
    disk_exits: Vec<Option<i32>>,
    cache_restarts: Vec<Result<f64, String>>,
    settle_secs: Vec<f64>,
    skipped: Vec<String>,
}

async fn pick(ctx: &Ctx, who: Who, rng: &mut Rng) -> usize {
    let leader = ctx.wait_leader(Duration::from_secs(10)).await.unwrap_or(0);
    match who {
        Who::Leader => leader,
        Who::Follower => (leader + 1 + rng.below(2) as usize) % 3,
    }
}

fn mark_restarted(ctx: &Ctx, n: usize) {
    let generation = (ctx.restarted.load(Ordering::SeqCst) >> 2) + 1;
    ctx.restarted
        .store((generation << 2) | n as u64, Ordering::SeqCst);
}

async fn restart_node(ctx: &Ctx, cluster: &mut Cluster, n: usize) {
    if !cluster.start(n).await {
        ctx.anomaly(format!(
            "node {} did not serve within 20 s of its restart",
            n + 1
        ));
    }
    mark_restarted(ctx, n);
}

/// Writes KV ballast so the node whose disk is full needs space soon.
/// Only needed when the registration traffic alone does not reach the full disk within
/// 3 s (it usually does within a second); small values, so the other nodes are not
/// flooded (64 KiB values at 20/s made a catching-up follower start elections).
async fn ballast(ctx: Arc<Ctx>, stop: Arc<AtomicBool>) {
    for _ in 0..30 {
        if stop.load(Ordering::SeqCst) || !ctx.running() {
            return;
        }
        // The grace before any ballast (bounded: 3 s).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctx.note("the full-disk node still runs after 3 s: writing small KV ballast".into());
    let value = vec![b'x'; 4 * 1024];
    for k in 0..2_000u64 {
        if stop.load(Ordering::SeqCst) || !ctx.running() {
            return;
        }
        let node = (k % 3) as usize;
        let mut client =
            ConfigClient::with_interceptor(ctx.unary[node].clone(), ctx.tokens.op.clone());
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            client.put(pb::KvPutRequest {
                namespace: String::new(),
                key: format!("chaos/ballast/{}", k % 16),
                value: value.clone(),
                flags: 0,
                cas: None,
            }),
        )
        .await;
        // The ballast's pace: about 20 puts (80 KiB) a second.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn drive_faults(
    ctx: Arc<Ctx>,
    mut cluster: Cluster,
    faults: Vec<(Duration, Fault)>,
    sidecars: Arc<Vec<tokio::sync::Mutex<Sidecar>>>,
    rotation: Arc<Rotation>,
    mut rng: Rng,
) -> (Cluster, FaultReport) {
    let start = Instant::now();
    let mut report = FaultReport {
        counts: BTreeMap::new(),
        disk_exits: Vec::new(),
        cache_restarts: Vec::new(),
        settle_secs: Vec::new(),
        skipped: Vec::new(),
    };
    for (at, fault) in faults {
        if !ctx.running() {
            break;
        }
        let wait = (start + at).saturating_duration_since(Instant::now());
        tokio::time::sleep(wait).await;
        match fault {
            Fault::Kill { who, down } => {
                let n = pick(&ctx, who, &mut rng).await;
                let leader = ctx.leader().await == Some(n);
                ctx.note(format!(
                    "fault: kill -9 node {} ({}) for {:.1}s",
                    n + 1,
                    if leader { "the leader" } else { "a follower" },
                    secs(down)
                ));
                *report
                    .counts
                    .entry(if leader {
                        "kill_leader"
                    } else {
                        "kill_follower"
                    })
                    .or_default() += 1;
                ctx.set_period(Period::OneDown);
                cluster.kill9(n);
                tokio::time::sleep(down).await;
                restart_node(&ctx, &mut cluster, n).await;
                ctx.set_period(Period::AllUp);
            }
            Fault::Partition { cut } => {
                let n = pick(&ctx, Who::Leader, &mut rng).await;
                ctx.note(format!(
                    "fault: cut node {} (the leader) off for {:.1}s",
                    n + 1,
                    secs(cut)
                ));
                *report.counts.entry("partition_leader").or_default() += 1;
                ctx.set_period(Period::OneDown);
                if !cluster.link(n, false) {
                    ctx.anomaly(format!("could not take node {}'s link down", n + 1));
                }
                let cut_at = Instant::now();
                let others: Vec<usize> = (0..3).filter(|m| *m != n).collect();
                let mut elected = None;
                while cut_at.elapsed() < cut {
                    if elected.is_none() {
                        for m in &others {
                            if let Some(s) = ctx.status(*m).await {
                                if s.leader_id != 0 && s.leader_id as usize != n + 1 {
                                    elected = Some((s.leader_id, cut_at.elapsed()));
                                }
                            }
                        }
                    }
                    // Poll interval while the partition lasts (bounded by `cut`).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                match elected {
                    Some((l, after)) => ctx.note(format!(
                        "the majority elected node {l} {:.2}s after the cut",
                        secs(after)
                    )),
                    None => ctx.note(format!(
                        "no new leader on the majority side within {:.1}s",
                        secs(cut)
                    )),
                }
                if !cluster.link(n, true) {
                    ctx.anomaly(format!("could not bring node {}'s link up", n + 1));
                }
                mark_restarted(&ctx, n);
                ctx.set_period(Period::AllUp);
            }
            Fault::Pause { who, paused } => {
                let n = pick(&ctx, who, &mut rng).await;
                let leader = ctx.leader().await == Some(n);
                ctx.note(format!(
                    "fault: SIGSTOP node {} ({}) for {:.1}s",
                    n + 1,
                    if leader { "the leader" } else { "a follower" },
                    secs(paused)
                ));
                *report
                    .counts
                    .entry(if leader {
                        "pause_leader"
                    } else {
                        "pause_follower"
                    })
                    .or_default() += 1;
                ctx.set_period(Period::OneDown);
                if let Some(pid) = cluster.pid(n) {
                    signal(pid, "-STOP");
                    tokio::time::sleep(paused).await;
                    signal(pid, "-CONT");
                }
                mark_restarted(&ctx, n);
                ctx.set_period(Period::AllUp);
            }
            Fault::DiskFull { who } => {
                let n = pick(&ctx, who, &mut rng).await;
                let leader = ctx.leader().await == Some(n);
                let Some(fs) = cluster.disks[n].as_ref() else {
                    report
                        .skipped
                        .push("disk full (no tmpfs: needs root)".to_string());
                    ctx.note("fault skipped: disk full (no tmpfs here)".to_string());
                    continue;
                };
                ctx.note(format!(
                    "fault: fill the disk of node {} ({})",
                    n + 1,
                    if leader { "the leader" } else { "a follower" }
                ));
                *report
                    .counts
                    .entry(if leader {
                        "disk_full_leader"
                    } else {
                        "disk_full_follower"
                    })
                    .or_default() += 1;
                ctx.set_period(Period::OneDown);
                let fs_path = fs.path().to_path_buf();
                let filler = {
                    let dir = fs_path.clone();
                    tokio::task::spawn_blocking(move || fill(&dir))
                        .await
                        .expect("fill the disk")
                };
                let stop = Arc::new(AtomicBool::new(false));
                let writer = tokio::spawn(ballast(ctx.clone(), stop.clone()));
                let status = cluster.wait_exit(n, Duration::from_secs(30)).await;
                stop.store(true, Ordering::SeqCst);
                let _ = writer.await;
                match status {
                    Some(s) => {
                        ctx.note(format!("node {} exited with {s} on its full disk", n + 1));
                        report.disk_exits.push(s.code());
                    }
                    None => {
                        ctx.anomaly(format!(
                            "node {} did not exit within 30 s of its disk filling up",
                            n + 1
                        ));
                        report.disk_exits.push(None);
                        cluster.kill9(n);
                    }
                }
                let _ = std::fs::remove_file(&filler);
                restart_node(&ctx, &mut cluster, n).await;
                ctx.set_period(Period::AllUp);
            }
            Fault::WholeDown { down, sidecar } => {
                ctx.whole_down_pending.store(true, Ordering::SeqCst);
                let mut sc = sidecars[sidecar].lock().await;
                ctx.note(format!(
                    "fault: kill -9 every registry node for {:.1}s; kill -9 and restart {} meanwhile",
                    secs(down),
                    sc.name()
                ));
                *report.counts.entry("whole_registry_down").or_default() += 1;
                ctx.set_period(Period::WholeDown);
                let down_at = Instant::now();
                for n in 0..3 {
                    cluster.kill9(n);
                }
                // The web sidecar restarts with no registry: from its cache file.
                rotation.set(sidecar, None);
                rotation.drained(sidecar, Duration::from_secs(6)).await;
                sc.kill9();
                let restarted_at = Instant::now();
                let result = if sc.start(&ctx).await {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let mut ready = sc.ready().await;
                    while !ready && Instant::now() < deadline {
                        // Poll interval of a wait bounded by its deadline (/ready).
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        ready = sc.ready().await;
                    }
                    if ready {
                        rotation.set(sidecar, sc.proxy.clone());
                        Ok(secs(restarted_at.elapsed()))
                    } else {
                        Err(format!("{} not ready from its cache within 5 s", sc.name()))
                    }
                } else {
                    Err(format!("{} did not start without a registry", sc.name()))
                };
                match &result {
                    Ok(t) => ctx.note(format!(
                        "{} restarted without a registry: ready from its cache after {t:.2}s",
                        sc.name()
                    )),
                    Err(e) => ctx.anomaly(e.clone()),
                }
                report.cache_restarts.push(result);
                drop(sc);
                tokio::time::sleep(down.saturating_sub(down_at.elapsed())).await;
                let offsets: Vec<u64> = (0..3).map(|n| cluster.spawn(n)).collect();
                for (n, offset) in offsets.into_iter().enumerate() {
                    if !cluster.serving(n, offset).await {
                        ctx.anomaly(format!(
                            "node {} did not serve within 20 s of the restart",
                            n + 1
                        ));
                    }
                }
                match ctx.wait_leader(Duration::from_secs(20)).await {
                    Some(l) => ctx.note(format!(
                        "registry back: node {} leads, {:.2}s after the outage began",
                        l + 1,
                        secs(down_at.elapsed())
                    )),
                    None => ctx.anomaly("no leader within 20 s of restarting every node".into()),
                }
                mark_restarted(&ctx, rng.below(3) as usize);
                ctx.set_period(Period::AllUp);
                ctx.whole_down_pending.store(false, Ordering::SeqCst);
            }
        }
        match ctx.settle(Duration::from_secs(25)).await {
            Some(d) => report.settle_secs.push(secs(d)),
            None => ctx.anomaly("the cluster did not settle within 25 s of a fault".into()),
        }
    }
    (cluster, report)
}

/// Fills the tmpfs under `dir`; returns the filler (removing it frees the space).
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let Ok(mut f) = std::fs::File::create(&filler) else {
        return filler;
    };
    let chunk = vec![0u8; 256 * 1024];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&[0u8; 512]).is_ok() {}
    while f.write_all(&[0u8; 1]).is_ok() {}
    filler
}

/// Restarts sidecars gracefully on the plan's second timeline.
async fn drive_sidecars(
    ctx: Arc<Ctx>,
    restarts: Vec<(Duration, usize)>,
    sidecars: Arc<Vec<tokio::sync::Mutex<Sidecar>>>,
    rotation: Arc<Rotation>,
) -> u64 {
    let start = Instant::now();
    let mut done = 0;
    for (at, planned) in restarts {
        let wait = (start + at).saturating_duration_since(Instant::now());
        tokio::time::sleep(wait).await;
        // Never during the whole-registry outage.
        for _ in 0..600 {
            if !ctx.whole_down_pending.load(Ordering::SeqCst) {
                break;
            }
            // Poll interval while the outage lasts (bounded: 60 s).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ctx.faults_on.load(Ordering::SeqCst) || !ctx.running() {
            break;
        }
        let mut i = planned;
        if SIDECARS[i].1 == "2.0.0" && !ctx.rollout_over.load(Ordering::SeqCst) {
            // A canary's restart errors would count against it: its stable twin instead.
            i -= 2;
        }
        let mut sc = sidecars[i].lock().await;
        let from = ctx.now();
        ctx.note(format!(
            "sidecar: restart {} (SIGTERM, then start)",
            sc.name()
        ));
        if sc.is_web() {
            rotation.set(i, None);
            if !rotation.drained(i, Duration::from_secs(6)).await {
                ctx.anomaly(format!("requests through {} did not finish", sc.name()));
            }
        }
        match sc.stop(Duration::from_secs(25)).await {
            Some(s) if s.success() => {}
            other => ctx.note(format!("{} stopped with {other:?}", sc.name())),
        }
        if !sc.start(&ctx).await {
            ctx.anomaly(format!("{} did not start again", sc.name()));
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        if sc.is_web() {
            while !sc.ready().await && Instant::now() < deadline {
                // Poll interval of a wait bounded by its deadline (/ready).
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rotation.set(i, sc.proxy.clone());
        } else {
            // Back in the catalog with its mesh port, before the next restart.
            loop {
                let mut back = false;
                if let Some(l) = ctx.leader().await {
                    if let Some(r) = ctx.resolve(l, "api").await {
                        back = r
                            .instances
                            .iter()
                            .any(|x| x.id == sc.name() && x.mesh_port != 0 && x.state == 1);
                    }
                }
                if back {
                    break;
                }
                if Instant::now() >= deadline {
                    ctx.note(format!("{} not back in the catalog within 20 s", sc.name()));
                    break;
                }
                // Poll interval of a wait bounded by its deadline (a registration).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let to = ctx.now();
        if let Ok(mut r) = ctx.restarts.lock() {
            r.push(RestartWindow {
                id: SIDECARS[i].0,
                from,
                to,
            });
        }
        done += 1;
    }
    done
}

// ---------------------------------------------------------------------------------------
// The model check.

#[derive(Default)]
struct ModelReport {
    reads_checked: u64,
    pairs_checked: u64,
    violations: Vec<String>,
    write_order_violations: Vec<String>,
    stale_reads: u64,
    lost: Vec<String>,
    phantoms: Vec<String>,
    resurrected: Vec<String>,
    indeterminate: u64,
    keys: usize,
}

fn present_after(kind: Kind) -> bool {
    kind == Kind::Register
}

/// See the module's documentation, "The model check".
fn model_check(h: &History, leader_ids: &BTreeSet<String>) -> ModelReport {
    let mut m = ModelReport::default();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &h.ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    m.keys = by_key.len();

    // 1. Acknowledged writes respect real time.
    let mut acked: Vec<(f64, f64, u64, &str)> = h
        .ops
        .iter()
        .filter_map(|o| match o.outcome {
            Outcome::Acked(r) => Some((o.invoke, o.complete, r, o.key.as_str())),
            _ => None,
        })
        .collect();
    let mut by_complete = acked.clone();
    by_complete.sort_by(|a, b| a.1.total_cmp(&b.1));
    acked.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut j = 0;
    let mut max_done: Option<(u64, &str, f64)> = None;
    for (invoke, _, rev, key) in &acked {
        while j < by_complete.len() && by_complete[j].1 < *invoke {
            let (_, c, r, k) = by_complete[j];
            if max_done.is_none_or(|(mr, _, _)| r > mr) {
                max_done = Some((r, k, c));
            }
            j += 1;
        }
        if let Some((mr, mk, mc)) = max_done {
            if mr > *rev && m.write_order_violations.len() < 20 {
                m.write_order_violations.push(format!(
                    "{key} invoked at {invoke:.3}s got revision {rev}, below revision {mr} of {mk}, acknowledged at {mc:.3}s"
                ));
            }
        }
    }

    // 2. Every read is explained, key by key.
    for r in &h.reads {
        m.reads_checked += 1;
        // Stale: below a write acknowledged before the read began.
        let newest_before = by_complete
            .iter()
            .take_while(|a| a.1 < r.invoke)
            .map(|a| a.2)
            .max()
            .unwrap_or(0);
        if r.revision < newest_before {
            m.stale_reads += 1;
        }
        for id in &r.ids {
            if !by_key.contains_key(id.as_str()) && m.violations.len() < 30 {
                m.violations.push(format!(
                    "a Resolve on node {} at revision {} shows {id}, which no client registered",
                    r.node + 1,
                    r.revision
                ));
            }
        }
        for (key, ops) in &by_key {
            m.pairs_checked += 1;
            let observed = r.ids.contains(*key);
            let base = ops
                .iter()
                .filter_map(|o| match o.outcome {
                    Outcome::Acked(rev) if rev <= r.revision => Some((rev, o.kind)),
                    _ => None,
                })
                .max_by_key(|(rev, _)| *rev);
            let expected = base.is_some_and(|(_, k)| present_after(k));
            if observed == expected {
                continue;
            }
            let explained = ops.iter().any(|o| {
                matches!(o.outcome, Outcome::Unknown | Outcome::Gone)
                    && present_after(o.kind) == observed
                    && o.invoke < r.complete
            });
            if !explained && m.violations.len() < 30 {
                m.violations.push(format!(
                    "a Resolve on node {} at revision {} ({:.3}s-{:.3}s) {} {key}, but its last acknowledged write at or below that revision is {}",
                    r.node + 1,
                    r.revision,
                    r.invoke,
                    r.complete,
                    if observed { "shows" } else { "lacks" },
                    match base {
                        Some((rev, k)) => format!("{k:?} at revision {rev}"),
                        None => "none".to_string(),
                    }
                ));
            }
        }
    }

    // 3. The end state on the leader.
    for (key, ops) in &by_key {
        let Some(last) = ops.last() else { continue };
        let present = leader_ids.contains(*key);
        match (last.outcome, last.kind) {
            (Outcome::Acked(_), Kind::Register) => {
                if !present {
                    m.lost.push(key.to_string());
                }
            }
            (Outcome::Acked(_) | Outcome::Gone, Kind::Deregister) => {
                if present {
                    let explained = ops
                        .iter()
                        .any(|o| o.kind == Kind::Register && matches!(o.outcome, Outcome::Unknown));
                    if explained {
                        m.phantoms.push(key.to_string());
                    } else {
                        m.resurrected.push(key.to_string());
                    }
                }
            }
            _ => m.indeterminate += 1,
        }
    }
    m
}

// ---------------------------------------------------------------------------------------
// The run.

async fn chaos(net: Net, seed: u64, secs_total: u64) {
    let wall = Instant::now();
    let partitions = matches!(net, Net::Lab(_));
    let plan = plan(seed, secs_total, partitions);
    println!("chaos: seed {seed}, {secs_total} s of faults (SWITCHYARD_CHAOS_SEED, SWITCHYARD_CHAOS_SECS)");
    println!(
        "chaos: nodes {}",
        if partitions {
            "in network namespaces on a bridge (partitions on)"
        } else {
            "on loopback (partitions skipped)"
        }
    );
    println!("chaos: the plan (offsets from the start of the faults):");
    for (at, f) in &plan.faults {
        println!("  registry  +{:5.1}s  {}", secs(*at), f.describe());
    }
    for (at, i) in &plan.sidecar_restarts {
        println!(
            "  sidecar   +{:5.1}s  restart {}{}",
            secs(*at),
            SIDECARS[*i].0,
            if SIDECARS[*i].1 == "2.0.0" {
                " (its stable twin while the rollout runs)"
            } else {
                ""
            }
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();

    // TLS for the registry, with the lab's addresses in the certificate.
    let tls_dir = root.join("tls");
    let mut init = vec!["tls", "init", "--dir", tls_dir.to_str().expect("utf-8")];
    let sans: Vec<String> = (1..=3).map(|i| format!("{NET}.{i}")).collect();
    if partitions {
        for s in &sans {
            init.extend_from_slice(&["--san", s]);
        }
    }
    let out = Command::new(BIN).args(&init).output().expect("tls init");
    assert!(out.status.success(), "tls init: {out:?}");
    let tls = TlsFiles {
        cert: tls_dir.join("registry.pem"),
        key: tls_dir.join("registry-key.pem"),
        ca: tls_dir.join("ca.pem"),
    };
    let ca = tls.ca.clone();

    // Addresses.
    let (grpc, peer, http): (Vec<String>, Vec<String>, Vec<String>) = match &net {
        Net::Lab(_) => (
            (1..=3).map(|i| format!("{NET}.{i}:7400")).collect(),
            (1..=3).map(|i| format!("{NET}.{i}:7402")).collect(),
            (1..=3).map(|i| format!("{NET}.{i}:7401")).collect(),
        ),
        Net::Loopback => (
            (0..3)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
            (0..3)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
            (0..3)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
        ),
    };
    let disks: Vec<Option<Tmpfs>> = (0..3).map(|_| Tmpfs::mount("96m")).collect();
    if disks.iter().any(Option::is_none) {
        println!("chaos: no tmpfs (needs root): the disk-full fault is skipped");
    }
    let dirs: Vec<PathBuf> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Some(fs) => fs.path().join("data"),
            None => root.join(format!("n{}", i + 1)),
        })
        .collect();
    let logs_dir = std::env::var("SWITCHYARD_CHAOS_LOGS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("logs"));
    std::fs::create_dir_all(&logs_dir).expect("logs dir");
    let mut cluster = Cluster {
        net: net.clone(),
        grpc: grpc.clone(),
        http: http.clone(),
        peer,
        dirs,
        logs: (1..=3)
            .map(|i| logs_dir.join(format!("registry-{i}.log")))
            .collect(),
        tls,
        procs: vec![None, None, None],
        disks,
    };
    let offsets: Vec<u64> = (0..3).map(|n| cluster.spawn(n)).collect();
    for (n, offset) in offsets.into_iter().enumerate() {
        assert!(
            cluster.serving(n, offset).await,
            "node {} did not start: {:?}",
            n + 1,
            cluster.log_tail(n, 20, "")
        );
    }
    let urls: Vec<String> = grpc.iter().map(|g| format!("https://{g}")).collect();
    let transport = switchyard_tls::Transport::from_ca_file(Some(&ca)).expect("the CA loads");
    let unary: Vec<Channel> = urls
        .iter()
        .map(|u| transport.connect_lazy(endpoint(u, true)))
        .collect();
    let streams: Vec<Channel> = urls
        .iter()
        .map(|u| transport.connect_lazy(endpoint(u, false)))
        .collect();
    let roots = switchyard_tls::files::read_roots(&ca).expect("roots");
    let client_tls = switchyard_tls::rustls::ClientConfig::builder_with_provider(Arc::new(
        switchyard_tls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();

    // ACLs: bootstrap, then a token per kind of client.
    let mut boot = None;
    for _ in 0..100 {
        let out = cli(
            None,
            &ca,
            &["acl", "bootstrap", "--registry", &urls[0], "-o", "json"],
        );
        if out.status.success() {
            boot = Some(secret_of(&String::from_utf8_lossy(&out.stdout)));
            break;
        }
        // A leader is being elected: try again shortly (bounded: 100 tries).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let operator = boot.expect("acl bootstrap");
    let op = Some(operator.as_str());
    let token = |rules: &[&str]| {
        let mut args = vec![
            "acl",
            "token",
            "create",
            "--registry",
            &urls[0],
            "-o",
            "json",
        ];
        args.extend_from_slice(rules);
        secret_of(&cli_ok(op, &ca, &args))
    };
    let web_token = token(&["--service-identity", "web"]);
    let api_token = token(&["--service-identity", "api"]);
    let reg_token = token(&["--rule", "service:reg:register,read"]);
    let read_token = token(&["--rule", "service:*:read"]);
    let web_token_file = root.join("web.token");
    let api_token_file = root.join("api.token");
    std::fs::write(&web_token_file, &web_token).expect("token file");
    std::fs::write(&api_token_file, &api_token).expect("token file");
    cli_ok(
        op,
        &ca,
        &["intention", "allow", "web", "api", "--registry", &urls[0]],
    );

    let ctx = Arc::new(Ctx {
        t0: Instant::now(),
        urls: urls.clone(),
        http,
        ca: ca.clone(),
        unary,
        streams,
        tls: Arc::new(client_tls),
        tokens: Tokens {
            reg: bearer(&reg_token),
            read: bearer(&read_token),
            op: bearer(&operator),
        },
        period: AtomicU8::new(0),
        churn: AtomicBool::new(true),
        idle: AtomicUsize::new(0),
        load_on: AtomicBool::new(true),
        running: AtomicBool::new(true),
        faults_on: AtomicBool::new(true),
        whole_down_pending: AtomicBool::new(false),
        rollout_over: AtomicBool::new(false),
        restarted: AtomicU64::new(0),
        expiries_max: AtomicU64::new(0),
        term_max: AtomicU64::new(0),
        history: Mutex::new(History::default()),
        load: Mutex::new(LoadStats::default()),
        restarts: Mutex::new(Vec::new()),
        notes: Mutex::new(Vec::new()),
        anomalies: Mutex::new(Vec::new()),
        rollout_phases: Mutex::new(Vec::new()),
        leader_timeline: Mutex::new(Vec::new()),
    });
    ctx.note(format!(
        "registry up (TLS, ACLs bootstrapped); leader node {}",
        ctx.wait_leader(Duration::from_secs(20))
            .await
            .map_or(0, |l| l + 1)
    ));

    // Backends and sidecars.
    let mut backends = Vec::new();
    let mut sidecar_list = Vec::new();
    for (i, (name, _, web)) in SIDECARS.iter().enumerate() {
        let b = Backend::start(name, Duration::ZERO).await;
        sidecar_list.push(Sidecar {
            index: i,
            app_port: b.addr.port(),
            log: logs_dir.join(format!("sidecar-{name}.log")),
            cache: root.join(format!("{name}.cache.json")),
            token_file: if *web {
                web_token_file.clone()
            } else {
                api_token_file.clone()
            },
            proc: None,
            proxy: None,
            admin: None,
        });
        backends.push(b);
    }
    for sc in sidecar_list.iter_mut().rev() {
        assert!(
            sc.start(&ctx).await,
            "{} did not start: {}",
            sc.name(),
            log_since(&sc.log, 0)
        );
    }
    let rotation = Arc::new(Rotation::new(2));
    for sc in &sidecar_list[..2] {
        rotation.set(sc.index, sc.proxy.clone());
    }
    // Every sidecar in the catalog with its mesh port; then stable takes every request
    // (a split may only name versions that exist), and the web proxies route to it over
    // mTLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut split_put = false;
    loop {
        let mut ok = false;
        if let Some(l) = ctx.leader().await {
            if let Some(cat) = ctx.catalog(l).await {
                ok = SIDECARS.iter().all(|(name, _, _)| {
                    cat.get(*name)
                        .is_some_and(|p| !p.ends_with("mesh=0") && p.contains("state=1"))
                });
            }
        }
        if ok && !split_put {
            cli_ok(
                op,
                &ca,
                &["route", "split", "api", "1.0.0=100", "--registry", &urls[0]],
            );
            split_put = true;
        }
        for sc in &sidecar_list[..2] {
            let r = http_get(
                sc.proxy.as_deref().unwrap_or(""),
                "api",
                "/",
                Duration::from_secs(2),
            )
            .await;
            ok &= matches!(&r, Ok((200, head, body)) if body.contains("api-v1")
                && head.to_lowercase().contains("x-seen-peer-identity: spiffe://"));
        }
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecars did not come up in the mesh within 30 s"
        );
        // Poll interval of a wait bounded by its deadline (registrations, certificates).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sidecars: Arc<Vec<tokio::sync::Mutex<Sidecar>>> = Arc::new(
        sidecar_list
            .into_iter()
            .map(tokio::sync::Mutex::new)
            .collect(),
    );
    ctx.note("sidecars up: web -> api over mutual TLS".into());

    // Workers.
    let mut rng = Rng::new(seed ^ 0xC4A0_5EED);
    let mut tasks = Vec::new();
    for _ in 0..LOAD_WORKERS {
        tasks.push(tokio::spawn(load_worker(ctx.clone(), rotation.clone())));
    }
    for c in 0..CLIENTS {
        tasks.push(tokio::spawn(registration_client(
            ctx.clone(),
            c,
            rng.fork(c as u64),
        )));
    }
    let watch_states: Vec<Arc<Mutex<WatchState>>> = (0..WATCHERS)
        .map(|_| Arc::new(Mutex::new(WatchState::default())))
        .collect();
    for (w, st) in watch_states.iter().enumerate() {
        tasks.push(tokio::spawn(watcher(
            ctx.clone(),
            w,
            st.clone(),
            w == WATCHERS - 1,
        )));
    }
    tasks.push(tokio::spawn(scraper(ctx.clone())));
    tasks.push(tokio::spawn(rollout_watcher(ctx.clone())));

    // The rollout, then the faults.
    let pause = (secs_total / 6).clamp(3, 90);
    let pause_arg = format!("{pause}s");
    let deadline_arg = format!("{}s", secs_total * 3 + 60);
    let started = cli_ok(
        op,
        &ca,
        &[
            "rollout",
            "start",
            "api",
            "--canary",
            "2.0.0",
            "--baseline",
            "1.0.0",
            "--steps",
            "20,50,100",
            "--pause",
            &pause_arg,
            "--interval",
            "1s",
            "--min-requests",
            "30",
            // Slow means slower than 1 s (a timeout's worth), not "slower than the
            // baseline's p95": fresh mTLS pools after a fault make a canary briefly
            // slower, which is no verdict on its release.
            "--latency-slo",
            "1s",
            "--step-deadline",
            &deadline_arg,
            "--registry",
            &urls[1],
        ],
    );
    ctx.note(format!("rollout started: {}", started.trim()));
    let faults_started = ctx.now();
    ctx.note("faults begin".into());
    let driver = tokio::spawn(drive_faults(
        ctx.clone(),
        cluster,
        plan.faults.clone(),
        sidecars.clone(),
        rotation.clone(),
        rng.fork(0xFA17),
    ));
    let sidecar_driver = tokio::spawn(drive_sidecars(
        ctx.clone(),
        plan.sidecar_restarts.clone(),
        sidecars.clone(),
        rotation.clone(),
    ));
    let (cluster, faults) = driver.await.expect("the fault driver");
    ctx.faults_on.store(false, Ordering::SeqCst);
    let sidecar_restarts = sidecar_driver.await.expect("the sidecar driver");
    let faults_secs = ctx.now() - faults_started;
    ctx.note(format!("faults stopped after {faults_secs:.1}s"));

    // Quiesce the registration clients (their leases stay renewed).
    ctx.churn.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(45);
    while ctx.idle.load(Ordering::SeqCst) < CLIENTS && Instant::now() < deadline {
        // Poll interval of a wait bounded by its deadline (the clients' last writes).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The sidecars' own registrations settle: a registrar that found no registry backs
    // off (up to 10 s) before it registers again, then adds its mesh port.
    let faults_over = Instant::now();
    let deadline = faults_over + Duration::from_secs(25);
    let mut sidecars_back = None;
    while Instant::now() < deadline {
        if let Some(l) = ctx.leader().await {
            if let Some(cat) = ctx.catalog(l).await {
                let all = SIDECARS.iter().all(|(name, _, _)| {
                    cat.get(*name)
                        .is_some_and(|p| !p.ends_with("mesh=0") && p.contains("state=1"))
                });
                if all {
                    sidecars_back = Some(faults_over.elapsed());
                    break;
                }
            }
        }
        // Poll interval of a wait bounded by its deadline (the sidecars' registrations).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ctx.note(format!(
        "every sidecar registered with its mesh port: {}",
        sidecars_back.map_or("not within 25 s".to_string(), |d| format!(
            "after {:.2}s",
            secs(d)
        ))
    ));

    // Convergence: every node and every watcher holds the leader's instances.
    let quiet_at = Instant::now();
    let mut converged = None;
    let mut last_diff = String::new();
    while quiet_at.elapsed() < CONVERGENCE_BOUND * 3 {
        if let Some(l) = ctx.wait_leader(Duration::from_secs(2)).await {
            if let Some(want) = ctx.catalog(l).await {
                let mut diffs = Vec::new();
                for n in 0..3 {
                    match ctx.catalog(n).await {
                        Some(have) if have == want => {}
                        Some(have) => diffs.push(format!("node {}: {}", n + 1, diff(&want, &have))),
                        None => diffs.push(format!("node {}: no answer", n + 1)),
                    }
                }
                for (w, st) in watch_states.iter().enumerate() {
                    let have: BTreeMap<String, String> = st
                        .lock()
                        .map(|s| {
                            s.view
                                .iter()
                                .map(|(k, v)| (k.clone(), project(v)))
                                .collect()
                        })
                        .unwrap_or_default();
                    if have != want {
                        diffs.push(format!("watcher {w}: {}", diff(&want, &have)));
                    }
                }
                if diffs.is_empty() {
                    converged = Some(quiet_at.elapsed());
                    break;
                }
                last_diff = diffs.join("; ");
            }
        }
        // Poll interval of the convergence check (bounded by 3x its bound).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match converged {
        Some(d) => ctx.note(format!(
            "converged {:.2}s after the faults stopped",
            secs(d)
        )),
        None => ctx.note(format!("NOT converged: {last_diff}")),
    }

    // The rollout ends.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ctx.rollout_over.load(Ordering::SeqCst) && Instant::now() < deadline {
        // Poll interval of a wait bounded by its deadline (the rollout's own steps).
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let leader = ctx
        .wait_leader(Duration::from_secs(10))
        .await
        .expect("a leader at the end");
    let rollout = get_rollout(&ctx, leader).await;
    let rollout_phase = rollout
        .as_ref()
        .and_then(|r| r.status.as_ref())
        .map_or_else(|| "unknown".to_string(), |s| phase_name(s.phase));
    let mut routing =
        RoutingClient::with_interceptor(ctx.unary[leader].clone(), ctx.tokens.op.clone());
    let policy = tokio::time::timeout(
        Duration::from_secs(3),
        routing.get_policy(pb::GetPolicyRequest {
            namespace: String::new(),
            service: "api".into(),
        }),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .and_then(|r| r.into_inner().current)
    .and_then(|c| c.policy);
    let split = policy
        .as_ref()
        .map(|p| {
            p.default_split
                .iter()
                .map(|w| format!("{}={}", w.subset, w.weight))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();

    // After promotion every request goes to 2.0.0, over mutual TLS.
    let mut final_ok = 0;
    let mut final_bad = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    'proxies: for slot in 0..2 {
        let proxy = sidecars[slot]
            .lock()
            .await
            .proxy
            .clone()
            .unwrap_or_default();
        let mut streak = 0;
        while streak < 20 {
            let r = http_get(&proxy, "api", "/", Duration::from_secs(5)).await;
            let good = matches!(&r, Ok((200, head, body)) if body.contains("api-v2")
                && head.to_lowercase().contains("x-seen-peer-identity: spiffe://"));
            if good {
                streak += 1;
                final_ok += 1;
            } else {
                streak = 0;
                if Instant::now() >= deadline {
                    final_bad.push(format!("via {proxy}: {r:?}"));
                    continue 'proxies;
                }
                // Poll interval of a wait bounded by its deadline (the promotion's policy).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // Stop the load, then read the leader's end state.
    ctx.load_on.store(false, Ordering::SeqCst);
    let leader_reg: BTreeSet<String> = ctx
        .resolve(leader, "reg")
        .await
        .map(|r| r.instances.into_iter().map(|i| i.id).collect())
        .expect("the leader resolves reg");
    let leader_catalog = ctx.catalog(leader).await.unwrap_or_default();
    // One last scrape of the expiry counters, after everything.
    for n in 0..3 {
        if let Some(text) = https_get(&ctx, &ctx.http[n], "/metrics").await {
            if let Some(v) = metric(&text, "switchyard_registry_lease_expiries_total") {
                ctx.expiries_max.fetch_max(v as u64, Ordering::SeqCst);
            }
        }
    }
    ctx.running.store(false, Ordering::SeqCst);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }

    // Checks.
    let history = std::mem::take(&mut *ctx.history());
    let model = model_check(&history, &leader_reg);
    let load = std::mem::take(&mut *ctx.load.lock().expect("load"));
    let restarts = std::mem::take(&mut *ctx.restarts.lock().expect("restarts"));
    let mut backwards = Vec::new();
    let mut unexplained = Vec::new();
    let (mut events, mut reconnects, mut hops, mut snapshots, mut back_events) = (0, 0, 0, 0, 0);
    for (w, st) in watch_states.iter().enumerate() {
        let s = st.lock().expect("watch state");
        events += s.events;
        reconnects += s.reconnects;
        hops += s.hops;
        snapshots += s.snapshots;
        back_events += s.backwards_events;
        backwards.extend(s.backwards.iter().map(|b| format!("watcher {w}: {b}")));
        for r in &s.removals {
            if r.backwards_snapshot {
                continue;
            }
            let explained = match r.service.as_str() {
                "reg" => history.ops.iter().any(|o| {
                    o.key == r.id
                        && o.kind == Kind::Deregister
                        && match o.outcome {
                            Outcome::Acked(rev) => rev <= r.revision,
                            _ => o.invoke <= r.at,
                        }
                }),
                _ => restarts
                    .iter()
                    .any(|x| x.id == r.id && r.at >= x.from - 1.0 && r.at <= x.to + 20.0),
            };
            if !explained {
                unexplained.push(format!(
                    "watcher {w}: {} ({}) removed at revision {} ({:.2}s)",
                    r.id, r.service, r.revision, r.at
                ));
            }
        }
    }
    let unexpected_losses: Vec<&LeaseLoss> = history
        .lease_losses
        .iter()
        .filter(|l| l.at - l.last_ok < f64::from(CLIENT_TTL) - 0.5)
        .collect();
    let lapses = history.lease_losses.len() - unexpected_losses.len();
    let sidecars_missing: Vec<&str> = SIDECARS
        .iter()
        .map(|s| s.0)
        .filter(|id| {
            !leader_catalog
                .get(*id)
                .is_some_and(|p| p.contains("state=1") && !p.ends_with("mesh=0"))
        })
        .collect();
    let forgot: Vec<String> = (0..SIDECARS.len())
        .flat_map(|i| {
            let text =
                std::fs::read_to_string(logs_dir.join(format!("sidecar-{}.log", SIDECARS[i].0)))
                    .unwrap_or_default();
            text.lines()
                .filter(|l| l.contains("forgot our lease"))
                .map(|l| format!("{}: {l}", SIDECARS[i].0))
                .collect::<Vec<_>>()
        })
        .collect();
    let acked = history
        .ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Acked(_)))
        .count();
    let unknown = history
        .ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Unknown))
        .count();
    let mut acked_times: Vec<f64> = history
        .ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Acked(_)) && o.complete >= faults_started)
        .map(|o| o.complete)
        .collect();
    acked_times.sort_by(f64::total_cmp);
    let longest_gap = acked_times
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max);
    let expiries = ctx.expiries_max.load(Ordering::SeqCst);
    let anomalies = std::mem::take(&mut *ctx.anomalies.lock().expect("anomalies"));
    let phases = ctx
        .rollout_phases
        .lock()
        .map(|p| p.join(" | "))
        .unwrap_or_default();

    println!("---- what each node said about the leader (role->leader/term), at each change ----");
    for (at, view) in ctx
        .leader_timeline
        .lock()
        .map(|t| t.clone())
        .unwrap_or_default()
    {
        println!("  {at:7.2}s  {view}");
    }
    let fig = |name: &str, value: String| println!("chaos: {name} = {value}");
    println!("\n---- chaos figures (seed {seed}) ----");
    fig("seed", seed.to_string());
    fig("faults_secs_planned", secs_total.to_string());
    fig("faults_secs_run", format!("{faults_secs:.1}"));
    fig("wall_secs", format!("{:.1}", wall.elapsed().as_secs_f64()));
    fig(
        "partitions",
        if partitions {
            "on".into()
        } else {
            "skipped (no netns)".into()
        },
    );
    fig(
        "faults",
        faults
            .counts
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    fig("faults_skipped", format!("{:?}", faults.skipped));
    fig("sidecar_restarts", sidecar_restarts.to_string());
    fig(
        "settle_secs_after_each_fault",
        faults
            .settle_secs
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    fig(
        "raft_term_max",
        ctx.term_max.load(Ordering::SeqCst).to_string(),
    );
    fig("requests_all_nodes_up", load.sent[0].to_string());
    fig("failed_all_nodes_up", load.failed[0].to_string());
    fig("requests_one_registry_node_down", load.sent[1].to_string());
    fig("failed_one_registry_node_down", load.failed[1].to_string());
    fig(
        "requests_whole_registry_down_from_cache",
        load.sent[2].to_string(),
    );
    fig(
        "failed_whole_registry_down_from_cache",
        load.failed[2].to_string(),
    );
    fig("requests_over_mtls", load.mtls.to_string());
    fig("requests_by_backend", format!("{:?}", load.by_backend));
    for (p, name) in [
        "all_nodes_up",
        "one_registry_node_down",
        "whole_registry_down",
    ]
    .iter()
    .enumerate()
    {
        fig(
            &format!("failed_request_samples_{name}"),
            format!("{:?}", load.samples[p]),
        );
    }
    fig(
        "cache_restarts_ready_secs",
        format!("{:?}", faults.cache_restarts),
    );
    fig("writes_acknowledged", acked.to_string());
    fig("write_attempts_unknown_outcome", unknown.to_string());
    fig("write_errors_by_code", format!("{:?}", history.errors));
    fig(
        "write_error_first_messages",
        format!("{:?}", history.error_samples),
    );
    fig(
        "longest_secs_without_an_acknowledged_write",
        format!("{longest_gap:.2}"),
    );
    fig("registration_keys", model.keys.to_string());
    fig(
        "acknowledged_registrations_lost",
        model.lost.len().to_string(),
    );
    fig("lost_keys", format!("{:?}", model.lost));
    fig(
        "missing_at_first_deregister",
        format!("{:?}", history.missing_at_deregister),
    );
    fig("phantom_registrations", format!("{:?}", model.phantoms));
    fig(
        "deregisters_denied_by_a_node_without_the_instance",
        history.deregister_denied.to_string(),
    );
    // Every attempt on the keys that came out wrong, for a report.
    for key in model
        .lost
        .iter()
        .chain(&model.phantoms)
        .chain(&model.resurrected)
        .chain(&history.missing_at_deregister)
    {
        let ops: Vec<String> = history
            .ops
            .iter()
            .filter(|o| &o.key == key)
            .map(|o| {
                format!(
                    "{:?} via node {} {:.3}s-{:.3}s {:?}",
                    o.kind,
                    o.node.wrapping_add(1),
                    o.invoke,
                    o.complete,
                    o.outcome
                )
            })
            .collect();
        fig(&format!("history_of_{key}"), format!("{ops:?}"));
    }
    fig(
        "resurrected_registrations",
        format!("{:?}", model.resurrected),
    );
    fig("keys_indeterminate", model.indeterminate.to_string());
    fig("writes_given_up", format!("{:?}", history.gave_up));
    fig("reads_checked", model.reads_checked.to_string());
    fig("read_key_pairs_checked", model.pairs_checked.to_string());
    fig("model_violations", model.violations.len().to_string());
    fig("model_violation_samples", format!("{:?}", model.violations));
    fig(
        "write_order_violations",
        format!("{:?}", model.write_order_violations),
    );
    fig("stale_reads", model.stale_reads.to_string());
    fig("watch_events", events.to_string());
    fig("watch_snapshots", snapshots.to_string());
    fig("watch_reconnects", reconnects.to_string());
    fig("watch_hops_to_restarted_nodes", hops.to_string());
    fig(
        "watch_streams_whose_revisions_went_backwards",
        backwards.len().to_string(),
    );
    fig(
        "watch_events_below_a_revision_already_seen",
        back_events.to_string(),
    );
    fig(
        "watch_backwards_first_events",
        format!("{:?}", &backwards[..backwards.len().min(10)]),
    );
    fig(
        "sidecars_registered_again_secs_after_the_faults",
        sidecars_back.map_or("not within 25 s".to_string(), |d| format!("{:.2}", secs(d))),
    );
    fig(
        "convergence_secs",
        converged.map_or_else(
            || format!("NOT within {:?}: {last_diff}", CONVERGENCE_BOUND * 3),
            |d| format!("{:.2} (bound {})", secs(d), CONVERGENCE_BOUND.as_secs()),
        ),
    );
    fig("lease_expiries_metric_max_over_nodes", expiries.to_string());
    fig(
        "client_lease_losses",
        format!(
            "{} ({} unexpected, {lapses} after renewals failed for a whole TTL): {:?}",
            history.lease_losses.len(),
            unexpected_losses.len(),
            history
                .lease_losses
                .iter()
                .map(|l| format!(
                    "client {} at {:.2}s, last renewal {:.2}s, {} instances",
                    l.client, l.at, l.last_ok, l.instances
                ))
                .collect::<Vec<_>>()
        ),
    );
    fig(
        "keepalive_spurious_not_found",
        history.spurious_not_found.to_string(),
    );
    fig("sidecar_leases_forgotten", format!("{forgot:?}"));
    fig("unexplained_removals", format!("{unexplained:?}"));
    fig("sidecars_missing_at_end", format!("{sidecars_missing:?}"));
    fig(
        "rollout_phase",
        format!("{rollout_phase} (expected SUCCEEDED)"),
    );
    fig("rollout_timeline", phases.clone());
    fig("rollout_final_split", split.clone());
    fig(
        "final_requests_to_canary_over_mtls",
        format!("{final_ok} ok, bad: {final_bad:?}"),
    );
    fig(
        "disk_full_exit_codes",
        format!("{:?} (expected 74)", faults.disk_exits),
    );
    fig("anomalies", format!("{anomalies:?}"));
    println!("---- end of chaos figures ----\n");

    // What the nodes said about leadership, leases and storage (for a report).
    println!("---- registry log excerpts ----");
    for n in 0..3 {
        for marker in [
            "leads now",
            "leases expired",
            "self-preservation",
            "exiting with status",
        ] {
            for l in cluster.log_tail(n, 6, marker) {
                println!("{l}");
            }
        }
    }
    println!("---- end of registry log excerpts ----");
    drop(cluster);

    // The hard guarantees: every one that broke is named, then the test fails.
    let converged = converged.unwrap_or(CONVERGENCE_BOUND * 3);
    let checks: Vec<(bool, String)> = vec![
        (
            load.failed[1] == 0,
            format!(
                "{} requests through the sidecars failed while one registry node was down: {:?}",
                load.failed[1], load.samples[1]
            ),
        ),
        (
            load.failed[2] == 0,
            format!(
                "{} requests through the sidecars failed while the whole registry was down: {:?}",
                load.failed[2], load.samples[2]
            ),
        ),
        (
            load.sent[1] > 0 && load.sent[2] > 0,
            format!(
                "no traffic in a fault period ({} requests with one node down, {} with none up)",
                load.sent[1], load.sent[2]
            ),
        ),
        (
            model.lost.is_empty(),
            format!("acknowledged registrations lost: {:?}", model.lost),
        ),
        (
            history.missing_at_deregister.is_empty(),
            format!(
                "registered instances vanished before their owner deregistered them: {:?}",
                history.missing_at_deregister
            ),
        ),
        (
            model.resurrected.is_empty(),
            format!("deregistered instances came back: {:?}", model.resurrected),
        ),
        (
            model.write_order_violations.is_empty(),
            format!(
                "revisions disagree with real time: {:?}",
                model.write_order_violations
            ),
        ),
        (
            model.violations.is_empty(),
            format!("the model check failed: {:?}", model.violations),
        ),
        (
            backwards.is_empty(),
            format!(
                "watchers saw revisions go backwards on {} streams ({back_events} events): {:?}",
                backwards.len(),
                &backwards[..backwards.len().min(5)]
            ),
        ),
        (
            converged <= CONVERGENCE_BOUND,
            format!(
                "no convergence within {CONVERGENCE_BOUND:?} of the faults stopping: {last_diff}"
            ),
        ),
        (
            unexpected_losses.is_empty(),
            format!(
                "leases of registration clients expired while they kept renewing: {unexpected_losses:?}"
            ),
        ),
        (
            expiries as usize <= lapses,
            format!(
                "the registry expired {expiries} leases (switchyard_registry_lease_expiries_total); \
                 no lease in this test is abandoned ({lapses} lapsed for a whole TTL)"
            ),
        ),
        (
            unexplained.is_empty(),
            format!(
                "instances removed without their owner's deregistration: {:?}",
                &unexplained[..unexplained.len().min(8)]
            ),
        ),
        (
            forgot.is_empty(),
            format!("sidecars renewing their leases were told they were gone: {forgot:?}"),
        ),
        (
            sidecars_missing.is_empty(),
            format!("sidecars missing from the catalog at the end: {sidecars_missing:?}"),
        ),
        (
            rollout_phase == "SUCCEEDED",
            format!("the rollout ended {rollout_phase}, not SUCCEEDED: {phases}"),
        ),
        (
            final_bad.is_empty() && final_ok >= 40,
            format!(
                "after the promotion, requests not served by 2.0.0 over mTLS: {final_bad:?}"
            ),
        ),
        (
            faults.disk_exits.iter().all(|c| *c == Some(74)),
            format!(
                "a full disk did not make its node exit 74: {:?}",
                faults.disk_exits
            ),
        ),
        (
            faults.cache_restarts.iter().all(Result::is_ok),
            format!(
                "a sidecar did not serve from its cache: {:?}",
                faults.cache_restarts
            ),
        ),
        (anomalies.is_empty(), format!("anomalies: {anomalies:?}")),
    ];
    let broken: Vec<String> = checks
        .into_iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, why)| why)
        .collect();
    assert!(
        broken.is_empty(),
        "seed {seed}: {} guarantees broken:\n- {}",
        broken.len(),
        broken.join("\n- ")
    );
    drop(backends);
}

/// The first few differences between two catalogs.
fn diff(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> String {
    let mut out = Vec::new();
    for (k, v) in want {
        match have.get(k) {
            None => out.push(format!("lacks {k}")),
            Some(h) if h != v => out.push(format!("{k}: {h} instead of {v}")),
            _ => {}
        }
    }
    for k in have.keys().filter(|k| !want.contains_key(*k)) {
        out.push(format!("has {k} too"));
    }
    out.truncate(5);
    out.join(", ")
}
