//! ActionCache: results keyed by action digest, stored as the encoded
//! `ActionResult` and served only while everything they name is present.

use std::sync::Arc;

use garret_meta::Cache;
use garret_proto::reapi::action_cache_server::ActionCache;
use garret_proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::Reapi;
use crate::auth::ReapiAccess;
use crate::bazel_core::digest::Digest;
use crate::bazel_core::{MAX_MESSAGE_BYTES, Update};
use crate::error::Error;

#[derive(Debug)]
pub(crate) struct ActionCacheService(pub(crate) Arc<Reapi>);

/// Room kept free in a GetActionResult reply when inlining outputs.
const REPLY_HEADROOM: usize = 64 << 10;

impl ActionCacheService {
    async fn inner_get(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<ActionResult, Error> {
        let reapi = &self.0;
        let cache = reapi.cache_for(&request, ReapiAccess::Read).await?;
        let request = request.into_inner();
        let action = Digest::from_required(request.action_digest.as_ref())?;
        let (mut result, _) = reapi.action_result(&cache, &action.hash).await?;
        self.inline(&cache, &request, &mut result).await?;
        Ok(result)
    }

    /// Inlines what the client asked for while the reply stays under the
    /// message limit; REAPI lets the server skip the rest.
    async fn inline(
        &self,
        cache: &Cache,
        request: &GetActionResultRequest,
        result: &mut ActionResult,
    ) -> Result<(), Error> {
        let reapi = &self.0;
        let mut budget =
            MAX_MESSAGE_BYTES.saturating_sub(result.encoded_len() + REPLY_HEADROOM) as u64;
        let mut take = |digest: Digest| {
            let fits = digest.size <= budget;
            if fits {
                budget -= digest.size;
            }
            fits
        };
        if request.inline_stdout
            && let Some(d) = result
                .stdout_digest
                .as_ref()
                .map(Digest::from_proto)
                .transpose()?
            && take(d)
        {
            result.stdout_raw = reapi.read_bounded(cache, d, MAX_MESSAGE_BYTES).await?;
        }
        if request.inline_stderr
            && let Some(d) = result
                .stderr_digest
                .as_ref()
                .map(Digest::from_proto)
                .transpose()?
            && take(d)
        {
            result.stderr_raw = reapi.read_bounded(cache, d, MAX_MESSAGE_BYTES).await?;
        }
        for file in &mut result.output_files {
            if request.inline_output_files.contains(&file.path) {
                let d = Digest::from_required(file.digest.as_ref())?;
                if take(d) {
                    file.contents = reapi.read_bounded(cache, d, MAX_MESSAGE_BYTES).await?;
                }
            }
        }
        Ok(())
    }

    async fn inner_update(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<ActionResult, Error> {
        let reapi = &self.0;
        let cache = reapi.cache_for(&request, ReapiAccess::Write).await?;
        let request = request.into_inner();
        let action = Digest::from_required(request.action_digest.as_ref())?;
        let result = request
            .action_result
            .ok_or_else(|| Error::InvalidArgument("action_result is required".into()))?;
        reapi
            .update_action_result(&cache, &action.hash, result, Update::Complete)
            .await
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        Ok(Response::new(self.inner_get(request).await?))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        Ok(Response::new(self.inner_update(request).await?))
    }
}
