//! `bulwark prune`: retention by hand (the worker does the same on `[schedule] prune`).

use anyhow::Result;
use bulwark_workflows::app::{Bulwark, PruneReport};

/// Arguments of `bulwark prune`; the flags override `[retention]` of --config.
#[derive(Debug, clap::Args)]
pub(crate) struct PruneArgs {
    #[command(flatten)]
    db: crate::StoreArgs,
    /// Keep journals of runs that ended within this many days (0: forever).
    #[arg(long, value_name = "DAYS")]
    journal_days: Option<u32>,
    /// Keep alerts of this many days (0: forever).
    #[arg(long, value_name = "DAYS")]
    alert_days: Option<u32>,
    /// Keep staged snapshots of this many days (0: forever; those an endpoint's state or a
    /// running run needs are kept whatever their age).
    #[arg(long, value_name = "DAYS")]
    snapshot_days: Option<u32>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// One line saying what a prune removed.
pub(crate) fn summary(r: &PruneReport) -> String {
    format!(
        "removed {} workflow(s) with {} journal row(s), {} run(s), {} alert(s), {} snapshot(s) with {} item(s)",
        r.workflows, r.journal_rows, r.runs, r.alerts, r.snapshots, r.snapshot_items
    )
}

/// Run `bulwark prune`.
pub(crate) async fn run(args: PruneArgs) -> Result<()> {
    let (db, config) = args.db.load()?;
    let mut keep = config
        .as_ref()
        .map(|c| c.retention.days())
        .unwrap_or_default();
    let days = |d: u32| (d > 0).then_some(d);
    if let Some(d) = args.journal_days {
        keep.journal_days = days(d);
    }
    if let Some(d) = args.alert_days {
        keep.alert_days = days(d);
    }
    if let Some(d) = args.snapshot_days {
        keep.snapshot_days = days(d);
    }
    // Pruning an absent database would create one only to find nothing in it.
    let app = Bulwark::open_for_reading(&db, bulwark_adapters::default_registry()).await?;
    app.close().await;
    let app = Bulwark::open(&db, bulwark_adapters::default_registry()).await?;
    let r = app.prune(&keep).await;
    app.close().await;
    let r = r?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", summary(&r));
    }
    Ok(())
}
