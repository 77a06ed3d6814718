//! Delta correctness as a property: for random pairs of snapshots, the batches a sync run
//! sends to an endpoint that confirmed the first turn its view into exactly the second
//! (SKUs gone from the catalog show quantity 0), and only changed SKUs are sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bulwark_workflows::adapter::{
    AdapterRegistry, AdapterResult, EndpointConfig, PortalAdapter, Receipt, Verification,
};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Batch, Item, PriceTier};
use bulwark_workflows::staging::SealStats;
use bulwark_workflows::sync::SyncOptions;
use proptest::prelude::*;

type Shown = Arc<Mutex<BTreeMap<String, Item>>>;

struct Recorder {
    shown: Shown,
    sent: Arc<Mutex<u64>>,
}

#[async_trait]
impl PortalAdapter for Recorder {
    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        let mut shown = self.shown.lock().unwrap();
        for it in &batch.items {
            shown.insert(it.sku.clone(), it.clone());
        }
        *self.sent.lock().unwrap() += batch.items.len() as u64;
        Ok(Receipt {
            id: batch.key.to_string(),
        })
    }
    async fn verify(&self, _: &Batch, _: &Receipt) -> AdapterResult<Verification> {
        Ok(Verification::Verified)
    }
    async fn probe(&self, _: &str, _: uuid::Uuid) -> AdapterResult<Option<Receipt>> {
        Ok(None)
    }
}

fn catalog() -> impl Strategy<Value = BTreeMap<String, (i64, Vec<i64>)>> {
    prop::collection::btree_map(
        (0u32..60).prop_map(|i| format!("S{i:03}")),
        (0i64..20, prop::collection::vec(0i64..500, 2)),
        0..40,
    )
}

fn items(c: &BTreeMap<String, (i64, Vec<i64>)>) -> Vec<(String, Item)> {
    c.iter()
        .map(|(sku, (qty, prices))| {
            (
                sku.clone(),
                Item {
                    sku: sku.clone(),
                    qty: *qty,
                    tiers: prices
                        .iter()
                        .enumerate()
                        .map(|(i, p)| PriceTier {
                            min_qty: [1, 10][i],
                            price_minor: *p,
                        })
                        .collect(),
                },
            )
        })
        .collect()
}

async fn case(
    a: BTreeMap<String, (i64, Vec<i64>)>,
    b: BTreeMap<String, (i64, Vec<i64>)>,
    batch_size: u32,
) {
    let dir = tempfile::tempdir().unwrap();
    let shown: Shown = Arc::default();
    let sent = Arc::new(Mutex::new(0u64));
    let rec = Arc::new(Recorder {
        shown: shown.clone(),
        sent: sent.clone(),
    });
    let mut registry = AdapterRegistry::new();
    registry.register(
        "rec",
        Arc::new(move |_: &EndpointConfig| Ok(rec.clone() as Arc<dyn PortalAdapter>)),
    );
    let mut app = Bulwark::open(dir.path().join("b.db"), registry).await.unwrap();
    let eps = vec![EndpointConfig {
        id: "ep".into(),
        adapter: "rec".into(),
        settings: HashMap::new(),
    }];
    let options = SyncOptions {
        batch_size,
        ..Default::default()
    };
    for (n, cat) in [&a, &b].into_iter().enumerate() {
        let staging = app.staging().clone();
        let id = staging.begin_snapshot("prop").await.unwrap();
        staging.write_page_keyed(id, &items(cat), &[]).await.unwrap();
        staging
            .seal(id, SealStats::default())
            .await
            .unwrap();
        *sent.lock().unwrap() = 0;
        app.sync(&eps, &options, None).await.unwrap();
        let view = shown.lock().unwrap().clone();
        // The view equals the snapshot, plus earlier SKUs now at quantity 0.
        let mut want: BTreeMap<String, Item> = items(cat).into_iter().collect();
        for (sku, it) in &view {
            if !cat.contains_key(sku) {
                assert_eq!(it.qty, 0, "{sku} gone from snapshot {n} but shown with stock");
                want.insert(sku.clone(), it.clone());
            }
        }
        assert_eq!(view, want, "snapshot {n}");
        if n == 1 {
            // Only changes were sent: new, changed, and removed-with-stock SKUs.
            let changed = b.iter().filter(|(k, v)| a.get(*k) != Some(v)).count()
                + a.keys().filter(|k| !b.contains_key(*k)).count();
            assert_eq!(*sent.lock().unwrap(), changed as u64);
        } else {
            assert_eq!(*sent.lock().unwrap(), a.len() as u64);
        }
    }
    app.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn batches_turn_the_confirmed_state_into_the_new_snapshot(
        a in catalog(),
        b in catalog(),
        batch_size in 1u32..8,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(case(a, b, batch_size));
    }
}
