//! `dynamicproxy routes` end to end: the real binary against a real redis-server.

use std::process::{Command, Output};

use dynamicproxy_test_support::{RedisServer, free_port};
use redis::Commands;

fn routes(redis_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .arg("routes")
        .args(args)
        .args(["--redis-url", redis_url])
        .env_remove("DYNAMICPROXY_REDIS_URL")
        .output()
        .expect("run dynamicproxy")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn set_get_list_delete() {
    let redis = RedisServer::start();
    let url = redis.url();

    let out = routes(&url, &["set", "foo", ".*", "127.0.0.1:8000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "set foo .* -> http://127.0.0.1:8000\n");
    let stored: String = redis.client().hget("prefix:foo", ".*").unwrap();
    assert_eq!(stored, "http://127.0.0.1:8000");

    assert!(routes(&url, &["set", "foo", "/api.*", "http://10.0.0.1:80"]).status.success());
    assert!(routes(&url, &["set", "bar", ".*", "http://10.0.0.2:80"]).status.success());

    let out = routes(&url, &["list"]);
    assert_eq!(stdout(&out), "bar\nfoo\n");
    let out = routes(&url, &["list", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!(["bar", "foo"]));

    let out = routes(&url, &["get", "foo"]);
    assert_eq!(stdout(&out), "PATTERN  BACKEND\n.*       http://127.0.0.1:8000\n/api.*   http://10.0.0.1:80\n");
    let out = routes(&url, &["--json", "get", "foo"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["routes"]["/api.*"], "http://10.0.0.1:80");
    assert_eq!(json["redirects"], serde_json::json!({}));

    let out = routes(&url, &["delete", "foo", "/api.*"]);
    assert_eq!(stdout(&out), "deleted foo /api.*\n");
    let left: Vec<String> = redis.client().hkeys("prefix:foo").unwrap();
    assert_eq!(left, [".*"]);
    let out = routes(&url, &["delete", "foo", "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!({"tool": "foo", "pattern": null, "deleted": true})
    );
    let out = routes(&url, &["delete", "foo"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "nothing to delete for foo (all routes and redirects)\n");
    let out = routes(&url, &["get", "foo"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stderr(&out), "dynamicproxy routes: tool foo has no routes\n");
}

#[test]
fn get_marks_entries_the_proxy_ignores() {
    let redis = RedisServer::start();
    let _: () = redis.client().hset("prefix:foo", "(?!x)", "http://10.0.0.1:1").unwrap();
    let _: () = redis.client().hset("redirect:foo", ".*", "foo.toolforge.org").unwrap();
    let out = routes(&redis.url(), &["get", "foo"]);
    let text = stdout(&out);
    assert!(text.contains("(?!x)    http://10.0.0.1:1  (ignored by the proxy: invalid route pattern"), "{text}");
    assert!(text.contains(".*       redirect to https://foo.toolforge.org"), "{text}");
}

#[test]
fn invalid_input_exits_2_and_writes_nothing() {
    let redis = RedisServer::start();
    for (args, message) in [
        (vec!["set", "Foo", ".*", "http://a:1"], "invalid tool name \"Foo\""),
        (vec!["set", "foo", "(?!x)", "http://a:1"], "invalid route pattern \"(?!x)\""),
        (vec!["set", "foo", ".*", "ftp://a:1"], "invalid backend url \"ftp://a:1\""),
        (vec!["set", "foo", ".*", "http://a:99999"], "port must be 1-65535"),
        (vec!["get", "../etc"], "invalid tool name"),
        (vec!["delete", ""], "invalid tool name"),
    ] {
        let out = routes(&redis.url(), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(message) && err.lines().count() == 1, "{args:?}: {err}");
    }
    let keys: Vec<String> = redis.client().keys("*").unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    // A usage error is also exit 2 (clap), with the usage on stderr.
    let out = routes(&redis.url(), &["set", "foo"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn redis_down_exits_1_with_one_line() {
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    for args in [vec!["list"], vec!["get", "foo"], vec!["set", "foo", ".*", "http://a:1"], vec!["delete", "foo"]] {
        let out = routes(&url, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.starts_with("dynamicproxy routes: cannot reach Redis at redis://127.0.0.1:"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn global_flags_before_or_after_and_env() {
    let redis = RedisServer::start();
    let _: () = redis.client().hset("prefix:foo", ".*", "http://a:1").unwrap();
    let bin = env!("CARGO_BIN_EXE_dynamicproxy");
    let before = Command::new(bin).args(["--redis-url", &redis.url(), "routes", "list"]).output().unwrap();
    let middle = Command::new(bin).args(["routes", "--redis-url", &redis.url(), "list"]).output().unwrap();
    let env = Command::new(bin).args(["routes", "list"]).env("DYNAMICPROXY_REDIS_URL", redis.url()).output().unwrap();
    for out in [before, middle, env] {
        assert_eq!(stdout(&out), "foo\n", "{}", stderr(&out));
    }
    // Flag beats env, env beats file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[redis]\nurl = \"redis://127.0.0.1:1/0\"\n").unwrap();
    let file_only = Command::new(bin)
        .args(["routes", "list", "--config"])
        .arg(&file)
        .env_remove("DYNAMICPROXY_REDIS_URL")
        .output()
        .unwrap();
    assert_eq!(file_only.status.code(), Some(1));
    let env_wins = Command::new(bin)
        .args(["routes", "list", "--config"])
        .arg(&file)
        .env("DYNAMICPROXY_REDIS_URL", redis.url())
        .output()
        .unwrap();
    assert_eq!(stdout(&env_wins), "foo\n");
    let flag_wins = Command::new(bin)
        .args(["routes", "list", "--redis-url", &redis.url(), "--config"])
        .arg(&file)
        .env("DYNAMICPROXY_REDIS_URL", "redis://127.0.0.1:1/0")
        .output()
        .unwrap();
    assert_eq!(stdout(&flag_wins), "foo\n");
}

#[test]
fn bad_configuration_names_the_key_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_dynamicproxy");
    let cases = [
        ("[redis]\nurl = \"localhost\"\n", "[redis] url: invalid redis url \"localhost\""),
        ("[redis]\nport = 1\n", "[redis] port: unknown field: found `port`"),
        ("[redis\n", "TOML"),
    ];
    for (text, expected) in cases {
        let file = dir.path().join("c.toml");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(bin)
            .args(["routes", "list", "--config"])
            .arg(&file)
            .env_remove("DYNAMICPROXY_REDIS_URL")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{text}");
        let err = stderr(&out);
        assert!(err.contains(expected) && err.lines().count() == 1, "{text}: {err}");
    }
    let out = Command::new(bin).args(["routes", "list", "--config", "/nonexistent.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("cannot read /nonexistent.toml"));
}

#[test]
fn set_warns_when_the_proxy_would_refuse_the_backend() {
    let redis = RedisServer::start();
    let url = redis.url();
    // The edge's own admin API, by address and by name: written, with a warning.
    for backend in ["http://127.0.0.1:9631", "http://localhost:9631"] {
        let out = routes(&url, &["set", "evil", ".*", backend]);
        assert!(out.status.success(), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("warning:") && err.contains("127.0.0.0/8"), "{backend}: {err}");
        assert!(err.contains("[proxy] denied_backend_networks"), "{err}");
        let stored: String = redis.client().hget("prefix:evil", ".*").unwrap();
        assert_eq!(stored, backend);
    }
    // A tool's address: no warning.
    let out = routes(&url, &["set", "good", ".*", "http://192.0.2.10:8000"]);
    assert!(out.status.success());
    assert_eq!(stderr(&out), "");
    // The configured list is the one that counts.
    let out = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .args(["routes", "set", "dev", ".*", "http://127.0.0.1:8000", "--redis-url", &url])
        .env_remove("DYNAMICPROXY_REDIS_URL")
        .env("DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS", "[]")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(stderr(&out), "");
}
