//! One registration exchange, start to end:
//!
//! ```text
//! accept ─► client check ─► ident ─► prefix check ─► read request ─► validate
//!                           └────────── within exchange_timeout ─────────┘
//!   ─► destination check (may resolve) ─► capped write to Redis ─► reply ─► close
//! ```
//!
//! The client check (`allowed_clients`) runs in the accept loop, so a
//! refused client never holds a connection slot nor causes an ident query.
//!
//! The Redis write is not cut by the exchange deadline (the route store has
//! its own timeouts): cancelling it midway could leave a write that landed
//! while the client was told `fail`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dynamicproxy_redis::types::TOOL_REGEX_DFA_LIMIT;
use dynamicproxy_redis::{
    BackendUrl, RoutePattern, RouteSource, RouteStore, RouteTableError, ToolName, regex_routes_fit,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::allow::AllowList;
use crate::config::Config;
use crate::destination::{DeniedDestinations, Verdict};
use crate::ident;
use crate::metrics::{Metrics, Outcome};
use crate::protocol::{self, Command, MAX_LINE_LEN, ProtocolError, Request};

/// Refusal when ident gives no usable answer (SPEC §5, byte for byte).
pub const AUTH_FAILED: &str = "Identd authentication failed. Please contact an administrator";
/// Refusal for users outside the project prefix (SPEC §5, byte for byte).
pub const NOT_TOOL: &str = "This service available only to tool accounts";
/// Answer when a write could not reach Redis: never `ok` for a write that did not happen.
pub const UNAVAILABLE: &str = "fail: route table unavailable";
/// Answer to connections above `max_connections`.
pub const BUSY: &str = "fail: busy";
/// Answer to a client outside `allowed_clients` (SPEC §5, byte for byte).
pub const CLIENT_NOT_ALLOWED: &str = "fail: client not allowed";
/// Answer to a destination outside the allow-list or in a denied network (SPEC §5).
pub const DESTINATION_NOT_ALLOWED: &str = "fail: destination not allowed";
/// Answer to a registration beyond `max_routes_per_tool` (SPEC §5).
pub const TOO_MANY_ROUTES: &str = "fail: too many routes";

/// How long writing a reply may take; replies are a few bytes.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// After replying, how long to read and discard what the client still sends,
/// so closing does not reset the connection before the client read the reply.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
/// At most this much is discarded while lingering.
const LINGER_MAX_BYTES: usize = 64 * 1024;

/// What every connection needs, built once by [`crate::server::run`].
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) allow: AllowList,
    pub(crate) denied: DeniedDestinations,
    pub(crate) store: Arc<RouteStore>,
    pub(crate) metrics: Arc<Metrics>,
}

/// What the log line says about an exchange; filled in as it goes.
#[derive(Default)]
struct Exchange {
    tool: Option<String>,
    command: Option<Command>,
    route: Option<String>,
    destination: Option<String>,
    reason: Option<String>,
}

/// How an exchange ended: the metric label and the bytes to send.
struct Answer {
    outcome: Outcome,
    reply: Cow<'static, str>,
    /// The cause, for the log only, when the reply does not say it.
    detail: Option<String>,
}

impl Answer {
    fn new(outcome: Outcome, reply: impl Into<Cow<'static, str>>) -> Self {
        Answer { outcome, reply: reply.into(), detail: None }
    }

    fn invalid(reason: impl std::fmt::Display) -> Self {
        Answer::new(Outcome::Invalid, format!("fail: {reason}"))
    }
}

/// Serves one accepted connection to its end; never fails, only answers.
pub(crate) async fn serve(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let deadline = Instant::now() + shared.config.exchange_timeout;
    let mut exchange = Exchange::default();
    let answer = match stream.local_addr() {
        Ok(local) => handle(&mut stream, peer, local, &shared, deadline, &mut exchange).await,
        Err(e) => {
            exchange.reason = Some(format!("cannot read the connection's local address: {e}"));
            Answer::new(Outcome::AuthFailed, AUTH_FAILED)
        }
    };
    let command = exchange.command.unwrap_or(Command::None);
    shared.metrics.record(command, answer.outcome);
    let (tool, route, destination, reason) = (
        exchange.tool.as_deref().unwrap_or("-"),
        exchange.route.as_deref().unwrap_or("-"),
        exchange.destination.as_deref().unwrap_or("-"),
        exchange.reason.as_deref().unwrap_or("-"),
    );
    match answer.outcome {
        Outcome::Unavailable | Outcome::StoreError => tracing::error!(
            client = %peer,
            tool,
            command = command.as_str(),
            route,
            destination,
            result = answer.outcome.as_str(),
            error = reason,
            "registration failed"
        ),
        Outcome::NotAllowed | Outcome::DeniedDestination | Outcome::TooManyRoutes => tracing::warn!(
            client = %peer,
            tool,
            command = command.as_str(),
            route,
            destination,
            result = answer.outcome.as_str(),
            reason,
            "registration refused"
        ),
        _ => tracing::info!(
            client = %peer,
            tool,
            command = command.as_str(),
            route,
            destination,
            result = answer.outcome.as_str(),
            reason,
            "registration request"
        ),
    }
    // Counted and logged before replying: whoever reads the reply sees the metric.
    finish(&mut stream, &answer.reply).await;
}

/// Answers a connection refused for lack of capacity.
pub(crate) async fn refuse_busy(mut stream: TcpStream, peer: SocketAddr, metrics: &Metrics) {
    metrics.record(Command::None, Outcome::Busy);
    tracing::warn!(client = %peer, result = Outcome::Busy.as_str(), "too many connections, refused");
    finish(&mut stream, BUSY).await;
}

/// Answers a client outside `allowed_clients`, before anything else
/// (no ident query, no request read).
pub(crate) async fn refuse_client(mut stream: TcpStream, peer: SocketAddr, metrics: &Metrics) {
    metrics.record(Command::None, Outcome::ClientNotAllowed);
    tracing::warn!(
        client = %peer,
        tool = "-",
        command = Command::None.as_str(),
        route = "-",
        destination = "-",
        result = Outcome::ClientNotAllowed.as_str(),
        reason = "client address outside [registrar] allowed_clients",
        "registration refused"
    );
    finish(&mut stream, CLIENT_NOT_ALLOWED).await;
}

async fn handle(
    stream: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    shared: &Shared,
    deadline: Instant,
    exchange: &mut Exchange,
) -> Answer {
    let request = tokio::time::timeout_at(deadline, authenticate_and_read(stream, peer, local, shared, exchange)).await;
    let (tool, source, request) = match request {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(refusal)) => return refusal,
        Err(_) => {
            exchange.reason = Some(format!("exchange not finished within {:?}", shared.config.exchange_timeout));
            return Answer::new(Outcome::Timeout, "fail: timeout");
        }
    };
    exchange.command = Some(request.command());
    match &request {
        Request::Register { route, destination } | Request::RegisterCanonical { route, destination } => {
            exchange.route = Some(route.clone());
            exchange.destination = Some(destination.clone());
        }
        Request::Unregister { route } => exchange.route = Some(route.clone()),
        Request::Unknown => {}
    }
    let (Ok(answer) | Err(answer)) = execute(&tool, &source, request, shared).await;
    if answer.outcome != Outcome::Ok {
        exchange.reason = Some(answer.detail.clone().unwrap_or_else(|| answer.reply.to_string()));
    }
    answer
}

/// Ident, the prefix check, and the request lines; the tool, and the writer
/// its routes are recorded under (the ident user and the client address).
/// `Err` is the refusal to send.
async fn authenticate_and_read(
    stream: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    shared: &Shared,
    exchange: &mut Exchange,
) -> Result<(ToolName, RouteSource, Request), Answer> {
    let config = &shared.config;
    let user = match ident::query(peer, local, config.ident_port, config.ident_timeout).await {
        Ok(reply) => reply.user,
        Err(e) => {
            exchange.reason = Some(e.to_string());
            return Err(Answer::new(Outcome::AuthFailed, AUTH_FAILED));
        }
    };
    let Some(name) = user.strip_prefix(config.project_prefix.as_str()) else {
        exchange.reason = Some(format!("user {user:?} is not a tool account"));
        return Err(Answer::new(Outcome::NotTool, NOT_TOOL));
    };
    exchange.tool = Some(name.to_string());
    let tool = ToolName::parse(name).map_err(|e| invalid_logged(e, exchange))?;
    let request = read_request(stream, &mut exchange.command).await.map_err(|e| invalid_logged(e, exchange))?;
    Ok((tool, RouteSource::registrar(peer, &user), request))
}

fn invalid_logged(reason: impl std::fmt::Display, exchange: &mut Exchange) -> Answer {
    let answer = Answer::invalid(reason);
    exchange.reason = Some(answer.reply.to_string());
    answer
}

/// Reads until [`protocol::decode`] has a whole request; the buffer never
/// grows past three maximal lines plus one read. `command` is set as soon as
/// the first line is in, so a refusal or a timeout is logged under it.
async fn read_request(stream: &mut TcpStream, command: &mut Option<Command>) -> Result<Request, ProtocolError> {
    let mut buf = Vec::with_capacity(256);
    loop {
        let mut chunk = [0u8; 1024];
        // A reset client is gone: treat it as the end of what it sent.
        let n = stream.read(&mut chunk).await.unwrap_or_default();
        buf.extend_from_slice(&chunk[..n]);
        if command.is_none() {
            *command = protocol::first_command(&buf, n == 0);
        }
        if let Some(request) = protocol::decode(&buf, n == 0)? {
            return Ok(request);
        }
        debug_assert!(buf.len() <= 3 * (MAX_LINE_LEN + 2) + chunk.len());
    }
}

/// Validates the request and writes it. `Err` carries the refusal.
async fn execute(tool: &ToolName, source: &RouteSource, request: Request, shared: &Shared) -> Result<Answer, Answer> {
    let store = &shared.store;
    let (route, destination, canonical) = match request {
        Request::Unknown => return Err(Answer::new(Outcome::UnknownCommand, "fail")),
        Request::Unregister { route } => {
            // Not compiled: a legacy pattern this regex engine refuses must
            // still be removable by its owner.
            if route.is_empty() {
                return Err(Answer::invalid("empty route"));
            }
            return store.delete_route(tool, &route, source).await.map(|_removed| ok()).map_err(store_failure);
        }
        Request::Register { route, destination } => (route, destination, false),
        Request::RegisterCanonical { route, destination } => (route, destination, true),
    };
    let (pattern, backend) = validate(&route, &destination, &shared.allow)?;
    check_destination(&backend, &shared.denied).await?;
    if pattern.is_regex() {
        check_regex_budget(store, tool, &pattern).await?;
    }
    let canonical_host = canonical.then(|| format!("{tool}.{}", shared.config.canonical_domain));
    let max = shared.config.max_routes_per_tool;
    match store.set_route_capped(tool, &pattern, &backend, canonical_host.as_deref(), max, source).await {
        Ok(true) => Ok(ok()),
        Ok(false) => Err(Answer {
            outcome: Outcome::TooManyRoutes,
            reply: TOO_MANY_ROUTES.into(),
            detail: Some(format!("the tool already has {max} routes ([registrar] max_routes_per_tool)")),
        }),
        Err(e) => Err(store_failure(e)),
    }
}

fn ok() -> Answer {
    Answer::new(Outcome::Ok, "ok")
}

fn validate(route: &str, destination: &str, allow: &AllowList) -> Result<(RoutePattern, BackendUrl), Answer> {
    if route.is_empty() {
        return Err(Answer::invalid("empty route"));
    }
    let pattern = RoutePattern::parse(route).map_err(Answer::invalid)?;
    let backend = BackendUrl::parse_strict(destination).map_err(Answer::invalid)?;
    if !allow.allows(backend.host()) {
        return Err(Answer::new(Outcome::NotAllowed, DESTINATION_NOT_ALLOWED));
    }
    Ok((pattern, backend))
}

/// Refuses a destination in `denied_destination_networks`; the log says
/// which address and network, the client only that it is not allowed.
async fn check_destination(backend: &BackendUrl, denied: &DeniedDestinations) -> Result<(), Answer> {
    match denied.check(backend).await {
        Verdict::Allowed => Ok(()),
        Verdict::Denied { address, network } => Err(Answer {
            outcome: Outcome::DeniedDestination,
            reply: DESTINATION_NOT_ALLOWED.into(),
            detail: Some(format!(
                "{} ({address}) is in denied network {network} ([registrar] denied_destination_networks)",
                backend.host()
            )),
        }),
        Verdict::Unresolved(why) => {
            tracing::warn!(
                destination = %backend,
                error = why,
                "destination name not resolved; accepted, the proxy checks its addresses when it connects"
            );
            Ok(())
        }
    }
}

/// Refuses a regex route that would make the proxy drop one of the tool's
/// regex routes: together they must share one DFA within
/// `TOOL_REGEX_DFA_LIMIT` (each alone was checked when parsed). Answered
/// `fail: too many routes`, SPEC §5's answer for a tool that has too much
/// already. Not atomic with the write: two racing registrations may both
/// pass, and the loader then keeps the first in match order, as it would
/// for routes written by any other means.
async fn check_regex_budget(store: &RouteStore, tool: &ToolName, pattern: &RoutePattern) -> Result<(), Answer> {
    let entry = store.tool(tool).await.map_err(store_failure)?;
    // Patterns the proxy refuses are not loaded, so they take no room.
    let mut patterns: Vec<RoutePattern> = entry
        .routes
        .keys()
        .filter(|existing| existing.as_str() != pattern.as_str())
        .filter_map(|existing| RoutePattern::parse(existing).ok())
        .collect();
    patterns.push(pattern.clone());
    if regex_routes_fit(patterns) {
        return Ok(());
    }
    Err(Answer {
        outcome: Outcome::TooManyRoutes,
        reply: TOO_MANY_ROUTES.into(),
        detail: Some(format!(
            "the tool's regex routes together would need a DFA over {} KiB (TOOL_REGEX_DFA_LIMIT)",
            TOOL_REGEX_DFA_LIMIT >> 10
        )),
    })
}

fn store_failure(e: RouteTableError) -> Answer {
    let (outcome, reply) = if e.is_unavailable() {
        (Outcome::Unavailable, UNAVAILABLE)
    } else {
        (Outcome::StoreError, "fail: route table error")
    };
    Answer { outcome, reply: reply.into(), detail: Some(e.to_string()) }
}

/// Sends the reply, then closes without resetting: half-close, and read
/// what the client still sends for a moment.
async fn finish(stream: &mut TcpStream, reply: &str) {
    let sent = tokio::time::timeout(REPLY_TIMEOUT, async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIMEOUT, async {
        let mut discarded = 0;
        let mut scratch = [0u8; 4096];
        while discarded < LINGER_MAX_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}
