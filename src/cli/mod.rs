//! The command line: one module per verb group, plus `config` (the merge of a TOML file
//! into the server roles' flags, and the duration formats) and `client` (what the operator
//! verbs share: connecting, errors, tables and JSON).
//!
//! Every flag has a `SWITCHYARD_*` environment variable, shown by `--help`: the flag's name
//! (`--health-interval` -> `SWITCHYARD_HEALTH_INTERVAL`) where it means the same in every
//! verb, prefixed by the verb where another verb's flag of that name means something else
//! (the sidecar's `--dns` is `SWITCHYARD_SIDECAR_DNS`, `route match --to` is
//! `SWITCHYARD_ROUTE_MATCH_TO`).

mod acl;
mod catalog;
mod client;
mod config;
mod demo;
mod flags;
mod intention;
mod kv;
mod members;
mod register;
mod registry;
mod rollout;
mod route;
mod route_resilience;
mod sidecar;
mod tls;
mod top;

use std::io::IsTerminal;

use clap::{ArgMatches, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Exit status for a usage or configuration error (sysexits EX_USAGE / EX_CONFIG family).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status when the registry cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status of a registry whose data dir could not be written (a full disk, lost
/// permissions, a failed fsync; sysexits EX_IOERR): its supervisor should restart it.
pub const EXIT_STORAGE: u8 = 74;
/// Exit status when the registry refused the token (sysexits EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;

/// A failed command: what to tell the operator, and the exit status.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: u8,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }
}

/// Service discovery and a sidecar load balancer with version-aware canary routing.
#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SWITCHYARD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// ACL token secret sent with every call to the registry (`authorization: Bearer`);
    /// needed once ACLs are bootstrapped. Never logged.
    #[arg(long, global = true, env = "SWITCHYARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the registry's TLS certificate: clients reach
    /// `https://` registries verified against it. A registry node also requires it of
    /// its peers (mutual TLS on --peer-listen) when --tls-cert is set.
    #[arg(long, global = true, env = "SWITCHYARD_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a registry node (gRPC on --listen, metrics and health on --http).
    Registry(Box<registry::RegistryArgs>),
    /// Run the sidecar: watch the registry, proxy outbound traffic, register the local service.
    Sidecar(Box<sidecar::SidecarArgs>),
    /// Run a single-node registry and a sidecar in one process on the default ports,
    /// data in a temp dir unless --data-dir.
    Dev(registry::DevArgs),
    /// Register an instance and hold its lease until Ctrl-C, then deregister it.
    Register(register::RegisterArgs),
    /// List the services of a namespace.
    Services(catalog::ServicesArgs),
    /// List the instances of a service.
    Instances(catalog::InstancesArgs),
    /// Show and change a service's routing policy (canary splits, header routes, rollback).
    Route(route::RouteArgs),
    /// Canary rollouts the registry runs: start, follow (`status --watch`), promote, pause,
    /// abort, retry, undo.
    Rollout(rollout::RolloutArgs),
    /// ACLs: bootstrap, tokens (create, list, read, delete), whoami.
    Acl(acl::AclArgs),
    /// Who may call whom over the mesh: allow, deny, list, delete, check SRC DST.
    Intention(intention::IntentionArgs),
    /// The replicated KV store: get, put, delete, list (Consul's `consul kv`).
    Kv(kv::KvArgs),
    /// Feature flags (flagd schema): set, import, get, list, enable, disable, remove,
    /// history, rollback, eval.
    Flags(flags::FlagsArgs),
    /// TLS certificates: `tls init` makes a CA and a registry certificate for a quick start.
    Tls(tls::TlsArgs),
    /// List the registry cluster's members and state; add or remove a member.
    Members(members::MembersArgs),
    /// Request rate, error rate and p50/p99 by version, from the sidecars' reports.
    Top(top::TopArgs),
    /// The canary tour: registry, sidecar, two versions of a backend, splits and rollback.
    Demo,
    /// The demo's HTTP backend: answers every request with its version and instance id.
    DemoBackend(demo::DemoBackendArgs),
}

/// Logs go to stderr; `RUST_LOG` overrides the level (servers default to info, operator
/// verbs to warn so their tables stay clean).
pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Registry(_) | Command::Dev(_) | Command::Sidecar(_) | Command::DemoBackend(_) => {
            // openraft narrates every vote and append at info, and hickory-server logs two
            // info lines per DNS query (at 100k queries/s that is the whole CPU): keep
            // their warnings only.
            "info,openraft=warn,hickory_server=warn"
        }
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Merges the server roles' `--config` files into their flags. Runs before the async
/// runtime is built, since the merged config decides how it is built (`worker_threads`).
pub fn resolve(mut cli: Cli, matches: &ArgMatches) -> Result<Cli, CliError> {
    let sub = matches.subcommand().map(|(_, m)| m);
    cli.command = match cli.command {
        Command::Registry(args) => Command::Registry(Box::new(args.resolve(sub)?)),
        Command::Sidecar(args) => Command::Sidecar(Box::new(args.resolve(sub)?)),
        other => other,
    };
    Ok(cli)
}

/// Runs the command; `cli` has been through [`resolve`].
pub async fn run(cli: Cli) -> Result<(), CliError> {
    client::set_token(cli.token.as_deref())?;
    // A registry reads its CA itself (it may also come from its --config file).
    if !matches!(cli.command, Command::Registry(_)) {
        client::set_ca_file(cli.ca_file.as_deref())?;
    }
    match cli.command {
        Command::Acl(args) => acl::run(args).await,
        Command::Intention(args) => intention::run(args).await,
        Command::Kv(args) => kv::run(args).await,
        Command::Flags(args) => flags::run(args).await,
        Command::Tls(args) => tls::run(args).await,
        Command::Registry(args) => registry::run_registry(*args, cli.ca_file).await,
        Command::Dev(args) => registry::run_dev(args, cli.token.clone()).await,
        Command::Sidecar(args) => sidecar::run(*args, cli.token.clone()).await,
        Command::Register(args) => register::run(args).await,
        Command::Services(args) => catalog::services(args).await,
        Command::Instances(args) => catalog::instances(args).await,
        Command::Route(args) => route::run(args).await,
        Command::Rollout(args) => rollout::run(args).await,
        Command::Demo => demo::run_demo().await,
        Command::Members(args) => members::run(args).await,
        Command::Top(args) => top::run(args).await,
        Command::DemoBackend(args) => demo::run_backend(args).await,
    }
}

/// Parses `KEY=VALUE` (labels).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Tokio worker threads of the main runtime (0 = one per core), after [`resolve`].
/// The sidecar's is always one: its `--worker-threads` are proxy workers, each a
/// thread with a runtime of its own, the first being `main`'s
/// (`switchyard_sidecar::workers`).
pub fn worker_threads(cli: &Cli) -> usize {
    match &cli.command {
        Command::Sidecar(_) => 1,
        // A process allowed one CPU (taskset, or a cgroup quota of one core, which
        // `available_parallelism` reads) gets a current-thread runtime: a multi-thread
        // runtime's one worker only adds cross-thread hand-offs and its LIFO slot, which
        // runs a connection's task right after each stream that woke it, so a change
        // reaching 100 Watch streams on one connection went out in 100 writes instead
        // of one (benches/RESULTS.md, "Registry").
        _ if std::thread::available_parallelism().is_ok_and(|n| n.get() == 1) => 1,
        _ => 0,
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when it is first polled, so call it before starting work: a signal that arrives
/// during start-up then still means a graceful stop.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
