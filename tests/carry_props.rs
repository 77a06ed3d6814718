//! Source-data safety as a property: over any sequence of snapshots whose rows may be
//! rejected (negative stock, undecodable text, a SKU carried by two rows) or vanish, a sync
//! never writes a value the source does not hold right now, and every endpoint ends up
//! showing each SKU's last *accepted* value (under `on_removed = leave`): a rejected row
//! never zeroes, lowers or otherwise changes what the shop shows.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bulwark_workflows::adapter::{
    AdapterRegistry, AdapterResult, EndpointConfig, PortalAdapter, Receipt, Verification,
};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::Batch;
use bulwark_workflows::snapshot::{LegacySource, RawRow, SnapshotOptions};
use bulwark_workflows::staging::{ChangeGuard, OnRemoved};
use bulwark_workflows::sync::SyncOptions;
use proptest::prelude::*;

/// Writes of the current sync, and what the endpoint shows.
#[derive(Default)]
struct Shop {
    writes: Vec<(String, i64)>,
    view: BTreeMap<String, i64>,
}

struct Recorder(Arc<Mutex<Shop>>);

#[async_trait]
impl PortalAdapter for Recorder {
    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        let mut shop = self.0.lock().unwrap();
        for it in &batch.items {
            shop.writes.push((it.sku.clone(), it.qty));
            shop.view.insert(it.sku.clone(), it.qty);
        }
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

/// A SKU's row(s) in one snapshot of the source.
#[derive(Debug, Clone)]
enum Cell {
    Good(i64),
    Negative,
    Unreadable,
    Duplicate(i64, i64),
    /// Two rows, the second with negative stock.
    DuplicateOneBad(i64),
}

fn cell() -> impl Strategy<Value = Cell> {
    prop_oneof![
        4 => (0i64..50).prop_map(Cell::Good),
        1 => Just(Cell::Negative),
        1 => Just(Cell::Unreadable),
        1 => (0i64..50, 0i64..50).prop_map(|(a, b)| Cell::Duplicate(a, b)),
        1 => (0i64..50).prop_map(Cell::DuplicateOneBad),
    ]
}

fn catalog() -> impl Strategy<Value = BTreeMap<u8, Cell>> {
    prop::collection::btree_map(0u8..16, cell(), 0..16)
}

/// An in-memory source paging `rows` (sorted by key) as a database would.
struct Source(Vec<RawRow>);

#[async_trait]
impl LegacySource for Source {
    fn describe(&self) -> String {
        "memory".into()
    }
    async fn page(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> bulwark_workflows::Result<Vec<RawRow>> {
        Ok(self
            .0
            .iter()
            .filter(|r| after.is_none_or(|a| r.key.as_str() > a))
            .take(limit as usize)
            .cloned()
            .collect())
    }
    fn queries(&self) -> u64 {
        0
    }
}

fn rows(cat: &BTreeMap<u8, Cell>) -> Vec<RawRow> {
    let raw = |sku: &str, qty: String, unreadable: Option<String>| RawRow {
        key: sku.to_string(),
        sku: Some(sku.to_string()),
        qty: Some(qty),
        prices: vec![Some("1.00".into())],
        unreadable,
    };
    let mut out = Vec::new();
    for (i, c) in cat {
        let sku = format!("S{i:02}");
        match c {
            Cell::Good(q) => out.push(raw(&sku, q.to_string(), None)),
            Cell::Negative => out.push(raw(&sku, "-1".into(), None)),
            Cell::Unreadable => out.push(raw(
                &sku,
                "7".into(),
                Some("column qty: bytes are not valid UTF-8".into()),
            )),
            Cell::Duplicate(a, b) => {
                out.push(raw(&sku, a.to_string(), None));
                out.push(raw(&sku, b.to_string(), None));
            }
            Cell::DuplicateOneBad(a) => {
                out.push(raw(&sku, a.to_string(), None));
                out.push(raw(&sku, "-1".into(), None));
            }
        }
    }
    out
}

async fn case(steps: Vec<BTreeMap<u8, Cell>>, page_size: u32) {
    let dir = tempfile::tempdir().unwrap();
    let shop = Arc::new(Mutex::new(Shop::default()));
    let mut registry = AdapterRegistry::new();
    let rec = Arc::new(Recorder(shop.clone()));
    registry.register(
        "rec",
        Arc::new(move |_: &EndpointConfig| Ok(rec.clone() as Arc<dyn PortalAdapter>)),
    );
    let app = Bulwark::open(dir.path().join("b.db"), registry)
        .await
        .unwrap();
    let eps = vec![EndpointConfig {
        policy: None,
        id: "ep".into(),
        adapter: "rec".into(),
        settings: HashMap::new(),
    }];
    let snap = SnapshotOptions {
        page_size,
        tier_min_qty: vec![1],
        max_rejected_share: 1.0,
        guard: ChangeGuard {
            max_removed_share: 1.0,
            max_changed_share: 1.0,
        },
        ..Default::default()
    };
    let sync = SyncOptions {
        on_removed: OnRemoved::Leave,
        ..Default::default()
    };
    // Model: each SKU's last accepted value.
    let mut last_good: BTreeMap<String, i64> = BTreeMap::new();
    for (n, cat) in steps.iter().enumerate() {
        let r = app.snapshot(&Source(rows(cat)), &snap).await.unwrap();
        assert!(r.sealed, "step {n}: {r:?}");
        for (i, c) in cat {
            if let Cell::Good(q) = c {
                last_good.insert(format!("S{i:02}"), *q);
            }
        }
        shop.lock().unwrap().writes.clear();
        app.sync(&eps, &sync, None).await.unwrap();
        let shop = shop.lock().unwrap();
        for (sku, qty) in &shop.writes {
            let i: u8 = sku[1..].parse().unwrap();
            assert!(
                matches!(cat.get(&i), Some(Cell::Good(q)) if q == qty),
                "step {n}: wrote {sku} = {qty} but the source holds {:?}",
                cat.get(&i)
            );
        }
        assert_eq!(
            shop.view, last_good,
            "step {n}: the shop must show each SKU's last accepted value"
        );
    }
    app.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
    #[test]
    fn rejected_rows_never_change_what_a_shop_shows(
        steps in prop::collection::vec(catalog(), 1..5),
        page_size in 1u32..6,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(case(steps, page_size));
    }
}
