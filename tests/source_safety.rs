//! Source-data safety through the real binary: a rejected legacy row keeps its SKU's last
//! accepted value at the endpoint (never stock 0), and a snapshot that removes too much is
//! held until `bulwark snapshot approve`.

use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_tests::{bulwark, run_ok, shown_qty};
use sqlx::Connection;

async fn legacy(path: &std::path::Path, sql: &str) {
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut c)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_carry_forward_and_mass_removal_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let src = dir.path().join("legacy.db");
    let sim = simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let portal = format!("http://{}", sim.addr());
    let base = sim.base_url("ep-00001");
    run_ok(
        bulwark()
            .args(["generate-legacy", "--skus", "100", "--path"])
            .arg(&src),
    );
    let snapshot = || {
        let mut c = bulwark();
        c.args(["snapshot", "--legacy"])
            .arg(&src)
            .arg("--db")
            .arg(&db);
        c
    };
    // Two endpoints, synced alike until the end, where they take different on_removed.
    let base2 = sim.base_url("ep-00002");
    let sync_n = |n: &str| {
        let mut c = bulwark();
        c.args(["sync", "--portal-url", &portal, "--endpoints", n, "--db"])
            .arg(&db);
        c
    };
    let sync = || sync_n("2");
    run_ok(&mut snapshot());
    run_ok(&mut sync());
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", src.display()))
        .await
        .unwrap();
    let skus: Vec<String> = sqlx::query_scalar("SELECT sku FROM products ORDER BY sku")
        .fetch_all(&mut c)
        .await
        .unwrap();
    drop(c);
    let bad = skus[0].clone();
    let before = shown_qty(&base, &bad).await.expect("the SKU was synced");

    // A rejected row (stock -1): carried forward, alerted, nothing written for it.
    legacy(
        &src,
        &format!("UPDATE products SET qty = -1 WHERE sku = '{bad}'"),
    )
    .await;
    let out = run_ok(&mut snapshot());
    assert!(out.contains("1 rejected row(s) keep"), "{out}");
    let applied = sim.stats().batches_applied;
    run_ok(&mut sync());
    assert_eq!(
        shown_qty(&base, &bad).await,
        Some(before),
        "the endpoint keeps its value"
    );
    assert_eq!(sim.stats().batches_applied, applied, "nothing to send");
    let alerts = run_ok(bulwark().args(["alerts", "--json", "--db"]).arg(&db));
    assert!(
        alerts.contains("rejected_rows_carried") && alerts.contains(&bad),
        "{alerts}"
    );

    // 20 of 100 SKUs vanish: held, nothing synced; approved, it syncs.
    let gone = skus[50].clone();
    let gone_qty = shown_qty(&base, &gone).await.expect("synced");
    legacy(
        &src,
        &format!(
            "DELETE FROM products WHERE sku >= '{gone}' AND sku <= '{}'",
            skus[69]
        ),
    )
    .await;
    let out = run_ok(&mut snapshot());
    assert!(
        out.contains("HELD") && out.contains("max_removed_share"),
        "{out}"
    );
    let id: String = out
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    run_ok(&mut sync());
    assert_eq!(
        shown_qty(&base, &gone).await,
        Some(gone_qty),
        "a held snapshot changes nothing"
    );
    assert_eq!(
        sim.stats().batches_applied,
        applied,
        "a held snapshot syncs nothing"
    );
    let alerts = run_ok(bulwark().args(["alerts", "--json", "--db"]).arg(&db));
    assert!(alerts.contains("snapshot_held"), "{alerts}");
    let out = run_ok(
        bulwark()
            .args(["snapshot", "approve", &id, "--db"])
            .arg(&db),
    );
    assert!(out.contains("approved"), "{out}");
    let again = bulwark()
        .args(["snapshot", "approve", &id, "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!again.status.success(), "approving twice is refused");
    // Under the default on_removed = leave, the approved removal sends nothing: the shop
    // keeps the vanished SKUs.
    run_ok(&mut sync_n("1"));
    assert_eq!(
        shown_qty(&base, &gone).await,
        Some(gone_qty),
        "leave keeps it"
    );
    assert_eq!(
        sim.stats().batches_applied,
        applied,
        "nothing to send under leave"
    );
    // Under zero_stock, the vanished SKUs are sent with stock 0: to both endpoints, since
    // a leave sync with nothing to send confirms nothing new (the policy applies to what
    // vanished since an endpoint last confirmed).
    run_ok(sync_n("2").args(["--on-removed", "zero_stock"]));
    assert!(
        sim.stats().batches_applied > applied,
        "the approved snapshot syncs under zero_stock"
    );
    assert_eq!(shown_qty(&base2, &gone).await, Some(0));
    assert_eq!(shown_qty(&base, &gone).await, Some(0));
    sim.shutdown().await.unwrap();
}
