//! The Watch RPC's HTTP/2 side, written here instead of by tonic's generated server, so
//! that every byte a watcher has been sent and not yet taken is counted and bounded
//! (`watch::budget`).
//!
//! Why not tonic's: its encoder keeps one buffer per stream and reuses it, so a watcher
//! that was once sent a snapshot keeps a snapshot-sized buffer for as long as it is
//! open; and the chunks it hands to hyper are not ours to count. HTTP/2 flow control
//! does not bound it either: hyper gives h2 a whole chunk once the stream has one byte
//! of send capacity, h2 queues it whatever the peer's window (hyper's
//! `max_send_buf_size` only limits the capacity it asks for, and tonic's server does not
//! expose it), so a peer that never reads, or opens a large window and stops reading
//! its socket, leaves every byte it was given queued in the registry.
//!
//! Here each event is encoded into a buffer of its own, charged to the node's budget,
//! and built only when the watcher has room (`StreamBytes::poll_room`); hyper asks for
//! the next frame as soon as the last was queued, and is told to wait until the
//! connection has written it out.
//!
//! Everything else about the call is gRPC's usual framing: one length-prefixed request
//! message in, `application/grpc` and length-prefixed events out, the status in the
//! trailers. Interceptors set on the `DiscoveryServer` do not run for Watch: a check
//! every Discovery method needs must go in front of this route too.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use prost::Message;
use tonic::server::NamedService;
use tonic::Status;

use switchyard_proto::v1 as pb;

use super::discovery::{buffer_full, grpc_frame, DiscoveryApi, Next, WatchEvents, PREFIX};
use crate::config::MAX_REQUEST_BYTES;
use crate::shared::Shared;
use crate::watch::budget::StreamBytes;

const WATCH_PATH: &str = "/switchyard.v1.Discovery/Watch";

/// The Discovery service with its Watch method served by [`WatchBody`]; every other
/// method goes to `inner` (tonic's generated server).
#[derive(Clone)]
pub struct WatchRoute<S> {
    inner: S,
    api: Arc<DiscoveryApi>,
    shared: Arc<Shared>,
}

impl<S> WatchRoute<S> {
    pub fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            api: Arc::new(DiscoveryApi::new(shared.clone())),
            shared,
        }
    }
}

impl<S: NamedService> NamedService for WatchRoute<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for WatchRoute<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Box::pin(self.inner.call(req));
        }
        let api = self.api.clone();
        let shared = self.shared.clone();
        let metadata = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
        Box::pin(async move {
            let opened = match read_request(req.into_body()).await {
                // Read on each service watched; watching every service needs read on `*`.
                Ok(mut request) => match may_watch(&shared, &metadata, &request) {
                    Ok(flags_allowed) => {
                        // Flags a caller may not read are left out rather than failing
                        // the watch: a sidecar's token need not grant them.
                        request.flags &= flags_allowed;
                        api.open_watch(request)
                    }
                    Err(e) => Err(e),
                },
                Err(status) => Err(status),
            };
            let response = match shared.metrics.observe("Watch", opened) {
                Ok(events) => {
                    let bytes = StreamBytes::new(shared.watch_budget.clone());
                    let body = WatchBody {
                        events,
                        bytes,
                        shared,
                        done: false,
                    };
                    let mut response = http::Response::new(tonic::body::Body::new(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    response
                }
                Err(status) => status.into_http(),
            };
            Ok(response)
        })
    }
}

/// The one `WatchRequest` of the call: read up to its end (not to the end of the
/// request body, which a client may keep open), at most `MAX_REQUEST_BYTES`.
async fn read_request(mut body: tonic::body::Body) -> Result<pb::WatchRequest, Status> {
    let mut buf = BytesMut::new();
    loop {
        if buf.len() >= PREFIX {
            if buf[0] != 0 {
                return Err(Status::unimplemented(
                    "compressed Watch requests are not supported: send it uncompressed",
                ));
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > MAX_REQUEST_BYTES {
                return Err(Status::resource_exhausted(
                    "the request message is larger than 1 MiB, the registry's limit per message",
                ));
            }
            if buf.len() >= PREFIX + len {
                buf.advance(PREFIX);
                return pb::WatchRequest::decode(buf.split_to(len).freeze())
                    .map_err(|e| Status::invalid_argument(format!("invalid WatchRequest: {e}")));
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > PREFIX + MAX_REQUEST_BYTES {
                        return Err(Status::resource_exhausted(
                            "the request message is larger than 1 MiB, the registry's limit per message",
                        ));
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(status)) => return Err(status),
            None => {
                return Err(Status::invalid_argument(
                    "the Watch call ended without its WatchRequest message",
                ))
            }
        }
    }
}

/// The response body of one Watch: each event a frame of its own bytes, charged to the
/// node's watch budget until the connection has written it; the status in trailers.
struct WatchBody {
    events: WatchEvents,
    bytes: Arc<StreamBytes>,
    shared: Arc<Shared>,
    done: bool,
}

impl WatchBody {
    fn end(&mut self, status: &Status) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        // Build nothing while this watcher's earlier events are still unsent: its
        // changes wait in the hub (a resync if it falls past it).
        ready!(this.bytes.poll_room(cx));
        let next = match this.events.poll_next_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return this.end(&Status::ok("")),
            Poll::Ready(Some(Err(status))) => return this.end(&status),
            Poll::Ready(Some(Ok(next))) => next,
        };
        let (data, delta) = match next {
            // A live delta: the bytes every watcher of its kind is sent. Each watcher is
            // charged for them in full, as if they were its own (they are held at most
            // once, so the budget errs on the safe side).
            Next::Frame(bytes) => (bytes, true),
            Next::Event(event) => match grpc_frame(&event) {
                Ok(data) => (
                    Bytes::from(data),
                    matches!(event.kind, Some(pb::watch_event::Kind::Delta(_))),
                ),
                Err(status) => return this.end(&status),
            },
        };
        match this.bytes.charge(data, delta) {
            Ok(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Err(full) => {
                this.shared.metrics.watch_buffer_closes.inc();
                tracing::info!(
                    held = full.held,
                    cap = full.cap,
                    "closing a watcher: the node's watch buffer is full"
                );
                this.end(&buffer_full(full.held, full.cap))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The ACL resource flags are read and written under (`kv:flags/:read`).
pub(crate) const FLAGS_RESOURCE: &str = "flags/";

fn may_watch(
    shared: &Shared,
    metadata: &tonic::metadata::MetadataMap,
    request: &pb::WatchRequest,
) -> Result<bool, Status> {
    use crate::model::acl::Right;
    let caller = crate::auth::caller(shared, metadata)?;
    for p in &request.kv_prefixes {
        if !caller.may(Right::KvRead, p) {
            return Err(crate::auth::denied(
                shared,
                &caller,
                "Watch",
                Right::KvRead,
                p,
            ));
        }
    }
    let flags_allowed = caller.may(Right::KvRead, FLAGS_RESOURCE);
    if request.services.is_empty() {
        if caller.may(Right::Read, "*") {
            return Ok(flags_allowed);
        }
        return Err(crate::auth::denied(
            shared,
            &caller,
            "Watch",
            Right::Read,
            "*",
        ));
    }
    for s in &request.services {
        if !caller.may(Right::Read, s) {
            return Err(crate::auth::denied(
                shared,
                &caller,
                "Watch",
                Right::Read,
                s,
            ));
        }
    }
    Ok(flags_allowed)
}
