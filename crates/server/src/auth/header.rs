//! Finding the JWT in an `Authorization` header value.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{AuthError, TokenRejection};

/// The JWT carried by an `Authorization` header value: `Bearer <jwt>`, or
/// `Basic base64(user:<jwt>)` with the user ignored, which is what Nix sends
/// from a netrc entry (`machine cache.example password <jwt>`, with or without
/// a `login`). Scheme names are case-insensitive (RFC 9110 §11.1).
///
/// Takes raw bytes so the HTTP layer needs no conversion of its own, and
/// refuses anything unusable with a 401 rather than falling back to anonymous.
pub fn jwt_from_authorization(value: &[u8]) -> Result<Cow<'_, str>, AuthError> {
    let bad = |reason: &str| AuthError::InvalidToken(TokenRejection::BadHeader(reason.to_owned()));
    let value = std::str::from_utf8(value)
        .ok()
        .filter(|v| {
            v.bytes()
                .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
        })
        .ok_or_else(|| bad("not printable ASCII"))?
        .trim();
    let (scheme, credentials) = value
        .split_once([' ', '\t'])
        .map_or((value, ""), |(scheme, rest)| (scheme, rest.trim()));
    if credentials.is_empty() {
        return Err(bad("expected `Bearer <token>` or `Basic <credentials>`"));
    }
    if credentials.contains([' ', '\t']) {
        return Err(bad("unexpected whitespace inside the credentials"));
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Cow::Borrowed(credentials))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD
            .decode(credentials)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| bad("Basic credentials are not base64 of UTF-8"))?;
        let Some((_user, password)) = decoded.split_once(':') else {
            return Err(bad("Basic credentials lack the `user:password` colon"));
        };
        if password.is_empty() {
            return Err(bad(
                "Basic password is empty; put the token in the netrc `password` field",
            ));
        }
        Ok(Cow::Owned(password.to_owned()))
    } else {
        Err(bad(&format!(
            "unsupported scheme `{scheme}`; use Bearer or Basic"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_password: &str) -> String {
        format!("Basic {}", STANDARD.encode(user_password))
    }

    #[test]
    fn bearer_and_basic() {
        let cases = [
            ("Bearer abc.def.ghi".to_owned(), "abc.def.ghi"),
            ("bearer abc.def.ghi".to_owned(), "abc.def.ghi"),
            ("BEARER   abc.def.ghi  ".to_owned(), "abc.def.ghi"),
            ("Bearer\tabc.def.ghi".to_owned(), "abc.def.ghi"),
            // netrc with a login: the user name is ignored.
            (basic("ci-bot:abc.def.ghi"), "abc.def.ghi"),
            // netrc with only a password: curl sends an empty user.
            (basic(":abc.def.ghi"), "abc.def.ghi"),
            (basic("u:a:b"), "a:b"),
            (basic("ci:abc").replace("Basic", "basic"), "abc"),
        ];
        for (header, jwt) in cases {
            assert_eq!(
                jwt_from_authorization(header.as_bytes()).unwrap(),
                jwt,
                "{header}"
            );
        }
    }

    #[test]
    fn malformed_headers_are_401_with_a_reason() {
        let cases: [(&[u8], &str); 11] = [
            (b"", "expected `Bearer"),
            (b"Bearer", "expected `Bearer"),
            (b"Bearer   ", "expected `Bearer"),
            (b"abc.def.ghi", "expected `Bearer"),
            (b"Bearer a b", "whitespace"),
            (b"Token abc", "unsupported scheme `Token`"),
            (b"Digest username=x", "unsupported scheme `Digest`"),
            (b"Basic !!!", "not base64"),
            (b"Basic bm8tY29sb24=", "colon"),
            (b"Basic dXNlcjo=", "password is empty"),
            (b"Bearer \xff", "printable ASCII"),
        ];
        for (header, reason) in cases {
            let error = jwt_from_authorization(header).unwrap_err();
            assert_eq!(error.status(), 401);
            let AuthError::InvalidToken(TokenRejection::BadHeader(message)) = &error else {
                panic!("{error:?}");
            };
            assert!(message.contains(reason), "{message}");
        }
    }
}
