//! What each reason code (SPEC §3) means for a tool's maintainer: the hint
//! shown on the error page, so that whoever reads it knows who can fix it.

/// The hint on a `backend-unreachable` page when the tool's `https://`
/// backend answered with a certificate the proxy cannot verify.
pub const UNTRUSTED_CERTIFICATE_HINT: &str = "the tool's webservice is registered with an https:// address, but \
     the certificate it presents could not be verified (unknown issuer, expired, or not issued for the \
     registered name or address): its maintainers can fix the certificate, or register an http:// address.";

/// The hint for the tool's maintainers on the page of `reason`.
pub fn hint(reason: &str) -> &'static str {
    match reason {
        "no-route" => "the tool's webservice is not running: its maintainers can start it with `webservice start`.",
        "backend-unreachable" => {
            "the tool's webservice is registered but refused or broke the connection: its maintainers can \
             check it with `webservice status` and its logs, and restart it with `webservice restart`."
        }
        "backend-timeout" => {
            "the tool's webservice did not answer in time: its maintainers can look in its logs for slow \
             or stuck requests, and restart it with `webservice restart`."
        }
        "backend-down" => {
            "the tool's webservice failed several times in a row, so Toolforge answers at once for a \
             while instead of waiting for it: its maintainers can restart it with `webservice restart`, \
             which clears the mark immediately."
        }
        "denied-backend" => {
            "the tool's webservice registered an address that Toolforge never connects to: its \
             maintainers can restart it with `webservice restart` so that it registers its real address."
        }
        "over-capacity" => {
            "the tool has too many requests in progress at once: its maintainers can make slow requests \
             faster, or ask the Toolforge administrators for a larger share."
        }
        "rate-limited" => "this client sent too many requests; nothing is wrong with the tool.",
        "banned" => "this client's network is banned by the Toolforge administrators; nothing is wrong with the tool.",
        "blocked" => "this client's user agent or referer is blocked; nothing is wrong with the tool.",
        "maintenance" => "Toolforge itself is in maintenance; nothing is wrong with the tool.",
        _ => "the request could not be understood; nothing is wrong with the tool.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_reason_has_its_own_hint() {
        let fallback = hint("bad-request");
        for reason in [
            "no-route",
            "backend-unreachable",
            "backend-timeout",
            "backend-down",
            "denied-backend",
            "over-capacity",
            "rate-limited",
            "banned",
            "blocked",
            "maintenance",
        ] {
            assert_ne!(hint(reason), fallback, "{reason}");
        }
        assert!(hint("no-route").contains("webservice start"));
    }
}
