//! The hickory-server adapter: DNS over TCP (framing, idle timeouts, pipelining). The only
//! file that names hickory-server, whose API moves between releases (pinned in the
//! workspace's Cargo.toml).

use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Metadata, ResponseCode};
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::answer::{response_metadata, DnsHandler};
use super::udp::EDNS_PAYLOAD;
use super::DnsSource;

/// Lets hickory-server (TCP) and the UDP loop share one handler. Public (hidden) only for
/// the `dns_tcp` fuzz target, which drives it with hickory's own TCP framing.
#[doc(hidden)]
pub struct SharedHandler<S: DnsSource>(pub Arc<DnsHandler<S>>);

#[async_trait::async_trait]
impl<S: DnsSource> RequestHandler for SharedHandler<S> {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let handler = &self.0;
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        if request.edns.is_some() {
            builder.edns(&edns);
        }
        let queries = request.queries.queries();
        let first = queries
            .first()
            .map(|q| (q.original().name(), q.query_type()));
        let edns_version = request.edns.as_ref().map(|e| e.version());
        let answer = handler.outcome(&request.metadata, queries.len(), first, edns_version);
        let metadata = response_metadata(&request.metadata, &answer);
        let soa: Vec<&Record> = if answer.soa {
            vec![&handler.soa]
        } else {
            Vec::new()
        };
        let response = builder.build(
            metadata,
            answer.answers.iter(),
            std::iter::empty(),
            soa,
            answer.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "DNS response not sent");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_server::proto::op::Header {
                    metadata,
                    counts: Default::default(),
                })
            }
        }
    }
}

/// Serves DNS over TCP on `tcp` until shutdown, then stops gracefully.
pub(super) async fn serve_tcp<S: DnsSource>(
    handler: Arc<DnsHandler<S>>,
    tcp: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut server = Server::new(SharedHandler(handler));
    server.register_listener(tcp, Duration::from_secs(5), 64);
    let _ = shutdown.wait_for(|s| *s).await;
    if let Err(e) = server.shutdown_gracefully().await {
        tracing::debug!(error = %e, "DNS server stopped with an error");
    }
}
