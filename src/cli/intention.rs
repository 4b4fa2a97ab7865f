//! `switchyard intention allow|deny|list|delete|check`: who may call whom over the mesh.
//!
//! `SRC` is a service name, the start of one followed by `*` (`web-*`), or `*`; `DST`
//! is a service name or `*`. A caller no intention matches is allowed, unless an allow
//! intention applies to the destination (then it is an allow list), as in Consul.

use clap::{Args, Subcommand};
use serde::Serialize;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::intentions_client::IntentionsClient;

use super::client::{channel, print_json, print_table, status_error, OutputFlag, RegistryFlag};
use super::{CliError, Output};

#[derive(Args, Debug)]
pub struct IntentionArgs {
    #[command(subcommand)]
    pub verb: IntentionVerb,
    /// The namespace of both services.
    #[arg(
        long,
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default",
        global = true
    )]
    pub namespace: String,
    #[command(flatten)]
    pub registry: RegistryFlag,
    #[command(flatten)]
    pub output: OutputFlag,
}

#[derive(Subcommand, Debug)]
pub enum IntentionVerb {
    /// Let SRC call DST (replaces a deny for the same pair).
    Allow(PutArgs),
    /// Stop SRC calling DST (replaces an allow for the same pair).
    Deny(PutArgs),
    /// The intentions (of DST only, when given).
    List {
        dst: Option<String>,
        /// Also the recorded changes, oldest first.
        #[arg(long, env = "SWITCHYARD_INTENTION_HISTORY", default_value_t = false)]
        history: bool,
    },
    /// Remove the intention for SRC -> DST.
    Delete { src: String, dst: String },
    /// Whether SRC may call DST now, and which intention decides.
    Check { src: String, dst: String },
}

/// SRC, DST and why, for `allow` and `deny`.
#[derive(Args, Debug)]
pub struct PutArgs {
    src: String,
    dst: String,
    /// Why, for whoever reads `intention list`.
    #[arg(long, env = "SWITCHYARD_INTENTION_DESCRIPTION", default_value = "")]
    description: String,
}

#[derive(Serialize)]
struct IntentionDoc {
    source: String,
    destination: String,
    action: &'static str,
    description: String,
    revision: u64,
    updated_ms: u64,
}

fn action_name(raw: i32) -> &'static str {
    match pb::IntentionAction::try_from(raw) {
        Ok(pb::IntentionAction::Allow) => "allow",
        Ok(pb::IntentionAction::Deny) => "deny",
        _ => "deleted",
    }
}

fn doc(i: &pb::Intention) -> IntentionDoc {
    IntentionDoc {
        source: i.source.clone(),
        destination: i.destination.clone(),
        action: action_name(i.action),
        description: i.description.clone(),
        revision: i.revision,
        updated_ms: i.updated_ms,
    }
}

fn print_changed(
    output: Output,
    verb: &str,
    src: &str,
    dst: &str,
    revision: u64,
) -> Result<(), CliError> {
    match output {
        Output::Json => print_json(&serde_json::json!({
            "source": src, "destination": dst, "result": verb, "revision": revision,
        })),
        Output::Table => {
            println!("{verb} {src} -> {dst} (revision {revision})");
            Ok(())
        }
    }
}

/// `allow` and `deny`: one Put each.
async fn put(
    client: &mut IntentionsClient<super::client::AuthChannel>,
    namespace: String,
    p: PutArgs,
    action: pb::IntentionAction,
    output: Output,
) -> Result<(), CliError> {
    let r = client
        .put(pb::PutIntentionRequest {
            namespace,
            intention: Some(pb::Intention {
                source: p.src.clone(),
                destination: p.dst.clone(),
                action: action as i32,
                description: p.description,
                revision: 0,
                updated_ms: 0,
            }),
        })
        .await
        .map_err(|e| status_error("cannot set the intention", e))?
        .into_inner();
    let verb = if action == pb::IntentionAction::Allow {
        "allowed"
    } else {
        "denied"
    };
    print_changed(output, verb, &p.src, &p.dst, r.revision)
}

pub async fn run(args: IntentionArgs) -> Result<(), CliError> {
    let mut client = IntentionsClient::new(channel(&args.registry.registry).await?);
    let output = args.output.output;
    let namespace = args.namespace;
    match args.verb {
        IntentionVerb::Allow(p) => {
            put(
                &mut client,
                namespace,
                p,
                pb::IntentionAction::Allow,
                output,
            )
            .await
        }
        IntentionVerb::Deny(p) => {
            put(&mut client, namespace, p, pb::IntentionAction::Deny, output).await
        }
        IntentionVerb::Delete { src, dst } => {
            let r = client
                .delete(pb::DeleteIntentionRequest {
                    namespace,
                    source: src.clone(),
                    destination: dst.clone(),
                })
                .await
                .map_err(|e| status_error("cannot delete the intention", e))?
                .into_inner();
            print_changed(output, "deleted", &src, &dst, r.revision)
        }
        IntentionVerb::Check { src, dst } => {
            let r = client
                .check(pb::CheckIntentionRequest {
                    namespace,
                    source: src.clone(),
                    destination: dst.clone(),
                })
                .await
                .map_err(|e| status_error("cannot check the intention", e))?
                .into_inner();
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "source": src, "destination": dst, "allowed": r.allowed,
                    "matched": r.matched.as_ref().map(doc),
                })),
                Output::Table => {
                    let verdict = if r.allowed { "allowed" } else { "denied" };
                    match &r.matched {
                        Some(m) => println!(
                            "{verdict}: {src} -> {dst} by `{} {} {}`",
                            action_name(m.action),
                            m.source,
                            m.destination
                        ),
                        None if r.allowed => {
                            println!("{verdict}: {src} -> {dst} (no intention matches {src}, and none allows anyone to call {dst})")
                        }
                        None => println!(
                            "{verdict}: {src} -> {dst} ({dst} takes only the callers an intention allows)"
                        ),
                    }
                    Ok(())
                }
            }
        }
        IntentionVerb::List { dst, history } => {
            let r = client
                .list(pb::ListIntentionsRequest {
                    namespace,
                    destination: dst.unwrap_or_default(),
                    history,
                })
                .await
                .map_err(|e| status_error("cannot list intentions", e))?
                .into_inner();
            if history {
                let rows: Vec<Vec<String>> = r
                    .history
                    .iter()
                    .map(|c| {
                        vec![
                            c.revision.to_string(),
                            action_name(c.action).to_string(),
                            c.source.clone(),
                            c.destination.clone(),
                            c.description.clone(),
                        ]
                    })
                    .collect();
                return match output {
                    Output::Json => print_json(
                        &r.history
                            .iter()
                            .map(|c| {
                                serde_json::json!({
                                    "revision": c.revision, "at_ms": c.at_ms,
                                    "action": action_name(c.action), "source": c.source,
                                    "destination": c.destination, "description": c.description,
                                })
                            })
                            .collect::<Vec<_>>(),
                    ),
                    Output::Table => {
                        print_table(
                            &["REVISION", "ACTION", "SOURCE", "DESTINATION", "DESCRIPTION"],
                            &rows,
                        );
                        Ok(())
                    }
                };
            }
            match output {
                Output::Json => print_json(&r.intentions.iter().map(doc).collect::<Vec<_>>()),
                Output::Table => {
                    if r.intentions.is_empty() {
                        eprintln!("no intentions: every service takes every caller");
                        return Ok(());
                    }
                    let rows: Vec<Vec<String>> = r
                        .intentions
                        .iter()
                        .map(|i| {
                            vec![
                                i.source.clone(),
                                i.destination.clone(),
                                action_name(i.action).to_string(),
                                i.revision.to_string(),
                                i.description.clone(),
                            ]
                        })
                        .collect();
                    print_table(
                        &["SOURCE", "DESTINATION", "ACTION", "REVISION", "DESCRIPTION"],
                        &rows,
                    );
                    Ok(())
                }
            }
        }
    }
}
