//! Server configuration: built-in defaults, then an optional TOML file, then
//! `GARRET_*` environment variables. With neither file nor variables garret
//! runs embedded: SQLite and local chunk storage under `./garret-data`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use garret_store::{ChunkerConfig, S3Config, StoreConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration; every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address for HTTP and gRPC.
    pub listen: SocketAddr,
    /// Home of the embedded database, local chunks and the first-start
    /// secrets.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite:PATH`; defaults to SQLite in `data_dir`.
    pub database_url: Option<String>,
    pub storage: Storage,
    pub chunking: Chunking,
    pub limits: Limits,
    pub connections: Connections,
    /// How often reads' access times are written, in seconds. Reads are
    /// recorded in memory and written together (one transaction per kind
    /// of row), so a cache hit costs no commit; an action-cache hit still
    /// waits for its own write, shared with the hits beside it. Longer
    /// means fewer commits; what a crash loses is at most this much of the
    /// reads' recency, which GC only weighs against hours.
    pub access_flush_interval_secs: u64,
    /// How often this replica checks that its database and blob store
    /// answer, in seconds; `/readyz` and gRPC health report the last check.
    pub readiness_interval_secs: u64,
    /// The cache that Bazel requests without an instance name use (Bazel's
    /// `--remote_instance_name` names any other cache).
    pub bazel_default_cache: String,
    /// The URL clients reach the API at, as Attic's `api-endpoint`: what
    /// `cache-config` answers as `api_endpoint`. Without it, the request's
    /// scheme and `Host` decide, which is wrong behind an ingress that
    /// rewrites either.
    pub api_endpoint: Option<String>,
    /// The base URL of the substituters, as Attic's `substituter-endpoint`;
    /// a cache's substituter is this plus its name. Defaults to the API
    /// endpoint.
    pub substituter_endpoint: Option<String>,
    pub jwt: Jwt,
    pub gc: Gc,
    /// ByteStream uploads: live Writes, progress records, session expiry.
    /// Not configurable yet: the defaults hold, and tests change them.
    #[serde(skip)]
    pub uploads: UploadSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("garret-data"),
            database_url: None,
            storage: Storage::default(),
            chunking: Chunking::default(),
            limits: Limits::default(),
            connections: Connections::default(),
            access_flush_interval_secs: 5,
            readiness_interval_secs: 5,
            bazel_default_cache: "default".into(),
            api_endpoint: None,
            substituter_endpoint: None,
            jwt: Jwt::default(),
            gc: Gc::default(),
            uploads: UploadSettings::default(),
        }
    }
}

/// Where chunk objects live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Storage {
    /// A directory; defaults to `<data_dir>/chunks`.
    Local {
        path: Option<PathBuf>,
    },
    S3(S3Storage),
}

impl Default for Storage {
    fn default() -> Self {
        Self::Local { path: None }
    }
}

/// An S3-compatible bucket. Credentials may also come from
/// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, which keeps them out of files.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Storage {
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_true")]
    pub path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &garret_meta::redact(self.secret_access_key.as_ref()),
            )
            .finish()
    }
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_true() -> bool {
    true
}

/// Chunking and compression. Changing them later is safe: existing chunks
/// keep their frames, and only new content is cut the new way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Chunking {
    /// Average chunk size in bytes, a power of two; min and max follow
    /// REAPI's FastCDC convention (avg/4, avg×4).
    pub avg_size: u32,
    pub zstd_level: i32,
}

impl Default for Chunking {
    fn default() -> Self {
        Self {
            avg_size: ChunkerConfig::default().avg_size,
            zstd_level: garret_store::codec::DEFAULT_LEVEL,
        }
    }
}

/// Garbage collection: what `garret gc` (a CronJob) and the periodic
/// collection inside `serve` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gc {
    /// Collect every this many seconds inside `serve`; 0 (the default)
    /// never, for deployments that run `garret gc` on a schedule instead.
    pub interval_secs: u64,
    /// How long a Nix object, CAS entry or action result may go unaccessed
    /// before GC may take it, in caches whose own retention is "Global"
    /// (Attic's `default-retention-period`), written as `garret cache
    /// configure --retention` takes it: `default_retention = "30d"`. Unset
    /// (the default) keeps them however long they go unaccessed, so that
    /// turning GC on deletes nothing an operator did not ask to lose.
    #[serde(
        deserialize_with = "human_duration",
        serialize_with = "human_duration_out"
    )]
    pub default_retention: Option<std::time::Duration>,
    /// How long a blob or chunk that lost its last reference stays
    /// collectable-but-present. A writer that found it stored and skipped
    /// uploading it must commit within this, and every replica and
    /// `garret gc` must agree on it.
    pub grace_secs: u64,
    /// A CAS entry used within this many seconds is never evicted to meet a
    /// cache's budget. An action-cache hit refreshes every blob it names, so
    /// a build that got a hit (`--remote_download_minimal` downloads
    /// outputs later, if at all) finds them for at least this long.
    pub cas_protect_secs: u64,
    /// How long a dead pack's object stays: a download that looked up its
    /// chunks' places before they moved or went still reads them, for up to
    /// this long.
    pub pack_grace_secs: u64,
    /// How old an object no metadata names must be before it is deleted.
    /// Longer than the longest upload: an upload's packs are named only
    /// when it commits.
    pub orphan_grace_secs: u64,
    /// A pack whose live bytes are under this percentage of its size is
    /// rewritten, so the space of its dead frames comes back.
    pub rewrite_below_percent: u8,
    /// Packs rewritten per run at most, bounding a run's reads and writes.
    pub rewrite_max_packs: u32,
}

impl Default for Gc {
    fn default() -> Self {
        Self {
            interval_secs: 0,
            default_retention: None,
            grace_secs: garret_meta::DEFAULT_GRACE.as_secs(),
            cas_protect_secs: 3 * 3600,
            pack_grace_secs: 6 * 3600,
            orphan_grace_secs: 24 * 3600,
            rewrite_below_percent: 50,
            rewrite_max_packs: 64,
        }
    }
}

impl Gc {
    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.grace_secs)
    }

    /// Reads the `GARRET_GC_*` variables.
    fn apply_env(
        &mut self,
        var: impl Fn(&'static str) -> Option<(&'static str, String)>,
    ) -> Result<(), ConfigError> {
        let fields = [
            ("GARRET_GC_INTERVAL_SECS", &mut self.interval_secs),
            ("GARRET_GC_GRACE_SECS", &mut self.grace_secs),
            ("GARRET_GC_CAS_PROTECT_SECS", &mut self.cas_protect_secs),
            ("GARRET_GC_PACK_GRACE_SECS", &mut self.pack_grace_secs),
            ("GARRET_GC_ORPHAN_GRACE_SECS", &mut self.orphan_grace_secs),
        ];
        for (name, field) in fields {
            if let Some((name, value)) = var(name) {
                *field = parse(name, value)?;
            }
        }
        if let Some((name, value)) = var("GARRET_GC_DEFAULT_RETENTION") {
            let retention = crate::units::parse_duration(&value)
                .map_err(|e| env_error(name, value, &e.to_string()))?;
            self.default_retention = Some(retention);
        }
        if let Some((name, value)) = var("GARRET_GC_REWRITE_BELOW_PERCENT") {
            self.rewrite_below_percent = parse(name, value)?;
        }
        if let Some((name, value)) = var("GARRET_GC_REWRITE_MAX_PACKS") {
            self.rewrite_max_packs = parse(name, value)?;
        }
        Ok(())
    }
}

/// Request limits: every body garret reads is bounded in size, time and
/// (for compressed uploads) in what it may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest NAR (uncompressed) accepted by an upload.
    pub max_nar_size: u64,
    /// Largest `X-Attic-Nar-Info-Preamble-Size`, and largest narinfo a plain
    /// Nix upload may PUT.
    pub max_preamble_size: u64,
    /// Whole-request time limit for reading any body; long enough for
    /// multi-GB uploads on slow links.
    pub request_timeout_secs: u64,
    /// A request whose client sends nothing for this long is aborted, so a
    /// stalled client cannot hold a connection for the whole request limit.
    pub idle_timeout_secs: u64,
    /// Memory one decoder of a compressed plain Nix upload may use: the xz
    /// memory limit, and for zstd the largest power-of-two window within it.
    /// The default admits `xz -9` (a 64 MiB dictionary needs 64.1 MiB) and
    /// zstd's own default window cap (128 MiB); a stream declaring more is a
    /// 413 before any of that memory is taken.
    pub max_decompression_memory: u64,
    /// How many times its compressed size a plain Nix upload may expand to.
    /// NARs compress 3–10×, so the default leaves room for unusually
    /// redundant paths while a small zstd bomb stops early.
    pub max_decompression_ratio: u64,
    /// Bytes every compressed upload may expand to whatever its ratio, so
    /// small, highly compressible paths (long runs of zeros) still go
    /// through. The ratio bounds only what lies beyond this.
    pub decompression_ratio_floor: u64,
}

impl Limits {
    pub fn idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout_secs)
    }

    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.request_timeout_secs)
    }

    /// Reads the `GARRET_*` variables that override limits.
    fn apply_env(
        &mut self,
        var: impl Fn(&'static str) -> Option<(&'static str, String)>,
    ) -> Result<(), ConfigError> {
        let fields = [
            ("GARRET_MAX_NAR_SIZE", &mut self.max_nar_size),
            (
                "GARRET_MAX_DECOMPRESSION_MEMORY",
                &mut self.max_decompression_memory,
            ),
            (
                "GARRET_MAX_DECOMPRESSION_RATIO",
                &mut self.max_decompression_ratio,
            ),
            (
                "GARRET_DECOMPRESSION_RATIO_FLOOR",
                &mut self.decompression_ratio_floor,
            ),
        ];
        for (name, field) in fields {
            if let Some((name, value)) = var(name) {
                *field = parse(name, value)?;
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_nar_size", self.max_nar_size),
            ("max_preamble_size", self.max_preamble_size),
            ("request_timeout_secs", self.request_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("max_decompression_memory", self.max_decompression_memory),
            ("max_decompression_ratio", self.max_decompression_ratio),
            ("decompression_ratio_floor", self.decompression_ratio_floor),
        ];
        match positive.iter().find(|(_, value)| *value == 0) {
            Some((name, _)) => Err(ConfigError::Invalid(format!(
                "limits.{name} must be positive"
            ))),
            None => Ok(()),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_nar_size: 64 << 30,
            max_preamble_size: 1 << 20,
            request_timeout_secs: 3600,
            idle_timeout_secs: 300,
            max_decompression_memory: 128 << 20,
            max_decompression_ratio: 100,
            decompression_ratio_floor: 64 << 20,
        }
    }
}

/// What every token must carry, as Attic's `[jwt]` section: a token minted
/// for another deployment that shares the key (say, staging) is refused
/// when the issuer or audience differs.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Jwt {
    /// Tokens must carry exactly this `iss`.
    pub bound_issuer: Option<String>,
    /// Tokens must name one of these in `aud`; empty checks nothing.
    pub bound_audiences: Vec<String>,
    /// The HS256 secret (base64) tokens are signed with: Attic's
    /// `token-hs256-secret-base64`. Wins over `rs256_pubkey_pem`.
    pub hs256_secret_base64: Option<String>,
    /// The RS256 key (PEM, or base64 of PEM) tokens are verified with. A
    /// private key works too: its public half is derived, which is how
    /// Attic's `token-rs256-secret-base64` is read.
    pub rs256_pubkey_pem: Option<String>,
    /// Where the key above came from, for `check-config`: an operator
    /// adopting Attic must see whether Attic's key is the one in use.
    #[serde(skip)]
    pub key_source: Option<TokenKeySource>,
}

/// Where the token key came from. `None` in [`Jwt::key_source`] means the
/// secret in the data directory (made on first start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKeySource {
    /// The `[jwt]` section of the configuration file.
    File,
    /// An environment variable: one of garret's own, or one of Attic's read
    /// as a fallback.
    Env(&'static str),
}

impl std::fmt::Display for TokenKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File => f.write_str("[jwt] in the configuration file"),
            Self::Env(name) => f.write_str(name),
        }
    }
}

/// Attic's token key variables, in the order Attic's server tries them
/// (`server/src/config.rs`: RS256 public key, RS256 secret, HS256 secret).
/// garret reads them only when neither `[jwt]` nor a `GARRET_TOKEN_*`
/// variable names a key, so the `attic-jwt-signing` secret an Attic
/// Deployment mounts keeps every token already in runners' secrets valid.
const ATTIC_TOKEN_KEY_VARS: [(&str, JwtAlgorithm); 3] = [
    (
        "ATTIC_SERVER_TOKEN_RS256_PUBKEY_BASE64",
        JwtAlgorithm::Rs256,
    ),
    (
        "ATTIC_SERVER_TOKEN_RS256_SECRET_BASE64",
        JwtAlgorithm::Rs256,
    ),
    (
        "ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64",
        JwtAlgorithm::Hs256,
    ),
];

/// Which [`Jwt`] field a key variable sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JwtAlgorithm {
    Hs256,
    Rs256,
}

impl Jwt {
    /// The key text configured, whichever algorithm.
    fn key(&self) -> Option<&str> {
        self.hs256_secret_base64
            .as_deref()
            .or(self.rs256_pubkey_pem.as_deref())
    }

    /// Sets the key of `algorithm` from `source`. An HS256 secret wins over
    /// an RS256 key, so the source stays the HS256 secret's once it has one.
    fn set_key(&mut self, algorithm: JwtAlgorithm, value: String, source: TokenKeySource) {
        match algorithm {
            JwtAlgorithm::Hs256 => self.hs256_secret_base64 = Some(value),
            JwtAlgorithm::Rs256 if self.hs256_secret_base64.is_some() => {
                self.rs256_pubkey_pem = Some(value);
                return;
            }
            JwtAlgorithm::Rs256 => self.rs256_pubkey_pem = Some(value),
        }
        self.key_source = Some(source);
    }

    /// The token key as `check-config` shows it: algorithm and source.
    fn describe_key(&self) -> String {
        let algorithm = if self.hs256_secret_base64.is_some() {
            "HS256"
        } else {
            "RS256"
        };
        match self.key_source {
            Some(source) => format!("{algorithm} from {source}"),
            None => "HS256 from <data_dir>/token-secret (made on first start)".to_owned(),
        }
    }

    /// Falls back to Attic's token key variables when garret has no key of
    /// its own. When it has, a different Attic key is ignored with a
    /// warning: tokens signed with it would be refused.
    fn apply_attic_env(&mut self, var: impl Fn(&'static str) -> Option<(&'static str, String)>) {
        let Some((name, algorithm, value)) = ATTIC_TOKEN_KEY_VARS
            .iter()
            .find_map(|&(name, algorithm)| var(name).map(|(name, value)| (name, algorithm, value)))
        else {
            return;
        };
        match (self.key(), self.key_source) {
            (None, _) => self.set_key(algorithm, value, TokenKeySource::Env(name)),
            (Some(ours), Some(source)) if ours.trim() != value.trim() => tracing::warn!(
                ignored = name,
                used = %source,
                "garret's own token key takes precedence over Attic's, which differs: \
                 tokens signed with Attic's key will be refused"
            ),
            (Some(_), _) => {}
        }
    }
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("bound_issuer", &self.bound_issuer)
            .field("bound_audiences", &self.bound_audiences)
            .field(
                "hs256_secret_base64",
                &garret_meta::redact(self.hs256_secret_base64.as_ref()),
            )
            // May be a private key (Attic's RS256 secret).
            .field(
                "rs256_pubkey_pem",
                &garret_meta::redact(self.rs256_pubkey_pem.as_ref()),
            )
            .field("key_source", &self.key_source)
            .finish()
    }
}

/// An optional [`crate::units::parse_duration`] string.
fn human_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    crate::units::parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Writes what [`human_duration`] reads.
#[expect(
    clippy::ref_option,
    reason = "the signature serde's serialize_with calls"
)]
fn human_duration_out<S: serde::Serializer>(
    duration: &Option<std::time::Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(d) => serializer.serialize_some(&crate::units::format_duration(*d)),
        None => serializer.serialize_none(),
    }
}

/// How long connections may live without doing useful work, so idle and
/// half-open clients cannot hold sockets (and file descriptors) forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Connections {
    /// A client must send a whole request head within this time, from the
    /// moment the connection is ready for one.
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/1 keep-alive and idle HTTP/2 alike).
    pub keepalive_idle_secs: u64,
    /// HTTP/2 pings at this interval find peers that vanished; one that
    /// does not answer within the same time is dropped.
    pub h2_keepalive_interval_secs: u64,
    /// At most this many connections at once; further clients wait in the
    /// listen backlog. Clamped to what the file-descriptor limit allows.
    pub max_connections: usize,
    /// On SIGTERM, requests in flight get this long to finish before the
    /// process exits anyway.
    pub shutdown_timeout_secs: u64,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            header_read_timeout_secs: 30,
            keepalive_idle_secs: 120,
            h2_keepalive_interval_secs: 30,
            max_connections: 8192,
            shutdown_timeout_secs: 60,
        }
    }
}

impl Config {
    /// Loads the configuration: defaults, then `file` if given, then the
    /// `GARRET_*` variables that `env` returns (the process environment in
    /// production; a map in tests).
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })?
            }
            None => Self::default(),
        };
        if config.jwt.key().is_some() {
            config.jwt.key_source = Some(TokenKeySource::File);
        }
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let var = |name: &'static str| env(name).filter(|v| !v.is_empty()).map(|v| (name, v));
        if let Some((name, value)) = var("GARRET_LISTEN") {
            self.listen = parse(name, value)?;
        }
        if let Some((_, value)) = var("GARRET_DATA_DIR") {
            self.data_dir = PathBuf::from(value);
        }
        if let Some((_, value)) = var("GARRET_DATABASE_URL") {
            self.database_url = Some(value);
        }
        self.apply_storage_env(&var)?;
        if let Some((name, value)) = var("GARRET_CHUNK_AVG_SIZE") {
            self.chunking.avg_size = parse(name, value)?;
        }
        if let Some((name, value)) = var("GARRET_ACCESS_FLUSH_INTERVAL_SECS") {
            self.access_flush_interval_secs = parse(name, value)?;
        }
        if let Some((name, value)) = var("GARRET_READINESS_INTERVAL_SECS") {
            self.readiness_interval_secs = parse(name, value)?;
        }
        if let Some((_, value)) = var("GARRET_BAZEL_DEFAULT_CACHE") {
            self.bazel_default_cache = value;
        }
        if let Some((name, value)) = var("GARRET_ZSTD_LEVEL") {
            self.chunking.zstd_level = parse(name, value)?;
        }
        if let Some((_, value)) = var("GARRET_API_ENDPOINT") {
            self.api_endpoint = Some(value);
        }
        if let Some((_, value)) = var("GARRET_SUBSTITUTER_ENDPOINT") {
            self.substituter_endpoint = Some(value);
        }
        for (name, algorithm) in [
            ("GARRET_TOKEN_HS256_SECRET_BASE64", JwtAlgorithm::Hs256),
            ("GARRET_TOKEN_RS256_PUBKEY_PEM", JwtAlgorithm::Rs256),
        ] {
            if let Some((name, value)) = var(name) {
                self.jwt
                    .set_key(algorithm, value, TokenKeySource::Env(name));
            }
        }
        self.jwt.apply_attic_env(var);
        if let Some((_, value)) = var("GARRET_TOKEN_BOUND_ISSUER") {
            self.jwt.bound_issuer = Some(value);
        }
        if let Some((_, value)) = var("GARRET_TOKEN_BOUND_AUDIENCES") {
            self.jwt.bound_audiences = value
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect();
        }
        self.limits.apply_env(var)?;
        self.gc.apply_env(var)?;
        Ok(())
    }

    /// Reads the `GARRET_STORAGE`, `GARRET_LOCAL_PATH` and `GARRET_S3_*`
    /// variables.
    fn apply_storage_env(
        &mut self,
        var: &impl Fn(&'static str) -> Option<(&'static str, String)>,
    ) -> Result<(), ConfigError> {
        if let Some((name, value)) = var("GARRET_STORAGE") {
            match value.as_str() {
                "local" => self.storage = Storage::Local { path: None },
                "s3" if !matches!(self.storage, Storage::S3(_)) => {
                    self.storage = Storage::S3(S3Storage {
                        endpoint: None,
                        region: default_region(),
                        bucket: String::new(),
                        prefix: String::new(),
                        path_style: true,
                        access_key_id: None,
                        secret_access_key: None,
                    });
                }
                "s3" => {}
                _ => return Err(env_error(name, value, "expected `local` or `s3`")),
            }
        }
        if let Some((_, value)) = var("GARRET_LOCAL_PATH") {
            match &mut self.storage {
                Storage::Local { path } => *path = Some(PathBuf::from(value)),
                Storage::S3(_) => {
                    return Err(env_error("GARRET_LOCAL_PATH", value, "storage is s3"));
                }
            }
        }
        let s3_vars = [
            "GARRET_S3_ENDPOINT",
            "GARRET_S3_REGION",
            "GARRET_S3_BUCKET",
            "GARRET_S3_PREFIX",
            "GARRET_S3_PATH_STYLE",
        ];
        for name in s3_vars {
            let Some((name, value)) = var(name) else {
                continue;
            };
            let Storage::S3(s3) = &mut self.storage else {
                return Err(env_error(
                    name,
                    value,
                    "storage is local; set GARRET_STORAGE=s3",
                ));
            };
            match name {
                "GARRET_S3_ENDPOINT" => s3.endpoint = Some(value),
                "GARRET_S3_REGION" => s3.region = value,
                "GARRET_S3_BUCKET" => s3.bucket = value,
                "GARRET_S3_PREFIX" => s3.prefix = value,
                _ => s3.path_style = parse(name, value)?,
            }
        }
        Ok(())
    }

    /// Checks what parsing cannot: value ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.chunker()
            .map_err(|e| ConfigError::Invalid(format!("chunking: {e}")))?;
        if !(1..=19).contains(&self.chunking.zstd_level) {
            return Err(ConfigError::Invalid(format!(
                "chunking.zstd_level {} is outside 1..=19",
                self.chunking.zstd_level
            )));
        }
        let url = self.database_url();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(format!(
                "database_url {:?} is neither sqlite: nor postgres://",
                redact_url(&url)
            )));
        }
        if let Storage::S3(s3) = &self.storage {
            if s3.bucket.is_empty() {
                return Err(ConfigError::Invalid(
                    "storage.bucket is required for s3".into(),
                ));
            }
            if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
                return Err(ConfigError::Invalid(
                    "storage.access_key_id and storage.secret_access_key go together".into(),
                ));
            }
        }
        self.limits.validate()?;
        let c = &self.connections;
        if c.header_read_timeout_secs == 0
            || c.keepalive_idle_secs == 0
            || c.h2_keepalive_interval_secs == 0
            || c.max_connections == 0
        {
            return Err(ConfigError::Invalid(
                "connections: timeouts and max_connections must be positive".into(),
            ));
        }
        if self.readiness_interval_secs == 0 {
            return Err(ConfigError::Invalid(
                "readiness_interval_secs must be positive".into(),
            ));
        }
        if self.access_flush_interval_secs == 0 {
            return Err(ConfigError::Invalid(
                "access_flush_interval_secs must be positive".into(),
            ));
        }
        for (name, url) in [
            ("api_endpoint", &self.api_endpoint),
            ("substituter_endpoint", &self.substituter_endpoint),
        ] {
            if let Some(url) = url {
                base_url(url)
                    .map_err(|reason| ConfigError::Invalid(format!("{name} {url:?}: {reason}")))?;
            }
        }
        if self.jwt.bound_issuer.as_deref() == Some("") {
            return Err(ConfigError::Invalid("jwt.bound_issuer is empty".into()));
        }
        Ok(())
    }

    pub fn access_flush_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.access_flush_interval_secs)
    }

    pub fn readiness_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.readiness_interval_secs)
    }

    /// The configured endpoints, each ending in `/` so relative paths
    /// resolve below it.
    pub fn endpoints(&self) -> Endpoints {
        let normalize = |url: &Option<String>| {
            url.as_deref()
                .map(|u| base_url(u).expect("validated at load"))
        };
        Endpoints {
            api: normalize(&self.api_endpoint),
            substituter: normalize(&self.substituter_endpoint),
        }
    }

    /// The database URL, with the embedded default resolved.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("garret.db").display()))
    }

    fn chunker(&self) -> Result<ChunkerConfig, garret_store::chunker::ChunkerConfigError> {
        ChunkerConfig::from_average(self.chunking.avg_size)
    }

    /// The chunk store's settings.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            chunker: self.chunker().expect("validated at load"),
            zstd_level: self.chunking.zstd_level,
            ..StoreConfig::default()
        }
    }

    /// The S3 client settings, if storage is S3.
    pub fn s3_config(&self) -> Option<S3Config> {
        let Storage::S3(s3) = &self.storage else {
            return None;
        };
        Some(S3Config {
            endpoint: s3.endpoint.clone(),
            region: s3.region.clone(),
            bucket: s3.bucket.clone(),
            prefix: s3.prefix.clone(),
            path_style: s3.path_style,
            access_key_id: s3.access_key_id.clone(),
            secret_access_key: s3.secret_access_key.clone(),
            ..S3Config::default()
        })
    }

    /// The local chunk directory, if storage is local.
    pub fn local_path(&self) -> Option<PathBuf> {
        match &self.storage {
            Storage::Local { path } => {
                Some(path.clone().unwrap_or_else(|| self.data_dir.join("chunks")))
            }
            Storage::S3(_) => None,
        }
    }

    /// Every setting by its key, secrets hidden: what `garret check-config
    /// --json` prints. Unset settings are `null`.
    pub fn redacted(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("the configuration is plain data");
        let hidden = serde_json::Value::from("<redacted>");
        if let Some(url) = self.database_url.as_deref() {
            value["database_url"] = redact_url(url).into();
        }
        // The RS256 key may be a private key (Attic's RS256 secret).
        for pointer in [
            "/storage/secret_access_key",
            "/jwt/hs256_secret_base64",
            "/jwt/rs256_pubkey_pem",
        ] {
            if let Some(secret) = value.pointer_mut(pointer).filter(|v| !v.is_null()) {
                *secret = hidden.clone();
            }
        }
        value
    }

    /// One `key = value` line per setting, in TOML's dotted-key form (unset
    /// ones commented out), secrets hidden: what `garret check-config`
    /// prints, and a file it would load.
    pub fn summary(&self) -> String {
        let settings: String = flatten(&self.redacted())
            .into_iter()
            .map(|(key, value)| match value {
                serde_json::Value::Null => format!("# {key} (unset)\n"),
                value => format!("{key} = {value}\n"),
            })
            .collect();
        // Which key verifies tokens, as a comment: it may come from none
        // of the keys above (Attic's variables, the data directory).
        format!("{settings}# token key: {}\n", self.jwt.describe_key())
    }
}

/// The leaves of `value` by their dotted keys, sorted.
fn flatten(value: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        match value {
            serde_json::Value::Object(fields) => {
                for (name, field) in fields {
                    let key = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    walk(&key, field, out);
                }
            }
            leaf => out.push((prefix.to_owned(), leaf.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out
}

/// Where clients reach this server when a proxy stands between: the bases
/// `cache-config` answers with. `None` derives them from each request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// The API root (Attic's `api_endpoint`), ending in `/`.
    pub api: Option<String>,
    /// The base of every cache's substituter URL, ending in `/`.
    pub substituter: Option<String>,
}

/// `url` as a base for relative references: an absolute http(s) URL
/// without query or fragment, ending in `/`.
fn base_url(url: &str) -> Result<String, &'static str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("has no host");
    }
    if url.contains(['?', '#']) || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be a plain URL without query, fragment or spaces");
    }
    Ok(if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    })
}

fn env_error(name: &'static str, value: String, reason: &str) -> ConfigError {
    ConfigError::Env {
        name,
        value,
        reason: reason.to_owned(),
    }
}

fn parse<T: std::str::FromStr>(name: &'static str, value: String) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| {
        let reason = e.to_string();
        env_error(name, value, &reason)
    })
}

/// Hides the password of a `postgres://user:password@host/db` URL.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_owned(),
    }
}

/// Tunables of ByteStream uploads (see `reapi::upload_sessions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadSettings {
    /// Writes streaming at once on this replica. Each holds an ingest
    /// pipeline (a few MiB at most), so this bounds their memory; a Write
    /// past it waits for a slot within the idle timeout, then fails with
    /// RESOURCE_EXHAUSTED.
    pub max_live_writes: usize,
    /// Durable bytes between two records of an upload's progress: what a
    /// crash of this replica can cost the client to send again, against one
    /// metadata transaction and one pause of the upload pipeline per record.
    pub checkpoint_bytes: u64,
    /// How long an interrupted upload waits to be resumed.
    pub session_ttl: std::time::Duration,
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            max_live_writes: 64,
            checkpoint_bytes: 16 << 20,
            session_ttl: std::time::Duration::from_hours(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(toml: Option<&str>, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garret.toml");
        if let Some(toml) = toml {
            std::fs::write(&path, toml).unwrap();
        }
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load(toml.map(|_| path.as_path()), |name| vars.get(name).cloned())
    }

    /// A row of CONFIGURATION.md's settings table, cells without backticks.
    struct Row {
        key: String,
        variable: Option<String>,
        default: String,
        example: String,
    }

    const REFERENCE: &str = include_str!("../CONFIGURATION.md");

    fn reference_rows() -> Vec<Row> {
        let settings = REFERENCE
            .split("\n## Settings\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("CONFIGURATION.md has a Settings section");
        let bare = |cell: &str| cell.trim().trim_matches('`').to_owned();
        settings
            .lines()
            .filter(|line| line.starts_with("| `"))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').collect();
                assert_eq!(cells.len(), 8, "six cells: {line}");
                let variable = bare(cells[3]);
                Row {
                    key: bare(cells[1]),
                    variable: (!variable.is_empty()).then_some(variable),
                    default: bare(cells[4]),
                    example: bare(cells[5]),
                }
            })
            .collect()
    }

    /// A TOML value written in the reference, as the JSON the configuration
    /// serializes to.
    fn toml_value(text: &str) -> serde_json::Value {
        let doc: toml::Table = toml::from_str(&format!("v = {text}"))
            .unwrap_or_else(|e| panic!("`{text}` is not a TOML value: {e}"));
        serde_json::to_value(&doc["v"]).unwrap()
    }

    /// What setting `key` to a value needs besides: S3's keys live in an
    /// `s3` storage table with a bucket, and the access key pair goes
    /// together. As (file lines, variables).
    fn prerequisites(key: &str) -> (String, Vec<(&'static str, &'static str)>) {
        let Some(field) = key.strip_prefix("storage.") else {
            return (String::new(), Vec::new());
        };
        match field {
            "type" => ("bucket = \"b\"\n".into(), vec![("GARRET_S3_BUCKET", "b")]),
            "path" => ("type = \"local\"\n".into(), Vec::new()),
            _ => {
                let mut lines = String::from("type = \"s3\"\n");
                let mut vars = vec![("GARRET_STORAGE", "s3")];
                if field != "bucket" {
                    lines.push_str("bucket = \"b\"\n");
                    vars.push(("GARRET_S3_BUCKET", "b"));
                }
                match field {
                    "access_key_id" => lines.push_str("secret_access_key = \"x\"\n"),
                    "secret_access_key" => lines.push_str("access_key_id = \"x\"\n"),
                    _ => {}
                }
                (lines, vars)
            }
        }
    }

    /// `key = value` as a file: a dotted key's last part in its table.
    fn file_setting(key: &str, value: &str) -> String {
        let (lines, _) = prerequisites(key);
        match key.rsplit_once('.') {
            Some((table, field)) => format!("[{table}]\n{lines}{field} = {value}\n"),
            None => format!("{key} = {value}\n"),
        }
    }

    /// A TOML example as a variable carries it: strings bare, lists
    /// comma-separated.
    fn variable_value(example: &serde_json::Value) -> String {
        match example {
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().expect("lists of strings").to_owned())
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        }
    }

    fn settings(config: &Config) -> HashMap<String, serde_json::Value> {
        flatten(&serde_json::to_value(config).unwrap())
            .into_iter()
            .collect()
    }

    #[test]
    fn reference_matches_the_code() {
        let rows = reference_rows();
        let mut defaults = settings(&Config::default());
        let s3 = load(Some("[storage]\ntype = \"s3\"\nbucket = \"b\"\n"), &[]).unwrap();
        defaults.extend(
            settings(&s3)
                .into_iter()
                .filter(|(key, _)| key.starts_with("storage.") && key != "storage.type"),
        );
        let documented: std::collections::BTreeSet<&str> =
            rows.iter().map(|row| row.key.as_str()).collect();
        let in_code: std::collections::BTreeSet<&str> =
            defaults.keys().map(String::as_str).collect();
        assert_eq!(documented, in_code, "CONFIGURATION.md's keys and Config's");
        assert_eq!(documented.len(), rows.len(), "a key documented twice");

        for row in &rows {
            let key = row.key.as_str();
            match row.default.as_str() {
                "none" => assert_eq!(defaults[key], serde_json::Value::Null, "{key}"),
                "required" => {
                    let (without, _) = prerequisites(key);
                    assert!(load(Some(&format!("[storage]\n{without}")), &[]).is_err());
                }
                default => assert_eq!(defaults[key], toml_value(default), "{key}'s default"),
            }

            let example = toml_value(&row.example);
            assert_ne!(defaults[key], example, "{key}'s example is its default");
            let from_file = load(Some(&file_setting(key, &row.example)), &[])
                .unwrap_or_else(|e| panic!("{key} = {}: {e}", row.example));
            assert_eq!(settings(&from_file)[key], example, "{key} from the file");

            if let Some(variable) = &row.variable {
                let value = variable_value(&example);
                let (_, mut vars) = prerequisites(key);
                vars.push((variable.as_str(), value.as_str()));
                let from_env =
                    load(None, &vars).unwrap_or_else(|e| panic!("{variable}={value}: {e}"));
                assert_eq!(settings(&from_env)[key], example, "{key} from {variable}");
            }
        }
    }

    #[test]
    fn reference_names_every_variable_read() {
        let source = include_str!("config.rs");
        for (prefix, at_least) in [("GARRET_", 30), ("ATTIC_SERVER_", 3)] {
            let quoted = format!("\"{prefix}");
            let mut rest = source;
            let mut seen = 0;
            while let Some(start) = rest.find(&quoted) {
                let name: String = rest[start + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                assert!(
                    name.len() <= prefix.len() || REFERENCE.contains(&format!("`{name}`")),
                    "{name} is read but not in CONFIGURATION.md"
                );
                seen += 1;
                rest = &rest[start + 1..];
            }
            assert!(
                seen > at_least,
                "the scan found the {prefix} variables ({seen})"
            );
        }
    }

    #[test]
    fn defaults_are_embedded() {
        let config = load(None, &[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.database_url(), "sqlite:garret-data/garret.db");
        assert_eq!(
            config.local_path(),
            Some(PathBuf::from("garret-data/chunks"))
        );
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.store_config().chunker, ChunkerConfig::default());
    }

    #[test]
    fn file_then_environment() {
        let toml = r#"
            listen = "0.0.0.0:9000"
            database_url = "postgres://garret:s3cret@db-rw:5432/garret"
            [storage]
            type = "s3"
            endpoint = "http://attic-rustfs:9000"
            bucket = "garret"
            [chunking]
            avg_size = 131072
            [limits]
            max_nar_size = 1000
        "#;
        let config = load(
            Some(toml),
            &[
                ("GARRET_S3_PREFIX", "honey"),
                ("GARRET_ZSTD_LEVEL", "5"),
                ("GARRET_MAX_DECOMPRESSION_RATIO", "20"),
                ("GARRET_DECOMPRESSION_RATIO_FLOOR", "1048576"),
                ("GARRET_MAX_DECOMPRESSION_MEMORY", "67108864"),
                ("GARRET_ACCESS_FLUSH_INTERVAL_SECS", "2"),
            ],
        )
        .unwrap();
        assert_eq!(config.access_flush_interval_secs, 2);
        assert!(
            config
                .summary()
                .lines()
                .any(|l| l == "access_flush_interval_secs = 2")
        );
        assert_eq!(config.listen.to_string(), "0.0.0.0:9000");
        let s3 = config.s3_config().unwrap();
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str(), s3.path_style),
            ("garret", "honey", true)
        );
        assert_eq!(s3.endpoint.as_deref(), Some("http://attic-rustfs:9000"));
        assert_eq!(config.store_config().chunker.max_size, 4 * 131_072);
        assert_eq!(config.store_config().zstd_level, 5);
        assert_eq!(config.limits.max_nar_size, 1000);
        assert_eq!(
            (
                config.limits.max_decompression_ratio,
                config.limits.decompression_ratio_floor,
                config.limits.max_decompression_memory
            ),
            (20, 1 << 20, 64 << 20)
        );
        assert!(
            config
                .summary()
                .contains("postgres://garret:<redacted>@db-rw:5432/garret")
        );
        assert!(!config.summary().contains("s3cret"));
    }

    #[test]
    fn gc_default_retention_from_file_or_environment() {
        assert_eq!(load(None, &[]).unwrap().gc.default_retention, None);
        let config = load(Some("[gc]\ndefault_retention = \"30d\"\n"), &[]).unwrap();
        assert_eq!(
            config.gc.default_retention,
            Some(std::time::Duration::from_hours(30 * 24))
        );
        assert!(
            config
                .summary()
                .lines()
                .any(|l| l == "gc.default_retention = \"30d\"")
        );
        let config = load(
            Some("[gc]\ndefault_retention = \"30d\"\n"),
            &[("GARRET_GC_DEFAULT_RETENTION", "12h")],
        )
        .unwrap();
        assert_eq!(
            config.gc.default_retention,
            Some(std::time::Duration::from_hours(12))
        );
        let err = load(Some("[gc]\ndefault_retention = \"soon\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("invalid duration `soon`"), "{err}");
        let err = load(None, &[("GARRET_GC_DEFAULT_RETENTION", "0s")]).unwrap_err();
        assert!(err.to_string().contains("longer than zero"), "{err}");
    }

    #[test]
    fn environment_alone_selects_s3() {
        let config = load(None, &[("GARRET_STORAGE", "s3"), ("GARRET_S3_BUCKET", "b")]).unwrap();
        assert_eq!(config.s3_config().unwrap().bucket, "b");
        assert_eq!(config.local_path(), None);
    }

    /// A config file (if any), environment variables, and a fragment of the
    /// error they must produce.
    type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);

    #[test]
    fn rejects_bad_configuration() {
        let cases: &[Case] = &[
            (Some("listen = 8080"), &[], "invalid type"),
            (Some("colour = \"blue\""), &[], "unknown field"),
            (Some("[storage]\ntype = \"ftp\""), &[], "unknown variant"),
            (
                Some("[storage]\ntype = \"s3\"\nbucket = \"\""),
                &[],
                "bucket is required",
            ),
            (Some("[chunking]\navg_size = 1000"), &[], "power of two"),
            (Some("[chunking]\nzstd_level = 30"), &[], "zstd_level"),
            (Some("database_url = \"mysql://x\""), &[], "neither sqlite"),
            (
                Some("access_flush_interval_secs = 0"),
                &[],
                "access_flush_interval_secs must be positive",
            ),
            (None, &[("GARRET_LISTEN", "nowhere")], "GARRET_LISTEN"),
            (None, &[("GARRET_S3_BUCKET", "b")], "set GARRET_STORAGE=s3"),
            (
                None,
                &[("GARRET_STORAGE", "tape")],
                "expected `local` or `s3`",
            ),
            (
                None,
                &[("GARRET_MAX_NAR_SIZE", "-1")],
                "GARRET_MAX_NAR_SIZE",
            ),
            (
                Some("[limits]\nmax_decompression_ratio = 0"),
                &[],
                "limits.max_decompression_ratio must be positive",
            ),
            (
                None,
                &[("GARRET_MAX_DECOMPRESSION_MEMORY", "lots")],
                "GARRET_MAX_DECOMPRESSION_MEMORY",
            ),
        ];
        for (toml, vars, expected) in cases {
            let err = load(*toml, vars).unwrap_err().to_string();
            assert!(err.contains(expected), "{toml:?} {vars:?}: {err}");
        }
        let missing = Config::load(Some(Path::new("/nonexistent/garret.toml")), |_| None);
        assert!(matches!(missing, Err(ConfigError::Read { .. })));
    }

    #[test]
    fn token_keys_come_from_the_file_or_the_environment_and_stay_hidden() {
        let toml = "[jwt]\nhs256_secret_base64 = \"c2VjcmV0\"\n";
        let config = load(Some(toml), &[]).unwrap();
        assert_eq!(config.jwt.hs256_secret_base64.as_deref(), Some("c2VjcmV0"));
        assert!(!format!("{config:?}").contains("c2VjcmV0"));
        let config = load(
            Some(toml),
            &[
                ("GARRET_TOKEN_HS256_SECRET_BASE64", "ZW52"),
                (
                    "GARRET_TOKEN_RS256_PUBKEY_PEM",
                    "-----BEGIN PUBLIC KEY-----",
                ),
            ],
        )
        .unwrap();
        assert_eq!(config.jwt.hs256_secret_base64.as_deref(), Some("ZW52"));
        assert!(config.jwt.rs256_pubkey_pem.is_some());
    }

    #[test]
    fn attic_token_key_variables_are_fallbacks() {
        let attic_hs256 = ("ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64", "YXR0aWM=");
        let config = load(None, &[attic_hs256]).unwrap();
        assert_eq!(config.jwt.hs256_secret_base64.as_deref(), Some("YXR0aWM="));
        assert!(
            config
                .summary()
                .contains("token key: HS256 from ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64\n"),
            "{}",
            config.summary()
        );
        // Attic's own order: an RS256 key before the HS256 secret. Its
        // "secret" is a private key, kept out of Debug.
        let config = load(
            None,
            &[
                attic_hs256,
                ("ATTIC_SERVER_TOKEN_RS256_SECRET_BASE64", "cHJpdmF0ZQ=="),
            ],
        )
        .unwrap();
        assert_eq!(config.jwt.hs256_secret_base64, None);
        assert_eq!(config.jwt.rs256_pubkey_pem.as_deref(), Some("cHJpdmF0ZQ=="));
        assert!(!format!("{config:?}").contains("cHJpdmF0ZQ=="));
        assert!(
            config
                .summary()
                .contains("token key: RS256 from ATTIC_SERVER_TOKEN_RS256_SECRET_BASE64\n")
        );
        // garret's own key wins, from the environment or the file; an empty
        // variable is unset, as Attic reads it.
        let config = load(
            None,
            &[
                ("GARRET_TOKEN_HS256_SECRET_BASE64", "Z2FycmV0"),
                attic_hs256,
                ("ATTIC_SERVER_TOKEN_RS256_PUBKEY_BASE64", ""),
            ],
        )
        .unwrap();
        assert_eq!(config.jwt.hs256_secret_base64.as_deref(), Some("Z2FycmV0"));
        assert_eq!(config.jwt.rs256_pubkey_pem, None);
        assert!(
            config
                .summary()
                .contains("token key: HS256 from GARRET_TOKEN_HS256_SECRET_BASE64\n")
        );
        let toml = "[jwt]\nhs256_secret_base64 = \"Z2FycmV0\"\n";
        let config = load(Some(toml), &[attic_hs256]).unwrap();
        assert_eq!(config.jwt.hs256_secret_base64.as_deref(), Some("Z2FycmV0"));
        assert!(
            config
                .summary()
                .contains("token key: HS256 from [jwt] in the configuration file\n")
        );
        // An RS256 key beside the file's HS256 secret: the secret wins, and
        // the summary names its source.
        let config = load(
            Some(toml),
            &[(
                "GARRET_TOKEN_RS256_PUBKEY_PEM",
                "-----BEGIN PUBLIC KEY-----",
            )],
        )
        .unwrap();
        assert_eq!(config.jwt.key_source, Some(TokenKeySource::File));
        let config = load(None, &[]).unwrap();
        assert!(
            config
                .summary()
                .contains("token key: HS256 from <data_dir>/token-secret")
        );
    }

    #[test]
    fn endpoints_and_token_binding() {
        let toml = r#"
            api_endpoint = "https://cache.honey.example"
            substituter_endpoint = "https://nix.honey.example/"
            [jwt]
            bound_issuer = "honey"
            bound_audiences = ["garret"]
        "#;
        let config = load(Some(toml), &[]).unwrap();
        assert_eq!(
            config.endpoints(),
            Endpoints {
                api: Some("https://cache.honey.example/".into()),
                substituter: Some("https://nix.honey.example/".into()),
            }
        );
        assert_eq!(config.jwt.bound_issuer.as_deref(), Some("honey"));
        let config = load(
            None,
            &[
                ("GARRET_API_ENDPOINT", "http://10.0.0.1:8080/garret"),
                ("GARRET_TOKEN_BOUND_ISSUER", "ci"),
                ("GARRET_TOKEN_BOUND_AUDIENCES", "a, b"),
            ],
        )
        .unwrap();
        assert_eq!(
            config.endpoints().api.as_deref(),
            Some("http://10.0.0.1:8080/garret/")
        );
        assert_eq!(config.endpoints().substituter, None);
        assert_eq!(config.jwt.bound_audiences, ["a", "b"]);
        for bad in ["cache.example", "http://", "https://x/?a=b", "ftp://x"] {
            let err = load(None, &[("GARRET_API_ENDPOINT", bad)]).unwrap_err();
            assert!(err.to_string().contains("api_endpoint"), "{bad}: {err}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let toml = "[storage]\ntype = \"s3\"\nbucket = \"b\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SK-secret\"";
        let config = load(Some(toml), &[]).unwrap();
        assert!(!format!("{config:?}").contains("SK-secret"));
    }
}
