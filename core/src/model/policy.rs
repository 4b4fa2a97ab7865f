//! Routing policies: subsets of a service's instances, ordered header routes, a default
//! split, and what to do when a subset has no healthy endpoint. Validated at the edge so
//! a bad policy never reaches the log, let alone a sidecar.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::resilience::{validate_resilience, Resilience};
use super::validate::{validate_version, ValidationError};
use crate::select::{compile_regex, same_name};

pub const MAX_SUBSETS: usize = 32;
pub const MAX_ROUTES: usize = 32;
pub const MAX_HEADER_MATCHES: usize = 8;
pub const MAX_SPLIT: usize = 16;
pub const MAX_SPLIT_WEIGHT: u32 = 10_000;
pub const MAX_PATTERN_LEN: usize = 256;
/// Changes kept per service for history and rollback.
pub const MAX_POLICY_HISTORY: usize = 50;
/// Largest encoded policy accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subset {
    pub name: String,
    pub version: String,
    pub version_range: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatchKind {
    Exact(String),
    Prefix(String),
    Regex(String),
    Present,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    pub name: String,
    pub kind: MatchKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub subset: String,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub name: String,
    pub headers: Vec<HeaderMatch>,
    pub split: Vec<Split>,
    pub sticky_header: String,
    /// What this route matches is safe to repeat whatever its method: retried on the
    /// conditions that otherwise retry only idempotent requests.
    #[serde(default)]
    pub retryable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fallback {
    /// Spread a subset's share over the subsets that have healthy endpoints.
    Default,
    /// Answer 503 when the chosen subset has no healthy endpoint.
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub subsets: Vec<Subset>,
    pub routes: Vec<Route>,
    pub default_split: Vec<Split>,
    pub fallback: Fallback,
    pub sticky_header: String,
    /// Timeouts, retries, limits and ejection for the service (unset fields: the
    /// sidecar's defaults).
    #[serde(default)]
    pub resilience: Resilience,
}

/// One recorded change of a service's policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub revision: u64,
    pub at_ms: u64,
    /// `None`: this change cleared the policy.
    pub policy: Option<std::sync::Arc<Policy>>,
    pub reason: String,
}

/// Subset names are DNS labels (`<subset>.<service>.service.<domain>` names them), so
/// the same rule as service names: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
fn subset_name_ok(s: &str) -> bool {
    super::validate::validate_name("", s).is_ok()
}

fn header_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

fn value_ok(field: &str, v: &str) -> Result<(), ValidationError> {
    if v.len() > MAX_PATTERN_LEN {
        return Err(ValidationError::new(
            field,
            format!("longer than {MAX_PATTERN_LEN} bytes"),
        ));
    }
    if v.bytes().any(|b| b.is_ascii_control()) {
        return Err(ValidationError::new(field, "contains control characters"));
    }
    Ok(())
}

fn validate_split(
    field: &str,
    split: &[Split],
    known: &dyn Fn(&str) -> bool,
) -> Result<(), ValidationError> {
    if split.len() > MAX_SPLIT {
        return Err(ValidationError::new(
            field,
            format!("{} entries, at most {MAX_SPLIT}", split.len()),
        ));
    }
    let mut total = 0u32;
    let mut seen = BTreeSet::new();
    for (i, s) in split.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if !seen.insert(s.subset.as_str()) {
            return Err(ValidationError::new(
                format!("{f}.subset"),
                format!("{:?} appears twice", s.subset),
            ));
        }
        if !known(&s.subset) {
            return Err(ValidationError::new(
                format!("{f}.subset"),
                format!("unknown subset {:?}: declare it in subsets, or name a version some instance of the service has", s.subset),
            ));
        }
        if s.weight > MAX_SPLIT_WEIGHT {
            return Err(ValidationError::new(
                format!("{f}.weight"),
                format!("{} is above {MAX_SPLIT_WEIGHT}", s.weight),
            ));
        }
        total += s.weight;
    }
    if !split.is_empty() && total == 0 {
        return Err(ValidationError::new(
            field,
            "weights add up to zero: give at least one subset a weight",
        ));
    }
    Ok(())
}

/// Checks a policy. `versions` are the versions the service's instances have now: a
/// split or route may name one of them instead of a declared subset.
pub fn validate_policy(p: &Policy, versions: &BTreeSet<String>) -> Result<(), ValidationError> {
    if p.subsets.len() > MAX_SUBSETS {
        return Err(ValidationError::new(
            "policy.subsets",
            format!("{} subsets, at most {MAX_SUBSETS}", p.subsets.len()),
        ));
    }
    let mut names = BTreeSet::<String>::new();
    for (i, s) in p.subsets.iter().enumerate() {
        let f = format!("policy.subsets[{i}]");
        if !subset_name_ok(&s.name) {
            return Err(ValidationError::new(
                format!("{f}.name"),
                format!(
                    "{:?} is not a subset name: a DNS label, 1-63 of a-z 0-9 - (not at either end)",
                    s.name
                ),
            ));
        }
        if !names.insert(s.name.to_ascii_lowercase()) {
            return Err(ValidationError::new(
                format!("{f}.name"),
                format!("{:?} is declared twice", s.name),
            ));
        }
        if s.version.is_empty() && s.version_range.is_empty() && s.labels.is_empty() {
            return Err(ValidationError::new(
                f,
                "selects nothing: give a version, a version_range or labels",
            ));
        }
        if !s.version.is_empty() {
            validate_version(&format!("{f}.version"), &s.version)?;
        }
        if !s.version_range.is_empty() {
            value_ok(&format!("{f}.version_range"), &s.version_range)?;
            semver::VersionReq::parse(&s.version_range).map_err(|e| {
                ValidationError::new(
                    format!("{f}.version_range"),
                    format!("{:?} is not a semver range: {e}", s.version_range),
                )
            })?;
        }
        if s.labels.len() > 16 {
            return Err(ValidationError::new(
                format!("{f}.labels"),
                "at most 16 labels",
            ));
        }
        for (k, v) in &s.labels {
            value_ok(&format!("{f}.labels[{k}]"), k)?;
            value_ok(&format!("{f}.labels[{k}]"), v)?;
        }
    }
    // Names follow the one rule of `select`: ASCII case-insensitive.
    let known = |name: &str| {
        names.iter().any(|n| same_name(n, name)) || versions.iter().any(|v| same_name(v, name))
    };
    if p.routes.len() > MAX_ROUTES {
        return Err(ValidationError::new(
            "policy.routes",
            format!("{} routes, at most {MAX_ROUTES}", p.routes.len()),
        ));
    }
    for (i, r) in p.routes.iter().enumerate() {
        let f = format!("policy.routes[{i}]");
        value_ok(&format!("{f}.name"), &r.name)?;
        if r.headers.is_empty() {
            return Err(ValidationError::new(
                format!("{f}.headers"),
                "a route needs at least one header match (the default split covers the rest)",
            ));
        }
        if r.headers.len() > MAX_HEADER_MATCHES {
            return Err(ValidationError::new(
                format!("{f}.headers"),
                format!("at most {MAX_HEADER_MATCHES} matches"),
            ));
        }
        for (j, h) in r.headers.iter().enumerate() {
            let hf = format!("{f}.headers[{j}]");
            if !header_name_ok(&h.name) {
                return Err(ValidationError::new(
                    format!("{hf}.name"),
                    format!("{:?} is not a lower-case header name", h.name),
                ));
            }
            match &h.kind {
                MatchKind::Exact(v) | MatchKind::Prefix(v) => value_ok(&format!("{hf}.value"), v)?,
                MatchKind::Regex(v) => {
                    value_ok(&format!("{hf}.regex"), v)?;
                    compile_regex(v).map_err(|e| {
                        ValidationError::new(format!("{hf}.regex"), format!("bad regex: {e}"))
                    })?;
                }
                MatchKind::Present => {}
            }
        }
        if r.split.is_empty() {
            return Err(ValidationError::new(
                format!("{f}.split"),
                "a route needs a split",
            ));
        }
        validate_split(&format!("{f}.split"), &r.split, &known)?;
        if !r.sticky_header.is_empty() && !header_name_ok(&r.sticky_header) {
            return Err(ValidationError::new(
                format!("{f}.sticky_header"),
                "not a lower-case header name",
            ));
        }
    }
    validate_split("policy.default_split", &p.default_split, &known)?;
    if !p.sticky_header.is_empty() && !header_name_ok(&p.sticky_header) {
        return Err(ValidationError::new(
            "policy.sticky_header",
            "not a lower-case header name",
        ));
    }
    validate_resilience(&p.resilience)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Policy {
        Policy {
            subsets: vec![
                Subset {
                    name: "stable".into(),
                    version: "1.4.2".into(),
                    version_range: String::new(),
                    labels: BTreeMap::new(),
                },
                Subset {
                    name: "canary".into(),
                    version: String::new(),
                    version_range: "^1.5".into(),
                    labels: BTreeMap::new(),
                },
            ],
            routes: vec![Route {
                name: "testers".into(),
                headers: vec![HeaderMatch {
                    name: "x-canary".into(),
                    kind: MatchKind::Exact("true".into()),
                }],
                split: vec![Split {
                    subset: "canary".into(),
                    weight: 100,
                }],
                sticky_header: String::new(),
                retryable: false,
            }],
            default_split: vec![
                Split {
                    subset: "stable".into(),
                    weight: 90,
                },
                Split {
                    subset: "canary".into(),
                    weight: 10,
                },
            ],
            fallback: Fallback::Default,
            sticky_header: String::new(),
            resilience: Default::default(),
        }
    }

    fn field(p: &Policy) -> String {
        validate_policy(p, &BTreeSet::from(["2.0.0".to_string()]))
            .expect_err("refused")
            .field
    }

    #[test]
    fn a_good_policy_passes_and_versions_stand_in_for_subsets() {
        let versions = BTreeSet::from(["2.0.0".to_string()]);
        assert!(validate_policy(&base(), &versions).is_ok());
        let mut p = base();
        p.default_split.push(Split {
            subset: "2.0.0".into(),
            weight: 1,
        });
        assert!(validate_policy(&p, &versions).is_ok());
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut p = base();
        p.default_split[0].subset = "stabel".into();
        assert_eq!(field(&p), "policy.default_split[0].subset");
        let mut p = base();
        p.default_split.iter_mut().for_each(|s| s.weight = 0);
        assert_eq!(field(&p), "policy.default_split");
        let mut p = base();
        p.routes[0].headers[0].kind = MatchKind::Regex("(unclosed".into());
        assert_eq!(field(&p), "policy.routes[0].headers[0].regex");
        let mut p = base();
        p.subsets[1].version_range = "not a range".into();
        assert_eq!(field(&p), "policy.subsets[1].version_range");
        let mut p = base();
        p.subsets[1].name = "stable".into();
        assert_eq!(field(&p), "policy.subsets[1].name");
        // Subset names are DNS labels: DNS names them.
        for bad in ["can.ary", "Canary", "canary_1", "-canary"] {
            let mut p = base();
            p.subsets[1].name = bad.into();
            assert_eq!(field(&p), "policy.subsets[1].name", "{bad}");
        }
        let mut p = base();
        p.routes[0].headers[0].name = "X-Canary".into();
        assert_eq!(field(&p), "policy.routes[0].headers[0].name");
        let mut p = base();
        p.routes = (0..33).map(|_| base().routes[0].clone()).collect();
        assert_eq!(field(&p), "policy.routes");
        let mut p = base();
        p.default_split[0].weight = 10_001;
        assert_eq!(field(&p), "policy.default_split[0].weight");
        let mut p = base();
        p.routes[0].split.clear();
        assert_eq!(field(&p), "policy.routes[0].split");
    }
}
