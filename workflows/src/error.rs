//! The workflows crate's error type.

/// Errors of sync planning, staging and snapshots.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] bulwark_engine::EngineError),
    /// The staging database failed.
    #[error("staging database error: {0}")]
    Db(#[from] sqlx::Error),
    /// An adapter could not be built or used.
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    /// The legacy source failed.
    #[error("legacy source {source_name}: {detail}")]
    Source {
        /// Which source.
        source_name: String,
        /// What happened.
        detail: String,
    },
    /// Stored data is inconsistent.
    #[error("corrupt staging data: {0}")]
    Corrupt(String),
    /// Bad configuration or arguments.
    #[error("configuration error: {0}")]
    Config(String),
}

/// Result alias for this crate.
pub type Result<T, E = SyncError> = std::result::Result<T, E>;
