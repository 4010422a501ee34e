//! Objects in an S3-compatible bucket (RustFS in production).

use std::ops::Range;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::{BackendError, Listed, ObjectStore, ObjectWriter};

/// How to reach the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// e.g. `http://attic-rustfs:9000`; `None` means AWS's own endpoints.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Object keys go under this prefix (no leading or trailing `/`), so one
    /// bucket can hold several deployments.
    pub prefix: String,
    /// RustFS, MinIO and most on-prem servers need path-style addressing.
    pub path_style: bool,
    /// Static credentials; when absent, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` are read at start.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub connect_timeout: Duration,
    /// Per attempt; objects are at most one pack (a few MiB), so this bounds
    /// a single transfer, not a whole upload.
    pub attempt_timeout: Duration,
    pub max_attempts: u32,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

/// An object gathered in memory and sent with one PUT when finished: S3
/// has no append, and a pack is small enough (the configured pack size) that
/// one request beats a multipart upload's three.
#[derive(Debug)]
pub struct S3Writer {
    backend: S3Backend,
    key: String,
    parts: Vec<Bytes>,
}

#[derive(Debug, Clone)]
pub struct S3Backend {
    client: Client,
    bucket: String,
    prefix: String,
}

impl S3Backend {
    pub fn new(config: &S3Config) -> Result<Self, BackendError> {
        if config.bucket.is_empty() {
            return Err(BackendError::Config("S3 bucket name is empty".into()));
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let access_key = config
            .access_key_id
            .clone()
            .or_else(|| env("AWS_ACCESS_KEY_ID"));
        let secret_key = config
            .secret_access_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        let (Some(access_key), Some(secret_key)) = (access_key, secret_key) else {
            return Err(BackendError::Config(
                "S3 credentials missing: set access_key_id/secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".into(),
            ));
        };
        let credentials = Credentials::new(
            access_key,
            secret_key,
            env("AWS_SESSION_TOKEN"),
            None,
            "garret",
        );
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(config.path_style)
            // Checksums only where S3 demands them: on-prem servers differ in
            // their support for the newer trailing-checksum encodings, and our
            // chunks are verified by content hash anyway.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.connect_timeout)
                    .operation_attempt_timeout(config.attempt_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts));
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix: config.prefix.trim_matches('/').to_owned(),
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }
}

fn s3_error<E, R>(operation: &'static str, key: &str, err: SdkError<E, R>) -> BackendError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    BackendError::S3 {
        operation,
        key: key.to_owned(),
        source: Box::new(err),
    }
}

impl ObjectWriter for S3Writer {
    async fn write(&mut self, data: Bytes) -> Result<(), BackendError> {
        self.parts.push(data);
        Ok(())
    }

    async fn finish(self) -> Result<(), BackendError> {
        let len: usize = self.parts.iter().map(Bytes::len).sum();
        let body = if self.parts.len() == 1 {
            self.parts.into_iter().next().expect("one part")
        } else {
            let mut body = Vec::with_capacity(len);
            for part in &self.parts {
                body.extend_from_slice(part);
            }
            Bytes::from(body)
        };
        let key = &self.key;
        self.backend
            .client
            .put_object()
            .bucket(&self.backend.bucket)
            .key(self.backend.full_key(key))
            .content_length(i64::try_from(len).expect("object fits in i64"))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error("PutObject", key, e))?;
        Ok(())
    }
}

impl ObjectStore for S3Backend {
    type Writer = S3Writer;

    async fn create(&self, key: &str) -> Result<S3Writer, BackendError> {
        Ok(S3Writer {
            backend: self.clone(),
            key: key.to_owned(),
            parts: Vec::new(),
        })
    }

    /// S3 acknowledges a PUT only once the object is durable.
    async fn sync(&self, _keys: &[String]) -> Result<(), BackendError> {
        Ok(())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        let expected = range.end - range.start;
        let short = |got| BackendError::Short {
            key: key.to_owned(),
            start: range.start,
            expected,
            got,
        };
        if range.is_empty() {
            // No `Range:` header can ask for nothing.
            return Ok(Bytes::new());
        }
        let last = range.end - 1;
        let output = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(format!("bytes={}-{last}", range.start))
            .send()
            .await
        {
            Ok(output) => output,
            Err(e)
                if e.as_service_error()
                    .is_some_and(GetObjectError::is_no_such_key) =>
            {
                return Err(BackendError::NotFound(key.to_owned()));
            }
            // 416: the range starts at or past the object's end.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                return Err(short(0));
            }
            Err(e) => return Err(s3_error("GetObject", key, e)),
        };
        let body = output.body.collect().await.map_err(|e| BackendError::S3 {
            operation: "GetObject body",
            key: key.to_owned(),
            source: Box::new(e),
        })?;
        let body = body.into_bytes();
        if body.len() as u64 != expected {
            return Err(short(body.len() as u64));
        }
        Ok(body)
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("NoSuchKey") => Ok(()),
            Err(e) => Err(s3_error("DeleteObject", key, e)),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listed>, BackendError> {
        // The key of the bucket's prefix itself: what every listed key
        // starts with and loses again.
        let strip = self.full_key("").len();
        let mut found = Vec::new();
        let mut start_after = after.map(|a| self.full_key(a));
        while found.len() < limit {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full_key(prefix))
                .set_start_after(start_after.clone())
                .max_keys(i32::try_from((limit - found.len()).min(1000)).unwrap_or(1000))
                .send()
                .await
                .map_err(|e| s3_error("ListObjectsV2", prefix, e))?;
            let objects = page.contents.unwrap_or_default();
            let Some(last) = objects.last().and_then(|o| o.key.clone()) else {
                break;
            };
            for object in objects {
                let Some(key) = object.key else { continue };
                found.push(Listed {
                    key: key[strip.min(key.len())..].to_owned(),
                    size: object.size.map_or(0, i64::unsigned_abs),
                    modified: object.last_modified.map_or(0, |t| t.secs()),
                });
            }
            if page.is_truncated != Some(true) {
                break;
            }
            start_after = Some(last);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::S3TestServer;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3TestServer::start(dir.path(), "conformance")
            .await
            .unwrap();
        let backend = S3Backend::new(&server.config).unwrap();
        super::super::conformance::run(&backend).await;
    }
}
