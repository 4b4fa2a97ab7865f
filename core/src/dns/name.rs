//! The grammar of names below the zone: what the labels of a query name mean.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::DEFAULT_NAMESPACE;

/// What the labels of a query name below the domain ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryName<'a> {
    /// The zone itself (SOA).
    Apex,
    Service {
        namespace: &'a str,
        service: &'a str,
        /// A version tag or subset name: `<filter>.<service>.service`.
        filter: Option<&'a str>,
        /// `_<service>._tcp.service`: SRV only.
        srv_form: bool,
    },
    /// `<hex-ip>.addr`: the address it encodes.
    Addr(IpAddr),
    Unknown,
}

/// Reads a `<hex-ip>` label: 8 hex digits for IPv4, 32 for IPv6.
pub fn parse_hex_ip(label: &str) -> Option<IpAddr> {
    match label.len() {
        8 => u32::from_str_radix(label, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(label, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

/// The `<hex-ip>` label of an address (SRV targets).
pub fn hex_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

/// Splits `labels` (below the domain, leftmost first, already lower-case) into what they
/// name.
pub fn parse<'a>(labels: &'a [&'a str]) -> QueryName<'a> {
    // Namespace suffix: ... .<namespace>.ns
    let (labels, namespace) = match labels {
        [rest @ .., ns, "ns"] => (rest, *ns),
        _ => (labels, DEFAULT_NAMESPACE),
    };
    match labels {
        [] => QueryName::Apex,
        [hex, "addr"] => parse_hex_ip(hex).map_or(QueryName::Unknown, QueryName::Addr),
        [svc, "_tcp", "service"] => match svc.strip_prefix('_') {
            Some(service) => QueryName::Service {
                namespace,
                service,
                filter: None,
                srv_form: true,
            },
            None => QueryName::Unknown,
        },
        [service, "service"] => QueryName::Service {
            namespace,
            service,
            filter: None,
            srv_form: false,
        },
        [filter, service, "service"] => QueryName::Service {
            namespace,
            service,
            filter: Some(filter),
            srv_form: false,
        },
        _ => QueryName::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_into_what_they_ask_for() {
        assert_eq!(parse(&[]), QueryName::Apex);
        assert_eq!(
            parse(&["web", "service"]),
            QueryName::Service {
                namespace: "default",
                service: "web",
                filter: None,
                srv_form: false
            }
        );
        assert_eq!(
            parse(&["canary", "web", "service"]),
            QueryName::Service {
                namespace: "default",
                service: "web",
                filter: Some("canary"),
                srv_form: false
            }
        );
        assert_eq!(
            parse(&["_web", "_tcp", "service"]),
            QueryName::Service {
                namespace: "default",
                service: "web",
                filter: None,
                srv_form: true
            }
        );
        assert_eq!(
            parse(&["web", "service", "staging", "ns"]),
            QueryName::Service {
                namespace: "staging",
                service: "web",
                filter: None,
                srv_form: false
            }
        );
        assert_eq!(
            parse(&["7f000001", "addr"]),
            QueryName::Addr("127.0.0.1".parse().expect("ip"))
        );
        assert_eq!(parse(&["web"]), QueryName::Unknown);
        assert_eq!(parse(&["web", "_tcp", "service"]), QueryName::Unknown);
        assert_eq!(hex_ip("::1".parse().expect("ip")), format!("{:032x}", 1));
    }
}
