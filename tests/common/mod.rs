//! Helpers the binary's test files share: child processes killed when a test ends,
//! reading a process's stderr until a marker, a registry process on `:0` ports.
// Each test file uses a different subset of these.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A child process killed when the test ends, whatever happens.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "signal delivered");
    }

    /// Waits for the exit status, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}"
            );
            // Poll interval of a wait bounded by its deadline (a real process's output).
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts a process and reads its stderr until a line containing `marker`; returns the
/// process, that line, and every line before it.
pub fn start_until(args: &[&str], marker: &str) -> (Proc, String, Vec<String>) {
    start_until_env(args, &[], marker)
}

/// `start_until` with extra environment variables.
pub fn start_until_env(
    args: &[&str],
    env: &[(&str, &str)],
    marker: &str,
) -> (Proc, String, Vec<String>) {
    start_until_under(&[], args, env, marker)
}

/// `start_until_env` run under `wrapper` (a program and its arguments that exec the
/// binary, such as `taskset -c 0`); none when empty.
pub fn start_until_under(
    wrapper: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
    marker: &str,
) -> (Proc, String, Vec<String>) {
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let mut child = command
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchyard");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining after the caller stops listening, so the child never writes
        // to a closed pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proc = Proc(child);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(marker) => return (proc, line, seen),
            Ok(line) => seen.push(line),
            Err(_) => panic!("no {marker:?} on stderr; saw: {seen:#?}"),
        }
    }
}

pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

pub fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run switchyard")
}

/// A registry's TCP ports, each on a free loopback port.
pub const LOOPBACK_PORTS: [&str; 6] = [
    "--listen",
    "127.0.0.1:0",
    "--peer-listen",
    "127.0.0.1:0",
    "--http",
    "127.0.0.1:0",
];

/// Waits (10 s at most) until the sidecar proxy at `proxy` routes `host` to the hello
/// server.
pub fn wait_for_route(proxy: &str, host: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = raw_get(proxy, host);
        if reply.ends_with("hello") {
            return;
        }
        assert!(Instant::now() < deadline, "no route to {host}: {reply}");
        // Poll interval of a wait bounded by its deadline (a real process).
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn start_registry(dir: &Path, extra: &[&str]) -> (Proc, String) {
    let data = dir.to_str().expect("utf-8 path");
    let mut args = vec!["registry"];
    args.extend_from_slice(&LOOPBACK_PORTS);
    args.extend_from_slice(&["--data-dir", data, "--dns", "127.0.0.1:0"]);
    args.extend_from_slice(extra);
    let (proc, line, _) = start_until(&args, "registry serving");
    let url = format!("http://{}", field(&line, "grpc="));
    (proc, url)
}

/// Runs `switchyard register` for SERVICE on 127.0.0.1:PORT and waits for its
/// "registered" line; the lease is held until the process is dropped.
pub fn hold_registration(url: &str, service: &str, port: &str, version: &str) -> Proc {
    let mut p = Proc(
        Command::new(BIN)
            .args([
                "register",
                "--registry",
                url,
                "--service",
                service,
                "--address",
                "127.0.0.1",
                "--port",
                port,
                "--version",
                version,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let mut line = String::new();
    BufReader::new(p.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert!(line.starts_with("registered"), "{line}");
    p
}

pub fn hello_server() -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok).take(10_000) {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        }
    });
    addr
}

pub fn raw_get(addr: &str, host: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

pub fn instances_json(url: &str, service: &str) -> serde_json::Value {
    let out = run(&["instances", service, "--registry", url, "-o", "json"]);
    serde_json::from_slice(&out.stdout).expect("json")
}
