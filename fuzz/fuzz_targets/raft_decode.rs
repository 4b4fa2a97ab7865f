//! The registry's postcard decoders, with the first byte picking what the rest is: a
//! Raft log entry and the log store's metadata (vote, committed and purged log ids), the
//! internal service's requests (AppendEntries, Vote, InstallSnapshot, a forwarded
//! command) and the answers a node decodes from a peer, and a snapshot (the state
//! machine's `decode_snapshot`, then rebuilt into a catalog).
//!
//! Never a panic, nor an allocation the input's size does not justify (libFuzzer's RSS
//! limit); whatever decodes re-encodes to bytes that decode to the same encoding again;
//! a command that decodes (alone, in an entry, in AppendEntries) applies to a catalog
//! without a panic; a snapshot's catalog rebuilt and persisted again is a fixed point.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::EntryPayload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use switchyard_core::model::{Instance, State};
use switchyard_registry::catalog::{Catalog, Command, Limits, PersistedCatalog, Reply};
use switchyard_registry::raft::alias::{Entry, LogId, StoredMembership, Vote};
use switchyard_registry::raft::propose::WireError;
use switchyard_registry::raft::state_machine::{decode_snapshot, SnapshotFile};
use switchyard_registry::raft::{decode, encode, CommandReply, TypeConfig};

/// Decodes `bytes` as `T`; what decodes must encode, and that encoding must decode and
/// encode to itself (the encoding of a decoded value is canonical).
fn round_trip<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let value: T = decode(bytes).ok()?;
    let once = encode(&value).expect("a decoded value encodes");
    let again: T = decode(&once).expect("an encoding decodes");
    assert_eq!(
        encode(&again).expect("encodes"),
        once,
        "re-encoding is stable"
    );
    Some(value)
}

fn instance(id: &str, version: &str) -> Instance {
    Instance {
        namespace: "default".into(),
        service: "web".into(),
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

/// A catalog with a little of everything, for commands to apply to.
fn catalog() -> &'static Catalog {
    static C: OnceLock<Catalog> = OnceLock::new();
    C.get_or_init(|| {
        let mut c = Catalog::new(Limits::default());
        for (i, command) in script().iter().enumerate() {
            let _ = c.apply_next(i as u64 + 1, command);
        }
        c
    })
}

/// Commands that touch instances, leases, KV and states: applied after a snapshot is
/// restored, as a node applies the log after its snapshot.
fn script() -> Vec<Command> {
    vec![
        Command::Register {
            instance: instance("a", "1.0.0"),
            ttl_seconds: 10,
            lease_id: None,
        },
        Command::Register {
            instance: Instance {
                mesh_port: 15006,
                ..instance("b", "2.0.0")
            },
            ttl_seconds: 10,
            lease_id: None,
        },
        Command::SetState {
            namespace: "default".into(),
            id: "a".into(),
            state: State::Draining,
        },
        Command::KvPut {
            namespace: "default".into(),
            key: "config/web".into(),
            value: b"on".to_vec(),
            flags: 0,
            cas: None,
        },
        Command::Deregister {
            namespace: "default".into(),
            id: "b".into(),
        },
    ]
}

/// Applies a decoded command as the state machine does (committed, at the next index).
fn apply(base: &Catalog, command: &Command) {
    let mut c = base.clone();
    let result = c.apply_next(1_000, command);
    // Its reply crosses the wire to a follower that forwarded the command.
    let wire: Result<Reply, WireError> = result.reply.map_err(WireError::Refused);
    let _ = round_trip::<Result<Reply, WireError>>(&encode(&wire).expect("a reply encodes"));
}

fn apply_entry(entry: &Entry) {
    if let EntryPayload::Normal(command) = &entry.payload {
        apply(catalog(), command);
    }
}

/// A snapshot as a follower installs it and a node loads it at start: decoded, rebuilt
/// into a catalog (which drops what is inconsistent), then the log after it applied.
fn snapshot(bytes: &[u8]) {
    let Ok(SnapshotFile {
        meta,
        catalog: persisted,
    }) = decode_snapshot(bytes)
    else {
        return;
    };
    let _ = encode(&meta).expect("meta encodes");
    let catalog = Catalog::from_persisted(Limits::default(), persisted);
    // Rebuilt once, the persisted form is a fixed point: persisting, decoding and
    // rebuilding it again gives the same bytes.
    let once = encode(&catalog.to_persisted()).expect("a catalog encodes");
    let reread: PersistedCatalog = decode(&once).expect("a persisted catalog decodes");
    let again = Catalog::from_persisted(Limits::default(), reread);
    assert_eq!(
        encode(&again.to_persisted()).expect("encodes"),
        once,
        "a rebuilt catalog persists to the same bytes"
    );
    let mut c = catalog;
    for (i, command) in script().iter().enumerate() {
        let _ = c.apply_next(i as u64 + 1, command);
    }
    let _ = c.to_persisted();
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 10 {
        // The log store: entries, and the vote and log ids it keeps beside them.
        0 => {
            if let Some(entry) = round_trip::<Entry>(bytes) {
                apply_entry(&entry);
            }
        }
        1 => {
            let _ = round_trip::<Vote>(bytes);
            let _ = round_trip::<Option<LogId>>(bytes);
            let _ = round_trip::<StoredMembership>(bytes);
        }
        // What the internal service's server decodes.
        2 => {
            if let Some(req) = round_trip::<AppendEntriesRequest<TypeConfig>>(bytes) {
                req.entries.iter().for_each(apply_entry);
            }
        }
        3 => {
            let _ = round_trip::<VoteRequest<u64>>(bytes);
        }
        4 => {
            if let Some(req) = round_trip::<InstallSnapshotRequest<TypeConfig>>(bytes) {
                // One whole snapshot in one chunk: what the follower installs.
                if req.offset == 0 && req.done {
                    snapshot(&req.data);
                }
            }
        }
        5 => {
            if let Some(command) = round_trip::<Command>(bytes) {
                apply(catalog(), &command);
            }
        }
        // What a node decodes from a peer's answer.
        6 => {
            let _ = round_trip::<Result<AppendEntriesResponse<u64>, RaftError<u64>>>(bytes);
            let _ = round_trip::<Result<VoteResponse<u64>, RaftError<u64>>>(bytes);
        }
        7 => {
            let _ = round_trip::<
                Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>,
            >(bytes);
        }
        8 => {
            let _ = round_trip::<Result<Reply, WireError>>(bytes);
            let _ = round_trip::<CommandReply>(bytes);
        }
        // A snapshot as stored (the state machine's redb table).
        _ => snapshot(bytes),
    }
});
