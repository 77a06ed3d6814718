//! `bulwark pause` / `bulwark resume` through the real binary: a platform in maintenance
//! (answering 503 with `Retry-After`) is paused while its sync runs; the sync stops before
//! its next request and waits untouched — no retry used, no failure counted, no circuit
//! opened — while the other endpoints finish; nothing reaches the paused endpoint until it
//! is resumed, and then its sync goes on where it stopped. A pause placed before a run
//! leaves the endpoint out of that run (and out of reconcile read-backs) until resumed.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bulwark_adapters::simulator::{self, Fault, SimConfig};
use bulwark_tests::{bulwark, legacy_snapshot, run_ok, shown_qty};
use serde_json::Value;
use sqlx::Connection;

const ENDPOINTS: usize = 4;
const SKUS: u32 = 60;

async fn query<T>(db: &std::path::Path, sql: &str) -> T
where
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut c)
        .await
        .unwrap()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_endpoint_waits_untouched_and_goes_on_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let legacy = dir.path().join("legacy.db");
    legacy_snapshot(dir.path(), SKUS, &db);
    let sim = simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let portal = format!("http://{}", sim.addr());
    let ep = |i: usize| format!("ep-{:05}", i + 1);
    let args = |c: &mut std::process::Command| {
        c.args(["--portal-url", &portal, "--endpoints"])
            .arg(ENDPOINTS.to_string())
            .args(["--batch-size", "20", "--db"])
            .arg(&db);
    };
    let cmd = |a: &[&str]| {
        let mut c = bulwark();
        c.args(a);
        args(&mut c);
        c
    };
    let db_cmd = |a: &[&str]| {
        let mut c = bulwark();
        c.args(a).arg("--db").arg(&db);
        c
    };

    // An id this database never heard of is refused (a typo must not pass as a pause).
    let out = db_cmd(&["pause", "ep-99999"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"ep-99999\" is unknown here"), "{err}");

    // ep-00002's platform is in maintenance: every request gets 503, Retry-After 1 s.
    sim.state().set_fault(
        &ep(1),
        Fault::Unavailable {
            retry_after: "1".into(),
            times: u32::MAX,
        },
    );
    let mut sync = cmd(&["sync"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while query::<i64>(
        &db,
        "SELECT count(*) FROM workflows WHERE subject = 'ep-00002'",
    )
    .await
        == 0
    {
        assert!(started.elapsed() < Duration::from_secs(20), "no sync began");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let out = run_ok(&mut db_cmd(&[
        "pause",
        &ep(1),
        "--reason",
        "platform maintenance until 06:00",
    ]));
    assert!(out.contains("paused ep-00002"), "{out}");

    // The sync stops it before its next request and ends; the others are done.
    let waited = Instant::now();
    let out = loop {
        if let Some(status) = sync.try_wait().unwrap() {
            let out = sync.wait_with_output().unwrap();
            assert!(status.success(), "{out:?}");
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the sync did not stop the paused endpoint"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        out.contains(&format!("endpoints: {} done, 0 tripped", ENDPOINTS - 1)),
        "{out}"
    );
    assert!(out.contains("1 sync(s) stopped to wait"), "{out}");
    assert!(out.contains("0 unfinished, 0 refused"), "{out}");

    // It waits exactly as it was: not finished, no lease, no failure counted, no circuit.
    let wf = "SELECT id FROM workflows WHERE subject = 'ep-00002'";
    let (terminal, owner): (i64, Option<String>) = {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query_as("SELECT terminal, lease_owner FROM workflows WHERE subject = 'ep-00002'")
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    assert_eq!((terminal, owner), (0, None));
    let state: String = query(
        &db,
        &format!(
            "SELECT j.state_json FROM journal j JOIN workflows w ON w.id = j.workflow_id AND j.seq = w.seq WHERE w.id = ({wf})"
        ),
    )
    .await;
    assert!(!state.contains("\"failures\":1"), "{state}");
    let rows: i64 = query(
        &db,
        &format!("SELECT count(*) FROM journal WHERE workflow_id = ({wf})"),
    )
    .await;
    assert_eq!(
        query::<i64>(&db, "SELECT count(*) FROM circuits WHERE state = 'open'").await,
        0
    );

    // While paused, nothing reaches it: not with time, not from another sync.
    let requests = sim.stats().requests;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = run_ok(&mut cmd(&["sync"]));
    assert!(out.contains("paused: 1 endpoint(s) left out"), "{out}");
    assert_eq!(
        sim.stats().requests,
        requests,
        "a paused endpoint was sent a request"
    );
    assert_eq!(
        query::<i64>(
            &db,
            &format!("SELECT count(*) FROM journal WHERE workflow_id = ({wf})")
        )
        .await,
        rows,
        "a paused endpoint's sync moved"
    );
    // A worker that exits when idle does: a run waiting only on a paused endpoint is no
    // work for it (and it sends the endpoint nothing).
    let mut worker = cmd(&["worker", "--exit-when-idle"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(30) {
            worker.kill().unwrap();
            panic!("the worker kept waiting on a paused endpoint");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(
        sim.stats().requests,
        requests,
        "the worker sent the paused endpoint something"
    );
    let dry = json(&run_ok(&mut cmd(&["sync", "--dry-run", "--json"])));
    assert_eq!(dry["dry_run"]["paused"], 1, "{dry}");

    // Status, its JSON and the alerts say so.
    let status = json(&run_ok(&mut db_cmd(&["status", "--json"])));
    assert_eq!(status["paused"][0]["subject"], ep(1).as_str(), "{status}");
    assert_eq!(
        status["paused"][0]["reason"], "platform maintenance until 06:00",
        "{status}"
    );
    let text = run_ok(&mut db_cmd(&["status"]));
    assert!(text.contains("paused: 1 endpoint(s)"), "{text}");
    assert!(text.contains("ep-00002 since"), "{text}");
    assert!(text.contains("platform maintenance until 06:00"), "{text}");

    // The platform is back; resumed, the sync goes on where it stopped and finishes.
    sim.state().set_fault(&ep(1), Fault::Healthy);
    let out = run_ok(&mut db_cmd(&["resume", &ep(1)]));
    assert!(out.contains("resumed ep-00002"), "{out}");
    let out = run_ok(&mut cmd(&["sync"]));
    assert!(out.contains("resumed and finished run(s)"), "{out}");
    assert_eq!(
        query::<String>(
            &db,
            "SELECT status FROM workflows WHERE subject = 'ep-00002'"
        )
        .await,
        "Done"
    );
    let rows_sku: (String, i64) = {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", legacy.display()))
            .await
            .unwrap();
        sqlx::query_as("SELECT sku, qty FROM products ORDER BY sku LIMIT 1")
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    assert_eq!(
        shown_qty(&sim.base_url(&ep(1)), &rows_sku.0).await,
        Some(rows_sku.1)
    );
    let alerts = json(&run_ok(&mut db_cmd(&["alerts", "--json"])));
    let kinds: Vec<&str> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["subject"] == ep(1).as_str())
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["hold_lifted", "hold"], "{alerts}");

    // A pause placed before a run: left out of it, and out of reconcile read-backs.
    let (sku, qty) = rows_sku;
    {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", legacy.display()))
            .await
            .unwrap();
        sqlx::query("UPDATE products SET qty = qty + 5 WHERE sku = ?")
            .bind(&sku)
            .execute(&mut c)
            .await
            .unwrap();
    }
    run_ok(
        bulwark()
            .args(["snapshot", "--legacy"])
            .arg(&legacy)
            .arg("--db")
            .arg(&db),
    );
    run_ok(&mut db_cmd(&[
        "pause",
        &ep(2),
        &ep(3),
        "--reason",
        "stock count",
    ]));
    let reconcile = json(&run_ok(&mut cmd(&["reconcile", "--dry-run", "--json"])));
    let skipped = reconcile["reconcile"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["endpoint"] == ep(2).as_str())
        .unwrap()["skipped"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(skipped.contains("paused"), "{reconcile}");
    let out = run_ok(&mut cmd(&["sync"]));
    assert!(out.contains("paused: 2 endpoint(s) left out"), "{out}");
    assert_eq!(shown_qty(&sim.base_url(&ep(0)), &sku).await, Some(qty + 5));
    assert_eq!(shown_qty(&sim.base_url(&ep(2)), &sku).await, Some(qty));
    let out = run_ok(&mut db_cmd(&["resume", "--all"]));
    assert!(
        out.contains("resumed ep-00003") && out.contains("resumed ep-00004"),
        "{out}"
    );
    run_ok(&mut cmd(&["sync"]));
    assert_eq!(shown_qty(&sim.base_url(&ep(2)), &sku).await, Some(qty + 5));
    assert_eq!(shown_qty(&sim.base_url(&ep(3)), &sku).await, Some(qty + 5));
    assert_eq!(
        query::<i64>(&db, "SELECT count(*) FROM circuits WHERE state = 'open'").await,
        0
    );
    sim.shutdown().await.unwrap();
}

/// A long-running worker honours a pause placed while it drives the endpoint, and takes
/// the endpoint's sync up again by itself once the pause is lifted (its own, older view of
/// the holds must not keep it stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_a_paused_endpoint_and_takes_it_up_after_resume() {
    use bulwark_workflows::adapter::EndpointConfig;
    use bulwark_workflows::app::Bulwark;
    use bulwark_workflows::sync::SyncOptions;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    legacy_snapshot(dir.path(), SKUS, &db);
    let sim = simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let portal = format!("http://{}", sim.addr());
    let ep = |i: usize| format!("ep-{:05}", i + 1);
    let endpoints: Vec<EndpointConfig> = (0..3)
        .map(|i| EndpointConfig {
            settings: [("base_url".to_string(), format!("{portal}/ep/{}", ep(i)))].into(),
            adapter: "rest".into(),
            id: ep(i),
            ..Default::default()
        })
        .collect();
    sim.state().set_fault(
        &ep(1),
        Fault::Unavailable {
            retry_after: "1".into(),
            times: u32::MAX,
        },
    );
    {
        let app = Bulwark::open(&db, bulwark_adapters::default_registry())
            .await
            .unwrap();
        let options = SyncOptions {
            batch_size: 20,
            ..SyncOptions::default()
        };
        let plan = app.enqueue(&endpoints, &options).await.unwrap().unwrap();
        assert_eq!(plan.workflows, 3);
        app.close().await;
    }
    let _worker = bulwark_tests::KillOnDrop(
        bulwark()
            .args([
                "worker",
                "--portal-url",
                &portal,
                "--endpoints",
                "3",
                "--db",
            ])
            .arg(&db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = |subject: String| {
        let db = db.clone();
        async move {
            query::<String>(
                &db,
                &format!("SELECT status FROM workflows WHERE subject = '{subject}'"),
            )
            .await
        }
    };
    // The healthy ones finish; ep-00002 keeps backing off.
    let t = Instant::now();
    while status(ep(0)).await != "Done" || status(ep(2)).await != "Done" {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the healthy endpoints did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run_ok(bulwark().args(["pause", &ep(1), "--db"]).arg(&db));
    // Within a Retry-After and a hold refresh, nothing more reaches it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let requests = sim.stats().requests;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sim.stats().requests,
        requests,
        "the paused endpoint got requests"
    );
    assert_ne!(status(ep(1)).await, "Tripped");
    // Back in service and resumed: the same worker takes it up and finishes it.
    sim.state().set_fault(&ep(1), Fault::Healthy);
    run_ok(bulwark().args(["resume", &ep(1), "--db"]).arg(&db));
    let t = Instant::now();
    while status(ep(1)).await != "Done" {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the worker did not take the resumed endpoint up: {}",
            status(ep(1)).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        query::<i64>(&db, "SELECT count(*) FROM circuits WHERE state = 'open'").await,
        0
    );
    sim.shutdown().await.unwrap();
}
