//! The sidecar's DNS port: the registry's DNS answers, served from this sidecar's cached
//! catalog, so lookups keep working on localhost while no registry answers.

use std::sync::Arc;

use switchyard_registry::dns::{DnsSource, ServiceRecords};

use crate::table::EndpointTable;

/// The endpoint table as a DNS source (one namespace: the one the sidecar watches).
pub struct TableSource {
    pub table: Arc<EndpointTable>,
    pub namespace: String,
}

impl DnsSource for TableSource {
    fn service(&self, namespace: &str, service: &str) -> Option<ServiceRecords> {
        if namespace != self.namespace {
            return None;
        }
        let view = self.table.get(service)?;
        Some((view.dns_instances.clone(), view.dns_policy.clone()))
    }

    fn revision(&self) -> u64 {
        self.table.revision()
    }
}
