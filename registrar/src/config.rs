//! The `[registrar]` section of the configuration and its command-line flags.
//!
//! Durations are written as an integer number of seconds (`5`) or a string
//! with a unit: `"500ms"`, `"5s"`, `"2m"` (a bare number string is seconds).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

use dynamicproxy_redis::NetworkList;

use crate::allow::{AllowList, AllowRule};
use crate::clients::AllowedClients;
use crate::destination::DeniedDestinations;

/// Settings of the registration server (`[registrar]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where grid webservices connect to register (`--listen`); the deployed
    /// clients hard-code port 8282.
    pub listen: SocketAddr,
    /// The ident (RFC 1413) port asked on the client's host (`--ident-port`).
    pub ident_port: u16,
    /// Only Unix users starting with this prefix are tools; the rest of the
    /// name is the tool name (`tools.foo` → `foo`).
    pub project_prefix: String,
    /// `registerCanonical` redirects a tool's legacy URLs to `<tool>.<canonical_domain>`.
    pub canonical_domain: String,
    /// How long the ident service may take to answer before authentication fails.
    #[serde(deserialize_with = "deserialize_duration")]
    pub ident_timeout: Duration,
    /// Budget for a whole exchange (ident and the request lines), so a silent
    /// client cannot hold a connection slot.
    #[serde(deserialize_with = "deserialize_duration")]
    pub exchange_timeout: Duration,
    /// Connections served at once; more are answered `fail: busy` and closed.
    pub max_connections: usize,
    /// Destinations a route may point to: CIDRs (`10.0.0.0/8`), single
    /// addresses, or domain suffixes (`eqiad1.wikimedia.cloud`). Empty = any.
    #[serde(deserialize_with = "deserialize_list")]
    pub allowed_destinations: Vec<String>,
    /// Networks no destination may be in (SPEC §5): a tool's route must not
    /// reach the edge host itself (its admin APIs on loopback) or the cloud
    /// metadata service. Literal addresses are checked as written, names
    /// after resolving them. Default loopback, link-local and unspecified;
    /// `[]` allows all (development, tests). The proxy checks again when it
    /// connects (`[proxy] denied_backend_networks`).
    #[serde(deserialize_with = "deserialize_list")]
    pub denied_destination_networks: Vec<String>,
    /// Most routes one tool may hold; a `register`/`registerCanonical` that
    /// would add one more is answered `fail: too many routes` (replacing an
    /// existing route is always allowed). At most [`MAX_ROUTES_PER_TOOL`]:
    /// the proxy's route table loader keeps only that many routes per tool,
    /// so a larger value would answer `ok` for routes that never serve.
    pub max_routes_per_tool: usize,
    /// Client networks allowed to connect (CIDRs or addresses); others get
    /// `fail: client not allowed` before any ident query, so outsiders can
    /// neither register nor make the registrar probe their ident port.
    /// Empty = any (production keeps a firewall in front as well).
    #[serde(deserialize_with = "deserialize_list")]
    pub allowed_clients: Vec<String>,
}

/// Highest `max_routes_per_tool` accepted, and its default: the route table
/// loader's cap per tool, which this must never exceed (real tools hold one
/// or two routes).
pub const MAX_ROUTES_PER_TOOL: usize = dynamicproxy_redis::MAX_ROUTES_PER_TOOL;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8282)),
            ident_port: 113,
            project_prefix: "tools.".into(),
            canonical_domain: "toolforge.org".into(),
            ident_timeout: Duration::from_secs(5),
            exchange_timeout: Duration::from_secs(10),
            max_connections: 1024,
            allowed_destinations: Vec::new(),
            denied_destination_networks: NetworkList::default_denied_strings(),
            max_routes_per_tool: MAX_ROUTES_PER_TOOL,
            allowed_clients: Vec::new(),
        }
    }
}

/// A `[registrar]` setting that cannot work, named with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid [registrar] {key} = {value}: {reason}")]
pub struct ConfigError {
    /// The configuration key.
    pub key: &'static str,
    /// The value as configured.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn new(key: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        ConfigError { key, value: value.to_string(), reason: reason.into() }
    }
}

/// Most `max_connections` accepted: far above what the file descriptor limit
/// allows, and below the size where the connection semaphore panics.
const MAX_CONNECTIONS: usize = 1 << 20;

/// Longest `exchange_timeout` accepted. A slot held longer by a silent client
/// is no protection; and deadlines far in the future overflow `Instant`.
const MAX_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Config {
    /// Checks the settings together; the error names the key and its value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.allow_list()?;
        self.denied_destinations()?;
        self.allowed_clients()?;
        if self.max_routes_per_tool == 0 || self.max_routes_per_tool > MAX_ROUTES_PER_TOOL {
            return Err(ConfigError::new(
                "max_routes_per_tool",
                self.max_routes_per_tool,
                format!(
                    "must be 1-{MAX_ROUTES_PER_TOOL} (the proxy loads at most {MAX_ROUTES_PER_TOOL} routes per tool)"
                ),
            ));
        }
        Ok(())
    }

    /// `denied_destination_networks`, parsed; blank entries are skipped, so
    /// an empty flag or variable value means `[]`.
    pub(crate) fn denied_destinations(&self) -> Result<DeniedDestinations, ConfigError> {
        networks("denied_destination_networks", &self.denied_destination_networks).map(DeniedDestinations::new)
    }

    /// `allowed_clients`, parsed; blank entries are skipped.
    pub(crate) fn allowed_clients(&self) -> Result<AllowedClients, ConfigError> {
        networks("allowed_clients", &self.allowed_clients).map(AllowedClients::new)
    }

    /// Validates and compiles the destination allow-list.
    pub(crate) fn allow_list(&self) -> Result<AllowList, ConfigError> {
        if self.ident_port == 0 {
            return Err(ConfigError::new("ident_port", 0, "must be 1-65535"));
        }
        if self.project_prefix.is_empty() || self.project_prefix.chars().any(char::is_whitespace) {
            return Err(ConfigError::new(
                "project_prefix",
                format!("{:?}", self.project_prefix),
                "must be non-empty, without spaces",
            ));
        }
        let domain = &self.canonical_domain;
        if domain.is_empty() || domain.starts_with('.') || domain.ends_with('.') || !domain.contains('.') {
            return Err(ConfigError::new(
                "canonical_domain",
                format!("{domain:?}"),
                "must be a domain name such as toolforge.org",
            ));
        }
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS {
            return Err(ConfigError::new(
                "max_connections",
                self.max_connections,
                format!("must be 1-{MAX_CONNECTIONS}"),
            ));
        }
        if self.exchange_timeout.is_zero() || self.exchange_timeout > MAX_EXCHANGE_TIMEOUT {
            return Err(ConfigError::new(
                "exchange_timeout",
                DisplayDuration(self.exchange_timeout),
                format!("must be positive and at most {}", DisplayDuration(MAX_EXCHANGE_TIMEOUT)),
            ));
        }
        if self.ident_timeout.is_zero() || self.ident_timeout >= self.exchange_timeout {
            return Err(ConfigError::new(
                "ident_timeout",
                DisplayDuration(self.ident_timeout),
                format!(
                    "must be positive and shorter than exchange_timeout ({})",
                    DisplayDuration(self.exchange_timeout)
                ),
            ));
        }
        let mut rules = Vec::with_capacity(self.allowed_destinations.len());
        for entry in &self.allowed_destinations {
            let rule = AllowRule::parse(entry).ok_or_else(|| {
                ConfigError::new(
                    "allowed_destinations",
                    format!("{entry:?}"),
                    "must be a CIDR, an IP address or a domain suffix",
                )
            })?;
            rules.push(rule);
        }
        Ok(AllowList::new(rules))
    }
}

/// Parses a list of networks; the error names the key and the bad entry.
fn networks(key: &'static str, entries: &[String]) -> Result<NetworkList, ConfigError> {
    let entries: Vec<&str> = entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).collect();
    NetworkList::parse(&entries).map_err(|e| {
        ConfigError::new(key, format!("{:?}", e.entry), "must be a CIDR such as 10.0.0.0/8, or an IP address")
    })
}

/// Command-line flags of `dynamicproxy registrar`, one per `[registrar]` key;
/// a flag that is given wins over the environment and the file.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize)]
pub struct Flags {
    /// Address to accept registrations on [default: 0.0.0.0:8282]
    #[arg(long = "listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Port of the ident service asked on the client's host [default: 113]
    #[arg(long = "ident-port", value_name = "PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ident_port: Option<u16>,
    /// Unix user prefix of tool accounts [default: tools.]
    #[arg(long = "project-prefix", value_name = "P")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_prefix: Option<String>,
    /// Domain of canonical tool URLs, for registerCanonical [default: toolforge.org]
    #[arg(long = "canonical-domain", value_name = "DOMAIN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canonical_domain: Option<String>,
    /// How long ident may take, e.g. 5s or 500ms [default: 5s]
    #[arg(long = "ident-timeout", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "serialize_duration")]
    pub ident_timeout: Option<Duration>,
    /// Budget for a whole exchange, e.g. 10s [default: 10s]
    #[arg(long = "exchange-timeout", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "serialize_duration")]
    pub exchange_timeout: Option<Duration>,
    /// Connections served at once; more get "fail: busy" [default: 1024]
    #[arg(long = "max-connections", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Allowed destinations: CIDRs, addresses or domain suffixes, comma-separated or repeated [default: any]
    #[arg(long = "allowed-destinations", value_name = "LIST", value_delimiter = ',', num_args = 1..)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_destinations: Option<Vec<String>>,
    /// Networks no destination may be in, comma-separated or repeated; "" allows all
    /// [default: 127.0.0.0/8,::1/128,169.254.0.0/16,fe80::/10,0.0.0.0/8,::/128]
    #[arg(long = "denied-destination-networks", value_name = "LIST", value_delimiter = ',', num_args = 1..)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_destination_networks: Option<Vec<String>>,
    /// Most routes one tool may hold, at most 64 [default: 64]
    #[arg(long = "max-routes-per-tool", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_routes_per_tool: Option<usize>,
    /// Client networks allowed to connect, comma-separated or repeated [default: any]
    #[arg(long = "allowed-clients", value_name = "LIST", value_delimiter = ',', num_args = 1..)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_clients: Option<Vec<String>>,
}

/// Parses `5`, `"5s"`, `"500ms"` or `"2m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("invalid duration {text:?}: expected e.g. 5, \"5s\", \"500ms\" or \"2m\"");
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit.trim() {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// Shows a duration the way [`parse_duration`] reads it.
struct DisplayDuration(Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_millis() == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            write!(f, "{}ms", self.0.as_millis())
        }
    }
}

fn serialize_duration<S: Serializer>(value: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(d) => serializer.collect_str(&DisplayDuration(*d)),
        None => serializer.serialize_none(),
    }
}

fn deserialize_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Seconds(n) => Ok(Duration::from_secs(n)),
        Raw::Text(text) => parse_duration(&text).map_err(serde::de::Error::custom),
    }
}

/// A list from TOML/figment, or one comma-separated string (environment variables).
fn deserialize_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Raw::deserialize(deserializer)? {
        Raw::List(list) => list,
        Raw::Text(text) => text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "-1s", "5h", "1.5s", "5 s x"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(DisplayDuration(Duration::from_millis(1500)).to_string(), "1500ms");
        assert_eq!(DisplayDuration(Duration::from_secs(5)).to_string(), "5s");
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::default();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8282");
        assert_eq!(config.project_prefix, "tools.");
        config.validate().unwrap();
    }

    #[test]
    fn errors_name_key_and_value() {
        let config = Config { max_connections: 0, ..Config::default() };
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "invalid [registrar] max_connections = 0: must be 1-1048576"
        );
        let config = Config { max_connections: usize::MAX, ..Config::default() };
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            format!("invalid [registrar] max_connections = {}: must be 1-1048576", usize::MAX)
        );
        let config = Config { ident_timeout: Duration::from_secs(10), ..Config::default() };
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "invalid [registrar] ident_timeout = 10s: must be positive and shorter than exchange_timeout (10s)"
        );
        let config = Config { allowed_destinations: vec!["10.0.0.0/33".into()], ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("allowed_destinations = \"10.0.0.0/33\""));
        // Far beyond any sane budget, and a deadline `now + timeout` would overflow.
        let config = Config { exchange_timeout: Duration::from_secs(u64::MAX), ..Config::default() };
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            format!("invalid [registrar] exchange_timeout = {}s: must be positive and at most 3600s", u64::MAX)
        );
        let config = Config { canonical_domain: "".into(), ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().starts_with("invalid [registrar] canonical_domain"));
    }
}
