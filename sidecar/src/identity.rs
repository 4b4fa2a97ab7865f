//! The sidecar's mesh identity: a key made in memory (never written, never sent), a leaf
//! for it from the registry's built-in CA (`Identity/Certify`, with the sidecar's token),
//! renewed at 70 % of its lifetime with jittered retries. While the registry cannot be
//! reached the current certificate stays in use until it expires.
//!
//! The trust bundle comes with each leaf and again in the watch stream whenever the
//! roots change: a root the watch adds is trusted from the next second on (the leaf's
//! own bundle is kept too, so a leaf signed by a root the watch has not shown yet still
//! verifies). A bundle that adds a root means the CA rotated: the new root signs only
//! after the registry's propagation window (10 s, so every peer trusts it before it
//! meets a leaf it signed), and the leaf is re-issued 11-15 s after the bundle arrived
//! (jittered, so a fleet does not ask at once).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tonic::transport::Endpoint;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::identity_client::IdentityClient;
use switchyard_tls::rcgen;

use crate::metrics::{Metrics, ReasonLabels};

/// Where and as whom the sidecar asks for its certificate.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    pub registries: Vec<String>,
    pub namespace: String,
    pub service: String,
    /// ACL token secret (`None`: none sent). Never logged.
    pub token: Option<String>,
    pub transport: switchyard_tls::Transport,
    /// Share of the lifetime after which the leaf is renewed.
    pub renew_at: f64,
    /// Retry back-off bounds when the registry refuses or cannot be reached.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// A leaf and what goes with it.
pub struct Issued {
    pub leaf_pem: String,
    /// The key of `leaf_pem`, PEM; only ever in memory.
    pub key_pem: String,
    /// The roots every peer's leaf is verified against.
    pub bundle_pem: String,
    pub spiffe_id: String,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The current identity, swapped whole on renewal (readers never lock).
#[derive(Default)]
pub struct MeshIdentity {
    current: ArcSwapOption<Issued>,
}

impl MeshIdentity {
    pub fn current(&self) -> Option<Arc<Issued>> {
        self.current.load_full()
    }

    /// Whether a leaf is held, without taking a reference to it.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Trusts the roots of a bundle the registry sent in the watch stream, beside the
    /// ones that came with the leaf. Swaps the identity only when that adds a root, and
    /// then returns true: the CA has a new root, so the leaf should be re-issued by it.
    pub fn adopt_bundle(&self, watched: &str) -> bool {
        let Some(issued) = self.current() else {
            return false;
        };
        let merged = merge_bundles(watched, &issued.bundle_pem);
        if merged == issued.bundle_pem {
            return false;
        }
        tracing::info!(identity = %issued.spiffe_id, "the mesh trust bundle changed; trusting its roots");
        self.current.store(Some(Arc::new(Issued {
            leaf_pem: issued.leaf_pem.clone(),
            key_pem: issued.key_pem.clone(),
            bundle_pem: merged,
            spiffe_id: issued.spiffe_id.clone(),
            issued_at: issued.issued_at,
            not_after: issued.not_after,
        })));
        true
    }

    /// Seconds until the current leaf expires (negative once it has).
    pub fn seconds_left(&self) -> Option<f64> {
        let issued = self.current.load();
        let issued = issued.as_ref()?;
        Some(match issued.not_after.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        })
    }
}

/// Whether `new` holds a certificate `last` lacks: the CA has a new root.
fn adds_root(new: &str, last: &str) -> bool {
    merge_bundles(new, last) != last
}

/// The certificates of `watched`, then those of `own` it lacks, PEM; the same text as
/// `own` when `watched` adds nothing.
fn merge_bundles(watched: &str, own: &str) -> String {
    const END: &str = "-----END CERTIFICATE-----";
    let blocks = |pem: &str| -> Vec<String> {
        pem.split_inclusive(END)
            .map(str::trim)
            .filter(|b| b.ends_with(END))
            .map(str::to_string)
            .collect()
    };
    let mine = blocks(own);
    let theirs = blocks(watched);
    if theirs.iter().all(|b| mine.contains(b)) {
        return own.to_string();
    }
    let mut out = String::new();
    for b in theirs
        .iter()
        .chain(mine.iter().filter(|b| !theirs.contains(b)))
    {
        out.push_str(b);
        out.push('\n');
    }
    out
}

/// When to renew a leaf valid from `issued_at` to `not_after`: at `renew_at` of its
/// lifetime, moved by up to ±5 % of it so a fleet issued together does not renew together.
fn renewal_delay(issued_at: SystemTime, not_after: SystemTime, renew_at: f64) -> Duration {
    let life = not_after
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    let jitter = (fastrand::f64() - 0.5) * 0.1;
    let at = (renew_at + jitter).clamp(0.1, 0.95) * life;
    let elapsed = SystemTime::now()
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    Duration::from_secs_f64((at - elapsed).max(0.0))
}

/// Asks each registry in turn for a leaf for a new key.
async fn request(cfg: &IdentityConfig) -> Result<Issued, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cfg.service.as_str());
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("cannot make a CSR: {e}"))?
        .der()
        .to_vec();
    let mut last = String::from("no registry configured");
    for url in &cfg.registries {
        let asked = async {
            cfg.transport.check(url).map_err(|e| e.0)?;
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5));
            let channel = cfg
                .transport
                .connect(endpoint)
                .await
                .map_err(|e| switchyard_tls::client::explain(&e))?;
            IdentityClient::new(channel)
                .certify(crate::authorized(
                    pb::CertifyRequest {
                        csr: csr.clone(),
                        namespace: cfg.namespace.clone(),
                        service: cfg.service.clone(),
                    },
                    cfg.token.as_deref(),
                ))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
        .await;
        match asked {
            Ok(r) => {
                return Ok(Issued {
                    leaf_pem: r.leaf,
                    key_pem: key.serialize_pem(),
                    bundle_pem: r.chain,
                    spiffe_id: r.spiffe_id,
                    issued_at: SystemTime::now(),
                    not_after: SystemTime::UNIX_EPOCH + Duration::from_millis(r.valid_until),
                })
            }
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(last)
}

/// Gets and renews the identity until `stop` is set.
pub async fn run(
    cfg: IdentityConfig,
    identity: Arc<MeshIdentity>,
    table: Arc<crate::table::EndpointTable>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = cfg.retry_min;
    let mut failures = 0u32;
    let mut next = Duration::ZERO;
    let mut gauge = tokio::time::interval(Duration::from_secs(1));
    // The watched bundle last looked at: only a new one (a rotation) is merged, so a
    // root that retired from the leaf's own bundle is not merged back every second.
    let mut seen_bundle: Option<Arc<String>> = None;
    gauge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = tokio::time::sleep(next);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                _ = gauge.tick() => {
                    let fresh = table
                        .trust_bundle()
                        .filter(|b| seen_bundle.as_ref().is_none_or(|s| !Arc::ptr_eq(s, b)));
                    if let Some(bundle) = fresh {
                        // A root the last watched bundle lacked is a rotation even when a
                        // renewal already brought it (the leaf came from the old root,
                        // which signs until the propagation window ends).
                        let rotated = seen_bundle
                            .replace(bundle.clone())
                            .is_some_and(|last| adds_root(&bundle, &last));
                        if identity.adopt_bundle(&bundle) || rotated {
                            metrics.trust_bundle_updates.inc();
                            // The registry's ROOT_PROPAGATION (10 s), then 1-5 s of jitter.
                            let soon = Duration::from_millis(11_000 + fastrand::u64(..4_000));
                            tracing::info!(renew_in = ?soon, "the mesh CA has a new root; re-issuing the leaf");
                            // Never later than the renewal already due.
                            let at = tokio::time::Instant::now() + soon;
                            if at < wake.deadline() {
                                wake.as_mut().reset(at);
                            }
                        }
                    }
                    if let Some(left) = identity.seconds_left() {
                        metrics.certificate_expiry.set(left);
                    }
                }
                _ = crate::stopped(&mut stop) => return,
            }
        }
        match request(&cfg).await {
            Ok(issued) => {
                metrics
                    .certificate_requests
                    .get_or_create(&ReasonLabels { reason: "ok" })
                    .inc();
                next = renewal_delay(issued.issued_at, issued.not_after, cfg.renew_at);
                tracing::info!(identity = %issued.spiffe_id, renew_in = ?next, "mesh certificate issued");
                identity.current.store(Some(Arc::new(issued)));
                if let Some(left) = identity.seconds_left() {
                    metrics.certificate_expiry.set(left);
                }
                backoff = cfg.retry_min;
                failures = 0;
            }
            Err(e) => {
                metrics
                    .certificate_requests
                    .get_or_create(&ReasonLabels { reason: "error" })
                    .inc();
                failures += 1;
                let left = identity.seconds_left();
                // The first failure and every tenth are worth a line; the rest are noise.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(error = %e, failures, seconds_left = ?left, "cannot get a mesh certificate; keeping the current one and retrying");
                }
                let jitter = 0.5 + fastrand::f64();
                next = backoff.mul_f64(jitter);
                backoff = (backoff * 2).min(cfg.retry_max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_bundle_adds_roots_and_keeps_the_leafs_own() {
        let a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        let b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(merge_bundles(a, a), a);
        let merged = merge_bundles(&format!("{a}{b}"), a);
        assert!(merged.contains("AAA") && merged.contains("BBB"));
        // A watch that has not shown the leaf's root yet does not drop it.
        let merged = merge_bundles(b, a);
        assert!(merged.contains("AAA") && merged.contains("BBB"));
        assert_eq!(merge_bundles("", a), a);
    }

    #[test]
    fn a_new_root_in_the_watch_is_a_rotation_even_if_a_renewal_brought_it() {
        let a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        let b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let both = format!("{a}{b}");
        assert!(adds_root(&both, a));
        // The same roots again, or one retired, is no rotation.
        assert!(!adds_root(a, a));
        assert!(!adds_root(b, &both));
    }

    #[test]
    fn renewal_comes_at_about_seventy_percent_of_the_lifetime() {
        let now = SystemTime::now();
        let end = now + Duration::from_secs(1000);
        for _ in 0..100 {
            let d = renewal_delay(now, end, 0.7).as_secs_f64();
            assert!((640.0..=760.0).contains(&d), "{d}");
        }
        // A leaf already past its renewal point renews at once.
        let old = now - Duration::from_secs(900);
        assert_eq!(
            renewal_delay(old, old + Duration::from_secs(1000), 0.7),
            Duration::ZERO
        );
    }
}
