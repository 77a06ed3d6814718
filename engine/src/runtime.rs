//! The worker loop: claim workflows, replay them, run their commands, journal each
//! transition before acting on it.

use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::task::JoinSet;

use crate::audit;
use crate::error::{EngineError, Result};
use crate::fence::{self, Fence};
use crate::hold::HeldSubjects;
use crate::journal::Journal;
use crate::machine::Machine;
use crate::presence::Presence;
use crate::store::{
    Append, AppendOutcome, CircuitWrite, NewAlert, RunId, Store, WorkflowId, WorkflowRow,
};

/// What a running workflow knows about itself.
#[derive(Debug)]
pub struct WorkflowCtx<M: Machine> {
    /// Workflow id.
    pub id: WorkflowId,
    /// Its run.
    pub run: RunId,
    /// Its subject (e.g. the endpoint id).
    pub subject: String,
    /// Its immutable input.
    pub input: Arc<M::Input>,
    /// The lease epoch this worker holds it under.
    pub epoch: i64,
    /// This worker (the lease owner).
    pub worker: Arc<str>,
}

impl<M: Machine> WorkflowCtx<M> {
    /// Check with the store, right before an effect that the other side cannot
    /// deduplicate, that this worker still holds the workflow's lease (a worker on a host
    /// whose clock runs ahead may have taken it early, while this one's fence still
    /// counts time left). When it does not, the fence is marked lost and tripped: the
    /// effect must not be sent, and the runtime drops the command's result. A store error
    /// counts as not holding it.
    pub async fn confirm_lease(&self, store: &dyn Store) -> bool {
        let held = store
            .holds_lease(self.id, &self.worker, self.epoch)
            .await
            .unwrap_or(false);
        if !held && let Some(f) = fence::current() {
            f.lose();
            let _ = f.check();
        }
        held
    }
}

/// Executes a machine's commands. Returns the event that reports the command's result,
/// or `None` for fire-and-forget commands.
#[async_trait]
pub trait Effects<M: Machine>: Send + Sync + 'static {
    /// Run one command.
    async fn execute(
        &self,
        ctx: &WorkflowCtx<M>,
        state: &M::State,
        command: M::Command,
    ) -> Option<M::Event>;

    /// Whether this worker can drive the workflow claimed for `subject` with this input
    /// (its own configuration knows the subject, with the same settings the run was
    /// planned with). `Err(reason)`: the workflow is released untouched (nothing journaled,
    /// nothing sent), claimed no more by this worker, and left for one that can. The
    /// default accepts everything.
    fn accepts(&self, subject: &str, input_json: &str) -> std::result::Result<(), String> {
        let _ = (subject, input_json);
        Ok(())
    }
}

/// Called after every committed transition (progress bars, metrics).
pub type Observer<M> = Arc<dyn Fn(&WorkflowCtx<M>, &<M as Machine>::State) + Send + Sync>;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// This worker's identity (written to the journal).
    pub worker: String,
    /// Lease length in milliseconds.
    pub lease_ms: i64,
    /// Effects stop once less than this is left of a lease whose renewal has not been
    /// confirmed (see [`crate::fence`]); `None`: a quarter of `lease_ms`.
    pub effect_margin_ms: Option<i64>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker: format!("worker-{}", std::process::id()),
            lease_ms: 60_000,
            effect_margin_ms: None,
        }
    }
}

impl RuntimeConfig {
    /// A worker `worker` holding leases of `lease_ms`, with the default effect margin.
    pub fn new(worker: impl Into<String>, lease_ms: i64) -> Self {
        Self {
            worker: worker.into(),
            lease_ms,
            effect_margin_ms: None,
        }
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.max(1) as u64)
    }

    fn margin(&self) -> Duration {
        let ms = self
            .effect_margin_ms
            .unwrap_or(self.lease_ms / 4)
            .clamp(0, self.lease_ms.max(0));
        Duration::from_millis(ms as u64)
    }

    /// The fence of a workflow whose lease was granted by a request sent at `sent_at`.
    fn fence(&self, id: WorkflowId, sent_at: Instant) -> Fence {
        Fence::new(id, sent_at, self.lease(), self.margin())
    }
}

/// How one call to [`Runtime::run`] ended.
#[derive(Debug, Default, Clone)]
pub struct RunOutcome {
    /// Workflows claimed.
    pub workflows: usize,
    /// Transitions journaled by this call.
    pub transitions: u64,
    /// Workflows whose lease was lost (another worker fenced us off).
    pub fenced: usize,
    /// Workflows refused (corrupt journal, illegal event, store failure), with the reason.
    pub refused: Vec<(WorkflowId, String)>,
    /// Workflows left non-terminal with nothing to do, or stopped by request.
    pub unfinished: usize,
    /// Refused workflows retired as [`RETIRED_STATUS`] (also counted in `refused`).
    pub retired: usize,
    /// Workflows released untouched because this worker cannot drive them
    /// ([`Effects::accepts`]), with the reason; each once.
    pub declined: Vec<(WorkflowId, String)>,
    /// Final states by name.
    pub by_status: BTreeMap<String, usize>,
    /// Workflows stopped (untouched, lease released) because their subject is held
    /// ([`Store::hold`]): they wait for the hold to be lifted.
    pub held: usize,
}

enum End {
    Finished(&'static str, u64),
    Fenced(u64),
    Unfinished(u64),
    /// Its subject is held: stopped before its next command, lease released.
    Held(u64),
    /// Refused for good (corrupt journal or input, illegal transition) and retired as
    /// [`RETIRED_STATUS`]: terminal, alerted.
    Retired(String),
}

/// The status a workflow that cannot go on is retired with (see [`Store::retire`]).
pub const RETIRED_STATUS: &str = "Corrupt";

/// Is `e` a refusal that no retry will cure (the workflow's own data is wrong), as opposed
/// to a store or network failure?
fn is_permanent(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Corrupt { .. } | EngineError::Transition { .. } | EngineError::Json { .. }
    )
}

/// Retire a workflow refused for good; returns how the attempt to drive it ended.
async fn retire_refused<M: Machine>(
    store: &dyn Store,
    row: &WorkflowRow,
    epoch: Option<i64>,
    e: EngineError,
) -> Result<End> {
    if !is_permanent(&e) {
        return Err(e);
    }
    let reason = e.to_string();
    let alert = crate::store::NewAlert {
        kind: "workflow_corrupt".into(),
        level: crate::AlertLevel::Error,
        subject: row.subject.clone(),
        message: format!(
            "{} {} of {:?} (run {}) retired as {RETIRED_STATUS}: {reason}; its journal is kept for inspection, and the next run plans {:?} afresh",
            M::KIND,
            row.id,
            row.subject,
            row.run_id,
            row.subject
        ),
    };
    if store.retire(row.id, epoch, RETIRED_STATUS, &alert).await? {
        Ok(End::Retired(reason))
    } else {
        // Another worker holds it now (or it already ended): not ours to retire.
        Err(e)
    }
}

/// Drives workflows of one machine kind.
pub struct Runtime<M: Machine> {
    store: Arc<dyn Store>,
    journal: Journal,
    config: RuntimeConfig,
    stop: Arc<AtomicBool>,
    presence: std::sync::OnceLock<Option<Arc<Presence>>>,
    holds: HeldSubjects,
    _machine: PhantomData<fn() -> M>,
}

impl<M: Machine> Runtime<M> {
    /// A runtime writing through `journal` into `store`.
    pub fn new(store: Arc<dyn Store>, journal: Journal, config: RuntimeConfig) -> Self {
        Self {
            store,
            journal,
            config,
            stop: Arc::new(AtomicBool::new(false)),
            presence: std::sync::OnceLock::new(),
            holds: HeldSubjects::default(),
            _machine: PhantomData,
        }
    }

    /// Owners of leases on this database whose process on this host is gone (announcing
    /// this worker's own presence first; see [`crate::presence`]).
    fn dead_owners(&self) -> Vec<String> {
        let presence = self.presence.get_or_init(|| {
            let scope = self.store.presence_scope()?;
            match Presence::shared(&scope, &self.config.worker) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::info!(worker = %self.config.worker, error = %e,
                        "leases of workers that die on this host will be taken over when they run out");
                    None
                }
            }
        });
        presence.as_ref().map(|p| p.dead()).unwrap_or_default()
    }

    /// A flag that, once set, makes workflows stop before their next command (their
    /// state is already journaled; a later run resumes them).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Claim every unfinished workflow of this kind (of `run`, or of all runs), replay
    /// each from its journal and drive it until it is terminal.
    pub async fn run(
        &self,
        run: Option<RunId>,
        effects: Arc<dyn Effects<M>>,
        observer: Option<Observer<M>>,
    ) -> Result<RunOutcome> {
        let sent_at = Instant::now();
        let dead = self.dead_owners();
        let claimed = self
            .store
            .claim(&crate::store::ClaimRequest {
                owner: self.config.worker.clone(),
                kind: M::KIND.to_string(),
                run,
                lease_ms: self.config.lease_ms,
                limit: None,
                skip: Vec::new(),
                dead_owners: dead.clone(),
                held: false,
            })
            .await?;
        tracing::debug!(claimed = claimed.len(), "claimed");
        self.holds
            .not_held(claimed.iter().map(|w| w.subject.as_str()));
        log_takeovers(&claimed, &self.config.worker, &dead, self.journal.stats());
        let mut outcome = RunOutcome::default();
        let claimed = decline_foreign(
            &self.store,
            &self.config.worker,
            &effects,
            claimed,
            &mut Vec::new(),
            &mut outcome,
        )
        .await?;
        outcome.workflows = claimed.len();
        let held: Held = Arc::default();
        let heartbeat = self.heartbeat(held.clone(), false);
        let watcher = self.watch_holds(held.clone());
        let worker: Arc<str> = Arc::from(self.config.worker.as_str());
        let mut tasks = JoinSet::new();
        for w in claimed {
            let fence = self.config.fence(w.id, sent_at);
            held.lock()
                .expect("held")
                .insert(w.id, (w.epoch, fence.clone()));
            let store = self.store.clone();
            let journal = self.journal.clone();
            let effects = effects.clone();
            let observer = observer.clone();
            let worker = worker.clone();
            let stop = self.stop.clone();
            let holds = self.holds.clone();
            tasks.spawn(async move {
                let id = w.id;
                let row = claimed_row::<M>(w);
                (
                    id,
                    drive::<M>(
                        store, journal, effects, observer, worker, stop, holds, fence, row,
                    )
                    .await,
                )
            });
        }
        let mut failed = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((id, result)) => {
                    held.lock().expect("held").remove(&id);
                    record(&mut outcome, id, result);
                }
                Err(e) => {
                    failed
                        .get_or_insert(EngineError::Other(format!("workflow task panicked: {e}")));
                }
            }
        }
        heartbeat.abort();
        watcher.abort();
        match failed {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    /// Keep this runtime's view of the held subjects current while it drives workflows
    /// (every [`crate::hold::REFRESH`], or a third of the lease if shorter): a workflow
    /// whose subject becomes held stops before its next command. A failed read keeps the
    /// last view.
    fn watch_holds(&self, held: Held) -> tokio::task::JoinHandle<()> {
        let (store, holds) = (self.store.clone(), self.holds.clone());
        let every = crate::hold::REFRESH.min(Duration::from_millis(
            (self.config.lease_ms / 3).max(50) as u64,
        ));
        tokio::spawn(async move {
            loop {
                if !held.lock().expect("held").is_empty() {
                    match store.holds().await {
                        Ok(rows) => holds.set(rows.into_iter().map(|h| h.subject)),
                        Err(e) => tracing::warn!(error = %e, "reading the holds failed"),
                    }
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    /// Keep the leases of `held` alive: renew them every third of the lease; a confirmed
    /// renewal moves each one's fence on, a workflow another worker holds now has its
    /// fence marked lost. A failed renewal moves nothing: effects stop at the deadline.
    ///
    /// With `beat` (a long-running worker), each round also records the worker's own
    /// heartbeat ([`Store::worker_beat`]), for `bulwark status`, first at once.
    fn heartbeat(&self, held: Held, beat: bool) -> tokio::task::JoinHandle<()> {
        let (store, owner, lease_ms, lease) = (
            self.store.clone(),
            self.config.worker.clone(),
            self.config.lease_ms,
            self.config.lease(),
        );
        tokio::spawn(async move {
            let every = Duration::from_millis((lease_ms / 3).max(50) as u64);
            let mut first = true;
            loop {
                if beat && let Err(e) = store.worker_beat(&owner, lease_ms).await {
                    tracing::warn!(error = %e, "recording the worker's heartbeat failed");
                }
                if !std::mem::take(&mut first) || !beat {
                    tokio::time::sleep(every).await;
                }
                let snapshot: Vec<(WorkflowId, i64)> = held
                    .lock()
                    .expect("held")
                    .iter()
                    .map(|(id, (epoch, _))| (*id, *epoch))
                    .collect();
                if snapshot.is_empty() {
                    continue;
                }
                let sent_at = Instant::now();
                match store.renew(&owner, &snapshot, lease_ms).await {
                    Ok(renewed) => {
                        let renewed: std::collections::HashSet<_> = renewed.into_iter().collect();
                        for (id, (_, fence)) in held.lock().expect("held").iter() {
                            if renewed.contains(id) {
                                fence.renewed(sent_at, lease);
                            } else if fence.lose() {
                                tracing::warn!(
                                    workflow = id,
                                    "lease lost (another worker claimed it); stopping it before its next effect"
                                );
                            }
                        }
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "lease heartbeat failed; effects stop when the leases run out unless a renewal succeeds"
                    ),
                }
            }
        })
    }
}

impl<M: Machine> Runtime<M> {
    /// Feed `event` (e.g. an operator's cancel) to every unfinished workflow of `run`:
    /// claim them (fencing off any worker that holds them, which then drops them), replay
    /// each from its journal, apply the event and journal the result. Workflows that
    /// refuse the event are left as they are and reported. Returns how many took it.
    pub async fn signal_run(
        &self,
        run: RunId,
        event: M::Event,
    ) -> Result<(usize, Vec<(WorkflowId, String)>)> {
        let claimed = self
            .store
            .claim(&crate::store::ClaimRequest {
                owner: self.config.worker.clone(),
                kind: M::KIND.to_string(),
                run: Some(run),
                lease_ms: self.config.lease_ms,
                limit: None,
                skip: Vec::new(),
                dead_owners: self.dead_owners(),
                // A signal (a cancel) reaches held workflows too.
                held: true,
            })
            .await?;
        let worker: Arc<str> = Arc::from(self.config.worker.as_str());
        let (mut taken, mut refused) = (0, Vec::new());
        let mut held = Vec::new();
        for w in claimed {
            held.push((w.id, w.epoch));
            let row = claimed_row::<M>(w);
            // A workflow that cannot be folded is retired (terminal, alerted), so that
            // the signal (a cancel) still ends its run.
            let epoch = Some(row.epoch);
            let input: M::Input = match serde_json::from_str(&row.input_json) {
                Ok(i) => i,
                Err(e) => {
                    let e = EngineError::Corrupt {
                        workflow: row.id,
                        seq: 0,
                        detail: format!("input does not decode: {e}"),
                    };
                    let why = e.to_string();
                    retire_refused::<M>(self.store.as_ref(), &row, epoch, e)
                        .await
                        .ok();
                    refused.push((row.id, why));
                    continue;
                }
            };
            let state = match audit::replay::<M>(self.store.as_ref(), &row).await {
                Ok(s) => s,
                Err(e) => {
                    let why = e.to_string();
                    retire_refused::<M>(self.store.as_ref(), &row, epoch, e)
                        .await
                        .ok();
                    refused.push((row.id, why));
                    continue;
                }
            };
            let next = match M::apply(&input, &state, &event) {
                Ok(t) => t,
                Err(e) => {
                    refused.push((row.id, e.to_string()));
                    continue;
                }
            };
            let append = transition_append::<M>(
                &input,
                &row.subject,
                (row.id, row.seq + 1, row.epoch),
                &worker,
                &state,
                &event,
                &next.state,
            )?;
            match self.journal.append(append).await? {
                AppendOutcome::Committed => taken += 1,
                AppendOutcome::Fenced => refused.push((row.id, "fenced by another claim".into())),
            }
        }
        self.store.release(&self.config.worker, &held).await?;
        Ok((taken, refused))
    }
}

/// Settings of a long-running worker ([`Runtime::work`]).
#[derive(Debug, Clone)]
pub struct WorkOptions {
    /// Most workflows driven at once by this worker.
    pub capacity: usize,
    /// Most workflows taken by one claim; `None`: up to `capacity`. Several workers share
    /// the work only if each claims what it can drive soon: a worker with room for 10,000
    /// would otherwise take nearly all of a run at its first claim. While claims come back
    /// full, the worker claims again once half a chunk has finished (and at every poll).
    pub claim_chunk: Option<usize>,
    /// How long to wait for a notification before polling for work again.
    pub poll: std::time::Duration,
    /// Return once no work is claimable, nothing is in flight, and `idle` says so twice,
    /// a poll interval (or a notification of new work) apart.
    pub exit_when_idle: bool,
}

impl Default for WorkOptions {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            claim_chunk: None,
            poll: std::time::Duration::from_secs(2),
            exit_when_idle: false,
        }
    }
}

/// Split claimed workflows into those `effects` accepts and those it declines; the
/// declined ones are released at once (untouched), added to `skip` and `outcome`, and
/// logged, once per reason.
async fn decline_foreign<M: Machine>(
    store: &Arc<dyn Store>,
    owner: &str,
    effects: &Arc<dyn Effects<M>>,
    claimed: Vec<crate::store::ClaimedWorkflow>,
    skip: &mut Vec<WorkflowId>,
    outcome: &mut RunOutcome,
) -> Result<Vec<crate::store::ClaimedWorkflow>> {
    let mut mine = Vec::with_capacity(claimed.len());
    let mut foreign: Vec<(WorkflowId, i64)> = Vec::new();
    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in claimed {
        let verdict = if w.version == M::VERSION
            || (w.version < M::VERSION && M::reads_version(w.version))
        {
            effects.accepts(&w.subject, &w.input_json)
        } else if w.version > M::VERSION {
            Err(format!(
                "written by a newer Bulwark (its {} encoding is version {}; this build writes version {}): left for a worker of that version",
                M::KIND,
                w.version,
                M::VERSION
            ))
        } else {
            Err(format!(
                "written by an older Bulwark (its {} encoding is version {}, which this build, version {}, no longer reads): finish it with a build of that version first (docs/upgrading.md)",
                M::KIND,
                w.version,
                M::VERSION
            ))
        };
        match verdict {
            Ok(()) => mine.push(w),
            Err(reason) => {
                foreign.push((w.id, w.epoch));
                skip.push(w.id);
                outcome.declined.push((w.id, reason.clone()));
                reasons.entry(reason).or_default().push(w.subject);
            }
        }
    }
    if !foreign.is_empty() {
        store.release(owner, &foreign).await?;
        for (reason, subjects) in reasons {
            let shown: Vec<&str> = subjects.iter().take(5).map(String::as_str).collect();
            tracing::warn!(
                workflows = subjects.len(),
                "left {} workflow(s) untouched for a worker that can drive them ({}{}): {reason}",
                subjects.len(),
                shown.join(", "),
                if subjects.len() > shown.len() {
                    ", …"
                } else {
                    ""
                },
            );
        }
    }
    Ok(mine)
}

/// Log, per previous owner, the workflows taken over from a worker whose lease ran out
/// (and count them in `stats`).
fn log_takeovers(
    claimed: &[crate::store::ClaimedWorkflow],
    me: &str,
    dead: &[String],
    stats: &crate::journal::JournalStats,
) {
    let mut from: BTreeMap<&str, usize> = BTreeMap::new();
    for w in claimed {
        if let Some(p) = w.previous_owner.as_deref().filter(|p| *p != me) {
            *from.entry(p).or_default() += 1;
        }
    }
    for (previous, n) in from {
        stats
            .takeovers
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        let why = if dead.iter().any(|d| d == previous) {
            "whose process on this host is gone"
        } else {
            "whose lease expired"
        };
        tracing::info!(
            workflows = n,
            from = previous,
            "took over {n} workflow(s) from worker {previous} {why}"
        );
    }
}

type Held = Arc<std::sync::Mutex<std::collections::HashMap<WorkflowId, (i64, Fence)>>>;

impl<M: Machine> Runtime<M> {
    /// Work as one of possibly many workers on a shared database: claim runnable workflows
    /// (up to `capacity` at a time), keep their leases alive by heartbeat, drive them, and
    /// claim more as they finish or as new work is announced. Returns when the stop flag is
    /// set (after releasing every lease it still holds), or when idle if
    /// `exit_when_idle` and `idle()` returns true.
    pub async fn work<F, Fut>(
        &self,
        effects: Arc<dyn Effects<M>>,
        observer: Option<Observer<M>>,
        options: WorkOptions,
        idle: F,
    ) -> Result<RunOutcome>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let worker: Arc<str> = Arc::from(self.config.worker.as_str());
        let held: Held = Arc::default();
        let mut outcome = RunOutcome::default();
        // Workflows this worker declined (see `Effects::accepts`): not claimed again.
        let mut declined: Vec<WorkflowId> = Vec::new();
        let heartbeat = self.heartbeat(held.clone(), true);
        let watcher = self.watch_holds(held.clone());
        let mut tasks = JoinSet::new();
        let result: Result<()> = async {
            // Claim at start, when notified, when the poll interval passes (leases of dead
            // workers expire silently), and when half a claim chunk is free — not after
            // every finished workflow: a claim scans the open workflows.
            let mut want_claim = true;
            let mut more_available = false;
            let mut last_claim = std::time::Instant::now();
            let mut idle_once = false;
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    break;
                }
                let chunk = options.claim_chunk.unwrap_or(options.capacity).clamp(1, options.capacity.max(1));
                let free = options.capacity.saturating_sub(tasks.len());
                let mut claimed_any = false;
                if last_claim.elapsed() >= options.poll {
                    want_claim = true;
                }
                if want_claim && free > 0 {
                    let sent_at = Instant::now();
                    let dead = self.dead_owners();
                    let claimed = self
                        .store
                        .claim(&crate::store::ClaimRequest {
                            owner: self.config.worker.clone(),
                            kind: M::KIND.to_string(),
                            run: None,
                            lease_ms: self.config.lease_ms,
                            limit: Some(free.min(chunk)),
                            skip: declined.clone(),
                            dead_owners: dead.clone(),
                            held: false,
                        })
                        .await?;
                    last_claim = std::time::Instant::now();
                    claimed_any = !claimed.is_empty();
                    // A full answer means there may be more, to take as room frees up.
                    more_available = claimed.len() == free.min(chunk);
                    want_claim = false;
                    // What the claim returned is not held now, whatever this worker's
                    // last read of the holds said (a hold lifted since).
                    self.holds.not_held(claimed.iter().map(|w| w.subject.as_str()));
                    log_takeovers(&claimed, &self.config.worker, &dead, self.journal.stats());
                    let claimed = decline_foreign(
                        &self.store,
                        &self.config.worker,
                        &effects,
                        claimed,
                        &mut declined,
                        &mut outcome,
                    )
                    .await?;
                    outcome.workflows += claimed.len();
                    if !claimed.is_empty() {
                        tracing::info!(claimed = claimed.len(), "claimed workflows");
                    }
                    for w in claimed {
                        let fence = self.config.fence(w.id, sent_at);
                        held.lock().expect("held").insert(w.id, (w.epoch, fence.clone()));
                        let (store, journal, effects, observer, worker, stop, holds) = (
                            self.store.clone(),
                            self.journal.clone(),
                            effects.clone(),
                            observer.clone(),
                            worker.clone(),
                            self.stop.clone(),
                            self.holds.clone(),
                        );
                        let row = claimed_row::<M>(w);
                        tasks.spawn(async move {
                            let id = row.id;
                            (id, drive::<M>(store, journal, effects, observer, worker, stop, holds, fence, row).await)
                        });
                    }
                }
                if claimed_any {
                    idle_once = false;
                }
                if tasks.is_empty() {
                    if claimed_any {
                        continue;
                    }
                    if options.exit_when_idle && idle().await {
                        // Idle twice in a row, a poll apart: work queued (and announced)
                        // while this worker was finding itself idle is claimed, not left.
                        if idle_once {
                            break;
                        }
                        idle_once = true;
                    } else {
                        idle_once = false;
                    }
                    let _ = self.store.wait_for_work(options.poll).await;
                    want_claim = true;
                    continue;
                }
                let until_poll = options.poll.saturating_sub(last_claim.elapsed());
                tokio::select! {
                    Some(joined) = tasks.join_next() => {
                        let (id, result) = joined.map_err(|e| EngineError::Other(format!("workflow task panicked: {e}")))?;
                        held.lock().expect("held").remove(&id);
                        record(&mut outcome, id, result);
                        if more_available && tasks.len() <= chunk / 2 {
                            want_claim = true;
                        }
                    }
                    _ = self.store.wait_for_work(until_poll), if free > 0 => {
                        want_claim = true;
                    }
                }
            }
            Ok(())
        }
        .await;
        // Stopping: workflows finish their current command and return; then leases go back.
        while let Some(joined) = tasks.join_next().await {
            if let Ok((id, result)) = joined {
                held.lock().expect("held").remove(&id);
                record(&mut outcome, id, result);
            }
        }
        heartbeat.abort();
        watcher.abort();
        let left: Vec<(WorkflowId, i64)> = held
            .lock()
            .expect("held")
            .iter()
            .map(|(id, (e, _))| (*id, *e))
            .collect();
        if !left.is_empty() {
            self.store.release(&self.config.worker, &left).await?;
        }
        result.map(|()| outcome)
    }
}

fn record(outcome: &mut RunOutcome, id: WorkflowId, result: Result<End>) {
    match result {
        Ok(End::Finished(status, n)) => {
            outcome.transitions += n;
            *outcome.by_status.entry(status.to_string()).or_default() += 1;
        }
        Ok(End::Fenced(n)) => {
            outcome.transitions += n;
            outcome.fenced += 1;
            tracing::warn!(workflow = id, "lost the lease; dropped the workflow");
        }
        Ok(End::Unfinished(n)) => {
            outcome.transitions += n;
            outcome.unfinished += 1;
        }
        Ok(End::Held(n)) => {
            outcome.transitions += n;
            outcome.held += 1;
        }
        Ok(End::Retired(reason)) => {
            tracing::error!(workflow = id, error = %reason, "workflow refused and retired as {RETIRED_STATUS}");
            *outcome
                .by_status
                .entry(RETIRED_STATUS.to_string())
                .or_default() += 1;
            outcome.retired += 1;
            outcome.refused.push((id, reason));
        }
        Err(e) => {
            tracing::error!(workflow = id, error = %e, "workflow refused");
            outcome.refused.push((id, e.to_string()));
        }
    }
}

/// The row a claimed workflow is driven from.
fn claimed_row<M: Machine>(w: crate::store::ClaimedWorkflow) -> WorkflowRow {
    WorkflowRow {
        id: w.id,
        run_id: w.run_id,
        kind: M::KIND.to_string(),
        subject: w.subject,
        input_json: w.input_json,
        status: String::new(),
        state_json: w.state_json,
        seq: w.seq,
        epoch: w.epoch,
        terminal: false,
    }
}

/// The conditional append that journals `previous --event--> next` as `(workflow, seq,
/// epoch)`, with what the machine's notice records alongside it.
fn transition_append<M: Machine>(
    input: &M::Input,
    subject: &str,
    (workflow, seq, epoch): (WorkflowId, i64, i64),
    worker: &Arc<str>,
    previous: &M::State,
    event: &M::Event,
    next: &M::State,
) -> Result<Append> {
    let notice = M::notice(input, previous, event, next);
    let json = |what: &str, r: serde_json::Result<String>| {
        r.map_err(|source| EngineError::Json {
            what: what.into(),
            source,
        })
    };
    Ok(Append {
        workflow,
        seq,
        epoch,
        worker: worker.clone(),
        event_json: json("event", serde_json::to_string(event))?,
        state_json: json("state", serde_json::to_string(next))?,
        status: M::status(next),
        terminal: M::is_terminal(next),
        wake_at: M::wake_at(next),
        alerts: notice
            .alerts
            .into_iter()
            .map(|a| NewAlert {
                kind: a.kind.to_string(),
                level: a.level,
                subject: subject.to_string(),
                message: a.message,
            })
            .collect(),
        circuit: notice.circuit.map(|change| CircuitWrite {
            subject: subject.to_string(),
            change,
        }),
    })
}

/// [`drive_workflow`] inside a span carrying the workflow's kind, id, run and subject, so
/// that every event logged while driving it (adapters included) names them.
#[allow(clippy::too_many_arguments)]
async fn drive<M: Machine>(
    store: Arc<dyn Store>,
    journal: Journal,
    effects: Arc<dyn Effects<M>>,
    observer: Option<Observer<M>>,
    worker: Arc<str>,
    stop: Arc<AtomicBool>,
    holds: HeldSubjects,
    fence: Fence,
    row: WorkflowRow,
) -> Result<End> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "workflow",
        kind = M::KIND,
        workflow = row.id,
        run = row.run_id,
        subject = %row.subject
    );
    let kept = row.clone();
    let epoch = row.epoch;
    let store2 = store.clone();
    async move {
        match drive_workflow::<M>(
            store,
            journal,
            effects,
            observer,
            worker.clone(),
            stop,
            holds,
            fence,
            row,
        )
        .await
        {
            Err(e) => retire_refused::<M>(store2.as_ref(), &kept, Some(epoch), e).await,
            Ok(End::Held(n)) => {
                // Give the lease back at once: the workflow waits for the hold to be
                // lifted, and then any worker may take it up.
                tracing::info!("held by an operator: stopped before its next command");
                if let Err(e) = store2.release(&worker, &[(kept.id, epoch)]).await {
                    tracing::warn!(error = %e, "releasing a held workflow's lease failed; it expires instead");
                }
                Ok(End::Held(n))
            }
            ok => ok,
        }
    }
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn drive_workflow<M: Machine>(
    store: Arc<dyn Store>,
    journal: Journal,
    effects: Arc<dyn Effects<M>>,
    observer: Option<Observer<M>>,
    worker: Arc<str>,
    stop: Arc<AtomicBool>,
    holds: HeldSubjects,
    fence: Fence,
    row: WorkflowRow,
) -> Result<End> {
    let input: M::Input =
        serde_json::from_str(&row.input_json).map_err(|e| EngineError::Corrupt {
            workflow: row.id,
            seq: 0,
            detail: format!("input does not decode: {e}"),
        })?;
    // A fresh workflow is its row 0; anything further along is replayed from its journal.
    let mut state: M::State = if row.seq == 0 {
        serde_json::from_str(&row.state_json).map_err(|e| EngineError::Corrupt {
            workflow: row.id,
            seq: 0,
            detail: format!("state does not decode: {e}"),
        })?
    } else {
        audit::replay::<M>(store.as_ref(), &row).await?
    };
    let ctx = WorkflowCtx::<M> {
        id: row.id,
        run: row.run_id,
        subject: row.subject,
        input: Arc::new(input),
        epoch: row.epoch,
        worker: worker.clone(),
    };
    let mut seq = row.seq;
    let mut written = 0u64;
    let mut queue: VecDeque<M::Command> = M::resume(&ctx.input, &state).into();
    while let Some(command) = queue.pop_front() {
        if fence.is_lost() {
            // The heartbeat found another worker holds this workflow now.
            return Ok(End::Fenced(written));
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(End::Unfinished(written));
        }
        if holds.contains(&ctx.subject) {
            return Ok(End::Held(written));
        }
        // Effect fencing: no command starts on a lease that may have run out (a worker
        // resumed after a pause sees it at once), and what a command returns after one
        // of its requests was refused is dropped unjournaled (replay verifies first).
        if let Err(e) = fence.check() {
            tracing::warn!(error = %e, "stopping the workflow before its next command");
            return Ok(End::Fenced(written));
        }
        let executed = fence::scope(fence.clone(), effects.execute(&ctx, &state, command)).await;
        if fence.tripped() {
            tracing::warn!(
                "an effect was refused (lease lost or unconfirmed); dropping the command's result"
            );
            return Ok(End::Fenced(written));
        }
        let Some(event) = executed else {
            continue;
        };
        let next =
            M::apply(&ctx.input, &state, &event).map_err(|source| EngineError::Transition {
                workflow: ctx.id,
                source,
            })?;
        let append = transition_append::<M>(
            &ctx.input,
            &ctx.subject,
            (ctx.id, seq + 1, row.epoch),
            &worker,
            &state,
            &event,
            &next.state,
        )?;
        // Journal before effect: the commands of `next` run only once it is durable.
        match journal.append(append).await? {
            AppendOutcome::Committed => {}
            AppendOutcome::Fenced => return Ok(End::Fenced(written)),
        }
        seq += 1;
        written += 1;
        state = next.state;
        if let Some(observe) = &observer {
            observe(&ctx, &state);
        }
        queue.extend(next.commands);
    }
    if M::is_terminal(&state) {
        Ok(End::Finished(M::status(&state), written))
    } else {
        Ok(End::Unfinished(written))
    }
}
