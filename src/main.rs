//! `dynamicproxy`: wires configuration, logging and the components together.
//! Each component lives in its own crate; this binary only composes them.

#![forbid(unsafe_code)]

mod cli;
mod pending;
mod routes_cmd;
mod settings;
mod shutdown;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// Exit status for a configuration that cannot be used (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit status for a component that is not part of this build yet (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dynamicproxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Routes(command) => {
            let loaded = settings::load::<()>(&cli.global, &[], &[]).and_then(|(s, _)| s.redis_endpoint());
            let endpoint = match loaded {
                Ok(endpoint) => endpoint,
                Err(e) => return fail(EXIT_CONFIG, e),
            };
            match routes_cmd::run(command, endpoint).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dynamicproxy routes: {e}");
                    e.exit_code()
                }
            }
        }
        Command::Proxy(_) => not_available("proxy"),
        Command::Registrar(_) => not_available("registrar"),
        Command::KubeSync(_) => not_available("kube-sync"),
        Command::All(_) => not_available("all"),
    }
}

fn not_available(name: &str) -> ExitCode {
    eprintln!("dynamicproxy {name}: not available yet in this build");
    ExitCode::from(EXIT_UNAVAILABLE)
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("dynamicproxy: {error}");
    ExitCode::from(code)
}
