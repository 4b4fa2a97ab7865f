//! Writes held back by one turn of the worker's run queue, so that a worker reads every
//! connection that is ready before it writes to any of them.
//!
//! Without this, each connection's task reads its request, forwards it and writes it
//! upstream before the next task reads anything: reads and writes alternate, and every
//! write lands on a peer (the caller, the backend) that has just gone back to sleep
//! after the previous one, so each write pays for waking it. HAProxy's event loop reads
//! every ready connection first and sends after; its peers find many messages per
//! wake-up. A first write that is held asks its task to be polled again and returns
//! `Pending`; the task goes to the back of the run queue (tokio queues a task woken
//! while it runs behind the tasks already queued, on both runtimes), the other ready
//! tasks do their reads, and the held write is made when the task comes round again.
//!
//! Only small writes are held (a request or response head with a small body): a large
//! body is written at once, since one more turn per chunk would only slow it down.

use std::pin::Pin;
use std::task::{Context, Poll};

/// Writes larger than this go out at once.
const HOLD_AT_MOST: usize = 16 * 1024;

/// The state of one socket's writes.
#[derive(Debug, Default)]
pub struct Turn {
    /// The write in progress was held once already: make it now.
    held: bool,
}

impl Turn {
    /// True when a write of `len` bytes should wait one turn: the caller returns
    /// `Poll::Pending` (its task has been woken to come back).
    pub fn hold(&mut self, cx: &Context<'_>, len: usize) -> bool {
        if self.held || len > HOLD_AT_MOST {
            return false;
        }
        self.held = true;
        cx.waker().wake_by_ref();
        true
    }

    /// The write was made (or failed): the next one may be held again.
    pub fn wrote(&mut self) {
        self.held = false;
    }

    /// Makes a write of `len` bytes with `write`, or holds it for this turn
    /// (`Pending`, its task woken to come back).
    pub fn write<R>(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        write: impl FnOnce(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        if self.hold(cx, len) {
            return Poll::Pending;
        }
        let r = write(cx);
        if r.is_ready() {
            self.wrote();
        }
        r
    }
}

/// A socket whose small writes wait one turn ([`Turn`]).
pub struct Held<T> {
    io: T,
    turn: Turn,
}

impl<T> Held<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            turn: Turn::default(),
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Held<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Held<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let io = &mut this.io;
        this.turn
            .write(cx, buf.len(), |cx| Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let io = &mut this.io;
        let len = bufs.iter().map(|b| b.len()).sum();
        this.turn
            .write(cx, len, |cx| Pin::new(io).poll_write_vectored(cx, bufs))
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_small_write_waits_one_turn_and_a_large_one_none() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        let mut turn = Turn::default();
        assert!(turn.hold(&cx, 200), "the first try of a write is held");
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "and its task woken");
        assert!(!turn.hold(&cx, 200), "the second try is made");
        turn.wrote();
        assert!(turn.hold(&cx, 200), "the next write is held again");
        assert!(!turn.hold(&cx, 200));
        turn.wrote();
        assert!(
            !turn.hold(&cx, HOLD_AT_MOST + 1),
            "a large write goes at once"
        );
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
    }
}
