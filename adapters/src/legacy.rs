//! Legacy sources over sqlx: read-only, paged by key, every query counted.
//!
//! Also generates the demo legacy database (`bulwark demo`): a small ERP-like SQLite file
//! with SKUs, quantities and three wholesale price tiers.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bulwark_workflows::snapshot::{LegacySource, RawRow};
use bulwark_workflows::{Result, SyncError};
use rand::{Rng, SeedableRng};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Row};

use crate::text::{TextDecoding, key_token, token_bytes};

/// How the source's rows map onto the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMapping {
    /// Table (or view) to read.
    pub table: String,
    /// Key/SKU column (unique; pages are ordered by it).
    pub sku_column: String,
    /// Quantity column.
    pub qty_column: String,
    /// Price columns, one per tier, in tier order.
    pub price_columns: Vec<String>,
}

impl Default for SourceMapping {
    fn default() -> Self {
        Self {
            table: "products".into(),
            sku_column: "sku".into(),
            qty_column: "qty".into(),
            price_columns: vec!["price_1".into(), "price_2".into(), "price_3".into()],
        }
    }
}

fn ident(name: &str) -> Result<String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(SyncError::Config(format!(
            "source identifier {name:?} must be letters, digits and underscores"
        )));
    }
    Ok(format!("\"{name}\""))
}

/// A SQLite legacy database, opened read-only.
#[derive(Debug)]
pub struct SqliteSource {
    pool: SqlitePool,
    path: String,
    sql: String,
    columns: Vec<String>,
    decoding: TextDecoding,
    queries: AtomicU64,
}

/// One row's columns (sku, qty, prices…) as bytes, decoded: the key token, the values, and
/// the first column that could not be decoded (named by `columns`).
pub(crate) fn decode_row(
    columns: &[String],
    raw: Vec<Option<Vec<u8>>>,
    decoding: &TextDecoding,
) -> RawRow {
    let mut unreadable = None;
    let key = raw[0].as_deref().map(key_token).unwrap_or_default();
    let mut values = raw.into_iter().zip(columns).map(|(v, col)| {
        v.and_then(|b| match decoding.decode(&b) {
            Ok(s) => Some(s),
            Err(e) => {
                unreadable.get_or_insert_with(|| format!("column {col}: {e}"));
                None
            }
        })
    });
    let sku = values.next().flatten();
    let qty = values.next().flatten();
    let prices = values.collect();
    RawRow {
        key,
        sku,
        qty,
        prices,
        unreadable,
    }
}

impl SqliteSource {
    /// Open `path` read-only with the given mapping.
    pub async fn open(path: impl AsRef<Path>, mapping: &SourceMapping) -> Result<Self> {
        let path = path.as_ref().display().to_string();
        if !Path::new(&path).exists() {
            return Err(SyncError::Source {
                source_name: path.clone(),
                detail: "file does not exist".into(),
            });
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(|e| SyncError::Source {
                source_name: path.clone(),
                detail: e.to_string(),
            })?
            .read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        let columns = std::iter::once(&mapping.sku_column)
            .chain(std::iter::once(&mapping.qty_column))
            .chain(&mapping.price_columns)
            .cloned()
            .collect();
        let cols: Vec<String> = std::iter::once(&mapping.qty_column)
            .chain(&mapping.price_columns)
            .map(|c| ident(c).map(|c| format!("CAST({c} AS TEXT)")))
            .collect::<Result<_>>()?;
        let sku = ident(&mapping.sku_column)?;
        // The cursor is bound as the key's bytes and compared as TEXT (SQLite compares
        // TEXT bytewise), so keys that are not UTF-8 page exactly too.
        let sql = format!(
            "SELECT CAST({sku} AS TEXT), {} FROM {} WHERE (?1 IS NULL OR {sku} > CAST(?1 AS TEXT)) ORDER BY {sku} LIMIT ?2",
            cols.join(", "),
            ident(&mapping.table)?
        );
        Ok(Self {
            pool,
            path,
            sql,
            columns,
            decoding: TextDecoding::default(),
            queries: AtomicU64::new(0),
        })
    }

    /// Decode text that is not UTF-8 with `decoding` (see [`crate::text`]).
    pub fn with_decoding(mut self, decoding: TextDecoding) -> Self {
        self.decoding = decoding;
        self
    }
}

#[async_trait]
impl LegacySource for SqliteSource {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path)
    }

    async fn page(&self, after: Option<&str>, limit: u32) -> Result<Vec<RawRow>> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let rows = sqlx::query(AssertSqlSafe(self.sql.clone()))
            .bind(after.map(token_bytes))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| SyncError::Source {
                source_name: self.describe(),
                detail: e.to_string(),
            })?;
        rows.into_iter()
            .map(|r| {
                // Bytes, whatever the column holds: text that is not UTF-8 is decoded (or
                // the row rejected), never a panic.
                let raw = (0..r.len())
                    .map(|i| r.try_get_unchecked::<Option<Vec<u8>>, _>(i))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| SyncError::Source {
                        source_name: self.describe(),
                        detail: e.to_string(),
                    })?;
                Ok(decode_row(&self.columns, raw, &self.decoding))
            })
            .collect()
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

/// The SKU of the `i`-th product a generated demo legacy database holds (`SKU-000000` …).
pub fn sku_code(i: u32) -> String {
    format!("SKU-{i:06}")
}

/// Create (or replace) the demo legacy database with `skus` products and three price tiers.
pub async fn generate_demo_legacy(path: impl AsRef<Path>, skus: u32, seed: u64) -> Result<()> {
    let path = path.as_ref();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .map_err(|e| SyncError::Config(e.to_string()))?
        .create_if_missing(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    sqlx::query(
        "CREATE TABLE products (sku TEXT PRIMARY KEY, name TEXT, qty INTEGER NOT NULL,
                                price_1 NUMERIC NOT NULL, price_2 NUMERIC NOT NULL, price_3 NUMERIC NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tx = pool.begin().await?;
    for chunk in (0..skus).collect::<Vec<_>>().chunks(500) {
        let sql = format!(
            "INSERT INTO products VALUES {}",
            vec!["(?,?,?,?,?,?)"; chunk.len()].join(",")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for i in chunk {
            let base: i64 = rng.random_range(100..100_000);
            q = q
                .bind(sku_code(*i))
                .bind(format!("Product {i}"))
                .bind(rng.random_range(0..5_000i64))
                .bind(format!("{}.{:02}", base / 100, base % 100))
                .bind(format!("{}.{:02}", base * 9 / 1000, base * 9 / 10 % 100))
                .bind(format!("{}.{:02}", base * 8 / 1000, base * 8 / 10 % 100));
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    pool.close().await;
    Ok(())
}

/// Change the quantity of about `share` of the demo products (for a delta sync).
pub async fn touch_demo_legacy(path: impl AsRef<Path>, share: f64, seed: u64) -> Result<u64> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.as_ref().display()))
        .map_err(|e| SyncError::Config(e.to_string()))?;
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let modulo = (1.0 / share.clamp(0.0001, 1.0)).round() as i64;
    let offset = (seed % modulo as u64) as i64;
    let n = sqlx::query("UPDATE products SET qty = qty + 1 WHERE (rowid % ?) = ?")
        .bind(modulo)
        .bind(offset)
        .execute(&pool)
        .await?
        .rows_affected();
    pool.close().await;
    Ok(n)
}
