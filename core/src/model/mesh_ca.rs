//! The mesh's built-in CA as the replicated state holds it: the trust domain and the
//! roots, newest last. A root's key is in the state when the registry
//! made it; with `--mesh-ca-key` it stays in each node's file and the state holds only
//! the certificate.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshCa {
    pub trust_domain: String,
    /// Oldest first. Which one signs is [`MeshCa::signing_at`] (a rotated-in root only
    /// after its activation); which are trusted, [`MeshCa::trusted_at`].
    pub roots: Vec<CaRoot>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRoot {
    pub id: String,
    pub cert_pem: String,
    /// `None`: the key is in each node's `--mesh-ca-key` file.
    pub key_pem: Option<String>,
    pub created_ms: u64,
}

impl std::fmt::Debug for CaRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CaRoot")
            .field("id", &self.id)
            .field("created_ms", &self.created_ms)
            .field("key_in_state", &self.key_pem.is_some())
            .finish()
    }
}

impl MeshCa {
    /// The newest root: the one the last rotation brought in (it signs from its
    /// activation on, see [`MeshCa::signing_at`]), never retired.
    pub fn newest(&self) -> Option<&CaRoot> {
        self.roots.last()
    }

    /// Every trusted root, PEM, concatenated: what sidecars verify peers against.
    pub fn bundle_pem(&self) -> String {
        self.roots.iter().map(|r| r.cert_pem.as_str()).collect()
    }

    /// The root that signs at `now_ms`: the newest whose activation (`activate`, root id
    /// -> Unix ms; none: at once) has come. A root rotated in is trusted first and signs
    /// only from then on.
    pub fn signing_at(
        &self,
        activate: &std::collections::BTreeMap<String, u64>,
        now_ms: u64,
    ) -> Option<&CaRoot> {
        self.roots
            .iter()
            .rev()
            .find(|r| activate.get(&r.id).is_none_or(|&t| t <= now_ms))
            .or_else(|| self.roots.first())
    }

    /// This CA without the roots `retire` (root id -> Unix ms) retired by `now_ms`; the
    /// newest root is never retired.
    pub fn trusted_at(
        &self,
        retire: &std::collections::BTreeMap<String, u64>,
        now_ms: u64,
    ) -> MeshCa {
        let newest = self.newest().map(|r| r.id.clone());
        MeshCa {
            trust_domain: self.trust_domain.clone(),
            roots: self
                .roots
                .iter()
                .filter(|r| {
                    Some(&r.id) == newest.as_ref() || retire.get(&r.id).is_none_or(|&t| t > now_ms)
                })
                .cloned()
                .collect(),
        }
    }
}

/// Roots trusted at once at most: the newest and those still in their retirement
/// window. A rotation past it is refused until the oldest retires.
pub const MAX_MESH_ROOTS: usize = 4;

/// A trust domain is a DNS name (lowercase letters, digits, `-` and dots), at most 253
/// bytes: it ends every leaf's DNS name and starts its SPIFFE id.
pub fn validate_trust_domain(domain: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if domain.len() <= 253 && domain.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "trust domain {domain:?} is not a lowercase DNS name (like `switchyard.local`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains_are_dns_names() {
        assert!(validate_trust_domain("switchyard.local").is_ok());
        assert!(validate_trust_domain("a-b.c1").is_ok());
        for bad in [
            "",
            "UPPER.case",
            "a..b",
            "-a.b",
            "a b",
            "x/y",
            &"a".repeat(64),
        ] {
            assert!(validate_trust_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_debug_form_never_shows_a_key() {
        let root = CaRoot {
            id: "r1".into(),
            cert_pem: "cert".into(),
            key_pem: Some("SECRET KEY".into()),
            created_ms: 1,
        };
        assert!(!format!("{root:?}").contains("SECRET"));
    }
}
