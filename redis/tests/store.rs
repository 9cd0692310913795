//! Typed writes against a real redis-server.

use std::collections::BTreeMap;

use dynamicproxy_redis::{BackendUrl, OwnedDelete, OwnedServiceRoute, OwnedWrite, RoutePattern, RouteStore, ToolName};
use dynamicproxy_test_support::RedisServer;
use redis::Commands;

fn store(redis: &RedisServer) -> RouteStore {
    RouteStore::new(redis.url().parse().unwrap())
}

#[tokio::test]
async fn writes_use_the_legacy_schema() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let tool = ToolName::parse("foo").unwrap();
    let any = RoutePattern::parse(".*").unwrap();
    let backend = BackendUrl::parse("http://10.0.0.1:8000").unwrap();

    store.set_canonical_route(&tool, &any, &backend, "foo.toolforge.org").await.unwrap();
    let mut c = redis.client();
    let routes: BTreeMap<String, String> = c.hgetall("prefix:foo").unwrap();
    let redirects: BTreeMap<String, String> = c.hgetall("redirect:foo").unwrap();
    assert_eq!(routes, BTreeMap::from([(".*".into(), "http://10.0.0.1:8000".into())]));
    assert_eq!(redirects, BTreeMap::from([(".*".into(), "foo.toolforge.org".into())]));

    assert_eq!(store.tools().await.unwrap(), ["foo"]);
    let entry = store.tool(&tool).await.unwrap();
    assert_eq!(entry.routes, routes);
    assert!(store.delete_route(&tool, ".*").await.unwrap());
    assert!(!store.delete_route(&tool, ".*").await.unwrap());
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
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("redirect:foo holds a string, not a hash"), "{err}");
    assert!(!err.is_unavailable());
    let exists: bool = c.exists("prefix:foo").unwrap();
    assert!(!exists, "the route must not be written when the redirect cannot be");

    let _: () = c.hset("prefix:foo", ".*", "http://10.0.0.1:1").unwrap();
    assert!(store.delete_route(&tool, ".*").await.is_err());
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
