//! Item-level failure through the real binary: a portal refuses one SKU; `bulwark sync`
//! finishes every other item of the endpoint without tripping it, `bulwark quarantine`
//! and `bulwark status` show the SKU, and `bulwark retry` has the next sync carry it.

use bulwark_adapters::simulator::{self, Fault, SimConfig};
use bulwark_tests::{bulwark, run_code, run_ok, shown_qty};
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sku_is_quarantined_listed_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let src = dir.path().join("legacy.db");
    run_ok(
        bulwark()
            .args(["generate-legacy", "--skus", "60", "--path"])
            .arg(&src),
    );
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", src.display()))
        .await
        .unwrap();
    let skus: Vec<String> = sqlx::query_scalar("SELECT sku FROM products ORDER BY sku")
        .fetch_all(&mut c)
        .await
        .unwrap();
    drop(c);
    let bad = skus[17].clone();
    let sim = simulator::start(
        SimConfig {
            default_fault: Fault::RejectSkus {
                skus: vec![bad.clone()],
            },
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let portal = format!("http://{}", sim.addr());
    run_ok(
        bulwark()
            .args(["snapshot", "--legacy"])
            .arg(&src)
            .arg("--db")
            .arg(&db),
    );
    let sync = || {
        let mut c = bulwark();
        c.args([
            "sync",
            "--portal-url",
            &portal,
            "--endpoints",
            "2",
            "--batch-size",
            "25",
            "--db",
        ])
        .arg(&db);
        c
    };
    // Items quarantined by the run: finished with work undone, status 1.
    let out = run_code(&mut sync(), 1);
    assert!(out.contains("endpoints: 2 done, 0 tripped"), "{out}");
    assert!(
        out.contains("quarantined: 2 item(s) at 2 endpoint(s)"),
        "{out}"
    );
    for ep in ["ep-00001", "ep-00002"] {
        let base = sim.base_url(ep);
        assert_eq!(shown_qty(&base, &bad).await, None, "{ep}: never written");
        for sku in skus.iter().filter(|s| **s != bad) {
            assert!(shown_qty(&base, sku).await.is_some(), "{ep}: {sku} synced");
        }
    }
    let q: serde_json::Value = serde_json::from_str(&run_ok(
        bulwark().args(["quarantine", "--json", "--db"]).arg(&db),
    ))
    .unwrap();
    let rows = q.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{q}");
    assert!(rows.iter().all(|r| r["sku"] == bad.as_str()), "{q}");
    assert!(
        rows.iter().all(|r| r["reason"]
            .as_str()
            .unwrap()
            .contains("below the platform's minimum")),
        "{q}"
    );
    let table = run_ok(bulwark().args(["quarantine", "--db"]).arg(&db));
    assert!(
        table.contains(&bad) && table.contains("ep-00001"),
        "{table}"
    );
    let status = run_ok(bulwark().args(["status", "--db"]).arg(&db));
    assert!(status.contains("quarantined items: 2"), "{status}");
    let endpoints = run_ok(bulwark().args(["endpoints", "--db"]).arg(&db));
    assert!(endpoints.contains("1 quarantined"), "{endpoints}");
    let alerts = run_ok(bulwark().args(["alerts", "--db"]).arg(&db));
    assert!(alerts.contains("item_quarantined"), "{alerts}");
    // The dashboard lists them too.
    let web = bulwark_tests::free_port();
    let _serve = bulwark_tests::KillOnDrop(
        bulwark()
            .args(["serve", "--listen", &format!("127.0.0.1:{web}"), "--db"])
            .arg(&db)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    bulwark_tests::wait_for_port(web);
    let overview: serde_json::Value = bulwark_adapters::rest::RestAdapter::shared_client()
        .get(format!("http://127.0.0.1:{web}/api/overview"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(overview["quarantined"], 2, "{overview}");
    assert_eq!(overview["quarantine"][0]["sku"], bad.as_str(), "{overview}");
    let page = bulwark_adapters::rest::RestAdapter::shared_client()
        .get(format!("http://127.0.0.1:{web}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Quarantined items"));
    drop(_serve);
    let audit = run_ok(bulwark().args(["audit", "--db"]).arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");

    // Nothing changed: nothing to send, still quarantined.
    run_ok(&mut sync());
    let uploads = sim.stats().uploads_received;
    run_ok(&mut sync());
    assert_eq!(sim.stats().uploads_received, uploads);

    // The portal accepts it now; retry one endpoint's: only that endpoint sends it.
    sim.state().set_fault("ep-00001", Fault::Healthy);
    sim.state().set_fault("ep-00002", Fault::Healthy);
    let out = run_ok(
        bulwark()
            .args(["retry", "--endpoint", "ep-00001", "--db"])
            .arg(&db),
    );
    assert!(out.contains("1 quarantined item"), "{out}");
    run_ok(&mut sync());
    assert!(shown_qty(&sim.base_url("ep-00001"), &bad).await.is_some());
    assert_eq!(shown_qty(&sim.base_url("ep-00002"), &bad).await, None);
    let q: serde_json::Value = serde_json::from_str(&run_ok(
        bulwark().args(["quarantine", "--json", "--db"]).arg(&db),
    ))
    .unwrap();
    assert_eq!(q.as_array().unwrap().len(), 1, "{q}");
    assert_eq!(q[0]["endpoint"], "ep-00002");
    sim.shutdown().await.unwrap();
}
