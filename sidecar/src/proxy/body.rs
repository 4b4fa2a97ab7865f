//! The bodies the proxy handles: the response it returns (the upstream's body, holding
//! the endpoint's active-request guard until the last byte is sent, or a short local
//! answer), the caller's request body on its way upstream ([`DownstreamBody`], which
//! remembers whether it broke) and [`Guarded`], a body that holds a value until it ends.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::endpoint::ActiveGuard;
use crate::limits::Permit;

pub enum ProxyBody {
    Upstream {
        body: Incoming,
        /// The HTTP/1.1 connection the body arrives on, polled before the body and
        /// given back to its pool once the body has ended (`None`: HTTP/2, or given
        /// back already).
        lease: Option<super::h1::Lease>,
        /// Dropped with the body: the request stops counting as active only when its
        /// response has been streamed (or abandoned).
        _guard: ActiveGuard,
        /// The request's place under the service's `max_requests`, held as long.
        _permit: Permit,
        /// A gRPC answer's status in its trailers, for per-version telemetry.
        late: Option<crate::telemetry::LateStatus>,
    },
    Local(Option<Bytes>),
}

impl ProxyBody {
    pub fn text(s: String) -> Self {
        ProxyBody::Local(Some(Bytes::from(s)))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream {
                body, late, lease, ..
            } => {
                if let Some(l) = lease {
                    l.drive(cx);
                }
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(t) = frame.trailers_ref() {
                        if let Some(l) = late.take() {
                            l.trailers(t);
                        }
                    }
                }
                let ended = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    _ => false,
                };
                if ended {
                    if let Some(mut l) = lease.take() {
                        l.finished();
                    }
                }
                polled
            }
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// The caller's request body as sent upstream. When it fails (a bad chunk header, a
/// body shorter than its Content-Length, a reset), hyper's client reports only that the
/// request failed; [`DownstreamBody::failure`] tells the proxy the fault was the
/// caller's, so it answers 400 and does not count it against the endpoint.
pub struct DownstreamBody {
    /// Bytes already read from `body` (while the proxy looked for its end), sent first.
    prefix: Option<Bytes>,
    body: Incoming,
    failed: Arc<OnceLock<String>>,
}

/// Set once the downstream body has failed, with what hyper said.
#[derive(Clone, Default)]
pub struct BodyFailure(Arc<OnceLock<String>>);

impl BodyFailure {
    /// Why the downstream body failed, if it did.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

impl DownstreamBody {
    pub fn new(body: Incoming) -> (Self, BodyFailure) {
        Self::with_prefix(None, body)
    }

    /// `body` with `prefix` (bytes already read from it) sent first.
    pub fn with_prefix(prefix: Option<Bytes>, body: Incoming) -> (Self, BodyFailure) {
        let failure = BodyFailure::default();
        (
            Self {
                prefix,
                body,
                failed: failure.0.clone(),
            },
            failure,
        )
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            let _ = this.failed.set(e.to_string());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.body.size_hint();
        let Some(prefix) = &self.prefix else {
            return hint;
        };
        let n = prefix.len() as u64;
        let mut with = SizeHint::new();
        with.set_lower(hint.lower().saturating_add(n));
        if let Some(upper) = hint.upper() {
            with.set_upper(upper.saturating_add(n));
        }
        with
    }
}

/// A request body on its way upstream: the caller's, streamed, or a copy kept in
/// memory so a retry can send it again (see `proxy::retry`).
pub enum UpstreamBody {
    Stream(DownstreamBody),
    Full {
        data: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
    },
}

impl UpstreamBody {
    pub fn empty() -> Self {
        UpstreamBody::Full {
            data: None,
            trailers: None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Stream(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Full { data, trailers } => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Stream(b) => b.is_end_stream(),
            UpstreamBody::Full { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Stream(b) => b.size_hint(),
            UpstreamBody::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// `body`, holding `guard` until the body is dropped (sent or abandoned).
pub struct Guarded<B, G> {
    pub body: B,
    pub guard: G,
}

impl<B: Body + Unpin, G: Unpin> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
