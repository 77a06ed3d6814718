//! `bulwark`: the command-line face of the Bulwark durable sync engine. Every command is a
//! thin wrapper over a library call.

mod api_sim_cmd;
mod bench;
mod bench_pause;
mod config;
mod demo;
mod dry_run_cmd;
mod ops;
mod pause_cmd;
mod progress;
mod prune_cmd;
mod reconcile_cmd;
mod scope;
mod serve;
mod signals;
mod snapshot_cmd;
mod webui_cmd;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use bulwark_adapters::legacy::generate_demo_legacy;
use bulwark_adapters::simulator::{self, Fault, SimConfig};
use bulwark_workflows::adapter::EndpointConfig;
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::sync::SyncOptions;
use clap::{Parser, Subcommand};

/// Bulwark keeps thousands of B2B endpoints in sync with a legacy catalog, durably.
#[derive(Debug, Parser)]
#[command(name = "bulwark", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The end of `bulwark --help`: the environment and the exit statuses.
const AFTER_HELP: &str = "\
Environment:
  BULWARK_DB          the database (as --db)
  BULWARK_CONFIG      the configuration file (as --config)
  BULWARK_LOG         log filter on stderr: error, warn (default), info, debug, or
                      per module (bulwark_workflows=debug,info)
  BULWARK_LOG_FORMAT  json: one JSON object per log event (for collectors)
  NO_COLOR            set: no colour in logs (never any when stderr is not a terminal)

Exit status: 0 all done; 1 finished with work left undone (endpoints tripped or
skipped, items quarantined, workflows refused or unfinished, findings); 2 usage;
3 could not run (configuration, database, network); 130/143 stopped by SIGINT/SIGTERM.

Shell completions: bulwark completions bash|zsh|fish; manual pages: bulwark man --dir DIR";

#[derive(Debug, clap::Args, Clone)]
pub(crate) struct DbArg {
    /// Bulwark's own database: a SQLite file path (the embedded default) or a
    /// `postgres://user@host:port/db[?schema=NAME]` URL (several workers).
    #[arg(long, env = "BULWARK_DB", default_value = DEFAULT_DB)]
    pub(crate) db: String,
}

#[derive(Debug, clap::Args, Clone)]
pub(crate) struct EndpointArgs {
    /// Number of simulated endpoints (ids ep-00001 …) served under --portal-url.
    #[arg(long, default_value_t = 500, help_heading = DEMO_HEADING)]
    pub(crate) endpoints: u32,
    /// Base URL of the portal (the simulator serves /ep/{id}/…). Not needed when the
    /// endpoints come from --config.
    #[arg(long, help_heading = DEMO_HEADING)]
    pub(crate) portal_url: Option<String>,
    /// Configuration file (database, `[sync]` limits and policy, endpoints, adapter
    /// resources); see docs/configuration.md.
    #[arg(long, env = "BULWARK_CONFIG")]
    pub(crate) config: Option<PathBuf>,
}

/// Where `--help` lists the options of simulated endpoints, apart from production ones.
const DEMO_HEADING: &str = "Simulated endpoints (demo, tests)";

/// Default database path (a config file's `database` applies when --db is left at it).
pub(crate) const DEFAULT_DB: &str = "bulwark-data/bulwark.db";

/// The database of a command that needs no endpoints: --db, or the `database` of the
/// configuration file (the same one `sync` and `worker` use, so every command agrees).
#[derive(Debug, clap::Args, Clone)]
pub(crate) struct StoreArgs {
    #[command(flatten)]
    pub(crate) db: DbArg,
    /// Configuration file whose `database` to use when --db is not given (a relative
    /// SQLite path there is relative to the file).
    #[arg(long, env = "BULWARK_CONFIG")]
    pub(crate) config: Option<PathBuf>,
}

impl StoreArgs {
    /// The database these arguments name, with the configuration (if given) loaded.
    pub(crate) fn load(&self) -> Result<(String, Option<config::Config>)> {
        let config = match &self.config {
            Some(path) => Some(config::Config::load(path)?),
            None => None,
        };
        Ok((database(&self.db, config.as_ref()), config))
    }

    /// The database these arguments name.
    pub(crate) fn database(&self) -> Result<String> {
        Ok(self.load()?.0)
    }
}

/// --db when given, else the configuration's `database`, else the default.
pub(crate) fn database(db: &DbArg, config: Option<&config::Config>) -> String {
    match (config.and_then(|c| c.database.as_ref()), db.db.as_str()) {
        (Some(from_file), DEFAULT_DB) => from_file.clone(),
        _ => db.db.clone(),
    }
}

/// What a sync or worker runs with: database, endpoints, options and adapters.
pub(crate) struct Setup {
    pub(crate) db: String,
    pub(crate) endpoints: Vec<EndpointConfig>,
    pub(crate) options: bulwark_workflows::sync::SyncOptions,
    pub(crate) registry: bulwark_workflows::adapter::AdapterRegistry,
    /// The configuration file, if the endpoints came from one.
    pub(crate) config: Option<config::Config>,
}

/// Resolve the database, endpoints and options from --config, or from the simulated
/// portal flags.
pub(crate) async fn setup(db: &DbArg, endpoints: &EndpointArgs, sync: &SyncArgs) -> Result<Setup> {
    if let Some(path) = &endpoints.config {
        let config = config::Config::load(path)?;
        let db = database(db, Some(&config));
        ensure_db_parent(&db)?;
        let mut eps = config.endpoints();
        if let Some(url) = &endpoints.portal_url {
            eps.extend(demo_endpoints(endpoints.endpoints, url));
        }
        let registry = config.registry(&db).await?;
        let mut options = config.sync_options();
        if let Some(secs) = sync.max_snapshot_age_secs {
            options.max_snapshot_age_ms = Some(secs.saturating_mul(1000));
        }
        return Ok(Setup {
            db,
            endpoints: eps,
            options,
            registry,
            config: Some(config),
        });
    }
    let Some(url) = &endpoints.portal_url else {
        anyhow::bail!(
            "give --config FILE (endpoints from a configuration file) or --portal-url URL (simulated endpoints)"
        )
    };
    ensure_db_parent(&db.db)?;
    Ok(Setup {
        db: db.db.clone(),
        endpoints: demo_endpoints(endpoints.endpoints, url),
        options: sync_options(sync),
        registry: bulwark_adapters::default_registry(),
        config: None,
    })
}

/// Record which endpoints skip TLS certificate verification, for `status` and the
/// dashboard (the adapters logged a warning for each when they were built).
pub(crate) async fn record_insecure_tls(app: &Bulwark, endpoints: &[EndpointConfig]) -> Result<()> {
    app.record_insecure_tls(endpoints, &insecure_tls(endpoints))
        .await?;
    Ok(())
}

/// The ids of `endpoints` set to skip TLS certificate verification.
fn insecure_tls(endpoints: &[EndpointConfig]) -> Vec<String> {
    endpoints
        .iter()
        .filter(|e| {
            bulwark_adapters::transport::TransportSettings::from_settings(&e.settings)
                .is_ok_and(|t| t.insecure_skip_verify)
        })
        .map(|e| e.id.clone())
        .collect()
}

#[derive(Debug, clap::Args, Clone)]
pub(crate) struct SyncArgs {
    /// Items per batch.
    #[arg(long, default_value_t = 500)]
    pub(crate) batch_size: u32,
    /// Most adapter calls in flight at once.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_in_flight: usize,
    /// What to send for a SKU gone from the source: `leave` (nothing; the endpoint keeps
    /// it) or `zero_stock` (stock 0 with its last prices).
    #[arg(long, default_value = "leave", value_parser = parse_on_removed)]
    pub(crate) on_removed: bulwark_workflows::staging::OnRemoved,
    /// Hold every endpoint rather than push stock from a snapshot whose read started
    /// longer ago than this many seconds (`[sync] max_snapshot_age_secs`).
    #[arg(long, value_name = "SECS")]
    pub(crate) max_snapshot_age_secs: Option<u64>,
}

fn parse_on_removed(s: &str) -> std::result::Result<bulwark_workflows::staging::OnRemoved, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Demo: generate a demo legacy database, snapshot it, start a local portal simulator
    /// and sync every endpoint through the durable state machine.
    #[command(display_order = 100)]
    Demo(demo::DemoArgs),
    /// Demo: create a demo legacy SQLite database.
    #[command(display_order = 101)]
    GenerateLegacy {
        /// Path of the legacy database to (re)create.
        #[arg(long)]
        path: PathBuf,
        /// Number of SKUs.
        #[arg(long, default_value_t = 7200)]
        skus: u32,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Snapshot a legacy source (SQLite, PostgreSQL, MySQL/MariaDB) into staging (the only read of the source).
    #[command(args_conflicts_with_subcommands = true)]
    Snapshot {
        #[command(subcommand)]
        action: Option<snapshot_cmd::SnapshotAction>,
        #[command(flatten)]
        db: StoreArgs,
        #[command(flatten)]
        args: snapshot_cmd::SnapshotArgs,
        /// Print the snapshot's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume unfinished syncs, then sync every endpoint to the newest sealed snapshot.
    /// On PostgreSQL it enqueues the run for `bulwark worker` processes instead.
    Sync {
        #[command(flatten)]
        db: DbArg,
        #[command(flatten)]
        endpoints: EndpointArgs,
        #[command(flatten)]
        sync: SyncArgs,
        #[command(flatten)]
        scope: scope::ScopeArgs,
        /// Plan the run and print, per endpoint, what would be sent (counts, the largest
        /// changes with old → new values); send nothing and journal nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON: the run's report (states, counts, calls, and `quarantined`: the
        /// items this run quarantined), or with `--dry-run` the plan (every endpoint,
        /// samples of items).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        wait: worker::WaitArgs,
    },
    /// Repair drift: read back every item each endpoint should show (what it last
    /// confirmed), and sync it again to the newest sealed snapshot sending every item that
    /// differs (changed by hand in the shop, lost by the platform) along with the diff.
    /// On PostgreSQL the repairing run is enqueued for `bulwark worker` processes.
    Reconcile {
        #[command(flatten)]
        db: DbArg,
        #[command(flatten)]
        endpoints: EndpointArgs,
        #[command(flatten)]
        sync: SyncArgs,
        #[command(flatten)]
        scope: scope::ScopeArgs,
        /// Print what was read back as JSON (and no sync summary).
        #[arg(long)]
        json: bool,
        /// Read back and print what the repairing sync would send; send nothing, record
        /// nothing (reading back has no effect at the endpoints).
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: worker::WaitArgs,
    },
    /// Check a configuration file without syncing: load it and build every endpoint's
    /// adapter (reading tokens, certificates and profiles), then say what it found.
    #[command(visible_alias = "check-config")]
    Check {
        /// The configuration file.
        #[arg(long, env = "BULWARK_CONFIG")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume and finish what a crash or stop left unfinished (replaying each endpoint
    /// sync from its journal, verifying before any re-send), without starting a new run.
    Replay {
        #[command(flatten)]
        db: DbArg,
        #[command(flatten)]
        endpoints: EndpointArgs,
        #[command(flatten)]
        sync: SyncArgs,
    },
    /// Cancel a sync run: its unfinished endpoint syncs end Cancelled (a worker driving
    /// one drops it), what finished stays confirmed.
    Cancel {
        /// The run id.
        run: i64,
        #[command(flatten)]
        db: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Work on a shared database until SIGTERM/SIGINT: claim endpoint syncs of any run,
    /// keep their leases alive, drive them, finalize runs.
    Worker(worker::WorkerArgs),
    /// Simulator: run the local portal simulator until interrupted.
    #[command(display_order = 102)]
    Simulate {
        /// Address to listen on (loopback).
        #[arg(long, default_value = "127.0.0.1:8700")]
        listen: SocketAddr,
        /// SQLite file recording deliveries and applied batches.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Endpoint count (to place the broken ones).
        #[arg(long, default_value_t = 500)]
        endpoints: u32,
        /// Endpoints that reject every upload.
        #[arg(long, default_value_t = 0)]
        broken: u32,
        /// Added latency per request, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Require client certificates signed by this PEM CA (mutual TLS).
        #[arg(long, requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// Act as a platform without idempotency keys: apply every upload, repeats too,
        /// and record each in the `writes` table of --record (snapshot, arrival time).
        #[arg(long)]
        no_idempotency: bool,
    },
    /// Simulator: run the web-UI portal simulator (for the `webdriver` adapter) until
    /// SIGTERM/SIGINT; optionally write its recipes to disk and serve its state as JSON.
    #[command(display_order = 103)]
    SimulateWebui(webui_cmd::SimulateWebUiArgs),
    /// Simulator: run the shop-API simulator (per-item REST, GraphQL per item and in bulk,
    /// a catalog without a SKU filter; for `http` profiles) until SIGTERM/SIGINT.
    #[command(display_order = 104)]
    SimulateApi(api_sim_cmd::SimulateApiArgs),
    /// Runs and per-state endpoint counts.
    Status {
        #[command(flatten)]
        db: StoreArgs,
        /// Show the newest N runs (the rest are counted).
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
        /// Only runs started since then: a span (24h, 7d) or a UTC date/time.
        #[arg(long, value_name = "WHEN", value_parser = parse_since)]
        since: Option<i64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring Bulwark's database to this build's schema (the step of an upgrade; every
    /// command that writes also does it) and print the schema version.
    Migrate {
        #[command(flatten)]
        db: StoreArgs,
    },
    /// Remove history older than `[retention]` keeps (default 30 days): journals of finished
    /// runs (the newest sync of every endpoint stays), alerts, staged snapshots nothing needs;
    /// what each endpoint last confirmed always stays. `worker` does it on `[schedule] prune`.
    Prune(prune_cmd::PruneArgs),
    #[command(flatten)]
    Ops(ops::Ops),
    /// Pause endpoints for every worker on the database (e.g. a platform's planned
    /// maintenance): no new sync is planned for them, one under way stops before its next
    /// request and waits untouched — no retry used, no failure counted, no circuit moved.
    Pause(pause_cmd::PauseArgs),
    /// Lift a pause: a sync that waited goes on where it stopped, the next run plans the
    /// endpoint again.
    Resume(pause_cmd::ResumeArgs),
    /// Recent alerts, newest first: circuits opened and closed, exhausted retries, runs
    /// that finished with tripped endpoints (and whether the webhook got them).
    Alerts {
        #[command(flatten)]
        db: StoreArgs,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Only alerts raised since then: a span (24h, 7d) or a UTC date/time.
        #[arg(long, value_name = "WHEN", value_parser = parse_since)]
        since: Option<i64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-fold every journal through the transition function and report any illegal or
    /// inconsistent transition. Exits 1 when something is found.
    Audit {
        #[command(flatten)]
        db: StoreArgs,
        /// Retire every unfinished workflow with a problem as `Corrupt` (alerted; its
        /// journal is kept) and finish the runs waiting on it; the next sync plans those
        /// endpoints afresh from what they last confirmed.
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A live web dashboard (runs, endpoints, circuits, alerts, snapshots) and Prometheus
    /// `/metrics`, on 127.0.0.1 by default; a token is required anywhere else.
    Serve(serve::ServeArgs),
    /// Benchmark: workload W1 (engine overhead against an in-process sink) and the others
    /// of WORKLOADS.md; prints `name: value unit` lines.
    #[command(display_order = 105)]
    Bench(bench::BenchArgs),
    /// Print a shell completion script to standard output, e.g.
    /// `bulwark completions bash > /etc/bash_completion.d/bulwark`.
    #[command(display_order = 90)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (roff): `bulwark.1` and one per command into --dir, or
    /// `bulwark.1` alone to standard output.
    #[command(display_order = 91)]
    Man {
        /// Folder to write the pages into (created if missing).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Endpoint configs for the simulated portal: `ep-00001` … under `{portal}/ep/{id}`.
pub(crate) fn demo_endpoints(n: u32, portal: &str) -> Vec<EndpointConfig> {
    (1..=n)
        .map(|i| {
            let id = endpoint_id(i);
            EndpointConfig {
                policy: None,
                adapter: "rest".into(),
                settings: [(
                    "base_url".to_string(),
                    format!("{}/ep/{id}", portal.trim_end_matches('/')),
                )]
                .into(),
                id,
            }
        })
        .collect()
}

pub(crate) fn endpoint_id(i: u32) -> String {
    format!("ep-{i:05}")
}

/// The simulated faults: `broken` endpoints spread evenly; the first of them stores wrong
/// values (verify mismatches), the others reject every upload.
pub(crate) fn broken_profiles(n: u32, broken: u32) -> std::collections::HashMap<String, Fault> {
    (0..broken.min(n))
        .map(|j| {
            let i = ((u64::from(j) + 1) * u64::from(n) / (u64::from(broken) + 1)).max(1) as u32;
            (
                endpoint_id(i),
                if j == 0 {
                    Fault::Corrupt
                } else {
                    Fault::Reject
                },
            )
        })
        .collect()
}

pub(crate) fn sync_options(args: &SyncArgs) -> SyncOptions {
    SyncOptions {
        limits: Default::default(),
        batch_size: args.batch_size,
        max_in_flight: args.max_in_flight,
        on_removed: args.on_removed,
        max_snapshot_age_ms: args.max_snapshot_age_secs.map(|s| s.saturating_mul(1000)),
        ..SyncOptions::default()
    }
}

/// Create the parent directory of a SQLite database path (URLs need nothing).
pub(crate) fn ensure_db_parent(db: &str) -> Result<()> {
    if is_postgres(db) {
        return Ok(());
    }
    ensure_parent(std::path::Path::new(
        db.strip_prefix("sqlite://").unwrap_or(db),
    ))
}

pub(crate) fn is_postgres(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

pub(crate) fn ensure_parent(path: &std::path::Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// A closed standard output (`bulwark runs | head`) ends the program quietly, as it
/// ends other Unix tools: exit status 141 (128 + SIGPIPE), no panic message. Rust ignores
/// SIGPIPE, so the write fails with EPIPE and `println!` panics; this hook turns exactly
/// that panic into the quiet exit and leaves every other panic to the default hook.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("os error 32") {
            std::process::exit(141);
        }
        default(info)
    }));
}

fn main() -> std::process::ExitCode {
    quiet_on_broken_pipe();
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| "warn".into());
    // BULWARK_LOG_FORMAT=json: one JSON object per event, with the workflow span's fields
    // (kind, workflow, run, subject), for log collectors.
    if std::env::var("BULWARK_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        // Colour only for a terminal, and never with NO_COLOR set (https://no-color.org):
        // escape codes do not belong in log files or a collector's input.
        use std::io::IsTerminal;
        let colour = std::io::stderr().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour)
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // 2 is clap's, for usage errors; a command that could not run is 3.
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(3)
        }
    }
}

async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match cli.command {
        Command::Demo(args) => {
            // The demo's own steps are journaled like the real ones: stopping abandons the
            // step in flight (as a crash would) and the next demo run resumes it.
            let interrupt = signals::Interrupt::listen("the demo", || {});
            tokio::select! {
                r = demo::run(args) => r?,
                _ = interrupt.signalled() => {}
            }
            if let Some(code) = interrupt.exit_code() {
                return Ok(code);
            }
        }
        Command::GenerateLegacy { path, skus, seed } => {
            ensure_parent(&path)?;
            generate_demo_legacy(&path, skus, seed).await?;
            println!(
                "legacy database {} created with {skus} SKUs",
                path.display()
            );
        }
        Command::Snapshot {
            action,
            db,
            args,
            json,
        } => match action {
            Some(snapshot_cmd::SnapshotAction::Approve { id, db }) => {
                return snapshot_cmd::approve(&db.database()?, id).await;
            }
            None => {
                // A snapshot writes each page in one transaction with its cursor: stopping
                // between or inside pages loses nothing; the same command resumes it.
                let interrupt = signals::Interrupt::listen("the snapshot", || {});
                tokio::select! {
                    r = snapshot_cmd::run(&db, args, json) => r?,
                    _ = interrupt.signalled() => {
                        eprintln!("snapshot stopped; run the same command to resume it from its cursor");
                    }
                }
                if let Some(code) = interrupt.exit_code() {
                    return Ok(code);
                }
            }
        },
        Command::Sync {
            db,
            endpoints,
            sync,
            scope,
            dry_run,
            json,
            wait,
        } => {
            let mut setup = setup(&db, &endpoints, &sync).await?;
            let all = setup.endpoints.clone();
            scope.apply(&mut setup.endpoints)?;
            if dry_run {
                return dry_run_cmd::sync(setup, json).await;
            }
            if is_postgres(&setup.db) {
                return worker::enqueue(setup, &all, &wait).await;
            }
            let alerts = worker::AlertDelivery::start(setup.config.as_ref(), &setup.db).await?;
            let app = Bulwark::open(&setup.db, setup.registry).await?;
            record_insecure_tls(&app, &all).await?;
            let interrupt = {
                let app = app.clone();
                signals::Interrupt::listen("the sync", move || app.stop())
            };
            let bar = progress::Progress::new();
            let report = app
                .sync(&setup.endpoints, &setup.options, Some(bar.clone()))
                .await;
            bar.finish();
            // Alerts of this run get a few seconds to reach the webhook; what does not is
            // delivered by the next sync or worker (the alerts table is the outbox).
            if let Some(a) = alerts {
                a.stop(std::time::Duration::from_secs(5)).await;
            }
            let report = report?;
            if !json {
                progress::print_summary(&report);
            }
            let quarantined = progress::print_quarantine(&app, &report, json).await?;
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["quarantined"] = quarantined.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            app.close().await;
            if let Some(code) = interrupt.exit_code() {
                return Ok(code);
            }
            if report.plan.is_none() {
                // No sealed snapshot, or earlier runs that could not finish: nothing synced.
                return Ok(ExitCode::from(1));
            }
            return Ok(progress::exit_code(&report, quarantined));
        }
        Command::Reconcile {
            db,
            endpoints,
            sync,
            scope,
            json,
            dry_run,
            wait,
        } => {
            let mut setup = setup(&db, &endpoints, &sync).await?;
            scope.apply(&mut setup.endpoints)?;
            if dry_run {
                return dry_run_cmd::reconcile(setup, json).await;
            }
            return reconcile_cmd::run(setup, json, &wait).await;
        }
        Command::Check { config, json } => {
            let loaded = config::Config::load(&config)?;
            let db = loaded
                .database
                .clone()
                .unwrap_or_else(|| DEFAULT_DB.to_string());
            let endpoints = loaded.endpoints();
            if loaded.http.is_some() {
                ensure_db_parent(&db)?;
            }
            loaded.registry(&db).await?;
            let insecure = insecure_tls(&endpoints);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "config": config.display().to_string(),
                        "endpoints": endpoints.len(),
                        "insecure_tls": insecure,
                        "source": loaded.source.is_some(),
                        "schedule": {
                            "snapshot": loaded.schedule.snapshot.as_ref().map(|c| &c.0),
                            "sync": loaded.schedule.sync.as_ref().map(|c| &c.0),
                            "reconcile": loaded.schedule.reconcile.as_ref().map(|c| &c.0),
                            "prune": loaded.schedule.prune.as_ref().map(|c| &c.0),
                        },
                    })
                );
            } else {
                println!(
                    "{}: valid; {} endpoint(s), every adapter built",
                    config.display(),
                    endpoints.len()
                );
                if !insecure.is_empty() {
                    println!(
                        "TLS verification OFF (insecure_skip_verify): {}",
                        insecure.join(", ")
                    );
                }
            }
        }
        Command::Replay {
            db,
            endpoints,
            sync,
        } => {
            let setup = setup(&db, &endpoints, &sync).await?;
            let app = Bulwark::open(&setup.db, setup.registry).await?;
            record_insecure_tls(&app, &setup.endpoints).await?;
            let bar = progress::Progress::new();
            let report = app
                .replay(&setup.endpoints, &setup.options, Some(bar.clone()))
                .await;
            bar.finish();
            let report = report?;
            let quarantined = if report.workflows == 0 {
                println!("nothing to replay: no unfinished endpoint sync");
                0
            } else {
                progress::print_summary(&report);
                progress::print_quarantine(&app, &report, false).await?
            };
            app.close().await;
            return Ok(progress::exit_code(&report, quarantined));
        }
        Command::Cancel { run, db, json } => {
            let app = Bulwark::open(&db.database()?, bulwark_adapters::default_registry()).await?;
            let r = app.cancel(run).await;
            app.close().await;
            let r = r?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "run {run}: {} endpoint sync(s) cancelled{}",
                    r.cancelled,
                    if r.finished { "; run cancelled" } else { "" }
                );
                for (w, why) in &r.refused {
                    println!("  workflow {w} not cancelled: {why}");
                }
            }
            if !r.finished {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Simulate {
            listen,
            record,
            endpoints,
            broken,
            latency_ms,
            tls_cert,
            tls_key,
            tls_client_ca,
            no_idempotency,
        } => {
            if let Some(r) = &record {
                ensure_parent(r)?;
            }
            let tls = match (tls_cert, tls_key) {
                (Some(cert_file), Some(key_file)) => Some(bulwark_adapters::sim_tls::ServerTls {
                    cert_file,
                    key_file,
                    client_ca_file: tls_client_ca,
                }),
                _ => None,
            };
            let config = SimConfig {
                db_path: record,
                latency_ms,
                profiles: broken_profiles(endpoints, broken),
                no_idempotency,
                ..Default::default()
            };
            let scheme = if tls.is_some() { "https" } else { "http" };
            eprintln!("portal simulator listening on {scheme}://{listen}");
            simulator::serve_forever(config, listen, tls.as_ref()).await?;
        }
        Command::Status {
            db,
            limit,
            since,
            json,
        } => {
            let app =
                Bulwark::open_for_reading(&db.database()?, bulwark_adapters::default_registry())
                    .await?;
            let status = app.status_of_runs_since(Some(limit), since).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                progress::print_status(&status);
            }
        }
        Command::Ops(op) => return ops::run(op).await,
        Command::Prune(args) => prune_cmd::run(args).await?,
        Command::Migrate { db } => {
            let db = db.database()?;
            ensure_db_parent(&db)?;
            let app = Bulwark::open(&db, bulwark_adapters::default_registry()).await?;
            let version = app.backend().schema_version().await?;
            println!(
                "schema of {} is current: version {version}",
                bulwark_engine::postgres::redact_url(&db)
            );
            app.close().await;
        }
        Command::Pause(args) => return pause_cmd::pause(args).await,
        Command::Resume(args) => return pause_cmd::resume(args).await,
        Command::Alerts {
            db,
            limit,
            since,
            json,
        } => {
            let app =
                Bulwark::open_for_reading(&db.database()?, bulwark_adapters::default_registry())
                    .await?;
            let store = app.store();
            let alerts: Vec<_> = match since {
                // Newest first: those since then, at most `limit`.
                Some(since) => bulwark_engine::Store::alerts(store.as_ref(), i64::MAX)
                    .await?
                    .into_iter()
                    .filter(|a| a.at >= since)
                    .take(usize::try_from(limit).unwrap_or(0))
                    .collect(),
                None => bulwark_engine::Store::alerts(store.as_ref(), limit).await?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&alerts)?);
            } else {
                let webhook = alerts
                    .iter()
                    .any(|a| a.delivered_at.is_some() || a.delivery_attempts > 0);
                ops::print_alerts(&alerts, webhook);
            }
        }
        Command::Audit { db, repair, json } => {
            let registry = bulwark_adapters::default_registry();
            let db = db.database()?;
            let app = if repair {
                Bulwark::open(&db, registry).await?
            } else {
                Bulwark::open_for_reading(&db, registry).await?
            };
            let repaired = if repair {
                Some(app.repair().await?)
            } else {
                None
            };
            let r = app.audit().await?;
            if json {
                match &repaired {
                    // The same shape as without --repair, plus what the repair did.
                    Some(rep) => {
                        let mut v = serde_json::to_value(&r)?;
                        v["repair"] = serde_json::to_value(rep)?;
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    }
                    None => println!("{}", serde_json::to_string_pretty(&r)?),
                }
            } else {
                if let Some(rep) = &repaired {
                    for (id, why) in &rep.retired {
                        println!("retired workflow {id} as Corrupt: {why}");
                    }
                    for (id, why) in &rep.left {
                        println!("left workflow {id} as it is: {why}");
                    }
                    if !rep.finished_runs.is_empty() {
                        println!("finished run(s): {:?}", rep.finished_runs);
                    }
                    if rep.retired.is_empty() && rep.left.is_empty() {
                        println!("nothing to repair");
                    }
                }
                let kinds: Vec<String> =
                    r.by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
                println!(
                    "audited {} workflows ({}), {} journal rows: {} finding(s)",
                    r.workflows,
                    kinds.join(", "),
                    r.journal_rows,
                    r.findings.len()
                );
                for f in &r.findings {
                    println!("  {f}");
                }
                if r.retired_workflows > 0 {
                    println!(
                        "{} workflow(s) retired as Corrupt (alerted, no longer driven), {} problem(s) in their journals:",
                        r.retired_workflows,
                        r.retired.len()
                    );
                    for f in r.retired.iter().take(20) {
                        println!("  {f}");
                    }
                }
            }
            if !r.findings.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Bench(args) => bench::run(args).await?,
        Command::Serve(args) => serve::run(args).await?,
        Command::SimulateWebui(args) => webui_cmd::run(args).await?,
        Command::SimulateApi(args) => api_sim_cmd::run(args).await?,
        Command::Worker(args) => return worker::run(args).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "bulwark",
                &mut std::io::stdout(),
            );
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            let cmd = Cli::command();
            match dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    clap_mangen::generate_to(cmd, &dir)
                        .with_context(|| format!("writing manual pages into {}", dir.display()))?;
                    println!("manual pages written into {}", dir.display());
                }
                None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--since`: a span back from now (`90s`, `30m`, `24h`, `7d`) or a UTC date or time
/// (`2026-12-01`, `2026-12-01T08:00:00Z`); ms since the epoch.
pub(crate) fn parse_since(s: &str) -> std::result::Result<i64, String> {
    let s = s.trim();
    let unit = |c: char| match c {
        's' => Some(1_000i64),
        'm' => Some(60_000),
        'h' => Some(3_600_000),
        'd' => Some(86_400_000),
        _ => None,
    };
    if let Some(last) = s.chars().last()
        && let Some(ms) = unit(last)
        && let Ok(n) = s[..s.len() - 1].parse::<i64>()
        && n >= 0
    {
        return Ok(bulwark_engine::now_ms() - n.saturating_mul(ms));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .map_or(0, |t| t.and_utc().timestamp_millis()));
    }
    Err(format!(
        "{s:?} is neither a span (90s, 30m, 24h, 7d) nor a UTC date or time (2026-12-01, 2026-12-01T08:00:00Z)"
    ))
}

pub(crate) fn chrono_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command and every option says what it is for in `--help`.
    #[test]
    fn every_command_and_option_has_help_text() {
        fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let here = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{here}: no description"));
                }
                for arg in sub.get_arguments() {
                    if arg.get_help().is_none() && arg.get_id() != "help" {
                        missing.push(format!("{here} {}: no help", arg.get_id()));
                    }
                }
                check(sub, &here, missing);
            }
        }
        let cmd = super::Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        check(&cmd, "bulwark", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
        assert!(cmd.get_subcommands().count() >= 18);
    }
}
