//! Cache names as they appear in URLs and REAPI instance names, and the
//! wildcard patterns tokens grant permissions on.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::AuthError;

/// Longest cache name Attic accepts; longer names would not round-trip
/// through an Attic client.
pub const MAX_NAME_LEN: usize = 50;

/// A validated cache name: `^[A-Za-z0-9][A-Za-z0-9-_+]{0,49}$`.
///
/// Validated here as well as in the meta crate because authorization must
/// refuse a bad name before it is matched against token patterns or used to
/// look anything up.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheName(String);

impl CacheName {
    pub fn new(name: impl Into<String>) -> Result<Self, AuthError> {
        let name = name.into();
        if is_valid(name.as_bytes(), false) {
            Ok(Self(name))
        } else {
            Err(AuthError::InvalidCacheName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a cache by this name could not be reached everywhere: `ac`
    /// and `cas` are Bazel's HTTP cache paths at the root, and REAPI resource
    /// names forbid instance segments that spell its own keywords. Such
    /// names are refused when a cache is created.
    pub fn is_reserved(&self) -> bool {
        RESERVED_NAMES.contains(&self.0.as_str())
    }
}

const RESERVED_NAMES: [&str; 9] = [
    "ac",
    "cas",
    "blobs",
    "uploads",
    "compressed-blobs",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
];

impl FromStr for CacheName {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for CacheName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for CacheName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CacheName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

/// A key of a token's `caches` map: a cache name in which `*` matches any run
/// of characters and `?` exactly one, anchored at both ends.
///
/// Attic itself only documents `*` (its matcher also understands `?`); we
/// accept both in the key so tokens we mint can use `?`, and every token
/// Attic mints still parses. A token with an invalid key is rejected whole,
/// as in Attic, because silently dropping a grant would be surprising.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheNamePattern(String);

impl CacheNamePattern {
    pub fn new(pattern: impl Into<String>) -> Result<Self, AuthError> {
        let pattern = pattern.into();
        if is_valid(pattern.as_bytes(), true) {
            Ok(Self(pattern))
        } else {
            Err(AuthError::InvalidCacheName(pattern))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, name: &CacheName) -> bool {
        glob_match(self.0.as_bytes(), name.0.as_bytes())
    }
}

/// Lets a token's pattern map be probed with a cache name for the exact-name
/// rule without allocating.
impl Borrow<str> for CacheNamePattern {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<CacheName> for CacheNamePattern {
    fn from(name: CacheName) -> Self {
        Self(name.0)
    }
}

impl FromStr for CacheNamePattern {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for CacheNamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for CacheNamePattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CacheNamePattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

fn is_valid(s: &[u8], wildcards: bool) -> bool {
    let allowed = |(i, &c): (usize, &u8)| {
        c.is_ascii_alphanumeric()
            || (i > 0 && matches!(c, b'-' | b'_' | b'+'))
            || (wildcards && matches!(c, b'*' | b'?'))
    };
    (1..=MAX_NAME_LEN).contains(&s.len()) && s.iter().enumerate().all(allowed)
}

/// Anchored glob match with single-star backtracking: linear in practice and
/// at worst quadratic in 50-byte inputs, so no regex engine is needed.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and how much of `name` it has swallowed so far.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    star = Some((star_p, star_n + 1));
                    p = star_p + 1;
                    n = star_n + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> CacheName {
        CacheName::new(s).unwrap()
    }

    fn pattern(s: &str) -> CacheNamePattern {
        CacheNamePattern::new(s).unwrap()
    }

    #[test]
    fn bazel_and_reapi_words_are_reserved() {
        for word in ["ac", "cas", "blobs", "compressed-blobs", "actionResults"] {
            assert!(CacheName::new(word).unwrap().is_reserved(), "{word}");
        }
        for name in ["main", "acs", "cas2", "Blobs"] {
            assert!(!CacheName::new(name).unwrap().is_reserved(), "{name}");
        }
    }

    #[test]
    fn cache_names() {
        let longest = "a".repeat(MAX_NAME_LEN);
        for good in [
            "valid-name",
            "Another_Valid_Name",
            "plan9",
            "user+cache",
            "0",
            &longest,
        ] {
            assert_eq!(name(good).as_str(), good);
            let json = serde_json::to_string(&name(good)).unwrap();
            assert_eq!(
                serde_json::from_str::<CacheName>(&json).unwrap(),
                name(good)
            );
        }
        let too_long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "", "-ers", "_x", "+x", "a b", "team-*", "a?", "a/b", "é", "a.b", &too_long,
        ] {
            assert_eq!(
                CacheName::new(bad),
                Err(AuthError::InvalidCacheName(bad.to_owned()))
            );
            assert!(serde_json::from_str::<CacheName>(&format!("\"{bad}\"")).is_err());
        }
    }

    #[test]
    fn patterns_validate_like_names_plus_wildcards() {
        for good in ["*", "?", "team-*", "*-ci", "a?c", "a+*", "**"] {
            assert_eq!(pattern(good).as_str(), good);
        }
        for bad in ["", "-*", "a b", "team-[ab]", "a/b", "*!!!"] {
            assert!(CacheNamePattern::new(bad).is_err(), "{bad}");
        }
        assert_eq!(CacheNamePattern::from(name("exact")), pattern("exact"));
    }

    #[test]
    fn wildcard_matching_is_anchored() {
        let cases = [
            ("team-*", "team-", true),
            ("team-*", "team-abc", true),
            ("team-*", "abc-team-x", false),
            ("*", "anything", true),
            ("no-wildcard", "no-wildcard", true),
            ("no-wildcard", "no-wildcard-x", false),
            ("no-wildcard", "x-no-wildcard", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a?c", "abbc", false),
            ("*-ci", "team-ci", true),
            ("*-ci", "team-ci-x", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("*a*", "bab", true),
            ("??", "a", false),
            ("Team-*", "team-a", false),
        ];
        for (p, n, expected) in cases {
            assert_eq!(pattern(p).matches(&name(n)), expected, "{p} vs {n}");
        }
    }
}
