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

use bulwark_engine::circuit::Count;
use bulwark_engine::{
    Alert, AlertLevel, CircuitChange, CircuitPolicy, Machine, Notice, Transition, TransitionError,
};
use serde::{Deserialize, Serialize};
use statig::blocking::{IntoStateMachineExt, *};
use uuid::Uuid;

use crate::adapter::{AdapterError, Receipt};
use crate::catalog::batch_key;

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
        }
    }
}

impl SyncPolicy {
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
        Ok(())
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

    fn items(&self) -> u64 {
        self.batches.iter().map(|b| u64::from(b.items)).sum()
    }

    /// Retry delay before attempt `attempt` (2, 3, …): exponential with deterministic
    /// jitter (derived from the key, so replay computes the same instant), never sooner
    /// than the endpoint's `Retry-After`.
    pub fn retry_at(&self, at_ms: i64, attempt: u32, key: Uuid, error: &AdapterError) -> i64 {
        let p = &self.policy;
        let exp = p
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(2).min(30));
        let delay = exp.min(p.backoff_max_ms);
        // "Equal jitter": half fixed, half spread by the key.
        let spread = (key.as_u128() as u64
            ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            % (delay / 2 + 1);
        let mut wait = delay / 2 + spread;
        if let Some(retry_after_ms) =
            crate::adapter::retry_after(error).map(|d| d.as_millis() as u64)
        {
            // Honour Retry-After, but no endpoint may park a sync longer than a cooldown.
            wait = wait.max(retry_after_ms.min(p.cooldown_ms));
        }
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
    /// Result of probing for the current key (before any re-send).
    Probed {
        /// The receipt if the batch already landed.
        found: Option<Receipt>,
    },
    /// Read-back matched.
    Verified,
    /// Read-back differs (a failed validation).
    Mismatch {
        /// What differs.
        details: String,
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

/// Transient failures outlasted `max_attempts`: that counts as a failed validation, but
/// nothing says the endpoint refused the data, so the same key is kept (an attempt that
/// did land is deduplicated, and the upload path probes before re-sending) and the step
/// is retried after a backoff.
#[allow(clippy::too_many_arguments)]
fn exhausted(
    ctx: &mut Ctx<'_>,
    batch: u32,
    generation: u32,
    failures: u32,
    key: Uuid,
    at_ms: i64,
    error: &AdapterError,
    receipt: Option<Receipt>,
) -> Outcome<State> {
    let step = if receipt.is_some() {
        "verify"
    } else {
        "upload"
    };
    let failures = match ctx.input.policy.circuit().count_failure(failures) {
        Count::Open(failures) => {
            return Transition(State::tripped(
                format!("batch {batch}: {step}: retries exhausted: {error}"),
                failures,
            ));
        }
        Count::Below(failures) => failures,
    };
    let until = ctx.input.retry_at(at_ms, 2, key, error);
    ctx.commands.push(Command::Sleep { until });
    Transition(State::backoff(
        batch, 1, generation, failures, key, until, receipt,
    ))
}

/// Where a failed validation leaves the sync.
fn failed(
    ctx: &mut Ctx<'_>,
    batch: u32,
    generation: u32,
    failures: u32,
    reason: String,
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
    Transition(State::uploading(batch, 1, generation, failures, key))
}

/// Start batch `batch` (with `failures` consecutive failed validations already counted:
/// 0, or one short of the threshold for a half-open probe).
fn next_batch(ctx: &mut Ctx<'_>, batch: u32, failures: u32) -> Outcome<State> {
    let n = ctx.input.batches.len() as u32;
    if batch >= n {
        return Transition(State::done(n, ctx.input.items()));
    }
    let key = ctx.input.key(batch, 0);
    ctx.commands.push(Command::Upload { batch, key });
    Transition(State::uploading(batch, 1, 0, failures, key))
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
                next_batch(context, 0, failures)
            }
            _ => Super,
        }
    }

    /// Intent recorded: batch `batch` under `key` may or may not have reached the endpoint.
    #[state(superstate = "active")]
    fn uploading(
        context: &mut Ctx<'_>,
        batch: &u32,
        attempt: &u32,
        generation: &u32,
        failures: &u32,
        key: &Uuid,
        event: &Event,
    ) -> Outcome<State> {
        let (batch, attempt, generation, failures, key) =
            (*batch, *attempt, *generation, *failures, *key);
        match event {
            Event::Uploaded { receipt }
            | Event::Probed {
                found: Some(receipt),
            } => {
                context.commands.push(Command::Verify {
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
                    receipt.clone(),
                ))
            }
            Event::Probed { found: None } => {
                context.commands.push(Command::Upload { batch, key });
                Handled
            }
            Event::UploadFailed { at_ms, error } => match error {
                AdapterError::Transient(_)
                | AdapterError::RateLimited { .. }
                | AdapterError::Unavailable { .. }
                    if attempt < context.input.policy.max_attempts =>
                {
                    let until = context.input.retry_at(*at_ms, attempt + 1, key, error);
                    context.commands.push(Command::Sleep { until });
                    Transition(State::backoff(
                        batch,
                        attempt + 1,
                        generation,
                        failures,
                        key,
                        until,
                        None,
                    ))
                }
                AdapterError::Auth(_) | AdapterError::Config(_) => Transition(State::tripped(
                    format!("batch {batch}: {error}"),
                    failures + 1,
                )),
                AdapterError::Transient(_)
                | AdapterError::RateLimited { .. }
                | AdapterError::Unavailable { .. } => exhausted(
                    context, batch, generation, failures, key, *at_ms, error, None,
                ),
                _ => failed(
                    context,
                    batch,
                    generation,
                    failures,
                    format!("upload: {error}"),
                ),
            },
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
        event: &Event,
    ) -> Outcome<State> {
        let (batch, attempt, generation, failures, key) =
            (*batch, *attempt, *generation, *failures, *key);
        match event {
            Event::Verified => next_batch(context, batch + 1, 0),
            Event::Mismatch { details } => failed(
                context,
                batch,
                generation,
                failures,
                format!("verify: {details}"),
            ),
            Event::VerifyFailed { at_ms, error } => match error {
                AdapterError::Transient(_)
                | AdapterError::RateLimited { .. }
                | AdapterError::Unavailable { .. }
                    if attempt < context.input.policy.max_attempts =>
                {
                    let until = context.input.retry_at(*at_ms, attempt + 1, key, error);
                    context.commands.push(Command::Sleep { until });
                    Transition(State::backoff(
                        batch,
                        attempt + 1,
                        generation,
                        failures,
                        key,
                        until,
                        Some(receipt.clone()),
                    ))
                }
                AdapterError::Auth(_) | AdapterError::Config(_) => Transition(State::tripped(
                    format!("batch {batch}: {error}"),
                    failures + 1,
                )),
                AdapterError::Transient(_)
                | AdapterError::RateLimited { .. }
                | AdapterError::Unavailable { .. } => exhausted(
                    context,
                    batch,
                    generation,
                    failures,
                    key,
                    *at_ms,
                    error,
                    Some(receipt.clone()),
                ),
                _ => failed(
                    context,
                    batch,
                    generation,
                    failures,
                    format!("verify: {error}"),
                ),
            },
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
        event: &Event,
    ) -> Outcome<State> {
        let _ = until;
        let (batch, attempt, generation, failures, key) =
            (*batch, *attempt, *generation, *failures, *key);
        match (event, receipt) {
            (Event::TimerFired, None) => {
                // The failed attempt may have landed: probe before re-sending.
                context.commands.push(Command::Probe { batch, key });
                Transition(State::uploading(batch, attempt, generation, failures, key))
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
                ))
            }
            _ => Super,
        }
    }

    /// Every batch verified.
    #[state]
    fn done(context: &mut Ctx<'_>, batches: &u32, items: &u64, event: &Event) -> Outcome<State> {
        let _ = (batches, items);
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
        Event::Probed { .. } => "Probed",
        Event::Verified => "Verified",
        Event::Mismatch { .. } => "Mismatch",
        Event::VerifyFailed { .. } => "VerifyFailed",
        Event::TimerFired => "TimerFired",
        Event::Cancel => "Cancel",
    }
}

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
            (State::Verifying { batch: 0, .. }, Event::Verified, _) => {
                notice.circuit = Some(CircuitChange::Close);
            }
            _ => {}
        }
        // Transient failures that outlasted max_attempts count as a failed validation.
        if let (
            Event::UploadFailed { error, .. } | Event::VerifyFailed { error, .. },
            Some(before),
            Some(after),
        ) = (event, failures_of(previous), failures_of(state))
            && after > before
            && matches!(
                error,
                AdapterError::Transient(_)
                    | AdapterError::RateLimited { .. }
                    | AdapterError::Unavailable { .. }
            )
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
