//! `switchyard.v1.Telemetry`: sidecars' per-version windows in, per-version totals out.
//! The rules and the ring live in [`crate::telemetry`]; this maps them to gRPC.
//!
//! Served twice. On the client port ([`TelemetryApi::client`]) a follower files a window
//! locally and forwards it to the leader ([`crate::telemetry_forward`]), and answers
//! `Top` with the leader's (cluster-wide) view, falling back to its own when the leader
//! cannot be asked. On the peer port ([`TelemetryApi::peer`]) windows are forwarded
//! ones: filed, never forwarded again, and a refused one is skipped rather than ending
//! the long-lived stream; `Top` there answers from this node's store only.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::telemetry_server::Telemetry;

use crate::model::{validate_name, validate_namespace};
use crate::raft::propose::Proposer;
use crate::shared::Shared;
use crate::telemetry::{ReportError, MAX_REPORT_BYTES, RING_SECONDS};
use crate::telemetry_forward::Forwarder;

/// How long a follower's `Top` waits for the leader's before answering its own.
const TOP_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

pub struct TelemetryApi {
    shared: Arc<Shared>,
    /// `None` on the peer port: windows there were forwarded already.
    cluster: Option<(Proposer, Forwarder)>,
}

impl TelemetryApi {
    /// The client port's: forwards windows and `Top` to the leader.
    pub fn client(shared: Arc<Shared>, proposer: Proposer, forwarder: Forwarder) -> Self {
        Self {
            shared,
            cluster: Some((proposer, forwarder)),
        }
    }

    /// The peer port's: takes forwarded windows, answers from this node alone.
    pub fn peer(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            cluster: None,
        }
    }

    /// The leader's `Top`, when this node follows a known leader and it answers.
    async fn leader_top(&self, req: &pb::TopRequest) -> Option<pb::TopResponse> {
        let (proposer, _) = self.cluster.as_ref()?;
        if proposer.is_leader() {
            return None;
        }
        let (_, addr) = proposer.leader()?;
        let asked = async {
            let channel = proposer.network().channel(&addr)?;
            let mut client = switchyard_proto::v1::telemetry_client::TelemetryClient::new(channel)
                .max_decoding_message_size(MAX_REPORT_BYTES * 4);
            client
                .top(req.clone())
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("{}: {}", s.code(), s.message()))
        };
        match tokio::time::timeout(TOP_FORWARD_TIMEOUT, asked).await {
            Ok(Ok(top)) => Some(top),
            Ok(Err(e)) => {
                tracing::debug!(leader = %addr, error = %e, "the leader's Top failed; answering from this node's reports");
                None
            }
            Err(_) => {
                tracing::debug!(leader = %addr, "no Top from the leader within {TOP_FORWARD_TIMEOUT:?}; answering from this node's reports");
                None
            }
        }
    }
}

fn status(e: ReportError) -> Status {
    match e {
        ReportError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        ReportError::Full { .. } => Status::resource_exhausted(e.to_string()),
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryApi {
    async fn report(
        &self,
        request: Request<Streaming<pb::WindowReport>>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        // Evidence judges rollouts: after bootstrap only a token may report (the peer
        // port takes what a node already checked).
        if self.cluster.is_some() {
            if let crate::auth::Caller::Anonymous(_) =
                crate::auth::caller(&self.shared, request.metadata())?
            {
                self.shared.metrics.acl_denied("Report");
                return Err(Status::permission_denied(
                    "reports need a token after ACL bootstrap: give the sidecar --token or --token-file",
                ));
            }
        }
        let mut stream = request.into_inner();
        let mut accepted = 0u64;
        let store = &self.shared.telemetry;
        let mut shutdown = self.shared.shutdown.clone();
        let result = async {
            loop {
                // A forwarded stream lives as long as its follower's: end it (answered)
                // when this node stops, not after the servers' grace period.
                let next = tokio::select! {
                    next = stream.next() => next,
                    _ = shutdown.wait_for(|s| *s) => None,
                };
                let Some(report) = next else { break };
                let report = report?;
                let recorded = store.record(&report, store.now_ms(), &self.shared.metrics);
                match (recorded, &self.cluster) {
                    (Ok(()), Some((proposer, forwarder))) => {
                        if !proposer.is_leader() {
                            forwarder.offer(report);
                        }
                    }
                    (Ok(()), None) => {}
                    (Err(e), cluster) => {
                        tracing::debug!(sidecar = %report.sidecar_id.chars().take(128).collect::<String>(), forwarded = cluster.is_none(), error = %e, "telemetry report refused");
                        if cluster.is_some() {
                            return Err(status(e));
                        }
                        // Forwarded: the follower accepted it; skip it (counted by
                        // `record`) and keep the stream.
                        continue;
                    }
                }
                accepted += 1;
            }
            Ok(pb::ReportAck { accepted })
        }
        .await;
        self.shared
            .metrics
            .observe("Telemetry/Report", result)
            .map(Response::new)
    }

    async fn top(
        &self,
        request: Request<pb::TopRequest>,
    ) -> Result<Response<pb::TopResponse>, Status> {
        let req = request.into_inner();
        if let Some(top) = self.leader_top(&req).await {
            return self
                .shared
                .metrics
                .observe("Telemetry/Top", Ok(top))
                .map(Response::new);
        }
        let result = (|| {
            let namespace = validate_namespace("namespace", &req.namespace)?;
            if !req.service.is_empty() {
                validate_name("service", &req.service)?;
            }
            if req.window_seconds > RING_SECONDS {
                return Err(Status::invalid_argument(format!(
                    "invalid window_seconds: {} is more than the {RING_SECONDS} s the registry keeps",
                    req.window_seconds
                )));
            }
            let store = &self.shared.telemetry;
            let service = (!req.service.is_empty()).then_some(req.service.as_str());
            let (window_seconds, versions) =
                store.top(&namespace, service, req.window_seconds, store.now_ms());
            Ok(pb::TopResponse {
                window_seconds,
                versions,
            })
        })();
        self.shared
            .metrics
            .observe("Telemetry/Top", result)
            .map(Response::new)
    }
}
