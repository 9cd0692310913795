//! A fake Kubernetes API server for Services, over real HTTP, speaking the
//! wire format kube's watcher expects: paginated lists with
//! `resourceVersion` and `continue`, `?watch=true` streams of
//! ADDED/MODIFIED/DELETED/BOOKMARK/ERROR events as newline-delimited JSON,
//! `410 Gone` for versions older than the last compaction, and failures on
//! demand (500s, dropped watch connections, the whole server offline).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Page size the server uses when the client asks for none.
const DEFAULT_PAGE: usize = 500;

/// How a watch request for an expired resource version is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneStyle {
    /// `200 OK` with one `ERROR` event carrying a 410 Status (the real API server).
    ErrorEvent,
    /// An HTTP `410 Gone` response to the watch request itself.
    HttpStatus,
}

/// One change, as kept for watches resuming from an older version.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    old: Option<Value>,
    new: Option<Value>,
}

/// What a watch stream carries.
#[derive(Debug, Clone)]
enum Message {
    Change(Change),
    Bookmark(u64),
}

#[derive(Default)]
struct Inner {
    services: BTreeMap<(String, String), Value>,
    rv: u64,
    history: Vec<Change>,
    /// Watches from a version below this get 410.
    compacted: u64,
    /// Every request answers 500 while set.
    failing: bool,
    /// The next N requests answer 500.
    fail_next: usize,
    /// List requests carrying a continue token answer 500 while set.
    fail_continue: bool,
    gone_style: Option<GoneStyle>,
    /// Cancelled to cut every open watch stream.
    watch_cut: CancellationToken,
    /// Unreachable: connections that still get through are cut.
    offline: bool,
    /// Path and query of every request, in order.
    requests: Vec<String>,
    uid: u64,
}

/// A running fake API server. Dropping it stops it.
pub struct FakeApiServer {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Message>,
    server: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

#[derive(Clone)]
struct AppState {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Message>,
}

impl FakeApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub async fn start() -> Self {
        let (events, _) = broadcast::channel(65_536);
        let inner = Arc::new(Mutex::new(Inner { rv: 1, ..Inner::default() }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake api server");
        let addr = listener.local_addr().expect("local addr");
        let server = FakeApiServer { addr, inner, events, server: Mutex::new(None) };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let state = AppState { inner: self.inner.clone(), events: self.events.clone() };
        let app = Router::new()
            .route("/api/v1/services", get(all_services))
            .route("/api/v1/namespaces/{namespace}/services", get(namespaced_services))
            .fallback(|| async { (StatusCode::NOT_FOUND, status_body(404, "NotFound", "not found")) })
            .with_state(state);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stopped.cancelled().await }).await;
        });
        *self.server.lock().unwrap() = Some((stop, task));
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig naming this server, as YAML.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: test-token\n",
            self.url()
        )
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("server url"));
        kube::Client::try_from(config).expect("kube client")
    }

    /// Creates or replaces a Service; returns its new resource version.
    pub fn apply(&self, service: Value) -> u64 {
        let namespace = service["metadata"]["namespace"].as_str().expect("namespace").to_string();
        let name = service["metadata"]["name"].as_str().expect("name").to_string();
        let mut inner = self.lock();
        inner.rv += 1;
        inner.uid += 1;
        let rv = inner.rv;
        let old = inner.services.get(&(namespace.clone(), name.clone())).cloned();
        let mut new = service;
        new["kind"] = json!("Service");
        new["apiVersion"] = json!("v1");
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        let uid =
            old.as_ref().map(|o| o["metadata"]["uid"].clone()).unwrap_or_else(|| json!(format!("uid-{}", inner.uid)));
        new["metadata"]["uid"] = uid;
        new["metadata"]["creationTimestamp"] = json!("2026-11-23T00:00:00Z");
        inner.services.insert((namespace, name), new.clone());
        let change = Change { rv, old, new: Some(new) };
        inner.history.push(change.clone());
        drop(inner);
        let _ = self.events.send(Message::Change(change));
        rv
    }

    /// Deletes a Service; true when it existed.
    pub fn delete(&self, namespace: &str, name: &str) -> bool {
        let mut inner = self.lock();
        let Some(mut old) = inner.services.remove(&(namespace.to_string(), name.to_string())) else { return false };
        inner.rv += 1;
        let rv = inner.rv;
        // The DELETED event carries the object as it was, at the deletion's version.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change { rv, old: Some(old), new: None };
        inner.history.push(change.clone());
        drop(inner);
        let _ = self.events.send(Message::Change(change));
        true
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets history: watches from any version up to now get 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.rv += 1;
        inner.compacted = inner.rv;
        inner.history.clear();
    }

    /// How an expired watch is refused (the real server's way by default).
    pub fn set_gone_style(&self, style: GoneStyle) {
        self.lock().gone_style = Some(style);
    }

    /// Sends a BOOKMARK with the current version to every open watch.
    pub fn bookmark(&self) {
        let rv = self.lock().rv;
        let _ = self.events.send(Message::Bookmark(rv));
    }

    /// Cuts every open watch connection mid-stream (no final chunk).
    pub fn drop_watches(&self) {
        let mut inner = self.lock();
        inner.watch_cut.cancel();
        inner.watch_cut = CancellationToken::new();
    }

    /// While set, every request answers 500 and open watches are cut.
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
        if failing {
            self.drop_watches();
        }
    }

    /// The next `n` requests answer 500.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// While set, list requests for a second or later page answer 500.
    pub fn set_fail_continue(&self, fail: bool) {
        self.lock().fail_continue = fail;
    }

    /// Stops listening and cuts every connection: the API server is unreachable.
    pub async fn go_offline(&self) {
        // Requests on connections still open while the listener closes are
        // cut too, so no watch survives on a half-stopped server.
        self.lock().offline = true;
        self.drop_watches();
        let server = self.server.lock().unwrap().take();
        if let Some((stop, task)) = server {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Listens again on the same address.
    pub async fn go_online(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.lock().offline = false;
                    return self.serve(listener);
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        }
    }

    /// Path and query of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// How many list requests (not watches) for a first page were made.
    pub fn list_count(&self) -> usize {
        self.requests().iter().filter(|r| !r.contains("watch=") && !r.contains("continue=")).count()
    }

    /// How many watch requests were made.
    pub fn watch_count(&self) -> usize {
        self.requests().iter().filter(|r| r.contains("watch=true") || r.contains("watch=1")).count()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.server.lock().unwrap_or_else(|p| p.into_inner()).take() {
            stop.cancel();
        }
        self.lock().watch_cut.cancel();
    }
}

/// A Service in `namespace` labelled `toolforge=tool`, with a cluster IP and ports.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, ports: &[(&str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port_name, port)| {
            let mut p = json!({"port": port, "protocol": "TCP", "targetPort": port});
            if !port_name.is_empty() {
                p["name"] = json!(port_name);
            }
            p
        })
        .collect();
    json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"toolforge": "tool", "name": name}},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports},
        "status": {"loadBalancer": {}}
    })
}

/// `service` with one more label.
pub fn with_label(mut service: Value, key: &str, value: &str) -> Value {
    service["metadata"]["labels"][key] = json!(value);
    service
}

/// `service` without a label.
pub fn without_label(mut service: Value, key: &str) -> Value {
    if let Some(labels) = service["metadata"]["labels"].as_object_mut() {
        labels.remove(key);
    }
    service
}

async fn all_services(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    handle(state, None, query.unwrap_or_default()).await
}

async fn namespaced_services(
    State(state): State<AppState>,
    Path(namespace): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    handle(state, Some(namespace), query.unwrap_or_default()).await
}

async fn handle(state: AppState, namespace: Option<String>, query: String) -> Response {
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let path = match &namespace {
        Some(ns) => format!("/api/v1/namespaces/{ns}/services?{query}"),
        None => format!("/api/v1/services?{query}"),
    };
    {
        let mut inner = state.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.requests.push(path);
        if inner.offline {
            let cut = futures::stream::once(async { Err::<Bytes, _>(std::io::Error::other("unreachable")) });
            return Body::from_stream(cut).into_response();
        }
        if inner.failing {
            return internal_error();
        }
        if inner.fail_next > 0 {
            inner.fail_next -= 1;
            return internal_error();
        }
    }
    let selector = Selector::parse(params.get("labelSelector").map(String::as_str).unwrap_or(""));
    let filter = Filter { namespace, selector };
    if matches!(params.get("watch").map(String::as_str), Some("true" | "1")) {
        watch(state, filter, &params)
    } else {
        list(state, filter, &params)
    }
}

fn list(state: AppState, filter: Filter, params: &HashMap<String, String>) -> Response {
    let inner = state.inner.lock().unwrap_or_else(|p| p.into_inner());
    let limit = params.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(DEFAULT_PAGE);
    let (snapshot_rv, offset) = match params.get("continue") {
        Some(token) => {
            if inner.fail_continue {
                return internal_error();
            }
            let Some((rv, offset)) = token.split_once(':').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            else {
                return (StatusCode::BAD_REQUEST, status_body(400, "BadRequest", "invalid continue token"))
                    .into_response();
            };
            if rv < inner.compacted {
                return (StatusCode::GONE, status_body(410, "Expired", "The provided continue parameter is too old"))
                    .into_response();
            }
            (rv, offset)
        }
        None => (inner.rv, 0usize),
    };
    let matching: Vec<&Value> = inner.services.values().filter(|s| filter.matches(s)).collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|s| {
            // List items carry no kind or apiVersion on the wire.
            let mut item = (*s).clone();
            if let Some(o) = item.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            item
        })
        .collect();
    let next = offset + page.len();
    let mut metadata = json!({"resourceVersion": snapshot_rv.to_string()});
    if next < matching.len() {
        metadata["continue"] = json!(format!("{snapshot_rv}:{next}"));
        metadata["remainingItemCount"] = json!(matching.len() - next);
    }
    let body = json!({"kind": "ServiceList", "apiVersion": "v1", "metadata": metadata, "items": page});
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn watch(state: AppState, filter: Filter, params: &HashMap<String, String>) -> Response {
    let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = params.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1800);
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let inner = state.inner.lock().unwrap_or_else(|p| p.into_inner());
    if from < inner.compacted {
        let message = format!("too old resource version: {from} ({})", inner.compacted);
        return match inner.gone_style.unwrap_or(GoneStyle::ErrorEvent) {
            GoneStyle::HttpStatus => (StatusCode::GONE, status_body(410, "Expired", &message)).into_response(),
            GoneStyle::ErrorEvent => {
                let event = json!({"type": "ERROR", "object": status_json(410, "Expired", &message)});
                ([(header::CONTENT_TYPE, "application/json")], format!("{event}\n")).into_response()
            }
        };
    }
    // Subscribe before reading history, so nothing falls between the two.
    let live = state.events.subscribe();
    let replay: Vec<String> =
        inner.history.iter().filter(|c| c.rv > from).filter_map(|c| filter.event_line(c)).collect();
    let last_replayed = inner.history.last().map(|c| c.rv).unwrap_or(from).max(from);
    let cut = inner.watch_cut.clone();
    drop(inner);

    let live = futures::stream::unfold((live, filter), move |(mut rx, filter)| async move {
        loop {
            match rx.recv().await {
                Ok(Message::Change(change)) if change.rv > last_replayed => {
                    if let Some(line) = filter.event_line(&change) {
                        return Some((Ok::<_, std::io::Error>(Bytes::from(line)), (rx, filter)));
                    }
                }
                Ok(Message::Change(_)) => {}
                Ok(Message::Bookmark(rv)) if bookmarks => {
                    let line = json!({"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1",
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    return Some((Ok(Bytes::from(format!("{line}\n"))), (rx, filter)));
                }
                Ok(Message::Bookmark(_)) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Some((Err(std::io::Error::other("watcher fell behind")), (rx, filter)));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let replay = futures::stream::iter(replay.into_iter().map(|l| Ok(Bytes::from(l))));
    let deadline = tokio::time::sleep(Duration::from_secs(timeout));
    let stream = replay.chain(live).take_until(deadline);
    // Cutting ends the body with an error: hyper aborts the connection
    // without the final chunk, as when a connection drops.
    let body = futures::stream::unfold((Box::pin(stream), cut, false), |(mut stream, cut, done)| async move {
        if done {
            return None;
        }
        tokio::select! {
            // Once cut, not one more event goes out.
            biased;
            _ = cut.cancelled() => Some((Err(std::io::Error::other("connection cut")), (stream, cut, true))),
            item = stream.next() => item.map(|item| (item, (stream, cut, false))),
        }
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(body)).into_response()
}

fn internal_error() -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, status_body(500, "InternalError", "etcdserver: request timed out"))
        .into_response()
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn status_body(code: u16, reason: &str, message: &str) -> ([(header::HeaderName, &'static str); 1], String) {
    ([(header::CONTENT_TYPE, "application/json")], status_json(code, reason, message).to_string())
}

/// Which Services a request sees.
#[derive(Clone)]
struct Filter {
    namespace: Option<String>,
    selector: Selector,
}

impl Filter {
    fn matches(&self, service: &Value) -> bool {
        let in_namespace =
            self.namespace.as_deref().is_none_or(|ns| service["metadata"]["namespace"].as_str() == Some(ns));
        in_namespace && self.selector.matches(&service["metadata"]["labels"])
    }

    /// The watch event a change makes for this filter: an object entering
    /// the selection is ADDED, leaving it DELETED, as the API server does.
    fn event_line(&self, change: &Change) -> Option<String> {
        let before = change.old.as_ref().filter(|o| self.matches(o));
        let after = change.new.as_ref().filter(|n| self.matches(n));
        let (kind, object) = match (before, after) {
            (None, Some(new)) => ("ADDED", new.clone()),
            (Some(_), Some(new)) => ("MODIFIED", new.clone()),
            (Some(old), None) => {
                let mut old = old.clone();
                old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                ("DELETED", old)
            }
            (None, None) => return None,
        };
        Some(format!("{}\n", json!({"type": kind, "object": object})))
    }
}

/// Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`.
#[derive(Clone, Default)]
struct Selector(Vec<(String, Op)>);

#[derive(Clone)]
enum Op {
    Eq(String),
    Ne(String),
    Exists,
    Absent,
}

impl Selector {
    fn parse(s: &str) -> Self {
        let mut reqs = Vec::new();
        for r in s.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            if let Some((k, v)) = r.split_once("!=") {
                reqs.push((k.trim().to_string(), Op::Ne(v.trim().to_string())));
            } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                reqs.push((k.trim().to_string(), Op::Eq(v.trim().to_string())));
            } else if let Some(k) = r.strip_prefix('!') {
                reqs.push((k.trim().to_string(), Op::Absent));
            } else {
                reqs.push((r.to_string(), Op::Exists));
            }
        }
        Selector(reqs)
    }

    fn matches(&self, labels: &Value) -> bool {
        self.0.iter().all(|(k, op)| {
            let value = labels.get(k).and_then(Value::as_str);
            match op {
                Op::Eq(v) => value == Some(v.as_str()),
                Op::Ne(v) => value != Some(v.as_str()),
                Op::Exists => value.is_some(),
                Op::Absent => value.is_none(),
            }
        })
    }
}
