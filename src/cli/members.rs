//! `switchyard members`: the registry cluster's members and state; add and remove nodes.

use clap::{Args, Subcommand};
use serde::Serialize;
use switchyard_proto::v1 as pb;

use super::client::{connect_cluster, print_json, status_error, OutputFlag, RegistryFlag};
use super::{CliError, Output};

#[derive(Args, Debug)]
pub struct MembersArgs {
    #[command(subcommand)]
    pub verb: Option<MembersVerb>,
    // Any member will do.
    #[command(flatten)]
    pub registry: RegistryFlag,
    #[command(flatten)]
    pub output: OutputFlag,
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
    Remove {
        id: u64,
        /// Remove even when the voters left would not have a live majority (the cluster
        /// then stops taking writes until enough of them are back).
        #[arg(long, env = "SWITCHYARD_MEMBERS_REMOVE_FORCE")]
        force: bool,
    },
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
    let mut client = connect_cluster(&args.registry.registry).await?;
    match args.verb {
        Some(MembersVerb::Add { id, address }) => {
            client
                .add_member(pb::AddMemberRequest {
                    id,
                    address: address.clone(),
                })
                .await
                .map_err(|s| status_error("", s))?;
            eprintln!("node {id} ({address}) added");
        }
        Some(MembersVerb::Remove { id, force }) => {
            client
                .remove_member(pb::RemoveMemberRequest { id, force })
                .await
                .map_err(|s| status_error("", s))?;
            eprintln!("node {id} removed");
        }
        None => {}
    }
    let s = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| status_error("", s))?
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
    if args.output.output == Output::Json {
        return print_json(&doc);
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
