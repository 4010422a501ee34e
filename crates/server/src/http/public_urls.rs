//! Where clients reach this server: the configured public URLs, or what the
//! request itself shows. Attic's cache-config and the status page hand
//! these to clients, so both resolve them here.

use axum::http::{HeaderMap, header};

use crate::config::Endpoints;

/// The public URLs for one request, each ending in `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrls {
    /// The server's root URL (Attic's `api_endpoint`): the `attic` client
    /// joins `_api/v1/...` onto it.
    pub api: String,
    /// What a cache's name is appended to for its substituter URL.
    pub substituter_base: String,
}

impl PublicUrls {
    /// The configured endpoints, else scheme and `Host` of the request.
    pub fn for_request(endpoints: &Endpoints, headers: &HeaderMap) -> Self {
        let api = endpoints
            .api
            .clone()
            .unwrap_or_else(|| request_base_url(headers));
        let substituter_base = endpoints.substituter.clone().unwrap_or_else(|| api.clone());
        Self {
            api,
            substituter_base,
        }
    }

    /// The substituter URL of the cache `name` (Attic's
    /// `substituter_endpoint`).
    pub fn substituter(&self, name: &str) -> String {
        format!("{}{name}", self.substituter_base)
    }
}

/// Where clients reach this server, as the request shows it: behind a
/// TLS-terminating proxy `X-Forwarded-Proto` says https. Ends in `/`, as
/// Attic's does: clients resolve relative paths against it.
fn request_base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    format!("{scheme}://{host}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_endpoints_win_over_the_request() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "10.0.0.1:8080".parse().unwrap());
        let from_request = PublicUrls::for_request(&Endpoints::default(), &headers);
        assert_eq!(from_request.api, "http://10.0.0.1:8080/");
        assert_eq!(
            from_request.substituter("main"),
            "http://10.0.0.1:8080/main"
        );

        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        let behind_proxy = PublicUrls::for_request(&Endpoints::default(), &headers);
        assert_eq!(behind_proxy.api, "https://10.0.0.1:8080/");

        let endpoints = Endpoints {
            api: Some("https://cache.example/".into()),
            substituter: Some("https://nix.example/".into()),
        };
        let configured = PublicUrls::for_request(&endpoints, &headers);
        assert_eq!(configured.api, "https://cache.example/");
        assert_eq!(configured.substituter("main"), "https://nix.example/main");
    }
}
