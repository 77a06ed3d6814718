//! `bulwark worker` (scheduler, claims, replay, alert delivery) and `bulwark sync` on a
//! shared (PostgreSQL) database.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use bulwark_adapters::memory::MemoryPortal;
use bulwark_engine::WorkOptions;
use bulwark_engine::alerts::{DeliveryOptions, deliver_alerts};
use bulwark_engine::schedule::{BoxFuture, Schedule, run_schedules};
use bulwark_workflows::adapter::{AdapterRegistry, EndpointConfig, PortalAdapter};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::app::WorkerOptions;
use bulwark_workflows::sync::SyncOptions;

use crate::config::Config;
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
    /// Most endpoint syncs driven at once by this worker [default: `[worker] capacity`,
    /// else 10000].
    #[arg(long)]
    capacity: Option<usize>,
    /// Most endpoint syncs taken by one claim, so that several workers share a run
    /// [default: `[worker] claim_chunk`, else twice --max-in-flight, between 16 and 1024].
    #[arg(long)]
    claim_chunk: Option<usize>,
    /// Lease length in milliseconds; heartbeats renew it every third of that [default:
    /// `[worker] lease_ms`, else 30000].
    #[arg(long)]
    lease_ms: Option<i64>,
    /// Send no request once less than this is left of a lease whose renewal is not
    /// confirmed [default: `[worker] effect_margin_ms`, else a quarter of the lease]. Keep
    /// it above the request timeout.
    #[arg(long)]
    effect_margin_ms: Option<i64>,
    /// Exit once every run is finished and nothing is claimable, found twice a poll
    /// interval apart (work queued or announced meanwhile is taken first); not with
    /// schedules.
    #[arg(long)]
    exit_when_idle: bool,
    /// Serve this worker's own Prometheus `/metrics` (journal commit latency, adapter
    /// calls, batches by outcome, calls in flight) on this address. Anything but
    /// loopback requires the token in `--metrics-token-env`.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Environment variable holding the metrics access token (required off loopback).
    #[arg(long, default_value = "BULWARK_SERVE_TOKEN")]
    metrics_token_env: String,
    /// Print the closing summary as JSON.
    #[arg(long)]
    json: bool,
}

/// A worker's lease when neither `--lease-ms` nor `[worker] lease_ms` says otherwise.
pub(crate) const DEFAULT_LEASE_MS: i64 = 30_000;

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
            policy: None,
            id: crate::endpoint_id(i),
            adapter: "memory".into(),
            settings: Default::default(),
        })
        .collect();
    (registry, endpoints, sink)
}

/// The webhook delivery task of a configuration that has one.
pub(crate) struct AlertDelivery {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    app: Bulwark,
}

impl AlertDelivery {
    /// Start delivering alerts of `db` to the configured webhook (None: no webhook).
    pub(crate) async fn start(config: Option<&Config>, db: &str) -> Result<Option<Self>> {
        let Some(config) = config else {
            return Ok(None);
        };
        let Some(url) = config.webhook_url()? else {
            return Ok(None);
        };
        let a = &config.alerts;
        let sink = bulwark_adapters::webhook::WebhookSink::with_transport(
            &url,
            Duration::from_millis(a.webhook_timeout_ms),
            &config.webhook_transport()?,
        )
        .map_err(|e| anyhow::anyhow!("[alerts]: {e}"))?;
        let app = Bulwark::open(db, bulwark_adapters::default_registry()).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let options = DeliveryOptions {
            retry: Duration::from_millis(a.webhook_retry_ms),
            max_attempts: a.webhook_max_attempts,
            ..Default::default()
        };
        let task = tokio::spawn(deliver_alerts(
            app.store(),
            Arc::new(sink),
            options,
            stop.clone(),
        ));
        Ok(Some(Self { stop, task, app }))
    }

    /// Stop, giving what is being delivered at most `grace` to finish.
    pub(crate) async fn stop(self, grace: Duration) {
        // Let alerts committed just now go out before the flag is seen.
        tokio::time::sleep(Duration::from_millis(600).min(grace)).await;
        self.stop.store(true, Ordering::Relaxed);
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
        self.app.close().await;
    }
}

/// The configured schedules (`[schedule]`), firing snapshots of `[source]`, sync and
/// reconcile runs, and prunes.
fn schedules(
    config: &Config,
    registry: bulwark_workflows::adapter::AdapterRegistry,
    db: &str,
    endpoints: &[EndpointConfig],
    options: &SyncOptions,
    stop: Arc<AtomicBool>,
) -> Result<Option<impl std::future::Future<Output = ()> + use<>>> {
    let mut list = Vec::new();
    if let Some(c) = &config.schedule.snapshot {
        list.push(Schedule::new("snapshot", &c.0).map_err(anyhow::Error::msg)?);
    }
    if let Some(c) = &config.schedule.sync {
        list.push(Schedule::new("sync", &c.0).map_err(anyhow::Error::msg)?);
    }
    if let Some(c) = &config.schedule.reconcile {
        list.push(Schedule::new("reconcile", &c.0).map_err(anyhow::Error::msg)?);
    }
    if let Some(c) = &config.schedule.prune {
        list.push(Schedule::new("prune", &c.0).map_err(anyhow::Error::msg)?);
    }
    let retention = config.retention.days();
    if list.is_empty() {
        return Ok(None);
    }
    let snapshot = match &config.source {
        Some(s) => Some(Arc::new(s.plan(config.dir())?)),
        None => None,
    };
    let (db, endpoints, options) = (
        db.to_string(),
        Arc::new(endpoints.to_vec()),
        Arc::new(options.clone()),
    );
    Ok(Some(async move {
        // One handle for the scheduler and every job it fires.
        let app = match Bulwark::open(&db, registry).await {
            Ok(a) => Arc::new(a),
            Err(e) => {
                tracing::error!(error = %e, "scheduler: cannot open the database");
                return;
            }
        };
        let jobs = app.clone();
        let fire = move |name: String| -> BoxFuture {
            let (app, endpoints, options, snapshot) = (
                jobs.clone(),
                endpoints.clone(),
                options.clone(),
                snapshot.clone(),
            );
            Box::pin(async move {
                match name.as_str() {
                    "snapshot" => {
                        let Some(plan) = snapshot else { return };
                        match crate::snapshot_cmd::take(&app, &plan).await {
                            Ok(r) => eprintln!(
                                "scheduled snapshot {}: {} rows read, {} accepted, {} rejected, {} queries",
                                r.id, r.rows_read, r.accepted, r.rejected, r.queries
                            ),
                            Err(e) => {
                                tracing::error!(error = %format!("{e:#}"), "scheduled snapshot failed")
                            }
                        }
                    }
                    "prune" => match app.prune(&retention).await {
                        Ok(r) => eprintln!("scheduled prune: {}", crate::prune_cmd::summary(&r)),
                        Err(e) => tracing::error!(error = %e, "scheduled prune failed"),
                    },
                    "reconcile" => match app.enqueue_reconcile(&endpoints, &options).await {
                        Ok(Some((plan, found))) => {
                            let drifted: usize = found.iter().map(|f| f.drifted.len()).sum();
                            let read: u64 = found.iter().map(|f| f.read).sum();
                            let unread: u64 = found.iter().map(|f| f.unread).sum();
                            match plan.run {
                                Some(run) => eprintln!(
                                    "scheduled reconcile: {read} item(s) read back, {drifted} drifted, {unread} unread; run {run} enqueued ({} endpoint(s) to sync, {} item(s) to send again)",
                                    plan.workflows, plan.repairs
                                ),
                                None => eprintln!(
                                    "scheduled reconcile: {read} item(s) read back, {drifted} drifted, {unread} unread; nothing to send"
                                ),
                            }
                        }
                        Ok(None) => eprintln!("scheduled reconcile: no sealed snapshot yet"),
                        Err(e) => tracing::error!(error = %e, "scheduled reconcile failed"),
                    },
                    _ => match app.enqueue(&endpoints, &options).await {
                        Ok(Some(plan)) => match plan.run {
                            Some(run) => eprintln!(
                                "scheduled sync: run {run} enqueued ({} endpoint(s) to sync, {} up to date, {} still syncing)",
                                plan.workflows, plan.up_to_date, plan.busy
                            ),
                            None if plan.stale.is_some() => progress::print_stale(&plan),
                            None => eprintln!(
                                "scheduled sync: nothing to do for snapshot {} ({} endpoint(s) up to date, {} still syncing)",
                                plan.snapshot, plan.up_to_date, plan.busy
                            ),
                        },
                        Ok(None) => eprintln!("scheduled sync: no sealed snapshot yet"),
                        Err(e) => tracing::error!(error = %e, "scheduled sync failed"),
                    },
                }
            })
        };
        run_schedules(app.store(), list, fire, stop).await;
        app.backend().close().await;
    }))
}

pub(crate) async fn run(args: WorkerArgs) -> Result<ExitCode> {
    let (db, registry, endpoints, options, config) = match args.sink.as_str() {
        "memory" => {
            ensure_db_parent(&args.db.db)?;
            let (r, e, _) = memory_setup(args.endpoints.endpoints);
            (args.db.db.clone(), r, e, sync_options(&args.sync), None)
        }
        "rest" => {
            let s = crate::setup(&args.db, &args.endpoints, &args.sync).await?;
            (s.db, s.registry, s.endpoints, s.options, s.config)
        }
        other => anyhow::bail!("unknown --sink {other:?} (rest or memory)"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    // A worker stopped by a signal is a daemon told to stop: it exits 0.
    let _interrupt = {
        let stop = stop.clone();
        crate::signals::Interrupt::listen("the worker", move || {
            stop.store(true, Ordering::Relaxed);
        })
    };
    let scheduler = match &config {
        Some(c) => schedules(c, registry.clone(), &db, &endpoints, &options, stop.clone())?,
        None => None,
    };
    if scheduler.is_some() && args.exit_when_idle {
        anyhow::bail!(
            "--exit-when-idle does not go with [schedule]: a scheduled worker runs until stopped"
        );
    }
    let metrics_token = match args.metrics_listen {
        Some(addr) => crate::serve::token_for(addr, &args.metrics_token_env)?,
        None => None,
    };
    let alerts = AlertDelivery::start(config.as_ref(), &db).await?;
    let app = Bulwark::open(&db, registry).await?;
    crate::record_insecure_tls(&app, &endpoints).await?;
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
            eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
            let router = crate::serve::worker_metrics_router(
                app.clone(),
                metrics_token,
                crate::serve::schedules_of(config.as_ref())?,
            );
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "metrics server failed");
                }
            }))
        }
        None => None,
    };
    eprintln!(
        "worker {} on {} ({} endpoints{}{})",
        app.worker_id(),
        bulwark_engine::postgres::redact_url(&db),
        endpoints.len(),
        if scheduler.is_some() {
            ", schedules on"
        } else {
            ""
        },
        if alerts.is_some() { ", webhook on" } else { "" },
    );
    let scheduler = scheduler.map(tokio::spawn);
    let file = config.as_ref().map(|c| &c.worker);
    let lease_ms = args
        .lease_ms
        .or(file.and_then(|w| w.lease_ms))
        .unwrap_or(DEFAULT_LEASE_MS);
    let effect_margin_ms = args
        .effect_margin_ms
        .or(file.and_then(|w| w.effect_margin_ms));
    anyhow::ensure!(
        lease_ms >= 300,
        "--lease-ms {lease_ms} is too short (at least 300)"
    );
    if let Some(m) = effect_margin_ms {
        anyhow::ensure!(
            (0..lease_ms).contains(&m),
            "--effect-margin-ms {m} must be at least 0 and below the lease ({lease_ms} ms)"
        );
    }
    let mut work = WorkOptions {
        capacity: args
            .capacity
            .or(file.and_then(|w| w.capacity))
            .unwrap_or(10_000)
            .max(1),
        claim_chunk: args.claim_chunk.or(file.and_then(|w| w.claim_chunk)),
        exit_when_idle: args.exit_when_idle,
        ..Default::default()
    };
    anyhow::ensure!(
        work.claim_chunk != Some(0),
        "--claim-chunk must be at least 1"
    );
    if let Some(ms) = file.and_then(|w| w.poll_ms) {
        work.poll = Duration::from_millis(ms);
    }
    eprintln!(
        "lease {lease_ms} ms (renewed every {} ms), effects stop {} ms before an unconfirmed lease ends, capacity {}, claims up to {} at a time",
        lease_ms / 3,
        effect_margin_ms.unwrap_or(lease_ms / 4),
        work.capacity,
        bulwark_workflows::app::claim_chunk(&work, options.max_in_flight)
    );
    let worker = WorkerOptions {
        work,
        lease_ms,
        effect_margin_ms,
        ..Default::default()
    };
    let report = app
        .work(&endpoints, &options, &worker, stop.clone(), None)
        .await;
    stop.store(true, Ordering::Relaxed);
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(s) = scheduler {
        let _ = s.await;
    }
    if let Some(a) = alerts {
        a.stop(Duration::from_secs(5)).await;
    }
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        progress::print_summary_worker(&report);
    }
    app.close().await;
    Ok(ExitCode::SUCCESS)
}

/// `bulwark sync` on PostgreSQL: plan the run for the workers; optionally wait for it.
/// `--wait` of the commands that enqueue a run on PostgreSQL.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WaitArgs {
    /// (PostgreSQL) wait until the workers have finished the run.
    #[arg(long)]
    pub(crate) wait: bool,
    /// (with --wait) give up waiting once no worker has been live (heartbeating within its
    /// lease) for this many seconds; the run stays enqueued for the next worker.
    #[arg(long, default_value_t = 30, requires = "wait")]
    pub(crate) wait_no_worker_secs: u64,
}

/// Enqueue a run of `setup`'s endpoints (`configured`: every endpoint of the
/// configuration, whose TLS settings are recorded for `status`).
pub(crate) async fn enqueue(
    setup: crate::Setup,
    configured: &[bulwark_workflows::adapter::EndpointConfig],
    wait: &WaitArgs,
) -> Result<ExitCode> {
    let app = Bulwark::open(&setup.db, setup.registry).await?;
    crate::record_insecure_tls(&app, configured).await?;
    let Some(plan) = app.enqueue(&setup.endpoints, &setup.options).await? else {
        println!("no sealed snapshot yet: run `bulwark snapshot` first");
        return Ok(ExitCode::from(1));
    };
    if plan.stale.is_some() {
        progress::print_stale(&plan);
        app.close().await;
        return Ok(ExitCode::from(1));
    }
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
    let code = if wait.wait {
        wait_for_run(&app, run, wait).await?
    } else {
        ExitCode::SUCCESS
    };
    app.close().await;
    Ok(code)
}

/// Wait until the workers have finished `run`, then print its final states; the exit
/// status is 1 when the run left work undone (endpoints tripped, skipped with an open
/// circuit or corrupt, items quarantined by it), as `sync` on SQLite says.
///
/// Gives up (an error naming the run) once no worker has been live for
/// `wait.wait_no_worker_secs`: nothing would ever finish it otherwise.
pub(crate) async fn wait_for_run(app: &Bulwark, run: i64, wait: &WaitArgs) -> Result<ExitCode> {
    let store = app.store();
    let patience = Duration::from_secs(wait.wait_no_worker_secs);
    let mut alone_since: Option<std::time::Instant> = None;
    let mut said = false;
    loop {
        let runs = store.runs().await?;
        if runs.iter().any(|r| r.id == run && r.status != "running") {
            break;
        }
        let now = bulwark_engine::now_ms();
        // Live: heard of within its lease (plus a beat's slack).
        let live = store
            .workers()
            .await?
            .iter()
            .any(|w| now - w.last_beat <= w.lease_ms + w.lease_ms / 3);
        if live {
            alone_since = None;
        } else {
            let since = *alone_since.get_or_insert_with(std::time::Instant::now);
            if !said {
                eprintln!(
                    "no live worker on this database; waiting up to {} s for one (`bulwark worker`)",
                    patience.as_secs()
                );
                said = true;
            }
            if since.elapsed() >= patience {
                anyhow::bail!(
                    "run {run} is enqueued but no worker has been live for {} s: start `bulwark worker` on this database (it picks the run up), or wait with `bulwark runs`",
                    patience.as_secs()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let counts = store.status_counts(Some(run)).await?;
    let states: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("run {run} finished: {}", states.join(" "));
    let quarantined = app
        .quarantine()
        .await?
        .iter()
        .filter(|q| q.run == run)
        .count();
    if quarantined > 0 {
        println!("  {quarantined} item(s) quarantined (`bulwark quarantine`)");
    }
    let undone = counts
        .iter()
        .filter(|(state, _)| matches!(state.as_str(), "Tripped" | "Skipped" | "Corrupt"))
        .map(|(_, n)| *n)
        .sum::<i64>();
    Ok(if undone > 0 || quarantined > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
