//! The registrar's Prometheus metrics (SPEC §8: registrar commands by result).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::protocol::Command;

/// How an exchange ended, as a metric label and in the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The command was carried out and `ok` sent.
    Ok,
    /// Ident gave no usable answer.
    AuthFailed,
    /// The user is not a tool account.
    NotTool,
    /// An unknown command (answered `fail`).
    UnknownCommand,
    /// Malformed or invalid input (`fail: <reason>`).
    Invalid,
    /// The destination is outside the allow-list.
    NotAllowed,
    /// The destination is (or resolves to) an address in a denied network.
    DeniedDestination,
    /// The tool already holds `max_routes_per_tool` routes.
    TooManyRoutes,
    /// The client address is outside `allowed_clients`; ident was not asked.
    ClientNotAllowed,
    /// The client did not finish within the exchange timeout.
    Timeout,
    /// Redis could not be reached; nothing was written.
    Unavailable,
    /// Redis refused the write.
    StoreError,
    /// Too many connections at once (`fail: busy`).
    Busy,
}

impl Outcome {
    /// The label value, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::AuthFailed => "auth_failed",
            Outcome::NotTool => "not_tool",
            Outcome::UnknownCommand => "unknown_command",
            Outcome::Invalid => "invalid",
            Outcome::NotAllowed => "not_allowed",
            Outcome::DeniedDestination => "denied_destination",
            Outcome::TooManyRoutes => "too_many_routes",
            Outcome::ClientNotAllowed => "client_not_allowed",
            Outcome::Timeout => "timeout",
            Outcome::Unavailable => "unavailable",
            Outcome::StoreError => "store_error",
            Outcome::Busy => "busy",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl EncodeLabelValue for Command {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Labels of `registrar_commands_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CommandLabels {
    /// The command, or `none` when none was read.
    pub command: Command,
    /// How it ended.
    pub result: Outcome,
}

/// The registrar's metrics, registered once and shared by every connection.
#[derive(Debug)]
pub struct Metrics {
    /// Exchanges by command and result.
    pub commands: Family<CommandLabels, Counter>,
    /// Connections being served now (busy refusals not counted).
    pub connections: Gauge,
}

impl Metrics {
    /// Registers the metrics under `registrar_` in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics { commands: Family::default(), connections: Gauge::default() };
        let registry = registry.sub_registry_with_prefix("registrar");
        registry.register("commands", "Registrar exchanges by command and result", metrics.commands.clone());
        registry.register("connections", "Registrar connections being served", metrics.connections.clone());
        metrics
    }

    /// Counts one finished exchange.
    pub fn record(&self, command: Command, result: Outcome) {
        self.commands.get_or_create(&CommandLabels { command, result }).inc();
    }
}
