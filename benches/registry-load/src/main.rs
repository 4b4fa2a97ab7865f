//! `registry-load`: drives the switchyard registry or etcd 3 with the same work and
//! prints one `RESULT key=value ...` line per scenario, for `benches/compare/registry.sh`.
//!
//! The work is chosen to be what a service registry does for its clients, expressed in
//! each system's own API:
//!
//! - `register`: a new instance with a new lease. switchyard: one `Register` (it grants
//!   the lease itself); etcd: `LeaseGrant` then `Put` with that lease (two RPCs, because
//!   that is what an etcd-based registry has to send).
//! - `renew`: lease renewals over bidirectional keep-alive streams.
//! - `watch`: the delay from sending a write to every watcher of that service having it.
//! - `fill`: many instances sharing leases, to measure the server's memory afterwards.
//! - `ready`: retries one write until it succeeds, so scripts know the cluster has a
//!   leader.

mod backend;
mod etcd;
mod fill;
mod instance;
mod pool;
mod register;
mod renew;
mod stats;
mod switchyard;
mod watch;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use backend::Backend;

/// Errors are reported, not handled: a benchmark run that fails should say why and stop.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The crate's result type.
pub type Result<T> = std::result::Result<T, BoxError>;

/// Which server the load goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Switchyard,
    Etcd,
}

impl Target {
    /// The name printed in RESULT lines.
    pub fn name(self) -> &'static str {
        match self {
            Target::Switchyard => "switchyard",
            Target::Etcd => "etcd",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "registry-load",
    about = "Load client for the switchyard registry and etcd 3"
)]
struct Cli {
    /// The server kind behind --endpoints.
    #[arg(long, value_enum)]
    target: Target,
    /// gRPC endpoints, comma separated (e.g. http://127.0.0.1:19200). Load is spread over
    /// all of them; a follower forwards writes to the leader in both systems.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// HTTP/2 connections to open (at least one per endpoint). Default: per scenario.
    #[arg(long, global = true)]
    channels: Option<usize>,
    /// Per scenario: register/fill: concurrent requests (64); renew: keep-alive streams
    /// (8); watch: watchers (1000).
    #[arg(long, global = true)]
    concurrency: Option<usize>,
    /// Per scenario: register: stop after this many registrations (none); renew: leases
    /// (1000); watch: changes (200); fill: instances (100000).
    #[arg(long, global = true)]
    count: Option<u64>,
    /// Duration of register and renew; how long `ready` keeps trying.
    #[arg(long, global = true, default_value_t = 10.0)]
    seconds: f64,
    /// TTL of the leases the scenarios create, in seconds (long enough that none expires
    /// during a run: expiries would add writes to the measurement).
    #[arg(long, global = true, default_value_t = 600)]
    ttl: u32,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// New instance + new lease per operation, for --seconds.
    Register,
    /// Create --count leases, then renew them over --concurrency keep-alive streams.
    Renew {
        /// Leases per KeepAlive message (switchyard only; etcd takes one per message).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Messages in flight per stream, so the client never waits a round trip.
        #[arg(long, default_value_t = 64)]
        window: usize,
    },
    /// Open --concurrency watchers on one service, then make --count changes to it.
    Watch {
        /// Time between two changes, in milliseconds.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// How long after the last change to wait for watchers to catch up.
        #[arg(long, default_value_t = 5.0)]
        grace: f64,
    },
    /// Register --count instances, --per-lease of them on each lease (and service).
    Fill {
        /// Instances per service and per lease.
        #[arg(long, default_value_t = 100)]
        per_lease: u64,
    },
    /// Retry one registration until it succeeds or --seconds pass.
    Ready,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("registry-load: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    if !(cli.seconds > 0.0 && cli.seconds <= 3600.0) {
        return Err("--seconds must be in (0, 3600]".into());
    }
    let duration = Duration::from_secs_f64(cli.seconds);
    let nodes = cli.endpoints.len();
    let head = format!("RESULT target={} nodes={nodes}", cli.target.name());
    match cli.scenario {
        Scenario::Register => {
            let concurrency = cli.concurrency.unwrap_or(64).clamp(1, 4096);
            let backend =
                Backend::connect(cli.target, &cli.endpoints, cli.channels.unwrap_or(4)).await?;
            let r = register::run(&backend, concurrency, duration, cli.count, cli.ttl).await?;
            println!("{head} scenario=register concurrency={concurrency} {r}");
        }
        Scenario::Renew { batch, window } => {
            if cli.target == Target::Etcd && batch != 1 {
                return Err("etcd's LeaseKeepAliveRequest carries one lease: use --batch 1".into());
            }
            let streams = cli.concurrency.unwrap_or(8).clamp(1, 1024);
            let leases = cli.count.unwrap_or(1_000).clamp(1, 1_000_000);
            let backend =
                Backend::connect(cli.target, &cli.endpoints, cli.channels.unwrap_or(4)).await?;
            let opts = renew::Options {
                streams,
                leases,
                batch: batch.clamp(1, 1_000),
                window: window.clamp(1, 1_024),
                duration,
                ttl: cli.ttl,
            };
            let r = renew::run(&backend, &opts).await?;
            println!(
                "{head} scenario=renew streams={streams} leases={leases} batch={} window={} {r}",
                opts.batch, opts.window
            );
        }
        Scenario::Watch { interval_ms, grace } => {
            let watchers = cli.concurrency.unwrap_or(1_000).clamp(1, 10_000);
            let changes = cli.count.unwrap_or(200).clamp(1, 100_000);
            // 100 watch streams per HTTP/2 connection: under every server's default limit
            // of concurrent streams per connection.
            let channels = cli.channels.unwrap_or(watchers.div_ceil(100));
            let backend = Backend::connect(cli.target, &cli.endpoints, channels).await?;
            let opts = watch::Options {
                watchers,
                changes,
                interval: Duration::from_millis(interval_ms.clamp(1, 10_000)),
                grace: Duration::from_secs_f64(grace.clamp(0.1, 600.0)),
                ttl: cli.ttl,
            };
            let r = watch::run(&backend, &opts).await?;
            println!(
                "{head} scenario=watch watchers={watchers} changes={changes} interval_ms={interval_ms} {r}"
            );
        }
        Scenario::Fill { per_lease } => {
            let concurrency = cli.concurrency.unwrap_or(64).clamp(1, 4096);
            let count = cli.count.unwrap_or(100_000).clamp(1, 10_000_000);
            let per_lease = per_lease.clamp(1, 1_000);
            let backend =
                Backend::connect(cli.target, &cli.endpoints, cli.channels.unwrap_or(4)).await?;
            // The longest TTL switchyard accepts: nothing expires while memory is measured.
            let r = fill::run(&backend, concurrency, count, per_lease, 3_600).await?;
            println!(
                "{head} scenario=fill concurrency={concurrency} instances={count} per_lease={per_lease} {r}"
            );
        }
        Scenario::Ready => {
            let backend = backend::ready(cli.target, &cli.endpoints, duration).await?;
            drop(backend);
            println!("{head} scenario=ready ok=1");
        }
    }
    Ok(())
}
