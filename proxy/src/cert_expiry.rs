//! Reads a certificate's expiry (its `notAfter`) from DER, for the
//! `certificate_not_after_seconds` metric: a few lines of DER walking
//! instead of a full X.509 parser, since nothing else in the certificate is
//! read here (rustls and webpki validate it).

use rustls::pki_types::CertificateDer;

/// The Unix time at which `cert` expires, or `None` when its DER is not
/// the expected shape.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    // serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, ... } ... }
    let (_, certificate, _) = read_tlv(cert.as_ref())?;
    let (_, tbs, _) = read_tlv(certificate)?;
    let mut rest = tbs;
    let (tag, _, after) = read_tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        // serialNumber, signature, issuer
        rest = read_tlv(rest)?.2;
    }
    let (_, validity, _) = read_tlv(rest)?;
    let (_, _, after_not_before) = read_tlv(validity)?;
    let (tag, time, _) = read_tlv(after_not_before)?;
    let time = std::str::from_utf8(time).ok()?;
    let full = match tag {
        // UTCTime YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280 4.1.2.5.1).
        0x17 if time.len() == 13 => {
            let century = if time[..2].parse::<u8>().ok()? >= 50 { "19" } else { "20" };
            format!("{century}{time}")
        }
        // GeneralizedTime YYYYMMDDHHMMSSZ.
        0x18 if time.len() == 15 => time.to_string(),
        _ => return None,
    };
    if !full.ends_with('Z') || !full[..14].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[0..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    );
    rfc3339.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// Splits one DER element off `input`: (tag, contents, what follows).
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap()
    }

    /// Made with `openssl req -x509 -days 30`: notAfter=Dec 29 15:43:06 2026 GMT (a UTCTime).
    const UTC_TIME: &str = "-----BEGIN CERTIFICATE-----
MIIBgDCCASegAwIBAgIUXUyeuJqKskKBgLJpZW9WSF0xSKIwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLZXhwaXJ5LnRlc3QwHhcNMjYxMTI5MTU0MzA2WhcNMjYxMjI5
MTU0MzA2WjAWMRQwEgYDVQQDDAtleHBpcnkudGVzdDBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABAHhT/a/echUuN70iR+6LH30+U/Pbv4U8QF+FzONuTNDLMzX12N2
L2KG56BagR5cwS7gUemk/O8i7rdTTXztloGjUzBRMB0GA1UdDgQWBBScpR8IkyuK
0HC5FF9uY6o8bmBpNTAfBgNVHSMEGDAWgBScpR8IkyuK0HC5FF9uY6o8bmBpNTAP
BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIAkBwkiSXnJqkl6Exes/
w0OL7YlaoUsUkjjna/TvtJAlAiBHMS2LPTJLbTGVK/y/6ckfkMVyMoFSVrFEQTRP
M0hyqA==
-----END CERTIFICATE-----";
    /// Made with `openssl req -x509 -days 36500`: notAfter=Nov  5 15:43:07 2126 GMT (a GeneralizedTime).
    const GENERALIZED_TIME: &str = "-----BEGIN CERTIFICATE-----
MIIBgjCCASmgAwIBAgIUK0LIg9BEAwtxmItgXfGUE3npUgowCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLZXhwaXJ5LnRlc3QwIBcNMjYxMTI5MTU0MzA3WhgPMjEyNjEx
MDUxNTQzMDdaMBYxFDASBgNVBAMMC2V4cGlyeS50ZXN0MFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAEppBmLZHl34fMEpJMBjSLbYzxe7nnk9uNmsrHgRh4GD5Ewmqb
bpuOoDc0L2b9/BBnx4JtyvzMs0vUC+/uELwvsKNTMFEwHQYDVR0OBBYEFNMmZz0i
tw5uwOiZMmvu3trILQeVMB8GA1UdIwQYMBaAFNMmZz0itw5uwOiZMmvu3trILQeV
MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgW47XlTyt//f1cCR6
WP+cukAfP63PJPtL5J0nNOuNF9sCIDuL2oqcxzui6u5A3BRZLUkFheBGpWSupN48
LMNpmdPK
-----END CERTIFICATE-----";

    #[test]
    fn reads_both_time_forms() {
        assert_eq!(not_after(&der(UTC_TIME)), Some(1_798_558_986));
        assert_eq!(not_after(&der(GENERALIZED_TIME)), Some(4_949_566_987));
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(not_after(&CertificateDer::from(vec![0x30, 0x82, 0xff])), None);
        assert_eq!(not_after(&CertificateDer::from(Vec::new())), None);
    }
}
