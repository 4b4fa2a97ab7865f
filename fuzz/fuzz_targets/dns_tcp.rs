//! DNS over TCP: any bytes as one connection's stream, framed by hickory-net's own
//! `TcpStream` (the 2-byte length prefix, partial reads, a zero-length frame ending the
//! connection), each frame through the steps hickory-server's TCP path takes (header,
//! FORMERR for an unreadable message, responses never answered) and the registry's and
//! sidecar's handler (`SharedHandler`), each answer written back through the same stream.
//! Never a panic; every answer frame is a DNS response of at most 65535 bytes, one per
//! answered frame, in order, carrying its query's id.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use futures_core::Stream;
use futures_io::{AsyncRead, AsyncWrite};
use hickory_server::net::runtime::{DnsTcpStream, TokioTime};
use hickory_server::net::tcp::TcpStream;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Header, Message, MessageType, ResponseCode};
use hickory_server::proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandle, ResponseHandler};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use libfuzzer_sys::fuzz_target;
use switchyard_core::dns::server::SharedHandler;
use switchyard_core::dns::{DnsConfig, DnsHandler, DnsSource, ServiceRecords};
use switchyard_core::model::policy::{Fallback, Policy, Split, Subset};
use switchyard_core::model::{Instance, State};

/// `web` (two versions, a 90/10 split, one IPv6 and one hostname instance) and `db`.
struct Fixed(BTreeMap<&'static str, Arc<ServiceRecords>>);

impl DnsSource for Fixed {
    fn service(&self, _namespace: &str, service: &str) -> Option<Arc<ServiceRecords>> {
        self.0.get(service).cloned()
    }
    fn revision(&self) -> u64 {
        7
    }
}

fn instance(service: &str, id: &str, address: &str, version: &str) -> Arc<Instance> {
    Arc::new(Instance {
        namespace: "default".into(),
        service: service.into(),
        id: id.into(),
        address: address.into(),
        port: 8080,
        version: version.into(),
        labels: Default::default(),
        weight: 100,
        zone: String::new(),
        state: State::Serving,
        mesh_port: 0,
    })
}

fn subset(name: &str, version: &str) -> Subset {
    Subset {
        name: name.into(),
        version: version.into(),
        version_range: String::new(),
        labels: Default::default(),
    }
}

fn handler() -> &'static Arc<DnsHandler<Fixed>> {
    static H: OnceLock<Arc<DnsHandler<Fixed>>> = OnceLock::new();
    H.get_or_init(|| {
        let split = Policy {
            subsets: vec![subset("stable", "1.0.0"), subset("canary", "2.0.0")],
            routes: Vec::new(),
            default_split: vec![
                Split {
                    subset: "stable".into(),
                    weight: 90,
                },
                Split {
                    subset: "canary".into(),
                    weight: 10,
                },
            ],
            fallback: Fallback::Default,
            sticky_header: String::new(),
            resilience: Default::default(),
        };
        // Enough instances that an ANY or SRV answer with additionals is a few KB.
        let mut web = vec![
            instance("web", "w1", "10.0.0.1", "1.0.0"),
            instance("web", "w2", "fd00::2", "2.0.0"),
            instance("web", "w3", "web-3.example.com", "2.0.0"),
        ];
        for n in 0..40 {
            web.push(instance(
                "web",
                &format!("x{n}"),
                &format!("10.0.2.{n}"),
                "1.0.0",
            ));
        }
        let web = ServiceRecords::new(web, Some(Arc::new(split)));
        let db = ServiceRecords::new(vec![instance("db", "d1", "10.0.1.1", "5")], None);
        let source = Fixed(BTreeMap::from([
            ("web", Arc::new(web)),
            ("db", Arc::new(db)),
        ]));
        Arc::new(DnsHandler::new(source, &DnsConfig::default()).expect("handler"))
    })
}

/// One connection's bytes: read in uneven pieces (so every partial-read state of the
/// framing is taken), what is written kept for checking.
struct Connection {
    input: Vec<u8>,
    at: usize,
    reads: usize,
    written: Arc<Mutex<Vec<u8>>>,
}

/// Sizes of successive reads, as a socket might deliver them.
const PIECES: [usize; 7] = [1, 7, 2, 512, 3, 64, 1 << 16];

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let piece = PIECES[self.reads % PIECES.len()];
        self.reads += 1;
        let n = buf.len().min(piece).min(self.input.len() - self.at);
        let at = self.at;
        buf[..n].copy_from_slice(&self.input[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.lock().expect("lock").extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl DnsTcpStream for Connection {
    type Time = TokioTime;
}

/// Runs a future that never waits on anything outside itself (nothing here does: the
/// connection is in memory and the handler answers from memory).
fn run<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000 {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("the DNS handler waited on something");
}

/// Most frames one input may carry through the handler (each costs an answer).
const MAX_FRAMES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let handler = handler();
    let peer: SocketAddr = ([192, 0, 2, 1], 53000).into();
    let written = Arc::new(Mutex::new(Vec::new()));
    let connection = Connection {
        input: data.to_vec(),
        at: 0,
        reads: 0,
        written: written.clone(),
    };
    // The same buffer size serve_tcp registers the listener with.
    let (mut stream, sender) = TcpStream::from_stream_with_buffer_size(connection, peer, 64);
    let mut cx = Context::from_waker(Waker::noop());
    // The ids of the queries that were answered, in order.
    let mut answered: Vec<u16> = Vec::new();
    for _ in 0..MAX_FRAMES {
        let frame = match Pin::new(&mut stream).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(message))) => message,
            // A closed or broken connection, or (never, in memory) nothing to read yet.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) | Poll::Pending => break,
        };
        let (bytes, src) = frame.into_parts();
        assert!(bytes.len() <= usize::from(u16::MAX));
        let response_handle = ResponseHandle::new(src, sender.clone(), Protocol::Tcp);
        // hickory-server's ServerContext::handle_request, step by step.
        let mut decoder = BinDecoder::new(&bytes);
        let Ok(header) = Header::read(&mut decoder) else {
            continue; // Shorter than a header: no answer.
        };
        match Request::from_bytes(bytes.clone(), src, Protocol::Tcp) {
            Err(_) => {
                let queries = Queries::read(&mut BinDecoder::new(&[]), 0).expect("no queries");
                let response = MessageResponseBuilder::new(&queries, None)
                    .error_msg(&header.metadata, ResponseCode::FormErr);
                let mut response_handle = response_handle;
                if run(response_handle.send_response(response)).is_ok() {
                    answered.push(header.metadata.id);
                }
            }
            Ok(request) if request.metadata.message_type == MessageType::Response => {}
            Ok(request) => {
                let shared = SharedHandler(handler.clone());
                run(shared.handle_request::<_, TokioTime>(&request, response_handle));
                answered.push(request.metadata.id);
            }
        }
    }
    // Let the stream write what is queued (it writes before it reads again).
    let _ = Pin::new(&mut stream).poll_next(&mut cx);
    let _ = Pin::new(&mut stream).poll_next(&mut cx);

    let out = written.lock().expect("lock").clone();
    let mut rest = out.as_slice();
    let mut ids = Vec::new();
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "a truncated length prefix");
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        assert!(rest.len() >= 2 + len, "a truncated answer frame");
        let answer = Message::from_vec(&rest[2..2 + len]).expect("an answer decodes");
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        ids.push(answer.metadata.id);
        rest = &rest[2 + len..];
    }
    assert_eq!(ids, answered, "one answer per answered frame, in order");
});
