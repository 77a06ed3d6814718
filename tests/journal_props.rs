//! Property tests of the endpoint-sync machine, its journal fold, and crash recovery.
//!
//! a. arbitrary event sequences keep every invariant; refused events change nothing;
//! b. folding the recorded journal reproduces the live state, and corrupting one row is
//!    reported at that row;
//! c. crashing a real sync (SQLite store, group-commit journal) at any adapter call, even
//!    with an upload that landed but whose acknowledgement was lost, then replaying,
//!    applies every batch exactly once and leaves a journal that audits clean.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_adapters::memory::MemoryPortal;
use bulwark_engine::audit::check_workflow;
use bulwark_engine::{CircuitChange, JournalRow, Machine, WorkflowRow, check_journal};
use bulwark_tests::crash_portal::{CrashingPortal, memory_endpoints, registry_for, seed_snapshot};
use bulwark_workflows::adapter::{AdapterError, PortalAdapter, Receipt};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::endpoint_sync::{
    BatchPlan, Command, EndpointSync, Event, Progress, Refused, State, SyncInput, SyncPolicy,
};
use bulwark_workflows::itemset::ItemSet;
use bulwark_workflows::sync::SyncOptions;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

fn policy() -> impl Strategy<Value = SyncPolicy> {
    (
        1u32..=5,
        0u32..=6,
        0u64..=2_000,
        0u64..=60_000,
        0u64..=10_000_000,
        0u32..=100,
    )
        .prop_map(
            |(
                max_failures,
                max_attempts,
                backoff_base_ms,
                backoff_max_ms,
                cooldown_ms,
                max_refused_percent,
            )| {
                SyncPolicy {
                    max_failures,
                    max_attempts,
                    backoff_base_ms,
                    backoff_max_ms,
                    cooldown_ms,
                    max_cooldown_ms: cooldown_ms.saturating_mul(4),
                    attempt_timeout_ms: 60_000,
                    max_refused_percent,
                }
            },
        )
}

fn sync_input() -> impl Strategy<Value = SyncInput> {
    (
        "[a-z][a-z0-9-]{0,8}",
        1i64..1_000,
        proptest::option::of(0i64..1_000),
        1u32..=50,
        proptest::collection::vec(("[0-9a-f]{8}", 1u32..=50), 0..=5),
        policy(),
        any::<bool>(),
    )
        .prop_map(
            |(endpoint, snapshot, base, batch_size, batches, policy, read_first)| SyncInput {
                endpoint,
                snapshot,
                base,
                batch_size,
                batches: batches
                    .into_iter()
                    .map(|(hash, items)| BatchPlan { hash, items })
                    .collect(),
                policy,
                mapping: None,
                on_removed: bulwark_workflows::staging::OnRemoved::Leave,
                read_first,
                retry: Vec::new(),
                repair: Vec::new(),
                config: None,
                compare_stock: false,
                cas: Default::default(),
            },
        )
}

fn at_ms() -> impl Strategy<Value = i64> {
    0i64..(1i64 << 42)
}

fn adapter_error() -> impl Strategy<Value = AdapterError> {
    prop_oneof![
        4 => "[a-z ]{0,8}".prop_map(AdapterError::Transient),
        3 => (0u64..=1_000_000_000, "[a-z ]{0,8}").prop_map(|(retry_after_ms, message)| {
            AdapterError::RateLimited { retry_after_ms, message }
        }),
        2 => "[a-z ]{0,8}".prop_map(AdapterError::Rejected),
        1 => "[a-z ]{0,8}".prop_map(AdapterError::Auth),
        1 => "[a-z ]{0,8}".prop_map(AdapterError::Config),
    ]
}

/// Positions within a batch of up to 50 items.
fn positions() -> impl Strategy<Value = ItemSet> {
    proptest::collection::vec(0u32..50, 0..8).prop_map(|v| v.into_iter().collect())
}

fn refused() -> impl Strategy<Value = Vec<Refused>> {
    proptest::collection::vec(0u32..50, 0..4).prop_map(|v| {
        let set: ItemSet = v.into_iter().collect();
        set.iter()
            .map(|item| Refused {
                item,
                sku: format!("S{item}"),
                reason: "out of range".into(),
                // Some left alone by policy (compare-and-set), which never count toward
                // a systemic refusal.
                kept: item % 3 == 0,
            })
            .collect()
    })
}

fn receipt() -> impl Strategy<Value = Receipt> {
    "[a-z0-9]{1,4}".prop_map(|id| Receipt { id })
}

/// Any event at all.
fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        2 => (at_ms(), proptest::bool::weighted(0.1), proptest::bool::weighted(0.2))
            .prop_map(|(at_ms, circuit_open, probe)| Event::Begin { at_ms, circuit_open, probe }),
        4 => receipt().prop_map(|receipt| Event::Uploaded { receipt }),
        3 => (at_ms(), adapter_error()).prop_map(|(at_ms, error)| Event::UploadFailed { at_ms, error }),
        3 => proptest::option::of(receipt()).prop_map(|found| Event::Probed { found }),
        5 => Just(Event::Verified),
        1 => ("[a-z ]{0,8}", proptest::option::of(0i64..10_000)).prop_map(|(details, at_ms)| Event::Mismatch { details, at_ms }),
        2 => (at_ms(), adapter_error()).prop_map(|(at_ms, error)| Event::VerifyFailed { at_ms, error }),
        3 => Just(Event::TimerFired),
        1 => Just(Event::Cancel),
        2 => (at_ms(), positions(), refused(), proptest::option::of(adapter_error()))
            .prop_map(|(at_ms, done, refused, rest)| Event::UploadPartial { at_ms, done, refused, rest, adjusted: Vec::new() }),
        2 => (at_ms(), positions(), proptest::option::of(adapter_error()))
            .prop_map(|(at_ms, done, rest)| Event::VerifyPartial { at_ms, done, rest }),
    ]
}

/// One step of a run: usually steered to an event the current state accepts (so runs get
/// deep: backoffs, resends, trips, completion), otherwise a completely arbitrary event.
#[derive(Debug, Clone)]
struct Step {
    steer: Option<Index>,
    event: Event,
    at_ms: i64,
    error: AdapterError,
    receipt: Receipt,
    done: ItemSet,
    refused: Vec<Refused>,
    rest: Option<AdapterError>,
}

fn step() -> impl Strategy<Value = Step> {
    (
        proptest::option::weighted(0.7, any::<Index>()),
        event(),
        at_ms(),
        adapter_error(),
        receipt(),
        (
            positions(),
            refused(),
            proptest::option::of(adapter_error()),
        ),
    )
        .prop_map(
            |(steer, event, at_ms, error, receipt, (done, refused, rest))| Step {
                steer,
                event,
                at_ms,
                error,
                receipt,
                done,
                refused,
                rest,
            },
        )
}

impl Step {
    /// The event this step feeds to a machine in `state`.
    fn event_for(&self, state: &State) -> Event {
        let Some(i) = &self.steer else {
            return self.event.clone();
        };
        let (at_ms, error, receipt) = (self.at_ms, self.error.clone(), self.receipt.clone());
        let (done, refused, rest) = (self.done.clone(), self.refused.clone(), self.rest.clone());
        let choices: Vec<Event> = match state {
            State::Pending {} => vec![
                Event::Begin {
                    at_ms,
                    circuit_open: false,
                    probe: false,
                },
                Event::Begin {
                    at_ms,
                    circuit_open: false,
                    probe: true,
                },
            ],
            State::Uploading { .. } => vec![
                Event::Uploaded {
                    receipt: receipt.clone(),
                },
                Event::Uploaded { receipt },
                Event::Probed { found: None },
                Event::UploadFailed {
                    at_ms,
                    error: error.clone(),
                },
                Event::UploadPartial {
                    at_ms,
                    done: done.clone(),
                    refused,
                    rest: rest.clone(),
                    adjusted: Vec::new(),
                },
            ],
            State::Verifying { .. } => vec![
                Event::Verified,
                Event::Verified,
                Event::Mismatch {
                    details: "differs".into(),
                    at_ms: Some(at_ms),
                },
                Event::Mismatch {
                    details: "differs".into(),
                    at_ms: None,
                },
                Event::VerifyFailed { at_ms, error },
                Event::VerifyPartial { at_ms, done, rest },
            ],
            State::Backoff { .. } => vec![Event::TimerFired],
            _ => return self.event.clone(),
        };
        choices[i.index(choices.len())].clone()
    }
}

// ---------------------------------------------------------------------------------------
// a. invariants
// ---------------------------------------------------------------------------------------

fn check_invariants(input: &SyncInput, state: &State) -> Result<(), TestCaseError> {
    let n = input.batches.len() as u32;
    let p = &input.policy;
    match state {
        State::Pending {} | State::Cancelled {} | State::Skipped { .. } => {}
        State::Uploading {
            batch,
            attempt,
            generation,
            failures,
            key,
            ..
        }
        | State::Verifying {
            batch,
            attempt,
            generation,
            failures,
            key,
            ..
        }
        | State::Backoff {
            batch,
            attempt,
            generation,
            failures,
            key,
            ..
        } => {
            prop_assert!(*batch < n, "batch {batch} of {n}: {state:?}");
            prop_assert!(
                *failures < p.max_failures,
                "{failures} failures (max {}) outside Tripped: {state:?}",
                p.max_failures
            );
            prop_assert!(
                *attempt >= 1 && *attempt <= p.max_attempts.max(1),
                "attempt {attempt} (max {}): {state:?}",
                p.max_attempts
            );
            prop_assert_eq!(*key, input.key(*batch, *generation), "key of {:?}", state);
            if let Some(p) = state.progress() {
                // Progress is never an empty record, and only the current batch's
                // positions count as applied or verified.
                prop_assert!(p != &Progress::default(), "empty progress kept: {state:?}");
                let items = input.batches[*batch as usize].items;
                prop_assert!(
                    p.quarantined.iter().all(|q| q.batch <= *batch),
                    "quarantine from a later batch: {state:?}"
                );
                let here = p
                    .quarantined
                    .iter()
                    .filter(|q| q.batch == *batch && !q.kept)
                    .count();
                prop_assert!(
                    !input.policy.refusal_is_systemic(here, items),
                    "a systemic refusal kept as quarantine: {state:?}"
                );
            }
        }
        State::Tripped { failures, .. } => {
            prop_assert!(
                *failures >= 1 && *failures <= p.max_failures,
                "Tripped with {failures} failures (max {})",
                p.max_failures
            );
        }
        State::Done {
            batches,
            items,
            quarantined,
            stock,
        } => {
            if let Some(s) = stock {
                prop_assert!(!s.is_empty());
                prop_assert!(s.iter().all(|s| s.batch < n && s.qty < s.basis));
            }
            if let Some(q) = quarantined {
                prop_assert!(!q.is_empty());
                prop_assert!(q.iter().all(|q| q.batch < n));
            }
            prop_assert_eq!(*batches, n);
            prop_assert_eq!(
                *items,
                input
                    .batches
                    .iter()
                    .map(|b| u64::from(b.items))
                    .sum::<u64>()
            );
        }
    }
    Ok(())
}

/// (batch, generation) of an in-flight state.
fn position(state: &State) -> Option<(u32, u32, u32)> {
    match state {
        State::Uploading {
            batch,
            generation,
            failures,
            ..
        }
        | State::Verifying {
            batch,
            generation,
            failures,
            ..
        }
        | State::Backoff {
            batch,
            generation,
            failures,
            ..
        } => Some((*batch, *generation, *failures)),
        _ => None,
    }
}

fn check_transition(
    input: &SyncInput,
    prev: &State,
    event: &Event,
    next: &State,
    commands: &[Command],
) -> Result<(), TestCaseError> {
    // Progress only moves forward: batch, then resend generation.
    if let (Some((b0, g0, f0)), Some((b1, g1, f1))) = (position(prev), position(next)) {
        prop_assert!((b1, g1) >= (b0, g0), "went back from {prev:?} to {next:?}");
        if b1 > b0 {
            prop_assert_eq!((b1, g1, f1), (b0 + 1, 0, 0), "next batch starts fresh");
        } else if g1 > g0 {
            prop_assert_eq!((g1, f1), (g0 + 1, f0 + 1), "resend counts a failure");
        } else {
            // Same batch and key: failures only grow when retries are exhausted, which
            // starts a fresh round of attempts after a backoff.
            prop_assert!(
                f1 == f0 || (f1 == f0 + 1 && matches!(next, State::Backoff { attempt: 1, .. })),
                "failures went from {f0} to {f1}: {prev:?} -> {next:?}"
            );
        }
    }
    // Every command concerns the state's own batch and key; terminal states issue none.
    if EndpointSync::is_terminal(next) {
        prop_assert!(commands.is_empty(), "{next:?} issued {commands:?}");
    }
    for c in commands {
        match c {
            Command::Probe { batch, key } if input.read_first => {
                prop_assert!(
                    matches!(next, State::Uploading { batch: b, key: k, .. } if b == batch && k == key),
                    "{c:?} from {next:?}"
                );
            }
            Command::Upload { batch, key } | Command::Probe { batch, key } => {
                prop_assert!(
                    matches!(next, State::Uploading { batch: b, key: k, .. } if b == batch && k == key),
                    "{c:?} from {next:?}"
                );
            }
            Command::Verify {
                batch,
                key,
                receipt,
            } => {
                prop_assert!(
                    matches!(next, State::Verifying { batch: b, key: k, receipt: r, .. }
                        if b == batch && k == key && r == receipt),
                    "{c:?} from {next:?}"
                );
            }
            Command::Sleep { until } => {
                prop_assert_eq!(EndpointSync::wake_at(next), Some(*until));
            }
            Command::Begin => prop_assert!(false, "Begin is only issued by resume"),
        }
    }
    // A backoff never wakes before the failure, nor before the endpoint's Retry-After
    // (which is honoured up to one circuit cooldown).
    if let (
        Event::UploadFailed { at_ms, error } | Event::VerifyFailed { at_ms, error },
        State::Backoff { until, .. },
    ) = (event, next)
    {
        prop_assert!(*until >= *at_ms);
        if let AdapterError::RateLimited { retry_after_ms, .. } = error {
            let honoured = (*retry_after_ms).min(input.policy.cooldown_ms) as i64;
            prop_assert!(*until >= *at_ms + honoured);
        }
    }
    // The circuit opens with exactly the transitions into Tripped, and closes with exactly
    // the first batch's verification.
    let notice = EndpointSync::notice(input, prev, event, next);
    prop_assert_eq!(
        matches!(notice.circuit, Some(CircuitChange::Open { .. })),
        matches!(next, State::Tripped { .. }) && !matches!(prev, State::Tripped { .. })
    );
    prop_assert_eq!(
        notice.circuit == Some(CircuitChange::Close),
        matches!(prev, State::Verifying { batch: 0, .. })
            && (matches!(next, State::Done { .. })
                || matches!(next, State::Uploading { batch, .. } if *batch > 0))
    );
    // The quarantine only grows within a sync; only a systemic refusal (a failed
    // validation: a fresh generation of the same batch) takes that batch's refusals back.
    let (q0, q1) = (prev.quarantined(), next.quarantined());
    if !EndpointSync::is_terminal(next) || matches!(next, State::Done { .. }) {
        if q1.len() >= q0.len() {
            prop_assert_eq!(
                &q1[..q0.len()],
                q0,
                "quarantine rewritten: {:?} -> {:?}",
                prev,
                next
            );
        } else {
            let (b0, g0, _) = position(prev).unwrap();
            prop_assert!(matches!(position(next), Some((b1, g1, _)) if b1 == b0 && g1 == g0 + 1));
            let kept: Vec<_> = q0.iter().filter(|q| q.batch != b0).cloned().collect();
            prop_assert_eq!(q1, &kept[..]);
        }
    }
    // New quarantine is alerted once, by kind: refused, or left alone by policy.
    let new = if q1.len() > q0.len() {
        &q1[q0.len()..]
    } else {
        &[][..]
    };
    prop_assert_eq!(
        notice.alerts.iter().any(|a| a.kind == "item_quarantined"),
        new.iter().any(|q| !q.kept)
    );
    prop_assert_eq!(
        notice
            .alerts
            .iter()
            .any(|a| a.kind == "stock_not_overwritten"),
        new.iter().any(|q| q.kept)
    );
    if let Some(CircuitChange::Open {
        failures, policy, ..
    }) = &notice.circuit
    {
        prop_assert_eq!(*policy, input.policy.circuit());
        prop_assert!(*failures >= 1);
    }
    Ok(())
}

/// Drive `steps` from Pending; returns the journal rows of the accepted events.
fn run_steps(input: &SyncInput, steps: &[Step]) -> Result<(State, Vec<JournalRow>), TestCaseError> {
    let mut state = EndpointSync::initial(input);
    prop_assert_eq!(&state, &State::Pending {});
    let mut rows = vec![row(0, None, &state)];
    for s in steps {
        let event = s.event_for(&state);
        let before = state.clone();
        let result = EndpointSync::apply(input, &state, &event);
        // Pure: the same call gives the same answer.
        prop_assert_eq!(&result, &EndpointSync::apply(input, &state, &event));
        prop_assert_eq!(&state, &before);
        match result {
            Ok(t) => {
                prop_assert!(
                    !EndpointSync::is_terminal(&state),
                    "{event:?} accepted after terminal {state:?}"
                );
                check_invariants(input, &t.state)?;
                check_transition(input, &state, &event, &t.state, &t.commands)?;
                rows.push(row(rows.len() as i64, Some(&event), &t.state));
                state = t.state;
            }
            Err(e) => {
                prop_assert_eq!(e.state.as_str(), EndpointSync::status(&state));
                prop_assert!(!e.event.is_empty() && !e.reason.is_empty());
                // Only Cancel is accepted by every active state.
                prop_assert!(
                    EndpointSync::is_terminal(&state) || !matches!(event, Event::Cancel),
                    "Cancel refused in {state:?}"
                );
            }
        }
    }
    Ok((state, rows))
}

fn row(seq: i64, event: Option<&Event>, state: &State) -> JournalRow {
    JournalRow {
        workflow: 1,
        seq,
        at: seq,
        worker: "prop".into(),
        epoch: 1,
        event_json: event.map(|e| serde_json::to_string(e).unwrap()),
        state_json: serde_json::to_string(state).unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_events_keep_the_invariants(
        input in sync_input(),
        steps in proptest::collection::vec(step(), 0..150),
    ) {
        let (state, _) = run_steps(&input, &steps)?;
        check_invariants(&input, &state)?;
        // Once terminal, every further event is refused.
        if EndpointSync::is_terminal(&state) {
            for s in &steps {
                prop_assert!(EndpointSync::apply(&input, &state, &s.event).is_err());
                prop_assert!(EndpointSync::apply(&input, &state, &Event::Cancel).is_err());
            }
        }
    }

    #[test]
    fn folding_the_journal_reproduces_the_live_state(
        input in sync_input(),
        steps in proptest::collection::vec(step(), 0..150),
    ) {
        let (state, rows) = run_steps(&input, &steps)?;
        let input_json = serde_json::to_string(&input).unwrap();
        let (folded, findings) = check_journal::<EndpointSync>(1, &input_json, &rows);
        prop_assert!(findings.is_empty(), "{findings:?}");
        prop_assert_eq!(folded.as_ref(), Some(&state));
        // And the workflow-row check agrees when the row matches the journal.
        let wf = workflow_row(&input_json, &rows, &state);
        let (folded, findings) = check_workflow::<EndpointSync>(&wf, &rows);
        prop_assert!(findings.is_empty(), "{findings:?}");
        prop_assert_eq!(folded, Some(state));
    }

    #[test]
    fn corrupting_one_row_is_reported_at_that_row(
        input in sync_input(),
        steps in proptest::collection::vec(step(), 1..150),
        which in any::<Index>(),
        how in 0u8..6,
    ) {
        let (state, mut rows) = run_steps(&input, &steps)?;
        let input_json = serde_json::to_string(&input).unwrap();
        let k = which.index(rows.len());
        let expected_seq: i64;
        let what: &str;
        match how {
            // Drop a row: the next row's seq reports the gap (or the missing row 0).
            0 if k + 1 < rows.len() => {
                rows.remove(k);
                expected_seq = k as i64 + 1;
                what = if k == 0 { "starts at seq" } else { "gap" };
            }
            // Drop the last row: the journal still folds (to the previous state) but no
            // longer reaches the workflow row.
            0 => {
                prop_assume!(rows.len() >= 2);
                rows.pop();
                let wf = workflow_row(&input_json, &[], &state);
                let wf = WorkflowRow { seq: k as i64, ..wf };
                let (_, journal_only) = check_journal::<EndpointSync>(1, &input_json, &rows);
                prop_assert!(journal_only.is_empty(), "{journal_only:?}");
                let (folded, findings) = check_workflow::<EndpointSync>(&wf, &rows);
                prop_assert!(folded.is_none());
                prop_assert!(
                    findings.iter().any(|f| f.seq == k as i64 && f.problem.contains("journal ends at")),
                    "{findings:?}"
                );
                return Ok(());
            }
            // A different, well-formed state.
            1 => {
                let original: State = serde_json::from_str(&rows[k].state_json).unwrap();
                let other = if original == (State::Cancelled {}) {
                    State::Skipped { reason: "forged".into() }
                } else {
                    State::Cancelled {}
                };
                rows[k].state_json = serde_json::to_string(&other).unwrap();
                expected_seq = k as i64;
                what = if k == 0 { "not the initial state" } else { "recorded state" };
            }
            // Garbage state JSON.
            2 => {
                let half = rows[k].state_json.len() / 2;
                rows[k].state_json.truncate(half);
                rows[k].state_json.push_str("}{");
                expected_seq = k as i64;
                what = "state does not decode";
            }
            // Garbage event JSON (row 0 has none).
            3 => {
                prop_assume!(k > 0);
                rows[k].event_json = Some("{\"Uploaded\": 42".into());
                expected_seq = k as i64;
                what = "event does not decode";
            }
            // An event the recorded state cannot have come from.
            4 => {
                prop_assume!(k > 0);
                let prev: State = serde_json::from_str(&rows[k - 1].state_json).unwrap();
                let forged = [Event::Verified, Event::TimerFired, Event::Begin { at_ms: 0, circuit_open: true, probe: false }]
                    .into_iter()
                    .find(|e| {
                        let recorded: State = serde_json::from_str(&rows[k].state_json).unwrap();
                        EndpointSync::apply(&input, &prev, e).map(|t| t.state) != Ok(recorded)
                    })
                    .unwrap();
                rows[k].event_json = Some(serde_json::to_string(&forged).unwrap());
                expected_seq = k as i64;
                what = "";
            }
            // A row without its event.
            _ => {
                prop_assume!(k > 0);
                rows[k].event_json = None;
                expected_seq = k as i64;
                what = "no event";
            }
        }
        let (folded, findings) = check_journal::<EndpointSync>(1, &input_json, &rows);
        prop_assert!(folded.is_none(), "corruption went unnoticed: {findings:?}");
        prop_assert!(
            findings.iter().any(|f| f.seq == expected_seq && f.problem.contains(what)),
            "no finding at seq {expected_seq} ({what}): {findings:?}"
        );
    }
}

fn workflow_row(input_json: &str, rows: &[JournalRow], state: &State) -> WorkflowRow {
    WorkflowRow {
        id: 1,
        run_id: 1,
        kind: EndpointSync::KIND.into(),
        subject: "ep".into(),
        input_json: input_json.into(),
        status: EndpointSync::status(state).into(),
        state_json: serde_json::to_string(state).unwrap(),
        seq: rows.last().map(|r| r.seq).unwrap_or(0),
        epoch: 1,
        terminal: EndpointSync::is_terminal(state),
    }
}

// ---------------------------------------------------------------------------------------
// c. crash and replay against a real store
// ---------------------------------------------------------------------------------------

/// One simulated process death.
#[derive(Debug, Clone)]
struct Crash {
    /// Which adapter call (counted within this process, as a share of the calls the
    /// remaining work needs) never returns; it and every later call hang.
    at: Index,
    /// Let a hanging upload land at the sink first (lost acknowledgement).
    lose_ack: bool,
    /// How long the other workflows keep running after the crash point (ms).
    linger_ms: u64,
}

fn crash() -> impl Strategy<Value = Crash> {
    (any::<Index>(), any::<bool>(), 0u64..=30).prop_map(|(at, lose_ack, linger_ms)| Crash {
        at,
        lose_ack,
        linger_ms,
    })
}

async fn crash_and_replay(endpoints: u32, batches: u32, crashes: Vec<Crash>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bulwark.db");
    seed_snapshot(&db, batches).await?;
    let sink = Arc::new(MemoryPortal::new());
    let eps = memory_endpoints(endpoints);
    let options = SyncOptions {
        limits: Default::default(),
        batch_size: 1,
        ..Default::default()
    };
    let expected = u64::from(endpoints * batches);

    for (round, c) in crashes.iter().enumerate() {
        // Calls the remaining work needs: upload + verify per batch not yet applied, and
        // a probe or verify for those in flight; one more lets a round run to the end.
        let remaining = 2 * (expected - sink.applied()) + u64::from(endpoints);
        let after_calls = c.at.index(remaining as usize + 1) as u64;
        let wrapper = Arc::new(CrashingPortal::new(
            sink.clone(),
            Some(after_calls),
            c.lose_ack,
        ));
        let app =
            Bulwark::open(&db, registry_for(wrapper.clone() as Arc<dyn PortalAdapter>)).await?;
        let crashed = wrapper.crashed.clone();
        {
            let sync = app.sync(&eps, &options, None);
            tokio::pin!(sync);
            let finished = tokio::select! {
                r = &mut sync => Some(r),
                _ = crashed.notified() => None,
                _ = tokio::time::sleep(Duration::from_secs(20)) => {
                    anyhow::bail!("round {round}: sync neither finished nor crashed in 20 s (crash at call {after_calls}, {c:?})")
                }
            };
            match finished {
                // The crash point lay beyond this process's work: it simply finished.
                Some(r) => {
                    let r = r?;
                    anyhow::ensure!(
                        r.refused.is_empty(),
                        "round {round}: refused {:?}",
                        r.refused
                    );
                }
                None => {
                    // Let the other workflows run on a little (some reach their next call
                    // and hang, some are mid-append), then the process dies.
                    if let Ok(r) =
                        tokio::time::timeout(Duration::from_millis(c.linger_ms), &mut sync).await
                    {
                        anyhow::bail!("round {round}: sync finished despite a hung call: {r:?}");
                    }
                }
            }
            // Dropping the future drops its worker lock and its JoinSet (aborting the
            // workflow tasks); appends already queued may still commit or be fenced.
        }
        // The lock must be free again the moment the sync future is gone.
        let bulwark_engine::Backend::Sqlite(sqlite) = app.backend() else {
            unreachable!("sqlite test")
        };
        drop(sqlite.lock_for_work().map_err(|e| {
            anyhow::anyhow!("round {round}: worker lock still held after the crash: {e}")
        })?);
        drop(app);
    }

    // Recovery: a fresh process with a healthy adapter resumes every unfinished run.
    let wrapper = Arc::new(CrashingPortal::new(sink.clone(), None, false));
    let app = Bulwark::open(&db, registry_for(wrapper.clone() as Arc<dyn PortalAdapter>)).await?;
    let report = tokio::time::timeout(Duration::from_secs(20), app.sync(&eps, &options, None))
        .await
        .map_err(|_| anyhow::anyhow!("recovery sync hung"))??;
    anyhow::ensure!(
        report.refused.is_empty(),
        "refused on recovery: {:?}",
        report.refused
    );
    anyhow::ensure!(
        report.unfinished == 0,
        "unfinished after recovery: {report:?}"
    );

    let rows = app
        .store()
        .workflows(None, Some(EndpointSync::KIND))
        .await?;
    anyhow::ensure!(
        rows.len() == endpoints as usize,
        "{} endpoint syncs for {endpoints} endpoints",
        rows.len()
    );
    for w in &rows {
        anyhow::ensure!(
            w.terminal && w.status == "Done",
            "{} ended {}",
            w.subject,
            w.status
        );
        let input: SyncInput = serde_json::from_str(&w.input_json)?;
        for b in 0..batches {
            // Never a failed validation, so every batch landed under its generation-0 key.
            anyhow::ensure!(
                sink.recorded(&input.endpoint, input.key(b, 0)) == Some((b, 1)),
                "{} batch {b} not recorded under its key",
                input.endpoint
            );
        }
    }
    anyhow::ensure!(
        sink.applied() == expected,
        "applied {} batches, expected {expected}",
        sink.applied()
    );
    anyhow::ensure!(
        sink.duplicates() == 0,
        "{} duplicate uploads",
        sink.duplicates()
    );
    let audit = app.audit().await?;
    anyhow::ensure!(audit.findings.is_empty(), "audit: {:?}", audit.findings);
    anyhow::ensure!(audit.workflows == endpoints as usize);
    // Every run is finished and every endpoint confirmed at the snapshot.
    let runs = app.store().runs().await?;
    anyhow::ensure!(
        runs.iter().all(|r| r.status == "finished"),
        "runs left open: {runs:?}"
    );
    let confirmed = app.staging().confirmed().await?;
    anyhow::ensure!(
        confirmed.len() == endpoints as usize,
        "confirmed: {confirmed:?}"
    );
    app.close().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn crash_anywhere_then_replay_applies_every_batch_exactly_once(
        endpoints in 3u32..=8,
        batches in 1u32..=4,
        crashes in proptest::collection::vec(crash(), 1..=3),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        let result = rt.block_on(crash_and_replay(endpoints, batches, crashes.clone()));
        rt.shutdown_timeout(Duration::from_secs(5));
        result.map_err(|e| TestCaseError::fail(format!("{e:#} ({endpoints}×{batches}, {crashes:?})")))?;
        prop_assert!(started.elapsed() < Duration::from_secs(30));
    }
}
