//! Hand-over of the listening sockets from a running proxy to its successor
//! (a restart, or an upgrade to a binary at another path), over a unix
//! socket (`[proxy] handover_socket`) with `SCM_RIGHTS`, as pingora does.
//!
//! # Why fd passing
//!
//! The requirement is that a replacement refuses and resets nothing. The
//! kernel queues connections on a listening socket until someone accepts
//! them, so the socket itself must never close while it has a backlog:
//!
//! - `SO_REUSEPORT` gives the new process a *second* socket: the kernel
//!   spreads new connections over both, and when the old process closes its
//!   socket the connections queued on it are reset.
//! - systemd socket activation keeps the socket open across a stop and a
//!   start, but `systemctl restart` starts the new process only after the old
//!   one has drained: for up to `shutdown_grace_secs` nobody accepts, and
//!   clients time out in the backlog.
//! - Passing the descriptors hands over the *same* sockets: both processes
//!   accept on them for a moment, the old one then stops accepting (its
//!   copies close, the sockets do not), and its queued connections are the new
//!   one's. The old process drains in parallel, so nothing waits.
//!
//! # Protocol (one connection, one hand-over)
//!
//! ```text
//! new → old  "HANDOVER 1\n"
//! old → new  the listeners' names, one a line, then an empty line; the descriptors ride along (SCM_RIGHTS)
//! new → old  "READY\n" once it serves with a loaded route table
//! ```
//!
//! On `READY` the old process stops accepting and drains; if the new one
//! goes away before saying it, the old one carries on as if nothing happened.
//! Only a peer running as the same user (or root) is answered: whoever gets
//! the descriptors gets the ports.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use tokio::net::UnixListener;
use tracing::{info, warn};

/// The request line; the number changes if the protocol does.
const HELLO: &str = "HANDOVER 1";
/// The successor's confirmation that it serves.
const READY: &str = "READY";
/// Most listeners one process has (proxy http, https, list, admin, registrar), with room to spare.
const MAX_FDS: usize = 16;
/// Longest wait for each step of the exchange itself (not for the successor's readiness).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the old process waits for `READY`: the successor loads its route
/// table from Redis and its certificates first (see `daemons::HANDOVER_READY_LIMIT`).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a hand-over could not be done.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The unix socket could not be used.
    #[error("hand-over socket {path}: {source}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The other side said something unexpected or went away.
    #[error("hand-over with the running process failed: {0}")]
    Protocol(&'static str),
    /// Sending or receiving failed.
    #[error("hand-over with the running process failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Listening sockets received from the running process, waiting to be
/// claimed by name; the connection stays open to say `READY` later.
pub struct Inherited {
    listeners: HashMap<String, OwnedFd>,
    peer: UnixStream,
}

impl Inherited {
    /// The inherited listener `name`, if the old process had one on the same
    /// address (`addr`'s port 0 matches any port). A listener on another
    /// address is closed: the configuration moved it.
    pub fn claim(&mut self, name: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self.listeners.remove(name)?;
        let listener = std::net::TcpListener::from(fd);
        match listener.local_addr() {
            Ok(local) if local.ip() == addr.ip() && (addr.port() == 0 || local.port() == addr.port()) => Some(listener),
            Ok(local) => {
                warn!(listener = name, inherited = %local, configured = %addr, "inherited listener is on another address; closing it");
                None
            }
            Err(error) => {
                warn!(listener = name, %error, "inherited descriptor is not a listening socket; closing it");
                None
            }
        }
    }

    /// Tells the old process that this one serves, so it stops accepting and
    /// drains. Listeners never claimed are closed here.
    pub async fn ready(self) -> Result<(), HandoverError> {
        let Inherited { listeners, mut peer } = self;
        for name in listeners.keys() {
            info!(listener = %name, "inherited listener not configured any more; closing it");
        }
        drop(listeners);
        tokio::task::spawn_blocking(move || peer.write_all(format!("{READY}\n").as_bytes()))
            .await
            .map_err(|_| HandoverError::Protocol("the sending thread panicked"))??;
        Ok(())
    }
}

/// Asks the process serving `path` for its listeners. `None` when no process
/// answers there (first start, or a file left by a process that died).
pub async fn take(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || take_blocking(&path))
        .await
        .map_err(|_| HandoverError::Protocol("the receiving thread panicked"))?
}

fn take_blocking(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let mut peer = match UnixStream::connect(path) {
        Ok(peer) => peer,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None);
        }
        Err(source) => return Err(HandoverError::Socket { path: path.to_path_buf(), source }),
    };
    peer.set_read_timeout(Some(STEP_TIMEOUT))?;
    peer.set_write_timeout(Some(STEP_TIMEOUT))?;
    peer.write_all(format!("{HELLO}\n").as_bytes())?;

    let mut fds = Vec::new();
    let mut text = Vec::new();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    while !text.ends_with(b"\n\n") {
        let mut buf = [0u8; 4096];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received =
            rustix::net::recvmsg(&peer, &mut [IoSliceMut::new(&mut buf)], &mut control, RecvFlags::CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if received.bytes == 0 {
            return Err(HandoverError::Protocol("the running process closed the connection"));
        }
        text.extend_from_slice(&buf[..received.bytes]);
        if text.len() > 64 * 1024 {
            return Err(HandoverError::Protocol("answer too long"));
        }
    }
    let text = String::from_utf8(text).map_err(|_| HandoverError::Protocol("answer is not UTF-8"))?;
    let names: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    if names.len() != fds.len() {
        return Err(HandoverError::Protocol("names and descriptors do not match"));
    }
    peer.set_read_timeout(None)?;
    let listeners = names.into_iter().map(str::to_owned).zip(fds).collect();
    Ok(Some(Inherited { listeners, peer }))
}

/// Listens on `path` for a successor, replacing whatever file is there
/// (bound under a temporary name and renamed, so the path always leads to a
/// process that answers).
pub fn listen(path: &Path) -> Result<UnixListener, HandoverError> {
    let socket_error = |source| HandoverError::Socket { path: path.to_path_buf(), source };
    let temporary = path.with_extension(format!("{}.new", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary).map_err(socket_error)?;
    std::fs::rename(&temporary, path).map_err(socket_error)?;
    Ok(listener)
}

/// Serves hand-over requests on `listener` until one succeeds, then calls
/// `handed_over` (the caller drains) and returns. `listeners` are copies of
/// the process's listening sockets, by name. Failed attempts are logged and
/// the process serves on; this never ends the process by itself.
pub async fn serve(listener: UnixListener, listeners: Vec<(String, OwnedFd)>, handed_over: impl FnOnce()) {
    let listeners = std::sync::Arc::new(listeners);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "hand-over socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let copies = listeners.clone();
        let outcome = match stream.into_std() {
            Ok(stream) => tokio::task::spawn_blocking(move || give(stream, &copies))
                .await
                .unwrap_or(Err(HandoverError::Protocol("the sending thread panicked"))),
            Err(error) => Err(HandoverError::Io(error)),
        };
        match outcome {
            Ok(pid) => {
                // Draining first, then the log line: whoever reads it may rely on the drain having begun.
                handed_over();
                info!(successor.pid = pid, "listeners handed over; draining");
                return;
            }
            Err(error) => warn!(%error, "hand-over not completed; serving on"),
        }
    }
}

/// One hand-over, seen from the old process: returns the successor's pid
/// once it said `READY`.
fn give(stream: UnixStream, listeners: &[(String, OwnedFd)]) -> Result<i32, HandoverError> {
    stream.set_nonblocking(false)?;
    let credentials = rustix::net::sockopt::socket_peercred(&stream).map_err(std::io::Error::from)?;
    let me = rustix::process::getuid();
    if credentials.uid != me && !credentials.uid.is_root() {
        return Err(HandoverError::Protocol("refused: the peer runs as another user"));
    }
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim_end() != HELLO {
        return Err(HandoverError::Protocol("unknown request"));
    }

    let mut text = String::new();
    for (name, _) in listeners {
        text.push_str(name);
        text.push('\n');
    }
    text.push('\n');
    let fds: Vec<_> = listeners.iter().map(|(_, fd)| std::os::fd::AsFd::as_fd(fd)).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(HandoverError::Protocol("too many listeners"));
    }
    let sent = rustix::net::sendmsg(&stream, &[IoSlice::new(text.as_bytes())], &mut control, SendFlags::empty())
        .map_err(std::io::Error::from)?;
    // The descriptors went with the first byte; the rest of the names may follow plainly.
    (&stream).write_all(&text.as_bytes()[sent..])?;

    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    line.clear();
    reader.read_line(&mut line)?;
    if line.trim_end() != READY {
        return Err(HandoverError::Protocol("the successor went away before it was ready"));
    }
    Ok(credentials.pid.as_raw_nonzero().get())
}

/// On SIGUSR2, starts a successor: the binary at the path this process was
/// started from (after a package upgrade, the new one) with the same
/// arguments. It takes the listeners over through `handover_socket`; under
/// systemd it tells the service manager it is the main process now.
pub async fn spawn_successor_on_sigusr2() {
    let Ok(mut usr2) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) else { return };
    while usr2.recv().await.is_some() {
        let mut args = std::env::args_os();
        let Some(program) = args.next() else { continue };
        match std::process::Command::new(&program).args(args).stdin(std::process::Stdio::null()).spawn() {
            Ok(mut child) => {
                info!(successor.pid = child.id(), program = %Path::new(&program).display(), "SIGUSR2: successor started");
                // Reaped here, so a successor that gives up does not stay a zombie.
                std::thread::spawn(move || match child.wait() {
                    Ok(status) if !status.success() => warn!(%status, "successor exited; still serving"),
                    _ => {}
                });
            }
            Err(error) => warn!(%error, "SIGUSR2: cannot start a successor"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn listeners_travel_by_name_and_the_old_side_waits_for_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let server = listen(&path).unwrap();
        let handed_over = CancellationToken::new();
        let copies = vec![("http".to_string(), OwnedFd::from(tcp))];
        let token = handed_over.clone();
        let old = tokio::spawn(serve(server, copies, move || token.cancel()));

        let mut inherited = take(&path).await.unwrap().expect("a process answers");
        assert!(inherited.claim("https", addr).is_none());
        let listener = inherited.claim("http", addr).expect("http listener inherited");
        assert_eq!(listener.local_addr().unwrap(), addr);
        assert!(!handed_over.is_cancelled());
        inherited.ready().await.unwrap();
        old.await.unwrap();
        assert!(handed_over.is_cancelled());

        // The old side has stopped answering; a later start finds nobody there.
        drop(std::fs::remove_file(&path));
        assert!(take(&path).await.unwrap().is_none());
    }
}
