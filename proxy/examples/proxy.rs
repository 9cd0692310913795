//! A stand-alone proxy with the same flags as `dynamicproxy proxy`, for
//! benchmarks and manual runs until the main binary wires the crate:
//! `proxy --http-listen 127.0.0.1:8080 --redis-url redis://127.0.0.1:6379/0 --default-backend http://127.0.0.1:9000`.

use std::sync::Arc;

use clap::Parser;
use dynamicproxy_proxy::{Config, Flags, Listeners, Metrics, ProxyHandle};
use dynamicproxy_redis::{CacheSyncConfig, RouteCache, run_cache_sync};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Redis holding the route table.
    #[arg(long = "redis-url", default_value = "redis://127.0.0.1:6379/0")]
    redis_url: String,
    #[command(flatten)]
    flags: Flags,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())).init();
    let args = Args::parse();
    // Flags are serialised with the key names of the TOML section; unset ones fall back to defaults.
    let config: Config = serde_json::from_value(serde_json::to_value(&args.flags)?)?;
    config.validate()?;
    let listeners = Listeners {
        http: TcpListener::bind(config.http_listen).await?,
        https: if config.tls_enabled() { Some(TcpListener::bind(config.https_listen).await?) } else { None },
        list: TcpListener::bind(config.list_listen).await?,
    };
    let cache = RouteCache::new();
    let stop_sync = CancellationToken::new();
    tokio::spawn(run_cache_sync(CacheSyncConfig::new(args.redis_url.parse()?), cache.clone(), stop_sync.clone()));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        signal.cancel();
    });
    let handle = ProxyHandle::new(&config);
    dynamicproxy_proxy::run(config, listeners, cache, metrics, handle, shutdown).await?;
    stop_sync.cancel();
    Ok(())
}
