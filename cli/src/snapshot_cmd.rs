//! `bulwark snapshot`: the one read of the legacy source, as a journaled workflow.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bulwark_adapters::legacy::SourceMapping;
use bulwark_adapters::sql_source::{SourceQuery, SourceSpec, open_source};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::snapshot::SnapshotOptions;
use bulwark_workflows::snapshot_flow::{FlowOptions, SnapshotWindow, run_snapshot};

/// Arguments of `bulwark snapshot`.
#[derive(Debug, clap::Args)]
pub(crate) struct SnapshotArgs {
    /// A legacy SQLite database (opened read-only). Same as `--source-url PATH`.
    #[arg(long, conflicts_with = "source_url")]
    legacy: Option<PathBuf>,
    /// The legacy source: a SQLite path, `postgres://user@host/db` or
    /// `mysql://user:pw@host/db` (opened read-only).
    #[arg(long, env = "BULWARK_SOURCE_URL")]
    source_url: Option<String>,
    /// Table (or view) to read (table mapping).
    #[arg(long, default_value = "products")]
    table: String,
    /// SKU column: unique, pages are ordered by it.
    #[arg(long, default_value = "sku")]
    sku_column: String,
    /// Quantity column.
    #[arg(long, default_value = "qty")]
    qty_column: String,
    /// Price columns, one per tier, comma-separated, in tier order.
    #[arg(long, value_delimiter = ',', default_value = "price_1,price_2,price_3")]
    price_columns: Vec<String>,
    /// A read-only query instead of the table mapping: yields `sku`, `qty`, `price_1`…,
    /// and pages with `WHERE sku > {after} ORDER BY sku LIMIT {limit}` (PostgreSQL and
    /// MySQL/MariaDB sources).
    #[arg(long, conflicts_with_all = ["table", "sku_column", "qty_column", "price_columns"])]
    query: Option<String>,
    /// Minimum quantities of the price tiers, comma-separated (one per price column).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    tier_min_qty: Vec<u32>,
    /// Rows per query.
    #[arg(long, default_value_t = 1000)]
    page_size: u32,
    /// Pause between pages, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Read only inside windows starting at this cron expression (UTC; 5 fields, or 6
    /// with seconds first), e.g. "0 2 * * *".
    #[arg(long, requires = "window_ms")]
    window_cron: Option<String>,
    /// How long each window stays open, in milliseconds.
    #[arg(long, requires = "window_cron")]
    window_ms: Option<i64>,
    /// Abort the snapshot if more than this share of rows is rejected.
    #[arg(long, default_value_t = 0.05)]
    max_rejected_share: f64,
}

/// Run `bulwark snapshot`: resume this source's unfinished snapshot or start one, drive it
/// to the end, print what it cost the source.
pub(crate) async fn run(db: &str, args: SnapshotArgs) -> Result<()> {
    let url = match (&args.legacy, &args.source_url) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(u)) => u.clone(),
        (None, None) => bail!("give the source with --source-url URL (or --legacy PATH)"),
    };
    let spec = match &args.query {
        Some(sql) => SourceSpec::Query(SourceQuery {
            sql: sql.clone(),
            tiers: args.tier_min_qty.len(),
        }),
        None => {
            if args.price_columns.len() != args.tier_min_qty.len() {
                bail!(
                    "{} price columns but {} tier minimum quantities",
                    args.price_columns.len(),
                    args.tier_min_qty.len()
                );
            }
            SourceSpec::Table(SourceMapping {
                table: args.table.clone(),
                sku_column: args.sku_column.clone(),
                qty_column: args.qty_column.clone(),
                price_columns: args.price_columns.clone(),
            })
        }
    };
    let flow = FlowOptions {
        window: match (args.window_cron, args.window_ms) {
            (Some(cron), Some(max_duration_ms)) => Some(SnapshotWindow {
                cron,
                max_duration_ms,
            }),
            _ => None,
        },
    };
    let options = SnapshotOptions {
        page_size: args.page_size,
        pause: Duration::from_millis(args.pause_ms),
        tier_min_qty: args.tier_min_qty,
        max_rejected_share: args.max_rejected_share,
    };
    crate::ensure_db_parent(db)?;
    let app = Bulwark::open(db, bulwark_adapters::default_registry()).await?;
    let source = open_source(&url, &spec)
        .await
        .with_context(|| format!("opening the source {url:?}"))?;
    let result = run_snapshot(source.as_ref(), app.staging(), &options, &flow).await;
    app.close().await;
    let r = result?;
    println!(
        "snapshot {}: {} rows read, {} accepted, {} rejected, {} queries sent to the source, {:.2}s, hash {}",
        r.id,
        r.rows_read,
        r.accepted,
        r.rejected,
        r.queries,
        r.seconds,
        r.content_hash.unwrap_or_default()
    );
    Ok(())
}
