//! The lock with an expiry and the guarded route removal, against a real redis-server.

use std::sync::Arc;
use std::time::Duration;

use dynamicproxy_redis::{
    AuditAction, BackendUrl, GuardedDelete, RedisLock, RouteSource, RouteStore, ToolName, Writer,
};
use dynamicproxy_test_support::{RedisServer, eventually};
use redis::Commands;

fn store(redis: &RedisServer) -> Arc<RouteStore> {
    Arc::new(RouteStore::new(redis.url().parse().unwrap()))
}

#[tokio::test]
async fn one_holder_at_a_time_and_the_other_takes_over_after_expiry() {
    let redis = RedisServer::start();
    let ttl = Duration::from_millis(600);
    let a = RedisLock::prober(store(&redis), ttl);
    let b = RedisLock::prober(store(&redis), ttl);
    assert!(a.acquire_or_renew().await.unwrap());
    assert!(a.is_held());
    assert!(!b.acquire_or_renew().await.unwrap(), "two holders");
    assert!(!b.is_held());
    // Renewals keep it past its first expiry.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(a.acquire_or_renew().await.unwrap());
        assert!(!b.acquire_or_renew().await.unwrap());
    }
    // A stops renewing (it died): B gets it once it expired, and A cannot renew B's lock.
    let taken = eventually(Duration::from_secs(5), "lock expired and taken by b", || {
        let b = &b;
        async move { b.acquire_or_renew().await.unwrap().then_some(()) }
    });
    taken.await;
    assert!(!a.renew().await.unwrap());
    assert!(!a.release().await.unwrap(), "a released b's lock");
    let holder: String = redis.client().get("dynamicproxy:prober-lock").unwrap();
    assert_eq!(holder, b.token());
    // Released on purpose: free at once.
    assert!(b.release().await.unwrap());
    assert!(a.acquire_or_renew().await.unwrap());
}

#[tokio::test]
async fn guarded_delete_keeps_a_new_registration_and_records_the_removal() {
    let redis = RedisServer::start();
    let store = store(&redis);
    let mut c = redis.client();
    let tool = ToolName::parse("foo").unwrap();
    let dead = BackendUrl::parse("http://10.0.0.1:8000").unwrap();
    // Stored without a scheme, as old registrations may be.
    let _: () = c.hset("prefix:foo", ".*", "10.0.0.1:8000").unwrap();
    let _: () = c.hset("redirect:foo", ".*", "foo.toolforge.org").unwrap();
    let _: () = c.hset("prefix:foo", "/api.*", "http://10.0.0.2:8000").unwrap();

    assert_eq!(
        store.delete_route_if_backend(&tool, "/api.*", &dead, &RouteSource::prober(60)).await.unwrap(),
        GuardedDelete::Changed { current: "http://10.0.0.2:8000".into() }
    );
    assert_eq!(
        store.delete_route_if_backend(&tool, ".*", &dead, &RouteSource::prober(60)).await.unwrap(),
        GuardedDelete::Deleted
    );
    assert_eq!(
        store.delete_route_if_backend(&tool, ".*", &dead, &RouteSource::prober(60)).await.unwrap(),
        GuardedDelete::Absent
    );
    let routes: Vec<String> = c.hkeys("prefix:foo").unwrap();
    assert_eq!(routes, ["/api.*"]);
    let redirect: bool = c.exists("redirect:foo").unwrap();
    assert!(!redirect, "the redirect of the removed route stayed");
    // The removal is in the audit stream as the prober's, and only the real one.
    let history = store.history(&tool).await.unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].action, AuditAction::Delete);
    assert_eq!(history[0].pattern, ".*");
    assert_eq!(history[0].backend, "10.0.0.1:8000");
    assert_eq!(history[0].source.writer, Writer::Prober);
    assert_eq!(history[0].source.who, "backend dead for 60 s");
}
