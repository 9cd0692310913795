//! Tells systemd (`Type=notify`) that the process serves, and which process
//! is the service's main one: after a hand-over the successor, started by
//! the old process, says `MAINPID=` so systemd follows it instead of
//! treating the old process's exit as the service's end.

use std::os::unix::net::UnixDatagram;

/// Sends `READY=1` and `MAINPID=<this process>` to `$NOTIFY_SOCKET`, if
/// systemd set one; does nothing otherwise. Failures are logged only: the
/// process serves either way.
pub fn ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    if let Err(error) = send(&socket, message.as_bytes()) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

fn send(socket: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<usize> {
    let datagram = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(socket);
    match bytes.strip_prefix(b"@") {
        // An abstract socket (systemd's own are in the file system, but the protocol allows both).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(message, &addr)
        }
        None => datagram.send_to(message, socket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_ready_and_main_pid_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
