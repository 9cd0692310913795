//! What the Debian package ships, checked quickly on every test run (the
//! full build-install-remove check is `scripts/package.sh`): the packaged
//! configuration is valid for each daemon, the man pages and completions
//! are generated, and the units keep their hardening.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dynamicproxy(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .args(args)
        .env_remove("DYNAMICPROXY_REDIS_URL")
        .output()
        .expect("run dynamicproxy");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn packaged_configuration_passes_check_for_every_daemon() {
    let config = repo("deploy/debian/dynamicproxy.toml").display().to_string();
    for daemon in ["proxy", "registrar", "kube-sync"] {
        let (ok, out) = dynamicproxy(&[daemon, "--check", "--config", &config]);
        assert!(ok && out.contains("configuration ok"), "{daemon}: {out}");
    }
}

#[test]
fn version_is_the_package_version() {
    let (ok, out) = dynamicproxy(&["--version"]);
    assert!(ok);
    assert_eq!(out.trim(), format!("dynamicproxy {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn generate_docs_writes_man_pages_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = dynamicproxy(&["generate-docs", &dir.path().display().to_string()]);
    assert!(ok, "{out}");
    for page in [
        "dynamicproxy",
        "dynamicproxy-proxy",
        "dynamicproxy-registrar",
        "dynamicproxy-kube-sync",
        "dynamicproxy-routes",
    ] {
        let text = std::fs::read_to_string(dir.path().join(format!("man/{page}.1"))).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}: {text}");
    }
    let proxy = std::fs::read_to_string(dir.path().join("man/dynamicproxy-proxy.1")).unwrap();
    assert!(proxy.contains("access\\-log\\-format"), "{proxy}");
    assert!(!dir.path().join("man/dynamicproxy-help.1").exists());
    for file in ["dynamicproxy.bash", "_dynamicproxy", "dynamicproxy.fish"] {
        let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
        assert!(text.contains("kube-sync") && text.contains("tls-cert"), "{file}");
        assert!(!text.contains("generate-docs"), "{file} offers the hidden subcommand");
    }
}

/// `Key=Value` lines of a unit file.
fn directives(unit: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo(&format!("deploy/debian/{unit}.service"))).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn units_run_hardened_as_the_system_user() {
    for (unit, subcommand) in [
        ("dynamicproxy-proxy", "proxy"),
        ("dynamicproxy-registrar", "registrar"),
        ("dynamicproxy-kube-sync", "kube-sync"),
    ] {
        let d = directives(unit);
        let get = |key: &str| d.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        // The proxy hands its listeners over to its successor (restart and upgrade without refusals).
        let handover = if subcommand == "proxy" { " --handover-socket /run/dynamicproxy/handover.sock" } else { "" };
        assert_eq!(
            get("ExecStart"),
            Some(
                format!("/usr/bin/dynamicproxy {subcommand} --config /etc/dynamicproxy/dynamicproxy.toml{handover}")
                    .as_str()
            )
        );
        for (key, value) in [
            ("User", "dynamicproxy"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("StateDirectory", "dynamicproxy"),
            ("RuntimeDirectory", "dynamicproxy"),
            ("Restart", "on-failure"),
        ] {
            assert_eq!(get(key), Some(value), "{unit}: {key}");
        }
        let caps = if subcommand == "proxy" { "CAP_NET_BIND_SERVICE" } else { "" };
        assert_eq!(get("CapabilityBoundingSet"), Some(caps), "{unit}");
        assert_eq!(get("AmbientCapabilities"), (subcommand == "proxy").then_some(caps), "{unit}");
        let reload = (subcommand == "proxy").then_some("/bin/kill -HUP $MAINPID");
        assert_eq!(get("ExecReload"), reload, "{unit}: only the proxy has something to reload (certificates)");
    }
}

#[test]
fn every_packaged_source_file_exists() {
    let manifest = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let assets = manifest.split("[package.metadata.deb]").nth(1).expect("cargo deb metadata");
    let sources: Vec<&str> =
        assets.lines().filter_map(|l| l.trim().strip_prefix("[\"")).filter_map(|l| l.split('"').next()).collect();
    assert!(sources.len() >= 10, "{sources:?}");
    // target/ holds what the build and `generate-docs` make; the rest must be in the repository.
    for source in sources.iter().filter(|s| !s.starts_with("target/")) {
        assert!(repo(source).is_file(), "packaged file missing: {source}");
    }
    for script in ["postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(repo(&format!("deploy/debian/{script}"))).unwrap();
        assert!(text.starts_with("#!/bin/sh\n") && text.contains("set -e"), "{script}");
    }
}
