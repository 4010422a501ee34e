//! The probe's HTTP client: hyper with rustls (aws-lc-rs, the provider the
//! S3 client already builds) and the system's CA roots, the token on every
//! request, a timeout on every call, and answers read only up to a bound,
//! so a hostile server can neither make the probe allocate without limit
//! nor hang it. Redirects are not followed: a probe reports them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderName, USER_AGENT};
use hyper::{Method, Request};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::reason;
use super::target::Token;

pub type Response = hyper::Response<Incoming>;

/// The largest error body kept, of which a line's worth is shown.
const MAX_ERROR_BODY: usize = 4 << 10;
const SHOWN_ERROR_CHARS: usize = 200;

#[derive(Debug)]
pub struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token: Option<Token>,
    timeout: Duration,
    /// Why the system's CA roots could not be loaded, if they could not:
    /// plain HTTP still works, and a TLS failure says this.
    missing_roots: Option<String>,
}

impl Http {
    /// `timeout` bounds connecting, each exchange up to the answer's head,
    /// reading a small answer whole, and each read of a download.
    pub fn new(token: Option<Token>, timeout: Duration) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (tls, missing_roots) = match HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::clone(&provider))
        {
            Ok(tls) => (tls, None),
            Err(e) => {
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("TLS set-up: {e}"))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                (
                    HttpsConnectorBuilder::new().with_tls_config(config),
                    Some(e.to_string()),
                )
            }
        };
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(timeout));
        let connector = tls.https_or_http().enable_http1().wrap_connector(tcp);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            token,
            timeout,
            missing_roots,
        })
    }

    pub async fn get(&self, url: &str) -> Result<Response, String> {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }

    /// Sends a request with the token; `Err` says why no answer came.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(HeaderName, String)],
        body: Bytes,
    ) -> Result<Response, String> {
        let mut request = Request::builder().method(method).uri(url).header(
            USER_AGENT,
            concat!("garret-probe/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {}", token.as_str()));
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| format!("invalid request to {url}: {e}"))?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => Err(format!("timed out after {}s", self.timeout.as_secs())),
            Ok(Err(e)) => {
                let reason = reason::unreachable(&e, false, self.timeout);
                match &self.missing_roots {
                    Some(why) if reason.starts_with("TLS") => {
                        Err(format!("{reason} (no system CA certificates: {why})"))
                    }
                    _ => Err(reason),
                }
            }
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// The body of `response`, refused once it grows past `limit` bytes or
    /// takes longer than the timeout.
    pub async fn read_bounded(&self, response: Response, limit: usize) -> Result<Bytes, String> {
        let too_large = || format!("the answer is larger than {limit} bytes");
        let announced = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut body = response.into_body();
        let read = async {
            let mut out = BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("reading the answer: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > limit {
                        return Err(too_large());
                    }
                    out.extend_from_slice(&data);
                }
            }
            Ok(out.freeze())
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| {
                format!(
                    "timed out reading the answer after {}s",
                    self.timeout.as_secs()
                )
            })?
    }

    /// A body of any length as a reader, each read bounded by the timeout:
    /// a large NAR may take longer in all, but never stalls.
    pub fn body_reader(&self, response: Response) -> impl tokio::io::AsyncBufRead + Send + Unpin {
        let timeout = self.timeout;
        let chunks = futures::stream::unfold(Some(response.into_body()), move |body| async move {
            let mut body = body?;
            loop {
                match tokio::time::timeout(timeout, body.frame()).await {
                    Err(_) => {
                        let error = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no data for {}s", timeout.as_secs()),
                        );
                        return Some((Err(error), None));
                    }
                    Ok(None) => return None,
                    Ok(Some(Err(e))) => return Some((Err(std::io::Error::other(e)), None)),
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            return Some((Ok(data), Some(body)));
                        }
                    }
                }
            }
        });
        tokio_util::io::StreamReader::new(Box::pin(chunks))
    }

    /// A refusal in one line: `HTTP 403: AccessError: <message>`,
    /// or the start of a body that is not Attic's JSON error.
    pub async fn refusal(&self, response: Response) -> String {
        let status = response.status();
        let body = self
            .read_bounded(response, MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        let detail = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) if e.message.is_empty() => e.error,
            // garret's messages start with their kind already.
            Ok(e) if e.message.starts_with(&e.error) => e.message,
            Ok(e) => format!("{}: {}", e.error, e.message),
            Err(_) => String::from_utf8_lossy(&body)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(SHOWN_ERROR_CHARS)
                .collect::<String>()
                .trim()
                .to_owned(),
        };
        if detail.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {}: {detail}", status.as_u16())
        }
    }
}

/// Attic's error body.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
}
