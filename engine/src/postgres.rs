//! The PostgreSQL store: several workers on one database. Claims use
//! `FOR UPDATE SKIP LOCKED` and bump the lease epoch; group commits bind whole arrays
//! (`unnest`) so one statement moves thousands of workflows.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::Mutex;

use crate::circuit::{CircuitChange, CircuitRow};
use crate::error::{EngineError, Result};
use crate::store::*;

/// The PostgreSQL implementation of [`Store`].
#[derive(Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// Host, port, database and schema: see [`Store::presence_scope`].
    scope: String,
    schema: String,
    channel: String,
    shown: String,
    listener: Mutex<Option<PgListener>>,
}

/// A URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!(
                "{}{}@{}",
                &url[..s + 3],
                if creds.contains(':') {
                    format!("{user}:***")
                } else {
                    user.to_string()
                },
                &url[at + 1..]
            )
        }
        _ => url.to_string(),
    }
}

/// Split Bulwark's own `schema=NAME` parameter off a PostgreSQL URL.
fn split_schema(url: &str) -> Result<(String, String)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), "public".into()));
    };
    let mut schema = "public".to_string();
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("schema", v)) => schema = v.to_string(),
            _ => rest.push(kv),
        }
    }
    if schema.is_empty()
        || !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(EngineError::Other(format!(
            "schema {schema:?} in the database URL must be letters, digits and underscores"
        )));
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, schema))
}

fn connect_error(shown: &str, e: sqlx::Error) -> EngineError {
    let detail = match &e {
        sqlx::Error::Io(io) => format!("cannot reach the server: {io}"),
        sqlx::Error::PoolTimedOut => "cannot reach the server: timed out".to_string(),
        sqlx::Error::Database(db)
            if db.code().as_deref() == Some("28P01") || db.code().as_deref() == Some("28000") =>
        {
            format!("the server refused the credentials: {}", db.message())
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => {
            format!("no such database: {}", db.message())
        }
        other => other.to_string(),
    };
    EngineError::Connect {
        url: shown.to_string(),
        detail,
    }
}

/// How long the server lets a session of ours sit idle inside a transaction before it
/// ends it (and so releases its locks): see [`PostgresStore::open`].
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "3s";

impl PostgresStore {
    /// One attempt at a group commit (see [`Store::append_batch`]).
    async fn append_batch_once(&self, appends: &[Append]) -> Result<Vec<AppendOutcome>> {
        let now = now_ms();
        let ids: Vec<i64> = appends.iter().map(|a| a.workflow).collect();
        let seqs: Vec<i64> = appends.iter().map(|a| a.seq).collect();
        let epochs: Vec<i64> = appends.iter().map(|a| a.epoch).collect();
        let statuses: Vec<&str> = appends.iter().map(|a| a.status).collect();
        let terminals: Vec<bool> = appends.iter().map(|a| a.terminal).collect();
        let wakes: Vec<Option<i64>> = appends.iter().map(|a| a.wake_at).collect();
        let workers: Vec<&str> = appends.iter().map(|a| &*a.worker).collect();
        let events: Vec<&str> = appends.iter().map(|a| a.event_json.as_str()).collect();
        let states: Vec<&str> = appends.iter().map(|a| a.state_json.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        // One statement: move every workflow row still at (seq-1, epoch), then journal
        // exactly the ones that moved. The rows are locked in id order first (the
        // sub-select), so concurrent commits, renewals and releases cannot deadlock on them.
        let landed: Vec<i64> = sqlx::query_scalar(
            "WITH v AS (
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bool[], $6::bigint[],
                                      $7::text[], $8::text[], $9::text[])
                 AS v(id, seq, epoch, status, terminal, wake_at, worker, event, state)
             ), moved AS (
                 UPDATE workflows w SET seq = v.seq, status = v.status, terminal = v.terminal, wake_at = v.wake_at,
                        updated_at = $10
                 FROM v WHERE w.id = v.id AND w.seq = v.seq - 1 AND w.lease_epoch = v.epoch
                   AND w.id IN (SELECT id FROM workflows WHERE id = ANY($1) ORDER BY id FOR UPDATE)
                 RETURNING w.id
             )
             INSERT INTO journal (workflow_id, seq, at, worker, epoch, event_json, state_json)
             SELECT v.id, v.seq, $10, v.worker, v.epoch, v.event, v.state FROM v JOIN moved ON moved.id = v.id
             RETURNING workflow_id",
        )
        .bind(&ids)
        .bind(&seqs)
        .bind(&epochs)
        .bind(&statuses)
        .bind(&terminals)
        .bind(&wakes)
        .bind(&workers)
        .bind(&events)
        .bind(&states)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let landed: std::collections::HashSet<i64> = landed.into_iter().collect();
        let mut outcomes = Vec::with_capacity(appends.len());
        let mut raised: Vec<NewAlert> = Vec::new();
        let mut closes: Vec<(&str, WorkflowId, i64)> = Vec::new();
        for a in appends {
            let ok = landed.contains(&a.workflow);
            outcomes.push(if ok {
                AppendOutcome::Committed
            } else {
                AppendOutcome::Fenced
            });
            if !ok {
                continue;
            }
            for alert in &a.alerts {
                insert_alert(&mut tx, now, alert, Some((a.workflow, a.seq))).await?;
                raised.push(alert.clone());
            }
            match &a.circuit {
                Some(CircuitWrite {
                    subject,
                    change:
                        CircuitChange::Open {
                            failures,
                            reason,
                            policy,
                        },
                }) => {
                    // Lock the row (if any) so that two workers opening it agree on `opens`.
                    let previous = sqlx::query(concat!(
                        "SELECT ",
                        circuit_columns!(),
                        " FROM circuits WHERE subject = $1 FOR UPDATE"
                    ))
                    .bind(subject)
                    .fetch_optional(&mut *tx)
                    .await?
                    .as_ref()
                    .map(circuit_from);
                    let row = CircuitRow::opened(
                        previous.as_ref(),
                        subject,
                        now,
                        *failures,
                        reason,
                        policy,
                    );
                    sqlx::query(
                        "INSERT INTO circuits (subject, state, opened_at, retry_at, failures, opens, reason)
                         VALUES ($1, 'open', $2, $3, $4, $5, $6)
                         ON CONFLICT (subject) DO UPDATE SET state = 'open', opened_at = excluded.opened_at,
                             retry_at = excluded.retry_at, failures = excluded.failures,
                             opens = excluded.opens, reason = excluded.reason",
                    )
                    .bind(subject)
                    .bind(row.opened_at)
                    .bind(row.retry_at)
                    .bind(i64::from(row.failures))
                    .bind(i64::from(row.opens))
                    .bind(&row.reason)
                    .execute(&mut *tx)
                    .await?;
                    let alert = row.opened_alert();
                    insert_alert(&mut tx, now, &alert, Some((a.workflow, a.seq))).await?;
                    raised.push(alert);
                }
                Some(CircuitWrite {
                    subject,
                    change: CircuitChange::Close,
                }) => {
                    closes.push((subject.as_str(), a.workflow, a.seq));
                }
                None => {}
            }
        }
        // Successes close open circuits; almost always none is open, so one statement
        // finds the few that are.
        if !closes.is_empty() {
            let subjects: Vec<&str> = closes.iter().map(|c| c.0).collect();
            let closed: Vec<String> = sqlx::query_scalar(
                "UPDATE circuits SET state = 'closed', opens = 0, failures = 0
                 WHERE state = 'open' AND subject = ANY($1) RETURNING subject",
            )
            .bind(&subjects)
            .fetch_all(&mut *tx)
            .await?;
            for subject in closed {
                let (_, workflow, seq) = closes
                    .iter()
                    .find(|c| c.0 == subject)
                    .expect("a closed subject was asked for");
                let alert = crate::circuit::closed_alert(&subject, "a probe batch was verified");
                insert_alert(&mut tx, now, &alert, Some((*workflow, *seq))).await?;
                raised.push(alert);
            }
        }
        tx.commit().await?;
        raised.iter().for_each(crate::circuit::trace_alert);
        Ok(outcomes)
    }

    /// Connect to `url` (`postgres://user[:password]@host:port/db[?schema=NAME]`), create
    /// the schema if needed and apply pending migrations. Refuses a schema written by a
    /// newer Bulwark.
    pub async fn open(url: &str) -> Result<Self> {
        let shown = redact_url(url);
        let (url, schema) = split_schema(url)?;
        let options = PgConnectOptions::from_str(&url)
            .map_err(|e| EngineError::Connect {
                url: shown.clone(),
                detail: format!("bad URL: {e}"),
            })?
            // NOTICEs ("schema … already exists, skipping" at every start) are noise in
            // the logs; warnings and errors still come through.
            //
            // A worker stopped (SIGSTOP, a frozen VM) inside a transaction would hold its
            // row locks for as long as it is stopped, and claims skip locked rows: the
            // workflows it was committing would never be taken over. The server ends such
            // a session instead (every transaction here is a few statements with no
            // waiting in between), which releases the locks.
            .options([
                ("search_path", schema.as_str()),
                ("client_min_messages", "warning"),
                (
                    "idle_in_transaction_session_timeout",
                    IDLE_IN_TRANSACTION_TIMEOUT,
                ),
            ]);
        let scope = format!(
            "postgres://{}:{}/{}#{schema}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        );
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| connect_error(&shown, e))?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&pool)
        .await
        .map_err(|e| connect_error(&shown, e))?;
        crate::migrate_checked(sqlx::migrate!("../migrations/postgres"), &pool, &shown).await?;
        let channel = format!("bulwark_work_{schema}");
        Ok(Self {
            pool,
            scope,
            schema,
            channel,
            shown,
            listener: Mutex::new(None),
        })
    }

    /// The connection pool (for domain crates that keep their own tables here).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema this store lives in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The URL, password redacted.
    pub fn describe(&self) -> &str {
        &self.shown
    }

    /// Drop the whole schema (tests).
    pub async fn drop_schema(&self) -> Result<()> {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Close the pool (the notification listener first: it holds a connection).
    pub async fn close(&self) {
        self.listener.lock().await.take();
        self.pool.close().await;
    }

    async fn notify(&self) {
        let _ = sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&self.pool)
            .await;
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn presence_scope(&self) -> Option<String> {
        Some(self.scope.clone())
    }

    async fn create_run(&self, kind: &str, params_json: &str) -> Result<RunId> {
        Ok(sqlx::query_scalar(
            "INSERT INTO runs (kind, status, params_json, created_at) VALUES ($1, 'running', $2, $3) RETURNING id",
        )
        .bind(kind)
        .bind(params_json)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn create_workflows(
        &self,
        run: RunId,
        workflows: &[NewWorkflow],
    ) -> Result<Vec<WorkflowId>> {
        let mut tx = self.pool.begin().await?;
        let ids = insert_workflows(&mut tx, run, workflows).await?;
        tx.commit().await?;
        self.notify().await;
        Ok(ids)
    }

    async fn start_run(
        &self,
        kind: &str,
        params_json: &str,
        workflows: &[NewWorkflow],
    ) -> Result<(RunId, Vec<WorkflowId>)> {
        let mut tx = self.pool.begin().await?;
        let run: RunId = sqlx::query_scalar("INSERT INTO runs (kind, status, params_json, created_at) VALUES ($1, 'running', $2, $3) RETURNING id")
            .bind(kind)
            .bind(params_json)
            .bind(now_ms())
            .fetch_one(&mut *tx)
            .await?;
        let ids = insert_workflows(&mut tx, run, workflows).await?;
        tx.commit().await?;
        self.notify().await;
        Ok((run, ids))
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedWorkflow>> {
        let now = now_ms();
        let limit = request.limit.map(|l| l as i64).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE workflows w SET lease_owner = $1, lease_epoch = w.lease_epoch + 1, lease_until = $2
             FROM (SELECT id, lease_owner AS previous FROM workflows
                   WHERE NOT terminal AND kind = $3 AND ($4::bigint IS NULL OR run_id = $4)
                     AND (lease_until IS NULL OR lease_until < $5 OR lease_owner = ANY($8))
                     AND NOT (id = ANY($7))
                     AND ($9 OR NOT EXISTS (SELECT 1 FROM holds h WHERE h.subject = workflows.subject))
                   ORDER BY id LIMIT $6 FOR UPDATE SKIP LOCKED) c
             WHERE w.id = c.id
             RETURNING w.id, w.run_id, w.subject, w.seq, w.lease_epoch, c.previous, w.version",
        )
        .bind(&request.owner)
        .bind(now + request.lease_ms)
        .bind(&request.kind)
        .bind(request.run)
        .bind(now)
        .bind(limit)
        .bind(&request.skip)
        .bind(&request.dead_owners)
        .bind(request.held)
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let details: HashMap<i64, (String, String)> = sqlx::query(
            "SELECT w.id, i.input_json, j.state_json FROM workflows w
             JOIN workflow_inputs i ON i.workflow_id = w.id
             JOIN journal j ON j.workflow_id = w.id AND j.seq = w.seq
             WHERE w.id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
        tx.commit().await?;
        let mut out: Vec<ClaimedWorkflow> = rows
            .into_iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let (input_json, state_json) = details.get(&id).cloned().unwrap_or_default();
                ClaimedWorkflow {
                    id,
                    run_id: r.get(1),
                    subject: r.get(2),
                    input_json,
                    state_json,
                    seq: r.get(3),
                    epoch: r.get(4),
                    previous_owner: r.get(5),
                    version: u32::try_from(r.get::<i64, _>(6)).unwrap_or(u32::MAX),
                }
            })
            .collect();
        out.sort_by_key(|w| w.id);
        Ok(out)
    }

    async fn holds_lease(&self, workflow: WorkflowId, owner: &str, epoch: i64) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) > 0 FROM workflows
             WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3 AND lease_until >= $4",
        )
        .bind(workflow)
        .bind(owner)
        .bind(epoch)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn renew(
        &self,
        owner: &str,
        held: &[(WorkflowId, i64)],
        lease_ms: i64,
    ) -> Result<Vec<WorkflowId>> {
        let ids: Vec<i64> = held.iter().map(|h| h.0).collect();
        let epochs: Vec<i64> = held.iter().map(|h| h.1).collect();
        retry_deadlocks("renewing leases", || async {
            // Rows are locked in id order (the sub-select), like every other multi-row
            // write here, so this worker's renewal and its own group commit (or another
            // worker's) never wait on each other in a cycle.
            Ok(sqlx::query_scalar(
                "UPDATE workflows w SET lease_until = $1 FROM unnest($2::bigint[], $3::bigint[]) AS h(id, epoch)
                 WHERE w.id = h.id AND w.lease_epoch = h.epoch AND w.lease_owner = $4
                   AND w.id IN (SELECT id FROM workflows WHERE id = ANY($2) ORDER BY id FOR UPDATE)
                 RETURNING w.id",
            )
            .bind(now_ms() + lease_ms)
            .bind(&ids)
            .bind(&epochs)
            .bind(owner)
            .fetch_all(&self.pool)
            .await?)
        })
        .await
    }

    async fn release(&self, owner: &str, held: &[(WorkflowId, i64)]) -> Result<()> {
        let ids: Vec<i64> = held.iter().map(|h| h.0).collect();
        let epochs: Vec<i64> = held.iter().map(|h| h.1).collect();
        sqlx::query(
            "UPDATE workflows w SET lease_owner = NULL, lease_until = NULL FROM unnest($1::bigint[], $2::bigint[]) AS h(id, epoch)
             WHERE w.id = h.id AND w.lease_epoch = h.epoch AND w.lease_owner = $3
               AND w.id IN (SELECT id FROM workflows WHERE id = ANY($1) ORDER BY id FOR UPDATE)",
        )
        .bind(&ids)
        .bind(&epochs)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        self.notify().await;
        Ok(())
    }

    async fn wait_for_work(&self, timeout: Duration) -> Result<()> {
        let mut guard = self.listener.lock().await;
        if guard.is_none() {
            let mut l = PgListener::connect_with(&self.pool).await?;
            l.listen(&self.channel).await?;
            *guard = Some(l);
        }
        let listener = guard.as_mut().expect("listener set");
        match tokio::time::timeout(timeout, listener.recv()).await {
            Ok(Ok(_)) | Err(_) => Ok(()),
            Ok(Err(e)) => {
                *guard = None;
                Err(e.into())
            }
        }
    }

    async fn append_batch(&self, appends: &[Append]) -> Result<Vec<AppendOutcome>> {
        // A deadlocked commit was rolled back whole: run it again rather than refuse
        // the workflows (they would wait for their lease to run out).
        retry_deadlocks("a journal group commit", || self.append_batch_once(appends)).await
    }

    async fn journal(&self, workflow: WorkflowId) -> Result<Vec<JournalRow>> {
        self.journal_range(workflow, workflow + 1).await
    }

    async fn journal_range(&self, from: WorkflowId, to: WorkflowId) -> Result<Vec<JournalRow>> {
        let rows = sqlx::query(
            "SELECT workflow_id, seq, at, worker, epoch, event_json, state_json FROM journal
             WHERE workflow_id >= $1 AND workflow_id < $2 ORDER BY workflow_id, seq",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| JournalRow {
                workflow: r.get(0),
                seq: r.get(1),
                at: r.get(2),
                worker: r.get(3),
                epoch: r.get(4),
                event_json: r.get(5),
                state_json: r.get(6),
            })
            .collect())
    }

    async fn workflows(&self, run: Option<RunId>, kind: Option<&str>) -> Result<Vec<WorkflowRow>> {
        let rows = sqlx::query(
            "SELECT w.id, w.run_id, w.kind, w.subject, coalesce(i.input_json, ''), w.status,
                    coalesce(j.state_json, ''), w.seq, w.lease_epoch, w.terminal
             FROM workflows w LEFT JOIN workflow_inputs i ON i.workflow_id = w.id
             LEFT JOIN journal j ON j.workflow_id = w.id AND j.seq = w.seq
             WHERE ($1::bigint IS NULL OR w.run_id = $1) AND ($2::text IS NULL OR w.kind = $2) ORDER BY w.id",
        )
        .bind(run)
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| WorkflowRow {
                id: r.get(0),
                run_id: r.get(1),
                kind: r.get(2),
                subject: r.get(3),
                input_json: r.get(4),
                status: r.get(5),
                state_json: r.get(6),
                seq: r.get(7),
                epoch: r.get(8),
                terminal: r.get(9),
            })
            .collect())
    }

    async fn worker_beat(&self, worker: &str, lease_ms: i64) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO workers (worker, started_at, last_beat, lease_ms) VALUES ($1, $2, $2, $3)
             ON CONFLICT (worker) DO UPDATE SET last_beat = excluded.last_beat, lease_ms = excluded.lease_ms",
        )
        .bind(worker)
        .bind(now)
        .bind(lease_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT w.worker, w.started_at, w.last_beat, w.lease_ms,
                    (SELECT count(*) FROM workflows f WHERE NOT f.terminal AND f.lease_owner = w.worker AND f.lease_until >= $1),
                    (SELECT count(*) FROM workflows f WHERE NOT f.terminal AND f.lease_owner = w.worker AND f.lease_until < $1)
             FROM workers w WHERE w.last_beat > $1 - 86400000 ORDER BY w.last_beat DESC, w.worker",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| WorkerRow {
                worker: r.get(0),
                started_at: r.get(1),
                last_beat: r.get(2),
                lease_ms: r.get(3),
                leases: r.get(4),
                expired: r.get(5),
            })
            .collect())
    }

    async fn runs(&self) -> Result<Vec<RunRow>> {
        let rows = sqlx::query("SELECT id, kind, status, params_json, created_at, finished_at FROM runs ORDER BY id DESC")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| RunRow {
                id: r.get(0),
                kind: r.get(1),
                status: r.get(2),
                params_json: r.get(3),
                created_at: r.get(4),
                finished_at: r.get(5),
            })
            .collect())
    }

    async fn open_subjects(&self, kind: &str) -> Result<std::collections::HashSet<String>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT subject FROM workflows WHERE NOT terminal AND kind = $1",
        )
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn status_counts(&self, run: Option<RunId>) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT status, count(*) FROM workflows WHERE ($1::bigint IS NULL OR run_id = $1) GROUP BY status ORDER BY status",
        )
        .bind(run)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn finish_run(&self, run: RunId, status: &str, alert: Option<NewAlert>) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE runs SET status = $1, finished_at = coalesce(finished_at, $2) WHERE id = $3 AND status = 'running'",
        )
        .bind(status)
        .bind(now)
        .bind(run)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0
            && let Some(alert) = &alert
        {
            insert_alert(&mut tx, now, alert, None).await?;
        }
        tx.commit().await?;
        if n > 0
            && let Some(alert) = &alert
        {
            crate::circuit::trace_alert(alert);
        }
        Ok(n > 0)
    }

    async fn alerts(&self, limit: i64) -> Result<Vec<AlertRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            alert_columns!(),
            " FROM alerts ORDER BY id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(alert_row).collect())
    }

    async fn claim_alert_deliveries(
        &self,
        since: i64,
        retry_ms: i64,
        max_attempts: i64,
        limit: i64,
    ) -> Result<Vec<AlertRow>> {
        let now = now_ms();
        let rows = sqlx::query(concat!(
            "UPDATE alerts SET delivery_attempts = delivery_attempts + 1,
                 next_delivery_at = $1 + LEAST(600000, $2::bigint << LEAST(delivery_attempts, 20)::int)
             WHERE id IN (SELECT id FROM alerts WHERE delivered_at IS NULL AND at >= $3
                              AND delivery_attempts < $4 AND coalesce(next_delivery_at, 0) <= $1
                          ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            alert_columns!()
        ))
        .bind(now)
        .bind(retry_ms)
        .bind(since)
        .bind(max_attempts)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<AlertRow> = rows.iter().map(alert_row).collect();
        out.sort_by_key(|a| a.id);
        Ok(out)
    }

    async fn record_alert_delivery(
        &self,
        id: i64,
        outcome: std::result::Result<(), String>,
    ) -> Result<()> {
        let (delivered, error) = match outcome {
            Ok(()) => (Some(now_ms()), None),
            Err(e) => (None, Some(e)),
        };
        sqlx::query("UPDATE alerts SET delivered_at = $1, delivery_error = $2 WHERE id = $3")
            .bind(delivered)
            .bind(error)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn schedule_tick(&self, name: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT last_tick FROM schedules WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn advance_schedule(&self, name: &str, previous: Option<i64>, tick: i64) -> Result<bool> {
        let n = match previous {
            None => sqlx::query(
                "INSERT INTO schedules (name, last_tick, updated_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(tick)
            .bind(now_ms())
            .execute(&self.pool)
            .await?,
            Some(p) => sqlx::query(
                "UPDATE schedules SET last_tick = $1, updated_at = $2 WHERE name = $3 AND last_tick = $4",
            )
            .bind(tick)
            .bind(now_ms())
            .bind(name)
            .bind(p)
            .execute(&self.pool)
            .await?,
        };
        Ok(n.rows_affected() > 0)
    }

    async fn journal_len(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM journal")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn circuits(&self) -> Result<Vec<CircuitRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            circuit_columns!(),
            " FROM circuits ORDER BY subject"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(circuit_from).collect())
    }

    async fn retire(
        &self,
        workflow: WorkflowId,
        epoch: Option<i64>,
        status: &str,
        alert: &NewAlert,
    ) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE workflows SET status = $1, terminal = 1, lease_owner = NULL, lease_until = NULL,
                 wake_at = NULL, updated_at = $2
             WHERE id = $3 AND terminal = 0
               AND (($4::bigint IS NOT NULL AND lease_epoch = $4) OR ($4::bigint IS NULL AND coalesce(lease_until, 0) < $2))",
        )
        .bind(status)
        .bind(now)
        .bind(workflow)
        .bind(epoch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            insert_alert(&mut tx, now, alert, Some((workflow, -1))).await?;
        }
        tx.commit().await?;
        if n > 0 {
            crate::circuit::trace_alert(alert);
        }
        Ok(n > 0)
    }

    async fn hold(&self, subject: &str, reason: &str, by: &str) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let was: bool = sqlx::query_scalar("SELECT count(*) > 0 FROM holds WHERE subject = $1")
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO holds (subject, reason, held_by, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (subject) DO UPDATE SET reason = excluded.reason, held_by = excluded.held_by",
        )
        .bind(subject)
        .bind(reason)
        .bind(by)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let alert = crate::hold::held_alert(subject, reason, by);
        insert_alert(&mut tx, now, &alert, None).await?;
        tx.commit().await?;
        crate::circuit::trace_alert(&alert);
        Ok(!was)
    }

    async fn lift_hold(&self, subject: &str, by: &str) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM holds WHERE subject = $1")
            .bind(subject)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let alert = crate::hold::lifted_alert(subject, by);
        if n > 0 {
            insert_alert(&mut tx, now, &alert, None).await?;
        }
        tx.commit().await?;
        if n > 0 {
            crate::circuit::trace_alert(&alert);
        }
        Ok(n > 0)
    }

    async fn holds(&self) -> Result<Vec<HoldRow>> {
        let rows =
            sqlx::query("SELECT subject, reason, held_by, created_at FROM holds ORDER BY subject")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| HoldRow {
                subject: r.get(0),
                reason: r.get(1),
                by: r.get(2),
                since: r.get(3),
            })
            .collect())
    }

    async fn reset_circuit(&self, subject: &str, by: &str) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE circuits SET state = 'closed', opens = 0, failures = 0, retry_at = $1 WHERE subject = $2 AND state = 'open'",
        )
        .bind(now)
        .bind(subject)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let alert = crate::circuit::closed_alert(subject, by);
        if n > 0 {
            insert_alert(&mut tx, now, &alert, None).await?;
        }
        tx.commit().await?;
        if n > 0 {
            crate::circuit::trace_alert(&alert);
        }
        Ok(n > 0)
    }
}

fn alert_row(r: &sqlx::postgres::PgRow) -> AlertRow {
    AlertRow {
        id: r.get(0),
        at: r.get(1),
        kind: r.get(2),
        level: AlertLevel::parse(r.get(3)),
        subject: r.get(4),
        workflow: r.get(5),
        message: r.get(6),
        delivered_at: r.get(7),
        delivery_attempts: r.get(8),
        delivery_error: r.get(9),
    }
}

fn circuit_from(r: &sqlx::postgres::PgRow) -> CircuitRow {
    CircuitRow {
        subject: r.get(0),
        open: r.get::<String, _>(1) == "open",
        failures: r.get::<i64, _>(2).max(0) as u32,
        opens: r.get::<i64, _>(3).max(0) as u32,
        opened_at: r.get(4),
        retry_at: r.get(5),
        reason: r.get(6),
    }
}

/// Record an alert (raised by the transition `at`, if any) inside an open transaction.
async fn insert_alert(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    now: i64,
    alert: &NewAlert,
    at: Option<(WorkflowId, i64)>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO alerts (at, kind, level, subject, workflow_id, seq, message) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (workflow_id, seq, kind) DO NOTHING",
    )
    .bind(now)
    .bind(&alert.kind)
    .bind(alert.level.as_str())
    .bind(&alert.subject)
    .bind(at.map(|a| a.0))
    .bind(at.map(|a| a.1))
    .bind(&alert.message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Insert workflows (and their journal row 0) inside an open transaction.
async fn insert_workflows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    run: RunId,
    workflows: &[NewWorkflow],
) -> Result<Vec<WorkflowId>> {
    let now = now_ms();
    let kinds: Vec<&str> = workflows.iter().map(|w| w.kind.as_str()).collect();
    let subjects: Vec<&str> = workflows.iter().map(|w| w.subject.as_str()).collect();
    let statuses: Vec<&str> = workflows.iter().map(|w| w.status.as_str()).collect();
    let versions: Vec<i64> = workflows.iter().map(|w| i64::from(w.version)).collect();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO workflows (run_id, kind, subject, status, seq, created_at, updated_at, version)
         SELECT $1, k, s, st, 0, $5, $5, v FROM unnest($2::text[], $3::text[], $4::text[], $6::bigint[]) WITH ORDINALITY AS t(k, s, st, v, n)
         ORDER BY n RETURNING id",
    )
    .bind(run)
    .bind(&kinds)
    .bind(&subjects)
    .bind(&statuses)
    .bind(now)
    .bind(&versions)
    .fetch_all(&mut **tx)
    .await?;
    let mut ids = ids;
    ids.sort_unstable();
    let inputs: Vec<&str> = workflows.iter().map(|w| w.input_json.as_str()).collect();
    let states: Vec<&str> = workflows.iter().map(|w| w.state_json.as_str()).collect();
    sqlx::query("INSERT INTO workflow_inputs (workflow_id, input_json) SELECT * FROM unnest($1::bigint[], $2::text[])")
        .bind(&ids)
        .bind(&inputs)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO journal (workflow_id, seq, at, worker, epoch, event_json, state_json)
         SELECT id, 0, $3, 'create', 0, NULL, st FROM unnest($1::bigint[], $2::text[]) AS t(id, st)",
    )
    .bind(&ids)
    .bind(&states)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(ids)
}

/// Run `attempt` again (up to 5 times, after a short jittered pause) when PostgreSQL
/// aborted it as a deadlock victim or a serialization failure: the transaction was rolled
/// back whole, so running it again is safe.
async fn retry_deadlocks<T, F, Fut>(what: &str, attempt: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0u32;
    loop {
        match attempt().await {
            Err(EngineError::Db(e)) if tries < 5 && is_retryable(&e) => {
                tries += 1;
                tracing::warn!(error = %e, attempt = tries, "{what} was aborted by the database; running it again");
                let jitter = u64::from(std::process::id() % 7) + u64::from(tries) * 5;
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            other => return other,
        }
    }
}

/// Deadlock victim (40P01) or serialization failure (40001).
fn is_retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}
