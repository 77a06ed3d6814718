//! Retention: removing what finished long ago, so that the database stays the size of the
//! work in flight rather than of all work ever done.
//!
//! What goes: every workflow of a run that ended (finished or cancelled) before the cutoff,
//! with its journal and input, *except, for the kinds named in
//! [`Retention::keep_latest_of`], the newest workflow of each subject*: the last state of a
//! long-lived subject (an endpoint) stays readable and audited, whatever its age. A run goes
//! with its last workflow; the newest run is always kept (SQLite may otherwise hand its id
//! out again). Alerts older than their cutoff go, delivered or not.
//!
//! Workflows are removed whole (journal rows, input, row, in one transaction per chunk),
//! so what stays is a set of complete journals: `audit` re-folds it without findings.

use sqlx::AssertSqlSafe;

use crate::{Backend, Result};

/// How much history to keep. `None`: keep that kind forever.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Kinds whose subjects live on: the newest workflow of each of their subjects is kept.
    pub keep_latest_of: Vec<String>,
    /// Remove workflows of runs that ended before this time (ms since the epoch).
    pub journal_before_ms: Option<i64>,
    /// Remove alerts raised before this time (ms since the epoch).
    pub alerts_before_ms: Option<i64>,
}

/// What [`Backend::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    /// Workflows removed (with their journals and inputs).
    pub workflows: u64,
    /// Journal rows removed.
    pub journal_rows: u64,
    /// Runs removed.
    pub runs: u64,
    /// Alerts removed.
    pub alerts: u64,
}

/// Workflows removed per transaction: a prune never holds the write lock for long.
const CHUNK: usize = 500;

/// Run the same query code on whichever pool the backend has (`$N` parameters, which both
/// drivers accept).
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            Backend::Sqlite(store) => {
                let $pool = store.pool();
                $body
            }
            Backend::Postgres(store) => {
                let $pool = store.pool();
                $body
            }
        }
    };
}

impl Backend {
    /// Remove the history `retention` lets go (see the module documentation).
    pub async fn prune(&self, retention: &Retention) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        if let Some(before) = retention.journal_before_ms {
            // Workflows of ended runs, each not the newest of its (kind, subject).
            let kinds = retention
                .keep_latest_of
                .iter()
                .map(|k| format!("'{}'", k.replace('\'', "''")))
                .collect::<Vec<_>>();
            let kinds = if kinds.is_empty() {
                "''".to_string()
            } else {
                kinds.join(",")
            };
            // SQLite keeps booleans as integers, PostgreSQL as booleans.
            let (terminal, row_terminal) = match self {
                Backend::Sqlite(_) => ("w.terminal = 1", "terminal = 1"),
                Backend::Postgres(_) => ("w.terminal", "terminal"),
            };
            let doomed = format!(
                "SELECT w.id FROM workflows w JOIN runs r ON r.id = w.run_id
                 WHERE r.status <> 'running' AND r.finished_at IS NOT NULL AND r.finished_at < $1
                   AND {terminal}
                   AND (w.kind NOT IN ({kinds})
                        OR w.id < (SELECT MAX(n.id) FROM workflows n WHERE n.subject = w.subject AND n.kind = w.kind))
                 ORDER BY w.id"
            );
            let doomed: Vec<i64> = on_pool!(self, |pool| sqlx::query_scalar(AssertSqlSafe(
                doomed.as_str()
            ))
            .bind(before)
            .fetch_all(pool)
            .await?);
            for chunk in doomed.chunks(CHUNK) {
                let list = chunk
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                let journal = format!("DELETE FROM journal WHERE workflow_id IN ({list})");
                let inputs = format!("DELETE FROM workflow_inputs WHERE workflow_id IN ({list})");
                let rows = format!("DELETE FROM workflows WHERE id IN ({list}) AND {row_terminal}");
                let (j, w) = on_pool!(self, |pool| {
                    let mut tx = pool.begin().await?;
                    let j = sqlx::query(AssertSqlSafe(journal.as_str()))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    sqlx::query(AssertSqlSafe(inputs.as_str()))
                        .execute(&mut *tx)
                        .await?;
                    let w = sqlx::query(AssertSqlSafe(rows.as_str()))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    tx.commit().await?;
                    (j, w)
                });
                pruned.journal_rows += j;
                pruned.workflows += w;
            }
            const RUNS: &str = "DELETE FROM runs WHERE status <> 'running'
                   AND finished_at IS NOT NULL AND finished_at < $1
                   AND id < (SELECT MAX(id) FROM runs)
                   AND NOT EXISTS (SELECT 1 FROM workflows w WHERE w.run_id = runs.id)";
            pruned.runs = on_pool!(self, |pool| sqlx::query(RUNS)
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected());
        }
        if let Some(before) = retention.alerts_before_ms {
            const ALERTS: &str = "DELETE FROM alerts WHERE at < $1";
            pruned.alerts = on_pool!(self, |pool| sqlx::query(ALERTS)
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected());
        }
        Ok(pruned)
    }

    /// Give the space of removed rows back where the backend keeps it apart: on SQLite,
    /// checkpoint the write-ahead log into the database and truncate it (pages freed by a
    /// prune are then reused by later writes). PostgreSQL's autovacuum does this itself.
    pub async fn checkpoint(&self) -> Result<()> {
        if let Backend::Sqlite(store) = self {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(store.pool())
                .await?;
        }
        Ok(())
    }
}
