//! `switchyard tls init`: a CA and a registry certificate for a quick start.
//! `switchyard tls mesh-roots` and `tls rotate-mesh-root`: the mesh CA's roots, and a new
//! active one (the superseded roots stay trusted for two leaf lifetimes).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::identity_client::IdentityClient;

use super::client::{channel, print_json, print_table, status_error, OutputFlag, RegistryFlag};
use super::{CliError, Output, EXIT_CONFIG};

#[derive(Args, Debug)]
pub struct TlsArgs {
    #[command(subcommand)]
    pub command: TlsCommand,
}

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Write a new CA (ca.pem, ca-key.pem) and one certificate every registry node can
    /// use (registry.pem, registry-key.pem; names localhost, 127.0.0.1, ::1 and each
    /// --san), then print the flags that use them.
    Init(InitArgs),
    /// The mesh CA's trusted roots: id, created, active, when a superseded one retires.
    MeshRoots(MeshArgs),
    /// Make a new root the mesh CA's active one. Sidecars trust it from the watch stream
    /// and get leaves signed by it within seconds; the old roots stay trusted for two
    /// leaf lifetimes (--leaf-ttl), so no connection breaks. Needs operator::ca.
    RotateMeshRoot(MeshArgs),
}

#[derive(Args, Debug)]
pub struct MeshArgs {
    #[command(flatten)]
    pub registry: RegistryFlag,
    #[command(flatten)]
    pub output: OutputFlag,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to write the files into (created if missing).
    #[arg(long, env = "SWITCHYARD_TLS_DIR", default_value = "switchyard-tls")]
    pub dir: PathBuf,
    /// Another DNS name or IP address the registry nodes are reached by (repeatable).
    #[arg(long, env = "SWITCHYARD_TLS_SAN", value_delimiter = ',')]
    pub san: Vec<String>,
    /// Days the CA and the certificate are valid.
    #[arg(long, env = "SWITCHYARD_TLS_DAYS", default_value_t = 365)]
    pub days: u32,
    /// Replace files already in --dir (clients trusting the old CA then need the new one).
    #[arg(long, env = "SWITCHYARD_TLS_FORCE")]
    pub force: bool,
}

pub async fn run(args: TlsArgs) -> Result<(), CliError> {
    match args.command {
        TlsCommand::Init(args) => init(args),
        TlsCommand::MeshRoots(args) => mesh_roots(args).await,
        TlsCommand::RotateMeshRoot(args) => rotate(args).await,
    }
}

async fn mesh_roots(args: MeshArgs) -> Result<(), CliError> {
    let r = IdentityClient::new(channel(&args.registry.registry).await?)
        .roots(pb::RootsRequest {})
        .await
        .map_err(|e| status_error("cannot read the mesh roots", e))?
        .into_inner();
    match args.output.output {
        Output::Json => print_json(&serde_json::json!({
            "trust_domain": r.trust_domain,
            "roots": r.roots.iter().map(|root| serde_json::json!({
                "id": root.id, "created_ms": root.created_ms, "active": root.active,
                "retire_at_ms": (root.retire_at_ms > 0).then_some(root.retire_at_ms),
                "activate_at_ms": (root.activate_at_ms > 0).then_some(root.activate_at_ms),
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!("trust domain: {}", r.trust_domain);
            let rows: Vec<Vec<String>> = r
                .roots
                .iter()
                .map(|root| {
                    vec![
                        root.id.clone(),
                        root.created_ms.to_string(),
                        if root.active { "yes" } else { "" }.to_string(),
                        if root.activate_at_ms > 0 {
                            root.activate_at_ms.to_string()
                        } else {
                            String::new()
                        },
                        if root.retire_at_ms > 0 {
                            root.retire_at_ms.to_string()
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect();
            print_table(
                &["ROOT", "CREATED_MS", "SIGNS", "SIGNS_FROM_MS", "RETIRES_MS"],
                &rows,
            );
            Ok(())
        }
    }
}

async fn rotate(args: MeshArgs) -> Result<(), CliError> {
    let r = IdentityClient::new(channel(&args.registry.registry).await?)
        .rotate_root(pb::RotateRootRequest {})
        .await
        .map_err(|e| status_error("cannot rotate the mesh root", e))?
        .into_inner();
    match args.output.output {
        Output::Json => print_json(&serde_json::json!({
            "root_id": r.root_id, "retire_at_ms": r.retire_at_ms, "revision": r.revision,
        })),
        Output::Table => {
            println!(
                "new root {} (revision {}): trusted now, signs from {}; the old roots stay trusted until {} (Unix ms)",
                r.root_id, r.revision, r.activate_at_ms, r.retire_at_ms
            );
            Ok(())
        }
    }
}

fn init(args: InitArgs) -> Result<(), CliError> {
    use switchyard_tls::generate;
    let bundle = generate::quickstart("switchyard CA", &args.san, args.days)
        .map_err(|e| CliError::new(EXIT_CONFIG, e.0))?;
    let written = generate::write(&args.dir, &bundle, args.force)
        .map_err(|e| CliError::new(EXIT_CONFIG, e.0))?;
    for path in &written {
        println!("wrote {}", path.display());
    }
    let d = args.dir.display();
    println!();
    println!("registry nodes:  switchyard registry --tls-cert {d}/{} --tls-key {d}/{} --ca-file {d}/{} ...", generate::CERT, generate::KEY, generate::CA_CERT);
    println!(
        "clients:         --registry https://HOST:7400 --ca-file {d}/{}",
        generate::CA_CERT
    );
    println!(
        "keep {d}/{} secret: it signs certificates every client trusts.",
        generate::CA_KEY
    );
    Ok(())
}
