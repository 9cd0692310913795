//! The one place that turns SIGTERM / SIGINT into a cancelled token. (A
//! hand-over to a successor cancels the same token: see `handover`, which also
//! owns SIGUSR2.)

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Waits for SIGTERM or SIGINT, then cancels `token`. Every daemon's `run`
/// holds a child of `token` and drains when it fires.
pub async fn shutdown_signal(token: CancellationToken) {
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "cannot install signal handlers; only the process manager's SIGKILL will stop this process");
            return std::future::pending().await;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down: draining connections");
    token.cancel();
}

/// Keeps SIGHUP from killing the process (its default action): operators
/// send it to reload certificates, which the proxy handles itself when TLS
/// is configured; otherwise there is nothing to reload and it is only logged.
///
/// The handler is registered when this is called, not when the returned
/// future first runs: a SIGHUP that arrives once the proxy serves, before a
/// spawned task got its turn, would otherwise still kill the process.
pub fn ignore_hangup() -> impl std::future::Future<Output = ()> {
    let hup = signal(SignalKind::hangup());
    async move {
        let Ok(mut hup) = hup else { return };
        while hup.recv().await.is_some() {
            info!("SIGHUP received");
        }
    }
}
