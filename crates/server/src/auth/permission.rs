//! What a requester may do to one cache, and the single decision function
//! every endpoint goes through.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::{AuthError, CacheName, Token};

/// One entry of a token's `caches` map, in Attic's JSON: each flag is `0` or
/// `1`, an absent flag is `0`, and only set flags are written so our tokens
/// look like `atticadm`'s.
///
/// Also used as a *set of required permissions* (see [`authorize`]), which is
/// how an operation that needs two flags (a retention change needs `cr` and
/// `cq`) is checked in one call.
#[expect(
    clippy::struct_excessive_bools,
    reason = "the fields mirror Attic's seven independent claim flags one to one"
)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Permission {
    #[serde(rename = "r", with = "flag", skip_serializing_if = "is_false")]
    pub pull: bool,
    #[serde(rename = "w", with = "flag", skip_serializing_if = "is_false")]
    pub push: bool,
    #[serde(rename = "d", with = "flag", skip_serializing_if = "is_false")]
    pub delete: bool,
    #[serde(rename = "cc", with = "flag", skip_serializing_if = "is_false")]
    pub create_cache: bool,
    #[serde(rename = "cr", with = "flag", skip_serializing_if = "is_false")]
    pub configure_cache: bool,
    #[serde(rename = "cq", with = "flag", skip_serializing_if = "is_false")]
    pub configure_cache_retention: bool,
    #[serde(rename = "cd", with = "flag", skip_serializing_if = "is_false")]
    pub destroy_cache: bool,
}

/// Display names and claim keys, in bit order of [`Permission::bits`].
const FLAG_NAMES: [(&str, &str); 7] = [
    ("pull", "r"),
    ("push", "w"),
    ("delete", "d"),
    ("create-cache", "cc"),
    ("configure-cache", "cr"),
    ("configure-cache-retention", "cq"),
    ("destroy-cache", "cd"),
];

impl Permission {
    pub const NONE: Self = Self {
        pull: false,
        push: false,
        delete: false,
        create_cache: false,
        configure_cache: false,
        configure_cache_retention: false,
        destroy_cache: false,
    };
    pub const ALL: Self = Self {
        pull: true,
        push: true,
        delete: true,
        create_cache: true,
        configure_cache: true,
        configure_cache_retention: true,
        destroy_cache: true,
    };
    pub const PULL: Self = Self {
        pull: true,
        ..Self::NONE
    };
    pub const PUSH: Self = Self {
        push: true,
        ..Self::NONE
    };
    pub const DELETE: Self = Self {
        delete: true,
        ..Self::NONE
    };
    pub const CREATE_CACHE: Self = Self {
        create_cache: true,
        ..Self::NONE
    };
    pub const CONFIGURE_CACHE: Self = Self {
        configure_cache: true,
        ..Self::NONE
    };
    pub const CONFIGURE_CACHE_RETENTION: Self = Self {
        configure_cache_retention: true,
        ..Self::NONE
    };
    pub const DESTROY_CACHE: Self = Self {
        destroy_cache: true,
        ..Self::NONE
    };

    /// No flag set: in a grant, the requester may not even discover the cache.
    pub fn is_empty(self) -> bool {
        self == Self::NONE
    }

    /// Whether every flag of `required` is also set here.
    pub fn contains(self, required: Self) -> bool {
        required.difference(self).is_empty()
    }

    #[must_use]
    pub fn union(self, other: Self) -> Self {
        Self::from_bits(self.bits() | other.bits())
    }

    /// The flags set here but not in `other`: what a requester is missing when
    /// `self` is what was required and `other` what was granted.
    #[must_use]
    pub fn difference(self, other: Self) -> Self {
        Self::from_bits(self.bits() & !other.bits())
    }

    fn bits(self) -> u8 {
        [
            self.pull,
            self.push,
            self.delete,
            self.create_cache,
            self.configure_cache,
            self.configure_cache_retention,
            self.destroy_cache,
        ]
        .iter()
        .enumerate()
        .fold(0, |bits, (i, &set)| bits | (u8::from(set) << i))
    }

    fn from_bits(bits: u8) -> Self {
        let set = |i: u8| bits & (1 << i) != 0;
        Self {
            pull: set(0),
            push: set(1),
            delete: set(2),
            create_cache: set(3),
            configure_cache: set(4),
            configure_cache_retention: set(5),
            destroy_cache: set(6),
        }
    }
}

/// Lists the set flags with their claim keys, e.g. `pull (r), push (w)`, so an
/// operator can read an error and know which flag to add to the token.
impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no");
        }
        let bits = self.bits();
        let mut first = true;
        for (i, (name, key)) in FLAG_NAMES.iter().enumerate() {
            if bits & (1 << i) != 0 {
                if !first {
                    f.write_str(", ")?;
                }
                first = false;
                write!(f, "{name} ({key})")?;
            }
        }
        Ok(())
    }
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_false(value: &bool) -> bool {
    !*value
}

/// Attic's flags are the integers 0 and 1 (serde_with's strict
/// `BoolFromInt`); `true`, `2` or `"1"` are rejected as Attic rejects them.
mod flag {
    use super::{Deserialize, Deserializer, Serializer, de};

    #[expect(
        clippy::trivially_copy_pass_by_ref,
        reason = "serde's `with` passes a reference"
    )]
    pub(super) fn serialize<S: Serializer>(value: &bool, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(u8::from(*value))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<bool, D::Error> {
        match u8::deserialize(deserializer)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(de::Error::invalid_value(
                de::Unexpected::Unsigned(other.into()),
                &"0 or 1",
            )),
        }
    }
}

/// Who asked, for error messages that tell an operator which credential to
/// fix (or that none was sent, e.g. a missing netrc entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requester {
    Anonymous,
    Token { subject: Option<String> },
}

impl Requester {
    fn of(token: Option<&Token>) -> Self {
        match token {
            None => Self::Anonymous,
            Some(token) => Self::Token {
                subject: token.sub().map(str::to_owned),
            },
        }
    }
}

impl fmt::Display for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anonymous => f.write_str("an anonymous request (no token)"),
            Self::Token { subject: Some(sub) } => write!(f, "token `{sub}`"),
            Self::Token { subject: None } => f.write_str("the token (no `sub`)"),
        }
    }
}

/// What the caller found when it looked the cache up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheState {
    Missing,
    Private,
    Public,
}

/// The one authorization decision, following Attic's discovery rules.
///
/// 1. The grant is the token's entry for `cache` (exact name first, else the
///    first matching pattern in the token's order), plus `pull` if the cache
///    is public.
/// 2. An empty grant is [`AuthError::Unauthorized`] (401) *whether or not the
///    cache exists*, so names cannot be probed.
/// 3. With some grant, a missing cache is [`AuthError::NoSuchCache`] (404).
///    Only the token's grant can reveal this: a cache that does not exist is
///    not public, so publicness never leaks the absence of a name.
/// 4. With a grant that lacks a flag of `required`, [`AuthError::Forbidden`]
///    (403).
///
/// Creating a cache (`required` includes `create_cache`) skips rule 3: the
/// cache is meant to be missing, and whether it already exists is for the
/// insert to report (`CacheAlreadyExists`), which also settles races.
/// `required = Permission::NONE` asks only "may this requester see the
/// cache?". On success the effective grant is returned, for endpoints that
/// show or depend on more than one flag.
pub fn authorize(
    token: Option<&Token>,
    cache: &CacheName,
    state: CacheState,
    required: Permission,
) -> Result<Permission, AuthError> {
    let mut granted = token.map_or(Permission::NONE, |token| token.permission_for(cache));
    if state == CacheState::Public {
        granted.pull = true;
    }
    if granted.is_empty() {
        return Err(AuthError::Unauthorized {
            cache: cache.clone(),
            requester: Requester::of(token),
        });
    }
    if state == CacheState::Missing && !required.create_cache {
        return Err(AuthError::NoSuchCache(cache.clone()));
    }
    let missing = required.difference(granted);
    if !missing.is_empty() {
        return Err(AuthError::Forbidden {
            cache: cache.clone(),
            missing,
            requester: Requester::of(token),
        });
    }
    Ok(granted)
}

/// A REAPI (Bazel) operation class. Bazel has no per-cache administration, so
/// its reads and writes reuse the Nix flags: an instance name is a cache name,
/// and one token can serve both `nix copy` and `bazel build`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReapiAccess {
    /// GetActionResult, FindMissingBlobs, BatchReadBlobs, ByteStream Read,
    /// GetTree, GetCapabilities.
    Read,
    /// UpdateActionResult, BatchUpdateBlobs, ByteStream Write.
    Write,
}

impl ReapiAccess {
    pub fn required(self) -> Permission {
        match self {
            Self::Read => Permission::PULL,
            Self::Write => Permission::PUSH,
        }
    }
}

/// [`authorize`] for a REAPI request on `instance`.
pub fn authorize_reapi(
    token: Option<&Token>,
    instance: &CacheName,
    state: CacheState,
    access: ReapiAccess,
) -> Result<Permission, AuthError> {
    authorize(token, instance, state, access.required())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenAuthority;
    use crate::auth::TokenSpec;
    use std::time::Duration;

    fn name(s: &str) -> CacheName {
        CacheName::new(s).unwrap()
    }

    #[test]
    fn serde_accepts_exactly_attics_flags() {
        let all: Permission =
            serde_json::from_str(r#"{"r":1,"w":1,"d":1,"cc":1,"cr":1,"cq":1,"cd":1}"#).unwrap();
        assert_eq!(all, Permission::ALL);
        assert_eq!(
            serde_json::to_string(&all).unwrap(),
            r#"{"r":1,"w":1,"d":1,"cc":1,"cr":1,"cq":1,"cd":1}"#
        );

        let some: Permission = serde_json::from_str(r#"{"r":1,"w":0,"future":7}"#).unwrap();
        assert_eq!(some, Permission::PULL);
        assert_eq!(serde_json::to_string(&some).unwrap(), r#"{"r":1}"#);

        assert_eq!(
            serde_json::from_str::<Permission>("{}").unwrap(),
            Permission::NONE
        );
        assert_eq!(serde_json::to_string(&Permission::NONE).unwrap(), "{}");

        for bad in [
            r#"{"r":true}"#,
            r#"{"r":2}"#,
            r#"{"r":"1"}"#,
            r#"{"r":-1}"#,
            r#"{"r":1.0}"#,
            r#"{"r":1,"r":1}"#,
        ] {
            assert!(serde_json::from_str::<Permission>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn set_operations() {
        let pull_push = Permission::PULL.union(Permission::PUSH);
        assert_eq!(
            pull_push,
            Permission {
                pull: true,
                push: true,
                ..Permission::NONE
            }
        );
        assert!(pull_push.contains(Permission::PUSH));
        assert!(pull_push.contains(Permission::NONE));
        assert!(!pull_push.contains(Permission::DELETE));
        assert_eq!(Permission::ALL.difference(pull_push).bits(), 0b111_1100);
        assert_eq!(
            Permission::from_bits(Permission::ALL.bits()),
            Permission::ALL
        );
        assert_eq!(pull_push.to_string(), "pull (r), push (w)");
        assert_eq!(
            Permission::CONFIGURE_CACHE_RETENTION.to_string(),
            "configure-cache-retention (cq)"
        );
        assert_eq!(Permission::NONE.to_string(), "no");
    }

    /// A token (HS256, minted here) granting `perm` on `pattern` only.
    fn token_with(pattern: &str, perm: Permission) -> Token {
        let authority = TokenAuthority::hs256_base64(crate::auth::token::tests::HS_SECRET).unwrap();
        let mut spec = TokenSpec::new("ci", Duration::from_hours(1));
        spec.grant(pattern.parse().unwrap(), perm);
        authority.verify(&authority.mint(&spec).unwrap()).unwrap()
    }

    /// Expected outcome of one discovery-table row, expanded to the exact
    /// [`AuthError`] in the loop so each row fits on a line.
    enum Outcome {
        Allowed(Permission),
        Unauthorized,
        Forbidden(Permission),
        NoSuchCache,
    }

    #[test]
    fn discovery_table() {
        use CacheState::{Missing, Private, Public};
        use Outcome::{Allowed, Forbidden, NoSuchCache, Unauthorized};
        const R: Permission = Permission::PULL;
        const W: Permission = Permission::PUSH;
        const CC: Permission = Permission::CREATE_CACHE;
        let c = name("team-a");
        let puller = token_with("team-a", R);
        let creator = token_with("team-*", CC);
        let other = token_with("elsewhere", Permission::ALL);
        let cases = [
            // No token.
            (None, Missing, R, Unauthorized),
            (None, Private, R, Unauthorized),
            (None, Public, R, Allowed(R)),
            (None, Public, W, Forbidden(W)),
            (None, Missing, CC, Unauthorized),
            // A token without any grant on this name behaves like no token.
            (Some(&other), Missing, R, Unauthorized),
            (Some(&other), Private, R, Unauthorized),
            (Some(&other), Public, R, Allowed(R)),
            // Some grant: the cache's existence is revealed.
            (Some(&puller), Missing, R, NoSuchCache),
            (Some(&puller), Missing, W, NoSuchCache),
            (Some(&puller), Private, R, Allowed(R)),
            (Some(&puller), Private, Permission::NONE, Allowed(R)),
            (
                Some(&puller),
                Private,
                W.union(Permission::DELETE),
                Forbidden(W.union(Permission::DELETE)),
            ),
            // Creation ignores existence; the insert reports a conflict.
            (Some(&creator), Missing, CC, Allowed(CC)),
            (Some(&creator), Private, CC, Allowed(CC)),
            (Some(&puller), Missing, CC, Forbidden(CC)),
            (Some(&creator), Public, R, Allowed(CC.union(R))),
        ];
        for (i, (token, state, required, outcome)) in cases.into_iter().enumerate() {
            let requester = Requester::of(token);
            let expected = match outcome {
                Allowed(granted) => Ok(granted),
                Unauthorized => Err(AuthError::Unauthorized {
                    cache: c.clone(),
                    requester,
                }),
                Forbidden(missing) => Err(AuthError::Forbidden {
                    cache: c.clone(),
                    missing,
                    requester,
                }),
                NoSuchCache => Err(AuthError::NoSuchCache(c.clone())),
            };
            assert_eq!(authorize(token, &c, state, required), expected, "case {i}");
        }
    }

    #[test]
    fn reapi_reads_pull_and_writes_push() {
        let c = name("bazel");
        let reader = token_with("bazel", Permission::PULL);
        assert_eq!(
            authorize_reapi(Some(&reader), &c, CacheState::Private, ReapiAccess::Read),
            Ok(Permission::PULL)
        );
        assert_eq!(
            authorize_reapi(Some(&reader), &c, CacheState::Private, ReapiAccess::Write),
            Err(AuthError::Forbidden {
                cache: c.clone(),
                missing: Permission::PUSH,
                requester: Requester::Token {
                    subject: Some("ci".into())
                },
            })
        );
        assert!(authorize_reapi(None, &c, CacheState::Public, ReapiAccess::Read).is_ok());
        assert_eq!(
            authorize_reapi(None, &c, CacheState::Private, ReapiAccess::Read)
                .map_err(|e| e.status()),
            Err(401)
        );
    }
}
