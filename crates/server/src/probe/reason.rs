//! Why a request got no answer, in the words an operator acts on:
//! connection refused, DNS, TLS or a timeout, rather than the layers of
//! "error sending request" that HTTP and gRPC clients wrap it in.

use std::error::Error;
use std::time::Duration;

/// The reason `error` (from reqwest or tonic) gives, classified by what it
/// wraps. `timed_out` is the client's own verdict, where it has one.
pub fn unreachable(error: &(dyn Error + 'static), timed_out: bool, timeout: Duration) -> String {
    let chain = causes(error);
    let root = chain
        .last()
        .map_or_else(|| error.to_string(), ToString::to_string);
    if timed_out
        || chain
            .iter()
            .any(|e| io_kind(*e) == Some(std::io::ErrorKind::TimedOut))
    {
        return format!("timed out after {}s", timeout.as_secs());
    }
    if let Some(tls) = chain.iter().find_map(|e| tls_error(*e)) {
        return format!("TLS handshake failed: {tls}");
    }
    if chain.iter().any(|e| e.to_string().starts_with("dns error")) {
        return format!("DNS lookup failed: {root}");
    }
    match chain.iter().find_map(|e| io_kind(*e)) {
        Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".into(),
        Some(std::io::ErrorKind::ConnectionReset) => "connection reset by the server".into(),
        _ => root,
    }
}

/// `error` and its sources, outermost first. An `io::Error` that wraps
/// another error reports that error's *source* as its own, skipping the
/// wrapped error itself (often another `io::Error`, then rustls's), so the
/// walk goes through the wrapped error instead.
fn causes<'a>(error: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
    let mut chain = vec![];
    let mut next = Some(error);
    while let Some(e) = next {
        chain.push(e);
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(wrapped) => Some(wrapped),
            None => e.source(),
        };
    }
    chain
}

fn io_kind(error: &(dyn Error + 'static)) -> Option<std::io::ErrorKind> {
    error
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
}

fn tls_error(error: &(dyn Error + 'static)) -> Option<String> {
    error
        .downcast_ref::<rustls::Error>()
        .map(ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_wrapped_cause_names_the_reason() {
        let t = Duration::from_secs(3);
        let refused = Outer(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(unreachable(&refused, false, t), "connection refused");
        assert_eq!(unreachable(&refused, true, t), "timed out after 3s");
        // As hyper-rustls hands them on: rustls's error in an io::Error in another.
        let tls = Outer(std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )));
        let reason = unreachable(&tls, false, t);
        assert!(
            reason.starts_with("TLS handshake failed: invalid peer certificate"),
            "{reason}"
        );
        let other = Outer(std::io::Error::other("no route"));
        assert_eq!(unreachable(&other, false, t), "no route");
    }
}
