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
//! - SKUs should be unique (the paging key). Rows sharing a SKU are all rejected (the SKU
//!   keeps its last accepted value); rows with one key are always read on one page. A page
//!   holding the cursor's key again means the query does not page by `{after}`: the
//!   snapshot stops with an error rather than read the same page forever.
//!
//! Bulwark wraps the query as `SELECT CAST(sku AS text), … FROM (query) AS bulwark_page
//! ORDER BY sku`, so numeric and decimal columns are read as text (exactly as stored);
//! MySQL/MariaDB columns are cast to BINARY instead, and every column is read as bytes
//! and decoded by [`crate::text`] (text that is not UTF-8 is decoded with the source's
//! `encoding` or its row rejected, naming the column; never a panic, never a `?`).
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

use crate::legacy::{SourceMapping, SqliteSource, decode_row};
use crate::text::{TextDecoding, token_bytes, token_is_text};

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
    /// PostgreSQL with `server_encoding = SQL_ASCII`: text is bytes the server does not
    /// know, and it refuses to send bytes that are not UTF-8 as text; they are read with
    /// `convert_to(…, 'SQL_ASCII')` (bytes as stored) instead.
    PostgresSqlAscii,
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
            Self::Postgres | Self::PostgresSqlAscii => format!("\"{name}\""),
            Self::MySql => format!("`{name}`"),
        })
    }
    fn text(self, expr: &str) -> String {
        match self {
            Self::Postgres => format!("CAST({expr} AS TEXT)"),
            Self::PostgresSqlAscii => format!("convert_to(CAST({expr} AS TEXT), 'SQL_ASCII')"),
            // BINARY, not CHAR: CHAR turns bytes that are not valid in the connection's
            // character set into '?' without an error; the bytes are decoded here instead.
            Self::MySql => format!("CAST({expr} AS BINARY)"),
        }
    }
    fn param(self, n: usize) -> String {
        match self {
            Self::Postgres | Self::PostgresSqlAscii => format!("${n}"),
            Self::MySql => "?".into(),
        }
    }
    /// The cursor parameter when the key is bytes that are not UTF-8 (only a server that
    /// does not know its text, PostgreSQL `SQL_ASCII` or a MySQL binary column, sends
    /// those): compared as the same bytes.
    fn bytes_param(self, n: usize) -> String {
        match self {
            Self::Postgres | Self::PostgresSqlAscii => format!("convert_from(${n}, 'SQL_ASCII')"),
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
    /// `next` with the cursor bound as bytes ([`Dialect::bytes_param`]).
    next_bytes: String,
    first_binds_after: bool,
    /// Column names, in the order selected (sku, qty, prices…), for messages.
    columns: Vec<String>,
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
            let next = |after: String| {
                format!(
                    "{head} WHERE {sku} > {after} ORDER BY {sku} LIMIT {}",
                    dialect.param(2)
                )
            };
            Ok(Statements {
                first: format!("{head} ORDER BY {sku} LIMIT {}", dialect.param(1)),
                next: next(dialect.param(1)),
                next_bytes: next(dialect.bytes_param(1)),
                first_binds_after: false,
                columns: std::iter::once(&m.sku_column)
                    .chain(std::iter::once(&m.qty_column))
                    .chain(&m.price_columns)
                    .cloned()
                    .collect(),
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
            let columns: Vec<String> = ["sku".to_string(), "qty".to_string()]
                .into_iter()
                .chain((1..=q.tiers).map(|i| format!("price_{i}")))
                .collect();
            let cols = columns[1..]
                .iter()
                .map(|c| dialect.text(&format!("bulwark_page.{c}")))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = |after: String| {
                let inner = q
                    .sql
                    .trim()
                    .trim_end_matches(';')
                    .replace("{after}", &after)
                    .replace("{limit}", &dialect.param(2));
                format!(
                    "SELECT {}, {cols} FROM ({inner}) AS bulwark_page ORDER BY bulwark_page.sku",
                    dialect.text("bulwark_page.sku")
                )
            };
            Ok(Statements {
                first: sql(dialect.param(1)),
                next: sql(dialect.param(1)),
                next_bytes: sql(dialect.bytes_param(1)),
                first_binds_after: true,
                columns,
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
    decoding: TextDecoding,
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
            let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
                .fetch_one(&pool)
                .await
                .map_err(|e| err(&e))?;
            let dialect = if encoding.eq_ignore_ascii_case("SQL_ASCII") {
                Dialect::PostgresSqlAscii
            } else {
                Dialect::Postgres
            };
            (Pool::Postgres(pool), dialect)
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
            decoding: TextDecoding::default(),
            queries: AtomicU64::new(0),
        })
    }

    /// Decode text that is not UTF-8 with `decoding` (see [`crate::text`]).
    pub fn with_decoding(mut self, decoding: TextDecoding) -> Self {
        self.decoding = decoding;
        self
    }

    /// Close the connection.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Postgres(p) => p.close().await,
            Pool::MySql(p) => p.close().await,
        }
    }
}

/// A row's columns as the bytes the server sent (text columns, cast to text), so that
/// bytes that are not UTF-8 are decoded or rejected, never an error for the whole page.
fn raw_columns<R: Row>(r: R) -> std::result::Result<Vec<Option<Vec<u8>>>, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> Option<Vec<u8>>: sqlx::Decode<'a, R::Database>,
{
    (0..r.len())
        .map(|i| r.try_get_unchecked::<Option<Vec<u8>>, _>(i))
        .collect()
}

#[async_trait]
impl LegacySource for SqlSource {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    async fn page(&self, after: Option<&str>, limit: u32) -> Result<Vec<RawRow>> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let limit = i64::from(limit);
        // The cursor goes back as text, or as the key's bytes when they are not UTF-8.
        enum After {
            Text(String),
            Bytes(Vec<u8>),
        }
        let (sql, after) = match after {
            Some(a) if token_is_text(a) => (&self.sql.next, Some(After::Text(a.to_string()))),
            Some(a) => (&self.sql.next_bytes, Some(After::Bytes(token_bytes(a)))),
            None if self.sql.first_binds_after => {
                (&self.sql.first, Some(After::Text(String::new())))
            }
            None => (&self.sql.first, None),
        };
        let rows: std::result::Result<Vec<Vec<Option<Vec<u8>>>>, sqlx::Error> = async {
            macro_rules! fetch {
                ($pool:expr) => {{
                    let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
                    match after {
                        Some(After::Text(a)) => q = q.bind(a),
                        Some(After::Bytes(b)) => q = q.bind(b),
                        None => {}
                    }
                    q.bind(limit)
                        .fetch_all($pool)
                        .await?
                        .into_iter()
                        .map(raw_columns)
                        .collect()
                }};
            }
            match &self.pool {
                Pool::Postgres(pool) => fetch!(pool),
                Pool::MySql(pool) => fetch!(pool),
            }
        }
        .await;
        let rows = rows.map_err(|e| SyncError::Source {
            source_name: self.describe(),
            detail: e.to_string(),
        })?;
        Ok(rows
            .into_iter()
            .map(|raw| decode_row(&self.sql.columns, raw, &self.decoding))
            .collect())
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

/// Open any source by URL: `postgres://…`, `mysql://…` / `mariadb://…`, or a SQLite path
/// (`sqlite://PATH` or a plain path; table mapping only).
pub async fn open_source(url: &str, spec: &SourceSpec) -> Result<Arc<dyn LegacySource>> {
    open_source_with(url, spec, TextDecoding::default()).await
}

/// [`open_source`], decoding text that is not UTF-8 with `decoding`.
pub async fn open_source_with(
    url: &str,
    spec: &SourceSpec,
    decoding: TextDecoding,
) -> Result<Arc<dyn LegacySource>> {
    if url.starts_with("postgres") || url.starts_with("mysql://") || url.starts_with("mariadb://") {
        return Ok(Arc::new(
            SqlSource::open(url, spec).await?.with_decoding(decoding),
        ));
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    match spec {
        SourceSpec::Table(m) => Ok(Arc::new(
            SqliteSource::open(path, m).await?.with_decoding(decoding),
        )),
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
            "SELECT CAST(`sku` AS BINARY), CAST(`qty` AS BINARY), CAST(`price_1` AS BINARY), CAST(`price_2` AS BINARY), CAST(`price_3` AS BINARY) FROM `products` WHERE `sku` > ? ORDER BY `sku` LIMIT ?"
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
