//! `switchyard register`: register one instance and keep its lease alive until Ctrl-C.

use std::collections::HashMap;
use std::time::Duration;

use clap::Args;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::registry_client::RegistryClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::client::{connect_registry, RegistryFlag};
use super::config::parse_ttl;
use super::{shutdown_signal, CliError, EXIT_CONFIG, EXIT_UNAVAILABLE};

/// Flags of `switchyard register`. The environment variables are the sidecar's for the
/// same fields (SWITCHYARD_SERVICE, SWITCHYARD_PORT, ...): both register a local service.
#[derive(Args, Debug)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub registry: RegistryFlag,
    /// Service name (a DNS label).
    #[arg(long, env = "SWITCHYARD_SERVICE")]
    pub service: String,
    /// Address clients connect to (IP literal or hostname).
    #[arg(long, env = "SWITCHYARD_ADDRESS")]
    pub address: String,
    /// Port clients connect to.
    #[arg(long, env = "SWITCHYARD_PORT")]
    pub port: u32,
    /// Version tag, e.g. 1.4.2 or canary.
    #[arg(long, env = "SWITCHYARD_VERSION")]
    pub version: String,
    /// Instance id; default SERVICE-ADDRESS-PORT.
    #[arg(long, env = "SWITCHYARD_ID")]
    pub id: Option<String>,
    /// Namespace.
    #[arg(
        long,
        short = 'n',
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Label, repeatable: --label zone=eu --label tier=web (the variable holds one).
    #[arg(long = "label", env = "SWITCHYARD_LABEL", value_parser = super::parse_label)]
    pub labels: Vec<(String, String)>,
    /// Load-balancing weight, 1-10000.
    #[arg(long, env = "SWITCHYARD_WEIGHT", default_value_t = 100)]
    pub weight: u32,
    /// Zone.
    #[arg(long, env = "SWITCHYARD_ZONE", default_value = "")]
    pub zone: String,
    /// Lease TTL: 10s, 1m, 1h (1 s to 1 h).
    #[arg(long, env = "SWITCHYARD_TTL", default_value = "10s", value_parser = parse_ttl)]
    pub ttl: u32,
}

async fn register_once(
    client: &mut RegistryClient<super::client::AuthChannel>,
    instance: &pb::Instance,
    ttl: u32,
) -> Result<pb::RegisterResponse, CliError> {
    client
        .register(pb::RegisterRequest {
            instance: Some(instance.clone()),
            ttl_seconds: ttl,
            lease_id: 0,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| {
            let code = if s.code() == tonic::Code::InvalidArgument {
                EXIT_CONFIG
            } else {
                EXIT_UNAVAILABLE
            };
            CliError::new(code, format!("register refused: {}", s.message()))
        })
}

pub async fn run(args: RegisterArgs) -> Result<(), CliError> {
    // A comma-separated list: the lease is held through whichever member answers.
    let urls: Vec<String> = args
        .registry
        .registry
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    let mut next_url = 0usize;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}-{}", args.service, args.address, args.port));
    let instance = pb::Instance {
        namespace: args.namespace.clone(),
        service: args.service.clone(),
        id: id.clone(),
        address: args.address.clone(),
        port: args.port,
        version: args.version.clone(),
        labels: args.labels.iter().cloned().collect::<HashMap<_, _>>(),
        weight: args.weight,
        zone: args.zone.clone(),
        state: pb::State::Serving as i32,
        mesh_port: 0,
    };
    let stop = shutdown_signal();
    let mut client = None;
    let mut last_error = None;
    for (i, u) in urls.iter().enumerate() {
        match connect_registry(u).await {
            Ok(c) => {
                client = Some(c);
                next_url = i;
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let Some(mut client) = client else {
        return Err(last_error.unwrap_or_else(|| CliError::new(EXIT_CONFIG, "--registry is empty")));
    };
    let first = register_once(&mut client, &instance, args.ttl).await?;
    println!(
        "registered {id} ({} {}:{} version {}) with lease {} (ttl {}s) at revision {}; holding the lease until Ctrl-C",
        args.service, args.address, args.port, args.version, first.lease_id, first.ttl_seconds, first.revision
    );
    let mut lease = first.lease_id;
    let period =
        Duration::from_millis(u64::from(args.ttl) * 1000 / 3).max(Duration::from_millis(300));
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    loop {
        let outcome = tokio::select! {
            _ = &mut stop => break,
            r = hold(&mut client, &mut lease, &instance, args.ttl, period) => r,
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e.message, "lost the registry; retrying");
            eprintln!("warning: {}; retrying in {:?}", e.message, backoff);
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        next_url += 1;
        let url = &urls[next_url % urls.len().max(1)];
        if let Ok(c) = connect_registry(url).await {
            client = c;
            if let Ok(r) = register_once(&mut client, &instance, args.ttl).await {
                lease = r.lease_id;
                backoff = Duration::from_millis(200);
            }
        }
    }
    match client
        .deregister(pb::DeregisterRequest {
            namespace: args.namespace.clone(),
            id: id.clone(),
        })
        .await
    {
        Ok(r) => println!("deregistered {id} at revision {}", r.into_inner().revision),
        Err(s) => eprintln!("warning: could not deregister {id}: {}", s.message()),
    }
    Ok(())
}

/// Renews the lease every `period` on one KeepAlive stream; re-registers when the
/// registry no longer knows the lease. Returns when the stream breaks.
async fn hold(
    client: &mut RegistryClient<super::client::AuthChannel>,
    lease: &mut u64,
    instance: &pb::Instance,
    ttl: u32,
    period: Duration,
) -> Result<(), CliError> {
    let (tx, rx) = mpsc::channel(4);
    let mut responses = client
        .keep_alive(ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            CliError::new(
                EXIT_UNAVAILABLE,
                format!("keep-alive refused: {}", s.message()),
            )
        })?
        .into_inner();
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if tx.send(pb::KeepAliveRequest { lease_ids: vec![*lease] }).await.is_err() {
                    return Err(CliError::new(EXIT_UNAVAILABLE, "keep-alive stream closed"));
                }
            }
            msg = responses.message() => match msg {
                Ok(Some(resp)) => {
                    if resp.leases.iter().any(|l| l.lease_id == *lease && !l.found) {
                        eprintln!("lease {lease} expired on the registry; registering again");
                        let r = register_once(client, instance, ttl).await?;
                        *lease = r.lease_id;
                    }
                }
                Ok(None) => return Err(CliError::new(EXIT_UNAVAILABLE, "the registry closed the keep-alive stream")),
                Err(s) => return Err(CliError::new(EXIT_UNAVAILABLE, format!("keep-alive failed: {}", s.message()))),
            }
        }
    }
}
