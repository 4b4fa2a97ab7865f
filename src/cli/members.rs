//! `switchyard members`: the registry cluster's members and state; add and remove nodes.

use clap::{Args, Subcommand};
use serde::Serialize;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::cluster_client::ClusterClient;

use super::register::channel;
use super::{CliError, Output};

#[derive(Args, Debug)]
pub struct MembersArgs {
    #[command(subcommand)]
    pub verb: Option<MembersVerb>,
    /// Registry gRPC address (any member).
    #[arg(
        long,
        env = "SWITCHYARD_REGISTRY",
        default_value = "http://127.0.0.1:7400",
        global = true
    )]
    pub registry: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

#[derive(Subcommand, Debug)]
pub enum MembersVerb {
    /// Add a node (it catches up as a learner, then votes).
    Add {
        id: u64,
        /// The node's gRPC address, HOST:PORT.
        address: String,
    },
    /// Remove a node from the cluster.
    Remove { id: u64 },
}

#[derive(Serialize)]
struct StatusDoc {
    node_id: u64,
    role: String,
    leader_id: u64,
    leader_address: String,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    revision: u64,
    members: Vec<MemberDoc>,
}

#[derive(Serialize)]
struct MemberDoc {
    id: u64,
    address: String,
    voter: bool,
}

pub async fn run(args: MembersArgs) -> Result<(), CliError> {
    let mut client = ClusterClient::new(channel(&args.registry).await?);
    match args.verb {
        Some(MembersVerb::Add { id, address }) => {
            client
                .add_member(pb::AddMemberRequest {
                    id,
                    address: address.clone(),
                })
                .await
                .map_err(|s| super::status_error("", s))?;
            eprintln!("node {id} ({address}) added");
        }
        Some(MembersVerb::Remove { id }) => {
            client
                .remove_member(pb::RemoveMemberRequest { id })
                .await
                .map_err(|s| super::status_error("", s))?;
            eprintln!("node {id} removed");
        }
        None => {}
    }
    let s = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| super::status_error("", s))?
        .into_inner();
    let doc = StatusDoc {
        node_id: s.node_id,
        role: s.role,
        leader_id: s.leader_id,
        leader_address: s.leader_address,
        term: s.term,
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        revision: s.revision,
        members: s
            .members
            .into_iter()
            .map(|m| MemberDoc {
                id: m.id,
                address: m.address,
                voter: m.voter,
            })
            .collect(),
    };
    if args.output == Output::Json {
        let text =
            serde_json::to_string_pretty(&doc).map_err(|e| CliError::new(1, e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    println!("{:<4} {:<22} {:<8} LEADER", "ID", "ADDRESS", "VOTER");
    for m in &doc.members {
        let leader = if m.id == doc.leader_id { "*" } else { "" };
        println!(
            "{:<4} {:<22} {:<8} {leader}",
            m.id,
            m.address,
            if m.voter { "yes" } else { "learner" }
        );
    }
    println!(
        "asked node {} ({}): term {}, commit {}, applied {}, revision {}",
        doc.node_id, doc.role, doc.term, doc.commit_index, doc.applied_index, doc.revision
    );
    Ok(())
}
