//! Conversions between switchyard.v1 messages and domain types, in one place.

use switchyard_proto::v1 as pb;

use std::sync::Arc;
use std::time::Duration;

use crate::model::policy::{Fallback, HeaderMatch, MatchKind, Route, Split, Subset};
use crate::model::{
    validate_instance, Change, Instance, InstanceRef, Policy, PolicyRecord, Resilience, RetryOn,
    ServiceSnapshot, ServiceSummary, State, ValidationError,
};

/// Reads a wire state. `STATE_UNSPECIFIED` becomes `default` (None = refuse it).
pub fn state_from_proto(
    field: &str,
    raw: i32,
    default: Option<State>,
) -> Result<State, ValidationError> {
    match pb::State::try_from(raw) {
        Ok(pb::State::Serving) => Ok(State::Serving),
        Ok(pb::State::Draining) => Ok(State::Draining),
        Ok(pb::State::Failing) => Ok(State::Failing),
        Ok(pb::State::Unspecified) => default
            .ok_or_else(|| ValidationError::new(field, "must be SERVING, DRAINING or FAILING")),
        Err(_) => Err(ValidationError::new(
            field,
            format!("{raw} is not a state: use SERVING, DRAINING or FAILING"),
        )),
    }
}

pub fn state_to_proto(state: State) -> pb::State {
    match state {
        State::Serving => pb::State::Serving,
        State::Draining => pb::State::Draining,
        State::Failing => pb::State::Failing,
    }
}

/// Validates a wire instance into a domain one.
pub fn instance_from_proto(p: pb::Instance) -> Result<Instance, ValidationError> {
    let state = state_from_proto("instance.state", p.state, Some(State::Serving))?;
    let mesh_port = u16::try_from(p.mesh_port).map_err(|_| {
        ValidationError::new(
            "instance.mesh_port",
            format!("{} is outside 1-65535 (0: not in the mesh)", p.mesh_port),
        )
    })?;
    let instance = Instance {
        namespace: p.namespace,
        service: p.service,
        id: p.id,
        address: p.address,
        port: 0,
        version: p.version,
        labels: p.labels.into_iter().collect(),
        weight: 0,
        zone: p.zone,
        state,
        mesh_port,
    };
    validate_instance(instance, p.port, p.weight)
}

pub fn instance_to_proto(i: &Instance) -> pb::Instance {
    pb::Instance {
        namespace: i.namespace.clone(),
        service: i.service.clone(),
        id: i.id.clone(),
        address: i.address.clone(),
        port: u32::from(i.port),
        version: i.version.clone(),
        labels: i
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        weight: i.weight,
        zone: i.zone.clone(),
        state: state_to_proto(i.state) as i32,
        mesh_port: u32::from(i.mesh_port),
    }
}

fn ref_to_proto(r: &InstanceRef) -> pb::InstanceRef {
    pb::InstanceRef {
        namespace: r.namespace.clone(),
        service: r.service.clone(),
        id: r.id.clone(),
    }
}

pub fn service_to_proto(v: &ServiceSnapshot) -> pb::ServiceState {
    pb::ServiceState {
        service: v.service.clone(),
        instances: v.instances.iter().map(|i| instance_to_proto(i)).collect(),
        policy: v.policy.as_deref().map(policy_to_proto),
    }
}

fn split_from_proto(v: Vec<pb::WeightedSubset>) -> Vec<Split> {
    v.into_iter()
        .map(|w| Split {
            subset: w.subset,
            weight: w.weight,
        })
        .collect()
}

fn split_to_proto(v: &[Split]) -> Vec<pb::WeightedSubset> {
    v.iter()
        .map(|s| pb::WeightedSubset {
            subset: s.subset.clone(),
            weight: s.weight,
        })
        .collect()
}

/// Reads a wire policy; shape errors (a header match with no kind, an unknown fallback)
/// are refused here, the rules by `validate_policy`.
pub fn policy_from_proto(p: pb::Policy) -> Result<Policy, ValidationError> {
    let fallback = match pb::Fallback::try_from(p.fallback) {
        Ok(pb::Fallback::Default) => Fallback::Default,
        Ok(pb::Fallback::Fail) => Fallback::Fail,
        Err(_) => {
            return Err(ValidationError::new(
                "policy.fallback",
                format!("{} is not FALLBACK_DEFAULT or FALLBACK_FAIL", p.fallback),
            ))
        }
    };
    let mut routes = Vec::with_capacity(p.routes.len());
    for (i, r) in p.routes.into_iter().enumerate() {
        let mut headers = Vec::with_capacity(r.headers.len());
        for (j, h) in r.headers.into_iter().enumerate() {
            use pb::header_match::Match;
            let kind = match h.r#match {
                Some(Match::Exact(v)) => MatchKind::Exact(v),
                Some(Match::Prefix(v)) => MatchKind::Prefix(v),
                Some(Match::Regex(v)) => MatchKind::Regex(v),
                Some(Match::Present(true)) => MatchKind::Present,
                Some(Match::Present(false)) | None => {
                    return Err(ValidationError::new(
                        format!("policy.routes[{i}].headers[{j}]"),
                        "set one of exact, prefix, regex or present=true",
                    ))
                }
            };
            headers.push(HeaderMatch { name: h.name, kind });
        }
        routes.push(Route {
            name: r.name,
            headers,
            split: split_from_proto(r.split),
            sticky_header: r.sticky_header,
            retryable: r.retryable,
        });
    }
    Ok(Policy {
        subsets: p
            .subsets
            .into_iter()
            .map(|s| Subset {
                name: s.name,
                version: s.version,
                version_range: s.version_range,
                labels: s.labels.into_iter().collect(),
            })
            .collect(),
        routes,
        default_split: split_from_proto(p.default_split),
        fallback,
        sticky_header: p.sticky_header,
        resilience: match p.resilience {
            Some(r) => resilience_from_proto(r)?,
            None => Resilience::default(),
        },
    })
}

/// Reads wire resilience settings: negative values and unknown `retry_on` names are
/// refused here, naming the field; the ranges by `validate_resilience`.
pub fn resilience_from_proto(r: pb::Resilience) -> Result<Resilience, ValidationError> {
    let field = |name: &str| format!("policy.resilience.{name}");
    let ms = |name: &str, v: Option<i64>| -> Result<Option<Duration>, ValidationError> {
        match v {
            None => Ok(None),
            Some(v) => u64::try_from(v)
                .map(|v| Some(Duration::from_millis(v)))
                .map_err(|_| ValidationError::new(field(name), format!("{v} is negative"))),
        }
    };
    let count = |name: &str, v: Option<i32>| -> Result<Option<u32>, ValidationError> {
        match v {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| ValidationError::new(field(name), format!("{v} is negative"))),
        }
    };
    let retry_on = if r.retry_on.is_empty() {
        None
    } else if r.retry_on.len() > crate::model::resilience::MAX_RETRY_ON {
        return Err(ValidationError::new(
            field("retry_on"),
            format!(
                "{} conditions, at most {}",
                r.retry_on.len(),
                crate::model::resilience::MAX_RETRY_ON
            ),
        ));
    } else {
        let mut on = Vec::with_capacity(r.retry_on.len());
        for name in &r.retry_on {
            let parsed = RetryOn::parse(name).ok_or_else(|| {
                ValidationError::new(
                    field("retry_on"),
                    format!("{:?} is not one of connect-failure, refused-stream, reset, 5xx, gateway-error, unavailable, resource-exhausted or an HTTP status 100-599", name.chars().take(64).collect::<String>()),
                )
            })?;
            if !on.contains(&parsed) {
                on.push(parsed);
            }
        }
        Some(on)
    };
    Ok(Resilience {
        timeout: ms("timeout_ms", r.timeout_ms)?,
        per_try_timeout: ms("per_try_timeout_ms", r.per_try_timeout_ms)?,
        retries: count("retries", r.retries)?,
        retry_on,
        retry_budget_percent: count("retry_budget_percent", r.retry_budget_percent)?,
        min_retries_per_second: count("min_retries_per_second", r.min_retries_per_second)?,
        max_connections: count("max_connections", r.max_connections)?,
        max_pending: count("max_pending", r.max_pending)?,
        max_requests: count("max_requests", r.max_requests)?,
        max_retries: count("max_retries", r.max_retries)?,
        slow_start: ms("slow_start_ms", r.slow_start_ms)?,
        eject_after: count("eject_after", r.eject_after)?,
        max_ejection_percent: count("max_ejection_percent", r.max_ejection_percent)?,
        panic_below_percent: count("panic_below_percent", r.panic_below_percent)?,
    })
}

pub fn resilience_to_proto(r: &Resilience) -> pb::Resilience {
    // Domain values are validated (at most an hour, at most a million), so they fit.
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis().min(i64::MAX as u128) as i64);
    let count = |v: Option<u32>| v.map(|v| v.min(i32::MAX as u32) as i32);
    pb::Resilience {
        timeout_ms: ms(r.timeout),
        per_try_timeout_ms: ms(r.per_try_timeout),
        retries: count(r.retries),
        retry_on: r.retry_on.iter().flatten().map(|o| o.name()).collect(),
        retry_budget_percent: count(r.retry_budget_percent),
        min_retries_per_second: count(r.min_retries_per_second),
        max_connections: count(r.max_connections),
        max_pending: count(r.max_pending),
        max_requests: count(r.max_requests),
        max_retries: count(r.max_retries),
        slow_start_ms: ms(r.slow_start),
        eject_after: count(r.eject_after),
        max_ejection_percent: count(r.max_ejection_percent),
        panic_below_percent: count(r.panic_below_percent),
    }
}

pub fn policy_to_proto(p: &Policy) -> pb::Policy {
    use pb::header_match::Match;
    pb::Policy {
        subsets: p
            .subsets
            .iter()
            .map(|s| pb::Subset {
                name: s.name.clone(),
                version: s.version.clone(),
                version_range: s.version_range.clone(),
                labels: s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect(),
        routes: p
            .routes
            .iter()
            .map(|r| pb::Route {
                name: r.name.clone(),
                headers: r
                    .headers
                    .iter()
                    .map(|h| pb::HeaderMatch {
                        name: h.name.clone(),
                        r#match: Some(match &h.kind {
                            MatchKind::Exact(v) => Match::Exact(v.clone()),
                            MatchKind::Prefix(v) => Match::Prefix(v.clone()),
                            MatchKind::Regex(v) => Match::Regex(v.clone()),
                            MatchKind::Present => Match::Present(true),
                        }),
                    })
                    .collect(),
                split: split_to_proto(&r.split),
                sticky_header: r.sticky_header.clone(),
                retryable: r.retryable,
            })
            .collect(),
        default_split: split_to_proto(&p.default_split),
        fallback: match p.fallback {
            Fallback::Default => pb::Fallback::Default as i32,
            Fallback::Fail => pb::Fallback::Fail as i32,
        },
        sticky_header: p.sticky_header.clone(),
        resilience: (!p.resilience.is_empty()).then(|| resilience_to_proto(&p.resilience)),
    }
}

pub fn record_to_proto(r: &PolicyRecord) -> pb::PolicyRecord {
    pb::PolicyRecord {
        revision: r.revision,
        updated_at_unix_ms: r.at_ms,
        policy: r.policy.as_deref().map(policy_to_proto),
        reason: r.reason.clone(),
    }
}

fn policy_state(service: &str, policy: &Option<Arc<Policy>>) -> pb::ServiceState {
    pb::ServiceState {
        service: service.to_string(),
        instances: Vec::new(),
        policy: policy.as_deref().map(policy_to_proto),
    }
}

pub fn snapshot_event(revision: u64, services: &[ServiceSnapshot]) -> pb::WatchEvent {
    pb::WatchEvent {
        revision,
        cluster_id: String::new(),
        kind: Some(pb::watch_event::Kind::Snapshot(pb::Snapshot {
            services: services.iter().map(service_to_proto).collect(),
        })),
        intentions: Vec::new(),
        trust_bundle: String::new(),
        mtls: Vec::new(),
        flags: None,
        kv: Vec::new(),
        kv_removed: Vec::new(),
        kv_snapshot: false,
    }
}

pub fn delta_event(change: &Change) -> pb::WatchEvent {
    pb::WatchEvent {
        revision: change.revision,
        cluster_id: String::new(),
        kind: Some(pb::watch_event::Kind::Delta(pb::Delta {
            upserted: change
                .upserted
                .iter()
                .map(|i| instance_to_proto(i))
                .collect(),
            removed: change.removed.iter().map(ref_to_proto).collect(),
            policies: change
                .policies
                .iter()
                .map(|p| policy_state(&p.service, &p.policy))
                .collect(),
        })),
        intentions: change
            .intentions
            .iter()
            .map(|c| destination_intentions(&c.destination, &c.intentions))
            .collect(),
        trust_bundle: change
            .trust_bundle
            .as_deref()
            .unwrap_or_default()
            .to_string(),
        mtls: change
            .mtls
            .iter()
            .map(|(_, service, strict)| mtls_setting(service, *strict))
            .collect(),
        flags: change.flags.last().map(|f| pb::FlagsDocument {
            document: f.document.to_string(),
            revision: f.revision,
        }),
        kv: change
            .kv
            .iter()
            .filter_map(|k| k.entry.as_deref())
            .map(kv_entry_to_proto)
            .collect(),
        kv_removed: change
            .kv
            .iter()
            .filter(|k| k.entry.is_none())
            .map(|k| k.key.clone())
            .collect(),
        kv_snapshot: false,
    }
}

/// A KV entry on the wire.
pub fn kv_entry_to_proto(e: &crate::model::kv::KvEntry) -> pb::KvEntry {
    pb::KvEntry {
        key: e.key.clone(),
        value: e.value.to_vec(),
        flags: e.flags,
        create_revision: e.create_revision,
        modify_revision: e.modify_revision,
    }
}

/// A service's mTLS mode on the wire.
pub fn mtls_setting(service: &str, strict: bool) -> pb::MtlsSetting {
    pb::MtlsSetting {
        service: service.to_string(),
        mode: mtls_mode(strict) as i32,
    }
}

pub fn mtls_mode(strict: bool) -> pb::MtlsMode {
    if strict {
        pb::MtlsMode::Strict
    } else {
        pb::MtlsMode::Permissive
    }
}

// Intentions.

use crate::model::intention::{Action, Intention, IntentionRecord};

pub fn action_to_proto(a: Option<Action>) -> pb::IntentionAction {
    match a {
        Some(Action::Allow) => pb::IntentionAction::Allow,
        Some(Action::Deny) => pb::IntentionAction::Deny,
        None => pb::IntentionAction::Unspecified,
    }
}

pub fn intention_to_proto(i: &Intention) -> pb::Intention {
    pb::Intention {
        source: i.source.clone(),
        destination: i.destination.clone(),
        action: action_to_proto(Some(i.action)) as i32,
        description: i.description.clone(),
        revision: i.revision,
        updated_ms: i.updated_ms,
    }
}

pub fn intention_record_to_proto(r: &IntentionRecord) -> pb::IntentionChange {
    pb::IntentionChange {
        revision: r.revision,
        at_ms: r.at_ms,
        source: r.source.clone(),
        destination: r.destination.clone(),
        action: action_to_proto(r.action) as i32,
        description: r.description.clone(),
    }
}

pub fn destination_intentions(destination: &str, rules: &[Intention]) -> pb::DestinationIntentions {
    pb::DestinationIntentions {
        destination: destination.to_string(),
        intentions: rules.iter().map(intention_to_proto).collect(),
    }
}

/// Validates a wire intention. Its revision and time come along as sent: the registry
/// sets its own when it applies a put, and a sidecar keeps the watched ones.
pub fn intention_from_proto(p: &pb::Intention) -> Result<Intention, ValidationError> {
    use crate::model::intention::{validate_description, validate_destination, validate_source};
    validate_source("intention.source", &p.source)?;
    validate_destination("intention.destination", &p.destination)?;
    validate_description("intention.description", &p.description)?;
    let action = match pb::IntentionAction::try_from(p.action) {
        Ok(pb::IntentionAction::Allow) => Action::Allow,
        Ok(pb::IntentionAction::Deny) => Action::Deny,
        _ => {
            return Err(ValidationError::new(
                "intention.action",
                "must be INTENTION_ACTION_ALLOW or INTENTION_ACTION_DENY",
            ))
        }
    };
    Ok(Intention {
        source: p.source.clone(),
        destination: p.destination.clone(),
        action,
        description: p.description.clone(),
        revision: p.revision,
        updated_ms: p.updated_ms,
    })
}

pub fn summary_to_proto(s: ServiceSummary) -> pb::ServiceSummary {
    pb::ServiceSummary {
        name: s.name,
        instance_count: s.instance_count,
        versions: s.versions,
    }
}

/// A refused field becomes `INVALID_ARGUMENT` with the message naming it.
impl From<ValidationError> for tonic::Status {
    fn from(e: ValidationError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

// Rollouts.

use crate::gate::error_rate_upper_bound;
use crate::model::rollout::{
    Counts, OnInsufficientTraffic, PauseReason, Phase, Rollout, RolloutSpec,
};
use crate::model::webhook::Webhook;

/// A spec as sent; zero fields take their defaults, then the whole is validated.
pub fn rollout_spec_from_proto(p: pb::RolloutSpec) -> Result<RolloutSpec, ValidationError> {
    let webhooks = p
        .webhooks
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let kind = w.r#type.parse().map_err(|e: String| {
                ValidationError::new(format!("rollout.webhooks[{i}].type"), e)
            })?;
            Ok(Webhook { kind, url: w.url })
        })
        .collect::<Result<Vec<_>, ValidationError>>()?;
    let on_insufficient_traffic = match pb::InsufficientTraffic::try_from(p.on_insufficient_traffic)
    {
        Ok(pb::InsufficientTraffic::Unspecified) | Ok(pb::InsufficientTraffic::Pause) => {
            OnInsufficientTraffic::Pause
        }
        Ok(pb::InsufficientTraffic::Promote) => OnInsufficientTraffic::Promote,
        Ok(pb::InsufficientTraffic::Abort) => OnInsufficientTraffic::Abort,
        Err(_) => {
            return Err(ValidationError::new(
                "rollout.on_insufficient_traffic",
                format!("unknown value {}", p.on_insufficient_traffic),
            ))
        }
    };
    let spec = RolloutSpec {
        canary: p.canary,
        baseline: p.baseline,
        steps: p.steps,
        pause_ms: p.pause_ms,
        interval_ms: p.interval_ms,
        alpha: p.alpha,
        tolerance: p.tolerance,
        min_requests: p.min_requests,
        latency_slo_ms: p.latency_slo_ms,
        step_deadline_ms: p.step_deadline_ms,
        manual_promotion: p.manual_promotion,
        on_insufficient_traffic,
        max_error_rate: (p.max_error_rate != 0.0).then_some(p.max_error_rate),
        max_p99_ms: (p.max_p99_ms != 0).then_some(p.max_p99_ms),
        webhooks,
    }
    .with_defaults();
    crate::model::rollout::validate_spec(&spec)?;
    Ok(spec)
}

pub fn rollout_spec_to_proto(s: &RolloutSpec) -> pb::RolloutSpec {
    pb::RolloutSpec {
        canary: s.canary.clone(),
        baseline: s.baseline.clone(),
        steps: s.steps.clone(),
        pause_ms: s.pause_ms,
        interval_ms: s.interval_ms,
        alpha: s.alpha,
        tolerance: s.tolerance,
        min_requests: s.min_requests,
        latency_slo_ms: s.latency_slo_ms,
        step_deadline_ms: s.step_deadline_ms,
        manual_promotion: s.manual_promotion,
        on_insufficient_traffic: match s.on_insufficient_traffic {
            OnInsufficientTraffic::Pause => pb::InsufficientTraffic::Pause,
            OnInsufficientTraffic::Promote => pb::InsufficientTraffic::Promote,
            OnInsufficientTraffic::Abort => pb::InsufficientTraffic::Abort,
        } as i32,
        max_error_rate: s.max_error_rate.unwrap_or(0.0),
        max_p99_ms: s.max_p99_ms.unwrap_or(0),
        webhooks: s
            .webhooks
            .iter()
            .map(|w| pb::Webhook {
                r#type: w.kind.as_str().to_string(),
                url: w.url.clone(),
            })
            .collect(),
    }
}

fn counts_to_proto(c: &Counts) -> pb::RolloutCounts {
    pb::RolloutCounts {
        requests: c.requests,
        errors: c.errors,
        slow: c.slow,
    }
}

pub fn phase_to_proto(p: Phase) -> pb::RolloutPhase {
    match p {
        Phase::Pending => pb::RolloutPhase::Pending,
        Phase::Initializing => pb::RolloutPhase::Initializing,
        Phase::Progressing => pb::RolloutPhase::Progressing,
        Phase::Promoting => pb::RolloutPhase::Promoting,
        Phase::Succeeded => pb::RolloutPhase::Succeeded,
        Phase::Paused => pb::RolloutPhase::Paused,
        Phase::Aborting => pb::RolloutPhase::Aborting,
        Phase::Aborted => pb::RolloutPhase::Aborted,
        Phase::Superseded => pb::RolloutPhase::Superseded,
    }
}

fn pause_reason_to_proto(r: Option<PauseReason>) -> pb::PauseReason {
    match r {
        None => pb::PauseReason::Unspecified,
        Some(PauseReason::Manual) => pb::PauseReason::Manual,
        Some(PauseReason::InsufficientTraffic) => pb::PauseReason::InsufficientTraffic,
        Some(PauseReason::NoCanaryEndpoints) => pb::PauseReason::NoCanaryEndpoints,
        Some(PauseReason::WaitingForGate) => pb::PauseReason::WaitingForGate,
    }
}

/// A rollout as clients see it, with the evidence worked out (E values, the 95 % upper
/// bound on the canary's error rate).
pub fn rollout_to_proto(r: &Rollout) -> pb::Rollout {
    let s = &r.status;
    pb::Rollout {
        namespace: r.namespace.clone(),
        service: r.service.clone(),
        spec: Some(rollout_spec_to_proto(&r.spec)),
        status: Some(pb::RolloutStatus {
            phase: phase_to_proto(s.phase) as i32,
            pause_reason: pause_reason_to_proto(s.pause_reason) as i32,
            step: s.step,
            weight: s.weight,
            message: s.message.clone(),
            generation: s.generation,
            started_at_ms: s.started_at_ms,
            updated_at_ms: s.updated_at_ms,
            step_started_at_ms: s.step_started_at_ms,
            evidence: Some(pb::RolloutEvidence {
                canary: Some(counts_to_proto(&s.canary)),
                baseline: Some(counts_to_proto(&s.baseline)),
                step_canary: Some(counts_to_proto(&s.step_canary)),
                step_baseline: Some(counts_to_proto(&s.step_baseline)),
                error_e: r.error_evidence().e_value(),
                slow_e: r.slow_evidence().e_value(),
                canary_error_rate_upper_95: error_rate_upper_bound(
                    s.canary.requests,
                    s.canary.errors,
                    0.95,
                ),
                canary_p99_ms: s.canary_p99_ms,
                baseline_p99_ms: s.baseline_p99_ms,
                failed_checks: s.failed_checks,
            }),
            base_policy_revision: s.base_policy_revision,
        }),
    }
}
