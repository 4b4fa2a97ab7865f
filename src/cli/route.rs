//! `switchyard route …`: show and change a service's routing policy.
//!
//! Every change reads the current policy, edits it and writes it back as one recorded
//! revision; `history` lists them and `rollback` restores one.

use clap::{Args, Subcommand};
use serde::Serialize;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::routing_client::RoutingClient;

use super::client::{connect_routing, print_json, status_error, OutputFlag, RegistryFlag};
use super::config::rfc3339;
use super::route_resilience::{describe, summary, ResilienceFlags};
use super::{CliError, Output};

#[derive(Args, Debug)]
pub struct RouteArgs {
    #[command(subcommand)]
    pub verb: RouteVerb,
    #[command(flatten)]
    pub registry: RegistryFlag,
    /// Namespace of the service.
    #[arg(
        long,
        short = 'n',
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default",
        global = true
    )]
    pub namespace: String,
    #[command(flatten)]
    pub output: OutputFlag,
}

#[derive(Subcommand, Debug)]
pub enum RouteVerb {
    /// Show the service's current policy.
    Show { service: String },
    /// Set the default split: `route split web stable=95 canary=5` (a name that is no
    /// subset means that exact version).
    Split {
        service: String,
        /// SUBSET=WEIGHT, at least one.
        #[arg(required = true, value_parser = parse_weight)]
        weights: Vec<(String, u32)>,
        /// Hash this request header to keep each user on one subset.
        #[arg(long, env = "SWITCHYARD_ROUTE_SPLIT_STICKY")]
        sticky: Option<String>,
    },
    /// Send requests matching headers to a subset: `route match web --header x-canary=true --to canary`.
    Match {
        service: String,
        /// NAME=VALUE (exact) or NAME (present); repeatable, all must match.
        #[arg(
            long = "header",
            required = true,
            env = "SWITCHYARD_ROUTE_MATCH_HEADER"
        )]
        headers: Vec<String>,
        /// Match values as a prefix instead of exactly.
        #[arg(long, conflicts_with = "regex", env = "SWITCHYARD_ROUTE_MATCH_PREFIX")]
        prefix: bool,
        /// Match values as a regular expression.
        #[arg(long, env = "SWITCHYARD_ROUTE_MATCH_REGEX")]
        regex: bool,
        /// The subset (or version) to send them to.
        #[arg(long, env = "SWITCHYARD_ROUTE_MATCH_TO")]
        to: String,
        /// Route name (replaces a route of the same name); default: the first header.
        #[arg(long, env = "SWITCHYARD_ROUTE_MATCH_NAME")]
        name: Option<String>,
        /// What this route matches is safe to repeat whatever its method: retry it on
        /// 5xx/gateway errors like an idempotent request.
        #[arg(long, env = "SWITCHYARD_ROUTE_MATCH_RETRYABLE")]
        retryable: bool,
    },
    /// Blue-green switch: send 100% to one subset and drop header routes.
    Promote { service: String, subset: String },
    /// Declare a subset by version, semver range and/or labels.
    Subset {
        service: String,
        name: String,
        /// Exact version tag.
        #[arg(long, env = "SWITCHYARD_ROUTE_SUBSET_VERSION")]
        version: Option<String>,
        /// Semver range, e.g. ^1.4 or ">=2.0.0, <3".
        #[arg(long, env = "SWITCHYARD_ROUTE_SUBSET_RANGE")]
        range: Option<String>,
        /// KEY=VALUE, repeatable (the variable holds one).
        #[arg(long = "label", value_parser = super::parse_label, env = "SWITCHYARD_ROUTE_SUBSET_LABEL")]
        labels: Vec<(String, String)>,
    },
    /// What happens when a chosen subset has no healthy endpoint.
    Fallback {
        service: String,
        #[arg(value_parser = ["default", "fail"])]
        mode: String,
    },
    /// Timeouts, retries, circuit-breaker limits, slow start, ejection and panic mode:
    /// `route resilience web --retries 2 --per-try-timeout 500ms`. Unset flags keep
    /// their value; with no flags it shows the policy.
    Resilience {
        service: String,
        #[command(flatten)]
        flags: ResilienceFlags,
    },
    /// Remove the policy (plain least request over every instance).
    Clear { service: String },
    /// Show or set the service's mTLS mode: `strict` (callers reach only its endpoints
    /// in the mesh, over mutual TLS) or `permissive` (the default: endpoints outside the
    /// mesh get clear text). Kept beside the policy; `route clear` leaves it.
    Mtls {
        service: String,
        #[arg(value_parser = ["strict", "permissive"])]
        mode: Option<String>,
    },
    /// List the recorded changes, oldest first.
    History { service: String },
    /// Restore an earlier revision (default: the one before the current) as a new change.
    Rollback {
        service: String,
        /// The revision to restore.
        #[arg(long = "to", env = "SWITCHYARD_ROUTE_ROLLBACK_TO")]
        to_revision: Option<u64>,
    },
}

fn parse_weight(s: &str) -> Result<(String, u32), String> {
    let (name, w) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SUBSET=WEIGHT"))?;
    let w = w
        .parse()
        .map_err(|_| format!("{w:?} is not a weight (0-10000)"))?;
    Ok((name.to_string(), w))
}

async fn current(
    client: &mut RoutingClient<super::client::AuthChannel>,
    namespace: &str,
    service: &str,
) -> Result<Option<pb::PolicyRecord>, CliError> {
    Ok(client
        .get_policy(pb::GetPolicyRequest {
            namespace: namespace.to_string(),
            service: service.to_string(),
        })
        .await
        .map_err(|s| status_error("", s))?
        .into_inner()
        .current)
}

/// Applies `edit` to the current policy (or an empty one) and writes it back.
async fn change(
    client: &mut RoutingClient<super::client::AuthChannel>,
    args: &RouteArgs,
    service: &str,
    edit: impl FnOnce(&mut pb::Policy),
) -> Result<(), CliError> {
    let mut policy = current(client, &args.namespace, service)
        .await?
        .and_then(|r| r.policy)
        .unwrap_or_default();
    edit(&mut policy);
    let revision = client
        .put_policy(pb::PutPolicyRequest {
            namespace: args.namespace.clone(),
            service: service.to_string(),
            policy: Some(policy),
        })
        .await
        .map_err(|s| status_error("", s))?
        .into_inner()
        .revision;
    eprintln!("policy of {service} changed at revision {revision}");
    show(client, args, service).await
}

fn splits(v: &[pb::WeightedSubset]) -> String {
    if v.is_empty() {
        return "(every instance)".into();
    }
    v.iter()
        .map(|w| format!("{}={}", w.subset, w.weight))
        .collect::<Vec<_>>()
        .join(" ")
}

fn matcher(h: &pb::HeaderMatch) -> String {
    use pb::header_match::Match;
    match &h.r#match {
        Some(Match::Exact(v)) => format!("{}={v}", h.name),
        Some(Match::Prefix(v)) => format!("{}^={v}", h.name),
        Some(Match::Regex(v)) => format!("{}~/{v}/", h.name),
        Some(Match::Present(_)) | None => format!("{} present", h.name),
    }
}

#[derive(Serialize)]
struct PolicyDoc {
    service: String,
    revision: u64,
    updated_at: String,
    reason: String,
    subsets: Vec<SubsetDoc>,
    routes: Vec<RouteDoc>,
    default_split: String,
    sticky_header: String,
    fallback: &'static str,
    /// The service's overrides of the sidecars' resilience defaults, flag -> value.
    resilience: std::collections::BTreeMap<&'static str, String>,
    #[serde(skip)]
    resilience_summary: String,
}

#[derive(Serialize)]
struct SubsetDoc {
    name: String,
    selector: String,
}

#[derive(Serialize)]
struct RouteDoc {
    name: String,
    matches: Vec<String>,
    split: String,
    sticky_header: String,
    retryable: bool,
}

fn doc(service: &str, r: &pb::PolicyRecord) -> PolicyDoc {
    let p = r.policy.clone().unwrap_or_default();
    PolicyDoc {
        service: service.to_string(),
        revision: r.revision,
        updated_at: rfc3339(r.updated_at_unix_ms),
        reason: r.reason.clone(),
        subsets: p
            .subsets
            .iter()
            .map(|s| {
                let mut sel = Vec::new();
                if !s.version.is_empty() {
                    sel.push(format!("version={}", s.version));
                }
                if !s.version_range.is_empty() {
                    sel.push(format!("range={}", s.version_range));
                }
                let mut labels: Vec<_> = s.labels.iter().collect();
                labels.sort();
                sel.extend(labels.into_iter().map(|(k, v)| format!("{k}={v}")));
                SubsetDoc {
                    name: s.name.clone(),
                    selector: sel.join(" "),
                }
            })
            .collect(),
        routes: p
            .routes
            .iter()
            .map(|r| RouteDoc {
                name: r.name.clone(),
                matches: r.headers.iter().map(matcher).collect(),
                split: splits(&r.split),
                sticky_header: r.sticky_header.clone(),
                retryable: r.retryable,
            })
            .collect(),
        default_split: splits(&p.default_split),
        sticky_header: p.sticky_header.clone(),
        fallback: if p.fallback == pb::Fallback::Fail as i32 {
            "fail"
        } else {
            "default"
        },
        resilience: describe(p.resilience.as_ref()).into_iter().collect(),
        resilience_summary: summary(p.resilience.as_ref()),
    }
}

async fn show(
    client: &mut RoutingClient<super::client::AuthChannel>,
    args: &RouteArgs,
    service: &str,
) -> Result<(), CliError> {
    let Some(record) = current(client, &args.namespace, service).await? else {
        if args.output.output == Output::Json {
            println!("null");
        } else {
            println!("{service} has no routing policy: least request over every instance");
        }
        return Ok(());
    };
    let d = doc(service, &record);
    if args.output.output == Output::Json {
        return print_json(&d);
    }
    println!(
        "{} at revision {} ({}, {})",
        d.service, d.revision, d.reason, d.updated_at
    );
    if !d.subsets.is_empty() {
        println!("subsets:");
        for s in &d.subsets {
            println!("  {:<12} {}", s.name, s.selector);
        }
    }
    if !d.routes.is_empty() {
        println!("routes:");
        for (i, r) in d.routes.iter().enumerate() {
            let mut sticky = if r.sticky_header.is_empty() {
                String::new()
            } else {
                format!("  (sticky on {})", r.sticky_header)
            };
            if r.retryable {
                sticky.push_str("  (retryable)");
            }
            println!(
                "  {}. {:<12} {} -> {}{sticky}",
                i + 1,
                r.name,
                r.matches.join(" & "),
                r.split
            );
        }
    }
    let sticky = if d.sticky_header.is_empty() {
        String::new()
    } else {
        format!("  (sticky on {})", d.sticky_header)
    };
    println!("default split: {}{sticky}", d.default_split);
    println!("fallback:      {}", d.fallback);
    println!("resilience:    {}", d.resilience_summary);
    Ok(())
}

fn upsert_route(p: &mut pb::Policy, route: pb::Route) {
    match p.routes.iter_mut().find(|r| r.name == route.name) {
        Some(r) => *r = route,
        None => p.routes.push(route),
    }
}

pub async fn run(args: RouteArgs) -> Result<(), CliError> {
    let mut client = connect_routing(&args.registry.registry).await?;
    match &args.verb {
        RouteVerb::Show { service } => show(&mut client, &args, service).await,
        RouteVerb::Split {
            service,
            weights,
            sticky,
        } => {
            let split: Vec<pb::WeightedSubset> = weights
                .iter()
                .map(|(s, w)| pb::WeightedSubset {
                    subset: s.clone(),
                    weight: *w,
                })
                .collect();
            let sticky = sticky.clone();
            change(&mut client, &args, service, |p| {
                p.default_split = split;
                if let Some(h) = sticky {
                    p.sticky_header = h;
                }
            })
            .await
        }
        RouteVerb::Match {
            service,
            headers,
            prefix,
            regex,
            to,
            name,
            retryable,
        } => {
            use pb::header_match::Match;
            let matches: Vec<pb::HeaderMatch> = headers
                .iter()
                .map(|h| {
                    let (n, v) = match h.split_once('=') {
                        Some((n, v)) => (n, Some(v.to_string())),
                        None => (h.as_str(), None),
                    };
                    let kind = match v {
                        None => Match::Present(true),
                        Some(v) if *regex => Match::Regex(v),
                        Some(v) if *prefix => Match::Prefix(v),
                        Some(v) => Match::Exact(v),
                    };
                    pb::HeaderMatch {
                        name: n.to_ascii_lowercase(),
                        r#match: Some(kind),
                    }
                })
                .collect();
            let route = pb::Route {
                name: name.clone().unwrap_or_else(|| {
                    headers.first().map_or_else(String::new, |h| {
                        h.split('=').next().unwrap_or("").to_string()
                    })
                }),
                headers: matches,
                split: vec![pb::WeightedSubset {
                    subset: to.clone(),
                    weight: 100,
                }],
                sticky_header: String::new(),
                retryable: *retryable,
            };
            change(&mut client, &args, service, |p| upsert_route(p, route)).await
        }
        RouteVerb::Promote { service, subset } => {
            let subset = subset.clone();
            change(&mut client, &args, service, |p| {
                p.routes.clear();
                p.default_split = vec![pb::WeightedSubset {
                    subset,
                    weight: 100,
                }];
            })
            .await
        }
        RouteVerb::Subset {
            service,
            name,
            version,
            range,
            labels,
        } => {
            let subset = pb::Subset {
                name: name.clone(),
                version: version.clone().unwrap_or_default(),
                version_range: range.clone().unwrap_or_default(),
                labels: labels.iter().cloned().collect(),
            };
            change(&mut client, &args, service, |p| {
                match p.subsets.iter_mut().find(|s| s.name == subset.name) {
                    Some(s) => *s = subset,
                    None => p.subsets.push(subset),
                }
            })
            .await
        }
        RouteVerb::Fallback { service, mode } => {
            let fail = mode == "fail";
            change(&mut client, &args, service, |p| {
                p.fallback = if fail {
                    pb::Fallback::Fail as i32
                } else {
                    pb::Fallback::Default as i32
                };
            })
            .await
        }
        RouteVerb::Resilience { service, flags } => {
            if flags.is_empty() {
                return show(&mut client, &args, service).await;
            }
            change(&mut client, &args, service, |p| flags.apply(p)).await
        }
        RouteVerb::Mtls { service, mode } => {
            let Some(mode) = mode else {
                let r = client
                    .get_policy(pb::GetPolicyRequest {
                        namespace: args.namespace.clone(),
                        service: service.clone(),
                    })
                    .await
                    .map_err(|s| status_error("", s))?
                    .into_inner();
                let strict = r.mtls == pb::MtlsMode::Strict as i32;
                println!(
                    "{service}: mtls {}",
                    if strict { "strict" } else { "permissive" }
                );
                return Ok(());
            };
            let wire = if mode == "strict" {
                pb::MtlsMode::Strict
            } else {
                pb::MtlsMode::Permissive
            };
            let revision = client
                .set_mtls(pb::SetMtlsRequest {
                    namespace: args.namespace.clone(),
                    service: service.clone(),
                    mode: wire as i32,
                })
                .await
                .map_err(|s| status_error("", s))?
                .into_inner()
                .revision;
            println!("{service}: mtls {mode} at revision {revision}");
            Ok(())
        }
        RouteVerb::Clear { service } => {
            let revision = client
                .put_policy(pb::PutPolicyRequest {
                    namespace: args.namespace.clone(),
                    service: service.clone(),
                    policy: None,
                })
                .await
                .map_err(|s| status_error("", s))?
                .into_inner()
                .revision;
            println!("policy of {service} cleared at revision {revision}");
            Ok(())
        }
        RouteVerb::History { service } => {
            let records = client
                .policy_history(pb::PolicyHistoryRequest {
                    namespace: args.namespace.clone(),
                    service: service.clone(),
                })
                .await
                .map_err(|s| status_error("", s))?
                .into_inner()
                .records;
            let docs: Vec<PolicyDoc> = records.iter().map(|r| doc(service, r)).collect();
            if args.output.output == Output::Json {
                return print_json(&docs);
            }
            if docs.is_empty() {
                println!("{service} has no recorded policy changes");
                return Ok(());
            }
            println!(
                "{:<9} {:<21} {:<16} {:<7} {:<24} RESILIENCE",
                "REVISION", "TIME", "REASON", "ROUTES", "DEFAULT SPLIT"
            );
            for (d, r) in docs.iter().zip(&records) {
                let split = if r.policy.is_none() {
                    "(cleared)".to_string()
                } else {
                    d.default_split.clone()
                };
                let resilience = if r.policy.is_none() {
                    String::new()
                } else {
                    d.resilience_summary.clone()
                };
                println!(
                    "{:<9} {:<21} {:<16} {:<7} {:<24} {}",
                    d.revision,
                    d.updated_at,
                    d.reason,
                    d.routes.len(),
                    split,
                    resilience
                );
            }
            Ok(())
        }
        RouteVerb::Rollback {
            service,
            to_revision,
        } => {
            let r = client
                .rollback_policy(pb::RollbackPolicyRequest {
                    namespace: args.namespace.clone(),
                    service: service.clone(),
                    to_revision: to_revision.unwrap_or(0),
                })
                .await
                .map_err(|s| status_error("", s))?
                .into_inner();
            eprintln!(
                "policy of {service} {} at revision {}",
                r.restored
                    .as_ref()
                    .map_or("restored".to_string(), |x| x.reason.clone()),
                r.revision
            );
            show(&mut client, &args, service).await
        }
    }
}
