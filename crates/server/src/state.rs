//! The server's state, built once from its configuration: the metadata
//! database, the chunk store, the token authority, the Bazel core and the
//! settings every handler shares. The binary and the end-to-end tests build
//! it the same way, so tests run the wiring that production runs; both
//! front ends (`http`, `reapi`) serve the one state.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;

use garret_meta::{Cache, Meta, MetaError};
use garret_store::backend::BackendError;
use garret_store::{Backend, ChunkStore, FsBackend, S3Backend};

use crate::access_times::AccessTimes;
use crate::auth::{AuthError, CacheName, CacheState, Permission, Token, TokenAuthority, authorize};
use crate::bazel_core::Core;
use crate::blobs::{Blobs, Store};
use crate::config::{Config, Endpoints, Limits, UploadSettings};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::metrics::storage::Measured;
use crate::readiness::Readiness;
use crate::signatures::Signatures;
use crate::status_page::StatusPage;

/// What every handler of both front ends shares.
#[derive(Debug)]
pub struct AppState {
    pub meta: Meta,
    pub blobs: Blobs,
    /// Verifies tokens (requests without one are anonymous).
    pub tokens: TokenAuthority,
    pub limits: Limits,
    /// Configured public URLs; unset ones come from each request.
    pub endpoints: Endpoints,
    /// ByteStream uploads: live Writes, progress records, session expiry.
    pub uploads: UploadSettings,
    /// The Bazel remote cache both Bazel's HTTP cache and REAPI serve.
    pub bazel: Core,
    /// Narinfo signatures and parsed cache keys, kept (bounded) so a narinfo
    /// hit neither parses its cache's key nor signs again.
    pub signatures: Signatures,
    /// What reads touched, written in batches for retention and GC; shut
    /// down after the last request so its final flush is not lost.
    pub accesses: AccessTimes,
    /// Whether the database and blob store answered the last check.
    pub readiness: Readiness,
    /// Start time, GC settings and outcome, and cached figures for the
    /// status page.
    pub status: StatusPage,
    /// What `/metrics` reports; the store, the metadata and the Bazel core
    /// record into it too.
    pub metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("preparing {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the metadata database: {0}")]
    Meta(#[from] MetaError),
    #[error("the chunk store: {0}")]
    Store(#[from] BackendError),
    #[error("bazel_default_cache: {0}")]
    DefaultCache(#[source] AuthError),
    #[error("the token key: {0}")]
    TokenKey(#[source] AuthError),
    #[error("no randomness for the token secret: {0}")]
    Randomness(String),
}

/// What a first start made: the token secret in the data directory and an
/// admin token for the operator, which `serve` prints once.
#[derive(Debug)]
pub struct FirstStart {
    pub secret_file: std::path::PathBuf,
    pub admin_token: String,
}

/// The state [`build`] made, and whether this was the data directory's
/// first start.
#[derive(Debug)]
pub struct Built {
    pub state: Arc<AppState>,
    pub first_start: Option<FirstStart>,
}

/// Everything `config` describes, ready to serve. The data directory is
/// created (private) if need be; see [`token_authority`] for the key.
/// Starts the access-time writer on the current runtime: a graceful stop
/// ends with `state.accesses.shutdown()`.
pub async fn build(config: &Config) -> Result<Built, StateError> {
    private_data_dir(&config.data_dir)?;
    let (tokens, first_start) = token_authority(config)?;
    let metrics = Metrics::new();
    let meta = open_meta(&config.database_url())
        .await?
        .with_grace(config.gc.grace())
        .with_observer(metrics.database_observer());
    let blobs = Blobs::new(open_store(config, &metrics)?, meta.clone());
    let accesses = AccessTimes::start(meta.clone(), config.access_flush_interval());
    let readiness = Readiness::start(
        meta.clone(),
        blobs.store().backend().inner().clone(),
        config.readiness_interval(),
    )
    .await;
    let bazel = Core::new(
        meta.clone(),
        blobs.clone(),
        accesses.clone(),
        tokens.clone(),
        CacheName::new(config.bazel_default_cache.clone()).map_err(StateError::DefaultCache)?,
        config.limits.max_nar_size,
        metrics.clone(),
    );
    let state = Arc::new(AppState {
        meta,
        blobs,
        tokens,
        limits: config.limits,
        endpoints: config.endpoints(),
        uploads: config.uploads,
        bazel,
        signatures: Signatures::default(),
        accesses,
        readiness,
        status: StatusPage::new(config.gc),
        metrics,
    });
    Ok(Built { state, first_start })
}

/// The chunk store `config` describes, recording into `metrics`.
pub fn open_store(config: &Config, metrics: &Metrics) -> Result<Store, StateError> {
    let backend = match (config.s3_config(), config.local_path()) {
        (Some(s3), _) => Backend::S3(S3Backend::new(&s3)?),
        (None, Some(path)) => Backend::Fs(FsBackend::new(path)?),
        (None, None) => unreachable!("storage is local or s3"),
    };
    Ok(ChunkStore::new(
        Measured::new(backend, metrics.clone()),
        config.store_config(),
    ))
}

/// The token key that exists without a first start: the configured one
/// (`[jwt]` or its variables, the same `garret token create` reads, else
/// Attic's variables; see `Jwt::key_source`), else the secret a first
/// start left in the data directory. Bound to the configured issuer and
/// audiences whatever its source.
pub fn existing_token_authority(config: &Config) -> Result<Option<TokenAuthority>, StateError> {
    let authority = if let Some(secret) = &config.jwt.hs256_secret_base64 {
        TokenAuthority::hs256_base64(secret).map_err(StateError::TokenKey)?
    } else if let Some(pem) = &config.jwt.rs256_pubkey_pem {
        TokenAuthority::rs256_pem(pem.as_bytes()).map_err(StateError::TokenKey)?
    } else {
        let path = config.data_dir.join("token-secret");
        if !path.exists() {
            return Ok(None);
        }
        let secret = std::fs::read_to_string(&path).map_err(|source| io(&path, source))?;
        TokenAuthority::hs256_base64(secret.trim()).map_err(StateError::TokenKey)?
    };
    Ok(Some(bind_token_authority(config, authority)))
}

/// `authority` requiring the configured issuer and audiences.
fn bind_token_authority(config: &Config, authority: TokenAuthority) -> TokenAuthority {
    let authority = match &config.jwt.bound_issuer {
        Some(issuer) => authority.with_issuer(issuer.clone()),
        None => authority,
    };
    authority.with_audiences(config.jwt.bound_audiences.iter().cloned())
}

/// The server's token key: the configured one (see [`existing_token_authority`]),
/// else the secret in the data directory. On a first start that secret is
/// created (0600), with an admin token, so a newcomer can push right away.
pub fn token_authority(
    config: &Config,
) -> Result<(TokenAuthority, Option<FirstStart>), StateError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    use crate::auth::{CacheNamePattern, TokenSpec};

    if let Some(authority) = existing_token_authority(config)? {
        return Ok((authority, None));
    }
    let path = config.data_dir.join("token-secret");
    let mut bytes = [0u8; 64];
    getrandom::fill(&mut bytes).map_err(|e| StateError::Randomness(e.to_string()))?;
    let secret = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes);
    let authority = bind_token_authority(
        config,
        TokenAuthority::hs256_base64(&secret).map_err(StateError::TokenKey)?,
    );
    let mut spec = TokenSpec::new("admin", std::time::Duration::from_hours(365 * 24));
    spec.grant(
        CacheNamePattern::new("*").expect("`*` is a pattern"),
        Permission::ALL,
    );
    let admin_token = authority.mint(&spec).map_err(StateError::TokenKey)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(secret.as_bytes()))
        .map_err(|source| io(&path, source))?;
    Ok((
        authority,
        Some(FirstStart {
            secret_file: path,
            admin_token,
        }),
    ))
}

/// The cache `name` names, if `token` holds `required` on it, with the
/// grant it holds; Attic's discovery rules decide what a requester without
/// any permission learns (401 before 404). Both front ends look caches up
/// through here.
pub async fn authorized_cache(
    meta: &Meta,
    token: Option<&Token>,
    name: &CacheName,
    required: Permission,
) -> Result<(Cache, Permission), Error> {
    let cache = match meta.cache(name.as_str()).await {
        Ok(cache) => Some(cache),
        Err(MetaError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    authorize_cache(token, name, cache, required)
}

/// [`authorized_cache`] for a cache the caller looked up itself (`None`:
/// no live cache is called `name`), say in one query with the object it
/// asks for.
pub fn authorize_cache(
    token: Option<&Token>,
    name: &CacheName,
    cache: Option<Cache>,
    required: Permission,
) -> Result<(Cache, Permission), Error> {
    tracing::Span::current().record("cache", tracing::field::display(name));
    let cache_state = match &cache {
        None => CacheState::Missing,
        Some(c) if c.is_public => CacheState::Public,
        Some(_) => CacheState::Private,
    };
    let permission = authorize(token, name, cache_state, required)?;
    let cache = cache.ok_or_else(|| Error::Internal("authorized a missing cache".into()))?;
    Ok((cache, permission))
}

/// Connects to the metadata database, creating an embedded one on first use
/// and applying migrations, so every command works on a fresh data
/// directory. An embedded database is its user's alone: it holds every
/// cache's signing key (earlier versions left it 0644).
pub async fn open_meta(database_url: &str) -> Result<Meta, StateError> {
    if let Some(path) = database_url.strip_prefix("sqlite:") {
        let path = Path::new(path.trim_start_matches("//"));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = Path::new(&name);
            if file.exists() {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
                    .map_err(|source| io(file, source))?;
            }
        }
    }
    let meta = Meta::connect(database_url).await?;
    meta.migrate().await?;
    Ok(meta)
}

/// Creates `dir` (and missing parents) for this user alone. An existing
/// directory keeps its mode: it may be shared, like `/var/lib`.
pub fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| io(dir, source))
}

/// The data directory, created or restricted to 0700: it holds the token
/// secret and the embedded database (and local chunks by default), and earlier versions
/// created it 0755.
///
/// A directory this user does not own (a Kubernetes volume mounted there,
/// owned by root with the pod's fsGroup) cannot be restricted; that is
/// logged, not fatal: whoever mounted it chose its mode.
pub fn private_data_dir(dir: &Path) -> Result<(), StateError> {
    create_private_dir(dir)?;
    let mode = std::fs::metadata(dir)
        .map_err(|source| io(dir, source))?
        .permissions()
        .mode();
    // No group or other bits: nothing to restrict.
    if mode.trailing_zeros() >= 6 {
        return Ok(());
    }
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(dir = %dir.display(), mode = format_args!("{:o}", mode & 0o777), "the data directory belongs to another user and stays as it is");
            Ok(())
        }
        other => other.map_err(|source| io(dir, source)),
    }
}

fn io(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.to_owned(),
        source,
    }
}
