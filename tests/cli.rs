//! The `switchyard` binary as an operator uses it: real processes on loopback ports.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

#[test]
fn register_list_and_deregister_through_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut registry, url) = start_registry(dir.path(), &[]);

    let mut holder = Proc(
        Command::new(BIN)
            .args([
                "register",
                "--registry",
                &url,
                "--service",
                "web",
                "--address",
                "127.0.0.1",
                "--port",
                "8080",
                "--version",
                "1.0.0",
                "--label",
                "tier=front",
                "--ttl",
                "2s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn register"),
    );
    let mut out = BufReader::new(holder.0.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("read");
    assert!(
        first.starts_with("registered web-127.0.0.1-8080"),
        "{first}"
    );

    let services = run(&["services", "--registry", &url, "-o", "json"]);
    assert!(services.status.success());
    // A reader that stops at once (`| grep -q`, `| head`): no panic, exit 0.
    let mut piped = Command::new(BIN)
        .args(["instances", "web", "--registry", &url, "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn instances");
    drop(piped.stdout.take());
    let closed = piped.wait_with_output().expect("instances ends");
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert!(
        closed.status.success() && !stderr.contains("panicked"),
        "{:?} {stderr}",
        closed.status
    );
    let json: serde_json::Value = serde_json::from_slice(&services.stdout).expect("json");
    assert_eq!(json[0]["name"], "web");
    assert_eq!(json[0]["instances"], 1);
    assert_eq!(json[0]["versions"][0], "1.0.0");

    // Held past its 2 s TTL by keep-alive.
    // Wall time on purpose: a real process's keep-alive holds the 2 s TTL past it.
    std::thread::sleep(Duration::from_millis(3_000));
    let table = run(&["instances", "web", "--registry", &url]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("ID"), "{text}");
    assert!(
        text.contains("web-127.0.0.1-8080")
            && text.contains("tier=front")
            && text.contains("SERVING"),
        "{text}"
    );

    // Ctrl-C (SIGINT) deregisters.
    holder.signal("-INT");
    assert!(holder.wait(Duration::from_secs(10)).success());
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("read");
    assert!(rest.contains("deregistered web-127.0.0.1-8080"), "{rest}");
    let json = run(&["instances", "web", "--registry", &url, "-o", "json"]);
    assert_eq!(String::from_utf8_lossy(&json.stdout).trim(), "[]");

    // SIGTERM stops the registry gracefully.
    registry.signal("-TERM");
    let status = registry.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

#[test]
fn config_file_values_apply_and_bad_files_exit_64() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("registry.toml");
    std::fs::write(&file, "max_instances = 1\nwatch_history = 100\n").expect("write");
    let data = dir.path().join("data");
    let (mut registry, url) = start_registry(&data, &["--config", file.to_str().expect("utf-8")]);
    let reg = |id: &str| {
        Command::new(BIN)
            .args([
                "register",
                "--registry",
                &url,
                "--service",
                "web",
                "--address",
                "127.0.0.1",
                "--port",
                "80",
                "--version",
                "1",
                "--id",
                id,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let mut first = Proc(reg("one"));
    let mut line = String::new();
    BufReader::new(first.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert!(line.starts_with("registered one"), "{line}");
    let second = reg("two").wait_with_output().expect("second exits");
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("maximum of 1 instances"));
    first.signal("-INT");
    first.wait(Duration::from_secs(10));
    registry.signal("-TERM");
    registry.wait(Duration::from_secs(10));

    std::fs::write(&file, "max_instance = 1\n").expect("write");
    let bad = run(&["registry", "--config", file.to_str().expect("utf-8")]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown field"));
}

#[test]
fn operator_verbs_explain_an_unreachable_registry() {
    // Port 1 on loopback: nothing listens there.
    let out = run(&["services", "--registry", "http://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the registry") && err.contains("SWITCHYARD_REGISTRY"),
        "{err}"
    );
    let bad = run(&[
        "register",
        "--service",
        "web",
        "--address",
        "127.0.0.1",
        "--port",
        "80",
        "--version",
        "1",
        "--ttl",
        "2h",
    ]);
    assert_eq!(bad.status.code(), Some(2), "clap refuses a TTL over 1 h");
}

/// What `rollout` refuses on its own, before (or without) a registry: a spec the
/// registry would refuse exits 64 naming the flag, clap's conflicts exit 2, and an
/// unreachable registry exits 69 (not `status`'s 1 or 3, which speak of the rollout).
#[test]
fn rollout_verbs_refuse_bad_flags_without_a_registry() {
    let nowhere = ["--registry", "http://127.0.0.1:1"];
    let start = |extra: &[&str]| {
        let mut args = vec!["rollout", "start", "web", "--canary", "2.0.0"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&nowhere);
        run(&args)
    };
    let out = start(&["--steps", "50,25,100"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--steps"));
    let out = start(&["--pause", "1m", "--step-deadline", "10s"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--step-deadline"));
    let out = start(&["--steps", "5,100", "--step-weight", "10"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap refuses --steps with --step-weight"
    );
    let out = start(&["--webhook", "pre-rollout=https://hooks.test/"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses an https webhook");
    let out = start(&[]);
    assert_eq!(
        out.status.code(),
        Some(69),
        "a valid spec goes to the registry"
    );
    for verb in [
        &["status", "web"][..],
        &["status", "web", "--watch"],
        &["list"],
    ] {
        let mut args = vec!["rollout"];
        args.extend_from_slice(verb);
        args.extend_from_slice(&nowhere);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(69), "{verb:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the registry"));
    }
}

#[test]
fn dev_uses_a_temp_dir_and_removes_it_at_exit() {
    // The banner is printed once the registry and the sidecar both serve.
    let (mut dev, line, _) = start_until(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--peer-listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--http-proxy",
            "127.0.0.1:0",
            "--dns",
            "127.0.0.1:0",
            "--sidecar-dns",
            "127.0.0.1:0",
        ],
        "switchyard dev:",
    );
    assert!(
        line.contains("sidecar proxy on http://127.0.0.1:"),
        "{line}"
    );
    let data = line
        .rsplit("data in ")
        .next()
        .expect("data dir")
        .trim()
        .to_string();
    assert!(Path::new(&data).exists(), "{data}");
    dev.signal("-TERM");
    assert!(dev.wait(Duration::from_secs(10)).success());
    assert!(!Path::new(&data).exists(), "temp data dir removed: {data}");
}

/// A one-thread HTTP server answering `hello` to every request, closing each connection.

#[test]
fn sidecar_process_from_a_config_file_proxies_registers_and_drains() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut registry, url) = start_registry(&dir.path().join("reg"), &[]);
    let app = hello_server();
    let file = dir.path().join("sidecar.toml");
    std::fs::write(
        &file,
        format!(
            "registry = [\"{url}\"]\nadmin = \"127.0.0.1:0\"\nhttp_proxy = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\ncache_file = \"{}\"\nservice = \"app\"\nport = {}\nversion = \"2.0.0\"\nhealth_http = \"/\"\nhealth_interval = \"200ms\"\ndrain = \"300ms\"\n",
            dir.path().join("cache.json").display(),
            app.port()
        ),
    )
    .expect("write config");
    let (mut sidecar, line, _) = start_until(
        &["sidecar", "--config", file.to_str().expect("utf-8")],
        "sidecar serving",
    );
    let proxy = field(&line, "http_proxy=").to_string();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let json = instances_json(&url, "app");
        if json[0]["state"] == "SERVING" {
            assert_eq!(json[0]["version"], "2.0.0");
            break;
        }
        assert!(Instant::now() < deadline, "app never registered: {json}");
        // Poll interval of a wait bounded by its deadline (a real process).
        std::thread::sleep(Duration::from_millis(100));
    }
    // The sidecar routes to the service it registered (its own catalog has it too).
    wait_for_route(&proxy, "app.service.switchyard");

    sidecar.signal("-TERM");
    let status = sidecar.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert_eq!(
        instances_json(&url, "app"),
        serde_json::json!([]),
        "deregistered on SIGTERM"
    );
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

#[test]
fn demo_runs_the_canary_tour_and_ends_by_itself() {
    let started = Instant::now();
    let out = Command::new(BIN)
        .arg("demo")
        .stdin(Stdio::null())
        .output()
        .expect("run demo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(150));
    let text = String::from_utf8_lossy(&out.stdout);
    for step in [
        "== 100/0",
        "== 90/10",
        "== 50/50",
        "== header x-canary: true -> v2",
        "== rollback to revision",
        "== history",
    ] {
        assert!(text.contains(step), "missing {step:?} in:\n{text}");
    }
    // The header step sends everything to v2; the rollback sends everything back to v1.
    let header_step = text.split("== header").nth(1).expect("header step");
    assert!(
        header_step.contains("v2             1000  100.0%"),
        "{header_step}"
    );
    let rollback_step = text.split("== rollback").nth(1).expect("rollback step");
    assert!(
        rollback_step.contains("v1             1000  100.0%"),
        "{rollback_step}"
    );
    // Act 2: the healthy canary promotes itself through every step; the bad one is
    // aborted by the gate on its own, and the evidence is printed.
    let healthy = text
        .split("== rollout of v3")
        .nth(1)
        .and_then(|t| t.split("== rollout of v4").next())
        .expect("the v3 rollout");
    for seen in ["at 10% canary", "at 50% canary", "Succeeded", "error E:"] {
        assert!(healthy.contains(seen), "missing {seen:?} in:\n{healthy}");
    }
    let bad = text
        .split("== rollout of v4")
        .nth(1)
        .expect("the v4 rollout");
    for seen in [
        "Aborted",
        "the canary's errors are worse than the baseline's",
        "95% upper bound",
    ] {
        assert!(bad.contains(seen), "missing {seen:?} in:\n{bad}");
    }
    assert!(!bad.contains("Succeeded"), "{bad}");
}

#[test]
fn route_verbs_change_show_and_roll_back_a_policy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut registry, url) = start_registry(&dir.path().join("reg"), &[]);
    let holders: Vec<Proc> = [("9001", "1.4.2"), ("9002", "1.5.0")]
        .into_iter()
        .map(|(port, version)| hold_registration(&url, "web", port, version))
        .collect();
    let route = |args: &[&str]| {
        let mut all = vec!["route"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--registry", &url]);
        run(&all)
    };
    let out = route(&["subset", "web", "stable", "--version", "1.4.2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = route(&["subset", "web", "canary", "--range", "^1.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = route(&["split", "web", "stable=95", "canary=5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown.contains("default split: stable=95 canary=5"),
        "{shown}"
    );
    let out = route(&[
        "match",
        "web",
        "--header",
        "x-canary=true",
        "--to",
        "canary",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("x-canary=true -> canary=100"));
    // A typo is refused with the field named, exit 64, nothing recorded.
    let bad = route(&["split", "web", "stabel=100"]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("default_split[0].subset"));
    let out = route(&["promote", "web", "canary"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("default split: canary=100"));
    let out = route(&["rollback", "web"]);
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown.contains("x-canary=true -> canary=100") && shown.contains("stable=95 canary=5"),
        "{shown}"
    );
    let history = route(&["history", "web", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&history.stdout).expect("json");
    let reasons: Vec<&str> = json
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(reasons.len(), 6, "{reasons:?}");
    assert!(reasons[5].starts_with("rollback to "), "{reasons:?}");
    for mut h in holders {
        h.signal("-INT");
        h.wait(Duration::from_secs(10));
    }
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

/// The `--flag value` pairs that keep a sidecar off fixed ports and out of the working
/// directory; the registry URL points where nothing listens unless given.
fn sidecar_args(dir: &Path) -> Vec<String> {
    [
        "sidecar",
        "--admin",
        "127.0.0.1:0",
        "--dns",
        "off",
        "--cache-file",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([dir.join("cache.json").display().to_string()])
    .collect()
}

#[test]
fn sidecar_flags_without_a_variable_before_now_take_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut registry, url) = start_registry(&dir.path().join("reg"), &[]);
    let app = hello_server();
    let port = app.port().to_string();
    let mut args = sidecar_args(dir.path());
    args.extend(["--http-proxy".to_string(), "127.0.0.1:0".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut sidecar, _, _) = start_until_env(
        &args,
        &[
            ("SWITCHYARD_REGISTRY", url.as_str()),
            ("SWITCHYARD_SERVICE", "envapp"),
            ("SWITCHYARD_PORT", port.as_str()),
            ("SWITCHYARD_VERSION", "3.1.0"),
            ("SWITCHYARD_ID", "envapp-1"),
            ("SWITCHYARD_HEALTH_TCP", "true"),
            ("SWITCHYARD_HEALTH_INTERVAL", "200ms"),
            ("SWITCHYARD_DRAIN", "100ms"),
        ],
        "sidecar serving",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let json = instances_json(&url, "envapp");
        if json[0]["state"] == "SERVING" {
            assert_eq!(json[0]["version"], "3.1.0");
            assert_eq!(json[0]["id"], "envapp-1");
            assert_eq!(json[0]["port"], app.port());
            break;
        }
        assert!(Instant::now() < deadline, "envapp never registered: {json}");
        // Poll interval of a wait bounded by its deadline (a real process).
        std::thread::sleep(Duration::from_millis(100));
    }
    sidecar.signal("-TERM");
    assert!(sidecar.wait(Duration::from_secs(10)).success());
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

/// The value of `key=` in a "... serving" line, once started with this file, env and flags.
fn serving_value(
    args: &[&str],
    file: (&Path, &str),
    env: &[(&str, &str)],
    marker: &str,
    key: &str,
) -> String {
    std::fs::write(file.0, file.1).expect("write config");
    let (mut proc, line, _) = start_until_env(args, env, marker);
    let value = field(&line, key).to_string();
    proc.signal("-TERM");
    assert!(proc.wait(Duration::from_secs(10)).success());
    value
}

#[test]
fn registry_precedence_is_flag_then_env_then_file_then_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("registry.toml");
    let data = dir.path().join("data");
    let base = [
        "registry",
        "--listen",
        "127.0.0.1:0",
        "--peer-listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--config",
        file.to_str().expect("utf-8"),
    ];
    let with = |extra: &[&'static str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let run = |args: &[&str], toml: &str, env: &[(&str, &str)]| {
        serving_value(args, (&file, toml), env, "registry serving", "dns=")
    };
    // The file beats the default (0.0.0.0:8600).
    assert_eq!(run(&base, "dns = \"off\"\n", &[]), "off");
    // The environment beats the file.
    let v = run(
        &base,
        "dns = \"off\"\n",
        &[("SWITCHYARD_DNS", "127.0.0.1:0")],
    );
    assert!(v.starts_with("127.0.0.1:"), "{v}");
    // The flag beats the environment and the file.
    let v = run(
        &with(&["--dns", "127.0.0.1:0"]),
        "dns = \"off\"\n",
        &[("SWITCHYARD_DNS", "off")],
    );
    assert!(v.starts_with("127.0.0.1:"), "{v}");
    let v = run(
        &with(&["--dns", "off"]),
        "dns = \"127.0.0.1:0\"\n",
        &[("SWITCHYARD_DNS", "127.0.0.1:0")],
    );
    assert_eq!(v, "off");
    // Without the key, the environment still applies.
    let v = run(&base, "", &[("SWITCHYARD_DNS", "off")]);
    assert_eq!(v, "off");
}

#[test]
fn sidecar_precedence_is_flag_then_env_then_file_then_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sidecar.toml");
    let mut base = sidecar_args(dir.path());
    base.extend([
        "--registry".to_string(),
        "http://127.0.0.1:1".to_string(),
        "--config".to_string(),
        file.display().to_string(),
    ]);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();
    let with = |extra: &[&'static str]| {
        let mut v = base.clone();
        v.extend_from_slice(extra);
        v
    };
    let run = |args: &[&str], toml: &str, env: &[(&str, &str)]| {
        serving_value(args, (&file, toml), env, "sidecar serving", "http_proxy=")
    };
    // The file beats the default (127.0.0.1:15001).
    assert_eq!(run(&base, "http_proxy = \"off\"\n", &[]), "off");
    // The environment beats the file.
    let v = run(
        &base,
        "http_proxy = \"off\"\n",
        &[("SWITCHYARD_HTTP_PROXY", "127.0.0.1:0")],
    );
    assert!(v.starts_with("127.0.0.1:"), "{v}");
    // The flag beats the environment and the file.
    let v = run(
        &with(&["--http-proxy", "127.0.0.1:0"]),
        "http_proxy = \"off\"\n",
        &[("SWITCHYARD_HTTP_PROXY", "off")],
    );
    assert!(v.starts_with("127.0.0.1:"), "{v}");
    let v = run(
        &with(&["--http-proxy", "off"]),
        "http_proxy = \"127.0.0.1:0\"\n",
        &[("SWITCHYARD_HTTP_PROXY", "127.0.0.1:0")],
    );
    assert_eq!(v, "off");
}

#[cfg(target_os = "linux")]
#[test]
fn a_registry_allowed_one_cpu_serves_on_a_current_thread_runtime() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_str().expect("utf-8 path");
    let mut args = vec!["registry"];
    args.extend_from_slice(&LOOPBACK_PORTS);
    args.extend_from_slice(&["--data-dir", data, "--dns", "off"]);
    // The runtime line comes before "registry serving", which comes once SIGTERM is
    // handled (a SIGTERM sent earlier would kill the process).
    let runtime_line = |seen: &[String]| {
        seen.iter()
            .find(|l| l.contains("runtime: "))
            .cloned()
            .unwrap_or_default()
    };
    let serving = "registry serving";
    let cpu = first_allowed_cpu();
    let (mut one, _, seen) = start_until_under(&["taskset", "-c", &cpu], &args, &[], serving);
    let line = runtime_line(&seen);
    assert!(
        line.contains("current-thread") && line.contains("cpus=1"),
        "{seen:#?}"
    );
    one.signal("-TERM");
    assert!(one.wait(Duration::from_secs(10)).success());
    if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        let (mut all, _, seen) = start_until_under(&[], &args, &[], serving);
        assert!(runtime_line(&seen).contains("multi-thread"), "{seen:#?}");
        all.signal("-TERM");
        assert!(all.wait(Duration::from_secs(10)).success());
    }
}

/// The first CPU this process may run on (`Cpus_allowed_list`: "0-1", "2,4-7"), for
/// `taskset`: CPU 0 may be outside a container's set.
#[cfg(target_os = "linux")]
fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    list.trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect()
}

/// Threads of `pid` that are proxy workers after the first (`proxy-worker-N`; the
/// first is the main thread).
#[cfg(target_os = "linux")]
fn proxy_worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("proxy-worker-"))
        })
        .count()
}

#[cfg(target_os = "linux")]
#[test]
fn sidecar_worker_threads_from_the_config_file_size_the_proxy_workers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sidecar.toml");
    // More than the default (one per core) would start, so the default cannot pass.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = cores + 3;
    std::fs::write(
        &file,
        format!("registry = [\"http://127.0.0.1:1\"]\nhttp_proxy = \"127.0.0.1:0\"\nworker_threads = {wanted}\n"),
    )
    .expect("write config");
    let mut base = sidecar_args(dir.path());
    base.extend(["--config".to_string(), file.display().to_string()]);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();

    let (mut sidecar, _, _) = start_until(&base, "sidecar serving");
    // A worker names itself once its thread runs: poll (bounded) rather than count once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut threads = proxy_worker_threads(sidecar.0.id());
    while threads < wanted - 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        threads = proxy_worker_threads(sidecar.0.id());
    }
    assert_eq!(
        threads,
        wanted - 1,
        "worker_threads = {wanted} in the file: the main thread and {} more",
        wanted - 1
    );
    sidecar.signal("-TERM");
    assert!(sidecar.wait(Duration::from_secs(10)).success());

    // The flag still wins over the file: one worker, the main thread.
    let mut one = base.clone();
    one.extend(["--worker-threads", "1"]);
    let (mut sidecar, _, _) = start_until(&one, "sidecar serving");
    std::thread::sleep(Duration::from_millis(200));
    let threads = proxy_worker_threads(sidecar.0.id());
    assert_eq!(threads, 0, "--worker-threads 1 over the file's {wanted}");
    sidecar.signal("-TERM");
    assert!(sidecar.wait(Duration::from_secs(10)).success());
}

#[test]
fn sidecar_config_files_with_unknown_or_bad_keys_exit_64() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sidecar.toml");
    let path = file.to_str().expect("utf-8");
    for (toml, flags, expected) in [
        (
            "helth_interval = \"1s\"\n",
            &[][..],
            "unknown field `helth_interval`",
        ),
        (
            "config = \"other.toml\"\n",
            &[][..],
            "unknown field `config`",
        ),
        ("drain = \"soon\"\n", &[][..], "not a duration"),
        // A bad value is refused even when a flag overrides it.
        ("port = \"x\"\n", &["--port", "80"][..], "port"),
    ] {
        std::fs::write(&file, toml).expect("write config");
        let mut args = vec!["sidecar", "--config", path];
        args.extend_from_slice(flags);
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml}: {err}");
        assert!(err.contains(expected), "{toml}: {err}");
    }
}

/// A normal single-node restart must log nothing at ERROR: openraft's "Can not
/// initialize" (the group already exists) is expected, so the node does not ask for it.
#[test]
fn a_normal_restart_logs_no_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_str().expect("utf-8 path");
    let args = [
        "registry",
        "--listen",
        "127.0.0.1:0",
        "--peer-listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--dns",
        "off",
    ];
    for round in 0..2 {
        let (mut proc, _, before) = start_until(&args, "registry serving");
        let errors: Vec<&String> = before.iter().filter(|l| l.contains("ERROR")).collect();
        assert!(errors.is_empty(), "start {round} logged {errors:#?}");
        proc.signal("-TERM");
        assert!(proc.wait(Duration::from_secs(10)).success());
    }
}

/// `route resilience` writes the service's overrides into its policy: shown by `route
/// show`, one recorded revision each in `route history`, undone by `route rollback`, and
/// bad values refused by the registry naming the field.
#[test]
fn route_resilience_sets_shows_records_and_refuses_bad_values() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, url) = start_registry(&dir.path().join("reg"), &[]);
    let route = |args: &[&str]| {
        let mut all = vec!["route"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--registry", &url]);
        run(&all)
    };
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = ok(&route(&[
        "resilience",
        "web",
        "--timeout",
        "3s",
        "--per-try-timeout",
        "500ms",
        "--retries",
        "2",
        "--retry-on",
        "connect-failure,503",
    ]));
    assert!(
        shown.contains(
            "resilience:    timeout=3s per-try-timeout=500ms retries=2 retry-on=connect-failure,503"
        ),
        "{shown}"
    );
    let shown = ok(&route(&["resilience", "web", "--max-requests", "100"]));
    assert!(shown.contains("retries=2"), "kept: {shown}");
    assert!(shown.contains("max-requests=100"), "{shown}");
    let shown = ok(&route(&["show", "web"]));
    assert!(shown.contains("max-requests=100"), "{shown}");

    // Bad values: refused by name, nothing recorded.
    for (flags, field) in [
        (
            &["--per-try-timeout", "5s"][..],
            "policy.resilience.per_try_timeout_ms",
        ),
        (&["--retries", "-1"][..], "policy.resilience.retries"),
        (
            &["--max-connections", "0"][..],
            "policy.resilience.max_connections",
        ),
        (
            &["--retry-budget", "101"][..],
            "policy.resilience.retry_budget_percent",
        ),
        (
            &["--panic-below", "150"][..],
            "policy.resilience.panic_below_percent",
        ),
        (
            &["--retry-on", "sometimes"][..],
            "policy.resilience.retry_on",
        ),
    ] {
        let mut args = vec!["resilience", "web"];
        args.extend_from_slice(flags);
        let out = route(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} accepted");
        assert!(err.contains(field), "{flags:?}: {err}");
        assert!(
            err.contains("INVALID_ARGUMENT") || err.contains("invalid"),
            "{err}"
        );
    }

    let history = ok(&route(&["history", "web"]));
    assert_eq!(
        history.lines().count(),
        3,
        "a header and two changes: {history}"
    );
    assert!(history.contains("RESILIENCE"), "{history}");
    let shown = ok(&route(&["rollback", "web"]));
    assert!(!shown.contains("max-requests"), "rolled back: {shown}");
    assert!(shown.contains("retries=2"), "{shown}");
    let shown = ok(&route(&["resilience", "web", "--reset"]));
    assert!(
        shown.contains("resilience:    (sidecar defaults)"),
        "{shown}"
    );
    let json = ok(&route(&["show", "web", "--output", "json"]));
    assert!(json.contains("\"resilience\": {}"), "{json}");
    drop(registry);
}

#[test]
fn top_shows_what_a_sidecar_process_reported_per_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut registry, url) = start_registry(&dir.path().join("reg"), &[]);
    let app = hello_server();
    let file = dir.path().join("sidecar.toml");
    // The window from the TOML key; the slow threshold from the environment.
    std::fs::write(
        &file,
        format!(
            "registry = [\"{url}\"]\nadmin = \"127.0.0.1:0\"\nhttp_proxy = \"127.0.0.1:0\"\ndns = \"off\"\ncache_file = \"{}\"\nservice = \"app\"\nport = {}\nversion = \"2.0.0\"\nhealth_tcp = true\nhealth_interval = \"200ms\"\ndrain = \"100ms\"\ntelemetry_interval = \"200ms\"\n",
            dir.path().join("cache.json").display(),
            app.port()
        ),
    )
    .expect("write config");
    let (mut sidecar, line, _) = start_until_env(
        &["sidecar", "--config", file.to_str().expect("utf-8")],
        &[("SWITCHYARD_SLOW_THRESHOLD", "250ms")],
        "sidecar serving",
    );
    let proxy = field(&line, "http_proxy=").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    while answered < 5 {
        if raw_get(&proxy, "app.service.switchyard").ends_with("hello") {
            answered += 1;
        } else {
            assert!(Instant::now() < deadline, "no route to app");
            // Poll interval of a wait bounded by its deadline (a real process).
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let out = run(&["top", "app", "--registry", &url, "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(doc["window_seconds"], 60);
        let row = doc["versions"][0].clone();
        if row["requests"].as_u64().unwrap_or(0) >= 5 {
            break row;
        }
        assert!(
            Instant::now() < deadline,
            "top never showed the requests: {doc}"
        );
        // Poll interval of a wait bounded by its deadline (a real process's window).
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(row["service"], "app");
    assert_eq!(row["version"], "2.0.0");
    assert_eq!(row["errors"], 0);
    let out = run(&["top", "--registry", &url, "--window", "30s"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("SERVICE  VERSION  REQ/S  ERRORS%  P50"),
        "{table}"
    );
    assert!(table.contains("app      2.0.0"), "{table}");
    let out = run(&["top", "--registry", &url, "--window", "10m"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a window beyond the ring is refused"
    );
    sidecar.signal("-TERM");
    assert!(sidecar.wait(Duration::from_secs(10)).success());
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

#[test]
fn rollout_verbs_steer_a_rollout_on_a_real_registry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut registry, url) = start_registry(&dir.path().join("reg"), &[]);
    let holders: Vec<Proc> = [("9101", "1.0.0"), ("9102", "2.0.0")]
        .into_iter()
        .map(|(port, version)| hold_registration(&url, "web", port, version))
        .collect();
    let rollout = |args: &[&str]| {
        let mut all = vec!["rollout"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--registry", &url]);
        run(&all)
    };
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let get = || -> serde_json::Value {
        let out = rollout(&["get", "web", "-o", "json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    // Polls `get` until `check` holds (a real registry's loop moves the rollout).
    let wait = |what: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = get();
            if check(&r) {
                return r;
            }
            assert!(Instant::now() < deadline, "not {what}: {r:#}");
            // Poll interval of a wait bounded by its deadline.
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let out = rollout(&[
        "start", "web", "--canary", "2.0.0", "--steps", "20,100", "--pause", "10m",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let r = wait("at 20%", &|r| {
        r["weight"] == 20 && r["phase"] == "progressing"
    });
    assert_eq!(
        r["baseline"], "1.0.0",
        "the serving version is the baseline"
    );
    assert_eq!(r["spec"]["min_requests"], 100);
    // The same canary again is refused while it runs.
    let out = rollout(&["start", "web", "--canary", "2.0.0"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("already rolling out"), "{}", text(&out));
    // Paused: status says so and exits 3 (unfinished).
    let out = rollout(&["pause", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = rollout(&["status", "web"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("Paused"), "{}", text(&out));
    // Promote goes to the next (last) step; promote --full finishes it.
    let out = rollout(&["promote", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    wait("at its last step", &|r| {
        r["weight"] == 100 && r["phase"] == "progressing"
    });
    let out = rollout(&["promote", "web", "--full"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = rollout(&["status", "web", "--watch", "--timeout", "15s"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("Succeeded"), "{}", text(&out));
    let shown = text(&run(&["route", "show", "web", "--registry", &url]));
    assert!(shown.contains("default split: 2.0.0=100"), "{shown}");
    // Nothing left to abort; undo puts the baseline back (there was no policy before).
    let out = rollout(&["abort", "web"]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = rollout(&["undo", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&run(&["route", "show", "web", "--registry", &url]));
    assert!(shown.contains("default split: 1.0.0=100"), "{shown}");
    // An aborted rollout can be retried; list shows the newest per service.
    let out = rollout(&[
        "start", "web", "--canary", "2.0.0", "--steps", "50,100", "--pause", "10m",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = rollout(&["abort", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = rollout(&["status", "web"]);
    assert_eq!(out.status.code(), Some(1), "aborted: {}", text(&out));
    let out = rollout(&["retry", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    wait("retried", &|r| r["weight"] == 50);
    let out = rollout(&["list", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list:#}");
    drop(holders);
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

#[test]
fn acl_verbs_bootstrap_create_tokens_and_the_global_token_flag_carries_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut registry, url) = start_registry(&dir.path().join("reg"), &[]);
    let acl = |token: Option<&str>, args: &[&str]| {
        let mut all = vec!["acl"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--registry", &url]);
        if let Some(t) = token {
            all.extend_from_slice(&["--token", t]);
        }
        run(&all)
    };
    let out = acl(None, &["whoami"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not bootstrapped"));
    let out = acl(None, &["bootstrap", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let boot: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let op = boot["secret"].as_str().expect("secret").to_string();
    assert_eq!(op.len(), 64);
    let again = acl(None, &["bootstrap"]);
    assert_eq!(
        again.status.code(),
        Some(64),
        "a second bootstrap is refused"
    );
    // Without a token, operator verbs are refused with EX_NOPERM.
    let out = acl(None, &["token", "list"]);
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = acl(
        Some(&op),
        &[
            "token",
            "create",
            "--service-identity",
            "web",
            "--description",
            "web sidecar",
            "-o",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let web: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let web_secret = web["secret"].as_str().expect("secret").to_string();
    let accessor = web["accessor_id"].as_str().expect("accessor").to_string();
    let out = acl(Some(&op), &["token", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listed.contains(&accessor) && listed.contains("service:web:register"),
        "{listed}"
    );
    assert!(
        !listed.contains(&web_secret) && !listed.contains(&op),
        "no secrets listed"
    );
    let out = acl(Some(&web_secret), &["whoami"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&accessor));
    // The global --token reaches every verb: route changes need the policy right.
    let route = |token: &str| {
        run(&[
            "route",
            "split",
            "web",
            "1.0.0=100",
            "--registry",
            &url,
            "--token",
            token,
        ])
    };
    let out = route(&web_secret);
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("service:web:policy"));
    let out = acl(Some(&op), &["token", "delete", &accessor]);
    assert!(out.status.success());
    let out = acl(Some(&web_secret), &["whoami"]);
    assert_eq!(out.status.code(), Some(77), "a deleted token is refused");
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

/// `switchyard kv` and `switchyard flags` against a real registry process: values from
/// an argument, a file and stdin; check-and-set; recurse; flags set from a file holding
/// one flag's definition, list, get, disable, eval (with a sidecar fact), history and
/// rollback; a bad definition refused naming its path (exit 64), nothing recorded.
#[test]
fn kv_and_flags_verbs_on_a_real_registry() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut registry, url) = start_registry(dir.path(), &[]);
    let reg = ["--registry", url.as_str()];
    let ok = |args: &[&str]| {
        let out = run(&[args, &reg[..]].concat());
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["kv", "put", "config/web/timeout", "5s"]);
    assert_eq!(ok(&["kv", "get", "config/web/timeout"]), "5s\n");
    let file = dir.path().join("value.json");
    std::fs::write(&file, "{\"retries\": 3}\n").expect("write");
    ok(&[
        "kv",
        "put",
        "config/web/json",
        &format!("@{}", file.display()),
    ]);
    assert_eq!(ok(&["kv", "get", "config/web/json"]), "{\"retries\": 3}\n");
    let mut child = Command::new(BIN)
        .args(["kv", "put", "config/api/name", "--registry", &url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"from stdin")
        .expect("write");
    assert!(child.wait().expect("wait").success());
    let entry: serde_json::Value =
        serde_json::from_str(&ok(&["kv", "get", "config/api/name", "-o", "json"])).expect("json");
    assert_eq!(entry["value"], "from stdin");
    let modify = entry["modify_revision"].as_u64().expect("revision");
    let stale = run(&[
        "kv",
        "put",
        "config/api/name",
        "x",
        "--cas",
        &(modify - 1).to_string(),
        "--registry",
        &url,
    ]);
    assert!(!stale.status.success(), "a stale --cas fails");
    ok(&[
        "kv",
        "put",
        "config/api/name",
        "y",
        "--cas",
        &modify.to_string(),
    ]);
    assert_eq!(
        ok(&["kv", "list", "config/"]),
        "config/api/name\nconfig/web/json\nconfig/web/timeout\n"
    );
    let table = ok(&["kv", "get", "config/web/", "--recurse"]);
    assert!(
        table.contains("config/web/timeout") && table.contains("5s"),
        "{table}"
    );
    ok(&["kv", "delete", "config/", "--recurse"]);
    assert_eq!(ok(&["kv", "list"]), "");

    let flag = dir.path().join("checkout.json");
    std::fs::write(
        &flag,
        r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
            "targeting":{"if":[{"==":[{"var":"$switchyard.version"},"2.0.0"]},"on","off"]}}"#,
    )
    .expect("write");
    ok(&[
        "flags",
        "set",
        "new-checkout",
        "--file",
        &flag.display().to_string(),
    ]);
    let list = ok(&["flags", "list"]);
    assert!(
        list.contains("new-checkout") && list.contains("ENABLED") && list.contains("yes"),
        "{list}"
    );
    let eval = ok(&[
        "flags",
        "eval",
        "new-checkout",
        "--context",
        "$switchyard.version=2.0.0",
        "-o",
        "json",
    ]);
    let eval: serde_json::Value = serde_json::from_str(&eval).expect("json");
    assert_eq!(
        (eval["value"].clone(), eval["reason"].clone()),
        (
            serde_json::json!(true),
            serde_json::json!("TARGETING_MATCH")
        )
    );
    let eval: serde_json::Value =
        serde_json::from_str(&ok(&["flags", "eval", "new-checkout", "-o", "json"])).expect("json");
    assert_eq!(eval["value"], false);
    ok(&["flags", "disable", "new-checkout"]);
    let got: serde_json::Value =
        serde_json::from_str(&ok(&["flags", "get", "new-checkout"])).expect("json");
    assert_eq!(got["state"], "DISABLED");
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"off"}"#,
    )
    .expect("write");
    let refused = run(&[
        "flags",
        "set",
        "broken",
        "--file",
        &bad.display().to_string(),
        "--registry",
        &url,
    ]);
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("flags.broken.defaultVariant"), "{stderr}");
    let history = ok(&["flags", "history"]);
    assert_eq!(
        history.lines().count(),
        3,
        "a header and two records: {history}"
    );
    ok(&["flags", "rollback"]);
    let got: serde_json::Value =
        serde_json::from_str(&ok(&["flags", "get", "new-checkout"])).expect("json");
    assert_eq!(got["state"], "ENABLED");
    registry.signal("-TERM");
    registry.wait(Duration::from_secs(10));
}
