//! Attic-compatible authentication and authorization, free of any HTTP
//! framework so the axum and tonic layers share one implementation.
//!
//! # Decisions
//!
//! - **Token format** is Attic's: a JWT (HS256 with a base64 secret, or
//!   RS256) whose `https://jwt.attic.rs/v1` claim maps cache-name patterns to
//!   `r`/`w`/`d`/`cc`/`cr`/`cq`/`cd` flags, so tokens minted by `atticadm` keep
//!   working after a migration and ours work with the `attic` client.
//! - **`exp` is optional**, as in Attic (its verifier only checks `exp` when
//!   present); `atticadm make-token` always sets one and so does
//!   [`TokenAuthority::mint`]. `nbf` is checked when present. Both get 60 s of
//!   leeway because `make-token` sets `nbf` to "now" and CI clocks drift.
//! - **`iss`/`aud`**: when the operator binds them, a token must carry a
//!   matching claim (Attic's bound issuer and audiences behave the same way).
//! - **An invalid token is a 401, not anonymous.** Attic silently downgrades a
//!   bad token to anonymous, which turns an expired CI token into a baffling
//!   "401 Unauthorized" on a private cache, or into success on a public one
//!   that breaks later on push. We reject expired, wrongly signed, `alg: none`
//!   and malformed tokens with [`AuthError::InvalidToken`] and a reason
//!   ([`TokenRejection`]), so the client log says what to fix. Sending no
//!   `Authorization` header at all is anonymous.
//! - **Discovery** follows Attic: see [`authorize`].
//! - **HS256 secrets shorter than 32 bytes are refused** (RFC 7518 §3.2 makes
//!   that a MUST); Attic's documented `openssl rand 64 | base64` secrets pass.

mod header;
mod keys;
mod name;
mod permission;
mod token;

pub use header::jwt_from_authorization;
pub use name::{CacheName, CacheNamePattern, MAX_NAME_LEN};
pub use permission::{CacheState, Permission, ReapiAccess, Requester, authorize, authorize_reapi};
pub use token::{AtticAccess, Audience, CLAIM_NAMESPACE, Claims, Token, TokenAuthority, TokenSpec};

/// Why an access was refused, in the kinds Attic's clients already know.
///
/// The HTTP layer renders every variant as Attic's error body
/// `{"code": status(), "error": kind(), "message": to_string()}` and the gRPC
/// layer uses [`AuthError::grpc_code`], so no call site picks a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The requester holds no permission at all on the cache, so it may not
    /// even learn whether the cache exists.
    #[error("Unauthorized: {requester} has no permission on cache `{cache}`")]
    Unauthorized {
        cache: CacheName,
        requester: Requester,
    },

    /// The requester may see the cache but not do this to it.
    #[error("Access error: {requester} lacks the {missing} permission on cache `{cache}`")]
    Forbidden {
        cache: CacheName,
        missing: Permission,
        requester: Requester,
    },

    /// Shown only to requesters with some permission on the name.
    #[error("The requested cache `{0}` does not exist")]
    NoSuchCache(CacheName),

    /// A credential was presented but is unusable; never treated as anonymous.
    #[error("Invalid token: {0}")]
    InvalidToken(TokenRejection),

    /// A cache name (or token pattern) from the URL, a request body or the
    /// CLI that the naming rules reject.
    #[error(
        "Invalid cache name `{0}`: use 1-50 characters from A-Z a-z 0-9 - _ + \
         (patterns may also use * and ?), starting with a letter or digit"
    )]
    InvalidCacheName(String),

    /// Configuration or minting failure; never produced while serving a
    /// request, so its detail may be logged but need not reach clients.
    #[error("Unusable token key: {0}")]
    InvalidKey(String),

    /// Minting was asked of a server configured with only an RS256 public key.
    #[error("Cannot mint tokens: this server holds only an RS256 public key")]
    CannotSign,
}

impl AuthError {
    /// HTTP status, matching Attic's mapping for the shared kinds.
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthorized { .. } | Self::InvalidToken(_) => 401,
            Self::Forbidden { .. } => 403,
            Self::NoSuchCache(_) => 404,
            Self::InvalidCacheName(_) => 400,
            Self::InvalidKey(_) | Self::CannotSign => 500,
        }
    }

    /// The `error` field of Attic's JSON error body.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unauthorized { .. } => "Unauthorized",
            Self::Forbidden { .. } => "AccessError",
            Self::NoSuchCache(_) => "NoSuchCache",
            Self::InvalidToken(_) => "InvalidToken",
            Self::InvalidCacheName(_) => "InvalidCacheName",
            Self::InvalidKey(_) | Self::CannotSign => "InternalServerError",
        }
    }

    /// Canonical gRPC status code number (as `tonic::Code::from(i32)` takes),
    /// so REAPI answers agree with the HTTP ones.
    pub fn grpc_code(&self) -> i32 {
        match self {
            Self::Unauthorized { .. } | Self::InvalidToken(_) => 16, // UNAUTHENTICATED
            Self::Forbidden { .. } => 7,                             // PERMISSION_DENIED
            Self::NoSuchCache(_) => 5,                               // NOT_FOUND
            Self::InvalidCacheName(_) => 3,                          // INVALID_ARGUMENT
            Self::InvalidKey(_) | Self::CannotSign => 13,            // INTERNAL
        }
    }
}

/// The precise reason a presented credential was rejected, so tests can
/// assert it and operators can read it in client logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("malformed Authorization header: {0}")]
    BadHeader(String),
    #[error("not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("algorithm `{found}` is not accepted; this server accepts only {expected}")]
    WrongAlgorithm {
        found: String,
        expected: &'static str,
    },
    #[error("signature does not verify with this server's key (was it minted by another server?)")]
    BadSignature,
    #[error("token has expired; mint a new one")]
    Expired,
    #[error("token is not valid yet (`nbf` is in the future; check clocks)")]
    NotYetValid,
    #[error("issuer (`iss`) does not match this server's")]
    WrongIssuer,
    #[error("audience (`aud`) does not include this server's")]
    WrongAudience,
    #[error("required claim `{0}` is missing")]
    MissingClaim(String),
    #[error("claims are not in Attic's format: {0}")]
    BadClaims(String),
}

impl From<TokenRejection> for AuthError {
    fn from(rejection: TokenRejection) -> Self {
        Self::InvalidToken(rejection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_kind_and_grpc_table() {
        let cache = CacheName::new("c").unwrap();
        let cases = [
            (
                AuthError::Unauthorized {
                    cache: cache.clone(),
                    requester: Requester::Anonymous,
                },
                401,
                "Unauthorized",
                16,
            ),
            (
                AuthError::Forbidden {
                    cache: cache.clone(),
                    missing: Permission::PUSH,
                    requester: Requester::Anonymous,
                },
                403,
                "AccessError",
                7,
            ),
            (AuthError::NoSuchCache(cache), 404, "NoSuchCache", 5),
            (
                AuthError::InvalidToken(TokenRejection::Expired),
                401,
                "InvalidToken",
                16,
            ),
            (
                AuthError::InvalidCacheName("-x".into()),
                400,
                "InvalidCacheName",
                3,
            ),
            (
                AuthError::InvalidKey("x".into()),
                500,
                "InternalServerError",
                13,
            ),
            (AuthError::CannotSign, 500, "InternalServerError", 13),
        ];
        for (error, status, kind, grpc) in cases {
            assert_eq!(
                (error.status(), error.kind(), error.grpc_code()),
                (status, kind, grpc),
                "{error}"
            );
        }
    }

    #[test]
    fn messages_name_the_requester_and_the_missing_permission() {
        let error = AuthError::Forbidden {
            cache: CacheName::new("team-a").unwrap(),
            missing: Permission::PUSH,
            requester: Requester::Token {
                subject: Some("ci".into()),
            },
        };
        assert_eq!(
            error.to_string(),
            "Access error: token `ci` lacks the push (w) permission on cache `team-a`"
        );
        let error = AuthError::Unauthorized {
            cache: CacheName::new("team-a").unwrap(),
            requester: Requester::Anonymous,
        };
        assert_eq!(
            error.to_string(),
            "Unauthorized: an anonymous request (no token) has no permission on cache `team-a`"
        );
    }
}
