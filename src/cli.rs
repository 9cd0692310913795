//! The command line: global flags and one subcommand per component (SPEC §1).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

/// `dynamicproxy`: the Toolforge dynamic edge proxy and its companions.
#[derive(Debug, Parser)]
// A flag given twice takes its last value (SPEC §1): wrapper scripts and
// unit drop-ins append flags to a command line they do not own. clap
// propagates the setting to every subcommand.
#[command(name = "dynamicproxy", version, about, propagate_version = true, args_override_self = true)]
pub struct Cli {
    /// Flags every subcommand accepts, before or after its own arguments.
    #[command(flatten)]
    pub global: GlobalFlags,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags shared by every subcommand (`global = true`: accepted anywhere on the line).
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalFlags {
    /// TOML configuration file; env DYNAMICPROXY_<SECTION>_<KEY> and flags override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Redis holding the route table: redis://host:port/db or
    /// redis+sentinel://host:port,host:port/MASTERNAME/db [default: redis://127.0.0.1:6379/0].
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Redis the proxy's route cache reads instead (a local replica); writers use --redis-url [default: --redis-url].
    #[arg(long, global = true, value_name = "URL")]
    pub redis_read_url: Option<String>,
    /// Validate the configuration, print `configuration ok`, and exit without serving (exit 64 when invalid).
    #[arg(long, global = true)]
    pub check: bool,
    /// Address of the daemon's admin API; also accepted after the subcommand, which wins.
    /// It answers only requests addressed to this address, never proxied ones; changes
    /// (POST) come from loopback, or anywhere with `Authorization: Bearer` and the
    /// [admin] token (env DYNAMICPROXY_ADMIN_TOKEN; no flag, as arguments are world-readable).
    #[arg(long = "admin-listen", value_name = "ADDR")]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Log line format [default: text].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Format of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands of SPEC §1.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The HTTP/HTTPS edge proxy, the /list API and the admin API.
    Proxy(Box<ProxyCommand>),
    /// The TCP registration server for grid webservices (port 8282).
    Registrar(RegistrarCommand),
    /// Keeps the route table in step with Kubernetes Services.
    KubeSync(KubeSyncCommand),
    /// Proxy, registrar and kube-sync in one process (development, small installs).
    All(Box<AllCommand>),
    /// Operator commands over the route table in Redis.
    Routes(RoutesCommand),
    /// Writes the man pages and shell completions into a directory (packaging).
    #[command(hide = true)]
    GenerateDocs(GenerateDocsCommand),
}

/// `dynamicproxy generate-docs DIR`.
#[derive(Debug, Args)]
pub struct GenerateDocsCommand {
    /// Directory to write into; `man/` and `completions/` are created in it.
    pub dir: PathBuf,
}

/// `dynamicproxy proxy`.
#[derive(Debug, Args)]
pub struct ProxyCommand {
    /// Proxy settings ([proxy] section).
    #[command(flatten)]
    pub proxy: dynamicproxy_proxy::Flags,
}

/// `dynamicproxy registrar`.
#[derive(Debug, Args)]
pub struct RegistrarCommand {
    /// Registrar settings ([registrar] section).
    #[command(flatten)]
    pub registrar: dynamicproxy_registrar::Flags,
    /// Address of the registrar's admin API (metrics, health) [default: 127.0.0.1:9633].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<std::net::SocketAddr>,
}

/// `dynamicproxy kube-sync`.
#[derive(Debug, Args)]
pub struct KubeSyncCommand {
    /// kube-sync settings ([kube_sync] section).
    #[command(flatten)]
    pub kube_sync: dynamicproxy_kube_sync::Flags,
}

/// `dynamicproxy all`: the proxy's flags, plus the registrar's and kube-sync's
/// that do not share a name with them (`--canonical-domain` serves both the
/// proxy and the registrar; other settings come from the file or env).
#[derive(Debug, Args)]
pub struct AllCommand {
    /// Proxy settings ([proxy] section); its --admin-listen is the process's one admin API.
    #[command(flatten)]
    pub proxy: dynamicproxy_proxy::Flags,
    /// [registrar] listen: where grid webservices register [default: 0.0.0.0:8282].
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// [registrar] ident_port [default: 113].
    #[arg(long = "ident-port", value_name = "PORT")]
    pub ident_port: Option<u16>,
    /// [registrar] project_prefix [default: tools.].
    #[arg(long = "project-prefix", value_name = "P")]
    pub project_prefix: Option<String>,
    /// [kube_sync] kubeconfig [default: in-cluster, then $KUBECONFIG; none: kube-sync is disabled].
    #[arg(long = "kubeconfig", value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// [kube_sync] label_selector [default: toolforge=tool].
    #[arg(long = "label-selector", value_name = "SEL")]
    pub label_selector: Option<String>,
    /// [kube_sync] namespace [default: all].
    #[arg(long = "namespace", value_name = "NS")]
    pub namespace: Option<String>,
}

/// `dynamicproxy routes`.
#[derive(Debug, Args)]
pub struct RoutesCommand {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The operation.
    #[command(subcommand)]
    pub action: RoutesAction,
}

/// Operations of `dynamicproxy routes`. Exit status: 0 done, 1 Redis
/// unreachable or failing, 2 invalid input, 3 no such tool, 64 unusable configuration.
#[derive(Debug, Subcommand)]
pub enum RoutesAction {
    /// Lists the tools that have routes.
    List,
    /// Shows a tool's routes and redirects.
    Get {
        /// Tool name, e.g. `mytool`.
        tool: String,
    },
    /// Sets one route of a tool (creates the tool if needed).
    Set {
        /// Tool name.
        tool: String,
        /// Route pattern, a regex searched in the request path, e.g. `.*` or `/api.*`.
        pattern: String,
        /// Backend, `http://host:port` (a value without scheme means http://).
        url: String,
    },
    /// Deletes one route of a tool, or the whole tool when no pattern is given.
    Delete {
        /// Tool name.
        tool: String,
        /// Route pattern to delete; all of the tool's routes and redirects when omitted.
        pattern: Option<String>,
    },
    /// Says which rule a request for URL takes and why (host form, tool, each
    /// pattern tried, backend or fallback) and who wrote that route and when;
    /// the same as the proxy's GET /explain?url=URL, computed from Redis with
    /// the [proxy] settings of the configuration (canonical domain, default backend).
    Explain {
        /// The URL, e.g. `https://mytool.toolforge.org/api/x` or `https://tools.wmflabs.org/mytool/`.
        url: String,
    },
    /// Shows every write and delete of a tool's routes still in the audit stream, oldest first:
    /// time, action, pattern, backend, writer.
    History {
        /// Tool name.
        tool: String,
    },
}
