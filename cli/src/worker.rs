//! `bulwark worker` and `bulwark sync` on a shared (PostgreSQL) database.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use bulwark_adapters::memory::MemoryPortal;
use bulwark_engine::WorkOptions;
use bulwark_workflows::adapter::{AdapterRegistry, EndpointConfig, PortalAdapter};
use bulwark_workflows::app::Bulwark;

use crate::{DbArg, EndpointArgs, SyncArgs, ensure_db_parent, progress, sync_options};

/// Options of `bulwark worker`.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    #[command(flatten)]
    db: DbArg,
    #[command(flatten)]
    endpoints: EndpointArgs,
    /// Where batches go: `rest` (the configured or simulated endpoints) or `memory` (an
    /// in-process sink, for W1).
    #[arg(long, default_value = "rest")]
    sink: String,
    #[command(flatten)]
    sync: SyncArgs,
    /// Most endpoint syncs driven at once by this worker.
    #[arg(long, default_value_t = 10_000)]
    capacity: usize,
    /// Lease length in milliseconds (heartbeats renew it every third of that).
    #[arg(long, default_value_t = 30_000)]
    lease_ms: i64,
    /// Exit once every run is finished and nothing is claimable.
    #[arg(long)]
    exit_when_idle: bool,
}

/// Endpoints of the in-process sink (`--sink memory`), ids as the demo's.
pub(crate) fn memory_setup(n: u32) -> (AdapterRegistry, Vec<EndpointConfig>, Arc<MemoryPortal>) {
    let sink = Arc::new(MemoryPortal::new());
    let mut registry = AdapterRegistry::new();
    let s = sink.clone();
    registry.register(
        "memory",
        Arc::new(move |_: &EndpointConfig| Ok(s.clone() as Arc<dyn PortalAdapter>)),
    );
    let endpoints = (1..=n)
        .map(|i| EndpointConfig {
            id: crate::endpoint_id(i),
            adapter: "memory".into(),
            settings: Default::default(),
        })
        .collect();
    (registry, endpoints, sink)
}

pub(crate) async fn run(args: WorkerArgs) -> Result<ExitCode> {
    let (db, registry, endpoints, options) = match args.sink.as_str() {
        "memory" => {
            ensure_db_parent(&args.db.db)?;
            let (r, e, _) = memory_setup(args.endpoints.endpoints);
            (args.db.db.clone(), r, e, sync_options(&args.sync))
        }
        "rest" => {
            let s = crate::setup(&args.db, &args.endpoints, &args.sync).await?;
            (s.db, s.registry, s.endpoints, s.options)
        }
        other => anyhow::bail!("unknown --sink {other:?} (rest or memory)"),
    };
    let mut app = Bulwark::open(&db, registry).await?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("stopping: finishing current steps and releasing leases");
            stop.store(true, Ordering::Relaxed);
        });
    }
    eprintln!(
        "worker {} on {} ({} endpoints)",
        app.worker_id(),
        bulwark_engine::postgres::redact_url(&db),
        endpoints.len()
    );
    let work = WorkOptions {
        capacity: args.capacity,
        exit_when_idle: args.exit_when_idle,
        ..Default::default()
    };
    let report = app
        .work(&endpoints, &options, work, args.lease_ms, stop, None)
        .await?;
    progress::print_summary_worker(&report);
    app.close().await;
    Ok(ExitCode::SUCCESS)
}

/// `bulwark sync` on PostgreSQL: plan the run for the workers; optionally wait for it.
pub(crate) async fn enqueue(setup: crate::Setup, wait: bool) -> Result<ExitCode> {
    let app = Bulwark::open(&setup.db, setup.registry).await?;
    let Some(plan) = app.enqueue(&setup.endpoints, &setup.options).await? else {
        println!("no sealed snapshot yet: run `bulwark snapshot` first");
        return Ok(ExitCode::from(1));
    };
    let Some(run) = plan.run else {
        println!(
            "snapshot {}: all {} endpoint(s) already up to date; nothing to do",
            plan.snapshot, plan.up_to_date
        );
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "run {run} enqueued: snapshot {}, {} endpoint(s) to sync, {} up to date, {} batches",
        plan.snapshot, plan.workflows, plan.up_to_date, plan.batches
    );
    if wait {
        let store = app.store();
        loop {
            let runs = store.runs().await?;
            if runs.iter().any(|r| r.id == run && r.status != "running") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let counts = store.status_counts(Some(run)).await?;
        let states: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("run {run} finished: {}", states.join(" "));
    }
    app.close().await;
    Ok(ExitCode::SUCCESS)
}
