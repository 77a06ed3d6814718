//! [`MemoryPortal`]: an in-process [`PortalAdapter`] for engine benchmarks and tests.
//!
//! It records every accepted batch (endpoint, batch index, idempotency key, item count) in a
//! 64-way sharded map keyed by the idempotency key. No JSON, no I/O, one small allocation per
//! first upload. One `MemoryPortal` can serve any number of endpoints concurrently; share it
//! as an `Arc<MemoryPortal>` (it is cheap to coerce to `Arc<dyn PortalAdapter>`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bulwark_workflows::adapter::{AdapterResult, PortalAdapter, Receipt, Verification};
use bulwark_workflows::catalog::Batch;
use uuid::Uuid;

const SHARDS: usize = 64;

#[derive(Debug)]
struct Entry {
    endpoint: Box<str>,
    index: u32,
    items: u32,
    receipt: Receipt,
}

/// A fast in-memory portal (see the [module docs](self)).
///
/// * `upload`: the first upload of a key is *applied* (recorded, receipt `m-<key>`); a
///   repeated key returns the same receipt and counts as a duplicate, never as a second
///   apply.
/// * `verify`: `Verified` if the batch's key was recorded for the same endpoint, index,
///   item count and receipt; otherwise `Mismatch`.
/// * `probe`: the receipt of a recorded key for that endpoint, else `None`.
#[derive(Debug)]
pub struct MemoryPortal {
    shards: Box<[Mutex<HashMap<Uuid, Entry>>]>,
    uploads: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
}

impl Default for MemoryPortal {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryPortal {
    /// An empty portal.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            uploads: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }

    #[inline]
    fn shard(&self, key: &Uuid) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        // Keys are uuid v5 (hash-based), so the low bits are well distributed.
        let idx = (key.as_u128() as usize) % SHARDS;
        // A poisoned shard only means another thread panicked mid-insert of a plain map;
        // the data is still consistent enough for a benchmark double.
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Upload calls received (first deliveries plus duplicates).
    pub fn uploads(&self) -> u64 {
        self.uploads.load(Ordering::Relaxed)
    }

    /// Batches applied (distinct keys recorded).
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Uploads whose key had already been applied (answered with the original receipt,
    /// not applied again). Zero in a run without crashes or lost acknowledgements.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Number of recorded batches (equals [`MemoryPortal::applied`]).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether nothing has been recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The recorded (batch index, item count) for `key`, if it was applied for `endpoint`.
    pub fn recorded(&self, endpoint: &str, key: Uuid) -> Option<(u32, u32)> {
        let shard = self.shard(&key);
        shard
            .get(&key)
            .filter(|e| &*e.endpoint == endpoint)
            .map(|e| (e.index, e.items))
    }
}

#[async_trait]
impl PortalAdapter for MemoryPortal {
    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        bulwark_workflows::adapter::fence_check()?;
        self.uploads.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(&batch.key);
        if let Some(entry) = shard.get(&batch.key) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(entry.receipt.clone());
        }
        let receipt = Receipt {
            id: format!("m-{}", batch.key),
        };
        shard.insert(
            batch.key,
            Entry {
                endpoint: batch.endpoint.as_str().into(),
                index: batch.index,
                items: u32::try_from(batch.items.len()).unwrap_or(u32::MAX),
                receipt: receipt.clone(),
            },
        );
        drop(shard);
        self.applied.fetch_add(1, Ordering::Relaxed);
        Ok(receipt)
    }

    async fn verify(&self, batch: &Batch, receipt: &Receipt) -> AdapterResult<Verification> {
        let shard = self.shard(&batch.key);
        let Some(entry) = shard.get(&batch.key) else {
            return Ok(Verification::Mismatch {
                details: format!(
                    "batch {} (key {}) was never recorded",
                    batch.index, batch.key
                ),
            });
        };
        let items = u32::try_from(batch.items.len()).unwrap_or(u32::MAX);
        if *entry.endpoint != *batch.endpoint
            || entry.index != batch.index
            || entry.items != items
            || entry.receipt != *receipt
        {
            return Ok(Verification::Mismatch {
                details: format!(
                    "key {} recorded as endpoint {} batch {} ({} items, receipt {}), \
                     expected endpoint {} batch {} ({items} items, receipt {})",
                    batch.key,
                    entry.endpoint,
                    entry.index,
                    entry.items,
                    entry.receipt.id,
                    batch.endpoint,
                    batch.index,
                    receipt.id
                ),
            });
        }
        Ok(Verification::Verified)
    }

    async fn probe(&self, endpoint: &str, key: Uuid) -> AdapterResult<Option<Receipt>> {
        let shard = self.shard(&key);
        Ok(shard
            .get(&key)
            .filter(|e| &*e.endpoint == endpoint)
            .map(|e| e.receipt.clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use bulwark_workflows::catalog::{Item, PriceTier, batch_key, payload_hash};

    fn batch(endpoint: &str, index: u32, n: usize) -> Batch {
        let items: Vec<Item> = (0..n)
            .map(|i| Item {
                sku: format!("SKU-{i:04}"),
                qty: i as i64,
                tiers: vec![PriceTier {
                    min_qty: 1,
                    price_minor: 999,
                }],
            })
            .collect();
        let key = batch_key(endpoint, 1, index, &payload_hash(&items), 0);
        Batch {
            remainder: false,
            cas: Default::default(),
            endpoint: endpoint.into(),
            snapshot: 1,
            index,
            key,
            items,
        }
    }

    #[tokio::test]
    async fn upload_verify_probe() {
        let portal = MemoryPortal::new();
        let b = batch("ep-1", 0, 3);
        assert_eq!(portal.probe("ep-1", b.key).await.unwrap(), None);
        let r = portal.upload(&b).await.unwrap();
        assert_eq!(portal.probe("ep-1", b.key).await.unwrap(), Some(r.clone()));
        assert_eq!(portal.probe("ep-2", b.key).await.unwrap(), None);
        assert_eq!(portal.verify(&b, &r).await.unwrap(), Verification::Verified);
        assert_eq!(portal.recorded("ep-1", b.key), Some((0, 3)));
        assert_eq!(
            (portal.uploads(), portal.applied(), portal.duplicates()),
            (1, 1, 0)
        );
        assert_eq!(portal.len(), 1);
    }

    #[tokio::test]
    async fn duplicate_key_applies_once_and_returns_same_receipt() {
        let portal = MemoryPortal::new();
        let b = batch("ep-1", 4, 2);
        let r1 = portal.upload(&b).await.unwrap();
        let r2 = portal.upload(&b).await.unwrap();
        assert_eq!(r1, r2);
        assert_eq!(
            (portal.uploads(), portal.applied(), portal.duplicates()),
            (2, 1, 1)
        );
        assert_eq!(portal.len(), 1);
    }

    #[tokio::test]
    async fn verify_detects_unknown_key_and_wrong_receipt() {
        let portal = MemoryPortal::new();
        let b = batch("ep-1", 0, 1);
        let bogus = Receipt { id: "nope".into() };
        assert!(matches!(
            portal.verify(&b, &bogus).await.unwrap(),
            Verification::Mismatch { .. }
        ));
        let _ = portal.upload(&b).await.unwrap();
        assert!(matches!(
            portal.verify(&b, &bogus).await.unwrap(),
            Verification::Mismatch { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_uploads_count_exactly() {
        let portal = Arc::new(MemoryPortal::new());
        let mut tasks = Vec::new();
        for t in 0..8 {
            let portal = portal.clone();
            tasks.push(tokio::spawn(async move {
                // Every task uploads the same 500 batches: each must apply exactly once.
                for i in 0..500u32 {
                    let b = batch(&format!("ep-{}", i % 10), i, 1);
                    let _ = t;
                    portal.upload(&b).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(portal.uploads(), 4000);
        assert_eq!(portal.applied(), 500);
        assert_eq!(portal.duplicates(), 3500);
        assert_eq!(portal.len(), 500);
    }
}
