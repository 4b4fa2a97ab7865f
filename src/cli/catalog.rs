//! `switchyard services` and `switchyard instances SVC`.

use clap::Args;
use serde::Serialize;
use switchyard_proto::v1 as pb;

use super::register::{connect_discovery, RegistryFlag};
use super::{CliError, Output};

#[derive(Args, Debug)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub registry: RegistryFlag,
    /// Namespace to list.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct InstancesArgs {
    /// The service whose instances to list.
    pub service: String,
    #[command(flatten)]
    pub registry: RegistryFlag,
    /// Namespace of the service.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Only instances with this version tag.
    #[arg(long)]
    pub version: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Serialize)]
struct ServiceRow {
    name: String,
    instances: u32,
    versions: Vec<String>,
}

#[derive(Serialize)]
struct InstanceRow {
    id: String,
    address: String,
    port: u32,
    version: String,
    weight: u32,
    state: &'static str,
    zone: String,
    labels: std::collections::BTreeMap<String, String>,
}

fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::new(1, format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Prints rows as a left-aligned table under an upper-case header.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub async fn services(args: ServicesArgs) -> Result<(), CliError> {
    let mut client = connect_discovery(&args.registry.registry).await?;
    let resp = client
        .list_services(pb::ListServicesRequest {
            namespace: args.namespace.clone(),
        })
        .await
        .map_err(|s| super::status_error("cannot list services", s))?
        .into_inner();
    let rows: Vec<ServiceRow> = resp
        .services
        .into_iter()
        .map(|s| ServiceRow {
            name: s.name,
            instances: s.instance_count,
            versions: s.versions,
        })
        .collect();
    match args.output {
        Output::Json => print_json(&rows),
        Output::Table => {
            if rows.is_empty() {
                eprintln!(
                    "no services in namespace {:?} (revision {})",
                    args.namespace, resp.revision
                );
                return Ok(());
            }
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        r.instances.to_string(),
                        r.versions.join(","),
                    ]
                })
                .collect();
            print_table(&["SERVICE", "INSTANCES", "VERSIONS"], &table);
            Ok(())
        }
    }
}

fn state_name(raw: i32) -> &'static str {
    match pb::State::try_from(raw) {
        Ok(pb::State::Serving) => "SERVING",
        Ok(pb::State::Draining) => "DRAINING",
        Ok(pb::State::Failing) => "FAILING",
        _ => "UNKNOWN",
    }
}

pub async fn instances(args: InstancesArgs) -> Result<(), CliError> {
    let mut client = connect_discovery(&args.registry.registry).await?;
    let resp = client
        .resolve(pb::ResolveRequest {
            namespace: args.namespace.clone(),
            service: args.service.clone(),
            version: args.version.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| super::status_error("cannot resolve", s))?
        .into_inner();
    let rows: Vec<InstanceRow> = resp
        .instances
        .into_iter()
        .map(|i| InstanceRow {
            state: state_name(i.state),
            id: i.id,
            address: i.address,
            port: i.port,
            version: i.version,
            weight: i.weight,
            zone: i.zone,
            labels: i.labels.into_iter().collect(),
        })
        .collect();
    match args.output {
        Output::Json => print_json(&rows),
        Output::Table => {
            if rows.is_empty() {
                eprintln!(
                    "no instances of {:?} in namespace {:?} (revision {})",
                    args.service, args.namespace, resp.revision
                );
                return Ok(());
            }
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        format!("{}:{}", r.address, r.port),
                        r.version.clone(),
                        r.weight.to_string(),
                        r.state.to_string(),
                        r.zone.clone(),
                        r.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "ADDRESS", "VERSION", "WEIGHT", "STATE", "ZONE", "LABELS",
                ],
                &table,
            );
            Ok(())
        }
    }
}
