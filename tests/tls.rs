//! TLS through the binary: `tls init`, a registry serving TLS, `register`, operator
//! verbs and a sidecar reaching it with `--ca-file`, the errors a wrong CA or a scheme
//! mismatch gives, a reload on SIGHUP, and `dev --tls`.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::*;

/// `switchyard tls init --dir DIR`; asserts it succeeded.
fn tls_init(dir: &Path) {
    let out = run(&["tls", "init", "--dir", dir.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--tls-cert") && text.contains("--ca-file"),
        "{text}"
    );
}

/// The certificate, key and CA `tls init` wrote into `tls`.
fn tls_files(tls: &Path) -> [std::path::PathBuf; 3] {
    ["registry.pem", "registry-key.pem", "ca.pem"].map(|f| tls.join(f))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A TLS registry process using the files in `tls`; its https URL.
fn start_tls_registry(dir: &Path, tls: &Path) -> (Proc, String) {
    let [cert, key, ca] = tls_files(tls);
    let (proc, url) = start_registry(
        dir,
        &[
            "--tls-cert",
            path(&cert),
            "--tls-key",
            path(&key),
            "--ca-file",
            path(&ca),
        ],
    );
    (proc, url.replacen("http://", "https://", 1))
}

#[test]
fn register_and_operator_verbs_over_tls_and_the_errors_of_a_wrong_setup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    let other = dir.path().join("other");
    tls_init(&tls);
    tls_init(&other);
    // A second init into the same dir refuses to replace the CA.
    let again = run(&["tls", "init", "--dir", path(&tls)]);
    assert_eq!(again.status.code(), Some(64), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let (mut registry, url) = start_tls_registry(&dir.path().join("data"), &tls);
    let ca = tls.join("ca.pem");

    // `register` holds a lease over TLS, and `instances` reads it back over TLS.
    let mut held = Proc(
        std::process::Command::new(BIN)
            .args([
                "register",
                "--registry",
                &url,
                "--ca-file",
                path(&ca),
                "--service",
                "web",
                "--address",
                "127.0.0.1",
                "--port",
                "8080",
                "--version",
                "1.0.0",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn register"),
    );
    let mut held_out = std::io::BufReader::new(held.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut held_out, &mut line).expect("read");
    assert!(line.starts_with("registered"), "{line}");
    let out = run(&[
        "instances",
        "web",
        "--registry",
        &url,
        "--ca-file",
        path(&ca),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json[0]["version"], "1.0.0", "{json}");

    // The wrong CA: exit 69, saying the certificate is not signed by --ca-file's CA.
    let out = run(&[
        "services",
        "--registry",
        &url,
        "--ca-file",
        path(&other.join("ca.pem")),
    ]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid peer certificate") && err.contains("--ca-file"),
        "{err}"
    );
    // https without a CA, and a CA with an http URL: configuration errors, exit 64.
    let out = run(&["services", "--registry", &url]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));
    let plain_url = url.replacen("https://", "http://", 1);
    let out = run(&["services", "--registry", &plain_url, "--ca-file", path(&ca)]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("https://"));
    // Plaintext to the TLS port fails, with a hint.
    let out = run(&["services", "--registry", &plain_url]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{out:?}"
    );
    // A bad CA file is refused before any call.
    let out = run(&[
        "services",
        "--registry",
        &url,
        "--ca-file",
        path(&tls.join("registry-key.pem")),
    ]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");

    // Ctrl-C deregisters, over TLS too.
    held.signal("-INT");
    assert!(held.wait(Duration::from_secs(10)).success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut held_out, &mut rest).expect("read");
    assert!(rest.contains("deregistered"), "{rest}");
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

#[test]
fn a_registry_without_its_ca_or_with_a_broken_certificate_does_not_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    tls_init(&tls);
    let data = dir.path().join("data");
    let base = |extra: &[&str]| {
        let mut args = vec!["registry"];
        args.extend_from_slice(&LOOPBACK_PORTS);
        args.extend_from_slice(&["--dns", "off", "--data-dir", path(&data)]);
        args.extend_from_slice(extra);
        run(&args)
    };
    let cert = tls.join("registry.pem");
    let key = tls.join("registry-key.pem");
    let out = base(&["--tls-cert", path(&cert), "--tls-key", path(&key)]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));
    // The key passed as the certificate: the error names the file.
    let out = base(&[
        "--tls-cert",
        path(&key),
        "--tls-key",
        path(&key),
        "--ca-file",
        path(&tls.join("ca.pem")),
    ]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("registry-key.pem") && err.contains("CERTIFICATE"),
        "{err}"
    );
    // Nothing was written to the data dir.
    assert!(
        !dir.path().join("data").exists(),
        "a refused start touched the data dir"
    );
}

#[test]
fn a_sidecar_watches_registers_and_proxies_over_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    tls_init(&tls);
    let (mut registry, url) = start_tls_registry(&dir.path().join("data"), &tls);
    let ca = tls.join("ca.pem");
    let app = hello_server();
    let port = app.port().to_string();
    let cache = dir.path().join("cache.json");
    let (mut sidecar, line, _) = start_until(
        &[
            "sidecar",
            "--registry",
            &url,
            "--ca-file",
            path(&ca),
            "--admin",
            "127.0.0.1:0",
            "--http-proxy",
            "127.0.0.1:0",
            "--dns",
            "127.0.0.1:0",
            "--cache-file",
            path(&cache),
            "--service",
            "app",
            "--port",
            &port,
            "--version",
            "2.0.0",
            "--health-http",
            "/",
            "--health-interval",
            "200ms",
            "--drain",
            "300ms",
        ],
        "sidecar serving",
    );
    let proxy = field(&line, "http_proxy=").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run(&[
            "instances",
            "app",
            "--registry",
            &url,
            "--ca-file",
            path(&ca),
            "-o",
            "json",
        ]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if json[0]["state"] == "SERVING" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "app never registered over TLS: {out:?}"
        );
        // Poll interval of a wait bounded by its deadline (a real process).
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its watch (over TLS) gave it the route to the service it registered.
    wait_for_route(&proxy, "app.service.switchyard");
    sidecar.signal("-TERM");
    assert!(sidecar.wait(Duration::from_secs(10)).success());
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

#[test]
fn sighup_reloads_the_certificates_and_the_registry_keeps_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    tls_init(&tls);
    let [cert, key, ca] = tls_files(&tls);
    let data = dir.path().join("data");
    let log = dir.path().join("registry.log");
    let mut registry = Proc(
        std::process::Command::new(BIN)
            .arg("registry")
            .args(LOOPBACK_PORTS)
            .args([
                "--dns",
                "off",
                "--data-dir",
                path(&data),
                "--tls-cert",
                path(&cert),
                "--tls-key",
                path(&key),
                "--ca-file",
                path(&ca),
            ])
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn registry"),
    );
    let line = wait_log(&log, "registry serving");
    let url = format!("https://{}", field(&line, "grpc="));
    registry.signal("-HUP");
    let reloaded = wait_log(&log, "reloaded TLS certificates after SIGHUP");
    assert!(
        reloaded.contains("open connections keep theirs"),
        "{reloaded}"
    );
    let out = run(&["services", "--registry", &url, "--ca-file", path(&ca)]);
    assert!(out.status.success(), "not serving after SIGHUP: {out:?}");
    registry.signal("-TERM");
    assert!(registry.wait(Duration::from_secs(10)).success());
}

/// The first line of the log file at `path` containing `marker` (waiting up to 15 s).
fn wait_log(path: &Path, marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(marker)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no {marker:?} in the log: {text}"
        );
        // Poll interval of a wait bounded by its deadline (a real process's log).
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dev_says_which_mode_it_runs_in() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = [
        "--listen",
        "127.0.0.1:0",
        "--peer-listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--dns",
        "off",
        "--admin",
        "127.0.0.1:0",
        "--sidecar-dns",
        "off",
        "--http-proxy",
        "127.0.0.1:0",
    ];
    let mut args = vec!["dev", "--data-dir", path(dir.path())];
    args.extend_from_slice(&ports);
    let (mut plain, _, seen) = start_until(&args, "TLS off");
    assert!(seen.iter().any(|l| l.contains("plaintext")), "{seen:#?}");
    plain.signal("-TERM");
    assert!(plain.wait(Duration::from_secs(15)).success());

    args.push("--tls");
    let (mut tls, line, _) = start_until(&args, "TLS on: clients use");
    let ca = dir.path().join("tls").join("ca.pem");
    assert!(ca.exists(), "dev --tls writes its CA into the data dir");
    assert!(
        line.contains("https://") && line.contains(path(&ca)),
        "{line}"
    );
    tls.signal("-TERM");
    assert!(tls.wait(Duration::from_secs(15)).success());
}
