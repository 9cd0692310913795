//! The two exposition formats of `GET /metrics` (SPEC §7): Prometheus text
//! 0.0.4 by default, OpenMetrics when the scraper asks for it. The registry
//! encodes OpenMetrics; 0.0.4 is derived from it here, because plain-text
//! consumers (older Prometheus, node-exporter's textfile, promtool, many
//! scripts) reject OpenMetrics' `# EOF`, `# UNIT` and counter naming.

/// Content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics, as the registry encodes it.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// True when the `Accept` header prefers OpenMetrics to plain text (by
/// q-value; on a tie OpenMetrics, since a scraper that names it wants it).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

/// Rewrites OpenMetrics text into the Prometheus 0.0.4 text format: drops
/// `# EOF`, `# UNIT`, `_created` samples and exemplars; names counter
/// families with their `_total` suffix (0.0.4 families are named as their
/// samples); turns `info` into a `_info` gauge and `unknown` into `untyped`.
pub fn to_text_0_0_4(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE, and its name depends on the type: hold it until TYPE.
    let mut help: Option<(&str, &str)> = None;
    let mut counter: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (family, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                "gaugehistogram" | "stateset" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            counter = (kind == "counter").then_some(name);
            if let Some((help_name, text)) = help.take()
                && help_name == name
            {
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        if line.starts_with('#') {
            // `# EOF`, `# UNIT` and anything else OpenMetrics-only.
            continue;
        }
        if let Some(name) = counter
            && line.strip_prefix(name).is_some_and(|rest| rest.starts_with("_created"))
        {
            continue;
        }
        // An exemplar follows the value after " # ".
        let sample = line.split_once(" # ").map_or(line, |(sample, _)| sample);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_default_accept_gets_openmetrics() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("text/plain, application/openmetrics-text;q=0.5")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
    }

    #[test]
    fn openmetrics_becomes_text() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{c=\"1\"} 3 # {id=\"x\"} 1.0\n\
                  a_requests_created 17\n# HELP a_size_bytes Size.\n# TYPE a_size_bytes gauge\n# UNIT a_size_bytes bytes\n\
                  a_size_bytes 2\n# HELP b Build.\n# TYPE b info\nb_info{v=\"1\"} 1\n# EOF\n";
        let text = "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{c=\"1\"} 3\n\
                    # HELP a_size_bytes Size.\n# TYPE a_size_bytes gauge\na_size_bytes 2\n\
                    # HELP b_info Build.\n# TYPE b_info gauge\nb_info{v=\"1\"} 1\n";
        assert_eq!(to_text_0_0_4(om), text);
    }
}
