//! `bulwark sync --dry-run` and `bulwark reconcile --dry-run` through the real binary:
//! they print what the real command would send (counts, old → new values, the largest
//! changes), scoped by `--endpoint`/`--only`, and send nothing to the portal and journal
//! nothing; the real command then sends exactly what the dry run announced.

use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_tests::{bulwark, legacy_snapshot, run_ok, shown_qty};
use serde_json::Value;
use sqlx::Connection;

const ENDPOINTS: usize = 6;
const SKUS: usize = 120;

async fn count(db: &std::path::Path, sql: &str) -> i64 {
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

fn endpoint<'a>(plan: &'a Value, id: &str) -> &'a Value {
    plan["dry_run"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == id)
        .unwrap_or_else(|| panic!("{id} not in {plan}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_send_nothing_journal_nothing_and_announce_what_the_sync_then_sends() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let legacy = dir.path().join("legacy.db");
    legacy_snapshot(dir.path(), SKUS as u32, &db);
    let sim = simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let portal = format!("http://{}", sim.addr());
    let cmd = |args: &[&str]| {
        let mut c = bulwark();
        c.args(args)
            .args(["--portal-url", &portal, "--endpoints"])
            .arg(ENDPOINTS.to_string())
            .args(["--batch-size", "50", "--db"])
            .arg(&db);
        c
    };
    let ep = |i: usize| format!("ep-{:05}", i + 1);

    // First: nothing confirmed anywhere, a full send of every SKU to every endpoint.
    let runs0 = count(&db, "SELECT count(*) FROM runs").await;
    let journal0 = count(&db, "SELECT count(*) FROM journal").await;
    let plan = json(&run_ok(&mut cmd(&["sync", "--dry-run", "--json"])));
    let d = &plan["dry_run"];
    assert_eq!(d["send"], ENDPOINTS, "{plan}");
    assert_eq!(d["items"], ENDPOINTS * SKUS, "{plan}");
    assert_eq!(d["batches"], ENDPOINTS * 3, "{plan}");
    for i in 0..ENDPOINTS {
        let e = endpoint(&plan, &ep(i));
        assert_eq!(e["action"], "send");
        assert_eq!(e["base"], Value::Null);
        assert_eq!(e["new_items"], SKUS);
        assert_eq!(e["sample"].as_array().unwrap().len(), 5);
        assert_eq!(e["sample"][0]["old_qty"], Value::Null);
    }
    assert_eq!(sim.stats().requests, 0, "a dry run sent something");
    assert_eq!(count(&db, "SELECT count(*) FROM runs").await, runs0);
    assert_eq!(count(&db, "SELECT count(*) FROM journal").await, journal0);

    let out = run_ok(&mut cmd(&["sync"]));
    assert!(
        out.contains(&format!("endpoints: {ENDPOINTS} done")),
        "{out}"
    );

    // Change the source: three quantities (by different amounts) and one price.
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", legacy.display()))
        .await
        .unwrap();
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT sku, qty FROM products ORDER BY sku")
        .fetch_all(&mut c)
        .await
        .unwrap();
    let (a, b, p, q) = (&rows[3], &rows[40], &rows[77], &rows[100]);
    for (sku, new) in [(&a.0, a.1 + 10_000), (&b.0, b.1 + 7), (&q.0, 0)] {
        sqlx::query("UPDATE products SET qty = ? WHERE sku = ?")
            .bind(new)
            .bind(sku)
            .execute(&mut c)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE products SET price_1 = price_1 * 2 WHERE sku = ?")
        .bind(&p.0)
        .execute(&mut c)
        .await
        .unwrap();
    drop(c);
    run_ok(
        bulwark()
            .args(["snapshot", "--legacy"])
            .arg(&legacy)
            .arg("--db")
            .arg(&db),
    );
    let runs = count(&db, "SELECT count(*) FROM runs").await;
    // q may show 0 already: then it is no change.
    let changed = 3 + usize::from(q.1 != 0);

    // Scoped to one endpoint: only it, with the changed items and their old → new values.
    let requests = sim.stats().requests;
    let plan = json(&run_ok(&mut cmd(&[
        "sync",
        "--dry-run",
        "--json",
        "--endpoint",
        &ep(1),
    ])));
    let d = &plan["dry_run"];
    assert_eq!(d["endpoints"].as_array().unwrap().len(), 1, "{plan}");
    let e = endpoint(&plan, &ep(1));
    assert_eq!(e["items"], changed, "{e}");
    assert_eq!(e["new_items"], 0, "{e}");
    assert_eq!(e["qty_changes"], changed - 1, "{e}");
    assert_eq!(e["price_changes"], 1, "{e}");
    let top = &e["largest_qty"][0];
    assert_eq!(top["sku"], a.0.as_str(), "{e}");
    assert_eq!(top["old_qty"], a.1);
    assert_eq!(top["new_qty"], a.1 + 10_000);
    let price = &e["largest_price"][0];
    assert_eq!(price["sku"], p.0.as_str(), "{e}");
    let (old, new) = (
        price["old_tiers"][0][1].as_i64().unwrap(),
        price["new_tiers"][0][1].as_i64().unwrap(),
    );
    assert_eq!(new, old * 2, "{price}");
    assert!(e["base"].as_i64().is_some(), "{e}");

    // The text form names the same, and says nothing was sent.
    let text = run_ok(&mut cmd(&["sync", "--dry-run", "--endpoint", &ep(1)]));
    assert!(text.contains("nothing sent, nothing journaled"), "{text}");
    assert!(text.contains("1 endpoint(s) would be sent"), "{text}");
    assert!(
        text.contains(&format!("{} qty {} → {}", a.0, a.1, a.1 + 10_000)),
        "{text}"
    );
    assert!(text.contains("(+100.0 %)"), "{text}");
    let all = run_ok(&mut cmd(&["sync", "--dry-run", "--only", "ep-*"]));
    assert!(
        all.contains(&format!(
            "{ENDPOINTS} endpoint(s) would be sent {} item(s)",
            ENDPOINTS * changed
        )),
        "{all}"
    );
    assert_eq!(sim.stats().requests, requests, "a dry run sent something");
    assert_eq!(count(&db, "SELECT count(*) FROM runs").await, runs);

    // The sync sends exactly what was announced.
    let before = sim.stats();
    run_ok(&mut cmd(&["sync"]));
    let after = sim.stats();
    assert_eq!(
        after.batches_applied - before.batches_applied,
        ENDPOINTS as u64
    );
    assert_eq!(
        shown_qty(&sim.base_url(&ep(1)), &a.0).await,
        Some(a.1 + 10_000)
    );
    let plan = json(&run_ok(&mut cmd(&["sync", "--dry-run", "--json"])));
    assert_eq!(plan["dry_run"]["send"], 0, "{plan}");
    assert_eq!(plan["dry_run"]["up_to_date"], ENDPOINTS, "{plan}");

    // A hand edit at one endpoint: reconcile --dry-run reads it back, announces the repair,
    // records nothing and changes nothing at the portal.
    sim.state().edit_item(&ep(4), &p.0, Some(77_777)).await;
    let reconciles = count(&db, "SELECT count(*) FROM endpoint_reconcile").await;
    let plan = json(&run_ok(&mut cmd(&["reconcile", "--dry-run", "--json"])));
    let drift: Vec<&Value> = plan["reconcile"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !f["drifted"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(drift.len(), 1, "{plan}");
    assert_eq!(drift[0]["endpoint"], ep(4).as_str());
    let e = endpoint(&plan, &ep(4));
    assert_eq!(
        (e["action"].as_str(), e["repairs"].as_u64()),
        (Some("send"), Some(1)),
        "{e}"
    );
    assert_eq!(plan["dry_run"]["send"], 1, "{plan}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM endpoint_reconcile").await,
        reconciles
    );
    assert_eq!(count(&db, "SELECT count(*) FROM runs").await, runs + 1);
    assert_eq!(shown_qty(&sim.base_url(&ep(4)), &p.0).await, Some(77_777));
    assert_eq!(sim.stats().batches_applied, after.batches_applied);

    // The real reconcile repairs it.
    run_ok(&mut cmd(&["reconcile"]));
    assert_eq!(shown_qty(&sim.base_url(&ep(4)), &p.0).await, Some(p.1));
    sim.shutdown().await.unwrap();
}
