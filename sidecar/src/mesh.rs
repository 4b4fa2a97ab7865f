//! Dialling other sidecars' inbound ports with mutual TLS: the client side of the mesh.
//!
//! An endpoint registered with a mesh port is reached there, over TLS that presents this
//! sidecar's leaf and expects the server's to be the endpoint's service
//! (`<service>.<namespace>.svc.<trust-domain>`, the DNS SAN the registry puts in every
//! leaf, checked by rustls' stock webpki verifier after the chain). The trust domain
//! comes from this sidecar's own leaf. Client configurations are built once per leaf
//! (and protocol) and swapped whole on renewal, so a connection never takes a lock.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use switchyard_tls::rustls::pki_types::ServerName;
use switchyard_tls::rustls::ClientConfig;
use switchyard_tls::tokio_rustls::client::TlsStream;
use switchyard_tls::tokio_rustls::TlsConnector;
use tokio::net::TcpStream;

use crate::identity::{Issued, MeshIdentity};

/// The application protocol a mesh connection carries, offered by ALPN so the inbound
/// sidecar knows how to serve it before reading a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    Http2,
    /// Bytes copied both ways (a `--upstream` TCP listener's connection).
    Tcp,
}

impl Alpn {
    fn protocol(self) -> &'static [u8] {
        match self {
            Alpn::Http1 => b"http/1.1",
            Alpn::Http2 => b"h2",
            Alpn::Tcp => switchyard_tls::mesh_ca::ALPN_TCP,
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

type Built = (Arc<Issued>, Arc<ClientConfig>);

/// This sidecar's side of outbound mTLS.
pub struct MeshClient {
    identity: Arc<MeshIdentity>,
    /// The namespace the sidecar routes in: peers' names are in it.
    namespace: Arc<str>,
    configs: [ArcSwapOption<Built>; 3],
}

/// Why a mesh connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("this sidecar has no mesh certificate yet (is the registry's CA reachable and the token allowed to register the service?)")]
    NoCertificate,
    #[error("the mesh certificate cannot be used: {0}")]
    BadCertificate(String),
    #[error("{0} is not a name a mesh certificate can carry")]
    BadName(String),
    #[error("mutual TLS with the endpoint failed: {0}")]
    Handshake(#[source] std::io::Error),
}

impl MeshClient {
    pub fn new(identity: Arc<MeshIdentity>, namespace: &str) -> Self {
        Self {
            identity,
            namespace: namespace.into(),
            configs: Default::default(),
        }
    }

    /// True once the sidecar holds a leaf it can present (on the request path: no
    /// reference count is touched).
    pub fn ready(&self) -> bool {
        self.identity.is_ready()
    }

    /// The SPIFFE id an endpoint of `service` must present, once the trust domain is
    /// known (from this sidecar's own leaf).
    pub fn expected_identity(&self, service: &str) -> Option<String> {
        let issued = self.identity.current()?;
        let domain = trust_domain(&issued.spiffe_id)?;
        Some(switchyard_tls::mesh_ca::spiffe_id(
            domain,
            &self.namespace,
            service,
        ))
    }

    fn config(&self, alpn: Alpn) -> Result<(Arc<Issued>, Arc<ClientConfig>), MeshError> {
        let issued = self.identity.current().ok_or(MeshError::NoCertificate)?;
        let slot = &self.configs[alpn.slot()];
        if let Some(b) = slot.load().as_ref() {
            if Arc::ptr_eq(&b.0, &issued) {
                return Ok((issued, b.1.clone()));
            }
        }
        let config = switchyard_tls::mesh_ca::mesh_client_config(
            &issued.leaf_pem,
            &issued.key_pem,
            &issued.bundle_pem,
            &[alpn.protocol()],
        )
        .map_err(|e| MeshError::BadCertificate(e.0))?;
        let config = Arc::new(config);
        slot.store(Some(Arc::new((issued.clone(), config.clone()))));
        Ok((issued, config))
    }

    /// Wraps a connected socket in mutual TLS to an endpoint of `service`; on success
    /// also returns the SPIFFE id the server's verified certificate carries.
    pub async fn dial(
        &self,
        tcp: TcpStream,
        service: &str,
        alpn: Alpn,
    ) -> Result<(TlsStream<TcpStream>, Arc<str>), MeshError> {
        let (issued, config) = self.config(alpn)?;
        let domain = trust_domain(&issued.spiffe_id).ok_or_else(|| {
            MeshError::BadCertificate(format!("{} has no trust domain", issued.spiffe_id))
        })?;
        let name = switchyard_tls::mesh_ca::dns_name(domain, &self.namespace, service);
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| MeshError::BadName(name))?;
        let tls = TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(MeshError::Handshake)?;
        let seen = switchyard_tls::mesh_ca::peer_spiffe_id(tls.get_ref().1);
        Ok((tls, seen.into()))
    }
}

/// `example.org` of `spiffe://example.org/ns/default/svc/web`.
pub fn trust_domain(spiffe_id: &str) -> Option<&str> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let domain = rest.split('/').next()?;
    (!domain.is_empty()).then_some(domain)
}

/// The service of a SPIFFE id in `namespace` (`None`: another namespace, or not a
/// service identity).
pub fn service_of<'a>(spiffe_id: &'a str, namespace: &str) -> Option<&'a str> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/');
    let (_domain, ns_kw, ns, svc_kw, svc) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (ns_kw == "ns" && svc_kw == "svc" && ns == namespace && parts.next().is_none()).then_some(svc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_from_spiffe_ids() {
        let id = "spiffe://example.org/ns/default/svc/web";
        assert_eq!(trust_domain(id), Some("example.org"));
        assert_eq!(service_of(id, "default"), Some("web"));
        assert_eq!(service_of(id, "other"), None);
        assert_eq!(
            service_of("spiffe://example.org/ns/default/svc/web/x", "default"),
            None
        );
        assert_eq!(
            service_of("https://example.org/ns/default/svc/web", "default"),
            None
        );
        assert_eq!(trust_domain("spiffe:///ns/x"), None);
    }
}
