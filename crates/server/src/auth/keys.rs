//! RS256 key loading. We parse PEM ourselves instead of enabling
//! jsonwebtoken's `use_pem` (which pulls in simple_asn1 and num-bigint): the
//! armor is plain base64, and aws-lc, which we already build, validates the
//! key material itself.

use std::borrow::Cow;

use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair, RsaSubjectPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{DecodingKey, EncodingKey};

use super::AuthError;

/// Loads an RSA key from PEM, or from base64 of PEM (the form of Attic's
/// `token-rs256-secret-base64` / `token-rs256-pubkey-base64` settings, so
/// those values can be pasted as they are).
///
/// A private key (PKCS#1 `RSA PRIVATE KEY` as `openssl genrsa -traditional`
/// writes it, or PKCS#8 `PRIVATE KEY` as OpenSSL 3 writes by default) yields
/// both keys; a public key (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`) only
/// verifies. Every key is parsed by aws-lc here, so a bad key fails at
/// startup rather than on the first request.
pub(super) fn rsa_keys(input: &[u8]) -> Result<(DecodingKey, Option<EncodingKey>), AuthError> {
    let pem = unwrap_base64(input)?;
    let (label, der) = parse_pem(&pem)?;
    let rejected = |e: aws_lc_rs::error::KeyRejected| {
        AuthError::InvalidKey(format!("aws-lc rejected the {label}: {e}"))
    };
    match label {
        "RSA PRIVATE KEY" => {
            let pair = RsaKeyPair::from_der(&der).map_err(rejected)?;
            let decoding = DecodingKey::from_rsa_der(pair.public_key().as_ref());
            Ok((decoding, Some(EncodingKey::from_rsa_der(&der))))
        }
        "PRIVATE KEY" => {
            let pair = RsaKeyPair::from_pkcs8(&der).map_err(rejected)?;
            // jsonwebtoken signs from the PKCS#1 form nested inside PKCS#8.
            let pkcs1 = pkcs8_private_key(&der)
                .filter(|pkcs1| RsaKeyPair::from_der(pkcs1).is_ok())
                .ok_or_else(|| AuthError::InvalidKey("unexpected PKCS#8 layout".into()))?;
            let decoding = DecodingKey::from_rsa_der(pair.public_key().as_ref());
            Ok((decoding, Some(EncodingKey::from_rsa_der(pkcs1))))
        }
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {
            let public = RsaSubjectPublicKey::from_der(&der).map_err(rejected)?;
            Ok((DecodingKey::from_rsa_der(public.as_ref()), None))
        }
        "ENCRYPTED PRIVATE KEY" => Err(AuthError::InvalidKey(
            "encrypted private keys are not supported; decrypt it with `openssl pkey`".into(),
        )),
        other => Err(AuthError::InvalidKey(format!(
            "expected an RSA key in PEM, found a `{other}` block"
        ))),
    }
}

fn unwrap_base64(input: &[u8]) -> Result<Cow<'_, str>, AuthError> {
    let text = std::str::from_utf8(input)
        .map_err(|_| AuthError::InvalidKey("key is neither PEM nor base64 of PEM".into()))?
        .trim();
    if text.is_empty() {
        return Err(AuthError::InvalidKey("key is empty".into()));
    }
    if text.starts_with("-----BEGIN ") {
        return Ok(Cow::Borrowed(text));
    }
    let compact: String = text.split_ascii_whitespace().collect();
    STANDARD
        .decode(compact)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(Cow::Owned)
        .ok_or_else(|| AuthError::InvalidKey("key is neither PEM nor base64 of PEM".into()))
}

/// The label and DER body of the first PEM block.
fn parse_pem(text: &str) -> Result<(&str, Vec<u8>), AuthError> {
    let malformed = |what: &str| AuthError::InvalidKey(format!("malformed PEM: {what}"));
    let start = text
        .find("-----BEGIN ")
        .ok_or_else(|| malformed("no BEGIN line"))?;
    let (label, rest) = text[start + "-----BEGIN ".len()..]
        .split_once("-----")
        .ok_or_else(|| malformed("unterminated BEGIN line"))?;
    let (body, _) = rest
        .split_once(&format!("-----END {label}-----"))
        .ok_or_else(|| malformed("no matching END line"))?;
    if body.contains(':') {
        // RFC 1421 headers such as `Proc-Type: 4,ENCRYPTED`.
        return Err(AuthError::InvalidKey(
            "PEM headers (an encrypted key?) are not supported; decrypt it with `openssl pkey`"
                .into(),
        ));
    }
    let base64: String = body.split_ascii_whitespace().collect();
    let der = STANDARD
        .decode(base64)
        .map_err(|_| malformed("body is not base64"))?;
    Ok((label, der))
}

/// The `privateKey` OCTET STRING of a PKCS#8 `PrivateKeyInfo`
/// (RFC 5208: SEQUENCE { version INTEGER, algorithm SEQUENCE, privateKey
/// OCTET STRING, ... }). Only locates bytes: aws-lc validates them after.
fn pkcs8_private_key(der: &[u8]) -> Option<&[u8]> {
    let (0x30, info, _) = der_element(der)? else {
        return None;
    };
    let (0x02, _version, rest) = der_element(info)? else {
        return None;
    };
    let (0x30, _algorithm, rest) = der_element(rest)? else {
        return None;
    };
    let (0x04, key, _) = der_element(rest)? else {
        return None;
    };
    Some(key)
}

/// Splits one DER element into (tag, contents, remainder).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(count);
        let len = len_bytes
            .iter()
            .fold(0, |len, &b| (len << 8) | usize::from(b));
        (len, rest)
    };
    (rest.len() >= len).then(|| {
        let (contents, rest) = rest.split_at(len);
        (tag, contents, rest)
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) const A_PRIVATE_PKCS1: &[u8] = include_bytes!("../../testdata/rs256-a.key.pem");
    pub(crate) const A_PUBLIC_SPKI: &[u8] = include_bytes!("../../testdata/rs256-a.pub.pem");
    pub(crate) const B_PRIVATE_PKCS8: &[u8] = include_bytes!("../../testdata/rs256-b.key.pem");
    pub(crate) const B_PUBLIC_PKCS1: &[u8] = include_bytes!("../../testdata/rs256-b.pub.pem");

    #[test]
    fn every_pem_flavour_loads() {
        for (pem, private) in [
            (A_PRIVATE_PKCS1, true),
            (A_PUBLIC_SPKI, false),
            (B_PRIVATE_PKCS8, true),
            (B_PUBLIC_PKCS1, false),
        ] {
            let (_, encoding) = rsa_keys(pem).unwrap();
            assert_eq!(encoding.is_some(), private);
            // Attic's config holds base64 of the PEM.
            let wrapped = STANDARD.encode(pem);
            assert_eq!(rsa_keys(wrapped.as_bytes()).unwrap().1.is_some(), private);
        }
    }

    fn der_of(key: &DecodingKey) -> &[u8] {
        match key.kind() {
            jsonwebtoken::DecodingKeyKind::SecretOrDer(der) => der,
            jsonwebtoken::DecodingKeyKind::RsaModulusExponent { .. } => panic!("expected DER"),
        }
    }

    /// A private key verifies with exactly the public key `openssl` derives.
    #[test]
    fn private_and_public_forms_agree() {
        for (private, public) in [
            (A_PRIVATE_PKCS1, A_PUBLIC_SPKI),
            (B_PRIVATE_PKCS8, B_PUBLIC_PKCS1),
        ] {
            let from_private = rsa_keys(private).unwrap().0;
            let from_public = rsa_keys(public).unwrap().0;
            assert_eq!(der_of(&from_private), der_of(&from_public));
        }
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        let cases: [(&[u8], &str); 7] = [
            (b" \n", "key is empty"),
            (b"not base64 !!", "neither PEM nor base64"),
            (b"aGVsbG8=", "no BEGIN line"),
            (b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n", "no matching END"),
            (b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", "aws-lc rejected"),
            (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "`CERTIFICATE`"),
            (
                b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
                "encrypted",
            ),
        ];
        for (input, reason) in cases {
            let Err(AuthError::InvalidKey(message)) = rsa_keys(input) else {
                panic!("{input:?} was accepted");
            };
            assert!(message.contains(reason), "{message}");
        }
    }

    #[test]
    fn der_lengths() {
        assert_eq!(
            der_element(&[0x04, 0x01, 0xaa, 0xbb]),
            Some((0x04, &[0xaa][..], &[0xbb][..]))
        );
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend([7; 256]);
        assert_eq!(
            der_element(&long).map(|(_, c, r)| (c.len(), r.len())),
            Some((256, 0))
        );
        assert_eq!(der_element(&[0x04, 0x02, 0xaa]), None);
        assert_eq!(der_element(&[0x04, 0x80]), None);
        assert_eq!(der_element(&[0x04]), None);
    }
}
