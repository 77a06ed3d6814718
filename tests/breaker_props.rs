//! Property tests of the circuit-breaker policy: for random sequences of outcomes, the
//! breaker never opens before N consecutive failed validations and always opens at N —
//! both for the policy's own fold and for the `EndpointSync` machine that uses it (fed
//! adapter outcomes through its real transition function), including half-open probes.

use bulwark_engine::circuit::{CircuitPolicy, Count};
use bulwark_engine::{CircuitChange, Machine};
use bulwark_workflows::adapter::{AdapterError, Receipt};
use bulwark_workflows::endpoint_sync::{
    BatchPlan, Command, EndpointSync, Event, State, SyncInput, SyncPolicy,
};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Success,
    Failure,
}

proptest! {
    #[test]
    fn the_policy_opens_exactly_at_n_consecutive_failures(
        threshold in 1u32..=6,
        outcomes in proptest::collection::vec(prop_oneof![Just(Outcome::Success), Just(Outcome::Failure)], 0..80),
    ) {
        let policy = CircuitPolicy { threshold, cooldown_ms: 1, max_cooldown_ms: 1 };
        let mut failures = 0u32;
        let mut consecutive = 0u32;
        for o in outcomes {
            match o {
                Outcome::Success => { failures = 0; consecutive = 0; }
                Outcome::Failure => {
                    consecutive += 1;
                    match policy.count_failure(failures) {
                        Count::Open(n) => {
                            prop_assert_eq!(consecutive, threshold, "opened before or after N");
                            prop_assert_eq!(n, threshold);
                            // Open: the next sync starts over (probe or after a reset).
                            failures = 0; consecutive = 0;
                        }
                        Count::Below(n) => {
                            prop_assert!(consecutive < threshold, "did not open at N");
                            prop_assert_eq!(n, consecutive);
                            failures = n;
                        }
                    }
                }
            }
        }
    }
}

/// What the endpoint does with one adapter call.
#[derive(Debug, Clone)]
enum Answer {
    /// Upload accepted / read-back matches.
    Ok,
    /// Upload rejected / read-back differs: a failed validation.
    Invalid,
    /// Timeout, 5xx, reset or 429: retried; counts only when max_attempts are used up.
    Transient(AdapterError),
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => Just(Answer::Ok),
        2 => Just(Answer::Invalid),
        2 => prop_oneof![
            Just(AdapterError::Transient("timeout".into())),
            Just(AdapterError::Transient("HTTP 503".into())),
            (0u64..5_000).prop_map(|ms| AdapterError::RateLimited { retry_after_ms: ms, message: "429".into() }),
        ].prop_map(Answer::Transient),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_endpoint_sync_trips_exactly_at_n_consecutive_failed_validations(
        max_failures in 1u32..=5,
        max_attempts in 1u32..=4,
        batches in 1usize..=4,
        probe in proptest::bool::weighted(0.3),
        answers in proptest::collection::vec(answer(), 1..120),
    ) {
        let input = SyncInput { read_first: false, retry: Vec::new(), repair: Vec::new(), config: None, compare_stock: false, cas: Default::default(),
            endpoint: "ep".into(),
            snapshot: 2,
            base: None,
            batch_size: 10,
            batches: (0..batches).map(|i| BatchPlan { hash: format!("{i:08x}"), items: 10 }).collect(),
            policy: SyncPolicy { max_failures, max_attempts, backoff_base_ms: 1, backoff_max_ms: 2, ..SyncPolicy::default() },
            mapping: None,
            on_removed: bulwark_workflows::staging::OnRemoved::Leave,
        };
        // Reference model: consecutive failed validations since the last verified batch
        // (a half-open probe starts one short of the threshold), attempts of the step.
        let mut model_failures = if probe { max_failures - 1 } else { 0 };
        let mut attempt = 1u32;
        // A generation's first mismatch is read again before it counts.
        let mut rechecked = false;
        let mut state = EndpointSync::initial(&input);
        let t = EndpointSync::apply(&input, &state, &Event::Begin { at_ms: 0, circuit_open: false, probe }).unwrap();
        state = t.state;
        let mut commands: std::collections::VecDeque<Command> = t.commands.into();
        let mut answers = answers.into_iter();
        let mut opened = 0;
        while let Some(command) = commands.pop_front() {
            let event = match command {
                Command::Sleep { .. } => Event::TimerFired,
                Command::Probe { .. } => Event::Probed { found: None },
                Command::Begin => unreachable!("only on resume"),
                Command::Upload { .. } | Command::Verify { .. } => {
                    let Some(a) = answers.next() else { break };
                    let upload = matches!(command, Command::Upload { .. });
                    match a {
                        Answer::Ok => {
                            attempt = 1;
                            if upload {
                                Event::Uploaded { receipt: Receipt { id: "r".into() } }
                            } else {
                                model_failures = 0;
                                rechecked = false;
                                Event::Verified
                            }
                        }
                        Answer::Invalid if !upload && !rechecked => {
                            rechecked = true;
                            Event::Mismatch { details: "qty".into(), at_ms: Some(1) }
                        }
                        Answer::Invalid => {
                            attempt = 1;
                            model_failures += 1;
                            rechecked = false;
                            if upload {
                                Event::UploadFailed { at_ms: 1, error: AdapterError::Rejected("no".into()) }
                            } else {
                                Event::Mismatch { details: "qty".into(), at_ms: Some(1) }
                            }
                        }
                        Answer::Transient(error) => {
                            if attempt < max_attempts {
                                attempt += 1;
                            } else {
                                attempt = 1;
                                model_failures += 1;
                            }
                            if upload {
                                Event::UploadFailed { at_ms: 1, error }
                            } else {
                                Event::VerifyFailed { at_ms: 1, error }
                            }
                        }
                    }
                }
            };
            let previous = state.clone();
            let t = EndpointSync::apply(&input, &state, &event).unwrap();
            state = t.state;
            commands.extend(t.commands);
            let notice = EndpointSync::notice(&input, &previous, &event, &state);
            let opens = matches!(notice.circuit, Some(CircuitChange::Open { .. }));
            if opens {
                opened += 1;
            }
            match &state {
                State::Tripped { failures, .. } => {
                    prop_assert_eq!(model_failures, max_failures, "tripped before N: {:?}", event);
                    prop_assert_eq!(*failures, max_failures);
                    prop_assert!(opens, "tripping opens the circuit");
                }
                State::Done { .. } => prop_assert!(model_failures < max_failures),
                other => {
                    prop_assert!(model_failures < max_failures, "N failures but still {:?}", other);
                    prop_assert_eq!(other.failures(), Some(model_failures));
                    prop_assert!(!opens);
                }
            }
        }
        prop_assert!(opened <= 1);
    }
}
