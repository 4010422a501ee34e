//! ActionCache: results keyed by action digest, stored as the encoded
//! `ActionResult` and served only while everything they name is present.

use std::sync::Arc;

use bytes::Bytes;
use garret_meta::Cache;
use garret_proto::reapi::action_cache_server::ActionCache;
use garret_proto::reapi::{ActionResult, GetActionResultRequest, Tree, UpdateActionResultRequest};
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::digest::Digest;
use super::{MAX_MESSAGE_BYTES, Reapi};
use crate::auth::ReapiAccess;
use crate::clock::unix_now;
use crate::error::Error;

#[derive(Debug)]
pub(crate) struct ActionCacheService(pub(crate) Arc<Reapi>);

/// Room kept free in a GetActionResult reply when inlining outputs.
const REPLY_HEADROOM: usize = 64 << 10;

/// The most `Tree` bytes one completeness check reads: each output tree is
/// a message (at most [`MAX_MESSAGE_BYTES`]), and a result naming many
/// (distinct) large trees is refused instead of costing every reader.
const MAX_TREE_BYTES_PER_RESULT: u64 = 16 * MAX_MESSAGE_BYTES as u64;

/// Why a result's references are incomplete; the caller picks the code
/// (NOT_FOUND on read, FAILED_PRECONDITION on update).
struct Missing(String);

impl Reapi {
    /// Every blob `result` names, including the files inside its output
    /// trees, or what is missing. Present blobs have their access refreshed
    /// (REAPI asks servers to keep a served result's outputs alive).
    ///
    /// Trees are read as messages: each is refused unread if its digest is
    /// over [`MAX_MESSAGE_BYTES`], each distinct tree is read once, and all
    /// of them together may not exceed [`MAX_TREE_BYTES_PER_RESULT`]
    /// (RESOURCE_EXHAUSTED).
    async fn check_complete(
        &self,
        cache: &Cache,
        result: &ActionResult,
    ) -> Result<Result<(), Missing>, Error> {
        let mut digests = Vec::new();
        let mut push = |d: Option<&garret_proto::reapi::Digest>| -> Result<(), Error> {
            if let Some(d) = d {
                digests.push(Digest::from_proto(d)?);
            }
            Ok(())
        };
        for file in &result.output_files {
            push(Some(file.digest.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("output file {:?} has no digest", file.path))
            })?))?;
        }
        push(result.stdout_digest.as_ref())?;
        push(result.stderr_digest.as_ref())?;
        let mut trees = std::collections::BTreeSet::new();
        for dir in &result.output_directories {
            let tree = Digest::from_required(dir.tree_digest.as_ref())?;
            push(dir.tree_digest.as_ref())?;
            push(dir.root_directory_digest.as_ref())?;
            trees.insert(tree);
        }
        let mut tree_bytes = 0u64;
        for tree in trees {
            tree_bytes = tree_bytes.saturating_add(tree.size);
            if tree_bytes > MAX_TREE_BYTES_PER_RESULT {
                return Err(Error::ResourceExhausted(format!(
                    "the result's output trees exceed {MAX_TREE_BYTES_PER_RESULT} bytes"
                )));
            }
            let bytes = match self.read_bounded(cache, tree, MAX_MESSAGE_BYTES).await {
                Ok(bytes) => bytes,
                Err(Error::NotFound(_) | Error::IncompleteObject(_)) => {
                    return Ok(Err(Missing(format!("output tree {tree} is missing"))));
                }
                Err(e) => return Err(e),
            };
            let tree_message = Tree::decode(bytes)
                .map_err(|e| Error::InvalidArgument(format!("{tree} is not a Tree: {e}")))?;
            for directory in tree_message.root.iter().chain(&tree_message.children) {
                for file in &directory.files {
                    digests.push(Digest::from_required(file.digest.as_ref())?);
                }
            }
        }
        let missing = self.find_missing(cache, &digests).await?;
        Ok(match missing.first() {
            None => Ok(()),
            Some(first) => Err(Missing(format!(
                "{} referenced blob(s) are missing, e.g. {first}",
                missing.len()
            ))),
        })
    }
}

impl Reapi {
    /// Whether a stored `ActionResult` may be served: it decodes and every
    /// blob it names is present (those are refreshed). Bazel's HTTP cache
    /// answers a miss otherwise, as GetActionResult does, so a client never
    /// gets a hit whose outputs it cannot download.
    pub(crate) async fn stored_result_is_complete(
        &self,
        cache: &Cache,
        stored: &[u8],
    ) -> Result<bool, Error> {
        let Ok(result) = ActionResult::decode(stored) else {
            return Ok(false);
        };
        match self.check_complete(cache, &result).await {
            Ok(complete) => Ok(complete.is_ok()),
            // A result naming malformed digests or oversized trees can
            // never be served.
            Err(Error::InvalidArgument(_) | Error::ResourceExhausted(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl ActionCacheService {
    async fn inner_get(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<ActionResult, Error> {
        let reapi = &self.0;
        let cache = reapi
            .cache(
                request.metadata(),
                &request.get_ref().instance_name,
                ReapiAccess::Read,
            )
            .await?;
        let request = request.into_inner();
        let action = Digest::from_required(request.action_digest.as_ref())?;
        let stored = reapi
            .state
            .meta
            .get_action_result(cache.id, action.hash_bytes())
            .await?
            .ok_or_else(|| Error::NotFound(format!("no result for action {action}")))?;
        let mut result = ActionResult::decode(Bytes::from(stored))
            .map_err(|e| Error::Internal(format!("stored result of {action} is corrupt: {e}")))?;
        let complete = match reapi.check_complete(&cache, &result).await {
            Ok(complete) => complete,
            // Stored before today's limits, or otherwise unservable: to the
            // client it is a miss, and Bazel re-runs the action.
            Err(Error::InvalidArgument(why) | Error::ResourceExhausted(why)) => Err(Missing(why)),
            Err(e) => return Err(e),
        };
        if let Err(Missing(why)) = complete {
            return Err(Error::NotFound(format!(
                "the result of action {action} is incomplete: {why}"
            )));
        }
        reapi
            .state
            .meta
            .touch_action_result(cache.id, action.hash_bytes(), unix_now())
            .await?;
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
        let cache = reapi
            .cache(
                request.metadata(),
                &request.get_ref().instance_name,
                ReapiAccess::Write,
            )
            .await?;
        let request = request.into_inner();
        let action = Digest::from_required(request.action_digest.as_ref())?;
        let mut result = request
            .action_result
            .ok_or_else(|| Error::InvalidArgument("action_result is required".into()))?;
        self.validate(&cache, &mut result).await?;
        if let Err(Missing(why)) = reapi.check_complete(&cache, &result).await? {
            return Err(Error::FailedPrecondition(format!(
                "upload the outputs before the result: {why}"
            )));
        }
        reapi
            .state
            .meta
            .put_action_result(
                cache.id,
                action.hash_bytes(),
                &result.encode_to_vec(),
                unix_now(),
            )
            .await?;
        Ok(result)
    }

    /// Checks paths and digests, and moves inlined bytes (which clients
    /// should not send, but may) into the CAS so the stored result only
    /// refers to blobs.
    async fn validate(&self, cache: &Cache, result: &mut ActionResult) -> Result<(), Error> {
        let reapi = &self.0;
        let relative = |path: &str, what: &str| {
            if path.starts_with('/') {
                Err(Error::InvalidArgument(format!(
                    "{what} path {path:?} must be relative"
                )))
            } else {
                Ok(())
            }
        };
        for file in &mut result.output_files {
            relative(&file.path, "output file")?;
            let digest = Digest::from_required(file.digest.as_ref())?;
            if !file.contents.is_empty() {
                reapi
                    .store_bytes(cache, digest, std::mem::take(&mut file.contents))
                    .await?;
            }
        }
        for dir in &result.output_directories {
            relative(&dir.path, "output directory")?;
            Digest::from_required(dir.tree_digest.as_ref())?;
        }
        #[expect(
            deprecated,
            reason = "v2.0 clients still send the per-kind symlink lists"
        )]
        let all_links = result
            .output_symlinks
            .iter()
            .chain(&result.output_file_symlinks)
            .chain(&result.output_directory_symlinks);
        for link in all_links {
            relative(&link.path, "output symlink")?;
        }
        for (raw, digest) in [
            (&mut result.stdout_raw, &mut result.stdout_digest),
            (&mut result.stderr_raw, &mut result.stderr_digest),
        ] {
            if raw.is_empty() {
                continue;
            }
            let data = std::mem::take(raw);
            let expected = match digest.as_ref() {
                Some(d) => Digest::from_proto(d)?,
                None => Digest::of(&data),
            };
            reapi.store_bytes(cache, expected, data).await?;
            *digest = Some(expected.to_proto());
        }
        Ok(())
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
