//! `switchyard`: one binary, one verb per role. This file only parses the command line,
//! sets up logging and hands over to `cli`.

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    let matches = cli::Cli::command().get_matches();
    let parsed = match cli::Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    cli::init_logging(&parsed);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    match cli::worker_threads(&parsed) {
        0 => {}
        n => {
            builder.worker_threads(n);
        }
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(parsed, &matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
