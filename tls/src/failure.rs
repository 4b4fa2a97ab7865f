//! Why a server-side TLS handshake failed, in a few words an operator can act on, and
//! process-wide counters of them (one atomic per reason, exported as a metric family).
//!
//! tokio-rustls hands back an `io::Error`; the rustls error inside it says what went
//! wrong. The reasons are few and fixed, so a label set a stranger cannot grow.

use std::sync::atomic::{AtomicU64, Ordering};

use rustls::{AlertDescription, CertificateError};

/// Why a handshake failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The client did not finish within the handshake timeout.
    Timeout,
    /// The bytes were not TLS (a plaintext client on a TLS port).
    NotTls,
    /// A client certificate is required and none was sent (peer port, mesh inbound).
    NoClientCert,
    /// The client's certificate was not signed by a CA this port trusts (no issuer of
    /// that name, or one of the same name whose signature does not match: a second CA
    /// made with the same name).
    UnknownCa,
    /// The client's certificate has expired or is not valid yet.
    Expired,
    /// The client's certificate is otherwise unusable (bad signature, usage, encoding).
    BadCertificate,
    /// The client refused this server's certificate (its alert says so).
    ClientRejected,
    /// The connection closed or failed mid-handshake.
    Closed,
    /// Anything else (no shared version or cipher suite, protocol violations).
    Other,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::Timeout,
        Reason::NotTls,
        Reason::NoClientCert,
        Reason::UnknownCa,
        Reason::Expired,
        Reason::BadCertificate,
        Reason::ClientRejected,
        Reason::Closed,
        Reason::Other,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Timeout => "timeout",
            Reason::NotTls => "not_tls",
            Reason::NoClientCert => "no_client_cert",
            Reason::UnknownCa => "unknown_ca",
            Reason::Expired => "expired",
            Reason::BadCertificate => "bad_certificate",
            Reason::ClientRejected => "client_rejected",
            Reason::Closed => "closed",
            Reason::Other => "other",
        }
    }

    /// The reason of a failed `TlsAcceptor::accept`.
    pub fn of(e: &std::io::Error) -> Reason {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe => Reason::Closed,
                _ => Reason::Other,
            };
        };
        match tls {
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => Reason::NotTls,
            rustls::Error::NoCertificatesPresented => Reason::NoClientCert,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Reason::UnknownCa
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Reason::Expired,
                _ => Reason::BadCertificate,
            },
            rustls::Error::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                // What a client sends when this server's chain fails its signature check.
                | AlertDescription::DecryptError,
            ) => Reason::ClientRejected,
            _ => Reason::Other,
        }
    }
}

/// Handshake failures by reason, for one kind of listener.
#[derive(Debug)]
pub struct Failures([AtomicU64; Reason::ALL.len()]);

impl Failures {
    pub const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; Reason::ALL.len()])
    }

    pub fn record(&self, reason: Reason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// (reason, count) for every reason, zeros included.
    pub fn counts(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL
            .iter()
            .map(|r| (*r, self.0[*r as usize].load(Ordering::Relaxed)))
    }

    pub fn total(&self) -> u64 {
        self.counts().map(|(_, n)| n).sum()
    }
}

impl Default for Failures {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn rustls_errors_map_to_reasons_and_are_counted() {
        let cases = [
            (
                io(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                Reason::NotTls,
            ),
            (
                io(rustls::Error::NoCertificatesPresented),
                Reason::NoClientCert,
            ),
            (
                io(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer,
                )),
                Reason::UnknownCa,
            ),
            (
                io(rustls::Error::InvalidCertificate(CertificateError::Expired)),
                Reason::Expired,
            ),
            (
                io(rustls::Error::InvalidCertificate(
                    CertificateError::BadSignature,
                )),
                Reason::UnknownCa,
            ),
            (
                io(rustls::Error::InvalidCertificate(
                    CertificateError::InvalidPurpose,
                )),
                Reason::BadCertificate,
            ),
            (
                io(rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
                Reason::ClientRejected,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                Reason::Closed,
            ),
            (io(rustls::Error::DecryptError), Reason::Other),
        ];
        let f = Failures::new();
        for (e, want) in &cases {
            assert_eq!(Reason::of(e), *want, "{e}");
            f.record(*want);
        }
        assert_eq!(f.total(), cases.len() as u64);
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "ALL is in declaration order");
        }
        let not_tls = f.counts().find(|(r, _)| *r == Reason::NotTls);
        assert_eq!(not_tls, Some((Reason::NotTls, 1)));
    }
}
