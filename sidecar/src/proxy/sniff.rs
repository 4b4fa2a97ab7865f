//! Which protocol a downstream connection speaks, told by its first bytes.
//!
//! hyper-util's `auto` server decides between HTTP/1 and HTTP/2 inside its connection
//! and does not say which it chose. The listener needs to know for its own timers: an
//! HTTP/1 connection waiting for a request head is held to the header-read timeout,
//! an HTTP/2 one only to the idle timeout (see `http::run_connection`). The rule is
//! hyper-util's own: HTTP/2 with prior knowledge opens with the 24-byte preface, and a
//! connection is HTTP/2 once all of it has arrived; the first byte that differs makes
//! it HTTP/1 for good (`PRI` is a valid HTTP/1 method, so a prefix alone says nothing).
//! Until then it counts as HTTP/1, the stricter of the two: a client trickling the
//! preface is held to the header-read timeout, as one trickling a head is.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection's first bytes said.
#[derive(Debug, Default)]
pub struct Protocol {
    h2: AtomicBool,
}

impl Protocol {
    /// True once the connection has opened with the HTTP/2 preface.
    pub fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }
}

/// A socket that reports its first bytes' protocol to a [`Protocol`].
pub struct Sniffed<T> {
    io: T,
    /// Until the protocol is settled.
    pending: Option<Arc<Protocol>>,
    /// Bytes of the preface seen so far.
    matched: usize,
}

impl<T> Sniffed<T> {
    pub fn new(io: T, protocol: Arc<Protocol>) -> Self {
        Self {
            io,
            pending: Some(protocol),
            matched: 0,
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Where `bytes`, arriving after `matched` bytes of the preface, leave it: `Some(n)`,
/// still the preface with `n` bytes of it seen; `None`, not the preface.
fn preface_after(matched: usize, bytes: &[u8]) -> Option<usize> {
    let rest = &PREFACE[matched.min(PREFACE.len())..];
    let n = rest.len().min(bytes.len());
    (rest[..n] == bytes[..n]).then_some(matched + n)
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniffed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.pending.is_some() && buf.filled().len() > before {
            match preface_after(this.matched, &buf.filled()[before..]) {
                Some(n) if n < PREFACE.len() => this.matched = n,
                Some(_) => {
                    if let Some(p) = this.pending.take() {
                        p.h2.store(true, Ordering::Relaxed);
                    }
                }
                // HTTP/1 for good (the default).
                None => this.pending = None,
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniffed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_the_whole_preface_says_h2() {
        assert_eq!(preface_after(0, PREFACE), Some(24));
        assert_eq!(preface_after(0, b"PRI"), Some(3), "a prefix: not settled");
        assert_eq!(preface_after(3, b" * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(24));
        assert_eq!(
            preface_after(3, b" /x HTTP/1.1\r\n"),
            None,
            "the PRI method"
        );
        assert_eq!(preface_after(0, b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(preface_after(24, b"anything"), Some(24));
    }

    #[tokio::test]
    async fn reads_settle_it_and_later_ones_do_not() {
        let cases: [(&[&[u8]], bool); 4] = [
            (&[PREFACE], true),
            (&[b"PRI", b" * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"], true),
            (&[b"PRI", b" /x HTTP/1.1\r\n"], false),
            (&[b"GET / HTTP/1.1\r\n"], false),
        ];
        for (reads, h2) in cases {
            let (mut client, server) = tokio::io::duplex(64);
            let protocol = Arc::new(Protocol::default());
            let mut sniffed = Sniffed::new(server, protocol.clone());
            let mut buf = [0u8; 64];
            for read in reads {
                client.write_all(read).await.expect("write");
                let n = sniffed.read(&mut buf).await.expect("read");
                assert_eq!(&buf[..n], *read, "the bytes pass through");
            }
            assert_eq!(protocol.is_h2(), h2, "{reads:?}");
            client.write_all(PREFACE).await.expect("write");
            let _ = sniffed.read(&mut buf).await.expect("read");
            assert_eq!(protocol.is_h2(), h2, "a later read changes nothing");
        }
    }
}
