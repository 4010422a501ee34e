//! Attic's JWT: claims, verification and minting.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use indexmap::IndexMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthError, CacheName, CacheNamePattern, Permission, TokenRejection, keys};

/// Attic's private claim. Namespaced as a URL because identity providers such
/// as Auth0 drop un-namespaced custom claims.
pub const CLAIM_NAMESPACE: &str = "https://jwt.attic.rs/v1";

/// Seconds of clock skew tolerated on `exp` and `nbf`: `atticadm make-token`
/// sets `nbf` to its own "now", which may be ahead of the server's.
const LEEWAY_SECS: u64 = 60;

/// RFC 7518 §3.2: an HS256 key MUST be at least as long as the hash output.
const MIN_HS256_SECRET_LEN: usize = 32;

/// The claims of an Attic token. Unknown claims (`iat`, `jti`, ...) are
/// ignored, as Attic ignores them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Required, as in Attic: a token without it is not an Attic token, and
    /// saying so beats silently granting nothing.
    #[serde(rename = "https://jwt.attic.rs/v1")]
    pub access: AtticAccess,
}

/// RFC 7519 allows `aud` to be one string or an array of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The per-cache grants of a token, in the token's own order: the first
/// matching pattern wins, so order is meaning and an `IndexMap` keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtticAccess {
    #[serde(with = "ordered_caches")]
    pub caches: IndexMap<CacheNamePattern, Permission>,
}

/// Serde for the `caches` map in document order, written out rather than
/// through indexmap's `serde` feature, which would give the server its own
/// build of every crate above indexmap (hyper, h2, sqlx-core).
mod ordered_caches {
    use std::fmt;

    use indexmap::IndexMap;
    use serde::de::{self, MapAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use super::{CacheNamePattern, Permission};

    pub(super) fn serialize<S: Serializer>(
        caches: &IndexMap<CacheNamePattern, Permission>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(caches)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<IndexMap<CacheNamePattern, Permission>, D::Error> {
        deserializer.deserialize_map(OrderedVisitor)
    }

    struct OrderedVisitor;

    impl<'de> Visitor<'de> for OrderedVisitor {
        type Value = IndexMap<CacheNamePattern, Permission>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map from cache name patterns to permissions")
        }

        /// Refuses a repeated key: JSON leaves its meaning open, and guessing
        /// wrong about a grant is worse than refusing the token.
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut caches = IndexMap::with_capacity(map.size_hint().unwrap_or(0).min(64));
            while let Some((pattern, permission)) =
                map.next_entry::<CacheNamePattern, Permission>()?
            {
                if caches.contains_key(&pattern) {
                    return Err(de::Error::custom(format_args!(
                        "duplicate cache pattern `{pattern}`"
                    )));
                }
                caches.insert(pattern, permission);
            }
            Ok(caches)
        }
    }
}

impl AtticAccess {
    /// The grant for `cache`: the entry whose key is exactly the name if there
    /// is one (even when an earlier pattern also matches), else the first
    /// matching pattern, else nothing. Grants never combine, as in Attic.
    pub fn permission_for(&self, cache: &CacheName) -> Permission {
        if let Some(&exact) = self.caches.get(cache.as_str()) {
            return exact;
        }
        self.caches
            .iter()
            .find(|(pattern, _)| pattern.matches(cache))
            .map_or(Permission::NONE, |(_, &permission)| permission)
    }

    /// Adds `permission` to the entry for `pattern`, creating it at the end.
    pub fn grant(&mut self, pattern: CacheNamePattern, permission: Permission) {
        let entry = self.caches.entry(pattern).or_default();
        *entry = entry.union(permission);
    }
}

/// A token whose signature and validity have been checked; only
/// [`TokenAuthority::verify`] makes one, so holding a `Token` is proof.
#[derive(Clone, Debug)]
pub struct Token {
    claims: Claims,
}

impl Token {
    pub fn sub(&self) -> Option<&str> {
        self.claims.sub.as_deref()
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    pub fn permission_for(&self, cache: &CacheName) -> Permission {
        self.claims.access.permission_for(cache)
    }
}

/// What to put in a new token, like `atticadm make-token`'s flags.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub sub: String,
    pub validity: Duration,
    pub access: AtticAccess,
    /// Overrides the authority's bound issuer, if any.
    pub iss: Option<String>,
    /// Overrides the authority's bound audiences when not empty.
    pub aud: Vec<String>,
}

impl TokenSpec {
    pub fn new(sub: impl Into<String>, validity: Duration) -> Self {
        Self {
            sub: sub.into(),
            validity,
            access: AtticAccess::default(),
            iss: None,
            aud: Vec::new(),
        }
    }

    /// Adds `permission` on `pattern`. Beware that an exact-name entry
    /// *replaces* any pattern that also matches (`--pull 'team-*' --push
    /// team-ci` leaves `team-ci` push-only), so grant every flag an exact
    /// name needs on that name.
    pub fn grant(&mut self, pattern: CacheNamePattern, permission: Permission) -> &mut Self {
        self.access.grant(pattern, permission);
        self
    }
}

/// The two algorithms Attic supports; a closed set so that nothing else can
/// ever be configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyAlgorithm {
    Hs256,
    Rs256,
}

impl KeyAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            Self::Hs256 => Algorithm::HS256,
            Self::Rs256 => Algorithm::RS256,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
        }
    }
}

/// The server's token key and its bound `iss`/`aud`: verifies presented
/// tokens and, with a secret or private key, mints new ones.
#[derive(Clone)]
pub struct TokenAuthority {
    algorithm: KeyAlgorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    issuer: Option<String>,
    audiences: Vec<String>,
}

impl fmt::Debug for TokenAuthority {
    /// Never prints key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenAuthority")
            .field("algorithm", &self.algorithm)
            .field("can_sign", &self.can_sign())
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl TokenAuthority {
    /// HS256 with Attic's `token-hs256-secret-base64` value.
    pub fn hs256_base64(secret: &str) -> Result<Self, AuthError> {
        let secret = STANDARD
            .decode(secret.trim())
            .map_err(|e| AuthError::InvalidKey(format!("HS256 secret is not base64: {e}")))?;
        if secret.len() < MIN_HS256_SECRET_LEN {
            return Err(AuthError::InvalidKey(format!(
                "HS256 secret is {} bytes; at least {MIN_HS256_SECRET_LEN} are required \
                 (generate one with `openssl rand 64 | base64 -w0`)",
                secret.len()
            )));
        }
        Ok(Self::new(
            KeyAlgorithm::Hs256,
            DecodingKey::from_secret(&secret),
            Some(EncodingKey::from_secret(&secret)),
        ))
    }

    /// RS256 from a PEM private key (verifies and mints) or public key
    /// (verifies only), raw or base64-encoded as in Attic's
    /// `token-rs256-secret-base64` / `token-rs256-pubkey-base64`.
    pub fn rs256_pem(key: &[u8]) -> Result<Self, AuthError> {
        let (decoding, encoding) = keys::rsa_keys(key)?;
        Ok(Self::new(KeyAlgorithm::Rs256, decoding, encoding))
    }

    fn new(algorithm: KeyAlgorithm, decoding: DecodingKey, encoding: Option<EncodingKey>) -> Self {
        Self {
            algorithm,
            decoding,
            encoding,
            issuer: None,
            audiences: Vec::new(),
        }
    }

    /// Requires tokens to carry this `iss`, and puts it in minted ones.
    #[must_use]
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// Requires tokens to name one of these in `aud`, and puts them all in
    /// minted ones. Without any, `aud` is not checked (as in Attic).
    #[must_use]
    pub fn with_audiences<S: Into<String>>(
        mut self,
        audiences: impl IntoIterator<Item = S>,
    ) -> Self {
        self.audiences = audiences.into_iter().map(Into::into).collect();
        self
    }

    /// `HS256` or `RS256`, for logs and `garret token` output.
    pub fn algorithm_name(&self) -> &'static str {
        self.algorithm.name()
    }

    pub fn can_sign(&self) -> bool {
        self.encoding.is_some()
    }

    /// The token of a request, from its `Authorization` header if it has one.
    /// No header is anonymous (`Ok(None)`); a header that does not carry a
    /// valid token is an error, never anonymous (see the module docs).
    /// The token `authorization` carries, if any; its subject goes into
    /// the request's span, so the access log names who asked.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Option<Token>, AuthError> {
        let token = authorization
            .map(|value| self.verify(&super::jwt_from_authorization(value)?))
            .transpose()?;
        if let Some(subject) = token.as_ref().and_then(Token::sub) {
            tracing::Span::current().record("subject", tracing::field::display(subject));
        }
        Ok(token)
    }

    pub fn verify(&self, jwt: &str) -> Result<Token, AuthError> {
        self.check_algorithm(jwt)?;
        let data = jsonwebtoken::decode::<Claims>(jwt, &self.decoding, &self.validation())
            .map_err(rejection)?;
        Ok(Token {
            claims: data.claims,
        })
    }

    /// Reads `alg` before jsonwebtoken does, only to say precisely what was
    /// wrong: jsonwebtoken's validation (restricted to our one algorithm)
    /// would refuse `none` and algorithm confusion on its own.
    fn check_algorithm(&self, jwt: &str) -> Result<(), TokenRejection> {
        #[derive(Deserialize)]
        struct AlgOnly {
            alg: String,
        }
        let malformed = |what: String| TokenRejection::Malformed(what);
        let mut parts = jwt.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(
                "expected three dot-separated base64url parts".into(),
            ));
        };
        let header = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|e| malformed(format!("header is not base64url: {e}")))?;
        let AlgOnly { alg } = serde_json::from_slice(&header)
            .map_err(|e| malformed(format!("header is not a JOSE header: {e}")))?;
        let expected = self.algorithm_name();
        if alg == expected {
            Ok(())
        } else {
            Err(TokenRejection::WrongAlgorithm {
                found: alg,
                expected,
            })
        }
    }

    fn validation(&self) -> Validation {
        let mut validation = Validation::new(self.algorithm.jwt());
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // `exp` is optional in Attic; it is still checked whenever present.
        validation.required_spec_claims.clear();
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            validation.required_spec_claims.insert("aud".into());
        }
        validation
    }

    /// Signs a token valid from now for `spec.validity`.
    pub fn mint(&self, spec: &TokenSpec) -> Result<String, AuthError> {
        self.mint_at(spec, jsonwebtoken::get_current_timestamp())
    }

    fn mint_at(&self, spec: &TokenSpec, now: u64) -> Result<String, AuthError> {
        let key = self.encoding.as_ref().ok_or(AuthError::CannotSign)?;
        let audiences = if spec.aud.is_empty() {
            &self.audiences
        } else {
            &spec.aud
        };
        let aud = match audiences.as_slice() {
            [] => None,
            [one] => Some(Audience::One(one.clone())),
            many => Some(Audience::Many(many.to_vec())),
        };
        let claims = Claims {
            exp: Some(now.saturating_add(spec.validity.as_secs())),
            nbf: Some(now),
            iss: spec.iss.clone().or_else(|| self.issuer.clone()),
            sub: Some(spec.sub.clone()),
            aud,
            access: spec.access.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm.jwt()), &claims, key)
            .map_err(|e| AuthError::InvalidKey(format!("signing failed: {e}")))
    }
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "used as map_err(rejection) on an owned error"
)]
fn rejection(error: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    let rejection = match error.kind() {
        ErrorKind::InvalidSignature => TokenRejection::BadSignature,
        ErrorKind::ExpiredSignature => TokenRejection::Expired,
        ErrorKind::ImmatureSignature => TokenRejection::NotYetValid,
        ErrorKind::InvalidIssuer => TokenRejection::WrongIssuer,
        ErrorKind::InvalidAudience => TokenRejection::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => TokenRejection::MissingClaim(claim.clone()),
        ErrorKind::Json(e) => TokenRejection::BadClaims(e.to_string()),
        ErrorKind::InvalidClaimFormat(claim) => {
            TokenRejection::BadClaims(format!("`{claim}` is not a number"))
        }
        _ => TokenRejection::Malformed(error.to_string()),
    };
    AuthError::InvalidToken(rejection)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::auth::keys::tests::{
        A_PRIVATE_PKCS1, A_PUBLIC_SPKI, B_PRIVATE_PKCS8, B_PUBLIC_PKCS1,
    };

    /// 47 bytes, base64 as in Attic's `token-hs256-secret-base64`.
    pub(in crate::auth) const HS_SECRET: &str =
        "Z2FycmV0IGF1dGggdGVzdHM6IEhTMjU2IHNlY3JldCwgbmV2ZXIgdXNlIGl0ISE=";
    const OTHER_HS_SECRET: &str = "YW5vdGhlciBzZXJ2ZXIgZW50aXJlbHksIGFub3RoZXIgc2VjcmV0IDMyK2I=";

    /// The payload of the example token in Attic's own access-control tests,
    /// byte for byte, under the JOSE header every Attic HS256 token carries.
    const ATTIC_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
    const ATTIC_CLAIMS: &str = r#"{"sub":"meow","exp":4102324986,"https://jwt.attic.rs/v1":{"caches":{"cache-rw":{"r":1,"w":1},"cache-ro":{"r":1},"team-*":{"r":1,"w":1,"cc":1}}}}"#;

    fn hs() -> TokenAuthority {
        TokenAuthority::hs256_base64(HS_SECRET).unwrap()
    }

    fn name(s: &str) -> CacheName {
        CacheName::new(s).unwrap()
    }

    fn b64url(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs `header.claims` with HMAC-SHA256 directly through aws-lc, not
    /// through jsonwebtoken, so the golden test checks interop rather than
    /// agreement with ourselves.
    fn hand_signed_hs256(header: &str, claims: &str, secret_b64: &str) -> String {
        let secret = STANDARD.decode(secret_b64).unwrap();
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
        let message = format!(
            "{}.{}",
            b64url(header.as_bytes()),
            b64url(claims.as_bytes())
        );
        let tag = aws_lc_rs::hmac::sign(&key, message.as_bytes());
        format!("{message}.{}", b64url(tag.as_ref()))
    }

    fn rejection_of(result: Result<Token, AuthError>) -> TokenRejection {
        match result {
            Err(AuthError::InvalidToken(rejection)) => rejection,
            other => panic!("expected a token rejection, got {other:?}"),
        }
    }

    fn spec() -> TokenSpec {
        let mut spec = TokenSpec::new("ci", Duration::from_hours(1));
        spec.grant("team-*".parse().unwrap(), Permission::PULL);
        spec
    }

    #[test]
    fn golden_attic_token_verifies_with_attics_meaning() {
        let jwt = hand_signed_hs256(ATTIC_HEADER, ATTIC_CLAIMS, HS_SECRET);
        let token = hs().verify(&jwt).unwrap();
        assert_eq!(token.sub(), Some("meow"));
        assert_eq!(token.claims().exp, Some(4_102_324_986));
        let pull_push = Permission::PULL.union(Permission::PUSH);
        assert_eq!(token.permission_for(&name("cache-rw")), pull_push);
        assert_eq!(token.permission_for(&name("cache-ro")), Permission::PULL);
        assert_eq!(
            token.permission_for(&name("team-xyz")),
            pull_push.union(Permission::CREATE_CACHE)
        );
        assert!(token.permission_for(&name("forbidden-cache")).is_empty());

        // A minimal "everything readable" token, exactly as Attic writes it.
        let claims = r#"{"exp":4102324986,"nbf":1700000000,"sub":"reader","https://jwt.attic.rs/v1":{"caches":{"*":{"r":1}}}}"#;
        let token = hs()
            .verify(&hand_signed_hs256(ATTIC_HEADER, claims, HS_SECRET))
            .unwrap();
        assert_eq!(token.permission_for(&name("anything")), Permission::PULL);
    }

    #[test]
    fn claims_round_trip_attics_json() {
        let claims: Claims = serde_json::from_str(ATTIC_CLAIMS).unwrap();
        let keys: Vec<_> = claims
            .access
            .caches
            .keys()
            .map(CacheNamePattern::as_str)
            .collect();
        assert_eq!(keys, ["cache-rw", "cache-ro", "team-*"]);
        let json = serde_json::to_string(&claims).unwrap();
        // Same fields, in our order: jwt-simple's, which `atticadm` uses.
        assert_eq!(
            json,
            r#"{"exp":4102324986,"sub":"meow","https://jwt.attic.rs/v1":{"caches":{"cache-rw":{"r":1,"w":1},"cache-ro":{"r":1},"team-*":{"r":1,"w":1,"cc":1}}}}"#
        );
        assert_eq!(serde_json::from_str::<Claims>(&json).unwrap(), claims);
        assert!(json.contains(&format!("\"{CLAIM_NAMESPACE}\":")));

        let full = r#"{"exp":1,"nbf":2,"iss":"i","sub":"s","aud":["a","b"],"https://jwt.attic.rs/v1":{"caches":{"*":{"r":1,"w":1,"d":1,"cc":1,"cr":1,"cq":1,"cd":1}}}}"#;
        let claims: Claims = serde_json::from_str(full).unwrap();
        assert_eq!(
            claims.aud,
            Some(Audience::Many(vec!["a".into(), "b".into()]))
        );
        assert_eq!(claims.access.permission_for(&name("x")), Permission::ALL);
        assert_eq!(serde_json::to_string(&claims).unwrap(), full);
        let one: Claims =
            serde_json::from_str(r#"{"aud":"a","https://jwt.attic.rs/v1":{"caches":{}}}"#).unwrap();
        assert_eq!(one.aud, Some(Audience::One("a".into())));
    }

    #[test]
    fn exact_name_beats_patterns_then_first_pattern_wins() {
        let access: AtticAccess = serde_json::from_str(
            r#"{"caches":{"team-*":{"r":1},"*":{"r":1,"w":1},"team-ci":{"w":1},"team-?":{"d":1}}}"#,
        )
        .unwrap();
        // Exact entry, though `team-*` (earlier) matches too; grants don't add up.
        assert_eq!(access.permission_for(&name("team-ci")), Permission::PUSH);
        // First matching pattern in token order: `team-*` before `*` and `team-?`.
        assert_eq!(access.permission_for(&name("team-x")), Permission::PULL);
        assert_eq!(
            access.permission_for(&name("other")),
            Permission::PULL.union(Permission::PUSH)
        );

        // Reversing the JSON order reverses the outcome: order is kept.
        let access: AtticAccess =
            serde_json::from_str(r#"{"caches":{"*":{"d":1},"team-*":{"r":1}}}"#).unwrap();
        assert_eq!(access.permission_for(&name("team-x")), Permission::DELETE);
    }

    #[test]
    fn bad_claims_are_rejected_whole() {
        let cases = [
            r#"{"sub":"x"}"#,
            r#"{"https://jwt.attic.rs/v1":{}}"#,
            r#"{"https://jwt.attic.rs/v1":{"caches":{"bad pattern!":{"r":1}}}}"#,
            r#"{"https://jwt.attic.rs/v1":{"caches":{"c":{"r":2}}}}"#,
            r#"{"https://jwt.attic.rs/v1":{"caches":{"c":{"r":true}}}}"#,
            r#"{"exp":"soon","https://jwt.attic.rs/v1":{"caches":{}}}"#,
            r#"{"https://jwt.attic.rs/v1":{"caches":{"c":{"r":1},"c":{"w":1}}}}"#,
        ];
        for claims in cases {
            let jwt = hand_signed_hs256(ATTIC_HEADER, claims, HS_SECRET);
            assert!(
                matches!(
                    rejection_of(hs().verify(&jwt)),
                    TokenRejection::BadClaims(_)
                ),
                "{claims}"
            );
        }
    }

    #[test]
    fn exp_is_optional_but_enforced_when_present() {
        let no_exp = r#"{"sub":"x","https://jwt.attic.rs/v1":{"caches":{"*":{"r":1}}}}"#;
        assert!(
            hs().verify(&hand_signed_hs256(ATTIC_HEADER, no_exp, HS_SECRET))
                .is_ok()
        );

        let now = jsonwebtoken::get_current_timestamp();
        let expired = hs().mint_at(&spec(), now - 7200).unwrap();
        assert_eq!(rejection_of(hs().verify(&expired)), TokenRejection::Expired);
        // Within the leeway: expired 30 s ago still passes.
        let mut short = spec();
        short.validity = Duration::from_secs(30);
        assert!(
            hs().verify(&hs().mint_at(&short, now - 60).unwrap())
                .is_ok()
        );
    }

    #[test]
    fn not_yet_valid() {
        let now = jsonwebtoken::get_current_timestamp();
        let future = hs().mint_at(&spec(), now + 600).unwrap();
        assert_eq!(
            rejection_of(hs().verify(&future)),
            TokenRejection::NotYetValid
        );
        // Small clock skew is tolerated.
        assert!(
            hs().verify(&hs().mint_at(&spec(), now + 30).unwrap())
                .is_ok()
        );
    }

    #[test]
    fn wrong_key() {
        let other = TokenAuthority::hs256_base64(OTHER_HS_SECRET).unwrap();
        let jwt = other.mint(&spec()).unwrap();
        assert_eq!(
            rejection_of(hs().verify(&jwt)),
            TokenRejection::BadSignature
        );

        let a = TokenAuthority::rs256_pem(A_PRIVATE_PKCS1).unwrap();
        let b = TokenAuthority::rs256_pem(B_PUBLIC_PKCS1).unwrap();
        let jwt = a.mint(&spec()).unwrap();
        assert_eq!(rejection_of(b.verify(&jwt)), TokenRejection::BadSignature);

        // A tampered payload breaks the signature too.
        let jwt = hs().mint(&spec()).unwrap();
        let mut parts: Vec<&str> = jwt.split('.').collect();
        let forged = b64url(br#"{"sub":"ci","https://jwt.attic.rs/v1":{"caches":{"*":{"r":1,"w":1,"d":1,"cc":1,"cr":1,"cq":1,"cd":1}}}}"#);
        parts[1] = &forged;
        assert_eq!(
            rejection_of(hs().verify(&parts.join("."))),
            TokenRejection::BadSignature
        );
    }

    #[test]
    fn bound_issuer_and_audience() {
        let bound = || hs().with_issuer("garret").with_audiences(["nix", "bazel"]);
        let minted = bound().mint(&spec()).unwrap();
        let token = bound().verify(&minted).unwrap();
        assert_eq!(token.claims().iss.as_deref(), Some("garret"));
        assert_eq!(
            token.claims().aud,
            Some(Audience::Many(vec!["nix".into(), "bazel".into()]))
        );
        // One matching audience is enough.
        let mut bazel_only = spec();
        bazel_only.aud = vec!["bazel".into()];
        let token = bound().verify(&bound().mint(&bazel_only).unwrap()).unwrap();
        assert_eq!(token.claims().aud, Some(Audience::One("bazel".into())));

        let mut wrong_iss = spec();
        wrong_iss.iss = Some("attic".into());
        assert_eq!(
            rejection_of(bound().verify(&bound().mint(&wrong_iss).unwrap())),
            TokenRejection::WrongIssuer
        );
        let mut wrong_aud = spec();
        wrong_aud.aud = vec!["ftp".into()];
        assert_eq!(
            rejection_of(bound().verify(&bound().mint(&wrong_aud).unwrap())),
            TokenRejection::WrongAudience
        );

        let unbound_token = hs().mint(&spec()).unwrap();
        assert_eq!(
            rejection_of(hs().with_issuer("garret").verify(&unbound_token)),
            TokenRejection::MissingClaim("iss".into())
        );
        assert_eq!(
            rejection_of(hs().with_audiences(["nix"]).verify(&unbound_token)),
            TokenRejection::MissingClaim("aud".into())
        );
        // A server that binds nothing ignores `iss` and `aud`, as Attic does.
        assert!(hs().verify(&minted).is_ok());
    }

    #[test]
    fn alg_none_is_refused() {
        let claims = r#"{"sub":"x","https://jwt.attic.rs/v1":{"caches":{"*":{"r":1,"w":1}}}}"#;
        for header in [r#"{"alg":"none","typ":"JWT"}"#, r#"{"alg":"None"}"#] {
            for signature in ["", "AAAA"] {
                let jwt = format!(
                    "{}.{}.{signature}",
                    b64url(header.as_bytes()),
                    b64url(claims.as_bytes())
                );
                for authority in [hs(), TokenAuthority::rs256_pem(A_PUBLIC_SPKI).unwrap()] {
                    assert!(matches!(
                        rejection_of(authority.verify(&jwt)),
                        TokenRejection::WrongAlgorithm { found, .. } if found.eq_ignore_ascii_case("none")
                    ));
                    // jsonwebtoken refuses it on its own, too.
                    assert!(
                        jsonwebtoken::decode::<Claims>(
                            &jwt,
                            &authority.decoding,
                            &authority.validation()
                        )
                        .is_err()
                    );
                }
            }
        }
    }

    #[test]
    fn hs256_and_rs256_are_never_confused() {
        // The classic attack: HMAC-sign with the RSA *public* key as secret.
        let public_pem_b64 = STANDARD.encode(A_PUBLIC_SPKI);
        let claims = r#"{"sub":"x","https://jwt.attic.rs/v1":{"caches":{"*":{"r":1,"w":1}}}}"#;
        let forged = hand_signed_hs256(ATTIC_HEADER, claims, &public_pem_b64);
        let rs = TokenAuthority::rs256_pem(A_PUBLIC_SPKI).unwrap();
        assert_eq!(
            rejection_of(rs.verify(&forged)),
            TokenRejection::WrongAlgorithm {
                found: "HS256".into(),
                expected: "RS256"
            }
        );
        assert!(jsonwebtoken::decode::<Claims>(&forged, &rs.decoding, &rs.validation()).is_err());

        let rs_token = TokenAuthority::rs256_pem(A_PRIVATE_PKCS1)
            .unwrap()
            .mint(&spec())
            .unwrap();
        assert_eq!(
            rejection_of(hs().verify(&rs_token)),
            TokenRejection::WrongAlgorithm {
                found: "RS256".into(),
                expected: "HS256"
            }
        );
        assert!(
            jsonwebtoken::decode::<Claims>(&rs_token, &hs().decoding, &hs().validation()).is_err()
        );
    }

    #[test]
    fn rs256_mint_and_verify_with_every_key_form() {
        for (private, public) in [
            (A_PRIVATE_PKCS1, A_PUBLIC_SPKI),
            (B_PRIVATE_PKCS8, B_PUBLIC_PKCS1),
        ] {
            let signer = TokenAuthority::rs256_pem(private).unwrap();
            assert!(signer.can_sign());
            assert_eq!(signer.algorithm_name(), "RS256");
            let jwt = signer.mint(&spec()).unwrap();
            assert!(jwt.starts_with(&b64url(br#"{"typ":"JWT","alg":"RS256"}"#)));
            let verifier = TokenAuthority::rs256_pem(STANDARD.encode(public).as_bytes()).unwrap();
            assert!(!verifier.can_sign());
            assert_eq!(verifier.mint(&spec()).unwrap_err(), AuthError::CannotSign);
            let token = verifier.verify(&jwt).unwrap();
            assert_eq!(token.sub(), Some("ci"));
            assert_eq!(token.permission_for(&name("team-a")), Permission::PULL);
            assert!(signer.verify(&jwt).is_ok());
        }
    }

    #[test]
    fn minted_tokens_carry_attics_claims() {
        let mut spec = TokenSpec::new("ci", Duration::from_hours(90 * 24));
        spec.grant("team-*".parse().unwrap(), Permission::PULL)
            .grant("team-ci".parse().unwrap(), Permission::PULL)
            .grant("team-ci".parse().unwrap(), Permission::PUSH);
        let now = jsonwebtoken::get_current_timestamp();
        let jwt = hs().mint_at(&spec, now).unwrap();
        let payload = URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap();
        let expected = format!(
            r#"{{"exp":{},"nbf":{now},"sub":"ci","https://jwt.attic.rs/v1":{{"caches":{{"team-*":{{"r":1}},"team-ci":{{"r":1,"w":1}}}}}}}}"#,
            now + 90 * 86_400
        );
        assert_eq!(String::from_utf8(payload).unwrap(), expected);
        assert_eq!(hs().verify(&jwt).unwrap().claims().access, spec.access);
    }

    #[test]
    fn hs256_secret_rules() {
        assert_eq!(hs().algorithm_name(), "HS256");
        assert!(hs().can_sign());
        // Attic's own test secret ("very secure secret") is too short for RFC 7518.
        let Err(AuthError::InvalidKey(message)) =
            TokenAuthority::hs256_base64("dmVyeSBzZWN1cmUgc2VjcmV0")
        else {
            panic!("short secret accepted");
        };
        assert!(message.contains("18 bytes"), "{message}");
        assert!(matches!(
            TokenAuthority::hs256_base64("not base64!"),
            Err(AuthError::InvalidKey(_))
        ));
        assert!(!format!("{:?}", hs()).contains("garret auth"));
    }

    #[test]
    fn malformed_tokens() {
        let cases = [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!.e30.sig",
            "e30.e30.sig",
            "bm90IGpzb24.e30.sig",
        ];
        for jwt in cases {
            assert!(
                matches!(rejection_of(hs().verify(jwt)), TokenRejection::Malformed(_)),
                "{jwt}"
            );
        }
        let garbage_signature = format!(
            "{}.{}.!!",
            b64url(ATTIC_HEADER.as_bytes()),
            b64url(ATTIC_CLAIMS.as_bytes())
        );
        assert!(matches!(
            rejection_of(hs().verify(&garbage_signature)),
            TokenRejection::Malformed(_)
        ));
    }

    #[test]
    fn authenticate_from_headers() {
        let jwt = hs().mint(&spec()).unwrap();
        assert!(hs().authenticate(None).unwrap().is_none());
        let bearer = format!("Bearer {jwt}");
        assert_eq!(
            hs().authenticate(Some(bearer.as_bytes()))
                .unwrap()
                .unwrap()
                .sub(),
            Some("ci")
        );
        // Nix with `machine cache.example login ci-bot password <jwt>` in netrc.
        let basic = format!("Basic {}", STANDARD.encode(format!("ci-bot:{jwt}")));
        assert_eq!(
            hs().authenticate(Some(basic.as_bytes()))
                .unwrap()
                .unwrap()
                .sub(),
            Some("ci")
        );

        // Invalid credentials are a 401, never anonymous.
        let expired = hs()
            .mint_at(&spec(), jsonwebtoken::get_current_timestamp() - 7200)
            .unwrap();
        let basic = format!("Basic {}", STANDARD.encode(format!(":{expired}")));
        let error = hs().authenticate(Some(basic.as_bytes())).unwrap_err();
        assert_eq!(error, AuthError::InvalidToken(TokenRejection::Expired));
        assert_eq!((error.status(), error.kind()), (401, "InvalidToken"));
        assert_eq!(
            error.to_string(),
            "Invalid token: token has expired; mint a new one"
        );
        assert!(matches!(
            hs().authenticate(Some(b"Bearer not-a-jwt")),
            Err(AuthError::InvalidToken(TokenRejection::Malformed(_)))
        ));
        assert!(matches!(
            hs().authenticate(Some(b"Negotiate abc")),
            Err(AuthError::InvalidToken(TokenRejection::BadHeader(_)))
        ));
    }
}
