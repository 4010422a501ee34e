//! What to probe, from flags or, for a bare run on a runner pod, from the
//! environment Nix and Attic's users already have: `ATTIC_*` variables,
//! nix.conf and its netrc. Each setting remembers where it came from, so
//! the report can say which file to fix.

use std::fmt;

use garret_nix::StorePathHash;
use garret_nix::signing::VerifyingKey;
use hyper::Uri;

use super::netrc;
use super::nix_conf::{self, NixConf};
use crate::auth::CacheName;

/// What the command line said; each unset one falls back to the environment.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub nix: Option<String>,
    pub reapi: Option<String>,
    pub token: Option<String>,
    pub public_keys: Vec<String>,
    pub path: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error(
        "nothing to probe: give --nix URL and/or --reapi grpc://HOST:PORT[/INSTANCE], \
         or set ATTIC_SERVER and ATTIC_CACHE, or list the cache in nix.conf's substituters"
    )]
    NothingToProbe,
    #[error("invalid Nix cache URL {url:?}: {why}")]
    NixUrl { url: String, why: String },
    #[error("invalid REAPI endpoint {url:?}: {why} (expected grpc[s]://HOST:PORT[/INSTANCE])")]
    ReapiUrl { url: String, why: String },
    #[error("invalid --public-key {key:?}: {why} (expected NAME:BASE64)")]
    PublicKey { key: String, why: String },
    #[error("invalid --path {path:?}: {why}")]
    Path { path: String, why: String },
}

/// Everything one probe run needs.
#[derive(Debug)]
pub struct Target {
    pub nix: Option<NixTarget>,
    pub reapi: Option<ReapiTarget>,
    pub token: Option<Sourced<Token>>,
    /// The keys the cache's key must be one of; empty when none was given.
    pub expected_keys: Sourced<Vec<VerifyingKey>>,
    /// A path the cache is known to hold, for the narinfo round trip when
    /// there is no canary.
    pub known_path: Option<StorePathHash>,
}

/// A setting and where it came from (`--nix`, `ATTIC_TOKEN`, a file).
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub value: T,
    pub source: String,
}

impl<T> Sourced<T> {
    fn new(value: T, source: impl Into<String>) -> Self {
        Self {
            value,
            source: source.into(),
        }
    }
}

/// A bearer token, kept out of logs and debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// A Nix binary cache: its substituter URL, which names the cache last.
#[derive(Debug, Clone)]
pub struct NixTarget {
    /// Without a trailing slash: `https://cache.example/main`.
    pub cache_url: String,
    pub cache: CacheName,
    /// The server's root, where Attic's API lives unless the cache's
    /// configuration names another: `https://cache.example/`.
    pub server: String,
    pub source: String,
}

impl NixTarget {
    pub fn parse(url: &str, source: impl Into<String>) -> Result<Self, TargetError> {
        let bad = |why: &str| TargetError::NixUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let parsed: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            return Err(bad("only http:// and https:// caches can be probed"));
        }
        if parsed.query().is_some() {
            return Err(bad("a query is not part of a cache URL"));
        }
        let cache_url = url.trim_end_matches('/').to_owned();
        let (server, name) = cache_url
            .rsplit_once('/')
            .filter(|_| !parsed.path().trim_matches('/').is_empty())
            .ok_or_else(|| bad("the URL must end in the cache's name"))?;
        let cache = CacheName::new(name).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            server: format!("{server}/"),
            cache_url: cache_url.clone(),
            cache,
            source: source.into(),
        })
    }

    /// The host, for the netrc lookup.
    fn host(&self) -> Option<String> {
        host_of(&self.cache_url)
    }
}

/// A REAPI endpoint: where to connect, whether with TLS, and the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapiTarget {
    /// `http://host:port` or `https://host:port`, for the gRPC channel.
    pub endpoint: String,
    pub tls: bool,
    /// Empty for the server's default instance.
    pub instance: String,
}

impl ReapiTarget {
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let bad = |why: &str| TargetError::ReapiUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let parsed: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        let (tls, default_port) = match parsed.scheme_str() {
            Some("grpc") => (false, 80),
            Some("grpcs") => (true, 443),
            _ => return Err(bad("the scheme must be grpc:// or grpcs://")),
        };
        let host = parsed.host().ok_or_else(|| bad("no host"))?;
        let port = parsed.port_u16().unwrap_or(default_port);
        Ok(Self {
            endpoint: format!("{}://{host}:{port}", if tls { "https" } else { "http" }),
            tls,
            instance: parsed.path().trim_matches('/').to_owned(),
        })
    }

    /// How reports name the instance.
    pub fn instance_label(&self) -> String {
        if self.instance.is_empty() {
            "the default instance".into()
        } else {
            format!("instance `{}`", self.instance)
        }
    }
}

/// The upstream cache every nix.conf lists; a bare probe is about ours.
const UPSTREAM_CACHE_HOST: &str = "cache.nixos.org";

impl Target {
    /// Flags first; for what they leave unset, `var` (the environment) and
    /// the nix.conf it points to:
    ///
    /// - the Nix cache: `ATTIC_SERVER` (the server's URL) and `ATTIC_CACHE`,
    ///   else the first of nix.conf's `substituters` under `ATTIC_SERVER`,
    ///   else the first that is not cache.nixos.org;
    /// - the token: `ATTIC_TOKEN`, else the password nix.conf's `netrc-file`
    ///   (default `$NIX_CONF_DIR/netrc`) holds for the cache's host;
    /// - the expected keys: nix.conf's `trusted-public-keys` (the cache's key
    ///   must be one of them).
    ///
    /// The REAPI endpoint comes only from its flag: no Bazel file is read.
    pub fn resolve(
        flags: Flags,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TargetError> {
        let conf = NixConf::load(&var);
        let nix = match flags.nix {
            Some(url) => Some(NixTarget::parse(&url, "--nix")?),
            None => nix_from_environment(&conf, &var)?,
        };
        let reapi = flags.reapi.as_deref().map(ReapiTarget::parse).transpose()?;
        if nix.is_none() && reapi.is_none() {
            return Err(TargetError::NothingToProbe);
        }
        let token = flags
            .token
            .map(|t| Sourced::new(Token(t), "--token"))
            .or_else(|| var("ATTIC_TOKEN").map(|t| Sourced::new(Token(t), "ATTIC_TOKEN")))
            .or_else(|| token_from_netrc(&conf, &var, nix.as_ref()?));
        let expected_keys = if flags.public_keys.is_empty() {
            // Nix refuses a nix.conf with a malformed key; the probe just
            // does not expect it.
            let keys = conf
                .list("trusted-public-keys")
                .into_iter()
                .filter_map(|k| k.parse().ok())
                .collect::<Vec<VerifyingKey>>();
            Sourced::new(keys, "nix.conf's trusted-public-keys")
        } else {
            let keys = flags
                .public_keys
                .iter()
                .map(|k| {
                    k.parse().map_err(|e: garret_nix::signing::SigningError| {
                        TargetError::PublicKey {
                            key: k.clone(),
                            why: e.to_string(),
                        }
                    })
                })
                .collect::<Result<Vec<VerifyingKey>, _>>()?;
            Sourced::new(keys, "--public-key")
        };
        let known_path = flags.path.as_deref().map(parse_path).transpose()?;
        Ok(Self {
            nix,
            reapi,
            token,
            expected_keys,
            known_path,
        })
    }
}

fn nix_from_environment(
    conf: &NixConf,
    var: &impl Fn(&str) -> Option<String>,
) -> Result<Option<NixTarget>, TargetError> {
    let server = var("ATTIC_SERVER").filter(|s| !s.is_empty());
    if let (Some(server), Some(cache)) = (&server, var("ATTIC_CACHE")) {
        let url = format!("{}/{cache}", server.trim_end_matches('/'));
        return NixTarget::parse(&url, "ATTIC_SERVER and ATTIC_CACHE").map(Some);
    }
    let substituters = conf.list("substituters");
    let chosen = match &server {
        Some(server) => substituters.iter().find(|s| s.starts_with(server.as_str())),
        None => substituters
            .iter()
            .find(|s| host_of(s).as_deref() != Some(UPSTREAM_CACHE_HOST)),
    };
    chosen
        .map(|url| NixTarget::parse(url, "nix.conf's substituters"))
        .transpose()
}

fn token_from_netrc(
    conf: &NixConf,
    var: &impl Fn(&str) -> Option<String>,
    nix: &NixTarget,
) -> Option<Sourced<Token>> {
    let file = conf.get("netrc-file").map_or_else(
        || nix_conf::conf_dir(var).join("netrc"),
        std::path::PathBuf::from,
    );
    let text = std::fs::read_to_string(&file).ok()?;
    let password = netrc::password_for(&text, &nix.host()?)?;
    Some(Sourced::new(
        Token(password),
        format!("netrc {}", file.display()),
    ))
}

fn host_of(url: &str) -> Option<String> {
    url.parse::<Uri>().ok()?.host().map(str::to_owned)
}

/// A store path (`/nix/store/<hash>-<name>`), its base name or its hash.
fn parse_path(path: &str) -> Result<StorePathHash, TargetError> {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.get(..32)
        .unwrap_or(base)
        .parse()
        .map_err(
            |e: garret_nix::store_path::StorePathError| TargetError::Path {
                path: path.to_owned(),
                why: e.to_string(),
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn nix_urls_name_the_cache_last() {
        let target = NixTarget::parse("https://cache.example/main/", "--nix").unwrap();
        assert_eq!(target.cache_url, "https://cache.example/main");
        assert_eq!(target.cache.as_str(), "main");
        assert_eq!(target.server, "https://cache.example/");
        let nested = NixTarget::parse("http://h:8080/nix/team-a", "--nix").unwrap();
        assert_eq!(nested.server, "http://h:8080/nix/");
        for bad in [
            "https://cache.example/",
            "https://cache.example",
            "ftp://h/c",
            "http://h/c?x=1",
            "h/c",
        ] {
            assert!(NixTarget::parse(bad, "--nix").is_err(), "{bad}");
        }
    }

    #[test]
    fn reapi_urls() {
        let t = ReapiTarget::parse("grpcs://cache.example/team/a").unwrap();
        assert_eq!(t.endpoint, "https://cache.example:443");
        assert!(t.tls);
        assert_eq!(t.instance, "team/a");
        let t = ReapiTarget::parse("grpc://127.0.0.1:9092").unwrap();
        assert_eq!(t.endpoint, "http://127.0.0.1:9092");
        assert_eq!(t.instance_label(), "the default instance");
        assert!(ReapiTarget::parse("http://h:1").is_err());
    }

    #[test]
    fn flags_win_and_nothing_is_a_usage_error() {
        let empty = env(&[("NIX_CONF_DIR", "/nonexistent"), ("HOME", "/nonexistent")]);
        assert_eq!(
            Target::resolve(Flags::default(), &empty).unwrap_err(),
            TargetError::NothingToProbe
        );
        let flags = Flags {
            nix: Some("http://h/c".into()),
            token: Some("t".into()),
            path: Some("/nix/store/00000000000000000000000000000000-x".into()),
            ..Flags::default()
        };
        let vars = env(&[("ATTIC_TOKEN", "other"), ("NIX_CONF_DIR", "/nonexistent")]);
        let target = Target::resolve(flags, vars).unwrap();
        assert_eq!(target.token.unwrap().value.as_str(), "t");
        assert!(target.known_path.is_some());
        let bad_key = Flags {
            nix: Some("http://h/c".into()),
            public_keys: vec!["nokey".into()],
            ..Flags::default()
        };
        assert!(matches!(
            Target::resolve(bad_key, &empty),
            Err(TargetError::PublicKey { .. })
        ));
    }

    #[test]
    fn a_bare_run_reads_attic_variables_then_nix_conf() {
        let dir = tempfile::tempdir().unwrap();
        let key = garret_nix::signing::SigningKey::generate("c-1").unwrap();
        std::fs::write(
            dir.path().join("nix.conf"),
            format!(
                "substituters = https://cache.nixos.org https://cache.example/main\n\
                 trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= {}\n",
                key.verifying_key()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("netrc"),
            "machine cache.example login x password from-netrc\n",
        )
        .unwrap();
        let conf_dir = dir.path().to_str().unwrap();
        let base = [("NIX_CONF_DIR", conf_dir), ("HOME", "/nonexistent")];
        let target = Target::resolve(Flags::default(), env(&base)).unwrap();
        let nix = target.nix.unwrap();
        assert_eq!(nix.cache_url, "https://cache.example/main");
        assert_eq!(nix.source, "nix.conf's substituters");
        let token = target.token.unwrap();
        assert_eq!(token.value.as_str(), "from-netrc");
        assert!(token.source.starts_with("netrc "), "{}", token.source);
        assert_eq!(target.expected_keys.value.len(), 2);

        let attic = [
            base[0],
            base[1],
            ("ATTIC_SERVER", "http://other:8080/"),
            ("ATTIC_CACHE", "ci"),
            ("ATTIC_TOKEN", "from-env"),
        ];
        let target = Target::resolve(Flags::default(), env(&attic)).unwrap();
        assert_eq!(target.nix.unwrap().cache_url, "http://other:8080/ci");
        assert_eq!(target.token.unwrap().value.as_str(), "from-env");
    }
}
