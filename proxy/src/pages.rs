//! The proxy's own pages (errors, `favicon.ico`, `robots.txt`): built-in
//! defaults, each replaceable by a file in `--error-pages DIR`.

use std::path::Path;

use bytes::Bytes;

use crate::error::Error;

/// One of the proxy's own pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Client address is banned (403).
    Banned,
    /// Client exceeded the rate limit (429).
    RateLimit,
    /// Maintenance mode (503).
    TechnicalIssues,
    /// No route and no default backend (503).
    NoWebservice,
    /// Backend refused or broke the connection (502).
    Unreachable,
    /// Backend too slow (504).
    Timeout,
    /// Backend address in `denied_backend_networks` (502).
    DeniedBackend,
    /// The tool has its whole share of requests in flight (503).
    OverCapacity,
    /// The backend is marked down after repeated failures (502).
    BackendDown,
    /// Served when the backend has no `/favicon.ico`.
    Favicon,
    /// Served when the backend has no `/robots.txt`.
    Robots,
}

impl Page {
    const ALL: [Page; 11] = [
        Page::Banned,
        Page::RateLimit,
        Page::TechnicalIssues,
        Page::NoWebservice,
        Page::Unreachable,
        Page::Timeout,
        Page::DeniedBackend,
        Page::OverCapacity,
        Page::BackendDown,
        Page::Favicon,
        Page::Robots,
    ];

    /// The override's file name under `--error-pages`.
    pub fn file_name(self) -> &'static str {
        match self {
            Page::Banned => "banned.html",
            Page::RateLimit => "ratelimit.html",
            Page::TechnicalIssues => "technicalissues.html",
            Page::NoWebservice => "nowebservice.html",
            Page::Unreachable => "unreachable.html",
            Page::Timeout => "timeout.html",
            Page::DeniedBackend => "denied.html",
            Page::OverCapacity => "overcapacity.html",
            Page::BackendDown => "backenddown.html",
            Page::Favicon => "favicon.ico",
            Page::Robots => "robots.txt",
        }
    }

    /// The page's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Page::Favicon => "image/x-icon",
            Page::Robots => "text/plain; charset=utf-8",
            _ => "text/html; charset=utf-8",
        }
    }

    fn builtin(self) -> Bytes {
        let html = |title: &str, text: &str| -> Bytes {
            Bytes::from(format!(
                "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n\
                 <style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#202122}}</style>\n\
                 </head>\n<body>\n<h1>{title}</h1>\n<p>{text}</p>\n</body>\n</html>\n"
            ))
        };
        match self {
            Page::Banned => html(
                "Banned",
                "Requests from your network address are not allowed. If you think this is a mistake, \
                 please contact the Toolforge administrators.",
            ),
            Page::RateLimit => html(
                "Too many requests",
                "You are sending too many requests. Please slow down and try again in a little while.",
            ),
            Page::TechnicalIssues => html(
                "Technical issues",
                "Toolforge is undergoing maintenance or experiencing technical issues. Please try again later.",
            ),
            Page::NoWebservice => html(
                "No webservice",
                "The URL you have requested is not served by any running tool. If you maintain this tool, \
                 start its webservice.",
            ),
            Page::Unreachable => {
                html("Tool unreachable", "The tool serving this URL is not answering. Please try again later.")
            }
            Page::Timeout => html("Tool timed out", "The tool serving this URL took too long to answer."),
            Page::DeniedBackend => html(
                "Tool backend not allowed",
                "The tool serving this URL points to an address that Toolforge never connects to \
                 (the edge's own host or a reserved network). If you maintain this tool, register \
                 your webservice again so that it points to its real address.",
            ),
            Page::OverCapacity => html(
                "Tool too busy",
                "The tool serving this URL has too many requests in progress. Please try again in a little while.",
            ),
            Page::BackendDown => html(
                "Tool not answering",
                "The tool serving this URL has not answered several times in a row, so Toolforge stops \
                 waiting for it for a little while. Please try again later.",
            ),
            Page::Favicon => Bytes::from_static(FAVICON),
            Page::Robots => Bytes::from_static(b"User-agent: *\nDisallow: /\n"),
        }
    }
}

/// A 16x16 transparent icon: tools without their own favicon get no 404 noise.
const FAVICON: &[u8] = &[
    0, 0, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 24, 0, 48, 0, 0, 0, 22, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 24,
    0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 0, 128, 0, 0, 0,
];

/// All pages, loaded once at start.
#[derive(Debug, Clone)]
pub struct Pages {
    bodies: [Bytes; 11],
}

impl Pages {
    /// The built-in pages, with any file present in `dir` taking over.
    pub fn load(dir: Option<&Path>) -> Result<Self, Error> {
        let mut bodies: [Bytes; 11] = Page::ALL.map(Page::builtin);
        if let Some(dir) = dir {
            for (i, page) in Page::ALL.iter().enumerate() {
                let path = dir.join(page.file_name());
                match std::fs::read(&path) {
                    Ok(content) => bodies[i] = Bytes::from(content),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(Error::ErrorPage { path: path.display().to_string(), source }),
                }
            }
        }
        Ok(Pages { bodies })
    }

    /// The body of `page` (a cheap clone).
    pub fn body(&self, page: Page) -> Bytes {
        let index = Page::ALL.iter().position(|p| *p == page).unwrap_or(0);
        self.bodies[index].clone()
    }
}

impl Default for Pages {
    fn default() -> Self {
        Pages { bodies: Page::ALL.map(Page::builtin) }
    }
}
