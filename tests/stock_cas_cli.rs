//! Compare-and-set stock (`stock_policy = "compare_and_set"`, issue: live-shop correctness)
//! through the real binary, against the API simulator's catalog shape
//! (`examples/profiles/catalog.toml`) with orders placed at the shops between syncs (the
//! ERP does not see them). Three shops share the same ERP data:
//!
//! - `cas`: compare_and_set, `on_conflict = "erp_minus_sold"` (the default): never shows
//!   more than the ERP quantity less what the shop sold since;
//! - `skip`: compare_and_set, `on_conflict = "skip_and_alert"`: a SKU sold since is left
//!   as the shop has it, quarantined and alerted;
//! - `abs`: absolute (the documented behaviour): the ERP quantity overwrites the sales.

use bulwark_adapters::sim_api::{self, ApiSimConfig, ApiSimHandle};
use bulwark_tests::{bulwark, run_code, run_ok};
use bulwark_workflows::adapter::AdapterRegistry;
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Item, PriceTier};

const KEY_VAR: &str = "BULWARK_TEST_CAS_KEY";
const SKUS: usize = 12;

fn item(i: usize, qty: i64, price: i64) -> Item {
    Item {
        sku: format!("K-{i:03}"),
        qty,
        tiers: vec![PriceTier {
            min_qty: 1,
            price_minor: price,
        }],
    }
}

async fn stage(db: &std::path::Path, items: &[Item]) {
    let app = Bulwark::open(db, AdapterRegistry::new()).await.unwrap();
    app.staging().import("test", items).await.unwrap();
    app.close().await;
}

fn qty(sim: &ApiSimHandle, ep: &str, sku: &str) -> i64 {
    sim.items(ep)
        .into_iter()
        .find(|i| i.sku == sku)
        .map(|i| i.qty)
        .unwrap()
}

async fn rows(db: &std::path::Path, sql: &str) -> Vec<(String, String, String)> {
    let url = format!("sqlite://{}", db.display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let rows: Vec<(String, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_never_shows_more_than_the_shop_has() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let key = format!("key-{}", uuid::Uuid::new_v4().simple());
    let sim = sim_api::start(
        ApiSimConfig {
            api_key: key.clone(),
            currency: "EUR".into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let mut erp: Vec<Item> = (0..SKUS).map(|i| item(i, 10, 1000 + i as i64)).collect();
    let skus: Vec<String> = erp.iter().map(|i| i.sku.clone()).collect();
    let shops = ["cas", "skip", "abs"];
    for ep in shops {
        sim.seed_catalog(ep, &skus);
    }
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/profiles/catalog.toml"
        ),
        dir.path().join("catalog.toml"),
    )
    .unwrap();
    let mut config = String::from(
        "database = \"bulwark.db\"\n[sync]\nbatch_size = 5\n[http]\nprofiles = \"catalog.toml\"\n",
    );
    for (ep, extra) in [
        ("cas", ", stock_policy = \"compare_and_set\""),
        (
            "skip",
            ", stock_policy = \"compare_and_set\", on_conflict = \"skip_and_alert\"",
        ),
        ("abs", ""),
    ] {
        config.push_str(&format!(
            "[[endpoint]]\nid = \"{ep}\"\nadapter = \"http\"\nsettings = {{ profile = \"catalog\", base_url = \"{}\", location_id = \"loc-1\", api_key_env = \"{KEY_VAR}\"{extra} }}\n",
            sim.catalog_base_url(ep)
        ));
    }
    let cfg = dir.path().join("bulwark.toml");
    std::fs::write(&cfg, &config).unwrap();
    let sync = || {
        let mut c = bulwark();
        c.arg("sync").arg("--config").arg(&cfg).env(KEY_VAR, &key);
        c
    };
    let sell = |ep: &str, sku: &str, n: i64| sim.order(ep, sku, n).unwrap();

    // 1. The first sync has nothing to compare with: every shop shows the ERP's 10.
    stage(&db, &erp).await;
    run_ok(&mut sync());
    for ep in shops {
        for sku in &skus {
            assert_eq!(qty(&sim, ep, sku), 10, "{ep} {sku}");
        }
    }

    // 2. Customers buy at every shop; the ERP does not see it. K-000 gets new stock in the
    // ERP (10 → 12), K-001 only a new price (its quantity is sent along, unchanged),
    // K-002 goes down (10 → 8) and was not sold.
    for ep in shops {
        sell(ep, "K-000", 3);
        sell(ep, "K-001", 2);
    }
    erp[0].qty = 12;
    erp[1].tiers[0].price_minor += 50;
    erp[2].qty = 8;
    stage(&db, &erp).await;
    // And the answer to the cas shop's first applied write (K-000's lowered one) is lost:
    // the retry must find it landed, not take its own write for a sale.
    sim.lose_next_writes("cas", 1);
    // The skip shop's K-000 is left alone and quarantined: status 1.
    let out = run_code(&mut sync(), 1);
    eprintln!("{out}");
    // compare_and_set, erp_minus_sold: 12 - 3 sold = 9; K-001 keeps what the shop has
    // (10 - 2 = 8, its ERP quantity did not move); K-002 as the ERP says.
    assert_eq!(qty(&sim, "cas", "K-000"), 9);
    assert_eq!(qty(&sim, "cas", "K-001"), 8);
    assert_eq!(qty(&sim, "cas", "K-002"), 8);
    assert_eq!(sim.stats().responses_lost, 1);
    // skip_and_alert: what was sold is left as the shop has it.
    assert_eq!(qty(&sim, "skip", "K-000"), 7);
    assert_eq!(qty(&sim, "skip", "K-001"), 8);
    assert_eq!(qty(&sim, "skip", "K-002"), 8);
    // absolute: the ERP overwrites the sales (the shop shows 3 and 2 it does not have).
    assert_eq!(qty(&sim, "abs", "K-000"), 12);
    assert_eq!(qty(&sim, "abs", "K-001"), 10);
    assert_eq!(qty(&sim, "abs", "K-002"), 8);
    // Prices went everywhere, also with the stock left alone.
    for ep in shops {
        let k1 = sim
            .items(ep)
            .into_iter()
            .find(|i| i.sku == "K-001")
            .unwrap();
        assert_eq!(k1.tiers[0].price_minor, 1051, "{ep}");
    }
    let quarantined = rows(
        &db,
        "SELECT endpoint_id, sku, reason FROM endpoint_quarantine ORDER BY endpoint_id, sku",
    )
    .await;
    assert_eq!(
        quarantined
            .iter()
            .map(|(e, s, _)| (e.as_str(), s.as_str()))
            .collect::<Vec<_>>(),
        vec![("skip", "K-000"), ("skip", "K-001")],
        "{quarantined:?}"
    );
    assert!(
        quarantined[0].2.contains("not overwritten") && quarantined[0].2.contains("shows 7"),
        "{quarantined:?}"
    );
    let alerts = run_ok(bulwark().arg("alerts").arg("--db").arg(&db));
    assert!(alerts.contains("stock_not_overwritten skip"), "{alerts}");
    // The lowered writes are recorded (what the shop showed after, and for what).
    let shown = rows(
        &db,
        "SELECT endpoint_id, sku, compare || '/' || basis FROM endpoint_stock_shown ORDER BY endpoint_id, sku",
    )
    .await;
    assert_eq!(
        shown,
        vec![
            ("cas".into(), "K-000".into(), "9/12".into()),
            ("cas".into(), "K-001".into(), "8/10".into()),
        ]
    );

    // 3. Nothing changed: nothing is sent.
    let before = sim.stats().writes_applied;
    run_ok(&mut sync());
    assert_eq!(
        sim.stats().writes_applied,
        before,
        "an unchanged snapshot sends nothing"
    );

    // 4. One more sale of K-000 at the cas shop, then its price changes in the ERP (its
    // quantity stays 12): the 3 already taken off are not taken off again, only the new
    // sale (9 - 1 = 8, not 12 - 4). K-001's ERP quantity drops to 6 (the ERP now counts
    // its sales): written as it is, and its record goes.
    sell("cas", "K-000", 1);
    erp[0].tiers[0].price_minor += 10;
    erp[1].qty = 6;
    stage(&db, &erp).await;
    // The skip shop's K-000 changed in the ERP and is left alone again: status 1.
    run_code(&mut sync(), 1);
    assert_eq!(qty(&sim, "cas", "K-000"), 8);
    assert_eq!(qty(&sim, "cas", "K-001"), 6);
    let shown = rows(
        &db,
        "SELECT endpoint_id, sku, compare || '/' || basis FROM endpoint_stock_shown ORDER BY endpoint_id, sku",
    )
    .await;
    assert_eq!(shown, vec![("cas".into(), "K-000".into(), "8/12".into())]);

    // 5. A reconcile does not count the sales of a compare-and-set shop as drift; it
    // does at the absolute one.
    sell("cas", "K-005", 4);
    sell("abs", "K-005", 4);
    let out = run_ok(
        bulwark()
            .arg("reconcile")
            .arg("--config")
            .arg(&cfg)
            .arg("--dry-run")
            .arg("--json")
            .env(KEY_VAR, &key),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let text = v.to_string();
    eprintln!("{text}");
    let drift_of = |ep: &str| -> Vec<String> {
        let eps = v
            .get("reconcile")
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default();
        eps.iter()
            .find(|e| e["endpoint"] == ep)
            .and_then(|e| e["drifted"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|d| d["sku"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(drift_of("abs").contains(&"K-005".to_owned()), "{text}");
    assert!(!drift_of("cas").contains(&"K-005".to_owned()), "{text}");

    let audit = run_ok(bulwark().arg("audit").arg("--db").arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");
}

/// `bulwark check --config cfg`, which must fail: what it printed.
fn check_fails(cfg: &std::path::Path) -> String {
    let out = bulwark()
        .arg("check")
        .arg("--config")
        .arg(cfg)
        .env(KEY_VAR, "k")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    text
}

#[test]
fn compare_and_set_on_an_adapter_that_cannot_is_refused_naming_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let profiles = dir.path().join("catalog.toml");
    let catalog = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/profiles/catalog.toml"
    ))
    .unwrap();
    // The same profile without its conflict table.
    let cut = catalog.rfind("[profiles.catalog.conflict]").unwrap();
    std::fs::write(&profiles, &catalog[..cut]).unwrap();
    let cfg = dir.path().join("bulwark.toml");
    std::fs::write(
        &cfg,
        format!(
            "database = \"bulwark.db\"\n[http]\nprofiles = \"catalog.toml\"\n[[endpoint]]\nid = \"shop-x\"\nadapter = \"http\"\nsettings = {{ profile = \"catalog\", base_url = \"http://127.0.0.1:9\", location_id = \"loc-1\", api_key_env = \"{KEY_VAR}\", stock_policy = \"compare_and_set\" }}\n"
        ),
    )
    .unwrap();
    let text = check_fails(&cfg);
    assert!(
        text.contains("shop-x") && text.contains("no `conflict` table"),
        "{text}"
    );
    // A typo in the policy is named too.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("compare_and_set", "compare-and-set"),
    )
    .unwrap();
    let text = check_fails(&cfg);
    assert!(
        text.contains("shop-x") && text.contains("stock_policy"),
        "{text}"
    );
}
