//! Format versions: which log entries and snapshots a release can read, and which a
//! cluster may write while some of its nodes still run an older release.
//!
//! - [`FORMAT`] is this release's format: every command kind it can decode and apply.
//!   Releases before formats existed (0.1.0 and earlier) are format 1
//!   ([`UNVERSIONED`]).
//! - The **cluster format** is kept in the catalog (through the log and snapshots). It
//!   starts at 1 and moves up only by [`Command::SetClusterFormat`], which the leader
//!   proposes once every member answers that it runs that format (see
//!   `raft::upgrade`). It never moves down: from then on a node of an older release
//!   cannot join (`AddMember` refuses it, naming both formats).
//! - A command whose [`required`] format is above the cluster format is refused before
//!   it is written ([`check_writable`]), so a node that has not been upgraded yet never
//!   receives an entry it cannot decode.
//! - A node that still meets one (a log from a newer release, copied by hand, or a
//!   bug) refuses it with a clear error and applies nothing after it, instead of
//!   skipping it and diverging: see [`UnknownCommand`].

use std::cell::Cell;

use super::command::Command;

/// This release's log and snapshot format.
pub const FORMAT: u32 = 2;
/// The format of releases that wrote no format number (0.1.0 and earlier).
pub const UNVERSIONED: u32 = 1;
/// How many command kinds (variants on the wire) format 1 has; format 2 adds
/// `SetClusterFormat` after them. A kind at or past [`KINDS`] was written by a newer
/// release.
pub const KINDS_OF_FORMAT_1: u32 = 24;
/// How many command kinds this release knows.
pub const KINDS: u32 = KINDS_OF_FORMAT_1 + 1;

/// The lowest cluster format at which every node can decode `command`.
pub fn required(command: &Command) -> u32 {
    match command {
        Command::SetClusterFormat { .. } => 2,
        Command::Batch(commands) => commands.iter().map(required).max().unwrap_or(UNVERSIONED),
        _ => UNVERSIONED,
    }
}

/// Why a command may not be written yet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("a {kind} change needs every registry node at log format {needs} or later, but the cluster is at format {cluster} (some node runs an older release): finish upgrading every node, one at a time, then retry")]
pub struct FormatTooNew {
    pub kind: String,
    pub needs: u32,
    pub cluster: u32,
}

/// Refuses a command the cluster's oldest node could not decode.
pub fn check_writable(command: &Command, cluster_format: u32) -> Result<(), FormatTooNew> {
    let needs = required(command);
    if needs > cluster_format {
        return Err(FormatTooNew {
            kind: command.kind().to_string(),
            needs,
            cluster: cluster_format,
        });
    }
    Ok(())
}

/// A command kind this release does not know, met while decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a log entry holds command kind {kind}, which this release ({release}, log format {FORMAT}, kinds 0..{KINDS}) does not know: a newer release wrote it. This node applies nothing it cannot read; upgrade it to the release the other nodes run", release = env!("CARGO_PKG_VERSION"))]
pub struct UnknownCommand {
    pub kind: u32,
}

thread_local! {
    /// Set by [`Command`]'s decoder when it meets an unknown kind: postcard's own error
    /// carries no message, so the decode helpers read it from here.
    static UNKNOWN_KIND: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Records an unknown kind for [`take_unknown`] (called by the decoder).
pub(super) fn note_unknown(kind: u32) {
    UNKNOWN_KIND.with(|c| c.set(Some(kind)));
}

/// The unknown kind the last failed decode on this thread met, if any; clears it.
pub fn take_unknown() -> Option<UnknownCommand> {
    UNKNOWN_KIND
        .with(|c| c.take())
        .map(|kind| UnknownCommand { kind })
}

/// A snapshot of a cluster at a newer format than this release reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the snapshot is of a cluster at log format {cluster}, written by a release of format {writer}; this release ({release}) reads format {FORMAT} and older: upgrade this node to the release the other nodes run", release = env!("CARGO_PKG_VERSION"))]
pub struct SnapshotTooNew {
    pub writer: u32,
    pub cluster: u32,
}

/// What a snapshot's `format` section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotFormat {
    /// The format of the release that wrote the snapshot.
    pub writer: u32,
    /// The cluster's format when it was written.
    pub cluster: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_format_change_itself_needs_format_2_today() {
        let set = Command::SetClusterFormat { format: 2 };
        assert_eq!(required(&set), 2);
        assert_eq!(
            required(&Command::Batch(vec![
                Command::Deregister {
                    namespace: "default".into(),
                    id: "a".into()
                },
                set.clone()
            ])),
            2
        );
        let e = check_writable(&set, 1).expect_err("refused at format 1");
        assert_eq!(e.needs, 2);
        assert!(e.to_string().contains("finish upgrading every node"), "{e}");
        check_writable(&set, 2).expect("written at format 2");
        check_writable(
            &Command::Deregister {
                namespace: "default".into(),
                id: "a".into(),
            },
            UNVERSIONED,
        )
        .expect("format-1 commands are always writable");
    }
}
