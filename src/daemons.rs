//! Runs the daemons: load and validate configuration, bind every listener,
//! start the components, wait for a signal, drain.
//!
//! Order matters for operators: everything that can fail on bad input
//! (configuration, listeners, certificates) fails before anything serves,
//! with one line and a non-zero exit; after that, nothing but a signal stops
//! the process.
//!
//! Listeners come from the running predecessor when `[proxy] handover_socket`
//! leads to one (see `handover`), else they are bound. A successor starts
//! serving only with a loaded route table, then tells the predecessor, which
//! stops accepting and drains.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamicproxy_redis::{CacheSyncConfig, RedisEndpoint, RouteCache, RouteStore, run_cache_sync};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, MaintenanceSwitch, ReadyCheck};
use crate::admin_guard::{AdminGuard, AdminToken};
use crate::cli::GlobalFlags;
use crate::handover::{self, Inherited};
use crate::settings::{self, ConfigError, Settings};
use crate::telemetry;

/// Exit status for a configuration that cannot be used (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status when a listener cannot be bound or a component cannot start.
pub const EXIT_START: u8 = 1;
/// The registrar's admin API when `--admin-listen` is not given (SPEC §1 names none).
const REGISTRAR_ADMIN_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9633);
/// Longest wait for components to drain after the signal, on top of their own grace periods.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Longest a successor waits for its route table and its listeners before it
/// gives up the hand-over (the predecessor serves on): serving with an empty
/// table would answer every request wrongly.
const HANDOVER_READY_LIMIT: Duration = Duration::from_secs(60);

/// Which daemons to run in this process, with their own flags.
#[derive(Default)]
pub struct Selection {
    /// Run the proxy (with these flags).
    pub proxy: Option<dynamicproxy_proxy::Flags>,
    /// Run the registrar (with these flags).
    pub registrar: Option<dynamicproxy_registrar::Flags>,
    /// Run kube-sync (with these flags).
    pub kube_sync: Option<dynamicproxy_kube_sync::Flags>,
    /// `dynamicproxy all`: kube-sync without a reachable Kubernetes configuration is skipped, not fatal.
    pub all: bool,
    /// `--admin-listen` of `registrar`, whose section has no such key.
    pub admin_listen: Option<SocketAddr>,
}

impl Selection {
    fn name(&self) -> &'static str {
        match (&self.proxy, &self.registrar, &self.kube_sync, self.all) {
            (_, _, _, true) => "all",
            (Some(_), _, _, _) => "proxy",
            (_, Some(_), _, _) => "registrar",
            _ => "kube-sync",
        }
    }
}

/// The validated configuration of the selected daemons.
struct Plan {
    settings: Settings,
    redis: RedisEndpoint,
    /// Where the proxy's cache reads (`[redis] read_url`, else `redis`).
    redis_read: RedisEndpoint,
    proxy: Option<dynamicproxy_proxy::Config>,
    registrar: Option<dynamicproxy_registrar::Config>,
    kube_sync: Option<dynamicproxy_kube_sync::Config>,
    admin_listen: SocketAddr,
    admin_token: Option<AdminToken>,
}

/// Runs the selected daemons until SIGTERM/SIGINT.
pub async fn run(global: GlobalFlags, selection: Selection) -> ExitCode {
    let plan = match plan(&global, &selection) {
        Ok(plan) => plan,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    if global.check {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    let log = match telemetry::init(plan.settings.log.format, &plan.settings.log.level) {
        Ok(log) => log,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    match start_and_serve(plan, selection, log).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Start(message)) => fail(EXIT_START, message),
        Err(Failure::Runtime) => ExitCode::FAILURE,
    }
}

fn plan(global: &GlobalFlags, selection: &Selection) -> Result<Plan, ConfigError> {
    let mut flags: Vec<(&str, serde_json::Value)> = Vec::new();
    let to_value = |v: serde_json::Result<serde_json::Value>| v.map_err(ConfigError::invalid);
    if let Some(f) = &selection.proxy {
        flags.push(("proxy", to_value(serde_json::to_value(f))?));
    }
    if let Some(f) = &selection.registrar {
        flags.push(("registrar", to_value(serde_json::to_value(f))?));
    }
    if let Some(f) = &selection.kube_sync {
        flags.push(("kube_sync", to_value(serde_json::to_value(f))?));
    }
    let flag_refs: Vec<(&str, &serde_json::Value)> = flags.iter().map(|(s, v)| (*s, v)).collect();
    let (settings, figment) = settings::load(global, &flag_refs)?;
    let redis = settings.redis_endpoint()?;
    let redis_read = settings.redis_read_endpoint()?;
    let admin_token = settings.admin_token()?;
    let proxy = daemon_config(
        &figment,
        "proxy",
        selection.proxy.is_some() || selection.all,
        dynamicproxy_proxy::Config::validate,
    )?;
    let registrar = daemon_config(
        &figment,
        "registrar",
        selection.registrar.is_some() || selection.all,
        dynamicproxy_registrar::Config::validate,
    )?;
    let kube_sync = daemon_config(
        &figment,
        "kube_sync",
        selection.kube_sync.is_some() || selection.all,
        dynamicproxy_kube_sync::Config::validate,
    )?;
    let admin_listen = match (&proxy, &registrar, &kube_sync) {
        (Some(p), _, _) => selection.admin_listen.unwrap_or(p.admin_listen),
        // The registrar's section has no admin key; its admin API is on a fixed default unless the flag says otherwise.
        (None, Some(_), _) => selection.admin_listen.unwrap_or(REGISTRAR_ADMIN_LISTEN),
        (None, None, Some(k)) => k.admin_listen,
        (None, None, None) => return Err(ConfigError::invalid("no daemon selected")),
    };
    Ok(Plan { settings, redis, redis_read, proxy, registrar, kube_sync, admin_listen, admin_token })
}

/// One daemon's typed and validated section, when that daemon runs.
fn daemon_config<T: serde::de::DeserializeOwned, E: std::fmt::Display>(
    figment: &figment::Figment,
    name: &str,
    wanted: bool,
    validate: impl Fn(&T) -> Result<(), E>,
) -> Result<Option<T>, ConfigError> {
    if !wanted {
        return Ok(None);
    }
    let config: T = settings::section(figment, name)?;
    validate(&config).map_err(ConfigError::invalid)?;
    Ok(Some(config))
}

enum Failure {
    /// Could not start: one line for the operator.
    Start(String),
    /// A component failed while running; already logged.
    Runtime,
}

/// Where listeners come from, and copies of them for a later hand-over.
#[derive(Default)]
struct Sockets {
    inherited: Option<Inherited>,
    copies: Vec<(String, OwnedFd)>,
}

impl Sockets {
    /// The listener for `key`: inherited from the predecessor when it had one on `addr`, else bound.
    async fn acquire(&mut self, addr: SocketAddr, key: &str) -> Result<TcpListener, Failure> {
        let cannot = |e: std::io::Error| Failure::Start(format!("cannot listen on {addr} ({key}): {e}"));
        let listener = match self.inherited.as_mut().and_then(|i| i.claim(key, addr)) {
            Some(listener) => {
                listener.set_nonblocking(true).map_err(cannot)?;
                TcpListener::from_std(listener).map_err(cannot)?
            }
            None => TcpListener::bind(addr).await.map_err(cannot)?,
        };
        self.copies.push((key.to_string(), listener.as_fd().try_clone_to_owned().map_err(cannot)?));
        Ok(listener)
    }
}

async fn start_and_serve(plan: Plan, selection: Selection, log: telemetry::LogControl) -> Result<(), Failure> {
    // Before anything serves: from then on a SIGHUP must not stop the process.
    let hangup = crate::shutdown::ignore_hangup();
    let started = Instant::now();
    let component = selection.name();
    let shutdown = CancellationToken::new();
    // Listening for SIGTERM from the start: a stop that comes while the
    // components start (or wait for a hand-over) drains them, where the
    // default action would kill the process with its prober lock still held.
    let signal = tokio::spawn(crate::shutdown::shutdown_signal(shutdown.clone()));
    let mut registry = Registry::default();
    let store = Arc::new(RouteStore::new(plan.redis.clone()));
    let mut tasks: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();
    let mut cache = None;
    let mut maintenance: Option<MaintenanceSwitch> = None;
    let mut dead = None;
    let mut readiness: Vec<ReadyCheck> = Vec::new();
    let mut explainer = None;

    // A running predecessor hands its listeners over; nothing is bound twice.
    let handover_path = plan.proxy.as_ref().and_then(|c| c.handover_socket.clone());
    let mut sockets = Sockets::default();
    if let Some(path) = &handover_path {
        sockets.inherited = handover::take(path).await.map_err(|e| Failure::Start(e.to_string()))?;
        if sockets.inherited.is_some() {
            info!(socket = %path.display(), "taking over the listeners of the running process");
        }
    }
    // Bind everything first, so a port in use stops the process before anything serves.
    let proxy_listeners = match &plan.proxy {
        Some(config) => Some(dynamicproxy_proxy::Listeners {
            http: sockets.acquire(config.http_listen, "[proxy] http_listen").await?,
            https: match config.tls_enabled() {
                true => Some(sockets.acquire(config.https_listen, "[proxy] https_listen").await?),
                false => None,
            },
            list: sockets.acquire(config.list_listen, "[proxy] list_listen").await?,
        }),
        None => None,
    };
    let registrar_listener = match &plan.registrar {
        Some(config) => Some(sockets.acquire(config.listen, "[registrar] listen").await?),
        None => None,
    };
    let admin_listener = sockets.acquire(plan.admin_listen, "admin_listen").await?;
    let mut proxy_serving = None;

    // kube-sync needs a client before it can run; under `all` a missing configuration only disables it.
    let kube_client = match &plan.kube_sync {
        Some(config) => match dynamicproxy_kube_sync::client_from_config(config).await {
            Ok(client) => Some(client),
            Err(e) if selection.all => {
                warn!(error = %e, "kube-sync disabled: no usable Kubernetes configuration");
                None
            }
            Err(e) => return Err(Failure::Start(format!("kube-sync: {e}"))),
        },
        None => None,
    };

    if let (Some(config), Some(listeners)) = (plan.proxy, proxy_listeners) {
        let route_cache = RouteCache::new();
        if let Some(file) = &config.snapshot_file {
            // Before the sync starts: the first load from Redis then replaces it whole.
            dynamicproxy_proxy::snapshot::restore(file, &route_cache);
            tasks.spawn(named(
                "route snapshot",
                dynamicproxy_proxy::snapshot::run_writer(
                    file.clone(),
                    route_cache.clone(),
                    dynamicproxy_proxy::snapshot::MIN_WRITE_INTERVAL,
                    shutdown.child_token(),
                ),
            ));
        }
        tasks.spawn(named(
            "route cache",
            run_cache_sync(CacheSyncConfig::new(plan.redis_read.clone()), route_cache.clone(), shutdown.child_token()),
        ));
        tasks.spawn(named(
            "allocator trim",
            crate::allocator::trim_periodically(route_cache.clone(), shutdown.child_token()),
        ));
        let metrics = Arc::new(dynamicproxy_proxy::Metrics::new(&mut registry));
        let handle = dynamicproxy_proxy::ProxyHandle::new(&config).with_sources(store.clone());
        // The admin API explains with a router built as the proxy builds its own, over the same cache.
        let router = dynamicproxy_proxy::route::Router::from_config(&config, route_cache.clone())
            .map_err(|e| Failure::Start(format!("proxy: {e}")))?;
        explainer =
            Some(dynamicproxy_proxy::explain::Explainer::new(router, Some(store.clone()), Some(handle.clone())));
        let switch = handle.clone();
        maintenance = Some(Arc::new(move |on| switch.set_maintenance(on)));
        let ready_cache = route_cache.clone();
        readiness.push(Arc::new(move || ready_from(&ready_cache)));
        dead = Some(handle.dead_registrations().clone());
        let (prober_config, prober_cache, prober_handle) = (config.clone(), route_cache.clone(), handle.clone());
        let (prober_store, prober_metrics, prober_token) = (store.clone(), metrics.clone(), shutdown.child_token());
        tasks.spawn(async move {
            let result = dynamicproxy_proxy::prober::run(
                &prober_config,
                prober_cache,
                prober_store,
                &prober_handle,
                prober_metrics,
                prober_token.clone(),
            )
            .await;
            // An off prober (probe_idle_secs = 0) returns at once: that is no stopped component.
            if result.is_ok() {
                prober_token.cancelled().await;
            }
            ("prober", result.map_err(|e| e.to_string()))
        });
        if sockets.inherited.is_some() {
            // The predecessor serves from its table meanwhile; taking over with an empty one would answer 404s.
            wait_until(HANDOVER_READY_LIMIT, || route_cache.is_loaded()).await.map_err(|_| {
                Failure::Start(format!(
                    "hand-over given up: route table not loaded from Redis within {HANDOVER_READY_LIMIT:?}; the running process serves on"
                ))
            })?;
        }
        let ended = CancellationToken::new();
        proxy_serving = Some((handle.clone(), ended.clone()));
        let token = shutdown.child_token();
        let proxy_cache = route_cache.clone();
        tasks.spawn(async move {
            let _ended = ended.drop_guard();
            let result = dynamicproxy_proxy::run(config, listeners, proxy_cache, metrics, handle, token).await;
            ("proxy", result.map_err(|e| e.to_string()))
        });
        cache = Some(route_cache);
    }
    if let (Some(config), Some(listener)) = (plan.registrar, registrar_listener) {
        let metrics = Arc::new(dynamicproxy_registrar::Metrics::new(registry.sub_registry_with_prefix("dynamicproxy")));
        let (store, token) = (store.clone(), shutdown.child_token());
        tasks.spawn(async move {
            let result = dynamicproxy_registrar::run(config, listener, store, metrics, token).await;
            ("registrar", result.map_err(|e| e.to_string()))
        });
    }
    if let (Some(config), Some(client)) = (plan.kube_sync, kube_client) {
        let metrics = Arc::new(dynamicproxy_kube_sync::Metrics::new(registry.sub_registry_with_prefix("dynamicproxy")));
        let synced = metrics.clone();
        readiness.push(Arc::new(move || match synced.last_successful_sync() {
            Some(_) => Ok(None),
            None => Err("no successful sync with Kubernetes yet".into()),
        }));
        let (store, token) = (store.clone(), shutdown.child_token());
        tasks.spawn(async move {
            let result = dynamicproxy_kube_sync::run(config, client, store, metrics, token).await;
            ("kube-sync", result.map_err(|e| e.to_string()))
        });
    }

    let guard = AdminGuard::new(plan.admin_token, &mut registry);
    let state = AdminState {
        component,
        registry: Arc::new(registry),
        cache,
        redis: plan.redis.clone(),
        started,
        log,
        maintenance,
        dead,
        ready: Arc::new(move || {
            let mut notes = Vec::new();
            for check in &readiness {
                notes.extend(check()?);
            }
            Ok((!notes.is_empty()).then(|| notes.join("; ")))
        }),
        explainer,
    };
    let admin_shutdown = shutdown.child_token();
    tasks.spawn(async move {
        let result = admin::serve(admin_listener, state, guard, admin_shutdown).await;
        ("admin API", result.map_err(|e| e.to_string()))
    });
    // Serving (or failed, which the loop below reports) before the predecessor or systemd hears of it.
    let serving = match &proxy_serving {
        Some((handle, ended)) => tokio::select! {
            _ = handle.serving() => true,
            _ = ended.cancelled() => false,
        },
        None => true,
    };
    let took_over = sockets.inherited.is_some();
    if let Some(inherited) = sockets.inherited.take() {
        if !serving {
            return Err(Failure::Start("hand-over given up: the proxy stopped before serving".into()));
        }
        // systemd must know this is the main process before the old one can exit, or it would stop the service.
        crate::sd_notify::ready();
        inherited.ready().await.map_err(|e| Failure::Start(e.to_string()))?;
        info!("listeners taken over; the previous process drains");
    }
    let mut successor = None;
    if let Some(path) = &handover_path {
        let listener = handover::listen(path).map_err(|e| Failure::Start(e.to_string()))?;
        let copies = std::mem::take(&mut sockets.copies);
        let (handle, shutdown) = (proxy_serving.as_ref().map(|(h, _)| h.clone()), shutdown.clone());
        tokio::spawn(handover::serve(listener, copies, move || {
            if let Some(handle) = handle {
                handle.handed_over();
            }
            shutdown.cancel();
        }));
        successor = Some(tokio::spawn(handover::spawn_successor_on_sigusr2()));
    }
    if !took_over {
        crate::sd_notify::ready();
    }
    info!(component, redis = %plan.redis, admin = %plan.admin_listen, "dynamicproxy started");

    let hangup = tokio::spawn(hangup);
    let mut failed = false;
    // Until the signal, any component that stops is a failure: stop the others too.
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Ok(()))) if shutdown.is_cancelled() => info!(component = name, "stopped"),
            Ok((name, Ok(()))) => {
                error!(component = name, "stopped unexpectedly; shutting down");
                failed = true;
                shutdown.cancel();
            }
            Ok((name, Err(e))) => {
                error!(component = name, error = %e, "failed; shutting down");
                failed = true;
                shutdown.cancel();
            }
            Err(e) => {
                error!(error = %e, "a component panicked; shutting down");
                failed = true;
                shutdown.cancel();
            }
        }
        if shutdown.is_cancelled() && !tasks.is_empty() {
            if tokio::time::timeout(DRAIN_LIMIT, drain(&mut tasks)).await.is_err() {
                warn!(left = tasks.len(), "components did not stop within {DRAIN_LIMIT:?}; exiting anyway");
            }
            break;
        }
    }
    signal.abort();
    hangup.abort();
    if let Some(successor) = successor {
        successor.abort();
    }
    if failed { Err(Failure::Runtime) } else { Ok(()) }
}

/// The proxy's readiness. Serving a snapshot is ready (200, with a note):
/// the snapshot exists so that a proxy whose Redis is away keeps routing,
/// and the standby host is in no better place (its Redis replicates the
/// same master), so taking this proxy out would turn a degraded table into
/// no table. The note, `/server_info` and `redis_connected` in `/metrics`
/// make the state visible for alerting.
fn ready_from(cache: &RouteCache) -> Result<Option<String>, String> {
    let origin = cache.origin().state();
    if let Some(age) = origin.snapshot_age() {
        return Ok(Some(format!("serving snapshot, age {} s", age.as_secs())));
    }
    if cache.is_loaded() {
        return Ok(None);
    }
    Err(origin.problem.unwrap_or_else(|| "route table not loaded from Redis yet".into()))
}

async fn drain(tasks: &mut JoinSet<(&'static str, Result<(), String>)>) {
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Ok(()))) => info!(component = name, "stopped"),
            Ok((name, Err(e))) => error!(component = name, error = %e, "failed while stopping"),
            Err(e) => error!(error = %e, "a component panicked while stopping"),
        }
    }
}

/// Polls `condition` every 20 ms until it holds, or fails after `limit`.
async fn wait_until(limit: Duration, condition: impl Fn() -> bool) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(limit, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn named(name: &'static str, task: impl std::future::Future<Output = ()>) -> (&'static str, Result<(), String>) {
    task.await;
    (name, Ok(()))
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("dynamicproxy: {error}");
    ExitCode::from(code)
}
