//! `switchyard services` and `switchyard instances SVC`.

use clap::Args;
use serde::Serialize;
use switchyard_proto::v1 as pb;

use super::client::{connect_discovery, print_json, print_table, status_error};
use super::client::{OutputFlag, RegistryFlag};
use super::{CliError, Output};

#[derive(Args, Debug)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub registry: RegistryFlag,
    /// Namespace to list.
    #[arg(
        long,
        short = 'n',
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    #[command(flatten)]
    pub output: OutputFlag,
}

#[derive(Args, Debug)]
pub struct InstancesArgs {
    /// The service whose instances to list.
    pub service: String,
    #[command(flatten)]
    pub registry: RegistryFlag,
    /// Namespace of the service.
    #[arg(
        long,
        short = 'n',
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Only instances with this version tag.
    #[arg(long, env = "SWITCHYARD_INSTANCES_VERSION")]
    pub version: Option<String>,
    #[command(flatten)]
    pub output: OutputFlag,
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
    /// The sidecar's mesh inbound port (0: not in the mesh).
    mesh_port: u32,
}

pub async fn services(args: ServicesArgs) -> Result<(), CliError> {
    let mut client = connect_discovery(&args.registry.registry).await?;
    let resp = client
        .list_services(pb::ListServicesRequest {
            namespace: args.namespace.clone(),
        })
        .await
        .map_err(|s| status_error("cannot list services", s))?
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
    match args.output.output {
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
        .map_err(|s| status_error("cannot resolve", s))?
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
            mesh_port: i.mesh_port,
        })
        .collect();
    match args.output.output {
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
                        if r.mesh_port == 0 {
                            format!("{}:{}", r.address, r.port)
                        } else {
                            format!("{}:{} (mesh {})", r.address, r.port, r.mesh_port)
                        },
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
