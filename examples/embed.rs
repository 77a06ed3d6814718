//! Embedding Bulwark in another Rust program: open a database with your own
//! `PortalAdapter` registered, stage a snapshot, sync endpoints durably, then run a worker
//! in your own tokio runtime, start runs for it and follow their progress events.
//!
//! Run: `cargo run --release -p bulwark-tests --example embed`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use std::time::Duration;

use bulwark_engine::WorkOptions;
use bulwark_workflows::adapter::{
    AdapterResult, EndpointConfig, PortalAdapter, Receipt, Verification,
};
use bulwark_workflows::app::{Bulwark, ProgressEvent, SyncProgress, WorkerOptions};
use bulwark_workflows::catalog::{Batch, Item, PriceTier};
use bulwark_workflows::endpoint_sync::State;
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

    // Open the database with your own adapter registered (add the built-in REST, HTTP
    // and WebDriver adapters with `.registry(bulwark_adapters::default_registry())`).
    let shop = Arc::new(InMemoryShop::default());
    let app = Bulwark::builder()
        .database(dir.join("bulwark.db").display().to_string())
        .portal("my-shop", shop.clone())
        .open()
        .await?;

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
    app.staging().import("embedded example", &items).await?;

    let endpoints: Vec<EndpointConfig> = (1..=3)
        .map(|i| EndpointConfig {
            id: format!("shop-{i}"),
            adapter: "my-shop".into(),
            ..Default::default()
        })
        .collect();
    let options = SyncOptions {
        batch_size: 10,
        ..Default::default()
    };

    // 1. One call: resume anything unfinished, then plan and run a sync to the end.
    let report = app
        .sync(&endpoints, &options, Some(Arc::new(Printer)))
        .await?;
    println!(
        "done: {:?}, {} transitions journaled, {} uploads",
        report.by_status, report.transitions, report.uploads
    );
    assert_eq!(report.by_status.get("Done"), Some(&3));

    // 2. A worker in this program's runtime, fed with runs, watched through events (any
    // number of subscribers: a UI, a metrics exporter …). New data for the shops: only the
    // one changed item has to go out.
    let worker = app.spawn_worker(
        endpoints.clone(),
        options.clone(),
        WorkerOptions {
            work: WorkOptions {
                poll: Duration::from_millis(100),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let mut events = worker.subscribe();
    let mut changed = items.clone();
    changed[0].qty += 5;
    app.staging()
        .import("embedded example, changed", &changed)
        .await?;
    let run = app
        .enqueue(&endpoints, &options)
        .await?
        .and_then(|plan| plan.run)
        .expect("a run with work to do");
    println!("started run {run}");
    let mut finished = 0;
    let wait = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Ok(ProgressEvent::Transition {
                    endpoint,
                    state,
                    terminal: true,
                }) => {
                    println!("  event: {endpoint} finished {state}");
                    finished += 1;
                }
                Ok(ProgressEvent::RunFinished { run: r, status }) if r == run => {
                    println!("  event: run {r} {status}");
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("progress events: {e}"),
            }
        }
    });
    if wait.await.is_err() {
        // Say why: the worker may have stopped with an error.
        let why = match worker.shutdown().await {
            Ok(r) => format!("it is still working ({} uploads so far)", r.uploads),
            Err(e) => format!("it failed: {e}"),
        };
        return Err(format!("the worker did not finish the run within 60 s: {why}").into());
    }
    assert_eq!(finished, 3, "one final event per endpoint");
    // This process's metrics, in the Prometheus text format.
    let metrics = app.metrics_text();
    assert!(
        metrics.contains("bulwark_batches_total{outcome=\"verified\"} 12"),
        "{metrics}"
    );
    let worked = worker.shutdown().await?;
    assert_eq!(worked.uploads, 3, "one changed item: one batch per shop");
    println!("worker stopped after {} uploads", worked.uploads);

    // Nothing changed: another sync sends nothing.
    let again = app.sync(&endpoints, &options, None).await?;
    assert_eq!(again.uploads, 0);
    println!("another sync: nothing to send");
    app.close().await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
