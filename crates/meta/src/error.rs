use std::fmt;

/// Everything a [`crate::Meta`] operation can fail with. The server maps each
/// variant to one HTTP status and one gRPC code; only [`MetaError::Database`]
/// and [`MetaError::Corrupt`] are its fault.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The named thing (a cache, blob, Nix object) does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A live cache already has this name.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A chunk the caller needs is being garbage-collected, or vanished after
    /// the caller decided not to upload it. Nothing was written: wait a moment
    /// (GC finishes such a chunk within seconds), then redo
    /// [`crate::Meta::present_chunks`], upload what it does not report, and
    /// commit again.
    #[error("chunk {} is being garbage-collected; retry from present_chunks", Hex(.0))]
    ChunkGone([u8; 32]),
    /// A chunk's row records a different stored frame (size or SHA-256) than
    /// the blob being committed: another writer stored the chunk meanwhile,
    /// compressed differently. Nothing was written: redo
    /// [`crate::Meta::present_chunks`], which reports the stored frame's hash,
    /// rebuild the file from the stored frame, and commit again.
    #[error("chunk {} is stored as a different frame; retry from present_chunks", Hex(.0))]
    FrameMismatch([u8; 32]),
    /// The upload session was taken over by another Write (perhaps on another
    /// replica), expired, or finished, since the caller claimed it. Nothing
    /// was written: this writer must stop; the client resumes through
    /// whichever Write holds the session now, or starts over.
    #[error("upload session was taken over, expired or finished")]
    UploadSuperseded,
    /// The caller passed something inconsistent (offsets that do not add up,
    /// an invalid cache name, a size beyond `i64::MAX`).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A row breaks an invariant the schema cannot express (a digest that is
    /// not 32 bytes, an unknown compression). Needs repair, not a retry.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(DatabaseError),
}

/// An error from the database driver or the migrator, kept opaque so that no
/// sqlx type is part of this crate's API.
pub struct DatabaseError(Box<dyn std::error::Error + Send + Sync>);

impl fmt::Debug for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl MetaError {
    /// Postgres aborted the transaction as a deadlock victim or for a
    /// serialization failure; running it again is the documented remedy.
    pub(crate) fn is_transient(&self) -> bool {
        let MetaError::Database(DatabaseError(inner)) = self else {
            return false;
        };
        match inner.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref(), Some("40001" | "40P01"))
            }
            _ => false,
        }
    }

    /// Whether the database refused a duplicate key.
    pub(crate) fn is_unique_violation(&self) -> bool {
        let MetaError::Database(DatabaseError(inner)) = self else {
            return false;
        };
        matches!(
            inner.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(e)) if e.is_unique_violation()
        )
    }
}

impl From<sqlx::Error> for MetaError {
    fn from(e: sqlx::Error) -> Self {
        MetaError::Database(DatabaseError(Box::new(e)))
    }
}

impl From<sqlx::migrate::MigrateError> for MetaError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        MetaError::Database(DatabaseError(Box::new(e)))
    }
}

/// Lower-case hex, the way digests appear in logs and object keys.
struct Hex<'a>(&'a [u8; 32]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
