//! The engine's error type.

use crate::store::WorkflowId;

/// Errors raised by the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The file exists but is not a Bulwark database.
    #[error("{path} is not a Bulwark database ({detail}); refusing to open it")]
    NotBulwark {
        /// The path that was opened.
        path: String,
        /// What was found instead.
        detail: String,
    },
    /// The database could not be reached or refused us.
    #[error("cannot open database {url}: {detail}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The database was written by a newer Bulwark.
    #[error(
        "database {url} has schema version {found}, newer than this Bulwark knows (up to {known}); upgrade Bulwark"
    )]
    SchemaTooNew {
        /// The database.
        url: String,
        /// Newest migration applied to the database.
        found: i64,
        /// Newest migration this build knows.
        known: i64,
    },
    /// The database's filesystem is full.
    #[error(
        "{path}: no space left on its disk ({detail}); free space there and run again: nothing was half-written (each journal commit is whole)"
    )]
    DiskFull {
        /// The database file.
        path: String,
        /// What SQLite or the OS said.
        detail: String,
    },
    /// The database (or its directory, where SQLite keeps its WAL files) cannot be written.
    #[error(
        "{path} cannot be written by this process ({detail}); this command writes to it. Read-only commands (status, runs, endpoints, alerts, audit, quarantine) still work"
    )]
    ReadOnly {
        /// The database file.
        path: String,
        /// What SQLite or the OS said.
        detail: String,
    },
    /// Another process is working on this database.
    #[error(
        "another bulwark process is already working on {path} (lock file {lock}); stop it first"
    )]
    Locked {
        /// Database path.
        path: String,
        /// Lock file path.
        lock: String,
    },
    /// A journal is inconsistent; the workflow is refused.
    #[error("workflow {workflow}: corrupt journal at seq {seq}: {detail}")]
    Corrupt {
        /// The workflow concerned.
        workflow: WorkflowId,
        /// The first bad sequence number.
        seq: i64,
        /// What is wrong.
        detail: String,
    },
    /// This worker no longer holds the workflow's lease (a newer epoch exists).
    #[error("workflow {workflow}: lease lost (epoch {epoch} is stale); append refused")]
    Fenced {
        /// The workflow concerned.
        workflow: WorkflowId,
        /// The stale epoch.
        epoch: i64,
    },
    /// The transition function refused an event.
    #[error("workflow {workflow}: {source}")]
    Transition {
        /// The workflow concerned.
        workflow: WorkflowId,
        /// The refusal.
        source: crate::machine::TransitionError,
    },
    /// JSON (de)serialisation failed.
    #[error("json error in {what}: {source}")]
    Json {
        /// What was being (de)serialised.
        what: String,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// The group-commit writer has stopped.
    #[error("the journal writer has stopped")]
    WriterGone,
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
