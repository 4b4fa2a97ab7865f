//! The log's and snapshots' older forms, so a data dir written by an earlier release
//! still opens.
//!
//! postcard is not self-describing: a struct that gains a field no longer reads its old
//! bytes. So the current types are written as they are, and what was written before a
//! change is read through a mirror of the old shape here:
//!
//! - [`PolicyV1`]: a policy before it carried resilience settings and its routes could
//!   be marked retryable ([`RouteV1`]). Log entries keep
//!   their old variant (`PutPolicy` at its old place, read as `PolicyV1`); new ones are
//!   written as the variant appended last (`PutPolicyV2`). [`Command`] itself has one
//!   `PutPolicy`: the wire enums below exist only on the way to and from bytes.
//! - [`Instance::mesh_port`] is not in the instance's serde form, so an instance reads
//!   and writes the bytes it always did. A registration with a mesh port is written as
//!   `RegisterMesh` (appended last) and a snapshot keeps the ports in its `mesh_ports`
//!   section; a registration without one stays `Register`, which every release reads.
//! - snapshots: see [`crate::catalog::persist`] for the versions of the catalog's form.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::command::Command;
use super::rollouts::RolloutPolicy;
use crate::model::acl::Token;
use crate::model::policy::{Fallback, HeaderMatch, Route, Split, Subset};
use crate::model::rollout::Rollout;
use crate::model::{Instance, LeaseId, Policy, PolicyRecord, Resilience, State};

/// A route as written before routes could be marked retryable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteV1 {
    pub name: String,
    pub headers: Vec<HeaderMatch>,
    pub split: Vec<Split>,
    pub sticky_header: String,
}

/// A policy as written before resilience settings (and retryable routes) existed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyV1 {
    pub subsets: Vec<Subset>,
    pub routes: Vec<RouteV1>,
    pub default_split: Vec<Split>,
    pub fallback: Fallback,
    pub sticky_header: String,
}

impl From<PolicyV1> for Policy {
    fn from(p: PolicyV1) -> Self {
        Policy {
            subsets: p.subsets,
            routes: p
                .routes
                .into_iter()
                .map(|r| Route {
                    name: r.name,
                    headers: r.headers,
                    split: r.split,
                    sticky_header: r.sticky_header,
                    retryable: false,
                })
                .collect(),
            default_split: p.default_split,
            fallback: p.fallback,
            sticky_header: p.sticky_header,
            resilience: Resilience::default(),
        }
    }
}

impl From<&Policy> for PolicyV1 {
    /// The old shape of a current policy (its resilience dropped): for tests that write
    /// what an older release wrote.
    fn from(p: &Policy) -> Self {
        PolicyV1 {
            subsets: p.subsets.clone(),
            routes: p
                .routes
                .iter()
                .map(|r| RouteV1 {
                    name: r.name.clone(),
                    headers: r.headers.clone(),
                    split: r.split.clone(),
                    sticky_header: r.sticky_header.clone(),
                })
                .collect(),
            default_split: p.default_split.clone(),
            fallback: p.fallback,
            sticky_header: p.sticky_header.clone(),
        }
    }
}

/// A history record as written before resilience settings existed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecordV1 {
    pub revision: u64,
    pub at_ms: u64,
    pub policy: Option<Arc<PolicyV1>>,
    pub reason: String,
}

impl From<PolicyRecordV1> for PolicyRecord {
    fn from(r: PolicyRecordV1) -> Self {
        PolicyRecord {
            revision: r.revision,
            at_ms: r.at_ms,
            policy: r.policy.map(|p| Arc::new(Policy::from((*p).clone()))),
            reason: r.reason,
        }
    }
}

impl From<&PolicyRecord> for PolicyRecordV1 {
    fn from(r: &PolicyRecord) -> Self {
        PolicyRecordV1 {
            revision: r.revision,
            at_ms: r.at_ms,
            policy: r.policy.as_deref().map(|p| Arc::new(PolicyV1::from(p))),
            reason: r.reason.clone(),
        }
    }
}

/// [`Command`] as it is read from bytes: every variant ever written, in the order they
/// were added (postcard names a variant by its place).
#[derive(Deserialize)]
enum CommandIn {
    Register {
        instance: Instance,
        ttl_seconds: u32,
        lease_id: Option<LeaseId>,
    },
    Deregister {
        namespace: String,
        id: String,
    },
    SetState {
        namespace: String,
        id: String,
        state: State,
    },
    ExpireLeases {
        leases: Vec<(LeaseId, u64)>,
    },
    CheckpointLeases {
        leases: Vec<(LeaseId, u64, u64)>,
    },
    PutPolicyV1 {
        namespace: String,
        service: String,
        policy: Option<PolicyV1>,
        at_ms: u64,
    },
    RollbackPolicy {
        namespace: String,
        service: String,
        to_revision: u64,
        at_ms: u64,
    },
    Batch(Vec<Command>),
    InitCluster {
        id: String,
    },
    PutPolicyV2 {
        namespace: String,
        service: String,
        policy: Option<Policy>,
        at_ms: u64,
    },
    PutRollout {
        rollout: Box<Rollout>,
        expected_generation: u64,
        start: bool,
        policy: RolloutPolicy,
        at_ms: u64,
    },
    AclBootstrap {
        token: Box<Token>,
    },
    PutToken {
        token: Box<Token>,
    },
    DeleteToken {
        accessor_id: String,
    },
    InitMeshCa {
        ca: Box<crate::model::mesh_ca::MeshCa>,
    },
    RegisterMesh {
        instance: Instance,
        ttl_seconds: u32,
        lease_id: Option<LeaseId>,
        mesh_port: u16,
    },
    PutIntention {
        namespace: String,
        intention: crate::model::intention::Intention,
        at_ms: u64,
    },
    DeleteIntention {
        namespace: String,
        source: String,
        destination: String,
        at_ms: u64,
    },
    RotateMeshCa {
        root: Box<crate::model::mesh_ca::CaRoot>,
        activate_at_ms: u64,
        retire_at_ms: u64,
        at_ms: u64,
    },
    SetMtls {
        namespace: String,
        service: String,
        strict: bool,
    },
    KvPut {
        namespace: String,
        key: String,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    },
    KvDelete {
        namespace: String,
        key: String,
        recurse: bool,
        cas: Option<u64>,
    },
    PutFlags {
        namespace: String,
        document: String,
        expected_revision: Option<u64>,
        at_ms: u64,
    },
    RollbackFlags {
        namespace: String,
        to_revision: u64,
        at_ms: u64,
    },
    /// The first kind of format 2 (see [`super::format`]).
    SetClusterFormat {
        format: u32,
    },
}

/// [`Command`] as it is written: borrowed, so encoding copies nothing. Variants in the
/// same places as [`CommandIn`]; `PutPolicyV1` is never written again.
#[derive(Serialize)]
enum CommandOut<'a> {
    Register {
        instance: &'a Instance,
        ttl_seconds: u32,
        lease_id: Option<LeaseId>,
    },
    Deregister {
        namespace: &'a str,
        id: &'a str,
    },
    SetState {
        namespace: &'a str,
        id: &'a str,
        state: State,
    },
    ExpireLeases {
        leases: &'a [(LeaseId, u64)],
    },
    CheckpointLeases {
        leases: &'a [(LeaseId, u64, u64)],
    },
    #[allow(dead_code)]
    PutPolicyV1 {},
    RollbackPolicy {
        namespace: &'a str,
        service: &'a str,
        to_revision: u64,
        at_ms: u64,
    },
    Batch(&'a [Command]),
    InitCluster {
        id: &'a str,
    },
    PutPolicyV2 {
        namespace: &'a str,
        service: &'a str,
        policy: &'a Option<Policy>,
        at_ms: u64,
    },
    PutRollout {
        rollout: &'a Rollout,
        expected_generation: u64,
        start: bool,
        policy: &'a RolloutPolicy,
        at_ms: u64,
    },
    AclBootstrap {
        token: &'a Token,
    },
    PutToken {
        token: &'a Token,
    },
    DeleteToken {
        accessor_id: &'a str,
    },
    InitMeshCa {
        ca: &'a crate::model::mesh_ca::MeshCa,
    },
    /// A registration with a mesh port, which [`Instance`]'s serde form leaves out.
    /// Written only when the port is set, so a release without mesh ports still reads
    /// every registration of an instance outside the mesh.
    RegisterMesh {
        instance: &'a Instance,
        ttl_seconds: u32,
        lease_id: Option<LeaseId>,
        mesh_port: u16,
    },
    PutIntention {
        namespace: &'a str,
        intention: &'a crate::model::intention::Intention,
        at_ms: u64,
    },
    DeleteIntention {
        namespace: &'a str,
        source: &'a str,
        destination: &'a str,
        at_ms: u64,
    },
    RotateMeshCa {
        root: &'a crate::model::mesh_ca::CaRoot,
        activate_at_ms: u64,
        retire_at_ms: u64,
        at_ms: u64,
    },
    SetMtls {
        namespace: &'a str,
        service: &'a str,
        strict: bool,
    },
    KvPut {
        namespace: &'a str,
        key: &'a str,
        #[serde(with = "serde_bytes_ref")]
        value: &'a [u8],
        flags: u64,
        cas: Option<u64>,
    },
    KvDelete {
        namespace: &'a str,
        key: &'a str,
        recurse: bool,
        cas: Option<u64>,
    },
    PutFlags {
        namespace: &'a str,
        document: &'a str,
        expected_revision: Option<u64>,
        at_ms: u64,
    },
    RollbackFlags {
        namespace: &'a str,
        to_revision: u64,
        at_ms: u64,
    },
    SetClusterFormat {
        format: u32,
    },
}

/// A KV value written as a sequence of bytes, the form `Vec<u8>` reads back.
mod serde_bytes_ref {
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &&[u8], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter())
    }
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let out = match self {
            Command::Register {
                instance,
                ttl_seconds,
                lease_id,
            } if instance.mesh_port != 0 => CommandOut::RegisterMesh {
                instance,
                ttl_seconds: *ttl_seconds,
                lease_id: *lease_id,
                mesh_port: instance.mesh_port,
            },
            Command::Register {
                instance,
                ttl_seconds,
                lease_id,
            } => CommandOut::Register {
                instance,
                ttl_seconds: *ttl_seconds,
                lease_id: *lease_id,
            },
            Command::Deregister { namespace, id } => CommandOut::Deregister { namespace, id },
            Command::SetState {
                namespace,
                id,
                state,
            } => CommandOut::SetState {
                namespace,
                id,
                state: *state,
            },
            Command::ExpireLeases { leases } => CommandOut::ExpireLeases { leases },
            Command::CheckpointLeases { leases } => CommandOut::CheckpointLeases { leases },
            Command::PutPolicy {
                namespace,
                service,
                policy,
                at_ms,
            } => CommandOut::PutPolicyV2 {
                namespace,
                service,
                policy,
                at_ms: *at_ms,
            },
            Command::RollbackPolicy {
                namespace,
                service,
                to_revision,
                at_ms,
            } => CommandOut::RollbackPolicy {
                namespace,
                service,
                to_revision: *to_revision,
                at_ms: *at_ms,
            },
            Command::Batch(commands) => CommandOut::Batch(commands),
            Command::InitCluster { id } => CommandOut::InitCluster { id },
            Command::PutRollout {
                rollout,
                expected_generation,
                start,
                policy,
                at_ms,
            } => CommandOut::PutRollout {
                rollout,
                expected_generation: *expected_generation,
                start: *start,
                policy,
                at_ms: *at_ms,
            },
            Command::AclBootstrap { token } => CommandOut::AclBootstrap { token },
            Command::PutToken { token } => CommandOut::PutToken { token },
            Command::DeleteToken { accessor_id } => CommandOut::DeleteToken { accessor_id },
            Command::InitMeshCa { ca } => CommandOut::InitMeshCa { ca },
            Command::PutIntention {
                namespace,
                intention,
                at_ms,
            } => CommandOut::PutIntention {
                namespace,
                intention,
                at_ms: *at_ms,
            },
            Command::DeleteIntention {
                namespace,
                source,
                destination,
                at_ms,
            } => CommandOut::DeleteIntention {
                namespace,
                source,
                destination,
                at_ms: *at_ms,
            },
            Command::RotateMeshCa {
                root,
                activate_at_ms,
                retire_at_ms,
                at_ms,
            } => CommandOut::RotateMeshCa {
                root,
                activate_at_ms: *activate_at_ms,
                retire_at_ms: *retire_at_ms,
                at_ms: *at_ms,
            },
            Command::SetMtls {
                namespace,
                service,
                strict,
            } => CommandOut::SetMtls {
                namespace,
                service,
                strict: *strict,
            },
            Command::KvPut {
                namespace,
                key,
                value,
                flags,
                cas,
            } => CommandOut::KvPut {
                namespace,
                key,
                value,
                flags: *flags,
                cas: *cas,
            },
            Command::KvDelete {
                namespace,
                key,
                recurse,
                cas,
            } => CommandOut::KvDelete {
                namespace,
                key,
                recurse: *recurse,
                cas: *cas,
            },
            Command::PutFlags {
                namespace,
                document,
                expected_revision,
                at_ms,
            } => CommandOut::PutFlags {
                namespace,
                document,
                expected_revision: *expected_revision,
                at_ms: *at_ms,
            },
            Command::RollbackFlags {
                namespace,
                to_revision,
                at_ms,
            } => CommandOut::RollbackFlags {
                namespace,
                to_revision: *to_revision,
                at_ms: *at_ms,
            },
            Command::SetClusterFormat { format } => {
                CommandOut::SetClusterFormat { format: *format }
            }
        };
        out.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match d.deserialize_enum("Command", &[], KindCheck)? {
            CommandIn::Register {
                instance,
                ttl_seconds,
                lease_id,
            } => Command::Register {
                instance,
                ttl_seconds,
                lease_id,
            },
            CommandIn::Deregister { namespace, id } => Command::Deregister { namespace, id },
            CommandIn::SetState {
                namespace,
                id,
                state,
            } => Command::SetState {
                namespace,
                id,
                state,
            },
            CommandIn::ExpireLeases { leases } => Command::ExpireLeases { leases },
            CommandIn::CheckpointLeases { leases } => Command::CheckpointLeases { leases },
            CommandIn::PutPolicyV1 {
                namespace,
                service,
                policy,
                at_ms,
            } => Command::PutPolicy {
                namespace,
                service,
                policy: policy.map(Policy::from),
                at_ms,
            },
            CommandIn::PutPolicyV2 {
                namespace,
                service,
                policy,
                at_ms,
            } => Command::PutPolicy {
                namespace,
                service,
                policy,
                at_ms,
            },
            CommandIn::RollbackPolicy {
                namespace,
                service,
                to_revision,
                at_ms,
            } => Command::RollbackPolicy {
                namespace,
                service,
                to_revision,
                at_ms,
            },
            CommandIn::Batch(commands) => Command::Batch(commands),
            CommandIn::InitCluster { id } => Command::InitCluster { id },
            CommandIn::PutRollout {
                rollout,
                expected_generation,
                start,
                policy,
                at_ms,
            } => Command::PutRollout {
                rollout,
                expected_generation,
                start,
                policy,
                at_ms,
            },
            CommandIn::AclBootstrap { token } => Command::AclBootstrap { token },
            CommandIn::PutToken { token } => Command::PutToken { token },
            CommandIn::DeleteToken { accessor_id } => Command::DeleteToken { accessor_id },
            CommandIn::InitMeshCa { ca } => Command::InitMeshCa { ca },
            CommandIn::RegisterMesh {
                mut instance,
                ttl_seconds,
                lease_id,
                mesh_port,
            } => {
                instance.mesh_port = mesh_port;
                Command::Register {
                    instance,
                    ttl_seconds,
                    lease_id,
                }
            }
            CommandIn::PutIntention {
                namespace,
                intention,
                at_ms,
            } => Command::PutIntention {
                namespace,
                intention,
                at_ms,
            },
            CommandIn::DeleteIntention {
                namespace,
                source,
                destination,
                at_ms,
            } => Command::DeleteIntention {
                namespace,
                source,
                destination,
                at_ms,
            },
            CommandIn::RotateMeshCa {
                root,
                activate_at_ms,
                retire_at_ms,
                at_ms,
            } => Command::RotateMeshCa {
                root,
                activate_at_ms,
                retire_at_ms,
                at_ms,
            },
            CommandIn::SetMtls {
                namespace,
                service,
                strict,
            } => Command::SetMtls {
                namespace,
                service,
                strict,
            },
            CommandIn::KvPut {
                namespace,
                key,
                value,
                flags,
                cas,
            } => Command::KvPut {
                namespace,
                key,
                value,
                flags,
                cas,
            },
            CommandIn::KvDelete {
                namespace,
                key,
                recurse,
                cas,
            } => Command::KvDelete {
                namespace,
                key,
                recurse,
                cas,
            },
            CommandIn::PutFlags {
                namespace,
                document,
                expected_revision,
                at_ms,
            } => Command::PutFlags {
                namespace,
                document,
                expected_revision,
                at_ms,
            },
            CommandIn::RollbackFlags {
                namespace,
                to_revision,
                at_ms,
            } => Command::RollbackFlags {
                namespace,
                to_revision,
                at_ms,
            },
            CommandIn::SetClusterFormat { format } => Command::SetClusterFormat { format },
        })
    }
}

/// Reads a command's kind (its variant index) first: a kind this release does not know
/// is noted for [`super::format::take_unknown`] (postcard's errors carry no message)
/// before the decode fails. A known kind is handed, with the rest of the input, to
/// [`CommandIn`]'s derived decoder through [`Replay`].
struct KindCheck;

impl<'de> serde::de::Visitor<'de> for KindCheck {
    type Value = CommandIn;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Switchyard log command")
    }

    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<CommandIn, A::Error> {
        let (kind, variant): (u32, A::Variant) = data.variant()?;
        if kind >= super::format::KINDS {
            super::format::note_unknown(kind);
            return Err(serde::de::Error::custom(super::format::UnknownCommand {
                kind,
            }));
        }
        CommandIn::deserialize(Replay { kind, variant })
    }
}

/// An enum whose kind was already read: answers the kind again, then hands over the
/// decoder of the variant's contents.
struct Replay<A> {
    kind: u32,
    variant: A,
}

impl<'de, A: serde::de::VariantAccess<'de>> Deserializer<'de> for Replay<A> {
    type Error = A::Error;

    fn deserialize_any<W: serde::de::Visitor<'de>>(self, _: W) -> Result<W::Value, A::Error> {
        Err(serde::de::Error::custom("a command is an enum"))
    }

    fn deserialize_enum<W: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: W,
    ) -> Result<W::Value, A::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

impl<'de, A: serde::de::VariantAccess<'de>> serde::de::EnumAccess<'de> for Replay<A> {
    type Error = A::Error;
    type Variant = A;

    fn variant_seed<S: serde::de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, A), A::Error> {
        use serde::de::IntoDeserializer;
        let kind = seed.deserialize(self.kind.into_deserializer())?;
        Ok((kind, self.variant))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::raft::{decode, encode};

    fn policy(resilience: Resilience) -> Policy {
        Policy {
            subsets: Vec::new(),
            routes: vec![Route {
                name: "testers".into(),
                headers: vec![HeaderMatch {
                    name: "x-canary".into(),
                    kind: crate::model::policy::MatchKind::Present,
                }],
                split: vec![Split {
                    subset: "2.0.0".into(),
                    weight: 100,
                }],
                sticky_header: String::new(),
                retryable: false,
            }],
            default_split: Vec::new(),
            fallback: Fallback::Default,
            sticky_header: "x-user".into(),
            resilience,
        }
    }

    /// What the release before resilience wrote for a PutPolicy: the derived encoding
    /// of the old enum, whose sixth variant carried the old policy.
    #[derive(Serialize)]
    #[allow(dead_code)]
    enum OldCommand {
        Register,
        Deregister,
        SetState,
        ExpireLeases,
        CheckpointLeases,
        PutPolicy {
            namespace: String,
            service: String,
            policy: Option<PolicyV1>,
            at_ms: u64,
        },
    }

    #[test]
    fn a_put_policy_from_before_resilience_still_decodes() {
        let old = OldCommand::PutPolicy {
            namespace: "default".into(),
            service: "web".into(),
            policy: Some(PolicyV1::from(&policy(Resilience::default()))),
            at_ms: 7,
        };
        let bytes = encode(&old).expect("encode");
        let read: Command = decode(&bytes).expect("old bytes decode");
        assert_eq!(
            read,
            Command::PutPolicy {
                namespace: "default".into(),
                service: "web".into(),
                policy: Some(policy(Resilience::default())),
                at_ms: 7,
            }
        );
    }

    #[test]
    fn every_command_round_trips_with_its_resilience() {
        let mut with = policy(Resilience {
            retries: Some(2),
            timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        });
        with.routes[0].retryable = true;
        let commands = vec![
            Command::PutPolicy {
                namespace: "default".into(),
                service: "web".into(),
                policy: Some(with.clone()),
                at_ms: 1,
            },
            Command::Batch(vec![
                Command::Deregister {
                    namespace: "default".into(),
                    id: "a".into(),
                },
                Command::PutPolicy {
                    namespace: "default".into(),
                    service: "web".into(),
                    policy: None,
                    at_ms: 2,
                },
            ]),
            Command::InitCluster { id: "c".into() },
            Command::ExpireLeases {
                leases: vec![(1, 2)],
            },
        ];
        for c in commands {
            let bytes = encode(&c).expect("encode");
            assert_eq!(decode::<Command>(&bytes).expect("decode"), c);
        }
    }

    #[test]
    fn the_format_change_has_its_own_kind_after_every_format_1_kind() {
        let c = Command::SetClusterFormat { format: 2 };
        let bytes = encode(&c).expect("encode");
        assert_eq!(
            bytes[0],
            super::super::format::KINDS_OF_FORMAT_1 as u8,
            "appended after the 24 kinds of format 1"
        );
        assert_eq!(decode::<Command>(&bytes).expect("decode"), c);
    }

    #[test]
    fn a_kind_from_a_newer_release_is_refused_by_name_alone_or_in_a_batch_or_an_entry() {
        use crate::raft::DecodeError;
        let unknown = super::super::format::KINDS as u8;
        let e = decode::<Command>(&[unknown, 0, 0]).expect_err("an unknown kind");
        let DecodeError::UnknownCommand(u) = e else {
            panic!("not named as a newer command: {e}");
        };
        assert_eq!(u.kind, u32::from(unknown));
        let message = u.to_string();
        assert!(
            message.contains(&format!("command kind {unknown}"))
                && message.contains("newer release")
                && message.contains("upgrade it"),
            "{message}"
        );
        // Nested in a batch, and inside a Raft entry as the log and AppendEntries carry
        // it: the command's kind is the byte before the format's varint (0xF7 0xEE 0x01
        // is 0x7777), which only occurs there.
        let marker = Command::SetClusterFormat { format: 0x7777 };
        let entry = openraft::Entry::<crate::raft::TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 9),
            payload: openraft::EntryPayload::Normal(Command::Batch(vec![
                Command::Deregister {
                    namespace: "default".into(),
                    id: "a".into(),
                },
                marker,
            ])),
        };
        let mut bytes = encode(&entry).expect("encode");
        let at = bytes
            .windows(4)
            .position(|w| w == [24, 0xF7, 0xEE, 0x01])
            .expect("the marker's bytes");
        bytes[at] = unknown;
        let e = decode::<crate::raft::alias::Entry>(&bytes).expect_err("refused");
        assert!(matches!(e, DecodeError::UnknownCommand(_)), "{e}");
        // A plain garbled input is still a plain decode error, not a "newer release".
        let e = decode::<crate::raft::alias::Entry>(&bytes[..at]).expect_err("short");
        assert!(matches!(e, DecodeError::Postcard(_)), "{e}");
    }

    #[test]
    fn a_mesh_port_travels_beside_the_instance_and_old_registrations_keep_their_bytes() {
        let plain = crate::catalog::testing::inst("web", "a", "1");
        let meshed = Instance {
            mesh_port: 15006,
            ..plain.clone()
        };
        let register = |instance: Instance| Command::Register {
            instance,
            ttl_seconds: 10,
            lease_id: Some(3),
        };
        let bytes = encode(&register(meshed.clone())).expect("encode");
        assert_eq!(decode::<Command>(&bytes).expect("decode"), register(meshed));
        // Without a port the bytes are the first release's `Register` (variant 0, the
        // instance in its unchanged shape), so an older node still reads them.
        let bytes = encode(&register(plain.clone())).expect("encode");
        assert_eq!(bytes[0], 0);
        assert_eq!(decode::<Command>(&bytes).expect("decode"), register(plain));
    }
}
