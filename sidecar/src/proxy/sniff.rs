//! Which protocol a downstream connection speaks, told by its first bytes.
//!
//! hyper-util's `auto` server decides between HTTP/1 and HTTP/2 inside its connection
//! and does not say which it chose. The listener needs to know for its own timers: an
//! HTTP/1 connection waiting for a request head is held to the header-read timeout,
//! an HTTP/2 one only to the idle timeout (see `http::run_connection`). The first read
//! that returns bytes settles it: HTTP/2 with prior knowledge opens with its preface,
//! `PRI * HTTP/2.0`, and no HTTP/1 request starts with `PRI`. A first read of fewer
//! than three bytes counts as HTTP/1, the stricter of the two (a client trickling its
//! bytes one by one is what the header-read timeout is for).

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
    /// Until the first bytes have been read.
    pending: Option<Arc<Protocol>>,
}

impl<T> Sniffed<T> {
    pub fn new(io: T, protocol: Arc<Protocol>) -> Self {
        Self {
            io,
            pending: Some(protocol),
        }
    }
}

/// True for the start of the HTTP/2 connection preface (RFC 9113 §3.4).
fn opens_h2(first: &[u8]) -> bool {
    first.len() >= 3 && b"PRI * HTTP/2.0".starts_with(&first[..first.len().min(14)])
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
            if let Some(p) = this.pending.take() {
                p.h2.store(opens_h2(&buf.filled()[before..]), Ordering::Relaxed);
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
    fn the_preface_says_h2_and_a_request_line_does_not() {
        assert!(opens_h2(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(opens_h2(b"PRI"), "a short first read of the preface");
        assert!(!opens_h2(b"GET / HTTP/1.1\r\n"));
        assert!(!opens_h2(b"POST /x HTTP/1.1\r\n"));
        assert!(!opens_h2(b"PR"), "too short to tell: HTTP/1, the stricter");
        assert!(!opens_h2(b"PRIX"));
    }

    #[tokio::test]
    async fn the_first_read_settles_it_and_later_ones_do_not() {
        for (first, h2) in [
            (&b"PRI * HTTP/2.0\r\n"[..], true),
            (b"GET / HTTP/1.1", false),
        ] {
            let (mut client, server) = tokio::io::duplex(64);
            let protocol = Arc::new(Protocol::default());
            let mut sniffed = Sniffed::new(server, protocol.clone());
            client.write_all(first).await.expect("write");
            let mut buf = [0u8; 64];
            let n = sniffed.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..n], first, "the bytes pass through");
            assert_eq!(protocol.is_h2(), h2, "{first:?}");
            client.write_all(b"PRI * HTTP/2.0").await.expect("write");
            let _ = sniffed.read(&mut buf).await.expect("read");
            assert_eq!(protocol.is_h2(), h2, "a later read changes nothing");
        }
    }
}
