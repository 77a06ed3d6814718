//! Drift repair through the real binary: values changed by hand at the portal are found by
//! `bulwark reconcile` and sent again; a reconcile killed (SIGKILL) while its repairing run
//! sends is finished by `bulwark replay`, nothing applied twice, and the next reconcile
//! finds no drift.

use std::time::{Duration, Instant};

use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_tests::{KillOnDrop, bulwark, legacy_snapshot, run_ok, shown};
use sqlx::Connection;

const ENDPOINTS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_repairs_hand_edits_exactly_once_across_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    legacy_snapshot(dir.path(), 120, &db);
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let skus: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT sku FROM snapshot_items ORDER BY sku")
            .fetch_all(&mut c)
            .await
            .unwrap();
    drop(c);
    assert_eq!(skus.len(), 120);
    let sim = simulator::start(
        SimConfig {
            latency_ms: 40,
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let portal = format!("http://{}", sim.addr());
    let cmd = |verb: &str| {
        let mut c = bulwark();
        c.args([
            verb,
            "--portal-url",
            &portal,
            "--endpoints",
            &ENDPOINTS.to_string(),
            "--batch-size",
            "40",
            "--max-in-flight",
            "3",
            "--db",
        ])
        .arg(&db);
        c
    };
    let out = run_ok(&mut cmd("sync"));
    assert!(
        out.contains(&format!("endpoints: {ENDPOINTS} done")),
        "{out}"
    );
    let all: Vec<&str> = skus.iter().map(String::as_str).collect();
    let ep = |i: usize| format!("ep-{:05}", i + 1);
    let want = shown(&sim.base_url(&ep(0)), &all).await;
    assert_eq!(want.len(), 120);

    // Hand edits at every endpoint: one changed quantity each, one deleted product at some.
    let client = bulwark_adapters::rest::RestAdapter::shared_client();
    let admin = format!("{portal}/admin/items");
    for i in 0..ENDPOINTS {
        let sku = &skus[(i * 7) % skus.len()];
        let r = client
            .put(format!("{admin}/{}/{sku}", ep(i)))
            .json(&serde_json::json!({ "qty": 100_000 + i }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        if i % 3 == 0 {
            let r = client
                .delete(format!("{admin}/{}/{}", ep(i), skus[119 - i]))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
    }
    // A sync does not see hand edits.
    let out = run_ok(&mut cmd("sync"));
    assert!(out.contains("already up to date; nothing sent"), "{out}");

    // Reconcile, killed once its repairing run has started sending.
    let before = sim.stats().batches_applied;
    let mut child = KillOnDrop(cmd("reconcile").spawn().unwrap());
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(60) {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("reconcile finished ({status}) before it could be killed; make it slower");
        }
        if sim.stats().batches_applied >= before + 2 {
            child.0.kill().unwrap();
            child.0.wait().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(killed, "the repairing run never started");
    let applied_at_kill = sim.stats().batches_applied - before;
    assert!(
        (applied_at_kill as usize) < ENDPOINTS,
        "killed mid-run: {applied_at_kill} of {ENDPOINTS} repair batches applied"
    );

    // The journal has the repair: replay finishes it, re-sending nothing that landed.
    let out = run_ok(&mut cmd("replay"));
    assert!(out.contains("resumed and finished run(s)"), "{out}");
    let stats = sim.stats();
    assert_eq!(
        stats.batches_applied - before,
        ENDPOINTS as u64,
        "one repair batch per endpoint, each applied once: {stats:?}"
    );
    assert_eq!(stats.duplicates_applied, 0, "{stats:?}");
    for i in 0..ENDPOINTS {
        assert_eq!(shown(&sim.base_url(&ep(i)), &all).await, want, "{}", ep(i));
    }
    let audit = run_ok(bulwark().args(["audit", "--db"]).arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");

    // Nothing drifts now; the per-endpoint record shows the last reconcile.
    let out = run_ok(&mut cmd("reconcile"));
    assert!(
        out.contains(&format!(
            "reconcile: {} item(s) read back at {ENDPOINTS} endpoint(s), 0 drifted at 0 endpoint(s), 0 unread",
            120 * ENDPOINTS
        )),
        "{out}"
    );
    assert!(out.contains("already up to date; nothing sent"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&run_ok(cmd("reconcile").arg("--json"))).unwrap();
    let rows = json["reconcile"].as_array().unwrap();
    assert_eq!(rows.len(), ENDPOINTS, "{json}");
    assert!(rows.iter().all(|r| r["read"] == 120), "{json}");

    // One endpoint, by id: drift found, named, and repaired.
    let r = client
        .put(format!("{admin}/{}/{}", ep(5), skus[3]))
        .json(&serde_json::json!({ "qty": 7 }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let out = run_ok(cmd("reconcile").args(["--endpoint", &ep(5)]));
    assert!(
        out.contains("120 item(s) read back at 1 endpoint(s), 1 drifted at 1 endpoint(s)"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{}  snapshot", ep(5))) && out.contains(&skus[3]),
        "{out}"
    );
    assert!(out.contains("endpoints: 1 done"), "{out}");
    assert_eq!(shown(&sim.base_url(&ep(5)), &all).await, want);
    let err = bulwark()
        .args([
            "reconcile",
            "--portal-url",
            &portal,
            "--endpoint",
            "nope",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("\"nope\""),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    sim.shutdown().await.unwrap();
}

/// On PostgreSQL `bulwark reconcile` reads back and enqueues the repairing run; workers
/// send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_reconcile_enqueues_the_repair_for_workers() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let db = bulwark_tests::pg_schema_url(&base, "reconcile");
    let dir = tempfile::tempdir().unwrap();
    legacy_snapshot(dir.path(), 30, &db);
    let sim = simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let portal = format!("http://{}", sim.addr());
    let cmd = |verb: &str| {
        let mut c = bulwark();
        c.args([
            verb,
            "--portal-url",
            &portal,
            "--endpoints",
            "3",
            "--db",
            &db,
        ]);
        c
    };
    let out = run_ok(&mut cmd("sync"));
    assert!(out.contains("enqueued"), "{out}");
    run_ok(cmd("worker").arg("--exit-when-idle"));
    let base_url = sim.base_url("ep-00002");
    let before = sim.stats().batches_applied;
    assert_eq!(before, 3);
    // A SKU of the legacy source, edited by hand at one endpoint.
    let legacy = dir.path().join("legacy.db");
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", legacy.display()))
        .await
        .unwrap();
    let skus: Vec<String> = sqlx::query_scalar("SELECT sku FROM products ORDER BY sku")
        .fetch_all(&mut c)
        .await
        .unwrap();
    drop(c);
    let client = bulwark_adapters::rest::RestAdapter::shared_client();
    let mut all = shown(&base_url, &[skus[4].as_str()]).await;
    let (sku, qty) = all.pop_first().unwrap();
    let r = client
        .put(format!("{portal}/admin/items/ep-00002/{sku}"))
        .json(&serde_json::json!({ "qty": qty + 1000 }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let out = run_ok(&mut cmd("reconcile"));
    assert!(
        out.contains("1 drifted at 1 endpoint(s)") && out.contains(&sku),
        "{out}"
    );
    assert!(out.contains("1 drifted item(s) to send again"), "{out}");
    assert_eq!(
        sim.stats().batches_applied,
        before,
        "workers send it, not reconcile"
    );
    run_ok(cmd("worker").arg("--exit-when-idle"));
    assert_eq!(sim.stats().batches_applied, before + 1);
    assert_eq!(
        bulwark_tests::shown_qty(&base_url, &sku).await,
        Some(qty),
        "repaired"
    );
    sim.shutdown().await.unwrap();
}
