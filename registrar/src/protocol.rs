//! The line protocol of SPEC §5, without I/O: [`decode`] looks at the bytes
//! received so far and says whether a whole request is there.
//!
//! Requests are `register\n<route>\n<destination>\n`,
//! `registerCanonical\n<route>\n<destination>\n` and `unregister\n<route>\n`;
//! a trailing `\r` on a line is ignored. The deployed client's lines end in
//! `\n`, but like the original server (Python's `readline`) a last line cut
//! short by the end of the stream still counts.

/// Longest line accepted, in bytes, newline (and a trailing `\r`) excluded.
pub const MAX_LINE_LEN: usize = 1024;

/// A complete request, its lines not yet validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `register`: set a route.
    Register {
        /// The route pattern line.
        route: String,
        /// The destination line.
        destination: String,
    },
    /// `registerCanonical`: set a route and redirect legacy URLs to the canonical host.
    RegisterCanonical {
        /// The route pattern line.
        route: String,
        /// The destination line.
        destination: String,
    },
    /// `unregister`: remove a route.
    Unregister {
        /// The route pattern line.
        route: String,
    },
    /// Any other first line; answered `fail`.
    Unknown,
}

impl Request {
    /// The command name, for logs and metrics.
    pub fn command(&self) -> Command {
        match self {
            Request::Register { .. } => Command::Register,
            Request::RegisterCanonical { .. } => Command::RegisterCanonical,
            Request::Unregister { .. } => Command::Unregister,
            Request::Unknown => Command::Unknown,
        }
    }
}

/// Which command a request carries, as a label for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `register`.
    Register,
    /// `registerCanonical`.
    RegisterCanonical,
    /// `unregister`.
    Unregister,
    /// Any other first line.
    Unknown,
    /// No command was read (refused before, or the client sent none).
    None,
}

impl Command {
    /// The command a first line names; [`Command::Unknown`] for any other line.
    fn named(line: &str) -> Command {
        match line {
            "register" => Command::Register,
            "registerCanonical" => Command::RegisterCanonical,
            "unregister" => Command::Unregister,
            _ => Command::Unknown,
        }
    }

    /// The name as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Register => "register",
            Command::RegisterCanonical => "registerCanonical",
            Command::Unregister => "unregister",
            Command::Unknown => "unknown",
            Command::None => "none",
        }
    }
}

/// Why the bytes received cannot be a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A line is longer than [`MAX_LINE_LEN`].
    #[error("line longer than 1024 bytes")]
    LineTooLong,
    /// A line is not UTF-8.
    #[error("line is not valid UTF-8")]
    NotUtf8,
    /// The stream ended before this line.
    #[error("missing {0}")]
    Missing(&'static str),
}

/// Looks at everything received so far (`eof`: the client will send no
/// more). `Ok(None)` means a request could still arrive: read more.
/// Bytes after a complete request are ignored.
pub fn decode(buf: &[u8], eof: bool) -> Result<Option<Request>, ProtocolError> {
    let mut lines = Lines { rest: buf, eof };
    let Some(command) = lines.next("command")? else { return Ok(None) };
    let command = Command::named(&command);
    if command == Command::Unknown {
        return Ok(Some(Request::Unknown));
    }
    let Some(route) = lines.next("route")? else { return Ok(None) };
    if command == Command::Unregister {
        return Ok(Some(Request::Unregister { route }));
    }
    let Some(destination) = lines.next("destination")? else { return Ok(None) };
    Ok(Some(if command == Command::Register {
        Request::Register { route, destination }
    } else {
        Request::RegisterCanonical { route, destination }
    }))
}

/// The command named by the first line of what was received so far, once
/// that line is complete; `None` before. Lets a request refused later
/// (malformed, cut short, timed out) still be logged and counted under the
/// command it asked for.
pub fn first_command(buf: &[u8], eof: bool) -> Option<Command> {
    let mut lines = Lines { rest: buf, eof };
    lines.next("command").ok().flatten().map(|line| Command::named(&line))
}

struct Lines<'a> {
    rest: &'a [u8],
    eof: bool,
}

impl Lines<'_> {
    /// The next line, `None` when it is not complete yet.
    fn next(&mut self, what: &'static str) -> Result<Option<String>, ProtocolError> {
        let (line, rest) = match self.rest.iter().position(|&b| b == b'\n') {
            Some(end) => (&self.rest[..end], &self.rest[end + 1..]),
            // Not complete yet, but already too long to ever be: say so now
            // instead of buffering what a client keeps sending.
            None if self.rest.len() > MAX_LINE_LEN + 1 => return Err(ProtocolError::LineTooLong),
            None if !self.eof => return Ok(None),
            None if self.rest.is_empty() => return Err(ProtocolError::Missing(what)),
            None => (self.rest, &self.rest[self.rest.len()..]),
        };
        self.rest = rest;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_LINE_LEN {
            return Err(ProtocolError::LineTooLong);
        }
        String::from_utf8(line.to_vec()).map(Some).map_err(|_| ProtocolError::NotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(route: &str, destination: &str) -> Request {
        Request::Register { route: route.into(), destination: destination.into() }
    }

    #[test]
    fn whole_requests() {
        assert_eq!(decode(b"register\n.*\nhttp://h:1\n", false), Ok(Some(register(".*", "http://h:1"))));
        assert_eq!(decode(b"register\r\n.*\r\nhttp://h:1\r\n", false), Ok(Some(register(".*", "http://h:1"))));
        assert_eq!(
            decode(b"registerCanonical\n/a.*\nhttp://h:1\n", false),
            Ok(Some(Request::RegisterCanonical { route: "/a.*".into(), destination: "http://h:1".into() }))
        );
        assert_eq!(decode(b"unregister\n.*\n", false), Ok(Some(Request::Unregister { route: ".*".into() })));
        assert_eq!(decode(b"unregister\n.*\nextra\n", false), Ok(Some(Request::Unregister { route: ".*".into() })));
        assert_eq!(decode(b"hello\n", false), Ok(Some(Request::Unknown)));
        assert_eq!(decode(b"Register\n.*\nhttp://h:1\n", false), Ok(Some(Request::Unknown)));
        assert_eq!(decode(b"\n", false), Ok(Some(Request::Unknown)));
    }

    #[test]
    fn partial_requests_wait_for_more() {
        let full = b"register\n.*\nhttp://h:1\n";
        for cut in 0..full.len() {
            assert_eq!(decode(&full[..cut], false), Ok(None), "{cut}");
        }
    }

    #[test]
    fn end_of_stream() {
        assert_eq!(decode(b"register\n.*\nhttp://h:1", true), Ok(Some(register(".*", "http://h:1"))));
        assert_eq!(decode(b"", true), Err(ProtocolError::Missing("command")));
        assert_eq!(decode(b"register\n", true), Err(ProtocolError::Missing("route")));
        assert_eq!(decode(b"register\n.*\n", true), Err(ProtocolError::Missing("destination")));
        assert_eq!(decode(b"unregister\n.*", true), Ok(Some(Request::Unregister { route: ".*".into() })));
    }

    #[test]
    fn first_command_once_its_line_is_complete() {
        assert_eq!(first_command(b"", false), None);
        assert_eq!(first_command(b"regis", false), None);
        assert_eq!(first_command(b"register\n", false), Some(Command::Register));
        assert_eq!(first_command(b"registerCanonical\r\n.*", false), Some(Command::RegisterCanonical));
        assert_eq!(first_command(b"unregister", true), Some(Command::Unregister));
        assert_eq!(first_command(b"list\n", false), Some(Command::Unknown));
        assert_eq!(first_command(&[b'r'; MAX_LINE_LEN + 2], false), None);
    }

    #[test]
    fn line_limits() {
        let ok = format!("register\n{}\r\nhttp://h:1\n", "a".repeat(MAX_LINE_LEN));
        assert!(matches!(decode(ok.as_bytes(), false), Ok(Some(Request::Register { .. }))));
        let long = format!("register\n{}\nhttp://h:1\n", "a".repeat(MAX_LINE_LEN + 1));
        assert_eq!(decode(long.as_bytes(), false), Err(ProtocolError::LineTooLong));
        let endless = format!("register\n{}", "a".repeat(MAX_LINE_LEN + 2));
        assert_eq!(decode(endless.as_bytes(), false), Err(ProtocolError::LineTooLong));
        let long_command = "r".repeat(MAX_LINE_LEN + 2);
        assert_eq!(decode(long_command.as_bytes(), false), Err(ProtocolError::LineTooLong));
        assert_eq!(decode(b"register\n\xff\nhttp://h:1\n", false), Err(ProtocolError::NotUtf8));
    }
}
