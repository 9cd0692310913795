//! The proxy's own pages (errors, `favicon.ico`, `robots.txt`): built-in
//! defaults, each replaceable by a file in `--error-pages DIR`.
//!
//! Error pages are templates: `{{reason}}` (the SPEC §3 reason code),
//! `{{tool}}`, `{{request_id}}` and `{{hint}}` (what the tool's maintainers
//! can do) are filled in, HTML-escaped, for each answer; other text between
//! braces is left as it is.

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
                 </head>\n<body>\n<h1>{title}</h1>\n<p>{text}</p>\n\
                 <p>Tool: <code>{{{{tool}}}}</code> &middot; reason: <code>{{{{reason}}}}</code> &middot; \
                 request id: <code>{{{{request_id}}}}</code></p>\n\
                 <p>For the tool's maintainers: {{{{hint}}}}</p>\n</body>\n</html>\n"
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

    /// The body of error page `page` with its template variables filled in.
    pub fn render(&self, page: Page, vars: &PageVars<'_>) -> Bytes {
        let template = self.body(page);
        if matches!(page, Page::Favicon | Page::Robots) || !template.windows(2).any(|w| w == b"{{") {
            return template;
        }
        Bytes::from(fill(&String::from_utf8_lossy(&template), vars))
    }

    /// The body of `page` (a cheap clone).
    pub fn body(&self, page: Page) -> Bytes {
        let index = Page::ALL.iter().position(|p| *p == page).unwrap_or(0);
        self.bodies[index].clone()
    }
}

/// The values an error page's template variables take.
#[derive(Debug, Clone, Copy)]
pub struct PageVars<'a> {
    /// `{{reason}}`: the reason code.
    pub reason: &'a str,
    /// `{{tool}}`: the tool the request was for.
    pub tool: &'a str,
    /// `{{request_id}}`: the request's `X-Request-Id`.
    pub request_id: &'a str,
    /// `{{hint}}`: what the tool's maintainers can do.
    pub hint: &'a str,
}

/// Replaces each known `{{name}}` in `template` with its escaped value.
fn fill(template: &str, vars: &PageVars<'_>) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let value = after.find("}}").and_then(|end| {
            let value = match after[..end].trim() {
                "reason" => vars.reason,
                "tool" => vars.tool,
                "request_id" => vars.request_id,
                "hint" => vars.hint,
                _ => return None,
            };
            Some((value, end))
        });
        match value {
            Some((value, end)) => {
                escape_into(&mut out, value);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// HTML-escapes `text` (element content and quoted attributes alike).
fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

impl Default for Pages {
    fn default() -> Self {
        Pages { bodies: Page::ALL.map(Page::builtin) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_filled_escaped_and_unknown_ones_kept() {
        let vars = PageVars { reason: "no-route", tool: "<b>x</b>", request_id: "a\"b", hint: "R&D" };
        assert_eq!(
            fill("{{reason}} {{ tool }} {{request_id}} {{hint}} {{other}} {{", &vars),
            "no-route &lt;b&gt;x&lt;/b&gt; a&quot;b R&amp;D {{other}} {{"
        );
        let page = String::from_utf8(Pages::default().render(Page::NoWebservice, &vars).to_vec()).unwrap();
        assert!(page.contains("reason: <code>no-route</code>") && page.contains("R&amp;D"), "{page}");
        assert!(!page.contains("{{"), "{page}");
    }
}
