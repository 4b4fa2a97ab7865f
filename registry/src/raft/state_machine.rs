//! The Raft state machine: committed commands applied to the in-memory catalog.
//!
//! Applying also publishes each change to the watch hub and mirrors leases into the
//! lease keeper (only the leader's keeper expires anything). It reaches them through an
//! [`ApplyHandle`], which holds those parts and nothing else of the node. Snapshots are the catalog's
//! persisted form plus the Raft metadata, kept in redb beside the log; at start the last
//! snapshot is loaded and openraft replays the committed log after it.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use parking_lot::Mutex;
use redb::Database;
use serde::{Deserialize, Serialize};

use super::alias::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership};
use super::log_store::META;
use super::{decode, encode, CommandReply, TypeConfig};
use crate::catalog::{
    ApplyError, Catalog, Command, PersistedCatalog, PersistedCatalogV0, PersistedCatalogV1,
    PersistedCatalogV2, PersistedCatalogV3, PersistedCatalogV4, Reply,
};
use crate::shared::ApplyHandle;

const SNAPSHOT: &str = "snapshot";

/// What a snapshot holds.
#[derive(Serialize, Deserialize)]
pub struct SnapshotFile {
    pub meta: SnapshotMeta,
    pub catalog: PersistedCatalog,
}

/// A snapshot as written before the mesh CA (and sections) existed.
#[derive(Deserialize)]
struct SnapshotFileV4 {
    meta: SnapshotMeta,
    catalog: PersistedCatalogV4,
}

/// A snapshot as written before ACLs existed.
#[derive(Deserialize)]
struct SnapshotFileV3 {
    meta: SnapshotMeta,
    catalog: PersistedCatalogV3,
}

/// A snapshot as written before rollouts existed.
#[derive(Deserialize)]
struct SnapshotFileV2 {
    meta: SnapshotMeta,
    catalog: PersistedCatalogV2,
}

/// A snapshot as written before policies carried resilience settings.
#[derive(Deserialize)]
struct SnapshotFileV1 {
    meta: SnapshotMeta,
    catalog: PersistedCatalogV1,
}

/// A snapshot as written before the catalog carried a cluster id.
#[derive(Deserialize)]
struct SnapshotFileV0 {
    meta: SnapshotMeta,
    catalog: PersistedCatalogV0,
}

/// Reads a snapshot in the current form, or in an older one (newest first: postcard
/// reads bytes of an older form as garbage or as too short, never as a valid newer one
/// that would have to be told apart).
pub fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotFile, SnapshotError> {
    let file = decode_any_snapshot(bytes)?;
    file.catalog.check_format()?;
    Ok(file)
}

/// Why a snapshot cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Decode(#[from] super::DecodeError),
    #[error(transparent)]
    TooNew(#[from] crate::catalog::format::SnapshotTooNew),
}

fn decode_any_snapshot(bytes: &[u8]) -> Result<SnapshotFile, super::DecodeError> {
    decode::<SnapshotFile>(bytes)
        .or_else(|e| match decode::<SnapshotFileV4>(bytes) {
            Ok(old) => Ok(SnapshotFile {
                meta: old.meta,
                catalog: old.catalog.into(),
            }),
            Err(_) => Err(e),
        })
        .or_else(|e| match decode::<SnapshotFileV3>(bytes) {
            Ok(old) => Ok(SnapshotFile {
                meta: old.meta,
                catalog: old.catalog.into(),
            }),
            Err(_) => Err(e),
        })
        .or_else(|e| match decode::<SnapshotFileV2>(bytes) {
            Ok(old) => Ok(SnapshotFile {
                meta: old.meta,
                catalog: old.catalog.into(),
            }),
            Err(_) => Err(e),
        })
        .or_else(|e| match decode::<SnapshotFileV1>(bytes) {
            Ok(old) => Ok(SnapshotFile {
                meta: old.meta,
                catalog: old.catalog.into(),
            }),
            Err(_) => Err(e),
        })
        .or_else(|e| match decode::<SnapshotFileV0>(bytes) {
            Ok(old) => Ok(SnapshotFile {
                meta: old.meta,
                catalog: old.catalog.into(),
            }),
            Err(_) => Err(e),
        })
}

/// Raft bookkeeping that changes together with the catalog (under its write lock).
#[derive(Default, Clone)]
struct Applied {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshots_built: u64,
}

fn sm_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::read_snapshot(None, &e).into()
}

#[derive(Clone)]
pub struct StateMachine {
    target: ApplyHandle,
    db: Arc<Database>,
    applied: Arc<Mutex<Applied>>,
}

impl StateMachine {
    /// Loads the last snapshot (if any) into the catalog.
    pub fn open(target: ApplyHandle, db: Arc<Database>) -> Result<Self, StorageError> {
        let mut applied = Applied::default();
        let stored = {
            let txn = db.begin_read().map_err(snap_err)?;
            let meta = txn.open_table(META).map_err(snap_err)?;
            let got = meta.get(SNAPSHOT).map_err(snap_err)?;
            got.map(|v| v.value().to_vec())
        };
        if let Some(bytes) = stored {
            let file = decode_snapshot(&bytes).map_err(snap_err)?;
            applied.last_applied = file.meta.last_log_id;
            applied.membership = file.meta.last_membership.clone();
            *target.catalog.write() = Catalog::from_persisted(target.limits, file.catalog);
        }
        Ok(Self {
            target,
            db,
            applied: Arc::new(Mutex::new(applied)),
        })
    }

    fn store_snapshot(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(sm_err)?;
        {
            let mut meta = txn.open_table(META).map_err(sm_err)?;
            meta.insert(SNAPSHOT, bytes).map_err(sm_err)?;
        }
        txn.commit().map_err(sm_err)?;
        Ok(())
    }

    /// Replaces the whole catalog (snapshot install): watchers resync, leases restart.
    fn replace(&self, file: SnapshotFile) {
        let catalog = Catalog::from_persisted(self.target.limits, file.catalog);
        let mut current = self.target.catalog.write();
        *current = catalog;
        self.target.leases.clear();
        for (id, ttl) in current.leases() {
            self.target.leases.grant(id, ttl);
        }
        self.target.hub.reset(current.revision());
        let mut applied = self.applied.lock();
        applied.last_applied = file.meta.last_log_id;
        applied.membership = file.meta.last_membership;
        self.target.publish(&current);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (file, bytes) = {
            let catalog = self.target.catalog.read();
            let mut applied = self.applied.lock();
            applied.snapshots_built += 1;
            let last = applied.last_applied;
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: applied.membership.clone(),
                snapshot_id: format!(
                    "{}-{}",
                    last.map_or(0, |l| l.index),
                    applied.snapshots_built
                ),
            };
            let file = SnapshotFile {
                meta,
                catalog: catalog.to_persisted(),
            };
            let bytes = encode(&file).map_err(sm_err)?;
            (file, bytes)
        };
        self.store_snapshot(&bytes)?;
        Ok(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.applied.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandReply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let target = &self.target;
        let mut replies = Vec::new();
        let mut catalog = target.catalog.write();
        let mut applied = self.applied.lock();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(CommandReply::default()),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    replies.push(CommandReply::default());
                }
                EntryPayload::Normal(Command::Batch(commands)) => {
                    let index = entry.log_id.index;
                    let results = commands
                        .iter()
                        .map(|c| apply_one(target, &mut catalog, index, c))
                        .collect();
                    replies.push(CommandReply::Batch(results));
                }
                EntryPayload::Normal(command) => {
                    let index = entry.log_id.index;
                    replies.push(CommandReply::One(apply_one(
                        target,
                        &mut catalog,
                        index,
                        &command,
                    )));
                }
            }
        }
        target.publish(&catalog);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let mut file = decode_snapshot(&bytes).map_err(snap_err)?;
        file.meta = meta.clone();
        let stored = encode(&file).map_err(sm_err)?;
        self.store_snapshot(&stored)?;
        tracing::info!(last = ?meta.last_log_id, "installed a snapshot from the leader");
        self.replace(file);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let stored = {
            let txn = self.db.begin_read().map_err(snap_err)?;
            let meta = txn.open_table(META).map_err(snap_err)?;
            let got = meta.get(SNAPSHOT).map_err(snap_err)?;
            got.map(|v| v.value().to_vec())
        };
        let Some(bytes) = stored else {
            return Ok(None);
        };
        let file = decode_snapshot(&bytes).map_err(snap_err)?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

/// Applies one command of the entry at log index `index` to the catalog and mirrors its
/// effects: the lease keeper's clocks, expiry metrics and the watch hub.
fn apply_one(
    target: &ApplyHandle,
    catalog: &mut Catalog,
    index: u64,
    command: &Command,
) -> Result<Reply, ApplyError> {
    let result = catalog.apply_next(index, command);
    for (id, ttl) in &result.leases_granted {
        target.leases.grant(*id, *ttl);
    }
    for id in &result.leases_removed {
        target.leases.remove(*id);
    }
    for (id, remaining) in &result.leases_checkpointed {
        target.leases.hint(*id, *remaining);
    }
    if let Command::ExpireLeases { .. } = command {
        target
            .metrics
            .lease_expiries
            .inc_by(result.leases_removed.len() as u64);
    }
    if let Some(change) = result.change {
        target.hub.publish(change);
    }
    result.reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::{run, script};
    use crate::catalog::Limits;

    /// A snapshot written before the cluster id existed still loads (with no id, which
    /// the next leader then commits); a current one keeps its id.
    #[test]
    fn snapshots_from_before_the_cluster_id_still_decode() {
        let mut catalog = run(&script()[..5]);
        catalog.apply_next(100, &Command::InitCluster { id: "abc".into() });
        let current = catalog.to_persisted();
        let old = PersistedCatalogV0::from_current_for_test(&current);
        #[derive(Serialize)]
        struct OldFile<'a> {
            meta: SnapshotMeta,
            catalog: &'a PersistedCatalogV0,
        }
        let bytes = encode(&OldFile {
            meta: SnapshotMeta::default(),
            catalog: &old,
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("an old snapshot decodes");
        let rebuilt = Catalog::from_persisted(Limits::default(), file.catalog);
        assert_eq!(rebuilt.instance_count(), catalog.instance_count());
        assert_eq!(rebuilt.cluster_id(), "");
        let bytes = encode(&SnapshotFile {
            meta: SnapshotMeta::default(),
            catalog: current,
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("decodes");
        assert_eq!(
            Catalog::from_persisted(Limits::default(), file.catalog).cluster_id(),
            "abc"
        );
    }

    /// A snapshot written before policies carried resilience settings still loads, with
    /// its policies and their history (and no resilience overrides).
    #[test]
    fn snapshots_from_before_resilience_still_decode() {
        let mut catalog = run(&script());
        catalog.apply_next(100, &Command::InitCluster { id: "abc".into() });
        let policy = crate::model::Policy {
            subsets: Vec::new(),
            routes: Vec::new(),
            default_split: Vec::new(),
            fallback: crate::model::policy::Fallback::Default,
            sticky_header: "x-user".into(),
            resilience: Default::default(),
        };
        catalog.apply_next(
            101,
            &Command::PutPolicy {
                namespace: "default".into(),
                service: "web".into(),
                policy: Some(policy.clone()),
                at_ms: 5,
            },
        );
        let current = catalog.to_persisted();
        let old = PersistedCatalogV1::from_current_for_test(&current);
        #[derive(Serialize)]
        struct OldFile<'a> {
            meta: SnapshotMeta,
            catalog: &'a PersistedCatalogV1,
        }
        let bytes = encode(&OldFile {
            meta: SnapshotMeta::default(),
            catalog: &old,
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("an old snapshot decodes");
        let rebuilt = Catalog::from_persisted(Limits::default(), file.catalog);
        assert_eq!(rebuilt.cluster_id(), "abc");
        assert_eq!(
            rebuilt.current_policy("default", "web").as_deref(),
            Some(&policy)
        );
        assert_eq!(rebuilt.policy_history("default", "web").len(), 1);
    }

    /// A snapshot written before rollouts existed still loads (with none), and one with
    /// rollouts keeps them across a rebuild.
    #[test]
    fn snapshots_from_before_rollouts_still_decode_and_rollouts_survive_one() {
        use crate::catalog::RolloutPolicy;
        use crate::model::rollout::{Rollout, RolloutSpec, RolloutStatus};
        let mut catalog = run(&script());
        catalog.apply_next(100, &Command::InitCluster { id: "abc".into() });
        let current = catalog.to_persisted();
        let old = PersistedCatalogV2::from_current_for_test(&current);
        #[derive(Serialize)]
        struct OldFile<'a> {
            meta: SnapshotMeta,
            catalog: &'a PersistedCatalogV2,
        }
        let bytes = encode(&OldFile {
            meta: SnapshotMeta::default(),
            catalog: &old,
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("a pre-rollout snapshot decodes");
        let rebuilt = Catalog::from_persisted(Limits::default(), file.catalog);
        assert_eq!(rebuilt.cluster_id(), "abc");
        assert!(rebuilt.rollouts("default").is_empty());

        let rollout = Rollout {
            namespace: "default".into(),
            service: "web".into(),
            spec: RolloutSpec::new("2.0.0"),
            status: RolloutStatus::pending(0, 1, 0),
        };
        let put = Command::PutRollout {
            rollout: Box::new(rollout),
            expected_generation: 0,
            start: true,
            policy: RolloutPolicy::Keep,
            at_ms: 9,
        };
        assert!(catalog.apply_next(101, &put).reply.is_ok());
        let bytes = encode(&SnapshotFile {
            meta: SnapshotMeta::default(),
            catalog: catalog.to_persisted(),
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("decodes");
        let rebuilt = Catalog::from_persisted(Limits::default(), file.catalog);
        assert_eq!(
            rebuilt.rollout("default", "web"),
            catalog.rollout("default", "web")
        );
        assert_eq!(rebuilt.rollout_generation("default", "web"), 1);
    }

    /// A snapshot written before ACLs still loads (not bootstrapped, no tokens), and one
    /// with tokens keeps them (found by their secret after the rebuild).
    #[test]
    fn snapshots_from_before_acls_still_decode_and_tokens_survive_one() {
        use crate::model::acl::{service_identity, Secret, Token};
        let mut catalog = run(&script());
        let current = catalog.to_persisted();
        let old = PersistedCatalogV3::from_current_for_test(&current);
        #[derive(Serialize)]
        struct OldFile<'a> {
            meta: SnapshotMeta,
            catalog: &'a PersistedCatalogV3,
        }
        let bytes = encode(&OldFile {
            meta: SnapshotMeta::default(),
            catalog: &old,
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("a pre-ACL snapshot decodes");
        let rebuilt = Catalog::from_persisted(Limits::default(), file.catalog);
        assert!(!rebuilt.acl_enabled());

        let (secret, hash) = Secret::generate().expect("random");
        let token = Token {
            accessor_id: "a-1".into(),
            secret_hash: hash,
            description: String::new(),
            rules: service_identity("web"),
            created_at_ms: 1,
            expires_at_ms: None,
        };
        let boot = Command::AclBootstrap {
            token: Box::new(token),
        };
        assert!(catalog.apply_next(200, &boot).reply.is_ok());
        assert!(catalog.apply_next(201, &boot).reply.is_err(), "once only");
        let bytes = encode(&SnapshotFile {
            meta: SnapshotMeta::default(),
            catalog: catalog.to_persisted(),
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("decodes");
        let rebuilt = Catalog::from_persisted(Limits::default(), file.catalog);
        assert!(rebuilt.acl_enabled());
        assert_eq!(
            rebuilt
                .token_by_secret(&secret)
                .map(|t| t.accessor_id.as_str()),
            Some("a-1")
        );
        assert!(rebuilt.token_by_secret("guess").is_none());
    }

    /// A snapshot written before the mesh CA still loads (ACL state kept, no CA), and
    /// one with a CA keeps it, key included.
    #[test]
    fn snapshots_from_before_the_mesh_ca_still_decode_and_the_ca_survives_one() {
        use crate::model::acl::{service_identity, Secret, Token};
        use crate::model::mesh_ca::{CaRoot, MeshCa};
        let mut catalog = run(&script());
        let (_, hash) = Secret::generate().expect("random");
        let boot = Command::AclBootstrap {
            token: Box::new(Token {
                accessor_id: "a-1".into(),
                secret_hash: hash,
                description: String::new(),
                rules: service_identity("web"),
                created_at_ms: 1,
                expires_at_ms: None,
            }),
        };
        assert!(catalog.apply_next(200, &boot).reply.is_ok());
        let old = PersistedCatalogV4::from_current_for_test(&catalog.to_persisted());
        #[derive(Serialize)]
        struct OldFile<'a> {
            meta: SnapshotMeta,
            catalog: &'a PersistedCatalogV4,
        }
        let bytes = encode(&OldFile {
            meta: SnapshotMeta::default(),
            catalog: &old,
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("a pre-CA snapshot decodes");
        let rebuilt = Catalog::from_persisted(Limits::default(), file.catalog);
        assert!(
            rebuilt.acl_enabled(),
            "the ACL state of a V4 snapshot is kept"
        );
        assert!(rebuilt.mesh_ca().is_none());

        let ca = MeshCa {
            trust_domain: "switchyard.local".into(),
            roots: vec![CaRoot {
                id: "r1".into(),
                cert_pem: "CERT".into(),
                key_pem: Some("KEY".into()),
                created_ms: 5,
            }],
        };
        let init = |ca: &MeshCa| Command::InitMeshCa {
            ca: Box::new(ca.clone()),
        };
        assert!(catalog.apply_next(201, &init(&ca)).reply.is_ok());
        let mut other = ca.clone();
        other.trust_domain = "other".into();
        catalog.apply_next(202, &init(&other));
        assert_eq!(catalog.mesh_ca(), Some(&ca), "the first CA stays");
        let bytes = encode(&SnapshotFile {
            meta: SnapshotMeta::default(),
            catalog: catalog.to_persisted(),
        })
        .expect("encode");
        let file = decode_snapshot(&bytes).expect("decodes");
        let rebuilt = Catalog::from_persisted(Limits::default(), file.catalog);
        assert_eq!(rebuilt.mesh_ca(), Some(&ca));
    }

    /// The cluster's format moves only up, is kept in snapshots, and a snapshot of a
    /// cluster at a newer format than this release reads is refused before anything of
    /// it is installed.
    #[test]
    fn the_cluster_format_rises_only_survives_snapshots_and_a_newer_one_is_refused() {
        use crate::catalog::format::{FORMAT, UNVERSIONED};
        let mut catalog = run(&script());
        assert_eq!(catalog.cluster_format(), UNVERSIONED);
        let at = |c: &mut Catalog, index, format| {
            assert!(c
                .apply_next(index, &Command::SetClusterFormat { format })
                .reply
                .is_ok());
        };
        at(&mut catalog, 300, FORMAT);
        at(&mut catalog, 301, UNVERSIONED);
        assert_eq!(catalog.cluster_format(), FORMAT, "never down");
        let file = |c: &Catalog| {
            encode(&SnapshotFile {
                meta: SnapshotMeta::default(),
                catalog: c.to_persisted(),
            })
            .expect("encode")
        };
        let read = decode_snapshot(&file(&catalog)).expect("decodes");
        assert_eq!(
            read.catalog.format().map(|f| (f.writer, f.cluster)),
            Some((FORMAT, FORMAT))
        );
        let rebuilt = Catalog::from_persisted(Limits::default(), read.catalog);
        assert_eq!(rebuilt.cluster_format(), FORMAT);

        at(&mut catalog, 302, FORMAT + 1);
        let e = decode_snapshot(&file(&catalog))
            .err()
            .expect("a newer cluster's snapshot is refused");
        let message = e.to_string();
        assert!(
            matches!(e, SnapshotError::TooNew(_))
                && message.contains(&format!("log format {}", FORMAT + 1))
                && message.contains("upgrade this node"),
            "{message}"
        );
    }
}
