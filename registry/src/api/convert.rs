//! Conversions between switchyard.v1 messages and domain types, in one place.

use switchyard_proto::v1 as pb;

use crate::model::{
    validate_instance, Change, Instance, InstanceRef, ServiceSummary, ServiceView, State,
    ValidationError,
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
    }
}

fn ref_to_proto(r: &InstanceRef) -> pb::InstanceRef {
    pb::InstanceRef {
        namespace: r.namespace.clone(),
        service: r.service.clone(),
        id: r.id.clone(),
    }
}

pub fn service_to_proto(v: &ServiceView) -> pb::ServiceState {
    pb::ServiceState {
        service: v.service.clone(),
        instances: v.instances.iter().map(|i| instance_to_proto(i)).collect(),
    }
}

pub fn snapshot_event(revision: u64, services: &[ServiceView]) -> pb::WatchEvent {
    pb::WatchEvent {
        revision,
        kind: Some(pb::watch_event::Kind::Snapshot(pb::Snapshot {
            services: services.iter().map(service_to_proto).collect(),
        })),
    }
}

pub fn delta_event(change: &Change) -> pb::WatchEvent {
    pb::WatchEvent {
        revision: change.revision,
        kind: Some(pb::watch_event::Kind::Delta(pb::Delta {
            upserted: change
                .upserted
                .iter()
                .map(|i| instance_to_proto(i))
                .collect(),
            removed: change.removed.iter().map(ref_to_proto).collect(),
        })),
    }
}

pub fn summary_to_proto(s: ServiceSummary) -> pb::ServiceSummary {
    pb::ServiceSummary {
        name: s.name,
        instance_count: s.instance_count,
        versions: s.versions,
    }
}
