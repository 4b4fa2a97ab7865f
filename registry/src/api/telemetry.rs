//! `switchyard.v1.Telemetry`: sidecars' per-version windows in, per-version totals out.
//! The rules and the ring live in [`crate::telemetry`]; this maps them to gRPC.

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::telemetry_server::Telemetry;

use crate::model::{validate_name, validate_namespace};
use crate::shared::Shared;
use crate::telemetry::{ReportError, RING_SECONDS};

pub struct TelemetryApi {
    shared: Arc<Shared>,
}

impl TelemetryApi {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
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
        let mut stream = request.into_inner();
        let mut accepted = 0u64;
        let store = &self.shared.telemetry;
        let result = async {
            while let Some(report) = stream.next().await {
                let report = report?;
                store
                    .record(&report, store.now_ms(), &self.shared.metrics)
                    .map_err(|e| {
                        tracing::debug!(sidecar = %report.sidecar_id.chars().take(128).collect::<String>(), error = %e, "telemetry report refused");
                        status(e)
                    })?;
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
