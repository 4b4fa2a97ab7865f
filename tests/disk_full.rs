//! A `switchyard registry` whose data dir fills up: it stops claiming health, logs an
//! ERROR naming the dir and the OS error, exits non-zero for its supervisor, and a
//! restart on the freed disk has every write that was acknowledged and takes new ones.
//!
//! The data dir is a small tmpfs, so the test needs root to mount it; without root it
//! says it is skipped and passes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_testkit::{instance, resolve_ids, Tmpfs};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
/// What `switchyard registry` exits with when its data dir cannot be written.
const EXIT_STORAGE: i32 = 74;

/// A registry process (killed when dropped) and every line it wrote to stderr so far.
struct Registry {
    child: Child,
    grpc: String,
    http: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start(data_dir: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args([
                "registry",
                "--listen",
                "127.0.0.1:0",
                "--peer-listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ])
            .args(["--dns", "off", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchyard");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut kept) = kept.lock() {
                    kept.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let serving = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("registry serving") => break line,
                Ok(_) => {}
                Err(_) => panic!("no \"registry serving\" on stderr: {:#?}", lines.lock()),
            }
        };
        Self {
            child,
            grpc: field(&serving, "grpc="),
            http: field(&serving, "http="),
            lines,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    fn stderr(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The exit status, waiting at most `limit`; `None` if it is still running.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Poll interval of a wait bounded by its deadline (a real process's exit).
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} in {line}"))
        .to_string()
}

async fn register(client: &mut RegistryClient<Channel>, id: &str) -> Result<(), tonic::Status> {
    let request = pb::RegisterRequest {
        instance: Some(instance("web", id, "1.0.0")),
        ttl_seconds: 600,
        lease_id: 0,
    };
    match tokio::time::timeout(Duration::from_secs(10), client.register(request)).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => panic!("Register of {id} did not answer within 10 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_the_registry_unhealthy_and_exit_and_a_restart_keeps_every_acknowledged_write(
) {
    let Some(fs) = Tmpfs::mount("8m") else {
        eprintln!("skipped: needs root to mount tmpfs");
        return;
    };
    let data_dir = fs.path().join("data");
    let mut reg = Registry::start(&data_dir);
    let channel = reg.channel().await;
    let mut client = RegistryClient::new(channel.clone());
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let id = format!("web-{i}");
        register(&mut client, &id)
            .await
            .expect("register before the disk fills");
        acknowledged.push(id);
    }
    // Health as a load balancer sees it: a Watch on the whole server ("").
    let mut health = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = health.message().await.expect("health").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let filler = fs.fill();
    let mut refusal = None;
    for i in 20..5_000 {
        let id = format!("web-{i}");
        match register(&mut client, &id).await {
            Ok(()) => acknowledged.push(id),
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("a write fails once the disk is full");
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    let dir_text = data_dir.display().to_string();
    assert!(
        refusal.message().contains(&dir_text)
            && refusal.message().contains("No space left on device"),
        "the refusal names the data dir and the OS error: {}",
        refusal.message()
    );
    assert!(
        !refusal.message().contains("shutting down"),
        "{}",
        refusal.message()
    );

    // Observable before the process is gone: the health watch turns NOT_SERVING.
    let flipped = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(update)) = health.message().await {
            if update.status == ServingStatus::NotServing as i32 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(flipped, Ok(true), "gRPC health says NOT_SERVING");
    // `/health` answers 503 with the dir and the error while the node still listens (it
    // may already be gone: then there is nothing to ask).
    if let Ok(Ok((code, body))) =
        tokio::time::timeout(Duration::from_secs(2), try_http_get(&reg.http, "/health")).await
    {
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("storage_failed") && body.contains("No space left on device"),
            "{body}"
        );
    }

    let status = reg
        .wait_exit(Duration::from_secs(30))
        .expect("the registry exits within 30 s of its disk filling up");
    assert_eq!(status.code(), Some(EXIT_STORAGE), "exit status");
    let stderr = reg.stderr();
    assert!(
        stderr.iter().any(|l| l.contains("ERROR")
            && l.contains(&dir_text)
            && l.contains("No space left on device")),
        "an ERROR line names the data dir and the OS error: {stderr:#?}"
    );
    drop(reg);

    // Space freed: the restarted node replays its log and has every acknowledged write.
    std::fs::remove_file(&filler).expect("remove the filler");
    let reg = Registry::start(&data_dir);
    let channel = reg.channel().await;
    let mut found = resolve_ids(&mut DiscoveryClient::new(channel.clone()), "web").await;
    found.sort();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| found.binary_search(id).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged registrations are missing after the restart: {missing:?}",
        missing.len(),
        acknowledged.len()
    );
    let mut client = RegistryClient::new(channel.clone());
    register(&mut client, "after-restart")
        .await
        .expect("the restarted node takes writes");
    let mut health = HealthClient::new(channel);
    let now = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(now.status, ServingStatus::Serving as i32);
}

/// `testkit::http_get` panics when the port is closed; here a closed port, or a
/// connection closed before any answer (the server stopping), is an error to tolerate.
async fn try_http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("closed before an answer"))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}
