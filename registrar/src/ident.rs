//! The RFC 1413 ident client that tells which Unix user opened a connection.
//!
//! We ask the client host's ident service `<client-port>, <server-port>\r\n`
//! and accept only a reply about exactly that connection:
//! `<client-port> , <server-port> : USERID : <os>[,<charset>] : <user>`.
//!
//! The query leaves from the address the client connected to: ident daemons
//! such as oidentd look the connection up by the querier's address, so on a
//! host with several addresses a query from another one finds no connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// RFC 1413 caps a reply at 1000 characters; a little slack for the line end.
pub const MAX_REPLY_LEN: usize = 1024;

/// Why the ident service did not name a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    /// No TCP connection to the ident port.
    #[error("cannot connect to ident at {addr}: {kind}")]
    Connect {
        /// Where we tried.
        addr: SocketAddr,
        /// The I/O error kind.
        kind: std::io::ErrorKind,
    },
    /// The query could not be sent or the reply not read.
    #[error("ident i/o error: {0}")]
    Io(std::io::ErrorKind),
    /// No complete reply within the timeout.
    #[error("ident did not answer within {0:?}")]
    Timeout(Duration),
    /// The service answered `ERROR : <reason>`.
    #[error("ident answered ERROR: {0}")]
    Error(String),
    /// The reply is not a well-formed RFC 1413 reply.
    #[error("malformed ident reply: {0}")]
    Malformed(&'static str),
    /// The reply is about another connection than the one asked for.
    #[error("ident reply is for ports {got:?}, asked about {asked:?}")]
    PortMismatch {
        /// The ports in the query.
        asked: (u16, u16),
        /// The ports in the reply.
        got: (u16, u16),
    },
}

/// A parsed `USERID` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentReply {
    /// The operating system token (`UNIX`, `OTHER`, ...), charset removed.
    pub os: String,
    /// The user id as sent, surrounding spaces removed.
    pub user: String,
}

/// Asks `peer`'s ident service (on `ident_port`) who owns the connection
/// from `peer` to `local`, within `timeout`.
pub async fn query(
    peer: SocketAddr,
    local: SocketAddr,
    ident_port: u16,
    timeout: Duration,
) -> Result<IdentReply, IdentError> {
    let exchange = async {
        let addr = SocketAddr::new(peer.ip().to_canonical(), ident_port);
        let mut stream = connect_from(local, addr).await.map_err(|e| IdentError::Connect { addr, kind: e.kind() })?;
        let request = format!("{}, {}\r\n", peer.port(), local.port());
        stream.write_all(request.as_bytes()).await.map_err(|e| IdentError::Io(e.kind()))?;
        let reply = read_reply(&mut stream).await?;
        parse_reply(&reply, peer.port(), local.port())
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| IdentError::Timeout(timeout))?
}

/// Connects to `addr` from the IP address of `local` (any port).
async fn connect_from(local: SocketAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let source = SocketAddr::new(local.ip().to_canonical(), 0);
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // With IPv4-mapped addresses made canonical both ends of one connection
    // are of one family; should they ever differ, let the kernel choose.
    if source.is_ipv4() == addr.is_ipv4() {
        socket.bind(source)?;
    }
    socket.connect(addr).await
}

/// Reads one line (or up to EOF), at most [`MAX_REPLY_LEN`] bytes.
async fn read_reply(stream: &mut TcpStream) -> Result<Vec<u8>, IdentError> {
    let mut reply = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| IdentError::Io(e.kind()))?;
        if n == 0 {
            return Ok(reply);
        }
        reply.extend_from_slice(&chunk[..n]);
        if let Some(end) = reply.iter().position(|&b| b == b'\n') {
            reply.truncate(end + 1);
            return Ok(reply);
        }
        if reply.len() > MAX_REPLY_LEN {
            return Err(IdentError::Malformed("reply longer than 1024 bytes"));
        }
    }
}

/// Parses a reply to the query `<client_port>, <server_port>`. Spaces and
/// tabs around fields are allowed, as RFC 1413 says; the line may end in
/// `\r\n`, `\n` or nothing (the service closed the connection).
pub fn parse_reply(reply: &[u8], client_port: u16, server_port: u16) -> Result<IdentReply, IdentError> {
    if reply.len() > MAX_REPLY_LEN {
        return Err(IdentError::Malformed("reply longer than 1024 bytes"));
    }
    let line = reply.strip_suffix(b"\n").unwrap_or(reply);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0) {
        return Err(IdentError::Malformed("control characters in reply"));
    }
    let line = std::str::from_utf8(line).map_err(|_| IdentError::Malformed("reply is not UTF-8"))?;
    let mut fields = line.splitn(3, ':');
    let ports = fields.next().unwrap_or_default();
    let kind = fields.next().ok_or(IdentError::Malformed("missing reply type"))?.trim_matches(SPACE);
    let info = fields.next().ok_or(IdentError::Malformed("missing additional info"))?;

    let (client, server) = ports.split_once(',').ok_or(IdentError::Malformed("missing port pair"))?;
    let got = (parse_port(client)?, parse_port(server)?);
    if got != (client_port, server_port) {
        return Err(IdentError::PortMismatch { asked: (client_port, server_port), got });
    }
    match kind {
        "USERID" => {
            // The user id is everything after the third colon: it may itself contain colons.
            let (os, user) = info.split_once(':').ok_or(IdentError::Malformed("missing user id"))?;
            let os = os.split(',').next().unwrap_or_default().trim_matches(SPACE);
            if os.is_empty() || !os.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(IdentError::Malformed("bad operating system field"));
            }
            let user = user.trim_matches(SPACE);
            if user.is_empty() {
                return Err(IdentError::Malformed("empty user id"));
            }
            Ok(IdentReply { os: os.into(), user: user.into() })
        }
        "ERROR" => {
            let reason = info.trim_matches(SPACE);
            if reason.is_empty() {
                return Err(IdentError::Malformed("empty error reason"));
            }
            Err(IdentError::Error(reason.into()))
        }
        _ => Err(IdentError::Malformed("reply type is neither USERID nor ERROR")),
    }
}

const SPACE: [char; 2] = [' ', '\t'];

fn parse_port(text: &str) -> Result<u16, IdentError> {
    let text = text.trim_matches(SPACE);
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdentError::Malformed("bad port number"));
    }
    text.parse::<u16>().ok().filter(|p| *p != 0).ok_or(IdentError::Malformed("bad port number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(reply: &str) -> Result<String, IdentError> {
        parse_reply(reply.as_bytes(), 46724, 8282).map(|r| r.user)
    }

    #[test]
    fn accepts_spaced_and_unspaced_replies() {
        for reply in [
            "46724,8282:USERID:UNIX:tools.foo\r\n",
            "46724 , 8282 : USERID : UNIX : tools.foo\r\n",
            " 46724,\t8282 :USERID: UNIX :tools.foo \n",
            "46724, 8282 : USERID : UNIX , UTF-8 : tools.foo",
            "46724,8282:USERID:OTHER:tools.foo\r\n",
            "46724,8282:USERID:LINUX:tools.foo\r\n",
        ] {
            assert_eq!(user(reply).as_deref(), Ok("tools.foo"), "{reply:?}");
        }
        assert_eq!(user("46724,8282:USERID:UNIX:a:b\r\n").as_deref(), Ok("a:b"));
    }

    #[test]
    fn refuses_errors_and_garbage() {
        assert_eq!(user("46724, 8282 : ERROR : NO-USER\r\n"), Err(IdentError::Error("NO-USER".into())));
        assert_eq!(
            user("1, 8282 : USERID : UNIX : tools.foo\r\n"),
            Err(IdentError::PortMismatch { asked: (46724, 8282), got: (1, 8282) })
        );
        for bad in [
            "",
            "\r\n",
            "hello world\r\n",
            "46724,8282\r\n",
            "46724,8282:USERID\r\n",
            "46724,8282:USERID:UNIX\r\n",
            "46724,8282:USERID:UNIX:\r\n",
            "46724,8282:USERID::tools.foo\r\n",
            "46724,8282:ERROR:\r\n",
            "46724,8282:WHATEVER:UNIX:tools.foo\r\n",
            "46724:8282:USERID:UNIX:tools.foo\r\n",
            "+46724,8282:USERID:UNIX:tools.foo\r\n",
            "46724,0:USERID:UNIX:tools.foo\r\n",
            "46724,99999:USERID:UNIX:tools.foo\r\n",
            "46724,8282:USERID:UNIX:tools.foo\r\nextra",
            "46724,8282:USERID:UNIX:tools.\0foo\r\n",
        ] {
            assert!(
                matches!(user(bad), Err(IdentError::Malformed(_)) | Err(IdentError::PortMismatch { .. })),
                "{bad:?}"
            );
        }
        assert!(parse_reply(b"46724,8282:USERID:UNIX:\xff\r\n", 46724, 8282).is_err());
        assert!(parse_reply(&[b'1'; 2000], 46724, 8282).is_err());
    }
}
