//! The registry's applied catalog as a source of DNS answers (`switchyard_core::dns`
//! builds the answers; this node only says what the catalog holds).

use std::sync::Arc;

use switchyard_core::dns::{DnsSource, ServiceRecords};

use crate::shared::Shared;

/// The registry's own catalog as a DNS source.
pub struct CatalogSource(pub Arc<Shared>);

impl DnsSource for CatalogSource {
    fn service(&self, namespace: &str, service: &str) -> Option<Arc<ServiceRecords>> {
        let catalog = self.0.catalog.read();
        let policy = catalog.current_policy(namespace, service);
        let instances = catalog.resolve(namespace, service, "");
        drop(catalog);
        (!instances.is_empty() || policy.is_some())
            .then(|| Arc::new(ServiceRecords::new(instances, policy)))
    }

    fn revision(&self) -> u64 {
        self.0.catalog.read().revision()
    }
}
