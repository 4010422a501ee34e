use crate::backend::BackendError;
use crate::chunk::ChunkHash;
use crate::codec::CodecError;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream being ingested failed (client went away, bad body, or the
    /// caller's own validation rejected it); nothing was committed.
    #[error("input stream failed: {0}")]
    Input(BoxError),
    #[error("blob is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// A chunk the metadata refers to is gone from the backend: the blob
    /// cannot be served whole, and must not be served short.
    #[error("chunk {0} is missing from the blob backend")]
    MissingChunk(ChunkHash),
    #[error("chunk {id} is corrupt: {reason}")]
    Corrupt { id: ChunkHash, reason: String },
    #[error("chunk index lookup failed: {0}")]
    Index(BoxError),
    #[error(transparent)]
    Backend(BackendError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl StoreError {
    pub(crate) fn from_backend(id: ChunkHash, err: BackendError) -> Self {
        match err {
            BackendError::NotFound(_) => Self::MissingChunk(id),
            short @ BackendError::Short { .. } => Self::Corrupt {
                id,
                reason: short.to_string(),
            },
            other => Self::Backend(other),
        }
    }
}
