//! The endpoint-sync state machine, written with `statig` (blocking machine, no entry or
//! exit actions: restoring a stored state must have no effects).
//!
//! ```text
//! Pending ──Begin──▶ Uploading{b} ──Uploaded──▶ Verifying{b} ──Verified──▶ Uploading{b+1} … ▶ Done
//!    │                 │    ▲  │ transient                 │ transient          
//!    │ circuit open    │    │  └──────▶ Backoff ◀───────────┘
//!    ▼                 │    └──TimerFired─┘
//! Skipped              └─ rejected / mismatch / retries exhausted: failures+1,
//!                         re-send under a fresh key, or Tripped at max_failures
//! ```
//!
//! The machine is pure: everything time-dependent (`at_ms`) arrives inside events, and
//! effects leave as [`Command`]s for the runtime.

// statig's generated state constructors take a state's fields as arguments.
#![allow(clippy::too_many_arguments)]

use bulwark_engine::circuit::Count;
use bulwark_engine::{
    Alert, AlertLevel, CircuitChange, CircuitPolicy, Machine, Notice, Transition, TransitionError,
};
use serde::{Deserialize, Serialize};
use statig::blocking::{IntoStateMachineExt, *};
use uuid::Uuid;

use crate::adapter::{AdapterError, Receipt};
use crate::catalog::batch_key;
use crate::itemset::ItemSet;

/// Retry and circuit policy of one endpoint sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPolicy {
    /// Consecutive failed validations that trip the endpoint.
    pub max_failures: u32,
    /// Attempts per step before a transient failure counts as a failed validation.
    pub max_attempts: u32,
    /// First retry delay.
    pub backoff_base_ms: u64,
    /// Largest retry delay.
    pub backoff_max_ms: u64,
    /// How long a tripped endpoint's circuit first stays open (later runs skip it); each
    /// failed half-open probe doubles it, up to `max_cooldown_ms`.
    pub cooldown_ms: u64,
    /// Longest cooldown (defaulted for journals written before it existed).
    #[serde(default = "default_max_cooldown_ms")]
    pub max_cooldown_ms: u64,
    /// Longest wait for one adapter call before it counts as a transient failure
    /// (a timeout). Defaulted for journals written before it existed.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
    /// Share of a batch's items (percent) the endpoint may refuse before the refusal
    /// counts as a failed validation of the batch (the endpoint, not the items, is then
    /// the problem). Below it, refused items are quarantined and the batch goes on. A
    /// single refused item is always quarantined. Defaulted for older journals.
    #[serde(default = "default_max_refused_percent")]
    pub max_refused_percent: u32,
}

fn default_max_refused_percent() -> u32 {
    20
}

fn default_max_cooldown_ms() -> u64 {
    86_400_000
}

fn default_attempt_timeout_ms() -> u64 {
    60_000
}

impl Default for SyncPolicy {
    fn default() -> Self {
        Self {
            max_failures: 3,
            max_attempts: 5,
            backoff_base_ms: 200,
            backoff_max_ms: 30_000,
            cooldown_ms: 3_600_000,
            max_cooldown_ms: default_max_cooldown_ms(),
            attempt_timeout_ms: default_attempt_timeout_ms(),
            max_refused_percent: default_max_refused_percent(),
        }
    }
}

impl SyncPolicy {
    /// The wait (ms) before attempt `attempt` (2, 3, …) of a call keyed `key`: exponential
    /// with deterministic jitter derived from the key, never sooner than the `Retry-After`
    /// of `error` (but no longer than a cooldown).
    pub fn retry_delay_ms(&self, attempt: u32, key: Uuid, error: Option<&AdapterError>) -> u64 {
        let exp = self
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(2).min(30));
        let delay = exp.min(self.backoff_max_ms);
        // "Equal jitter": half fixed, half spread by the key.
        let spread = (key.as_u128() as u64
            ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            % (delay / 2 + 1);
        let mut wait = delay / 2 + spread;
        if let Some(retry_after_ms) = error
            .and_then(crate::adapter::retry_after)
            .map(|d| d.as_millis() as u64)
        {
            // Honour Retry-After, but no endpoint may park a sync longer than a cooldown.
            wait = wait.max(retry_after_ms.min(self.cooldown_ms));
        }
        wait
    }

    /// The circuit-breaker part of the policy.
    pub fn circuit(&self) -> CircuitPolicy {
        CircuitPolicy {
            threshold: self.max_failures,
            cooldown_ms: self.cooldown_ms,
            max_cooldown_ms: self.max_cooldown_ms,
        }
    }

    /// Check that the policy can work; names the first impossible value.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_failures == 0 {
            return Err("max_failures must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.backoff_base_ms > self.backoff_max_ms {
            return Err(format!(
                "backoff_base_ms ({}) exceeds backoff_max_ms ({})",
                self.backoff_base_ms, self.backoff_max_ms
            ));
        }
        if self.cooldown_ms > self.max_cooldown_ms {
            return Err(format!(
                "cooldown_ms ({}) exceeds max_cooldown_ms ({})",
                self.cooldown_ms, self.max_cooldown_ms
            ));
        }
        if self.attempt_timeout_ms == 0 {
            return Err("attempt_timeout_ms must be at least 1".into());
        }
        if self.max_refused_percent > 100 {
            return Err(format!(
                "max_refused_percent ({}) exceeds 100",
                self.max_refused_percent
            ));
        }
        Ok(())
    }

    /// Do `refused` of a batch's `items` refused items mean the endpoint is failing (a
    /// failed validation) rather than those items (quarantine)?
    pub fn refusal_is_systemic(&self, refused: usize, items: u32) -> bool {
        refused > 1 && refused as u64 * 100 > u64::from(self.max_refused_percent) * u64::from(items)
    }
}

/// One planned batch: its payload hash and item count (the items themselves are derived
/// from the immutable snapshots named in the input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// Hex SHA-256 of the batch's items.
    pub hash: String,
    /// Number of items.
    pub items: u32,
}

/// Immutable input of one endpoint sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncInput {
    /// Endpoint id.
    pub endpoint: String,
    /// Target (sealed) snapshot.
    pub snapshot: i64,
    /// Snapshot the endpoint last confirmed (the diff base), if any.
    pub base: Option<i64>,
    /// Items per batch used to cut the diff.
    pub batch_size: u32,
    /// The batches, in order.
    pub batches: Vec<BatchPlan>,
    /// Retry and circuit policy.
    pub policy: SyncPolicy,
    /// The endpoint's mapping when the run was planned (`None`: identity). Defaulted so
    /// that journals written before mappings existed still decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<crate::mapping::EndpointMapping>,
    /// What the diff did with SKUs gone from the source. Journals written before the
    /// policy existed zeroed them, and decode so.
    #[serde(default = "crate::staging::OnRemoved::before_policy")]
    pub on_removed: crate::staging::OnRemoved,
    /// Read back before the first write of every batch: set when the endpoint's previous
    /// sync ended without confirming (tripped, cancelled), so what it sent may have landed
    /// on an endpoint that cannot deduplicate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_first: bool,
    /// Quarantined SKUs (as sent) this sync carries: those the diff changes, and those an
    /// operator asked to retry, which are added to the diff at the target's values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry: Vec<String>,
    /// SKUs (as sent) a reconcile found the endpoint showing other values than it last
    /// confirmed (drift): added to the diff at the target's values, like `retry`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repair: Vec<String>,
    /// Fingerprint of the endpoint's configuration the run was planned with
    /// ([`crate::adapter::EndpointConfig::fingerprint`]): a worker whose configuration
    /// differs leaves the sync to one that has it. `None` in journals written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The endpoint writes stock compare-and-set (`stock_policy = "compare_and_set"`):
    /// each stock write names what the endpoint should still show, and a shop that sold
    /// some since is not overwritten with more than it has.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compare_stock: bool,
    /// Compare-and-set: SKUs (as sent) this sync carries whose last confirmed write was
    /// lowered (see [`crate::catalog::Cas`]); the others compare with the quantity the
    /// endpoint last confirmed.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cas: std::collections::BTreeMap<String, crate::catalog::Cas>,
}

impl SyncInput {
    /// The idempotency key of batch `batch` at resend generation `generation`.
    pub fn key(&self, batch: u32, generation: u32) -> Uuid {
        batch_key(
            &self.endpoint,
            self.snapshot,
            batch,
            &self.batches[batch as usize].hash,
            generation,
        )
    }

    /// The SKUs carried beyond the diff (`retry` and `repair`), sorted, each once.
    pub fn extra_skus(&self) -> Vec<String> {
        crate::sync::sorted_union(&self.retry, &self.repair)
    }

    fn items(&self) -> u64 {
        self.batches.iter().map(|b| u64::from(b.items)).sum()
    }

    /// Retry instant of attempt `attempt` (2, 3, …) after a failure at `at_ms`: see
    /// [`SyncPolicy::retry_delay_ms`] (derived from the key, so replay computes the same
    /// instant).
    pub fn retry_at(
        &self,
        at_ms: i64,
        attempt: u32,
        key: Uuid,
        error: Option<&AdapterError>,
    ) -> i64 {
        let wait = self.policy.retry_delay_ms(attempt, key, error);
        at_ms.saturating_add(i64::try_from(wait).unwrap_or(i64::MAX))
    }
}

/// Facts fed to the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The runtime starts the sync; `circuit_open` if the endpoint's breaker is open.
    Begin {
        /// Time of the event (ms).
        at_ms: i64,
        /// The endpoint's circuit is open: skip it.
        circuit_open: bool,
        /// The circuit is half-open: the first batch is a probe, and one failed
        /// validation opens it again. (Defaulted: journals from before it decode.)
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        probe: bool,
    },
    /// The endpoint accepted the upload.
    Uploaded {
        /// Its receipt.
        receipt: Receipt,
    },
    /// The upload failed.
    UploadFailed {
        /// Time of the failure (ms).
        at_ms: i64,
        /// Classified error.
        error: AdapterError,
    },
    /// The upload settled some items but not all (see [`crate::adapter::Partial`]).
    UploadPartial {
        /// Time of the answer (ms).
        at_ms: i64,
        /// Positions applied.
        done: ItemSet,
        /// Items the endpoint refused.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        refused: Vec<Refused>,
        /// Why the others did not land (`None`: there are none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rest: Option<AdapterError>,
        /// Applied items written with a lower quantity than the batch's (compare-and-set
        /// stock: the shop sold some since).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        adjusted: Vec<StockWritten>,
    },
    /// The read-back confirmed some items, but could not read the others.
    VerifyPartial {
        /// Time of the answer (ms).
        at_ms: i64,
        /// Positions read back showing the batch's values.
        done: ItemSet,
        /// Why the others could not be read (`None`: there are none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rest: Option<AdapterError>,
    },
    /// Result of probing for the current key (before any re-send).
    Probed {
        /// The receipt if the batch already landed.
        found: Option<Receipt>,
    },
    /// Read-back matched.
    Verified,
    /// Read-back differs. The first difference of a generation is read again after a
    /// short wait before it counts (a shop that is eventually consistent, or another
    /// writer settling, shows the batch's values a moment later); a second one is a
    /// failed validation.
    Mismatch {
        /// What differs.
        details: String,
        /// Time of the answer (ms). `None` in journals written before the re-read
        /// existed: such a mismatch counts at once, as it did when it was journaled.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at_ms: Option<i64>,
    },
    /// Read-back could not be done.
    VerifyFailed {
        /// Time of the failure (ms).
        at_ms: i64,
        /// Classified error.
        error: AdapterError,
    },
    /// A backoff timer elapsed.
    TimerFired,
    /// Operator cancel.
    Cancel,
}

/// Effects for the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Check the circuit and answer with [`Event::Begin`].
    Begin,
    /// Upload batch `batch` under `key`.
    Upload {
        /// Batch index.
        batch: u32,
        /// Idempotency key.
        key: Uuid,
    },
    /// Look for `key` at the endpoint; answer with [`Event::Probed`].
    Probe {
        /// Batch index.
        batch: u32,
        /// Idempotency key.
        key: Uuid,
    },
    /// Read batch `batch` back.
    Verify {
        /// Batch index.
        batch: u32,
        /// Idempotency key.
        key: Uuid,
        /// The receipt of the upload.
        receipt: Receipt,
    },
    /// Sleep until `until` (ms), then answer [`Event::TimerFired`].
    Sleep {
        /// Wake-up time (ms since epoch).
        until: i64,
    },
}

/// Context threaded through statig's handlers: the input, and what the handler decided.
#[derive(Debug)]
pub struct Ctx<'a> {
    input: &'a SyncInput,
    commands: Vec<Command>,
    refused: Option<String>,
}

/// The statig shared storage of the endpoint-sync machine (empty: all data lives in the
/// state variants and the input).
#[derive(Debug, Default, Clone, Copy)]
pub struct EndpointSync;

/// Per-item progress of a sync, kept in its states (so it is journaled with every
/// transition and survives a crash): what the current batch already settled, and what the
/// endpoint refused so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Items of the current batch the endpoint applied under the current generation (a
    /// retry does not send them again).
    #[serde(default, skip_serializing_if = "ItemSet::is_empty")]
    pub applied: ItemSet,
    /// Items of the current batch read back showing the batch's values.
    #[serde(default, skip_serializing_if = "ItemSet::is_empty")]
    pub verified: ItemSet,
    /// Items the endpoint refused in this sync, every batch so far: quarantined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<Quarantined>,
    /// The current generation's read-back differed once and is being read again: the
    /// next difference counts as a failed validation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rechecked: bool,
    /// Items written with a lower quantity than their batch's (compare-and-set stock),
    /// every batch so far: what the endpoint shows for them now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stock: Vec<StockShown>,
}

/// An item an upload wrote with a lower quantity than its batch's (compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockWritten {
    /// Position within the batch.
    pub item: u32,
    /// The SKU (as sent).
    pub sku: String,
    /// The quantity written.
    pub qty: i64,
    /// The batch's quantity (the mapped ERP quantity it was written for).
    pub basis: i64,
}

/// An item of a sync written with a lower quantity than its batch's (compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockShown {
    /// Batch index.
    pub batch: u32,
    /// Position within the batch.
    pub item: u32,
    /// The SKU (as sent).
    pub sku: String,
    /// The quantity written.
    pub qty: i64,
    /// The batch's quantity.
    pub basis: i64,
}

/// An item the endpoint refused: it is left as the endpoint has it (the rest goes on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// Batch index.
    pub batch: u32,
    /// Position within the batch.
    pub item: u32,
    /// The SKU (as sent, i.e. after the endpoint's mapping).
    pub sku: String,
    /// What the endpoint said.
    pub reason: String,
    /// Left as the endpoint has it by policy, not refused (see
    /// [`crate::adapter::ItemRejection::kept`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

/// An item refused in an [`Event::UploadPartial`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Position within the batch.
    pub item: u32,
    /// The SKU.
    pub sku: String,
    /// What the endpoint said.
    pub reason: String,
    /// Left as the endpoint has it by policy, not refused (see
    /// [`crate::adapter::ItemRejection::kept`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

impl Progress {
    fn of(p: &Option<Progress>) -> Progress {
        p.clone().unwrap_or_default()
    }

    /// `None` when there is nothing to keep (the states then look as they did before
    /// per-item progress existed).
    fn pack(self) -> Option<Progress> {
        (self != Progress::default()).then_some(self)
    }

    /// Items of batch `batch` refused so far.
    pub fn refused_in(&self, batch: u32) -> ItemSet {
        self.quarantined
            .iter()
            .filter(|q| q.batch == batch)
            .map(|q| q.item)
            .collect()
    }

    /// Items of batch `batch` an upload need not send: applied or refused.
    pub fn upload_skips(&self, batch: u32) -> ItemSet {
        let mut s = self.refused_in(batch);
        s.extend(&self.applied);
        s
    }

    /// Items of batch `batch` a read-back need not read: verified or refused.
    pub fn verify_skips(&self, batch: u32) -> ItemSet {
        let mut s = self.refused_in(batch);
        s.extend(&self.verified);
        s
    }

    /// A new batch starts: only the quarantine and the lowered stock carry over.
    fn next_batch(self) -> Progress {
        Progress {
            quarantined: self.quarantined,
            stock: self.stock,
            ..Progress::default()
        }
    }

    /// A fresh generation of batch `batch` (after a failed validation): nothing counts as
    /// applied any more; what was verified stays verified.
    fn regenerate(self) -> Progress {
        Progress {
            applied: ItemSet::new(),
            rechecked: false,
            ..self
        }
    }

    /// Forget what batch `batch` had refused (a systemic refusal is a failed validation,
    /// and the re-send carries those items again).
    fn unrefuse(mut self, batch: u32) -> Progress {
        self.quarantined.retain(|q| q.batch != batch);
        self
    }
}

/// Transient failures outlasted `max_attempts`: that counts as a failed validation, but
/// nothing says the endpoint refused the data, so the same key is kept (an attempt that
/// did land is deduplicated, and the upload path probes before re-sending) and the step
/// is retried after a backoff.
#[allow(clippy::too_many_arguments)]
fn exhausted(
    ctx: &mut Ctx<'_>,
    step: Step,
    failures: u32,
    at_ms: i64,
    error: &AdapterError,
    receipt: Option<Receipt>,
    progress: Progress,
) -> Outcome<State> {
    let Step {
        batch,
        generation,
        key,
        ..
    } = step;
    let name = if receipt.is_some() {
        "verify"
    } else {
        "upload"
    };
    let failures = match ctx.input.policy.circuit().count_failure(failures) {
        Count::Open(failures) => {
            return Transition(State::tripped(
                format!("batch {batch}: {name}: retries exhausted: {error}"),
                failures,
            ));
        }
        Count::Below(failures) => failures,
    };
    let until = ctx.input.retry_at(at_ms, 2, key, Some(error));
    ctx.commands.push(Command::Sleep { until });
    Transition(State::backoff(
        batch,
        1,
        generation,
        failures,
        key,
        until,
        receipt,
        progress.pack(),
    ))
}

/// Where a failed validation leaves the sync.
fn failed(
    ctx: &mut Ctx<'_>,
    batch: u32,
    generation: u32,
    failures: u32,
    reason: String,
    progress: Progress,
) -> Outcome<State> {
    let failures = match ctx.input.policy.circuit().count_failure(failures) {
        Count::Open(failures) => {
            return Transition(State::tripped(format!("batch {batch}: {reason}"), failures));
        }
        Count::Below(failures) => failures,
    };
    // Re-send under a fresh key: the endpoint must not dedupe it against the bad attempt.
    let generation = generation + 1;
    let key = ctx.input.key(batch, generation);
    ctx.commands.push(Command::Upload { batch, key });
    Transition(State::uploading(
        batch,
        1,
        generation,
        failures,
        key,
        progress.regenerate().pack(),
    ))
}

/// Start batch `batch` (with `failures` consecutive failed validations already counted:
/// 0, or one short of the threshold for a half-open probe).
fn next_batch(ctx: &mut Ctx<'_>, batch: u32, failures: u32, progress: Progress) -> Outcome<State> {
    let n = ctx.input.batches.len() as u32;
    let progress = progress.next_batch();
    if batch >= n {
        let quarantined = (!progress.quarantined.is_empty()).then_some(progress.quarantined);
        let stock = (!progress.stock.is_empty()).then_some(progress.stock);
        return Transition(State::done(n, ctx.input.items(), quarantined, stock));
    }
    let key = ctx.input.key(batch, 0);
    if ctx.input.read_first {
        // An earlier sync of this content ended unconfirmed: what it sent may have landed.
        ctx.commands.push(Command::Probe { batch, key });
    } else {
        ctx.commands.push(Command::Upload { batch, key });
    }
    Transition(State::uploading(
        batch,
        1,
        0,
        failures,
        key,
        progress.pack(),
    ))
}

/// Where one step of a batch stands (the fields every active state shares).
#[derive(Debug, Clone, Copy)]
struct Step {
    batch: u32,
    attempt: u32,
    generation: u32,
    key: Uuid,
}

/// A failed call (upload, probe or verify; `receipt` set for a verify) at `attempt`.
/// `progressed`: the call settled some items, so it does not count as a failed attempt.
#[allow(clippy::too_many_arguments)]
fn call_failed(
    ctx: &mut Ctx<'_>,
    step: Step,
    failures: u32,
    at_ms: i64,
    error: &AdapterError,
    receipt: Option<Receipt>,
    progress: Progress,
    progressed: bool,
) -> Outcome<State> {
    let Step {
        batch,
        attempt,
        generation,
        key,
    } = step;
    let name = if receipt.is_some() {
        "verify"
    } else {
        "upload"
    };
    match error {
        e if e.is_transient() && (progressed || attempt < ctx.input.policy.max_attempts) => {
            // A call that settled items starts a fresh round of attempts.
            let next = if progressed { 1 } else { attempt + 1 };
            let until = ctx.input.retry_at(at_ms, next.max(2), key, Some(error));
            ctx.commands.push(Command::Sleep { until });
            Transition(State::backoff(
                batch,
                next,
                generation,
                failures,
                key,
                until,
                receipt,
                progress.pack(),
            ))
        }
        AdapterError::Auth(_) | AdapterError::Config(_) => Transition(State::tripped(
            format!("batch {batch}: {error}"),
            failures + 1,
        )),
        e if e.is_transient() => exhausted(ctx, step, failures, at_ms, error, receipt, progress),
        _ => failed(
            ctx,
            batch,
            generation,
            failures,
            format!("{name}: {error}"),
            progress,
        ),
    }
}

/// Read back what batch `batch` still has to confirm, or move on if nothing is left.
fn verify_or_next(
    ctx: &mut Ctx<'_>,
    step: Step,
    failures: u32,
    receipt: Receipt,
    progress: Progress,
) -> Outcome<State> {
    let Step {
        batch,
        generation,
        key,
        ..
    } = step;
    let n = ctx.input.batches[batch as usize].items;
    if progress.verify_skips(batch).len() >= n as usize {
        return next_batch(ctx, batch + 1, 0, progress);
    }
    ctx.commands.push(Command::Verify {
        batch,
        key,
        receipt: receipt.clone(),
    });
    Transition(State::verifying(
        batch,
        1,
        generation,
        failures,
        key,
        receipt,
        progress.pack(),
    ))
}

#[state_machine(
    initial = "State::pending()",
    state(derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)),
    superstate(derive(Debug))
)]
impl EndpointSync {
    /// Created, nothing sent.
    #[state(superstate = "active")]
    fn pending(context: &mut Ctx<'_>, event: &Event) -> Outcome<State> {
        match event {
            Event::Begin {
                circuit_open: true, ..
            } => Transition(State::skipped("circuit open".into())),
            Event::Begin {
                circuit_open: false,
                probe,
                ..
            } => {
                let failures = if *probe {
                    context.input.policy.circuit().probe_failures()
                } else {
                    0
                };
                next_batch(context, 0, failures, Progress::default())
            }
            _ => Super,
        }
    }

    /// Intent recorded: batch `batch` under `key` may or may not have reached the endpoint
    /// (except the items `progress` says were applied or refused).
    #[state(superstate = "active")]
    #[allow(clippy::too_many_arguments)]
    fn uploading(
        context: &mut Ctx<'_>,
        batch: &u32,
        attempt: &u32,
        generation: &u32,
        failures: &u32,
        key: &Uuid,
        progress: &Option<Progress>,
        event: &Event,
    ) -> Outcome<State> {
        let step = Step {
            batch: *batch,
            attempt: *attempt,
            generation: *generation,
            key: *key,
        };
        let (batch, generation, failures, key) = (*batch, *generation, *failures, *key);
        let progress = Progress::of(progress);
        match event {
            Event::Uploaded { receipt }
            | Event::Probed {
                found: Some(receipt),
            } => verify_or_next(context, step, failures, receipt.clone(), progress),
            Event::Probed { found: None } => {
                context.commands.push(Command::Upload { batch, key });
                Handled
            }
            Event::UploadFailed { at_ms, error } => call_failed(
                context, step, failures, *at_ms, error, None, progress, false,
            ),
            Event::UploadPartial {
                at_ms,
                done,
                refused,
                rest,
                adjusted,
            } => {
                let n = context.input.batches[batch as usize].items;
                if let Some(p) = done
                    .iter()
                    .chain(refused.iter().map(|r| r.item))
                    .chain(adjusted.iter().map(|a| a.item))
                    .find(|&p| p >= n)
                {
                    context.refused = Some(format!("item {p} is beyond batch {batch} ({n} items)"));
                    return Handled;
                }
                if let Some(a) = adjusted.iter().find(|a| !done.contains(a.item)) {
                    context.refused = Some(format!(
                        "item {} ({}) is adjusted but not applied",
                        a.item, a.sku
                    ));
                    return Handled;
                }
                let mut progress = progress;
                let progressed = progress.applied.extend(done) > 0;
                for a in adjusted {
                    // A re-send (a fresh generation) reports the item again: the last
                    // write is what the endpoint shows.
                    progress
                        .stock
                        .retain(|s| !(s.batch == batch && s.item == a.item));
                    progress.stock.push(StockShown {
                        batch,
                        item: a.item,
                        sku: a.sku.clone(),
                        qty: a.qty,
                        basis: a.basis,
                    });
                }
                for r in refused {
                    if !progress
                        .quarantined
                        .iter()
                        .any(|q| q.batch == batch && q.item == r.item)
                    {
                        progress.quarantined.push(Quarantined {
                            batch,
                            item: r.item,
                            sku: r.sku.clone(),
                            reason: r.reason.clone(),
                            kept: r.kept,
                        });
                    }
                }
                // Items left alone by policy say nothing of the endpoint.
                let refused_here = progress
                    .quarantined
                    .iter()
                    .filter(|q| q.batch == batch && !q.kept)
                    .count();
                if context.input.policy.refusal_is_systemic(refused_here, n) {
                    // Most of the batch refused: the endpoint, not the items, is the
                    // problem. A failed validation; the re-send carries every item again.
                    let first = refused.iter().find(|r| !r.kept).map_or(String::new(), |r| {
                        format!(" (first: {}: {})", r.sku, r.reason)
                    });
                    return failed(
                        context,
                        batch,
                        generation,
                        failures,
                        format!("upload: {refused_here} of {n} items refused{first}"),
                        progress.unrefuse(batch),
                    );
                }
                match rest {
                    None => verify_or_next(
                        context,
                        step,
                        failures,
                        Receipt {
                            id: key.to_string(),
                        },
                        progress,
                    ),
                    Some(error) => call_failed(
                        context, step, failures, *at_ms, error, None, progress, progressed,
                    ),
                }
            }
            _ => Super,
        }
    }

    /// The endpoint accepted the batch; read it back.
    #[state(superstate = "active")]
    #[allow(clippy::too_many_arguments)] // a state's fields are its handler's arguments
    fn verifying(
        context: &mut Ctx<'_>,
        batch: &u32,
        attempt: &u32,
        generation: &u32,
        failures: &u32,
        key: &Uuid,
        receipt: &Receipt,
        progress: &Option<Progress>,
        event: &Event,
    ) -> Outcome<State> {
        let step = Step {
            batch: *batch,
            attempt: *attempt,
            generation: *generation,
            key: *key,
        };
        let (batch, generation, failures) = (*batch, *generation, *failures);
        let progress = Progress::of(progress);
        match event {
            Event::Verified => next_batch(context, batch + 1, 0, progress),
            Event::Mismatch {
                at_ms: Some(at_ms), ..
            } if !progress.rechecked => {
                // Not counted yet: read the batch again after a short wait.
                let mut progress = progress;
                progress.rechecked = true;
                let until = context.input.retry_at(*at_ms, 2, *key, None);
                context.commands.push(Command::Sleep { until });
                Transition(State::backoff(
                    batch,
                    *attempt,
                    generation,
                    failures,
                    *key,
                    until,
                    Some(receipt.clone()),
                    progress.pack(),
                ))
            }
            Event::Mismatch { details, .. } => failed(
                context,
                batch,
                generation,
                failures,
                format!("verify: {details}"),
                progress,
            ),
            Event::VerifyFailed { at_ms, error } => call_failed(
                context,
                step,
                failures,
                *at_ms,
                error,
                Some(receipt.clone()),
                progress,
                false,
            ),
            Event::VerifyPartial { at_ms, done, rest } => {
                let n = context.input.batches[batch as usize].items;
                if let Some(p) = done.iter().find(|&p| p >= n) {
                    context.refused = Some(format!("item {p} is beyond batch {batch} ({n} items)"));
                    return Handled;
                }
                let mut progress = progress;
                let progressed = progress.verified.extend(done) > 0;
                match rest {
                    None => next_batch(context, batch + 1, 0, progress),
                    Some(error) => call_failed(
                        context,
                        step,
                        failures,
                        *at_ms,
                        error,
                        Some(receipt.clone()),
                        progress,
                        progressed,
                    ),
                }
            }
            _ => Super,
        }
    }

    /// Waiting to retry after a transient failure (`receipt` set: retry the verify).
    #[state(superstate = "active")]
    #[allow(clippy::too_many_arguments)]
    fn backoff(
        context: &mut Ctx<'_>,
        batch: &u32,
        attempt: &u32,
        generation: &u32,
        failures: &u32,
        key: &Uuid,
        until: &i64,
        receipt: &Option<Receipt>,
        progress: &Option<Progress>,
        event: &Event,
    ) -> Outcome<State> {
        let _ = until;
        let (batch, attempt, generation, failures, key) =
            (*batch, *attempt, *generation, *failures, *key);
        match (event, receipt) {
            (Event::TimerFired, None) => {
                // The failed attempt may have landed: probe before re-sending.
                context.commands.push(Command::Probe { batch, key });
                Transition(State::uploading(
                    batch,
                    attempt,
                    generation,
                    failures,
                    key,
                    progress.clone(),
                ))
            }
            (Event::TimerFired, Some(receipt)) => {
                context.commands.push(Command::Verify {
                    batch,
                    key,
                    receipt: receipt.clone(),
                });
                Transition(State::verifying(
                    batch,
                    attempt,
                    generation,
                    failures,
                    key,
                    receipt.clone(),
                    progress.clone(),
                ))
            }
            _ => Super,
        }
    }

    /// Every batch verified, except the items listed in `quarantined` (refused by the
    /// endpoint, which keeps what it had for them).
    #[state]
    fn done(
        context: &mut Ctx<'_>,
        batches: &u32,
        items: &u64,
        quarantined: &Option<Vec<Quarantined>>,
        stock: &Option<Vec<StockShown>>,
        event: &Event,
    ) -> Outcome<State> {
        let _ = (batches, items, quarantined, stock);
        context.refused = Some(format!("{event:?} after Done"));
        Handled
    }

    /// The circuit opened during this sync.
    #[state]
    fn tripped(
        context: &mut Ctx<'_>,
        reason: &String,
        failures: &u32,
        event: &Event,
    ) -> Outcome<State> {
        let _ = (reason, failures);
        context.refused = Some(format!("{event:?} after Tripped"));
        Handled
    }

    /// The circuit was open when the sync began.
    #[state]
    fn skipped(context: &mut Ctx<'_>, reason: &String, event: &Event) -> Outcome<State> {
        let _ = reason;
        context.refused = Some(format!("{event:?} after Skipped"));
        Handled
    }

    /// Cancelled by an operator.
    #[state]
    fn cancelled(context: &mut Ctx<'_>, event: &Event) -> Outcome<State> {
        context.refused = Some(format!("{event:?} after Cancelled"));
        Handled
    }

    /// Events every non-terminal state shares; anything else is illegal.
    #[superstate]
    fn active(context: &mut Ctx<'_>, event: &Event) -> Outcome<State> {
        match event {
            Event::Cancel => Transition(State::cancelled()),
            other => {
                context.refused = Some(format!("{} is not expected here", event_name(other)));
                Handled
            }
        }
    }
}

fn event_name(event: &Event) -> &'static str {
    match event {
        Event::Begin { .. } => "Begin",
        Event::Uploaded { .. } => "Uploaded",
        Event::UploadFailed { .. } => "UploadFailed",
        Event::UploadPartial { .. } => "UploadPartial",
        Event::VerifyPartial { .. } => "VerifyPartial",
        Event::Probed { .. } => "Probed",
        Event::Verified => "Verified",
        Event::Mismatch { .. } => "Mismatch",
        Event::VerifyFailed { .. } => "VerifyFailed",
        Event::TimerFired => "TimerFired",
        Event::Cancel => "Cancel",
    }
}

/// Every state's name (as [`Machine::status`] gives it and the store records it).
pub const STATE_NAMES: [&str; 8] = [
    "Pending",
    "Uploading",
    "Verifying",
    "Backoff",
    "Done",
    "Tripped",
    "Skipped",
    "Cancelled",
];

fn state_name(state: &State) -> &'static str {
    match state {
        State::Pending {} => "Pending",
        State::Uploading { .. } => "Uploading",
        State::Verifying { .. } => "Verifying",
        State::Backoff { .. } => "Backoff",
        State::Done { .. } => "Done",
        State::Tripped { .. } => "Tripped",
        State::Skipped { .. } => "Skipped",
        State::Cancelled {} => "Cancelled",
    }
}

impl Machine for EndpointSync {
    const KIND: &'static str = "endpoint_sync";
    type Input = SyncInput;
    type State = State;
    type Event = Event;
    type Command = Command;

    fn initial(_input: &SyncInput) -> State {
        State::pending()
    }

    fn apply(
        input: &SyncInput,
        state: &State,
        event: &Event,
    ) -> Result<Transition<State, Command>, TransitionError> {
        let mut ctx = Ctx {
            input,
            commands: Vec::new(),
            refused: None,
        };
        let mut machine = EndpointSync.uninitialized_state_machine();
        *machine.state_mut() = state.clone();
        let mut machine = machine.init_with_context(&mut ctx);
        machine.handle_with_context(event, &mut ctx);
        match ctx.refused {
            Some(reason) => Err(TransitionError {
                state: state_name(state).into(),
                event: event_name(event).into(),
                reason,
            }),
            None => Ok(Transition {
                state: machine.state().clone(),
                commands: ctx.commands,
            }),
        }
    }

    fn resume(input: &SyncInput, state: &State) -> Vec<Command> {
        let _ = input;
        match state {
            State::Pending {} => vec![Command::Begin],
            // Verify before re-send: the upload may have landed before the crash.
            State::Uploading { batch, key, .. } => vec![Command::Probe {
                batch: *batch,
                key: *key,
            }],
            State::Verifying {
                batch,
                key,
                receipt,
                ..
            } => {
                vec![Command::Verify {
                    batch: *batch,
                    key: *key,
                    receipt: receipt.clone(),
                }]
            }
            State::Backoff { until, .. } => vec![Command::Sleep { until: *until }],
            _ => Vec::new(),
        }
    }

    fn status(state: &State) -> &'static str {
        state_name(state)
    }

    fn is_terminal(state: &State) -> bool {
        matches!(
            state,
            State::Done { .. }
                | State::Tripped { .. }
                | State::Skipped { .. }
                | State::Cancelled {}
        )
    }

    fn wake_at(state: &State) -> Option<i64> {
        match state {
            State::Backoff { until, .. } => Some(*until),
            _ => None,
        }
    }

    fn notice(input: &SyncInput, previous: &State, event: &Event, state: &State) -> Notice {
        let mut notice = Notice::default();
        match (previous, event, state) {
            (State::Tripped { .. }, _, _) => {}
            (_, _, State::Tripped { reason, failures }) => {
                notice.circuit = Some(CircuitChange::Open {
                    failures: *failures,
                    reason: reason.clone(),
                    policy: input.policy.circuit(),
                });
            }
            // The first batch verified: the endpoint works, so an open (half-open)
            // circuit closes. Later batches need not say it again.
            (State::Verifying { batch: 0, .. }, _, next)
                if matches!(next, State::Done { .. })
                    || matches!(next, State::Uploading { batch, .. } if *batch > 0) =>
            {
                notice.circuit = Some(CircuitChange::Close);
            }
            _ => {}
        }
        // Items the endpoint refused: quarantined, alerted once (a few named, then a count).
        let (before, after) = (quarantine_of(previous), quarantine_of(state));
        if after.len() > before.len() {
            const NAMED: usize = 3;
            let new = &after[before.len()..];
            for (kept, kind, what) in [
                (
                    false,
                    "item_quarantined",
                    "refused and quarantined (left as the endpoint has it; the rest goes on)",
                ),
                (
                    true,
                    "stock_not_overwritten",
                    "stock left as the shop has it, quarantined (it sold some since Bulwark's last write; on_conflict = skip_and_alert)",
                ),
            ] {
                let these: Vec<&Quarantined> = new.iter().filter(|q| q.kept == kept).collect();
                if these.is_empty() {
                    continue;
                }
                let named: Vec<String> = these
                    .iter()
                    .take(NAMED)
                    .map(|q| format!("{} ({})", q.sku, q.reason))
                    .collect();
                let more = these.len().saturating_sub(NAMED);
                notice.alerts.push(Alert {
                    kind,
                    level: AlertLevel::Warn,
                    message: format!(
                        "endpoint {}: {what}: {}{}",
                        input.endpoint,
                        named.join("; "),
                        if more > 0 {
                            format!("; and {more} more")
                        } else {
                            String::new()
                        }
                    ),
                });
            }
        }
        // Transient failures that outlasted max_attempts count as a failed validation.
        let error = match event {
            Event::UploadFailed { error, .. } | Event::VerifyFailed { error, .. } => Some(error),
            Event::UploadPartial { rest, .. } | Event::VerifyPartial { rest, .. } => rest.as_ref(),
            _ => None,
        };
        if let (Some(error), Some(before), Some(after)) =
            (error, failures_of(previous), failures_of(state))
            && after > before
            && error.is_transient()
        {
            notice.alerts.push(Alert {
                kind: "retries_exhausted",
                level: AlertLevel::Warn,
                message: format!(
                    "endpoint {}: {} attempts failed ({error}); counted as failed validation {after} of {}",
                    input.endpoint, input.policy.max_attempts, input.policy.max_failures
                ),
            });
        }
        notice
    }
}

impl State {
    /// Consecutive failed validations this state counts (`None`: it counts none).
    pub fn failures(&self) -> Option<u32> {
        failures_of(self)
    }
}

/// Items quarantined so far in `state`.
fn quarantine_of(state: &State) -> &[Quarantined] {
    match state {
        State::Uploading {
            progress: Some(p), ..
        }
        | State::Verifying {
            progress: Some(p), ..
        }
        | State::Backoff {
            progress: Some(p), ..
        } => &p.quarantined,
        State::Done {
            quarantined: Some(q),
            ..
        } => q,
        _ => &[],
    }
}

impl State {
    /// This sync's progress within its current batch, and its quarantine so far.
    pub fn progress(&self) -> Option<&Progress> {
        match self {
            State::Uploading { progress, .. }
            | State::Verifying { progress, .. }
            | State::Backoff { progress, .. } => progress.as_ref(),
            _ => None,
        }
    }

    /// Items quarantined so far (in a Done state: by the whole sync).
    pub fn quarantined(&self) -> &[Quarantined] {
        quarantine_of(self)
    }

    /// Items written with a lower quantity than their batch's so far (compare-and-set;
    /// in a Done state: by the whole sync).
    pub fn stock_shown(&self) -> &[StockShown] {
        match self {
            State::Done { stock: Some(s), .. } => s,
            other => other.progress().map_or(&[], |p| p.stock.as_slice()),
        }
    }
}

/// Consecutive failed validations counted in `state`, where it counts them.
fn failures_of(state: &State) -> Option<u32> {
    match state {
        State::Uploading { failures, .. }
        | State::Verifying { failures, .. }
        | State::Backoff { failures, .. }
        | State::Tripped { failures, .. } => Some(*failures),
        _ => None,
    }
}

#[cfg(test)]
#[path = "endpoint_sync_tests.rs"]
mod tests;
