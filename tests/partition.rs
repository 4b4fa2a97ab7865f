//! A network partition with real processes in network namespaces this test creates:
//! three `switchyard registry` nodes on a bridge; the leader is cut off, the majority
//! elects a new leader and keeps taking writes, the cut-off node refuses writes with a
//! clear error, and after healing it follows the new leader and catches up.
//!
//! Needs root and `ip netns` (iproute2). Where namespaces cannot be created the test says
//! so and returns; everywhere this project's CI runs (as root) it runs in full.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
/// Addresses live only inside the namespaces below; nothing leaves them.
const NET: &str = "10.213.77";

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The namespaces and processes of one run, removed on drop whatever happens.
struct Lab {
    tag: String,
    children: Vec<Option<Child>>,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("sy{}{name}", self.tag)
    }

    fn exec(&self, node: usize, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(&format!("n{node}")), BIN])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec")
    }

    fn members(&self, node: usize) -> Option<serde_json::Value> {
        let out = self.exec(
            node,
            &[
                "members",
                "--registry",
                &format!("http://{NET}.{node}:7400"),
                "-o",
                "json",
            ],
        );
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn link(&self, node: usize, up: bool) {
        assert!(ip(&[
            "-n",
            &self.ns("hub"),
            "link",
            "set",
            &format!("b{}{node}", self.tag),
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["hub", "n1", "n2", "n3"] {
            ip(&["netns", "del", &self.ns(n)]);
        }
    }
}

fn setup(dir: &std::path::Path) -> Option<Lab> {
    let tag = format!("{}", std::process::id() % 100_000);
    let lab = Lab {
        tag,
        children: Vec::new(),
    };
    if !ip(&["netns", "add", &lab.ns("hub")]) {
        return None;
    }
    let hub = lab.ns("hub");
    assert!(ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]));
    assert!(ip(&["-n", &hub, "link", "set", "br0", "up"]));
    let mut lab = lab;
    for i in 1..=3usize {
        let ns = lab.ns(&format!("n{i}"));
        let (inner, outer) = (format!("v{}{i}", lab.tag), format!("b{}{i}", lab.tag));
        assert!(ip(&["netns", "add", &ns]));
        assert!(ip(&[
            "link", "add", &inner, "type", "veth", "peer", "name", &outer
        ]));
        assert!(ip(&["link", "set", &inner, "netns", &ns]));
        assert!(ip(&["link", "set", &outer, "netns", &hub]));
        assert!(ip(&[
            "-n", &hub, "link", "set", &outer, "master", "br0", "up"
        ]));
        assert!(ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{NET}.{i}/24"),
            "dev",
            &inner
        ]));
        assert!(ip(&["-n", &ns, "link", "set", &inner, "up"]));
        assert!(ip(&["-n", &ns, "link", "set", "lo", "up"]));
    }
    let peers = (1..=3)
        .map(|i| format!("{i}={NET}.{i}:7402"))
        .collect::<Vec<_>>()
        .join(",");
    for i in 1..=3usize {
        let log = std::fs::File::create(dir.join(format!("n{i}.log"))).expect("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(&format!("n{i}")),
                BIN,
                "registry",
                "--dns",
                "off",
                "--node-id",
                &i.to_string(),
            ])
            .args([
                "--peers",
                &peers,
                "--listen",
                &format!("{NET}.{i}:7400"),
                "--peer-listen",
                &format!("{NET}.{i}:7402"),
                "--http",
                &format!("{NET}.{i}:7401"),
            ])
            .arg("--data-dir")
            .arg(dir.join(format!("n{i}")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn registry");
        lab.children.push(Some(child));
    }
    Some(lab)
}

/// The leader id the first of `asking` that knows one reports.
fn leader(lab: &Lab, asking: &[usize]) -> Option<u64> {
    asking.iter().find_map(|&n| {
        let id = lab.members(n)?["leader_id"].as_u64()?;
        (id != 0).then_some(id)
    })
}

fn wait<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        // Poll interval of `wait`, bounded by `limit` (real processes).
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Registers one instance through `node`, holding the lease for at most `secs` (then
/// SIGKILL, so it is not deregistered).
fn register(lab: &Lab, node: usize, id: &str, secs: u32) -> Output {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(&format!("n{node}")),
            "timeout",
            "-s",
            "KILL",
            &secs.to_string(),
            BIN,
            "register",
        ])
        .args([
            "--registry",
            &format!("http://{NET}.{node}:7400"),
            "--service",
            "web",
            "--address",
            "127.0.0.1",
        ])
        .args([
            "--port",
            "8080",
            "--version",
            "1",
            "--id",
            id,
            "--ttl",
            "60s",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("register")
}

#[test]
fn a_partitioned_leader_steps_aside_and_catches_up_after_healing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(lab) = setup(dir.path()) else {
        eprintln!("skipped: cannot create network namespaces here (needs root and iproute2)");
        return;
    };
    let old = wait(Duration::from_secs(20), "a leader", || {
        leader(&lab, &[1, 2, 3])
    }) as usize;
    let majority: Vec<usize> = (1..=3).filter(|n| *n != old).collect();

    lab.link(old, false);
    let cut_at = Instant::now();
    let new = wait(
        Duration::from_secs(10),
        "a new leader on the majority side",
        || leader(&lab, &majority).filter(|l| *l as usize != old),
    );
    println!(
        "partition: node {old} cut off; node {new} leads the majority after {:?}",
        cut_at.elapsed()
    );

    let ok = register(&lab, majority[0], "during-partition", 3);
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("registered during-partition"),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // The cut-off node cannot commit: its writes fail with a clear message.
    let refused = register(&lab, old, "on-the-small-side", 10);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("majority"), "{err}");

    lab.link(old, true);
    wait(
        Duration::from_secs(15),
        "the old leader following the new one and caught up",
        || {
            let m = lab.members(old)?;
            let l = lab.members(new as usize)?;
            (m["leader_id"].as_u64() == Some(new) && m["revision"] == l["revision"]).then_some(())
        },
    );
    let out = lab.exec(
        old,
        &[
            "instances",
            "web",
            "--registry",
            &format!("http://{NET}.{old}:7400"),
            "-o",
            "json",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("during-partition"), "{text}");
    assert!(!text.contains("on-the-small-side"), "{text}");
}
