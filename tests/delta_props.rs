//! Delta correctness as a property: for random pairs of snapshots, the batches a sync run
//! sends to an endpoint that confirmed the first turn its view into exactly the second
//! (SKUs gone from the catalog keep their values under `on_removed = leave` and show
//! quantity 0 under `zero_stock`), and only changed SKUs are sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bulwark_workflows::adapter::{
    AdapterRegistry, AdapterResult, EndpointConfig, PortalAdapter, Receipt, Verification,
};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Batch, Item, PriceTier};
use bulwark_workflows::mapping::EndpointMapping;
use bulwark_workflows::staging::{OnRemoved, SealStats};
use bulwark_workflows::sync::SyncOptions;
use proptest::prelude::*;

type Shown = Arc<Mutex<BTreeMap<String, BTreeMap<String, Item>>>>;

struct Recorder {
    shown: Shown,
    sent: Arc<Mutex<u64>>,
}

#[async_trait]
impl PortalAdapter for Recorder {
    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        let mut shown = self.shown.lock().unwrap();
        let view = shown.entry(batch.endpoint.clone()).or_default();
        for it in &batch.items {
            view.insert(it.sku.clone(), it.clone());
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

fn mapping() -> impl Strategy<Value = EndpointMapping> {
    (
        prop::collection::vec(
            prop::sample::select(vec!["S0", "S01", "S02", "S03", "S04", "S05"]),
            0..3,
        ),
        prop::collection::btree_map(
            (0u32..60).prop_map(|i| format!("S{i:03}")),
            "[a-z]{6}",
            0..10,
        ),
        prop::option::of(prop::sample::select(vec![
            vec![0usize],
            vec![1],
            vec![1, 0],
        ])),
        prop::option::of(500_000i64..2_000_000),
        0i64..5000,
        0i64..10,
    )
        .prop_map(|(prefixes, aliases, tiers, fx, markup, round)| {
            // Aliases must be unique codes.
            let mut seen = std::collections::HashSet::new();
            let aliases = aliases
                .into_iter()
                .filter(|(_, a)| seen.insert(a.clone()))
                .map(|(k, a)| (k, format!("P-{a}")))
                .collect();
            EndpointMapping {
                sku_prefixes: prefixes.into_iter().map(String::from).collect(),
                aliases,
                tiers,
                currency: fx.map(|_| "EUR".into()),
                fx_rate_ppm: fx,
                markup_bp: markup,
                round_to_minor: round,
                ..Default::default()
            }
        })
}

fn mapped(
    m: Option<&EndpointMapping>,
    cat: &BTreeMap<String, (i64, Vec<i64>)>,
) -> BTreeMap<String, Item> {
    let plain: Vec<Item> = items(cat).into_iter().map(|(_, i)| i).collect();
    match m {
        Some(m) => m.apply(&plain),
        None => plain,
    }
    .into_iter()
    .map(|i| (i.sku.clone(), i))
    .collect()
}

async fn case(
    a: BTreeMap<String, (i64, Vec<i64>)>,
    b: BTreeMap<String, (i64, Vec<i64>)>,
    batch_size: u32,
    m: EndpointMapping,
    on_removed: OnRemoved,
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
    let app = Bulwark::open(dir.path().join("b.db"), registry)
        .await
        .unwrap();
    let eps = vec![
        EndpointConfig {
            policy: None,
            id: "plain".into(),
            adapter: "rec".into(),
            settings: HashMap::new(),
        },
        EndpointConfig {
            policy: None,
            id: "mapped".into(),
            adapter: "rec".into(),
            settings: [(
                bulwark_workflows::mapping::SETTINGS_KEY.to_string(),
                serde_json::to_string(&m).unwrap(),
            )]
            .into(),
        },
    ];
    let ms: [(&str, Option<&EndpointMapping>); 2] = [("plain", None), ("mapped", Some(&m))];
    let options = SyncOptions {
        limits: Default::default(),
        batch_size,
        on_removed,
        ..Default::default()
    };
    for (n, cat) in [&a, &b].into_iter().enumerate() {
        let staging = app.staging().clone();
        let id = staging.begin_snapshot("prop").await.unwrap();
        staging
            .write_page_keyed(id, &items(cat), &[])
            .await
            .unwrap();
        staging.seal(id, SealStats::default()).await.unwrap();
        *sent.lock().unwrap() = 0;
        app.sync(&eps, &options, None).await.unwrap();
        let sent_now = *sent.lock().unwrap();
        let mut expected_sent = 0u64;
        for (ep, map) in ms {
            let view = shown.lock().unwrap().get(ep).cloned().unwrap_or_default();
            let want_now = mapped(map, cat);
            // The view equals the mapped snapshot, plus earlier codes: untouched under
            // `leave`, at quantity 0 under `zero_stock`.
            let before = mapped(map, &a);
            let mut want = want_now.clone();
            for (sku, it) in &view {
                if !want_now.contains_key(sku) {
                    match on_removed {
                        OnRemoved::ZeroStock => assert_eq!(
                            it.qty, 0,
                            "{ep}: {sku} gone from snapshot {n} but shown with stock"
                        ),
                        OnRemoved::Leave => assert_eq!(
                            Some(it),
                            before.get(sku),
                            "{ep}: {sku} gone from snapshot {n}: leave must not touch it"
                        ),
                    }
                    want.insert(sku.clone(), it.clone());
                }
            }
            assert_eq!(view, want, "{ep}, snapshot {n}");
            expected_sent += if n == 1 {
                // Only changes: new or changed mapped values, and codes gone.
                let old = mapped(map, &a);
                (want_now
                    .iter()
                    .filter(|(k, v)| old.get(*k) != Some(v))
                    .count()
                    + match on_removed {
                        OnRemoved::ZeroStock => {
                            old.keys().filter(|k| !want_now.contains_key(*k)).count()
                        }
                        OnRemoved::Leave => 0,
                    }) as u64
            } else {
                want_now.len() as u64
            };
        }
        assert_eq!(sent_now, expected_sent, "items sent for snapshot {n}");
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
        m in mapping(),
        zero in proptest::bool::ANY,
    ) {
        let on_removed = if zero { OnRemoved::ZeroStock } else { OnRemoved::Leave };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(case(a, b, batch_size, m, on_removed));
    }
}

#[test]
fn sync_inputs_journaled_before_mappings_still_decode() {
    let old = r#"{"endpoint":"ep-1","snapshot":2,"base":1,"batch_size":500,
        "batches":[{"hash":"ab","items":3}],
        "policy":SERIALIZED}"#;
    let policy =
        serde_json::to_string(&bulwark_workflows::endpoint_sync::SyncPolicy::default()).unwrap();
    let input: bulwark_workflows::endpoint_sync::SyncInput =
        serde_json::from_str(&old.replace("SERIALIZED", &policy)).unwrap();
    assert_eq!(input.mapping, None);
    assert_eq!(input.batches.len(), 1);
    assert_eq!(
        input.on_removed,
        OnRemoved::ZeroStock,
        "journals written before on_removed existed zeroed removed SKUs; replay must recompute their batches so"
    );
}
