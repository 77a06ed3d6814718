//! Bulwark's staging schema: sealed, immutable snapshots of the legacy catalog, and what
//! each endpoint last confirmed. Sync work reads only from here, never from the source.

use std::collections::HashMap;

use bulwark_engine::Backend;
use serde::Serialize;
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
    /// `filling`, `sealed` or `aborted`.
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
        rejects: &[(String, String)],
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
            for (key, reason) in rejects {
                sqlx::query("INSERT INTO snapshot_rejects (snapshot_id, row_key, reason) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
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

    /// Seal a snapshot: compute its content hash and make it visible to sync runs.
    pub async fn seal(&self, snapshot: i64, stats: SealStats) -> Result<String> {
        let items = self.items(snapshot).await?;
        let hash = content_hash(&items);
        let now = bulwark_engine::now_ms();
        on_db!(self.db, |pool| {
            sqlx::query(
            "UPDATE snapshots SET status = 'sealed', rows_read = $1, rows_accepted = $2, rows_rejected = $3, queries = $4,
                    content_hash = $5, sealed_at = $6 WHERE id = $7 AND status = 'filling'",
        )
        .bind(stats.rows_read)
        .bind(items.len() as i64)
        .bind(stats.rows_rejected)
        .bind(stats.queries)
        .bind(&hash)
        .bind(now)
        .bind(snapshot)
        .execute(pool)
        .await
        .map(|_| ())?
        });
        Ok(hash)
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
        let now = bulwark_engine::now_ms();
        on_db!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for chunk in confirmed.chunks(500) {
                let sql = format!(
                    "INSERT INTO endpoint_confirmed (endpoint_id, snapshot_id, run_id, at, mapping_key) VALUES {}
                     ON CONFLICT (endpoint_id) DO UPDATE SET snapshot_id = excluded.snapshot_id,
                         run_id = excluded.run_id, at = excluded.at, mapping_key = excluded.mapping_key",
                    numbered(chunk.len(), 5)
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for (endpoint, snapshot, mapping) in chunk {
                    q = q
                        .bind(endpoint)
                        .bind(snapshot)
                        .bind(run)
                        .bind(now)
                        .bind(mapping);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
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
                    (1..=chunk.len())
                        .map(|i| format!("${i}"))
                        .collect::<Vec<_>>()
                        .join(",")
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

/// Hex SHA-256 over the canonical JSON of items sorted by SKU.
pub fn content_hash(items: &[Item]) -> String {
    let mut h = Sha256::new();
    for it in items {
        h.update(serde_json::to_vec(it).expect("item serialises"));
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The items an endpoint showing `base` must receive to show `target`: new and changed
/// SKUs with their new absolute values, and SKUs gone from the catalog with quantity 0.
/// Both inputs must be sorted by SKU; the output is too.
pub fn diff(base: Option<&[Item]>, target: &[Item]) -> Vec<Item> {
    let Some(base) = base else {
        return target.to_vec();
    };
    let mut out = Vec::new();
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
                out.push(Item {
                    sku: b.sku.clone(),
                    qty: 0,
                    tiers: b.tiers.clone(),
                });
                i += 1;
            }
            (Some(b), None) => {
                out.push(Item {
                    sku: b.sku.clone(),
                    qty: 0,
                    tiers: b.tiers.clone(),
                });
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
        let d = diff(Some(&base), &target);
        assert_eq!(d, vec![it("b", 5), it("c", 0), it("d", 4)]);
        assert!(diff(Some(&target), &target).is_empty());
        assert_eq!(diff(None, &target), target);
    }
}
