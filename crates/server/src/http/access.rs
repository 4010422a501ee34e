//! Who may do what to which cache: the one place HTTP handlers turn the
//! `Authorization` header and a cache name into a cache row, applying
//! Attic's discovery rules (401 before 404 for strangers).

use axum::http::{HeaderMap, HeaderValue, header};
use garret_meta::{Cache, MetaError, NixObjectRow};

use crate::auth::{CacheName, CacheState, Permission, Requester, Token, authorize};
use crate::error::Error;
use crate::state::{AppState, authorize_cache, authorized_cache};

/// The verified token of a request; no `Authorization` header is anonymous,
/// an unusable one a 401.
pub fn token(state: &AppState, headers: &HeaderMap) -> Result<Option<Token>, Error> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    Ok(state.tokens.authenticate(authorization)?)
}

/// The verified token of a request that names its cache only in the body
/// (get-missing-paths, upload-path), checked before that body is read:
/// a requester that could not hold `required` on any cache is refused at
/// once (401), so strangers cannot make the server buffer and parse for
/// them. Anonymous requests never qualify for a write (public caches grant
/// only `pull`); a token qualifies if any of its patterns grants
/// `required`. The named cache is still authorized once the body names it.
pub fn token_that_could(
    state: &AppState,
    headers: &HeaderMap,
    required: Permission,
) -> Result<Option<Token>, Error> {
    let token = token(state, headers)?;
    let could = match &token {
        None => required.difference(Permission::PULL).is_empty(),
        Some(token) => token
            .claims()
            .access
            .caches
            .values()
            .any(|granted| granted.contains(required)),
    };
    if could {
        return Ok(token);
    }
    let Some(token) = token else {
        return Err(Error::Unauthorized(format!(
            "{} holds the {required} permission on no cache",
            Requester::Anonymous
        )));
    };
    let message = format!(
        "{} holds the {required} permission on no cache",
        Requester::Token {
            subject: token.sub().map(str::to_owned),
        }
    );
    let holds_any = token
        .claims()
        .access
        .caches
        .values()
        .any(|granted| !granted.is_empty());
    Err(if holds_any {
        Error::Forbidden(message)
    } else {
        Error::Unauthorized(message)
    })
}

/// A cache the requester holds `required` on, with the grant it holds.
#[derive(Debug)]
pub struct Granted {
    pub cache: Cache,
    pub permission: Permission,
}

impl Granted {
    /// Checks a further requirement that only the request body revealed
    /// (a retention change in a cache patch), against the cache already
    /// looked up.
    pub fn require(&self, token: Option<&Token>, required: Permission) -> Result<(), Error> {
        let name = CacheName::new(self.cache.name.clone())?;
        let state = if self.cache.is_public {
            CacheState::Public
        } else {
            CacheState::Private
        };
        authorize(token, &name, state, required)?;
        Ok(())
    }
}

/// Looks `name` up and checks that `token` holds `required` on it.
pub async fn cache(
    state: &AppState,
    token: Option<&Token>,
    name: &str,
    required: Permission,
) -> Result<Granted, Error> {
    let name = CacheName::new(name)?;
    let (cache, permission) = authorized_cache(&state.meta, token, &name, required).await?;
    Ok(Granted { cache, permission })
}

/// [`cache`] with the token taken from `headers`.
pub async fn cache_for_request(
    state: &AppState,
    headers: &HeaderMap,
    name: &str,
    required: Permission,
) -> Result<Cache, Error> {
    let token = token(state, headers)?;
    Ok(cache(state, token.as_ref(), name, required).await?.cache)
}

/// [`cache_for_request`] with the cache's object at `store_path_hash`
/// (`None` if it holds none), found in the same query; the object is only
/// returned once the requester is authorized.
pub async fn cache_and_nix_object(
    state: &AppState,
    headers: &HeaderMap,
    name: &str,
    required: Permission,
    store_path_hash: &str,
) -> Result<(Cache, Option<NixObjectRow>), Error> {
    let token = token(state, headers)?;
    let name = CacheName::new(name)?;
    let (cache, object) = match state
        .meta
        .cache_and_nix_object(name.as_str(), store_path_hash)
        .await
    {
        Ok((cache, object)) => (Some(cache), object),
        Err(MetaError::NotFound(_)) => (None, None),
        Err(e) => return Err(e.into()),
    };
    let (cache, _) = authorize_cache(token.as_ref(), &name, cache, required)?;
    Ok((cache, object))
}

/// Checks that the requester may create a cache named `name`. Whether it
/// exists already is for the insert to report (`CacheAlreadyExists`), which
/// also settles two concurrent creations.
pub fn cache_for_create(state: &AppState, headers: &HeaderMap, name: &str) -> Result<(), Error> {
    let token = token(state, headers)?;
    let name = CacheName::new(name)?;
    authorize(
        token.as_ref(),
        &name,
        CacheState::Missing,
        Permission::CREATE_CACHE,
    )?;
    Ok(())
}
