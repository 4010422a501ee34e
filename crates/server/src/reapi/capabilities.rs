//! Capabilities: what this cache supports, so Bazel configures itself (and
//! fails early on a bad token, since the instance is authorized here too).

use std::sync::Arc;

use garret_proto::reapi::capabilities_server::Capabilities;
use garret_proto::reapi::compressor::Value as Compressor;
use garret_proto::reapi::digest_function::Value as DigestFunction;
use garret_proto::reapi::symlink_absolute_path_strategy::Value as SymlinkAbsolutePathStrategy;
use garret_proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, FastCdc2020Params, GetCapabilitiesRequest,
    ServerCapabilities,
};
use garret_proto::semver::SemVer;
use tonic::{Request, Response, Status};

use super::{MAX_BATCH_TOTAL_BYTES, Reapi};
use crate::auth::ReapiAccess;
use crate::error::Error;

#[derive(Debug)]
pub(crate) struct CapabilitiesService(pub(crate) Arc<Reapi>);

fn version(minor: i32) -> SemVer {
    SemVer {
        major: 2,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

impl CapabilitiesService {
    async fn inner(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<ServerCapabilities, Error> {
        let reapi = &self.0;
        reapi.cache_for(&request, ReapiAccess::Read).await?;
        let chunker = reapi.state.blobs.store().config().chunker;
        let zstd = vec![Compressor::Zstd as i32];
        Ok(ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: vec![DigestFunction::Sha256 as i32],
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: i64::try_from(MAX_BATCH_TOTAL_BYTES)
                    .unwrap_or(i64::MAX),
                // Symlinks are data in a cache; where they point is the
                // client's business.
                symlink_absolute_path_strategy: SymlinkAbsolutePathStrategy::Allowed as i32,
                supported_compressors: zstd.clone(),
                supported_batch_update_compressors: zstd,
                max_cas_blob_size_bytes: i64::try_from(reapi.max_blob_size()).unwrap_or(i64::MAX),
                split_blob_support: true,
                splice_blob_support: true,
                fast_cdc_2020_params: Some(FastCdc2020Params {
                    avg_chunk_size_bytes: u64::from(chunker.avg_size),
                    seed: u32::try_from(chunker.seed).unwrap_or(u32::MAX),
                }),
            }),
            deprecated_api_version: None,
            low_api_version: Some(version(0)),
            high_api_version: Some(version(3)),
        })
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        Ok(Response::new(self.inner(request).await?))
    }
}
