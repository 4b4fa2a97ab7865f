//! `switchyard tls init`: a CA and a registry certificate for a quick start.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CliError, EXIT_CONFIG};

#[derive(Args, Debug)]
pub struct TlsArgs {
    #[command(subcommand)]
    pub command: TlsCommand,
}

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Write a new CA (ca.pem, ca-key.pem) and one certificate every registry node can
    /// use (registry.pem, registry-key.pem; names localhost, 127.0.0.1, ::1 and each
    /// --san), then print the flags that use them.
    Init(InitArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to write the files into (created if missing).
    #[arg(long, env = "SWITCHYARD_TLS_DIR", default_value = "switchyard-tls")]
    pub dir: PathBuf,
    /// Another DNS name or IP address the registry nodes are reached by (repeatable).
    #[arg(long, env = "SWITCHYARD_TLS_SAN", value_delimiter = ',')]
    pub san: Vec<String>,
    /// Days the CA and the certificate are valid.
    #[arg(long, env = "SWITCHYARD_TLS_DAYS", default_value_t = 365)]
    pub days: u32,
    /// Replace files already in --dir (clients trusting the old CA then need the new one).
    #[arg(long, env = "SWITCHYARD_TLS_FORCE")]
    pub force: bool,
}

pub fn run(args: TlsArgs) -> Result<(), CliError> {
    match args.command {
        TlsCommand::Init(args) => init(args),
    }
}

fn init(args: InitArgs) -> Result<(), CliError> {
    use switchyard_tls::generate;
    let bundle = generate::quickstart("switchyard CA", &args.san, args.days)
        .map_err(|e| CliError::new(EXIT_CONFIG, e.0))?;
    let written = generate::write(&args.dir, &bundle, args.force)
        .map_err(|e| CliError::new(EXIT_CONFIG, e.0))?;
    for path in &written {
        println!("wrote {}", path.display());
    }
    let d = args.dir.display();
    println!();
    println!("registry nodes:  switchyard registry --tls-cert {d}/{} --tls-key {d}/{} --ca-file {d}/{} ...", generate::CERT, generate::KEY, generate::CA_CERT);
    println!(
        "clients:         --registry https://HOST:7400 --ca-file {d}/{}",
        generate::CA_CERT
    );
    println!(
        "keep {d}/{} secret: it signs certificates every client trusts.",
        generate::CA_KEY
    );
    Ok(())
}
