//! A follower hands the telemetry windows it accepted on to the leader, so the leader's
//! [`TelemetryStore`](crate::telemetry::TelemetryStore) holds every sidecar's reports
//! whichever node they reached (the rollout loop runs there).
//!
//! The path: the client-port `Report` files a window locally, then [`Forwarder::offer`]s
//! it to a bounded queue ([`QUEUE`]) without waiting; one task drains the queue into a
//! client stream (`Telemetry/Report` on the leader's peer port), re-opened when the
//! leader changes or the stream fails, with back-off. A full queue drops the window
//! (counted in `switchyard_registry_telemetry_forward_dropped_total`): lost evidence,
//! never a slowed sidecar. The leader serves forwarded windows on its peer port and
//! never forwards them again; a node that leads forwards nothing (it filed its own).

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1::telemetry_client::TelemetryClient;
use switchyard_proto::v1::{ReportAck, WindowReport};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::raft::propose::Proposer;
use crate::telemetry::MAX_REPORT_BYTES;

/// Windows waiting to be forwarded.
pub const QUEUE: usize = 1_024;
/// Windows in flight on one stream (sent, not yet taken by the connection).
const STREAM_BUFFER: usize = 16;
/// Longest a window may wait for room on the stream before the stream is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long shutdown waits for the open stream to deliver what it holds.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The non-blocking entry to the forwarding queue; cloned into the client-port API.
#[derive(Clone)]
pub struct Forwarder {
    queue: mpsc::Sender<WindowReport>,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    /// Queues a window for the leader; drops (and counts) it when the queue is full.
    pub fn offer(&self, report: WindowReport) {
        if self.queue.try_send(report).is_err() {
            self.metrics.telemetry_forward_dropped.inc();
        }
    }
}

/// The forwarder and the task that drains it (ends on shutdown).
pub fn start(
    proposer: Proposer,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> (Forwarder, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(run(rx, proposer, metrics.clone(), shutdown));
    (Forwarder { queue: tx, metrics }, task)
}

/// One open `Report` stream to a leader.
struct LeaderStream {
    addr: String,
    tx: mpsc::Sender<WindowReport>,
    call: JoinHandle<Result<tonic::Response<ReportAck>, tonic::Status>>,
}

impl LeaderStream {
    fn open(proposer: &Proposer, addr: &str) -> Result<Self, String> {
        let channel = proposer.network().channel(addr)?;
        let mut client = TelemetryClient::new(channel).max_encoding_message_size(MAX_REPORT_BYTES);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let call = tokio::spawn(async move {
            client
                .report(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        Ok(Self {
            addr: addr.to_string(),
            tx,
            call,
        })
    }

    /// Ends the stream: what it holds is still sent; the answer is not awaited.
    fn close(self) {
        drop(self.tx);
        // The task ends when the leader answers the ended stream (or the connection
        // fails); nothing waits for it.
    }
}

/// Where forwarded windows go: the leader's peer address, unless this node leads (or no
/// leader is known: `Err(())`).
fn target(proposer: &Proposer) -> Result<Option<String>, ()> {
    if proposer.is_leader() {
        return Ok(None);
    }
    let own = proposer.raft().metrics().borrow().id;
    match proposer.leader() {
        Some((id, _)) if id == own => Ok(None),
        Some((_, addr)) => Ok(Some(addr)),
        None => Err(()),
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn run(
    mut queue: mpsc::Receiver<WindowReport>,
    proposer: Proposer,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stream: Option<LeaderStream> = None;
    let mut backoff = BACKOFF_MIN;
    // A window taken from the queue and not yet handed to a stream.
    let mut pending: Option<WindowReport> = None;
    loop {
        let report = match pending.take() {
            Some(r) => r,
            None => tokio::select! {
                r = queue.recv() => match r {
                    Some(r) => r,
                    None => break,
                },
                _ = stopped(&mut shutdown) => break,
            },
        };
        let addr = match target(&proposer) {
            // This node leads: the window is filed here already.
            Ok(None) => {
                if let Some(s) = stream.take() {
                    s.close();
                }
                continue;
            }
            Ok(Some(addr)) => addr,
            Err(()) => {
                // No leader known (an election): hold the window, wait, look again.
                // The queue keeps taking windows meanwhile, up to its bound.
                pending = Some(report);
                if sleep_or_stop(&mut shutdown, &mut backoff).await {
                    break;
                }
                continue;
            }
        };
        if stream
            .as_ref()
            .is_some_and(|s| s.addr != addr || s.call.is_finished())
        {
            if let Some(s) = stream.take() {
                if s.call.is_finished() {
                    tracing::debug!(leader = %s.addr, "telemetry stream to the leader ended; re-opening");
                }
                s.close();
            }
        }
        let s = match &mut stream {
            Some(s) => s,
            None => match LeaderStream::open(&proposer, &addr) {
                Ok(s) => stream.insert(s),
                Err(e) => {
                    tracing::debug!(leader = %addr, error = %e, "cannot open a telemetry stream to the leader");
                    pending = Some(report);
                    if sleep_or_stop(&mut shutdown, &mut backoff).await {
                        break;
                    }
                    continue;
                }
            },
        };
        match tokio::time::timeout(SEND_TIMEOUT, s.tx.send(report)).await {
            Ok(Ok(())) => {
                metrics.telemetry_forwarded.inc();
                backoff = BACKOFF_MIN;
            }
            Ok(Err(mpsc::error::SendError(report))) => {
                // The stream ended under us: retry this window on a new one.
                tracing::debug!(leader = %addr, "telemetry stream to the leader failed; backing off");
                if let Some(s) = stream.take() {
                    s.close();
                }
                pending = Some(report);
                if sleep_or_stop(&mut shutdown, &mut backoff).await {
                    break;
                }
            }
            Err(_) => {
                // The leader takes nothing: give the stream up (and this window).
                tracing::debug!(leader = %addr, "the leader took no telemetry for {SEND_TIMEOUT:?}; re-opening");
                metrics.telemetry_forward_dropped.inc();
                if let Some(s) = stream.take() {
                    s.call.abort();
                }
                if sleep_or_stop(&mut shutdown, &mut backoff).await {
                    break;
                }
            }
        }
    }
    if pending.is_some() {
        metrics.telemetry_forward_dropped.inc();
    }
    if let Some(s) = stream.take() {
        let LeaderStream { tx, call, .. } = s;
        drop(tx);
        let abort = call.abort_handle();
        if tokio::time::timeout(CLOSE_TIMEOUT, call).await.is_err() {
            abort.abort();
        }
    }
}

/// Sleeps the back-off (doubling it, up to [`BACKOFF_MAX`]); `true` when shutdown came
/// first.
async fn sleep_or_stop(shutdown: &mut watch::Receiver<bool>, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stopped(shutdown) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = Arc::new(Metrics::default());
        let (tx, mut rx) = mpsc::channel(2);
        let f = Forwarder {
            queue: tx,
            metrics: metrics.clone(),
        };
        for _ in 0..5 {
            f.offer(WindowReport::default());
        }
        assert_eq!(metrics.telemetry_forward_dropped.get(), 3);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());
        // A gone task: dropped too.
        drop(rx);
        f.offer(WindowReport::default());
        assert_eq!(metrics.telemetry_forward_dropped.get(), 4);
    }
}
