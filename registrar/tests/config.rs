//! The `[registrar]` section read the way the binary reads it: TOML file
//! below flags, through figment, into `Config`.

use std::time::Duration;

use clap::Parser;
use dynamicproxy_registrar::{Config, Flags};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
}

fn load(toml: &str, args: &[&str]) -> Result<Config, String> {
    let flags = Cli::try_parse_from(std::iter::once("registrar").chain(args.iter().copied())).unwrap().flags;
    Figment::new().merge(Toml::string(toml)).merge(Serialized::defaults(flags)).extract().map_err(|e| e.to_string())
}

#[test]
fn file_keys_and_defaults() {
    let config = load(
        r#"
        listen = "127.0.0.1:18282"
        ident_port = 1113
        project_prefix = "proj."
        canonical_domain = "toolforge.example"
        ident_timeout = 3
        exchange_timeout = "8s"
        max_connections = 64
        allowed_destinations = ["172.16.0.0/21", "eqiad1.wikimedia.cloud"]
        "#,
        &[],
    )
    .unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:18282");
    assert_eq!(config.ident_port, 1113);
    assert_eq!(config.project_prefix, "proj.");
    assert_eq!(config.canonical_domain, "toolforge.example");
    assert_eq!(config.ident_timeout, Duration::from_secs(3));
    assert_eq!(config.exchange_timeout, Duration::from_secs(8));
    assert_eq!(config.max_connections, 64);
    assert_eq!(config.allowed_destinations, ["172.16.0.0/21", "eqiad1.wikimedia.cloud"]);
    config.validate().unwrap();

    let defaults = load("", &[]).unwrap();
    assert_eq!(defaults.listen.to_string(), "0.0.0.0:8282");
    assert_eq!(defaults.ident_port, 113);
    assert_eq!(defaults.ident_timeout, Duration::from_secs(5));
    assert_eq!(defaults.exchange_timeout, Duration::from_secs(10));
    assert!(defaults.allowed_destinations.is_empty());
}

#[test]
fn flags_win_over_the_file() {
    let config = load(
        "listen = \"127.0.0.1:1\"\nident_timeout = \"4s\"\n",
        &[
            "--listen",
            "127.0.0.1:2",
            "--ident-port",
            "1113",
            "--project-prefix",
            "proj.",
            "--canonical-domain",
            "example.org",
            "--ident-timeout",
            "250ms",
            "--exchange-timeout",
            "3s",
            "--max-connections",
            "7",
            "--allowed-destinations",
            "10.0.0.0/8,example.org",
        ],
    )
    .unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:2");
    assert_eq!(config.ident_port, 1113);
    assert_eq!(config.project_prefix, "proj.");
    assert_eq!(config.canonical_domain, "example.org");
    assert_eq!(config.ident_timeout, Duration::from_millis(250));
    assert_eq!(config.exchange_timeout, Duration::from_secs(3));
    assert_eq!(config.max_connections, 7);
    assert_eq!(config.allowed_destinations, ["10.0.0.0/8", "example.org"]);
}

#[test]
fn string_forms_as_from_the_environment() {
    // Environment variables arrive as strings; a list may be comma-separated.
    let config = load("allowed_destinations = \"10.0.0.0/8, example.org\"\nident_timeout = \"2\"\n", &[]).unwrap();
    assert_eq!(config.allowed_destinations, ["10.0.0.0/8", "example.org"]);
    assert_eq!(config.ident_timeout, Duration::from_secs(2));
}

#[test]
fn unknown_keys_and_bad_values_are_refused() {
    assert!(load("listne = \"0.0.0.0:1\"\n", &[]).unwrap_err().contains("listne"));
    assert!(load("ident_timeout = \"soon\"\n", &[]).unwrap_err().contains("invalid duration \"soon\""));
    assert!(Cli::try_parse_from(["registrar", "--ident-timeout", "5h"]).is_err());
}

#[test]
fn isolation_keys_from_the_file() {
    let config = load(
        r#"
        denied_destination_networks = ["127.0.0.0/8", "10.68.0.0/16"]
        max_routes_per_tool = 8
        allowed_clients = ["172.16.0.0/21", "2001:db8::/32"]
        "#,
        &[],
    )
    .unwrap();
    assert_eq!(config.denied_destination_networks, ["127.0.0.0/8", "10.68.0.0/16"]);
    assert_eq!(config.max_routes_per_tool, 8);
    assert_eq!(config.allowed_clients, ["172.16.0.0/21", "2001:db8::/32"]);
    config.validate().unwrap();
}

#[test]
fn isolation_defaults() {
    let defaults = load("", &[]).unwrap();
    assert_eq!(
        defaults.denied_destination_networks,
        ["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128"]
    );
    assert_eq!(defaults.max_routes_per_tool, 64);
    assert!(defaults.allowed_clients.is_empty());
    defaults.validate().unwrap();
}

#[test]
fn isolation_flags_win_and_an_empty_list_allows_all() {
    let config = load(
        "denied_destination_networks = [\"10.0.0.0/8\"]\nmax_routes_per_tool = 8\n",
        &[
            "--denied-destination-networks",
            "127.0.0.0/8,::1",
            "--denied-destination-networks",
            "169.254.169.254",
            "--max-routes-per-tool",
            "4",
            "--allowed-clients",
            "172.16.0.0/21",
            "--allowed-clients",
            "10.0.0.0/8",
        ],
    )
    .unwrap();
    assert_eq!(config.denied_destination_networks, ["127.0.0.0/8", "::1", "169.254.169.254"]);
    assert_eq!(config.max_routes_per_tool, 4);
    assert_eq!(config.allowed_clients, ["172.16.0.0/21", "10.0.0.0/8"]);
    config.validate().unwrap();

    // `[]` in the file, an empty flag or an empty variable: nothing denied.
    assert!(load("denied_destination_networks = []\n", &[]).unwrap().denied_destination_networks.is_empty());
    let from_flag = load("", &["--denied-destination-networks", ""]).unwrap();
    from_flag.validate().unwrap();
    let from_env = load("denied_destination_networks = \"\"\n", &[]).unwrap();
    assert!(from_env.denied_destination_networks.is_empty());
    let listed = load("allowed_clients = \"172.16.0.0/21, 10.0.0.0/8\"\n", &[]).unwrap();
    assert_eq!(listed.allowed_clients, ["172.16.0.0/21", "10.0.0.0/8"]);
}

#[test]
fn isolation_errors_name_the_key_and_the_value() {
    let check = |toml: &str| load(toml, &[]).unwrap().validate().unwrap_err().to_string();
    assert_eq!(
        check("denied_destination_networks = [\"127.0.0.0/8\", \"10.0.0.0/33\"]\n"),
        "invalid [registrar] denied_destination_networks = \"10.0.0.0/33\": must be a CIDR such as 10.0.0.0/8, or an IP address"
    );
    assert_eq!(
        check("allowed_clients = [\"grid.example\"]\n"),
        "invalid [registrar] allowed_clients = \"grid.example\": must be a CIDR such as 10.0.0.0/8, or an IP address"
    );
    assert_eq!(
        check("max_routes_per_tool = 65\n"),
        "invalid [registrar] max_routes_per_tool = 65: must be 1-64 (the proxy loads at most 64 routes per tool)"
    );
    assert!(
        check("max_routes_per_tool = 0\n").starts_with("invalid [registrar] max_routes_per_tool = 0: must be 1-64")
    );
    assert!(load("max_routes_per_tool = -1\n", &[]).unwrap_err().contains("max_routes_per_tool"));
}
