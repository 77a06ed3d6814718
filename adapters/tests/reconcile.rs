//! Drift repair: values changed by hand in a shop (or lost by it) are found by reading the
//! endpoint back (`Bulwark::reconcile`) and sent again, only where they differ, through the
//! ordinary journaled sync. Real HTTP against the simulators, real SQLite.

mod http_common;

use std::collections::HashMap;
use std::sync::Arc;

use bulwark_adapters::http::MemoryIdCache;
use bulwark_adapters::sim_api::ApiSimHandle;
use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_workflows::adapter::EndpointConfig;
use bulwark_workflows::app::{Bulwark, SyncReport};
use bulwark_workflows::catalog::Item;
use bulwark_workflows::reconcile::EndpointDrift;
use http_common::*;

fn shown(sim: &ApiSimHandle, endpoint: &str) -> Vec<Item> {
    normalized(sim.items(endpoint))
}

fn found<'a>(report: &'a SyncReport, endpoint: &str) -> &'a EndpointDrift {
    report
        .reconcile
        .as_ref()
        .expect("a reconcile report")
        .iter()
        .find(|f| f.endpoint == endpoint)
        .unwrap_or_else(|| panic!("{endpoint} in {report:?}"))
}

fn drifted_skus(f: &EndpointDrift) -> Vec<&str> {
    let mut v: Vec<&str> = f.drifted.iter().map(|d| d.sku.as_str()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_are_found_by_reading_back_and_only_they_are_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(12, 0);
    seed(&db, &want).await;
    let eps = vec![
        endpoint(
            "shop-1",
            "rest_items",
            sim.rest_base_url("shop-1"),
            REST_CREDS,
        ),
        endpoint("gq-1", "gql", sim.graphql_url("gq-1"), GQL_CREDS),
    ];
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    let opts = options(5);
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 2, "{report:?}");
    assert_eq!(shown(&sim, "shop-1"), normalized(want.clone()));

    // Someone edits the shops by hand.
    assert!(sim.edit_item("shop-1", &want[2].sku, 999));
    assert!(sim.edit_item("shop-1", &want[9].sku, 0));
    assert!(sim.edit_item("gq-1", &want[4].sku, 7));
    // A sync does not see it: the snapshot did not change.
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(report.uploads, 0, "{report:?}");
    assert_eq!(sim.stats().writes_applied, 24);

    let reads_before = sim.stats().reads;
    let report = app.reconcile(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 2, "{report:?}");
    let shop = found(&report, "shop-1");
    assert_eq!(shop.read, 12, "{shop:?}");
    assert_eq!(shop.unread, 0);
    assert_eq!(shop.skipped, None);
    assert_eq!(drifted_skus(shop), vec![&want[2].sku, &want[9].sku]);
    let first = &shop.drifted[0];
    assert!(
        first.detail.contains("qty expected 3") && first.detail.contains("999"),
        "{first:?}"
    );
    assert_eq!(drifted_skus(found(&report, "gq-1")), vec![&want[4].sku]);
    assert!(
        sim.stats().reads >= reads_before + 24,
        "every item was read"
    );
    // Exactly the drifted items were written again, once each.
    assert_eq!(sim.stats().writes_applied, 27, "{:?}", sim.stats());
    for (ep, item) in [("shop-1", 2), ("shop-1", 9), ("gq-1", 4)] {
        assert_eq!(sim.writes_for(ep, &want[item].sku), 2, "{ep} {item}");
    }
    assert_eq!(sim.writes_for("shop-1", &want[3].sku), 1);
    assert_eq!(shown(&sim, "shop-1"), normalized(want.clone()));
    assert_eq!(shown(&sim, "gq-1"), normalized(want.clone()));
    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.repairs, 3, "{plan:?}");
    assert_clean_audit(&app).await;

    // The drift is recorded per endpoint, with the run that repaired it.
    let rows = app.staging().reconciles().await.unwrap();
    let row = rows.iter().find(|r| r.endpoint == "shop-1").unwrap();
    assert_eq!((row.read, row.drifted, row.unread), (12, 2, 0));
    assert_eq!(row.run, plan.run);
    assert!(row.detail.contains(&want[2].sku), "{row:?}");

    // Nothing drifted now: a reconcile reads, finds nothing, sends nothing.
    let report = app.reconcile(&eps, &opts, None).await.unwrap();
    assert!(
        report
            .reconcile
            .as_ref()
            .unwrap()
            .iter()
            .all(|f| f.drifted.is_empty() && f.read == 12),
        "{report:?}"
    );
    assert_eq!(report.plan.as_ref().unwrap().run, None);
    assert_eq!(report.uploads, 0);
    assert_eq!(sim.stats().writes_applied, 27);
    let rows = app.staging().reconciles().await.unwrap();
    assert!(
        rows.iter().all(|r| r.drifted == 0 && r.run.is_none()),
        "{rows:?}"
    );

    // Drift and a new snapshot at once: one run sends the diff and the repair, and the
    // drift is measured against what the endpoint had confirmed.
    assert!(sim.edit_item("shop-1", &want[0].sku, 55));
    let mut changed = want.clone();
    changed[5].qty += 10;
    changed[0].qty += 10;
    seed(&db, &changed).await;
    let report = app.reconcile(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 2, "{report:?}");
    assert_eq!(drifted_skus(found(&report, "shop-1")), vec![&want[0].sku]);
    assert!(found(&report, "gq-1").drifted.is_empty());
    assert_eq!(shown(&sim, "shop-1"), normalized(changed.clone()));
    assert_eq!(shown(&sim, "gq-1"), normalized(changed.clone()));
    assert_eq!(
        sim.writes_for("shop-1", &want[0].sku),
        2,
        "sent once, at the new value"
    );
    assert_clean_audit(&app).await;
    app.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_items_are_not_drift_and_unreadable_ones_are_never_assumed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(30, 0);
    seed(&db, &want).await;
    let bad = want[6].sku.clone();
    sim.refuse_skus("shop-f", &[&bad]);
    let eps = vec![endpoint(
        "shop-f",
        "rest_items",
        sim.rest_base_url("shop-f"),
        REST_CREDS,
    )];
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    let opts = options(10);
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(app.quarantine().await.unwrap().len(), 1);

    // Hand edits, then a platform that fails 30 % of requests (half of them after doing
    // the work, without an answer).
    for i in [1, 12, 25] {
        assert!(sim.edit_item("shop-f", &want[i].sku, 1_000 + i as i64));
    }
    sim.fail_requests("shop-f", 0.3);
    let report = app.reconcile(&eps, &opts, None).await.unwrap();
    let f = found(&report, "shop-f");
    eprintln!("faulty reconcile: {f:?}, {:?}", sim.stats());
    assert!(sim.stats().faults_injected > 5, "{:?}", sim.stats());
    assert_eq!(
        f.read + f.unread,
        29,
        "every item but the quarantined one: {f:?}"
    );
    assert!(
        f.drifted.iter().all(|d| d.sku != bad),
        "a quarantined item is not drift: {f:?}"
    );
    let edited: Vec<&str> = [1, 12, 25].iter().map(|&i| want[i].sku.as_str()).collect();
    for d in &f.drifted {
        assert!(
            edited.contains(&d.sku.as_str()),
            "only edits drifted: {f:?}"
        );
    }
    sim.fail_requests("shop-f", 0.0);
    // Whatever could not be read or repaired then is repaired by the next reconcile.
    let report = app.reconcile(&eps, &opts, None).await.unwrap();
    assert!(
        report.unfinished == 0 && report.refused.is_empty(),
        "{report:?}"
    );
    for (i, item) in want.iter().enumerate() {
        let got = sim
            .items("shop-f")
            .into_iter()
            .find(|s| s.sku == item.sku)
            .unwrap();
        if item.sku == bad {
            assert_eq!(got.qty, 0, "the refused SKU is left as the shop had it");
            continue;
        }
        assert_eq!(normalized(vec![got]), normalized(vec![item.clone()]), "{i}");
        if !edited.contains(&item.sku.as_str()) {
            // Never written again: reads, lost answers and retries wrote only drift.
            assert_eq!(sim.writes_for("shop-f", &item.sku), 1, "{}", item.sku);
        }
    }
    let f = found(&report, "shop-f");
    assert_eq!((f.read, f.unread), (29, 0), "{f:?}");
    assert_eq!(
        app.quarantine().await.unwrap().len(),
        1,
        "still quarantined"
    );
    assert_clean_audit(&app).await;
    app.close().await;
    sim.shutdown().await;
}

fn rest_endpoint(id: &str, base_url: String) -> EndpointConfig {
    EndpointConfig {
        policy: None,
        id: id.into(),
        adapter: "rest".into(),
        settings: HashMap::from([("base_url".to_owned(), base_url)]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_portal_edits_and_deletions_are_repaired_and_unreadable_adapters_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let sim = simulator::start(SimConfig::default(), loopback())
        .await
        .unwrap();
    let want = items(25, 0);
    seed(&db, &want).await;
    let mut registry = bulwark_adapters::default_registry();
    registry.register(
        "memory",
        Arc::new(|_: &EndpointConfig| {
            let a: Arc<dyn bulwark_workflows::adapter::PortalAdapter> =
                Arc::new(bulwark_adapters::memory::MemoryPortal::new());
            Ok(a)
        }),
    );
    let mut eps: Vec<EndpointConfig> = ["ep-a", "ep-b"]
        .iter()
        .map(|id| rest_endpoint(id, sim.base_url(id)))
        .collect();
    eps.push(EndpointConfig {
        policy: None,
        id: "mem".into(),
        adapter: "memory".into(),
        settings: HashMap::new(),
    });
    let app = Bulwark::open(&db, registry).await.unwrap();
    let opts = options(10);
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 3, "{report:?}");
    let applied = sim.stats().batches_applied;
    assert_eq!(applied, 6);

    // A changed quantity, a deleted product (the shop lost it), through the admin API.
    let client = bulwark_adapters::rest::RestAdapter::shared_client();
    let admin = format!("http://{}/admin/items", sim.addr());
    let r = client
        .put(format!("{admin}/ep-a/{}", want[3].sku))
        .json(&serde_json::json!({"qty": 4242}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    let r = client
        .delete(format!("{admin}/ep-a/{}", want[21].sku))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");

    let report = app.reconcile(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 1, "only ep-a had drifted: {report:?}");
    let a = found(&report, "ep-a");
    assert_eq!(drifted_skus(a), vec![&want[3].sku, &want[21].sku]);
    assert!(
        a.drifted
            .iter()
            .any(|d| d.sku == want[21].sku && d.detail.contains("absent")),
        "{a:?}"
    );
    assert!(found(&report, "ep-b").drifted.is_empty());
    let mem = found(&report, "mem");
    assert_eq!(mem.read, 0);
    assert_eq!(mem.unread, 25, "{mem:?}");
    assert!(
        mem.skipped
            .as_deref()
            .is_some_and(|s| s.contains("cannot read items back")),
        "{mem:?}"
    );
    // One batch carried both repairs (batches are cut from the drifted items alone).
    assert_eq!(sim.stats().batches_applied, applied + 1);
    assert_eq!(sim.stats().duplicates_applied, 0);
    let body: serde_json::Value = client
        .post(format!("{}/items/query", sim.base_url("ep-a")))
        .json(&serde_json::json!({"skus": want.iter().map(|i| &i.sku).collect::<Vec<_>>()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got: Vec<Item> = serde_json::from_value(body["items"].clone()).unwrap();
    assert_eq!(normalized(got), normalized(want.clone()));
    assert_clean_audit(&app).await;
    app.close().await;
    sim.shutdown().await.unwrap();
}
