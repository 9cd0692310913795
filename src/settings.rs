//! The whole configuration: a TOML file, overridden by environment variables
//! `DYNAMICPROXY_<SECTION>_<KEY>`, overridden by flags (SPEC §1).
//!
//! Each component crate owns its section's typed `Config`; this module only
//! layers the sources and turns every failure into one line that names the
//! key, the value's source and what is wrong.

use std::fmt;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::admin_guard::AdminToken;
use crate::cli::{GlobalFlags, LogFormat};
use dynamicproxy_redis::RedisEndpoint;

/// Sections of the file, in the order env variable names are matched
/// (`kube_sync` before any shorter name it could be mistaken for).
const SECTIONS: [&str; 6] = ["kube_sync", "registrar", "proxy", "redis", "log", "admin"];

/// `DYNAMICPROXY_ADMIN_TOKEN` without the prefix: read as a plain string, never parsed.
const ADMIN_TOKEN_ENV: &str = "ADMIN_TOKEN";

/// Every setting of every component, as loaded and type-checked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `[redis]`: where the route table lives.
    pub redis: RedisSettings,
    /// `[log]`: log format and filter.
    pub log: LogSettings,
    /// `[admin]`: who may change things through the admin API.
    pub admin: AdminSettings,
    /// `[proxy]`.
    pub proxy: serde::de::IgnoredAny,
    /// `[registrar]`.
    pub registrar: serde::de::IgnoredAny,
    /// `[kube_sync]`.
    pub kube_sync: serde::de::IgnoredAny,
}

/// `[redis]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db` or `redis+sentinel://host:port,host:port/MASTERNAME/db`.
    pub url: String,
    /// Where the proxy's route cache reads from instead of `url`: a replica
    /// on the proxy host (`redis://127.0.0.1:6380/0`), so reads stay local
    /// and keep working while the master is away. Writers (registrar,
    /// kube-sync, `routes`) always use `url`. Unset (default): `url`.
    pub read_url: Option<String>,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings { url: "redis://127.0.0.1:6379/0".into(), read_url: None }
    }
}

/// `[log]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,dynamicproxy_redis=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { format: LogFormat::Text, level: "info".into() }
    }
}

/// `[admin]` section: shared by every daemon's admin API, because a process
/// has one admin listener whichever daemons it runs (`all` included).
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Bearer token that lets a non-loopback peer use the mutating endpoints
    /// (POST /logging, POST /maintenance). Unset (the default): only loopback
    /// peers may. Best given as env `DYNAMICPROXY_ADMIN_TOKEN` from a secret;
    /// deliberately no flag, because a process's arguments are world-readable.
    pub token: Option<String>,
}

impl fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = self.token.as_ref().map(|_| "<redacted>");
        f.debug_struct("AdminSettings").field("token", &token).finish()
    }
}

/// A configuration that cannot be used; the message is one line.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// A validation failure reported by a component's `Config::validate`.
    pub fn invalid(message: impl fmt::Display) -> Self {
        ConfigError(message.to_string())
    }

    fn from_figment(error: figment::Error) -> Self {
        let lines: Vec<String> = error.into_iter().map(|e| describe(&e)).collect();
        ConfigError(lines.join("; "))
    }
}

/// One figment error as `[section] key: problem (from source)`.
fn describe(error: &figment::Error) -> String {
    let key = match error.path.as_slice() {
        [] => String::new(),
        [section] => format!("[{section}]: "),
        [section, rest @ ..] => format!("[{section}] {}: ", rest.join(".")),
    };
    let source = match &error.metadata {
        Some(md) => match &md.source {
            Some(source) => format!(" (from {} {source})", md.name),
            None => format!(" (from {})", md.name),
        },
        None => String::new(),
    };
    format!("{key}{}{source}", one_line(&error.kind.to_string()))
}

/// Parser messages draw the offending line with `|` gutters; keep the words.
fn one_line(message: &str) -> String {
    let words: Vec<&str> =
        message.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains('|') && !l.starts_with('^')).collect();
    words.join(": ")
}

/// Loads the layered configuration. `section_flags` are the running
/// subcommand's own flags, placed under their section.
pub fn load<F: Serialize>(
    global: &GlobalFlags,
    section_flags: &[(&str, &F)],
) -> Result<(Settings, Figment), ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = &global.config {
        check_readable(path)?;
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(
        Env::prefixed("DYNAMICPROXY_")
            .ignore(&[ADMIN_TOKEN_ENV])
            .filter_map(|key| env_key(key.as_str()).map(Into::into)),
    );
    // Verbatim: the env provider would read a token of digits as a number (and show it in the error).
    if let Some(token) = std::env::var_os(format!("DYNAMICPROXY_{ADMIN_TOKEN_ENV}")) {
        let token = token.into_string().map_err(|_| ConfigError("[admin] token: not valid UTF-8".into()))?;
        figment = figment.merge(Serialized::default("admin.token", token));
    }
    if let Some(url) = &global.redis_url {
        figment = figment.merge(Serialized::default("redis.url", url));
    }
    if let Some(url) = &global.redis_read_url {
        figment = figment.merge(Serialized::default("redis.read_url", url));
    }
    if let Some(format) = global.log_format {
        figment = figment.merge(Serialized::default("log.format", format));
    }
    for (section, flags) in section_flags {
        figment = figment.merge(Serialized::default(section, flags));
    }
    let settings: Settings = figment.extract().map_err(ConfigError::from_figment)?;
    Ok((settings, figment))
}

/// Extracts one component's typed section from the layered configuration.
pub fn section<T: serde::de::DeserializeOwned>(figment: &Figment, name: &str) -> Result<T, ConfigError> {
    let result = match figment.find_value(name) {
        Ok(_) => figment.extract_inner(name),
        Err(_) => Figment::new().extract(),
    };
    result.map_err(|error| {
        // Errors inside a section carry the section name somewhere in their path; put it first.
        let lines: Vec<String> = error
            .into_iter()
            .map(|mut e| {
                e.path.retain(|p| p != name);
                e.path.insert(0, name.to_string());
                describe(&e)
            })
            .collect();
        ConfigError(lines.join("; "))
    })
}

impl Settings {
    /// The parsed `[redis] url`.
    pub fn redis_endpoint(&self) -> Result<RedisEndpoint, ConfigError> {
        self.redis.url.parse().map_err(|e| ConfigError(format!("[redis] url: {e}")))
    }

    /// The parsed `[redis] read_url`, or `[redis] url` when unset.
    pub fn redis_read_endpoint(&self) -> Result<RedisEndpoint, ConfigError> {
        match &self.redis.read_url {
            Some(url) => url.parse().map_err(|e| ConfigError(format!("[redis] read_url: {e}"))),
            None => self.redis_endpoint(),
        }
    }

    /// The checked `[admin] token`, if set; the error never shows the value.
    pub fn admin_token(&self) -> Result<Option<AdminToken>, ConfigError> {
        self.admin
            .token
            .clone()
            .map(AdminToken::new)
            .transpose()
            .map_err(|e| ConfigError(format!("[admin] token: {e}")))
    }
}

/// `PROXY_HTTP_LISTEN` → `proxy.http_listen`; names outside the known sections are ignored.
fn env_key(key: &str) -> Option<String> {
    let key = key.to_ascii_lowercase();
    SECTIONS.iter().find_map(|section| {
        key.strip_prefix(section).and_then(|rest| rest.strip_prefix('_')).map(|k| format!("{section}.{k}"))
    })
}

fn check_readable(path: &Path) -> Result<(), ConfigError> {
    std::fs::read_to_string(path).map(|_| ()).map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_map_to_sections() {
        assert_eq!(env_key("PROXY_HTTP_LISTEN").as_deref(), Some("proxy.http_listen"));
        assert_eq!(env_key("KUBE_SYNC_LABEL_SELECTOR").as_deref(), Some("kube_sync.label_selector"));
        assert_eq!(env_key("REDIS_URL").as_deref(), Some("redis.url"));
        assert_eq!(env_key("ADMIN_TOKEN").as_deref(), Some("admin.token"));
        assert_eq!(env_key("UNRELATED"), None);
        assert_eq!(env_key("PROXYX"), None);
    }
}
