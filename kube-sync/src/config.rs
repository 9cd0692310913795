//! The `[kube_sync]` section of the configuration file and its command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Settings of the kube-sync daemon, as read from `[kube_sync]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Kubeconfig file to use. When unset: the in-cluster service account,
    /// then `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Only Services matching this label selector become routes; tools opt in
    /// with the label, everything else in the cluster is left alone.
    pub label_selector: String,
    /// Watch only this namespace; unset watches all. When set, only owned
    /// routes of this namespace are reconciled, so several instances with
    /// different namespaces can share one Redis.
    pub namespace: Option<String>,
    /// When set (Toolforge: `tool-`), a Service only routes the tool it is
    /// named after if it lives in namespace `<prefix><name>`, so one tool
    /// cannot claim another's route with a Service of that name. Unset by
    /// default (SPEC §6: the tool is the Service name, wherever it lives).
    pub tool_namespace_prefix: Option<String>,
    /// Where the binary serves `/metrics` for this daemon (loopback by default:
    /// it is an operator interface).
    pub admin_listen: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kubeconfig: None,
            label_selector: DEFAULT_LABEL_SELECTOR.to_string(),
            namespace: None,
            tool_namespace_prefix: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9632)),
        }
    }
}

/// The label selector used when none is configured (SPEC §1).
pub const DEFAULT_LABEL_SELECTOR: &str = "toolforge=tool";

impl Config {
    /// Checks what serde cannot: the namespace is a DNS label and the label
    /// selector is well formed, so a typo fails at start instead of on every
    /// request to the API server.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(namespace) = &self.namespace
            && !is_dns_label(namespace)
        {
            return Err(ConfigError::Invalid {
                key: "namespace",
                value: namespace.clone(),
                reason: "must be a DNS label: [a-z0-9]([-a-z0-9]*[a-z0-9])?, at most 63 characters",
            });
        }
        if let Err(reason) = check_label_selector(&self.label_selector) {
            return Err(ConfigError::Invalid { key: "label_selector", value: self.label_selector.clone(), reason });
        }
        if self.kubeconfig.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::Invalid { key: "kubeconfig", value: String::new(), reason: "must not be empty" });
        }
        Ok(())
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// One key has an unusable value.
    #[error("invalid [kube_sync] {key} = {value:?}: {reason}")]
    Invalid {
        /// The TOML key.
        key: &'static str,
        /// The value as given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// Command-line flags of `dynamicproxy kube-sync`; each overrides the key of
/// the same name.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize)]
pub struct Flags {
    /// Kubeconfig file (default: in-cluster service account, then $KUBECONFIG)
    #[arg(long = "kubeconfig", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Only Services matching this label selector are routed [default: toolforge=tool]
    #[arg(long = "label-selector", value_name = "SEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    /// Watch only this namespace [default: all namespaces]
    #[arg(long = "namespace", value_name = "NS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Route a Service only if its namespace is <PREFIX><service name> (e.g. tool-) [default: any namespace]
    #[arg(long = "tool-namespace-prefix", value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_namespace_prefix: Option<String>,
    /// Address of the admin API (metrics, health) [default: 127.0.0.1:9632]
    #[arg(long = "admin-listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A light syntax check of a label selector (`k=v`, `k==v`, `k!=v`, `k`,
/// `!k`, `k in (a,b)`, `k notin (a,b)`, comma-separated). The API server
/// has the last word; this catches the empty requirement and stray
/// characters that would otherwise fail every list.
fn check_label_selector(selector: &str) -> Result<(), &'static str> {
    if selector.trim().is_empty() {
        // An empty selector is legal in Kubernetes but would route every
        // Service in the cluster: refuse it rather than guess.
        return Err("must not be empty (it would route every Service in the cluster)");
    }
    let mut depth = 0usize;
    let mut requirement = String::new();
    let mut requirements = Vec::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced parentheses")?,
            ',' if depth == 0 => {
                requirements.push(std::mem::take(&mut requirement));
                continue;
            }
            _ => {}
        }
        requirement.push(c);
    }
    if depth != 0 {
        return Err("unbalanced parentheses");
    }
    requirements.push(requirement);
    for requirement in &requirements {
        let r = requirement.trim();
        if r.is_empty() {
            return Err("empty requirement between commas");
        }
        let key = r.trim_start_matches('!').split(['=', '!', ' ', '(']).next().unwrap_or_default();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')) {
            return Err("each requirement must start with a label key");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        flags: Flags,
    }

    #[test]
    fn flags_have_the_spec_names_and_serialize_only_what_was_given() {
        let cli = Cli::parse_from([
            "kube-sync",
            "--kubeconfig",
            "/etc/kube.conf",
            "--label-selector",
            "a=b",
            "--namespace",
            "tool-foo",
            "--admin-listen",
            "0.0.0.0:9632",
        ]);
        assert_eq!(cli.flags.kubeconfig, Some(PathBuf::from("/etc/kube.conf")));
        assert_eq!(cli.flags.label_selector.as_deref(), Some("a=b"));
        assert_eq!(cli.flags.namespace.as_deref(), Some("tool-foo"));
        assert_eq!(cli.flags.admin_listen, Some(SocketAddr::from(([0, 0, 0, 0], 9632))));
        let none = Cli::parse_from(["kube-sync", "--namespace", "x"]);
        let json = serde_json::to_string(&none.flags).unwrap();
        assert_eq!(json, r#"{"namespace":"x"}"#);
    }

    #[test]
    fn every_key_reads_from_toml_strings() {
        let config: Config = toml::from_str(
            "kubeconfig = \"/k\"\nlabel_selector = \"a=b\"\nnamespace = \"ns\"\nadmin_listen = \"0.0.0.0:1\"\n",
        )
        .unwrap();
        assert_eq!(config.admin_listen.port(), 1);
        assert!(toml::from_str::<Config>("bogus = 1").is_err(), "unknown keys are refused");
        assert_eq!(toml::from_str::<Config>("").unwrap(), Config::default());
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::default();
        assert_eq!(config.label_selector, "toolforge=tool");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:9632");
        config.validate().unwrap();
    }

    #[test]
    fn selectors() {
        for ok in ["toolforge=tool", "a=b,c!=d", "a==b", "app", "!app", "env in (a, b),x", "example.org/k=v"] {
            assert!(check_label_selector(ok).is_ok(), "{ok}");
        }
        for bad in ["", " ", "a=b,", ",a", "=b", "a in (b", "a)"] {
            assert!(check_label_selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_key_and_value() {
        let config = Config { namespace: Some("Tool Foo".into()), ..Config::default() };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid [kube_sync] namespace = \"Tool Foo\": "), "{err}");
        let config = Config { label_selector: "a=b,".into(), ..Config::default() };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid [kube_sync] label_selector = \"a=b,\": "), "{err}");
    }
}
