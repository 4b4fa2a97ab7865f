//! The operations the scenarios need, each mapped to the equivalent work on the target:
//! the scenarios are written once and never see a switchyard or etcd type.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::transport::{Channel, Endpoint};

use crate::instance::Instance;
use crate::{etcd, switchyard, Result, Target};

/// Bound on every unary call, so a stuck server shows as errors, not as a hung run.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on opening a connection or a stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A server stream, already converted to the scenario's view of it.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, tonic::Status>> + Send>>;

/// What one keep-alive response says.
#[derive(Clone, Copy, Debug, Default)]
pub struct Renewed {
    /// Leases renewed.
    pub ok: u64,
    /// Leases the server did not know (expired or never granted).
    pub not_found: u64,
}

/// Connections to a switchyard registry or an etcd cluster. Cloning shares them.
#[derive(Clone)]
pub struct Backend {
    target: Target,
    channels: Vec<Channel>,
}

impl Backend {
    /// Opens `channels` HTTP/2 connections (at least one per endpoint), spread round
    /// robin over the endpoints. Connecting eagerly makes a dead endpoint fail here, not
    /// in the middle of a measurement.
    pub async fn connect(target: Target, endpoints: &[String], channels: usize) -> Result<Self> {
        if endpoints.is_empty() {
            return Err("no endpoints given".into());
        }
        let n = channels.clamp(endpoints.len(), 1_000);
        let mut opened = Vec::with_capacity(n);
        for i in 0..n {
            let url = &endpoints[i % endpoints.len()];
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("bad endpoint {url}: {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true);
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connecting to {url}: {e}"))?;
            opened.push(channel);
        }
        Ok(Self {
            target,
            channels: opened,
        })
    }

    /// The number of connections; scenarios pick one with `i % channels()`.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    /// One instance on a new lease; returns the lease id. switchyard: one `Register`
    /// without a lease id. etcd: `LeaseGrant`, then `Put` of the instance with that lease.
    pub async fn register_new(&self, ch: usize, instance: &Instance, ttl: u32) -> Result<u64> {
        match self.target {
            Target::Switchyard => {
                timed(switchyard::register(self.channel(ch), instance, ttl, 0)).await
            }
            Target::Etcd => {
                let lease = timed(etcd::grant(self.channel(ch), ttl)).await?;
                timed(etcd::put(self.channel(ch), instance, lease)).await?;
                Ok(lease)
            }
        }
    }

    /// One instance on an existing lease. switchyard: `Register` with `lease_id`. etcd:
    /// `Put` with `lease`. One RPC either way.
    pub async fn attach(&self, ch: usize, instance: &Instance, lease: u64) -> Result<()> {
        match self.target {
            Target::Switchyard => timed(switchyard::register(self.channel(ch), instance, 0, lease))
                .await
                .map(drop),
            Target::Etcd => timed(etcd::put(self.channel(ch), instance, lease)).await,
        }
    }

    /// Opens a keep-alive stream. Every batch of lease ids sent on `requests` becomes one
    /// request message (etcd: exactly one id per message); each response becomes one
    /// [`Renewed`]. Send a first request before awaiting this: etcd answers the stream's
    /// opening only together with its first response.
    pub async fn keep_alive(
        &self,
        ch: usize,
        requests: mpsc::Receiver<Vec<u64>>,
    ) -> Result<BoxStream<Renewed>> {
        match self.target {
            Target::Switchyard => timed(switchyard::keep_alive(self.channel(ch), requests)).await,
            Target::Etcd => timed(etcd::keep_alive(self.channel(ch), requests)).await,
        }
    }

    /// Opens a watch on one service. The first item says the watch is established
    /// (switchyard: the snapshot; etcd: the `created` response); every item lists the ids
    /// of the instances it carries (a later switchyard snapshot after a resync lists them
    /// all).
    pub async fn watch(&self, ch: usize, service: &str) -> Result<BoxStream<Vec<String>>> {
        match self.target {
            Target::Switchyard => timed(switchyard::watch(self.channel(ch), service)).await,
            Target::Etcd => timed(etcd::watch(self.channel(ch), service)).await,
        }
    }
}

/// Applies [`RPC_TIMEOUT`] to one call.
pub async fn timed<T>(call: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {RPC_TIMEOUT:?}").into()),
    }
}

/// Connects and registers one probe instance, retrying until it works or `within` passes:
/// a write succeeds only once the cluster has a leader.
pub async fn ready(target: Target, endpoints: &[String], within: Duration) -> Result<Backend> {
    let deadline = Instant::now() + within;
    let probe = Instance::new("ready-probe", "probe-0".to_owned(), 0);
    let mut last: String;
    loop {
        match Backend::connect(target, endpoints, endpoints.len()).await {
            Ok(backend) => {
                let mut all = true;
                last = String::new();
                // Every endpoint must answer: a 3-node run needs all three up.
                for ch in 0..backend.channels() {
                    if let Err(e) = backend.register_new(ch, &probe, 60).await {
                        all = false;
                        last = e.to_string();
                        break;
                    }
                }
                if all {
                    return Ok(backend);
                }
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {within:?}: {last}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
