//! Helpers for the catalog's unit tests: instances, commands and a fixed script.

use super::{Catalog, Command, Limits};
use crate::model::{Instance, State, DEFAULT_NAMESPACE};

pub(crate) fn inst(service: &str, id: &str, version: &str) -> Instance {
    Instance {
        namespace: DEFAULT_NAMESPACE.into(),
        service: service.into(),
        id: id.into(),
        address: "10.0.0.1".into(),
        port: 80,
        version: version.into(),
        labels: Default::default(),
        weight: 100,
        zone: String::new(),
        state: State::Serving,
        mesh_port: 0,
    }
}

pub(crate) fn reg(i: Instance) -> Command {
    Command::Register {
        instance: i,
        ttl_seconds: 10,
        lease_id: None,
    }
}

/// A fixed script touching every command, including refused ones.
pub(crate) fn script() -> Vec<Command> {
    vec![
        // In the mesh: its port travels beside the instance (RegisterMesh, a section).
        reg(Instance {
            mesh_port: 15006,
            ..inst("web", "a", "1")
        }),
        reg(inst("web", "b", "2")),
        reg(inst("api", "c", "1")),
        Command::Register {
            instance: inst("api", "d", "1"),
            ttl_seconds: 5,
            lease_id: Some(1),
        },
        Command::SetState {
            namespace: DEFAULT_NAMESPACE.into(),
            id: "b".into(),
            state: State::Draining,
        },
        Command::Deregister {
            namespace: DEFAULT_NAMESPACE.into(),
            id: "nobody".into(),
        },
        reg(inst("api", "b", "3")),
        Command::ExpireLeases {
            // Lease 1 was last granted by the Register at index 4.
            leases: vec![(3, 3), (1, 4), (3, 3)],
        },
    ]
}

pub(crate) fn run(commands: &[Command]) -> Catalog {
    let mut c = Catalog::new(Limits::default());
    for (i, cmd) in commands.iter().enumerate() {
        let _ = c.apply(i as u64 + 1, cmd);
    }
    c
}

pub(crate) fn fingerprint(c: &Catalog) -> String {
    format!("{:?}", c.to_persisted())
}
