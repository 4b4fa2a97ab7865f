//! Subset selection, written once: which instances a subset name selects, how a weighted
//! split draws a subset, and the sticky hash. DNS answers, the sidecar's proxy and any
//! later client (the Consul view) call this module, so they cannot disagree.
//!
//! A [`Selection`] is compiled from a [`Policy`] once per change (semver ranges parsed,
//! split entries resolved to subset indices, names used in a split but declared nowhere
//! turned into implicit version subsets); asking it costs no parsing.
//!
//! **The one rule for names**: subset names and version tags compare ASCII
//! case-insensitively, everywhere. DNS names are case-insensitive (RFC 4343), so
//! `Canary.web.service.switchyard` must select what a split naming `canary` selects, and
//! the proxy follows the same rule so the two never pick from different subsets.

use crate::model::policy::{Fallback, HeaderMatch, Policy, Subset};
use crate::model::{Instance, Labels};

/// Compiled size limits for header regexes: the same numbers the registry validates with
/// and the sidecar compiles with.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// True when two subset or version names are the same name (ASCII case-insensitive).
pub fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The only regex builder: header matches are compiled with bounded program and DFA
/// sizes, so a pattern cannot make a sidecar allocate without limit.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

/// What selects the instances of one subset.
#[derive(Clone, Debug)]
pub struct Selector {
    /// Exact version tag (by [`same_name`]), if any.
    version: Option<String>,
    /// Semver range, parsed once.
    range: Option<semver::VersionReq>,
    labels: Vec<(String, String)>,
    /// A declared subset whose range does not parse selects nothing (the registry
    /// refuses such policies; this guards against a build that parses differently).
    nothing: bool,
}

impl Selector {
    /// A declared subset's selector.
    pub fn of_subset(s: &Subset) -> Self {
        let (range, nothing) = if s.version_range.is_empty() {
            (None, false)
        } else {
            match semver::VersionReq::parse(&s.version_range) {
                Ok(r) => (Some(r), false),
                Err(e) => {
                    tracing::warn!(subset = %s.name, error = %e, "bad version range; the subset selects nothing");
                    (None, true)
                }
            }
        };
        Self {
            version: (!s.version.is_empty()).then(|| s.version.clone()),
            range,
            labels: s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            nothing,
        }
    }

    /// The implicit subset of a name that is no declared subset: that version tag.
    pub fn of_version(version: &str) -> Self {
        Self {
            version: Some(version.to_string()),
            range: None,
            labels: Vec::new(),
            nothing: false,
        }
    }

    /// Whether an instance with this version and these labels belongs to the subset.
    pub fn selects(&self, version: &str, labels: &Labels) -> bool {
        !self.nothing
            && self
                .version
                .as_deref()
                .is_none_or(|v| same_name(v, version))
            && self.range.as_ref().is_none_or(|r| {
                semver::Version::parse(version).is_ok_and(|parsed| r.matches(&parsed))
            })
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    pub fn selects_instance(&self, i: &Instance) -> bool {
        self.selects(&i.version, &i.labels)
    }
}

/// A subset of a compiled policy.
#[derive(Clone, Debug)]
pub struct NamedSubset {
    pub name: String,
    pub selector: Selector,
    /// Declared in the policy's subsets (false: a version named in a split).
    pub declared: bool,
}

/// Shares of traffic over subsets: `(index into Selection::subsets, weight > 0)`.
#[derive(Clone, Debug, Default)]
pub struct SplitRule {
    pub entries: Vec<(usize, u32)>,
    /// Header whose value's hash picks the subset (lower-case name), if any.
    pub sticky: Option<String>,
}

/// A header route: every match must hold, then its split decides.
#[derive(Clone, Debug)]
pub struct RouteRule {
    pub name: String,
    pub headers: Vec<HeaderMatch>,
    pub split: SplitRule,
    /// The policy marks the route's requests safe to repeat (the proxy retries them).
    pub retryable: bool,
}

/// A policy compiled for selection.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub subsets: Vec<NamedSubset>,
    pub routes: Vec<RouteRule>,
    pub default: SplitRule,
    /// `fallback = fail`: a drawn subset with no healthy endpoint fails the request
    /// instead of giving its share to the others.
    pub fail_closed: bool,
}

impl Selection {
    pub fn compile(policy: &Policy) -> Self {
        let mut subsets: Vec<NamedSubset> = policy
            .subsets
            .iter()
            .map(|s| NamedSubset {
                name: s.name.clone(),
                selector: Selector::of_subset(s),
                declared: true,
            })
            .collect();
        let mut split = |entries: &[crate::model::policy::Split], sticky: &str| SplitRule {
            entries: entries
                .iter()
                .filter(|w| w.weight > 0)
                .map(|w| (index_or_implicit(&mut subsets, &w.subset), w.weight))
                .collect(),
            sticky: (!sticky.is_empty()).then(|| sticky.to_ascii_lowercase()),
        };
        let routes = policy
            .routes
            .iter()
            .map(|r| RouteRule {
                name: r.name.clone(),
                headers: r.headers.clone(),
                split: split(&r.split, &r.sticky_header),
                retryable: r.retryable,
            })
            .collect();
        let default = split(&policy.default_split, &policy.sticky_header);
        Self {
            subsets,
            routes,
            default,
            fail_closed: policy.fallback == Fallback::Fail,
        }
    }

    /// The subset of that name (declared or implicit), by [`same_name`].
    pub fn find(&self, name: &str) -> Option<usize> {
        self.subsets.iter().position(|s| same_name(&s.name, name))
    }

    /// What a name selects when it is asked for directly (a DNS label, a pinned subset):
    /// the subset of that name, or else the version tag.
    pub fn selector_for(&self, name: &str) -> Selector {
        match self.find(name) {
            Some(i) => self.subsets[i].selector.clone(),
            None => Selector::of_version(name),
        }
    }

    /// Whether `index` appears in any split (a subset nobody routes to needs no warning
    /// when it empties).
    pub fn in_a_split(&self, index: usize) -> bool {
        self.default.entries.iter().any(|(j, _)| *j == index)
            || self
                .routes
                .iter()
                .any(|r| r.split.entries.iter().any(|(j, _)| *j == index))
    }
}

fn index_or_implicit(subsets: &mut Vec<NamedSubset>, name: &str) -> usize {
    if let Some(i) = subsets.iter().position(|s| same_name(&s.name, name)) {
        return i;
    }
    subsets.push(NamedSubset {
        name: name.to_string(),
        selector: Selector::of_version(name),
        declared: false,
    });
    subsets.len() - 1
}

/// FNV-1a: a stable hash for sticky routing, the same in every sidecar and release.
pub fn sticky_hash(value: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in value {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Spread the low bits, which the modulo below uses.
    h ^ (h >> 29)
}

/// Draws an entry of `entries` (subset index, weight): sticky on `key` when given. With
/// sticky hashing, the hash picks a point on the cumulative weights, so changing the
/// weights moves only the users whose point crosses a boundary.
pub fn draw(
    entries: &[(usize, u32)],
    key: Option<&[u8]>,
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    let total: u64 = entries.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut point = match key {
        Some(k) => sticky_hash(k) % total,
        None => rng.u64(..total),
    };
    for (subset, w) in entries {
        let w = u64::from(*w);
        if point < w {
            return Some(*subset);
        }
        point -= w;
    }
    entries.last().map(|(s, _)| *s)
}

/// The subset a split chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub subset: usize,
    /// The subset first drawn, when it had no healthy endpoint and `subset` took its share.
    pub instead_of: Option<usize>,
}

/// Why a split chose nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoChoice {
    /// Every weight is zero.
    NoWeight,
    /// The drawn subset has no healthy endpoint and the policy says `fallback = fail`.
    Empty { subset: usize },
    /// No subset of the split has a healthy endpoint.
    NoneHealthy,
}

/// Draws a subset from `split`, health-aware: when the drawn subset has no healthy
/// endpoint (`healthy(i)` is false), its share goes to the subsets that have some,
/// renormalised (or, with `fail_closed`, the draw fails). Drawing among the healthy after
/// a miss gives each healthy subset exactly `w / (sum of healthy weights)`, the same as
/// leaving empty subsets out before drawing; redrawing with the same sticky key keeps
/// sticky users where they were.
pub fn choose(
    split: &SplitRule,
    key: Option<&[u8]>,
    rng: &mut fastrand::Rng,
    fail_closed: bool,
    healthy: impl Fn(usize) -> bool,
) -> Result<Chosen, NoChoice> {
    let drawn = draw(&split.entries, key, rng).ok_or(NoChoice::NoWeight)?;
    if healthy(drawn) {
        return Ok(Chosen {
            subset: drawn,
            instead_of: None,
        });
    }
    if fail_closed {
        return Err(NoChoice::Empty { subset: drawn });
    }
    let live: Vec<(usize, u32)> = split
        .entries
        .iter()
        .copied()
        .filter(|(i, _)| healthy(*i))
        .collect();
    match draw(&live, key, rng) {
        Some(subset) => Ok(Chosen {
            subset,
            instead_of: Some(drawn),
        }),
        None => Err(NoChoice::NoneHealthy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::Split;

    fn subset(name: &str, version: &str, range: &str) -> Subset {
        Subset {
            name: name.into(),
            version: version.into(),
            version_range: range.into(),
            labels: Default::default(),
        }
    }

    fn policy(split: &[(&str, u32)]) -> Policy {
        Policy {
            subsets: vec![subset("stable", "", "^1.4"), subset("canary", "2.0.0", "")],
            routes: Vec::new(),
            default_split: split
                .iter()
                .map(|(s, w)| Split {
                    subset: s.to_string(),
                    weight: *w,
                })
                .collect(),
            fallback: Fallback::Default,
            sticky_header: String::new(),
            resilience: Default::default(),
        }
    }

    #[test]
    fn names_compare_case_insensitively_and_versions_are_implicit_subsets() {
        let s = Selection::compile(&policy(&[("Stable", 90), ("1.5.0-RC", 10)]));
        assert_eq!(s.find("STABLE"), Some(0));
        assert_eq!(
            s.subsets.len(),
            3,
            "the version named in the split is a subset"
        );
        assert!(!s.subsets[2].declared);
        let labels = Labels::new();
        assert!(s.subsets[2].selector.selects("1.5.0-rc", &labels));
        assert!(s.selector_for("CANARY").selects("2.0.0", &labels));
        assert!(s.selector_for("3.0.0").selects("3.0.0", &labels));
        assert!(s.subsets[0].selector.selects("1.4.9", &labels));
        assert!(!s.subsets[0].selector.selects("2.0.0", &labels));
        assert!(!s.subsets[0].selector.selects("not-semver", &labels));
    }

    #[test]
    fn a_miss_gives_its_share_to_the_healthy_or_fails_closed() {
        let s = Selection::compile(&policy(&[("stable", 50), ("canary", 50)]));
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let c = choose(&s.default, None, &mut rng, false, |i| i == 0).expect("chosen");
            assert_eq!(c.subset, 0);
        }
        let fails = (0..200)
            .filter(|_| choose(&s.default, None, &mut rng, true, |i| i == 0).is_err())
            .count();
        assert!((50..=150).contains(&fails), "{fails} of 200 drew canary");
        assert_eq!(
            choose(&s.default, None, &mut rng, false, |_| false),
            Err(NoChoice::NoneHealthy)
        );
    }

    #[test]
    fn regexes_are_bounded() {
        assert!(compile_regex("^a+$").is_ok());
        assert!(compile_regex("(unclosed").is_err());
        assert!(
            compile_regex("\\w{1000}{1000}").is_err(),
            "too large a program"
        );
    }
}
