//! The REAPI half of a probe, as Bazel uses a remote cache: connect,
//! GetCapabilities, an action cache lookup that must miss, and, with a
//! token, a CAS blob and an action result written and read back. REAPI
//! has no delete, so the canaries are fixed bytes that every run rewrites
//! (see [`super::canary`]).

use std::time::Duration;

use bytes::Bytes;
use garret_nix::Sha256Hash;
use garret_proto::reapi::action_cache_client::ActionCacheClient;
use garret_proto::reapi::capabilities_client::CapabilitiesClient;
use garret_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use garret_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, GetActionResultRequest,
    GetCapabilitiesRequest, UpdateActionResultRequest, batch_update_blobs_request,
};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::canary;
use super::reason;
use super::report::Report;
use super::target::{ReapiTarget, Target};

const REACH: &str = "reapi.reach";
const CAPABILITIES: &str = "reapi.capabilities";
const AC_MISS: &str = "reapi.ac-miss";
const CANARY_CAS: &str = "reapi.canary-cas";
const CANARY_AC: &str = "reapi.canary-ac";

/// The largest message the probe decodes; its answers are a few hundred bytes.
const MAX_MESSAGE: usize = 1 << 20;
/// `DigestFunction.SHA256`, the one garret and Bazel's default share.
const SHA256: i32 = 1;

/// Runs the REAPI checks against `reapi`, adding one line each to `report`.
pub async fn probe(target: &Target, reapi: &ReapiTarget, timeout: Duration, report: &mut Report) {
    let client = match Client::connect(target, reapi, timeout).await {
        Ok(client) => client,
        Err(why) => {
            report.fail(REACH, format!("{}: {why}", reapi.endpoint));
            for check in [CAPABILITIES, AC_MISS, CANARY_CAS, CANARY_AC] {
                report.skip(check, "the endpoint was not reached");
            }
            return;
        }
    };
    let transport = if reapi.tls { "TLS" } else { "h2c" };
    report.pass(
        REACH,
        format!("{} accepted a connection ({transport})", reapi.endpoint),
    );
    report.record(CAPABILITIES, client.capabilities().await);
    report.record(AC_MISS, client.ac_miss().await);
    if client.token_source.is_none() {
        let why = "no token: give --token (or ATTIC_TOKEN) of a token that may push";
        report.skip(CANARY_CAS, why);
        report.skip(CANARY_AC, why);
        return;
    }
    match client.cas_canary().await {
        Ok(detail) => {
            report.pass(CANARY_CAS, detail);
            report.record(CANARY_AC, client.ac_canary().await);
        }
        Err(why) => {
            report.fail(CANARY_CAS, why);
            report.skip(CANARY_AC, "the CAS canary it refers to was not written");
        }
    }
}

/// One channel to the endpoint and what every call carries.
struct Client<'a> {
    channel: Channel,
    target: &'a ReapiTarget,
    authorization: Option<AsciiMetadataValue>,
    token_source: Option<&'a str>,
}

impl<'a> Client<'a> {
    /// Connects (TCP, TLS, the HTTP/2 handshake) within `timeout`; every
    /// call on the channel has the same timeout.
    async fn connect(
        target: &'a Target,
        reapi: &'a ReapiTarget,
        timeout: Duration,
    ) -> Result<Self, String> {
        let authorization = target
            .token
            .as_ref()
            .map(|t| format!("Bearer {}", t.value.as_str()).parse::<AsciiMetadataValue>())
            .transpose()
            .map_err(|_| "the token is not printable ASCII".to_owned())?;
        let mut endpoint = Endpoint::from_shared(reapi.endpoint.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .timeout(timeout);
        if reapi.tls {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|e| format!("TLS set-up: {e}"))?;
        }
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| format!("timed out after {}s", timeout.as_secs()))?
            .map_err(|e| reason::unreachable(&e, false, timeout))?;
        Ok(Self {
            channel,
            target: reapi,
            authorization,
            token_source: target.token.as_ref().map(|t| t.source.as_str()),
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    fn instance(&self) -> String {
        self.target.instance.clone()
    }

    /// A refusal in one line, saying what the token may not do.
    fn refused(&self, status: &Status, what: &str) -> String {
        let instance = self.target.instance_label();
        let detail = format!("{:?}: {}", status.code(), status.message());
        match (status.code(), self.token_source) {
            (Code::Unauthenticated, None) => {
                format!("{instance} needs a token to {what} (or does not exist): {detail}")
            }
            (Code::Unauthenticated | Code::PermissionDenied, Some(source)) => {
                format!("the token ({source}) may not {what} {instance}: {detail}")
            }
            (Code::NotFound, _) => format!("no cache for {instance}: {detail}"),
            (Code::DeadlineExceeded, _) => format!("no answer in time: {detail}"),
            _ => detail,
        }
    }

    async fn capabilities(&self) -> Result<String, String> {
        let capabilities = CapabilitiesClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .get_capabilities(self.request(GetCapabilitiesRequest {
                instance_name: self.instance(),
            }))
            .await
            .map_err(|s| self.refused(&s, "read"))?
            .into_inner();
        let cache = capabilities
            .cache_capabilities
            .ok_or("the server has no cache capabilities: not a remote cache")?;
        if !cache.digest_functions.contains(&SHA256) {
            return Err(format!(
                "SHA256 is not among the digest functions ({:?})",
                cache.digest_functions
            ));
        }
        let updates = cache
            .action_cache_update_capabilities
            .is_some_and(|u| u.update_enabled);
        let version = capabilities
            .high_api_version
            .map_or("unknown".into(), |v| format!("{}.{}", v.major, v.minor));
        Ok(format!(
            "SHA256, action cache updates {}, batches up to {} bytes, API up to v{version}",
            if updates { "enabled" } else { "disabled" },
            cache.max_batch_total_size_bytes
        ))
    }

    /// GetActionResult of a random action: anything but NOT_FOUND is wrong.
    async fn ac_miss(&self) -> Result<String, String> {
        let mut random = [0u8; 32];
        getrandom::fill(&mut random).map_err(|e| format!("no randomness: {e}"))?;
        let action = digest_of_hash(Sha256Hash::of(&random), random.len());
        match self.get_action_result(action).await {
            Err(status) if status.code() == Code::NotFound => {
                Ok("a random action is a miss (NOT_FOUND)".into())
            }
            Err(status) => Err(self.refused(&status, "read")),
            Ok(_) => {
                Err("a random action digest was a hit: the action cache answers wrongly".into())
            }
        }
    }

    async fn get_action_result(&self, action: Digest) -> Result<ActionResult, Status> {
        ActionCacheClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .get_action_result(self.request(GetActionResultRequest {
                instance_name: self.instance(),
                action_digest: Some(action),
                ..Default::default()
            }))
            .await
            .map(tonic::Response::into_inner)
    }

    /// BatchUpdateBlobs of the canary blob, then BatchReadBlobs of it.
    async fn cas_canary(&self) -> Result<String, String> {
        let blob = digest(canary::REAPI_BLOB);
        let mut cas = ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE);
        let written = cas
            .batch_update_blobs(self.request(BatchUpdateBlobsRequest {
                instance_name: self.instance(),
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(blob.clone()),
                    data: Bytes::from_static(canary::REAPI_BLOB),
                    compressor: 0,
                }],
                ..Default::default()
            }))
            .await
            .map_err(|s| self.refused(&s, "push to"))?
            .into_inner();
        let entry_status = written.responses.first().and_then(|r| r.status.clone());
        if let Some(status) = entry_status.filter(|s| s.code != 0) {
            let status = Status::new(Code::from_i32(status.code), status.message);
            return Err(self.refused(&status, "push to"));
        }
        let read = cas
            .batch_read_blobs(self.request(BatchReadBlobsRequest {
                instance_name: self.instance(),
                digests: vec![blob.clone()],
                ..Default::default()
            }))
            .await
            .map_err(|s| format!("written, but not read back: {}", self.refused(&s, "read")))?
            .into_inner();
        match read.responses.first() {
            Some(r)
                if r.status.as_ref().is_none_or(|s| s.code == 0)
                    && r.data == canary::REAPI_BLOB =>
            {
                Ok(format!(
                    "wrote and read back blob {}/{}",
                    blob.hash, blob.size_bytes
                ))
            }
            Some(r) => Err(format!(
                "written, but read back as {} bytes with status {:?}",
                r.data.len(),
                r.status.as_ref().map(|s| (s.code, s.message.clone()))
            )),
            None => Err("written, but the read answered no blob".into()),
        }
    }

    /// UpdateActionResult of the canary action (its stdout is the canary
    /// blob), then GetActionResult of it.
    async fn ac_canary(&self) -> Result<String, String> {
        let action = digest(canary::REAPI_ACTION);
        let result = ActionResult {
            exit_code: 0,
            stdout_digest: Some(digest(canary::REAPI_BLOB)),
            ..Default::default()
        };
        ActionCacheClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .update_action_result(self.request(UpdateActionResultRequest {
                instance_name: self.instance(),
                action_digest: Some(action.clone()),
                action_result: Some(result.clone()),
                ..Default::default()
            }))
            .await
            .map_err(|s| self.refused(&s, "push to"))?;
        let read = self
            .get_action_result(action.clone())
            .await
            .map_err(|s| format!("written, but not read back: {}", self.refused(&s, "read")))?;
        if read.stdout_digest == result.stdout_digest && read.exit_code == 0 {
            Ok(format!(
                "wrote and read back the result of action {}",
                action.hash
            ))
        } else {
            Err(format!("written, but read back as {read:?}"))
        }
    }
}

fn digest(data: &[u8]) -> Digest {
    digest_of_hash(Sha256Hash::of(data), data.len())
}

fn digest_of_hash(hash: Sha256Hash, size: usize) -> Digest {
    Digest {
        hash: hash.to_hex(),
        size_bytes: i64::try_from(size).unwrap_or(i64::MAX),
    }
}
