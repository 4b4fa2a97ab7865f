//! Intentions: which services may call which, enforced by the destination's inbound
//! sidecar from the caller's verified certificate (Consul Connect's name and model).
//!
//! Each intention names a destination service (or `*`, every service of the namespace)
//! and a source: a service name, a prefix ending in `*` (`web-*`), or `*`. A caller that
//! no intention matches is allowed (Consul's default intention under a default-allow ACL
//! policy), unless an **allow** intention applies to the destination: then the
//! destination takes only the callers some intention allows (an allow list), so
//! `allow web payments` alone means "only web", and `deny batch payments` alone means
//! "everyone but batch". When several match, the most specific wins, as in Consul: an
//! exact destination before `*`, then an exact source before a longer prefix before a
//! shorter one before `*`.

use serde::{Deserialize, Serialize};

use super::{validate_name, ValidationError};

/// Intentions one namespace may hold: every sidecar of the namespace keeps them.
pub const MAX_INTENTIONS_PER_NAMESPACE: usize = 4_096;
/// Intentions one destination may hold: each change sends all of them to every watcher
/// of the namespace.
pub const MAX_INTENTIONS_PER_DESTINATION: usize = 512;
/// Changes kept per namespace for `intention list --history`, oldest dropped first.
pub const MAX_INTENTION_HISTORY: usize = 1_000;
/// Bytes of an intention's description.
pub const MAX_DESCRIPTION_BYTES: usize = 256;

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// One rule: may `source` call `destination`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intention {
    pub source: String,
    pub destination: String,
    pub action: Action,
    pub description: String,
    /// The catalog revision that last set it.
    pub revision: u64,
    /// The proposer's wall clock when it was last set, Unix ms.
    pub updated_ms: u64,
}

/// One change of a namespace's intentions, as `intention list --history` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentionRecord {
    pub revision: u64,
    pub at_ms: u64,
    pub source: String,
    pub destination: String,
    /// `None`: deleted.
    pub action: Option<Action>,
    pub description: String,
}

/// How an intention's source names callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceMatch<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Any,
}

fn source_match(source: &str) -> SourceMatch<'_> {
    if source == "*" {
        SourceMatch::Any
    } else if let Some(p) = source.strip_suffix('*') {
        SourceMatch::Prefix(p)
    } else {
        SourceMatch::Exact(source)
    }
}

/// Checks an intention's source: `*`, a service name, or a name's prefix ending in `*`.
pub fn validate_source(field: &str, source: &str) -> Result<(), ValidationError> {
    match source_match(source) {
        SourceMatch::Any => Ok(()),
        SourceMatch::Exact(name) => validate_name(field, name),
        SourceMatch::Prefix(p) => {
            if p.is_empty()
                || p.len() > 63
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                || p.starts_with('-')
            {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "{source:?} is not a source: use `*`, a service name, or the start of one followed by `*` (web-*)"
                    ),
                ));
            }
            Ok(())
        }
    }
}

/// Checks an intention's destination: a service name or `*`.
pub fn validate_destination(field: &str, destination: &str) -> Result<(), ValidationError> {
    if destination == "*" {
        return Ok(());
    }
    validate_name(field, destination)
}

/// Checks a description's size.
pub fn validate_description(field: &str, description: &str) -> Result<(), ValidationError> {
    if description.len() > MAX_DESCRIPTION_BYTES || description.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            format!("use at most {MAX_DESCRIPTION_BYTES} bytes of printable text"),
        ));
    }
    Ok(())
}

/// What the inbound sidecar decided for one caller, and by which rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub allowed: bool,
    /// The intention that decided (`None`: no intention matched).
    pub by: Option<&'a Intention>,
}

/// Whether `source` (the caller's service in the destination's namespace, `None` for a
/// caller from another namespace or without a service identity, which only `*`
/// sources match) may call `destination`, by the namespace's `rules` (any of them:
/// those for other destinations are skipped).
pub fn decide<'a>(
    rules: impl IntoIterator<Item = &'a Intention>,
    source: Option<&str>,
    destination: &str,
) -> Verdict<'a> {
    // (destination exact, source rank, prefix length): larger is more specific.
    let mut best: Option<((bool, u8, usize), &Intention)> = None;
    // An allow intention for the destination makes it an allow list.
    let mut allow_list = false;
    for rule in rules {
        let exact_dst = rule.destination == destination;
        if !exact_dst && rule.destination != "*" {
            continue;
        }
        allow_list |= rule.action == Action::Allow;
        let rank = match (source_match(&rule.source), source) {
            (SourceMatch::Any, _) => (1, 0),
            (SourceMatch::Exact(s), Some(caller)) if s == caller => (3, s.len()),
            (SourceMatch::Prefix(p), Some(caller)) if caller.starts_with(p) => (2, p.len()),
            _ => continue,
        };
        let key = (exact_dst, rank.0, rank.1);
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, rule));
        }
    }
    match best {
        Some((_, rule)) => Verdict {
            allowed: rule.action == Action::Allow,
            by: Some(rule),
        },
        None => Verdict {
            allowed: !allow_list,
            by: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(source: &str, destination: &str, action: Action) -> Intention {
        Intention {
            source: source.into(),
            destination: destination.into(),
            action,
            description: String::new(),
            revision: 1,
            updated_ms: 0,
        }
    }

    #[test]
    fn an_allow_makes_an_allow_list_and_a_deny_denies_only_whom_it_names() {
        assert!(decide(&[], Some("web"), "payments").allowed);
        let rules = [rule("web", "payments", Action::Allow)];
        assert!(decide(&rules, Some("web"), "payments").allowed);
        assert!(!decide(&rules, Some("batch"), "payments").allowed);
        assert!(!decide(&rules, None, "payments").allowed);
        // Another destination has no rule: still open.
        assert!(decide(&rules, Some("batch"), "search").allowed);
        // A deny alone denies only its source.
        let rules = [rule("batch", "payments", Action::Deny)];
        assert!(!decide(&rules, Some("batch"), "payments").allowed);
        assert!(decide(&rules, Some("web"), "payments").allowed);
        assert!(decide(&rules, None, "payments").allowed);
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let rules = [
            rule("*", "*", Action::Deny),
            rule("web-*", "payments", Action::Allow),
            rule("web-legacy", "payments", Action::Deny),
            rule("web-leg*", "payments", Action::Allow),
            rule("batch", "*", Action::Allow),
        ];
        let allowed = |src: &str, dst: &str| decide(&rules, Some(src), dst).allowed;
        assert!(allowed("web-new", "payments"));
        assert!(!allowed("web-legacy", "payments"), "exact beats prefix");
        assert!(
            allowed("web-legacy2", "payments"),
            "longer prefix beats shorter"
        );
        assert!(!allowed("api", "payments"), "the wildcard deny");
        assert!(allowed("batch", "search"));
        // An exact destination's `*`-source rule beats a `*` destination's exact source.
        let rules = [
            rule("*", "payments", Action::Deny),
            rule("batch", "*", Action::Allow),
        ];
        assert!(!decide(&rules, Some("batch"), "payments").allowed);
        let v = decide(&rules, Some("batch"), "payments");
        assert_eq!(v.by.map(|r| r.source.as_str()), Some("*"));
    }

    #[test]
    fn sources_and_destinations_are_checked() {
        for ok in ["*", "web", "web-*", "w*"] {
            assert!(validate_source("source", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "web*x", "**", "-*", "web/x", "we b"] {
            assert!(validate_source("source", bad).is_err(), "{bad}");
        }
        assert!(validate_destination("destination", "*").is_ok());
        assert!(validate_destination("destination", "web-*").is_err());
        assert!(validate_description("d", &"x".repeat(257)).is_err());
        assert!(validate_description("d", "line\nbreak").is_err());
    }
}
