//! Crash simulation around an in-process sink: a [`PortalAdapter`] wrapper that, after a
//! given number of adapter calls, never answers again (the process "dies" with those calls
//! in flight), optionally after letting an upload land (a lost acknowledgement).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bulwark_adapters::memory::MemoryPortal;
use bulwark_workflows::adapter::{
    AdapterRegistry, AdapterResult, EndpointConfig, PortalAdapter, Receipt, Verification,
};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Batch, Item, PriceTier};
use tokio::sync::Notify;
use uuid::Uuid;

/// Wraps a shared [`MemoryPortal`]; call number `crash_after` (0-based) and every later
/// call hang forever. With `lose_ack`, a hanging upload is applied at the sink first.
#[derive(Debug)]
pub struct CrashingPortal {
    inner: Arc<MemoryPortal>,
    crash_after: Option<u64>,
    lose_ack: bool,
    calls: AtomicU64,
    /// Uploads applied at the sink whose acknowledgement was then lost.
    pub lost_acks: AtomicU64,
    /// Notified (once per hanging call) when the "crash" happens.
    pub crashed: Arc<Notify>,
}

impl CrashingPortal {
    /// A wrapper that crashes at call `crash_after` (never, if `None`).
    pub fn new(inner: Arc<MemoryPortal>, crash_after: Option<u64>, lose_ack: bool) -> Self {
        Self {
            inner,
            crash_after,
            lose_ack,
            calls: AtomicU64::new(0),
            lost_acks: AtomicU64::new(0),
            crashed: Arc::new(Notify::new()),
        }
    }

    /// Adapter calls received so far (including hanging ones).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Whether this call is at or past the crash point.
    fn dies(&self) -> bool {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.crash_after.is_some_and(|k| n >= k)
    }

    async fn hang<T>(&self) -> T {
        self.crashed.notify_one();
        std::future::pending::<T>().await
    }
}

#[async_trait]
impl PortalAdapter for CrashingPortal {
    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        if self.dies() {
            if self.lose_ack {
                // The batch lands; the acknowledgement never reaches the journal.
                self.inner.upload(batch).await?;
                self.lost_acks.fetch_add(1, Ordering::SeqCst);
            }
            return self.hang().await;
        }
        self.inner.upload(batch).await
    }

    async fn verify(&self, batch: &Batch, receipt: &Receipt) -> AdapterResult<Verification> {
        if self.dies() {
            return self.hang().await;
        }
        self.inner.verify(batch, receipt).await
    }

    async fn probe(&self, endpoint: &str, key: Uuid) -> AdapterResult<Option<Receipt>> {
        if self.dies() {
            return self.hang().await;
        }
        self.inner.probe(endpoint, key).await
    }
}

/// A registry whose `"memory"` adapter is `portal` for every endpoint.
pub fn registry_for(portal: Arc<dyn PortalAdapter>) -> AdapterRegistry {
    let mut registry = AdapterRegistry::new();
    registry.register(
        "memory",
        Arc::new(move |_: &EndpointConfig| Ok(portal.clone())),
    );
    registry
}

/// `n` endpoint configs `ep-001` … using the `"memory"` adapter.
pub fn memory_endpoints(n: u32) -> Vec<EndpointConfig> {
    (1..=n)
        .map(|i| EndpointConfig {
            policy: None,
            id: format!("ep-{i:03}"),
            adapter: "memory".into(),
            settings: Default::default(),
        })
        .collect()
}

/// Create the database at `db` with one sealed snapshot of `items` SKUs; returns its id.
pub async fn seed_snapshot(db: &Path, items: u32) -> anyhow::Result<i64> {
    let app = Bulwark::open(db, AdapterRegistry::new()).await?;
    let items: Vec<Item> = (0..items)
        .map(|i| Item {
            sku: format!("S-{i:04}"),
            qty: i64::from(i) + 1,
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 100 + i64::from(i),
            }],
        })
        .collect();
    let snapshot = app.staging().import("test", &items).await?;
    app.close().await;
    Ok(snapshot)
}
