//! `bulwark demo`: the whole pipeline on one machine, with nothing to set up.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bulwark_adapters::legacy::{
    SourceMapping, SqliteSource, generate_demo_legacy, touch_demo_legacy,
};
use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::snapshot::SnapshotOptions;

use crate::{SyncArgs, broken_profiles, demo_endpoints, progress, sync_options};

/// Options of `bulwark demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Directory for the demo's databases (legacy, Bulwark's own, the portal's record).
    #[arg(long, default_value = "bulwark-data")]
    data_dir: PathBuf,
    /// Simulated endpoints.
    #[arg(long, default_value_t = 500)]
    endpoints: u32,
    /// SKUs in the generated legacy database (used when it is first created).
    #[arg(long, default_value_t = 7200)]
    skus: u32,
    /// Endpoints broken on purpose (one stores wrong values, the others reject uploads).
    #[arg(long, default_value_t = 3)]
    broken: u32,
    /// Change this share of the legacy SKUs before the snapshot (e.g. 0.01), to see a delta sync.
    #[arg(long, default_value_t = 0.0)]
    change: f64,
    /// Delete the data directory first and start over.
    #[arg(long)]
    fresh: bool,
    /// Rows per query when snapshotting the legacy database.
    #[arg(long, default_value_t = 1000)]
    page_size: u32,
    #[command(flatten)]
    sync: SyncArgs,
}

pub(crate) async fn run(args: DemoArgs) -> Result<()> {
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("removing {}", args.data_dir.display()))?;
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let legacy = args.data_dir.join("legacy.db");
    if !legacy.exists() {
        generate_demo_legacy(&legacy, args.skus, 42).await?;
        println!(
            "1. legacy database {} generated: {} SKUs, quantity and 3 price tiers each",
            legacy.display(),
            args.skus
        );
    } else {
        println!("1. legacy database {} (existing)", legacy.display());
    }
    if args.change > 0.0 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let n = touch_demo_legacy(&legacy, args.change, seed).await?;
        println!("   changed the quantity of {n} SKUs in the legacy database");
    }

    let mut app = Bulwark::open(
        args.data_dir.join("bulwark.db"),
        bulwark_adapters::default_registry(),
    )
    .await?;
    let source = SqliteSource::open(&legacy, &SourceMapping::default()).await?;
    let snap = app
        .snapshot(
            &source,
            &SnapshotOptions {
                page_size: args.page_size,
                pause: Duration::ZERO,
                ..Default::default()
            },
        )
        .await?;
    println!(
        "2. snapshot {} sealed: {} rows read, {} accepted, {} rejected, {} queries sent to the legacy database, {:.2}s",
        snap.id, snap.rows_read, snap.accepted, snap.rejected, snap.queries, snap.seconds
    );

    let sim = simulator::start(
        SimConfig {
            db_path: Some(args.data_dir.join("portal-record.db")),
            profiles: broken_profiles(args.endpoints, args.broken),
            ..Default::default()
        },
        "127.0.0.1:0".parse().expect("loopback address"),
    )
    .await?;
    let portal = format!("http://{}", sim.addr());
    println!(
        "3. portal simulator on {portal}: {} endpoints, {} broken on purpose",
        args.endpoints,
        args.broken.min(args.endpoints)
    );

    let endpoints = demo_endpoints(args.endpoints, &portal);
    let bar = progress::Progress::new();
    let report = app
        .sync(&endpoints, &sync_options(&args.sync), Some(bar.clone()))
        .await?;
    bar.finish();
    println!("4. sync finished");
    progress::print_summary(&report);
    let stats = sim.stats();
    println!(
        "portal: {} HTTP requests, {} uploads received, {} batches applied, {} duplicates applied, {} deduplicated by idempotency key",
        stats.requests,
        stats.uploads_received,
        stats.batches_applied,
        stats.duplicates_applied,
        stats.deduplicated
    );
    println!("legacy database queries during the sync: 0 (sync reads staging only)");
    sim.shutdown().await?;
    app.close().await;
    Ok(())
}
