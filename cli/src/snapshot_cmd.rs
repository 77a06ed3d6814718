//! `bulwark snapshot`: the one read of the legacy source, as a journaled workflow.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bulwark_adapters::legacy::SourceMapping;
use bulwark_adapters::sql_source::{SourceQuery, SourceSpec, open_source_with};
use bulwark_adapters::text::TextDecoding;
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::snapshot::SnapshotOptions;
use bulwark_workflows::snapshot_flow::{FlowOptions, SnapshotWindow, run_snapshot};
use bulwark_workflows::staging::ChangeGuard;

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
    /// Hold the snapshot (sync nothing until `bulwark snapshot approve`) if more than this
    /// share of the previous snapshot's SKUs would be removed or drop to stock 0.
    #[arg(long, default_value_t = 0.05)]
    max_removed_share: f64,
    /// Hold the snapshot if more than this share of the previous snapshot's SKUs changes.
    #[arg(long, default_value_t = 0.5)]
    max_changed_share: f64,
    /// What text that is not valid UTF-8 is (a WHATWG label: windows-1252, latin1,
    /// iso-8859-15, shift_jis…); with utf-8 such a row is rejected, naming the column.
    #[arg(long, default_value = "utf-8")]
    encoding: String,
}

/// `bulwark snapshot approve ID`: release a held snapshot to sync runs.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum SnapshotAction {
    /// Approve a held snapshot (one whose change against the previous sealed snapshot
    /// exceeded max_removed_share or max_changed_share): sync runs may then use it.
    Approve {
        /// The snapshot id (`bulwark status` or `bulwark alerts` name it).
        id: i64,
        #[command(flatten)]
        db: crate::StoreArgs,
    },
}

/// `[source]` of `bulwark.toml`: the legacy source scheduled snapshots read, with the
/// same keys (and defaults) as `bulwark snapshot`'s flags.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SourceSection {
    /// A SQLite path, `postgres://…` or `mysql://…` (opened read-only).
    url: Option<String>,
    /// Environment variable holding the URL (it may carry a password).
    url_env: Option<String>,
    table: String,
    sku_column: String,
    qty_column: String,
    price_columns: Vec<String>,
    query: Option<String>,
    tier_min_qty: Vec<u32>,
    page_size: u32,
    pause_ms: u64,
    window_cron: Option<String>,
    window_ms: Option<i64>,
    max_rejected_share: f64,
    max_removed_share: f64,
    max_changed_share: f64,
    encoding: String,
}

impl Default for SourceSection {
    fn default() -> Self {
        let o = SnapshotOptions::default();
        Self {
            url: None,
            url_env: None,
            table: "products".into(),
            sku_column: "sku".into(),
            qty_column: "qty".into(),
            price_columns: vec!["price_1".into(), "price_2".into(), "price_3".into()],
            query: None,
            tier_min_qty: o.tier_min_qty.clone(),
            page_size: o.page_size,
            pause_ms: o.pause.as_millis() as u64,
            window_cron: None,
            window_ms: None,
            max_rejected_share: o.max_rejected_share,
            max_removed_share: o.guard.max_removed_share,
            max_changed_share: o.guard.max_changed_share,
            encoding: "utf-8".into(),
        }
    }
}

impl SourceSection {
    /// Check the section; on error, the key at fault and why.
    pub(crate) fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.url.is_some() == self.url_env.is_some() {
            return Err(("url", "give exactly one of url and url_env".into()));
        }
        if self.page_size == 0 {
            return Err(("page_size", "must be at least 1".into()));
        }
        if self.query.is_none() && self.price_columns.len() != self.tier_min_qty.len() {
            return Err((
                "tier_min_qty",
                format!(
                    "{} price columns but {} tier minimum quantities",
                    self.price_columns.len(),
                    self.tier_min_qty.len()
                ),
            ));
        }
        match (&self.window_cron, self.window_ms) {
            (Some(c), Some(ms)) => {
                bulwark_engine::schedule::parse_cron(c).map_err(|e| ("window_cron", e))?;
                if ms <= 0 {
                    return Err(("window_ms", "must be at least 1".into()));
                }
            }
            (None, None) => {}
            _ => {
                return Err((
                    "window_cron",
                    "window_cron and window_ms go together".into(),
                ));
            }
        }
        for (key, share) in [
            ("max_rejected_share", self.max_rejected_share),
            ("max_removed_share", self.max_removed_share),
            ("max_changed_share", self.max_changed_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err((key, "must be between 0 and 1".into()));
            }
        }
        TextDecoding::from_label(&self.encoding).map_err(|e| ("encoding", e))?;
        Ok(())
    }

    /// The snapshot this section describes.
    pub(crate) fn plan(&self, dir: &std::path::Path) -> Result<SnapshotPlan> {
        let url = match (&self.url, &self.url_env) {
            (Some(u), _) => u.clone(),
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| anyhow::anyhow!("[source] url_env: variable {var} is not set"))?,
            (None, None) => bail!("[source] needs url or url_env"),
        };
        // A relative SQLite path is relative to the configuration file.
        let url = if url.contains("://") || std::path::Path::new(&url).is_absolute() {
            url
        } else {
            dir.join(&url).display().to_string()
        };
        SnapshotArgs {
            legacy: None,
            source_url: Some(url),
            table: self.table.clone(),
            sku_column: self.sku_column.clone(),
            qty_column: self.qty_column.clone(),
            price_columns: self.price_columns.clone(),
            query: self.query.clone(),
            tier_min_qty: self.tier_min_qty.clone(),
            page_size: self.page_size,
            pause_ms: self.pause_ms,
            window_cron: self.window_cron.clone(),
            window_ms: self.window_ms,
            max_rejected_share: self.max_rejected_share,
            max_removed_share: self.max_removed_share,
            max_changed_share: self.max_changed_share,
            encoding: self.encoding.clone(),
        }
        .plan()
    }
}

/// A snapshot to take: where from, what to read, how gently.
pub(crate) struct SnapshotPlan {
    url: String,
    spec: SourceSpec,
    decoding: TextDecoding,
    flow: FlowOptions,
    options: SnapshotOptions,
}

impl SnapshotArgs {
    fn plan(self) -> Result<SnapshotPlan> {
        let args = self;
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
        for (flag, share) in [
            ("--max-rejected-share", args.max_rejected_share),
            ("--max-removed-share", args.max_removed_share),
            ("--max-changed-share", args.max_changed_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                bail!("{flag} must be between 0 and 1, got {share}");
            }
        }
        let options = SnapshotOptions {
            page_size: args.page_size,
            pause: Duration::from_millis(args.pause_ms),
            tier_min_qty: args.tier_min_qty,
            max_rejected_share: args.max_rejected_share,
            guard: ChangeGuard {
                max_removed_share: args.max_removed_share,
                max_changed_share: args.max_changed_share,
            },
        };
        let decoding = TextDecoding::from_label(&args.encoding)
            .map_err(|e| anyhow::anyhow!("--encoding: {e}"))?;
        Ok(SnapshotPlan {
            url,
            spec,
            decoding,
            flow,
            options,
        })
    }
}

/// Run `bulwark snapshot`: resume this source's unfinished snapshot or start one, drive it
/// to the end, print what it cost the source.
///
/// With `--config` and no `--source-url`/`--legacy`, the file's `[source]` is the snapshot
/// (all of it: the flags that shape a read are then not used).
pub(crate) async fn run(store: &crate::StoreArgs, args: SnapshotArgs, json: bool) -> Result<()> {
    let (db, config) = store.load()?;
    let plan = match &config {
        Some(c) if args.legacy.is_none() && args.source_url.is_none() => match &c.source {
            Some(source) => source.plan(c.dir())?,
            None => bail!(
                "{} has no [source]; give the source with --source-url URL (or --legacy PATH)",
                store
                    .config
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            ),
        },
        _ => args.plan()?,
    };
    let db = db.as_str();
    crate::ensure_db_parent(db)?;
    let app = Bulwark::open(db, bulwark_adapters::default_registry()).await?;
    let r = take(&app, &plan).await;
    app.close().await;
    let r = r?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "snapshot {}: {} rows read, {} accepted, {} rejected, in {:.2}s",
        r.id, r.rows_read, r.accepted, r.rejected, r.seconds,
    );
    println!("  {} queries sent to the source", r.queries);
    println!("  content hash {}", r.content_hash.unwrap_or_default());
    if r.carried > 0 {
        println!(
            "  {} rejected row(s) keep their SKU's last accepted value (see `bulwark alerts`)",
            r.carried
        );
    }
    if let Some(why) = &r.held {
        println!("  HELD, no sync uses it: {why}");
        println!("  if the change is real: bulwark snapshot approve {}", r.id);
    }
    Ok(())
}

/// `bulwark snapshot approve ID`.
pub(crate) async fn approve(db: &str, id: i64) -> Result<std::process::ExitCode> {
    let app = Bulwark::open(db, bulwark_adapters::default_registry()).await?;
    let staging = app.staging();
    let reason = staging.held_reason(id).await?;
    let approved = staging.approve(id).await?;
    // Only for the refusal's message: what the snapshot is instead of held.
    let row = if approved {
        None
    } else {
        staging.snapshot(id).await?
    };
    app.close().await;
    if approved {
        println!(
            "snapshot {id} approved (it was held: {}); sync runs may now use it",
            reason.unwrap_or_default()
        );
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        let status = row.map_or_else(
            || "no such snapshot".to_string(),
            |r| format!("it is {}", r.status),
        );
        eprintln!("snapshot {id} is not held ({status}); nothing to approve");
        Ok(std::process::ExitCode::from(1))
    }
}

/// Take (or resume) the snapshot `plan` describes into `app`'s staging.
pub(crate) async fn take(
    app: &Bulwark,
    plan: &SnapshotPlan,
) -> Result<bulwark_workflows::snapshot::SnapshotReport> {
    let url = &plan.url;
    let source = open_source_with(url, &plan.spec, plan.decoding)
        .await
        .with_context(|| {
            format!(
                "opening the source {}",
                bulwark_engine::postgres::redact_url(url)
            )
        })?;
    Ok(run_snapshot(source.as_ref(), app.staging(), &plan.options, &plan.flow).await?)
}
