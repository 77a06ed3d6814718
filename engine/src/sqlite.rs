//! The embedded SQLite store (WAL, `synchronous=FULL`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::circuit::{CircuitChange, CircuitRow};
use crate::error::{EngineError, Result};
use crate::store::*;

/// `PRAGMA application_id` of a Bulwark database ("BULW").
pub const APPLICATION_ID: i64 = 0x4255_4C57;

/// Rows per multi-row statement (keeps bound parameters well under SQLite's limit).
const CHUNK: usize = 500;

/// The SQLite implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
}

/// Holds the exclusive worker lock on a SQLite database while alive.
#[derive(Debug)]
pub struct WorkerLock {
    _file: File,
}

/// The primary SQLite result code of a database error, if it is one.
fn sqlite_code(e: &sqlx::Error) -> Option<i64> {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i64>().ok())
            .map(|c| c & 0xff),
        _ => None,
    }
}

/// Does `dir` accept a new file? (`Err` with the OS error if not.)
fn dir_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".bulwark-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"probe")?;
    std::fs::remove_file(&probe)
}

/// Name the real cause of a failure to open or write `path`: a full disk, a file or
/// directory this process cannot write; else `fallback` (e.g. not a Bulwark database).
fn classify(
    path: &Path,
    e: sqlx::Error,
    fallback: impl FnOnce(sqlx::Error) -> EngineError,
) -> EngineError {
    let shown = path.display().to_string();
    let detail = e.to_string();
    match sqlite_code(&e) {
        Some(13) => {
            return EngineError::DiskFull {
                path: shown,
                detail,
            };
        }
        // Read-only, I/O errors and files that cannot be opened: ask the filesystem why
        // (a read-only connection that SQLite had to write to is not a read-only file).
        Some(8 | 10 | 14) | None => {
            let file = std::fs::OpenOptions::new().append(true).open(path);
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let why = match file {
                Err(err) => Some(err),
                Ok(_) => dir_writable(dir).err(),
            };
            if let Some(err) = why {
                if err.raw_os_error() == Some(28) {
                    return EngineError::DiskFull {
                        path: shown,
                        detail: format!("{err}; SQLite said: {detail}"),
                    };
                }
                if err.kind() == std::io::ErrorKind::PermissionDenied
                    || err.raw_os_error() == Some(30)
                {
                    return EngineError::ReadOnly {
                        path: shown,
                        detail: format!("{err}; SQLite said: {detail}"),
                    };
                }
            }
        }
        _ => {}
    }
    fallback(e)
}

impl SqliteStore {
    /// Open an existing Bulwark database for reading only: nothing is created, migrated or
    /// written, so it works on a read-only file, a read-only directory, or a full disk.
    /// The schema must be current (a database not yet migrated by this Bulwark is
    /// refused, naming the fix).
    pub async fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        if !path.exists() {
            return Err(EngineError::Other(format!("{shown}: no such database")));
        }
        let base = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .read_only(true)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(false);
        // Without a writable directory (or with a full disk) SQLite cannot make the WAL
        // index it needs; a database with no pending WAL can then be read as immutable.
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let wal_empty = std::fs::metadata(&wal).map_or(true, |m| m.len() == 0);
        let options = match SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(base.clone())
            .await
        {
            Ok(pool) => match sqlx::query_scalar::<_, i64>("PRAGMA application_id")
                .fetch_one(&pool)
                .await
            {
                Ok(_) => {
                    pool.close().await;
                    base
                }
                Err(_) if wal_empty => {
                    pool.close().await;
                    base.immutable(true)
                }
                Err(e) => return Err(classify(&path, e, EngineError::Db)),
            },
            Err(_) if wal_empty => base.immutable(true),
            Err(e) => return Err(classify(&path, e, EngineError::Db)),
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|e| classify(&path, e, EngineError::Db))?;
        let app_id: i64 = sqlx::query_scalar("PRAGMA application_id")
            .fetch_one(&pool)
            .await
            .map_err(|e| classify(&path, e, EngineError::Db))?;
        if app_id != APPLICATION_ID {
            return Err(EngineError::NotBulwark {
                path: shown,
                detail: format!("application_id is {app_id:#x}"),
            });
        }
        let migrator = sqlx::migrate!("../migrations/sqlite");
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        let found: i64 = sqlx::query_scalar(
            "SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success",
        )
        .fetch_one(&pool)
        .await?;
        if found < known {
            return Err(EngineError::Other(format!(
                "{shown} has schema version {found}; this Bulwark reads version {known}: open it once with write access to migrate it"
            )));
        }
        if found > known {
            return Err(EngineError::SchemaTooNew {
                url: shown,
                found,
                known,
            });
        }
        Ok(Self { pool, path })
    }

    /// Open (creating if missing) a Bulwark database, refusing files that are not ours,
    /// and apply pending migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let exists = path.exists()
            && std::fs::metadata(&path)
                .map(|m| m.len() > 0)
                .unwrap_or(false);
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(false)
            .pragma("cache_size", "-65536")
            .pragma("wal_autocheckpoint", "10000");
        if exists {
            // Look before touching: a foreign file must not be migrated or modified.
            let mut conn = sqlx::SqliteConnection::connect_with(
                &options
                    .clone()
                    .read_only(true)
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await
            .map_err(|e| {
                classify(&path, e, |e| EngineError::NotBulwark {
                    path: shown.clone(),
                    detail: format!("cannot read it as SQLite: {e}"),
                })
            })?;
            let app_id: i64 = sqlx::query_scalar("PRAGMA application_id")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| {
                    classify(&path, e, |e| EngineError::NotBulwark {
                        path: shown.clone(),
                        detail: format!("cannot read it as SQLite: {e}"),
                    })
                })?;
            let tables: i64 =
                sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
                    .fetch_one(&mut conn)
                    .await?;
            conn.close().await.ok();
            if app_id != APPLICATION_ID && !(app_id == 0 && tables == 0) {
                return Err(EngineError::NotBulwark {
                    path: shown,
                    detail: format!("application_id is {app_id:#x}, {tables} table(s)"),
                });
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| classify(&path, e, EngineError::Db))?;
        sqlx::query(AssertSqlSafe(format!(
            "PRAGMA application_id = {APPLICATION_ID}"
        )))
        .execute(&pool)
        .await
        .map_err(|e| classify(&path, e, EngineError::Db))?;
        match crate::migrate_checked(sqlx::migrate!("../migrations/sqlite"), &pool, &shown).await {
            Err(EngineError::Migrate(sqlx::migrate::MigrateError::Execute(e))) => {
                return Err(classify(&path, e, |e| {
                    EngineError::Migrate(sqlx::migrate::MigrateError::Execute(e))
                }));
            }
            other => other?,
        }
        Ok(Self { pool, path })
    }

    /// The connection pool (for domain crates that keep their own tables here).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Take the exclusive worker lock: one process at a time claims and runs workflows of
    /// an embedded database. Read-only commands (status, audit) need no lock.
    pub fn lock_for_work(&self) -> Result<WorkerLock> {
        let lock = PathBuf::from(format!("{}.worker-lock", self.path.display()));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|e| {
                EngineError::Other(format!("cannot create lock file {}: {e}", lock.display()))
            })?;
        match file.try_lock() {
            Ok(()) => Ok(WorkerLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(EngineError::Locked {
                path: self.path.display().to_string(),
                lock: lock.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(EngineError::Other(format!(
                "cannot lock {}: {e}",
                lock.display()
            ))),
        }
    }

    /// Close the pool (checkpointing the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn placeholders(rows: usize, cols: usize) -> String {
    let one = format!("({})", vec!["?"; cols].join(","));
    vec![one; rows].join(",")
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_run(&self, kind: &str, params_json: &str) -> Result<RunId> {
        let id = sqlx::query_scalar(
            "INSERT INTO runs (kind, status, params_json, created_at) VALUES (?, 'running', ?, ?) RETURNING id",
        )
        .bind(kind)
        .bind(params_json)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    async fn create_workflows(
        &self,
        run: RunId,
        workflows: &[NewWorkflow],
    ) -> Result<Vec<WorkflowId>> {
        let mut tx = self.pool.begin().await?;
        let ids = insert_workflows(&mut tx, run, workflows).await?;
        tx.commit().await?;

        Ok(ids)
    }

    async fn start_run(
        &self,
        kind: &str,
        params_json: &str,
        workflows: &[NewWorkflow],
    ) -> Result<(RunId, Vec<WorkflowId>)> {
        let mut tx = self.pool.begin().await?;
        let run: RunId = sqlx::query_scalar("INSERT INTO runs (kind, status, params_json, created_at) VALUES (?, 'running', ?, ?) RETURNING id")
            .bind(kind)
            .bind(params_json)
            .bind(now_ms())
            .fetch_one(&mut *tx)
            .await?;
        let ids = insert_workflows(&mut tx, run, workflows).await?;
        tx.commit().await?;

        Ok((run, ids))
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedWorkflow>> {
        // An embedded database is worked on by one process at a time (see
        // `lock_for_work`), so every lease found here belonged to a process that died:
        // claim regardless of `lease_until` — except this worker's own live leases: a
        // long-running worker claims again as room frees up, and must not fence itself.
        let (owner, kind, run) = (&request.owner, &request.kind, request.run);
        let now = now_ms();
        let limit = request.limit.map(|l| l as i64).unwrap_or(-1);
        let lease_ms = request.lease_ms;
        let skip = serde_json::to_string(&request.skip).expect("ids serialise");
        // Who held them (RETURNING sees only the new values) is read first, so the
        // transaction takes the write lock at BEGIN: a deferred one that reads, then writes
        // after another connection of this process committed (a run enqueued, a heartbeat)
        // fails with SQLITE_BUSY_SNAPSHOT, which the busy timeout does not wait out.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let previous: std::collections::HashMap<i64, String> = sqlx::query(
            "SELECT id, lease_owner FROM workflows WHERE terminal = 0 AND kind = ? AND (? IS NULL OR run_id = ?)
                 AND lease_owner IS NOT NULL AND lease_owner IS NOT ?
                 AND id NOT IN (SELECT value FROM json_each(?))
                 AND (? OR subject NOT IN (SELECT subject FROM holds))",
        )
        .bind(kind)
        .bind(run)
        .bind(run)
        .bind(owner)
        .bind(&skip)
        .bind(request.held)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        let rows = sqlx::query(
            "UPDATE workflows SET lease_owner = ?, lease_epoch = lease_epoch + 1, lease_until = ?
             WHERE id IN (SELECT id FROM workflows WHERE terminal = 0 AND kind = ? AND (? IS NULL OR run_id = ?)
                              AND (lease_owner IS NOT ? OR lease_until < ?)
                              AND id NOT IN (SELECT value FROM json_each(?))
                              AND (? OR subject NOT IN (SELECT subject FROM holds))
                          ORDER BY id LIMIT ?)
             RETURNING id, run_id, subject, seq, lease_epoch, version",
        )
        .bind(owner)
        .bind(now + lease_ms)
        .bind(kind)
        .bind(run)
        .bind(run)
        .bind(owner)
        .bind(now)
        .bind(&skip)
        .bind(request.held)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let inputs: std::collections::HashMap<i64, (String, String)> = sqlx::query(
            "SELECT i.workflow_id, i.input_json, j.state_json
             FROM workflow_inputs i JOIN workflows w ON w.id = i.workflow_id
             JOIN journal j ON j.workflow_id = w.id AND j.seq = w.seq
             WHERE w.terminal = 0 AND w.kind = ? AND w.lease_owner = ? AND (? IS NULL OR w.run_id = ?)",
        )
        .bind(kind)
        .bind(owner)
        .bind(run)
        .bind(run)
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
                let (input_json, state_json) = inputs.get(&id).cloned().unwrap_or_default();
                ClaimedWorkflow {
                    id,
                    run_id: r.get(1),
                    subject: r.get(2),
                    input_json,
                    state_json,
                    seq: r.get(3),
                    epoch: r.get(4),
                    version: u32::try_from(r.get::<i64, _>(5)).unwrap_or(u32::MAX),
                    previous_owner: previous.get(&id).cloned(),
                }
            })
            .collect();
        out.sort_by_key(|w| w.id);
        Ok(out)
    }

    async fn holds_lease(&self, workflow: WorkflowId, owner: &str, epoch: i64) -> Result<bool> {
        // One process holds the database: a lease that ran out is still this one's
        // until this process claims it again.
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workflows WHERE id = ? AND lease_owner = ? AND lease_epoch = ?",
        )
        .bind(workflow)
        .bind(owner)
        .bind(epoch)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    async fn renew(
        &self,
        owner: &str,
        held: &[(WorkflowId, i64)],
        lease_ms: i64,
    ) -> Result<Vec<WorkflowId>> {
        let until = now_ms() + lease_ms;
        let mut renewed = Vec::with_capacity(held.len());
        let mut tx = self.pool.begin().await?;
        for chunk in held.chunks(CHUNK) {
            let sql = format!(
                "UPDATE workflows SET lease_until = {until} FROM (VALUES {}) AS v
                 WHERE workflows.id = v.column1 AND workflows.lease_epoch = v.column2 AND workflows.lease_owner = ?
                 RETURNING workflows.id",
                placeholders(chunk.len(), 2)
            );
            let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
            for (id, epoch) in chunk {
                q = q.bind(id).bind(epoch);
            }
            renewed.extend(q.bind(owner).fetch_all(&mut *tx).await?);
        }
        tx.commit().await?;
        Ok(renewed)
    }

    async fn release(&self, owner: &str, held: &[(WorkflowId, i64)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in held.chunks(CHUNK) {
            let sql = format!(
                "UPDATE workflows SET lease_owner = NULL, lease_until = NULL FROM (VALUES {}) AS v
                 WHERE workflows.id = v.column1 AND workflows.lease_epoch = v.column2 AND workflows.lease_owner = ?",
                placeholders(chunk.len(), 2)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (id, epoch) in chunk {
                q = q.bind(id).bind(epoch);
            }
            q.bind(owner).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn append_batch(&self, appends: &[Append]) -> Result<Vec<AppendOutcome>> {
        let now = now_ms();
        let mut outcomes = vec![AppendOutcome::Fenced; appends.len()];
        let mut raised: Vec<NewAlert> = Vec::new();
        let mut tx = self.pool.begin().await?;
        for (base, chunk) in appends
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| (i * CHUNK, c))
        {
            // Move each workflow row from seq-1 to seq, guarded by its epoch; the rows that
            // moved come back and only their journal rows are written.
            let sql = format!(
                "UPDATE workflows SET seq = v.column2, status = v.column4,
                        terminal = v.column5, wake_at = v.column6, updated_at = {now}
                 FROM (VALUES {}) AS v
                 WHERE workflows.id = v.column1 AND workflows.seq = v.column2 - 1 AND workflows.lease_epoch = v.column3
                 RETURNING workflows.id",
                placeholders(chunk.len(), 6)
            );
            let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
            for a in chunk {
                q = q
                    .bind(a.workflow)
                    .bind(a.seq)
                    .bind(a.epoch)
                    .bind(a.status)
                    .bind(a.terminal)
                    .bind(a.wake_at);
            }
            let moved: std::collections::HashSet<i64> =
                q.fetch_all(&mut *tx).await?.into_iter().collect();
            let landed: Vec<(usize, &Append)> = chunk
                .iter()
                .enumerate()
                .filter(|(_, a)| moved.contains(&a.workflow))
                .collect();
            if landed.is_empty() {
                continue;
            }
            let sql = format!(
                "INSERT INTO journal (workflow_id, seq, at, worker, epoch, event_json, state_json) VALUES {}",
                placeholders(landed.len(), 7)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (_, a) in &landed {
                q = q
                    .bind(a.workflow)
                    .bind(a.seq)
                    .bind(now)
                    .bind(&*a.worker)
                    .bind(a.epoch)
                    .bind(&a.event_json)
                    .bind(&a.state_json);
            }
            q.execute(&mut *tx).await?;
            let mut closes: Vec<&Append> = Vec::new();
            for (i, a) in &landed {
                outcomes[base + i] = AppendOutcome::Committed;
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
                        let previous = circuit_row(&mut tx, subject).await?;
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
                             VALUES (?, 'open', ?, ?, ?, ?, ?)
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
                        change: CircuitChange::Close,
                        ..
                    }) => closes.push(a),
                    None => {}
                }
            }
            // Successes close open circuits; almost always none is open, so one statement
            // finds the few that are.
            if !closes.is_empty() {
                let sql = format!(
                    "UPDATE circuits SET state = 'closed', opens = 0, failures = 0
                     WHERE state = 'open' AND subject IN ({}) RETURNING subject",
                    vec!["?"; closes.len()].join(",")
                );
                let mut q = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql));
                for a in &closes {
                    q = q.bind(a.circuit.as_ref().map(|c| c.subject.as_str()));
                }
                for subject in q.fetch_all(&mut *tx).await? {
                    let a = closes
                        .iter()
                        .find(|a| a.circuit.as_ref().is_some_and(|c| c.subject == subject))
                        .expect("a closed subject was asked for");
                    let alert =
                        crate::circuit::closed_alert(&subject, "a probe batch was verified");
                    insert_alert(&mut tx, now, &alert, Some((a.workflow, a.seq))).await?;
                    raised.push(alert);
                }
            }
        }
        tx.commit().await?;
        raised.iter().for_each(crate::circuit::trace_alert);
        Ok(outcomes)
    }

    async fn journal(&self, workflow: WorkflowId) -> Result<Vec<JournalRow>> {
        self.journal_range(workflow, workflow + 1).await
    }

    async fn journal_range(&self, from: WorkflowId, to: WorkflowId) -> Result<Vec<JournalRow>> {
        let rows = sqlx::query(
            "SELECT workflow_id, seq, at, worker, epoch, event_json, state_json FROM journal
             WHERE workflow_id >= ? AND workflow_id < ? ORDER BY workflow_id, seq",
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
             WHERE (? IS NULL OR w.run_id = ?) AND (? IS NULL OR w.kind = ?) ORDER BY w.id",
        )
        .bind(run)
        .bind(run)
        .bind(kind)
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
            "INSERT INTO workers (worker, started_at, last_beat, lease_ms) VALUES (?1, ?2, ?2, ?3)
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
                    (SELECT count(*) FROM workflows f WHERE NOT f.terminal AND f.lease_owner = w.worker AND f.lease_until >= ?),
                    (SELECT count(*) FROM workflows f WHERE NOT f.terminal AND f.lease_owner = w.worker AND f.lease_until < ?)
             FROM workers w WHERE w.last_beat > ? - 86400000 ORDER BY w.last_beat DESC, w.worker",
        )
        .bind(now)
        .bind(now).bind(now)
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
            "SELECT DISTINCT subject FROM workflows WHERE terminal = 0 AND kind = ?",
        )
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn status_counts(&self, run: Option<RunId>) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT status, count(*) FROM workflows WHERE (? IS NULL OR run_id = ?) GROUP BY status ORDER BY status",
        )
        .bind(run)
        .bind(run)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn finish_run(&self, run: RunId, status: &str, alert: Option<NewAlert>) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE runs SET status = ?, finished_at = coalesce(finished_at, ?) WHERE id = ? AND status = 'running'",
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
            " FROM alerts ORDER BY id DESC LIMIT ?"
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
                 next_delivery_at = ? + min(600000, ? << min(delivery_attempts, 20))
             WHERE id IN (SELECT id FROM alerts WHERE delivered_at IS NULL AND at >= ?
                              AND delivery_attempts < ? AND coalesce(next_delivery_at, 0) <= ?
                          ORDER BY id LIMIT ?)
             RETURNING ",
            alert_columns!()
        ))
        .bind(now)
        .bind(retry_ms)
        .bind(since)
        .bind(max_attempts)
        .bind(now)
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
        sqlx::query("UPDATE alerts SET delivered_at = ?, delivery_error = ? WHERE id = ?")
            .bind(delivered)
            .bind(error)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn schedule_tick(&self, name: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT last_tick FROM schedules WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn advance_schedule(&self, name: &str, previous: Option<i64>, tick: i64) -> Result<bool> {
        let n = match previous {
            None => sqlx::query(
                "INSERT INTO schedules (name, last_tick, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(tick)
            .bind(now_ms())
            .execute(&self.pool)
            .await?,
            Some(p) => sqlx::query(
                "UPDATE schedules SET last_tick = ?, updated_at = ? WHERE name = ? AND last_tick = ?",
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
            "UPDATE workflows SET status = ?, terminal = 1, lease_owner = NULL, lease_until = NULL,
                 wake_at = NULL, updated_at = ?
             WHERE id = ? AND terminal = 0
               AND ((? IS NOT NULL AND lease_epoch = ?) OR (? IS NULL AND coalesce(lease_until, 0) < ?))",
        )
        .bind(status)
        .bind(now)
        .bind(workflow)
        .bind(epoch)
        .bind(epoch)
        .bind(epoch)
        .bind(now)
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
        let was: bool = sqlx::query_scalar("SELECT count(*) > 0 FROM holds WHERE subject = ?")
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO holds (subject, reason, held_by, created_at) VALUES (?, ?, ?, ?)
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
        let n = sqlx::query("DELETE FROM holds WHERE subject = ?")
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
            "UPDATE circuits SET state = 'closed', opens = 0, failures = 0, retry_at = ? WHERE subject = ? AND state = 'open'",
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

fn alert_row(r: &sqlx::sqlite::SqliteRow) -> AlertRow {
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

fn circuit_from(r: &sqlx::sqlite::SqliteRow) -> CircuitRow {
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

async fn circuit_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    subject: &str,
) -> Result<Option<CircuitRow>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        circuit_columns!(),
        " FROM circuits WHERE subject = ?"
    ))
    .bind(subject)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.as_ref().map(circuit_from))
}

/// Record an alert (raised by the transition `at`, if any) inside an open transaction.
async fn insert_alert(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    now: i64,
    alert: &NewAlert,
    at: Option<(WorkflowId, i64)>,
) -> Result<()> {
    sqlx::query(
        "INSERT OR IGNORE INTO alerts (at, kind, level, subject, workflow_id, seq, message) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    run: RunId,
    workflows: &[NewWorkflow],
) -> Result<Vec<WorkflowId>> {
    let now = now_ms();
    let mut ids = Vec::with_capacity(workflows.len());
    for chunk in workflows.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO workflows (run_id, kind, subject, status, seq, created_at, updated_at, version) VALUES {} RETURNING id",
            placeholders(chunk.len(), 8)
        );
        let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
        for w in chunk {
            q = q
                .bind(run)
                .bind(&w.kind)
                .bind(&w.subject)
                .bind(w.status.as_str())
                .bind(0i64)
                .bind(now)
                .bind(now)
                .bind(i64::from(w.version));
        }
        let mut got = q.fetch_all(&mut **tx).await?;
        got.sort_unstable();
        let sql = format!(
            "INSERT INTO journal (workflow_id, seq, at, worker, epoch, event_json, state_json) VALUES {}",
            placeholders(chunk.len(), 7)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (id, w) in got.iter().zip(chunk) {
            q = q
                .bind(id)
                .bind(0i64)
                .bind(now)
                .bind("create")
                .bind(0i64)
                .bind(None::<String>)
                .bind(&w.state_json);
        }
        q.execute(&mut **tx).await?;
        // Inputs live apart from the hot workflow row, which every transition rewrites.
        let sql = format!(
            "INSERT INTO workflow_inputs (workflow_id, input_json) VALUES {}",
            placeholders(chunk.len(), 2)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (id, w) in got.iter().zip(chunk) {
            q = q.bind(id).bind(&w.input_json);
        }
        q.execute(&mut **tx).await?;
        ids.extend(got);
    }
    Ok(ids)
}
