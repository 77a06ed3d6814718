//! The lookup cache: a platform's own ids for SKUs, per profile and endpoint.
//!
//! [`SqliteIdCache`] keeps them in Bulwark's database (table `adapter_id_cache`, created
//! by migration `0002_http_lookup_cache.sql`), so a restart does not look every SKU up
//! again; [`MemoryIdCache`] is the in-process variant. An entry is removed when a write
//! answers "not found" (the id went stale), and looked up again.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

/// A failure of the cache's storage (reported as a transient adapter error).
#[derive(Debug, Clone, thiserror::Error)]
#[error("id cache: {0}")]
pub struct CacheError(pub String);

/// Stores remote ids by `(profile, endpoint, sku)`.
#[async_trait]
pub trait IdCache: Send + Sync {
    /// The cached ids of `skus` (absent SKUs are missing from the map).
    async fn get_many(
        &self,
        profile: &str,
        endpoint: &str,
        skus: &[String],
    ) -> Result<HashMap<String, String>, CacheError>;
    /// Insert or replace ids.
    async fn put_many(
        &self,
        profile: &str,
        endpoint: &str,
        ids: &[(String, String)],
    ) -> Result<(), CacheError>;
    /// Forget the id of `sku` (it went stale).
    async fn invalidate(&self, profile: &str, endpoint: &str, sku: &str) -> Result<(), CacheError>;
}

type Key = (String, String, String);

/// An in-memory [`IdCache`].
#[derive(Debug, Default)]
pub struct MemoryIdCache {
    map: Mutex<HashMap<Key, String>>,
}

impl MemoryIdCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached ids.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn key(profile: &str, endpoint: &str, sku: &str) -> Key {
    (profile.to_owned(), endpoint.to_owned(), sku.to_owned())
}

#[async_trait]
impl IdCache for MemoryIdCache {
    async fn get_many(
        &self,
        profile: &str,
        endpoint: &str,
        skus: &[String],
    ) -> Result<HashMap<String, String>, CacheError> {
        let map = self.map.lock().map_err(|_| CacheError("poisoned".into()))?;
        Ok(skus
            .iter()
            .filter_map(|s| {
                map.get(&key(profile, endpoint, s))
                    .map(|id| (s.clone(), id.clone()))
            })
            .collect())
    }

    async fn put_many(
        &self,
        profile: &str,
        endpoint: &str,
        ids: &[(String, String)],
    ) -> Result<(), CacheError> {
        let mut map = self.map.lock().map_err(|_| CacheError("poisoned".into()))?;
        for (sku, id) in ids {
            map.insert(key(profile, endpoint, sku), id.clone());
        }
        Ok(())
    }

    async fn invalidate(&self, profile: &str, endpoint: &str, sku: &str) -> Result<(), CacheError> {
        let mut map = self.map.lock().map_err(|_| CacheError("poisoned".into()))?;
        map.remove(&key(profile, endpoint, sku));
        Ok(())
    }
}

/// Schema of the cache table; the same statement as migration `0002_http_lookup_cache.sql`
/// (both are `IF NOT EXISTS`, so either may run first).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS adapter_id_cache (
    profile    TEXT    NOT NULL,
    endpoint   TEXT    NOT NULL,
    sku        TEXT    NOT NULL,
    remote_id  TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (profile, endpoint, sku)
) WITHOUT ROWID";

/// Rows per multi-row statement.
const CHUNK: usize = 300;

/// An [`IdCache`] in a SQLite database: Bulwark's own (give [`SqliteIdCache::new`] the
/// store's pool, or use [`SqliteIdCache::connect`] on the database file).
#[derive(Debug, Clone)]
pub struct SqliteIdCache {
    pool: SqlitePool,
}

impl SqliteIdCache {
    /// A cache over `pool`. Ensures the table exists (normally the migration made it).
    pub async fn new(pool: SqlitePool) -> Result<Self, CacheError> {
        sqlx::query(SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| CacheError(e.to_string()))?;
        Ok(Self { pool })
    }

    /// A cache with its own small pool on the database file at `path` (for when the
    /// adapter registry must exist before Bulwark opens the database).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, CacheError> {
        let path = path.as_ref();
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| CacheError(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|e| CacheError(format!("{}: {e}", path.display())))?;
        Self::new(pool).await
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[async_trait]
impl IdCache for SqliteIdCache {
    async fn get_many(
        &self,
        profile: &str,
        endpoint: &str,
        skus: &[String],
    ) -> Result<HashMap<String, String>, CacheError> {
        let mut out = HashMap::new();
        for chunk in skus.chunks(CHUNK) {
            let marks = vec!["?"; chunk.len()].join(",");
            let sql = format!(
                "SELECT sku, remote_id FROM adapter_id_cache \
                 WHERE profile = ? AND endpoint = ? AND sku IN ({marks})"
            );
            let mut q = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql))
                .bind(profile)
                .bind(endpoint);
            for s in chunk {
                q = q.bind(s);
            }
            let rows = q
                .fetch_all(&self.pool)
                .await
                .map_err(|e| CacheError(e.to_string()))?;
            out.extend(rows);
        }
        Ok(out)
    }

    async fn put_many(
        &self,
        profile: &str,
        endpoint: &str,
        ids: &[(String, String)],
    ) -> Result<(), CacheError> {
        let at = now_ms();
        for chunk in ids.chunks(CHUNK) {
            let marks = vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(",");
            let sql = format!(
                "INSERT INTO adapter_id_cache (profile, endpoint, sku, remote_id, updated_at) \
                 VALUES {marks} ON CONFLICT (profile, endpoint, sku) DO UPDATE SET \
                 remote_id = excluded.remote_id, updated_at = excluded.updated_at"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (sku, id) in chunk {
                q = q.bind(profile).bind(endpoint).bind(sku).bind(id).bind(at);
            }
            q.execute(&self.pool)
                .await
                .map_err(|e| CacheError(e.to_string()))?;
        }
        Ok(())
    }

    async fn invalidate(&self, profile: &str, endpoint: &str, sku: &str) -> Result<(), CacheError> {
        sqlx::query("DELETE FROM adapter_id_cache WHERE profile = ? AND endpoint = ? AND sku = ?")
            .bind(profile)
            .bind(endpoint)
            .bind(sku)
            .execute(&self.pool)
            .await
            .map_err(|e| CacheError(e.to_string()))?;
        Ok(())
    }
}

/// An [`IdCache`] in Bulwark's PostgreSQL database (table `adapter_id_cache`, created by
/// `migrations/postgres/0002_http_lookup_cache.sql`), shared by every worker.
#[derive(Debug, Clone)]
pub struct PgIdCache {
    pool: sqlx::PgPool,
}

impl PgIdCache {
    /// A cache over `pool` (the store's pool: `PostgresStore::pool`).
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl IdCache for PgIdCache {
    async fn get_many(
        &self,
        profile: &str,
        endpoint: &str,
        skus: &[String],
    ) -> Result<HashMap<String, String>, CacheError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT sku, remote_id FROM adapter_id_cache WHERE profile = $1 AND endpoint = $2 AND sku = ANY($3)",
        )
        .bind(profile)
        .bind(endpoint)
        .bind(skus)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| CacheError(e.to_string()))?;
        Ok(rows.into_iter().collect())
    }

    async fn put_many(
        &self,
        profile: &str,
        endpoint: &str,
        ids: &[(String, String)],
    ) -> Result<(), CacheError> {
        let skus: Vec<&str> = ids.iter().map(|(s, _)| s.as_str()).collect();
        let remote: Vec<&str> = ids.iter().map(|(_, r)| r.as_str()).collect();
        sqlx::query(
            "INSERT INTO adapter_id_cache (profile, endpoint, sku, remote_id, updated_at)
             SELECT $1, $2, s, r, $5 FROM unnest($3::text[], $4::text[]) AS t(s, r)
             ON CONFLICT (profile, endpoint, sku) DO UPDATE SET remote_id = excluded.remote_id,
                 updated_at = excluded.updated_at",
        )
        .bind(profile)
        .bind(endpoint)
        .bind(&skus)
        .bind(&remote)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| CacheError(e.to_string()))?;
        Ok(())
    }

    async fn invalidate(&self, profile: &str, endpoint: &str, sku: &str) -> Result<(), CacheError> {
        sqlx::query(
            "DELETE FROM adapter_id_cache WHERE profile = $1 AND endpoint = $2 AND sku = $3",
        )
        .bind(profile)
        .bind(endpoint)
        .bind(sku)
        .execute(&self.pool)
        .await
        .map_err(|e| CacheError(e.to_string()))?;
        Ok(())
    }
}
