//! `switchyard top [SVC]`: request rate, error rate and p50/p99 by version, from what
//! sidecars reported to the registry (`Telemetry/Top`). Counts are per attempt: a
//! retry is a request of the version that answered it.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::telemetry_client::TelemetryClient;

use super::client::{channel, print_json, print_table, status_error, OutputFlag, RegistryFlag};
use super::config::parse_duration;
use super::{CliError, Output, EXIT_CONFIG};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Only this service (default: every service of the namespace).
    pub service: Option<String>,
    /// How far back to aggregate (at most 5m, what the registry keeps).
    #[arg(long, env = "SWITCHYARD_TOP_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub window: Duration,
    /// Namespace of the services.
    #[arg(
        long,
        short = 'n',
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    #[command(flatten)]
    pub registry: RegistryFlag,
    #[command(flatten)]
    pub output: OutputFlag,
}

#[derive(Serialize)]
struct TopDoc {
    window_seconds: u32,
    versions: Vec<VersionDoc>,
}

#[derive(Serialize)]
struct VersionDoc {
    service: String,
    version: String,
    requests: u64,
    errors: u64,
    slow: u64,
    requests_per_second: f64,
    error_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub async fn run(args: TopArgs) -> Result<(), CliError> {
    let secs = args.window.as_secs();
    if !(1..=300).contains(&secs) {
        return Err(CliError::new(
            EXIT_CONFIG,
            format!("--window {:?}: use 1s-5m", args.window),
        ));
    }
    let mut client = TelemetryClient::new(channel(&args.registry.registry).await?);
    let resp = client
        .top(pb::TopRequest {
            namespace: args.namespace.clone(),
            service: args.service.clone().unwrap_or_default(),
            window_seconds: u32::try_from(secs).unwrap_or(300),
        })
        .await
        .map_err(|s| status_error("top", s))?
        .into_inner();
    let doc = TopDoc {
        window_seconds: resp.window_seconds,
        versions: resp
            .versions
            .into_iter()
            .map(|v| VersionDoc {
                service: v.service,
                version: v.version,
                requests: v.requests,
                errors: v.errors,
                slow: v.slow,
                requests_per_second: v.requests_per_second,
                error_rate: v.error_rate,
                p50_ms: v.p50_ms,
                p99_ms: v.p99_ms,
            })
            .collect(),
    };
    match args.output.output {
        Output::Json => print_json(&doc),
        Output::Table => {
            if doc.versions.is_empty() {
                println!(
                    "no reports in the last {}s (sidecars report every --telemetry-interval)",
                    doc.window_seconds
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = doc
                .versions
                .iter()
                .map(|v| {
                    vec![
                        v.service.clone(),
                        v.version.clone(),
                        format!("{:.1}", v.requests_per_second),
                        format!("{:.2}", v.error_rate * 100.0),
                        format!("{:.1}ms", v.p50_ms),
                        format!("{:.1}ms", v.p99_ms),
                    ]
                })
                .collect();
            print_table(
                &["SERVICE", "VERSION", "REQ/S", "ERRORS%", "P50", "P99"],
                &rows,
            );
            Ok(())
        }
    }
}
