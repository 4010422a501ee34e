//! Nix's ed25519 keys and detached signatures, in the `<name>:<base64>` text forms
//! that `nix-store --generate-binary-cache-key`, `trusted-public-keys` and narinfo
//! `Sig:` lines use.
//!
//! The key name travels with every key and signature because Nix picks the key to
//! check a signature with by name alone: a signature is only ever checked against
//! the trusted key of the same name.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE64;
use ed25519_dalek::Signer as _;
use thiserror::Error;

const SEED_LEN: usize = ed25519_dalek::SECRET_KEY_LENGTH;
const KEYPAIR_LEN: usize = ed25519_dalek::KEYPAIR_LENGTH;
const PUBLIC_LEN: usize = ed25519_dalek::PUBLIC_KEY_LENGTH;
const SIGNATURE_LEN: usize = ed25519_dalek::SIGNATURE_LENGTH;

/// Errors never quote the text they reject: for secret keys that text is the secret.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum SigningError {
    #[error("expected `<name>:<base64>`, found no `:`")]
    MissingColon,
    #[error("key name {0:?} must be non-empty without `:`, whitespace or control characters")]
    InvalidName(String),
    #[error("the part after `{name}:` is not valid padded base64")]
    BadBase64 { name: String },
    #[error("`{name}` holds {got} bytes, expected {expected}")]
    WrongLength {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("secret key `{0}`: the public half does not belong to the seed")]
    PublicHalfMismatch(String),
    #[error("public key `{0}` is not a valid ed25519 point")]
    InvalidPublicKey(String),
    #[error("no randomness for a new key: {0}")]
    Rng(getrandom::Error),
}

/// Nix itself only refuses empty names; whitespace is refused too because
/// `trusted-public-keys` is whitespace-separated, so such a key could never be
/// trusted, and control characters could break the line-based narinfo format.
fn validate_name(name: &str) -> Result<(), SigningError> {
    let bad = |c: char| c == ':' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.contains(bad) {
        return Err(SigningError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// Splits `<name>:<base64>` and decodes exactly `N` bytes.
fn decode_named<const N: usize>(text: &str) -> Result<(String, [u8; N]), SigningError> {
    let (name, data) = text.split_once(':').ok_or(SigningError::MissingColon)?;
    validate_name(name)?;
    let bytes = BASE64
        .decode(data.as_bytes())
        .map_err(|_| SigningError::BadBase64 {
            name: name.to_owned(),
        })?;
    let got = bytes.len();
    let bytes = bytes.try_into().map_err(|_| SigningError::WrongLength {
        name: name.to_owned(),
        expected: N,
        got,
    })?;
    Ok((name.to_owned(), bytes))
}

/// A named ed25519 secret key, as in the file written by
/// `nix-store --generate-binary-cache-key`: `<name>:<base64 of seed ‖ public key>`.
///
/// Deliberately not `Display`: rendering the secret takes an explicit
/// [`SigningKey::to_secret_string`] call, so it cannot leak through a format string.
#[derive(Clone)]
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// Creates a key from fresh OS randomness.
    pub fn generate(name: &str) -> Result<Self, SigningError> {
        validate_name(name)?;
        let mut seed = [0u8; SEED_LEN];
        getrandom::fill(&mut seed).map_err(SigningError::Rng)?;
        Ok(Self {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            signature: self.key.sign(message),
        }
    }

    /// The secret file format, readable by `nix store sign --key-file`.
    pub fn to_secret_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.key.to_keypair_bytes())
        )
    }
}

impl FromStr for SigningKey {
    type Err = SigningError;

    /// Nix does not check that the two halves agree; libsodium then hashes the
    /// stored public half into every signature, which makes them verify under no
    /// key at all. Refusing such a key here turns that silent failure into an error.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = decode_named::<KEYPAIR_LEN>(s)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SigningError::PublicHalfMismatch(name.clone()))?;
        Ok(Self { name, key })
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .field(
                "public",
                &BASE64.encode(self.key.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

/// A named ed25519 public key: `<name>:<base64 of 32 bytes>`, as in
/// `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Like Nix, a signature made under another key name never verifies, even if
    /// the key bytes are the same. Verification is strict (no small-order keys or
    /// points, canonical scalars), matching libsodium, which Nix uses.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        signature.name == self.name
            && self
                .key
                .verify_strict(message, &signature.signature)
                .is_ok()
    }
}

impl FromStr for VerifyingKey {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = decode_named::<PUBLIC_LEN>(s)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SigningError::InvalidPublicKey(name.clone()))?;
        Ok(Self { name, key })
    }
}

impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({self})")
    }
}

/// A detached signature tagged with the name of the key that made it:
/// `<name>:<base64 of 64 bytes>`, the value of a narinfo `Sig:` line.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    name: String,
    signature: ed25519_dalek::Signature,
}

impl Signature {
    pub fn key_name(&self) -> &str {
        &self.name
    }
}

impl FromStr for Signature {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = decode_named::<SIGNATURE_LEN>(s)?;
        Ok(Self {
            name,
            signature: ed25519_dalek::Signature::from_bytes(&bytes),
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.name,
            BASE64.encode(&self.signature.to_bytes())
        )
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated with `nix-store --generate-binary-cache-key test-1 sk pk` (Nix 2.8).
    const NIX_SECRET: &str = "test-1:Bnb15opoa31TNjTaFtFMYE2o9S+YFT0N4FCNLRw9dpZfUXUDOQrtcXuVE778+Eg/57niAMOenwcU8D8z0RH8Ng==";
    const NIX_PUBLIC: &str = "test-1:X1F1AzkK7XF7lRO+/PhIP+e54gDDnp8HFPA/M9ER/DY=";

    #[test]
    fn parses_and_renders_nix_keys() {
        let secret: SigningKey = NIX_SECRET.parse().unwrap();
        assert_eq!(secret.name(), "test-1");
        assert_eq!(secret.to_secret_string(), NIX_SECRET);
        let public: VerifyingKey = NIX_PUBLIC.parse().unwrap();
        assert_eq!(secret.verifying_key(), public);
        assert_eq!(public.to_string(), NIX_PUBLIC);
        assert_eq!(public.name(), "test-1");
    }

    #[test]
    fn debug_hides_the_secret() {
        let secret: SigningKey = NIX_SECRET.parse().unwrap();
        let debug = format!("{secret:?}");
        let secret_b64 = NIX_SECRET.split_once(':').unwrap().1;
        assert!(!debug.contains(&secret_b64[..40]), "{debug}");
        assert!(debug.contains("X1F1AzkK7XF7lRO+"), "{debug}");
    }

    #[test]
    fn sign_and_verify() {
        let key = SigningKey::generate("cache.example-1").unwrap();
        let public = key.verifying_key();
        let sig = key.sign(b"message");
        assert_eq!(sig.key_name(), "cache.example-1");
        assert!(public.verify(b"message", &sig));
        assert!(!public.verify(b"messagE", &sig));
        assert_eq!(sig.to_string().parse::<Signature>().unwrap(), sig);
        // A key reloaded from its secret file signs identically (ed25519 is deterministic).
        let reloaded: SigningKey = key.to_secret_string().parse().unwrap();
        assert_eq!(reloaded.sign(b"message"), sig);
    }

    #[test]
    fn wrong_key_or_name_does_not_verify() {
        let key = SigningKey::generate("a").unwrap();
        let sig = key.sign(b"m");
        let other = SigningKey::generate("a").unwrap().verifying_key();
        assert!(!other.verify(b"m", &sig));
        // Same key bytes, different name: Nix looks keys up by name, so this fails.
        let renamed: VerifyingKey = format!(
            "b:{}",
            key.verifying_key().to_string().split_once(':').unwrap().1
        )
        .parse()
        .unwrap();
        assert!(!renamed.verify(b"m", &sig));
    }

    #[test]
    fn rejects_malformed_keys_and_signatures() {
        let public_b64 = NIX_PUBLIC.split_once(':').unwrap().1;
        let secret_b64 = NIX_SECRET.split_once(':').unwrap().1;
        assert_eq!(
            public_b64.parse::<VerifyingKey>(),
            Err(SigningError::MissingColon)
        );
        for name in ["", "a b", "a\nb", "tab\t"] {
            assert_eq!(
                format!("{name}:{public_b64}").parse::<VerifyingKey>(),
                Err(SigningError::InvalidName(name.into())),
                "{name:?}"
            );
        }
        // A second colon lands in the base64 part.
        assert_eq!(
            format!("a:b:{public_b64}").parse::<VerifyingKey>(),
            Err(SigningError::BadBase64 { name: "a".into() })
        );
        assert_eq!(
            "k:not base64!".parse::<Signature>(),
            Err(SigningError::BadBase64 { name: "k".into() })
        );
        // Unpadded base64 is not what Nix writes.
        assert_eq!(
            format!("k:{}", public_b64.trim_end_matches('=')).parse::<VerifyingKey>(),
            Err(SigningError::BadBase64 { name: "k".into() })
        );
        assert_eq!(
            format!("k:{secret_b64}").parse::<VerifyingKey>(),
            Err(SigningError::WrongLength {
                name: "k".into(),
                expected: 32,
                got: 64
            })
        );
        assert_eq!(
            format!("k:{public_b64}").parse::<SigningKey>().unwrap_err(),
            SigningError::WrongLength {
                name: "k".into(),
                expected: 64,
                got: 32
            }
        );
        assert_eq!(
            format!("k:{public_b64}").parse::<Signature>(),
            Err(SigningError::WrongLength {
                name: "k".into(),
                expected: 64,
                got: 32
            })
        );
        assert_eq!(
            format!("k:{}", BASE64.encode(&[0u8; 5])).parse::<VerifyingKey>(),
            Err(SigningError::WrongLength {
                name: "k".into(),
                expected: 32,
                got: 5
            })
        );
    }

    #[test]
    fn rejects_secret_with_foreign_public_half() {
        let mut bytes = BASE64
            .decode(NIX_SECRET.split_once(':').unwrap().1.as_bytes())
            .unwrap();
        let other = SigningKey::generate("x").unwrap().verifying_key();
        bytes[32..].copy_from_slice(other.key.as_bytes());
        let text = format!("test-1:{}", BASE64.encode(&bytes));
        assert_eq!(
            text.parse::<SigningKey>().unwrap_err(),
            SigningError::PublicHalfMismatch("test-1".into())
        );
    }

    #[test]
    fn rejects_public_key_off_the_curve() {
        // y = 2 has no x on edwards25519, so this encoding decompresses to nothing.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        let text = format!("k:{}", BASE64.encode(&bytes));
        assert_eq!(
            text.parse::<VerifyingKey>(),
            Err(SigningError::InvalidPublicKey("k".into()))
        );
    }

    #[test]
    fn generate_validates_the_name() {
        assert_eq!(
            SigningKey::generate("a:b").unwrap_err(),
            SigningError::InvalidName("a:b".into())
        );
    }
}
