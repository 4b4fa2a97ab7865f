//! `switchyard demo` (the canary tour) and `switchyard demo-backend` (the HTTP server it
//! runs, also usable on its own in compose or Kubernetes examples).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_proto::v1::routing_client::RoutingClient;
use switchyard_registry::{Listeners, RegistryConfig};
use switchyard_sidecar::{SidecarConfig, SidecarListeners};
use tokio::net::TcpListener;

use super::{shutdown_signal, CliError, EXIT_CONFIG};

#[derive(Args, Debug)]
pub struct DemoBackendArgs {
    /// Version tag to answer with.
    #[arg(long, env = "SWITCHYARD_DEMO_BACKEND_VERSION", default_value = "v1")]
    pub version: String,
    /// Address to listen on.
    #[arg(
        long,
        env = "SWITCHYARD_DEMO_BACKEND_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Instance id to answer with; default demo-VERSION-PORT.
    #[arg(long, env = "SWITCHYARD_DEMO_BACKEND_ID")]
    pub id: Option<String>,
    /// Share of requests answered 503, spread evenly (0.05: one in twenty): a bad
    /// canary to roll out.
    #[arg(long, env = "SWITCHYARD_DEMO_BACKEND_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a share between 0 and 1 (e.g. 0.05)")),
    }
}

/// Serves `{"version":…,"instance":…}` on every path until `stop` resolves. Echoes the
/// `x-switchyard-subset` header it received, so the tour can show the sidecar's stamp.
pub async fn serve_backend(
    listener: TcpListener,
    version: String,
    id: String,
    error_rate: f64,
    stop: impl std::future::Future<Output = ()>,
) {
    let body: Arc<str> = format!("{{\"version\":\"{version}\",\"instance\":\"{id}\"}}\n").into();
    let per_mille = (error_rate.clamp(0.0, 1.0) * 1000.0).round() as u64;
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let body = body.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let body = body.clone();
                let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                // Request n fails when n·p/1000 crosses an integer: p of every 1,000.
                let fails = per_mille > 0 && (n * per_mille) / 1000 != ((n - 1) * per_mille) / 1000;
                async move {
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                    if fails {
                        *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    if let Some(s) = req.headers().get("x-switchyard-subset") {
                        resp.headers_mut().insert("x-received-subset", s.clone());
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

pub async fn run_backend(args: DemoBackendArgs) -> Result<(), CliError> {
    let stop = shutdown_signal();
    let listener = TcpListener::bind(args.listen).await.map_err(|e| {
        CliError::new(
            EXIT_CONFIG,
            format!("cannot listen on {} (--listen): {e}", args.listen),
        )
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(1, e.to_string()))?;
    let id = args
        .id
        .unwrap_or_else(|| format!("demo-{}-{}", args.version, addr.port()));
    eprintln!(
        "demo backend {id} (version {}) on http://{addr}",
        args.version
    );
    serve_backend(listener, args.version, id, args.error_rate, stop).await;
    Ok(())
}

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError::new(1, format!("demo failed: {e}"))
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Sends `n` requests through the sidecar (8 at a time) and tallies the answers by
/// version and by instance.
async fn traffic(
    client: &HttpClient,
    proxy: SocketAddr,
    n: usize,
    header: Option<(&'static str, &'static str)>,
) -> Result<
    (
        BTreeMap<String, usize>,
        BTreeMap<(String, String), usize>,
        usize,
    ),
    CliError,
> {
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in (worker..n).step_by(8) {
                let mut req = hyper::Request::builder()
                    .uri(format!("http://{proxy}/"))
                    .header(hyper::header::HOST, "web");
                if let Some((k, v)) = header {
                    req = req.header(k, v);
                }
                let Ok(req) = req.body(Empty::new()) else {
                    continue;
                };
                let Ok(resp) = client.request(req).await else {
                    got.push(None);
                    continue;
                };
                let ok = resp.status().is_success();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let text = String::from_utf8_lossy(&body).into_owned();
                let field = |k: &str| {
                    text.split(&format!("\"{k}\":\""))
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .unwrap_or("?")
                        .to_string()
                };
                got.push(ok.then(|| (field("version"), field("instance"))));
            }
            got
        }));
    }
    let mut by_version = BTreeMap::new();
    let mut by_instance = BTreeMap::new();
    let mut failed = 0;
    for t in tasks {
        for r in t.await.map_err(fail)? {
            match r {
                Some((version, instance)) => {
                    *by_version.entry(version.clone()).or_insert(0) += 1;
                    *by_instance.entry((instance, version)).or_insert(0) += 1;
                }
                None => failed += 1,
            }
        }
    }
    Ok((by_version, by_instance, failed))
}

fn print_tally(
    n: usize,
    by_version: &BTreeMap<String, usize>,
    by_instance: &BTreeMap<(String, String), usize>,
    failed: usize,
) {
    println!("  {:<10} {:>8} {:>7}", "VERSION", "REQUESTS", "SHARE");
    for v in ["v1", "v2"] {
        let c = by_version.get(v).copied().unwrap_or(0);
        println!(
            "  {:<10} {:>8} {:>6.1}%",
            v,
            c,
            100.0 * c as f64 / n.max(1) as f64
        );
    }
    println!("  {:<10} {:>8}   VERSION", "ENDPOINT", "REQUESTS");
    for ((instance, version), c) in by_instance {
        println!("  {:<10} {:>8}   {}", instance, c, version);
    }
    if failed > 0 {
        println!("  failed requests: {failed}");
    }
}

fn split(entries: &[(&str, u32)]) -> Vec<pb::WeightedSubset> {
    entries
        .iter()
        .map(|(s, w)| pb::WeightedSubset {
            subset: s.to_string(),
            weight: *w,
        })
        .collect()
}

pub async fn run_demo() -> Result<(), CliError> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("switchyard-demo-")
        .tempdir()
        .map_err(fail)?;
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.map_err(fail) };

    println!("Switchyard demo: a registry, a sidecar and three backends of service `web` (v1 x2, v2 x1), all on 127.0.0.1.\n");
    let registry = switchyard_registry::start(
        RegistryConfig::new(dir.path().join("registry")),
        Listeners {
            grpc: bind().await?,
            peer: bind().await?,
            http: bind().await?,
            dns: None,
        },
    )
    .await
    .map_err(fail)?;
    let url = format!("http://{}", registry.grpc_addr);
    let mut config = SidecarConfig::new(vec![url.clone()]);
    config.discovery.cache_file = Some(dir.path().join("sidecar-catalog.json"));
    // Short windows, so act 2's rollouts have evidence within seconds.
    config.telemetry.interval = Duration::from_millis(500);
    let sidecar = switchyard_sidecar::start(
        config,
        SidecarListeners {
            workers: Vec::new(),
            admin: bind().await?,
            http_proxy: Some(bind().await?),
            upstreams: vec![],
            http_upstreams: vec![],
            dns: None,
            inbound: None,
        },
    )
    .await
    .map_err(fail)?;
    let proxy = sidecar
        .http_proxy_addr
        .ok_or_else(|| fail("no proxy listener"))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut reg = RegistryClient::connect(url.clone()).await.map_err(fail)?;
    for (id, version) in [("web-v1-a", "v1"), ("web-v1-b", "v1"), ("web-v2-a", "v2")] {
        let listener = bind().await?;
        let addr = listener.local_addr().map_err(fail)?;
        let mut rx = stop_rx.clone();
        tokio::spawn(serve_backend(
            listener,
            version.into(),
            id.into(),
            0.0,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ));
        reg.register(pb::RegisterRequest {
            instance: Some(pb::Instance {
                service: "web".into(),
                id: id.into(),
                address: addr.ip().to_string(),
                port: u32::from(addr.port()),
                version: version.into(),
                ..Default::default()
            }),
            ttl_seconds: 30,
            lease_id: 0,
        })
        .await
        .map_err(fail)?;
        println!("registered {id} (version {version}) at {addr}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while sidecar.table.get("web").map_or(0, |v| v.endpoints.len()) < 3 {
        if Instant::now() > deadline {
            return Err(fail(
                "the sidecar did not see the three backends within 10 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("sidecar proxy on http://{proxy} routes Host: web across them\n");

    let mut routing = RoutingClient::connect(url.clone()).await.map_err(fail)?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let subsets = vec![
        pb::Subset {
            name: "v1".into(),
            version: "v1".into(),
            ..Default::default()
        },
        pb::Subset {
            name: "v2".into(),
            version: "v2".into(),
            ..Default::default()
        },
    ];
    let mut first_revision = 0;
    let steps: [(&str, &str, Vec<pb::WeightedSubset>, Vec<pb::Route>); 4] = [
        (
            "100/0",
            "switchyard route split web v1=100",
            split(&[("v1", 100)]),
            vec![],
        ),
        (
            "90/10",
            "switchyard route split web v1=90 v2=10",
            split(&[("v1", 90), ("v2", 10)]),
            vec![],
        ),
        (
            "50/50",
            "switchyard route split web v1=50 v2=50",
            split(&[("v1", 50), ("v2", 50)]),
            vec![],
        ),
        (
            "header x-canary: true -> v2",
            "switchyard route match web --header x-canary=true --to v2",
            split(&[("v1", 50), ("v2", 50)]),
            vec![pb::Route {
                name: "x-canary".into(),
                headers: vec![pb::HeaderMatch {
                    name: "x-canary".into(),
                    r#match: Some(pb::header_match::Match::Exact("true".into())),
                }],
                split: split(&[("v2", 100)]),
                sticky_header: String::new(),
                retryable: false,
            }],
        ),
    ];
    const N: usize = 1_000;
    for (title, command, default_split, routes) in steps {
        let with_header = !routes.is_empty();
        let revision = routing
            .put_policy(pb::PutPolicyRequest {
                namespace: String::new(),
                service: "web".into(),
                policy: Some(pb::Policy {
                    subsets: subsets.clone(),
                    routes,
                    default_split,
                    ..Default::default()
                }),
            })
            .await
            .map_err(fail)?
            .into_inner()
            .revision;
        if first_revision == 0 {
            first_revision = revision;
        }
        wait_for_revision(&sidecar.table, revision).await?;
        let header = with_header.then_some(("x-canary", "true"));
        println!("== {title}   ($ {command})   revision {revision}");
        let (by_version, by_instance, failed) = traffic(&client, proxy, N, header).await?;
        let sent = if with_header {
            format!("{N} requests with x-canary: true")
        } else {
            format!("{N} requests")
        };
        println!("  {sent}:");
        print_tally(N, &by_version, &by_instance, failed);
        println!();
    }

    let rolled = routing
        .rollback_policy(pb::RollbackPolicyRequest {
            namespace: String::new(),
            service: "web".into(),
            to_revision: first_revision,
        })
        .await
        .map_err(fail)?
        .into_inner();
    wait_for_revision(&sidecar.table, rolled.revision).await?;
    println!("== rollback to revision {first_revision}   ($ switchyard route rollback web --to {first_revision})   revision {}", rolled.revision);
    let (by_version, by_instance, failed) =
        traffic(&client, proxy, N, Some(("x-canary", "true"))).await?;
    println!("  {N} requests with x-canary: true (the header route is gone with the rollback):");
    print_tally(N, &by_version, &by_instance, failed);

    let history = routing
        .policy_history(pb::PolicyHistoryRequest {
            namespace: String::new(),
            service: "web".into(),
        })
        .await
        .map_err(fail)?
        .into_inner()
        .records;
    println!("\n== history   ($ switchyard route history web)");
    for r in history {
        let p = r.policy.unwrap_or_default();
        let s: Vec<String> = p
            .default_split
            .iter()
            .map(|w| format!("{}={}", w.subset, w.weight))
            .collect();
        println!(
            "  revision {:<4} {:<16} default {:<12} routes {}",
            r.revision,
            r.reason,
            s.join(" "),
            p.routes.len()
        );
    }

    act_two(&url, &mut reg, &client, proxy, &sidecar.table, &stop_rx).await?;

    let _ = stop_tx.send(true);
    sidecar.shutdown().await;
    registry.shutdown().await;
    println!("\ndone in {:.1} s. Try it by hand: `switchyard dev`, `switchyard demo-backend --version v2 --listen 127.0.0.1:9002`, `switchyard register …`, `switchyard route …`, `switchyard rollout …`.", started.elapsed().as_secs_f64());
    Ok(())
}

async fn wait_for_revision(
    table: &switchyard_sidecar::EndpointTable,
    revision: u64,
) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while table.revision() < revision {
        if Instant::now() > deadline {
            return Err(fail(format!(
                "the sidecar did not reach revision {revision} within 10 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Act 2: automated rollouts. A healthy canary (v3) promotes itself step by step; then a
/// bad one (v4, 5 % errors) is aborted by the gate on its own, with the evidence shown.
async fn act_two(
    url: &str,
    reg: &mut RegistryClient<tonic::transport::Channel>,
    client: &HttpClient,
    proxy: SocketAddr,
    table: &switchyard_sidecar::EndpointTable,
    stop_rx: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), CliError> {
    use switchyard_proto::v1::rollouts_client::RolloutsClient;
    println!("\n== act 2: automated rollouts, judged by the registry from the sidecar's per-version reports");
    for (id, version, error_rate) in [("web-v3-a", "v3", 0.0), ("web-v4-a", "v4", 0.05)] {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        let mut rx = stop_rx.clone();
        tokio::spawn(serve_backend(
            listener,
            version.into(),
            id.into(),
            error_rate,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ));
        let revision = reg
            .register(pb::RegisterRequest {
                instance: Some(pb::Instance {
                    service: "web".into(),
                    id: id.into(),
                    address: addr.ip().to_string(),
                    port: u32::from(addr.port()),
                    version: version.into(),
                    ..Default::default()
                }),
                ttl_seconds: 30,
                lease_id: 0,
            })
            .await
            .map_err(fail)?
            .into_inner()
            .revision;
        wait_for_revision(table, revision).await?;
        let errors = if error_rate > 0.0 {
            format!(", answers 503 to {:.0}% of requests", error_rate * 100.0)
        } else {
            String::new()
        };
        println!("registered {id} (version {version}{errors}) at {addr}");
    }
    // Steady traffic through the sidecar for the whole act (about 400 requests a second).
    let (load_stop, load_rx) = tokio::sync::watch::channel(false);
    for _ in 0..4 {
        let client = client.clone();
        let rx = load_rx.clone();
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(120);
            while !*rx.borrow() && Instant::now() < until {
                let req = hyper::Request::builder()
                    .uri(format!("http://{proxy}/"))
                    .header(hyper::header::HOST, "web")
                    .body(Empty::<Bytes>::new());
                if let Ok(req) = req {
                    if let Ok(resp) = client.request(req).await {
                        let _ = resp.into_body().collect().await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    let mut rollouts = RolloutsClient::connect(url.to_string())
        .await
        .map_err(fail)?;
    for (canary, baseline, pause) in [("v3", "v1", 2_000), ("v4", "v3", 60_000)] {
        let command = format!(
            "switchyard rollout start web --canary {canary} --baseline {baseline} --steps 10,50,100 --pause {}s --interval 1s",
            pause / 1000
        );
        println!("\n== rollout of {canary}   ($ {command})");
        rollouts
            .start(pb::StartRolloutRequest {
                namespace: String::new(),
                service: "web".into(),
                spec: Some(pb::RolloutSpec {
                    canary: canary.into(),
                    baseline: baseline.into(),
                    steps: vec![10, 50, 100],
                    pause_ms: pause,
                    interval_ms: 1_000,
                    min_requests: 100,
                    ..Default::default()
                }),
            })
            .await
            .map_err(fail)?;
        let started = Instant::now();
        let mut last = String::new();
        let done = loop {
            let r = rollouts
                .get(pb::RolloutRef {
                    namespace: String::new(),
                    service: "web".into(),
                })
                .await
                .map_err(fail)?
                .into_inner()
                .rollout
                .ok_or_else(|| fail("the registry returned no rollout"))?;
            let line = super::rollout::one_line(&r);
            let (phase, step, weight) = r
                .status
                .as_ref()
                .map_or((pb::RolloutPhase::Unspecified, 0, 0), |s| {
                    (s.phase(), s.step, s.weight)
                });
            let key = format!("{phase:?}/{step}/{weight}");
            if key != last {
                println!("  [{:>5.1} s] {line}", started.elapsed().as_secs_f64());
                last = key;
            }
            if matches!(
                phase,
                pb::RolloutPhase::Succeeded | pb::RolloutPhase::Aborted | pb::RolloutPhase::Paused
            ) {
                break r;
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(fail(format!(
                    "the rollout of {canary} did not end within 60 s: {line}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!("  $ switchyard rollout get web");
        for l in super::rollout::render(&done).lines() {
            println!("    {l}");
        }
    }
    let _ = load_stop.send(true);
    Ok(())
}
