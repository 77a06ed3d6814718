//! The storage seam: everything the engine persists goes through [`Store`].

use async_trait::async_trait;
use serde::Serialize;

use crate::circuit::CircuitRow;
use crate::error::Result;

/// Identifier of a workflow row.
pub type WorkflowId = i64;
/// Identifier of a run.
pub type RunId = i64;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A workflow to create.
#[derive(Debug, Clone)]
pub struct NewWorkflow {
    /// Machine kind.
    pub kind: String,
    /// What the workflow is about (unique within the run), e.g. an endpoint id.
    pub subject: String,
    /// Serialised input.
    pub input_json: String,
    /// Serialised initial state.
    pub state_json: String,
    /// Name of the initial state.
    pub status: String,
    /// The version of the machine's persisted encoding it is written in
    /// ([`crate::Machine::VERSION`]).
    pub version: u32,
}

/// What to claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The claiming worker.
    pub owner: String,
    /// Machine kind.
    pub kind: String,
    /// Only this run (or any).
    pub run: Option<RunId>,
    /// Lease length in milliseconds.
    pub lease_ms: i64,
    /// Most workflows to claim (None: all available).
    pub limit: Option<usize>,
    /// Workflows not to claim (this worker declined them).
    pub skip: Vec<WorkflowId>,
    /// Owners known to be dead (their process is gone, see [`crate::presence`]): their
    /// leases may be claimed before they run out.
    pub dead_owners: Vec<String>,
    /// Claim workflows of held subjects too (see [`Store::hold`]): only for an
    /// operator's signal such as a cancel, never to drive them.
    pub held: bool,
}

/// A workflow claimed by a worker: everything needed to resume it.
#[derive(Debug, Clone)]
pub struct ClaimedWorkflow {
    /// Workflow id.
    pub id: WorkflowId,
    /// Its run.
    pub run_id: RunId,
    /// Its subject.
    pub subject: String,
    /// Serialised input.
    pub input_json: String,
    /// Serialised current state.
    pub state_json: String,
    /// Last journaled sequence number.
    pub seq: i64,
    /// The lease epoch this worker now holds.
    pub epoch: i64,
    /// The version of the persisted encoding it was created in ([`crate::Machine::VERSION`]).
    pub version: u32,
    /// The worker whose lease ran out without being released (it died, stopped or lost
    /// touch with the database): this claim is a takeover. `None` for released work.
    pub previous_owner: Option<String>,
}

/// How serious an alert is (also the level of its tracing event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertLevel {
    /// Needs a look (retries exhausted, a run finished with tripped endpoints).
    Warn,
    /// Something is failing (a circuit opened).
    Error,
}

impl AlertLevel {
    /// `warn` or `error`, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }

    /// Parse a stored level (anything unknown reads as `error`).
    pub fn parse(s: &str) -> Self {
        if s == "warn" { Self::Warn } else { Self::Error }
    }
}

/// An alert to record (in the same transaction as the transition or operation that
/// raised it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewAlert {
    /// Alert kind: `circuit_opened`, `circuit_closed`, `retries_exhausted`,
    /// `run_tripped`, or a machine's own.
    pub kind: String,
    /// Severity.
    pub level: AlertLevel,
    /// Subject, e.g. the endpoint id or `run:7`.
    pub subject: String,
    /// Human-readable message (never contains secrets).
    pub message: String,
}

/// A change to the circuit of the appending workflow's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitWrite {
    /// The subject.
    pub subject: String,
    /// What happens to its circuit.
    pub change: crate::circuit::CircuitChange,
}

/// One conditional journal append: it lands only if the workflow is still at `seq - 1`
/// under lease `epoch`.
#[derive(Debug, Clone)]
pub struct Append {
    /// Workflow id.
    pub workflow: WorkflowId,
    /// The new sequence number (previous + 1).
    pub seq: i64,
    /// Lease epoch the writer holds.
    pub epoch: i64,
    /// Writer identity.
    pub worker: std::sync::Arc<str>,
    /// The event applied.
    pub event_json: String,
    /// The resulting state.
    pub state_json: String,
    /// Name of the resulting state.
    pub status: &'static str,
    /// Resulting state is terminal.
    pub terminal: bool,
    /// Wake-up time of the resulting state, if it sleeps.
    pub wake_at: Option<i64>,
    /// Alerts raised by this transition.
    pub alerts: Vec<NewAlert>,
    /// What this transition does to its subject's circuit (committed with it; the store
    /// records the `circuit_opened` / `circuit_closed` alert that goes with it).
    pub circuit: Option<CircuitWrite>,
}

/// The fate of one [`Append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Durably committed.
    Committed,
    /// Refused: the workflow moved on or another worker holds a newer epoch.
    Fenced,
}

/// A journal row as stored (JSON left undecoded so corruption can be reported precisely).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalRow {
    /// Workflow id.
    pub workflow: WorkflowId,
    /// Sequence number.
    pub seq: i64,
    /// Commit time (ms).
    pub at: i64,
    /// Writer identity.
    pub worker: String,
    /// Lease epoch of the writer.
    pub epoch: i64,
    /// Event applied (`None` for row 0).
    pub event_json: Option<String>,
    /// Resulting state.
    pub state_json: String,
}

/// A workflow row as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkflowRow {
    /// Workflow id.
    pub id: WorkflowId,
    /// Its run.
    pub run_id: RunId,
    /// Machine kind.
    pub kind: String,
    /// Subject.
    pub subject: String,
    /// Serialised input.
    pub input_json: String,
    /// Current state name.
    pub status: String,
    /// Serialised current state.
    pub state_json: String,
    /// Last sequence number.
    pub seq: i64,
    /// Current lease epoch.
    pub epoch: i64,
    /// Terminal state reached.
    pub terminal: bool,
}

/// A long-running worker as its heartbeats recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerRow {
    /// Its id (`host-pid` for `bulwark worker`).
    pub worker: String,
    /// First heartbeat of this id (ms).
    pub started_at: i64,
    /// Last heartbeat (ms).
    pub last_beat: i64,
    /// Its lease length; it beats every third of that.
    pub lease_ms: i64,
    /// Workflows whose lease it holds now (not expired).
    pub leases: i64,
    /// Workflows it held whose lease ran out without being released or taken over yet.
    pub expired: i64,
}

/// An operator's hold on a subject (see [`Store::hold`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HoldRow {
    /// The subject held.
    pub subject: String,
    /// Why (as the operator gave it).
    pub reason: String,
    /// Who placed it.
    pub by: String,
    /// When (ms).
    pub since: i64,
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunRow {
    /// Run id.
    pub id: RunId,
    /// Run kind, e.g. `sync`.
    pub kind: String,
    /// `running`, `finished` or `cancelled`.
    pub status: String,
    /// Serialised parameters.
    pub params_json: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// Finish time (ms).
    pub finished_at: Option<i64>,
}

/// An alert as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlertRow {
    /// Alert id.
    pub id: i64,
    /// Time (ms).
    pub at: i64,
    /// Kind.
    pub kind: String,
    /// Severity.
    pub level: AlertLevel,
    /// Subject.
    pub subject: String,
    /// Workflow that raised it, if any.
    pub workflow: Option<WorkflowId>,
    /// Message.
    pub message: String,
    /// When the webhook received it (ms), if it did.
    pub delivered_at: Option<i64>,
    /// Webhook delivery attempts so far.
    pub delivery_attempts: i64,
    /// The last delivery error, if any.
    pub delivery_error: Option<String>,
}

/// Durable storage for runs, workflows, the journal and alerts.
///
/// Implementations must make [`Store::append_batch`] atomic and durable: when it returns,
/// every `Committed` append survives a crash, and no `Fenced` append left any trace.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Create a run.
    async fn create_run(&self, kind: &str, params_json: &str) -> Result<RunId>;
    /// Create workflows (and their journal row 0) in one transaction.
    async fn create_workflows(
        &self,
        run: RunId,
        workflows: &[NewWorkflow],
    ) -> Result<Vec<WorkflowId>>;
    /// Create a run and its workflows in one transaction: a crash never leaves a run
    /// without its workflows.
    async fn start_run(
        &self,
        kind: &str,
        params_json: &str,
        workflows: &[NewWorkflow],
    ) -> Result<(RunId, Vec<WorkflowId>)>;
    /// Claim unfinished workflows of `kind` (optionally of one run) for `owner`, bumping
    /// each one's lease epoch so that any previous holder is fenced off.
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedWorkflow>>;
    /// Extend the leases `owner` still holds on `held` (id, epoch) pairs; returns the ids
    /// whose lease was renewed. An id missing from the answer was lost (fenced).
    async fn renew(
        &self,
        owner: &str,
        held: &[(WorkflowId, i64)],
        lease_ms: i64,
    ) -> Result<Vec<WorkflowId>>;
    /// Does `owner` still hold `workflow` under lease epoch `epoch` (unexpired, by the
    /// database's account)? One cheap read, for effects that cannot be deduplicated.
    async fn holds_lease(&self, workflow: WorkflowId, owner: &str, epoch: i64) -> Result<bool>;
    /// Give up leases (graceful stop) so another worker can claim them at once.
    async fn release(&self, owner: &str, held: &[(WorkflowId, i64)]) -> Result<()>;
    /// Wait until new work may be available (a notification) or `timeout` passes.
    async fn wait_for_work(&self, timeout: std::time::Duration) -> Result<()> {
        tokio::time::sleep(timeout).await;
        Ok(())
    }
    /// Atomically and durably apply a group of conditional appends.
    async fn append_batch(&self, appends: &[Append]) -> Result<Vec<AppendOutcome>>;
    /// A workflow's journal, ordered by seq.
    async fn journal(&self, workflow: WorkflowId) -> Result<Vec<JournalRow>>;
    /// Journals of many workflows (ids in `[from, to)`), ordered by workflow then seq.
    async fn journal_range(&self, from: WorkflowId, to: WorkflowId) -> Result<Vec<JournalRow>>;
    /// Workflows of a run (or all), ordered by id.
    async fn workflows(&self, run: Option<RunId>, kind: Option<&str>) -> Result<Vec<WorkflowRow>>;
    /// All runs, newest first.
    async fn runs(&self) -> Result<Vec<RunRow>>;
    /// A long-running worker's heartbeat: record that `worker` (holding leases of
    /// `lease_ms`) is alive now. The default records nothing.
    async fn worker_beat(&self, worker: &str, lease_ms: i64) -> Result<()> {
        let _ = (worker, lease_ms);
        Ok(())
    }
    /// Workers heard of in the last day, with the live leases each holds, most recently
    /// heard of first. The default knows none.
    async fn workers(&self) -> Result<Vec<WorkerRow>> {
        Ok(Vec::new())
    }
    /// What identifies this database to processes of the same host that share it, for
    /// [`crate::presence`] (`None`: the store needs no such thing — SQLite's file lock
    /// already lets one process in).
    fn presence_scope(&self) -> Option<String> {
        None
    }
    /// Subjects with an unfinished workflow of `kind` (in any run).
    async fn open_subjects(&self, kind: &str) -> Result<std::collections::HashSet<String>>;
    /// Count workflows by status for a run (or all).
    async fn status_counts(&self, run: Option<RunId>) -> Result<Vec<(String, i64)>>;
    /// Mark a run finished (or cancelled), recording `alert` in the same transaction if
    /// this call is the one that ends it. Returns whether it did (false: already ended).
    async fn finish_run(&self, run: RunId, status: &str, alert: Option<NewAlert>) -> Result<bool>;
    /// Alerts, newest first.
    async fn alerts(&self, limit: i64) -> Result<Vec<AlertRow>>;
    /// Count journal rows.
    async fn journal_len(&self) -> Result<i64>;
    /// Every circuit ever opened (closed ones included), by subject.
    async fn circuits(&self) -> Result<Vec<CircuitRow>>;
    /// Retire an unfinished workflow that cannot go on (its journal or input is corrupt, or
    /// it recorded an illegal transition): it becomes terminal with `status` (e.g.
    /// `Corrupt`), its lease is dropped, and `alert` is recorded with it, in one
    /// transaction. With `epoch`, only the holder of that lease may do it; without, only
    /// while no live lease holds the workflow (an operator's repair). Its journal is kept
    /// as it is, for inspection. Returns whether it was retired.
    async fn retire(
        &self,
        workflow: WorkflowId,
        epoch: Option<i64>,
        status: &str,
        alert: &NewAlert,
    ) -> Result<bool>;
    /// Hold `subject` (an operator's pause, for every worker on this database): its
    /// workflows are not claimed while the hold lasts, and one in flight stops before its
    /// next command and is released untouched — no retry is used and no failure counted.
    /// Records an alert. Returns whether it was newly held (`false`: it already was; the
    /// reason is updated).
    async fn hold(&self, subject: &str, reason: &str, by: &str) -> Result<bool>;
    /// Lift the hold on `subject`; its workflows are claimable again. Records an alert.
    /// Returns whether it was held.
    async fn lift_hold(&self, subject: &str, by: &str) -> Result<bool>;
    /// Every hold, by subject.
    async fn holds(&self) -> Result<Vec<HoldRow>>;
    /// Close a subject's circuit by hand (`by`: who or why, for the alert it records).
    /// Returns whether one was open.
    async fn reset_circuit(&self, subject: &str, by: &str) -> Result<bool>;
    /// Take up to `limit` alerts raised at or after `since` (ms) that the webhook has not
    /// received, and whose next attempt is due; each is leased until its next attempt
    /// (doubling from `retry_ms`, at most ten minutes) and its attempt count goes up.
    /// Alerts with `max_attempts` attempts are given up.
    async fn claim_alert_deliveries(
        &self,
        since: i64,
        retry_ms: i64,
        max_attempts: i64,
        limit: i64,
    ) -> Result<Vec<AlertRow>>;
    /// Record the outcome of delivering alert `id` (`Err`: the error, no secrets).
    async fn record_alert_delivery(
        &self,
        id: i64,
        outcome: std::result::Result<(), String>,
    ) -> Result<()>;
    /// The tick a schedule last fired at (ms), if it ever did.
    async fn schedule_tick(&self, name: &str) -> Result<Option<i64>>;
    /// Move schedule `name` from tick `previous` to `tick` if no one else did: the one
    /// caller that gets `true` fires it.
    async fn advance_schedule(&self, name: &str, previous: Option<i64>, tick: i64) -> Result<bool>;
}
