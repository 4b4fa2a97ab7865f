//! `switchyard.v1.Identity`: leaves from the mesh CA for callers allowed to register the
//! service, and the trust bundle.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::identity_server::Identity;

use crate::auth;
use crate::catalog::{Command, Reply};
use crate::identity::{new_root, no_ca, sign, MeshSettings};
use crate::model::acl::Right;
use crate::raft::propose::Proposer;
use crate::rollout::now_ms;
use crate::shared::Shared;

pub struct IdentityApi {
    shared: Arc<Shared>,
    settings: Arc<MeshSettings>,
    proposer: Proposer,
}

impl IdentityApi {
    pub fn new(shared: Arc<Shared>, settings: Arc<MeshSettings>, proposer: Proposer) -> Self {
        Self {
            shared,
            settings,
            proposer,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityApi {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let invalid = |e: crate::model::ValidationError| Status::invalid_argument(e.to_string());
        let namespace = crate::model::validate_namespace("namespace", &request.get_ref().namespace)
            .map_err(invalid)?;
        crate::model::validate_name("service", &request.get_ref().service).map_err(invalid)?;
        // Only who may register the service gets its identity.
        auth::check(
            &self.shared,
            request.metadata(),
            "Certify",
            Right::Register,
            &request.get_ref().service,
        )?;
        self.settings.admit()?;
        let (ca, signer) = {
            let catalog = self.shared.catalog.read();
            let now = now_ms();
            let ca = catalog.trusted_mesh_ca(now).ok_or_else(no_ca)?;
            let signer = ca
                .signing_at(catalog.mesh_root_activations(), now)
                .cloned()
                .ok_or_else(no_ca)?;
            (ca, signer)
        };
        let req = request.into_inner();
        // Signing takes a little CPU: off the async workers.
        let settings = self.settings.clone();
        let service = req.service.clone();
        let ns = namespace.clone();
        let leaf = tokio::task::spawn_blocking(move || {
            sign(&ca, &signer, &settings, &req.csr, &ns, &service).map(|l| (l, ca))
        })
        .await
        .map_err(|_| Status::internal("signing task failed"))??;
        let (leaf, ca) = leaf;
        let valid_until = leaf
            .not_after
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        tracing::debug!(namespace = %namespace, service = %req.service, "issued a mesh leaf");
        Ok(Response::new(pb::CertifyResponse {
            leaf: leaf.cert_pem,
            chain: ca.bundle_pem(),
            valid_until,
            spiffe_id: switchyard_tls::mesh_ca::spiffe_id(
                &ca.trust_domain,
                &namespace,
                &req.service,
            ),
        }))
    }

    async fn roots(
        &self,
        request: Request<pb::RootsRequest>,
    ) -> Result<Response<pb::RootsResponse>, Status> {
        // The bundle is public information, but after bootstrap only token holders read it.
        let caller = auth::caller(&self.shared, request.metadata())?;
        if matches!(caller, auth::Caller::Anonymous(_)) {
            return Err(auth::denied(
                &self.shared,
                &caller,
                "Roots",
                Right::Read,
                "*",
            ));
        }
        let (ca, retire, activate) = {
            let catalog = self.shared.catalog.read();
            let ca = catalog.trusted_mesh_ca(now_ms()).ok_or_else(no_ca)?;
            (
                ca,
                catalog.mesh_root_retirements().clone(),
                catalog.mesh_root_activations().clone(),
            )
        };
        let active = ca
            .signing_at(&activate, now_ms())
            .map(|r| r.id.clone())
            .unwrap_or_default();
        Ok(Response::new(pb::RootsResponse {
            trust_domain: ca.trust_domain.clone(),
            bundle: ca.bundle_pem(),
            roots: ca
                .roots
                .iter()
                .map(|r| pb::CaRootInfo {
                    id: r.id.clone(),
                    cert_pem: r.cert_pem.clone(),
                    created_ms: r.created_ms,
                    active: r.id == active,
                    retire_at_ms: retire.get(&r.id).copied().unwrap_or(0),
                    activate_at_ms: activate.get(&r.id).copied().unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn rotate_root(
        &self,
        request: Request<pb::RotateRootRequest>,
    ) -> Result<Response<pb::RotateRootResponse>, Status> {
        let r = async {
            auth::check(&self.shared, request.metadata(), "RotateRoot", Right::Ca, "")?;
            if self.settings.file_root.is_some() {
                return Err(Status::failed_precondition(
                    "the mesh CA's root comes from --mesh-ca-cert/--mesh-ca-key: rotate it by giving every node the new files",
                ));
            }
            if self.shared.catalog.read().mesh_ca().is_none() {
                return Err(no_ca());
            }
            let settings = self.settings.clone();
            let root = tokio::task::spawn_blocking(move || new_root(&settings))
                .await
                .map_err(|_| Status::internal("root task failed"))?
                .map_err(|e| {
                    tracing::error!(error = %e, "cannot make a mesh root");
                    Status::internal("the registry cannot make a mesh root; see its log")
                })?;
            let at_ms = now_ms();
            let lifetime = u64::try_from(self.settings.leaf_ttl.as_millis()).unwrap_or(u64::MAX);
            let propagation =
                u64::try_from(self.settings.root_propagation.as_millis()).unwrap_or(u64::MAX);
            let activate_at_ms = at_ms.saturating_add(propagation);
            let retire_at_ms = activate_at_ms.saturating_add(lifetime.saturating_mul(2));
            let root_id = root.id.clone();
            let reply = self
                .proposer
                .propose(Command::RotateMeshCa {
                    root: Box::new(root),
                    activate_at_ms,
                    retire_at_ms,
                    at_ms,
                })
                .await
                .map_err(super::status)?;
            let revision = match reply {
                Reply::Done { revision } => revision,
                _ => 0,
            };
            tracing::info!(root = %root_id, retire_at_ms, "the mesh CA has a new active root");
            Ok(pb::RotateRootResponse {
                root_id,
                retire_at_ms,
                revision,
                activate_at_ms,
            })
        }
        .await;
        self.shared
            .metrics
            .observe("RotateRoot", r)
            .map(Response::new)
    }
}
