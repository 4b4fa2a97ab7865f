//! Membership: with `--join`, a new node asks a running member to add it as a voter and
//! waits until the membership that names it is applied.

use std::time::Duration;

use tokio::sync::watch;

use super::alias::Raft;

/// With `--join`: asks the given node to add this one until it is a member (bounded:
/// 120 attempts, one a second).
pub async fn join_loop(
    join: Option<String>,
    node_id: u64,
    advertise: String,
    raft: Raft,
    network: super::network::Network,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(target) = join else {
        return;
    };
    for attempt in 1..=120u32 {
        let is_member = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == node_id);
        if is_member {
            tracing::info!(node_id, "joined the cluster as a voter");
            return;
        }
        let result = async {
            // Through the peer network: with TLS on, mutual TLS like every peer call.
            let mut client =
                switchyard_proto::v1::cluster_client::ClusterClient::new(network.channel(&target)?);
            client
                .add_member(switchyard_proto::v1::AddMemberRequest {
                    id: node_id,
                    address: advertise.clone(),
                })
                .await
                .map_err(|s| s.message().to_string())
        }
        .await;
        match result {
            Ok(_) => {
                tracing::info!(node_id, via = %target, "asked to join; waiting for the membership to apply")
            }
            Err(e) => tracing::warn!(node_id, via = %target, attempt, "cannot join yet: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
    tracing::error!(node_id, via = %target, "gave up joining after 120 attempts; restart with --join pointing at a running member");
}
