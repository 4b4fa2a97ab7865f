//! The registry's applied catalog as a source of DNS answers (`switchyard_core::dns`
//! builds the answers; this node only says what the catalog holds, and, after ACL
//! bootstrap, which services its DNS rules (`--dns-rule`) let it answer for).

use std::sync::Arc;

use switchyard_core::dns::{DnsSource, ServiceRecords};

use crate::model::acl::{allows, Right};
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

    fn may_read(&self, _namespace: &str, service: &str) -> bool {
        // The default rule (`service:*:read`) answers without touching the lock.
        allows(&self.0.config.acl.dns, Right::Read, service) || !self.0.catalog.read().acl_enabled()
    }

    /// The catalog revision, with whether ACLs are on in the low bit: bootstrap does not
    /// move the revision, and an answer cached before it must not outlive it.
    fn revision(&self) -> u64 {
        let catalog = self.0.catalog.read();
        (catalog.revision() << 1) | u64::from(catalog.acl_enabled())
    }
}
