//! ACLs: tokens, their rules, and what a rule allows.
//!
//! A token is 32 random bytes shown to its owner once; the registry keeps only an
//! accessor id (to name it), the SHA-256 of the secret (so a leaked snapshot or log gives
//! nobody a usable token), a description, rules and an optional expiry. Secrets are
//! compared in constant time, so timing says nothing about how much of a guess was
//! right. Until bootstrap every request is allowed (a quick start needs no token); from
//! bootstrap on the default is deny, and anonymous DNS reads follow
//! [`default_dns_rules`].
//!
//! A rule is `KIND:PATTERN:RIGHTS`, as the CLI writes it: `service:web:register,read`,
//! `service:web-*:policy,rollout`, `service:*:read`, `kv:config/:read,write`,
//! `operator::members,acl,ca`.

use std::collections::BTreeSet;
use std::fmt;

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use super::validate::{validate_name, ValidationError};

/// Rules one token may carry.
pub const MAX_RULES: usize = 64;
/// Longest rule, in its text form.
pub const MAX_RULE_BYTES: usize = 256;
pub const MAX_DESCRIPTION_BYTES: usize = 256;

/// What a rule may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Right {
    /// Register, KeepAlive, Deregister, SetState on the service's instances.
    Register,
    /// Watch, Resolve, ListServices, policy and rollout reads, DNS.
    Read,
    /// PutPolicy, RollbackPolicy, resilience.
    Policy,
    /// Start and steer rollouts.
    Rollout,
    KvRead,
    KvWrite,
    /// AddMember, RemoveMember.
    Members,
    /// Tokens.
    Acl,
    /// The built-in CA.
    Ca,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RuleKind {
    Service,
    Kv,
    Operator,
}

impl RuleKind {
    fn as_str(self) -> &'static str {
        match self {
            RuleKind::Service => "service",
            RuleKind::Kv => "kv",
            RuleKind::Operator => "operator",
        }
    }

    /// The rights of this kind, by their CLI names.
    fn rights(self) -> &'static [(&'static str, Right)] {
        match self {
            RuleKind::Service => &[
                ("register", Right::Register),
                ("read", Right::Read),
                ("policy", Right::Policy),
                ("rollout", Right::Rollout),
            ],
            RuleKind::Kv => &[("read", Right::KvRead), ("write", Right::KvWrite)],
            RuleKind::Operator => &[
                ("members", Right::Members),
                ("acl", Right::Acl),
                ("ca", Right::Ca),
            ],
        }
    }

    fn of(right: Right) -> RuleKind {
        match right {
            Right::Register | Right::Read | Right::Policy | Right::Rollout => RuleKind::Service,
            Right::KvRead | Right::KvWrite => RuleKind::Kv,
            Right::Members | Right::Acl | Right::Ca => RuleKind::Operator,
        }
    }
}

fn right_name(right: Right) -> &'static str {
    RuleKind::of(right)
        .rights()
        .iter()
        .find(|(_, r)| *r == right)
        .map_or("?", |(n, _)| n)
}

/// One rule: rights of a kind on the names a pattern matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub kind: RuleKind,
    /// Service: a name, a prefix ending in `*`, or `*`. Kv: a key prefix (empty: every
    /// key). Operator: empty.
    pub pattern: String,
    pub rights: BTreeSet<Right>,
}

fn bad(rule: &str, reason: impl fmt::Display) -> ValidationError {
    let shown: String = rule.chars().take(80).collect();
    ValidationError::new("rule", format!("{shown:?}: {reason}"))
}

impl Rule {
    /// Parses `KIND:PATTERN:RIGHTS`.
    pub fn parse(s: &str) -> Result<Rule, ValidationError> {
        if s.len() > MAX_RULE_BYTES {
            return Err(bad(s, format!("longer than {MAX_RULE_BYTES} bytes")));
        }
        let mut parts = s.splitn(3, ':');
        let (Some(kind), Some(pattern), Some(rights)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad(
                s,
                "not KIND:PATTERN:RIGHTS (e.g. service:web:register,read)",
            ));
        };
        let kind = match kind {
            "service" => RuleKind::Service,
            "kv" => RuleKind::Kv,
            "operator" => RuleKind::Operator,
            other => {
                return Err(bad(
                    s,
                    format!("unknown kind {other:?}: use service, kv or operator"),
                ))
            }
        };
        match kind {
            RuleKind::Service => {
                let name = pattern.strip_suffix('*').unwrap_or(pattern);
                let prefix_ok = pattern.ends_with('*')
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if pattern != "*" && !prefix_ok && validate_name("", pattern).is_err() {
                    return Err(bad(
                        s,
                        "the pattern must be a service name, a prefix ending in * (web-*), or *",
                    ));
                }
            }
            RuleKind::Kv => {
                if pattern.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    return Err(bad(s, "a kv prefix has no spaces or control characters"));
                }
            }
            RuleKind::Operator => {
                if !pattern.is_empty() {
                    return Err(bad(
                        s,
                        "operator rules have no pattern: operator::members,acl,ca",
                    ));
                }
            }
        }
        let mut set = BTreeSet::new();
        for name in rights.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some((_, right)) = kind.rights().iter().find(|(n, _)| *n == name) else {
                let names: Vec<&str> = kind.rights().iter().map(|(n, _)| *n).collect();
                return Err(bad(
                    s,
                    format!(
                        "{name:?} is not a {} right: use {}",
                        kind.as_str(),
                        names.join(", ")
                    ),
                ));
            };
            set.insert(*right);
        }
        if set.is_empty() {
            return Err(bad(s, "no rights given"));
        }
        Ok(Rule {
            kind,
            pattern: pattern.to_string(),
            rights: set,
        })
    }

    fn matches(&self, resource: &str) -> bool {
        match self.kind {
            RuleKind::Operator => true,
            RuleKind::Kv => resource.starts_with(&self.pattern),
            RuleKind::Service => {
                if self.pattern == "*" {
                    return true;
                }
                match self.pattern.strip_suffix('*') {
                    Some(prefix) => resource.starts_with(prefix),
                    None => self.pattern == resource,
                }
            }
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rights: Vec<&str> = self.rights.iter().map(|r| right_name(*r)).collect();
        write!(
            f,
            "{}:{}:{}",
            self.kind.as_str(),
            self.pattern,
            rights.join(",")
        )
    }
}

/// Checks a token's rules: at most [`MAX_RULES`], each valid in its text form.
pub fn validate_rules(rules: &[Rule]) -> Result<(), ValidationError> {
    if rules.len() > MAX_RULES {
        return Err(ValidationError::new(
            "rules",
            format!("{} rules, at most {MAX_RULES}", rules.len()),
        ));
    }
    for r in rules {
        // What the text form allows is what a rule may be (a forwarded command's rules
        // were built by a peer, not parsed here).
        Rule::parse(&r.to_string())?;
    }
    Ok(())
}

pub fn validate_description(d: &str) -> Result<(), ValidationError> {
    if d.len() > MAX_DESCRIPTION_BYTES {
        return Err(ValidationError::new(
            "description",
            format!("longer than {MAX_DESCRIPTION_BYTES} bytes"),
        ));
    }
    if d.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "description",
            "contains control characters",
        ));
    }
    Ok(())
}

/// Whether `rules` grant `right` on `resource` (a service name or kv key; ignored for
/// operator rights).
pub fn allows(rules: &[Rule], right: Right, resource: &str) -> bool {
    rules
        .iter()
        .any(|r| r.kind == RuleKind::of(right) && r.rights.contains(&right) && r.matches(resource))
}

/// The rule that would allow `right` on `resource`, for a PERMISSION_DENIED message.
pub fn missing(right: Right, resource: &str) -> String {
    let kind = RuleKind::of(right);
    let pattern = if kind == RuleKind::Operator {
        ""
    } else {
        resource
    };
    format!("{}:{}:{}", kind.as_str(), pattern, right_name(right))
}

/// Consul's service identity: register on `name`, read on every service (what a
/// sidecar needs).
pub fn service_identity(name: &str) -> Vec<Rule> {
    vec![
        Rule {
            kind: RuleKind::Service,
            pattern: name.to_string(),
            rights: BTreeSet::from([Right::Register]),
        },
        Rule {
            kind: RuleKind::Service,
            pattern: "*".into(),
            rights: BTreeSet::from([Right::Read]),
        },
    ]
}

/// The rules of anonymous requests after bootstrap (registry `--anonymous-rule`), parsed
/// from their text forms. Read and kv rights only: an anonymous caller never registers,
/// steers or administers anything, whatever a flag says, so one typo cannot open the
/// cluster. `none` (or no rule) means no rights.
pub fn parse_anonymous_rules(texts: &[String]) -> Result<Vec<Rule>, ValidationError> {
    let rules = parse_rule_set(texts, "anonymous_rule")?;
    check_anonymous_rules(&rules)?;
    Ok(rules)
}

/// Checks already-parsed anonymous rules (a library caller's config).
pub fn check_anonymous_rules(rules: &[Rule]) -> Result<(), ValidationError> {
    check_rule_set(rules, "anonymous_rule", &[Right::Read, Right::KvRead])
}

/// The rules DNS answers by after bootstrap (registry `--dns-rule`): service read rules
/// only, since DNS does nothing else. `none` means DNS refuses every service name.
pub fn parse_dns_rules(texts: &[String]) -> Result<Vec<Rule>, ValidationError> {
    let rules = parse_rule_set(texts, "dns_rule")?;
    check_dns_rules(&rules)?;
    Ok(rules)
}

/// Checks already-parsed DNS rules (a library caller's config).
pub fn check_dns_rules(rules: &[Rule]) -> Result<(), ValidationError> {
    check_rule_set(rules, "dns_rule", &[Right::Read])
}

/// Parses a rule set's text forms; `none` alone is the empty set.
fn parse_rule_set(texts: &[String], field: &'static str) -> Result<Vec<Rule>, ValidationError> {
    if texts.iter().any(|t| t == "none") {
        if texts.len() > 1 {
            return Err(ValidationError::new(
                field,
                "\"none\" stands alone: give it or rules, not both",
            ));
        }
        return Ok(Vec::new());
    }
    texts.iter().map(|t| Rule::parse(t)).collect()
}

/// Bounds (as a token's rules) and only `permitted` rights.
fn check_rule_set(
    rules: &[Rule],
    field: &'static str,
    permitted: &[Right],
) -> Result<(), ValidationError> {
    validate_rules(rules)?;
    for rule in rules {
        if let Some(r) = rule.rights.iter().find(|r| !permitted.contains(r)) {
            let allowed: Vec<String> = permitted
                .iter()
                .map(|p| format!("{}:…:{}", RuleKind::of(*p).as_str(), right_name(*p)))
                .collect();
            return Err(ValidationError::new(
                field,
                format!(
                    "{rule}: grants {} to callers without a token; only {} may be given here",
                    right_name(*r),
                    allowed.join(" or ")
                ),
            ));
        }
    }
    Ok(())
}

/// What DNS answers without a token after bootstrap: every service, so DNS keeps
/// working (Consul's default is the same for its DNS).
pub fn default_dns_rules() -> Vec<Rule> {
    vec![Rule {
        kind: RuleKind::Service,
        pattern: "*".into(),
        rights: BTreeSet::from([Right::Read]),
    }]
}

/// The SHA-256 of a token's secret: all the registry keeps of it.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SecretHash(pub [u8; 32]);

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(…)")
    }
}

impl SecretHash {
    pub fn of(secret: &str) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        SecretHash(out)
    }

    /// Whether `secret` hashes to this, compared in constant time.
    pub fn matches(&self, secret: &str) -> bool {
        let other = SecretHash::of(secret);
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Why no randomness could be had (the OS refused).
#[derive(Debug, thiserror::Error)]
#[error("the system's random number generator failed")]
pub struct RandomError;

fn random<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| RandomError)?;
    Ok(b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// New secrets.
pub struct Secret;

impl Secret {
    /// 32 random bytes as 64 hex characters, and their hash.
    pub fn generate() -> Result<(String, SecretHash), RandomError> {
        let text = hex(&random::<32>()?);
        let hash = SecretHash::of(&text);
        Ok((text, hash))
    }
}

/// A random accessor id, UUID-shaped (8-4-4-4-12 hex).
pub fn new_accessor_id() -> Result<String, RandomError> {
    let h = hex(&random::<16>()?);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// A token as the registry keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub accessor_id: String,
    pub secret_hash: SecretHash,
    pub description: String,
    pub rules: Vec<Rule>,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

impl Token {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| now_ms >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        Rule::parse(s).expect(s)
    }

    #[test]
    fn anonymous_and_dns_rule_sets_grant_reads_only() {
        let texts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let anon = parse_anonymous_rules(&texts(&["service:web-*:read", "kv:public/:read"]))
            .expect("read rules are fine");
        assert!(allows(&anon, Right::Read, "web-a"));
        assert!(!allows(&anon, Right::Read, "payments"));
        assert!(allows(&anon, Right::KvRead, "public/x"));
        for bad in [
            "service:*:register",
            "service:web:read,policy",
            "operator::acl",
            "kv:x/:write",
        ] {
            let e = parse_anonymous_rules(&texts(&[bad])).expect_err(bad);
            assert!(e.to_string().contains("without a token"), "{e}");
        }
        assert!(parse_anonymous_rules(&texts(&["bogus:x:read"])).is_err());
        // Rules built in code (a library caller's config) get the same check.
        assert!(check_anonymous_rules(&[rule("service:*:register")]).is_err());
        assert!(check_dns_rules(&[rule("kv:x/:read")]).is_err());
        assert!(check_dns_rules(&default_dns_rules()).is_ok());
        assert!(parse_anonymous_rules(&texts(&["none"]))
            .expect("none")
            .is_empty());
        assert!(parse_dns_rules(&texts(&["none", "service:*:read"])).is_err());
        assert!(parse_dns_rules(&texts(&["kv:x/:read"])).is_err());
        let dns = parse_dns_rules(&texts(&["service:*:read"])).expect("default");
        assert_eq!(dns, default_dns_rules());
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("service:s{i}:read"))
            .collect();
        assert!(parse_dns_rules(&many).is_err());
    }

    #[test]
    fn rules_parse_and_print_back() {
        for s in [
            "service:web:read,register",
            "service:web-*:policy,rollout",
            "service:*:read",
            "kv:config/:read,write",
            "operator::acl,ca,members",
        ] {
            let r = rule(s);
            // Rights print in a fixed order.
            assert_eq!(Rule::parse(&r.to_string()).expect("round trip"), r);
        }
        assert_eq!(
            rule("service:web:register,read").to_string(),
            "service:web:register,read"
        );
    }

    #[test]
    fn bad_rules_are_refused_naming_the_rule() {
        for (s, why) in [
            ("service:web", "KIND:PATTERN:RIGHTS"),
            ("galaxy:web:read", "unknown kind"),
            ("service:WEB:read", "pattern"),
            ("service:web:fly", "not a service right"),
            ("service:web:write", "not a service right"),
            ("kv:config/:register", "not a kv right"),
            ("operator:x:acl", "no pattern"),
            ("service:web:", "no rights"),
            ("kv:a b:read", "spaces"),
        ] {
            let e = Rule::parse(s).expect_err(s);
            assert!(e.to_string().contains(why), "{s}: {e}");
            assert!(e.to_string().contains(s), "{s}: {e}");
        }
        let long = format!("service:{}:read", "a".repeat(300));
        assert!(Rule::parse(&long).is_err());
        let many: Vec<Rule> = (0..=MAX_RULES).map(|_| rule("service:*:read")).collect();
        assert!(validate_rules(&many).is_err());
        assert!(validate_description(&"x".repeat(300)).is_err());
        assert!(validate_description("line\nbreak").is_err());
    }

    #[test]
    fn what_rules_allow() {
        let rules = vec![
            rule("service:web:register"),
            rule("service:api-*:policy"),
            rule("kv:config/:read"),
        ];
        assert!(allows(&rules, Right::Register, "web"));
        assert!(!allows(&rules, Right::Register, "web2"));
        assert!(!allows(&rules, Right::Read, "web"));
        assert!(allows(&rules, Right::Policy, "api-gateway"));
        assert!(!allows(&rules, Right::Policy, "web"));
        assert!(allows(&rules, Right::KvRead, "config/db"));
        assert!(!allows(&rules, Right::KvWrite, "config/db"));
        assert!(!allows(&rules, Right::Acl, ""));
        assert!(allows(&[rule("operator::acl")], Right::Acl, "anything"));
        let sidecar = service_identity("web");
        assert!(allows(&sidecar, Right::Register, "web"));
        assert!(allows(&sidecar, Right::Read, "payments"));
        assert!(!allows(&sidecar, Right::Register, "payments"));
        assert!(allows(&default_dns_rules(), Right::Read, "web"));
        assert_eq!(
            missing(Right::Register, "payments"),
            "service:payments:register"
        );
        assert_eq!(missing(Right::Members, "x"), "operator::members");
    }

    #[test]
    fn secrets_are_random_hashed_and_never_printed() {
        let (a, ha) = Secret::generate().expect("random");
        let (b, _) = Secret::generate().expect("random");
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(ha.matches(&a));
        assert!(!ha.matches(&b));
        let t = Token {
            accessor_id: new_accessor_id().expect("random"),
            secret_hash: ha,
            description: String::new(),
            rules: vec![],
            created_at_ms: 0,
            expires_at_ms: Some(10),
        };
        assert_eq!(t.accessor_id.len(), 36);
        assert!(!format!("{t:?}").contains(&hex(&t.secret_hash.0)));
        assert!(!t.is_expired(9));
        assert!(t.is_expired(10));
    }
}
