//! Bulwark's staging schema: sealed, immutable snapshots of the legacy catalog, and what
//! each endpoint last confirmed. Sync work reads only from here, never from the source.

use std::collections::HashMap;

use bulwark_engine::Backend;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Row};

use crate::catalog::{Item, PriceTier};
use crate::error::{Result, SyncError};

/// A snapshot's bookkeeping row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotRow {
    /// Snapshot id.
    pub id: i64,
    /// Source description.
    pub source: String,
    /// `filling`, `sealed`, `held` (sealed, awaiting approval) or `aborted`.
    pub status: String,
    /// Rows read from the source.
    pub rows_read: i64,
    /// Rows accepted into staging.
    pub rows_accepted: i64,
    /// Rows rejected (see `snapshot_rejects`).
    pub rows_rejected: i64,
    /// Queries sent to the source.
    pub queries: i64,
    /// Content hash of the sealed items.
    pub content_hash: Option<String>,
    /// Start time (ms).
    pub started_at: i64,
    /// Seal time (ms).
    pub sealed_at: Option<i64>,
}

/// Counters recorded when sealing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SealStats {
    /// Rows read from the source.
    pub rows_read: i64,
    /// Rows rejected.
    pub rows_rejected: i64,
    /// Queries sent to the source.
    pub queries: i64,
}

/// A source row a snapshot rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reject {
    /// The row's key (an excerpt when the key is oversized).
    pub key: String,
    /// Its SKU, when it had a readable one: that SKU keeps its last accepted value.
    pub sku: Option<String>,
    /// Why it was rejected.
    pub reason: String,
}

/// How much a snapshot changes against the previous sealed one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeCounts {
    /// SKUs in the previous snapshot.
    pub base: i64,
    /// SKUs gone (in the previous snapshot, not in this one).
    pub removed: i64,
    /// SKUs whose stock drops to 0 from above 0.
    pub zeroed: i64,
    /// SKUs present in both whose values differ (the zeroed ones included).
    pub changed: i64,
}

impl ChangeCounts {
    /// Count the change from `before` to `after` (both sorted by SKU).
    pub fn between(before: &[Item], after: &[Item]) -> Self {
        let mut c = ChangeCounts {
            base: before.len() as i64,
            ..Default::default()
        };
        let (mut i, mut j) = (0, 0);
        while i < before.len() {
            match after.get(j) {
                Some(a) if a.sku < before[i].sku => j += 1,
                Some(a) if a.sku == before[i].sku => {
                    if a != &before[i] {
                        c.changed += 1;
                        if a.qty == 0 && before[i].qty > 0 {
                            c.zeroed += 1;
                        }
                    }
                    i += 1;
                    j += 1;
                }
                _ => {
                    c.removed += 1;
                    i += 1;
                }
            }
        }
        c
    }
}

/// The mass-change guard: shares of the previous snapshot's SKUs above which a new
/// snapshot is held for an operator instead of syncing (a broken export must not empty
/// thousands of shops).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChangeGuard {
    /// Removed plus zeroed SKUs, as a share of the previous snapshot's (default 0.05).
    pub max_removed_share: f64,
    /// Changed SKUs, as a share of the previous snapshot's (default 0.5).
    pub max_changed_share: f64,
}

impl Default for ChangeGuard {
    fn default() -> Self {
        Self {
            max_removed_share: 0.05,
            max_changed_share: 0.5,
        }
    }
}

impl ChangeGuard {
    /// Why a snapshot with `change` must be held, if it must.
    pub fn verdict(&self, change: &ChangeCounts) -> Option<String> {
        if change.base == 0 {
            return None;
        }
        let base = change.base as f64;
        let gone = change.removed + change.zeroed;
        let share = |n: i64| n as f64 / base;
        if share(gone) > self.max_removed_share {
            return Some(format!(
                "{} of {} SKUs would be removed ({}) or drop to stock 0 ({}): {:.1}% > max_removed_share {:.1}%",
                gone,
                change.base,
                change.removed,
                change.zeroed,
                share(gone) * 100.0,
                self.max_removed_share * 100.0
            ));
        }
        if share(change.changed) > self.max_changed_share {
            return Some(format!(
                "{} of {} SKUs would change: {:.1}% > max_changed_share {:.1}%",
                change.changed,
                change.base,
                share(change.changed) * 100.0,
                self.max_changed_share * 100.0
            ));
        }
        None
    }
}

/// What [`Staging::seal_checked`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SealOutcome {
    /// Content hash of the sealed items (carried ones included).
    pub hash: String,
    /// The previous sealed snapshot it was compared with.
    pub previous: Option<i64>,
    /// SKUs whose rejected row kept the previous value: (SKU, why the row was rejected).
    pub carried: Vec<(String, String)>,
    /// The change against `previous`.
    pub change: ChangeCounts,
    /// Why it is held, if it is.
    pub held: Option<String>,
}

/// Access to the staging tables, in Bulwark's own database (SQLite or PostgreSQL; the
/// SQL is written once with `$N` parameters, which both drivers accept).
#[derive(Debug, Clone)]
pub struct Staging {
    db: Backend,
}

/// Run the same query code on whichever pool the backend has.
macro_rules! on_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match &$db {
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

/// `$1,$2,…,$n`.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `($1,$2,…),(…)` for `rows` rows of `cols` columns.
fn numbered(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            format!(
                "({})",
                (1..=cols)
                    .map(|c| format!("${}", r * cols + c))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Staging {
    /// Staging on the given (Bulwark) database.
    pub fn new(db: Backend) -> Self {
        Self { db }
    }

    /// The database this staging lives in.
    pub fn backend(&self) -> &Backend {
        &self.db
    }

    /// Start a new snapshot.
    pub async fn begin_snapshot(&self, source: &str) -> Result<i64> {
        let now = bulwark_engine::now_ms();
        Ok(on_db!(self.db, |pool| {
            sqlx::query_scalar(
            "INSERT INTO snapshots (source, status, started_at) VALUES ($1, 'filling', $2) RETURNING id"
        )
        .bind(source)
        .bind(now)
        .fetch_one(pool)
        .await?
        }))
    }

    /// Write accepted items and rejected rows of one page, in one transaction.
    pub async fn write_page(
        &self,
        snapshot: i64,
        items: &[Item],
        rejects: &[(String, String)],
    ) -> Result<()> {
        on_db!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for chunk in items.chunks(500) {
                let sql = format!(
                    "INSERT INTO snapshot_items (snapshot_id, sku, qty, tiers_json) VALUES {}",
                    numbered(chunk.len(), 4)
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for it in chunk {
                    q = q
                        .bind(snapshot)
                        .bind(&it.sku)
                        .bind(it.qty)
                        .bind(serde_json::to_string(&it.tiers).expect("tiers serialise"));
                }
                q.execute(&mut *tx).await?;
            }
            for (key, reason) in rejects {
                sqlx::query("INSERT INTO snapshot_rejects (snapshot_id, row_key, reason) VALUES ($1, $2, $3)")
                    .bind(snapshot)
                    .bind(key)
                    .bind(reason)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The source row keys of the items of `snapshot` with these SKUs (SKU → row key).
    /// Used to tell a duplicate SKU (another row) from the same row written again.
    pub async fn item_keys(
        &self,
        snapshot: i64,
        skus: &[String],
    ) -> Result<HashMap<String, String>> {
        let mut out = HashMap::new();
        for chunk in skus.chunks(500) {
            if chunk.is_empty() {
                continue;
            }
            let params = (0..chunk.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!(
                "SELECT sku, COALESCE(row_key, sku) FROM snapshot_items WHERE snapshot_id = $1 AND sku IN ({params})"
            );
            let rows: Vec<(String, String)> = on_db!(self.db, |pool| {
                let mut q = sqlx::query_as(AssertSqlSafe(sql.clone())).bind(snapshot);
                for sku in chunk {
                    q = q.bind(sku);
                }
                q.fetch_all(pool).await?
            });
            out.extend(rows);
        }
        Ok(out)
    }

    /// Write one page idempotently, in one transaction: accepted items (with the key of the
    /// source row each came from) and rejected rows. Writing the same page twice (a page
    /// re-read after a crash) changes nothing (`ON CONFLICT DO NOTHING`, on both backends).
    pub async fn write_page_keyed(
        &self,
        snapshot: i64,
        items: &[(String, Item)],
        rejects: &[Reject],
    ) -> Result<()> {
        on_db!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for chunk in items.chunks(500) {
                let sql = format!(
                    "INSERT INTO snapshot_items (snapshot_id, sku, qty, tiers_json, row_key) VALUES {} ON CONFLICT DO NOTHING",
                    numbered(chunk.len(), 5)
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for (key, it) in chunk {
                    q = q
                        .bind(snapshot)
                        .bind(&it.sku)
                        .bind(it.qty)
                        .bind(serde_json::to_string(&it.tiers).expect("tiers serialise"))
                        .bind(key);
                }
                q.execute(&mut *tx).await?;
            }
            for r in rejects {
                sqlx::query("INSERT INTO snapshot_rejects (snapshot_id, row_key, reason, sku) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                    .bind(snapshot)
                    .bind(&r.key)
                    .bind(&r.reason)
                    .bind(&r.sku)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The rejected rows of a snapshot: (row key, reason), ordered by row key.
    pub async fn rejects(&self, snapshot: i64) -> Result<Vec<(String, String)>> {
        const SQL: &str = "SELECT row_key, reason FROM snapshot_rejects WHERE snapshot_id = $1";
        let mut rows: Vec<(String, String)> = on_db!(self.db, |pool| sqlx::query_as(SQL)
            .bind(snapshot)
            .fetch_all(pool)
            .await?);
        rows.sort();
        Ok(rows)
    }

    /// One snapshot's bookkeeping row.
    pub async fn snapshot(&self, snapshot: i64) -> Result<Option<SnapshotRow>> {
        Ok(self
            .snapshots()
            .await?
            .into_iter()
            .find(|s| s.id == snapshot))
    }

    /// Seal a snapshot as it is: compute its content hash and make it visible to sync
    /// runs. Snapshots read from a source go through [`Staging::seal_checked`].
    pub async fn seal(&self, snapshot: i64, stats: SealStats) -> Result<String> {
        let items = self.items(snapshot).await?;
        self.finish_seal(snapshot, stats, &items, "sealed", None)
            .await
    }

    /// Seal `snapshot`, whose staged items are `items`, with `status`.
    async fn finish_seal(
        &self,
        snapshot: i64,
        stats: SealStats,
        items: &[Item],
        status: &str,
        held_reason: Option<&str>,
    ) -> Result<String> {
        let hash = content_hash(items);
        let now = bulwark_engine::now_ms();
        on_db!(self.db, |pool| {
            sqlx::query(
            "UPDATE snapshots SET status = $1, rows_read = $2, rows_accepted = $3, rows_rejected = $4, queries = $5,
                    content_hash = $6, sealed_at = $7, held_reason = $8 WHERE id = $9 AND status = 'filling'",
        )
        .bind(status)
        .bind(stats.rows_read)
        .bind(items.len() as i64)
        .bind(stats.rows_rejected)
        .bind(stats.queries)
        .bind(&hash)
        .bind(now)
        .bind(held_reason)
        .bind(snapshot)
        .execute(pool)
        .await
        .map(|_| ())?
        });
        Ok(hash)
    }

    /// Seal `snapshot` safely: rejected rows keep their SKU's last accepted value (the item
    /// is carried forward from the previous sealed snapshot, marked as such), then the
    /// change against that snapshot is measured and, if `guard` finds it too large, the
    /// snapshot is sealed `held` (no sync uses it until [`Staging::approve`]).
    /// Idempotent: sealing again after a crash carries nothing twice and decides the same.
    pub async fn seal_checked(
        &self,
        snapshot: i64,
        stats: SealStats,
        guard: &ChangeGuard,
    ) -> Result<SealOutcome> {
        let previous = self.previous_sealed(snapshot).await?;
        let mut carried = Vec::new();
        if let Some(prev) = previous {
            carried = self.carry_forward(snapshot, prev).await?;
        }
        let items = self.items(snapshot).await?;
        let change = match previous {
            Some(prev) => ChangeCounts::between(&self.items(prev).await?, &items),
            None => ChangeCounts::default(),
        };
        let held = guard.verdict(&change);
        let hash = self
            .finish_seal(
                snapshot,
                stats,
                &items,
                if held.is_some() { "held" } else { "sealed" },
                held.as_deref(),
            )
            .await?;
        Ok(SealOutcome {
            hash,
            previous,
            carried,
            change,
            held,
        })
    }

    /// The newest sealed snapshot older than `snapshot`.
    pub async fn previous_sealed(&self, snapshot: i64) -> Result<Option<i64>> {
        const SQL: &str = "SELECT MAX(id) FROM snapshots WHERE status = 'sealed' AND id < $1";
        let id: Option<i64> = on_db!(self.db, |pool| sqlx::query_scalar(SQL)
            .bind(snapshot)
            .fetch_one(pool)
            .await?);
        Ok(id)
    }

    /// Copy into `snapshot` the items of `from` whose SKU `snapshot` rejected and does not
    /// hold; returns every carried SKU of `snapshot` with the reason its row was rejected.
    async fn carry_forward(&self, snapshot: i64, from: i64) -> Result<Vec<(String, String)>> {
        const COPY: &str = "INSERT INTO snapshot_items (snapshot_id, sku, qty, tiers_json, row_key, carried_from)
             SELECT $1, p.sku, p.qty, p.tiers_json, p.row_key, $2 FROM snapshot_items p
             WHERE p.snapshot_id = $2
               AND EXISTS (SELECT 1 FROM snapshot_rejects r WHERE r.snapshot_id = $1 AND COALESCE(r.sku, r.row_key) = p.sku)
               AND NOT EXISTS (SELECT 1 FROM snapshot_items s WHERE s.snapshot_id = $1 AND s.sku = p.sku)
             ON CONFLICT DO NOTHING";
        const CARRIED: &str = "SELECT i.sku, MIN(r.reason) FROM snapshot_items i
             JOIN snapshot_rejects r ON r.snapshot_id = i.snapshot_id AND COALESCE(r.sku, r.row_key) = i.sku
             WHERE i.snapshot_id = $1 AND i.carried_from IS NOT NULL
             GROUP BY i.sku ORDER BY i.sku";
        let rows: Vec<(String, String)> = on_db!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(COPY)
                .bind(snapshot)
                .bind(from)
                .execute(&mut *tx)
                .await?;
            let rows = sqlx::query_as(CARRIED)
                .bind(snapshot)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            rows
        });
        Ok(rows)
    }

    /// Approve a held snapshot: it becomes sealed (and the newest sealed one, if no newer
    /// one is). False if `snapshot` is not held.
    pub async fn approve(&self, snapshot: i64) -> Result<bool> {
        const SQL: &str =
            "UPDATE snapshots SET status = 'sealed' WHERE id = $1 AND status = 'held'";
        let n = on_db!(self.db, |pool| sqlx::query(SQL)
            .bind(snapshot)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(n == 1)
    }

    /// How many items of `snapshot` were carried forward from an earlier snapshot.
    pub async fn carried_count(&self, snapshot: i64) -> Result<u32> {
        const SQL: &str = "SELECT COUNT(*) FROM snapshot_items WHERE snapshot_id = $1 AND carried_from IS NOT NULL";
        let n: i64 = on_db!(self.db, |pool| sqlx::query_scalar(SQL)
            .bind(snapshot)
            .fetch_one(pool)
            .await?);
        Ok(n as u32)
    }

    /// Why `snapshot` is held, if it is.
    pub async fn held_reason(&self, snapshot: i64) -> Result<Option<String>> {
        const SQL: &str = "SELECT held_reason FROM snapshots WHERE id = $1 AND status = 'held'";
        let r: Option<Option<String>> = on_db!(self.db, |pool| sqlx::query_scalar(SQL)
            .bind(snapshot)
            .fetch_optional(pool)
            .await?);
        Ok(r.flatten())
    }

    /// Stage `items` (already read from somewhere else, e.g. a program that embeds
    /// Bulwark and has its catalog at hand) as one new sealed snapshot; returns its id.
    pub async fn import(&self, source: &str, items: &[Item]) -> Result<i64> {
        let snapshot = self.begin_snapshot(source).await?;
        self.write_page(snapshot, items, &[]).await?;
        let stats = SealStats {
            rows_read: items.len() as i64,
            ..Default::default()
        };
        self.seal(snapshot, stats).await?;
        Ok(snapshot)
    }

    /// Abandon a snapshot (e.g. too many rejected rows); it is never synced.
    pub async fn abort(&self, snapshot: i64, stats: SealStats) -> Result<()> {
        on_db!(self.db, |pool| {
            sqlx::query(
            "UPDATE snapshots SET status = 'aborted', rows_read = $1, rows_rejected = $2, queries = $3 WHERE id = $4"
        )
        .bind(stats.rows_read)
        .bind(stats.rows_rejected)
        .bind(stats.queries)
        .bind(snapshot)
        .execute(pool)
        .await
        .map(|_| ())?
        });
        Ok(())
    }

    /// The newest sealed snapshot.
    pub async fn latest_sealed(&self) -> Result<Option<SnapshotRow>> {
        Ok(self
            .snapshots()
            .await?
            .into_iter()
            .find(|s| s.status == "sealed"))
    }

    /// All snapshots, newest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRow>> {
        const SQL: &str = "SELECT id, source, status, rows_read, rows_accepted, rows_rejected, queries, content_hash,
                                  started_at, sealed_at
                           FROM snapshots ORDER BY id DESC";
        let rows: Vec<SnapshotRow> = on_db!(self.db, |pool| sqlx::query(SQL)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| SnapshotRow {
                id: r.get(0),
                source: r.get(1),
                status: r.get(2),
                rows_read: r.get(3),
                rows_accepted: r.get(4),
                rows_rejected: r.get(5),
                queries: r.get(6),
                content_hash: r.get(7),
                started_at: r.get(8),
                sealed_at: r.get(9),
            })
            .collect());
        Ok(rows)
    }

    /// Remove staged snapshots that started before `before_ms` and that nothing needs any
    /// more; returns (snapshots, items) removed. Kept whatever their age: the newest sealed
    /// snapshot of each source (the next snapshot compares with it and carries rejected rows
    /// from it), every snapshot that is not sealed or aborted (filling, held for approval),
    /// the sealed one just before each of those, every snapshot an endpoint's state names
    /// (confirmed, unsettled, quarantined, reconciled: the base of its next diff), and the
    /// target of every run still running.
    pub async fn prune_snapshots(&self, before_ms: i64) -> Result<(u64, u64)> {
        let snapshots = self.snapshots().await?;
        let mut keep: std::collections::BTreeSet<i64> = std::collections::BTreeSet::new();
        let mut newest: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for s in &snapshots {
            if s.status == "sealed" {
                let n = newest.entry(s.source.as_str()).or_insert(s.id);
                *n = (*n).max(s.id);
            }
        }
        keep.extend(newest.values());
        for s in snapshots
            .iter()
            .filter(|s| s.status != "sealed" && s.status != "aborted")
        {
            keep.insert(s.id);
            if let Some(before) = snapshots
                .iter()
                .filter(|p| p.status == "sealed" && p.id < s.id)
                .map(|p| p.id)
                .max()
            {
                keep.insert(before);
            }
        }
        const NAMED: &str = "SELECT snapshot_id FROM endpoint_confirmed
             UNION SELECT snapshot_id FROM endpoint_unsettled
             UNION SELECT snapshot_id FROM endpoint_quarantine
             UNION SELECT snapshot_id FROM endpoint_reconcile WHERE snapshot_id IS NOT NULL";
        let named: Vec<i64> = on_db!(self.db, |pool| sqlx::query_scalar(NAMED)
            .fetch_all(pool)
            .await?);
        keep.extend(named);
        const RUNNING: &str = "SELECT params_json FROM runs WHERE status = 'running'";
        let running: Vec<String> = on_db!(self.db, |pool| sqlx::query_scalar(RUNNING)
            .fetch_all(pool)
            .await?);
        for params in running {
            let v: serde_json::Value = serde_json::from_str(&params).unwrap_or_default();
            if let Some(id) = v.get("snapshot").and_then(serde_json::Value::as_i64) {
                keep.insert(id);
            }
        }
        let (mut removed, mut items) = (0, 0);
        for s in snapshots
            .iter()
            .filter(|s| s.started_at < before_ms && !keep.contains(&s.id))
        {
            let id = s.id;
            let n = on_db!(self.db, |pool| {
                let mut tx = pool.begin().await?;
                let n = sqlx::query("DELETE FROM snapshot_items WHERE snapshot_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query("DELETE FROM snapshot_rejects WHERE snapshot_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM snapshots WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                n
            });
            removed += 1;
            items += n;
        }
        Ok((removed, items))
    }

    /// A snapshot's items, sorted by SKU (byte order, whatever the database's collation).
    pub async fn items(&self, snapshot: i64) -> Result<Vec<Item>> {
        const SQL: &str = "SELECT sku, qty, tiers_json FROM snapshot_items WHERE snapshot_id = $1";
        let raw: Vec<(String, i64, String)> = on_db!(self.db, |pool| sqlx::query_as(SQL)
            .bind(snapshot)
            .fetch_all(pool)
            .await?);
        let mut items = raw
            .into_iter()
            .map(|(sku, qty, tiers)| {
                let tiers: Vec<PriceTier> = serde_json::from_str(&tiers).map_err(|e| {
                    SyncError::Corrupt(format!(
                        "snapshot {snapshot} sku {sku}: tiers do not decode: {e}"
                    ))
                })?;
                Ok(Item { sku, qty, tiers })
            })
            .collect::<Result<Vec<_>>>()?;
        items.sort_unstable_by(|a, b| a.sku.cmp(&b.sku));
        Ok(items)
    }

    /// Is `snapshot` sealed?
    pub async fn is_sealed(&self, snapshot: i64) -> Result<bool> {
        const SQL: &str = "SELECT status FROM snapshots WHERE id = $1";
        let status: Option<String> = on_db!(self.db, |pool| sqlx::query_scalar(SQL)
            .bind(snapshot)
            .fetch_optional(pool)
            .await?);
        Ok(status.as_deref() == Some("sealed"))
    }

    /// The snapshot each endpoint last confirmed in full.
    pub async fn confirmed(&self) -> Result<HashMap<String, i64>> {
        const SQL: &str = "SELECT endpoint_id, snapshot_id FROM endpoint_confirmed";
        let rows: Vec<(String, i64)> =
            on_db!(self.db, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        Ok(rows.into_iter().collect())
    }

    /// The snapshot each endpoint last confirmed, and the mapping key it was sent under.
    pub async fn confirmed_with_mapping(&self) -> Result<HashMap<String, (i64, Option<String>)>> {
        const SQL: &str = "SELECT endpoint_id, snapshot_id, mapping_key FROM endpoint_confirmed";
        let rows: Vec<(String, i64, Option<String>)> =
            on_db!(self.db, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        Ok(rows.into_iter().map(|(e, s, m)| (e, (s, m))).collect())
    }

    /// Record that these endpoints now show these snapshots under these mappings
    /// (idempotent).
    pub async fn confirm(
        &self,
        run: i64,
        confirmed: &[(String, i64, Option<String>)],
    ) -> Result<()> {
        let settled: Vec<Settled> = confirmed
            .iter()
            .map(|(endpoint, snapshot, mapping)| Settled {
                endpoint: endpoint.clone(),
                snapshot: *snapshot,
                confirmed: Some(mapping.clone()),
                status: "Done".into(),
                carried: Vec::new(),
                quarantined: Vec::new(),
                stock: None,
            })
            .collect();
        self.settle(run, &settled).await
    }
}

impl Staging {
    /// Record which of the `configured` endpoints skip TLS certificate verification
    /// (`insecure`, a subset): their rows replace whatever was recorded for `configured`.
    pub async fn record_insecure_tls(
        &self,
        configured: &[String],
        insecure: &[String],
    ) -> Result<()> {
        let now = bulwark_engine::now_ms();
        on_db!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for chunk in configured.chunks(500) {
                let sql = format!(
                    "DELETE FROM endpoint_insecure_tls WHERE endpoint_id IN ({})",
                    placeholders(chunk.len())
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for id in chunk {
                    q = q.bind(id);
                }
                q.execute(&mut *tx).await?;
            }
            for chunk in insecure.chunks(500) {
                let sql = format!(
                    "INSERT INTO endpoint_insecure_tls (endpoint_id, recorded_at) VALUES {}
                     ON CONFLICT (endpoint_id) DO UPDATE SET recorded_at = excluded.recorded_at",
                    numbered(chunk.len(), 2)
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for id in chunk {
                    q = q.bind(id).bind(now);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The endpoints recorded as skipping TLS certificate verification, by id.
    pub async fn insecure_tls(&self) -> Result<Vec<String>> {
        const SQL: &str = "SELECT endpoint_id FROM endpoint_insecure_tls ORDER BY endpoint_id";
        let rows: Vec<(String,)> =
            on_db!(self.db, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        Ok(rows.into_iter().map(|(e,)| e).collect())
    }
}

/// One quarantined item of an endpoint (see [`Staging::quarantine`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuarantineRow {
    /// Endpoint id.
    pub endpoint: String,
    /// The SKU as sent to the endpoint (after its mapping).
    pub sku: String,
    /// Snapshot whose value the endpoint refused.
    pub snapshot: i64,
    /// Run that recorded it.
    pub run: i64,
    /// What the endpoint said.
    pub reason: String,
    /// When it was recorded (ms).
    pub at: i64,
    /// An operator asked that the next sync carries it again.
    pub retry_requested: bool,
}

/// What a finished run settles for one endpoint (see [`Staging::settle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Endpoint id.
    pub endpoint: String,
    /// The run's target snapshot.
    pub snapshot: i64,
    /// `Some(mapping key)` if the endpoint confirmed the snapshot (its sync is Done);
    /// `None` if the sync ended without confirming (tripped, cancelled): unsettled.
    pub confirmed: Option<Option<String>>,
    /// The final status of the sync (for unsettled ones).
    pub status: String,
    /// Quarantined SKUs the sync carried (their old rows are replaced).
    pub carried: Vec<String>,
    /// What it quarantined: `(sku, reason)`.
    pub quarantined: Vec<(String, String)>,
    /// Compare-and-set stock: what a confirmed sync of such an endpoint changes in its
    /// record of lowered writes (`None`: not such an endpoint, or not confirmed).
    pub stock: Option<SettledStock>,
}

/// What a confirmed compare-and-set sync settles of its stock (see [`Staging::stock_shown`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettledStock {
    /// SKUs whose record goes: written as the batch had them (not lowered).
    pub cleared: Vec<String>,
    /// SKUs written lowered: `(sku, what the endpoint showed after, the quantity it was
    /// written for)`.
    pub shown: Vec<(String, i64, i64)>,
}

impl Staging {
    /// Record what a finished run settled, in one transaction: confirmed snapshots,
    /// endpoints left unsettled, and the quarantine (rows of SKUs a confirmed sync carried
    /// are replaced by what it quarantined). Idempotent.
    ///
    /// A run may be settled more than once, and after a later run of some of its
    /// endpoints settled (its finished endpoints are settled while a paused one's sync
    /// waits, and again when the run ends): what a later run recorded for an endpoint is
    /// never replaced by an earlier run's.
    pub async fn settle(&self, run: i64, settled: &[Settled]) -> Result<()> {
        let now = bulwark_engine::now_ms();
        on_db!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let later: std::collections::HashSet<String> = sqlx::query_as::<_, (String,)>(
                "SELECT endpoint_id FROM endpoint_confirmed WHERE run_id > $1
                 UNION SELECT endpoint_id FROM endpoint_unsettled WHERE run_id > $1",
            )
            .bind(run)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|(e,)| e)
            .collect();
            let current = settled.iter().filter(|s| !later.contains(&s.endpoint));
            let (confirmed, unsettled): (Vec<&Settled>, Vec<&Settled>) =
                current.partition(|s| s.confirmed.is_some());
            for chunk in confirmed.chunks(500) {
                let sql = format!(
                    "INSERT INTO endpoint_confirmed (endpoint_id, snapshot_id, run_id, at, mapping_key) VALUES {}
                     ON CONFLICT (endpoint_id) DO UPDATE SET snapshot_id = excluded.snapshot_id,
                         run_id = excluded.run_id, at = excluded.at, mapping_key = excluded.mapping_key",
                    numbered(chunk.len(), 5)
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for s in chunk {
                    q = q
                        .bind(&s.endpoint)
                        .bind(s.snapshot)
                        .bind(run)
                        .bind(now)
                        .bind(s.confirmed.clone().flatten());
                }
                q.execute(&mut *tx).await?;
                let sql = format!(
                    "DELETE FROM endpoint_unsettled WHERE endpoint_id IN ({})",
                    placeholders(chunk.len())
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for s in chunk {
                    q = q.bind(&s.endpoint);
                }
                q.execute(&mut *tx).await?;
            }
            for chunk in unsettled.chunks(500) {
                let sql = format!(
                    "INSERT INTO endpoint_unsettled (endpoint_id, snapshot_id, run_id, status, at) VALUES {}
                     ON CONFLICT (endpoint_id) DO UPDATE SET snapshot_id = excluded.snapshot_id,
                         run_id = excluded.run_id, status = excluded.status, at = excluded.at",
                    numbered(chunk.len(), 5)
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for s in chunk {
                    q = q
                        .bind(&s.endpoint)
                        .bind(s.snapshot)
                        .bind(run)
                        .bind(&s.status)
                        .bind(now);
                }
                q.execute(&mut *tx).await?;
            }
            // Quarantine bookkeeping is per item, and rare.
            for s in &confirmed {
                for sku in &s.carried {
                    sqlx::query(
                        "DELETE FROM endpoint_quarantine WHERE endpoint_id = $1 AND sku = $2 AND run_id <> $3",
                    )
                    .bind(&s.endpoint)
                    .bind(sku)
                    .bind(run)
                    .execute(&mut *tx)
                    .await?;
                }
                for (sku, reason) in &s.quarantined {
                    sqlx::query(
                        "INSERT INTO endpoint_quarantine (endpoint_id, sku, snapshot_id, run_id, reason, at, retry_requested)
                         VALUES ($1, $2, $3, $4, $5, $6, 0)
                         ON CONFLICT (endpoint_id, sku) DO UPDATE SET snapshot_id = excluded.snapshot_id,
                             run_id = excluded.run_id, reason = excluded.reason, at = excluded.at,
                             retry_requested = 0",
                    )
                    .bind(&s.endpoint)
                    .bind(sku)
                    .bind(s.snapshot)
                    .bind(run)
                    .bind(reason)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                let Some(stock) = &s.stock else {
                    continue;
                };
                for sku in &stock.cleared {
                    sqlx::query(
                        "DELETE FROM endpoint_stock_shown WHERE endpoint_id = $1 AND sku = $2 AND run_id <> $3",
                    )
                    .bind(&s.endpoint)
                    .bind(sku)
                    .bind(run)
                    .execute(&mut *tx)
                    .await?;
                }
                for (sku, compare, basis) in &stock.shown {
                    sqlx::query(
                        "INSERT INTO endpoint_stock_shown (endpoint_id, sku, compare, basis, run_id, at)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (endpoint_id, sku) DO UPDATE SET compare = excluded.compare,
                             basis = excluded.basis, run_id = excluded.run_id, at = excluded.at",
                    )
                    .bind(&s.endpoint)
                    .bind(sku)
                    .bind(compare)
                    .bind(basis)
                    .bind(run)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Compare-and-set stock: per endpoint, the SKUs whose last confirmed write was
    /// lowered (the shop had sold some since the write before), with what the endpoint
    /// showed after it and the quantity it was written for.
    pub async fn stock_shown(&self) -> Result<HashMap<String, Vec<(String, crate::catalog::Cas)>>> {
        const SQL: &str = "SELECT endpoint_id, sku, compare, basis FROM endpoint_stock_shown
                           ORDER BY endpoint_id, sku";
        let rows: Vec<(String, String, i64, i64)> =
            on_db!(self.db, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        let mut out: HashMap<String, Vec<(String, crate::catalog::Cas)>> = HashMap::new();
        for (endpoint, sku, compare, basis) in rows {
            out.entry(endpoint)
                .or_default()
                .push((sku, crate::catalog::Cas { compare, basis }));
        }
        Ok(out)
    }

    /// Endpoints whose last sync ended without confirming.
    pub async fn unsettled(&self) -> Result<std::collections::HashSet<String>> {
        const SQL: &str = "SELECT endpoint_id FROM endpoint_unsettled";
        let rows: Vec<(String,)> =
            on_db!(self.db, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        Ok(rows.into_iter().map(|(e,)| e).collect())
    }

    /// Every quarantined item, by endpoint and SKU.
    pub async fn quarantine(&self) -> Result<Vec<QuarantineRow>> {
        const SQL: &str =
            "SELECT endpoint_id, sku, snapshot_id, run_id, reason, at, retry_requested
                           FROM endpoint_quarantine ORDER BY endpoint_id, sku";
        let rows: Vec<(String, String, i64, i64, String, i64, i64)> =
            on_db!(self.db, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        Ok(rows
            .into_iter()
            .map(
                |(endpoint, sku, snapshot, run, reason, at, retry)| QuarantineRow {
                    endpoint,
                    sku,
                    snapshot,
                    run,
                    reason,
                    at,
                    retry_requested: retry != 0,
                },
            )
            .collect())
    }

    /// Ask that the next sync carries these quarantined items again (all of `endpoint`'s,
    /// or every endpoint's; only `sku` if given). Returns how many rows were marked.
    pub async fn request_retry(&self, endpoint: Option<&str>, sku: Option<&str>) -> Result<u64> {
        const SQL: &str = "UPDATE endpoint_quarantine SET retry_requested = 1
                           WHERE ($1 IS NULL OR endpoint_id = $1) AND ($2 IS NULL OR sku = $2)";
        let n = on_db!(self.db, |pool| sqlx::query(SQL)
            .bind(endpoint)
            .bind(sku)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(n)
    }
}

impl Staging {
    /// Record what a reconcile found at each endpoint (replacing its previous record), and
    /// the sync run that repairs it, if one was planned.
    pub async fn record_reconcile(&self, rows: &[ReconcileRow]) -> Result<()> {
        const SQL: &str = "INSERT INTO endpoint_reconcile
             (endpoint_id, at, snapshot_id, items_read, drifted, unread, run_id, skipped, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (endpoint_id) DO UPDATE SET at = excluded.at,
               snapshot_id = excluded.snapshot_id, items_read = excluded.items_read,
               drifted = excluded.drifted, unread = excluded.unread, run_id = excluded.run_id,
               skipped = excluded.skipped, detail = excluded.detail";
        on_db!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for r in rows {
                sqlx::query(SQL)
                    .bind(&r.endpoint)
                    .bind(r.at)
                    .bind(r.snapshot)
                    .bind(i64::try_from(r.read).unwrap_or(i64::MAX))
                    .bind(i64::try_from(r.drifted).unwrap_or(i64::MAX))
                    .bind(i64::try_from(r.unread).unwrap_or(i64::MAX))
                    .bind(r.run)
                    .bind(r.skipped.as_deref())
                    .bind(&r.detail)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Every endpoint's last reconcile, by endpoint id.
    pub async fn reconciles(&self) -> Result<Vec<ReconcileRow>> {
        const SQL: &str = "SELECT endpoint_id, at, snapshot_id, items_read, drifted, unread,
                                  run_id, skipped, detail
                           FROM endpoint_reconcile ORDER BY endpoint_id";
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            String,
            i64,
            Option<i64>,
            i64,
            i64,
            i64,
            Option<i64>,
            Option<String>,
            String,
        )> = on_db!(self.db, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        Ok(rows
            .into_iter()
            .map(
                |(endpoint, at, snapshot, read, drifted, unread, run, skipped, detail)| {
                    ReconcileRow {
                        endpoint,
                        at,
                        snapshot,
                        read: read.max(0) as u64,
                        drifted: drifted.max(0) as u64,
                        unread: unread.max(0) as u64,
                        run,
                        skipped,
                        detail,
                    }
                },
            )
            .collect())
    }
}

/// What the last reconcile found at one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReconcileRow {
    /// Endpoint id.
    pub endpoint: String,
    /// When (ms since the epoch).
    pub at: i64,
    /// The snapshot the endpoint had confirmed, which its read-back was compared with.
    pub snapshot: Option<i64>,
    /// Items read back.
    pub read: u64,
    /// Items that showed other values (sent again by `run`).
    pub drifted: u64,
    /// Items that could not be read.
    pub unread: u64,
    /// The sync run that repairs the drift (or syncs the endpoint anyway).
    pub run: Option<i64>,
    /// Why the endpoint was not (fully) read, if so.
    pub skipped: Option<String>,
    /// The first differences, `SKU: what differs`, joined by `; `.
    pub detail: String,
}

/// Hex SHA-256 over the canonical JSON of items sorted by SKU.
pub fn content_hash(items: &[Item]) -> String {
    let mut h = Sha256::new();
    for it in items {
        h.update(serde_json::to_vec(it).expect("item serialises"));
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// What a sync does with a SKU that is gone from the source (in the snapshot an endpoint
/// confirmed, not in the new one). A SKU whose source row was *rejected* is never gone:
/// sealing carries its last accepted value forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRemoved {
    /// Send nothing: the endpoint keeps what it shows (the default; delisting a product is
    /// the shop's business, and a vanished row is more often a broken export than a sale).
    #[default]
    Leave,
    /// Send the SKU with stock 0 and its last prices.
    ZeroStock,
}

impl OnRemoved {
    /// The policy of journals written before the policy existed: they zeroed removed SKUs,
    /// and their batches must be recomputed the way they were planned.
    pub fn before_policy() -> Self {
        OnRemoved::ZeroStock
    }

    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRemoved::Leave => "leave",
            OnRemoved::ZeroStock => "zero_stock",
        }
    }
}

impl std::str::FromStr for OnRemoved {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "leave" => Ok(OnRemoved::Leave),
            "zero_stock" => Ok(OnRemoved::ZeroStock),
            other => Err(format!(
                "on_removed {other:?} is not a policy: use \"leave\" or \"zero_stock\""
            )),
        }
    }
}

/// The items an endpoint showing `base` must receive to show `target`: new and changed
/// SKUs with their new absolute values, and, under [`OnRemoved::ZeroStock`], SKUs gone
/// from the catalog with quantity 0. Both inputs must be sorted by SKU; the output is too.
pub fn diff(base: Option<&[Item]>, target: &[Item], on_removed: OnRemoved) -> Vec<Item> {
    let Some(base) = base else {
        return target.to_vec();
    };
    let mut out = Vec::new();
    let removed = |out: &mut Vec<Item>, b: &Item| {
        if on_removed == OnRemoved::ZeroStock {
            out.push(Item {
                sku: b.sku.clone(),
                qty: 0,
                tiers: b.tiers.clone(),
            });
        }
    };
    let (mut i, mut j) = (0, 0);
    while i < base.len() || j < target.len() {
        match (base.get(i), target.get(j)) {
            (Some(b), Some(t)) if b.sku == t.sku => {
                if b != t {
                    out.push(t.clone());
                }
                i += 1;
                j += 1;
            }
            (Some(b), Some(t)) if b.sku < t.sku => {
                removed(&mut out, b);
                i += 1;
            }
            (Some(b), None) => {
                removed(&mut out, b);
                i += 1;
            }
            (_, Some(t)) => {
                out.push(t.clone());
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(sku: &str, qty: i64) -> Item {
        Item {
            sku: sku.into(),
            qty,
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 100,
            }],
        }
    }

    #[test]
    fn diff_sends_new_changed_and_removed_only() {
        let base = vec![it("a", 1), it("b", 2), it("c", 3)];
        let target = vec![it("a", 1), it("b", 5), it("d", 4)];
        let d = diff(Some(&base), &target, OnRemoved::ZeroStock);
        assert_eq!(d, vec![it("b", 5), it("c", 0), it("d", 4)]);
        let d = diff(Some(&base), &target, OnRemoved::Leave);
        assert_eq!(d, vec![it("b", 5), it("d", 4)], "leave sends nothing for c");
        for p in [OnRemoved::Leave, OnRemoved::ZeroStock] {
            assert!(diff(Some(&target), &target, p).is_empty());
            assert_eq!(diff(None, &target, p), target);
        }
        assert_eq!("zero_stock".parse::<OnRemoved>(), Ok(OnRemoved::ZeroStock));
        assert!(
            "zero"
                .parse::<OnRemoved>()
                .unwrap_err()
                .contains("\"leave\"")
        );
    }
}
