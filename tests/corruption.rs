//! Bad input gets a clear error and loses nothing: foreign database files are refused at
//! open; corrupted journal rows (bad JSON, a gap in sequence numbers) are reported by the
//! audit and refused by replay, naming the workflow, while the other workflows go on.

use std::sync::Arc;
use std::time::Duration;

use bulwark_adapters::memory::MemoryPortal;
use bulwark_engine::{EngineError, SqliteStore};
use bulwark_tests::crash_portal::{CrashingPortal, memory_endpoints, registry_for, seed_snapshot};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::sync::SyncOptions;
use sqlx::Connection;

#[tokio::test]
async fn a_foreign_database_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    // Another application's SQLite database.
    let other = dir.path().join("other.db");
    {
        let mut c =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", other.display()))
                .await
                .unwrap();
        sqlx::query("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
            .execute(&mut c)
            .await
            .unwrap();
        sqlx::query("INSERT INTO invoices (total) VALUES (12.5)")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
    }
    let err = SqliteStore::open(&other).await.unwrap_err();
    assert!(matches!(err, EngineError::NotBulwark { .. }), "{err}");
    assert!(
        err.to_string().contains("other.db") && err.to_string().contains("not a Bulwark database"),
        "{err}"
    );
    // Nothing was added to it.
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", other.display()))
        .await
        .unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(tables, 1);

    // A file that is not SQLite at all.
    let text = dir.path().join("notes.txt");
    let content =
        "this is not a database, just some text that is long enough to look like a header";
    std::fs::write(&text, content).unwrap();
    let err = SqliteStore::open(&text).await.unwrap_err();
    assert!(matches!(err, EngineError::NotBulwark { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(&text).unwrap(),
        content,
        "the file must be left untouched"
    );

    // Our own database opens again, of course.
    let ours = dir.path().join("ours.db");
    SqliteStore::open(&ours).await.unwrap().close().await;
    SqliteStore::open(&ours).await.unwrap().close().await;
}

/// Run a sync that "crashes" after `calls` adapter calls; returns once it has hung.
async fn crash_midway(db: &std::path::Path, sink: Arc<MemoryPortal>, calls: u64) {
    let portal = Arc::new(CrashingPortal::new(sink, Some(calls), false));
    let app = Bulwark::open(db, registry_for(portal)).await.unwrap();
    let options = SyncOptions {
        limits: Default::default(),
        batch_size: 1,
        ..Default::default()
    };
    let r = tokio::time::timeout(
        Duration::from_millis(500),
        app.sync(&memory_endpoints(4), &options, None),
    )
    .await;
    assert!(r.is_err(), "the sync should have hung at the crash point");
}

#[tokio::test]
async fn corrupt_journal_rows_are_reported_and_refused_by_replay() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    seed_snapshot(&db, 5).await.unwrap();
    let sink = Arc::new(MemoryPortal::new());
    crash_midway(&db, sink.clone(), 12).await;

    // Corrupt two unfinished workflows: garbage JSON in one, a gap in the other.
    let (bad_json, gap) = {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let open: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT id, seq FROM workflows WHERE terminal = 0 AND seq >= 2 ORDER BY id",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        assert!(open.len() >= 2, "need two workflows mid-way, got {open:?}");
        let (a, b) = (open[0], open[1]);
        sqlx::query("UPDATE journal SET event_json = '{\"Uploaded\": {oops' WHERE workflow_id = ? AND seq = 1")
            .bind(a.0)
            .execute(&mut c)
            .await
            .unwrap();
        sqlx::query("DELETE FROM journal WHERE workflow_id = ? AND seq = 1")
            .bind(b.0)
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        (a.0, b.0)
    };

    // The audit names both, with the sequence number.
    let app = Bulwark::open(&db, registry_for(sink.clone()))
        .await
        .unwrap();
    let audit = app.audit().await.unwrap();
    let shown: Vec<String> = audit.findings.iter().map(ToString::to_string).collect();
    assert!(
        audit.findings.iter().any(|f| f.workflow == bad_json
            && f.seq == 1
            && f.problem.contains("event does not decode")),
        "{shown:?}"
    );
    assert!(
        audit
            .findings
            .iter()
            .any(|f| f.workflow == gap && f.problem.contains("gap")),
        "{shown:?}"
    );
    app.close().await;

    // Replay refuses exactly those two, by id; the others finish, each batch applied once.
    let app = Bulwark::open(&db, registry_for(sink.clone()))
        .await
        .unwrap();
    let options = SyncOptions {
        limits: Default::default(),
        batch_size: 1,
        ..Default::default()
    };
    let report = app
        .sync(&memory_endpoints(4), &options, None)
        .await
        .unwrap();
    let mut refused: Vec<i64> = report.refused.iter().map(|(id, _)| *id).collect();
    refused.sort();
    assert_eq!(
        refused,
        vec![bad_json.min(gap), bad_json.max(gap)],
        "{:?}",
        report.refused
    );
    for (id, why) in &report.refused {
        assert!(
            why.contains(&format!("workflow {id}")) && why.contains("corrupt journal"),
            "{why}"
        );
    }
    // The refused two are retired as Corrupt (terminal, alerted); the other two finish.
    assert_eq!(
        report.by_status.get("Corrupt").copied(),
        Some(2),
        "{report:?}"
    );
    assert_eq!(sink.duplicates(), 0);
    let store = app.store();
    let rows = bulwark_engine::Store::workflows(store.as_ref(), None, None)
        .await
        .unwrap();
    for id in [bad_json, gap] {
        let w = rows.iter().find(|w| w.id == id).unwrap();
        assert!(w.terminal && w.status == "Corrupt", "{w:?}");
    }
    let alerts = bulwark_engine::Store::alerts(store.as_ref(), 50)
        .await
        .unwrap();
    let corrupt: Vec<_> = alerts
        .iter()
        .filter(|a| a.kind == "workflow_corrupt")
        .collect();
    assert_eq!(corrupt.len(), 2, "{alerts:?}");
    for id in [bad_json, gap] {
        assert!(
            corrupt
                .iter()
                .any(|a| a.workflow == Some(id) && a.message.contains("corrupt journal")),
            "{corrupt:?}"
        );
    }
    // Their run finished, so the same call planned a new run: the two endpoints are
    // synced afresh (read back first: what the retired workflows sent may have landed).
    let plan = report.plan.as_ref().expect("a new run is planned");
    assert_eq!(plan.workflows, 2, "{plan:?}");
    assert_eq!(report.by_status.get("Done").copied(), Some(4), "{report:?}");
    assert_eq!(sink.duplicates(), 0, "nothing applied twice");
    let runs = bulwark_engine::Store::runs(store.as_ref()).await.unwrap();
    assert!(runs.iter().all(|r| r.status == "finished"), "{runs:?}");
    // The audit is clean, and still names the retired journals' problems, apart.
    let audit = app.audit().await.unwrap();
    assert!(audit.findings.is_empty(), "{:?}", audit.findings);
    assert_eq!(audit.retired_workflows, 2);
    assert!(
        audit.retired.iter().any(|f| f.workflow == bad_json),
        "{:?}",
        audit.retired
    );
    // And the next sync finds every endpoint up to date.
    let report = app
        .sync(&memory_endpoints(4), &options, None)
        .await
        .unwrap();
    assert_eq!(
        report.plan.as_ref().map(|p| p.workflows),
        Some(0),
        "{report:?}"
    );
}

/// A changed mapping invalidates what the endpoint confirmed: the next sync sends every
/// mapped item again (not a diff computed under the old mapping).
#[tokio::test]
async fn a_changed_mapping_forces_a_full_send() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    seed_snapshot(&db, 5).await.unwrap();
    let sink = Arc::new(MemoryPortal::new());
    let app = Bulwark::open(&db, registry_for(sink.clone()))
        .await
        .unwrap();
    let options = SyncOptions {
        limits: Default::default(),
        batch_size: 10,
        ..Default::default()
    };
    let mut eps = memory_endpoints(1);
    let first = app.sync(&eps, &options, None).await.unwrap();
    assert_eq!(first.uploads, 1);
    let again = app.sync(&eps, &options, None).await.unwrap();
    assert_eq!(again.uploads, 0, "nothing changed");
    eps[0]
        .settings
        .insert("mapping".into(), "{\"markup_bp\": 1000}".into());
    let remapped = app.sync(&eps, &options, None).await.unwrap();
    assert_eq!(
        remapped.plan.as_ref().map(|p| p.items),
        Some(5),
        "{remapped:?}"
    );
    assert_eq!(remapped.uploads, 1);
    let settled = app.sync(&eps, &options, None).await.unwrap();
    assert_eq!(
        settled.uploads, 0,
        "the new mapping is now what the endpoint confirmed"
    );
}

/// One corrupt workflow never stops the fleet: of 200 endpoint syncs interrupted midway,
/// one has an unreadable journal row; replay finishes the other 199, retires that one as
/// Corrupt, the run finishes, and a new run syncs its endpoint from what it last confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_row_in_one_of_200_workflows_stops_only_that_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    seed_snapshot(&db, 3).await.unwrap();
    let sink = Arc::new(MemoryPortal::new());
    let n = 200;
    {
        let portal = Arc::new(CrashingPortal::new(sink.clone(), Some(500), false));
        let app = Bulwark::open(&db, registry_for(portal)).await.unwrap();
        let options = SyncOptions {
            batch_size: 1,
            ..Default::default()
        };
        let r = tokio::time::timeout(
            Duration::from_millis(1_500),
            app.sync(&memory_endpoints(n), &options, None),
        )
        .await;
        assert!(r.is_err(), "the sync should have hung at the crash point");
    }
    let victim: (i64, String) = {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let victim: (i64, String) = sqlx::query_as(
            "SELECT id, subject FROM workflows WHERE terminal = 0 AND seq >= 2 ORDER BY id LIMIT 1",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE journal SET state_json = '{\"Uploading\": [' WHERE workflow_id = ? AND seq = 2",
        )
        .bind(victim.0)
        .execute(&mut c)
        .await
        .unwrap();
        c.close().await.unwrap();
        victim
    };
    let app = Bulwark::open(&db, registry_for(sink.clone()))
        .await
        .unwrap();
    let options = SyncOptions {
        batch_size: 1,
        ..Default::default()
    };
    let report = app
        .sync(&memory_endpoints(n), &options, None)
        .await
        .unwrap();
    assert_eq!(report.refused.len(), 1, "{:?}", report.refused);
    assert_eq!(report.refused[0].0, victim.0);
    assert_eq!(
        report.by_status.get("Corrupt").copied(),
        Some(1),
        "{report:?}"
    );
    // 199 endpoints finished in the resumed run (those that had finished before the crash
    // count from that run), and the new run synced the victim's endpoint.
    let plan = report.plan.as_ref().expect("a new run");
    assert_eq!(plan.workflows, 1, "only the victim's endpoint: {plan:?}");
    let rows = bulwark_engine::Store::workflows(app.store().as_ref(), plan.run, None)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].subject.as_str(), rows[0].status.as_str()),
        (victim.1.as_str(), "Done")
    );
    let input: serde_json::Value = serde_json::from_str(&rows[0].input_json).unwrap();
    assert_eq!(
        input["read_first"], true,
        "unsettled: read back before writing"
    );
    assert_eq!(sink.duplicates(), 0);
    let confirmed = app.staging().confirmed_with_mapping().await.unwrap();
    assert_eq!(
        confirmed.len(),
        n as usize,
        "every endpoint confirmed the snapshot"
    );
    let audit = app.audit().await.unwrap();
    assert!(audit.findings.is_empty(), "{:?}", audit.findings);
    assert_eq!(audit.retired_workflows, 1);
    app.close().await;
}

/// An operator retires a corrupt unfinished workflow with `bulwark audit --repair` (the
/// real binary): the audit fails before, the run finishes after, and the audit passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_repair_retires_a_corrupt_workflow_and_finishes_its_run() {
    use bulwark_tests::bulwark;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    seed_snapshot(&db, 3).await.unwrap();
    let sink = Arc::new(MemoryPortal::new());
    crash_midway(&db, sink.clone(), 10).await;
    let victim: i64 = {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let id: i64 = sqlx::query_scalar(
            "SELECT id FROM workflows WHERE terminal = 0 AND seq >= 1 ORDER BY id LIMIT 1",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        // Leases of the crashed process must not block the repair.
        sqlx::query("UPDATE workflows SET lease_until = 0")
            .execute(&mut c)
            .await
            .unwrap();
        sqlx::query("UPDATE journal SET event_json = 'garbage' WHERE workflow_id = ? AND seq = 1")
            .bind(id)
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        id
    };
    let out = bulwark().args(["audit", "--db"]).arg(&db).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("workflow {victim}")), "{text}");

    let out = bulwark()
        .args(["audit", "--repair", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("retired workflow {victim} as Corrupt")),
        "{text}"
    );
    assert!(text.contains("1 workflow(s) retired as Corrupt"), "{text}");
    assert!(text.contains(": 0 finding(s)"), "{text}");
    // Repairing again finds nothing more to do; the alert names the workflow.
    let again = bulwark_tests::run_ok(bulwark().args(["audit", "--repair", "--db"]).arg(&db));
    assert!(again.contains("nothing to repair"), "{again}");
    let alerts = bulwark_tests::run_ok(bulwark().args(["alerts", "--db"]).arg(&db));
    assert!(alerts.contains("workflow_corrupt"), "{alerts}");
    // The other unfinished workflows are still there for the next sync to resume.
    let app = Bulwark::open(&db, registry_for(sink.clone()))
        .await
        .unwrap();
    let options = SyncOptions {
        batch_size: 1,
        ..Default::default()
    };
    let report = app
        .sync(&memory_endpoints(4), &options, None)
        .await
        .unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert_eq!(sink.duplicates(), 0);
    let runs = bulwark_engine::Store::runs(app.store().as_ref())
        .await
        .unwrap();
    assert!(runs.iter().all(|r| r.status == "finished"), "{runs:?}");
    app.close().await;
}
