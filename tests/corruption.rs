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
    assert_eq!(
        report.by_status.get("Done").copied().unwrap_or(0),
        2,
        "{report:?}"
    );
    assert_eq!(sink.duplicates(), 0);
    // The refused workflows are left as they were (not half-applied, not marked done), and
    // the run stays open so nothing new is planned over them.
    let store = app.store();
    let rows = bulwark_engine::Store::workflows(store.as_ref(), None, None)
        .await
        .unwrap();
    for id in [bad_json, gap] {
        assert!(!rows.iter().find(|w| w.id == id).unwrap().terminal);
    }
    assert!(
        report.plan.is_none(),
        "no new run may start while workflows are refused"
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
