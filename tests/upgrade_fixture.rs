//! Safe upgrades of in-flight work, through the real binary. The fixture
//! (`tests/fixtures/v1_inflight`, recorded by its `record.sh`) is a database left by a
//! sync killed mid-run by the last release without encoding versions: its schema stops at
//! migration 0011 and its endpoint syncs are in flight, journaled in encoding version 1.
//! This build migrates it, folds those journals and resumes each sync where it stopped —
//! the batches it had verified are not sent again — and the audit is clean. A workflow
//! stamped with an encoding version this build does not read is left untouched for a
//! worker of that version, never retired as corrupt.

use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_tests::{bulwark, run_ok};
use sqlx::Connection;

const BATCHES: i64 = 8; // 200 SKUs in batches of 25

async fn restore(db: &std::path::Path) {
    let dump = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/v1_inflight/bulwark.sql"
    ))
    .unwrap();
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(dump))
        .execute(&mut c)
        .await
        .unwrap();
}

async fn rows(db: &std::path::Path, sql: &str) -> Vec<(String, String)> {
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut c)
        .await
        .unwrap()
}

/// `(subject, current state JSON)` of every endpoint sync.
async fn states(db: &std::path::Path) -> Vec<(String, String)> {
    rows(
        db,
        "SELECT w.subject, j.state_json FROM workflows w
         JOIN journal j ON j.workflow_id = w.id AND j.seq = w.seq
         WHERE w.kind = 'endpoint_sync' ORDER BY w.subject",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_syncs_of_the_previous_release_resume_with_this_build() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    restore(&db).await;
    // In flight, as recorded: every endpoint somewhere inside its batches.
    let before = states(&db).await;
    assert_eq!(before.len(), 4, "{before:?}");
    let mut remaining = 0;
    for (subject, state) in &before {
        let v: serde_json::Value = serde_json::from_str(state).unwrap();
        let (name, fields) = v.as_object().unwrap().iter().next().unwrap();
        assert!(
            ["Uploading", "Verifying", "Backoff"].contains(&name.as_str()),
            "{subject}: {state}"
        );
        let batch = fields["batch"].as_i64().unwrap();
        assert!(batch > 0, "{subject} had verified no batch: {state}");
        remaining += BATCHES - batch;
    }

    let sim = simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let portal = format!("http://{}", sim.addr());
    let sync = |extra: &[&str]| {
        let mut c = bulwark();
        c.args([
            "sync",
            "--portal-url",
            &portal,
            "--endpoints",
            "4",
            "--batch-size",
            "25",
        ])
        .args(extra)
        .arg("--db")
        .arg(&db);
        c
    };

    // A workflow of an encoding this build does not read (a newer release's, here) is
    // left exactly as it is, for a worker of that version.
    // The upgrade step (every command that can write does it too).
    let out = run_ok(bulwark().args(["migrate", "--db"]).arg(&db));
    assert!(out.contains("is current: version 14"), "{out}");
    {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        // What the previous release created is version 1.
        let v: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT version FROM workflows")
            .fetch_all(&mut c)
            .await
            .unwrap();
        assert_eq!(v, [1]);
        sqlx::query("UPDATE workflows SET version = 99 WHERE subject = 'ep-00004'")
            .execute(&mut c)
            .await
            .unwrap();
    }
    let out = sync(&[]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 left untouched for another worker"),
        "{text}"
    );
    assert!(
        text.contains("written by a newer Bulwark (its endpoint_sync encoding is version 99; this build writes version 1)"),
        "{text}"
    );
    assert!(text.contains("endpoints: 3 done"), "{text}");
    let after = states(&db).await;
    assert_eq!(after[3], before[3], "the newer workflow was touched");
    let retired = rows(
        &db,
        "SELECT subject, status FROM workflows WHERE status = 'Corrupt'",
    )
    .await;
    assert!(retired.is_empty(), "{retired:?}");

    // Stamped back to the version this build reads, it resumes too.
    {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query("UPDATE workflows SET version = 1 WHERE subject = 'ep-00004'")
            .execute(&mut c)
            .await
            .unwrap();
    }
    let out = run_ok(&mut sync(&[]));
    assert!(out.contains("resumed and finished run(s)"), "{out}");
    let done = rows(
        &db,
        "SELECT subject, status FROM workflows WHERE kind = 'endpoint_sync' ORDER BY subject",
    )
    .await;
    assert!(done.iter().all(|(_, s)| s == "Done"), "{done:?}");
    // Each resumed where it stopped: only the batches not yet verified were sent (the
    // portal here is a fresh one, so each of those lands once and nothing earlier does).
    let stats = sim.stats();
    assert_eq!(stats.batches_applied as i64, remaining, "{stats:?}");
    assert_eq!(stats.duplicates_applied, 0);
    let audit = run_ok(bulwark().args(["audit", "--db"]).arg(&db));
    assert!(audit.contains("0 finding"), "{audit}");
    sim.shutdown().await.unwrap();
}
