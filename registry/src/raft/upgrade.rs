//! Rolling upgrades: the leader raises the cluster's log format once every member runs a
//! release of the newer one (the etcd "cluster version" model; see
//! [`crate::catalog::format`]).
//!
//! Every few seconds, while this node leads a cluster below [`FORMAT`], it asks each
//! member its format over the internal `Hello` RPC (a node of 0.1.0 or earlier answers
//! UNIMPLEMENTED: format 1). When every member answers [`FORMAT`] or more, it proposes
//! [`Command::SetClusterFormat`]; until then writes that need the newer format are
//! refused, so the members not yet upgraded never meet an entry they cannot decode.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::internal::NodeHello;
use tokio::sync::watch;

use super::network::Network;
use super::propose::Proposer;
use crate::catalog::format::{FORMAT, UNVERSIONED};
use crate::catalog::Command;
use crate::shared::Shared;

/// How often a leader below [`FORMAT`] asks the members again.
const POLL: Duration = Duration::from_secs(2);
/// How long one member may take to answer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// This node's answer to `Hello`.
pub fn hello() -> NodeHello {
    NodeHello {
        format: FORMAT,
        release: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// A member's format and release, as it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberFormat {
    pub format: u32,
    pub release: String,
}

/// Asks the node at `addr` its format; a node older than `Hello` is format 1.
pub async fn member_format(network: &Network, addr: &str) -> Result<MemberFormat, String> {
    let mut client = network.client(addr)?;
    match tokio::time::timeout(HELLO_TIMEOUT, client.hello(hello())).await {
        Err(_) => Err(format!("no answer within {HELLO_TIMEOUT:?}")),
        Ok(Ok(r)) => {
            let r = r.into_inner();
            Ok(MemberFormat {
                format: r.format.max(UNVERSIONED),
                release: r.release,
            })
        }
        Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Ok(MemberFormat {
            format: UNVERSIONED,
            release: "0.1.0 or earlier".into(),
        }),
        Ok(Err(s)) => Err(s.message().to_string()),
    }
}

/// The leader's loop (see the module doc). Logs what holds the cluster back once per
/// change of reason, not on every poll.
pub async fn upgrade_loop(
    shared: Arc<Shared>,
    proposer: Proposer,
    node_id: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut said = String::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let cluster = shared.cluster_format.load(Ordering::Acquire);
        if cluster >= FORMAT || !proposer.is_leader() {
            continue;
        }
        let members: Vec<(u64, String)> = {
            let m = proposer.raft().metrics().borrow().clone();
            m.membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != node_id)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        };
        let mut behind = None;
        for (id, addr) in &members {
            match member_format(proposer.network(), addr).await {
                Ok(f) if f.format >= FORMAT => {}
                Ok(f) => {
                    behind = Some(format!(
                        "node {id} at {addr} runs release {} (log format {}): the cluster stays at format {cluster} until it is upgraded",
                        f.release, f.format
                    ));
                    break;
                }
                Err(e) => {
                    behind = Some(format!(
                        "node {id} at {addr} did not say its release ({e}): the cluster stays at format {cluster} until every member answers"
                    ));
                    break;
                }
            }
        }
        match behind {
            Some(reason) => {
                if reason != said {
                    tracing::info!("{reason}");
                    said = reason;
                }
            }
            None => match proposer
                .propose_here(Command::SetClusterFormat { format: FORMAT })
                .await
            {
                Ok(_) => tracing::info!(
                    from = cluster,
                    to = FORMAT,
                    "every registry node runs log format {FORMAT}: the cluster moved to it; a node of an older release can no longer join"
                ),
                Err(e) => tracing::warn!("cannot raise the cluster's log format yet: {e}"),
            },
        }
    }
}
