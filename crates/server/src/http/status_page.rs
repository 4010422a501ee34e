//! `GET /`: the status page (see [`crate::status_page`] for what it shows
//! and to whom).
//!
//! # Signing in from a browser
//! A browser cannot attach a Bearer header, so the page also takes HTTP
//! Basic auth with the token as the password, as every endpoint does for
//! Nix's netrc. A browser sends credentials only after a challenge, and a
//! challenge on every view would prompt everyone: so `/` shows anonymous
//! viewers the public caches, and `/?login` answers 401 with
//! `WWW-Authenticate: Basic` until credentials come (the browser then keeps
//! sending them to this server). A token in the URL (`?token=`) is not
//! accepted: access logs, proxies and browser history would keep it.
//!
//! An unusable token (expired, wrongly signed) is a 401 here as everywhere
//! in the API, never a silent fall back to anonymous, and carries the same
//! challenge so the browser asks again. Refusals and failures are small
//! HTML pages, not Attic's JSON: no API client calls this page.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};

use super::AppState;
use super::access;
use super::public_urls::PublicUrls;
use crate::auth::{CacheState, Permission, authorize};
use crate::clock::unix_now;
use crate::error::Error;
use crate::status_page::{self, GcView, HitRates, ServerWide, View, Viewer};

/// `GET /` (and `/?login`).
pub async fn page(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let login = query.as_deref().is_some_and(asks_to_sign_in);
    match render(&state, &headers, login).await {
        Ok(body) => html(StatusCode::OK, body),
        Err(error) => refused(&error),
    }
}

/// Whether the query string has a `login` parameter, with or without a
/// value.
fn asks_to_sign_in(query: &str) -> bool {
    query
        .split('&')
        .any(|pair| pair.split('=').next() == Some("login"))
}

async fn render(state: &AppState, headers: &HeaderMap, login: bool) -> Result<String, Error> {
    let token = access::token(state, headers)?;
    if login && token.is_none() {
        return Err(Error::Unauthorized(
            "sign in with any user name and a garret token as the password".into(),
        ));
    }
    let facts = state.status.facts.get(&state.meta).await?;
    let visible: Vec<_> = facts
        .caches
        .iter()
        .filter(|cache| {
            let cache_state = if cache.is_public {
                CacheState::Public
            } else {
                CacheState::Private
            };
            authorize(token.as_ref(), &cache.name, cache_state, Permission::PULL).is_ok()
        })
        .collect();
    let server_wide = (visible.len() == facts.caches.len()).then(|| ServerWide {
        logical_bytes: facts.logical_bytes(),
        store: facts.store,
        hit_rates: HitRates::of(&state.metrics),
    });
    let urls = PublicUrls::for_request(&state.endpoints, headers);
    let settings = &state.status.gc;
    Ok(status_page::page(&View {
        uptime: state.status.started.elapsed(),
        viewer: token.map_or(Viewer::Anonymous, |t| {
            Viewer::Token(t.sub().map(str::to_owned))
        }),
        urls: &urls,
        caches: visible,
        facts_age: facts.taken.elapsed(),
        gc: GcView {
            interval_secs: settings.interval_secs,
            default_retention: settings.default_retention,
            runs: facts.gc_runs.clone(),
            now: unix_now(),
        },
        server_wide,
    }))
}

/// The page for a refusal or failure, with a Basic challenge on a 401 so
/// a browser asks for the token.
fn refused(error: &Error) -> Response {
    let class = error.class();
    error.log(class);
    let title = format!(
        "{} {}",
        class.status.as_u16(),
        class.status.canonical_reason().unwrap_or("Error")
    );
    let mut response = html(
        class.status,
        status_page::error_page(&title, &error.client_message()),
    );
    if class.status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"garret\", charset=\"UTF-8\""),
        );
    }
    response
}

fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Per viewer, and the figures move: never stored by a browser or proxy.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&status_page::CONTENT_SECURITY_POLICY).expect("the policy is ASCII"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_parameter_with_or_without_value() {
        for query in ["login", "login=", "login=1", "a=b&login", "x&login=yes&y"] {
            assert!(asks_to_sign_in(query), "{query}");
        }
        for query in ["", "loginx", "x=login", "token=abc"] {
            assert!(!asks_to_sign_in(query), "{query}");
        }
    }
}
