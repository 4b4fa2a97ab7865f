//! The mesh's built-in CA on a node: its settings, the first root (made by the first
//! leader that finds none, like the cluster id), and the signing of leaves.
//!
//! Where the root's key lives is the operator's choice: by default the registry makes
//! the root and keeps its key in the replicated state (every node can sign, a new node
//! gets it with the state); with `--mesh-ca-cert`/`--mesh-ca-key` the root comes from
//! files every node is given, and only its certificate enters the state.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tonic::Status;

use switchyard_tls::mesh_ca::{self, Leaf, Root};

use crate::catalog::Command;
use crate::model::mesh_ca::{CaRoot, MeshCa};
use crate::raft::propose::Proposer;
use crate::shared::Shared;

/// The default trust domain (the last labels of every leaf's DNS name).
pub const DEFAULT_TRUST_DOMAIN: &str = "switchyard.local";
/// How long a leaf is valid by default; sidecars renew at 70 %.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(72 * 3600);
/// Leaves this node signs per second at most (bursts of twice that): signing is cheap,
/// but a stranger with a token must not turn the registry into a signing oracle.
pub const DEFAULT_CSR_PER_SECOND: u32 = 50;
/// After a rotation the new root only joins the trust bundle for this long before it
/// signs (the sidecars' re-issue waits as long, plus jitter: keep the two in step).
pub const ROOT_PROPAGATION: Duration = Duration::from_secs(10);
/// A root the registry makes is valid this long.
const ROOT_DAYS: u32 = 10 * 365;

/// What a node knows of the mesh CA beyond the replicated state.
pub struct MeshSettings {
    pub trust_domain: String,
    pub leaf_ttl: Duration,
    /// The root from `--mesh-ca-cert`/`--mesh-ca-key`, when given.
    pub file_root: Option<Root>,
    /// How long a rotated-in root is trusted before it signs.
    pub root_propagation: Duration,
    limiter: Mutex<Bucket>,
}

impl MeshSettings {
    pub fn new(
        trust_domain: String,
        leaf_ttl: Duration,
        file_root: Option<Root>,
        per_second: u32,
        root_propagation: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            trust_domain,
            leaf_ttl,
            file_root,
            root_propagation,
            limiter: Mutex::new(Bucket::new(per_second)),
        })
    }

    /// Takes one signing slot, or says when to come back.
    pub fn admit(&self) -> Result<(), Status> {
        if self.limiter.lock().take(Instant::now()) {
            Ok(())
        } else {
            Err(Status::resource_exhausted(
                "this registry node is signing too many certificates at once; retry in a second",
            ))
        }
    }
}

/// A token bucket: `rate` per second, holding up to twice that.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: rate * 2.0,
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * 2.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A new root with its key (kept in the state), for the first CA or a rotation.
pub fn new_root(settings: &MeshSettings) -> Result<CaRoot, String> {
    let now = SystemTime::now();
    let root = mesh_ca::new_root(&settings.trust_domain, ROOT_DAYS, now).map_err(|e| e.0)?;
    Ok(CaRoot {
        id: format!("{:016x}", fastrand::u64(..)),
        cert_pem: root.cert_pem,
        key_pem: Some(root.key_pem),
        created_ms: now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    })
}

/// The first root: from the files when given, else a new one with its key.
fn first_ca(settings: &MeshSettings, now: SystemTime) -> Result<MeshCa, String> {
    let created_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (cert_pem, key_pem) = match &settings.file_root {
        Some(root) => (root.cert_pem.clone(), None),
        None => {
            let root =
                mesh_ca::new_root(&settings.trust_domain, ROOT_DAYS, now).map_err(|e| e.0)?;
            (root.cert_pem, Some(root.key_pem))
        }
    };
    Ok(MeshCa {
        trust_domain: settings.trust_domain.clone(),
        roots: vec![CaRoot {
            id: format!("{:016x}", fastrand::u64(..)),
            cert_pem,
            key_pem,
            created_ms,
        }],
    })
}

/// Commits the mesh CA when the state has none. Bounded like the cluster id: a leader
/// that loses its term stops, and the next one tries again.
pub async fn make_first_root(shared: Arc<Shared>, proposer: Proposer, settings: Arc<MeshSettings>) {
    let ca = match first_ca(&settings, SystemTime::now()) {
        Ok(ca) => ca,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the mesh CA; sidecars get no certificates until a leader can");
            return;
        }
    };
    for _ in 0..20 {
        if shared.catalog.read().mesh_ca().is_some() || !proposer.is_leader() {
            return;
        }
        let command = Command::InitMeshCa {
            ca: Box::new(ca.clone()),
        };
        match proposer.propose_here(command).await {
            Ok(_) => {
                tracing::info!(trust_domain = %settings.trust_domain, key_in_state = settings.file_root.is_none(), "the mesh CA has its root");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "mesh CA not committed yet; trying again"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Signs the leaf of `service` for the key in `csr` with `active`, a root of `ca`.
pub fn sign(
    ca: &MeshCa,
    active: &CaRoot,
    settings: &MeshSettings,
    csr: &[u8],
    namespace: &str,
    service: &str,
) -> Result<Leaf, Status> {
    let root = match (&active.key_pem, &settings.file_root) {
        (Some(key), _) => Root {
            cert_pem: active.cert_pem.clone(),
            key_pem: key.clone(),
        },
        (None, Some(file)) if file.cert_pem.trim() == active.cert_pem.trim() => file.clone(),
        (None, _) => {
            return Err(Status::failed_precondition(
                "this registry node does not hold the mesh CA's key: start it with the same --mesh-ca-cert and --mesh-ca-key as the other nodes",
            ))
        }
    };
    mesh_ca::certify(
        &root,
        csr,
        &ca.trust_domain,
        namespace,
        service,
        settings.leaf_ttl,
        SystemTime::now(),
    )
    .map_err(|e| {
        if e.0.starts_with("csr ") {
            Status::invalid_argument(e.0)
        } else {
            tracing::error!(error = %e, "cannot sign a leaf with the mesh CA");
            Status::internal("the registry cannot sign with its mesh CA; see its log")
        }
    })
}

pub fn no_ca() -> Status {
    Status::unavailable("the mesh CA has no root yet (the leader makes it); retry in a moment")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_admits_a_burst_then_the_rate() {
        let mut b = Bucket::new(10);
        let t0 = b.at;
        let burst = (0..100).filter(|_| b.take(t0)).count();
        assert_eq!(burst, 20, "twice the rate at once");
        assert!(!b.take(t0));
        assert!(
            b.take(t0 + Duration::from_millis(150)),
            "one more after 0.1 s"
        );
    }
}
