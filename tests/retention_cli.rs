//! Retention through the real binary: `bulwark prune` removes journals of old finished runs,
//! old alerts and staged snapshots nothing needs, and keeps what the system stands on —
//! the newest sync of every endpoint (a tripped one included), every snapshot an
//! endpoint's state is based on, the newest snapshot. What stays audits clean, and the
//! next sync still sends only the change.
//!
//! Age is made by moving the fixture's timestamps 40 days back in the database, as a
//! month of real operation would leave them.

use std::path::Path;

use bulwark_adapters::simulator::{self, Fault, SimConfig};
use bulwark_engine::Backend;
use bulwark_tests::{KillOnDrop, bulwark, run_code, run_ok};
use sqlx::sqlite::SqlitePoolOptions;

const DAY_MS: i64 = 86_400_000;

async fn pool(path: &Path) -> sqlx::SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

/// Run `sql` (with `$1` bound to `bind`) on Bulwark's database `db`, SQLite or PostgreSQL.
async fn exec(db: &str, sql: &'static str, bind: i64) {
    let backend = Backend::open(db).await.unwrap();
    match &backend {
        Backend::Sqlite(s) => sqlx::query(sql)
            .bind(bind)
            .execute(s.pool())
            .await
            .map(|_| ()),
        Backend::Postgres(p) => sqlx::query(sql)
            .bind(bind)
            .execute(p.pool())
            .await
            .map(|_| ()),
    }
    .unwrap();
    backend.close().await;
}

async fn count(db: &str, sql: &'static str) -> i64 {
    let backend = Backend::open(db).await.unwrap();
    let n = match &backend {
        Backend::Sqlite(s) => sqlx::query_scalar(sql).fetch_one(s.pool()).await,
        Backend::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p.pool()).await,
    }
    .unwrap();
    backend.close().await;
    n
}

/// Change the stock of the first `n` SKUs of the legacy database and snapshot it again.
async fn change_and_snapshot(legacy: &Path, db: &str, n: i64) -> String {
    let p = pool(legacy).await;
    sqlx::query("UPDATE products SET qty = qty + 1 WHERE sku IN (SELECT sku FROM products ORDER BY sku LIMIT $1)")
        .bind(n)
        .execute(&p)
        .await
        .unwrap();
    p.close().await;
    run_ok(
        bulwark()
            .args(["snapshot", "--legacy"])
            .arg(legacy)
            .arg("--db")
            .arg(db),
    )
}

fn prune(db: &str) -> serde_json::Value {
    let out = run_ok(bulwark().args(["prune", "--json", "--db"]).arg(db));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `bulwark sync` of the first `endpoints` simulated endpoints; on PostgreSQL the run is
/// enqueued and driven by the test's worker (`--wait`).
fn sync(db: &str, portal: &str, endpoints: u32, code: i32) -> String {
    let mut cmd = bulwark();
    cmd.args([
        "sync",
        "--batch-size",
        "10",
        "--portal-url",
        portal,
        "--endpoints",
    ])
    .arg(endpoints.to_string())
    .arg("--db")
    .arg(db);
    if db.starts_with("postgres") {
        cmd.arg("--wait");
    }
    run_code(&mut cmd, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_prune_removes_old_history_and_keeps_what_syncs_stand_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db").display().to_string();
    prune_removes_old_history_and_keeps_what_syncs_stand_on(dir.path(), &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_prune_removes_old_history_and_keeps_what_syncs_stand_on() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = bulwark_tests::pg_schema_url(&base, "prune_cli");
    prune_removes_old_history_and_keeps_what_syncs_stand_on(dir.path(), &db).await;
    if let Backend::Postgres(pg) = Backend::open(&db).await.unwrap() {
        pg.drop_schema().await.unwrap();
    }
}

async fn prune_removes_old_history_and_keeps_what_syncs_stand_on(dir: &Path, db: &str) {
    let db = db.to_string();
    let legacy = dir.join("legacy.db");
    bulwark_tests::legacy_snapshot(dir, 40, &db);
    let sim = simulator::start(
        SimConfig {
            profiles: [("ep-00003".to_string(), Fault::Reject)].into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let portal = format!("http://{}", sim.addr());
    let _worker = db.starts_with("postgres").then(|| {
        KillOnDrop(
            bulwark()
                .args([
                    "worker",
                    "--batch-size",
                    "10",
                    "--endpoints",
                    "3",
                    "--portal-url",
                    &portal,
                    "--db",
                    &db,
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    });
    // Run 1: three endpoints, ep-00003 refuses everything and trips (its only sync).
    let first = sync(&db, &portal, 3, 1);
    assert!(
        first.contains("2 done, 1 tripped") || first.contains("Done=2 Tripped=1"),
        "{first}"
    );
    // Two more snapshots and runs for the two healthy endpoints.
    change_and_snapshot(&legacy, &db, 5).await;
    sync(&db, &portal, 2, 0);
    change_and_snapshot(&legacy, &db, 7).await;
    let third = sync(&db, &portal, 2, 0);
    assert!(third.contains("2 endpoint(s) to sync"), "{third}");
    let alerts = count(&db, "SELECT COUNT(*) FROM alerts").await;
    assert!(alerts > 0, "the trip was alerted");

    // Nothing is old yet: a prune removes nothing.
    let none = prune(&db);
    for key in ["workflows", "journal_rows", "runs", "alerts", "snapshots"] {
        assert_eq!(none[key], 0, "{key}: {none}");
    }

    // A month and more later.
    for sql in [
        "UPDATE runs SET created_at = created_at - $1, finished_at = finished_at - $1",
        "UPDATE snapshots SET started_at = started_at - $1, sealed_at = sealed_at - $1",
        "UPDATE alerts SET at = at - $1",
    ] {
        exec(&db, sql, 40 * DAY_MS).await;
    }
    let endpoints_before = run_ok(bulwark().args(["endpoints", "--json", "--db"]).arg(&db));
    let journal_before = count(&db, "SELECT COUNT(*) FROM journal").await;
    let newest_journals = count(
        &db,
        "SELECT COUNT(*) FROM journal WHERE workflow_id IN
           (SELECT MAX(id) FROM workflows WHERE kind = 'endpoint_sync' GROUP BY subject)",
    )
    .await;

    let pruned = prune(&db);
    // Runs 1 and 2 of ep-00001/2 and the three snapshot workflows went (the snapshots
    // themselves are kept while needed); the newest workflow of each endpoint stayed.
    assert_eq!(pruned["workflows"], 7, "{pruned}");
    assert_eq!(
        pruned["journal_rows"],
        journal_before - newest_journals,
        "{pruned}"
    );
    assert_eq!(pruned["alerts"], alerts, "{pruned}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM workflows").await, 3);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM journal").await,
        newest_journals
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM alerts").await, 0);
    // Snapshot 2 is needed by nothing. Snapshot 1 is what tripped ep-00003 was sent (its
    // next sync reads back against it) and the newest is what both healthy endpoints
    // stand on: they stay with their items.
    assert_eq!(pruned["snapshots"], 1, "{pruned}");
    assert_eq!(pruned["snapshot_items"], 40, "{pruned}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM snapshot_items").await, 80);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM snapshots WHERE id = 2").await,
        0
    );
    // Every run that still has a workflow stays, and the newest.
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM runs r WHERE NOT EXISTS (SELECT 1 FROM workflows w WHERE w.run_id = r.id)").await,
        0
    );
    // Every endpoint shows the state it showed, the tripped one too.
    let endpoints_after = run_ok(bulwark().args(["endpoints", "--json", "--db"]).arg(&db));
    assert_eq!(endpoints_after, endpoints_before);
    let tripped = run_ok(bulwark().args(["endpoints", "--tripped", "--db"]).arg(&db));
    assert!(tripped.contains("ep-00003"), "{tripped}");
    // What stays audits clean.
    let audit = run_ok(bulwark().args(["audit", "--db"]).arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");
    // Pruning again finds nothing more.
    let again = prune(&db);
    assert_eq!(again["workflows"], 0, "{again}");
    assert_eq!(again["snapshots"], 0, "{again}");

    // The next sync diffs against the kept base: it sends the 3 changed SKUs, not all 40.
    change_and_snapshot(&legacy, &db, 3).await;
    let next = sync(&db, &portal, 2, 0);
    assert!(next.contains("2 endpoint(s) to sync"), "{next}");
    // 3 items per endpoint: one batch each (all 40 would be 4 each).
    assert!(next.contains("2 batches"), "{next}");
    if !db.starts_with("postgres") {
        assert!(next.contains("6 items planned"), "{next}");
    }

    // Retention 0 keeps a kind forever; the flags override the defaults.
    exec(
        &db,
        "UPDATE runs SET finished_at = finished_at - $1",
        40 * DAY_MS,
    )
    .await;
    let kept = run_ok(
        bulwark()
            .args(["prune", "--json", "--journal-days", "0", "--db"])
            .arg(&db),
    );
    let kept: serde_json::Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(kept["workflows"], 0, "{kept}");
    let later = run_ok(
        bulwark()
            .args(["prune", "--json", "--journal-days", "10", "--db"])
            .arg(&db),
    );
    let later: serde_json::Value = serde_json::from_str(&later).unwrap();
    assert_eq!(later["workflows"], 3, "{later}");
    assert!(run_ok(bulwark().args(["audit", "--db"]).arg(&db)).contains(": 0 finding(s)"));
    sim.shutdown().await.unwrap();
}

/// Pruning a database that does not exist is an error naming it, and creates nothing.
#[test]
fn prune_never_creates_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("b.db");
    let out = bulwark()
        .args(["prune", "--db"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database at"));
    assert!(!missing.exists());
}
