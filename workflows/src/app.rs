//! The embedded application: one Bulwark database, its journal writer, staging and the
//! adapter registry, with the high-level operations the CLI (and embedding programs) call.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bulwark_engine::runtime::Observer;
use bulwark_engine::{
    Backend, Journal, JournalConfig, Machine, RunOutcome, Runtime, RuntimeConfig, Store,
    WorkOptions, WorkflowCtx,
};
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterRegistry, EndpointConfig, PortalAdapter};
use crate::endpoint_sync::{EndpointSync, State};
use crate::error::Result;
use crate::snapshot::{LegacySource, SnapshotOptions, SnapshotReport, take_snapshot};
use crate::staging::{SnapshotRow, Staging};
use crate::sync::{
    DiffCache, EffectStats, Plan, SyncEffects, SyncOptions, execute, finalize, plan_run,
};

/// Receives progress of a sync.
pub trait SyncProgress: Send + Sync {
    /// `workflows` endpoint syncs are about to run (resumed or new).
    fn started(&self, workflows: usize);
    /// A transition of `endpoint` was journaled.
    fn transition(&self, endpoint: &str, state: &State, terminal: bool);
    /// Sync run `run` ended with `status` (`finished`, `cancelled` …) while this worker
    /// was working, whichever worker finalized it; reported once per run. Only
    /// [`Bulwark::work`] (and so [`Bulwark::spawn_worker`]) reports it; [`Bulwark::sync`]
    /// returns once its run is finalized instead.
    fn run_finished(&self, run: i64, status: &str) {
        let _ = (run, status);
    }
}

/// A progress event, as [`ProgressEvents`] broadcasts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ProgressEvent {
    /// `workflows` endpoint syncs are about to run.
    Started {
        /// How many.
        workflows: usize,
    },
    /// A transition of `endpoint` was journaled.
    Transition {
        /// The endpoint.
        endpoint: String,
        /// The state it entered (its name).
        state: &'static str,
        /// Whether that state is final.
        terminal: bool,
    },
    /// Sync run `run` ended (see [`SyncProgress::run_finished`]).
    RunFinished {
        /// The run.
        run: i64,
        /// Its final status (`finished`, `cancelled` …).
        status: String,
    },
}

/// Progress as a stream of events any number of subscribers receive: pass it to
/// [`Bulwark::sync`], [`Bulwark::replay`] or [`Bulwark::work`] as their progress, and
/// [`subscribe`](ProgressEvents::subscribe) where the events are wanted. A subscriber that
/// falls more than `capacity` events behind loses the oldest (it is told how many).
#[derive(Debug, Clone)]
pub struct ProgressEvents {
    tx: tokio::sync::broadcast::Sender<ProgressEvent>,
}

impl ProgressEvents {
    /// A channel keeping up to `capacity` events per lagging subscriber.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            tx: tokio::sync::broadcast::channel(capacity.max(1)).0,
        })
    }

    /// A new subscriber, receiving every event from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ProgressEvent> {
        self.tx.subscribe()
    }
}

impl SyncProgress for ProgressEvents {
    fn started(&self, workflows: usize) {
        let _ = self.tx.send(ProgressEvent::Started { workflows });
    }
    fn transition(&self, endpoint: &str, state: &State, terminal: bool) {
        let _ = self.tx.send(ProgressEvent::Transition {
            endpoint: endpoint.to_string(),
            state: EndpointSync::status(state),
            terminal,
        });
    }
    fn run_finished(&self, run: i64, status: &str) {
        let _ = self.tx.send(ProgressEvent::RunFinished {
            run,
            status: status.to_string(),
        });
    }
}

/// What a drive plans after resuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planning {
    /// Nothing (replay only).
    None,
    /// A sync run towards the newest sealed snapshot.
    Sync,
    /// A reconcile, then its repairing sync run.
    Reconcile,
}

/// How many days of each kind of history [`Bulwark::prune`] keeps (`None`: forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionDays {
    /// Journals of finished runs.
    pub journal_days: Option<u32>,
    /// Alerts.
    pub alert_days: Option<u32>,
    /// Staged snapshots (only those nothing needs any more).
    pub snapshot_days: Option<u32>,
}

impl Default for RetentionDays {
    fn default() -> Self {
        Self {
            journal_days: Some(30),
            alert_days: Some(30),
            snapshot_days: Some(30),
        }
    }
}

/// What [`Bulwark::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Workflows removed with their journals.
    pub workflows: u64,
    /// Journal rows removed.
    pub journal_rows: u64,
    /// Runs removed.
    pub runs: u64,
    /// Alerts removed.
    pub alerts: u64,
    /// Staged snapshots removed.
    pub snapshots: u64,
    /// Their items.
    pub snapshot_items: u64,
}

/// What a call to [`Bulwark::sync`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Runs resumed after a crash or stop, and finalized.
    pub resumed_runs: Vec<i64>,
    /// The new run's plan (absent if no sealed snapshot exists).
    pub plan: Option<Plan>,
    /// Endpoint syncs driven (resumed + new).
    pub workflows: usize,
    /// Final states by name.
    pub by_status: std::collections::BTreeMap<String, usize>,
    /// Transitions journaled.
    pub transitions: u64,
    /// Workflows refused (corrupt journal ...), with reasons.
    pub refused: Vec<(i64, String)>,
    /// Workflows left unfinished.
    pub unfinished: usize,
    /// Endpoint syncs stopped during this call because an operator paused their endpoint
    /// ([`Bulwark::pause`]): they wait, untouched, for [`Bulwark::resume`] (not counted
    /// in `unfinished`: nothing went wrong).
    pub held: usize,
    /// Endpoint syncs left untouched for another worker, with the reason (written by a
    /// Bulwark of another encoding version, or planned with another configuration).
    pub declined: Vec<(i64, String)>,
    /// Upload calls.
    pub uploads: u64,
    /// Verify calls.
    pub verifies: u64,
    /// Probe calls, and how many found the batch already landed.
    pub probes: (u64, u64),
    /// What a reconcile found, endpoint by endpoint (set by [`Bulwark::reconcile`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<Vec<crate::reconcile::EndpointDrift>>,
    /// Wall time.
    pub seconds: f64,
}

impl SyncReport {
    fn absorb(&mut self, o: RunOutcome) {
        self.workflows += o.workflows;
        self.transitions += o.transitions;
        self.refused.extend(o.refused);
        self.unfinished += o.unfinished + o.fenced;
        self.held += o.held;
        self.declined.extend(o.declined);
        for (k, v) in o.by_status {
            *self.by_status.entry(k).or_default() += v;
        }
    }
}

/// What [`Bulwark::cancel`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CancelReport {
    /// The run.
    pub run: i64,
    /// Endpoint syncs cancelled.
    pub cancelled: usize,
    /// Endpoint syncs that could not be cancelled (corrupt journal …), with reasons.
    pub refused: Vec<(i64, String)>,
    /// The run is now marked cancelled (false if some sync could not be cancelled).
    pub finished: bool,
}

/// One audit's result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    /// Workflows checked (endpoint syncs and snapshots).
    pub workflows: usize,
    /// Workflows checked, by kind (`endpoint-sync`, `snapshot`).
    pub by_kind: std::collections::BTreeMap<String, usize>,
    /// Journal rows read.
    pub journal_rows: usize,
    /// Every problem found in workflows that are live or finished.
    pub findings: Vec<bulwark_engine::Finding>,
    /// Workflows retired as `Corrupt` (refused for good, alerted; their endpoints were
    /// planned afresh).
    pub retired_workflows: usize,
    /// Problems in the journals of retired workflows (kept for inspection; they do not
    /// fail the audit: each was alerted when it was retired).
    pub retired: Vec<bulwark_engine::Finding>,
}

/// What [`Bulwark::repair`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RepairReport {
    /// Workflows retired as `Corrupt`, with the problem found.
    pub retired: Vec<(i64, String)>,
    /// Workflows with problems left as they are (finished ones, or leased by a live
    /// worker), with the problem.
    pub left: Vec<(i64, String)>,
    /// Sync runs that could finish once their workflows were retired.
    pub finished_runs: Vec<i64>,
}

/// An opened Bulwark database: its store, staging, the adapters it knows and this
/// process's group-commit journal writer.
///
/// Cheap to clone; the clones share the database, the journal writer and the metrics, so
/// one can be moved into a spawned task ([`Bulwark::spawn_worker`] does).
///
/// ```no_run
/// use std::sync::Arc;
/// use bulwark_workflows::adapter::{EndpointConfig, PortalAdapter};
/// use bulwark_workflows::app::{Bulwark, WorkerOptions};
///
/// async fn embed(my_adapter: Arc<dyn PortalAdapter>) -> bulwark_workflows::Result<()> {
///     let app = Bulwark::builder()
///         .database("bulwark-data/bulwark.db")
///         .portal("my-shop", my_adapter)
///         .open()
///         .await?;
///     let endpoints = vec![EndpointConfig {
///         id: "shop-1".into(),
///         adapter: "my-shop".into(),
///         ..Default::default()
///     }];
///     let worker = app.spawn_worker(endpoints.clone(), Default::default(), WorkerOptions::default());
///     let mut events = worker.subscribe();
///     let plan = app.enqueue(&endpoints, &Default::default()).await?;
/// #     let _ = (plan, events.recv().await);
///     let report = worker.shutdown().await?;
/// #     let _ = report;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Bulwark {
    backend: Backend,
    store: Arc<dyn Store>,
    staging: Staging,
    registry: AdapterRegistry,
    journal: Arc<std::sync::OnceLock<Journal>>,
    journal_config: JournalConfig,
    effects: Arc<EffectStats>,
    worker: String,
    /// Set by [`Bulwark::stop`]: running syncs and reconciles wind down.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Builds a [`Bulwark`]: where its database is, which adapters it knows, how this process
/// is named among workers. Start with [`Bulwark::builder`].
#[derive(Debug, Default)]
pub struct BulwarkBuilder {
    database: Option<String>,
    registry: AdapterRegistry,
    worker: Option<String>,
    journal: JournalConfig,
}

impl BulwarkBuilder {
    /// Bulwark's own database: a SQLite file path (or `sqlite://PATH`; created with its
    /// directory's parent existing), or `postgres://…[?schema=NAME]` for several workers.
    /// Required.
    pub fn database(mut self, location: impl Into<String>) -> Self {
        self.database = Some(location.into());
        self
    }

    /// Start from this adapter registry (for instance `bulwark_adapters::default_registry()`,
    /// the built-in REST, GraphQL-by-config and WebDriver adapters) instead of an empty
    /// one. Adapters added before are replaced by it.
    pub fn registry(mut self, registry: AdapterRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// Register an adapter factory under `name`: endpoints whose `adapter` is `name` are
    /// built by it, once per sync, from their [`EndpointConfig`] (settings, secrets by
    /// environment variable name …). A factory error fails the sync before anything runs.
    pub fn adapter(
        mut self,
        name: impl Into<String>,
        factory: impl Fn(&EndpointConfig) -> crate::adapter::AdapterResult<Arc<dyn PortalAdapter>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.registry.register(name, Arc::new(factory));
        self
    }

    /// Register one adapter instance under `name`, shared by every endpoint naming it
    /// (it tells them apart by [`Batch::endpoint`](crate::catalog::Batch)).
    pub fn portal(self, name: impl Into<String>, adapter: Arc<dyn PortalAdapter>) -> Self {
        self.adapter(name, move |_| Ok(adapter.clone()))
    }

    /// This process's worker identity in leases and logs (default `HOSTNAME-PID`).
    /// Must differ between processes sharing a database.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker = Some(id.into());
        self
    }

    /// Group-commit settings of the journal writer.
    pub fn journal(mut self, config: JournalConfig) -> Self {
        self.journal = config;
        self
    }

    /// Open (or create and migrate) the database.
    pub async fn open(self) -> Result<Bulwark> {
        let Some(location) = self.database else {
            return Err(crate::error::SyncError::Config(
                "Bulwark::builder(): no database given (call .database(PATH_OR_URL))".into(),
            ));
        };
        let mut app = Bulwark::open(&location, self.registry).await?;
        if let Some(w) = self.worker {
            app.worker = w;
        }
        app.journal_config = self.journal;
        Ok(app)
    }
}

/// How a worker started by [`Bulwark::spawn_worker`] works.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Claiming and driving: capacity, poll interval, whether to exit when idle.
    pub work: WorkOptions,
    /// Lease length in milliseconds (heartbeats renew it every third of that).
    pub lease_ms: i64,
    /// No request is sent once less than this is left of a lease whose renewal has not
    /// been confirmed (effect fencing); `None`: a quarter of `lease_ms`. Choose it above
    /// the adapters' request timeout.
    pub effect_margin_ms: Option<i64>,
    /// Most progress events kept for a subscriber that falls behind.
    pub events: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            work: WorkOptions::default(),
            lease_ms: 30_000,
            effect_margin_ms: None,
            events: 4096,
        }
    }
}

/// A worker running in the background on the caller's tokio runtime (see
/// [`Bulwark::spawn_worker`]). Dropping the handle does not stop it; call
/// [`stop`](WorkerHandle::stop) or [`shutdown`](WorkerHandle::shutdown).
pub struct WorkerHandle {
    stop: Arc<std::sync::atomic::AtomicBool>,
    events: Arc<ProgressEvents>,
    task: tokio::task::JoinHandle<Result<SyncReport>>,
}

impl WorkerHandle {
    /// A new subscriber to the worker's progress events, from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ProgressEvent> {
        self.events.subscribe()
    }

    /// Ask the worker to stop: it claims nothing more, finishes the transitions in flight
    /// (journaled work left over is resumed by the next worker) and ends.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether the worker has ended (stopped, idle with `exit_when_idle`, or failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Wait for the worker to end by itself (with `exit_when_idle`, or after
    /// [`stop`](WorkerHandle::stop)), and return what it did.
    pub async fn join(self) -> Result<SyncReport> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(bulwark_engine::EngineError::Other(format!(
                "the worker task ended abnormally: {e}"
            ))
            .into()),
        }
    }

    /// Stop the worker and wait for it to end.
    pub async fn shutdown(self) -> Result<SyncReport> {
        self.stop();
        self.join().await
    }
}

impl Bulwark {
    /// A builder: database, adapters, worker identity.
    pub fn builder() -> BulwarkBuilder {
        BulwarkBuilder::default()
    }

    /// Open (or create) Bulwark's database: a SQLite file path (or `sqlite://PATH`), or a
    /// `postgres://…[?schema=NAME]` URL for several workers on one PostgreSQL database.
    pub async fn open(location: impl AsRef<Path>, registry: AdapterRegistry) -> Result<Self> {
        let backend = Backend::open(&location.as_ref().to_string_lossy()).await?;
        Ok(Self::over(backend, registry))
    }

    /// Open for reading (status, audit, listings): as [`Bulwark::open`] when the database
    /// can be written, else read-only (a read-only file or directory, a full disk), where
    /// anything that writes fails.
    pub async fn open_for_reading(
        location: impl AsRef<Path>,
        registry: AdapterRegistry,
    ) -> Result<Self> {
        let url = location.as_ref().to_string_lossy().into_owned();
        // Reading never creates a database: a mistyped path (or one relative to another
        // working directory) would otherwise read as an empty history.
        let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let path = Path::new(url.strip_prefix("sqlite://").unwrap_or(&url));
        if !is_url && !path.exists() {
            return Err(bulwark_engine::EngineError::Other(format!(
                "no database at {}: check --db (or the configuration's `database`, relative to its file); `bulwark migrate --db PATH` creates an empty one",
                path.display()
            ))
            .into());
        }
        match Backend::open(&url).await {
            Ok(backend) => Ok(Self::over(backend, registry)),
            Err(
                bulwark_engine::EngineError::ReadOnly { .. }
                | bulwark_engine::EngineError::DiskFull { .. },
            ) => {
                tracing::info!(database = %url, "cannot write the database; reading it read-only");
                Ok(Self::over(Backend::open_read_only(&url).await?, registry))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn over(backend: Backend, registry: AdapterRegistry) -> Self {
        let store = backend.store();
        let staging = Staging::new(backend.clone());
        Self {
            backend,
            store,
            staging,
            registry,
            journal: Arc::default(),
            journal_config: JournalConfig::default(),
            effects: Arc::default(),
            worker: format!("{}-{}", hostname(), std::process::id()),
            stop: Arc::default(),
        }
    }

    /// Ask every [`sync`](Bulwark::sync), [`reconcile`](Bulwark::reconcile) and
    /// [`replay`](Bulwark::replay) running on this `Bulwark` (or a clone) to stop, as on
    /// SIGTERM: they claim nothing more, finish the transitions in flight, plan no new run
    /// and return (their report counts what was left unfinished; the next sync resumes it
    /// from the journal). Calls started afterwards stop at once.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether [`Bulwark::stop`] was called.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Start a worker on the current tokio runtime: it claims endpoint syncs of any open
    /// run (started by [`Bulwark::enqueue`] here or anywhere on the same database),
    /// drives them, finalizes runs as they complete, and reports progress to the handle's
    /// subscribers. The adapters of `endpoints` are built when it starts; a factory error
    /// ends it with that error (see [`WorkerHandle::join`]).
    ///
    /// On SQLite a worker holds the database's work lock while it runs: [`Bulwark::sync`],
    /// [`Bulwark::replay`] and a second worker are refused until it stops (the error
    /// names the lock file). Starting runs with [`Bulwark::enqueue`] does not need the lock.
    ///
    /// Must be called within a tokio runtime.
    pub fn spawn_worker(
        &self,
        endpoints: Vec<EndpointConfig>,
        options: SyncOptions,
        worker: WorkerOptions,
    ) -> WorkerHandle {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let events = ProgressEvents::new(worker.events);
        let app = self.clone();
        let (s, e) = (stop.clone(), events.clone());
        let task = tokio::spawn(async move {
            app.work(
                &endpoints,
                &options,
                &worker,
                s,
                Some(e as Arc<dyn SyncProgress>),
            )
            .await
        });
        WorkerHandle { stop, events, task }
    }

    /// This process's metrics in the Prometheus text format: journal appends and group
    /// commit latency, adapter calls, batches by outcome, adapter calls in flight. They
    /// count from when this `Bulwark` (or the one it was cloned from) was opened; the
    /// database-wide figures (workflows by state, circuits, alerts) are `bulwark serve`'s.
    pub fn metrics_text(&self) -> String {
        let unused = bulwark_engine::journal::JournalStats::default();
        let journal = self.journal.get().map_or(&unused, |j| j.stats());
        crate::metrics::process(journal, &self.effects).render()
    }

    /// Adapter-call counters of this process, across every sync and worker.
    pub fn effect_stats(&self) -> &EffectStats {
        &self.effects
    }

    /// The store.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Register (or replace) an adapter factory after opening.
    pub fn register_adapter(&mut self, name: &str, factory: crate::adapter::AdapterFactory) {
        self.registry.register(name, factory);
    }

    /// The backend (for the concrete pool).
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// This process's worker identity.
    pub fn worker_id(&self) -> &str {
        &self.worker
    }

    /// Staging access.
    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    fn journal(&self) -> Journal {
        self.journal
            .get_or_init(|| Journal::start(self.store.clone(), self.journal_config.clone()))
            .clone()
    }

    /// Group-commit counters of this process's journal writer, if it started.
    pub fn journal_stats(&self) -> Option<&bulwark_engine::journal::JournalStats> {
        self.journal.get().map(|j| j.stats())
    }

    /// Take a snapshot of the legacy source into staging.
    pub async fn snapshot(
        &self,
        source: &dyn LegacySource,
        options: &SnapshotOptions,
    ) -> Result<SnapshotReport> {
        take_snapshot(source, &self.staging, options).await
    }

    /// What `sync` and `work` share: the worker lock (embedded databases: one process at a
    /// time), the snapshot diffs, and effects over every endpoint's adapter (built now, so a
    /// bad endpoint fails before anything runs).
    async fn prepare(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
    ) -> Result<(
        Option<bulwark_engine::sqlite::WorkerLock>,
        Arc<DiffCache>,
        Arc<SyncEffects>,
    )> {
        let lock = match &self.backend {
            Backend::Sqlite(s) => Some(s.lock_for_work()?),
            Backend::Postgres(_) => None,
        };
        let (diffs, effects) = self.effects(endpoints, options)?;
        Ok((lock, diffs, effects))
    }

    /// The snapshot diffs, and effects over every endpoint's adapter (built now, so a bad
    /// endpoint fails before anything runs).
    fn effects(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
    ) -> Result<(Arc<DiffCache>, Arc<SyncEffects>)> {
        let mut adapters: HashMap<String, Arc<dyn PortalAdapter>> = HashMap::new();
        let mut hosts = HashMap::new();
        let mut names: HashMap<String, Arc<str>> = HashMap::new();
        for ep in endpoints {
            adapters.insert(ep.id.clone(), self.registry.build(ep)?);
            names.insert(ep.id.clone(), Arc::from(ep.adapter.as_str()));
            if let Some(h) = crate::sync::endpoint_host(ep) {
                hosts.insert(ep.id.clone(), h);
            }
        }
        let diffs = Arc::new(DiffCache::new(self.staging.clone()));
        let effects = SyncEffects::with_limits(
            adapters,
            self.store.clone(),
            diffs.clone(),
            options.max_in_flight,
            options.limits.clone(),
            hosts,
        )
        .naming_adapters(names)
        .counting_into(self.effects.clone());
        // Several workers (PostgreSQL) may run different configurations for a while (a
        // rolling deploy): each drives only the syncs its configuration matches. One
        // process on SQLite is the only one there is: it drives what it finds.
        let effects = Arc::new(match &self.backend {
            Backend::Postgres(_) => effects.declining_foreign(endpoints),
            Backend::Sqlite(_) => effects,
        });
        Ok((diffs, effects))
    }

    /// Resume every unfinished sync (replaying it from the journal), then plan and run a
    /// new sync of `endpoints` towards the newest sealed snapshot.
    pub async fn sync(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
        progress: Option<Arc<dyn SyncProgress>>,
    ) -> Result<SyncReport> {
        self.drive(endpoints, options, progress, Planning::Sync)
            .await
    }

    /// Repair drift: resume what is unfinished, then read back every endpoint of
    /// `endpoints` that confirmed a sync, compare what it shows with what it confirmed, and
    /// run a sync towards the newest sealed snapshot that also sends every drifted item
    /// again. What each endpoint showed is recorded ([`Staging::reconciles`]) and reported
    /// in [`SyncReport::reconcile`]. Endpoints whose syncs are unfinished are not read.
    pub async fn reconcile(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
        progress: Option<Arc<dyn SyncProgress>>,
    ) -> Result<SyncReport> {
        self.drive(endpoints, options, progress, Planning::Reconcile)
            .await
    }

    /// The reconcile of [`Bulwark::reconcile`] without running the sync: read back, record
    /// the drift, and plan the repairing run for workers (`bulwark worker`,
    /// `[schedule] reconcile`). `None` when no snapshot is sealed yet.
    pub async fn enqueue_reconcile(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
    ) -> Result<Option<(Plan, Vec<crate::reconcile::EndpointDrift>)>> {
        let Some(snap) = self.staging.latest_sealed().await? else {
            return Ok(None);
        };
        let (diffs, effects) = self.effects(endpoints, options)?;
        Ok(Some(
            self.plan_reconcile(&diffs, &effects, endpoints, options, snap.id)
                .await?,
        ))
    }

    /// Endpoints an operator paused ([`Bulwark::pause`]).
    async fn paused(&self) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .store
            .holds()
            .await?
            .into_iter()
            .map(|h| h.subject)
            .collect())
    }

    /// Read back every endpoint that is neither busy nor paused, and report its drift.
    async fn find_drift(
        &self,
        diffs: &DiffCache,
        effects: &SyncEffects,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
    ) -> Result<Vec<crate::reconcile::EndpointDrift>> {
        let busy = self.store.open_subjects(EndpointSync::KIND).await?;
        let paused = self.paused().await?;
        crate::reconcile::find_drift(
            &self.staging,
            diffs,
            effects,
            endpoints,
            options,
            &busy,
            &paused,
        )
        .await
    }

    /// Read back, plan the repairing run, and record what each endpoint showed.
    async fn plan_reconcile(
        &self,
        diffs: &DiffCache,
        effects: &SyncEffects,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
        snapshot: i64,
    ) -> Result<(Plan, Vec<crate::reconcile::EndpointDrift>)> {
        let found = self.find_drift(diffs, effects, endpoints, options).await?;
        let repair = drift_repairs(&found);
        let plan = crate::sync::plan_run_with(
            self.store.as_ref(),
            &self.staging,
            diffs,
            endpoints,
            snapshot,
            options,
            Some(&repair),
        )
        .await?;
        let at = bulwark_engine::now_ms();
        let rows: Vec<_> = found.iter().map(|f| f.row(at, plan.run)).collect();
        self.staging.record_reconcile(&rows).await?;
        Ok((plan, found))
    }

    /// What a sync of `endpoints` towards the newest sealed snapshot would send, planned
    /// exactly as [`Bulwark::sync`] plans it, with nothing sent and nothing journaled
    /// (endpoints whose syncs are unfinished show as `busy`: a sync resumes those first).
    /// `None` when no snapshot is sealed yet.
    pub async fn dry_run(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
    ) -> Result<Option<crate::preview::DryRun>> {
        let Some(snap) = self.staging.latest_sealed().await? else {
            return Ok(None);
        };
        let diffs = DiffCache::new(self.staging.clone());
        Ok(Some(
            crate::preview::dry_run(
                self.store.as_ref(),
                &self.staging,
                &diffs,
                endpoints,
                snap.id,
                options,
                None,
            )
            .await?,
        ))
    }

    /// [`Bulwark::reconcile`] as a dry run: read back every endpoint (reading has no
    /// effect at the endpoint) and describe the repairing sync it would run, recording
    /// nothing (no reconcile record, no run). `None` when no snapshot is sealed yet.
    pub async fn dry_run_reconcile(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
    ) -> Result<Option<(crate::preview::DryRun, Vec<crate::reconcile::EndpointDrift>)>> {
        let Some(snap) = self.staging.latest_sealed().await? else {
            return Ok(None);
        };
        let (diffs, effects) = self.effects(endpoints, options)?;
        let found = self
            .find_drift(&diffs, &effects, endpoints, options)
            .await?;
        let repair = drift_repairs(&found);
        let preview = crate::preview::dry_run(
            self.store.as_ref(),
            &self.staging,
            &diffs,
            endpoints,
            snap.id,
            options,
            Some(&repair),
        )
        .await?;
        Ok(Some((preview, found)))
    }

    /// Resume every unfinished sync (replaying it from the journal) and finish it, without
    /// starting a new run: what a crash or stop left behind, and nothing else.
    pub async fn replay(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
        progress: Option<Arc<dyn SyncProgress>>,
    ) -> Result<SyncReport> {
        self.drive(endpoints, options, progress, Planning::None)
            .await
    }

    /// Cancel sync run `run`: every unfinished endpoint sync of it takes the operator's
    /// `Cancel` (a worker driving one is fenced off and drops it), what did finish is
    /// confirmed, and the run is marked `cancelled`.
    pub async fn cancel(&self, run: i64) -> Result<CancelReport> {
        let Some(r) = self.store.runs().await?.into_iter().find(|r| r.id == run) else {
            return Err(crate::error::SyncError::Config(format!("no run {run}")));
        };
        if r.kind != "sync" {
            return Err(crate::error::SyncError::Config(format!(
                "run {run} is a {} run; only sync runs can be cancelled",
                r.kind
            )));
        }
        if r.status != "running" {
            return Err(crate::error::SyncError::Config(format!(
                "run {run} is already {}",
                r.status
            )));
        }
        let runtime = Runtime::<EndpointSync>::new(
            self.store.clone(),
            self.journal(),
            RuntimeConfig {
                worker: format!("{}.cancel", self.worker),
                ..RuntimeConfig::default()
            },
        );
        let (cancelled, refused) = runtime
            .signal_run(run, crate::endpoint_sync::Event::Cancel)
            .await?;
        let finished =
            crate::sync::finalize_as(self.store.as_ref(), &self.staging, run, "cancelled").await?;
        Ok(CancelReport {
            run,
            cancelled,
            refused,
            finished,
        })
    }

    async fn drive(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
        progress: Option<Arc<dyn SyncProgress>>,
        planning: Planning,
    ) -> Result<SyncReport> {
        let started = Instant::now();
        let (_lock, diffs, effects) = self.prepare(endpoints, options).await?;
        // A fresh identity per call: a sync resumes everything a previous one left,
        // including one abandoned earlier in this very process (its leases look live).
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        let runtime = Runtime::<EndpointSync>::new(
            self.store.clone(),
            self.journal(),
            RuntimeConfig {
                worker: format!("{}.{call}", self.worker),
                ..RuntimeConfig::default()
            },
        );
        let observer: Option<Observer<EndpointSync>> = progress.clone().map(|p| {
            Arc::new(move |ctx: &WorkflowCtx<EndpointSync>, s: &State| {
                p.transition(&ctx.subject, s, EndpointSync::is_terminal(s))
            }) as Observer<EndpointSync>
        });
        let mut report = SyncReport::default();
        // Bulwark::stop reaches the runtime: it claims nothing more and winds down.
        let watcher = {
            let (ours, theirs) = (self.stop.clone(), runtime.stop_flag());
            tokio::spawn(async move {
                while !ours.load(Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                theirs.store(true, Ordering::Relaxed);
            })
        };
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _watcher = AbortOnDrop(watcher);

        // 1. Resume whatever a crash or stop left unfinished.
        let open_runs: Vec<i64> = self
            .store
            .runs()
            .await?
            .into_iter()
            .filter(|r| r.kind == "sync" && r.status == "running")
            .map(|r| r.id)
            .collect();
        if !open_runs.is_empty() {
            let unfinished = self
                .store
                .workflows(None, Some(EndpointSync::KIND))
                .await?
                .into_iter()
                .filter(|w| !w.terminal)
                .count();
            if let Some(p) = &progress {
                p.started(unfinished);
            }
            report.absorb(execute(&runtime, effects.clone(), None, observer.clone()).await?);
            for run in open_runs {
                if finalize(self.store.as_ref(), &self.staging, run).await? {
                    report.resumed_runs.push(run);
                }
            }
            // Syncs of paused endpoints wait for their hold to be lifted; they do not hold
            // up the others' next run (a paused endpoint is not planned anew meanwhile).
            let paused = self.paused().await?;
            let open = self
                .store
                .open_subjects(EndpointSync::KIND)
                .await?
                .iter()
                .any(|s| !paused.contains(s));
            if report.unfinished > 0 || open {
                // Do not start new work on top of workflows that could not finish.
                // (Refused workflows that were retired as Corrupt are finished: their
                // endpoints are planned afresh from what they last confirmed.)
                return Ok(self.finish_report(report, &effects, started));
            }
        }

        // 2. A new run towards the newest sealed snapshot.
        if planning == Planning::None || self.stop_requested() {
            return Ok(self.finish_report(report, &effects, started));
        }
        if let Some(snap) = self.staging.latest_sealed().await? {
            let plan = if planning == Planning::Reconcile {
                let (plan, found) = self
                    .plan_reconcile(&diffs, &effects, endpoints, options, snap.id)
                    .await?;
                report.reconcile = Some(found);
                plan
            } else {
                plan_run(
                    self.store.as_ref(),
                    &self.staging,
                    &diffs,
                    endpoints,
                    snap.id,
                    options,
                )
                .await?
            };
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                workflows = plan.workflows,
                "planned"
            );
            if let Some(run) = plan.run {
                if let Some(p) = &progress {
                    p.started(plan.workflows);
                }
                report.absorb(execute(&runtime, effects.clone(), Some(run), observer).await?);
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "executed"
                );
                finalize(self.store.as_ref(), &self.staging, run).await?;
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "finalized"
                );
            }
            report.plan = Some(plan);
        }
        Ok(self.finish_report(report, &effects, started))
    }

    fn finish_report(
        &self,
        mut report: SyncReport,
        effects: &SyncEffects,
        started: Instant,
    ) -> SyncReport {
        report.uploads = effects.stats.uploads.load(Ordering::Relaxed);
        report.verifies = effects.stats.verifies.load(Ordering::Relaxed);
        report.probes = (
            effects.stats.probes.load(Ordering::Relaxed),
            effects.stats.probe_hits.load(Ordering::Relaxed),
        );
        report.seconds = started.elapsed().as_secs_f64();
        report
    }

    /// Re-fold every endpoint-sync journal through the transition function.
    pub async fn audit(&self) -> Result<AuditReport> {
        let mut report = AuditReport::default();
        let mut add = |kind: &str, a: bulwark_engine::audit::AuditSummary| {
            report.workflows += a.workflows;
            report.journal_rows += a.journal_rows;
            report.findings.extend(a.findings);
            report.retired_workflows += a.retired_workflows;
            report.retired.extend(a.retired);
            report.by_kind.insert(kind.to_string(), a.workflows);
        };
        add(
            EndpointSync::KIND,
            bulwark_engine::audit::audit::<EndpointSync>(self.store.as_ref()).await?,
        );
        add(
            crate::snapshot_flow::SnapshotFlow::KIND,
            bulwark_engine::audit::audit::<crate::snapshot_flow::SnapshotFlow>(self.store.as_ref())
                .await?,
        );
        Ok(report)
    }

    /// Remove history older than `keep` allows (`bulwark prune`, the worker's `prune`
    /// schedule): journals of runs that ended before the cutoff (the newest sync of every
    /// endpoint stays; snapshot journals go, the snapshots themselves are kept as long as
    /// they are needed), alerts, and staged snapshots no endpoint's state or running run
    /// needs; then checkpoint SQLite's write-ahead log. What each endpoint last confirmed
    /// is never removed, and what stays audits clean.
    pub async fn prune(&self, keep: &RetentionDays) -> Result<PruneReport> {
        let now = bulwark_engine::now_ms();
        let cutoff = |days: Option<u32>| days.map(|d| now - i64::from(d) * 86_400_000);
        let engine = self
            .backend
            .prune(&bulwark_engine::Retention {
                keep_latest_of: vec![crate::endpoint_sync::EndpointSync::KIND.to_string()],
                journal_before_ms: cutoff(keep.journal_days),
                alerts_before_ms: cutoff(keep.alert_days),
            })
            .await?;
        let (snapshots, snapshot_items) = match cutoff(keep.snapshot_days) {
            Some(before) => self.staging.prune_snapshots(before).await?,
            None => (0, 0),
        };
        self.backend.checkpoint().await?;
        Ok(PruneReport {
            workflows: engine.workflows,
            journal_rows: engine.journal_rows,
            runs: engine.runs,
            alerts: engine.alerts,
            snapshots,
            snapshot_items,
        })
    }

    /// Retire every unfinished workflow the audit finds a problem in (and no live lease
    /// holds) as `Corrupt`, with an alert, then finish the sync runs that were waiting on
    /// them. What an operator runs after a crash left a journal unreadable (workers also
    /// retire such workflows themselves when they meet them). Returns the retired ids with
    /// the first problem of each, and the runs finished.
    pub async fn repair(&self) -> Result<RepairReport> {
        let audit = self.audit().await?;
        let rows = self.store.workflows(None, None).await?;
        let mut report = RepairReport::default();
        let mut seen = std::collections::HashSet::new();
        for f in &audit.findings {
            if !seen.insert(f.workflow) {
                continue;
            }
            let Some(w) = rows.iter().find(|w| w.id == f.workflow) else {
                continue;
            };
            if w.terminal {
                report.left.push((w.id, f.to_string()));
                continue;
            }
            let alert = bulwark_engine::NewAlert {
                kind: "workflow_corrupt".into(),
                level: bulwark_engine::AlertLevel::Error,
                subject: w.subject.clone(),
                message: format!(
                    "{} {} of {:?} (run {}) retired as Corrupt by bulwark audit --repair: {f}; its journal is kept for inspection",
                    w.kind, w.id, w.subject, w.run_id
                ),
            };
            if self
                .store
                .retire(w.id, None, bulwark_engine::runtime::RETIRED_STATUS, &alert)
                .await?
            {
                report.retired.push((w.id, f.to_string()));
            } else {
                report.left.push((
                    w.id,
                    format!("{f} (a live lease holds it; stop its worker first)"),
                ));
            }
        }
        for r in self.store.runs().await? {
            if r.kind == "sync"
                && r.status == "running"
                && crate::sync::finalize(self.store.as_ref(), &self.staging, r.id).await?
            {
                report.finished_runs.push(r.id);
            }
        }
        Ok(report)
    }

    /// Runs, newest first, with per-state endpoint counts.
    pub async fn status(&self) -> Result<Status> {
        self.status_of_runs(None).await
    }

    /// [`Bulwark::status`] with only the `newest` runs (their counts by state are read per
    /// run, so a long history costs time); `runs_total` counts them all.
    pub async fn status_of_runs(&self, newest: Option<usize>) -> Result<Status> {
        self.status_of_runs_since(newest, None).await
    }

    /// [`Bulwark::status_of_runs`] of the runs created at or after `since_ms` (ms since
    /// the epoch; `None`: all); `runs_total` still counts every run.
    pub async fn status_of_runs_since(
        &self,
        newest: Option<usize>,
        since_ms: Option<i64>,
    ) -> Result<Status> {
        let mut runs = Vec::new();
        let all = self.store.runs().await?;
        let runs_total = all.len();
        for r in all
            .into_iter()
            .filter(|r| since_ms.is_none_or(|s| r.created_at >= s))
            .take(newest.unwrap_or(usize::MAX))
        {
            let counts = self.store.status_counts(Some(r.id)).await?;
            runs.push(RunStatus {
                id: r.id,
                kind: r.kind,
                status: r.status,
                created_at: r.created_at,
                finished_at: r.finished_at,
                states: counts.into_iter().collect(),
            });
        }
        Ok(Status {
            runs,
            runs_total,
            last_snapshot: self.staging.snapshots().await?.into_iter().next(),
            journal_rows: self.store.journal_len().await?,
            alerts: self.store.alerts(20).await?.len(),
            insecure_tls: self.staging.insecure_tls().await?,
            quarantined: self.staging.quarantine().await?.len(),
            workers: self.store.workers().await?,
            paused: self.store.holds().await?,
        })
    }

    /// Pause `endpoint` for every worker on this database (a durable hold, e.g. for a
    /// platform's planned maintenance): no new sync is planned for it, a sync of it under
    /// way stops before its next request (within a second) and waits exactly as it is —
    /// no retry used, no failure counted, no circuit moved — and reconciles do not read
    /// it. `reason` and `by` are recorded with it (and alerted). Returns whether it was
    /// newly paused (`false`: it already was; the reason is updated).
    pub async fn pause(&self, endpoint: &str, reason: &str, by: &str) -> Result<bool> {
        if endpoint.trim().is_empty() {
            return Err(crate::SyncError::Config(
                "pause: the endpoint id is empty".into(),
            ));
        }
        Ok(self.store.hold(endpoint, reason, by).await?)
    }

    /// Lift the pause on `endpoint`: a sync of it that waited goes on where it stopped
    /// (a worker claims it at its next poll; `bulwark sync` resumes it), and the next run
    /// plans it again. Returns whether it was paused.
    pub async fn resume(&self, endpoint: &str, by: &str) -> Result<bool> {
        Ok(self.store.lift_hold(endpoint, by).await?)
    }

    /// Paused endpoints, by id.
    pub async fn paused_endpoints(&self) -> Result<Vec<bulwark_engine::HoldRow>> {
        Ok(self.store.holds().await?)
    }

    /// Items endpoints refused (quarantined): each endpoint keeps what it had for them
    /// while the rest of its catalog syncs.
    pub async fn quarantine(&self) -> Result<Vec<crate::staging::QuarantineRow>> {
        self.staging.quarantine().await
    }

    /// Ask that the next sync carries quarantined items again (all, one endpoint's, or
    /// one SKU's), even if their snapshot value did not change. Returns how many.
    pub async fn retry_quarantined(
        &self,
        endpoint: Option<&str>,
        sku: Option<&str>,
    ) -> Result<u64> {
        self.staging.request_retry(endpoint, sku).await
    }

    /// Record which of `configured` endpoints skip TLS certificate verification
    /// (`insecure`), so that [`Bulwark::status`] and the dashboard show them. Call it when
    /// starting work with a configuration.
    pub async fn record_insecure_tls(
        &self,
        configured: &[EndpointConfig],
        insecure: &[String],
    ) -> Result<()> {
        let ids: Vec<String> = configured.iter().map(|e| e.id.clone()).collect();
        self.staging.record_insecure_tls(&ids, insecure).await?;
        Ok(())
    }

    /// Plan a sync run of `endpoints` towards the newest sealed snapshot without running
    /// it: workers (`Bulwark::work`, `bulwark worker`) pick it up.
    pub async fn enqueue(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
    ) -> Result<Option<Plan>> {
        let Some(snap) = self.staging.latest_sealed().await? else {
            return Ok(None);
        };
        let diffs = DiffCache::new(self.staging.clone());
        Ok(Some(
            plan_run(
                self.store.as_ref(),
                &self.staging,
                &diffs,
                endpoints,
                snap.id,
                options,
            )
            .await?,
        ))
    }

    /// Work as one of several workers on this database until `stop` is set (or, with
    /// `exit_when_idle`, until no run is left open): claim endpoint syncs of any run,
    /// drive them with heartbeated leases, and finalize runs as they complete.
    pub async fn work(
        &self,
        endpoints: &[EndpointConfig],
        options: &SyncOptions,
        worker: &WorkerOptions,
        stop: Arc<std::sync::atomic::AtomicBool>,
        progress: Option<Arc<dyn SyncProgress>>,
    ) -> Result<SyncReport> {
        let started = Instant::now();
        let mut work = worker.work.clone();
        // Claim what this worker can drive soon (its adapter calls in flight, twice over),
        // so that several workers share a run instead of the first taking nearly all of it.
        work.claim_chunk = Some(claim_chunk(&work, options.max_in_flight));
        let (_lock, _, effects) = self.prepare(endpoints, options).await?;
        let runtime = Runtime::<EndpointSync>::new(
            self.store.clone(),
            self.journal(),
            RuntimeConfig {
                worker: self.worker.clone(),
                lease_ms: worker.lease_ms,
                effect_margin_ms: worker.effect_margin_ms,
            },
        );
        let rt_stop = runtime.stop_flag();
        let observer: Option<Observer<EndpointSync>> = progress.clone().map(|p| {
            Arc::new(move |ctx: &WorkflowCtx<EndpointSync>, s: &State| {
                p.transition(&ctx.subject, s, EndpointSync::is_terminal(s))
            }) as Observer<EndpointSync>
        });
        // Finalize every open sync run that has completed (any worker may; it is
        // idempotent); true if none is left open. Every sync run that ends while this
        // worker works (seen open, or finished since it started, whoever finalized it) is
        // reported to the progress once.
        let since = bulwark_engine::store::now_ms();
        let seen: Arc<std::sync::Mutex<(HashSet<i64>, HashSet<i64>)>> = Arc::default();
        let finalize_open = {
            let (store, staging) = (self.store.clone(), self.staging.clone());
            move || {
                let (store, staging) = (store.clone(), staging.clone());
                let (progress, seen) = (progress.clone(), seen.clone());
                async move {
                    let Ok(runs) = store.runs().await else {
                        return false;
                    };
                    let report = |run: i64, status: &str| {
                        let (open, reported) = &mut *seen.lock().expect("seen runs");
                        open.remove(&run);
                        if let (true, Some(p)) = (reported.insert(run), &progress) {
                            p.run_finished(run, status);
                        }
                    };
                    let mut all = true;
                    for r in runs.iter().filter(|r| r.kind == "sync") {
                        if r.status != "running" {
                            let was_open = seen.lock().expect("seen runs").0.contains(&r.id);
                            if was_open || r.finished_at.is_some_and(|t| t >= since) {
                                report(r.id, &r.status);
                            }
                            continue;
                        }
                        seen.lock().expect("seen runs").0.insert(r.id);
                        match crate::sync::finalize_run(store.as_ref(), &staging, r.id, "finished")
                            .await
                        {
                            Ok(crate::sync::RunEnd::Finished) => report(r.id, "finished"),
                            // Waiting on paused endpoints: nothing to do until a hold is
                            // lifted, so an idle worker may end.
                            Ok(crate::sync::RunEnd::WaitingOnHolds) => {}
                            Ok(crate::sync::RunEnd::Open) => all = false,
                            Err(e) => {
                                tracing::warn!(run = r.id, error = %e, "finalizing failed");
                                all = false;
                            }
                        }
                    }
                    all
                }
            }
        };
        // Finalize runs as they complete, and pass the stop request on to the runtime.
        let finalizer = {
            let (finalize_open, stop) = (finalize_open.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        rt_stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    finalize_open().await;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            })
        };
        let idle = finalize_open;
        let outcome = runtime.work(effects.clone(), observer, work, idle).await;
        finalizer.abort();
        let mut report = SyncReport::default();
        report.absorb(outcome?);
        Ok(self.finish_report(report, &effects, started))
    }

    /// Close the database cleanly.
    pub async fn close(self) {
        self.backend.close().await;
    }
}

/// Workflows a worker claims at once when not told: twice its adapter calls in flight,
/// between 16 and 1024.
pub fn auto_claim_chunk(max_in_flight: usize) -> usize {
    max_in_flight.saturating_mul(2).clamp(16, 1024)
}

/// The claim chunk a worker with `work` uses ([`Bulwark::work`]): the one it was given,
/// else [`auto_claim_chunk`]; never above its capacity.
pub fn claim_chunk(work: &bulwark_engine::WorkOptions, max_in_flight: usize) -> usize {
    work.claim_chunk
        .unwrap_or_else(|| auto_claim_chunk(max_in_flight))
        .clamp(1, work.capacity.max(1))
}

/// One run in [`Status`].
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    /// Run id.
    pub id: i64,
    /// Kind.
    pub kind: String,
    /// running / finished.
    pub status: String,
    /// Created (ms).
    pub created_at: i64,
    /// Finished (ms).
    pub finished_at: Option<i64>,
    /// Endpoint counts by state.
    pub states: std::collections::BTreeMap<String, i64>,
}

/// What `bulwark status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Runs, newest first (all, or the newest of them: see [`Bulwark::status_of_runs`]).
    pub runs: Vec<RunStatus>,
    /// How many runs there are.
    pub runs_total: usize,
    /// The newest snapshot.
    pub last_snapshot: Option<SnapshotRow>,
    /// Journal rows.
    pub journal_rows: i64,
    /// Recent alerts (up to 20).
    pub alerts: usize,
    /// Endpoints that skip TLS certificate verification (`insecure_skip_verify`), as
    /// recorded by the last sync or worker started with them.
    pub insecure_tls: Vec<String>,
    /// Items quarantined at endpoints (see [`Bulwark::quarantine`]).
    pub quarantined: usize,
    /// Long-running workers heard of in the last day (their heartbeats and leases).
    pub workers: Vec<bulwark_engine::WorkerRow>,
    /// Endpoints an operator paused ([`Bulwark::pause`]).
    pub paused: Vec<bulwark_engine::HoldRow>,
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

/// A reconcile's finding as repairs: endpoint → drifted SKUs (as sent).
fn drift_repairs(found: &[crate::reconcile::EndpointDrift]) -> HashMap<String, Vec<String>> {
    found
        .iter()
        .filter(|f| !f.drifted.is_empty())
        .map(|f| {
            (
                f.endpoint.clone(),
                f.drifted.iter().map(|d| d.sku.clone()).collect(),
            )
        })
        .collect()
}
