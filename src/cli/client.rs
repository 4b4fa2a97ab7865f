//! What every operator verb shares: the `--registry` and `--output` flags, connecting to
//! the registry, turning a refused call into an exit status, and printing tables and JSON.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_proto::v1::routing_client::RoutingClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::{CliError, Output, EXIT_CONFIG, EXIT_NOPERM, EXIT_UNAVAILABLE};

/// Largest message the CLI accepts from the registry (a Watch snapshot of a big catalog).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// `--registry`, shared by every operator verb (global: it may follow a subcommand).
#[derive(Args, Debug)]
pub struct RegistryFlag {
    /// Registry gRPC address.
    #[arg(
        long,
        env = "SWITCHYARD_REGISTRY",
        default_value = "http://127.0.0.1:7400",
        global = true
    )]
    pub registry: String,
}

/// `--output`, shared by the verbs that print (global: it may follow a subcommand).
#[derive(Args, Debug)]
pub struct OutputFlag {
    /// Output format.
    #[arg(
        long,
        short = 'o',
        value_enum,
        env = "SWITCHYARD_OUTPUT",
        default_value_t = Output::Table,
        global = true
    )]
    pub output: Output,
}

/// The `--token` of this run (set once by [`set_token`] before any verb runs).
static TOKEN: std::sync::OnceLock<Option<MetadataValue<Ascii>>> = std::sync::OnceLock::new();

/// Takes the global `--token` (SWITCHYARD_TOKEN) for every call this process makes.
pub fn set_token(secret: Option<&str>) -> Result<(), CliError> {
    let value = match secret.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(format!("Bearer {s}").parse().map_err(|_| {
            CliError::new(
                EXIT_CONFIG,
                "--token holds characters a header cannot carry: pass the secret `acl token create` printed",
            )
        })?),
    };
    let _ = TOKEN.set(value);
    Ok(())
}

static TRANSPORT: std::sync::OnceLock<switchyard_tls::Transport> = std::sync::OnceLock::new();

/// Takes the global `--ca-file` (SWITCHYARD_CA_FILE): TLS to `https://` registries,
/// verified against it. Read once, at start, so a bad file fails before any call.
pub fn set_ca_file(path: Option<&std::path::Path>) -> Result<(), CliError> {
    let transport = switchyard_tls::Transport::from_ca_file(path)
        .map_err(|e| CliError::new(EXIT_CONFIG, format!("cannot use --ca-file: {e}")))?;
    let _ = TRANSPORT.set(transport);
    Ok(())
}

/// How this process reaches registries (plain unless `--ca-file` was given).
pub fn transport() -> switchyard_tls::Transport {
    TRANSPORT.get().cloned().unwrap_or_default()
}

/// Adds `authorization: Bearer <secret>` to every call when a token was given.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connection to the registry that carries the run's token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

fn endpoint(url: &str) -> Result<Endpoint, CliError> {
    Endpoint::from_shared(url.to_string())
        .map(|e| e.connect_timeout(Duration::from_secs(3)))
        .map_err(|e| CliError::new(EXIT_CONFIG, format!("invalid --registry {url:?}: {e}")))
}

/// One connection to the registry at `url`; exit 69 with a hint when nothing answers.
pub async fn channel(url: &str) -> Result<AuthChannel, CliError> {
    let token = Bearer(TOKEN.get().cloned().flatten());
    let transport = transport();
    transport
        .check(url)
        .map_err(|e| CliError::new(EXIT_CONFIG, e.0))?;
    let channel = transport.connect(endpoint(url)?).await.map_err(|e| {
        let why = switchyard_tls::client::explain(&e);
        if why.contains("certificate") || why.contains("handshake") {
            CliError::new(
                EXIT_UNAVAILABLE,
                format!("cannot reach the registry at {url} over TLS: {why}"),
            )
        } else {
            CliError::new(
                EXIT_UNAVAILABLE,
                format!("cannot reach the registry at {url}: {why}; is `switchyard dev` or `switchyard registry` running there? (set --registry or SWITCHYARD_REGISTRY)"),
            )
        }
    })?;
    Ok(InterceptedService::new(channel, token))
}

pub async fn connect_discovery(url: &str) -> Result<DiscoveryClient<AuthChannel>, CliError> {
    Ok(DiscoveryClient::new(channel(url).await?).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

pub async fn connect_routing(url: &str) -> Result<RoutingClient<AuthChannel>, CliError> {
    Ok(RoutingClient::new(channel(url).await?))
}

pub async fn connect_registry(url: &str) -> Result<RegistryClient<AuthChannel>, CliError> {
    Ok(RegistryClient::new(channel(url).await?))
}

pub async fn connect_cluster(url: &str) -> Result<ClusterClient<AuthChannel>, CliError> {
    Ok(ClusterClient::new(channel(url).await?))
}

/// A refused gRPC call as an operator error: bad input exits 64, the rest 69.
pub fn status_error(what: &str, s: tonic::Status) -> CliError {
    let code = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            EXIT_CONFIG
        }
        // Sysexits EX_NOPERM: the token is missing, unknown or lacks the right.
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => EXIT_NOPERM,
        _ => EXIT_UNAVAILABLE,
    };
    // Plaintext HTTP/2 to a TLS port fails this way (the TLS server answers the HTTP/2
    // preface with an alert, or closes).
    const PLAINTEXT_TO_TLS: [&str; 4] = [
        "h2 protocol error",
        "transport error",
        "operation was canceled",
        "connection reset",
    ];
    let hint = if PLAINTEXT_TO_TLS.iter().any(|m| s.message().contains(m)) {
        " (is the registry serving TLS? then use an https:// --registry and --ca-file)"
    } else {
        ""
    };
    if !hint.is_empty() {
        let what = if what.is_empty() {
            "the call failed"
        } else {
            what
        };
        CliError::new(code, format!("{what}: {}{hint}", s.message()))
    } else if what.is_empty() {
        CliError::new(code, s.message().to_string())
    } else {
        CliError::new(code, format!("{what}: {}", s.message()))
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::new(1, format!("cannot encode JSON: {e}")))?;
    print_out(&text)
}

/// Writes `text` and a newline to stdout. A reader that went away (`| head`,
/// `| grep -q`) is no error: the output is not wanted any more, and `println!` would
/// panic. Any other failure is exit code 74 (EX_IOERR).
pub fn print_out(text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CliError::new(74, format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// Prints rows as a left-aligned table under an upper-case header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        // A reader gone away is no error (see `print_out`); any other write error
        // ends the command, as it would have for `println!`, but with its exit code.
        if let Err(e) = print_out(out.trim_end()) {
            eprintln!("error: {}", e.message);
            std::process::exit(i32::from(e.code));
        }
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}
