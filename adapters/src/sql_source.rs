//! Legacy sources on PostgreSQL and MySQL/MariaDB servers (and a URL-based opener for all
//! three kinds), read-only, paged by key, every query counted.
//!
//! A source is configured either by a table + column mapping ([`SourceMapping`]) or by a
//! user query ([`SourceQuery`]). The **query contract**:
//!
//! - the query yields the columns `sku`, `qty` and `price_1` … `price_N` (alias them);
//! - it contains the placeholders `{after}` and `{limit}` and pages by SKU with them:
//!   `… WHERE sku > {after} ORDER BY sku LIMIT {limit}`; `{after}` is bound (as a
//!   parameter, never spliced) to the last SKU of the previous page, and to `''` (the empty
//!   string) for the first page; `{limit}` to the page size;
//! - SKUs must be unique (the paging key); Bulwark checks that every page's keys strictly
//!   increase after the cursor and stops the snapshot with an error otherwise.
//!
//! Bulwark wraps the query as `SELECT CAST(sku AS text), … FROM (query) AS bulwark_page
//! ORDER BY sku`, so numeric and decimal columns are read as text (exactly as stored).
//! It never writes: PostgreSQL connections set `default_transaction_read_only=on`, and
//! MySQL/MariaDB sessions run `SET SESSION TRANSACTION READ ONLY` on connect.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bulwark_workflows::snapshot::{LegacySource, RawRow};
use bulwark_workflows::{Result, SyncError};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Executor, Row};

use crate::legacy::{SourceMapping, SqliteSource};

/// A user query following the keyset contract (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceQuery {
    /// The query, with `{after}` and `{limit}` placeholders.
    pub sql: String,
    /// How many `price_N` columns it yields.
    pub tiers: usize,
}

/// What to read: a table mapping or a user query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// Table + column mapping.
    Table(SourceMapping),
    /// User query.
    Query(SourceQuery),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Postgres,
    MySql,
}

impl Dialect {
    fn quote(self, name: &str) -> Result<String> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(SyncError::Config(format!(
                "source identifier {name:?} must be letters, digits and underscores"
            )));
        }
        Ok(match self {
            Self::Postgres => format!("\"{name}\""),
            Self::MySql => format!("`{name}`"),
        })
    }
    fn text(self, expr: &str) -> String {
        match self {
            Self::Postgres => format!("CAST({expr} AS TEXT)"),
            Self::MySql => format!("CAST({expr} AS CHAR)"),
        }
    }
    fn param(self, n: usize) -> String {
        match self {
            Self::Postgres => format!("${n}"),
            Self::MySql => "?".into(),
        }
    }
}

/// The two statements of a source: the first page, and a page after a key. Both take
/// their parameters in the order (after?, limit).
#[derive(Debug, Clone)]
struct Statements {
    first: String,
    next: String,
    first_binds_after: bool,
}

fn statements(dialect: Dialect, spec: &SourceSpec) -> Result<Statements> {
    match spec {
        SourceSpec::Table(m) => {
            if m.price_columns.is_empty() {
                return Err(SyncError::Config(
                    "at least one price column is required".into(),
                ));
            }
            let sku = dialect.quote(&m.sku_column)?;
            let cols = std::iter::once(&m.qty_column)
                .chain(&m.price_columns)
                .map(|c| dialect.quote(c).map(|c| dialect.text(&c)))
                .collect::<Result<Vec<_>>>()?
                .join(", ");
            let table = dialect.quote(&m.table)?;
            let head = format!("SELECT {}, {cols} FROM {table}", dialect.text(&sku));
            Ok(Statements {
                first: format!("{head} ORDER BY {sku} LIMIT {}", dialect.param(1)),
                next: format!(
                    "{head} WHERE {sku} > {} ORDER BY {sku} LIMIT {}",
                    dialect.param(1),
                    dialect.param(2)
                ),
                first_binds_after: false,
            })
        }
        SourceSpec::Query(q) => {
            if q.tiers == 0 {
                return Err(SyncError::Config(
                    "at least one price tier is required".into(),
                ));
            }
            let (a, l) = (q.sql.find("{after}"), q.sql.find("{limit}"));
            let (Some(a), Some(l)) = (a, l) else {
                return Err(SyncError::Config(
                    "the source query must contain {after} and {limit} (see the keyset contract)"
                        .into(),
                ));
            };
            if q.sql.matches("{after}").count() != 1 || q.sql.matches("{limit}").count() != 1 {
                return Err(SyncError::Config(
                    "the source query must contain {after} and {limit} once each".into(),
                ));
            }
            if a > l {
                return Err(SyncError::Config(
                    "the source query must use {after} before {limit}".into(),
                ));
            }
            let inner = q
                .sql
                .trim()
                .trim_end_matches(';')
                .replace("{after}", &dialect.param(1))
                .replace("{limit}", &dialect.param(2));
            let cols = std::iter::once("qty".to_string())
                .chain((1..=q.tiers).map(|i| format!("price_{i}")))
                .map(|c| dialect.text(&format!("bulwark_page.{c}")))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT {}, {cols} FROM ({inner}) AS bulwark_page ORDER BY bulwark_page.sku",
                dialect.text("bulwark_page.sku")
            );
            Ok(Statements {
                first: sql.clone(),
                next: sql,
                first_binds_after: true,
            })
        }
    }
}

#[derive(Debug)]
enum Pool {
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// A PostgreSQL or MySQL/MariaDB legacy source, read-only.
#[derive(Debug)]
pub struct SqlSource {
    pool: Pool,
    shown: String,
    sql: Statements,
    queries: AtomicU64,
}

/// `scheme://host:port/db` without user or password.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
            let rest = rest.split('?').next().unwrap_or(rest);
            format!("{scheme}://{rest}")
        }
        None => url.to_string(),
    }
}

impl SqlSource {
    /// Open a `postgres://` / `postgresql://` or `mysql://` / `mariadb://` URL read-only.
    pub async fn open(url: &str, spec: &SourceSpec) -> Result<Self> {
        let shown = redact(url);
        let err = |e: &dyn std::fmt::Display| SyncError::Source {
            source_name: shown.clone(),
            detail: e.to_string(),
        };
        let (pool, dialect) = if url.starts_with("postgres://") || url.starts_with("postgresql://")
        {
            let options: PgConnectOptions = url.parse().map_err(|e| err(&e))?;
            let options = options
                .options([("default_transaction_read_only", "on")])
                .application_name("bulwark-snapshot")
                .disable_statement_logging();
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(|e| err(&e))?;
            (Pool::Postgres(pool), Dialect::Postgres)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let options: MySqlConnectOptions = url.parse().map_err(|e| err(&e))?;
            let options = options.disable_statement_logging();
            let pool = MySqlPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("SET SESSION TRANSACTION READ ONLY").await?;
                        Ok(())
                    })
                })
                .connect_with(options)
                .await
                .map_err(|e| err(&e))?;
            (Pool::MySql(pool), Dialect::MySql)
        } else {
            return Err(SyncError::Config(format!(
                "unsupported source URL {shown:?}: use postgres://, mysql:// (or a SQLite path)"
            )));
        };
        Ok(Self {
            pool,
            sql: statements(dialect, spec)?,
            shown,
            queries: AtomicU64::new(0),
        })
    }

    /// Close the connection.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Postgres(p) => p.close().await,
            Pool::MySql(p) => p.close().await,
        }
    }
}

fn to_raw<R: Row>(r: R) -> std::result::Result<RawRow, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let sku: Option<String> = r.try_get(0)?;
    Ok(RawRow {
        key: sku.clone().unwrap_or_default(),
        sku,
        qty: r.try_get(1)?,
        prices: (2..r.len())
            .map(|i| r.try_get::<Option<String>, _>(i))
            .collect::<std::result::Result<_, _>>()?,
    })
}

#[async_trait]
impl LegacySource for SqlSource {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    async fn page(&self, after: Option<&str>, limit: u32) -> Result<Vec<RawRow>> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let limit = i64::from(limit);
        let (sql, after) = match after {
            Some(a) => (&self.sql.next, Some(a)),
            None if self.sql.first_binds_after => (&self.sql.first, Some("")),
            None => (&self.sql.first, None),
        };
        let rows: std::result::Result<Vec<RawRow>, sqlx::Error> = async {
            match &self.pool {
                Pool::Postgres(pool) => {
                    let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
                    if let Some(a) = after {
                        q = q.bind(a);
                    }
                    q.bind(limit)
                        .fetch_all(pool)
                        .await?
                        .into_iter()
                        .map(to_raw)
                        .collect()
                }
                Pool::MySql(pool) => {
                    let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
                    if let Some(a) = after {
                        q = q.bind(a);
                    }
                    q.bind(limit)
                        .fetch_all(pool)
                        .await?
                        .into_iter()
                        .map(to_raw)
                        .collect()
                }
            }
        }
        .await;
        rows.map_err(|e| SyncError::Source {
            source_name: self.describe(),
            detail: e.to_string(),
        })
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

/// Open any source by URL: `postgres://…`, `mysql://…` / `mariadb://…`, or a SQLite path
/// (`sqlite://PATH` or a plain path; table mapping only).
pub async fn open_source(url: &str, spec: &SourceSpec) -> Result<Arc<dyn LegacySource>> {
    if url.starts_with("postgres") || url.starts_with("mysql://") || url.starts_with("mariadb://") {
        return Ok(Arc::new(SqlSource::open(url, spec).await?));
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    match spec {
        SourceSpec::Table(m) => Ok(Arc::new(SqliteSource::open(path, m).await?)),
        SourceSpec::Query(_) => Err(SyncError::Config(
            "a source query is supported on PostgreSQL and MySQL/MariaDB sources; use a table mapping for SQLite".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_page_by_key_and_read_text() {
        let s = statements(Dialect::MySql, &SourceSpec::Table(SourceMapping::default())).unwrap();
        assert_eq!(
            s.next,
            "SELECT CAST(`sku` AS CHAR), CAST(`qty` AS CHAR), CAST(`price_1` AS CHAR), CAST(`price_2` AS CHAR), CAST(`price_3` AS CHAR) FROM `products` WHERE `sku` > ? ORDER BY `sku` LIMIT ?"
        );
        let q = SourceSpec::Query(SourceQuery {
            sql: "SELECT code AS sku, stock AS qty, p AS price_1 FROM t WHERE code > {after} ORDER BY code LIMIT {limit}".into(),
            tiers: 1,
        });
        let s = statements(Dialect::Postgres, &q).unwrap();
        assert!(s.first.contains("code > $1 ORDER BY code LIMIT $2"));
        assert!(s.first.starts_with("SELECT CAST(bulwark_page.sku AS TEXT)"));
        let bad = SourceSpec::Query(SourceQuery {
            sql: "SELECT * FROM t".into(),
            tiers: 1,
        });
        assert!(statements(Dialect::Postgres, &bad).is_err());
        assert!(
            statements(
                Dialect::Postgres,
                &SourceSpec::Table(SourceMapping {
                    table: "x; drop".into(),
                    ..Default::default()
                })
            )
            .is_err()
        );
        assert_eq!(
            redact("postgres://u:pw@h:5432/db?x=1"),
            "postgres://h:5432/db"
        );
    }
}
