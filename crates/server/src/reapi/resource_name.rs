//! ByteStream resource names, parsed once into a domain type.
//!
//! Reads name `{instance/}blobs/{digest_function/}{hash}/{size}` or
//! `{instance/}compressed-blobs/{compressor}/{digest_function/}{hash}/{size}`;
//! writes put `uploads/{uuid}/` before the `blobs`/`compressed-blobs` part and
//! may append metadata segments, which are ignored. The instance is whatever
//! comes before the first keyword: REAPI forbids instance segments that equal
//! a keyword, so the first one found is always the real one. The digest
//! function segment is optional and must be `sha256` here, the only function
//! garret stores by.

use crate::bazel_core::digest::{Digest, DigestError};

/// How the bytes of a blob travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobCompression {
    Identity,
    Zstd,
}

/// A parsed `…/blobs/…` or `…/compressed-blobs/…` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobResource<'a> {
    pub instance: &'a str,
    pub compression: BlobCompression,
    pub digest: Digest,
}

/// A parsed upload name: the blob, plus the client's upload id that tells
/// concurrent (and resumed) uploads apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadResource<'a> {
    pub blob: BlobResource<'a>,
    pub uuid: &'a str,
    /// Everything after the instance up to and including the size: the key
    /// of an upload session within an instance.
    pub upload_key: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceNameError {
    #[error("resource name {0:?} does not have the form [instance/]{1}")]
    Malformed(String, &'static str),
    #[error("compressor {0:?} is not supported (only zstd)")]
    UnsupportedCompressor(String),
    #[error("digest function {0:?} is not supported (only sha256)")]
    UnsupportedDigestFunction(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("resource name of {0} bytes is longer than {MAX_RESOURCE_NAME}")]
    TooLong(usize),
}

/// A malformed name is the client's to fix. (Here, not in `crate::error`,
/// so the error table depends on no front end.)
impl From<ResourceNameError> for crate::error::Error {
    fn from(err: ResourceNameError) -> Self {
        Self::InvalidArgument(err.to_string())
    }
}

/// The longest resource name accepted: room for a deep instance name, an
/// upload id and a digest, while an upload's name is also its session's key
/// in the database and is quoted in errors.
pub const MAX_RESOURCE_NAME: usize = 2048;

fn check_length(name: &str) -> Result<(), ResourceNameError> {
    if name.len() > MAX_RESOURCE_NAME {
        return Err(ResourceNameError::TooLong(name.len()));
    }
    Ok(())
}

const READ_FORM: &str = "blobs/{hash}/{size} or compressed-blobs/zstd/{hash}/{size}";
const WRITE_FORM: &str = "uploads/{uuid}/blobs/{hash}/{size}[/…] or \
     uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}[/…]";

/// Digest function names REAPI defines, other than sha256: named precisely
/// in the error instead of being called malformed.
const OTHER_DIGEST_FUNCTIONS: &[&str] = &[
    "sha1",
    "md5",
    "vso",
    "sha384",
    "sha512",
    "murmur3",
    "sha256tree",
    "blake3",
    "gitsha1",
];

impl<'a> BlobResource<'a> {
    /// Parses a `Read` resource name.
    pub fn parse_read(name: &'a str) -> Result<Self, ResourceNameError> {
        check_length(name)?;
        let malformed = || ResourceNameError::Malformed(name.to_owned(), READ_FORM);
        let (instance, rest) =
            split_instance(name, &["blobs", "compressed-blobs"]).ok_or_else(malformed)?;
        let (blob, extra) = parse_blob(instance, rest).map_err(|e| e.unwrap_or_else(malformed))?;
        if !extra.is_empty() {
            return Err(malformed());
        }
        Ok(blob)
    }
}

impl<'a> UploadResource<'a> {
    /// Parses a `Write` or `QueryWriteStatus` resource name.
    pub fn parse(name: &'a str) -> Result<Self, ResourceNameError> {
        check_length(name)?;
        let malformed = || ResourceNameError::Malformed(name.to_owned(), WRITE_FORM);
        let (instance, rest) = split_instance(name, &["uploads"]).ok_or_else(malformed)?;
        let after_uploads = rest.strip_prefix("uploads/").ok_or_else(malformed)?;
        let (uuid, blob_part) = after_uploads.split_once('/').ok_or_else(malformed)?;
        if uuid.is_empty()
            || !blob_part.starts_with("blobs/") && !blob_part.starts_with("compressed-blobs/")
        {
            return Err(malformed());
        }
        let (blob, extra) =
            parse_blob(instance, blob_part).map_err(|e| e.unwrap_or_else(malformed))?;
        let upload_key = &rest[..rest.len() - extra.len()];
        Ok(Self {
            blob,
            uuid,
            upload_key: upload_key.trim_end_matches('/'),
        })
    }
}

/// Splits `name` at the first segment that is one of `keywords`: the
/// instance (without its trailing slash) and the rest, starting with the
/// keyword.
fn split_instance<'a>(name: &'a str, keywords: &[&str]) -> Option<(&'a str, &'a str)> {
    let mut start = 0;
    for segment in name.split('/') {
        if keywords.contains(&segment) {
            let instance = name[..start].strip_suffix('/').unwrap_or("");
            return Some((instance, &name[start..]));
        }
        start += segment.len() + 1;
    }
    None
}

/// Parses `blobs/…` or `compressed-blobs/…` up to the size; returns the blob
/// and whatever follows the size (`""` or `/metadata…`). `Err(None)` means
/// "malformed", reported with the caller's expected form.
fn parse_blob<'a>(
    instance: &'a str,
    rest: &'a str,
) -> Result<(BlobResource<'a>, &'a str), Option<ResourceNameError>> {
    let segments: Vec<&str> = rest.split('/').collect();
    let mut next = 0;
    let mut take = || {
        let segment = segments.get(next).copied();
        next += 1;
        segment.ok_or(None)
    };
    let compression = match take()? {
        "blobs" => BlobCompression::Identity,
        "compressed-blobs" => match take()? {
            "zstd" => BlobCompression::Zstd,
            other => {
                return Err(Some(ResourceNameError::UnsupportedCompressor(
                    other.to_owned(),
                )));
            }
        },
        _ => return Err(None),
    };
    let mut hash = take()?;
    if hash == "sha256" {
        hash = take()?;
    } else if OTHER_DIGEST_FUNCTIONS.contains(&hash) {
        return Err(Some(ResourceNameError::UnsupportedDigestFunction(
            hash.to_owned(),
        )));
    }
    let size_text = take()?;
    if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(None);
    }
    let size: i64 = size_text.parse().map_err(|_| None)?;
    let digest = Digest::parse(hash, size).map_err(|e| Some(e.into()))?;
    // Bytes up to and including the size; what follows keeps its slash.
    let consumed = segments[..next].iter().map(|s| s.len() + 1).sum::<usize>() - 1;
    Ok((
        BlobResource {
            instance,
            compression,
            digest,
        },
        &rest[consumed..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn blob(instance: &str, compression: BlobCompression) -> BlobResource<'_> {
        BlobResource {
            instance,
            compression,
            digest: Digest::EMPTY,
        }
    }

    #[test]
    fn read_names() {
        let cases = [
            (format!("blobs/{H}/0"), blob("", BlobCompression::Identity)),
            (
                format!("main/blobs/{H}/0"),
                blob("main", BlobCompression::Identity),
            ),
            (
                format!("main/blobs/sha256/{H}/0"),
                blob("main", BlobCompression::Identity),
            ),
            (
                format!("team-a/compressed-blobs/zstd/{H}/0"),
                blob("team-a", BlobCompression::Zstd),
            ),
            (
                format!("compressed-blobs/zstd/sha256/{H}/0"),
                blob("", BlobCompression::Zstd),
            ),
        ];
        for (name, expected) in &cases {
            assert_eq!(
                BlobResource::parse_read(name).as_ref(),
                Ok(expected),
                "{name}"
            );
        }
    }

    #[test]
    fn bad_read_names() {
        for name in [
            format!("blobs/{H}"),
            format!("blobs/{H}/0/extra"),
            format!("blobs/{H}/-1"),
            format!("blobs/{H}/+1"),
            format!("main/{H}/0"),
            "blobs".to_owned(),
        ] {
            assert!(
                matches!(
                    BlobResource::parse_read(&name),
                    Err(ResourceNameError::Malformed(..) | ResourceNameError::Digest(_))
                ),
                "{name}"
            );
        }
        assert_eq!(
            BlobResource::parse_read(&format!("compressed-blobs/deflate/{H}/0")),
            Err(ResourceNameError::UnsupportedCompressor("deflate".into()))
        );
        assert_eq!(
            BlobResource::parse_read(&format!("blobs/blake3/{H}/0")),
            Err(ResourceNameError::UnsupportedDigestFunction(
                "blake3".into()
            ))
        );
        assert!(matches!(
            BlobResource::parse_read(&format!("blobs/{}/0", H.to_uppercase())),
            Err(ResourceNameError::Digest(DigestError::BadHash(_)))
        ));
    }

    #[test]
    fn upload_names() {
        let name = format!("main/uploads/0f1e/blobs/{H}/0/some/metadata");
        let upload = UploadResource::parse(&name).unwrap();
        assert_eq!(upload.blob, blob("main", BlobCompression::Identity));
        let long = format!("{}/{name}", "i".repeat(MAX_RESOURCE_NAME));
        assert!(matches!(
            UploadResource::parse(&long),
            Err(ResourceNameError::TooLong(_))
        ));
        assert!(matches!(
            BlobResource::parse_read(&long),
            Err(ResourceNameError::TooLong(_))
        ));
        assert_eq!(upload.uuid, "0f1e");
        assert_eq!(upload.upload_key, format!("uploads/0f1e/blobs/{H}/0"));

        let name = format!("uploads/u/compressed-blobs/zstd/sha256/{H}/0");
        let upload = UploadResource::parse(&name).unwrap();
        assert_eq!(upload.blob, blob("", BlobCompression::Zstd));
        assert_eq!(
            upload.upload_key,
            format!("uploads/u/compressed-blobs/zstd/sha256/{H}/0")
        );

        for bad in [
            format!("uploads//blobs/{H}/0"),
            format!("uploads/u/{H}/0"),
            format!("blobs/{H}/0"),
        ] {
            assert!(UploadResource::parse(&bad).is_err(), "{bad}");
        }
    }
}
