//! Every write request's edge checks, as the gRPC handlers run them before proposing:
//! the first byte picks the request (Register, PutPolicy, rollout Start, CreateToken,
//! KvPut), the rest is its protobuf encoding, decoded with prost and handed to the same
//! function the handler calls (`switchyard_registry::api::*`).
//!
//! Never a panic. What passes is consistent: the domain value it produced converts back
//! to the wire and through the checks again to itself (conversion is idempotent) and
//! passes the model's own validation; its command survives the log's encoding; and it
//! applies to the catalog it was checked against without a panic (a policy that passed
//! `check_policy` applies).
#![no_main]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_core::convert::{
    instance_from_proto, instance_to_proto, policy_from_proto, policy_to_proto,
    rollout_spec_from_proto, rollout_spec_to_proto,
};
use switchyard_core::model::acl::{validate_description, validate_rules, Rule};
use switchyard_core::model::kv::validate_kv_key;
use switchyard_core::model::policy::{validate_policy, Fallback, Policy, Split};
use switchyard_core::model::rollout::{validate_spec, Rollout, RolloutStatus};
use switchyard_core::model::{validate_instance, validate_namespace, Instance, State};
use switchyard_proto::v1 as pb;
use switchyard_registry::api::{
    kv_put_command, put_policy_command, register_command, start_spec, token_of,
};
use switchyard_registry::catalog::{Catalog, Command, Limits, RolloutPolicy};
use switchyard_registry::raft::{decode, encode};

fn instance(service: &str, id: &str, version: &str) -> Instance {
    Instance {
        namespace: "default".into(),
        service: service.into(),
        id: id.into(),
        address: "10.0.0.1".into(),
        port: 8080,
        version: version.into(),
        labels: Default::default(),
        weight: 100,
        zone: String::new(),
        state: State::Serving,
        mesh_port: 0,
    }
}

/// The catalog the requests are checked against: `web` at 1.0.0 (two instances) and
/// 2.0.0, `db` at 5, a policy on `db`, and a key.
fn catalog() -> &'static Catalog {
    static C: OnceLock<Catalog> = OnceLock::new();
    C.get_or_init(|| {
        let mut c = Catalog::new(Limits::default());
        let commands = [
            Command::Register {
                instance: instance("web", "w1", "1.0.0"),
                ttl_seconds: 10,
                lease_id: None,
            },
            Command::Register {
                instance: instance("web", "w2", "1.0.0"),
                ttl_seconds: 10,
                lease_id: None,
            },
            Command::Register {
                instance: instance("web", "w3", "2.0.0"),
                ttl_seconds: 10,
                lease_id: None,
            },
            Command::Register {
                instance: instance("db", "d1", "5"),
                ttl_seconds: 10,
                lease_id: None,
            },
            Command::PutPolicy {
                namespace: "default".into(),
                service: "db".into(),
                policy: Some(Policy {
                    subsets: Vec::new(),
                    routes: Vec::new(),
                    default_split: vec![Split {
                        subset: "5".into(),
                        weight: 1,
                    }],
                    fallback: Fallback::Default,
                    sticky_header: String::new(),
                    resilience: Default::default(),
                }),
                at_ms: 1_700_000_000_000,
            },
            Command::KvPut {
                namespace: "default".into(),
                key: "config/web".into(),
                value: b"on".to_vec(),
                flags: 0,
                cas: None,
            },
        ];
        for (i, command) in commands.iter().enumerate() {
            let applied = c.apply_next(i as u64 + 1, command);
            assert!(applied.reply.is_ok(), "{command:?}");
        }
        c
    })
}

/// A command as the log carries it: encoded and decoded, it is the same command.
fn logged(command: &Command) {
    let bytes = encode(command).expect("a command encodes");
    let back: Command = decode(&bytes).expect("an encoded command decodes");
    assert_eq!(&back, command, "the log's encoding keeps the command");
}

/// Applies `command` to a copy of the catalog, as the state machine would once committed.
fn apply(command: &Command) -> bool {
    let mut c = catalog().clone();
    c.apply_next(1_000, command).reply.is_ok()
}

fn register(bytes: &[u8]) {
    let Ok(req) = pb::RegisterRequest::decode(bytes) else {
        return;
    };
    let Ok(command) = register_command(req) else {
        return;
    };
    let Command::Register { instance, .. } = &command else {
        panic!("Register made {command:?}");
    };
    let again = instance_from_proto(instance_to_proto(instance)).expect("a valid instance");
    assert_eq!(&again, instance, "conversion is idempotent");
    let revalidated =
        validate_instance(instance.clone(), u32::from(instance.port), instance.weight)
            .expect("revalidates");
    assert_eq!(&revalidated, instance);
    logged(&command);
    apply(&command);
}

fn put_policy(bytes: &[u8]) {
    let Ok(req) = pb::PutPolicyRequest::decode(bytes) else {
        return;
    };
    let catalog = catalog();
    let Ok(command) = put_policy_command(|| catalog, req, 1_700_000_000_000) else {
        return;
    };
    let Command::PutPolicy {
        namespace,
        service,
        policy,
        ..
    } = &command
    else {
        panic!("PutPolicy made {command:?}");
    };
    if let Some(policy) = policy {
        let again = policy_from_proto(policy_to_proto(policy)).expect("a valid policy");
        assert_eq!(&again, policy, "conversion is idempotent");
        let versions: BTreeSet<String> = catalog
            .resolve(namespace, service, "")
            .iter()
            .map(|i| i.version.clone())
            .collect();
        validate_policy(policy, &versions).expect("revalidates");
    }
    logged(&command);
    assert!(apply(&command), "a policy check_policy let through applies");
}

fn start_rollout(bytes: &[u8]) {
    let Ok(req) = pb::StartRolloutRequest::decode(bytes) else {
        return;
    };
    let catalog = catalog();
    let Ok((namespace, spec)) = start_spec(|| catalog, &req.namespace, &req.service, req.spec)
    else {
        return;
    };
    let again = rollout_spec_from_proto(rollout_spec_to_proto(&spec)).expect("a valid spec");
    assert_eq!(again, spec, "conversion is idempotent");
    validate_spec(&spec).expect("revalidates");
    // What the handler proposes.
    let base = catalog
        .policy(&namespace, &req.service)
        .map_or(0, |r| r.revision);
    let command = Command::PutRollout {
        rollout: Box::new(Rollout {
            namespace: namespace.clone(),
            service: req.service.clone(),
            spec,
            status: RolloutStatus::pending(0, 1_700_000_000_000, base),
        }),
        expected_generation: catalog.rollout_generation(&namespace, &req.service),
        start: true,
        policy: RolloutPolicy::Keep,
        at_ms: 1_700_000_000_000,
    };
    logged(&command);
    apply(&command);
}

fn create_token(bytes: &[u8]) {
    let Ok(req) = pb::CreateTokenRequest::decode(bytes) else {
        return;
    };
    let Ok((token, secret)) = token_of(req) else {
        return;
    };
    assert!(!secret.is_empty());
    assert!(
        token.secret_hash.matches(&secret),
        "the secret is the token's"
    );
    validate_rules(&token.rules).expect("revalidates");
    validate_description(&token.description).expect("revalidates");
    // A rule as shown (TokenInfo.rules) parses back to itself.
    for rule in &token.rules {
        let text = rule.to_string();
        assert_eq!(
            &Rule::parse(&text).expect("a shown rule parses"),
            rule,
            "{text}"
        );
    }
    let command = Command::PutToken {
        token: Box::new(token),
    };
    logged(&command);
    apply(&command);
}

fn kv_put(bytes: &[u8]) {
    let Ok(req) = pb::KvPutRequest::decode(bytes) else {
        return;
    };
    let Ok(namespace) = validate_namespace("namespace", &req.namespace) else {
        return;
    };
    let Ok(command) = kv_put_command(namespace, &req.key, req.value, req.flags, req.cas) else {
        return;
    };
    let Command::KvPut { key, .. } = &command else {
        panic!("KvPut made {command:?}");
    };
    validate_kv_key("key", key).expect("revalidates");
    logged(&command);
    apply(&command);
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => register(bytes),
        1 => put_policy(bytes),
        2 => start_rollout(bytes),
        3 => create_token(bytes),
        _ => kv_put(bytes),
    }
});
