//! Narinfo files, the `<hash>.narinfo` documents a binary cache serves: `Key: value`
//! lines describing one store path, its NAR and its signatures.
//!
//! The parser is as strict as Nix 2.8's where Nix refuses a file, because anything
//! we accept we may later serve, and a client that refuses it treats the whole path
//! as broken. Where Nix silently misreads input, we refuse instead:
//! - `Key:value` without the space: Nix drops the first character of the value.
//! - `\r` anywhere: with CRLF endings Nix keeps the `\r` in every value, which
//!   breaks the store path, the hashes and the sizes, so no CRLF narinfo works.
//! - A known key given twice (other than `Sig`): Nix keeps the last one, except
//!   References and CA which it refuses. Two readers that disagree on which value
//!   counts are a way to smuggle a second meaning past one of them.
//!
//! Like Nix, unknown keys are ignored (and so are not rendered back), and keys may
//! come in any order.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use thiserror::Error;

use crate::hash::{HashError, Sha256Hash};
use crate::nixbase32;
use crate::signing::{Signature, SigningKey, VerifyingKey};
use crate::store_path::{DEFAULT_STORE_DIR, StorePath, StorePathError};

/// What Nix assumes when a narinfo has no (or an empty) `Compression:` line: the
/// format of the earliest binary caches.
const DEFAULT_COMPRESSION: &str = "bzip2";

/// How Nix spells "no deriver" in a `Deriver:` line.
const UNKNOWN_DERIVER: &str = "unknown-deriver";

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum NarInfoError {
    #[error("line {line}: missing trailing newline")]
    MissingNewline { line: usize },
    #[error("line {line}: carriage return (CRLF line endings are not accepted)")]
    CarriageReturn { line: usize },
    #[error("line {line}: expected `Key: value`")]
    MissingSeparator { line: usize },
    #[error("line {line}: {key} appears more than once")]
    DuplicateKey { line: usize, key: &'static str },
    #[error("line {line}: {key}: {source}")]
    StorePath {
        line: usize,
        key: &'static str,
        #[source]
        source: StorePathError,
    },
    #[error("line {line}: {key}: {source}")]
    Hash {
        line: usize,
        key: &'static str,
        #[source]
        source: HashError,
    },
    #[error("line {line}: {key} {value:?} is not a decimal number that fits 64 bits")]
    InvalidNumber {
        line: usize,
        key: &'static str,
        value: String,
    },
    #[error("line {line}: NarSize is zero")]
    ZeroNarSize { line: usize },
    #[error("line {line}: URL is empty")]
    EmptyUrl { line: usize },
    #[error("line {line}: CA: {source}")]
    ContentAddress {
        line: usize,
        #[source]
        source: ContentAddressError,
    },
    #[error("required key {0} is missing")]
    MissingKey(&'static str),
    /// Only from [`NarInfo::validate`]: the value would not survive a render and parse.
    #[error("{field} cannot be written to a narinfo: {reason}")]
    Unrenderable {
        field: &'static str,
        reason: &'static str,
    },
}

#[derive(Debug, Error, PartialEq, Eq, Clone)]
#[error(
    "content address {0:?} is not `text:sha256:<hash>`, `fixed:<algo>:<hash>` or `fixed:r:<algo>:<hash>`"
)]
pub struct ContentAddressError(String);

/// The `CA:` value of a content-addressed path, kept as the exact text so that it
/// renders back byte for byte.
///
/// Nix records fixed outputs with whatever algorithm the derivation declared
/// (`fixed:sha512:…` and `fixed:r:sha1:…` are real), so md5, sha1 and sha512 are
/// accepted here even though narinfo hashes themselves are always SHA-256.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ContentAddress(String);

impl ContentAddress {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ContentAddress {
    type Err = ContentAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ContentAddressError(s.to_owned());
        let (rest, text_method) = if let Some(rest) = s.strip_prefix("text:") {
            (rest, true)
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            (rest.strip_prefix("r:").unwrap_or(rest), false)
        } else {
            return Err(bad());
        };
        let (algorithm, digest) = rest.split_once(':').ok_or_else(bad)?;
        let digest_len = match algorithm {
            "sha256" => 32,
            // Text hashing (`builtins.toFile`, .drv files) is SHA-256 only in Nix.
            _ if text_method => return Err(bad()),
            "sha512" => 64,
            "sha1" => 20,
            "md5" => 16,
            _ => return Err(bad()),
        };
        if decodes_to(digest, digest_len) {
            Ok(Self(s.to_owned()))
        } else {
            Err(bad())
        }
    }
}

/// Whether `digest` is `len` bytes in base16, nix32 or base64, told apart by length
/// as Nix does (the three lengths never coincide for one digest size).
fn decodes_to(digest: &str, len: usize) -> bool {
    let bytes = digest.as_bytes();
    let decoded = if bytes.len() == 2 * len {
        HEXLOWER_PERMISSIVE.decode(bytes).ok()
    } else if bytes.len() == nixbase32::encoded_len(len) {
        nixbase32::decode(bytes).ok()
    } else if bytes.len() == BASE64.encode_len(len) {
        BASE64.decode(bytes).ok()
    } else {
        None
    };
    decoded.is_some_and(|d| d.len() == len)
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentAddress({})", self.0)
    }
}

/// One narinfo file.
///
/// The fields are public so the server can build one from upload metadata; call
/// [`NarInfo::validate`] on anything built that way before rendering it, since a
/// line break in a string field would let its author add lines to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Where the (possibly compressed) NAR is, relative to the cache root.
    pub url: String,
    pub compression: String,
    /// Hash and size of the file at `url`, which Attic-style caches leave out.
    pub file_hash: Option<Sha256Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Rendered in this order; the fingerprint sorts them, as Nix's set does.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    /// `<key name>:<base64>` strings. Kept opaque because Nix keeps signatures it
    /// cannot parse and passes them on; [`Signature`] parses them when checking.
    pub signatures: Vec<String>,
    pub ca: Option<ContentAddress>,
}

/// Keys that may appear at most once. `Sig` may repeat; unknown keys are ignored.
const SINGLE_VALUED: [&str; 11] = [
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "System",
    "CA",
];

/// A narinfo while its lines are being read.
#[derive(Default)]
struct Fields {
    seen: [bool; SINGLE_VALUED.len()],
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Sha256Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Sha256Hash>,
    nar_size: Option<u64>,
    references: Vec<StorePath>,
    deriver: Option<StorePath>,
    system: Option<String>,
    signatures: Vec<String>,
    ca: Option<ContentAddress>,
}

impl Fields {
    fn apply(
        &mut self,
        key: &str,
        value: &str,
        line: usize,
        store_dir: &str,
    ) -> Result<(), NarInfoError> {
        if let Some(i) = SINGLE_VALUED.iter().position(|k| *k == key)
            && std::mem::replace(&mut self.seen[i], true)
        {
            return Err(NarInfoError::DuplicateKey {
                line,
                key: SINGLE_VALUED[i],
            });
        }
        let store_path_error = |key| move |source| NarInfoError::StorePath { line, key, source };
        let hash = |key| {
            Sha256Hash::parse_prefixed(value).map_err(|source| NarInfoError::Hash {
                line,
                key,
                source,
            })
        };
        match key {
            "StorePath" => {
                let path = StorePath::from_absolute_path_in(value, store_dir);
                self.store_path = Some(path.map_err(store_path_error("StorePath"))?);
            }
            "URL" if value.is_empty() => return Err(NarInfoError::EmptyUrl { line }),
            "URL" => self.url = Some(value.to_owned()),
            "Compression" => self.compression = Some(value.to_owned()),
            "FileHash" => self.file_hash = Some(hash("FileHash")?),
            "FileSize" => self.file_size = Some(parse_number(value, "FileSize", line)?),
            "NarHash" => self.nar_hash = Some(hash("NarHash")?),
            "NarSize" => match parse_number(value, "NarSize", line)? {
                0 => return Err(NarInfoError::ZeroNarSize { line }),
                size => self.nar_size = Some(size),
            },
            // Nix splits on single spaces and skips the empty pieces.
            "References" => {
                self.references = value
                    .split(' ')
                    .filter(|base| !base.is_empty())
                    .map(|base| {
                        StorePath::from_base_name(base).map_err(store_path_error("References"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "Deriver" if value == UNKNOWN_DERIVER => {}
            "Deriver" => {
                let path = StorePath::from_base_name(value);
                self.deriver = Some(path.map_err(store_path_error("Deriver"))?);
            }
            "System" => self.system = Some(value.to_owned()),
            "Sig" => self.signatures.push(value.to_owned()),
            // Nix reads an empty CA as none.
            "CA" if value.is_empty() => {}
            "CA" => {
                let ca = value
                    .parse()
                    .map_err(|source| NarInfoError::ContentAddress { line, source });
                self.ca = Some(ca?);
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self) -> Result<NarInfo, NarInfoError> {
        Ok(NarInfo {
            store_path: self
                .store_path
                .ok_or(NarInfoError::MissingKey("StorePath"))?,
            url: self.url.ok_or(NarInfoError::MissingKey("URL"))?,
            compression: self
                .compression
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| DEFAULT_COMPRESSION.to_owned()),
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self.nar_hash.ok_or(NarInfoError::MissingKey("NarHash"))?,
            nar_size: self.nar_size.ok_or(NarInfoError::MissingKey("NarSize"))?,
            references: self.references,
            deriver: self.deriver,
            system: self.system,
            signatures: self.signatures,
            ca: self.ca,
        })
    }
}

/// Digits only: Rust's `u64::from_str` would also take a leading `+`, which Nix's
/// writer never produces.
fn parse_number(value: &str, key: &'static str, line: usize) -> Result<u64, NarInfoError> {
    let invalid = || NarInfoError::InvalidNumber {
        line,
        key,
        value: value.to_owned(),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    value.parse().map_err(|_| invalid())
}

impl NarInfo {
    /// Parses a narinfo whose `StorePath:` lies in `store_dir` (no trailing slash).
    pub fn parse(text: &str, store_dir: &str) -> Result<Self, NarInfoError> {
        let mut fields = Fields::default();
        let mut rest = text;
        let mut line = 0;
        while !rest.is_empty() {
            line += 1;
            let (content, tail) = rest
                .split_once('\n')
                .ok_or(NarInfoError::MissingNewline { line })?;
            rest = tail;
            if content.contains('\r') {
                return Err(NarInfoError::CarriageReturn { line });
            }
            let (key, value) = content
                .split_once(':')
                .and_then(|(key, value)| Some((key, value.strip_prefix(' ')?)))
                .ok_or(NarInfoError::MissingSeparator { line })?;
            fields.apply(key, value, line, store_dir)?;
        }
        fields.finish()
    }

    /// Renders in the order Nix 2.8 writes, so that a narinfo Nix wrote comes back
    /// byte for byte. `References:` is always present, even when empty (with the
    /// trailing space Nix writes).
    pub fn render(&self, store_dir: &str) -> String {
        let mut out = String::new();
        self.write(&mut out, store_dir)
            .expect("writing to a String cannot fail");
        out
    }

    fn write(&self, out: &mut impl fmt::Write, store_dir: &str) -> fmt::Result {
        writeln!(
            out,
            "StorePath: {}",
            self.store_path.to_absolute_path_in(store_dir)
        )?;
        writeln!(out, "URL: {}", self.url)?;
        writeln!(out, "Compression: {}", self.compression)?;
        if let Some(file_hash) = &self.file_hash {
            writeln!(out, "FileHash: {file_hash}")?;
        }
        if let Some(file_size) = self.file_size {
            writeln!(out, "FileSize: {file_size}")?;
        }
        writeln!(out, "NarHash: {}", self.nar_hash)?;
        writeln!(out, "NarSize: {}", self.nar_size)?;
        out.write_str("References: ")?;
        for (i, reference) in self.references.iter().enumerate() {
            if i > 0 {
                out.write_char(' ')?;
            }
            write!(out, "{reference}")?;
        }
        out.write_char('\n')?;
        if let Some(deriver) = &self.deriver {
            writeln!(out, "Deriver: {deriver}")?;
        }
        if let Some(system) = &self.system {
            writeln!(out, "System: {system}")?;
        }
        for signature in &self.signatures {
            writeln!(out, "Sig: {signature}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(out, "CA: {ca}")?;
        }
        Ok(())
    }

    /// Checks that [`NarInfo::render`] produces text that parses back to `self`,
    /// which a value built in code (rather than parsed) does not guarantee.
    pub fn validate(&self) -> Result<(), NarInfoError> {
        let unrenderable = |field, reason| Err(NarInfoError::Unrenderable { field, reason });
        if self.url.is_empty() {
            return unrenderable("URL", "empty");
        }
        if self.compression.is_empty() {
            return unrenderable("Compression", "empty (Nix would read it as bzip2)");
        }
        if self.nar_size == 0 {
            return unrenderable("NarSize", "zero");
        }
        let mut strings = vec![("URL", &self.url), ("Compression", &self.compression)];
        strings.extend(self.system.iter().map(|system| ("System", system)));
        strings.extend(self.signatures.iter().map(|sig| ("Sig", sig)));
        if let Some((field, _)) = strings
            .iter()
            .find(|(_, value)| value.contains(['\n', '\r']))
        {
            return unrenderable(field, "contains a line break");
        }
        Ok(())
    }

    /// The text signatures cover: `1;<store path>;<NAR hash>;<NAR size>;<references>`,
    /// with absolute paths and the references sorted and deduplicated, since Nix
    /// builds it from a set. Nothing else in the narinfo (URL, compression, file
    /// hash, deriver, CA) is signed.
    pub fn fingerprint(&self, store_dir: &str) -> String {
        let mut references: Vec<String> = self
            .references
            .iter()
            .map(|r| r.to_absolute_path_in(store_dir))
            .collect();
        references.sort_unstable();
        references.dedup();
        format!(
            "1;{};{};{};{}",
            self.store_path.to_absolute_path_in(store_dir),
            self.nar_hash,
            self.nar_size,
            references.join(",")
        )
    }

    /// Signs the fingerprint, replacing any earlier signature under the same key
    /// name (see [`NarInfo::add_signature`]).
    pub fn sign(&mut self, key: &SigningKey, store_dir: &str) {
        self.add_signature(&key.sign(self.fingerprint(store_dir).as_bytes()));
    }

    /// Adds a signature made elsewhere (say, kept from an earlier
    /// [`SigningKey::sign`] of this fingerprint), replacing any earlier one
    /// under the same key name: a second one from the same key is either a
    /// duplicate or stale.
    pub fn add_signature(&mut self, signature: &Signature) {
        let name = signature.key_name();
        self.signatures.retain(|s| {
            s.strip_prefix(name)
                .is_none_or(|rest| !rest.starts_with(':'))
        });
        self.signatures.push(signature.to_string());
    }

    /// Whether some signature verifies under one of `trusted_keys`, the check Nix
    /// makes with `require-sigs`. A malformed signature just counts as invalid,
    /// where Nix aborts the whole check if it names a trusted key: one bad line
    /// should not hide a good signature next to it.
    ///
    /// Nix also accepts an unsigned path when its CA really produces its store path;
    /// computing that is not done here, so such paths come out `false`.
    pub fn has_valid_signature(&self, trusted_keys: &[VerifyingKey], store_dir: &str) -> bool {
        let fingerprint = self.fingerprint(store_dir);
        self.signatures
            .iter()
            .filter_map(|s| s.parse::<Signature>().ok())
            .any(|sig| {
                trusted_keys
                    .iter()
                    .any(|key| key.verify(fingerprint.as_bytes(), &sig))
            })
    }
}

impl FromStr for NarInfo {
    type Err = NarInfoError;

    /// Parses with the store directory every public cache uses.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, DEFAULT_STORE_DIR)
    }
}

/// Renders with [`DEFAULT_STORE_DIR`].
impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, DEFAULT_STORE_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Written by Nix 2.8 (`nix copy --to file://…?compression=none`) from a store
    /// at `/tmp/nx/s`, then signed with `nix store sign` using [`NIX_PUBLIC`]'s key.
    const NIX_IA: &str = "\
StorePath: /tmp/nx/s/1d5znchhxhcpyrzqsxbnaab6biq8ri7n-top
URL: nar/168nm06a6dcfwam3m6spxlkxzwak31068bhx65c52imrwzk0gzbz.nar
Compression: none
FileHash: sha256:168nm06a6dcfwam3m6spxlkxzwak31068bhx65c52imrwzk0gzbz
FileSize: 160
NarHash: sha256:168nm06a6dcfwam3m6spxlkxzwak31068bhx65c52imrwzk0gzbz
NarSize: 160
References: kw1yfndacfzlivnm5rkwncjmlpkya2xn-dep
Deriver: x9m2hj6mjwysw9h777jiw14nm69d08zj-top.drv
Sig: test-1:xPHat1hhmJ1RiD+EjkbLJauCgm6r/PneMxCt6aP5oVM/8IcwAtAB6RECcyGVH8OqVcpuFvlK8crM4bahdvngBw==
";
    const NIX_IA_STORE_DIR: &str = "/tmp/nx/s";

    /// Written and signed by Nix 2.8 for `nix-store --add-fixed sha512 a.txt`.
    const NIX_CA: &str = "\
StorePath: /nix/store/24vy5m62m27cswx0rjz0n7d7gx6fn9bh-a.txt
URL: nar/04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw.nar
Compression: none
FileHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
FileSize: 120
NarHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
NarSize: 120
References: 
Sig: test-1:Akgpbmru0ngUtwg2j1aO6/OWKiDmDM75OcVyZb3VgvTmXe7lm3wlId/+m4iMu18yR6+cMORL6CIqCB2lJLGkCQ==
CA: fixed:sha512:0lrc0dwnvipqviibf7qfm1y492qvjwb1zhkcyi05cndmva1mr5gjcgrnz1x36djmk0sfg8djd2n0qv68vib2jg590mwznar9jcjphp7
";

    /// Every field, in Nix's order, with several references and signatures.
    const FULL: &str = "\
StorePath: /nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432
URL: nar/1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d.nar.xz
Compression: xz
FileHash: sha256:1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d
FileSize: 114980
NarHash: sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6
NarSize: 464152
References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27 a4yw1svqqk4d8lhwinn9xp847zz9gfma-bash-4.4-p23
Deriver: 1sldp8s1a08dvzq64m8kygvbfhyxkaf9-net-tools-1.60_p20170221182432.drv
System: x86_64-linux
Sig: cache.nixos.org-1:u1KlGOVp9fgqsRAeJgHE9tuK9Ds9xRHgb0y4g2Db0E6sMmG1LuGb/gX6YojmXdmrT7JYcWV7DV2RPdQlImNQAw==
Sig: other:not-a-signature
CA: fixed:r:sha256:1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d
";

    const NIX_PUBLIC: &str = "test-1:X1F1AzkK7XF7lRO+/PhIP+e54gDDnp8HFPA/M9ER/DY=";
    const NIX_SECRET: &str = "test-1:Bnb15opoa31TNjTaFtFMYE2o9S+YFT0N4FCNLRw9dpZfUXUDOQrtcXuVE778+Eg/57niAMOenwcU8D8z0RH8Ng==";

    fn path(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }

    const SP: &str = "StorePath: /nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-a\n";
    const NH: &str = "NarHash: sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6\n";

    /// The smallest narinfo Nix accepts: four lines, no References.
    fn minimal() -> String {
        format!("{SP}URL: u\n{NH}NarSize: 5\n")
    }

    fn parse_err(text: &str) -> NarInfoError {
        text.parse::<NarInfo>().unwrap_err()
    }

    #[test]
    fn nix_written_narinfos_round_trip_byte_exact() {
        let ia = NarInfo::parse(NIX_IA, NIX_IA_STORE_DIR).unwrap();
        assert_eq!(ia.render(NIX_IA_STORE_DIR), NIX_IA);
        assert_eq!(
            ia.references,
            [path("kw1yfndacfzlivnm5rkwncjmlpkya2xn-dep")]
        );
        assert_eq!(
            ia.deriver,
            Some(path("x9m2hj6mjwysw9h777jiw14nm69d08zj-top.drv"))
        );
        assert_eq!(ia.ca, None);

        let ca: NarInfo = NIX_CA.parse().unwrap();
        assert_eq!(ca.to_string(), NIX_CA);
        assert!(ca.references.is_empty());
        assert_eq!(
            ca.ca
                .as_ref()
                .map(ContentAddress::as_str)
                .unwrap()
                .get(..13),
            Some("fixed:sha512:")
        );

        let full: NarInfo = FULL.parse().unwrap();
        assert_eq!(full.to_string(), FULL);
        assert_eq!(full.compression, "xz");
        assert_eq!(full.file_size, Some(114_980));
        assert_eq!(full.nar_size, 464_152);
        assert_eq!(full.system.as_deref(), Some("x86_64-linux"));
        assert_eq!(full.signatures.len(), 2);
        assert_eq!(full.references.len(), 2);
    }

    #[test]
    fn nix_signatures_verify_over_our_fingerprint() {
        let trusted: VerifyingKey = NIX_PUBLIC.parse().unwrap();
        let ia = NarInfo::parse(NIX_IA, NIX_IA_STORE_DIR).unwrap();
        assert_eq!(
            ia.fingerprint(NIX_IA_STORE_DIR),
            "1;/tmp/nx/s/1d5znchhxhcpyrzqsxbnaab6biq8ri7n-top;\
             sha256:168nm06a6dcfwam3m6spxlkxzwak31068bhx65c52imrwzk0gzbz;160;\
             /tmp/nx/s/kw1yfndacfzlivnm5rkwncjmlpkya2xn-dep"
        );
        assert!(ia.has_valid_signature(std::slice::from_ref(&trusted), NIX_IA_STORE_DIR));
        // The store directory is part of what is signed.
        assert!(!ia.has_valid_signature(std::slice::from_ref(&trusted), DEFAULT_STORE_DIR));

        let ca: NarInfo = NIX_CA.parse().unwrap();
        assert!(ca.has_valid_signature(&[trusted], DEFAULT_STORE_DIR));
    }

    #[test]
    fn accepts_what_nix_accepts() {
        let info: NarInfo = minimal().parse().unwrap();
        assert_eq!(info.compression, "bzip2");
        assert_eq!(
            (info.file_hash, info.file_size, info.deriver, info.system),
            (None, None, None, None)
        );
        assert!(info.references.is_empty() && info.signatures.is_empty() && info.ca.is_none());

        // Any order, unknown keys, hex and SRI hashes, odd spacing in References,
        // `unknown-deriver`, empty Compression and CA.
        let hash = Sha256Hash::of(b"nar");
        let text = format!(
            "Future: thing\nNarSize: 7\nReferences:  00bgd045z0d4icpbc2yyz4gx48ak44la-a  \n\
             NarHash: sha256:{}\nFileHash: {}\nDeriver: unknown-deriver\nCompression: \nCA: \n\
             : empty key\nURL: u\nStorePath: /nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-a\n",
            hash.to_hex(),
            hash.to_sri()
        );
        let info: NarInfo = text.parse().unwrap();
        assert_eq!((info.nar_hash, info.file_hash), (hash, Some(hash)));
        assert_eq!(
            info.references,
            [path("00bgd045z0d4icpbc2yyz4gx48ak44la-a")]
        );
        assert_eq!(
            (info.deriver, info.ca, info.compression.as_str()),
            (None, None, "bzip2")
        );

        let store = NarInfo::parse(
            "StorePath: /gnu/store/00bgd045z0d4icpbc2yyz4gx48ak44la-a\nURL: u\nNarSize: 1\n\
             NarHash: sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6\n",
            "/gnu/store",
        );
        assert_eq!(
            store.unwrap().store_path,
            path("00bgd045z0d4icpbc2yyz4gx48ak44la-a")
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        let base = minimal();

        assert_eq!(
            parse_err(base.trim_end()),
            NarInfoError::MissingNewline { line: 4 }
        );
        assert_eq!(
            parse_err(&base.replace('\n', "\r\n")),
            NarInfoError::CarriageReturn { line: 1 }
        );
        assert_eq!(
            parse_err(&base.replace("URL: u", "URL:u")),
            NarInfoError::MissingSeparator { line: 2 }
        );
        assert_eq!(
            parse_err(&format!("{base}\n")),
            NarInfoError::MissingSeparator { line: 5 }
        );
        assert_eq!(
            parse_err(&format!("{base}no colon\n")),
            NarInfoError::MissingSeparator { line: 5 }
        );
    }

    #[test]
    fn rejects_duplicate_keys() {
        let base = minimal();
        for (extra, key) in [
            (SP.to_owned(), "StorePath"),
            ("URL: v\n".to_owned(), "URL"),
            (
                "Compression: xz\nCompression: xz\n".to_owned(),
                "Compression",
            ),
            (NH.to_owned(), "NarHash"),
            ("NarSize: 5\n".to_owned(), "NarSize"),
            ("References: \nReferences: \n".to_owned(), "References"),
            (
                "Deriver: unknown-deriver\nDeriver: unknown-deriver\n".to_owned(),
                "Deriver",
            ),
            ("System: a\nSystem: a\n".to_owned(), "System"),
            ("CA: \nCA: \n".to_owned(), "CA"),
            ("FileSize: 1\nFileSize: 1\n".to_owned(), "FileSize"),
        ] {
            let text = format!("{base}{extra}");
            let line = text.lines().count();
            assert_eq!(
                parse_err(&text),
                NarInfoError::DuplicateKey { line, key },
                "{key}"
            );
        }
        assert!(
            format!("{base}Sig: a:b\nSig: a:b\n")
                .parse::<NarInfo>()
                .is_ok()
        );
    }

    #[test]
    fn rejects_bad_values_and_missing_keys() {
        let base = minimal();
        for (key, value) in [
            ("NarSize", "0x5"),
            ("NarSize", "+5"),
            ("NarSize", ""),
            ("NarSize", " 5"),
            ("FileSize", "-1"),
            ("FileSize", "18446744073709551616"),
        ] {
            let text = format!("{base}{key}: {value}\n").replace("NarSize: 5\n", "");
            assert_eq!(
                parse_err(&text),
                NarInfoError::InvalidNumber {
                    line: 4,
                    key: if key == "NarSize" {
                        "NarSize"
                    } else {
                        "FileSize"
                    },
                    value: value.into()
                },
                "{key}: {value}"
            );
        }
        assert_eq!(
            parse_err(&base.replace("NarSize: 5", "NarSize: 0")),
            NarInfoError::ZeroNarSize { line: 4 }
        );
        assert_eq!(
            parse_err(&base.replace("URL: u", "URL: ")),
            NarInfoError::EmptyUrl { line: 2 }
        );
        for (remove, key) in [
            (SP, "StorePath"),
            ("URL: u\n", "URL"),
            (NH, "NarHash"),
            ("NarSize: 5\n", "NarSize"),
        ] {
            assert_eq!(
                parse_err(&base.replace(remove, "")),
                NarInfoError::MissingKey(key)
            );
        }
        assert_eq!(parse_err(""), NarInfoError::MissingKey("StorePath"));
    }

    #[test]
    fn rejects_bad_paths_hashes_and_content_addresses() {
        let base = minimal();

        let store_path_err = |text: &str| match parse_err(text) {
            NarInfoError::StorePath { line, key, .. } => (line, key),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            store_path_err(&base.replace("/nix/store/", "/gnu/store/")),
            (1, "StorePath")
        );
        assert_eq!(
            store_path_err(&base.replace("StorePath: /nix/store/", "StorePath: ")),
            (1, "StorePath")
        );
        assert_eq!(
            store_path_err(&format!("{base}References: a b\n")),
            (5, "References")
        );
        assert_eq!(
            store_path_err(&format!(
                "{base}References: /nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-a\n"
            )),
            (5, "References")
        );
        assert_eq!(
            store_path_err(&format!("{base}Deriver: \n")),
            (5, "Deriver")
        );

        let hash_err = |text: &str| match parse_err(text) {
            NarInfoError::Hash { line, key, .. } => (line, key),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            hash_err(&base.replace("sha256:0l", "sha256:")),
            (3, "NarHash")
        );
        assert_eq!(hash_err(&base.replace("sha256:", "md5:")), (3, "NarHash"));
        assert_eq!(
            hash_err(&format!(
                "{base}FileHash: 0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6\n"
            )),
            (5, "FileHash")
        );

        assert!(matches!(
            parse_err(&format!("{base}CA: fixed:sha256:abc\n")),
            NarInfoError::ContentAddress { line: 5, .. }
        ));
    }

    #[test]
    fn content_addresses() {
        let sha256 = Sha256Hash::of(b"x");
        let digests = |len: usize| {
            let bytes = vec![7u8; len];
            [
                data_encoding::HEXLOWER.encode(&bytes),
                nixbase32::encode(&bytes),
                BASE64.encode(&bytes),
            ]
        };
        for (method, algo, len) in [
            ("text", "sha256", 32),
            ("fixed", "sha256", 32),
            ("fixed:r", "sha256", 32),
            ("fixed", "sha512", 64),
            ("fixed:r", "sha1", 20),
            ("fixed", "md5", 16),
        ] {
            for digest in digests(len) {
                let text = format!("{method}:{algo}:{digest}");
                assert_eq!(text.parse::<ContentAddress>().unwrap().as_str(), text);
            }
        }
        for bad in [
            String::new(),
            format!("{sha256}"),
            format!("text:{sha256}x"),
            format!("text:sha1:{}", nixbase32::encode(&[1; 20])),
            format!("text:r:{sha256}"),
            format!("source:{sha256}"),
            format!("fixed:sha384:{}", nixbase32::encode(&[1; 48])),
            format!("fixed:sha256-{}", BASE64.encode(sha256.as_bytes())),
            format!("fixed:sha512:{}", nixbase32::encode(&[1; 32])),
            "fixed:sha256:".into(),
            format!("fixed:r:r:{sha256}"),
        ] {
            assert_eq!(
                bad.parse::<ContentAddress>(),
                Err(ContentAddressError(bad.clone())),
                "{bad}"
            );
        }
    }

    #[test]
    fn validate_refuses_values_that_would_not_round_trip() {
        let good: NarInfo = FULL.parse().unwrap();
        assert_eq!(good.validate(), Ok(()));
        let unrenderable = |field, reason| Err(NarInfoError::Unrenderable { field, reason });
        let mut info = good.clone();
        info.system = Some("x86_64-linux\nURL: evil".into());
        assert_eq!(
            info.validate(),
            unrenderable("System", "contains a line break")
        );
        let mut info = good.clone();
        info.signatures.push("k:x\r".into());
        assert_eq!(
            info.validate(),
            unrenderable("Sig", "contains a line break")
        );
        let mut info = good.clone();
        info.url = String::new();
        assert_eq!(info.validate(), unrenderable("URL", "empty"));
        let mut info = good.clone();
        info.compression = String::new();
        assert!(info.validate().is_err());
        let mut info = good;
        info.nar_size = 0;
        assert_eq!(info.validate(), unrenderable("NarSize", "zero"));
    }

    #[test]
    fn fingerprint_sorts_and_dedups_references() {
        let mut info: NarInfo = FULL.parse().unwrap();
        let glibc = path("7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27");
        let bash = path("a4yw1svqqk4d8lhwinn9xp847zz9gfma-bash-4.4-p23");
        info.references = vec![bash.clone(), glibc, bash];
        assert_eq!(
            info.fingerprint(DEFAULT_STORE_DIR),
            "1;/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432;\
             sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6;464152;\
             /nix/store/7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27,\
             /nix/store/a4yw1svqqk4d8lhwinn9xp847zz9gfma-bash-4.4-p23"
        );
    }

    #[test]
    fn sign_then_verify() {
        let key: SigningKey = NIX_SECRET.parse().unwrap();
        let other = SigningKey::generate("other-1").unwrap();
        let trusted = [key.verifying_key()];
        let mut info: NarInfo = FULL.parse().unwrap();
        assert!(!info.has_valid_signature(&trusted, DEFAULT_STORE_DIR));

        info.sign(&key, DEFAULT_STORE_DIR);
        info.sign(&other, DEFAULT_STORE_DIR);
        assert!(info.has_valid_signature(&trusted, DEFAULT_STORE_DIR));
        assert!(info.has_valid_signature(&[other.verifying_key()], DEFAULT_STORE_DIR));
        assert_eq!(info.signatures.len(), 4, "{:?}", info.signatures);

        // Re-signing replaces this key's signature instead of adding another.
        info.nar_size += 1;
        info.sign(&key, DEFAULT_STORE_DIR);
        assert_eq!(info.signatures.len(), 4);
        assert!(info.has_valid_signature(&trusted, DEFAULT_STORE_DIR));

        // Signatures survive a render and parse.
        let reparsed: NarInfo = info.to_string().parse().unwrap();
        assert!(reparsed.has_valid_signature(&trusted, DEFAULT_STORE_DIR));

        // Fields outside the fingerprint are not covered; fields inside are.
        let mut tampered = reparsed.clone();
        tampered.url = "nar/elsewhere.nar".into();
        tampered.deriver = None;
        assert!(tampered.has_valid_signature(&trusted, DEFAULT_STORE_DIR));
        for tamper in [
            (|i: &mut NarInfo| i.nar_size += 1) as fn(&mut NarInfo),
            |i| i.nar_hash = Sha256Hash::of(b"other"),
            |i| i.references.truncate(1),
            |i| i.store_path = "00bgd045z0d4icpbc2yyz4gx48ak44la-other".parse().unwrap(),
        ] {
            let mut tampered = reparsed.clone();
            tamper(&mut tampered);
            assert!(
                !tampered.has_valid_signature(&trusted, DEFAULT_STORE_DIR),
                "{tampered:?}"
            );
        }

        // A key nobody trusts, or a trusted key under another name, does not count.
        let stranger = SigningKey::generate("test-1").unwrap().verifying_key();
        assert!(!reparsed.has_valid_signature(&[stranger], DEFAULT_STORE_DIR));
        let renamed: VerifyingKey = NIX_PUBLIC.replace("test-1:", "test-2:").parse().unwrap();
        assert!(!reparsed.has_valid_signature(&[renamed], DEFAULT_STORE_DIR));
        assert!(!reparsed.has_valid_signature(&[], DEFAULT_STORE_DIR));
    }

    fn arb_store_path() -> impl Strategy<Value = StorePath> {
        (any::<[u8; 20]>(), "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,40}").prop_map(|(hash, name)| {
            StorePath::new(crate::StorePathHash::from_bytes(hash), &name).unwrap()
        })
    }

    fn arb_hash() -> impl Strategy<Value = Sha256Hash> {
        any::<[u8; 32]>().prop_map(Sha256Hash::from_bytes)
    }

    fn arb_ca() -> impl Strategy<Value = ContentAddress> {
        (
            prop::sample::select(&["text:", "fixed:", "fixed:r:"][..]),
            arb_hash(),
        )
            .prop_map(|(method, hash)| format!("{method}{hash}").parse().unwrap())
    }

    /// Any single-line text, including `:` and leading spaces.
    const LINE: &str = "[^\n\r]{0,30}";

    prop_compose! {
        fn arb_narinfo()(
            store_path in arb_store_path(),
            url in "[^\n\r]{1,30}",
            compression in "[^\n\r]{1,10}",
            file_hash in prop::option::of(arb_hash()),
            file_size in prop::option::of(any::<u64>()),
            nar_hash in arb_hash(),
            nar_size in 1..=u64::MAX,
            references in prop::collection::vec(arb_store_path(), 0..4),
            deriver in prop::option::of(arb_store_path()),
            system in prop::option::of(LINE),
            signatures in prop::collection::vec(LINE, 0..3),
            ca in prop::option::of(arb_ca()),
        ) -> NarInfo {
            NarInfo {
                store_path, url, compression, file_hash, file_size, nar_hash, nar_size,
                references, deriver, system, signatures, ca,
            }
        }
    }

    proptest! {
        #[test]
        fn render_parse_round_trip(info in arb_narinfo()) {
            prop_assert_eq!(info.validate(), Ok(()));
            let text = info.to_string();
            prop_assert_eq!(text.parse::<NarInfo>(), Ok(info.clone()));
            let text = info.render("/gnu/store");
            prop_assert_eq!(NarInfo::parse(&text, "/gnu/store"), Ok(info));
        }
    }
}
