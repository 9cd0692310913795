//! Dead grid registrations found: idle routes' backends are probed by TCP
//! connect; one that fails every probe for `dead_after_secs` is reported (and
//! removed when asked); one proxy probes at a time; probes are bounded in rate
//! and in number in flight.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dynamicproxy_proxy::dead::ProberState;
use dynamicproxy_proxy::egress::Egress;
use dynamicproxy_proxy::prober::{ProbeSettings, Prober};
use dynamicproxy_proxy::resolver::BackendResolver;
use dynamicproxy_proxy::{Config, DeadRegistrations, Metrics, ProxyHandle};
use dynamicproxy_redis::{NetworkList, RouteCache, RouteStore};
use dynamicproxy_test_support::eventually;
use prometheus_client::registry::Registry;
use redis::Commands;
use tokio_util::sync::CancellationToken;

/// An address where nothing listens (the port was just freed).
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Settings that find a dead backend within seconds.
fn fast() -> Config {
    Config {
        probe_idle_secs: 1,
        dead_after_secs: 1,
        probe_timeout_ms: 500,
        probe_rate_per_second: 50,
        denied_backend_networks: Vec::new(),
        ..Config::default()
    }
}

/// A running prober with its own report and metrics.
struct Probing {
    dead: DeadRegistrations,
    metrics: Arc<Metrics>,
    registry: Registry,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Probing {
    /// Starts a prober as the binary does, sharing `proxy`'s route cache and
    /// request history, with its own metrics.
    fn start(proxy: &Proxy, config: &Config) -> Probing {
        Probing::start_with(proxy.cache.clone(), proxy.redis.url(), &proxy.handle, config, |_| {})
    }

    fn start_with(
        cache: RouteCache,
        redis_url: String,
        handle: &ProxyHandle,
        config: &Config,
        adjust: impl FnOnce(&mut ProbeSettings),
    ) -> Probing {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let mut settings = ProbeSettings::from_config(config).unwrap();
        adjust(&mut settings);
        let prober = Prober {
            settings,
            egress: Egress::new(
                NetworkList::parse(&config.denied_backend_networks).unwrap(),
                BackendResolver::new(&config.dns_servers().unwrap()),
            ),
            cache,
            store: Arc::new(RouteStore::new(redis_url.parse().unwrap())),
            last_use: handle.last_use().clone(),
            dead: handle.dead_registrations().clone(),
            metrics: metrics.clone(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(prober.run(stop.clone()));
        Probing { dead: handle.dead_registrations().clone(), metrics, registry, task, stop }
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    fn probes(&self) -> u64 {
        ["alive", "refused", "timeout", "error", "denied"].iter().map(|r| self.metrics.probe.probes(r)).sum()
    }
}

impl Drop for Probing {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The value of an unlabelled metric line in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn a_closed_port_is_reported_dead_and_a_live_backend_is_not() {
    let config = fast();
    let proxy = Proxy::start(config.clone()).await;
    let dead_addr = closed_port().await;
    let live = Backend::echo("live").await;
    proxy.set_route("gone", ".*", &format!("http://{dead_addr}")).await;
    proxy.set_route("alive", ".*", &live.url()).await;
    let prober = Probing::start(&proxy, &config);

    let since = eventually(Duration::from_secs(10), "the dead registration reported", || {
        let found = prober.dead.dead_since("gone", ".*");
        async move { found }
    })
    .await;
    assert!(since <= std::time::SystemTime::now());
    assert_eq!(prober.dead.prober(), ProberState::Active);
    let text = prober.metrics_text();
    assert_eq!(metric(&text, "dynamicproxy_proxy_dead_registrations"), Some(1.0), "{text}");
    assert!(prober.metrics.probe.probes("refused") >= 2, "{text}");
    eventually(Duration::from_secs(5), "the live backend probed", || {
        let alive = prober.metrics.probe.probes("alive");
        async move { (alive >= 1).then_some(()) }
    })
    .await;
    assert_eq!(prober.dead.dead_since("alive", ".*"), None);
    let report = prober.dead.to_json();
    assert_eq!(report["prober"], "active");
    assert_eq!(report["dead"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["dead"][0]["tool"], "gone");
    assert_eq!(report["dead"][0]["backend"], format!("http://{dead_addr}"));
    assert_eq!(report["dead"][0]["last_result"], "refused");

    // Removal is off by default: the route stays, and still gets its 502.
    let stored: Option<String> = proxy.redis().hget("prefix:gone", ".*").unwrap();
    assert_eq!(stored, Some(format!("http://{dead_addr}")));
    assert_eq!(prober.metrics.probe.probes("alive") + prober.metrics.probe.probes("refused"), prober.probes());

    // The webservice comes back on its port: no longer dead.
    let _back = tokio::net::TcpListener::bind(dead_addr).await.unwrap();
    eventually(Duration::from_secs(10), "the registration alive again", || {
        let gone = prober.dead.dead_since("gone", ".*").is_none();
        async move { gone.then_some(()) }
    })
    .await;
    assert_eq!(metric(&prober.metrics_text(), "dynamicproxy_proxy_dead_registrations"), Some(0.0));
}

#[tokio::test]
async fn a_route_in_use_is_not_probed() {
    let config = Config { probe_idle_secs: 2, ..fast() };
    let proxy = Proxy::start(config.clone()).await;
    let used = Backend::echo("used").await;
    proxy.set_route("busy", ".*", &used.url()).await;
    let prober = Probing::start(&proxy, &config);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(get(proxy.http, "busy.toolforge.org", "/", &[]).await.status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(prober.probes(), 0, "a route with requests was probed");
    // Idle from now on: it gets its probe.
    eventually(Duration::from_secs(10), "the idle route probed", || {
        let alive = prober.metrics.probe.probes("alive");
        async move { (alive >= 1).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_dead_registration_is_removed_only_when_asked_and_only_while_it_names_the_dead_backend() {
    let config = Config { remove_dead_registrations: true, ..fast() };
    let proxy = Proxy::start(config.clone()).await;
    let dead_addr = closed_port().await;
    let live = Backend::echo("live").await;
    proxy.set_route("gone", ".*", &format!("http://{dead_addr}")).await;
    proxy.set_route("gone", "/api.*", &live.url()).await;
    let prober = Probing::start(&proxy, &config);

    eventually(Duration::from_secs(10), "the dead route removed from Redis", || {
        let stored: Option<String> = proxy.redis().hget("prefix:gone", ".*").unwrap();
        async move { stored.is_none().then_some(()) }
    })
    .await;
    let kept: Option<String> = proxy.redis().hget("prefix:gone", "/api.*").unwrap();
    assert_eq!(kept, Some(live.url()), "the live route of the same tool went too");
    // Counted once the script's reply is back, a moment after Redis changed.
    eventually(Duration::from_secs(5), "the removal counted", || {
        let removed = metric(&prober.metrics_text(), "dynamicproxy_proxy_dead_registrations_removed_total");
        async move { (removed == Some(1.0)).then_some(()) }
    })
    .await;
    // The cache follows Redis: the tool's other route serves, and the dead one is no longer reported.
    proxy.wait_for("gone", |r| r.is_some_and(|r| r.routes().len() == 1)).await;
    eventually(Duration::from_secs(5), "the removed registration no longer reported", || {
        let count = prober.dead.count();
        async move { (count == 0).then_some(()) }
    })
    .await;
    assert_eq!(get(proxy.http, "gone.toolforge.org", "/api/x", &[]).await.status, 200);
}

#[tokio::test]
async fn one_prober_acts_at_a_time_and_a_standby_takes_over_when_it_dies() {
    let config = fast();
    let proxy = Proxy::start(config.clone()).await;
    let dead_addr = closed_port().await;
    proxy.set_route("gone", ".*", &format!("http://{dead_addr}")).await;
    let ttl = |s: &mut ProbeSettings| s.lock_ttl = Duration::from_millis(1500);
    let (handle_a, handle_b) = (ProxyHandle::new(&config), ProxyHandle::new(&config));
    let a = Probing::start_with(proxy.cache.clone(), proxy.redis.url(), &handle_a, &config, ttl);
    let b = Probing::start_with(proxy.cache.clone(), proxy.redis.url(), &handle_b, &config, ttl);

    let (holder, standby) = eventually(Duration::from_secs(10), "one prober probing", || {
        let pair = match (a.probes() > 0, b.probes() > 0) {
            (true, false) => Some((&a, &b)),
            (false, true) => Some((&b, &a)),
            (false, false) => None,
            (true, true) => panic!("both probers probed"),
        };
        async move { pair }
    })
    .await;
    // A while later: still only the holder has probed.
    eventually(Duration::from_secs(10), "the holder probing again", || {
        let again = holder.probes() >= 3;
        async move { again.then_some(()) }
    })
    .await;
    assert_eq!(standby.probes(), 0, "the standby probed while the lock was held");
    assert_eq!(standby.dead.prober(), ProberState::Standby);
    assert_eq!(holder.dead.prober(), ProberState::Active);

    // The holder dies without releasing: the standby takes over once the lock expired.
    holder.task.abort();
    let died = Instant::now();
    eventually(Duration::from_secs(10), "the standby probing", || {
        let probing = standby.probes() > 0;
        async move { probing.then_some(()) }
    })
    .await;
    assert_eq!(standby.dead.prober(), ProberState::Active);
    assert!(died.elapsed() >= Duration::from_millis(500), "took over before the lock could have expired");
}

#[tokio::test]
async fn many_dead_routes_are_probed_at_the_configured_rate() {
    let config = Config { probe_rate_per_second: 20, probe_max_in_flight: 64, ..fast() };
    let mut ports = Vec::new();
    for _ in 0..200 {
        ports.push(closed_port().await.port());
    }
    let proxy = Proxy::start_with(dynamicproxy_test_support::RedisServer::start(), config.clone(), |c| {
        for (i, port) in ports.iter().enumerate() {
            redis::cmd("HSET")
                .arg(format!("prefix:dead{i}"))
                .arg(".*")
                .arg(format!("http://127.0.0.1:{port}"))
                .query::<()>(c)
                .unwrap();
        }
    })
    .await;
    let prober = Probing::start(&proxy, &config);
    eventually(Duration::from_secs(10), "probing started", || {
        let n = prober.probes();
        async move { (n > 0).then_some(()) }
    })
    .await;
    let (start, started) = (prober.probes(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (probed, elapsed) = (prober.probes() - start, started.elapsed().as_secs_f64());
    // 20 per second, plus the probes already in flight and one tick of slack.
    let most = (20.0 * elapsed).ceil() as u64 + 2;
    assert!(probed <= most, "{probed} probes in {elapsed:.2} s, more than {most}");
    assert!(probed >= 10, "only {probed} probes in {elapsed:.2} s");
}

#[tokio::test]
async fn probes_in_flight_are_bounded() {
    // A DNS server that never answers: every probe waits for its timeout.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        probe_rate_per_second: 200,
        probe_max_in_flight: 3,
        probe_timeout_ms: 400,
        dns_servers: vec![silent.local_addr().unwrap().to_string()],
        ..fast()
    };
    let proxy = Proxy::start_with(dynamicproxy_test_support::RedisServer::start(), config.clone(), |c| {
        for i in 0..100 {
            redis::cmd("HSET")
                .arg(format!("prefix:slow{i}"))
                .arg(".*")
                .arg(format!("http://slow{i}.backends.lan:80"))
                .query::<()>(c)
                .unwrap();
        }
    })
    .await;
    let prober = Probing::start(&proxy, &config);
    eventually(Duration::from_secs(10), "probes in flight", || {
        let n = prober.metrics.probe.in_flight();
        assert_eq!(prober.probes(), 0, "a probe ended at once: {}", prober.metrics_text());
        async move { (n > 0).then_some(()) }
    })
    .await;
    let started = Instant::now();
    let mut most = 0;
    while started.elapsed() < Duration::from_secs(2) {
        most = most.max(prober.metrics.probe.in_flight());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(most <= 3, "{most} probes in flight");
    assert_eq!(most, 3, "the slots were not used");
    // 3 slots of 400 ms each: about 7 probes a second ended, not 200.
    let ended = prober.metrics.probe.probes("timeout") + prober.metrics.probe.probes("error");
    assert!(ended <= 3 * 8, "{ended} probes ended within about 2.4 s");
}

#[tokio::test]
async fn a_backend_in_a_denied_network_is_never_connected_nor_reported() {
    let proxy = Proxy::start(fast()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    proxy.set_route("local", ".*", &format!("http://{}", listener.local_addr().unwrap())).await;
    // The prober under the production policy: loopback is denied.
    let enforcing = Config { denied_backend_networks: Config::default().denied_backend_networks, ..fast() };
    let prober = Probing::start(&proxy, &enforcing);
    eventually(Duration::from_secs(10), "denied probes", || {
        let denied = prober.metrics.probe.probes("denied");
        async move { (denied >= 2).then_some(()) }
    })
    .await;
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the prober connected to a denied network");
    assert_eq!(prober.dead.count(), 0);
    assert_eq!(prober.probes(), prober.metrics.probe.probes("denied"));
}
