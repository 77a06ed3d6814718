//! Embedding Bulwark in another Rust program: open a database, register your own
//! `PortalAdapter`, stage a snapshot, sync endpoints durably and watch progress.
//!
//! Run: `cargo run --release -p bulwark-tests --example embed`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bulwark_workflows::adapter::{
    AdapterRegistry, AdapterResult, EndpointConfig, PortalAdapter, Receipt, Verification,
};
use bulwark_workflows::app::{Bulwark, ProgressEvent, ProgressEvents, SyncProgress};
use bulwark_workflows::catalog::{Batch, Item, PriceTier};
use bulwark_workflows::endpoint_sync::State;
use bulwark_workflows::staging::SealStats;
use bulwark_workflows::sync::SyncOptions;

/// A portal that keeps what it receives in memory (yours would call an API).
#[derive(Default)]
struct InMemoryShop {
    shown: Mutex<HashMap<(String, String), i64>>,
    uploads: Mutex<HashMap<uuid::Uuid, Receipt>>,
}

#[async_trait]
impl PortalAdapter for InMemoryShop {
    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        let mut uploads = self.uploads.lock().unwrap();
        if let Some(r) = uploads.get(&batch.key) {
            return Ok(r.clone()); // idempotent: the same key never applies twice
        }
        let mut shown = self.shown.lock().unwrap();
        for item in &batch.items {
            shown.insert((batch.endpoint.clone(), item.sku.clone()), item.qty);
        }
        let receipt = Receipt {
            id: format!("shop-{}", uploads.len() + 1),
        };
        uploads.insert(batch.key, receipt.clone());
        Ok(receipt)
    }

    async fn verify(&self, batch: &Batch, _receipt: &Receipt) -> AdapterResult<Verification> {
        let shown = self.shown.lock().unwrap();
        let wrong = batch
            .items
            .iter()
            .filter(|i| shown.get(&(batch.endpoint.clone(), i.sku.clone())) != Some(&i.qty))
            .count();
        Ok(if wrong == 0 {
            Verification::Verified
        } else {
            Verification::Mismatch {
                details: format!("{wrong} items differ"),
            }
        })
    }

    async fn probe(&self, _endpoint: &str, key: uuid::Uuid) -> AdapterResult<Option<Receipt>> {
        Ok(self.uploads.lock().unwrap().get(&key).cloned())
    }
}

/// Progress events: one line per endpoint that finishes.
struct Printer;
impl SyncProgress for Printer {
    fn started(&self, workflows: usize) {
        println!("syncing {workflows} endpoint(s)");
    }
    fn transition(&self, endpoint: &str, state: &State, terminal: bool) {
        if terminal {
            println!("  {endpoint}: {state:?}");
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("bulwark-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let shop = Arc::new(InMemoryShop::default());
    let mut registry = AdapterRegistry::new();
    let s = shop.clone();
    registry.register(
        "my-shop",
        Arc::new(move |_: &EndpointConfig| Ok(s.clone() as Arc<dyn PortalAdapter>)),
    );
    let mut app = Bulwark::open(dir.join("bulwark.db"), registry).await?;

    // Stage a snapshot (normally `Bulwark::snapshot` reads it from the legacy source).
    let items: Vec<Item> = (1..=25)
        .map(|i| Item {
            sku: format!("SKU-{i:03}"),
            qty: i * 10,
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 999,
            }],
        })
        .collect();
    stage(&app, "embedded example", &items).await?;

    let endpoints: Vec<EndpointConfig> = (1..=3)
        .map(|i| EndpointConfig {
            policy: None,
            id: format!("shop-{i}"),
            adapter: "my-shop".into(),
            settings: Default::default(),
        })
        .collect();
    let options = SyncOptions {
        limits: Default::default(),
        batch_size: 10,
        ..Default::default()
    };
    let report = app
        .sync(&endpoints, &options, Some(Arc::new(Printer)))
        .await?;
    println!(
        "done: {:?}, {} transitions journaled, {} uploads",
        report.by_status, report.transitions, report.uploads
    );
    assert_eq!(report.by_status.get("Done"), Some(&3));

    // Progress as events, for any number of subscribers (a UI, a metrics exporter...).
    // New data for one shop: only it has something to send.
    let mut changed = items.clone();
    changed[0].qty += 5;
    stage(&app, "embedded example, changed", &changed).await?;
    let events = ProgressEvents::new(1024);
    let mut rx = events.subscribe();
    let counter = tokio::spawn(async move {
        let mut finished = 0;
        while let Ok(e) = rx.recv().await {
            if let ProgressEvent::Transition {
                terminal: true,
                endpoint,
                state,
            } = e
            {
                println!("  event: {endpoint} finished {state}");
                finished += 1;
            }
        }
        finished
    });
    let delta = app.sync(&endpoints, &options, Some(events.clone())).await?;
    drop(events);
    assert_eq!(counter.await?, 3, "one final event per endpoint");
    assert_eq!(delta.uploads, 3, "one changed item: one batch per shop");

    // Nothing changed: a second sync sends nothing.
    let again = app.sync(&endpoints, &options, None).await?;
    assert_eq!(again.uploads, 0);
    println!("second sync: nothing to send");
    app.close().await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Stage and seal a snapshot of `items` (what a real snapshot of the legacy source does).
async fn stage(
    app: &Bulwark,
    source: &str,
    items: &[Item],
) -> Result<(), Box<dyn std::error::Error>> {
    let snapshot = app.staging().begin_snapshot(source).await?;
    app.staging().write_page(snapshot, items, &[]).await?;
    app.staging()
        .seal(
            snapshot,
            SealStats {
                rows_read: items.len() as i64,
                ..Default::default()
            },
        )
        .await?;
    Ok(())
}
