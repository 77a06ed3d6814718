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
    /// Browser endpoints (portals with only a web UI, synced through Chromium) added when
    /// Chromium and chromedriver are installed.
    #[arg(long, default_value_t = 2)]
    browser_endpoints: u32,
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

    let mut endpoints = demo_endpoints(args.endpoints, &portal);
    let mut registry_extra = None;
    let mut web_sim = None;
    if args.browser_endpoints > 0 {
        match browser_endpoints(&args.data_dir, args.browser_endpoints).await? {
            Ok((eps, factory, sim)) => {
                println!(
                    "   + web-UI portal simulator on http://{}: {} browser endpoint(s) synced through Chromium",
                    sim.addr(),
                    eps.len()
                );
                endpoints.extend(eps);
                registry_extra = Some(factory);
                web_sim = Some(sim);
            }
            Err(why) => println!("   (no browser endpoints: {why})"),
        }
    }
    if let Some(factory) = registry_extra {
        app.register_adapter("webdriver", factory);
    }
    // What the sync is about to send, as `bulwark sync --dry-run` shows it.
    let options = sync_options(&args.sync);
    if let Some(plan) = app.dry_run(&endpoints, &options).await? {
        print!("4. ");
        crate::dry_run_cmd::print(&plan, 3);
    }
    let bar = progress::Progress::new();
    let report = app.sync(&endpoints, &options, Some(bar.clone())).await?;
    bar.finish();
    println!("5. sync finished");
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
    drop(web_sim);
    app.close().await;
    Ok(())
}

/// Web-UI portals for the demo, synced through Chromium with the manifest-upload recipe.
/// `Ok(Err(why))` when Chromium or chromedriver is missing.
async fn browser_endpoints(
    data_dir: &std::path::Path,
    n: u32,
) -> Result<
    std::result::Result<
        (
            Vec<bulwark_workflows::adapter::EndpointConfig>,
            bulwark_workflows::adapter::AdapterFactory,
            bulwark_adapters::sim_webui::WebSimHandle,
        ),
        String,
    >,
> {
    use bulwark_adapters::sim_webui::{self, WebPortal};
    use bulwark_adapters::webdriver::{self, MapSecrets, PoolConfig, WebDriverPool};
    let config = PoolConfig::from_env();
    if let Err(why) = config.check_available() {
        return Ok(Err(why));
    }
    // Demo credentials for the demo's own portals; real ones come from the environment.
    let (user, pass) = ("demo-user", "demo-password");
    let ids: Vec<String> = (1..=n).map(|i| format!("web-{i}")).collect();
    let portals = ids
        .iter()
        .map(|id| WebPortal::new(id, user, pass))
        .collect();
    let sim = sim_webui::start(portals, "127.0.0.1:0".parse().expect("loopback")).await?;
    let recipes = data_dir.join("recipes");
    std::fs::create_dir_all(&recipes)?;
    let recipe = recipes.join("manifest.toml");
    std::fs::write(&recipe, sim_webui::MANIFEST_RECIPE)?;
    let endpoints = ids
        .iter()
        .map(|id| bulwark_workflows::adapter::EndpointConfig {
            policy: None,
            id: id.clone(),
            adapter: "webdriver".into(),
            settings: [
                ("recipe".to_string(), recipe.display().to_string()),
                ("base_url".to_string(), sim.base_url(id)),
                (
                    "artifacts_dir".to_string(),
                    data_dir.join("artifacts").display().to_string(),
                ),
            ]
            .into(),
        })
        .collect();
    let secrets = MapSecrets(
        [
            ("BULWARK_SIM_USER".to_string(), user.to_string()),
            ("BULWARK_SIM_PASS".to_string(), pass.to_string()),
        ]
        .into(),
    );
    let factory = webdriver::factory(WebDriverPool::new(config), std::sync::Arc::new(secrets));
    Ok(Ok((endpoints, factory, sim)))
}
