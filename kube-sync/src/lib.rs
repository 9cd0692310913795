//! kube-sync: keeps the route table in step with Kubernetes Services
//! (SPEC §6), replacing kube2proxy.py.
//!
//! # Layout
//!
//! - [`config`]: the `[kube_sync]` section and its flags.
//! - [`client`]: the Kubernetes client from `--kubeconfig`, in-cluster or `$KUBECONFIG`.
//! - [`service`]: how a Service becomes a route (pure rules).
//! - `state`: the desired routes and the work owed to Redis.
//! - `watch`: kube's watcher feeding the desired state.
//! - `apply`: writing the desired state to Redis, retrying while it is down.
//! - `backoff`: retry delays with jitter.
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: the crate's [`Error`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod apply;
mod backoff;
pub mod client;
pub mod config;
pub mod error;
pub mod metrics;
pub mod service;
mod state;
mod watch;

use std::sync::{Arc, Mutex};

use dynamicproxy_redis::RouteStore;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

pub use client::client_from_config;
pub use config::{Config, ConfigError, Flags};
pub use error::Error;
pub use metrics::Metrics;

/// Runs kube-sync until `shutdown` is cancelled: lists then watches the
/// Services selected by `config`, and keeps their routes in `store`. Neither
/// the API server nor Redis being down makes it return; after `shutdown` it
/// writes what is still pending for a few seconds and returns.
pub async fn run(
    config: Config,
    client: kube::Client,
    store: Arc<RouteStore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let span = info_span!(
        "kube_sync",
        namespace = config.namespace.as_deref().unwrap_or("(all)"),
        selector = %config.label_selector
    );
    let api: Api<Service> = match &config.namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    };
    let state = Arc::new(Mutex::new(state::SyncState::default()));
    let notify = Arc::new(Notify::new());
    let watch = watch::ServiceWatch {
        api,
        namespace: config.namespace.clone(),
        label_selector: config.label_selector.clone(),
        tool_namespace_prefix: config.tool_namespace_prefix.clone(),
        state: state.clone(),
        notify: notify.clone(),
        metrics: metrics.clone(),
    };
    let applier = apply::Applier::new(store, state, notify, metrics, config.namespace.clone());

    let mut tasks = JoinSet::new();
    tasks.spawn(watch.run(shutdown.clone()).instrument(span.clone()));
    tasks.spawn(applier.run(shutdown.clone()).instrument(span.clone()));
    span.in_scope(|| info!("watching Services"));
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            // A task only ends early by panicking: stop the other and say so.
            shutdown.cancel();
            return Err(Error::Task(e));
        }
    }
    Ok(())
}
