//! `garret token create`, the equivalent of `atticadm make-token`.
//!
//! Signing keys are read from files or the environment only: a secret passed
//! as a plain argument would end up in shell history and in `ps` output.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::builder::NonEmptyStringValueParser;
use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Subcommand};
use garret_server::auth::{
    AtticAccess, CacheName, CacheNamePattern, Permission, TokenAuthority, TokenSpec,
};
use garret_server::units::parse_duration;

/// Attic's `token-hs256-secret-base64`, under our prefix.
const HS256_ENV: &str = "GARRET_TOKEN_HS256_SECRET_BASE64";
/// Attic's `token-rs256-secret-base64` (base64 of the PEM; raw PEM also works).
const RS256_ENV: &str = "GARRET_TOKEN_RS256_SECRET_BASE64";

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Mints a token and prints it on standard output, like `atticadm
    /// make-token`.
    ///
    /// A cache gets the grant of the entry naming it exactly, else that of the
    /// first pattern, in command-line order, that matches it. Grants never
    /// combine: with `--pull 'team-*' --push team-ci`, `team-ci` can push but
    /// not pull. A warning on standard error points out such cases.
    ///
    /// The signing key comes from exactly one of --hs256-secret-file,
    /// --rs256-key-file, $GARRET_TOKEN_HS256_SECRET_BASE64 or
    /// $GARRET_TOKEN_RS256_SECRET_BASE64, the server's own key.
    Create(Create),
}

impl TokenCommand {
    pub(super) fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Create(create) => create.run(),
        }
    }
}

#[derive(Debug, Args)]
pub(super) struct Create {
    /// Who the token is for (`sub`); refusals name it, so make it findable.
    #[arg(long, value_name = "NAME", value_parser = NonEmptyStringValueParser::new())]
    sub: String,

    /// How long the token is valid, e.g. 1y, 90d, 12h or 1d12h (y = 365 days,
    /// m = minutes).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    validity: Duration,

    #[command(flatten)]
    grants: Grants,

    /// Puts this issuer (`iss`) in the token, for a server that binds one.
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    issuer: Option<String>,

    /// Puts this audience (`aud`) in the token; repeatable. A server that
    /// binds audiences accepts a token naming any of them.
    #[arg(long = "audience", value_name = "AUDIENCE", value_parser = NonEmptyStringValueParser::new())]
    audiences: Vec<String>,

    /// File holding the base64 HS256 secret (the server's
    /// `token-hs256-secret-base64`); or set $GARRET_TOKEN_HS256_SECRET_BASE64.
    #[arg(long, value_name = "PATH", help_heading = "Signing key")]
    hs256_secret_file: Option<PathBuf>,

    /// PEM file holding the RSA private key; or set
    /// $GARRET_TOKEN_RS256_SECRET_BASE64 to base64 of the PEM.
    #[arg(long, value_name = "PATH", help_heading = "Signing key")]
    rs256_key_file: Option<PathBuf>,
}

impl Create {
    fn run(self) -> anyhow::Result<()> {
        if self.grants.0.is_empty() {
            let flags: Vec<String> = GRANT_FLAGS
                .iter()
                .map(|(flag, ..)| format!("--{flag}"))
                .collect();
            bail!(
                "no grants: a token without permissions can do nothing; grant at least one of \
                 {} on a cache name or pattern, e.g. --pull 'team-*'",
                flags.join(", ")
            );
        }
        let source = KeySource::choose(self.hs256_secret_file, self.rs256_key_file, |name| {
            std::env::var_os(name)
        })?;
        let mut authority = source.load()?;
        if let Some(issuer) = self.issuer {
            authority = authority.with_issuer(issuer);
        }
        if !self.audiences.is_empty() {
            authority = authority.with_audiences(self.audiences);
        }
        let mut spec = TokenSpec::new(self.sub, self.validity);
        for (pattern, permission) in self.grants.0 {
            spec.grant(pattern, permission);
        }
        for warning in precedence_warnings(&spec.access) {
            eprintln!("warning: {warning}");
        }
        let jwt = authority.mint(&spec).context("minting the token")?;
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{jwt}")?;
        stdout.flush()?;
        Ok(())
    }
}

/// The grant flags, named as in `atticadm make-token`. The names are also how
/// [`Permission`] displays each flag, so messages can suggest a flag to add.
const GRANT_FLAGS: [(&str, Permission, &str); 7] = [
    (
        "pull",
        Permission::PULL,
        "Lets the token read from caches matching PATTERN (r)",
    ),
    (
        "push",
        Permission::PUSH,
        "Lets the token upload to caches matching PATTERN (w)",
    ),
    (
        "delete",
        Permission::DELETE,
        "Lets the token delete objects from caches matching PATTERN (d)",
    ),
    (
        "create-cache",
        Permission::CREATE_CACHE,
        "Lets the token create caches whose names match PATTERN (cc)",
    ),
    (
        "configure-cache",
        Permission::CONFIGURE_CACHE,
        "Lets the token change the settings of caches matching PATTERN (cr)",
    ),
    (
        "configure-cache-retention",
        Permission::CONFIGURE_CACHE_RETENTION,
        "Lets the token change the retention period of caches matching PATTERN (cq)",
    ),
    (
        "destroy-cache",
        Permission::DESTROY_CACHE,
        "Lets the token destroy caches matching PATTERN (cd)",
    ),
];

/// The grants in command-line order. Order is meaning, since the first
/// matching pattern wins, but derive would group the values by flag (as
/// `atticadm` does), so these flags are read by hand with clap's value
/// indices.
#[derive(Debug)]
struct Grants(Vec<(CacheNamePattern, Permission)>);

impl FromArgMatches for Grants {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut grants = Vec::new();
        for (flag, permission, _) in GRANT_FLAGS {
            if let (Some(indices), Some(patterns)) = (
                matches.indices_of(flag),
                matches.get_many::<CacheNamePattern>(flag),
            ) {
                grants.extend(
                    indices
                        .zip(patterns)
                        .map(|(index, pattern)| (index, pattern.clone(), permission)),
                );
            }
        }
        grants.sort_by_key(|&(index, ..)| index);
        Ok(Self(
            grants
                .into_iter()
                .map(|(_, pattern, permission)| (pattern, permission))
                .collect(),
        ))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for Grants {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        GRANT_FLAGS.iter().fold(cmd, |cmd, &(flag, _, help)| {
            cmd.arg(
                Arg::new(flag)
                    .long(flag)
                    .value_name("PATTERN")
                    .action(ArgAction::Append)
                    .value_parser(|s: &str| s.parse::<CacheNamePattern>())
                    .help(help)
                    .help_heading("Grants (repeatable; * and ? are wildcards)"),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Where the signing key comes from, kept to name it in errors.
#[derive(Debug)]
enum KeySource {
    Hs256File(PathBuf),
    Hs256Env(String),
    Rs256File(PathBuf),
    Rs256Env(String),
}

impl KeySource {
    /// Exactly one source, never a precedence order: a variable left over in
    /// a shell profile must not silently sign with a different key than the
    /// one named on the command line, or the other way round.
    fn choose(
        hs256_file: Option<PathBuf>,
        rs256_file: Option<PathBuf>,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> anyhow::Result<Self> {
        let from_env = |name: &str| {
            env(name)
                .map(|value| {
                    value
                        .into_string()
                        .map_err(|_| anyhow!("${name} is not valid UTF-8"))
                })
                .transpose()
        };
        let mut sources = Vec::new();
        sources.extend(hs256_file.map(Self::Hs256File));
        sources.extend(rs256_file.map(Self::Rs256File));
        sources.extend(from_env(HS256_ENV)?.map(Self::Hs256Env));
        sources.extend(from_env(RS256_ENV)?.map(Self::Rs256Env));
        match sources.len() {
            0 => bail!(
                "no signing key: pass --hs256-secret-file PATH or --rs256-key-file PATH, or set \
                 ${HS256_ENV} or ${RS256_ENV} (keys are not taken as plain arguments, which \
                 would leak into shell history)"
            ),
            1 => Ok(sources.remove(0)),
            n => {
                let named: Vec<String> = sources.iter().map(ToString::to_string).collect();
                bail!(
                    "{n} signing keys given ({}); give exactly one, so that it is clear which \
                     key signs the token (unset the variable or drop the flag)",
                    named.join(", ")
                )
            }
        }
    }

    fn load(&self) -> anyhow::Result<TokenAuthority> {
        self.parse()
            .with_context(|| format!("cannot load the signing key from {self}"))
    }

    fn parse(&self) -> anyhow::Result<TokenAuthority> {
        let authority = match self {
            Self::Hs256File(path) => {
                let secret = std::fs::read(path)?;
                let secret = std::str::from_utf8(&secret).context("not base64 text")?;
                TokenAuthority::hs256_base64(secret)?
            }
            Self::Hs256Env(secret) => TokenAuthority::hs256_base64(secret)?,
            Self::Rs256File(path) => TokenAuthority::rs256_pem(&std::fs::read(path)?)?,
            Self::Rs256Env(pem) => TokenAuthority::rs256_pem(pem.as_bytes())?,
        };
        if !authority.can_sign() {
            bail!("this is an RSA public key; minting needs the private key");
        }
        Ok(authority)
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hs256File(path) => write!(f, "--hs256-secret-file {}", path.display()),
            Self::Rs256File(path) => write!(f, "--rs256-key-file {}", path.display()),
            Self::Hs256Env(_) => write!(f, "${HS256_ENV}"),
            Self::Rs256Env(_) => write!(f, "${RS256_ENV}"),
        }
    }
}

/// Grants the token holds but will not apply where the operator may expect,
/// because a lookup never combines grants: an entry naming a cache exactly
/// replaces every pattern for it (see [`TokenSpec::grant`]), and among
/// patterns the first match wins.
fn precedence_warnings(access: &AtticAccess) -> Vec<String> {
    let entries: Vec<_> = access.caches.iter().collect();
    let mut warnings = Vec::new();
    for (position, &(pattern, &permission)) in entries.iter().enumerate() {
        if let Some(name) = exact_name(pattern) {
            for &(other, &other_permission) in &entries {
                let lost = other_permission.difference(permission);
                if other.matches(&name) && !lost.is_empty() {
                    let flags: Vec<String> = GRANT_FLAGS
                        .iter()
                        .filter(|(_, flag, _)| lost.contains(*flag))
                        .map(|(flag, ..)| format!("--{flag} {name}"))
                        .collect();
                    warnings.push(format!(
                        "`{name}` has a grant of its own, which replaces `{other}`'s for it \
                         (grants never combine): it gets {permission} but not {lost}; add {} \
                         if it needs that access",
                        flags.join(" ")
                    ));
                }
            }
        } else {
            // The shortest name the pattern matches (wildcards are allowed
            // wherever a name character is), to test earlier patterns on.
            let Ok(example) = CacheName::new(pattern.as_str().replace(['*', '?'], "0")) else {
                continue;
            };
            for &(earlier, &earlier_permission) in &entries[..position] {
                if exact_name(earlier).is_none()
                    && earlier_permission != permission
                    && earlier.matches(&example)
                {
                    warnings.push(format!(
                        "`{pattern}` comes after `{earlier}`, which also matches names such as \
                         `{example}`; the first matching pattern wins, so those caches get \
                         {earlier_permission} rather than {permission}; give the more specific \
                         pattern first"
                    ));
                }
            }
        }
    }
    warnings
}

/// The cache name a wildcard-free pattern stands for.
fn exact_name(pattern: &CacheNamePattern) -> Option<CacheName> {
    if pattern.as_str().contains(['*', '?']) {
        None
    } else {
        CacheName::new(pattern.as_str()).ok()
    }
}
