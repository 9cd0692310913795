//! Typed writes against a real redis-server.

use std::collections::BTreeMap;

use dynamicproxy_redis::{
    AuditAction, BackendUrl, OwnedDelete, OwnedServiceRoute, OwnedWrite, RoutePattern, RouteSource, RouteStore,
    ToolName, Writer,
};
use dynamicproxy_test_support::RedisServer;
use redis::Commands;

fn store(redis: &RedisServer) -> RouteStore {
    RouteStore::new(redis.url().parse().unwrap())
}

fn operator() -> RouteSource {
    RouteSource::cli("alice")
}

#[tokio::test]
async fn writes_use_the_legacy_schema() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let tool = ToolName::parse("foo").unwrap();
    let any = RoutePattern::parse(".*").unwrap();
    let backend = BackendUrl::parse("http://10.0.0.1:8000").unwrap();

    store.set_canonical_route(&tool, &any, &backend, "foo.toolforge.org", &operator()).await.unwrap();
    let mut c = redis.client();
    let routes: BTreeMap<String, String> = c.hgetall("prefix:foo").unwrap();
    let redirects: BTreeMap<String, String> = c.hgetall("redirect:foo").unwrap();
    assert_eq!(routes, BTreeMap::from([(".*".into(), "http://10.0.0.1:8000".into())]));
    assert_eq!(redirects, BTreeMap::from([(".*".into(), "foo.toolforge.org".into())]));

    assert_eq!(store.tools().await.unwrap(), ["foo"]);
    let entry = store.tool(&tool).await.unwrap();
    assert_eq!(entry.routes, routes);
    assert!(store.delete_route(&tool, ".*", &operator()).await.unwrap());
    assert!(!store.delete_route(&tool, ".*", &operator()).await.unwrap());
    assert!(store.tool(&tool).await.unwrap().is_empty());
    let exists: bool = c.exists("redirect:foo").unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn owned_routes_keep_the_ownership_set() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let owned = OwnedServiceRoute {
        namespace: "tool-foo".into(),
        tool: ToolName::parse("foo").unwrap(),
        pattern: "/api.*".into(),
    };
    let written = store.set_owned_route(&owned, &BackendUrl::parse("http://10.96.0.5:8000").unwrap()).await.unwrap();
    assert_eq!(written, OwnedWrite::Written);
    let mut c = redis.client();
    let members: Vec<String> = c.smembers("k8s_services").unwrap();
    assert_eq!(members, ["tool-foo/foo/api.*"]);
    let url: String = c.hget("prefix:foo", "/api.*").unwrap();
    assert_eq!(url, "http://10.96.0.5:8000");
    let _: () = c.sadd("k8s_services", "garbage").unwrap();
    let (set, bad) = store.owned_service_routes().await.unwrap();
    assert_eq!(set.into_iter().collect::<Vec<_>>(), std::slice::from_ref(&owned));
    assert_eq!(bad, ["garbage"]);
    assert_eq!(store.delete_owned_route(&owned).await.unwrap(), OwnedDelete::Deleted);
    let exists: bool = c.exists("prefix:foo").unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn owned_routes_never_take_another_writers_value() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let mut c = redis.client();
    let owned =
        OwnedServiceRoute { namespace: "tool-foo".into(), tool: ToolName::parse("foo").unwrap(), pattern: ".*".into() };
    let k8s = BackendUrl::parse("http://10.96.0.5:8000").unwrap();
    let grid = "http://172.16.1.2:33555";

    // A grid registration is there first: refused, nothing claimed.
    let _: () = c.hset("prefix:foo", ".*", grid).unwrap();
    let refused = store.set_owned_route(&owned, &k8s).await.unwrap();
    assert_eq!(refused, OwnedWrite::Refused { current: grid.into() });
    let url: String = c.hget("prefix:foo", ".*").unwrap();
    assert_eq!(url, grid);
    let members: Vec<String> = c.smembers("k8s_services").unwrap();
    assert!(members.is_empty(), "{members:?}");

    // Once the field is free it is ours; writing the same value again changes nothing.
    let _: () = c.hdel("prefix:foo", ".*").unwrap();
    assert_eq!(store.set_owned_route(&owned, &k8s).await.unwrap(), OwnedWrite::Written);
    assert_eq!(store.set_owned_route(&owned, &k8s).await.unwrap(), OwnedWrite::Unchanged);
    let moved = BackendUrl::parse("http://10.96.0.6:8000").unwrap();
    assert_eq!(store.set_owned_route(&owned, &moved).await.unwrap(), OwnedWrite::Written);

    // The grid writes over it: not taken back, and not deleted with the Service.
    let _: () = c.hset("prefix:foo", ".*", grid).unwrap();
    assert_eq!(store.set_owned_route(&owned, &k8s).await.unwrap(), OwnedWrite::Refused { current: grid.into() });
    let _: () = c.sadd("k8s_services", owned.member()).unwrap();
    assert_eq!(store.delete_owned_route(&owned).await.unwrap(), OwnedDelete::Kept { current: grid.into() });
    let url: String = c.hget("prefix:foo", ".*").unwrap();
    assert_eq!(url, grid);
    assert_eq!(store.delete_owned_route(&owned).await.unwrap(), OwnedDelete::Kept { current: grid.into() });
    let _: () = c.hdel("prefix:foo", ".*").unwrap();
    assert_eq!(store.delete_owned_route(&owned).await.unwrap(), OwnedDelete::Absent);
}

#[tokio::test]
async fn unreachable_redis_is_reported_as_unavailable() {
    let mut redis = RedisServer::start();
    let store = store(&redis);
    store.ping().await.unwrap();
    redis.stop();
    let err = store.ping().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    redis.restart();
    store.ping().await.expect("reconnects after Redis comes back");
}

#[tokio::test]
async fn two_key_writes_are_all_or_nothing_even_with_a_wrong_type_key() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let tool = ToolName::parse("foo").unwrap();
    let mut c = redis.client();
    let _: () = c.set("redirect:foo", "not a hash").unwrap();
    let err = store
        .set_canonical_route(
            &tool,
            &RoutePattern::parse(".*").unwrap(),
            &BackendUrl::parse("http://10.0.0.1:1").unwrap(),
            "foo.toolforge.org",
            &operator(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("redirect:foo holds a string, not a hash"), "{err}");
    assert!(!err.is_unavailable());
    let exists: bool = c.exists("prefix:foo").unwrap();
    assert!(!exists, "the route must not be written when the redirect cannot be");

    let _: () = c.hset("prefix:foo", ".*", "http://10.0.0.1:1").unwrap();
    assert!(store.delete_route(&tool, ".*", &operator()).await.is_err());
    let kept: Option<String> = c.hget("prefix:foo", ".*").unwrap();
    assert_eq!(kept.as_deref(), Some("http://10.0.0.1:1"), "the route must stay when the redirect cannot be cleaned");
}

#[tokio::test]
async fn many_callers_while_redis_is_broken_share_connection_attempts() {
    // A "Redis" that accepts and hangs up: every connection attempt is one accept.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}/0", listener.local_addr().unwrap());
    let accepts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    let store = std::sync::Arc::new(RouteStore::new(url.parse().unwrap()));
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.ping().await })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
    let attempts = accepts.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=5).contains(&attempts), "200 callers made {attempts} connection attempts");
}

#[tokio::test]
async fn owned_route_writes_are_all_or_nothing_too() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let mut c = redis.client();
    let _: () = c.set("k8s_services", "not a set").unwrap();
    let owned =
        OwnedServiceRoute { namespace: "tool-foo".into(), tool: ToolName::parse("foo").unwrap(), pattern: ".*".into() };
    let err = store.set_owned_route(&owned, &BackendUrl::parse("http://10.0.0.1:1").unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("k8s_services holds a string, not a set"), "{err}");
    let exists: bool = c.exists("prefix:foo").unwrap();
    assert!(!exists, "no route without its ownership record");
}

#[tokio::test]
async fn every_writer_is_recorded_next_to_the_route_and_in_the_audit_stream() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let mut c = redis.client();
    let tool = ToolName::parse("foo").unwrap();
    let (api, any) = (RoutePattern::parse("/api.*").unwrap(), RoutePattern::parse(".*").unwrap());
    let grid = BackendUrl::parse("http://10.0.0.1:8000").unwrap();
    let registrar = RouteSource::registrar("172.16.0.9:40123".parse().unwrap(), "tools.foo");

    assert!(store.set_route_capped(&tool, &api, &grid, None, 8, &registrar).await.unwrap());
    let owned = OwnedServiceRoute { namespace: "tool-foo".into(), tool: tool.clone(), pattern: ".*".into() };
    let k8s = BackendUrl::parse("http://10.96.0.5:8000").unwrap();
    assert_eq!(store.set_owned_route(&owned, &k8s).await.unwrap(), OwnedWrite::Written);
    // Unchanged writes are not writes: nothing more is recorded.
    assert_eq!(store.set_owned_route(&owned, &k8s).await.unwrap(), OwnedWrite::Unchanged);

    // The legacy hash is exactly what it always was.
    let routes: BTreeMap<String, String> = c.hgetall("prefix:foo").unwrap();
    assert_eq!(
        routes,
        BTreeMap::from([
            ("/api.*".into(), "http://10.0.0.1:8000".into()),
            (".*".into(), "http://10.96.0.5:8000".into())
        ])
    );
    let sources = store.tool_provenance(&tool).await.unwrap();
    assert_eq!(sources["/api.*"].source, registrar);
    assert_eq!(sources[".*"].source.to_string(), "kube-sync (Service tool-foo/foo)");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(now_ms.abs_diff(sources["/api.*"].written_at_ms) < 60_000, "written at the server's current time");

    // Deleting a route clears its provenance; the stream keeps what happened.
    assert!(store.delete_route(&tool, "/api.*", &operator()).await.unwrap());
    assert_eq!(store.delete_owned_route(&owned).await.unwrap(), OwnedDelete::Deleted);
    assert!(store.tool_provenance(&tool).await.unwrap().is_empty());
    let exists: bool = c.exists("route_source:foo").unwrap();
    assert!(!exists);

    store.set_route(&ToolName::parse("other").unwrap(), &any, &grid, &operator()).await.unwrap();
    let history = store.history(&tool).await.unwrap();
    let seen: Vec<_> = history
        .iter()
        .map(|e| (e.action.clone(), e.pattern.as_str(), e.backend.as_str(), e.source.writer.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (AuditAction::Set, "/api.*", "http://10.0.0.1:8000", Writer::Registrar),
            (AuditAction::Set, ".*", "http://10.96.0.5:8000", Writer::KubeSync),
            (AuditAction::Delete, "/api.*", "http://10.0.0.1:8000", Writer::Cli),
            (AuditAction::Delete, ".*", "http://10.96.0.5:8000", Writer::KubeSync),
        ]
    );
    assert!(history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "oldest first");
    assert_eq!(store.last_change(&tool).await.unwrap().as_ref(), history.last());
    assert_eq!(store.last_change(&ToolName::parse("never").unwrap()).await.unwrap(), None);
    assert_eq!(store.all_provenance().await.unwrap().keys().collect::<Vec<_>>(), ["other"]);

    store.set_canonical_route(&tool, &any, &grid, "foo.toolforge.org", &registrar).await.unwrap();
    assert!(store.delete_tool(&tool, &operator()).await.unwrap());
    let last: Vec<_> = store.history(&tool).await.unwrap().into_iter().rev().take(2).map(|e| e.action).collect();
    assert_eq!(last, [AuditAction::DeleteTool, AuditAction::SetCanonical]);
    assert!(store.tool_provenance(&tool).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_audit_stream_is_capped() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let tool = ToolName::parse("busy").unwrap();
    let any = RoutePattern::parse(".*").unwrap();
    // Fill the stream past its cap without 50k round trips: the cap applies on the next write.
    let mut c = redis.client();
    let mut pipe = redis::pipe();
    for _ in 0..dynamicproxy_redis::AUDIT_MAXLEN + 2_000 {
        pipe.cmd("XADD").arg("route_audit").arg("*").arg("tool").arg("filler").ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    store.set_route(&tool, &any, &BackendUrl::parse("http://10.0.0.1:1").unwrap(), &operator()).await.unwrap();
    let len: usize = redis::cmd("XLEN").arg("route_audit").query(&mut c).unwrap();
    // `MAXLEN ~` trims whole nodes: at most one node (100 entries by default) above the cap.
    assert!(len <= dynamicproxy_redis::AUDIT_MAXLEN + 100, "stream holds {len} entries");
    assert_eq!(store.history(&tool).await.unwrap().len(), 1);
}
