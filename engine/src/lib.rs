//! Bulwark's generic durable-execution core.
//!
//! The engine knows workflows, events, journals, leases and alerts; it knows nothing about
//! SKUs or endpoints. A domain crate describes a workflow as a pure [`Machine`]
//! (`(input, state, event) → (state, commands)`) and an [`Effects`] implementation that
//! executes commands and turns their results into events. The [`Runtime`] journals every
//! transition durably (through the group-commit [`Journal`]) *before* it runs the
//! transition's commands, so a crash at any point resumes from the last journaled state.
//!
//! Invariants:
//! - a journal row `(workflow, seq)` is written once, in the same transaction that moves
//!   the workflow row from `seq - 1` to `seq`, and only if the writer holds the current
//!   lease epoch (fencing);
//! - replay is a fold of the journal through the machine's transition function; any
//!   disagreement (bad JSON, a gap, an illegal transition) refuses the workflow by id.

// Column lists shared by both stores' queries (macros, so that `concat!` keeps the SQL static).
macro_rules! alert_columns {
    () => {
        "id, at, kind, level, subject, workflow_id, message, delivered_at, delivery_attempts, delivery_error"
    };
}
macro_rules! circuit_columns {
    () => {
        "subject, state, failures, opens, opened_at, retry_at, reason"
    };
}

pub mod alerts;
pub mod audit;
pub mod circuit;
pub mod error;
pub mod fence;
pub mod hold;
pub mod journal;
pub mod machine;
pub mod postgres;
pub mod presence;
pub mod retention;
pub mod runtime;
pub mod schedule;
pub mod sqlite;
pub mod store;

pub use audit::{Finding, check_journal};
pub use circuit::{Admission, CircuitChange, CircuitPolicy, CircuitRow};
pub use error::{EngineError, Result};
pub use journal::{Journal, JournalConfig};
pub use machine::{Alert, Machine, Notice, Transition, TransitionError};
pub use postgres::PostgresStore;
pub use retention::{Pruned, Retention};
pub use runtime::{Effects, RunOutcome, Runtime, RuntimeConfig, WorkOptions, WorkflowCtx};
pub use sqlite::SqliteStore;
pub use store::{
    AlertLevel, AlertRow, Append, AppendOutcome, CircuitWrite, ClaimRequest, ClaimedWorkflow,
    HoldRow, JournalRow, NewAlert, NewWorkflow, RunId, RunRow, Store, WorkerRow, WorkflowId,
    WorkflowRow, now_ms,
};

/// An opened backend: the generic store plus the concrete pool, for domain crates that
/// keep their own tables in the same database.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The embedded default.
    Sqlite(std::sync::Arc<SqliteStore>),
    /// Several workers on one PostgreSQL database.
    Postgres(std::sync::Arc<PostgresStore>),
}

impl Backend {
    /// Open by URL: `postgres://…` (or `postgresql://…`) for PostgreSQL; `sqlite://PATH`
    /// or a plain path for SQLite.
    pub async fn open(url: &str) -> Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(std::sync::Arc::new(
                PostgresStore::open(url).await?,
            )))
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            Ok(Self::Sqlite(std::sync::Arc::new(
                SqliteStore::open(path).await?,
            )))
        }
    }

    /// Open for reading only: SQLite without creating, migrating or writing anything
    /// ([`SqliteStore::open_read_only`]); PostgreSQL as [`Backend::open`] does.
    pub async fn open_read_only(url: &str) -> Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Self::open(url).await;
        }
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        Ok(Self::Sqlite(std::sync::Arc::new(
            SqliteStore::open_read_only(path).await?,
        )))
    }

    /// The schema version of the database (the newest migration applied).
    pub async fn schema_version(&self) -> Result<i64> {
        const SQL: &str = "SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success";
        Ok(match self {
            Backend::Sqlite(s) => sqlx::query_scalar(SQL).fetch_one(s.pool()).await?,
            Backend::Postgres(p) => sqlx::query_scalar(SQL).fetch_one(p.pool()).await?,
        })
    }

    /// The generic store.
    pub fn store(&self) -> std::sync::Arc<dyn Store> {
        match self {
            Self::Sqlite(s) => s.clone(),
            Self::Postgres(s) => s.clone(),
        }
    }

    /// Close connections.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(s) => s.close().await,
            Self::Postgres(s) => s.close().await,
        }
    }
}

/// Apply `migrator` to `pool`, refusing (without writing) a database that already holds a
/// migration this build does not know: it was written by a newer Bulwark.
pub(crate) async fn migrate_checked<'a, A>(
    migrator: sqlx::migrate::Migrator,
    pool: A,
    shown: &str,
) -> Result<()>
where
    A: sqlx::Acquire<'a>,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    match migrator.run(pool).await {
        Ok(()) => Ok(()),
        Err(sqlx::migrate::MigrateError::VersionMissing(found)) => Err(EngineError::SchemaTooNew {
            url: shown.to_string(),
            found,
            known,
        }),
        Err(sqlx::migrate::MigrateError::VersionMismatch(v)) => Err(EngineError::Other(format!(
            "database {shown}: its migration {v} differs from this Bulwark's (written by a development build?); \
             refusing to touch it"
        ))),
        Err(e) => Err(e.into()),
    }
}
