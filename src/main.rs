//! `dynamicproxy`: wires configuration, logging and the components together.
//! Each component lives in its own crate; this binary only composes them.

// `deny`, not `forbid`: one module (allocator) makes one FFI call to glibc.
#![deny(unsafe_code)]

mod admin;
mod admin_guard;
mod allocator;
mod cli;
mod daemons;
mod handover;
mod manpage;
mod metrics_format;
mod operator;
mod routes_cmd;
mod sd_notify;
mod settings;
mod shutdown;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::daemons::{EXIT_CONFIG, Selection};

fn main() -> ExitCode {
    // Before any other thread exists: the arena count is fixed as threads first allocate.
    allocator::use_one_arena();
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
        Command::GenerateDocs(c) => match manpage::generate(&c.dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, format_args!("cannot write the man pages and completions into {}: {e}", c.dir.display())),
        },
        Command::Routes(command) => {
            let loaded = settings::load::<()>(&cli.global, &[])
                .and_then(|(s, figment)| Ok((s.redis_endpoint()?, routes_cmd::denied_networks(&figment), figment)));
            let (endpoint, denied, figment) = match loaded {
                Ok(loaded) => loaded,
                Err(e) => return fail(EXIT_CONFIG, e),
            };
            if cli.global.check {
                println!("configuration ok");
                return ExitCode::SUCCESS;
            }
            match routes_cmd::run(command, endpoint, &denied, &figment).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dynamicproxy routes: {e}");
                    e.exit_code()
                }
            }
        }
        // `--admin-listen` before the subcommand is the same flag as after it; after wins.
        Command::Proxy(c) => {
            let mut proxy = c.proxy;
            proxy.admin_listen = proxy.admin_listen.or(cli.global.admin_listen);
            daemons::run(cli.global, Selection { proxy: Some(proxy), ..Default::default() }).await
        }
        Command::Registrar(c) => {
            let admin_listen = c.admin_listen.or(cli.global.admin_listen);
            daemons::run(cli.global, Selection { registrar: Some(c.registrar), admin_listen, ..Default::default() })
                .await
        }
        Command::KubeSync(c) => {
            let mut kube_sync = c.kube_sync;
            kube_sync.admin_listen = kube_sync.admin_listen.or(cli.global.admin_listen);
            daemons::run(cli.global, Selection { kube_sync: Some(kube_sync), ..Default::default() }).await
        }
        Command::All(c) => {
            let c = *c;
            let mut proxy = c.proxy;
            proxy.admin_listen = proxy.admin_listen.or(cli.global.admin_listen);
            let registrar = dynamicproxy_registrar::Flags {
                listen: c.listen,
                ident_port: c.ident_port,
                project_prefix: c.project_prefix,
                canonical_domain: proxy.canonical_domain.clone(),
                ..Default::default()
            };
            let kube_sync = dynamicproxy_kube_sync::Flags {
                kubeconfig: c.kubeconfig,
                label_selector: c.label_selector,
                namespace: c.namespace,
                ..Default::default()
            };
            let selection = Selection {
                all: true,
                proxy: Some(proxy),
                registrar: Some(registrar),
                kube_sync: Some(kube_sync),
                admin_listen: None,
            };
            daemons::run(cli.global, selection).await
        }
    }
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("dynamicproxy: {error}");
    ExitCode::from(code)
}
