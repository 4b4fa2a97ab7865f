//! The data-model rules of DESIGN.md, enforced at the edge before anything is proposed.
//! Every error names the offending field, so the caller knows what to fix.

use std::net::IpAddr;

use super::{Instance, DEFAULT_NAMESPACE};

/// TTL given to a lease when the request says 0.
pub const DEFAULT_TTL_SECONDS: u32 = 10;
pub const MIN_TTL_SECONDS: u32 = 1;
pub const MAX_TTL_SECONDS: u32 = 3600;
/// Weight given to an instance when the request says 0.
pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_ID_LEN: usize = 128;
pub const MAX_VERSION_LEN: usize = 64;
pub const MAX_LABELS: usize = 64;
/// Sum of the bytes of every label key and value of one instance.
pub const MAX_LABEL_BYTES: usize = 4096;
pub const MAX_LABEL_KEY_LEN: usize = 128;
pub const MAX_ZONE_LEN: usize = 64;
pub const MAX_HOSTNAME_LEN: usize = 253;

/// A request field that breaks a rule; becomes `INVALID_ARGUMENT` at the edge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Shows a user-supplied value in an error without letting it flood the message.
fn shown(value: &str) -> String {
    let mut s: String = value.chars().take(80).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// A DNS label, `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`: service names and namespaces, so
/// that every one of them is also a valid DNS name.
pub fn validate_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "{} is not a DNS label: use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit",
                shown(value)
            ),
        ))
    }
}

/// Returns the namespace to use: `default` when empty, else a valid DNS label.
pub fn validate_namespace(field: &str, value: &str) -> Result<String, ValidationError> {
    if value.is_empty() {
        return Ok(DEFAULT_NAMESPACE.to_string());
    }
    validate_name(field, value)?;
    Ok(value.to_string())
}

/// Instance ids: 1-128 characters, no whitespace or control characters (they end up in
/// logs, metric labels and CLI tables).
pub fn validate_id(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.chars().count() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("is longer than {MAX_ID_LEN} characters"),
        ));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ValidationError::new(
            field,
            format!("{} contains whitespace or control characters", shown(value)),
        ));
    }
    if value.chars().any(is_invisible_format) {
        return Err(ValidationError::new(
            field,
            format!(
                "{} contains bidirectional or invisible formatting characters (they reorder what logs and tables show)",
                shown(value)
            ),
        ));
    }
    Ok(())
}

/// Unicode format characters that change how text around them is displayed without
/// showing themselves: bidirectional embeddings, overrides and isolates (the "Trojan
/// Source" characters), marks, and zero-width characters.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Version tags: `[A-Za-z0-9._+-]{1,64}`, e.g. `1.4.2` or `canary`.
pub fn validate_version(field: &str, value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_VERSION_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "{} is not a version tag: use 1-64 of A-Z a-z 0-9 . _ + -",
                shown(value)
            ),
        ))
    }
}

/// TTL in seconds: 0 means the default (10 s), otherwise 1 s to 1 h.
pub fn validate_ttl(field: &str, ttl_seconds: u32) -> Result<u32, ValidationError> {
    match ttl_seconds {
        0 => Ok(DEFAULT_TTL_SECONDS),
        MIN_TTL_SECONDS..=MAX_TTL_SECONDS => Ok(ttl_seconds),
        _ => Err(ValidationError::new(
            field,
            format!("{ttl_seconds} s is outside {MIN_TTL_SECONDS}-{MAX_TTL_SECONDS} s (0 means the default, {DEFAULT_TTL_SECONDS} s)"),
        )),
    }
}

fn validate_address(field: &str, value: &str) -> Result<(), ValidationError> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        // An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address it carries.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || broadcast {
            return Err(ValidationError::new(
                field,
                format!("{value} is not an address a client can connect to"),
            ));
        }
        return Ok(());
    }
    let host = value.strip_suffix('.').unwrap_or(value);
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    // RFC 1123 §2.1: the top label is never all-numeric, or resolvers read the name as
    // an address (`1234` is 0.0.4.210 to inet_aton, `0` is 0.0.0.0).
    let numeric_top = host
        .rsplit('.')
        .next()
        .is_some_and(|top| !top.is_empty() && top.bytes().all(|b| b.is_ascii_digit()));
    if numeric_top {
        return Err(ValidationError::new(
            field,
            format!(
                "{} is not an IP address, and as a hostname its last label is all digits (RFC 1123), which resolvers read as an address",
                shown(value)
            ),
        ));
    }
    if !host.is_empty() && host.len() <= MAX_HOSTNAME_LEN && host.split('.').all(valid_label) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "{} is neither an IP address nor a hostname (RFC 1123)",
                shown(value)
            ),
        ))
    }
}

fn validate_labels(field: &str, labels: &super::Labels) -> Result<(), ValidationError> {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            field,
            format!("{} labels, at most {MAX_LABELS} allowed", labels.len()),
        ));
    }
    let mut total = 0usize;
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY_LEN
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            return Err(ValidationError::new(
                format!("{field}[{}]", shown(k)),
                format!("label keys are 1-{MAX_LABEL_KEY_LEN} of A-Z a-z 0-9 . _ - /"),
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(ValidationError::new(
                format!("{field}[{k}]"),
                "label values must not contain control characters",
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_LABEL_BYTES {
        return Err(ValidationError::new(
            field,
            format!("{total} bytes of keys and values, at most {MAX_LABEL_BYTES} allowed"),
        ));
    }
    Ok(())
}

/// Checks every field of an instance and fills in defaults (namespace, weight). The
/// caller maps the wire's port and weight into range-checked integers first.
pub fn validate_instance(
    mut instance: Instance,
    raw_port: u32,
    raw_weight: u32,
) -> Result<Instance, ValidationError> {
    instance.namespace = validate_namespace("instance.namespace", &instance.namespace)?;
    validate_name("instance.service", &instance.service)?;
    validate_id("instance.id", &instance.id)?;
    validate_address("instance.address", &instance.address)?;
    instance.port = match u16::try_from(raw_port) {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(ValidationError::new(
                "instance.port",
                format!("{raw_port} is outside 1-65535"),
            ))
        }
    };
    validate_version("instance.version", &instance.version)?;
    validate_labels("instance.labels", &instance.labels)?;
    instance.weight = match raw_weight {
        0 => DEFAULT_WEIGHT,
        1..=MAX_WEIGHT => raw_weight,
        _ => {
            return Err(ValidationError::new(
                "instance.weight",
                format!(
                "{raw_weight} is outside 1-{MAX_WEIGHT} (0 means the default, {DEFAULT_WEIGHT})"
            ),
            ))
        }
    };
    if instance.zone.len() > MAX_ZONE_LEN
        || !instance
            .zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ValidationError::new(
            "instance.zone",
            format!(
                "{} is not a zone: use up to {MAX_ZONE_LEN} of A-Z a-z 0-9 . _ -",
                shown(&instance.zone)
            ),
        ));
    }
    if instance.mesh_port != 0 && instance.mesh_port == instance.port {
        return Err(ValidationError::new(
            "instance.mesh_port",
            format!(
                "{} is the app's port too: the mesh port is the sidecar's inbound listener, set it to that port or 0",
                instance.mesh_port
            ),
        ));
    }
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::State;

    fn good() -> Instance {
        Instance {
            namespace: String::new(),
            service: "payments".into(),
            id: "payments-1".into(),
            address: "10.0.0.1".into(),
            port: 0,
            version: "1.4.2".into(),
            labels: Default::default(),
            weight: 0,
            zone: String::new(),
            state: State::Serving,
            mesh_port: 0,
        }
    }

    fn field_of(r: Result<Instance, ValidationError>) -> String {
        r.expect_err("should be refused").field
    }

    /// What the hostile probe registered: each is refused now, naming the field.
    #[test]
    fn addresses_and_ids_that_mislead_are_refused() {
        for bad in [
            "255.255.255.255",
            "::ffff:0.0.0.0",
            "::ffff:224.0.0.1",
            "1234",
            "0",
            "10.0.0.999",
            "host.123",
        ] {
            let mut i = good();
            i.address = bad.into();
            assert_eq!(
                field_of(validate_instance(i, 80, 0)),
                "instance.address",
                "{bad}"
            );
        }
        for ok in ["::ffff:10.0.0.1", "web-1.example", "a1", "3com.example"] {
            let mut i = good();
            i.address = ok.into();
            assert!(validate_instance(i, 80, 0).is_ok(), "{ok}");
        }
        for bad in ["web\u{202E}1", "web\u{2066}x", "web\u{200B}", "\u{FEFF}web"] {
            let mut i = good();
            i.id = bad.into();
            assert_eq!(
                field_of(validate_instance(i, 80, 0)),
                "instance.id",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let i = validate_instance(good(), 8080, 0).expect("valid");
        assert_eq!(i.namespace, "default");
        assert_eq!(i.weight, DEFAULT_WEIGHT);
        assert_eq!(i.port, 8080);
    }

    #[test]
    fn names_follow_the_dns_label_rule() {
        for ok in ["a", "payments", "a-b", "0", &"x".repeat(63)] {
            assert!(validate_name("f", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Payments",
            "a_b",
            "a.b",
            &"x".repeat(64),
            "é",
        ] {
            assert!(validate_name("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_instance_rule_names_its_field() {
        let mut i = good();
        i.service = "Bad_Name".into();
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.service");
        let mut i = good();
        i.namespace = "Prod".into();
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.namespace");
        let mut i = good();
        i.id = "x".repeat(129);
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.id");
        let mut i = good();
        i.id = "a b".into();
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.id");
        let mut i = good();
        i.address = "not an address".into();
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.address");
        let mut i = good();
        i.address = "0.0.0.0".into();
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.address");
        assert_eq!(field_of(validate_instance(good(), 0, 0)), "instance.port");
        assert_eq!(
            field_of(validate_instance(good(), 65536, 0)),
            "instance.port"
        );
        let mut i = good();
        i.version = "1.0 beta".into();
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.version");
        let mut i = good();
        i.version = "v".repeat(65);
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.version");
        assert_eq!(
            field_of(validate_instance(good(), 80, 10_001)),
            "instance.weight"
        );
        let mut i = good();
        i.zone = "eu west".into();
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.zone");
    }

    #[test]
    fn labels_are_bounded_in_count_and_bytes() {
        let mut i = good();
        for n in 0..65 {
            i.labels.insert(format!("k{n}"), "v".into());
        }
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.labels");
        let mut i = good();
        i.labels.insert("big".into(), "v".repeat(4094));
        assert_eq!(field_of(validate_instance(i, 80, 0)), "instance.labels");
        let mut i = good();
        i.labels.insert("bad key".into(), "v".into());
        assert!(field_of(validate_instance(i, 80, 0)).starts_with("instance.labels["));
    }

    #[test]
    fn hostnames_and_ipv6_are_addresses() {
        for ok in ["::1", "10.1.2.3", "db-1.internal", "example.com."] {
            let mut i = good();
            i.address = ok.into();
            assert!(validate_instance(i, 80, 0).is_ok(), "{ok}");
        }
    }

    #[test]
    fn ttl_range() {
        assert_eq!(validate_ttl("ttl", 0), Ok(DEFAULT_TTL_SECONDS));
        assert_eq!(validate_ttl("ttl", 1), Ok(1));
        assert_eq!(validate_ttl("ttl", 3600), Ok(3600));
        assert!(validate_ttl("ttl", 3601).is_err());
    }
}
