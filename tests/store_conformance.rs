//! One conformance suite for the `Store` trait, run against both backends: SQLite (a temp
//! file) and PostgreSQL (a fresh schema per test, dropped afterwards).

use std::sync::Arc;
use std::time::Duration;

use bulwark_engine::{
    Admission, AlertLevel, Append, AppendOutcome, Backend, CircuitChange, CircuitPolicy,
    CircuitWrite, ClaimRequest, NewAlert, NewWorkflow, Store,
};

struct Fixture {
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    fn store(&self) -> Arc<dyn Store> {
        self.backend.store()
    }
    async fn done(self) {
        if let Backend::Postgres(pg) = &self.backend {
            pg.drop_schema().await.unwrap();
        }
        self.backend.close().await;
    }
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::open(&dir.path().join("c.db").display().to_string())
        .await
        .unwrap();
    Fixture {
        backend,
        _dir: Some(dir),
    }
}

async fn postgres(tag: &str) -> Option<Fixture> {
    let base = bulwark_tests::pg_url()?;
    let backend = Backend::open(&bulwark_tests::pg_schema_url(&base, tag))
        .await
        .unwrap();
    Some(Fixture {
        backend,
        _dir: None,
    })
}

fn new_wf(subject: &str) -> NewWorkflow {
    NewWorkflow {
        kind: "toy".into(),
        subject: subject.into(),
        input_json: format!("{{\"subject\":\"{subject}\"}}"),
        state_json: "\"Start\"".into(),
        status: "Start".into(),
        version: 1,
    }
}

fn append(workflow: i64, seq: i64, epoch: i64, state: &str) -> Append {
    Append {
        workflow,
        seq,
        epoch,
        worker: Arc::from("w1"),
        event_json: format!("{{\"Go\":{seq}}}"),
        state_json: format!("\"{state}\""),
        status: "Moving",
        terminal: state == "End",
        wake_at: None,
        alerts: Vec::new(),
        circuit: None,
    }
}

fn claim(owner: &str, lease_ms: i64) -> ClaimRequest {
    ClaimRequest {
        owner: owner.into(),
        kind: "toy".into(),
        run: None,
        lease_ms,
        limit: None,
        skip: Vec::new(),
        dead_owners: Vec::new(),
        held: false,
    }
}

/// Runs each conformance case on both backends.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(#[tokio::test] async fn $name() { let f = super::sqlite().await; super::$name(f.store()).await; f.done().await; })*
        }
        mod postgres_backend {
            $(#[tokio::test] async fn $name() {
                let Some(f) = super::postgres(stringify!($name)).await else { return };
                super::$name(f.store()).await;
                f.done().await;
            })*
        }
    };
}

conformance!(
    created_workflows_have_row_zero,
    appends_are_conditional_on_seq_and_epoch,
    a_new_claim_fences_the_previous_holder,
    a_group_commit_mixes_outcomes_without_traces_of_refused_appends,
    alerts_and_circuits_commit_with_their_transition,
    reopened_circuits_back_off_and_successes_close_them,
    renew_and_release_respect_ownership,
    leases_of_a_dead_owner_are_claimable_at_once,
    runs_finish_and_count_states,
    alert_deliveries_are_leased_retried_and_given_up,
    schedules_advance_once_per_tick,
    open_subjects_are_those_with_unfinished_workflows,
    claims_race_other_writers_without_failing,
    worker_heartbeats_are_recorded_with_the_leases_held,
    held_subjects_are_not_claimed_until_the_hold_is_lifted,
);

async fn held_subjects_are_not_claimed_until_the_hold_is_lifted(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let ids = store
        .create_workflows(run, &[new_wf("a"), new_wf("b"), new_wf("c")])
        .await
        .unwrap();
    assert!(store.hold("b", "maintenance", "ops").await.unwrap());
    // Holding again updates the reason and says it was held already.
    assert!(!store.hold("b", "maintenance until 6", "ops").await.unwrap());
    let holds = store.holds().await.unwrap();
    assert_eq!(holds.len(), 1);
    assert_eq!(
        (
            holds[0].subject.as_str(),
            holds[0].reason.as_str(),
            holds[0].by.as_str()
        ),
        ("b", "maintenance until 6", "ops")
    );
    let c = store.claim(&claim("w1", 60_000)).await.unwrap();
    assert_eq!(
        c.iter().map(|w| w.id).collect::<Vec<_>>(),
        vec![ids[0], ids[2]],
        "a held subject was claimed"
    );
    // Also once the others' leases are gone (released or expired).
    let held: Vec<_> = c.iter().map(|w| (w.id, w.epoch)).collect();
    store.release("w1", &held).await.unwrap();
    let again = store.claim(&claim("w2", 60_000)).await.unwrap();
    assert!(again.iter().all(|w| w.id != ids[1]), "{again:?}");
    // An operator's signal reaches it.
    let signal = store
        .claim(&ClaimRequest {
            held: true,
            ..claim("w3", 60_000)
        })
        .await
        .unwrap();
    assert!(signal.iter().any(|w| w.id == ids[1]), "{signal:?}");
    store
        .release(
            "w3",
            &signal.iter().map(|w| (w.id, w.epoch)).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    // Lifted: claimable again.
    assert!(store.lift_hold("b", "ops").await.unwrap());
    assert!(!store.lift_hold("b", "ops").await.unwrap());
    assert!(store.holds().await.unwrap().is_empty());
    let after = store.claim(&claim("w4", 60_000)).await.unwrap();
    assert!(after.iter().any(|w| w.id == ids[1]), "{after:?}");
    // Both were alerted (the webhook hears of them).
    let kinds: Vec<String> = store
        .alerts(10)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.subject == "b")
        .map(|a| a.kind)
        .collect();
    assert_eq!(kinds, ["hold_lifted", "hold", "hold"], "{kinds:?}");
}

async fn open_subjects_are_those_with_unfinished_workflows(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let ids = store
        .create_workflows(run, &[new_wf("a"), new_wf("b")])
        .await
        .unwrap();
    let epoch = store.claim(&claim("w1", 60_000)).await.unwrap()[0].epoch;
    store
        .append_batch(&[append(ids[0], 1, epoch, "End")])
        .await
        .unwrap();
    let open = store.open_subjects("toy").await.unwrap();
    assert_eq!(open, ["b".to_string()].into());
    assert!(store.open_subjects("other").await.unwrap().is_empty());
}

async fn created_workflows_have_row_zero(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let ids = store
        .create_workflows(run, &[new_wf("a"), new_wf("b"), new_wf("c")])
        .await
        .unwrap();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let rows = store.workflows(Some(run), Some("toy")).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.subject.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    for r in &rows {
        assert_eq!((r.seq, r.epoch, r.terminal), (0, 0, false));
        assert_eq!(r.state_json, "\"Start\"");
        assert_eq!(r.input_json, format!("{{\"subject\":\"{}\"}}", r.subject));
        let j = store.journal(r.id).await.unwrap();
        assert_eq!(j.len(), 1);
        assert_eq!((j[0].seq, j[0].event_json.as_deref()), (0, None));
    }
    // A duplicate subject in the same run is refused whole.
    assert!(
        store
            .create_workflows(run, &[new_wf("d"), new_wf("a")])
            .await
            .is_err()
    );
    assert_eq!(store.workflows(Some(run), None).await.unwrap().len(), 3);
}

async fn appends_are_conditional_on_seq_and_epoch(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let id = store.create_workflows(run, &[new_wf("a")]).await.unwrap()[0];
    let c = store.claim(&claim("w1", 60_000)).await.unwrap();
    assert_eq!(c.len(), 1);
    let epoch = c[0].epoch;
    assert_eq!(epoch, 1);
    assert_eq!(c[0].state_json, "\"Start\"");
    assert_eq!(
        store
            .append_batch(&[append(id, 1, epoch, "One")])
            .await
            .unwrap(),
        [AppendOutcome::Committed]
    );
    // Same seq again, a skipped seq, a stale epoch: all refused.
    assert_eq!(
        store
            .append_batch(&[append(id, 1, epoch, "Again")])
            .await
            .unwrap(),
        [AppendOutcome::Fenced]
    );
    assert_eq!(
        store
            .append_batch(&[append(id, 3, epoch, "Skip")])
            .await
            .unwrap(),
        [AppendOutcome::Fenced]
    );
    assert_eq!(
        store
            .append_batch(&[append(id, 2, epoch - 1, "Stale")])
            .await
            .unwrap(),
        [AppendOutcome::Fenced]
    );
    assert_eq!(
        store
            .append_batch(&[append(id, 2, epoch, "End")])
            .await
            .unwrap(),
        [AppendOutcome::Committed]
    );
    let j = store.journal(id).await.unwrap();
    assert_eq!(
        j.iter().map(|r| r.state_json.as_str()).collect::<Vec<_>>(),
        ["\"Start\"", "\"One\"", "\"End\""]
    );
    let w = &store.workflows(Some(run), None).await.unwrap()[0];
    assert_eq!(
        (w.seq, w.terminal, w.state_json.as_str()),
        (2, true, "\"End\"")
    );
    // Terminal workflows are not claimed again.
    assert!(store.claim(&claim("w2", 60_000)).await.unwrap().is_empty());
}

async fn worker_heartbeats_are_recorded_with_the_leases_held(store: Arc<dyn Store>) {
    assert!(store.workers().await.unwrap().is_empty());
    store.worker_beat("w1", 60_000).await.unwrap();
    let first = store.workers().await.unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (first[0].worker.as_str(), first[0].lease_ms),
        ("w1", 60_000)
    );
    assert_eq!(first[0].started_at, first[0].last_beat);
    assert_eq!((first[0].leases, first[0].expired), (0, 0));
    let run = store.create_run("sync", "{}").await.unwrap();
    store
        .create_workflows(run, &[new_wf("a"), new_wf("b")])
        .await
        .unwrap();
    store.claim(&claim("w1", 60_000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.worker_beat("w1", 30_000).await.unwrap();
    store.worker_beat("w2", 1_000).await.unwrap();
    let now = store.workers().await.unwrap();
    assert_eq!(now.len(), 2, "{now:?}");
    let w1 = now.iter().find(|w| w.worker == "w1").unwrap();
    assert_eq!(w1.started_at, first[0].started_at, "the first beat is kept");
    assert!(w1.last_beat > w1.started_at, "{w1:?}");
    assert_eq!((w1.lease_ms, w1.leases, w1.expired), (30_000, 2, 0));
    let w2 = now.iter().find(|w| w.worker == "w2").unwrap();
    assert_eq!((w2.leases, w2.expired), (0, 0));
}

/// A worker claims while other connections of the same process write (runs enqueued by
/// the embedding program, heartbeats): every claim succeeds. On SQLite a claim that read
/// before it wrote failed here with "database is locked" (SQLITE_BUSY_SNAPSHOT).
async fn claims_race_other_writers_without_failing(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    store
        .create_workflows(run, &[new_wf("seed")])
        .await
        .unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let run = store.create_run("sync", "{}").await.unwrap();
                store
                    .create_workflows(run, &[new_wf(&format!("s{i}"))])
                    .await
                    .unwrap();
                store.worker_beat("w1", 60_000).await.unwrap();
            }
        })
    };
    let mut claimed = 0;
    while !writer.is_finished() {
        claimed += store
            .claim(&claim("w1", 60_000))
            .await
            .expect("a claim racing other writers")
            .len();
        // Released again, so the next claim reads owners and writes once more.
        let held: Vec<_> = store
            .claim(&claim("w2", 1))
            .await
            .expect("a claim racing other writers")
            .into_iter()
            .map(|w| (w.id, w.epoch))
            .collect();
        store.release("w2", &held).await.unwrap();
    }
    writer.await.unwrap();
    assert!(claimed > 0, "the claims found the new workflows");
}

async fn a_new_claim_fences_the_previous_holder(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let id = store.create_workflows(run, &[new_wf("a")]).await.unwrap()[0];
    let claimed = store.claim(&claim("w1", 50)).await.unwrap();
    assert_eq!(claimed[0].previous_owner, None, "nobody held it");
    let first = claimed[0].epoch;
    assert_eq!(
        store
            .append_batch(&[append(id, 1, first, "One")])
            .await
            .unwrap(),
        [AppendOutcome::Committed]
    );
    tokio::time::sleep(Duration::from_millis(120)).await; // the lease expires
    let second = store.claim(&claim("w2", 60_000)).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].seq, second[0].epoch), (1, first + 1));
    assert_eq!(second[0].state_json, "\"One\"");
    assert_eq!(
        second[0].previous_owner.as_deref(),
        Some("w1"),
        "a takeover names whose lease ran out"
    );
    // The paused first worker wakes up and tries to go on: refused.
    assert_eq!(
        store
            .append_batch(&[append(id, 2, first, "Late")])
            .await
            .unwrap(),
        [AppendOutcome::Fenced]
    );
    assert_eq!(
        store.renew("w1", &[(id, first)], 60_000).await.unwrap(),
        Vec::<i64>::new()
    );
    assert_eq!(
        store
            .append_batch(&[append(id, 2, first + 1, "Two")])
            .await
            .unwrap(),
        [AppendOutcome::Committed]
    );
    assert_eq!(store.journal(id).await.unwrap().len(), 3);
}

async fn a_group_commit_mixes_outcomes_without_traces_of_refused_appends(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let subjects: Vec<NewWorkflow> = (0..1200).map(|i| new_wf(&format!("s{i:04}"))).collect();
    let ids = store.create_workflows(run, &subjects).await.unwrap();
    let claimed = store.claim(&claim("w1", 60_000)).await.unwrap();
    assert_eq!(claimed.len(), 1200);
    // Every third append carries a stale epoch.
    let batch: Vec<Append> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| append(*id, 1, if i % 3 == 0 { 0 } else { 1 }, "One"))
        .collect();
    let out = store.append_batch(&batch).await.unwrap();
    for (i, o) in out.iter().enumerate() {
        let want = if i % 3 == 0 {
            AppendOutcome::Fenced
        } else {
            AppendOutcome::Committed
        };
        assert_eq!(*o, want, "append {i}");
    }
    assert_eq!(store.journal_len().await.unwrap(), 1200 + 800);
    let rows = store.journal_range(ids[0], ids[5] + 1).await.unwrap();
    let seqs: Vec<(i64, i64)> = rows.iter().map(|r| (r.workflow - ids[0], r.seq)).collect();
    assert_eq!(
        seqs,
        [
            (0, 0),
            (1, 0),
            (1, 1),
            (2, 0),
            (2, 1),
            (3, 0),
            (4, 0),
            (4, 1),
            (5, 0),
            (5, 1)
        ]
    );
}

fn open_change(policy: CircuitPolicy) -> CircuitWrite {
    CircuitWrite {
        subject: "ep-1".into(),
        change: CircuitChange::Open {
            failures: 3,
            reason: "batch 0: rejected".into(),
            policy,
        },
    }
}

async fn alerts_and_circuits_commit_with_their_transition(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let id = store
        .create_workflows(run, &[new_wf("ep-1")])
        .await
        .unwrap()[0];
    let epoch = store.claim(&claim("w1", 60_000)).await.unwrap()[0].epoch;
    let alert = NewAlert {
        kind: "retries_exhausted".into(),
        level: AlertLevel::Warn,
        subject: "ep-1".into(),
        message: "5 attempts failed".into(),
    };
    let policy = CircuitPolicy {
        threshold: 3,
        cooldown_ms: 60_000,
        max_cooldown_ms: 600_000,
    };
    // A refused append records no alert and opens no circuit.
    let mut stale = append(id, 1, epoch + 5, "End");
    stale.alerts = vec![alert.clone()];
    stale.circuit = Some(open_change(policy));
    assert_eq!(
        store.append_batch(&[stale]).await.unwrap(),
        [AppendOutcome::Fenced]
    );
    assert!(store.alerts(10).await.unwrap().is_empty());
    assert!(store.circuits().await.unwrap().is_empty());
    let mut ok = append(id, 1, epoch, "End");
    ok.alerts = vec![alert];
    ok.circuit = Some(open_change(policy));
    let before = bulwark_engine::now_ms();
    assert_eq!(
        store.append_batch(&[ok]).await.unwrap(),
        [AppendOutcome::Committed]
    );
    // Both alerts of the one transition: the machine's and the circuit's.
    let alerts = store.alerts(10).await.unwrap();
    let kinds: Vec<(&str, AlertLevel)> =
        alerts.iter().map(|a| (a.kind.as_str(), a.level)).collect();
    assert_eq!(
        kinds,
        [
            ("circuit_opened", AlertLevel::Error),
            ("retries_exhausted", AlertLevel::Warn)
        ]
    );
    assert!(
        alerts
            .iter()
            .all(|a| a.subject == "ep-1" && a.workflow == Some(id))
    );
    assert!(
        alerts[0].message.contains("rejected"),
        "{}",
        alerts[0].message
    );
    let c = &store.circuits().await.unwrap()[0];
    assert_eq!(
        (c.subject.as_str(), c.open, c.failures, c.opens),
        ("ep-1", true, 3, 1)
    );
    assert!(c.retry_at >= before + 60_000 && c.retry_at <= bulwark_engine::now_ms() + 60_000);
    assert!(matches!(
        c.admission(bulwark_engine::now_ms()),
        Admission::Open { .. }
    ));
    assert_eq!(c.admission(c.retry_at), Admission::HalfOpen);
    assert!(
        store
            .reset_circuit("ep-1", "reset by operator")
            .await
            .unwrap()
    );
    assert!(
        !store
            .reset_circuit("ep-1", "reset by operator")
            .await
            .unwrap()
    );
    let c = &store.circuits().await.unwrap()[0];
    assert_eq!((c.open, c.opens), (false, 0));
    let alerts = store.alerts(10).await.unwrap();
    assert_eq!(
        alerts.len(),
        3,
        "one circuit_closed alert for the one reset"
    );
    assert_eq!(
        (alerts[0].kind.as_str(), alerts[0].workflow),
        ("circuit_closed", None)
    );
    assert!(alerts[0].message.contains("reset by operator"));
}

async fn reopened_circuits_back_off_and_successes_close_them(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let ids = store
        .create_workflows(run, &[new_wf("ep-1"), new_wf("ep-2")])
        .await
        .unwrap();
    let claimed = store.claim(&claim("w1", 60_000)).await.unwrap();
    let (e1, e2) = (claimed[0].epoch, claimed[1].epoch);
    let policy = CircuitPolicy {
        threshold: 3,
        cooldown_ms: 1_000,
        max_cooldown_ms: 3_000,
    };
    // Opened three times in a row (failed probes): 1 s, 2 s, then capped at 3 s.
    for (seq, expected) in [(1, 1_000), (2, 2_000), (3, 3_000)] {
        let mut a = append(ids[0], seq, e1, "Moving");
        a.circuit = Some(open_change(policy));
        store.append_batch(&[a]).await.unwrap();
        let c = &store.circuits().await.unwrap()[0];
        assert_eq!(c.opens as i64, seq);
        assert_eq!(c.retry_at - c.opened_at, expected);
    }
    // A success of another subject touches nothing; ep-1's success closes ep-1, once.
    let close = |id, seq, epoch, subject: &str| {
        let mut a = append(id, seq, epoch, "Moving");
        a.circuit = Some(CircuitWrite {
            subject: subject.into(),
            change: CircuitChange::Close,
        });
        a
    };
    store
        .append_batch(&[close(ids[1], 1, e2, "ep-2")])
        .await
        .unwrap();
    assert!(store.circuits().await.unwrap()[0].open);
    store
        .append_batch(&[close(ids[0], 4, e1, "ep-1"), close(ids[1], 2, e2, "ep-2")])
        .await
        .unwrap();
    store
        .append_batch(&[close(ids[0], 5, e1, "ep-1")])
        .await
        .unwrap();
    let c = &store.circuits().await.unwrap()[0];
    assert_eq!((c.open, c.opens), (false, 0));
    let closed: Vec<_> = store
        .alerts(20)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.kind == "circuit_closed")
        .collect();
    assert_eq!(closed.len(), 1);
    assert_eq!(
        (closed[0].subject.as_str(), closed[0].workflow),
        ("ep-1", Some(ids[0]))
    );
    // Opening after a close starts from the first cooldown again.
    let mut a = append(ids[0], 6, e1, "Moving");
    a.circuit = Some(open_change(policy));
    store.append_batch(&[a]).await.unwrap();
    let c = &store.circuits().await.unwrap()[0];
    assert_eq!((c.opens, c.retry_at - c.opened_at), (1, 1_000));
}

async fn alert_deliveries_are_leased_retried_and_given_up(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let alert = |n: u32| NewAlert {
        kind: "run_tripped".into(),
        level: AlertLevel::Warn,
        subject: format!("run:{n}"),
        message: "m".into(),
    };
    assert!(
        store
            .finish_run(run, "finished", Some(alert(1)))
            .await
            .unwrap()
    );
    // Finishing again records nothing.
    assert!(
        !store
            .finish_run(run, "finished", Some(alert(2)))
            .await
            .unwrap()
    );
    let all = store.alerts(10).await.unwrap();
    assert_eq!(all.len(), 1);
    let first = store.claim_alert_deliveries(0, 1_000, 3, 10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].delivery_attempts, 1);
    // Leased: not handed out again until its retry time.
    assert!(
        store
            .claim_alert_deliveries(0, 1_000, 3, 10)
            .await
            .unwrap()
            .is_empty()
    );
    store
        .record_alert_delivery(first[0].id, Err("connection refused".into()))
        .await
        .unwrap();
    // The lease is long enough that a loaded machine cannot outlast it between two claims.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let second = store.claim_alert_deliveries(0, 1_000, 3, 10).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(
        second[0].delivery_error.as_deref(),
        Some("connection refused")
    );
    store
        .record_alert_delivery(second[0].id, Ok(()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        store
            .claim_alert_deliveries(0, 50, 3, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.alerts(1).await.unwrap()[0].delivered_at.is_some());
    // Alerts older than `since` are not delivered; after max_attempts one is given up.
    let run2 = store.create_run("sync", "{}").await.unwrap();
    store
        .finish_run(run2, "finished", Some(alert(3)))
        .await
        .unwrap();
    assert!(
        store
            .claim_alert_deliveries(bulwark_engine::now_ms() + 60_000, 1, 3, 10)
            .await
            .unwrap()
            .is_empty()
    );
    for _ in 0..2 {
        assert_eq!(
            store
                .claim_alert_deliveries(0, 1, 2, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        store
            .claim_alert_deliveries(0, 1, 2, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn schedules_advance_once_per_tick(store: Arc<dyn Store>) {
    assert_eq!(store.schedule_tick("sync").await.unwrap(), None);
    assert!(store.advance_schedule("sync", None, 100).await.unwrap());
    assert!(!store.advance_schedule("sync", None, 100).await.unwrap());
    assert_eq!(store.schedule_tick("sync").await.unwrap(), Some(100));
    // Two workers race for the same tick: one wins.
    assert!(
        store
            .advance_schedule("sync", Some(100), 200)
            .await
            .unwrap()
    );
    assert!(
        !store
            .advance_schedule("sync", Some(100), 200)
            .await
            .unwrap()
    );
    assert_eq!(store.schedule_tick("sync").await.unwrap(), Some(200));
    assert_eq!(store.schedule_tick("snapshot").await.unwrap(), None);
}

async fn leases_of_a_dead_owner_are_claimable_at_once(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let ids = store
        .create_workflows(run, &[new_wf("a"), new_wf("b")])
        .await
        .unwrap();
    let first = store.claim(&claim("w1", 600_000)).await.unwrap();
    assert_eq!(first.len(), 2);
    // Another owner being dead says nothing of w1's leases (PostgreSQL keeps them; SQLite
    // lets one process in, so any lease it finds is a dead process's anyway).
    let unrelated = store
        .claim(&ClaimRequest {
            dead_owners: vec!["w9".into()],
            ..claim("w2", 600_000)
        })
        .await
        .unwrap();
    if store.presence_scope().is_some() {
        assert!(unrelated.is_empty(), "{unrelated:?}");
        let taken = store
            .claim(&ClaimRequest {
                dead_owners: vec!["w1".into()],
                ..claim("w2", 600_000)
            })
            .await
            .unwrap();
        assert_eq!(taken.iter().map(|w| w.id).collect::<Vec<_>>(), ids);
        assert!(
            taken
                .iter()
                .all(|w| w.previous_owner.as_deref() == Some("w1"))
        );
    }
    // Either way w1 is fenced off: its renewal finds nothing.
    let held: Vec<_> = first.iter().map(|w| (w.id, w.epoch)).collect();
    assert!(store.renew("w1", &held, 600_000).await.unwrap().is_empty());
}

async fn renew_and_release_respect_ownership(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{}").await.unwrap();
    let ids = store
        .create_workflows(run, &[new_wf("a"), new_wf("b")])
        .await
        .unwrap();
    let c = store
        .claim(&ClaimRequest {
            limit: Some(1),
            ..claim("w1", 60_000)
        })
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].id, ids[0]);
    // Declined workflows are not claimed again by the worker that declined them.
    let skipped = store
        .claim(&ClaimRequest {
            skip: vec![ids[1]],
            ..claim("w1", 60_000)
        })
        .await
        .unwrap();
    assert!(skipped.iter().all(|w| w.id != ids[1]), "{skipped:?}");
    let held = [(c[0].id, c[0].epoch)];
    assert_eq!(
        store.renew("w1", &held, 60_000).await.unwrap(),
        vec![ids[0]]
    );
    assert!(
        store.renew("w2", &held, 60_000).await.unwrap().is_empty(),
        "not w2's lease"
    );
    store.release("w1", &held).await.unwrap();
    let again = store.claim(&claim("w2", 60_000)).await.unwrap();
    assert_eq!(again.iter().map(|w| w.id).collect::<Vec<_>>(), ids);
    assert_eq!(again[0].epoch, c[0].epoch + 1);
}

async fn runs_finish_and_count_states(store: Arc<dyn Store>) {
    let run = store.create_run("sync", "{\"x\":1}").await.unwrap();
    let ids = store
        .create_workflows(run, &[new_wf("a"), new_wf("b")])
        .await
        .unwrap();
    let epoch = store.claim(&claim("w1", 60_000)).await.unwrap()[0].epoch;
    store
        .append_batch(&[append(ids[0], 1, epoch, "End")])
        .await
        .unwrap();
    let counts: std::collections::HashMap<String, i64> = store
        .status_counts(Some(run))
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!((counts["Moving"], counts["Start"]), (1, 1));
    let r = &store.runs().await.unwrap()[0];
    assert_eq!(
        (
            r.id,
            r.status.as_str(),
            r.params_json.as_str(),
            r.finished_at
        ),
        (run, "running", "{\"x\":1}", None)
    );
    assert!(store.finish_run(run, "finished", None).await.unwrap());
    let r = &store.runs().await.unwrap()[0];
    assert_eq!(r.status, "finished");
    assert!(r.finished_at.is_some());
}

/// A worker stopped (SIGSTOP) in the middle of a commit holds its row locks, and claims
/// skip locked rows: without the server's idle-in-transaction timeout its workflows would
/// never be taken over (W4 found it).
#[tokio::test]
async fn postgres_a_worker_stopped_inside_a_transaction_does_not_keep_its_workflows() {
    let Some(f) = postgres("stalled_tx").await else {
        return;
    };
    let store = f.store();
    let run = store.create_run("sync", "{}").await.unwrap();
    let id = store.create_workflows(run, &[new_wf("a")]).await.unwrap()[0];
    store.claim(&claim("w1", 200)).await.unwrap();
    let Backend::Postgres(pg) = &f.backend else {
        unreachable!("postgres fixture")
    };
    let mut stalled = pg.pool().acquire().await.unwrap().detach();
    sqlx::query("BEGIN").execute(&mut stalled).await.unwrap();
    sqlx::query("SELECT id FROM workflows WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut stalled)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // w1's lease runs out
    assert!(
        store.claim(&claim("w2", 60_000)).await.unwrap().is_empty(),
        "the locked row is skipped while the transaction lives"
    );
    let started = std::time::Instant::now();
    let taken = loop {
        let c = store.claim(&claim("w2", 60_000)).await.unwrap();
        if !c.is_empty() {
            break c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still locked after 15 s: the server did not end the stalled session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(taken[0].id, id);
    assert_eq!(taken[0].previous_owner.as_deref(), Some("w1"));
    assert!(
        sqlx::query("COMMIT").execute(&mut stalled).await.is_err(),
        "the stalled session was ended"
    );
    drop(stalled);
    f.done().await;
}

/// Claim `ids` as w1 and drive each to End in one transition.
async fn end(store: &dyn Store, ids: &[i64]) {
    let claimed = store.claim(&claim("w1", 60_000)).await.unwrap();
    for id in ids {
        let epoch = claimed
            .iter()
            .find(|c| c.id == *id)
            .map(|c| c.epoch)
            .unwrap_or_else(|| panic!("workflow {id} not claimed"));
        let out = store
            .append_batch(&[append(*id, 1, epoch, "End")])
            .await
            .unwrap();
        assert!(matches!(out[0], AppendOutcome::Committed), "{out:?}");
    }
}

/// Retention removes workflows of ended runs whole (journal, input, row), keeps the newest
/// of each subject of the kinds it is told to, never touches a running run, and removes a
/// run with its last workflow (but never the newest run).
async fn prune_removes_ended_history_whole(backend: &Backend) {
    let store = backend.store();
    let r1 = store.create_run("sync", "{}").await.unwrap();
    let w1 = store
        .create_workflows(r1, &[new_wf("a"), new_wf("b")])
        .await
        .unwrap();
    end(store.as_ref(), &w1).await;
    assert!(store.finish_run(r1, "finished", None).await.unwrap());
    let r2 = store.create_run("sync", "{}").await.unwrap();
    let w2 = store.create_workflows(r2, &[new_wf("a")]).await.unwrap();
    end(store.as_ref(), &w2).await;
    assert!(store.finish_run(r2, "finished", None).await.unwrap());
    let r3 = store.create_run("sync", "{}").await.unwrap();
    let w3 = store.create_workflows(r3, &[new_wf("c")]).await.unwrap();
    let rows_before = store.journal_len().await.unwrap();
    assert_eq!(rows_before, 7);

    // Nothing ended before a day ago.
    let day_ago = bulwark_engine::now_ms() - 86_400_000;
    let none = backend
        .prune(&bulwark_engine::Retention {
            keep_latest_of: vec!["toy".into()],
            journal_before_ms: Some(day_ago),
            alerts_before_ms: Some(day_ago),
        })
        .await
        .unwrap();
    assert_eq!(none, bulwark_engine::Pruned::default());

    let after = bulwark_engine::now_ms() + 1;
    let kept_latest = backend
        .prune(&bulwark_engine::Retention {
            keep_latest_of: vec!["toy".into()],
            journal_before_ms: Some(after),
            alerts_before_ms: None,
        })
        .await
        .unwrap();
    // Only run 1's `a` goes: run 2 has a newer one; `b` of run 1 is the newest of b.
    assert_eq!(
        (
            kept_latest.workflows,
            kept_latest.journal_rows,
            kept_latest.runs
        ),
        (1, 2, 0)
    );
    assert!(store.journal(w1[0]).await.unwrap().is_empty());
    assert_eq!(store.journal(w1[1]).await.unwrap().len(), 2);

    let all = backend
        .prune(&bulwark_engine::Retention {
            keep_latest_of: Vec::new(),
            journal_before_ms: Some(after),
            alerts_before_ms: None,
        })
        .await
        .unwrap();
    // b of run 1 and a of run 2 go, and runs 1 and 2 with them; run 3 is running.
    assert_eq!((all.workflows, all.journal_rows, all.runs), (2, 4, 2));
    let runs: Vec<i64> = store.runs().await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(runs, vec![r3]);
    assert_eq!(store.journal(w3[0]).await.unwrap().len(), 1);
    assert_eq!(store.journal_len().await.unwrap(), 1);
    let left: Vec<i64> = store
        .workflows(None, None)
        .await
        .unwrap()
        .iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(left, w3);
    backend.checkpoint().await.unwrap();
}

#[tokio::test]
async fn sqlite_prune_removes_ended_history_whole() {
    let f = sqlite().await;
    prune_removes_ended_history_whole(&f.backend).await;
    f.done().await;
}

#[tokio::test]
async fn postgres_prune_removes_ended_history_whole() {
    let Some(f) = postgres("prune_removes_ended_history_whole").await else {
        return;
    };
    prune_removes_ended_history_whole(&f.backend).await;
    f.done().await;
}
