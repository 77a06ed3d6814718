//! `bulwark bench`: workload W1 (engine overhead) — E endpoint syncs × B batches, each
//! batch one upload and one verify step against an in-process sink, every step journaled
//! durably (SQLite WAL, synchronous=FULL) through the group-commit writer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use bulwark_adapters::memory::MemoryPortal;
use bulwark_workflows::adapter::{AdapterRegistry, EndpointConfig, PortalAdapter};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Item, PriceTier};
use bulwark_workflows::sync::SyncOptions;

/// Options of `bulwark bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// `w1` (engine overhead) or `w4` (the pause test of effect fencing: PostgreSQL,
    /// three worker processes, one stopped or killed mid-run; needs --db postgres://…).
    #[arg(long, default_value = "w1", value_parser = ["w1", "w4"])]
    workload: String,
    /// Endpoints (one durable workflow each) [default: 7200 for W1, 60 for W4].
    #[arg(long)]
    endpoints: Option<u32>,
    /// Batches per endpoint.
    #[arg(long, default_value_t = 4)]
    batches: u32,
    /// Database: a SQLite file (default: a fresh file in a temporary directory) or a
    /// `postgres://…` URL (then W1 runs with worker processes, see --workers).
    #[arg(long)]
    db: Option<String>,
    /// (PostgreSQL) numbers of worker processes to measure, e.g. `1,3`.
    #[arg(long, default_value = "1,3", value_delimiter = ',')]
    workers: Vec<usize>,
    /// (W1 on PostgreSQL) the workers' --claim-chunk [default: theirs].
    #[arg(long)]
    claim_chunk: Option<usize>,
    /// (W4) rounds per signal.
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// (W4) signals sent to the worker holding the most leases: STOP (then CONT after
    /// the others finished this run and a newer snapshot's) and/or KILL.
    #[arg(long, default_value = "STOP,KILL", value_delimiter = ',', value_parser = ["STOP", "KILL"])]
    signals: Vec<String>,
    /// (W4) SKUs of the demo legacy database.
    #[arg(long, default_value_t = 1000)]
    skus: u32,
    /// (W4) items per batch.
    #[arg(long, default_value_t = 100)]
    batch_size: u32,
    /// (W4) the workers' lease, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    lease_ms: i64,
}

impl BenchArgs {
    fn w1_endpoints(&self) -> u32 {
        self.endpoints.unwrap_or(7200)
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    if args.workload == "w4" {
        let db = args
            .db
            .clone()
            .filter(|d| crate::is_postgres(d))
            .ok_or_else(|| anyhow::anyhow!("W4 runs on PostgreSQL: give --db postgres://…"))?;
        return crate::bench_pause::run(crate::bench_pause::PauseArgs {
            db,
            runs: args.runs,
            endpoints: args.endpoints.unwrap_or(60),
            skus: args.skus,
            batch_size: args.batch_size,
            lease_ms: args.lease_ms,
            signals: args.signals,
        })
        .await;
    }
    if let Some(url) = args.db.as_deref().filter(|d| crate::is_postgres(d)) {
        for &n in &args.workers {
            run_postgres(url, n, &args).await?;
        }
        return Ok(());
    }
    let dir = tempfile_dir()?;
    let db = args
        .db
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("bench.db"));
    let sink = Arc::new(MemoryPortal::new());
    let mut registry = AdapterRegistry::new();
    let s = sink.clone();
    registry.register(
        "memory",
        Arc::new(move |_: &EndpointConfig| Ok(s.clone() as Arc<dyn PortalAdapter>)),
    );
    let app = Bulwark::open(&db, registry).await?;

    // One item per batch: W1 measures the engine, not payload handling.
    seed(&app, args.batches).await?;
    let endpoints: Vec<EndpointConfig> = (1..=args.w1_endpoints())
        .map(|i| EndpointConfig {
            policy: None,
            id: format!("ep-{i:05}"),
            adapter: "memory".into(),
            settings: Default::default(),
        })
        .collect();
    let options = SyncOptions {
        limits: Default::default(),
        batch_size: 1,
        max_in_flight: 1 << 20,
        ..Default::default()
    };

    println!("workload: W1 engine overhead");
    println!("backend: sqlite (WAL, synchronous=FULL), group commits of up to 4096 appends");
    println!(
        "endpoints: {}  batches: {}  concurrency: every workflow at once (one task each)",
        args.w1_endpoints(),
        args.batches
    );
    let started = Instant::now();
    let report = app.sync(&endpoints, &options, None).await?;
    let wall = started.elapsed().as_secs_f64();
    let steps = u64::from(args.w1_endpoints()) * u64::from(args.batches) * 2;
    let done = report.by_status.get("Done").copied().unwrap_or(0);
    anyhow::ensure!(
        done == args.w1_endpoints() as usize,
        "only {done} of {} endpoints finished",
        args.w1_endpoints()
    );
    anyhow::ensure!(
        sink.duplicates() == 0,
        "the sink saw {} duplicate applications",
        sink.duplicates()
    );
    let rows = app.store().journal_len().await?;
    if let Some(j) = app.journal_stats() {
        use std::sync::atomic::Ordering::Relaxed;
        let commits = j.commits.load(Relaxed).max(1);
        println!("commits: {commits} transactions");
        println!(
            "appends_per_commit: {:.0} appends",
            j.committed.load(Relaxed) as f64 / commits as f64
        );
        println!(
            "commit_latency_mean: {:.2} ms",
            j.commit_micros.load(Relaxed) as f64 / commits as f64 / 1000.0
        );
        println!(
            "commit_time_share: {:.0} %",
            j.commit_micros.load(Relaxed) as f64 / 1e4 / wall
        );
    }
    app.close().await;
    let size: u64 = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok())
        .map(|m| m.len())
        .sum();
    println!("durable_steps: {steps} steps");
    println!("transitions_journaled: {} transitions", report.transitions);
    println!("journal_rows: {rows} rows");
    println!("wall: {wall:.3} s");
    println!(
        "durable_steps_per_second: {:.0} steps/s",
        steps as f64 / wall
    );
    println!(
        "transitions_per_second: {:.0} transitions/s",
        report.transitions as f64 / wall
    );
    println!("sink_applied: {} batches", sink.applied());
    println!("sink_duplicates: {} batches", sink.duplicates());
    println!("peak_rss: {:.1} MiB", peak_rss_mib());
    println!("db_size: {:.1} MiB", size as f64 / (1024.0 * 1024.0));
    if args.db.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

pub(crate) fn schema_url(url: &str, schema: &str) -> String {
    format!(
        "{url}{}schema={schema}",
        if url.contains('?') { '&' } else { '?' }
    )
}

async fn seed(app: &Bulwark, batches: u32) -> Result<()> {
    let items: Vec<Item> = (0..batches)
        .map(|i| Item {
            sku: format!("B-{i:04}"),
            qty: i64::from(i),
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 100,
            }],
        })
        .collect();
    app.staging().import("bench", &items).await?;
    Ok(())
}

/// W1 on PostgreSQL with `workers` worker processes sharing the database.
async fn run_postgres(url: &str, workers: usize, args: &BenchArgs) -> Result<()> {
    let schema = format!("bulwark_bench_{}_{workers}", std::process::id());
    let db = schema_url(url, &schema);
    let (registry, endpoints, _) = crate::worker::memory_setup(args.w1_endpoints());
    let app = Bulwark::open(&db, registry).await?;
    seed(&app, args.batches).await?;
    let options = SyncOptions {
        limits: Default::default(),
        batch_size: 1,
        max_in_flight: 1 << 20,
        ..Default::default()
    };
    let plan = app
        .enqueue(&endpoints, &options)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
    let run = plan.run.ok_or_else(|| anyhow::anyhow!("nothing planned"))?;
    println!("workload: W1 engine overhead");
    if let bulwark_engine::Backend::Postgres(pg) = app.backend() {
        let fsync: String = sqlx::query_scalar("SHOW fsync")
            .fetch_one(pg.pool())
            .await?;
        let sc: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(pg.pool())
            .await?;
        println!(
            "backend: postgresql (fsync={fsync}, synchronous_commit={sc}), unnest group commit"
        );
    }
    println!(
        "endpoints: {}  batches: {}  worker_processes: {workers}",
        args.w1_endpoints(),
        args.batches
    );
    let exe = std::env::current_exe()?;
    let pool = match app.backend() {
        bulwark_engine::Backend::Postgres(pg) => pg.pool().clone(),
        bulwark_engine::Backend::Sqlite(_) => unreachable!("postgres bench"),
    };
    let deadlocks_before = pg_deadlocks(&pool).await?;
    let logs = tempfile_dir()?.join(format!("pg-workers-{workers}"));
    std::fs::create_dir_all(&logs)?;
    let started_ms = bulwark_engine::now_ms();
    let started = Instant::now();
    let mut children = Vec::new();
    for n in 0..workers {
        let log = std::fs::File::create(logs.join(format!("worker-{n}.log")))?;
        children.push(
            tokio::process::Command::new(&exe)
                .args([
                    "worker",
                    "--sink",
                    "memory",
                    "--exit-when-idle",
                    "--batch-size",
                    "1",
                    "--max-in-flight",
                    "1048576",
                ])
                .args(["--db", &db, "--endpoints", &args.w1_endpoints().to_string()])
                .args(
                    args.claim_chunk
                        .map(|c| vec!["--claim-chunk".to_string(), c.to_string()])
                        .unwrap_or_default(),
                )
                // Default capacity: how the work spreads is measured.
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()?,
        );
    }
    for mut c in children {
        let status = c.wait().await?;
        anyhow::ensure!(status.success(), "a worker failed: {status}");
    }
    let waited = started.elapsed().as_secs_f64();
    let store = app.store();
    let counts: std::collections::HashMap<String, i64> =
        store.status_counts(Some(run)).await?.into_iter().collect();
    let done = counts.get("Done").copied().unwrap_or(0);
    anyhow::ensure!(
        done == i64::from(args.w1_endpoints()),
        "only {done} of {} endpoints finished: {counts:?}",
        args.w1_endpoints()
    );
    // Wall time of the work itself: from spawning the workers to the last journaled step
    // (idle workers notice the end only at their next poll).
    let last_ms: i64 = match app.backend() {
        bulwark_engine::Backend::Postgres(pg) => {
            sqlx::query_scalar("SELECT max(at) FROM journal")
                .fetch_one(pg.pool())
                .await?
        }
        bulwark_engine::Backend::Sqlite(_) => unreachable!("postgres bench"),
    };
    let wall = (last_ms - started_ms) as f64 / 1000.0;
    let steps = u64::from(args.w1_endpoints()) * u64::from(args.batches) * 2;
    let rows = store.journal_len().await?;
    println!("durable_steps: {steps} steps");
    println!("journal_rows: {rows} rows");
    println!("wall: {wall:.3} s");
    println!("wall_until_workers_exited: {waited:.3} s");
    println!(
        "durable_steps_per_second: {:.0} steps/s",
        steps as f64 / wall
    );
    // Each worker's share of the journal, and deadlocks: those the database counted
    // (database-wide, so other sessions' too) and those the workers logged.
    let shares: Vec<(String, i64)> = sqlx::query_as(
        "SELECT worker, count(*) FROM journal WHERE seq > 0 GROUP BY worker ORDER BY count(*) DESC",
    )
    .fetch_all(&pool)
    .await?;
    let total: i64 = shares.iter().map(|s| s.1).sum::<i64>().max(1);
    for (i, (w, n)) in shares.iter().enumerate() {
        println!(
            "worker_{}_share: {:.1} % ({w})",
            i + 1,
            100.0 * *n as f64 / total as f64
        );
    }
    let mut logged = 0;
    for n in 0..workers {
        logged += std::fs::read_to_string(logs.join(format!("worker-{n}.log")))
            .unwrap_or_default()
            .matches("deadlock detected")
            .count();
    }
    // The statistics reach pg_stat_database within a second or so.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    println!(
        "deadlocks_detected_by_database: {} deadlocks",
        pg_deadlocks(&pool).await? - deadlocks_before
    );
    println!("deadlocks_in_worker_logs: {logged} lines");
    let _ = std::fs::remove_dir_all(&logs);
    if let bulwark_engine::Backend::Postgres(pg) = app.backend() {
        pg.drop_schema().await?;
    }
    app.close().await;
    Ok(())
}

/// Deadlocks PostgreSQL has detected in this database since its statistics were reset.
pub(crate) async fn pg_deadlocks(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(deadlocks, 0) FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bulwark-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
