//! Unit tests of every transition of the endpoint-sync machine (through the pure
//! [`Machine::apply`]), of `resume`, `is_terminal`, `wake_at`, `alert`, and of the state's
//! serialised form.

use super::*;

const AT: i64 = 1_700_000_000_000;

fn input(batches: u32) -> SyncInput {
    SyncInput {
        read_first: false,
        retry: Vec::new(),
        repair: Vec::new(),
        config: None,
        compare_stock: false,
        cas: Default::default(),
        endpoint: "ep-1".into(),
        snapshot: 7,
        base: Some(3),
        batch_size: 2,
        batches: (0..batches)
            .map(|i| BatchPlan {
                hash: format!("hash-{i}"),
                items: 2 + i,
            })
            .collect(),
        policy: SyncPolicy::default(),
        mapping: None,
        on_removed: crate::staging::OnRemoved::Leave,
    }
}

fn receipt(id: &str) -> Receipt {
    Receipt { id: id.into() }
}

/// Entering `next` from `s` opens the endpoint's circuit.
fn opens_circuit(inp: &SyncInput, s: &State, next: &State) -> bool {
    matches!(
        EndpointSync::notice(inp, s, &Event::TimerFired, next).circuit,
        Some(CircuitChange::Open { .. })
    )
}

fn uploading(inp: &SyncInput, batch: u32, attempt: u32, generation: u32, failures: u32) -> State {
    State::Uploading {
        progress: None,
        batch,
        attempt,
        generation,
        failures,
        key: inp.key(batch, generation),
    }
}

fn verifying(inp: &SyncInput, batch: u32, attempt: u32, generation: u32, failures: u32) -> State {
    State::Verifying {
        progress: None,
        batch,
        attempt,
        generation,
        failures,
        key: inp.key(batch, generation),
        receipt: receipt("r"),
    }
}

#[allow(clippy::too_many_arguments)]
fn backoff(
    inp: &SyncInput,
    batch: u32,
    attempt: u32,
    generation: u32,
    failures: u32,
    until: i64,
    rcpt: Option<Receipt>,
) -> State {
    State::Backoff {
        progress: None,
        batch,
        attempt,
        generation,
        failures,
        key: inp.key(batch, generation),
        until,
        receipt: rcpt,
    }
}

fn apply(inp: &SyncInput, state: &State, event: Event) -> Transition<State, Command> {
    match EndpointSync::apply(inp, state, &event) {
        Ok(t) => t,
        Err(e) => panic!("{event:?} in {state:?} was refused: {e}"),
    }
}

fn refuse(inp: &SyncInput, state: &State, event: Event) -> TransitionError {
    let before = state.clone();
    let err = match EndpointSync::apply(inp, state, &event) {
        Ok(t) => panic!("{event:?} in {state:?} was accepted: {t:?}"),
        Err(e) => e,
    };
    assert_eq!(
        state, &before,
        "a refused event must leave the state unchanged"
    );
    assert_eq!(err.state, EndpointSync::status(state));
    assert_eq!(err.event, event_name(&event));
    assert!(!err.reason.is_empty());
    let shown = err.to_string();
    assert!(
        shown.contains(&err.state) && shown.contains(&err.event),
        "{shown}"
    );
    err
}

fn transient() -> AdapterError {
    AdapterError::Transient("connection reset".into())
}

fn rate_limited(ms: u64) -> AdapterError {
    AdapterError::RateLimited {
        retry_after_ms: ms,
        message: "slow down".into(),
    }
}

fn all_events() -> Vec<Event> {
    vec![
        Event::Begin {
            at_ms: AT,
            circuit_open: false,
            probe: false,
        },
        Event::Begin {
            at_ms: AT,
            circuit_open: true,
            probe: false,
        },
        Event::Uploaded {
            receipt: receipt("x"),
        },
        Event::UploadFailed {
            at_ms: AT,
            error: transient(),
        },
        Event::Probed { found: None },
        Event::Probed {
            found: Some(receipt("x")),
        },
        Event::Verified,
        Event::Mismatch {
            details: "qty".into(),
            at_ms: None,
        },
        Event::Mismatch {
            details: "qty".into(),
            at_ms: Some(AT),
        },
        Event::VerifyFailed {
            at_ms: AT,
            error: transient(),
        },
        Event::TimerFired,
        Event::Cancel,
    ]
}

fn terminal_states() -> Vec<State> {
    vec![
        State::Done {
            quarantined: None,
            stock: None,
            batches: 2,
            items: 5,
        },
        State::Tripped {
            reason: "batch 0: rejected".into(),
            failures: 3,
        },
        State::Skipped {
            reason: "circuit open".into(),
        },
        State::Cancelled {},
    ]
}

#[test]
fn state_names_lists_every_state_once() {
    let inp = input(1);
    let mut states = vec![
        State::pending(),
        uploading(&inp, 0, 1, 0, 0),
        verifying(&inp, 0, 1, 0, 0),
        backoff(&inp, 0, 2, 0, 0, AT, None),
    ];
    states.extend(terminal_states());
    let names: Vec<&str> = states.iter().map(EndpointSync::status).collect();
    assert_eq!(names, STATE_NAMES);
}

// ---------------------------------------------------------------------------------------
// Pending
// ---------------------------------------------------------------------------------------

#[test]
fn initial_state_is_pending() {
    assert_eq!(
        <EndpointSync as Machine>::initial(&input(2)),
        State::Pending {}
    );
}

#[test]
fn begin_with_open_circuit_skips() {
    let inp = input(2);
    let t = apply(
        &inp,
        &State::Pending {},
        Event::Begin {
            at_ms: AT,
            circuit_open: true,
            probe: false,
        },
    );
    assert_eq!(
        t.state,
        State::Skipped {
            reason: "circuit open".into()
        }
    );
    assert!(t.commands.is_empty());
    assert!(EndpointSync::is_terminal(&t.state));
}

#[test]
fn begin_with_no_batches_is_done_at_once() {
    let inp = input(0);
    let t = apply(
        &inp,
        &State::Pending {},
        Event::Begin {
            at_ms: AT,
            circuit_open: false,
            probe: false,
        },
    );
    assert_eq!(
        t.state,
        State::Done {
            quarantined: None,
            stock: None,
            batches: 0,
            items: 0
        }
    );
    assert!(t.commands.is_empty());
}

#[test]
fn begin_uploads_batch_zero_under_generation_zero_key() {
    let inp = input(3);
    let t = apply(
        &inp,
        &State::Pending {},
        Event::Begin {
            at_ms: AT,
            circuit_open: false,
            probe: false,
        },
    );
    let key = inp.key(0, 0);
    assert_eq!(
        t.state,
        State::Uploading {
            progress: None,
            batch: 0,
            attempt: 1,
            generation: 0,
            failures: 0,
            key
        }
    );
    assert_eq!(t.commands, vec![Command::Upload { batch: 0, key }]);
}

// ---------------------------------------------------------------------------------------
// Uploading
// ---------------------------------------------------------------------------------------

#[test]
fn uploaded_moves_to_verifying_with_a_verify_command() {
    let inp = input(2);
    let s = uploading(&inp, 1, 2, 1, 1);
    let key = inp.key(1, 1);
    let t = apply(
        &inp,
        &s,
        Event::Uploaded {
            receipt: receipt("r-9"),
        },
    );
    assert_eq!(
        t.state,
        State::Verifying {
            progress: None,
            batch: 1,
            attempt: 1,
            generation: 1,
            failures: 1,
            key,
            receipt: receipt("r-9"),
        }
    );
    assert_eq!(
        t.commands,
        vec![Command::Verify {
            batch: 1,
            key,
            receipt: receipt("r-9")
        }]
    );
}

#[test]
fn probe_hit_moves_to_verifying_without_resending() {
    let inp = input(2);
    let s = uploading(&inp, 0, 3, 0, 0);
    let key = inp.key(0, 0);
    let t = apply(
        &inp,
        &s,
        Event::Probed {
            found: Some(receipt("landed")),
        },
    );
    assert_eq!(
        t.state,
        State::Verifying {
            progress: None,
            batch: 0,
            attempt: 1,
            generation: 0,
            failures: 0,
            key,
            receipt: receipt("landed"),
        }
    );
    assert_eq!(
        t.commands,
        vec![Command::Verify {
            batch: 0,
            key,
            receipt: receipt("landed")
        }]
    );
    assert!(
        !t.commands
            .iter()
            .any(|c| matches!(c, Command::Upload { .. }))
    );
}

#[test]
fn probe_miss_keeps_the_state_and_uploads_under_the_same_key() {
    let inp = input(2);
    let s = uploading(&inp, 1, 2, 0, 0);
    let t = apply(&inp, &s, Event::Probed { found: None });
    assert_eq!(t.state, s);
    assert_eq!(
        t.commands,
        vec![Command::Upload {
            batch: 1,
            key: inp.key(1, 0)
        }]
    );
}

#[test]
fn transient_upload_failure_backs_off() {
    let inp = input(2);
    let s = uploading(&inp, 0, 1, 0, 0);
    let key = inp.key(0, 0);
    let t = apply(
        &inp,
        &s,
        Event::UploadFailed {
            at_ms: AT,
            error: transient(),
        },
    );
    let State::Backoff {
        progress: _,
        batch,
        attempt,
        generation,
        failures,
        key: k,
        until,
        receipt,
    } = t.state.clone()
    else {
        panic!("expected Backoff, got {:?}", t.state);
    };
    assert_eq!((batch, attempt, generation, failures, k), (0, 2, 0, 0, key));
    assert_eq!(receipt, None);
    assert_eq!(until, inp.retry_at(AT, 2, key, Some(&transient())));
    // attempt 2: delay = base; equal jitter puts the wait in [base/2, base].
    let base = inp.policy.backoff_base_ms as i64;
    assert!(until >= AT + base / 2 && until <= AT + base, "{until}");
    assert_eq!(t.commands, vec![Command::Sleep { until }]);
    assert_eq!(EndpointSync::wake_at(&t.state), Some(until));
}

#[test]
fn rate_limited_upload_waits_at_least_retry_after() {
    let inp = input(2);
    for retry_after in [0u64, 1, 150, 5_000, 120_000] {
        let s = uploading(&inp, 1, 2, 0, 1);
        let t = apply(
            &inp,
            &s,
            Event::UploadFailed {
                at_ms: AT,
                error: rate_limited(retry_after),
            },
        );
        let State::Backoff { until, attempt, .. } = t.state else {
            panic!("expected Backoff, got {:?}", t.state);
        };
        assert_eq!(attempt, 3);
        assert!(until >= AT + retry_after as i64, "{retry_after}: {until}");
        assert!(until > AT, "a retry is never immediate: {until}");
        assert_eq!(t.commands, vec![Command::Sleep { until }]);
    }
}

#[test]
fn retry_delay_grows_and_is_capped_and_deterministic() {
    let inp = input(1);
    let key = inp.key(0, 0);
    let p = &inp.policy;
    for attempt in 2..40u32 {
        let until = inp.retry_at(AT, attempt, key, Some(&transient()));
        assert_eq!(until, inp.retry_at(AT, attempt, key, Some(&transient())));
        let delay = (p.backoff_base_ms as i64)
            .saturating_mul(1i64 << (attempt - 2).min(30))
            .min(p.backoff_max_ms as i64);
        assert!(
            until >= AT + delay / 2 && until <= AT + delay,
            "attempt {attempt}: {until}"
        );
    }
}

#[test]
fn exhausted_transient_upload_counts_a_failure_and_retries_under_the_same_key() {
    let inp = input(2);
    let max = inp.policy.max_attempts;
    for error in [transient(), rate_limited(100)] {
        let s = uploading(&inp, 1, max, 0, 0);
        let t = apply(
            &inp,
            &s,
            Event::UploadFailed {
                at_ms: AT,
                error: error.clone(),
            },
        );
        let key = inp.key(1, 0);
        let until = inp.retry_at(AT, 2, key, Some(&error));
        // Same key: an attempt that did land must be found by the probe, not sent again.
        assert_eq!(t.state, backoff(&inp, 1, 1, 0, 1, until, None));
        assert_eq!(t.commands, vec![Command::Sleep { until }]);
        let t = apply(&inp, &t.state, Event::TimerFired);
        assert_eq!(t.commands, vec![Command::Probe { batch: 1, key }]);
    }
}

#[test]
fn exhausted_transient_upload_at_the_last_failure_trips() {
    let inp = input(2);
    let max = inp.policy.max_attempts;
    let s = uploading(&inp, 1, max, 0, 2);
    let t = apply(
        &inp,
        &s,
        Event::UploadFailed {
            at_ms: AT,
            error: transient(),
        },
    );
    assert!(
        matches!(t.state, State::Tripped { failures: 3, ref reason } if reason.contains("retries exhausted")),
        "{:?}",
        t.state
    );
}

#[test]
fn a_huge_retry_after_is_capped_at_the_cooldown() {
    let inp = input(2);
    let key = inp.key(0, 0);
    for retry_after_ms in [u64::MAX, i64::MAX as u64 - 10, 10 * inp.policy.cooldown_ms] {
        let error = AdapterError::RateLimited {
            retry_after_ms,
            message: "slow down".into(),
        };
        let until = inp.retry_at(AT, 2, key, Some(&error));
        assert_eq!(until, AT + inp.policy.cooldown_ms as i64);
    }
}

#[test]
fn rejected_upload_counts_a_failure_and_resends_under_a_new_key() {
    let inp = input(2);
    let s = uploading(&inp, 0, 2, 3, 1);
    let t = apply(
        &inp,
        &s,
        Event::UploadFailed {
            at_ms: AT,
            error: AdapterError::Rejected("bad sku".into()),
        },
    );
    let key = inp.key(0, 4);
    assert_eq!(
        t.state,
        State::Uploading {
            progress: None,
            batch: 0,
            attempt: 1,
            generation: 4,
            failures: 2,
            key
        }
    );
    assert_eq!(t.commands, vec![Command::Upload { batch: 0, key }]);
    let ev = Event::UploadFailed {
        at_ms: AT,
        error: AdapterError::Rejected("bad sku".into()),
    };
    assert_eq!(
        EndpointSync::notice(&inp, &s, &ev, &t.state),
        Notice::default()
    );
}

#[test]
fn third_consecutive_failure_trips_and_alerts() {
    let inp = input(2);
    assert_eq!(inp.policy.max_failures, 3);
    // Rejected three times in a row: 0 → 1 → 2 → Tripped(3).
    let mut s = uploading(&inp, 1, 1, 0, 0);
    for expected_failures in 1..=2u32 {
        let t = apply(
            &inp,
            &s,
            Event::UploadFailed {
                at_ms: AT,
                error: AdapterError::Rejected("no".into()),
            },
        );
        assert_eq!(
            t.state,
            uploading(&inp, 1, 1, expected_failures, expected_failures)
        );
        s = t.state;
    }
    let t = apply(
        &inp,
        &s,
        Event::UploadFailed {
            at_ms: AT,
            error: AdapterError::Rejected("no".into()),
        },
    );
    let State::Tripped { reason, failures } = &t.state else {
        panic!("expected Tripped, got {:?}", t.state);
    };
    assert_eq!(*failures, 3);
    assert!(
        reason.contains("batch 1") && reason.contains("no"),
        "{reason}"
    );
    assert!(t.commands.is_empty());
    assert!(EndpointSync::is_terminal(&t.state));
    let ev = Event::UploadFailed {
        at_ms: AT,
        error: AdapterError::Rejected("no".into()),
    };
    // Tripping opens the circuit (the store records the circuit_opened alert with it).
    let notice = EndpointSync::notice(&inp, &s, &ev, &t.state);
    assert_eq!(
        notice.circuit,
        Some(CircuitChange::Open {
            failures: 3,
            reason: reason.clone(),
            policy: inp.policy.circuit()
        })
    );
    assert!(notice.alerts.is_empty(), "{notice:?}");
    // Re-entering Tripped from Tripped does not open it twice.
    assert_eq!(
        EndpointSync::notice(&inp, &t.state, &ev, &t.state),
        Notice::default()
    );
}

#[test]
fn a_half_open_probe_trips_on_its_first_failed_validation_and_closes_on_success() {
    let inp = input(2);
    let begin = Event::Begin {
        at_ms: AT,
        circuit_open: false,
        probe: true,
    };
    let t = apply(&inp, &State::pending(), begin);
    let key = inp.key(0, 0);
    assert_eq!(t.state, uploading(&inp, 0, 1, 0, 2));
    assert_eq!(t.commands, vec![Command::Upload { batch: 0, key }]);
    // One rejection re-opens the circuit.
    let ev = Event::UploadFailed {
        at_ms: AT,
        error: AdapterError::Rejected("still broken".into()),
    };
    let tripped = apply(&inp, &t.state, ev.clone());
    assert!(
        matches!(tripped.state, State::Tripped { failures: 3, .. }),
        "{:?}",
        tripped.state
    );
    assert!(matches!(
        EndpointSync::notice(&inp, &t.state, &ev, &tripped.state).circuit,
        Some(CircuitChange::Open { failures: 3, .. })
    ));
    // A verified first batch closes it, and the next batch starts from zero failures.
    let up = apply(
        &inp,
        &t.state,
        Event::Uploaded {
            receipt: receipt("r"),
        },
    );
    let next = apply(&inp, &up.state, Event::Verified);
    assert_eq!(next.state, uploading(&inp, 1, 1, 0, 0));
    assert_eq!(
        EndpointSync::notice(&inp, &up.state, &Event::Verified, &next.state).circuit,
        Some(CircuitChange::Close)
    );
    // Verifying a later batch says nothing more about the circuit.
    let up2 = apply(
        &inp,
        &next.state,
        Event::Uploaded {
            receipt: receipt("r2"),
        },
    );
    let done = apply(&inp, &up2.state, Event::Verified);
    assert_eq!(
        EndpointSync::notice(&inp, &up2.state, &Event::Verified, &done.state),
        Notice::default()
    );
}

#[test]
fn exhausted_retries_raise_an_alert() {
    let inp = input(2);
    let max = inp.policy.max_attempts;
    let s = uploading(&inp, 0, max, 0, 0);
    let ev = Event::UploadFailed {
        at_ms: AT,
        error: AdapterError::Transient("503".into()),
    };
    let t = apply(&inp, &s, ev.clone());
    assert!(
        matches!(t.state, State::Backoff { failures: 1, .. }),
        "{:?}",
        t.state
    );
    let notice = EndpointSync::notice(&inp, &s, &ev, &t.state);
    assert_eq!(notice.alerts.len(), 1, "{notice:?}");
    assert_eq!(notice.alerts[0].kind, "retries_exhausted");
    assert!(notice.alerts[0].message.contains("ep-1"), "{notice:?}");
    // A retry below max_attempts is not an alert.
    let s = uploading(&inp, 0, 1, 0, 0);
    let t = apply(&inp, &s, ev.clone());
    assert!(
        EndpointSync::notice(&inp, &s, &ev, &t.state)
            .alerts
            .is_empty()
    );
}

#[test]
fn auth_and_config_errors_trip_immediately() {
    let inp = input(2);
    for error in [
        AdapterError::Auth("401".into()),
        AdapterError::Config("no url".into()),
    ] {
        for s in [uploading(&inp, 1, 1, 0, 0), uploading(&inp, 1, 2, 1, 1)] {
            let t = apply(
                &inp,
                &s,
                Event::UploadFailed {
                    at_ms: AT,
                    error: error.clone(),
                },
            );
            let State::Tripped { reason, failures } = &t.state else {
                panic!("expected Tripped, got {:?}", t.state);
            };
            let State::Uploading { failures: f0, .. } = s else {
                unreachable!()
            };
            assert_eq!(*failures, f0 + 1);
            assert!(reason.contains(&error.to_string()), "{reason}");
            assert!(t.commands.is_empty());
            assert!(opens_circuit(&inp, &s, &t.state));
        }
        // Verifying too.
        let s = verifying(&inp, 0, 1, 0, 0);
        let t = apply(
            &inp,
            &s,
            Event::VerifyFailed {
                at_ms: AT,
                error: error.clone(),
            },
        );
        assert!(
            matches!(t.state, State::Tripped { failures: 1, .. }),
            "{:?}",
            t.state
        );
        assert!(t.commands.is_empty());
    }
}

// ---------------------------------------------------------------------------------------
// Verifying
// ---------------------------------------------------------------------------------------

#[test]
fn verified_moves_to_the_next_batch_and_resets_failures() {
    let inp = input(3);
    let s = verifying(&inp, 0, 4, 2, 2);
    let t = apply(&inp, &s, Event::Verified);
    let key = inp.key(1, 0);
    assert_eq!(
        t.state,
        State::Uploading {
            progress: None,
            batch: 1,
            attempt: 1,
            generation: 0,
            failures: 0,
            key
        }
    );
    assert_eq!(t.commands, vec![Command::Upload { batch: 1, key }]);
}

#[test]
fn verified_last_batch_is_done_with_totals() {
    let inp = input(3);
    let s = verifying(&inp, 2, 1, 0, 0);
    let t = apply(&inp, &s, Event::Verified);
    // items: 2 + 3 + 4
    assert_eq!(
        t.state,
        State::Done {
            quarantined: None,
            stock: None,
            batches: 3,
            items: 9
        }
    );
    assert!(t.commands.is_empty());
    assert!(EndpointSync::is_terminal(&t.state));
    assert!(!opens_circuit(&inp, &s, &t.state));
}

#[test]
fn mismatch_counts_a_failure_and_resends_under_a_new_key() {
    let inp = input(2);
    let s = verifying(&inp, 1, 2, 0, 1);
    let t = apply(
        &inp,
        &s,
        Event::Mismatch {
            details: "qty 3 != 4".into(),
            at_ms: None,
        },
    );
    let key = inp.key(1, 1);
    assert_eq!(t.state, uploading(&inp, 1, 1, 1, 2));
    assert_eq!(t.commands, vec![Command::Upload { batch: 1, key }]);

    // And a mismatch at failures = max - 1 trips.
    let s = verifying(&inp, 1, 1, 2, 2);
    let t = apply(
        &inp,
        &s,
        Event::Mismatch {
            details: "qty 3 != 4".into(),
            at_ms: None,
        },
    );
    let State::Tripped { reason, failures } = &t.state else {
        panic!("expected Tripped, got {:?}", t.state);
    };
    assert_eq!(*failures, 3);
    assert!(reason.contains("verify: qty 3 != 4"), "{reason}");
    assert!(opens_circuit(&inp, &s, &t.state));
}

#[test]
fn a_first_mismatch_is_read_again_before_it_counts() {
    let inp = input(3);
    let s = verifying(&inp, 1, 1, 0, 1);
    let details = || "qty 3 != 4".to_string();
    let t = apply(
        &inp,
        &s,
        Event::Mismatch {
            details: details(),
            at_ms: Some(AT),
        },
    );
    // Not counted, nothing re-sent: a backoff that re-reads the same receipt.
    let State::Backoff {
        failures,
        until,
        receipt: Some(r),
        generation: 0,
        progress: Some(p),
        ..
    } = &t.state
    else {
        panic!("expected a re-read backoff, got {:?}", t.state);
    };
    assert_eq!((*failures, r.id.as_str()), (1, "r"));
    assert!(p.rechecked);
    assert!(*until > AT && *until <= AT + inp.policy.backoff_base_ms as i64);
    assert_eq!(t.commands, vec![Command::Sleep { until: *until }]);
    assert!(!opens_circuit(&inp, &s, &t.state));
    let reread = apply(&inp, &t.state, Event::TimerFired);
    assert!(
        matches!(reread.commands[..], [Command::Verify { batch: 1, .. }]),
        "{:?}",
        reread.commands
    );
    // The re-read shows the batch: verified, and the count of failures starts again.
    let ok = apply(&inp, &reread.state, Event::Verified);
    assert_eq!(ok.state, uploading(&inp, 2, 1, 0, 0));

    // It still differs: now it counts, and the batch goes again under a fresh key; that
    // generation gets its own re-read.
    let bad = apply(
        &inp,
        &reread.state,
        Event::Mismatch {
            details: details(),
            at_ms: Some(AT + 5),
        },
    );
    let State::Uploading {
        failures: 2,
        generation: 1,
        progress,
        ..
    } = &bad.state
    else {
        panic!("expected a counted re-send, got {:?}", bad.state);
    };
    assert!(progress.as_ref().is_none_or(|p| !p.rechecked));
    assert_eq!(
        bad.commands,
        vec![Command::Upload {
            batch: 1,
            key: inp.key(1, 1)
        }]
    );
}

#[test]
fn a_mismatch_that_stays_trips_after_the_threshold_of_re_reads() {
    let inp = input(1);
    let mut state = verifying(&inp, 0, 1, 0, 0);
    let mut counted = 0;
    for round in 0..10 {
        let t = apply(
            &inp,
            &state,
            Event::Mismatch {
                details: "qty".into(),
                at_ms: Some(AT + round),
            },
        );
        state = match &t.state {
            State::Backoff { .. } => apply(&inp, &t.state, Event::TimerFired).state,
            State::Uploading { .. } => {
                counted += 1;
                let up = apply(
                    &inp,
                    &t.state,
                    Event::Uploaded {
                        receipt: receipt("r"),
                    },
                );
                up.state
            }
            State::Tripped { failures, .. } => {
                assert_eq!((*failures, counted + 1), (3, 3));
                assert_eq!(round, 5, "two reads per failed validation");
                return;
            }
            other => panic!("unexpected {other:?}"),
        };
    }
    panic!("never tripped");
}

#[test]
fn rejected_verify_counts_a_failure() {
    let inp = input(2);
    let s = verifying(&inp, 0, 1, 0, 0);
    let t = apply(
        &inp,
        &s,
        Event::VerifyFailed {
            at_ms: AT,
            error: AdapterError::Rejected("gone".into()),
        },
    );
    assert_eq!(t.state, uploading(&inp, 0, 1, 1, 1));
    assert_eq!(
        t.commands,
        vec![Command::Upload {
            batch: 0,
            key: inp.key(0, 1)
        }]
    );
}

#[test]
fn transient_verify_failure_backs_off_keeping_the_receipt() {
    let inp = input(2);
    let s = verifying(&inp, 1, 1, 1, 1);
    let key = inp.key(1, 1);
    let t = apply(
        &inp,
        &s,
        Event::VerifyFailed {
            at_ms: AT,
            error: rate_limited(2_000),
        },
    );
    let State::Backoff {
        progress: _,
        batch,
        attempt,
        generation,
        failures,
        key: k,
        until,
        receipt: r,
    } = t.state.clone()
    else {
        panic!("expected Backoff, got {:?}", t.state);
    };
    assert_eq!((batch, attempt, generation, failures, k), (1, 2, 1, 1, key));
    assert_eq!(r, Some(receipt("r")));
    assert!(until >= AT + 2_000);
    assert_eq!(t.commands, vec![Command::Sleep { until }]);
}

#[test]
fn exhausted_transient_verify_counts_a_failure() {
    let inp = input(2);
    let max = inp.policy.max_attempts;
    let s = verifying(&inp, 0, max, 0, 0);
    let t = apply(
        &inp,
        &s,
        Event::VerifyFailed {
            at_ms: AT,
            error: transient(),
        },
    );
    // No re-send: the batch landed; only the read-back failed. Retry it after a backoff.
    let key = inp.key(0, 0);
    let until = inp.retry_at(AT, 2, key, Some(&transient()));
    assert_eq!(
        t.state,
        backoff(&inp, 0, 1, 0, 1, until, Some(receipt("r")))
    );
}

// ---------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------

#[test]
fn timer_without_receipt_probes_before_resending() {
    let inp = input(2);
    let s = backoff(&inp, 1, 3, 1, 1, AT + 500, None);
    let key = inp.key(1, 1);
    let t = apply(&inp, &s, Event::TimerFired);
    assert_eq!(t.state, uploading(&inp, 1, 3, 1, 1));
    assert_eq!(t.commands, vec![Command::Probe { batch: 1, key }]);
}

#[test]
fn timer_with_receipt_verifies_again() {
    let inp = input(2);
    let s = backoff(&inp, 0, 2, 0, 2, AT + 500, Some(receipt("r")));
    let key = inp.key(0, 0);
    let t = apply(&inp, &s, Event::TimerFired);
    assert_eq!(t.state, verifying(&inp, 0, 2, 0, 2));
    assert_eq!(
        t.commands,
        vec![Command::Verify {
            batch: 0,
            key,
            receipt: receipt("r")
        }]
    );
}

// ---------------------------------------------------------------------------------------
// Cancel and illegal events
// ---------------------------------------------------------------------------------------

fn active_states(inp: &SyncInput) -> Vec<State> {
    vec![
        State::Pending {},
        uploading(inp, 1, 2, 1, 1),
        verifying(inp, 0, 1, 0, 0),
        backoff(inp, 1, 2, 0, 0, AT, None),
        backoff(inp, 1, 2, 0, 0, AT, Some(receipt("r"))),
    ]
}

#[test]
fn cancel_from_every_non_terminal_state() {
    let inp = input(2);
    for s in active_states(&inp) {
        assert!(!EndpointSync::is_terminal(&s));
        let t = apply(&inp, &s, Event::Cancel);
        assert_eq!(t.state, State::Cancelled {}, "from {s:?}");
        assert!(t.commands.is_empty());
        assert!(EndpointSync::is_terminal(&t.state));
        assert!(!opens_circuit(&inp, &s, &t.state));
    }
}

#[test]
fn illegal_events_are_refused_naming_state_and_event() {
    let inp = input(2);
    let e = refuse(&inp, &State::Pending {}, Event::Verified);
    assert_eq!(
        (e.state.as_str(), e.event.as_str()),
        ("Pending", "Verified")
    );
    let e = refuse(
        &inp,
        &verifying(&inp, 0, 1, 0, 0),
        Event::Uploaded {
            receipt: receipt("x"),
        },
    );
    assert_eq!(
        (e.state.as_str(), e.event.as_str()),
        ("Verifying", "Uploaded")
    );
    let e = refuse(&inp, &uploading(&inp, 0, 1, 0, 0), Event::TimerFired);
    assert_eq!(
        (e.state.as_str(), e.event.as_str()),
        ("Uploading", "TimerFired")
    );
    let e = refuse(
        &inp,
        &backoff(&inp, 0, 2, 0, 0, AT, None),
        Event::Uploaded {
            receipt: receipt("x"),
        },
    );
    assert_eq!(
        (e.state.as_str(), e.event.as_str()),
        ("Backoff", "Uploaded")
    );
}

/// Every (active state, event) pair outside the documented transitions is refused.
#[test]
fn the_transition_table_is_exactly_the_documented_one() {
    let inp = input(2);
    for s in active_states(&inp) {
        for ev in all_events() {
            let legal = matches!(
                (&s, &ev),
                (_, Event::Cancel)
                    | (State::Pending {}, Event::Begin { .. })
                    | (
                        State::Uploading { .. },
                        Event::Uploaded { .. } | Event::Probed { .. } | Event::UploadFailed { .. }
                    )
                    | (
                        State::Verifying { .. },
                        Event::Verified | Event::Mismatch { .. } | Event::VerifyFailed { .. }
                    )
                    | (State::Backoff { .. }, Event::TimerFired)
            );
            match EndpointSync::apply(&inp, &s, &ev) {
                Ok(_) => assert!(legal, "{ev:?} accepted in {s:?}"),
                Err(_) => {
                    assert!(!legal, "{ev:?} refused in {s:?}");
                    refuse(&inp, &s, ev);
                }
            }
        }
    }
}

#[test]
fn terminal_states_refuse_every_event() {
    let inp = input(2);
    for s in terminal_states() {
        assert!(EndpointSync::is_terminal(&s));
        for ev in all_events() {
            let e = refuse(&inp, &s, ev.clone());
            assert!(
                e.reason.contains(EndpointSync::status(&s)),
                "{s:?} / {ev:?}: {}",
                e.reason
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// resume, is_terminal, wake_at, status, serde
// ---------------------------------------------------------------------------------------

#[test]
fn resume_commands_per_state() {
    let inp = input(2);
    assert_eq!(
        EndpointSync::resume(&inp, &State::Pending {}),
        vec![Command::Begin]
    );
    // Verify before re-send: an Uploading state resumes with a probe, never an upload.
    assert_eq!(
        EndpointSync::resume(&inp, &uploading(&inp, 1, 2, 1, 0)),
        vec![Command::Probe {
            batch: 1,
            key: inp.key(1, 1)
        }]
    );
    assert_eq!(
        EndpointSync::resume(&inp, &verifying(&inp, 0, 1, 2, 0)),
        vec![Command::Verify {
            batch: 0,
            key: inp.key(0, 2),
            receipt: receipt("r")
        }]
    );
    for r in [None, Some(receipt("r"))] {
        assert_eq!(
            EndpointSync::resume(&inp, &backoff(&inp, 0, 2, 0, 0, AT + 42, r)),
            vec![Command::Sleep { until: AT + 42 }]
        );
    }
    for s in terminal_states() {
        assert!(EndpointSync::resume(&inp, &s).is_empty(), "{s:?}");
    }
}

#[test]
fn is_terminal_wake_at_and_status() {
    let inp = input(2);
    let cases: Vec<(State, &str, bool, Option<i64>)> = vec![
        (State::Pending {}, "Pending", false, None),
        (uploading(&inp, 0, 1, 0, 0), "Uploading", false, None),
        (verifying(&inp, 0, 1, 0, 0), "Verifying", false, None),
        (
            backoff(&inp, 0, 2, 0, 0, AT + 9, None),
            "Backoff",
            false,
            Some(AT + 9),
        ),
        (
            State::Done {
                quarantined: None,
                stock: None,
                batches: 1,
                items: 1,
            },
            "Done",
            true,
            None,
        ),
        (
            State::Tripped {
                reason: "r".into(),
                failures: 3,
            },
            "Tripped",
            true,
            None,
        ),
        (State::Skipped { reason: "r".into() }, "Skipped", true, None),
        (State::Cancelled {}, "Cancelled", true, None),
    ];
    for (s, name, terminal, wake) in cases {
        assert_eq!(EndpointSync::status(&s), name);
        assert_eq!(EndpointSync::is_terminal(&s), terminal, "{s:?}");
        assert_eq!(EndpointSync::wake_at(&s), wake, "{s:?}");
    }
}

#[test]
fn states_round_trip_through_json_with_stable_variant_names() {
    let inp = input(2);
    let mut states = active_states(&inp);
    states.extend(terminal_states());
    for s in states {
        let json = serde_json::to_value(&s).unwrap();
        let obj = json.as_object().expect("externally tagged object");
        assert_eq!(obj.len(), 1, "{json}");
        let name = EndpointSync::status(&s);
        assert!(obj.contains_key(name), "{name} not the tag of {json}");
        let back: State = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, s);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), s);
    }
    // The stored form of Uploading is schema: pin it.
    let key = inp.key(0, 0);
    let json = serde_json::to_value(uploading(&inp, 0, 1, 0, 0)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"Uploading": {
            "batch": 0, "attempt": 1, "generation": 0, "failures": 0, "key": key.to_string(),
            "progress": null
        }})
    );
    // Journals written before per-item progress existed still decode.
    let old = serde_json::json!({"Uploading": {
        "batch": 0, "attempt": 1, "generation": 0, "failures": 0, "key": key.to_string()
    }});
    assert_eq!(
        serde_json::from_value::<State>(old).unwrap(),
        uploading(&inp, 0, 1, 0, 0)
    );
    let old_done = serde_json::json!({"Done": {"batches": 2, "items": 7}});
    assert!(matches!(
        serde_json::from_value::<State>(old_done).unwrap(),
        State::Done {
            batches: 2,
            items: 7,
            quarantined: None,
            stock: None,
        }
    ));
    assert_eq!(
        serde_json::to_value(State::Pending {}).unwrap(),
        serde_json::json!({"Pending": {}})
    );
}

#[test]
fn events_round_trip_through_json() {
    for ev in all_events() {
        let text = serde_json::to_string(&ev).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), ev);
    }
}

#[test]
fn a_full_happy_run_folds_to_done() {
    let inp = input(3);
    let mut s = <EndpointSync as Machine>::initial(&inp);
    let mut t = apply(
        &inp,
        &s,
        Event::Begin {
            at_ms: AT,
            circuit_open: false,
            probe: false,
        },
    );
    for b in 0..3u32 {
        s = t.state;
        assert_eq!(s, uploading(&inp, b, 1, 0, 0));
        t = apply(
            &inp,
            &s,
            Event::Uploaded {
                receipt: receipt("r"),
            },
        );
        s = t.state;
        assert_eq!(s, verifying(&inp, b, 1, 0, 0));
        t = apply(&inp, &s, Event::Verified);
    }
    assert_eq!(
        t.state,
        State::Done {
            quarantined: None,
            stock: None,
            batches: 3,
            items: 9
        }
    );
}

// ---------------------------------------------------------------------------------------
// Per-item outcomes: progress, quarantine, systemic refusals
// ---------------------------------------------------------------------------------------

fn wide_input() -> SyncInput {
    let mut inp = input(2);
    inp.batch_size = 10;
    inp.batches[0].items = 10;
    inp.batches[1].items = 10;
    inp
}

fn refused(item: u32) -> Refused {
    Refused {
        item,
        sku: format!("S{item}"),
        reason: "price out of range".into(),
        kept: false,
    }
}

#[test]
fn one_refused_item_is_quarantined_and_the_batch_goes_on() {
    let inp = wide_input();
    let s = uploading(&inp, 0, 1, 0, 0);
    let ev = Event::UploadPartial {
        at_ms: AT,
        done: (0..10).filter(|&i| i != 3).collect(),
        refused: vec![refused(3)],
        rest: None,
        adjusted: Vec::new(),
    };
    let t = apply(&inp, &s, ev.clone());
    let State::Verifying {
        batch: 0,
        failures: 0,
        progress: Some(p),
        ..
    } = &t.state
    else {
        panic!("{:?}", t.state)
    };
    assert_eq!(p.quarantined.len(), 1);
    assert_eq!(p.verify_skips(0).iter().collect::<Vec<_>>(), vec![3]);
    assert!(matches!(t.commands[..], [Command::Verify { batch: 0, .. }]));
    let notice = EndpointSync::notice(&inp, &s, &ev, &t.state);
    let alert = notice
        .alerts
        .iter()
        .find(|a| a.kind == "item_quarantined")
        .expect("quarantine alerted");
    assert!(alert.message.contains("S3") && alert.message.contains("price out of range"));
    assert!(notice.circuit.is_none());
    // Verified: batch 1 starts with the quarantine carried, per-batch progress cleared.
    let v = apply(&inp, &t.state, Event::Verified);
    let State::Uploading {
        batch: 1,
        progress: Some(p1),
        ..
    } = &v.state
    else {
        panic!("{:?}", v.state)
    };
    assert!(p1.applied.is_empty() && p1.verified.is_empty());
    assert_eq!(p1.quarantined, p.quarantined);
    // Alerted once: moving on does not alert again.
    assert!(
        EndpointSync::notice(&inp, &t.state, &Event::Verified, &v.state)
            .alerts
            .is_empty()
    );
    let d = apply(
        &inp,
        &v.state,
        Event::Uploaded {
            receipt: receipt("r"),
        },
    );
    let done = apply(&inp, &d.state, Event::Verified);
    assert!(
        matches!(&done.state, State::Done { quarantined: Some(q), .. } if q.len() == 1 && q[0].sku == "S3"),
        "{:?}",
        done.state
    );
}

#[test]
fn a_mostly_refused_batch_is_a_failed_validation() {
    let inp = wide_input();
    let s = uploading(&inp, 0, 1, 0, 0);
    let t = apply(
        &inp,
        &s,
        Event::UploadPartial {
            at_ms: AT,
            done: (3..10).collect(),
            refused: vec![refused(0), refused(1), refused(2)],
            rest: None,
            adjusted: Vec::new(),
        },
    );
    // 3 of 10 refused is over the default 20 %: re-send everything under a fresh key.
    assert_eq!(t.state, uploading(&inp, 0, 1, 1, 1));
    assert_eq!(
        t.commands,
        vec![Command::Upload {
            batch: 0,
            key: inp.key(0, 1)
        }]
    );
    // Two refused of ten stays below it.
    let t = apply(
        &inp,
        &s,
        Event::UploadPartial {
            at_ms: AT,
            done: (2..10).collect(),
            refused: vec![refused(0), refused(1)],
            rest: None,
            adjusted: Vec::new(),
        },
    );
    assert!(matches!(t.state, State::Verifying { failures: 0, .. }));
    // A single item refused is always the item's problem, even in a batch of one.
    let mut one = input(1);
    one.batches[0].items = 1;
    let t = apply(
        &one,
        &uploading(&one, 0, 1, 0, 0),
        Event::UploadPartial {
            at_ms: AT,
            done: ItemSet::new(),
            refused: vec![refused(0)],
            rest: None,
            adjusted: Vec::new(),
        },
    );
    // Nothing left to verify: done, with the item quarantined.
    assert!(
        matches!(&t.state, State::Done { quarantined: Some(q), .. } if q.len() == 1),
        "{:?}",
        t.state
    );
}

#[test]
fn progress_survives_retries_and_resets_the_attempt_count() {
    let mut inp = wide_input();
    inp.policy.max_attempts = 2;
    // At the last attempt, a call that settled some items still earns a retry.
    let s = uploading(&inp, 0, 2, 0, 0);
    let t = apply(
        &inp,
        &s,
        Event::UploadPartial {
            at_ms: AT,
            done: (0..4).collect(),
            refused: vec![],
            rest: Some(transient()),
            adjusted: Vec::new(),
        },
    );
    let State::Backoff {
        attempt: 1,
        failures: 0,
        progress: Some(p),
        receipt: None,
        ..
    } = &t.state
    else {
        panic!("{:?}", t.state)
    };
    assert_eq!(p.upload_skips(0).to_string(), "0-3");
    // The retry probes, keeping the progress; the re-upload sends only the rest.
    let no_progress = Event::UploadPartial {
        at_ms: AT,
        done: ItemSet::new(),
        refused: vec![],
        rest: Some(transient()),
        adjusted: Vec::new(),
    };
    let r = apply(&inp, &t.state, Event::TimerFired);
    assert_eq!(r.state.progress(), Some(p));
    let t2 = apply(&inp, &r.state, no_progress.clone());
    assert!(
        matches!(
            &t2.state,
            State::Backoff {
                attempt: 2,
                failures: 0,
                ..
            }
        ),
        "{:?}",
        t2.state
    );
    // No progress at the last attempt: exhausted, a failed validation, same key.
    let r2 = apply(&inp, &t2.state, Event::TimerFired);
    let t3 = apply(&inp, &r2.state, no_progress);
    assert!(
        matches!(&t3.state, State::Backoff { attempt: 1, failures: 1, generation: 0, progress: Some(p3), .. } if p3 == p),
        "{:?}",
        t3.state
    );
    // A verify that confirmed some items keeps them.
    let v = verifying(&inp, 0, 1, 0, 0);
    let t3 = apply(
        &inp,
        &v,
        Event::VerifyPartial {
            at_ms: AT,
            done: (0..7).collect(),
            rest: Some(transient()),
        },
    );
    assert_eq!(
        t3.state.progress().unwrap().verify_skips(0).to_string(),
        "0-6"
    );
    // A mismatch afterwards re-sends under a fresh key: applied is forgotten, verified kept.
    let retry = apply(&inp, &t3.state, Event::TimerFired);
    let m = apply(
        &inp,
        &retry.state,
        Event::Mismatch {
            details: "S8 shows 3".into(),
            at_ms: None,
        },
    );
    let p = m.state.progress().unwrap();
    assert_eq!(p.verified.to_string(), "0-6");
    assert!(p.applied.is_empty());
    assert_eq!(p.upload_skips(0).to_string(), "");
}

#[test]
fn positions_beyond_the_batch_are_refused() {
    let inp = wide_input();
    refuse(
        &inp,
        &uploading(&inp, 0, 1, 0, 0),
        Event::UploadPartial {
            at_ms: AT,
            done: [10].into_iter().collect(),
            refused: vec![],
            rest: None,
            adjusted: Vec::new(),
        },
    );
    refuse(
        &inp,
        &verifying(&inp, 0, 1, 0, 0),
        Event::VerifyPartial {
            at_ms: AT,
            done: [12].into_iter().collect(),
            rest: None,
        },
    );
}

#[test]
fn an_unsettled_endpoint_is_read_back_before_each_first_write() {
    let mut inp = input(2);
    inp.read_first = true;
    let t = apply(
        &inp,
        &State::Pending {},
        Event::Begin {
            at_ms: AT,
            circuit_open: false,
            probe: false,
        },
    );
    assert_eq!(
        t.commands,
        vec![Command::Probe {
            batch: 0,
            key: inp.key(0, 0)
        }]
    );
    let v = apply(
        &inp,
        &t.state,
        Event::Uploaded {
            receipt: receipt("r"),
        },
    );
    let n = apply(&inp, &v.state, Event::Verified);
    assert!(matches!(n.commands[..], [Command::Probe { batch: 1, .. }]));
}

fn written(item: u32, qty: i64, basis: i64) -> StockWritten {
    StockWritten {
        item,
        sku: format!("S{item}"),
        qty,
        basis,
    }
}

#[test]
fn lowered_stock_writes_are_kept_across_batches_and_generations_until_done() {
    let mut inp = wide_input();
    inp.compare_stock = true;
    let s = uploading(&inp, 0, 1, 0, 0);
    let all: ItemSet = (0..10).collect();
    let ev = |adjusted: Vec<StockWritten>| Event::UploadPartial {
        at_ms: AT,
        done: all.clone(),
        refused: vec![],
        rest: None,
        adjusted,
    };
    let t = apply(&inp, &s, ev(vec![written(2, 3, 5), written(4, 0, 1)]));
    assert_eq!(t.state.stock_shown().len(), 2, "{:?}", t.state);
    // A mismatch twice: a fresh generation re-sends the batch, which reports item 2 again
    // (lower still): the last write is what counts.
    let m = |s: &State| {
        apply(
            &inp,
            s,
            Event::Mismatch {
                details: "x".into(),
                at_ms: None,
            },
        )
    };
    let r = m(&t.state);
    assert!(
        matches!(r.state, State::Uploading { generation: 1, .. }),
        "{:?}",
        r.state
    );
    assert_eq!(
        r.state.stock_shown().len(),
        2,
        "kept for the re-send to compare with"
    );
    let t2 = apply(&inp, &r.state, ev(vec![written(2, 1, 5)]));
    let shown = t2.state.stock_shown();
    assert_eq!(shown.len(), 2);
    assert!(shown.iter().any(|s| s.item == 2 && s.qty == 1));
    // Next batch and Done carry them.
    let v = apply(&inp, &t2.state, Event::Verified);
    assert_eq!(v.state.stock_shown().len(), 2);
    let u = apply(
        &inp,
        &v.state,
        Event::Uploaded {
            receipt: receipt("r"),
        },
    );
    let done = apply(&inp, &u.state, Event::Verified);
    let State::Done { stock: Some(s), .. } = &done.state else {
        panic!("{:?}", done.state)
    };
    assert_eq!(s.len(), 2);
    assert!(s.iter().all(|s| s.batch == 0));
    // Survives the journal's encoding.
    let json = serde_json::to_string(&done.state).unwrap();
    assert_eq!(serde_json::from_str::<State>(&json).unwrap(), done.state);
}

#[test]
fn an_adjusted_item_that_was_not_applied_is_refused() {
    let mut inp = wide_input();
    inp.compare_stock = true;
    let s = uploading(&inp, 0, 1, 0, 0);
    let ev = Event::UploadPartial {
        at_ms: AT,
        done: (0..5).collect(),
        refused: vec![],
        rest: Some(transient()),
        adjusted: vec![written(7, 1, 2)],
    };
    let err = EndpointSync::apply(&inp, &s, &ev).unwrap_err();
    assert!(err.reason.contains("adjusted but not applied"), "{err:?}");
    let beyond = Event::UploadPartial {
        at_ms: AT,
        done: (0..10).collect(),
        refused: vec![],
        rest: None,
        adjusted: vec![written(12, 1, 2)],
    };
    assert!(EndpointSync::apply(&inp, &s, &beyond).is_err());
}
