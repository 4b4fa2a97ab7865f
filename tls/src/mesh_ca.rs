//! The mesh's built-in CA: a root (ECDSA P-256) and the leaves it issues to sidecars.
//!
//! A leaf is built from nothing but the CSR's public key (after checking the CSR's
//! signature, i.e. that the caller holds the private key): names, key usages, the CA
//! flag and the lifetime come from the registry, never from the request. A forged CSR
//! asking for `CA:true` or another service's name gets the caller's own leaf.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;

use crate::files::TlsError;

/// Largest CSR accepted (a P-256 or RSA-4096 CSR is well under 4 KiB).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// A root certificate and its key, PEM.
#[derive(Clone)]
pub struct Root {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never printed.
        f.debug_struct("Root").finish_non_exhaustive()
    }
}

impl Root {
    /// A root from files (`--mesh-ca-cert`, `--mesh-ca-key`), checked to be a usable
    /// issuer with that key.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, TlsError> {
        let read =
            |p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| TlsError::file(p, e));
        let root = Root {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        };
        let pair = KeyPair::from_pem(&root.key_pem)
            .map_err(|e| TlsError::file(key, format!("not a PEM private key ({e})")))?;
        Issuer::from_ca_cert_pem(&root.cert_pem, pair)
            .map_err(|e| TlsError::file(cert, format!("not a usable CA certificate ({e})")))?;
        Ok(root)
    }
}

/// A leaf as issued.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert_pem: String,
    pub not_after: SystemTime,
}

fn err(what: &str, e: rcgen::Error) -> TlsError {
    TlsError(format!("{what}: {e}"))
}

/// `spiffe://<trust-domain>/ns/<namespace>/svc/<service>`: the identity intentions name.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/svc/{service}")
}

/// `<service>.<namespace>.svc.<trust-domain>`: the name a client verifies.
pub fn dns_name(trust_domain: &str, namespace: &str, service: &str) -> String {
    format!("{service}.{namespace}.svc.{trust_domain}")
}

/// A new root for `trust_domain`, valid `days` from `now`.
pub fn new_root(trust_domain: &str, days: u32, now: SystemTime) -> Result<Root, TlsError> {
    let key = KeyPair::generate().map_err(|e| err("cannot generate the CA key", e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Switchyard mesh CA {trust_domain}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(|e| err("trust domain", e))?,
    )];
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(u64::from(days) * 86_400)).into();
    let cert = params
        .self_signed(&key)
        .map_err(|e| err("cannot sign the CA certificate", e))?;
    Ok(Root {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Reads a CSR given as PEM or DER, bounded, and checks its signature.
fn read_csr(csr: &[u8]) -> Result<CertificateSigningRequestParams, TlsError> {
    if csr.is_empty() {
        return Err(TlsError(
            "csr is empty: send a PKCS#10 CSR (PEM or DER)".into(),
        ));
    }
    if csr.len() > MAX_CSR_BYTES {
        return Err(TlsError(format!(
            "csr is {} bytes, more than the {MAX_CSR_BYTES} a CSR needs",
            csr.len()
        )));
    }
    let der = if csr.starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(csr)
            .map_err(|e| TlsError(format!("csr is not a PEM CERTIFICATE REQUEST ({e})")))?
    } else {
        CertificateSigningRequestDer::from(csr.to_vec())
    };
    CertificateSigningRequestParams::from_der(&der).map_err(|e| {
        TlsError(format!(
            "csr is not a valid PKCS#10 request signed by its key ({e})"
        ))
    })
}

/// Issues the leaf of `service` in `namespace` for the key in `csr`, signed by `root`,
/// valid for `ttl` from `now` (roots live for years, far past any leaf).
pub fn certify(
    root: &Root,
    csr: &[u8],
    trust_domain: &str,
    namespace: &str,
    service: &str,
    ttl: Duration,
    now: SystemTime,
) -> Result<Leaf, TlsError> {
    let request = read_csr(csr)?;
    let key = KeyPair::from_pem(&root.key_pem).map_err(|e| err("the CA key", e))?;
    let issuer =
        Issuer::from_ca_cert_pem(&root.cert_pem, key).map_err(|e| err("the CA certificate", e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, service);
    params.subject_alt_names = vec![
        SanType::URI(
            spiffe_id(trust_domain, namespace, service)
                .try_into()
                .map_err(|e| err("identity", e))?,
        ),
        SanType::DnsName(
            dns_name(trust_domain, namespace, service)
                .try_into()
                .map_err(|e| err("name", e))?,
        ),
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    // A little slack for clocks behind the registry's.
    params.not_before = (now - Duration::from_secs(300)).into();
    let not_after = now + ttl;
    params.not_after = not_after.into();
    let cert = params
        .signed_by(&request.public_key, &issuer)
        .map_err(|e| err("cannot sign the leaf", e))?;
    Ok(Leaf {
        cert_pem: cert.pem(),
        not_after,
    })
}

/// The SPIFFE id of the peer of a finished handshake (client or server side), whose
/// chain the handshake verified; empty when it presented none.
pub fn peer_spiffe_id(conn: &rustls::CommonState) -> String {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| spiffe_id_of(c))
        .unwrap_or_default()
}

/// The SPIFFE id (`spiffe://...` URI SAN) of a certificate, DER. Read only from a
/// certificate whose chain was already verified (the handshake did), never to decide
/// trust by itself.
pub fn spiffe_id_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some(u.to_string())
        }
        _ => None,
    })
}

type LeafAndKey = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn leaf_and_key(leaf_pem: &str, key_pem: &str) -> Result<LeafAndKey, TlsError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(leaf_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("the leaf is not PEM ({e})")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError(format!("the leaf's key is not PEM ({e})")))?;
    Ok((chain, key))
}

/// The ALPN protocol of a mesh connection that carries bytes, not HTTP (a TCP upstream's
/// connection): the inbound sidecar copies it to the app as it is.
pub const ALPN_TCP: &[u8] = b"switchyard-tcp";

/// A server configuration for a mesh leaf: it serves `leaf_pem` (key `key_pem`) and
/// requires a client certificate the roots in `bundle_pem` verify.
pub fn mesh_server_config(
    leaf_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let roots = crate::files::roots_from_pem(bundle_pem.as_bytes())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        crate::provider(),
    )
    .build()
    .map_err(|e| TlsError(format!("cannot verify peers: {e}")))?;
    let (chain, key) = leaf_and_key(leaf_pem, key_pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError(format!("the leaf and its key do not match ({e})")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ALPN_TCP.to_vec()];
    Ok(config)
}

/// A client configuration for a mesh leaf: it presents `leaf_pem` and verifies servers
/// against `bundle_pem`.
pub fn mesh_client_config(
    leaf_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = crate::files::roots_from_pem(bundle_pem.as_bytes())?;
    let (chain, key) = leaf_and_key(leaf_pem, key_pem)?;
    let mut config = rustls::ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError(format!("the leaf and its key do not match ({e})")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Whether `leaf_pem` verifies against the roots in `bundle_pem` as the server `name`
/// now (chain, validity and name, by rustls' stock webpki verifier).
pub fn verify_leaf(bundle_pem: &str, leaf_pem: &str, name: &str) -> Result<(), TlsError> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let roots = crate::files::roots_from_pem(bundle_pem.as_bytes())?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        crate::provider(),
    )
    .build()
    .map_err(|e| TlsError(format!("no usable root: {e}")))?;
    let leaf = CertificateDer::from_pem_slice(leaf_pem.as_bytes())
        .map_err(|e| TlsError(format!("not a PEM certificate ({e})")))?;
    let name = ServerName::try_from(name.to_string()).map_err(|e| TlsError(e.to_string()))?;
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| TlsError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;

    fn verify(root: &Root, leaf: &Leaf, name: &str) -> Result<(), TlsError> {
        verify_leaf(&root.cert_pem, &leaf.cert_pem, name)
    }

    fn csr_asking_for_everything() -> (KeyPair, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![
            "payments.default.svc.example.org".to_string(),
            "*.example.org".to_string(),
        ])
        .expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let csr = params.serialize_request(&key).expect("csr");
        (key, csr.pem().expect("pem"))
    }

    #[test]
    fn a_forged_csr_gets_a_leaf_for_the_callers_service_only() {
        let now = SystemTime::now();
        let root = new_root("example.org", 365, now).expect("root");
        let (_key, csr) = csr_asking_for_everything();
        let leaf = certify(
            &root,
            csr.as_bytes(),
            "example.org",
            "default",
            "web",
            Duration::from_secs(72 * 3600),
            now,
        )
        .expect("leaf");
        verify(&root, &leaf, "web.default.svc.example.org").expect("valid for web");
        assert!(
            verify(&root, &leaf, "payments.default.svc.example.org").is_err(),
            "the CSR's names were copied"
        );
        // Not a CA: the parsed leaf has no CA basic constraint.
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("der");
        let parsed = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(der.to_vec()),
        );
        assert!(parsed.is_err(), "a certificate is not a CSR");
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert!(!x509.is_ca(), "the leaf is a CA");
        let uris: Vec<String> = x509
            .subject_alternative_name()
            .expect("san ext")
            .expect("san")
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            uris,
            vec!["spiffe://example.org/ns/default/svc/web".to_string()]
        );
        assert_eq!(leaf.not_after, now + Duration::from_secs(72 * 3600));
    }

    #[test]
    fn bad_csrs_are_refused_with_what_is_wrong() {
        let now = SystemTime::now();
        let root = new_root("example.org", 1, now).expect("root");
        let issue = |csr: &[u8]| {
            certify(
                &root,
                csr,
                "example.org",
                "default",
                "web",
                Duration::from_secs(60),
                now,
            )
            .expect_err("refused")
            .0
        };
        assert!(issue(b"").contains("empty"));
        assert!(issue(&vec![b'x'; MAX_CSR_BYTES + 1]).contains("bytes"));
        assert!(issue(b"garbage").contains("PKCS#10"));
        // A CSR whose signature does not match its key.
        let (_, csr) = csr_asking_for_everything();
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .expect("der")
            .as_ref()
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0xff;
        assert!(issue(&der).contains("PKCS#10"));
    }
}
